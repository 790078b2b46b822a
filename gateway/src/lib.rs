//! The Tessera gateway: a reverse proxy in front of a web application that serves slow
//! page fragments from cache and never renders them on the request path.
//!
//! A request for a fragment is answered from L1 (moka, in process) or L2 (the shared
//! store); a miss is answered at once with a placeholder while exactly one build is queued
//! for the fragment workers, which may run inside this process (embedded mode) or as
//! `tessera-worker` processes anywhere (distributed mode). Everything else is proxied.
//!
//! # Layout
//! - [`admin`]: the admin listener: metrics, health, purge.
//! - [`metrics`]: the Prometheus registry of one gateway.
//! - [`compose`]: ESI page composition from cached fragments.
//! - [`esi`]: the ESI 1.0 subset parser.
//! - [`fragment`]: the fragment endpoint: HTTP answers for what the cache found.
//! - [`service`]: the cache service: lookups, freshness, build requests; no HTTP.
//! - [`cache`]: L1, with coalescing and an invalidation log.
//! - [`tags`]: what this gateway knows of tag purges, for the hit path.
//! - [`hot`]: the last fresh answer per request target, for the hit path.
//! - [`waiters`]: long-poll wake-ups for `Prefer: wait`.
//! - [`stream`]: the push stream, one connection per page for all its placeholders.
//! - [`events`]: follows built/failed/purged events from every worker.
//! - [`proxy`]: the reverse proxy to the upstream.
//! - [`headers`]: small request-header parsers.
//! - [`encoding`]: `br`/`gzip` for answers, and decoding compressed upstream pages.
//! - [`error`]: the one error type and its problem responses.
//! - [`demo`]: the bundled demo upstream for `--demo`.
//! - [`cli`]: the `purge` and `dead-letters` subcommands (admin API clients).

pub mod admin;
pub mod cache;
pub mod cli;
pub mod compose;
pub mod demo;
pub mod encoding;
pub mod error;
pub mod esi;
pub mod events;
pub mod fragment;
pub mod headers;
pub mod hot;
pub mod metrics;
pub mod proxy;
pub mod service;
pub mod stream;
pub mod tags;
pub mod waiters;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response};
use tessera_protocol::{Backends, Config};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::cache::L1;
use crate::error::GatewayError;
use crate::waiters::Waiters;
use tessera_runtime::web::{self, Body, ServeOptions, Threads};

/// Why the gateway could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A backend could not be set up.
    #[error(transparent)]
    Backend(#[from] tessera_backends::BackendError),
    /// The event subscription could not be opened.
    #[error("cannot subscribe to events: {0}")]
    Events(#[from] tessera_protocol::BusError),
    /// The upstream client or the embedded workers could not be set up.
    #[error(transparent)]
    Setup(#[from] GatewayError),
    /// The embedded workers could not be set up.
    #[error("embedded workers: {0}")]
    Workers(String),
    /// The public listener's threads could not be started.
    #[error("cannot start the gateway.threads: {0}")]
    Threads(std::io::Error),
    /// A listener could not be bound.
    #[error("cannot listen on {what} = {addr}: {source}")]
    Bind {
        /// The config key.
        what: &'static str,
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
}

/// State shared by every request.
#[derive(Debug)]
pub struct Gateway {
    config: Arc<Config>,
    /// Lookups and build requests; shares `config` and `metrics`.
    cache: Arc<service::CacheService>,
    hot: hot::HotAnswers,
    waiters: Arc<Waiters>,
    upstream: proxy::Upstream,
    metrics: Arc<metrics::Metrics>,
    /// The latest build failures any worker reported, for the dashboard.
    failures: Arc<admin::Failures>,
    /// Cancelled when the gateway starts shutting down: long-polls answer at once.
    stopping: CancellationToken,
}

/// How long shutdown waits for embedded workers to finish in-flight builds.
const WORKER_DRAIN: Duration = Duration::from_secs(15);

/// Runs a gateway on `listener` (public traffic) and on `gateway.admin_listen`, with the
/// backends `config` names, until `shutdown`.
pub async fn run(
    listener: TcpListener,
    config: Config,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), StartError> {
    let admin = TcpListener::bind(config.gateway.admin_listen)
        .await
        .map_err(|source| StartError::Bind {
            what: "gateway.admin_listen",
            addr: config.gateway.admin_listen,
            source,
        })?;
    let backends = tessera_backends::connect(&config).await?;
    serve(listener, Some(admin), config, backends, shutdown).await
}

/// Runs a gateway on `listener` and, when given, an admin listener, with the given
/// backends (tests share one memory backend between gateways this way).
pub async fn serve(
    listener: TcpListener,
    admin: Option<TcpListener>,
    config: Config,
    backends: Backends,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), StartError> {
    let gateway = Arc::new(Gateway::new(Arc::new(config), backends.clone())?);
    // Subscribe before serving, so no event after the first request is missed.
    let subscription = backends.bus.subscribe().await?;
    let followers = events::Followers {
        cache: gateway.cache.clone(),
        waiters: gateway.waiters.clone(),
        failures: gateway.failures.clone(),
    };
    let events = tokio_util::task::AbortOnDropHandle::new(tokio::spawn(events::follow(
        followers,
        subscription,
        gateway.stopping.clone(),
    )));
    // Connect and declare the route queues now rather than on the first miss, which
    // would otherwise wait for them (tens of ms on quorum queues). A broker that is down
    // is not fatal: `/readyz` says so, and the first publish tries again.
    let bus = backends.bus.clone();
    tokio::spawn(async move {
        if let Err(e) = bus.ping().await {
            tracing::warn!(error = %e, "bus not ready at start; trying again on first use");
        }
    });
    let workers = gateway.start_workers(backends)?;

    if let Ok(addr) = listener.local_addr() {
        let config = &gateway.config;
        let admin = AdminListen(admin.as_ref().and_then(|a| a.local_addr().ok()));
        tracing::info!(%addr, %admin, embedded_workers = config.workers.embedded, routes = config.fragments.len(), "gateway listening");
    }
    let threads = gateway.clone().listen(listener, admin, shutdown).await?;
    if let Some(workers) = workers {
        drain_workers(workers).await;
    }
    events.abort();
    // Last: the embedded workers may still have used a memcached connection one of the
    // public threads dialed.
    drop(threads);
    tracing::info!("gateway stopped");
    Ok(())
}

/// The admin listener as the start-up line shows it: its address, or `off`.
#[derive(Debug, Clone, Copy)]
struct AdminListen(Option<SocketAddr>);

impl std::fmt::Display for AdminListen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Some(addr) => addr.fmt(f),
            None => f.write_str("off"),
        }
    }
}

/// The embedded workers' task; aborted when dropped.
type WorkersTask = tokio_util::task::AbortOnDropHandle<Result<(), tessera_workers::WorkerError>>;

/// Waits up to [`WORKER_DRAIN`] for the embedded workers to finish their builds.
async fn drain_workers(workers: WorkersTask) {
    match tokio::time::timeout(WORKER_DRAIN, workers).await {
        Ok(Ok(Ok(()))) => {}
        Ok(Ok(Err(e))) => tracing::warn!(error = %e, "embedded workers stopped with an error"),
        Ok(Err(e)) => tracing::warn!(error = %e, "embedded workers task failed"),
        Err(_) => tracing::warn!("embedded workers did not stop within {WORKER_DRAIN:?}"),
    }
}

impl Gateway {
    fn new(config: Arc<Config>, backends: Backends) -> Result<Self, StartError> {
        let metrics = Arc::new(
            metrics::Metrics::new(config.fragments.iter().map(|r| r.name.as_str()))
                .with_backends(backends.clone()),
        );
        Ok(Gateway {
            cache: Arc::new(service::CacheService {
                config: config.clone(),
                backends,
                l1: L1::new(config.cache.capacity.as_u64(), config.cache.ttl),
                metrics: metrics.clone(),
            }),
            // A quarter of L1's budget: what hot answers may keep alive beyond it.
            hot: hot::HotAnswers::new(config.cache.capacity.as_u64() / 4),
            waiters: Arc::default(),
            upstream: proxy::Upstream::new(
                &config.upstream.url,
                config.upstream.timeout,
                &config.gateway.trusted_proxies,
            ),
            stopping: CancellationToken::new(),
            metrics,
            failures: Arc::default(),
            config,
        })
    }

    /// Starts `workers.embedded` workers in this process, if any; they stop when the
    /// gateway does.
    fn start_workers(&self, backends: Backends) -> Result<Option<WorkersTask>, StartError> {
        let config = &self.config;
        if config.workers.embedded == 0 {
            return Ok(None);
        }
        let builder = tessera_workers::HttpBuilder::new(config)
            .map_err(|e| StartError::Workers(e.to_string()))?;
        let stop = self.stopping.clone();
        // Abort on drop: if this future is dropped (the task running the gateway was
        // aborted), the embedded workers go with it, like a crashed process.
        Ok(Some(tokio_util::task::AbortOnDropHandle::new(
            tokio::spawn(tessera_workers::run(
                backends,
                config.clone(),
                Arc::new(builder),
                config.workers.embedded,
                self.metrics.worker.clone(),
                async move { stop.cancelled().await },
            )),
        )))
    }

    /// Serves public traffic on `listener`, on `gateway.threads` threads of its own (or,
    /// with 0, on the process's runtime), and the admin API on `admin`, until
    /// `shutdown`; long-polls are answered at once when it fires. The public threads, if
    /// any, are returned drained: their runtimes, and what their requests started, end
    /// when they are dropped.
    async fn listen(
        self: Arc<Self>,
        listener: TcpListener,
        admin: Option<TcpListener>,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<Option<Threads>, StartError> {
        let stopping = self.stopping.clone();
        let shutdown = async move {
            shutdown.await;
            // Long-polls answer at once instead of holding the drain.
            stopping.cancel();
        };
        let options = |name| {
            ServeOptions::new(&self.config.http).counted_by(self.metrics.connections.listener(name))
        };
        let stopped = || self.stopping.clone().cancelled_owned();
        let public = self.clone();
        let handler = move |req, peer| public.clone().handle(req, peer);
        let (mut threads, shared) = match self.config.gateway.threads {
            // The process's runtime, whose threads take work from each other.
            0 => {
                let public = web::serve(listener, options("public"), handler, stopped());
                (None, Some(tokio::spawn(public)))
            }
            count => {
                let threads = Threads::start(
                    "tessera-http",
                    listener,
                    count,
                    options("public"),
                    handler,
                    // Each thread keeps to a memcached connection of its own.
                    tessera_backends::memcached::home,
                )
                .map_err(StartError::Threads)?;
                (Some(threads), None)
            }
        };
        let admin_server = admin.map(|admin| {
            let gw = self.clone();
            let handler = move |req, peer| gw.clone().admin(req, peer);
            tokio::spawn(web::serve(admin, options("admin"), handler, stopped()))
        });
        match threads.as_mut() {
            Some(threads) => threads.serve_until(shutdown).await,
            None => shutdown.await,
        }
        for server in shared.into_iter().chain(admin_server) {
            let _ = server.await;
        }
        Ok(threads)
    }
}

impl Gateway {
    /// Routes one request. A fresh hit is answered at once, before any future exists:
    /// the request, which holds on to hyper's read buffer, is then dropped before hyper
    /// reads on, so the connection keeps reusing one buffer instead of allocating another
    /// for each request.
    fn handle(
        self: Arc<Self>,
        req: Request<hyper::body::Incoming>,
        peer: SocketAddr,
    ) -> impl Future<Output = Response<Body>> + Send {
        use futures_util::future::Either;
        match self.hot_fragment(&req) {
            Some(response) => Either::Left(std::future::ready(response)),
            // Boxed: hyper moves the future it is handed, and the full path's is large.
            None => Either::Right(Box::pin(self.route(req, peer))),
        }
    }

    /// Routes a request the hot answers did not answer: the fragment endpoint's full
    /// path, the client script, or the proxy.
    async fn route(
        self: Arc<Self>,
        req: Request<hyper::body::Incoming>,
        peer: SocketAddr,
    ) -> Response<Body> {
        let prefix = self.config.gateway.fragment_prefix.as_str();
        if let Some(name) = req.uri().path().strip_prefix(prefix) {
            return self.fragment(&req, name).await;
        }
        if req.uri().path() == compose::CLIENT_JS_PATH {
            return client_js(&req, self.config.gateway.compress);
        }
        if req.uri().path() == stream::STREAM_PATH {
            return self.stream(&req);
        }
        // Boxed: the proxy and composition futures are large, and without the box every
        // request down this path (fragment misses, hits on `vary` routes) would allocate
        // and fill a future of their size.
        Box::pin(self.proxy(req, peer)).await
    }

    async fn proxy(
        self: Arc<Self>,
        req: Request<hyper::body::Incoming>,
        peer: SocketAddr,
    ) -> Response<Body> {
        // Composition needs the page request's cookies and headers for `vary`, and its
        // host and path to resolve include `src`s against.
        let headers = req.headers().clone();
        let base = compose::PageBase::of(req.uri(), &headers);
        // A HEAD answers what GET would, composed headers included (length, caching),
        // without the body: asked upstream as GET, as Varnish does.
        let head = req.method() == http::Method::HEAD;
        let mut req = req;
        if head {
            *req.method_mut() = http::Method::GET;
        }
        let response = self.upstream.forward(req, peer).await;
        let response = self.compose_response(response, &base, &headers).await;
        if head {
            let (parts, _) = response.into_parts();
            return Response::from_parts(parts, tessera_runtime::web::empty());
        }
        response
    }
}

/// The client script, embedded in the binary.
const CLIENT_JS: &str = include_str!("../assets/client.js");

fn client_js(req: &Request<hyper::body::Incoming>, compress: bool) -> Response<Body> {
    use http::{HeaderMap, HeaderValue, header};
    /// Compressed once per process.
    static ENCODED: encoding::Encoded = encoding::Encoded::new();
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_start_up_line_shows_the_admin_address_or_off() {
        let addr = SocketAddr::from(([127, 0, 0, 1], 9090));
        assert_eq!(AdminListen(Some(addr)).to_string(), "127.0.0.1:9090");
        assert_eq!(AdminListen(None).to_string(), "off");
    }
}
