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
//! "Exactly one build" rests on the store's atomic `add` of the pending lease: of all
//! callers in all gateways, only the one that adds it publishes a `BuildRequest`. Inside
//! one gateway, L1 coalesces identical concurrent misses into one store lookup first.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, header};
use tessera_protocol::envelope::Freshness;
use tessera_protocol::message::VERSION;
use tessera_protocol::time::{add_ms, ceil_secs, now_ms, remaining};
use tessera_protocol::{BuildRequest, Envelope, FragmentKeys, FragmentRoute, Identity, store};

use crate::Gateway;
use crate::cache::{Slot, SlotState};
use crate::error::GatewayError;
use crate::headers::{Trace, if_none_match, prefer_wait, wants_json};
use crate::hot::{Hot, LastHeaders};
use crate::metrics::CacheStatus;
use tessera_runtime::web::{Body, empty, full};

/// `Retry-After` on pending answers: clients should prefer `Prefer: wait`.
const PENDING_RETRY_AFTER: u64 = 1;

/// RFC 9211's `Cache-Status`.
static CACHE_STATUS: header::HeaderName = header::HeaderName::from_static("cache-status");

/// What a lookup found, as far as the answer is concerned.
#[derive(Debug)]
pub enum Found {
    /// Serve this envelope's body; `stale` when past fresh (rebuild already requested).
    Serve {
        /// The slot holding the envelope.
        slot: Arc<Slot>,
        /// Past its fresh time.
        stale: bool,
    },
    /// A build is queued or running.
    Pending,
    /// The last build failed and nothing can be served.
    Failed {
        /// The worker's error.
        error: String,
        /// Until the next build may be tried.
        retry_after: Duration,
    },
}

/// The outcome of asking for a build.
#[derive(Debug)]
pub enum Requested {
    /// We won the lease and queued the build.
    Queued,
    /// Someone else holds the lease: a build is already queued or running.
    AlreadyPending,
    /// A build finished just before we asked: here is its result, nothing was queued.
    JustBuilt(Envelope),
}

impl Gateway {
    /// Answers a fresh hit from the hot answers, without looking anything up or
    /// awaiting; `None` sends the request down the full path ([`Self::fragment`]).
    pub(crate) fn hot_fragment(
        &self,
        req: &Request<hyper::body::Incoming>,
    ) -> Option<Response<Body>> {
        let started = std::time::Instant::now();
        if req.method() != Method::GET && req.method() != Method::HEAD {
            return None;
        }
        let hot = self.hot.get(req.uri().path_and_query()?.as_str())?;
        let SlotState::Found(envelope) = &hot.slot.state else {
            return None;
        };
        if !self
            .l1
            .unchanged_since(hot.checked_at, hot.loaded_at, started)
            || started >= hot.fresh_until
        {
            return None;
        }
        let ttl = (hot.fresh_until - started).as_secs();
        let route = self.config.fragments.get(hot.route)?;
        let headers = hot
            .headers
            .get(ttl, || answer_headers(route, &hot.slot, hit_status(ttl)));
        let response = finish(req, envelope, headers);
        hot.metrics
            .request(CacheStatus::hit, started.elapsed().as_secs_f64());
        Some(response)
    }

    /// Serves one fragment request.
    pub(crate) async fn fragment(
        self: &Arc<Self>,
        req: &Request<hyper::body::Incoming>,
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

    async fn fragment_inner(
        self: &Arc<Self>,
        req: &Request<hyper::body::Incoming>,
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
        let identity = Identity::from_request(route, req.uri().query(), req.headers())?;
        let trace = Trace::new(req.headers());
        let wait = prefer_wait(req.headers()).map(|w| w.min(self.config.gateway.max_wait));
        let deadline = wait.map(|w| tokio::time::Instant::now() + w);

        loop {
            let checked_at = std::time::Instant::now();
            let (generation, keys, generation_read_at) = self.keys(route, &identity).await?;
            // Register before looking, so a `built` event between the lookup and the
            // wait still wakes us.
            let mut waiter = deadline.map(|_| self.waiters.register(keys.envelope.as_str()));
            let found = self
                .lookup(route, &identity, generation, &keys, &trace)
                .await?;
            match (found, deadline, waiter.as_mut()) {
                (Found::Pending, Some(deadline), Some(waiter))
                    if tokio::time::Instant::now() < deadline =>
                {
                    // Boxed: waiting is the rare path, and its timer would otherwise
                    // enlarge every request's future.
                    if Box::pin(self.wait(waiter, deadline)).await {
                        continue;
                    }
                    // Deadline or shutdown: one last look, then answer whatever it is.
                    let found = self
                        .lookup(route, &identity, generation, &keys, &trace)
                        .await?;
                    return Ok(respond(route, req, found));
                }
                (found, _, _) => {
                    if let Found::Serve { slot, stale: false } = &found {
                        self.remember(req, route, slot, checked_at, generation_read_at);
                    }
                    return Ok(respond(route, req, found));
                }
            }
        }
    }

    /// Makes a fresh answer the hot answer for its request target (routes without
    /// `vary` only, and only while L1 caches slots).
    fn remember(
        &self,
        req: &Request<hyper::body::Incoming>,
        route: &FragmentRoute,
        slot: &Arc<Slot>,
        checked_at: std::time::Instant,
        generation_read_at: std::time::Instant,
    ) {
        if !route.vary.is_empty() || !self.l1.enabled() {
            return;
        }
        let (SlotState::Found(envelope), Some(target), Some(index)) = (
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
            target: target.as_str().into(),
            route: index,
            metrics: self.metrics.route(&route.name).clone(),
            slot: slot.clone(),
            checked_at,
            loaded_at: generation_read_at.min(slot.loaded_at()),
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

    /// The route's current generation and the keys of `identity` in it, and when that
    /// generation was read from the store.
    pub(crate) async fn keys(
        &self,
        route: &FragmentRoute,
        identity: &Identity,
    ) -> Result<(u64, FragmentKeys, std::time::Instant), GatewayError> {
        let (generation, read_at) = self
            .l1
            .generation(&route.name, || async {
                let key = self.backends.keys.generation(&route.name);
                Ok(store::generation(self.backends.store.as_ref(), &key).await?)
            })
            .await?;
        Ok((
            generation,
            self.backends.keys.fragment(identity, generation),
            read_at,
        ))
    }

    /// Looks a fragment up (L1, then the store), requesting a build when it is missing,
    /// stale or failed long enough ago.
    pub(crate) async fn lookup(
        self: &Arc<Self>,
        route: &FragmentRoute,
        identity: &Identity,
        generation: u64,
        keys: &FragmentKeys,
        trace: &Trace<'_>,
    ) -> Result<Found, GatewayError> {
        let slot = self
            .l1
            .slot(&keys.envelope, || async {
                if let Some(bytes) = self.backends.store.get(&keys.envelope).await? {
                    match Envelope::decode(&bytes) {
                        Ok(envelope) => return Ok(SlotState::Found(envelope)),
                        Err(e) => {
                            self.metrics.undecodable.inc();
                            tracing::warn!(key = %keys.envelope, error = %e, "undecodable envelope, treated as a miss");
                        }
                    }
                }
                Ok(match self.request_build(route, identity, generation, keys, trace.id()).await? {
                    Requested::JustBuilt(envelope) => SlotState::Found(envelope),
                    Requested::Queued | Requested::AlreadyPending => SlotState::Pending,
                })
            })
            .await?;
        Ok(self.judge(route, identity, generation, keys, trace, slot))
    }

    /// What to answer for a slot at this instant; requests the one rebuild a stale or
    /// expired-failure slot calls for (in the background: the answer never waits).
    pub(crate) fn judge(
        self: &Arc<Self>,
        route: &FragmentRoute,
        identity: &Identity,
        generation: u64,
        keys: &FragmentKeys,
        trace: &Trace<'_>,
        slot: Arc<Slot>,
    ) -> Found {
        let now = now_ms();
        let SlotState::Found(envelope) = &slot.state else {
            return Found::Pending;
        };
        let freshness = envelope.freshness(now);
        if matches!(freshness, Freshness::Stale | Freshness::FailedExpired) && slot.claim_rebuild()
        {
            let this = self.clone();
            let (route, identity, keys, trace) = (
                route.clone(),
                identity.clone(),
                keys.clone(),
                trace.id().to_string(),
            );
            tokio::spawn(async move {
                if let Err(e) = this
                    .request_build(&route, &identity, generation, &keys, &trace)
                    .await
                {
                    tracing::warn!(route = %route.name, error = %e, "could not request a rebuild");
                }
            });
        }
        let servable = envelope.servable(now);
        match freshness {
            Freshness::Fresh => Found::Serve {
                slot: slot.clone(),
                stale: false,
            },
            Freshness::Stale | Freshness::Failed | Freshness::FailedExpired if servable => {
                Found::Serve {
                    slot: slot.clone(),
                    stale: true,
                }
            }
            Freshness::Failed => Found::Failed {
                error: envelope.error.clone().unwrap_or_default(),
                retry_after: remaining(now, envelope.fresh_until),
            },
            Freshness::Stale | Freshness::FailedExpired => Found::Pending,
        }
    }

    /// Queues one build of `keys` unless one is already queued anywhere: adds the pending
    /// lease (atomic across gateways) and, if it won, publishes the request.
    pub(crate) async fn request_build(
        &self,
        route: &FragmentRoute,
        identity: &Identity,
        generation: u64,
        keys: &FragmentKeys,
        trace: &str,
    ) -> Result<Requested, GatewayError> {
        let store = &self.backends.store;
        let lease_ttl = route.lease_ttl();
        let metrics = self.metrics.route(&route.name);
        if !store.add(&keys.lease(), b"", lease_ttl).await? {
            metrics.coalesced.inc();
            return Ok(Requested::AlreadyPending);
        }
        // Between our read and our add, a worker may have stored a result and released
        // its lease. Building again then would be a second build: look once more.
        let now = now_ms();
        if let Some(bytes) = store.get(&keys.envelope).await?
            && let Ok(envelope) = Envelope::decode(&bytes)
            && now < envelope.fresh_until
        {
            store.delete(&keys.lease()).await?;
            return Ok(Requested::JustBuilt(envelope));
        }
        let request = BuildRequest {
            v: VERSION,
            id: format!("{:016x}", rand::random::<u64>()),
            key: keys.envelope.as_str().to_string(),
            identity: identity.clone(),
            generation,
            attempt: 1,
            requested_at: now,
            lease_deadline: add_ms(now, lease_ttl),
            trace_id: trace.to_string(),
        };
        if let Err(e) = self
            .backends
            .bus
            .publish_build(&route.queue, &request)
            .await
        {
            // Nothing was queued: give the lease back so the next request can try again
            // instead of waiting for it to expire.
            if let Err(se) = store.delete(&keys.lease()).await {
                tracing::warn!(key = %keys.lease(), error = %se, "could not release the lease");
            }
            return Err(e.into());
        }
        metrics.published.inc();
        tracing::debug!(route = %route.name, key = %keys.envelope, request = %request.id, trace_id = %trace, "build queued");
        Ok(Requested::Queued)
    }
}

/// The answer to `req` for what a lookup found, and how it counts.
fn respond(
    route: &FragmentRoute,
    req: &Request<hyper::body::Incoming>,
    found: Found,
) -> (Response<Body>, CacheStatus) {
    let cache = match &found {
        Found::Serve { slot, .. } if matches!(slot.state, SlotState::Pending) => {
            CacheStatus::pending
        }
        Found::Serve { stale: true, .. } => CacheStatus::stale,
        Found::Serve { stale: false, .. } => CacheStatus::hit,
        Found::Pending => CacheStatus::pending,
        Found::Failed { .. } => CacheStatus::error,
    };
    let response = match found {
        Found::Serve { slot, stale } => match &slot.state {
            SlotState::Found(envelope) => serve(route, req, &slot, envelope, stale),
            SlotState::Pending => pending(route, req.headers()),
        },
        Found::Pending => pending(route, req.headers()),
        Found::Failed { error, retry_after } => {
            GatewayError::BuildFailed { error, retry_after }.into_response()
        }
    };
    (response, cache)
}

fn serve(
    route: &FragmentRoute,
    req: &Request<hyper::body::Incoming>,
    slot: &Slot,
    envelope: &Envelope,
    stale: bool,
) -> Response<Body> {
    let now = now_ms();
    let status = if stale {
        let age = ceil_secs(remaining(envelope.fresh_until, now));
        let detail = if envelope.error.is_some() {
            "; detail=stale-if-error"
        } else {
            ""
        };
        format!("tessera; fwd=stale; ttl=-{age}{detail}")
    } else {
        hit_status(remaining(now, envelope.fresh_until).as_secs())
    };
    finish(req, envelope, answer_headers(route, slot, status))
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

/// The answer to `req` serving `envelope` with `headers`: 304 when `If-None-Match`
/// matches, no body for `HEAD`.
fn finish(
    req: &Request<hyper::body::Incoming>,
    envelope: &Envelope,
    mut headers: HeaderMap,
) -> Response<Body> {
    let (status, body) = if if_none_match(req.headers(), &envelope.etag) {
        headers.remove(header::CONTENT_TYPE);
        (StatusCode::NOT_MODIFIED, empty())
    } else if req.method() == Method::HEAD {
        headers.insert(
            header::CONTENT_LENGTH,
            HeaderValue::from(envelope.body.len()),
        );
        (StatusCode::OK, empty())
    } else {
        // hyper writes `Content-Length` from the body's exact size.
        (StatusCode::OK, full(envelope.body.clone()))
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
