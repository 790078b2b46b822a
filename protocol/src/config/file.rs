//! The file as written, before its URLs and addresses are parsed: what serde reads and
//! what the `TESSERA_*` overrides replace. Kept private so that nothing downstream ever
//! sees an unparsed value; [`ConfigFile::resolve`] turns it into a [`Config`].

use std::time::Duration;

use bytesize::ByteSize;
use ipnet::IpNet;
use serde::{Deserialize, Deserializer};

use super::Config;
use super::env::Overrides;
use super::queues::{default_queue, limited_queue};
use super::schema::{
    AccessLogConfig, AmqpUrl, Backend, BusConfig, CacheConfig, FragmentRoute, GatewayConfig,
    HttpConfig, LogConfig, MemcachedServer, OtelConfig, QueueType, StoreConfig, UpstreamConfig,
    UpstreamUrl, WorkersConfig, duration,
};
use super::validate::{ConfigError, invalid, parse_addr};

/// The whole file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct ConfigFile {
    pub gateway: GatewayFile,
    pub http: HttpConfig,
    pub upstream: UpstreamFile,
    pub cache: CacheConfig,
    pub store: StoreFile,
    pub bus: BusFile,
    pub workers: WorkersFile,
    #[serde(rename = "fragment")]
    pub fragments: Vec<FragmentRoute>,
    pub otel: OtelConfig,
    pub log: LogConfig,
    pub access_log: AccessLogConfig,
}

/// `[gateway]` as written; see [`super::GatewayConfig`].
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct GatewayFile {
    /// `host:port` text, parsed by [`GatewayFile::resolve`].
    pub listen: String,
    /// `host:port` text, parsed by [`GatewayFile::resolve`].
    pub admin_listen: String,
    pub admin_token: String,
    pub fragment_prefix: String,
    #[serde(deserialize_with = "duration")]
    pub max_wait: Duration,
    #[serde(deserialize_with = "ip_nets")]
    pub trusted_proxies: Vec<IpNet>,
    pub compress: bool,
    pub max_streams: usize,
    pub threads: usize,
    pub public_render_paths: bool,
}

impl Default for GatewayFile {
    fn default() -> Self {
        let d = GatewayConfig::default();
        Self {
            listen: d.listen.to_string(),
            admin_listen: d.admin_listen.to_string(),
            admin_token: d.admin_token,
            fragment_prefix: d.fragment_prefix,
            max_wait: d.max_wait,
            trusted_proxies: d.trusted_proxies,
            compress: d.compress,
            max_streams: d.max_streams,
            threads: d.threads,
            public_render_paths: d.public_render_paths,
        }
    }
}

/// `[upstream]` as written; see [`super::UpstreamConfig`].
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct UpstreamFile {
    pub url: String,
    #[serde(deserialize_with = "duration")]
    pub timeout: Duration,
}

impl Default for UpstreamFile {
    fn default() -> Self {
        let d = UpstreamConfig::default();
        Self {
            url: d.url.as_str().to_string(),
            timeout: d.timeout,
        }
    }
}

/// `[store]` as written; see [`super::StoreConfig`].
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct StoreFile {
    /// memcached servers as `host:port`. Empty: the embedded memory store.
    pub memcached: Vec<String>,
    pub namespace: String,
    #[serde(deserialize_with = "duration")]
    pub timeout: Duration,
    pub max_item_size: ByteSize,
    pub memory_capacity: ByteSize,
    pub eject_after: u32,
    #[serde(deserialize_with = "duration")]
    pub probe_interval: Duration,
    pub flush_on_return: bool,
}

impl Default for StoreFile {
    fn default() -> Self {
        let d = StoreConfig::default();
        Self {
            memcached: Vec::new(),
            namespace: d.namespace,
            timeout: d.timeout,
            max_item_size: d.max_item_size,
            memory_capacity: d.memory_capacity,
            eject_after: d.eject_after,
            probe_interval: d.probe_interval,
            flush_on_return: d.flush_on_return,
        }
    }
}

/// `[bus]` as written; see [`super::BusConfig`].
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct BusFile {
    /// AMQP URL of the broker, or of each node of a cluster. Absent: the embedded
    /// in-process bus.
    pub amqp: Option<AmqpNodesFile>,
    #[serde(default, deserialize_with = "optional_duration")]
    pub queue_expiry: Option<Duration>,
    pub queue_type: QueueType,
}

/// `bus.amqp` as written: one URL (`"amqp://…"`), or a list of them, one per node of a
/// cluster. A problem with a single URL names `bus.amqp`, one in a list `bus.amqp[i]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum AmqpNodesFile {
    /// One URL, as `bus.amqp` always took.
    One(String),
    /// A list, in the order processes try the nodes.
    Many(Vec<String>),
}

impl<'de> Deserialize<'de> for AmqpNodesFile {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Nodes;
        impl<'de> serde::de::Visitor<'de> for Nodes {
            type Value = AmqpNodesFile;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("an AMQP URL, or a list of them (one per node of a cluster)")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(AmqpNodesFile::One(v.to_string()))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<Self::Value, A::Error> {
                let mut urls = Vec::new();
                while let Some(url) = seq.next_element::<String>()? {
                    urls.push(url);
                }
                Ok(AmqpNodesFile::Many(urls))
            }
        }
        d.deserialize_any(Nodes)
    }
}

impl AmqpNodesFile {
    /// Parses every URL; at least one, none twice.
    fn resolve(self) -> Result<Vec<AmqpUrl>, ConfigError> {
        let urls = match self {
            AmqpNodesFile::One(url) => {
                return Ok(vec![
                    url.parse()
                        .map_err(|problem| invalid("bus.amqp", problem))?,
                ]);
            }
            AmqpNodesFile::Many(urls) => urls,
        };
        if urls.is_empty() {
            return Err(invalid(
                "bus.amqp",
                "lists no node: give at least one AMQP URL, or leave `bus.amqp` out for the embedded bus",
            ));
        }
        let mut nodes: Vec<AmqpUrl> = Vec::with_capacity(urls.len());
        for (i, url) in urls.iter().enumerate() {
            let node: AmqpUrl = url
                .parse()
                .map_err(|problem| invalid(format!("bus.amqp[{i}]"), problem))?;
            if let Some(first) = nodes.iter().position(|n| *n == node) {
                return Err(invalid(
                    format!("bus.amqp[{i}]"),
                    format!("names the same node as bus.amqp[{first}]"),
                ));
            }
            nodes.push(node);
        }
        Ok(nodes)
    }
}

/// `[workers]` as written; see [`super::WorkersConfig`].
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct WorkersFile {
    pub embedded: usize,
    pub concurrency: usize,
    /// `host:port` text, parsed by [`WorkersFile::resolve`].
    pub admin_listen: String,
    pub admin_token: String,
    pub render_token: String,
}

impl Default for WorkersFile {
    fn default() -> Self {
        let d = WorkersConfig::default();
        Self {
            embedded: d.embedded,
            concurrency: d.concurrency,
            admin_listen: d.admin_listen.to_string(),
            admin_token: d.admin_token,
            render_token: d.render_token,
        }
    }
}

/// A list of addresses (`"10.0.0.7"`, one host) and CIDR networks (`"10.0.0.0/8"`).
fn ip_nets<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<IpNet>, D::Error> {
    Vec::<String>::deserialize(d)?
        .iter()
        .map(|s| {
            s.parse::<IpNet>()
                .or_else(|_| s.parse::<std::net::IpAddr>().map(IpNet::from))
                .map_err(|_| {
                    serde::de::Error::custom(format!(
                        "{s:?} is neither an IP address nor a CIDR network, e.g. \"10.0.0.0/8\""
                    ))
                })
        })
        .collect()
}

fn optional_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    duration(d).map(Some)
}

impl ConfigFile {
    /// Replaces what the environment overrides.
    pub(super) fn apply(&mut self, overrides: Overrides) {
        if let Some(v) = overrides.listen {
            self.gateway.listen = v;
        }
        if let Some(v) = overrides.upstream_url {
            self.upstream.url = v;
        }
        if let Some(v) = overrides.memcached {
            self.store.memcached = v;
        }
        if let Some(v) = overrides.amqp {
            self.bus.amqp = v;
        }
        if let Some(v) = overrides.admin_listen {
            self.gateway.admin_listen = v;
        }
        if let Some(v) = overrides.admin_token {
            self.workers.admin_token.clone_from(&v);
            self.gateway.admin_token = v;
        }
        if let Some(v) = overrides.render_token {
            self.workers.render_token = v;
        }
        if let Some(v) = overrides.otel_endpoint {
            self.otel.endpoint = v;
        }
        if let Some(v) = overrides.otel_service_name {
            self.otel.service_name = v;
        }
    }

    /// Parses what is still text and checks every rule, section by section in file order,
    /// so the first problem reported is the first one in the file's order.
    pub(super) fn resolve(self) -> Result<Config, ConfigError> {
        let gateway = self.gateway.resolve()?;
        self.http.validate()?;
        let url = self
            .upstream
            .url
            .parse::<UpstreamUrl>()
            .map_err(|problem| invalid("upstream.url", problem))?;
        let upstream = UpstreamConfig {
            url,
            timeout: self.upstream.timeout,
        };
        upstream.validate()?;
        self.cache.validate()?;
        self.log.validate()?;
        self.access_log.validate()?;
        let servers = self
            .store
            .memcached
            .iter()
            .enumerate()
            .map(|(i, s)| {
                s.parse::<MemcachedServer>()
                    .map_err(|problem| invalid(format!("store.memcached[{i}]"), problem))
            })
            .collect::<Result<Vec<MemcachedServer>, _>>()?;
        let store = StoreConfig {
            namespace: self.store.namespace,
            timeout: self.store.timeout,
            max_item_size: self.store.max_item_size,
            memory_capacity: self.store.memory_capacity,
            eject_after: self.store.eject_after,
            probe_interval: self.store.probe_interval,
            flush_on_return: self.store.flush_on_return,
        };
        store.validate()?;
        let amqp = self.bus.amqp.map(AmqpNodesFile::resolve).transpose()?;
        let backend = Backend::resolve(servers, amqp)?;
        let workers = self.workers.resolve(&backend)?;
        let fragments = with_default_queues(self.fragments, &store.namespace);
        let config = Config {
            gateway,
            http: self.http,
            upstream,
            cache: self.cache,
            store,
            bus: BusConfig {
                queue_expiry: self.bus.queue_expiry,
                queue_type: self.bus.queue_type,
            },
            backend,
            workers,
            fragments,
            otel: self.otel,
            log: self.log,
            access_log: self.access_log,
        };
        config.otel.validate()?;
        config.validate_routes()?;
        config.validate_listeners()?;
        Ok(config)
    }
}

impl GatewayFile {
    /// Parses both addresses, then checks the rest: the order the keys were always checked in.
    fn resolve(self) -> Result<GatewayConfig, ConfigError> {
        let gateway = GatewayConfig {
            listen: parse_addr("gateway.listen", &self.listen)?,
            admin_listen: parse_addr("gateway.admin_listen", &self.admin_listen)?,
            admin_token: self.admin_token,
            fragment_prefix: self.fragment_prefix,
            max_wait: self.max_wait,
            trusted_proxies: self.trusted_proxies,
            compress: self.compress,
            max_streams: self.max_streams,
            threads: self.threads,
            public_render_paths: self.public_render_paths,
        };
        gateway.validate()?;
        Ok(gateway)
    }
}

impl WorkersFile {
    /// Parses `admin_listen` after the build-capacity rules and before the rest, the order
    /// the keys were always checked in, so the first problem reported stays the same.
    fn resolve(self, backend: &Backend) -> Result<WorkersConfig, ConfigError> {
        WorkersConfig::validate_capacity(backend, self.embedded, self.concurrency)?;
        let workers = WorkersConfig {
            embedded: self.embedded,
            concurrency: self.concurrency,
            admin_listen: parse_addr("workers.admin_listen", &self.admin_listen)?,
            admin_token: self.admin_token,
            render_token: self.render_token,
        };
        workers.validate(backend)?;
        Ok(workers)
    }
}

/// Gives each route that names no queue its namespace's [`default_queue`], or, when its
/// renders are limited, a [`limited_queue`] of its own.
fn with_default_queues(mut routes: Vec<FragmentRoute>, namespace: &str) -> Vec<FragmentRoute> {
    for r in routes.iter_mut().filter(|r| r.queue.is_empty()) {
        r.queue = if r.limited() {
            limited_queue(namespace, &r.name)
        } else {
            default_queue(namespace)
        };
    }
    routes
}

#[cfg(test)]
mod tests {
    use crate::config::test_support::{err, key_of};
    use crate::config::{Config, env};

    #[test]
    fn addresses_are_parsed_where_they_were_always_checked() {
        for (toml, key) in [
            (
                "[gateway]\nlisten = \"x\"\nadmin_listen = \"y\"",
                "gateway.listen",
            ),
            (
                "[gateway]\nadmin_listen = \"y\"\nfragment_prefix = \"f\"",
                "gateway.admin_listen",
            ),
            (
                "[workers]\nembedded = 0\nadmin_listen = \"x\"",
                "workers.embedded",
            ),
            (
                "[workers]\nconcurrency = 0\nadmin_listen = \"x\"",
                "workers.concurrency",
            ),
            (
                "[workers]\nembedded = 70000\nadmin_listen = \"x\"",
                "workers.admin_listen",
            ),
        ] {
            let msg = err(toml);
            assert!(msg.contains(&format!("`{key}`")), "{toml:?} gave {msg:?}");
        }
    }

    #[test]
    fn parse_errors_name_the_key() {
        for (toml, needle) in [
            ("[cache]\nttl = \"soon\"", "ttl"),
            ("[cache]\ncapacity = \"lots\"", "capacity"),
            ("[gateway]\nlisten_port = 1", "listen_port"),
            ("[[fragment]]\nname = \"a\"", "render"),
            (
                "[[fragment]]\nname = \"a\"\nrender = \"/r\"\nvary = [\"query:x\"]",
                "vary",
            ),
            (
                "[[fragment]]\nname = \"a\"\nrender = \"/r\"\nmax_atempts = 3",
                "max_atempts",
            ),
        ] {
            let msg = err(toml);
            assert!(msg.contains(needle), "{toml:?} gave {msg:?}");
        }
    }

    #[test]
    fn trusted_proxies_are_addresses_or_networks() {
        let c = Config::from_toml(
            "[gateway]\ntrusted_proxies = [\"10.0.0.0/8\", \"192.0.2.7\", \"2001:db8::/32\", \"::1\"]",
        )
        .unwrap();
        let trusted = |ip: &str| {
            let ip: std::net::IpAddr = ip.parse().unwrap();
            c.gateway.trusted_proxies.iter().any(|n| n.contains(&ip))
        };
        assert!(trusted("10.1.2.3") && trusted("192.0.2.7") && trusted("2001:db8::9"));
        assert!(trusted("::1"));
        assert!(!trusted("192.0.2.8") && !trusted("11.0.0.1"));
        assert!(Config::default().gateway.trusted_proxies.is_empty());
        let msg = err("[gateway]\ntrusted_proxies = [\"10.0.0/8\"]");
        assert!(
            msg.contains("trusted_proxies") && msg.contains("10.0.0/8"),
            "{msg}"
        );
    }

    const MEMCACHED: &str = "[store]\nmemcached = [\"h:1\"]\n[workers]\nembedded = 0\n";

    fn nodes(c: &Config) -> Vec<&str> {
        c.backend
            .amqp()
            .unwrap()
            .iter()
            .map(|u| u.as_str())
            .collect()
    }

    /// `bus.amqp` takes one URL, as it always did, or a cluster's nodes as a list, kept
    /// in the order written (the order processes try them in).
    #[test]
    fn amqp_takes_one_url_or_a_list_of_nodes() {
        let one = Config::from_toml(&format!("{MEMCACHED}[bus]\namqp = \"amqp://a/%2f\"")).unwrap();
        assert_eq!(nodes(&one), ["amqp://a/%2f"]);
        let three = Config::from_toml(&format!(
            "{MEMCACHED}[bus]\namqp = [\"amqp://c:5673\", \"amqp://a:5671\", \"amqps://b\"]"
        ))
        .unwrap();
        assert_eq!(
            nodes(&three),
            ["amqp://c:5673", "amqp://a:5671", "amqps://b"]
        );
        for (bus, key) in [
            ("amqp = []", "bus.amqp"),
            ("amqp = \"http://a\"", "bus.amqp"),
            ("amqp = [\"amqp://a\", \"http://b\"]", "bus.amqp[1]"),
            ("amqp = [\"amqp://a\", \"amqp://b:0\"]", "bus.amqp[1]"),
            (
                "amqp = [\"amqp://a\", \"amqp://b\", \"amqp://a\"]",
                "bus.amqp[2]",
            ),
        ] {
            assert_eq!(key_of(&format!("{MEMCACHED}[bus]\n{bus}")), key, "{bus}");
        }
        let msg = err(&format!("{MEMCACHED}[bus]\namqp = []"));
        assert!(msg.contains("at least one"), "{msg}");
        let msg = err(&format!(
            "{MEMCACHED}[bus]\namqp = [\"amqp://a\", \"amqp://a\"]"
        ));
        assert!(msg.contains("same node as bus.amqp[0]"), "{msg}");
        let msg = err("[bus]\namqp = 5");
        assert!(msg.contains("a list of them"), "{msg}");
    }

    /// `TESSERA_AMQP_URL` takes the nodes comma-separated, as `TESSERA_MEMCACHED` does.
    #[test]
    fn the_amqp_override_takes_nodes_comma_separated() {
        let with = |value: &'static str| {
            Config::from_sources("t", Some(MEMCACHED), move |k| {
                (k == env::AMQP_URL).then(|| value.to_string())
            })
        };
        let c = with(" amqp://a:5701 ,amqp://a:5702,, amqp://a:5703").unwrap();
        assert_eq!(
            nodes(&c),
            ["amqp://a:5701", "amqp://a:5702", "amqp://a:5703"]
        );
        assert_eq!(nodes(&with("amqp://one").unwrap()), ["amqp://one"]);
        let e = with("amqp://a,ftp://b").unwrap_err();
        assert!(e.to_string().contains("`bus.amqp[1]`"), "{e}");
        let e = with("ftp://b").unwrap_err();
        assert!(e.to_string().contains("`bus.amqp`"), "{e}");
    }
}
