//! The admin listener, separate from public traffic: metrics, health, purge.
//!
//! | request | answer |
//! | --- | --- |
//! | `GET /healthz` | 200 while the process serves; needs no token (probes) |
//! | `GET /readyz` | 200 when the store and the bus answer, else 503 naming which |
//! | `GET /metrics` | Prometheus text format 0.0.4; OpenMetrics when `Accept` asks for it |
//! | `DELETE /fragments/{name}?{params}` | deletes one fragment (with the request's `vary` cookies/headers) |
//! | `DELETE /routes/{name}` | moves the route to a new generation: every fragment of it is gone |
//! | `DELETE /tags/{tag}` | retires every fragment whose render answer carried the tag (`Surrogate-Key`), on every route |
//! | `DELETE /tags/{a},{b},…` | the same for each tag of the list (at most 32) |
//! | `DELETE /tags/{a},{b},…?all_of=1` | retires every fragment carrying all of the tags |
//! | `…?soft=1` (or `Fastly-Soft-Purge: 1`) on any purge | makes the content stale instead: served while one rebuild runs |
//! | `…?wait=2s` on any purge | answers once every known gateway applied it (or after the wait), saying who missed ([`crate::cache::acks`]) |
//! | `GET /` | the dashboard (refreshes itself from `GET /api/status`; `dashboard.js`, `dashboard.css`) |
//! | `/dead-letters…` | list, retry and discard dead letters ([`super::dead_letters`]) |
//!
//! When `gateway.admin_token` is set, every request but `/healthz` must carry
//! `Authorization: Bearer {token}` (or HTTP Basic with the token as password, which is
//! how a browser logs in to the dashboard); the gateway refuses to start with an admin listener
//! off loopback and no token. Since a browser resends Basic credentials by itself, a
//! request that changes state (POST, DELETE, …) coming from another site (`Origin`,
//! `Referer` or `Sec-Fetch-Site`) is refused with a 403; every answer forbids framing.
//! Purges are announced on the events exchange, so every
//! gateway's L1 forgets the content: a purged fragment is never served again, not even
//! as stale.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use tessera_protocol::tags::Tag;
use tessera_protocol::{Backends, Identity, QueueStats};
use tessera_runtime::reload::LiveConfig;

use super::dead_letters;
use super::error::GatewayError;
use super::headers::Trace;
use crate::cache::acks::{MAX_WAIT, Ticket};
use crate::cache::{CacheService, TagPurge};
use crate::metrics::Metrics;
use tessera_runtime::web::{self, Body, READY_TIMEOUT, json, problem, text};

/// What the admin listener acts on.
#[derive(Debug)]
pub(crate) struct Admin {
    /// The configuration the gateway runs with, as reloads leave it.
    pub config: Arc<LiveConfig>,
    /// Purges, and what L1 holds.
    pub cache: Arc<CacheService>,
    /// The store and bus: readiness, queues, dead letters.
    pub backends: Backends,
    /// The gateway's metrics.
    pub metrics: Arc<Metrics>,
    /// Where the admin listener listens (what a request without a token must name).
    pub listen: SocketAddr,
}

impl Admin {
    /// Answers one admin request: the checks every admin listener makes, then routing.
    pub(crate) async fn serve(
        self: Arc<Self>,
        req: Request<Incoming>,
        _peer: SocketAddr,
    ) -> Response<Body> {
        let gate = web::admin_gate(
            &req,
            &self.config.load().gateway.admin_token,
            "gateway.admin_token",
            self.listen,
        );
        let mut response = match gate {
            Some(refused) => refused,
            None => self.admin_route(req).await,
        };
        web::harden(response.headers_mut());
        response
    }

    /// Routes one admin request that passed the gate.
    async fn admin_route(&self, req: Request<Incoming>) -> Response<Body> {
        let path = req.uri().path().to_string();
        match (req.method(), path.as_str()) {
            (&Method::GET, "/") => dashboard(),
            (&Method::GET, "/dashboard.js") => text(
                StatusCode::OK,
                "text/javascript; charset=utf-8",
                DASHBOARD_JS,
            ),
            (&Method::GET, "/dashboard.css") => {
                text(StatusCode::OK, "text/css; charset=utf-8", DASHBOARD_CSS)
            }
            (&Method::GET, "/api/status") => self.status().await,
            (&Method::GET, "/healthz") => web::alive(),
            (&Method::GET, "/readyz") => web::ready(&self.backends).await,
            (&Method::GET, "/metrics") => {
                self.read_scraped_metrics().await;
                web::metrics(self.metrics.registry(), req.headers())
            }
            (&Method::DELETE, p) if p.starts_with("/fragments/") => {
                let name = &p["/fragments/".len()..];
                self.purge_fragment(name, &req)
                    .await
                    .unwrap_or_else(GatewayError::into_response)
            }
            (&Method::DELETE, p) if p.starts_with("/tags/") => {
                let name = &p["/tags/".len()..];
                self.purge_tags(name, &req)
                    .await
                    .unwrap_or_else(GatewayError::into_response)
            }
            (&Method::DELETE, p) if p.starts_with("/routes/") => {
                let name = &p["/routes/".len()..];
                self.purge_route(name, &req)
                    .await
                    .unwrap_or_else(GatewayError::into_response)
            }
            (method, p) => {
                let bus = self.backends.bus.as_ref();
                match dead_letters::serve(bus, method, p, req.uri().query()).await {
                    Some(response) => response,
                    None => problem(
                        StatusCode::NOT_FOUND,
                        "not_found",
                        &format!("no admin endpoint {} {path}", req.method()),
                    ),
                }
            }
        }
    }

    /// Deletes one fragment everywhere and tells every gateway.
    async fn purge_fragment(
        &self,
        name: &str,
        req: &Request<Incoming>,
    ) -> Result<Response<Body>, GatewayError> {
        let wait = wait_param(req.uri().query())?;
        let soft = soft_param(req.uri().query(), req.headers())?;
        let config = self.config.load();
        let route = config
            .route(name)
            .ok_or_else(|| GatewayError::UnknownRoute(name.to_string()))?;
        // `wait` and `soft` are the purge's, not params of the fragment.
        let params: Vec<&str> = req
            .uri()
            .query()
            .unwrap_or("")
            .split('&')
            .filter(|p| !p.starts_with("wait=") && !p.starts_with("soft="))
            .collect();
        let query = params.join("&");
        let identity = Identity::from_request(route, Some(&query), req.headers())?;
        let trace = Trace::new(req.headers());
        let fragment = self.cache.fragment(route, identity, &trace).await?;
        let ticket = self.cache.acks.open();
        let deleted = self
            .cache
            .purge_fragment(&fragment, soft, ticket.id())
            .await?;
        let key = fragment.keys.envelope.as_str();
        let body = serde_json::json!({ "route": route.name, "key": key, "deleted": deleted, "soft": soft });
        Ok(self.purged(body, &ticket, wait).await)
    }

    /// Purges a tag, or a list of them (percent-encoded in the path, separated by
    /// commas), each or (`?all_of=1`) the fragments carrying all of them, and tells
    /// every gateway.
    async fn purge_tags(
        &self,
        encoded: &str,
        req: &Request<Incoming>,
    ) -> Result<Response<Body>, GatewayError> {
        let query = req.uri().query();
        if encoded.is_empty() {
            return Ok(problem(
                StatusCode::NOT_FOUND,
                "not_found",
                "name the tags to purge: DELETE /tags/{tag} or /tags/{a},{b}",
            ));
        }
        let (all_of, wait) = (flag_param(query, "all_of")?, wait_param(query)?);
        let soft = soft_param(query, req.headers())?;
        let tags = Tag::list_from_path_segment(encoded)?;
        let how = match (all_of, soft) {
            (true, true) if tags.len() > 1 => {
                return Err(GatewayError::BadPurgeOption(
                    "a soft purge of all of several tags is not supported: purge them \
                     softly one by one, or all of them at once without soft"
                        .into(),
                ));
            }
            (_, true) => TagPurge::Soft,
            (true, false) => TagPurge::AllOf,
            (false, false) => TagPurge::Each,
        };
        let ticket = self.cache.acks.open();
        let purged_at = self.cache.purge_tags(&tags, how, ticket.id()).await?;
        let names: Vec<&str> = tags.iter().map(Tag::as_str).collect();
        let mut body = serde_json::json!({
            "tags": names, "all_of": all_of, "soft": soft, "purged_at": purged_at,
        });
        if let [one] = &names[..] {
            body["tag"] = (*one).into();
        }
        Ok(self.purged(body, &ticket, wait).await)
    }

    /// Moves a route to a new generation (or, soft, makes what it holds stale) and tells
    /// every gateway.
    async fn purge_route(
        &self,
        name: &str,
        req: &Request<Incoming>,
    ) -> Result<Response<Body>, GatewayError> {
        let query = req.uri().query();
        let (wait, soft) = (wait_param(query)?, soft_param(query, req.headers())?);
        let config = self.config.load();
        let route = config
            .route(name)
            .ok_or_else(|| GatewayError::UnknownRoute(name.to_string()))?;
        let ticket = self.cache.acks.open();
        let generation = self.cache.purge_route(route, soft, ticket.id()).await?;
        let body =
            serde_json::json!({ "route": route.name, "generation": generation, "soft": soft });
        Ok(self.purged(body, &ticket, wait).await)
    }

    /// The answer to a purge made under `ticket`: `body`, with, when the request asked
    /// to `wait`, what the acknowledgements amount to (`acknowledged`).
    async fn purged(
        &self,
        mut body: serde_json::Value,
        ticket: &Ticket<'_>,
        wait: Option<Duration>,
    ) -> Response<Body> {
        if let Some(wait) = wait {
            let report = ticket.wait(wait).await;
            if !report.missed.is_empty() {
                self.metrics.purges_unacknowledged.inc();
            }
            body["acknowledged"] = serde_json::json!(report);
        }
        json(StatusCode::OK, &body)
    }
}

/// A purge's `wait` (`?wait=2s`, `500ms`; at most [`MAX_WAIT`]); a bad value is refused.
fn wait_param(query: Option<&str>) -> Result<Option<Duration>, GatewayError> {
    let Some(text) = dead_letters::query_param(query, "wait") else {
        return Ok(None);
    };
    match humantime::parse_duration(text) {
        Ok(wait) if wait <= MAX_WAIT => Ok(Some(wait)),
        _ => Err(GatewayError::BadPurgeOption(format!(
            "wait is a duration of at most {}s, such as 2s or 500ms, not {text:?}",
            MAX_WAIT.as_secs()
        ))),
    }
}

/// Whether a purge is soft: `?soft=1`, or Fastly's `Fastly-Soft-Purge: 1` header.
fn soft_param(query: Option<&str>, headers: &http::HeaderMap) -> Result<bool, GatewayError> {
    let header = headers
        .get("fastly-soft-purge")
        .is_some_and(|v| v.as_bytes() == b"1");
    Ok(flag_param(query, "soft")? || header)
}

/// A yes/no query parameter (`1`, `true`, `0`, `false`; absent: no).
fn flag_param(query: Option<&str>, name: &str) -> Result<bool, GatewayError> {
    match dead_letters::query_param(query, name) {
        None | Some("0" | "false") => Ok(false),
        Some("1" | "true") => Ok(true),
        Some(other) => Err(GatewayError::BadPurgeOption(format!(
            "{name} is 1 or 0, not {other:?}"
        ))),
    }
}

const DASHBOARD: &str = include_str!("../../assets/dashboard.html");
const DASHBOARD_JS: &str = include_str!("../../assets/dashboard.js");
const DASHBOARD_CSS: &str = include_str!("../../assets/dashboard.css");
/// The dashboard's policy: its own script and style files (no inline code, so an
/// injected `<script>` would not run), requests to its own origin, never framed.
const DASHBOARD_CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
    connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// `GET /`: the dashboard page, under [`DASHBOARD_CSP`].
fn dashboard() -> Response<Body> {
    let mut r = text(StatusCode::OK, "text/html; charset=utf-8", DASHBOARD);
    r.headers_mut().insert(
        http::header::CONTENT_SECURITY_POLICY,
        http::HeaderValue::from_static(DASHBOARD_CSP),
    );
    r
}

impl Admin {
    /// Every configured queue, build and background, with its depth and consumers, read
    /// from the broker (all queues at once, each bounded by [`READY_TIMEOUT`]; `None` when
    /// it did not answer).
    async fn queue_stats(&self) -> Vec<(String, Option<QueueStats>)> {
        let config = self.config.load();
        let queues: Vec<String> = config
            .queues()
            .into_iter()
            .chain(config.background_queues())
            .collect();
        let stats = futures_util::future::join_all(queues.iter().map(|queue| async move {
            match tokio::time::timeout(READY_TIMEOUT, self.backends.bus.queue_stats(queue)).await {
                Ok(Ok(stats)) => Some(stats),
                _ => None,
            }
        }))
        .await;
        queues.into_iter().zip(stats).collect()
    }

    /// Sets the figures read at scrape time rather than counted as they happen: L1 size,
    /// long-polls, and every queue's depth and consumers from the broker (queues the
    /// broker does not answer for are left out).
    async fn read_scraped_metrics(&self) {
        let sizes = self.cache.sizes().await;
        let m = &self.metrics;
        m.l1_entries
            .set(i64::try_from(sizes.l1_entries).unwrap_or(i64::MAX));
        m.l1_bytes
            .set(i64::try_from(sizes.l1_bytes).unwrap_or(i64::MAX));
        m.long_polls
            .set(i64::try_from(sizes.long_polls).unwrap_or(i64::MAX));
        m.queues.set(self.queue_stats().await);
    }

    /// What the dashboard shows beyond `/metrics`, as JSON: queues, workers, failures,
    /// dead letters, readiness.
    async fn status(&self) -> Response<Body> {
        let stats = self.queue_stats().await;
        let workers = self.workers(&stats);
        let queues: Vec<serde_json::Value> = stats
            .into_iter()
            .map(|(name, stats)| {
                serde_json::json!({
                    "name": name,
                    "messages": stats.as_ref().map(|s| s.messages),
                    "consumers": stats.as_ref().map(|s| s.consumers),
                })
            })
            .collect();
        let dead = match tokio::time::timeout(
            READY_TIMEOUT,
            self.backends.bus.dead_letters(dead_letters::PAGE),
        )
        .await
        {
            Ok(Ok(letters)) => letters.iter().map(dead_letters::letter_json).collect(),
            _ => Vec::new(),
        };
        let failures = self.cache.recent_failures();
        let limits = self.limits().await;
        let ready = web::readiness(&self.backends).await;
        json(
            StatusCode::OK,
            &serde_json::json!({
                "queues": queues,
                "limits": limits,
                "workers": workers,
                "recent_failures": failures,
                "dead_letters": dead,
                "ready": ready.to_json(),
                "store_servers": self.backends.store.servers(),
                "gateway": self.cache.acks.me(),
                "gateways": self.cache.acks.known(std::time::Instant::now()),
            }),
        )
    }

    /// Each route with render limits: its `max_renders` and `renders_per_second`, and
    /// its renders in flight over the deployment now, counted from its slots in the store
    /// (`null` when the store did not answer, or the route has no `max_renders`).
    async fn limits(&self) -> Vec<serde_json::Value> {
        let config = self.config.load();
        let limited = config.fragments.iter().filter(|r| r.limited());
        let counts = futures_util::future::join_all(limited.clone().map(|r| async move {
            if r.max_renders == 0 {
                return None;
            }
            let keys: Vec<_> = (0..r.max_renders)
                .map(|i| self.backends.keys.render_slot(&r.name, i))
                .collect();
            let held = self.backends.store.get_many(&keys);
            match tokio::time::timeout(READY_TIMEOUT, held).await {
                Ok(Ok(held)) => Some(held.len()),
                _ => None,
            }
        }))
        .await;
        limited
            .zip(counts)
            .map(|(r, rendering)| {
                serde_json::json!({
                    "route": r.name,
                    "max_renders": r.max_renders,
                    "renders_per_second": r.renders_per_second,
                    "rendering": rendering,
                })
            })
            .collect()
    }

    /// How many workers build this gateway's fragments, as the dashboard shows them.
    /// The in-process bus has no other workers than this gateway's build tasks
    /// (`workers.embedded`), though it reports them as one consumer per queue. With a
    /// broker, every worker pool (a `tessera-worker` process, or a gateway's embedded
    /// workers) consumes every queue once, so the queue with the most consumers counts
    /// them (`null` when the broker answered for no queue).
    fn workers(&self, stats: &[(String, Option<QueueStats>)]) -> serde_json::Value {
        let config = self.config.load();
        if config.backend.amqp().is_none() {
            return serde_json::json!({ "kind": "embedded", "count": config.workers.embedded });
        }
        let count = stats
            .iter()
            .filter_map(|(_, s)| s.as_ref().map(|s| s.consumers))
            .max();
        serde_json::json!({ "kind": "broker", "count": count })
    }
}
