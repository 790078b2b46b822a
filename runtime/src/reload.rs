//! Reloading the configuration on SIGHUP, as nginx does.
//!
//! Design: a process holds its configuration as a [`LiveConfig`], one `ArcSwap` of the
//! whole validated [`Config`]. Whatever works from it takes a snapshot (an `Arc<Config>`)
//! when a piece of work begins (a request, a build) and keeps it to the end, so a reload
//! never changes the rules under a request in flight: open connections, long-polls and
//! builds finish on the configuration they started with, and the next ones take the new
//! one. The snapshot is one atomic load; nothing on the hit path locks.
//!
//! On SIGHUP, [`on_sighup`] reads the file again exactly as at start ([`Config::load`]:
//! the file, then the `TESSERA_*` environment, then validation). A file that does not
//! pass is refused with the message `check` prints, and the old configuration stays. A
//! good one is applied, except for what a running process cannot change (listen addresses, threads, connection limits, the store, the bus,
//! L1's size, the workers' number, tokens, the access log): those keep their running
//! values, and the log line names each one that the file changed.
//!
//! What a reload does change: the routes (added, removed, changed; a route's render
//! limits too, though a route newly limited gets its own consumer in the workers, or a
//! route no longer limited leaves it, only at their restart), the upstream (URL
//! and timeout), the fragment prefix, `max_wait`, compression, trusted proxies, the
//! render paths' closure, the render token and the log level (`[log] level`, unless
//! `RUST_LOG` is set). A route removed is answered 404 from the
//! next request on, and the build requests already queued for it are acknowledged and
//! counted as dropped by the worker that takes them ([`LiveConfig::retired`]), not
//! dead-lettered.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};

use arc_swap::ArcSwap;
use tessera_protocol::Config;

/// The configuration of a running process, replaced whole by a reload.
#[derive(Debug)]
pub struct LiveConfig {
    current: ArcSwap<Config>,
    /// Routes a reload removed: their queued builds are dropped, not dead-lettered.
    retired: Mutex<HashSet<String>>,
}

/// What a reload changed, for its log line.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Reloaded {
    /// Routes the new file adds.
    pub added: Vec<String>,
    /// Routes the new file no longer has.
    pub removed: Vec<String>,
    /// Keys the file changed that keep their running values until a restart.
    pub kept: Vec<&'static str>,
}

impl LiveConfig {
    /// A live configuration starting with `config`.
    pub fn new(config: Config) -> Arc<LiveConfig> {
        Self::shared(Arc::new(config))
    }

    /// A live configuration starting with `config`, already shared.
    pub fn shared(config: Arc<Config>) -> Arc<LiveConfig> {
        Arc::new(LiveConfig {
            current: ArcSwap::new(config),
            retired: Mutex::new(HashSet::new()),
        })
    }

    /// The configuration now: keep it for the whole piece of work it is taken for.
    pub fn load(&self) -> Arc<Config> {
        self.current.load_full()
    }

    /// Whether a reload removed `route` (and none added it back since).
    pub fn retired(&self, route: &str) -> bool {
        self.retired
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .contains(route)
    }

    /// Applies `new`, keeping what only a restart can change; returns what changed.
    pub fn replace(&self, mut new: Config) -> Reloaded {
        let old = self.load();
        let kept = keep_restart_only(&old, &mut new);
        let names = |c: &Config| {
            c.fragments
                .iter()
                .map(|r| r.name.clone())
                .collect::<Vec<_>>()
        };
        let (before, after) = (names(&old), names(&new));
        let added: Vec<String> = after
            .iter()
            .filter(|n| !before.contains(n))
            .cloned()
            .collect();
        let removed: Vec<String> = before
            .iter()
            .filter(|n| !after.contains(n))
            .cloned()
            .collect();
        {
            let mut retired = self.retired.lock().unwrap_or_else(PoisonError::into_inner);
            retired.extend(removed.iter().cloned());
            for name in &added {
                retired.remove(name);
            }
        }
        self.current.store(Arc::new(new));
        Reloaded {
            added,
            removed,
            kept,
        }
    }
}

/// Puts `old`'s values back into `new` for every key only a restart applies (sockets
/// bound, connections and pools made, threads started at start-up), and names those the
/// file changed.
fn keep_restart_only(old: &Config, new: &mut Config) -> Vec<&'static str> {
    let mut kept = Vec::new();
    macro_rules! keep {
        ($name:literal, $($field:tt)+) => {
            if format!("{:?}", old.$($field)+) != format!("{:?}", new.$($field)+) {
                kept.push($name);
            }
            new.$($field)+ = old.$($field)+.clone();
        };
    }
    keep!("gateway.listen", gateway.listen);
    keep!("gateway.admin_listen", gateway.admin_listen);
    keep!("gateway.admin_token", gateway.admin_token);
    keep!("gateway.threads", gateway.threads);
    keep!("gateway.max_streams", gateway.max_streams);
    keep!("http", http);
    keep!("cache", cache);
    keep!("store", store);
    keep!("store.memcached / bus.amqp", backend);
    keep!("bus", bus);
    keep!("workers.embedded", workers.embedded);
    keep!("workers.concurrency", workers.concurrency);
    keep!("workers.admin_listen", workers.admin_listen);
    keep!("workers.admin_token", workers.admin_token);
    keep!("access_log", access_log);
    // Consumers were started on the queues there were; a route on a new queue would
    // have its builds wait there until the workers restart.
    let queues = old.queues();
    if new.queues().iter().any(|q| !queues.contains(q)) {
        kept.push("fragment[].queue (a new queue: its builds wait until the workers restart)");
    }
    // Workers split their consumers by the routes limited at start: the new limits hold
    // at once, but a route newly limited shares its consumer until they restart.
    let limited: HashSet<String> = old.limited_queues().into_iter().collect();
    if new.limited_queues().into_iter().collect::<HashSet<_>>() != limited {
        kept.push(
            "fragment[].max_renders / renders_per_second (held at once; a limited route's own consumer in each worker starts or stops at a restart)",
        );
    }
    kept
}

/// Re-reads the configuration (`path`, else `$TESSERA_CONFIG`, as at start) on every
/// SIGHUP, and hands each one that passes to `apply`, which swaps it in; logs what was
/// refused or kept. Runs until the process ends.
pub async fn on_sighup(
    binary: &'static str,
    path: Option<PathBuf>,
    apply: impl Fn(Config) -> Reloaded + Send,
) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut hup = match signal(SignalKind::hangup()) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGHUP: no configuration reload");
                return;
            }
        };
        while hup.recv().await.is_some() {
            reload(binary, path.as_deref(), &apply);
        }
    }
    #[cfg(not(unix))]
    {
        let _ = (binary, path, apply);
    }
}

/// One reload: load, refuse or apply, log.
pub fn reload(
    binary: &'static str,
    path: Option<&std::path::Path>,
    apply: &impl Fn(Config) -> Reloaded,
) {
    let config = match Config::load(path) {
        Ok(c) => c,
        Err(e) => {
            // The very message `check` prints.
            tracing::error!("{binary}: {e}");
            tracing::error!("configuration reload refused; running on with the old one");
            return;
        }
    };
    let log = config.log.clone();
    let done = apply(config);
    crate::process::apply_log_level(&log);
    if done.kept.is_empty() {
        tracing::info!(added = ?done.added, removed = ?done.removed, "configuration reloaded");
    } else {
        tracing::warn!(
            added = ?done.added,
            removed = ?done.removed,
            needs_restart = ?done.kept,
            "configuration reloaded; these keys changed but keep their running values until a restart: {}",
            done.kept.join(", ")
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(toml: &str) -> Config {
        Config::from_toml(toml).unwrap()
    }

    const A: &str = "[[fragment]]\nname = \"a\"\nrender = \"/_render/a\"\n";
    const B: &str = "[[fragment]]\nname = \"b\"\nrender = \"/_render/b\"\n";

    #[test]
    fn routes_are_replaced_and_removed_ones_retired() {
        let live = LiveConfig::new(config(A));
        let done = live.replace(config(B));
        assert_eq!(done.added, ["b"]);
        assert_eq!(done.removed, ["a"]);
        assert!(done.kept.is_empty());
        assert!(live.load().route("b").is_some() && live.load().route("a").is_none());
        assert!(live.retired("a") && !live.retired("b"));
        live.replace(config(&format!("{A}{B}")));
        assert!(!live.retired("a"), "a route added back is served again");
    }

    #[test]
    fn what_needs_a_restart_keeps_its_running_value_and_is_named() {
        let live = LiveConfig::new(config(A));
        let done = live.replace(config(&format!(
            "[gateway]\nlisten = \"127.0.0.1:1234\"\nmax_wait = \"5s\"\n[cache]\ncapacity = \"1MiB\"\n{A}"
        )));
        assert_eq!(done.kept, ["gateway.listen", "cache"]);
        let now = live.load();
        assert_eq!(now.gateway.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(now.gateway.max_wait.as_secs(), 5, "the rest is applied");
        assert_eq!(now.cache.capacity.as_u64(), 64 * 1024 * 1024);
    }

    #[test]
    fn limits_are_applied_and_a_new_limited_route_is_named() {
        let live = LiveConfig::new(config(&format!("{A}queue = \"own\"\n")));
        let done = live.replace(config(&format!("{A}queue = \"own\"\nmax_renders = 2\n")));
        assert_eq!(done.kept.len(), 1, "{:?}", done.kept);
        assert!(done.kept[0].starts_with("fragment[].max_renders"));
        assert_eq!(
            live.load().route("a").unwrap().max_renders,
            2,
            "held at once"
        );
        let done = live.replace(config(&format!("{A}queue = \"own\"\nmax_renders = 5\n")));
        assert!(done.kept.is_empty(), "a limit changed needs no restart");
    }

    #[test]
    fn a_route_on_a_new_queue_is_named() {
        let live = LiveConfig::new(config(A));
        let done = live.replace(config(&format!("{A}{B}queue = \"other\"\n")));
        assert_eq!(done.kept.len(), 1);
        assert!(done.kept[0].starts_with("fragment[].queue"));
    }
}
