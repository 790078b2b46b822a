//! The HTTP front: every answer the gateway gives, built from what the cache core
//! ([`crate::cache`]) finds.
//!
//! [`handle`] routes each public request: a repeated fresh hit is answered from the hot
//! answers at once ([`fragment::hot`]); other fragment requests go to the fragment
//! endpoint ([`fragment::serve`]); the push stream and the client script are served here;
//! everything else is proxied to the upstream and composed when it asks for ESI
//! ([`compose::page`]). The admin listener is [`admin`].
//!
//! # Layout
//! - [`fragment`]: the fragment endpoint: HTTP answers for what the cache found.
//! - [`dead_letters`]: the admin API's dead-letter workflow (retry, discard, by id or route).
//! - [`compose`]: pages (proxied, then composed) and ESI composition from cached fragments.
//! - [`stream`]: the push stream, one connection per page for all its placeholders.
//! - [`proxy`]: the reverse proxy to the upstream.
//! - [`render_paths`]: the routes' render paths, closed to the public.
//! - [`access_log`]: one line per public request, written off the request's task.
//! - [`admin`]: the admin listener: dashboard, metrics, health, purges, dead letters.
//! - [`encoding`]: which coding an answer gets (`Accept-Encoding`, `Vary`, ETags).
//! - [`headers`]: small request-header parsers, and the request's trace.
//! - [`error`]: the one error type and its problem responses.

pub(crate) mod access_log;
pub(crate) mod admin;
pub(crate) mod compose;
pub(crate) mod dead_letters;
pub(crate) mod encoding;
pub(crate) mod error;
pub(crate) mod fragment;
pub(crate) mod headers;
pub(crate) mod proxy;
pub(crate) mod render_paths;
pub(crate) mod stream;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use arc_swap::ArcSwap;

use http::{HeaderMap, HeaderValue, Request, Response, header};
use tessera_protocol::Config;
use tokio_util::sync::CancellationToken;

use crate::cache::CacheService;
use crate::compress::Encoded;
use crate::metrics::Metrics;
use tessera_runtime::otel;
use tessera_runtime::web::Body;

/// What every endpoint of the public listener shares.
#[derive(Debug)]
pub(crate) struct Front {
    /// The configuration the gateway runs with.
    pub config: Arc<Config>,
    /// Lookups, build requests and purges.
    pub cache: Arc<CacheService>,
    /// The upstream application.
    pub upstream: proxy::Upstream,
    /// Paths never proxied: the routes' render paths.
    pub render_paths: render_paths::RenderPaths,
    /// The gateway's metrics.
    pub metrics: Arc<Metrics>,
    /// The access log, when `[access_log]` turns it on.
    pub access_log: Option<Arc<access_log::AccessLog>>,
    /// Cancelled when the gateway starts shutting down: long-polls and streams answer at
    /// once.
    pub stopping: CancellationToken,
}

impl Front {
    /// The front for `config`, on the parts every front of a gateway shares.
    pub(crate) fn new(
        config: Arc<Config>,
        cache: Arc<CacheService>,
        metrics: Arc<Metrics>,
        stopping: CancellationToken,
        access_log: Option<Arc<access_log::AccessLog>>,
    ) -> Front {
        let upstream = proxy::Upstream::new(
            &config.upstream.url,
            config.upstream.timeout,
            &config.gateway.trusted_proxies,
        );
        Front {
            // The access log wants the upstream's time.
            upstream: if access_log.is_some() {
                upstream.timed()
            } else {
                upstream
            },
            render_paths: render_paths::RenderPaths::new(&config),
            config,
            cache,
            metrics,
            stopping,
            access_log,
        }
    }
}

impl Front {
    /// This front with `config`, as a reload makes it.
    pub(crate) fn reconfigured(&self, config: Arc<Config>) -> Front {
        Front::new(
            config,
            self.cache.clone(),
            self.metrics.clone(),
            self.stopping.clone(),
            self.access_log.clone(),
        )
    }
}

/// Answers one public request, with a line in the access log when it is on (off, it
/// costs this one branch).
pub(crate) fn handle(
    fronts: &ArcSwap<Front>,
    req: Request<hyper::body::Incoming>,
    peer: SocketAddr,
) -> impl Future<Output = Response<Body>> + Send + use<> {
    use futures_util::future::Either;
    // Borrowed, not cloned: a hot hit is answered before the front is let go, and only
    // the futures of the full path keep a reference of their own.
    let front = fronts.load();
    match front.access_log {
        None => Either::Left(answer(&front, req, peer)),
        Some(_) => Either::Right(Box::pin(logged(
            arc_swap::Guard::into_inner(front),
            req,
            peer,
        ))),
    }
}

/// [`answer`], with a line in the access log.
async fn logged(
    front: Arc<Front>,
    mut req: Request<hyper::body::Incoming>,
    peer: SocketAddr,
) -> Response<Body> {
    let log = front.access_log.as_ref();
    let entry = log.map(|log| log.begin(&front.config, &mut req, peer));
    let response = answer(&front, req, peer).await;
    if let (Some(log), Some(entry)) = (front.access_log.as_ref(), entry) {
        log.finish(entry, &response);
    }
    response
}

/// Routes one public request. A fresh hit is answered at once, before any future exists:
/// the request, which holds on to hyper's read buffer, is then dropped before hyper reads
/// on, so the connection keeps reusing one buffer instead of allocating another for each
/// request.
fn answer(
    front: &Arc<Front>,
    req: Request<hyper::body::Incoming>,
    peer: SocketAddr,
) -> impl Future<Output = Response<Body>> + Send + use<> {
    use futures_util::future::Either;
    if otel::on() {
        let span = server_span(front, &req, peer);
        return match fragment::hot(front, &req) {
            Some(response) => {
                answered(&span, &response);
                Either::Left(std::future::ready(response))
            }
            None => Either::Right(Either::Right(Box::pin(traced(
                front.clone(),
                req,
                peer,
                span,
            )))),
        };
    }
    match fragment::hot(front, &req) {
        Some(response) => Either::Left(std::future::ready(response)),
        // Boxed: hyper moves the future it is handed, and the full path's is large.
        None => Either::Right(Either::Left(Box::pin(route(front.clone(), req, peer)))),
    }
}

/// The request's server span, a child of the `traceparent` it came with. Its name and
/// attributes are worked out only when the sampler keeps it.
fn server_span(
    front: &Front,
    req: &Request<hyper::body::Incoming>,
    peer: SocketAddr,
) -> otel::Span {
    use otel::KeyValue;
    let span = otel::Span::start(
        "HTTP",
        otel::Kind::Server,
        &otel::extract(req.headers()),
        || {
            vec![
                KeyValue::new("http.request.method", req.method().to_string()),
                KeyValue::new("url.path", req.uri().path().to_string()),
                KeyValue::new("client.address", peer.ip().to_string()),
            ]
        },
    );
    span.rename(|| {
        let prefix = front.config.gateway.fragment_prefix.as_str();
        match req
            .uri()
            .path()
            .strip_prefix(prefix)
            .and_then(|n| front.config.route(n))
        {
            Some(route) => format!("{} {prefix}{}", req.method(), route.name),
            None => req.method().to_string(),
        }
    });
    span
}

/// The full path with traces on: `route` in the request's server span, which ends when
/// the head is answered.
async fn traced(
    front: Arc<Front>,
    req: Request<hyper::body::Incoming>,
    peer: SocketAddr,
    span: otel::Span,
) -> Response<Body> {
    use otel::FutureExt;
    let response = route(front, req, peer).with_context(span.context()).await;
    answered(&span, &response);
    response
}

/// Records `response`'s status on the request's span.
fn answered(span: &otel::Span, response: &Response<Body>) {
    let status = response.status();
    span.set(|| otel::KeyValue::new("http.response.status_code", i64::from(status.as_u16())));
    if status.is_server_error() {
        span.fail(&status);
    }
}

/// Routes a request the hot answers did not answer: the fragment endpoint's full path,
/// the client script, the push stream, or a page.
async fn route(
    front: Arc<Front>,
    req: Request<hyper::body::Incoming>,
    peer: SocketAddr,
) -> Response<Body> {
    let prefix = front.config.gateway.fragment_prefix.as_str();
    if let Some(name) = req.uri().path().strip_prefix(prefix) {
        return fragment::serve(&front, &req, name).await;
    }
    if req.uri().path() == compose::CLIENT_JS_PATH {
        return client_js(&req, front.config.gateway.compress);
    }
    if req.uri().path() == stream::STREAM_PATH {
        return stream::serve(&front, &req);
    }
    if front.render_paths.closes(req.uri().path()) {
        tracing::debug!(path = %req.uri().path(), "render path refused to a public request");
        return error::GatewayError::RenderPath.into_response();
    }
    // Boxed: the proxy and composition futures are large, and without the box every
    // request down this path (fragment misses, hits on `vary` routes) would allocate
    // and fill a future of their size.
    Box::pin(compose::page(front, req, peer)).await
}

/// The client script, embedded in the binary.
const CLIENT_JS: &str = include_str!("../../assets/client.js");

fn client_js(req: &Request<hyper::body::Incoming>, compress: bool) -> Response<Body> {
    /// Compressed once per process.
    static ENCODED: Encoded = Encoded::new();
    let etag = tessera_protocol::envelope::etag_of(CLIENT_JS.as_bytes());
    let mut h = HeaderMap::new();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/javascript; charset=utf-8"),
    );
    h.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("public, max-age=300"),
    );
    if let Ok(v) = HeaderValue::from_str(&etag) {
        h.insert(header::ETAG, v);
    }
    let body = bytes::Bytes::from_static(CLIENT_JS.as_bytes());
    fragment::finish(
        req,
        &etag,
        body,
        h,
        fragment::Compression::Decide(compress, Some(&ENCODED)),
    )
}
