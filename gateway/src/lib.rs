//! The Tessera gateway: a reverse proxy in front of a web application that serves slow
//! page fragments from cache and never renders them on the request path.
//!
//! A request for a fragment is answered from L1 (moka, in process) or L2 (the shared
//! store); a miss is answered at once with a placeholder while exactly one build is queued
//! for the fragment workers, which may run inside this process (embedded mode) or as
//! `tessera-worker` processes anywhere (distributed mode). Everything else is proxied.
//!
//! The crate has two halves: the cache core ([`cache`]), which knows nothing of HTTP, and
//! the HTTP front ([`http`]), which turns what the core finds into answers.
//!
//! Following a request by names:
//! - **A hit.** [`serve`] hands every public request to [`http::handle`]. A repeated fresh
//!   hit is answered by [`http::fragment::hot`] from the hot answers
//!   ([`CacheService::hot`](cache::CacheService::hot)), without awaiting. Any other
//!   fragment request goes to [`http::fragment::serve`], which names the fragment
//!   ([`CacheService::fragment`](cache::CacheService::fragment): route, identity,
//!   generation, keys) and looks it up
//!   ([`CacheService::lookup`](cache::CacheService::lookup)): L1
//!   ([`cache::l1::L1::read`]), then the store. What it finds ([`cache::Found`]) becomes
//!   the answer.
//! - **A miss.** The store has nothing, so the lookup requests the build
//!   ([`CacheService::request_build`](cache::CacheService)): it takes the fragment's
//!   lease ([`tessera_protocol::Lease`]) and, if it won, publishes the build request on the
//!   bus. The answer is a 202 placeholder, or, with `Prefer: wait`, the fragment once the
//!   `built` event ([`cache::events::follow`]) wakes the request.
//! - **A page.** [`http::compose::page`] proxies it ([`http::proxy`]) and, when it asks
//!   for ESI, looks all its includes up at once
//!   ([`CacheService::lookup_many`](cache::CacheService::lookup_many)).
//!
//! # Layout
//! - [`cache`]: the cache core: lookups, freshness, build requests, purges, L1, hot
//!   answers, tag purges, events, long-poll waiters. No HTTP.
//! - [`http`]: the HTTP front: routing, the fragment endpoint, composition, the push
//!   stream, the proxy, the admin listener, content codings, errors.
//! - [`esi`]: the ESI 1.0 subset parser.
//! - [`compress`]: br and gzip, and the compressed copies a cached fragment keeps.
//! - [`metrics`]: the Prometheus registry of one gateway.
//! - [`demo`]: the bundled demo upstream for `--demo`.
//! - [`cli`]: the `purge` and `dead-letters` subcommands (admin API clients).

mod cache;
pub mod cli;
mod compress;
pub mod demo;
mod esi;
mod http;
mod metrics;

/// Largest page composed; bigger ones pass through as they are.
pub use http::compose::MAX_PAGE;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tessera_protocol::{Backends, Config};
use tessera_runtime::reload::LiveConfig;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::cache::CacheService;
use crate::http::Front;
use crate::http::admin::Admin;
use tessera_runtime::web::{self, ServeOptions, Threads};

/// Why the gateway could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A backend could not be set up.
    #[error(transparent)]
    Backend(#[from] tessera_backends::BackendError),
    /// The event subscription could not be opened.
    #[error("cannot subscribe to events: {0}")]
    Events(#[from] tessera_protocol::BusError),
    /// The embedded workers could not be set up.
    #[error("embedded workers: {0}")]
    Workers(String),
    /// The public listener's threads could not be started.
    #[error("cannot start the gateway.threads: {0}")]
    Threads(std::io::Error),
    /// The access log could not be opened.
    #[error("cannot open access_log.path: {0}")]
    AccessLog(std::io::Error),
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

/// How long shutdown waits for embedded workers to finish in-flight builds.
const WORKER_DRAIN: Duration = Duration::from_secs(15);

/// Where a gateway reads its configuration again on SIGHUP: the file it was started
/// with (`None`: `$TESSERA_CONFIG`, else the defaults). See [`tessera_runtime::reload`].
#[derive(Debug, Clone)]
pub struct ReloadFrom(pub Option<std::path::PathBuf>);

/// Runs a gateway on `listener` (public traffic) and on `gateway.admin_listen`, with the
/// backends `config` names, until `shutdown`.
pub async fn run(
    listener: TcpListener,
    config: Config,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), StartError> {
    run_with(listener, config, None, shutdown).await
}

/// [`run`], reloading the configuration on SIGHUP when `reload` says from where.
pub async fn run_with(
    listener: TcpListener,
    config: Config,
    reload: Option<ReloadFrom>,
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
    serve_with(listener, Some(admin), config, backends, reload, shutdown).await
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
    serve_with(listener, admin, config, backends, None, shutdown).await
}

/// [`serve`], reloading on SIGHUP when `reload` is given.
///
/// A reload swaps the public front whole ([`Front`]: the configuration snapshot, the
/// upstream client, the render paths), in one `ArcSwap` that each request loads once;
/// the cache core, the metrics and the access log are shared by every front. The admin
/// API, the events and the embedded workers read the [`LiveConfig`] the reload replaced.
async fn serve_with(
    listener: TcpListener,
    admin: Option<TcpListener>,
    config: Config,
    backends: Backends,
    reload: Option<ReloadFrom>,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), StartError> {
    let live = LiveConfig::new(config);
    let config = live.load();
    let metrics = Arc::new(
        metrics::Metrics::new(config.fragments.iter().map(|r| r.name.as_str()))
            .with_backends(backends.clone()),
    );
    let cache = Arc::new(CacheService::new(
        live.clone(),
        backends.clone(),
        metrics.clone(),
    ));
    let stopping = CancellationToken::new();
    let (access_log, log_writer) = match http::access_log::AccessLog::start(&config) {
        Ok(Some((log, writer))) => (Some(log), Some(writer)),
        Ok(None) => (None, None),
        Err(e) => return Err(StartError::AccessLog(e)),
    };
    let reopen = log_writer
        .as_ref()
        .map(|w| reopen_on_sigusr1(w.reopen.clone()));
    let front = Front::new(
        config.clone(),
        cache.clone(),
        metrics.clone(),
        stopping.clone(),
        access_log.map(Arc::new),
    );
    let fronts = Arc::new(ArcSwap::from_pointee(front));
    let admin = match admin {
        Some(listener) => Some(admin_on(listener, &live, &cache, &backends, &metrics)?),
        None => None,
    };
    // Subscribe before serving, so no event after the first request is missed.
    let subscription = backends.bus.subscribe().await?;
    let events = tokio_util::task::AbortOnDropHandle::new(tokio::spawn(cache::events::follow(
        cache.clone(),
        subscription,
        stopping.clone(),
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
    let (workers, builder) = start_workers(&live, &metrics, backends, &stopping)?;
    let reloading = reload.map(|from| reload_on_sighup(from, live, fronts.clone(), builder));

    if let Ok(addr) = listener.local_addr() {
        let admin = AdminListen(admin.as_ref().and_then(|(a, _)| a.local_addr().ok()));
        tracing::info!(%addr, %admin, embedded_workers = config.workers.embedded, routes = config.fragments.len(), "gateway listening");
    }
    let threads = listen(fronts, listener, admin, shutdown).await?;
    drop(reloading);
    if let Some(workers) = workers {
        drain_workers(workers).await;
    }
    events.abort();
    // Last: the embedded workers may still have used a memcached connection one of the
    // public threads dialed.
    drop(threads);
    drop(reopen);
    if let Some(writer) = log_writer {
        writer.join(ACCESS_LOG_DRAIN).await;
    }
    tracing::info!("gateway stopped");
    Ok(())
}

/// The admin API on `listener`.
fn admin_on(
    listener: TcpListener,
    live: &Arc<LiveConfig>,
    cache: &Arc<CacheService>,
    backends: &Backends,
    metrics: &Arc<metrics::Metrics>,
) -> Result<(TcpListener, Arc<Admin>), StartError> {
    let listen = listener.local_addr().map_err(|source| StartError::Bind {
        what: "gateway.admin_listen",
        addr: live.load().gateway.admin_listen,
        source,
    })?;
    let admin = Admin {
        config: live.clone(),
        cache: cache.clone(),
        backends: backends.clone(),
        metrics: metrics.clone(),
        listen,
    };
    Ok((listener, Arc::new(admin)))
}

/// Applies each configuration SIGHUP brings: the live configuration, the embedded
/// workers' builder, and a new public front; until dropped.
fn reload_on_sighup(
    from: ReloadFrom,
    live: Arc<LiveConfig>,
    fronts: Arc<ArcSwap<Front>>,
    builder: Option<Arc<tessera_workers::HttpBuilder>>,
) -> tokio_util::task::AbortOnDropHandle<()> {
    let apply = move |new: Config| {
        let done = live.replace(new);
        let config = live.load();
        if let Some(builder) = &builder
            && let Err(e) = builder.reconfigure(&config)
        {
            tracing::warn!(error = %e, "embedded workers keep their old upstream settings");
        }
        fronts.store(Arc::new(fronts.load().reconfigured(config)));
        done
    };
    tokio_util::task::AbortOnDropHandle::new(tokio::spawn(tessera_runtime::reload::on_sighup(
        "tessera-gateway",
        from.0,
        apply,
    )))
}

/// How long shutdown waits for the access log's last lines to be written.
const ACCESS_LOG_DRAIN: Duration = Duration::from_secs(2);

/// Sets `reopen` on every SIGUSR1 (logrotate's signal to reopen logs), until dropped.
fn reopen_on_sigusr1(
    reopen: Arc<std::sync::atomic::AtomicBool>,
) -> tokio_util::task::AbortOnDropHandle<()> {
    tokio_util::task::AbortOnDropHandle::new(tokio::spawn(async move {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            let mut usr1 = match signal(SignalKind::user_defined1()) {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot listen for SIGUSR1: the access log will not be reopened");
                    return;
                }
            };
            while usr1.recv().await.is_some() {
                tracing::info!("SIGUSR1: reopening the access log");
                reopen.store(true, std::sync::atomic::Ordering::Relaxed);
            }
        }
        #[cfg(not(unix))]
        drop(reopen);
    }))
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

/// The embedded workers' task and their builder (which a reload reconfigures).
type Workers = (
    Option<WorkersTask>,
    Option<Arc<tessera_workers::HttpBuilder>>,
);

/// Starts `workers.embedded` workers in this process, if any; they stop when `stopping`
/// is cancelled.
fn start_workers(
    live: &Arc<LiveConfig>,
    metrics: &metrics::Metrics,
    backends: Backends,
    stopping: &CancellationToken,
) -> Result<Workers, StartError> {
    let config = live.load();
    if config.workers.embedded == 0 {
        return Ok((None, None));
    }
    let builder = Arc::new(
        tessera_workers::HttpBuilder::new(&config)
            .map_err(|e| StartError::Workers(e.to_string()))?,
    );
    let stop = stopping.clone();
    // Abort on drop: if this future is dropped (the task running the gateway was aborted),
    // the embedded workers go with it, like a crashed process.
    let task = tokio_util::task::AbortOnDropHandle::new(tokio::spawn(tessera_workers::run_live(
        backends,
        live.clone(),
        builder.clone(),
        config.workers.embedded,
        metrics.worker.clone(),
        async move { stop.cancelled().await },
    )));
    Ok((Some(task), Some(builder)))
}

/// Serves public traffic on `listener`, on `gateway.threads` threads of its own (or, with
/// 0, on the process's runtime), and the admin API on `admin`, until `shutdown`;
/// long-polls and streams are answered at once when it fires. The public threads, if
/// any, are returned drained: their runtimes, and what their requests started, end when
/// they are dropped.
async fn listen(
    fronts: Arc<ArcSwap<Front>>,
    listener: TcpListener,
    admin: Option<(TcpListener, Arc<Admin>)>,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<Option<Threads>, StartError> {
    // What a reload cannot change (`http`, `gateway.threads`) and what every front
    // shares (stopping, metrics) is read from the first.
    let front = fronts.load_full();
    let stopping = front.stopping.clone();
    let shutdown = async move {
        shutdown.await;
        // Long-polls answer at once instead of holding the drain.
        stopping.cancel();
    };
    let options = |name| {
        ServeOptions::new(&front.config.http).counted_by(front.metrics.connections.listener(name))
    };
    let stopped = || front.stopping.clone().cancelled_owned();
    // Each request takes the front of the moment, and keeps it to its end.
    let handler = move |req, peer| http::handle(&fronts, req, peer);
    let (mut threads, shared) = match front.config.gateway.threads {
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
    let admin_server = admin.map(|(listener, admin)| {
        let handler = move |req, peer| admin.clone().serve(req, peer);
        tokio::spawn(web::serve(listener, options("admin"), handler, stopped()))
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
