//! Process-level conventions both binaries share: how they log and when they stop.

/// Sets up logging to stdout: `RUST_LOG` filters (default `info` until the
/// configuration's `[log] level` is applied, [`apply_log_level`]);
/// `TESSERA_LOG_FORMAT=json` writes one JSON object per line for log collectors, anything
/// else human-readable lines, coloured only on a terminal and without `NO_COLOR` set (a
/// file, a pipe or journald gets plain text).
pub fn init_logging() {
    use std::io::IsTerminal;
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let (filter, handle) =
        tracing_subscriber::reload::Layer::new(log_filter(rust_log().as_deref()));
    let json = std::env::var(tessera_protocol::config::env::LOG_FORMAT)
        .is_ok_and(|v| v.eq_ignore_ascii_case("json"));
    let colour = std::io::stdout().is_terminal()
        && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    let lines = tracing_subscriber::fmt::layer().with_ansi(colour);
    let logging = tracing_subscriber::registry().with(filter);
    let set = if json {
        logging.with(lines.json().flatten_event(true)).try_init()
    } else {
        logging.with(lines).try_init()
    };
    if set.is_ok() {
        let _ = LEVEL.set(handle);
    }
}

/// The running filter, replaced by [`apply_log_level`].
static LEVEL: std::sync::OnceLock<
    tracing_subscriber::reload::Handle<tracing_subscriber::EnvFilter, tracing_subscriber::Registry>,
> = std::sync::OnceLock::new();

/// `RUST_LOG`, when set and not empty.
fn rust_log() -> Option<String> {
    std::env::var("RUST_LOG")
        .ok()
        .filter(|v| !v.trim().is_empty())
}

/// Filters the log by the configuration's `[log] level`: at start, once the file is read,
/// and on every reload. `RUST_LOG`, when set, wins, and this does nothing; so it does in a
/// process that did not [`init_logging`] (tests serving a gateway in-process).
pub fn apply_log_level(log: &tessera_protocol::config::LogConfig) {
    if rust_log().is_some() {
        return;
    }
    if let Some(handle) = LEVEL.get()
        && let Err(e) = handle.reload(log_filter(Some(&log.level)))
    {
        tracing::warn!(error = %e, "cannot change the log level");
    }
}

/// lapin logs every message the broker returns (a publish no queue took) at `warn`, with
/// its whole body. The bus reports the same publish as an error of its own, so in a miss
/// storm against a deleted queue that line would double the log, with the build request's
/// body in every line: kept below `error` unless `RUST_LOG` names the target.
const RETURNED: &str = "lapin::returned_messages";

/// The filter `RUST_LOG` (or its absence, or a value it cannot parse: `info`) asks for.
fn log_filter(rust_log: Option<&str>) -> tracing_subscriber::EnvFilter {
    use tracing_subscriber::EnvFilter;
    let spec = rust_log.unwrap_or("info");
    let filter = EnvFilter::try_new(spec).unwrap_or_else(|_| EnvFilter::new("info"));
    if spec.contains(RETURNED) {
        return filter;
    }
    match format!("{RETURNED}=error").parse() {
        Ok(quiet) => filter.add_directive(quiet),
        Err(_) => filter,
    }
}

/// Resolves on ctrl-c or SIGTERM, the signals that ask a process to stop gracefully.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::warn!(error = %e, "cannot listen for ctrl-c");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = term => {}
    }
    tracing::info!("shutting down");
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// What a subscriber with `log_filter(rust_log)` writes for a `warn` from lapin's
    /// returned messages and one from the gateway.
    fn logged(rust_log: Option<&str>) -> String {
        let out = Arc::new(Mutex::new(Vec::<u8>::new()));
        let sink = out.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_env_filter(log_filter(rust_log))
            .with_ansi(false)
            .with_writer(move || Sink(sink.clone()))
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            tracing::warn!(target: "lapin::returned_messages", "Server returned us a message");
            tracing::warn!(target: "tessera_gateway::http::error", "request failed");
        });
        let bytes = out.lock().unwrap().clone();
        String::from_utf8(bytes).unwrap()
    }

    #[test]
    fn every_level_the_config_accepts_parses_as_a_filter() {
        for level in [
            "warn",
            "DEBUG",
            "off",
            "info,tessera_gateway=debug",
            "info,tessera_gateway::cache=trace,lapin=error",
        ] {
            let config =
                tessera_protocol::Config::from_toml(&format!("[log]\nlevel = \"{level}\""))
                    .unwrap();
            assert!(
                tracing_subscriber::EnvFilter::try_new(&config.log.level).is_ok(),
                "{level}"
            );
        }
    }

    struct Sink(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Sink {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn returned_messages_are_not_logged_twice_unless_asked_for() {
        for rust_log in [None, Some("warn"), Some("debug"), Some("not a filter ==")] {
            let out = logged(rust_log);
            assert!(out.contains("request failed"), "{rust_log:?}: {out}");
            assert!(!out.contains("returned us"), "{rust_log:?}: {out}");
        }
        let out = logged(Some("warn,lapin::returned_messages=warn"));
        assert!(
            out.contains("returned us") && out.contains("request failed"),
            "{out}"
        );
        let out = logged(Some("error"));
        assert!(out.is_empty(), "{out}");
    }
}
