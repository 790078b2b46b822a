//! The fragment endpoint: `GET {fragment_prefix}{name}?{params}`.
//!
//! Answers never wait for a render, except when the client asked to with
//! `Prefer: wait=N`:
//!
//! | the store holds | answer |
//! | --- | --- |
//! | a fresh envelope | 200 (or 304 on `If-None-Match`) |
//! | a stale one | 200 stale, and one rebuild is requested |
//! | nothing | 202 placeholder; the first caller anywhere queues the build (lease) |
//! | a failed build with a servable copy | 200 stale-if-error |
//! | a failed build, nothing to serve | 502 problem with `Retry-After` |
//!
//! What is found, and which build is requested, is [`crate::service`]'s business; this
//! module turns it into HTTP answers.

use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, header};
use tessera_protocol::time::{ceil_secs, now_ms, remaining};
use tessera_protocol::{Envelope, FragmentRoute, Identity};

use crate::Gateway;
use crate::cache::{Slot, SlotState};
use crate::compose::{Composed, PageBase};
use crate::error::GatewayError;
use crate::headers::{Trace, if_none_match, prefer_wait, wants_json};
use crate::hot::{Hot, LastHeaders};
use crate::metrics::CacheStatus;
use crate::service::{Found, Target};
use tessera_runtime::web::{Body, empty, full};

/// `Retry-After` on pending answers: clients should prefer `Prefer: wait`.
const PENDING_RETRY_AFTER: u64 = 1;

/// RFC 9211's `Cache-Status`.
static CACHE_STATUS: header::HeaderName = header::HeaderName::from_static("cache-status");

impl Gateway {
    /// Answers a fresh hit from the hot answers, without looking anything up or
    /// awaiting; `None` sends the request down the full path ([`Self::fragment`]).
    pub(crate) fn hot_fragment<B: Sync>(&self, req: &Request<B>) -> Option<Response<Body>> {
        let started = std::time::Instant::now();
        if req.method() != Method::GET && req.method() != Method::HEAD {
            return None;
        }
        let hot = self.hot.get(req.uri().path_and_query()?.as_str())?;
        let SlotState::Found(envelope) = &hot.slot.state else {
            return None;
        };
        let route = self.config.fragments.get(hot.route)?;
        // In a route's `refresh_ahead` stretch, hits take the full path, which may start
        // the early rebuild.
        if !self
            .cache
            .l1
            .unchanged_since(hot.checked_at, hot.loaded_at, started)
            || started + route.refresh_ahead >= hot.fresh_until
        {
            return None;
        }
        let ttl = (hot.fresh_until - started).as_secs();
        // Whether to compress, and the `Vary` that goes with it, decided once per entry.
        let compressed = self.config.gateway.compress && hot.slot.compressible;
        let headers = hot.headers.get(ttl, || {
            let mut h = answer_headers(route, &hot.slot, hit_status(ttl));
            if compressed {
                crate::encoding::add_vary(&mut h);
            }
            h
        });
        let compression = if compressed {
            Compression::Marked(&hot.slot.encoded)
        } else {
            Compression::Off
        };
        let response = finish(
            req,
            &envelope.etag,
            envelope.body.clone(),
            headers,
            compression,
        );
        hot.metrics
            .request(CacheStatus::hit, started.elapsed().as_secs_f64());
        Some(response)
    }

    /// Serves one fragment request.
    pub(crate) async fn fragment<B: Sync>(
        self: &Arc<Self>,
        req: &Request<B>,
        name: &str,
    ) -> Response<Body> {
        let started = std::time::Instant::now();
        let (response, cache) = match self.fragment_inner(req, name).await {
            Ok(answer) => answer,
            Err(e) => {
                if matches!(e, GatewayError::Store(_)) {
                    self.metrics.store_errors.inc();
                } else if matches!(e, GatewayError::Bus(_)) {
                    self.metrics.bus_errors.inc();
                }
                (e.into_response(), CacheStatus::error)
            }
        };
        self.metrics
            .route(name)
            .request(cache, started.elapsed().as_secs_f64());
        response
    }

    async fn fragment_inner<B: Sync>(
        self: &Arc<Self>,
        req: &Request<B>,
        name: &str,
    ) -> Result<(Response<Body>, CacheStatus), GatewayError> {
        if req.method() != Method::GET && req.method() != Method::HEAD {
            return Err(GatewayError::MethodNotAllowed {
                method: req.method().clone(),
                allow: "GET, HEAD",
            });
        }
        let route = self
            .config
            .route(name)
            .ok_or_else(|| GatewayError::UnknownRoute(name.to_string()))?;
        let mut identity = Identity::from_request(route, req.uri().query(), req.headers())?;
        let trace = Trace::new(req.headers());
        let wait = prefer_wait(req.headers()).map(|w| w.min(self.config.gateway.max_wait));
        let deadline = wait.map(|w| tokio::time::Instant::now() + w);
        // Whether this request waited for a build: what it is then served is no hit.
        let mut waited = false;

        loop {
            let checked_at = std::time::Instant::now();
            let target = self.cache.target(route, identity, &trace).await?;
            // Register before looking, so a `built` event between the lookup and the
            // wait still wakes us.
            let mut waiter = deadline.map(|_| self.waiters.register(target.keys.envelope.as_str()));
            let found = self.cache.lookup(&target).await?;
            match (found, deadline, waiter.as_mut()) {
                (Found::Pending, Some(deadline), Some(waiter))
                    if tokio::time::Instant::now() < deadline =>
                {
                    // Boxed: waiting is the rare path, and its timer would otherwise
                    // enlarge every request's future.
                    waited = true;
                    if Box::pin(self.wait(waiter, deadline)).await {
                        identity = target.identity;
                        continue;
                    }
                    // Deadline or shutdown: one last look, then answer whatever it is.
                    let found = self.cache.lookup(&target).await?;
                    let (response, cache) = self.answer(req, &target, found).await;
                    return Ok((response, cache.after_waiting(true)));
                }
                (found, _, _) => {
                    if let Found::Serve {
                        slot, stale: false, ..
                    } = &found
                    {
                        self.remember(req, &target, slot, checked_at);
                    }
                    let (response, cache) = self.answer(req, &target, found).await;
                    return Ok((response, cache.after_waiting(waited)));
                }
            }
        }
    }

    /// The answer to `req` for what a lookup of `target` found. A fragment whose render
    /// asked for ESI has its includes composed first, as in a page: the fragment is level
    /// 1 of the page the client script puts it in, so the same depth limit holds.
    async fn answer<B: Sync>(
        &self,
        req: &Request<B>,
        target: &Target<'_>,
        found: Found,
    ) -> (Response<Body>, CacheStatus) {
        let composed = match composable(&found) {
            // Boxed: composition is the rare path, and its future is large.
            Some(body) => {
                let base = PageBase::of(req.uri(), req.headers());
                let compose = self.compose_at(body, &base, req.headers(), target.trace, 1);
                Some(Box::pin(compose).await)
            }
            None => None,
        };
        respond(
            target.route,
            req,
            found,
            composed,
            self.config.gateway.compress,
        )
    }

    /// Makes a fresh answer the hot answer for its request target (routes without
    /// `vary` only, and only while L1 caches slots).
    fn remember<B: Sync>(
        &self,
        req: &Request<B>,
        target: &Target<'_>,
        slot: &Arc<Slot>,
        checked_at: std::time::Instant,
    ) {
        let route = target.route;
        if !route.vary.is_empty() || !self.cache.l1.enabled() || needs_composing(&slot.state) {
            // Per user, not cached, or composed from other fragments per answer.
            return;
        }
        let (SlotState::Found(envelope), Some(request_target), Some(index)) = (
            &slot.state,
            req.uri().path_and_query(),
            self.config
                .fragments
                .iter()
                .position(|r| std::ptr::eq(r, route)),
        ) else {
            return;
        };
        self.hot.insert(Hot {
            target: request_target.as_str().into(),
            route: index,
            metrics: self.metrics.route(&route.name).clone(),
            slot: slot.clone(),
            checked_at,
            loaded_at: target.generation_read_at.min(slot.loaded_at()),
            fresh_until: std::time::Instant::now() + remaining(now_ms(), envelope.fresh_until),
            headers: LastHeaders::default(),
        });
    }

    /// Sleeps until `waiter` is woken (true), or the deadline passes or the gateway stops
    /// (false).
    async fn wait(
        &self,
        waiter: &mut crate::waiters::Waiter<'_>,
        deadline: tokio::time::Instant,
    ) -> bool {
        tokio::select! {
            () = waiter.woken() => true,
            () = tokio::time::sleep_until(deadline) => false,
            () = self.stopping.cancelled() => false,
        }
    }
}

/// How what a lookup found counts, at the endpoint or as an ESI include (before any
/// waiting, see [`CacheStatus::after_waiting`]).
pub(crate) fn cache_status(found: &Found) -> CacheStatus {
    match found {
        Found::Serve { slot, .. } if matches!(slot.state, SlotState::Pending) => {
            CacheStatus::pending
        }
        Found::Serve { stale: true, .. } => CacheStatus::stale,
        Found::Serve { stale: false, .. } => CacheStatus::hit,
        Found::Pending => CacheStatus::pending,
        Found::Failed { .. } => CacheStatus::error,
    }
}

/// The body of a found envelope that asked for ESI and carries markup.
fn composable(found: &Found) -> Option<&[u8]> {
    match found {
        Found::Serve { slot, .. } if needs_composing(&slot.state) => match &slot.state {
            SlotState::Found(e) => Some(&e.body),
            SlotState::Pending => None,
        },
        _ => None,
    }
}

fn needs_composing(state: &SlotState) -> bool {
    matches!(state, SlotState::Found(e) if e.esi && crate::esi::has_markup(&e.body))
}

/// The answer to `req` for what a lookup found (with its includes `composed`, when it
/// asked for ESI), and how it counts.
fn respond<B: Sync>(
    route: &FragmentRoute,
    req: &Request<B>,
    found: Found,
    composed: Option<Composed>,
    compress: bool,
) -> (Response<Body>, CacheStatus) {
    let cache = cache_status(&found);
    let response = match found {
        Found::Serve {
            slot,
            stale,
            fallback,
        } => match &slot.state {
            SlotState::Found(envelope) => {
                let answer = Answer::new(route, &slot, envelope, stale, fallback);
                match composed {
                    Some(composed) => answer.composed(req, composed, compress),
                    None => finish(
                        req,
                        &envelope.etag,
                        envelope.body.clone(),
                        answer.headers,
                        Compression::Decide(compress, Some(&slot.encoded)),
                    ),
                }
            }
            SlotState::Pending => pending(route, req.headers()),
        },
        Found::Pending => pending(route, req.headers()),
        Found::Failed { error, retry_after } => {
            GatewayError::BuildFailed { error, retry_after }.into_response()
        }
    };
    (response, cache)
}

/// A 200 serving an envelope, before its body is chosen.
struct Answer {
    headers: HeaderMap,
}

impl Answer {
    fn new(
        route: &FragmentRoute,
        slot: &Slot,
        envelope: &Envelope,
        stale: bool,
        fallback: bool,
    ) -> Self {
        let now = now_ms();
        let status = if stale {
            let age = ceil_secs(remaining(envelope.fresh_until, now));
            // The last build failed, or the store cannot be reached: either way an error
            // is why this copy is served.
            let detail = if envelope.error.is_some() || fallback {
                "; detail=stale-if-error"
            } else {
                ""
            };
            format!("tessera; fwd=stale; ttl=-{age}{detail}")
        } else {
            hit_status(remaining(now, envelope.fresh_until).as_secs())
        };
        Self {
            headers: answer_headers(route, slot, status),
        }
    }

    /// Serves the composed fragment: its own ETag, and private when an include varies
    /// per user.
    fn composed<B: Sync>(
        mut self,
        req: &Request<B>,
        composed: Composed,
        compress: bool,
    ) -> Response<Body> {
        let etag = tessera_protocol::envelope::etag_of(&composed.body);
        if let Ok(v) = HeaderValue::from_str(&etag) {
            self.headers.insert(header::ETAG, v);
        }
        if composed.per_user {
            self.headers.insert(
                header::CACHE_CONTROL,
                HeaderValue::from_static("private, no-cache"),
            );
        }
        finish(
            req,
            &etag,
            Bytes::from(composed.body),
            self.headers,
            Compression::Decide(compress, None),
        )
    }
}

/// The `Cache-Status` of a fresh hit with `ttl` seconds of freshness left.
fn hit_status(ttl: u64) -> String {
    format!("tessera; hit; ttl={ttl}")
}

/// The headers of a 200 serving `slot`'s envelope with `Cache-Status: {status}`, all but
/// its length.
fn answer_headers(route: &FragmentRoute, slot: &Slot, status: String) -> HeaderMap {
    let mut h = HeaderMap::with_capacity(8);
    if let Some(ct) = &slot.content_type {
        h.insert(header::CONTENT_TYPE, ct.clone());
    }
    if let Some(etag) = &slot.etag {
        h.insert(header::ETAG, etag.clone());
    }
    cache_headers(route, &mut h);
    if let Ok(v) = HeaderValue::try_from(status) {
        h.insert(&CACHE_STATUS, v);
    }
    h
}

/// How [`finish`] may compress an answer.
pub(crate) enum Compression<'a> {
    /// As `gateway.compress` (the first) and the answer's type and size allow, from the
    /// body's cached copies (the second) when it has them.
    Decide(bool, Option<&'a crate::encoding::Encoded>),
    /// Decided already: the answer is eligible and its headers carry the `Vary`; from
    /// the body's cached copies.
    Marked(&'a crate::encoding::Encoded),
    /// Never.
    Off,
}

/// The answer to `req` serving `body` (whose ETag is `etag`) with `headers`: compressed
/// when `compression` and the request allow it, 304 when `If-None-Match` matches the
/// representation chosen, no body for `HEAD`.
pub(crate) fn finish<B: Sync>(
    req: &Request<B>,
    etag: &str,
    body: Bytes,
    mut headers: HeaderMap,
    compression: Compression<'_>,
) -> Response<Body> {
    let (body, _) = match compression {
        Compression::Decide(enabled, cached) => {
            crate::encoding::represent(enabled, req.headers(), &mut headers, body, cached)
        }
        Compression::Marked(cached) => {
            crate::encoding::choose(req.headers(), &mut headers, body, Some(cached))
        }
        Compression::Off => (body, None),
    };
    // The ETag of the representation chosen (`represent` renamed it for its coding).
    let etag = headers
        .get(header::ETAG)
        .and_then(|v| v.to_str().ok())
        .unwrap_or(etag);
    let (status, body) = if if_none_match(req.headers(), etag) {
        headers.remove(header::CONTENT_TYPE);
        (StatusCode::NOT_MODIFIED, empty())
    } else if req.method() == Method::HEAD {
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
        (StatusCode::OK, empty())
    } else {
        // hyper writes `Content-Length` from the body's exact size.
        (StatusCode::OK, full(body))
    };
    let mut response = Response::new(body);
    *response.status_mut() = status;
    *response.headers_mut() = headers;
    response
}

fn pending(route: &FragmentRoute, headers: &HeaderMap) -> Response<Body> {
    let (content_type, body) = if wants_json(headers) {
        let json = serde_json::json!({
            "status": "pending",
            "route": route.name,
            "retry_after": PENDING_RETRY_AFTER,
            "placeholder": route.placeholder,
        });
        ("application/json", Bytes::from(json.to_string()))
    } else {
        (
            "text/html; charset=utf-8",
            Bytes::from(route.placeholder.clone()),
        )
    };
    let mut response = Response::new(full(body));
    *response.status_mut() = StatusCode::ACCEPTED;
    let h = response.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(header::RETRY_AFTER, HeaderValue::from(PENDING_RETRY_AFTER));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(
        &CACHE_STATUS,
        HeaderValue::from_static("tessera; fwd=miss; detail=pending"),
    );
    response
}

/// Fragments are revalidated on every use (cheap: a 304 from L1), so a purge takes effect
/// at once in browsers too; per-user fragments are never stored by shared caches.
fn cache_headers(route: &FragmentRoute, h: &mut HeaderMap) {
    let per_user = !route.vary.is_empty();
    h.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static(if per_user {
            "private, no-cache"
        } else {
            "public, no-cache"
        }),
    );
    let varied: Vec<&str> = route
        .vary
        .iter()
        .map(|v| match v {
            tessera_protocol::config::VarySource::Header(n) => n.as_str(),
            tessera_protocol::config::VarySource::Cookie(_) => "cookie",
        })
        .collect();
    if !varied.is_empty() {
        let mut unique = varied;
        unique.dedup();
        insert(h, header::VARY, &unique.join(", "));
    }
}

fn insert(h: &mut HeaderMap, name: impl header::IntoHeaderName, value: &str) {
    // Values come from our own envelopes and config; a byte that cannot be a header value
    // drops the header rather than the response.
    if let Ok(v) = HeaderValue::from_str(value) {
        h.insert(name, v);
    }
}
