//! `tessera-worker`: parse the command line and config, set up logging, connect, build.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use tessera_protocol::config::admin_listener;
use tessera_protocol::{Backend, Config};
use tessera_runtime::reload::LiveConfig;
use tessera_workers::WorkerMetrics;
use tokio::net::TcpListener;

/// Fragment worker: consumes build requests from the broker and renders fragments.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// TOML configuration file, shared with the gateways (default: $TESSERA_CONFIG).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Concurrent builds in this process (default: workers.concurrency).
    #[arg(long, value_name = "N")]
    concurrency: Option<usize>,
    /// Address of this process's metrics and health listener (default:
    /// workers.admin_listen; port 0 picks a free port, logged at start).
    #[arg(long, value_name = "ADDR")]
    admin_listen: Option<String>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    tessera_runtime::process::init_logging();
    let mut config = match Config::load(args.config.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("tessera-worker: {e}");
            std::process::exit(2);
        }
    };
    tessera_runtime::process::apply_log_level(&config.log);
    if !matches!(config.backend, Backend::Distributed { .. }) {
        eprintln!(
            "tessera-worker: needs `[store] memcached` and `[bus] amqp` in the config (or \
             TESSERA_MEMCACHED and TESSERA_AMQP_URL): in embedded mode the workers run inside \
             the gateway (`[workers] embedded`)"
        );
        std::process::exit(2);
    }
    let concurrency = args.concurrency.unwrap_or(config.workers.concurrency);
    if concurrency == 0 {
        eprintln!("tessera-worker: --concurrency must be at least 1");
        std::process::exit(2);
    }
    if let Some(addr) = args.admin_listen {
        // The flag replaces the file's address, so it must pass the file's rules too.
        match admin_listener("workers", &addr, &config.workers.admin_token) {
            Ok(addr) => config.workers.admin_listen = addr,
            Err(e) => {
                eprintln!("tessera-worker: {e}");
                std::process::exit(2);
            }
        }
    }
    let w = &config.workers;
    let admin = TcpListener::bind(w.admin_listen)
        .await
        .with_context(|| format!("binding workers.admin_listen = {}", w.admin_listen))?;
    tracing::info!(admin = %admin.local_addr()?, "worker admin listening");

    // Kept until the worker has stopped: dropping it exports the last spans.
    let _traces =
        tessera_runtime::otel::init(&config.otel, "tessera-worker").map_err(anyhow::Error::msg)?;
    let backends = tessera_backends::connect(&config).await?;
    let builder = tessera_workers::HttpBuilder::new(&config)?;
    let metrics = WorkerMetrics::default();
    // Serves until the process exits, so probes answer while builds drain.
    tokio::spawn(tessera_workers::admin::serve(
        admin,
        metrics.clone(),
        backends.clone(),
        w.admin_token.clone(),
        config.http.clone(),
        std::future::pending(),
    ));
    let builder = Arc::new(builder);
    let live = LiveConfig::new(config);
    let reloading = reload_on_sighup(args.config, live.clone(), builder.clone());
    tessera_workers::run_live(
        backends,
        live,
        builder,
        concurrency,
        metrics,
        tessera_runtime::process::shutdown_signal(),
    )
    .await?;
    reloading.abort();
    tracing::info!("worker stopped");
    Ok(())
}

/// jemalloc, not glibc's malloc: measured faster on the memcached hit path, and holding
/// less after a burst of new keys (bench/README.md, "Allocator").
/// Applies each configuration SIGHUP brings (routes, upstream, render token) to the
/// build loop and the builder; see [`tessera_runtime::reload`].
fn reload_on_sighup(
    path: Option<PathBuf>,
    live: Arc<LiveConfig>,
    builder: Arc<tessera_workers::HttpBuilder>,
) -> tokio::task::JoinHandle<()> {
    let apply = move |new: Config| {
        let done = live.replace(new);
        if let Err(e) = builder.reconfigure(&live.load()) {
            tracing::warn!(error = %e, "the builder keeps its old upstream settings");
        }
        done
    };
    tokio::spawn(tessera_runtime::reload::on_sighup(
        "tessera-worker",
        path,
        apply,
    ))
}

#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;
