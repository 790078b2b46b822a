//! Names of the environment variables that override the file, in one place, and the
//! overrides they make: a `TESSERA_*` variable that is set beats the file's key.

use super::file::AmqpNodesFile;

/// Path of the TOML file, when `--config` is not given.
pub const CONFIG: &str = "TESSERA_CONFIG";
/// Overrides `gateway.listen`.
pub const LISTEN: &str = "TESSERA_LISTEN";
/// Overrides `upstream.url`.
pub const UPSTREAM_URL: &str = "TESSERA_UPSTREAM_URL";
/// Overrides `store.memcached`, comma-separated `host:port` list.
pub const MEMCACHED: &str = "TESSERA_MEMCACHED";
/// Overrides `bus.amqp`: one URL, or the nodes of a cluster comma-separated (a comma in a
/// password is written `%2C`).
pub const AMQP_URL: &str = "TESSERA_AMQP_URL";
/// Overrides `gateway.admin_listen`.
pub const ADMIN_LISTEN: &str = "TESSERA_ADMIN_LISTEN";
/// Overrides `gateway.admin_token` and `workers.admin_token`.
pub const ADMIN_TOKEN: &str = "TESSERA_ADMIN_TOKEN";
/// Overrides `workers.render_token`; blank means none.
pub const RENDER_TOKEN: &str = "TESSERA_RENDER_TOKEN";
/// `json` for one JSON object per log line.
pub const LOG_FORMAT: &str = "TESSERA_LOG_FORMAT";
/// `otel.endpoint` (OpenTelemetry's own variable): the OTLP collector's base URL.
pub const OTEL_ENDPOINT: &str = "OTEL_EXPORTER_OTLP_ENDPOINT";
/// `otel.service_name` (OpenTelemetry's own variable).
pub const OTEL_SERVICE_NAME: &str = "OTEL_SERVICE_NAME";

/// What the environment replaces in the file, read through a lookup (the process
/// environment, or a test's own) and still text, as the file's values are before their
/// conversion.
#[derive(Debug)]
pub(super) struct Overrides {
    /// [`LISTEN`]: `gateway.listen`.
    pub listen: Option<String>,
    /// [`UPSTREAM_URL`]: `upstream.url`.
    pub upstream_url: Option<String>,
    /// [`MEMCACHED`]: `store.memcached`, split at commas, blank entries dropped (a blank
    /// value leaves no server).
    pub memcached: Option<Vec<String>>,
    /// [`AMQP_URL`]: `bus.amqp`, split at commas, blank entries dropped (one entry is
    /// one URL, as a file's string); `Some(None)` when set but blank, which means no
    /// broker.
    pub amqp: Option<Option<AmqpNodesFile>>,
    /// [`ADMIN_LISTEN`]: `gateway.admin_listen`.
    pub admin_listen: Option<String>,
    /// [`ADMIN_TOKEN`]: `gateway.admin_token` and `workers.admin_token`.
    pub admin_token: Option<String>,
    /// [`RENDER_TOKEN`]: `workers.render_token`, trimmed (a blank value sends none).
    pub render_token: Option<String>,
    /// [`OTEL_ENDPOINT`]: `otel.endpoint`, trimmed.
    pub otel_endpoint: Option<String>,
    /// [`OTEL_SERVICE_NAME`]: `otel.service_name`, trimmed.
    pub otel_service_name: Option<String>,
}

impl Overrides {
    /// Reads every override through `env`.
    pub(super) fn read(env: impl Fn(&str) -> Option<String>) -> Self {
        Self {
            listen: env(LISTEN),
            upstream_url: env(UPSTREAM_URL),
            memcached: env(MEMCACHED).map(|v| {
                v.split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(String::from)
                    .collect()
            }),
            amqp: env(AMQP_URL).map(|v| {
                let mut urls: Vec<String> = v
                    .split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(String::from)
                    .collect();
                match urls.len() {
                    0 => None,
                    1 => urls.pop().map(AmqpNodesFile::One),
                    _ => Some(AmqpNodesFile::Many(urls)),
                }
            }),
            admin_listen: env(ADMIN_LISTEN),
            admin_token: env(ADMIN_TOKEN),
            render_token: env(RENDER_TOKEN).map(|v| v.trim().to_string()),
            otel_endpoint: env(OTEL_ENDPOINT).map(|v| v.trim().to_string()),
            otel_service_name: env(OTEL_SERVICE_NAME).map(|v| v.trim().to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::config::{Backend, Config, env};

    #[test]
    fn env_overrides_file() {
        let c = Config::from_sources(
            "t",
            Some("[gateway]\nlisten = \"127.0.0.1:1\"\n"),
            |k| match k {
                env::LISTEN => Some("127.0.0.1:2".into()),
                env::MEMCACHED => Some("127.0.0.1:11211, 127.0.0.1:11212".into()),
                env::AMQP_URL => Some("amqp://127.0.0.1".into()),
                env::ADMIN_TOKEN => Some("s3cret".into()),
                env::ADMIN_LISTEN => Some("127.0.0.1:3".into()),
                _ => None,
            },
        )
        .unwrap();
        assert_eq!(c.gateway.listen.to_string(), "127.0.0.1:2");
        assert_eq!(c.gateway.admin_token, "s3cret");
        assert_eq!(c.workers.admin_token, "s3cret");
        assert_eq!(c.gateway.admin_listen.to_string(), "127.0.0.1:3");
        let servers: Vec<String> = c
            .backend
            .memcached()
            .unwrap()
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(servers, vec!["127.0.0.1:11211", "127.0.0.1:11212"]);
        assert_eq!(c.backend.amqp().unwrap()[0].as_str(), "amqp://127.0.0.1");
    }

    #[test]
    fn env_overrides_reach_every_key_they_name() {
        let c = Config::from_sources("t", None, |k| match k {
            env::UPSTREAM_URL => Some("http://app:4000".into()),
            env::MEMCACHED => Some(" , h:1,,".into()),
            env::AMQP_URL => Some("  ".into()),
            _ => None,
        })
        .unwrap();
        assert_eq!(c.upstream.url.as_str(), "http://app:4000");
        assert_eq!(
            c.backend,
            Backend::Memcached {
                servers: vec!["h:1".parse().unwrap()]
            },
            "an empty TESSERA_AMQP_URL means no broker"
        );
        let e = Config::from_sources("t", Some("[bus]\namqp = \"amqp://b\""), |k| {
            (k == env::MEMCACHED).then(|| " ".to_string())
        })
        .unwrap_err();
        assert!(e.to_string().contains("`store.memcached`"), "{e}");
    }
}
