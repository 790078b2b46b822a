//! `tessera-gateway`: parse the command line and config, set up logging, bind, run.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use http::Method;
use tessera_protocol::Config;
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

/// Operations on a running gateway, through its admin listener (`gateway.admin_listen`
/// and `gateway.admin_token` from the same config).
#[derive(Debug, Subcommand)]
enum Command {
    /// Purge content on every gateway.
    Purge {
        #[command(subcommand)]
        what: Purge,
        /// Admin URL (default: http://{gateway.admin_listen}).
        #[arg(long, global = true)]
        admin: Option<String>,
    },
    /// List dead-lettered build requests, or put them back on their queues.
    DeadLetters {
        /// Re-queue up to this many instead of listing.
        #[arg(long, value_name = "N")]
        requeue: Option<usize>,
        /// Admin URL (default: http://{gateway.admin_listen}).
        #[arg(long)]
        admin: Option<String>,
    },
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
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    tessera_protocol::process::init_logging();
    if let Some(Command::DemoUpstream { listen }) = &args.command {
        // Needs no configuration.
        return demo_upstream(listen).await;
    }
    let mut config = match Config::load(args.config.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("tessera-gateway: {e}");
            std::process::exit(2);
        }
    };

    if let Some(command) = args.command {
        return admin_command(&config, command).await;
    }

    let stop_demo = CancellationToken::new();
    if args.demo {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let upstream = tessera_gateway::demo::start(listener, stop_demo.clone())
            .context("starting the demo upstream")?;
        tessera_gateway::demo::configure(&mut config, upstream);
    }

    let listener = TcpListener::bind(&config.gateway.listen)
        .await
        .with_context(|| format!("binding gateway.listen = {}", config.gateway.listen))?;
    if args.demo {
        println!("Tessera demo: open http://{}/", listener.local_addr()?);
    }
    tessera_gateway::run(
        listener,
        config,
        tessera_protocol::process::shutdown_signal(),
    )
    .await?;
    stop_demo.cancel();
    Ok(())
}

async fn admin_command(config: &Config, command: Command) -> anyhow::Result<()> {
    let default_admin = format!("http://{}", config.gateway.admin_listen);
    let token = &config.gateway.admin_token;
    let (admin, method, path) = match command {
        Command::Purge { what, admin } => {
            let path = match what {
                Purge::Fragment { path } => tessera_gateway::cli::fragment_purge_path(
                    &path,
                    &config.gateway.fragment_prefix,
                ),
                Purge::Route { name } => format!("/routes/{name}"),
            };
            (admin, Method::DELETE, path)
        }
        Command::DeadLetters {
            requeue: Some(n),
            admin,
        } => (
            admin,
            Method::POST,
            format!("/dead-letters/requeue?limit={n}"),
        ),
        Command::DeadLetters {
            requeue: None,
            admin,
        } => (admin, Method::GET, "/dead-letters".into()),
        Command::DemoUpstream { listen } => return demo_upstream(&listen).await, // not reached
        Command::Check => {
            let store = if config.store.memcached.is_empty() {
                "in-process".to_string()
            } else {
                format!("memcached {}", config.store.memcached.join(", "))
            };
            let bus = if config.bus.amqp.is_some() {
                "RabbitMQ"
            } else {
                "in-process"
            };
            let mode = format!(
                "store {store}; bus {bus}; {} embedded workers",
                config.workers.embedded
            );
            let routes: Vec<&str> = config.fragments.iter().map(|r| r.name.as_str()).collect();
            println!(
                "configuration OK: {mode}; upstream {}; routes: {}",
                config.upstream.url,
                routes.join(", ")
            );
            return Ok(());
        }
        Command::Probe { url } => {
            // Either token opens both listeners when set from TESSERA_ADMIN_TOKEN.
            let token = if token.is_empty() {
                &config.workers.admin_token
            } else {
                token
            };
            return match tessera_gateway::cli::call(&url, token, Method::GET, "").await {
                Ok(_) => Ok(()),
                Err(e) => {
                    eprintln!("tessera-gateway probe: {e}");
                    std::process::exit(1);
                }
            };
        }
    };
    let base = admin.unwrap_or(default_admin);
    match tessera_gateway::cli::call(&base, token, method, &path).await {
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

async fn demo_upstream(listen: &str) -> anyhow::Result<()> {
    let listener = TcpListener::bind(listen)
        .await
        .with_context(|| format!("binding the demo upstream to {listen}"))?;
    let stop = CancellationToken::new();
    let addr = tessera_gateway::demo::start(listener, stop.clone())?;
    println!("Tessera demo upstream on http://{addr}/");
    tessera_protocol::process::shutdown_signal().await;
    stop.cancel();
    Ok(())
}
