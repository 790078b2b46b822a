//! The configuration file shared by gateways and workers.
//!
//! One TOML file describes a deployment; every process reads the same one. Loading is a
//! single step ([`Config::load`]): parse the file (if any), apply the `TESSERA_*`
//! environment overrides, then validate everything, so that a process either starts with a
//! configuration it fully understands or exits naming the key that is wrong.
//!
//! Durations are written the human way (`"250ms"`, `"10s"`, `"10m"`), sizes too
//! (`"64MiB"`). Unknown keys are errors: a misspelt `max_atempts` must not silently fall
//! back to a default.
//!
//! # Layout
//! - `schema`: the typed sections ([`GatewayConfig`], [`FragmentRoute`], [`Backend`], …)
//!   with their defaults.
//! - `file`: the file as written and its conversion into a [`Config`].
//! - [`env`](mod@env): the `TESSERA_*` names and what they override.
//! - `validate`: the rules checked at load, and [`ConfigError`].
//! - `queues`: broker queue names ([`default_queue`], [`background_queue`]).

use std::path::{Path, PathBuf};

pub use bytesize::ByteSize;
pub use ipnet::IpNet;

pub mod env;
mod file;
mod queues;
mod schema;
mod validate;

pub use queues::{background_queue, default_queue, limited_queue};
pub use schema::{
    AccessLogConfig, AccessLogFormat, AmqpUrl, Backend, BusConfig, CacheConfig, FragmentRoute,
    GatewayConfig, HttpConfig, LEASE_SLACK, LogConfig, MAX_CONNECTIONS_LIMIT, MAX_NAMESPACE,
    MAX_RENDERS, MAX_RENDERS_PER_SECOND, MAX_ROUTE_NAME, MAX_THREADS, MemcachedServer, OtelConfig,
    QueueType, RENDER_TOKEN_HEADER, StoreConfig, UpstreamConfig, UpstreamUrl, VarySource,
    WorkersConfig,
};
pub use validate::{ConfigError, admin_listener, is_param_name, is_route_name};

use file::ConfigFile;

/// The whole configuration, parsed and validated: what every process works from.
///
/// Only [`Config::load`] and [`Config::from_sources`] make one from a file; code that
/// builds one by hand (tests, the demo) starts from [`Config::default`] and calls
/// [`Config::validate`] after changing it.
#[derive(Debug, Clone, Default)]
pub struct Config {
    /// The HTTP front: listeners and fragment endpoint.
    pub gateway: GatewayConfig,
    /// Connection limits and timeouts of every listener.
    pub http: HttpConfig,
    /// The web application Tessera fronts and renders fragments from.
    pub upstream: UpstreamConfig,
    /// L1: the in-process cache of each gateway.
    pub cache: CacheConfig,
    /// L2 settings shared by both stores (the servers are in [`Config::backend`]).
    pub store: StoreConfig,
    /// Broker settings (the broker's URL is in [`Config::backend`]).
    pub bus: BusConfig,
    /// Which store and bus run, resolved from `store.memcached` and `bus.amqp`.
    pub backend: Backend,
    /// Build capacity.
    pub workers: WorkersConfig,
    /// Fragment routes, in the file as `[[fragment]]` tables.
    pub fragments: Vec<FragmentRoute>,
    /// OpenTelemetry traces (off by default).
    pub otel: OtelConfig,
    /// The process's own log: its level.
    pub log: LogConfig,
    /// The gateway's access log (off by default).
    pub access_log: AccessLogConfig,
}

impl Config {
    /// Loads the deployment's configuration: `path`, else `$TESSERA_CONFIG`, else
    /// built-in defaults; then environment overrides; then validation.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        let from_env = std::env::var_os(env::CONFIG).map(PathBuf::from);
        let path = path.map(Path::to_path_buf).or(from_env);
        let text = match &path {
            Some(p) => Some(
                std::fs::read_to_string(p).map_err(|source| ConfigError::Read {
                    path: p.clone(),
                    source,
                })?,
            ),
            None => None,
        };
        let name = path.map_or_else(|| "<defaults>".to_string(), |p| p.display().to_string());
        Self::from_sources(&name, text.as_deref(), |k| std::env::var(k).ok())
    }

    /// Parses `toml` (or defaults when `None`), applies overrides from `env`, validates.
    /// `env` is a lookup so tests need not touch the process environment.
    pub fn from_sources(
        name: &str,
        toml: Option<&str>,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        let mut file: ConfigFile = match toml {
            Some(text) => toml::from_str(text).map_err(|e| ConfigError::Parse {
                path: name.to_string(),
                message: e.to_string(),
            })?,
            None => ConfigFile::default(),
        };
        file.apply(env::Overrides::read(env));
        file.resolve()
    }

    /// Parses and validates a TOML string without looking at the environment.
    pub fn from_toml(text: &str) -> Result<Config, ConfigError> {
        Self::from_sources("<inline>", Some(text), |_| None)
    }

    /// The route called `name`.
    pub fn route(&self, name: &str) -> Option<&FragmentRoute> {
        self.fragments.iter().find(|r| r.name == name)
    }

    /// True when the memory store and in-process bus are used.
    pub fn is_embedded(&self) -> bool {
        self.backend == Backend::Embedded
    }
}

/// What the unit tests of every part of the loader share.
#[cfg(test)]
mod test_support {
    use super::{Config, ConfigError};

    pub(super) fn err(toml: &str) -> String {
        match Config::from_toml(toml) {
            Ok(_) => panic!("config was accepted:\n{toml}"),
            Err(e) => e.to_string(),
        }
    }

    pub(super) const ROUTE: &str = "[[fragment]]\nname = \"recs\"\nrender = \"/_render/recs\"\n";

    /// The message of the first problem in `toml` (a route table is not added).
    pub(super) fn key_of(toml: &str) -> String {
        match Config::from_toml(toml) {
            Ok(_) => panic!("config was accepted:\n{toml}"),
            Err(ConfigError::Invalid { key, .. }) => key,
            Err(e) => panic!("not a validation error: {e}"),
        }
    }

    /// A config with one route whose extra keys are `keys`.
    pub(super) fn route_with(keys: &str) -> Result<Config, ConfigError> {
        Config::from_toml(&format!("{ROUTE}{keys}\n"))
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::time::Duration;

    use super::*;

    #[test]
    fn defaults_need_no_file() {
        let c = Config::from_sources("<defaults>", None, |_| None).unwrap();
        assert_eq!(c.gateway.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(c.gateway.admin_listen.to_string(), "127.0.0.1:9090");
        assert_eq!(c.workers.admin_listen.to_string(), "127.0.0.1:9091");
        assert!(c.is_embedded());
        assert_eq!(c.workers.embedded, 4);
        assert_eq!(c.cache.capacity, ByteSize::mib(64));
        assert_eq!(c.store.timeout, Duration::from_millis(250));
    }

    #[test]
    fn design_example_parses() {
        let c = Config::from_toml(
            r#"
[gateway]
listen = "127.0.0.1:8080"
admin_listen = "127.0.0.1:9090"
admin_token = ""
fragment_prefix = "/fragments/"
max_wait = "30s"
[upstream]
url = "http://127.0.0.1:3000"
timeout = "30s"
[cache]
capacity = "64MiB"
ttl = "2s"
[store]
memcached = ["127.0.0.1:11211"]
namespace = "tessera"
timeout = "250ms"
max_item_size = "1023KiB"
eject_after = 3
probe_interval = "1s"
flush_on_return = true
[bus]
amqp = "amqp://guest:guest@127.0.0.1:5672/%2f"
[workers]
embedded = 4
concurrency = 16
admin_listen = "127.0.0.1:9091"
admin_token = ""
[[fragment]]
name = "recommendations"
render = "/_render/recommendations"
params = ["user_id", "limit"]
vary = ["cookie:session_id", "header:accept-language"]
fresh = "60s"
stale = "10m"
failed_ttl = "5s"
build_timeout = "10s"
max_attempts = 4
placeholder = '<div class="tessera-loading">Loading…</div>'
queue = "tessera.build"
"#,
        )
        .unwrap();
        let r = c.route("recommendations").unwrap();
        assert_eq!(r.stale, Duration::from_secs(600));
        assert_eq!(
            r.vary,
            vec![
                VarySource::Cookie("session_id".into()),
                VarySource::Header("accept-language".into())
            ]
        );
        assert_eq!(c.store.max_item_size, ByteSize::kib(1023));
        assert!(!c.is_embedded());
        assert_eq!(c.bus.queue_expiry, None, "queues never expire unless asked");
        let c = Config::from_toml("[bus]\nqueue_expiry = \"10m\"").unwrap();
        assert_eq!(c.bus.queue_expiry, Some(Duration::from_secs(600)));
        assert_eq!(c.bus.queue_type, QueueType::Classic, "classic unless asked");
        let c = Config::from_toml("[bus]\nqueue_type = \"quorum\"").unwrap();
        assert_eq!(c.bus.queue_type, QueueType::Quorum);
        let e = Config::from_toml("[bus]\nqueue_type = \"stream\"").unwrap_err();
        assert!(
            e.to_string().contains("queue_type") && e.to_string().contains("quorum"),
            "{e}"
        );
    }

    #[test]
    fn every_section_has_its_documented_defaults() {
        let c = Config::from_toml("").unwrap();
        assert_eq!(c.gateway.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(c.gateway.admin_listen.to_string(), "127.0.0.1:9090");
        assert_eq!(c.gateway.admin_token, "");
        assert_eq!(c.gateway.fragment_prefix, "/fragments/");
        assert_eq!(c.gateway.max_wait, Duration::from_secs(30));
        let cores = std::thread::available_parallelism().unwrap().get();
        assert_eq!(c.gateway.threads, cores);
        // 0: the process's runtime serves the public listener.
        let shared = Config::from_toml("[gateway]\nthreads = 0").unwrap();
        assert_eq!(shared.gateway.threads, 0);
        assert_eq!(c.upstream.url.as_str(), "http://127.0.0.1:3000");
        assert_eq!(c.upstream.timeout, Duration::from_secs(30));
        assert_eq!(c.cache.capacity, ByteSize::mib(64));
        assert_eq!(c.cache.ttl, Duration::from_secs(2));
        assert_eq!(c.store.namespace, "tessera");
        assert_eq!(c.store.timeout, Duration::from_millis(250));
        assert_eq!(c.store.max_item_size, ByteSize::kib(1023));
        assert_eq!(c.store.memory_capacity, ByteSize::mib(256));
        assert_eq!(c.store.eject_after, 3);
        assert_eq!(c.store.probe_interval, Duration::from_secs(1));
        assert!(c.store.flush_on_return);
        assert_eq!(c.bus.queue_expiry, None);
        assert_eq!(c.backend, Backend::Embedded);
        assert_eq!(c.workers.embedded, 4);
        assert_eq!(c.workers.concurrency, 16);
        assert_eq!(c.workers.admin_listen.to_string(), "127.0.0.1:9091");
        assert_eq!(c.workers.admin_token, "");
        assert!(c.fragments.is_empty());
        assert_eq!(c.queues(), vec!["tessera.build"]);
        assert!(c.validate().is_ok());
    }

    #[test]
    fn a_file_that_cannot_be_read_or_parsed_is_named() {
        let missing = Path::new("/nonexistent/tessera.toml");
        let e = Config::load(Some(missing)).unwrap_err();
        assert!(matches!(e, ConfigError::Read { .. }), "{e}");
        assert!(e.to_string().contains("/nonexistent/tessera.toml"), "{e}");
        let e = Config::from_sources("site.toml", Some("[cache"), |_| None).unwrap_err();
        assert!(matches!(e, ConfigError::Parse { .. }), "{e}");
        assert!(e.to_string().starts_with("config file site.toml: "), "{e}");
        let e = Config::from_toml("[bus]\nqueue_expiry = \"later\"").unwrap_err();
        assert!(e.to_string().contains("queue_expiry"), "{e}");
    }
}
