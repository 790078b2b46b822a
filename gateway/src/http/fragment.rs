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
//! What is found, and which build is requested, is the cache core's business
//! ([`CacheService::lookup`](crate::cache::CacheService::lookup)); this module turns it
//! into HTTP answers.
//!
//! Each answer says how it was made in `Cache-Status` (RFC 9211), as the cache `tessera`:
//!
//! | outcome | `Cache-Status` |
//! | --- | --- |
//! | fresh | `tessera; hit; ttl=N` |
//! | stale, rebuilt meanwhile | `tessera; hit; ttl=-N` |
//! | softly purged, rebuilt meanwhile | `tessera; fwd=stale; detail=soft-purge` |
//! | stale-if-error (the last build failed, or the store cannot answer) | `tessera; hit; ttl=±N; detail=stale-if-error` |
//! | built while the request waited (`Prefer: wait`) | `tessera; fwd=miss; stored; ttl=N` |
//! | pending (202) | `tessera; fwd=miss; detail=pending` |
//! | failed (502), remembered | `tessera; hit; detail=failed` |
//! | failed (502) while the request waited | `tessera; fwd=miss; detail=failed` |
//!
//! `hit` means the answer came from the cache without the request going forward: a stale
//! copy's rebuild runs on its own, and a failure remembered for `failed_ttl` is the
//! cache's answer too. A request that waited for its build went forward (`fwd=miss`),
//! and what it got was `stored`. `ttl` is the freshness left, negative once stale.

use std::time::Duration;
use tessera_runtime::otel;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, header};
use tessera_protocol::envelope::Status;
use tessera_protocol::time::{add_ms, ceil_secs, now_ms, remaining};
use tessera_protocol::{Envelope, FragmentRoute, Identity};

use super::Front;
use super::compose::{self, Composed, PageBase};
use super::encoding;
use super::error::GatewayError;
use super::headers::{Trace, if_none_match, prefer_wait, wants_json};
use crate::cache::l1::Slot;
use crate::cache::waiters::Waiter;
use crate::cache::{Found, Fragment};
use crate::compress::Encoded;
use crate::metrics::CacheStatus;
use tessera_runtime::web::{Body, empty, full};

/// `Retry-After` on pending answers: clients should prefer `Prefer: wait`.
const PENDING_RETRY_AFTER: u64 = 1;

/// RFC 9211's `Cache-Status`.
static CACHE_STATUS: header::HeaderName = header::HeaderName::from_static("cache-status");

/// Answers a fresh hit from the hot answers, without looking anything up or awaiting;
/// `None` sends the request down the full path ([`serve`]).
pub(crate) fn hot<B: Sync>(front: &Front, req: &Request<B>) -> Option<Response<Body>> {
    let started = std::time::Instant::now();
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return None;
    }
    let (hot, route) =
        front
            .cache
            .hot(req.uri().path_and_query()?.as_str(), started, &front.config)?;
    let envelope = &hot.slot.envelope;
    let ttl = (hot.fresh_until - started).as_secs();
    // Whether to compress, and the `Vary` that goes with it, decided once per entry.
    let compressed = front.config.gateway.compress && hot.slot.compressible;
    let headers = hot.headers.get(ttl, || {
        let mut h = answer_headers(route, &hot.slot, hit_status(ttl));
        if compressed {
            encoding::add_vary(&mut h);
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
pub(crate) async fn serve<B: Sync>(front: &Front, req: &Request<B>, name: &str) -> Response<Body> {
    let started = std::time::Instant::now();
    let (response, cache) = match answer_request(front, req, name).await {
        Ok(answer) => answer,
        Err(e) => {
            if matches!(e, GatewayError::Store(_)) {
                front.metrics.store_errors.inc();
            } else if matches!(e, GatewayError::Bus(_)) {
                front.metrics.bus_errors.inc();
            }
            (e.into_response(), CacheStatus::error)
        }
    };
    front
        .metrics
        .route(name)
        .request(cache, started.elapsed().as_secs_f64());
    response
}

/// Looks the fragment `req` names up and answers it, waiting for its build first when
/// the request asked to (`Prefer: wait`) and it is pending.
async fn answer_request<B: Sync>(
    front: &Front,
    req: &Request<B>,
    name: &str,
) -> Result<(Response<Body>, CacheStatus), GatewayError> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return Err(GatewayError::MethodNotAllowed {
            method: req.method().clone(),
            allow: "GET, HEAD",
        });
    }
    let route = front
        .config
        .route(name)
        .ok_or_else(|| GatewayError::UnknownRoute(name.to_string()))?;
    let mut identity = Identity::from_request(route, req.uri().query(), req.headers())?;
    let trace = Trace::new(req.headers());
    let wait = prefer_wait(req.headers()).map(|w| w.min(front.config.gateway.max_wait));
    let deadline = wait.map(|w| tokio::time::Instant::now() + w);
    // Whether this request waited for a build: what it is then served is no hit.
    let mut waited = false;
    let cache = &front.cache;

    loop {
        let checked_at = std::time::Instant::now();
        let fragment = cache.fragment(route, identity, &trace).await?;
        // Register before looking, so a `built` event between the lookup and the wait
        // still wakes us.
        let mut waiter = deadline.map(|_| cache.waiter(&fragment));
        let found = cache.lookup(&fragment).await?;
        match (found, deadline, waiter.as_mut()) {
            (Found::Pending, Some(deadline), Some(waiter))
                if tokio::time::Instant::now() < deadline =>
            {
                // Boxed: waiting is the rare path, and its timer would otherwise enlarge
                // every request's future.
                waited = true;
                // The delivery: from the wait's start to the fragment's arrival.
                let span = otel::Span::child("wait for build", otel::Kind::Internal, Vec::new);
                let arrived = Box::pin(wait_for(front, waiter, deadline)).await;
                span.set(|| otel::KeyValue::new("tessera.arrived", arrived));
                drop(span);
                if arrived {
                    identity = fragment.identity;
                    continue;
                }
                // Deadline or shutdown: one last look, then answer whatever it is. It is
                // made in the route's generation of now, not of when the wait began: the
                // route may have moved on meanwhile (a purge, or a memcached restart,
                // which no event names), and a build this look queued in the old one
                // would be dropped by its worker as purged, leaving a 202 that no build
                // follows (bench/README.md, "Soak", run 4's lost build).
                let fragment = cache.fragment(route, fragment.identity, &trace).await?;
                let found = cache.lookup(&fragment).await?;
                let (response, status) = answer(front, req, &fragment, found, true).await;
                return Ok((response, status.after_waiting(true)));
            }
            (found, _, _) => {
                if let Found::Serve {
                    slot, stale: false, ..
                } = &found
                    && !needs_composing(slot)
                    && let Some(target) = req.uri().path_and_query()
                {
                    // Composed answers are built per request: never a hot answer.
                    cache.remember(&front.config, target.as_str(), &fragment, slot, checked_at);
                }
                let (response, status) = answer(front, req, &fragment, found, waited).await;
                return Ok((response, status.after_waiting(waited)));
            }
        }
    }
}

/// The answer to `req` for what a lookup of `fragment` found, after the request `waited`
/// for a build or not. A fragment whose render asked for ESI has its includes composed
/// first, as in a page: the fragment is level 1 of the page the client script puts it
/// in, so the same depth limit holds.
async fn answer<B: Sync>(
    front: &Front,
    req: &Request<B>,
    fragment: &Fragment<'_>,
    found: Found,
    waited: bool,
) -> (Response<Body>, CacheStatus) {
    let composed = match &found {
        // Boxed: composition is the rare path, and its future is large.
        Found::Serve { slot, .. } if needs_composing(slot) => {
            let base = PageBase::of(req.uri(), req.headers());
            let body = &slot.envelope.body;
            let compose = compose::compose_at(front, body, &base, req.headers(), fragment.trace, 1);
            Some(Box::pin(compose).await)
        }
        _ => None,
    };
    respond(
        fragment.route,
        req,
        (found, waited),
        composed,
        front.config.gateway.compress,
    )
}

/// Sleeps until `waiter` is woken (true), or the deadline passes or the gateway stops
/// (false).
async fn wait_for(front: &Front, waiter: &mut Waiter<'_>, deadline: tokio::time::Instant) -> bool {
    tokio::select! {
        () = waiter.woken() => true,
        () = tokio::time::sleep_until(deadline) => false,
        () = front.stopping.cancelled() => false,
    }
}

/// Whether `slot`'s render asked for ESI and its body carries markup: it is then
/// composed per answer.
fn needs_composing(slot: &Slot) -> bool {
    slot.envelope.esi && crate::esi::has_markup(&slot.envelope.body)
}

/// The answer to `req` for what a lookup found, after the request waited for a build or
/// not (with its includes `composed`, when it asked for ESI), and how it counts.
fn respond<B: Sync>(
    route: &FragmentRoute,
    req: &Request<B>,
    (found, waited): (Found, bool),
    composed: Option<Composed>,
    compress: bool,
) -> (Response<Body>, CacheStatus) {
    let cache = CacheStatus::from(&found);
    let status = cache_status(&found, waited, route.fresh, now_ms());
    let response = match found {
        Found::Serve { slot, .. } => {
            let envelope = &slot.envelope;
            let answer = Answer {
                headers: answer_headers(route, &slot, status),
            };
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
        Found::Pending => pending(route, req.headers(), status),
        Found::Failed { error, retry_after } => {
            let mut response = GatewayError::BuildFailed { error, retry_after }.into_response();
            insert(response.headers_mut(), &CACHE_STATUS, &status);
            response
        }
    };
    (response, cache)
}

/// The `Cache-Status` (RFC 9211) of an answer for what a lookup found at `now` (Unix
/// ms), after the request `waited` for a build or not, on a route whose copies stay
/// `fresh` this long: see the module doc.
fn cache_status(found: &Found, waited: bool, fresh: Duration, now: u64) -> String {
    match found {
        Found::Serve {
            soft_purged: true, ..
        } if !waited => "tessera; fwd=stale; detail=soft-purge".into(),
        Found::Serve {
            slot,
            stale,
            fallback,
            ..
        } => {
            let envelope: &Envelope = &slot.envelope;
            // A failed build's envelope is fresh until the next build may be tried; the
            // copy it keeps was fresh for `fresh` after it was built.
            let fresh_until = match envelope.status {
                Status::Ready => envelope.fresh_until,
                Status::Failed => add_ms(envelope.built_at, fresh),
            };
            // Seconds of freshness left, counted down; once past, counted up from there.
            let ttl = if now < fresh_until {
                format!("{}", remaining(now, fresh_until).as_secs())
            } else {
                format!("-{}", ceil_secs(remaining(fresh_until, now)))
            };
            // The last build failed, or the store cannot be reached: either way an error
            // is why this copy is served.
            let failed = *stale && (envelope.error.is_some() || *fallback);
            match (waited, failed) {
                (false, false) => format!("tessera; hit; ttl={ttl}"),
                (false, true) => format!("tessera; hit; ttl={ttl}; detail=stale-if-error"),
                (true, false) => format!("tessera; fwd=miss; stored; ttl={ttl}"),
                (true, true) => format!("tessera; fwd=miss; ttl={ttl}; detail=stale-if-error"),
            }
        }
        Found::Pending => "tessera; fwd=miss; detail=pending".into(),
        Found::Failed { .. } if waited => "tessera; fwd=miss; detail=failed".into(),
        Found::Failed { .. } => "tessera; hit; detail=failed".into(),
    }
}

/// A 200 serving an envelope, before its body is chosen.
struct Answer {
    headers: HeaderMap,
}

impl Answer {
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
#[derive(Debug)]
pub(crate) enum Compression<'a> {
    /// As `gateway.compress` (the first) and the answer's type and size allow, from the
    /// body's cached copies (the second) when it has them.
    Decide(bool, Option<&'a Encoded>),
    /// Decided already: the answer is eligible and its headers carry the `Vary`; from
    /// the body's cached copies.
    Marked(&'a Encoded),
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
            encoding::represent(enabled, req.headers(), &mut headers, body, cached)
        }
        Compression::Marked(cached) => {
            encoding::choose(req.headers(), &mut headers, body, Some(cached))
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

fn pending(route: &FragmentRoute, headers: &HeaderMap, cache_status: String) -> Response<Body> {
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
    insert(h, &CACHE_STATUS, &cache_status);
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

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    const NOW: u64 = 1_700_000_000_000;
    const FRESH: Duration = Duration::from_secs(60);

    /// A copy built `age` seconds before [`NOW`] on a route fresh for [`FRESH`].
    fn serve(age: u64, failed: bool, fallback: bool) -> Found {
        let mut envelope = Envelope::ready(
            Bytes::from_static(b"<p>x</p>"),
            "text/html".into(),
            FRESH,
            Duration::from_secs(600),
            1,
            1,
        );
        envelope.built_at = NOW - age * 1000;
        envelope.fresh_until = envelope.built_at + 60_000;
        if failed {
            envelope.status = Status::Failed;
            envelope.error = Some("upstream answered 500".into());
            // A failed envelope is "fresh" until the next build may be tried.
            envelope.fresh_until = NOW + 5_000;
        }
        let stale = failed || fallback || age >= 60;
        Found::Serve {
            slot: Arc::new(Slot::new(envelope, std::time::Instant::now())),
            stale,
            fallback,
            soft_purged: false,
        }
    }

    #[test]
    fn every_outcome_says_how_it_was_made_as_rfc_9211_does() {
        let failed = || Found::Failed {
            error: "x".into(),
            retry_after: Duration::from_secs(5),
        };
        let soft_purged = match serve(10, false, false) {
            Found::Serve { slot, .. } => Found::Serve {
                slot,
                stale: true,
                fallback: false,
                soft_purged: true,
            },
            _ => unreachable!(),
        };
        for (found, waited, expected) in [
            (serve(10, false, false), false, "tessera; hit; ttl=50"),
            (soft_purged, false, "tessera; fwd=stale; detail=soft-purge"),
            (serve(70, false, false), false, "tessera; hit; ttl=-10"),
            (
                serve(70, true, false),
                false,
                "tessera; hit; ttl=-10; detail=stale-if-error",
            ),
            (
                serve(10, false, true),
                false,
                "tessera; hit; ttl=50; detail=stale-if-error",
            ),
            (
                serve(90, false, true),
                false,
                "tessera; hit; ttl=-30; detail=stale-if-error",
            ),
            (
                serve(0, false, false),
                true,
                "tessera; fwd=miss; stored; ttl=60",
            ),
            (
                serve(70, true, false),
                true,
                "tessera; fwd=miss; ttl=-10; detail=stale-if-error",
            ),
            (Found::Pending, false, "tessera; fwd=miss; detail=pending"),
            (Found::Pending, true, "tessera; fwd=miss; detail=pending"),
            (failed(), false, "tessera; hit; detail=failed"),
            (failed(), true, "tessera; fwd=miss; detail=failed"),
        ] {
            assert_eq!(
                cache_status(&found, waited, FRESH, NOW),
                expected,
                "{found:?}"
            );
        }
    }
}
