//! `tessera-gateway`: parse the command line and config, set up logging, bind, run.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use http::Method;
use tessera_protocol::Config;
use tessera_protocol::config::QueueType;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Fragment-cache gateway: serves slow page fragments from cache, builds them in the
/// background.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// TOML configuration file (default: $TESSERA_CONFIG, else built-in defaults).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Also start a bundled demo upstream with slow fragments, and print the URL to open.
    #[arg(long)]
    demo: bool,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    #[command(flatten)]
    Admin(Admin),
    /// Load and validate the configuration (file and TESSERA_* environment), print a
    /// summary and exit 0; exit 2 naming the key at fault otherwise. Touches no server.
    Check,
    /// Exit 0 when an admin URL (of a gateway or a worker) answers 2xx, else 1: a
    /// container health probe that needs no curl, e.g.
    /// `tessera-gateway probe http://127.0.0.1:9090/readyz`. Sends the admin token.
    Probe {
        /// The URL to check.
        url: String,
    },
    /// Run only the bundled demo upstream (the app `--demo` fronts), e.g. as the
    /// upstream of a local cluster; its routes are in `gateway/assets/demo.toml`.
    DemoUpstream {
        /// Address to listen on.
        #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:3000")]
        listen: String,
    },
}

/// Operations on a running gateway, through its admin listener (`gateway.admin_listen`
/// and `gateway.admin_token` from the same config).
#[derive(Debug, Subcommand)]
enum Admin {
    /// Purge content on every gateway.
    Purge {
        #[command(subcommand)]
        what: Purge,
        /// Admin URL (default: http://{gateway.admin_listen}).
        #[arg(long, global = true)]
        admin: Option<String>,
        /// Wait up to this long (e.g. `2s`, at most 10s) for every gateway to apply the
        /// purge; the answer says how many did, of how many known, and which missed.
        #[arg(long, global = true, value_name = "DURATION")]
        wait: Option<String>,
        /// Make the content stale instead (a fragment or tags): served while one rebuild
        /// per fragment runs in the background.
        #[arg(long, global = true)]
        soft: bool,
    },
    /// List dead-lettered build requests as a table, or retry or discard them: one by
    /// its id, or all of a route.
    DeadLetters {
        #[command(subcommand)]
        action: Option<DeadLetterAction>,
        /// Re-queue up to this many (oldest first, any route) instead of listing.
        #[arg(long, value_name = "N")]
        requeue: Option<usize>,
        /// Print the list as JSON (for scripts) instead of a table.
        #[arg(long)]
        json: bool,
        /// Admin URL (default: http://{gateway.admin_listen}).
        #[arg(long, global = true)]
        admin: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
enum DeadLetterAction {
    /// Put a letter (by id) or every letter of a route back on its queue.
    Retry {
        /// The letter's id, as the list shows it.
        #[arg(required_unless_present = "route", conflicts_with = "route")]
        id: Option<String>,
        /// Every letter of this route.
        #[arg(long)]
        route: Option<String>,
    },
    /// Remove a letter (by id) or every letter of a route for good.
    Discard {
        /// The letter's id, as the list shows it.
        #[arg(required_unless_present = "route", conflicts_with = "route")]
        id: Option<String>,
        /// Every letter of this route.
        #[arg(long)]
        route: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
enum Purge {
    /// One fragment, e.g. `purge fragment '/fragments/recs?user_id=7'`.
    Fragment {
        /// The fragment's public path with its params.
        path: String,
    },
    /// A whole route (its generation is bumped; nothing of it is served again).
    Route {
        /// The route name.
        name: String,
    },
    /// Every fragment whose render answer carried the tag (`Surrogate-Key`), on every
    /// route, e.g. `purge tag product-42`; with several tags, each of them
    /// (`purge tag a b c`), or with `--all-of` the fragments carrying all of them
    /// (`purge tag --all-of a b`).
    Tag {
        /// The tags (at most 32).
        #[arg(required = true, num_args = 1..)]
        names: Vec<String>,
        /// Purge only the fragments carrying every one of the tags.
        #[arg(long)]
        all_of: bool,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    tessera_runtime::process::init_logging();
    let path = args.config.as_deref();
    match args.command {
        // Needs no configuration.
        Some(Command::DemoUpstream { listen }) => demo_upstream(&listen).await,
        Some(Command::Check) => {
            check(&load(path));
            Ok(())
        }
        Some(Command::Probe { url }) => probe(&load(path), &url).await,
        Some(Command::Admin(command)) => admin_command(&load(path), command).await,
        None => run(load(path), path, args.demo).await,
    }
}

/// The configuration, or exit 2 naming the key at fault.
fn load(path: Option<&std::path::Path>) -> Config {
    match Config::load(path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("tessera-gateway: {e}");
            std::process::exit(2);
        }
    }
}

async fn run(mut config: Config, path: Option<&std::path::Path>, demo: bool) -> anyhow::Result<()> {
    tessera_runtime::process::apply_log_level(&config.log);
    let stop_demo = CancellationToken::new();
    if demo {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let upstream = tessera_gateway::demo::start(listener, stop_demo.clone())
            .context("starting the demo upstream")?;
        tessera_gateway::demo::configure(&mut config, upstream);
    }

    let listener = TcpListener::bind(config.gateway.listen)
        .await
        .with_context(|| format!("binding gateway.listen = {}", config.gateway.listen))?;
    // Kept until the gateway has stopped: dropping it exports the last spans.
    let _traces =
        tessera_runtime::otel::init(&config.otel, "tessera-gateway").map_err(anyhow::Error::msg)?;
    if demo {
        let page = listener.local_addr()?;
        print!(
            "{}",
            tessera_gateway::demo::banner(page, config.gateway.admin_listen)
        );
    }
    // The demo's upstream is made here, not in a file: nothing to reload. SIGHUP is
    // still caught, so that trying a reload on the demo does not end it.
    let reload =
        (!demo).then(|| tessera_gateway::ReloadFrom(path.map(std::path::Path::to_path_buf)));
    let _no_reload = demo.then(|| tokio::spawn(demo_sighup()));
    tessera_gateway::run_with(
        listener,
        config,
        reload,
        tessera_runtime::process::shutdown_signal(),
    )
    .await?;
    stop_demo.cancel();
    Ok(())
}

/// Answers SIGHUP in demo mode with a warning: the demo's routes and upstream are made at
/// start, not read from a file.
async fn demo_sighup() {
    #[cfg(unix)]
    if let Ok(mut hup) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        while hup.recv().await.is_some() {
            tracing::warn!(
                "SIGHUP: the demo (--demo) does not reload its configuration; run without --demo to reload"
            );
        }
    }
}

/// Prints what a valid configuration amounts to.
fn check(config: &Config) {
    let store = match config.backend.memcached() {
        None => "in-process".to_string(),
        Some(servers) => {
            let servers: Vec<String> = servers.iter().map(ToString::to_string).collect();
            format!("memcached {}", servers.join(", "))
        }
    };
    let bus = match config.backend.amqp() {
        None => "in-process".to_string(),
        Some(nodes) => {
            let nodes: Vec<String> = nodes.iter().map(ToString::to_string).collect();
            format!(
                "RabbitMQ {} ({} queues)",
                nodes.join(", "),
                config.bus.queue_type.as_str()
            )
        }
    };
    let routes: Vec<&str> = config.fragments.iter().map(|r| r.name.as_str()).collect();
    let routes = if routes.is_empty() {
        "no routes are configured: every request is proxied to the upstream".to_string()
    } else {
        format!("routes: {}", routes.join(", "))
    };
    let traces = if config.otel.endpoint.is_empty() {
        "traces off".to_string()
    } else {
        format!(
            "traces to {} (sampled at {})",
            config.otel.endpoint, config.otel.sample_ratio
        )
    };
    println!(
        "configuration OK: store {store}; bus {bus}; {} embedded workers; upstream {}; {traces}; {routes}",
        config.workers.embedded, config.upstream.url,
    );
    if config.bus.queue_type == QueueType::Classic
        && config.backend.amqp().is_some_and(|nodes| nodes.len() > 1)
    {
        eprintln!(
            "warning: bus.amqp lists several nodes, and classic queues live on one node: \
             queued builds are lost with it; set bus.queue_type = \"quorum\" for a cluster"
        );
    }
}

async fn probe(config: &Config, url: &str) -> anyhow::Result<()> {
    // Either token opens both listeners when set from TESSERA_ADMIN_TOKEN.
    let token = if config.gateway.admin_token.is_empty() {
        &config.workers.admin_token
    } else {
        &config.gateway.admin_token
    };
    if let Err(e) = tessera_gateway::cli::call(url, token, Method::GET, "").await {
        eprintln!("tessera-gateway probe: {e}");
        std::process::exit(1);
    }
    Ok(())
}

async fn admin_command(config: &Config, command: Admin) -> anyhow::Result<()> {
    let default_admin = format!("http://{}", config.gateway.admin_listen);
    let mut table = false;
    let (admin, method, path) = match command {
        Admin::Purge {
            what,
            admin,
            wait,
            soft,
        } => {
            let path = match what {
                Purge::Fragment { path } => tessera_gateway::cli::fragment_purge_path(
                    &path,
                    &config.gateway.fragment_prefix,
                ),
                Purge::Route { name } => format!("/routes/{name}"),
                Purge::Tag { names, all_of } => {
                    match tessera_gateway::cli::tag_purge_path(&names, all_of) {
                        Ok(path) => path,
                        Err(e) => {
                            eprintln!("tessera-gateway: {e}");
                            std::process::exit(2);
                        }
                    }
                }
            };
            let path = tessera_gateway::cli::with_options(&path, soft, wait.as_deref());
            (admin, Method::DELETE, path)
        }
        Admin::DeadLetters {
            action,
            requeue,
            json,
            admin,
        } => {
            let (method, path) = dead_letters_request(action, requeue);
            table = !json && method == Method::GET;
            (admin, method, path)
        }
    };
    let base = admin.unwrap_or(default_admin);
    match tessera_gateway::cli::call(&base, &config.gateway.admin_token, method, &path).await {
        Ok(body) if table => match tessera_gateway::cli::dead_letter_table(&body) {
            Ok(table) => {
                print!("{table}");
                Ok(())
            }
            Err(e) => {
                eprintln!("tessera-gateway: {e}");
                std::process::exit(1);
            }
        },
        Ok(body) => {
            println!("{body}");
            Ok(())
        }
        Err(e) => {
            eprintln!("tessera-gateway: {e}");
            std::process::exit(1);
        }
    }
}

/// The admin request a `dead-letters` command makes.
fn dead_letters_request(
    action: Option<DeadLetterAction>,
    requeue: Option<usize>,
) -> (Method, String) {
    use tessera_gateway::cli::dead_letter_path;
    match (action, requeue) {
        (Some(DeadLetterAction::Retry { id, route }), _) => {
            dead_letter_path(Method::POST, id.as_deref(), route.as_deref())
        }
        (Some(DeadLetterAction::Discard { id, route }), _) => {
            dead_letter_path(Method::DELETE, id.as_deref(), route.as_deref())
        }
        (None, Some(n)) => (Method::POST, format!("/dead-letters/requeue?limit={n}")),
        (None, None) => (Method::GET, "/dead-letters".into()),
    }
}

async fn demo_upstream(listen: &str) -> anyhow::Result<()> {
    let listener = TcpListener::bind(listen)
        .await
        .with_context(|| format!("binding the demo upstream to {listen}"))?;
    let stop = CancellationToken::new();
    let addr = tessera_gateway::demo::start(listener, stop.clone())?;
    println!("Tessera demo upstream on http://{addr}/");
    tessera_runtime::process::shutdown_signal().await;
    stop.cancel();
    Ok(())
}

/// jemalloc, not glibc's malloc: measured faster on the memcached hit path, and holding
/// less after a burst of new keys (bench/README.md, "Allocator").
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;
