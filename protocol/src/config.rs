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

use std::collections::HashSet;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use bytesize::ByteSize;
pub use ipnet::IpNet;
use serde::{Deserialize, Deserializer};

/// Names of the environment variables that override the file, in one place.
pub mod env {
    /// Path of the TOML file, when `--config` is not given.
    pub const CONFIG: &str = "TESSERA_CONFIG";
    /// Overrides `gateway.listen`.
    pub const LISTEN: &str = "TESSERA_LISTEN";
    /// Overrides `upstream.url`.
    pub const UPSTREAM_URL: &str = "TESSERA_UPSTREAM_URL";
    /// Overrides `store.memcached`, comma-separated `host:port` list.
    pub const MEMCACHED: &str = "TESSERA_MEMCACHED";
    /// Overrides `bus.amqp`.
    pub const AMQP_URL: &str = "TESSERA_AMQP_URL";
    /// Overrides `gateway.admin_listen`.
    pub const ADMIN_LISTEN: &str = "TESSERA_ADMIN_LISTEN";
    /// Overrides `gateway.admin_token` and `workers.admin_token`.
    pub const ADMIN_TOKEN: &str = "TESSERA_ADMIN_TOKEN";
    /// `json` for one JSON object per log line.
    pub const LOG_FORMAT: &str = "TESSERA_LOG_FORMAT";
}

/// Longest route name; keeps every store key far below memcached's 250 bytes.
pub const MAX_ROUTE_NAME: usize = 64;
/// Longest namespace.
pub const MAX_NAMESPACE: usize = 32;

/// Why a configuration was refused. The message always names the key at fault.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is not valid TOML or a value has the wrong type.
    #[error("config file {path}: {message}")]
    Parse {
        /// The file (or `<inline>`).
        path: String,
        /// toml's message, which names the key and shows the line.
        message: String,
    },
    /// A value parsed but makes no sense.
    #[error("config key `{key}`: {problem}")]
    Invalid {
        /// Dotted path of the key, e.g. `fragment[2].params`.
        key: String,
        /// What is wrong with it.
        problem: String,
    },
}

fn invalid(key: impl Into<String>, problem: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        problem: problem.into(),
    }
}

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
}

/// `[gateway]`
#[derive(Debug, Clone)]
pub struct GatewayConfig {
    /// Public listener. Default `127.0.0.1:8080`.
    pub listen: SocketAddr,
    /// Admin listener (metrics, health, dashboard, purge). Default `127.0.0.1:9090`.
    pub admin_listen: SocketAddr,
    /// Bearer token for the admin listener; required when it is not on loopback.
    pub admin_token: String,
    /// Path prefix of fragment endpoints. Default `/fragments/`.
    pub fragment_prefix: String,
    /// Cap on `Prefer: wait=N`. Default 30 s.
    pub max_wait: Duration,
    /// Peers whose forwarding headers (`Forwarded`, `X-Forwarded-*`, `X-Real-IP`) are
    /// believed and extended: the load balancers in front, as addresses or CIDR networks
    /// (`"10.0.0.0/8"`). Any other peer's are replaced, as a client can claim any
    /// address. Default none.
    pub trusted_proxies: Vec<IpNet>,
    /// Compress fragments, composed pages and the client script with `br` or `gzip` when
    /// the client accepts it (text, JSON, JavaScript, XML and SVG of 1 KiB or more). Turn
    /// off when a CDN in front compresses. Default true.
    pub compress: bool,
    /// Most push streams (`/_tessera/stream`) open at once; one more is answered 503 and
    /// the client script falls back to long-polls. Default 1,000.
    pub max_streams: usize,
    /// Threads serving the public listener, each with a single-threaded runtime and
    /// memcached connections of its own (threads beyond the cores share them), as
    /// nginx's worker processes: the least CPU per request. 0 serves it on the process's runtime instead, whose threads take work
    /// from each other: when the gateway shares its cores with busy neighbours (a broker
    /// on the same machine), a thread that is kept waiting then holds up none of its
    /// requests, for a shorter latency tail. At most [`MAX_THREADS`]. Default: one per
    /// core.
    pub threads: usize,
}

/// Most `gateway.threads`.
pub const MAX_THREADS: usize = 1024;

impl Default for GatewayConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            admin_listen: SocketAddr::from(([127, 0, 0, 1], 9090)),
            admin_token: String::new(),
            fragment_prefix: "/fragments/".into(),
            max_wait: Duration::from_secs(30),
            trusted_proxies: Vec::new(),
            compress: true,
            max_streams: 1_000,
            threads: std::thread::available_parallelism().map_or(1, std::num::NonZero::get),
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

/// `[http]` — how every listener (the gateway's public and admin ones, each
/// `tessera-worker`'s admin one) treats its connections. Each listener applies the limits
/// on its own; `max_connections` counts per listener.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// A new connection that sends no byte within this is closed. Default 10 s.
    #[serde(deserialize_with = "duration")]
    pub first_byte_timeout: Duration,
    /// A request head must be complete this long after its first byte (slow-loris guard);
    /// on a fresh connection this also bounds the protocol detection and the HTTP/2
    /// preface and settings exchange. Default 10 s.
    #[serde(deserialize_with = "duration")]
    pub header_timeout: Duration,
    /// A connection with no request in flight is closed after this (HTTP/1 keep-alive and
    /// HTTP/2 alike). Default 75 s, longer than the 60 s idle timeout of common load
    /// balancers, so that they close first.
    #[serde(deserialize_with = "duration")]
    pub idle_timeout: Duration,
    /// Most connections served at once; further clients wait in the listen backlog.
    /// Default 10,000.
    pub max_connections: usize,
    /// Largest request head (request line and headers; HTTP/2: the header list); larger
    /// ones are answered 431. Between 8KiB and 1MiB. Default 64 KiB.
    pub max_header_bytes: ByteSize,
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            first_byte_timeout: Duration::from_secs(10),
            header_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(75),
            max_connections: 10_000,
            max_header_bytes: ByteSize::kib(64),
        }
    }
}

/// Most connections a listener may be configured to hold.
pub const MAX_CONNECTIONS_LIMIT: usize = 1_000_000;

impl HttpConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        positive("http.first_byte_timeout", self.first_byte_timeout)?;
        positive("http.header_timeout", self.header_timeout)?;
        positive("http.idle_timeout", self.idle_timeout)?;
        if self.max_connections == 0 || self.max_connections > MAX_CONNECTIONS_LIMIT {
            return Err(invalid(
                "http.max_connections",
                format!("must be between 1 and {MAX_CONNECTIONS_LIMIT}"),
            ));
        }
        // hyper's HTTP/1 read buffer cannot be smaller than 8 KiB.
        if self.max_header_bytes < ByteSize::kib(8) || self.max_header_bytes > ByteSize::mib(1) {
            return Err(invalid(
                "http.max_header_bytes",
                "must be between 8KiB and 1MiB",
            ));
        }
        Ok(())
    }
}

/// `[upstream]`
#[derive(Debug, Clone)]
pub struct UpstreamConfig {
    /// Base URL, `http://host:port` (plain HTTP/1.1). Default `http://127.0.0.1:3000`.
    pub url: UpstreamUrl,
    /// Deadline for one proxied request or one render. Default 30 s.
    pub timeout: Duration,
}

impl Default for UpstreamConfig {
    fn default() -> Self {
        Self {
            url: UpstreamUrl::default(),
            timeout: Duration::from_secs(30),
        }
    }
}

/// `upstream.url`, parsed once: `http://host[:port]`, maybe with a path, never a query.
///
/// Kept as written too, since the render URL is that text (without a trailing `/`)
/// followed by the route's render path, exactly as before the value was typed.
#[derive(Clone, PartialEq, Eq)]
pub struct UpstreamUrl {
    uri: http::Uri,
    text: String,
}

/// The upstream of a configuration that names none.
const DEFAULT_UPSTREAM: &str = "http://127.0.0.1:3000";

impl UpstreamUrl {
    /// The parsed URL (scheme `http`, with a host).
    pub fn uri(&self) -> &http::Uri {
        &self.uri
    }

    /// The URL as written in the configuration.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// The URL without trailing `/`: a render path is appended to it.
    pub fn base(&self) -> &str {
        self.text.trim_end_matches('/')
    }
}

impl Default for UpstreamUrl {
    fn default() -> Self {
        Self {
            // A constant that parses (`UpstreamUrl::from_str` accepts it, see the tests).
            uri: http::Uri::from_static(DEFAULT_UPSTREAM),
            text: DEFAULT_UPSTREAM.into(),
        }
    }
}

impl std::str::FromStr for UpstreamUrl {
    /// The problem, without the key (the caller names it).
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let uri: http::Uri = s.parse().map_err(|e| format!("{s:?} is not a URL: {e}"))?;
        if uri.scheme_str() != Some("http") || uri.host().is_none() {
            return Err(format!("{s:?} must be http://host[:port] (plain HTTP/1.1)"));
        }
        if uri.query().is_some() {
            return Err("must not have a query string".into());
        }
        Ok(Self {
            uri,
            text: s.to_string(),
        })
    }
}

impl fmt::Display for UpstreamUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl fmt::Debug for UpstreamUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.text, f)
    }
}

/// `[cache]` — L1 inside each gateway.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CacheConfig {
    /// Byte budget (bodies plus keys). `0` disables L1. Default 64 MiB.
    pub capacity: ByteSize,
    /// Longest time an entry stays in L1; events evict sooner. Default 2 s.
    #[serde(deserialize_with = "duration")]
    pub ttl: Duration,
}

impl Default for CacheConfig {
    fn default() -> Self {
        Self {
            capacity: ByteSize::mib(64),
            ttl: Duration::from_secs(2),
        }
    }
}

/// `[store]` — L2. Its `memcached` servers are resolved into [`Config::backend`].
#[derive(Debug, Clone)]
pub struct StoreConfig {
    /// Prefix of every key, so several deployments can share servers. Default `tessera`.
    pub namespace: String,
    /// Deadline for one store call. Default 250 ms.
    pub timeout: Duration,
    /// Largest value stored (an envelope: a fragment with its headers). Bigger fragments
    /// fail their build. Keep it below memcached's `-I` by room for the item header and
    /// key: the default 1023 KiB fits memcached's default `-I 1m`.
    pub max_item_size: ByteSize,
    /// Byte budget of the embedded memory store (unused with memcached). Default 256 MiB.
    pub memory_capacity: ByteSize,
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            namespace: "tessera".into(),
            timeout: Duration::from_millis(250),
            max_item_size: ByteSize::kib(1023),
            memory_capacity: ByteSize::mib(256),
        }
    }
}

/// One memcached server, parsed once: `host:port` (a `memcache://` prefix is accepted).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemcachedServer {
    host: String,
    port: u16,
}

impl MemcachedServer {
    /// Host name or IP address (an IPv6 address keeps its brackets).
    pub fn host(&self) -> &str {
        &self.host
    }

    /// TCP port, never 0.
    pub fn port(&self) -> u16 {
        self.port
    }
}

impl std::str::FromStr for MemcachedServer {
    /// The problem, without the key (the caller names it).
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let host_port = s.strip_prefix("memcache://").unwrap_or(s);
        host_port
            .rsplit_once(':')
            .and_then(|(host, port)| {
                let port = port.parse::<u16>().ok().filter(|p| *p > 0)?;
                is_host(host).then(|| Self {
                    host: host.to_string(),
                    port,
                })
            })
            .ok_or_else(|| {
                format!(
                    "{s:?} must be host:port with a host name, an IPv4 address or an [IPv6] address, e.g. \"127.0.0.1:11211\""
                )
            })
    }
}

/// A host name or IPv4 address, or an IPv6 address in brackets. Anything else (spaces,
/// `/`, `@`, a bare IPv6 address) would be misread once put in the client's
/// `memcache://` URL: refused at load, where the error can name the key.
fn is_host(host: &str) -> bool {
    match host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        Some(v6) => v6.parse::<std::net::Ipv6Addr>().is_ok(),
        None => {
            !host.is_empty()
                && host
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b))
        }
    }
}

/// `host:port`
impl fmt::Display for MemcachedServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.host, self.port)
    }
}

/// `[bus]` — the broker's URL, `amqp`, is resolved into [`Config::backend`].
#[derive(Debug, Clone, Default)]
pub struct BusConfig {
    /// Let RabbitMQ delete this namespace's queues after they have been unused this long
    /// (`x-expires`). For throw-away namespaces (tests, benchmarks, previews); absent by
    /// default, as production queues must never vanish.
    pub queue_expiry: Option<Duration>,
    /// The kind of build, retry and dead-letter queues RabbitMQ makes (`bus.queue_type`).
    pub queue_type: QueueType,
}

/// `bus.queue_type`: what RabbitMQ keeps the namespace's durable queues in.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum QueueType {
    /// One node holds each queue: the fastest on one broker, lost with its node.
    #[default]
    Classic,
    /// Replicated over the cluster by Raft (`x-queue-type: quorum`): survives losing a
    /// minority of nodes, costs a write to a majority per message.
    Quorum,
}

impl QueueType {
    /// The `x-queue-type` argument's value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Classic => "classic",
            Self::Quorum => "quorum",
        }
    }
}

/// `bus.amqp`, checked once: an `amqp://` or `amqps://` URL.
///
/// It carries the broker's password, so it prints (`Display` and `Debug`) with the
/// password replaced by `***`; [`AmqpUrl::as_str`] gives the URL to connect with.
#[derive(Clone, PartialEq, Eq)]
pub struct AmqpUrl(String);

impl AmqpUrl {
    /// The full URL, password included: for connecting, never for logs.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The URL with its password (if any) replaced by `***`.
    pub fn redacted(&self) -> String {
        let url = &self.0;
        let Some((scheme, rest)) = url.split_once("://") else {
            return url.clone();
        };
        let authority_end = rest.find('/').unwrap_or(rest.len());
        let Some(at) = rest[..authority_end].rfind('@') else {
            return url.clone();
        };
        match rest[..at].split_once(':') {
            Some((user, _password)) => format!("{scheme}://{user}:***{}", &rest[at..]),
            None => url.clone(),
        }
    }
}

impl std::str::FromStr for AmqpUrl {
    /// The problem, without the key (the caller names it).
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        if s.starts_with("amqp://") || s.starts_with("amqps://") {
            Ok(Self(s.to_string()))
        } else {
            Err(
                "must be an amqp:// or amqps:// URL, e.g. \"amqp://guest:guest@127.0.0.1:5672/%2f\""
                    .into(),
            )
        }
    }
}

impl fmt::Display for AmqpUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

impl fmt::Debug for AmqpUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.redacted(), f)
    }
}

/// Which store and bus a deployment runs on, decided once at load from `store.memcached`
/// and `bus.amqp`. A broker without memcached cannot be expressed: worker processes could
/// not reach a gateway's memory.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Backend {
    /// No `memcached`, no `amqp`: the memory store and the in-process bus.
    #[default]
    Embedded,
    /// `memcached` without `amqp`: a shared store, the in-process bus.
    Memcached {
        /// `store.memcached`, never empty.
        servers: Vec<MemcachedServer>,
    },
    /// `memcached` and `amqp`: the distributed mode, with `tessera-worker` processes.
    Distributed {
        /// `store.memcached`, never empty.
        servers: Vec<MemcachedServer>,
        /// `bus.amqp`.
        amqp: AmqpUrl,
    },
}

impl Backend {
    /// The rules that tie `store.memcached` and `bus.amqp` together.
    fn resolve(servers: Vec<MemcachedServer>, amqp: Option<AmqpUrl>) -> Result<Self, ConfigError> {
        match (servers.is_empty(), amqp) {
            (true, None) => Ok(Backend::Embedded),
            (false, None) => Ok(Backend::Memcached { servers }),
            (false, Some(amqp)) => Ok(Backend::Distributed { servers, amqp }),
            (true, Some(_)) => Err(invalid(
                "store.memcached",
                "required when bus.amqp is set: worker processes cannot reach a gateway's embedded memory store",
            )),
        }
    }

    /// The memcached servers, when the store is memcached.
    pub fn memcached(&self) -> Option<&[MemcachedServer]> {
        match self {
            Backend::Embedded => None,
            Backend::Memcached { servers } | Backend::Distributed { servers, .. } => Some(servers),
        }
    }

    /// The broker, when the bus is AMQP.
    pub fn amqp(&self) -> Option<&AmqpUrl> {
        match self {
            Backend::Distributed { amqp, .. } => Some(amqp),
            _ => None,
        }
    }
}

/// `[workers]`
#[derive(Debug, Clone)]
pub struct WorkersConfig {
    /// Build tasks inside each gateway. Default 4; `0` with a broker leaves building to
    /// `tessera-worker` processes.
    pub embedded: usize,
    /// Concurrent builds per `tessera-worker` process (also its prefetch). Default 16.
    pub concurrency: usize,
    /// Where each `tessera-worker` serves its metrics and health (`--admin-listen`
    /// overrides it per process, through [`admin_listener`]). Default `127.0.0.1:9091`.
    pub admin_listen: SocketAddr,
    /// Bearer token for the worker admin listener; required when it is not on loopback.
    pub admin_token: String,
}

impl Default for WorkersConfig {
    fn default() -> Self {
        Self {
            embedded: 4,
            concurrency: 16,
            admin_listen: SocketAddr::from(([127, 0, 0, 1], 9091)),
            admin_token: String::new(),
        }
    }
}

/// Where a `vary` value comes from.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum VarySource {
    /// `cookie:NAME` — the value of one cookie.
    Cookie(String),
    /// `header:NAME` — a request header, name lower-cased.
    Header(String),
}

impl VarySource {
    /// The form used in the config file and in canonical identities.
    pub fn spec(&self) -> String {
        match self {
            VarySource::Cookie(n) => format!("cookie:{n}"),
            VarySource::Header(n) => format!("header:{n}"),
        }
    }
}

impl std::str::FromStr for VarySource {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (kind, name) = s
            .split_once(':')
            .ok_or_else(|| format!("{s:?} must be `cookie:NAME` or `header:NAME`"))?;
        let name_ok = !name.is_empty()
            && name.len() <= 128
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
        if !name_ok {
            return Err(format!(
                "{s:?}: the name must be 1 to 128 letters, digits, `-`, `_` or `.`"
            ));
        }
        match kind {
            "cookie" => Ok(VarySource::Cookie(name.to_string())),
            "header" => Ok(VarySource::Header(name.to_ascii_lowercase())),
            other => Err(format!(
                "{s:?}: unknown source {other:?}, expected `cookie` or `header`"
            )),
        }
    }
}

impl<'de> Deserialize<'de> for VarySource {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

/// One `[[fragment]]` table: a fragment endpoint and how to build it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FragmentRoute {
    /// Served at `{fragment_prefix}{name}`. Lower-case letters, digits, `-`, `_`; required.
    pub name: String,
    /// Path on the upstream that renders it; params go in its query. Required.
    pub render: String,
    /// Allow-listed query parameters: part of the identity and forwarded; others dropped.
    #[serde(default)]
    pub params: Vec<String>,
    /// Request cookies/headers that are part of the identity and forwarded to the render.
    #[serde(default)]
    pub vary: Vec<VarySource>,
    /// Share render answers marked `Cache-Control: private` or `no-store` between users
    /// anyway (routes without `vary` only). Default false: such an answer fails its
    /// build, since it would be served to everyone. Rails marks answers private by
    /// default; prefer `expires_in …, public: true` in the render action.
    #[serde(default)]
    pub shareable: bool,
    /// How long a built fragment is served without a rebuild. Default 60 s.
    #[serde(default = "default_fresh", deserialize_with = "duration")]
    pub fresh: Duration,
    /// How long after `fresh` it may still be served while a rebuild runs. Default 10 min.
    #[serde(default = "default_stale", deserialize_with = "duration")]
    pub stale: Duration,
    /// Rebuild a fragment that is read before it goes stale: in this last stretch of
    /// `fresh`, each hit starts the one rebuild with a probability that grows as the end
    /// nears (probabilistic early expiration), so a hot fragment is refreshed in time
    /// and never served stale. Must be shorter than `fresh`. Default 0 (off).
    #[serde(default, deserialize_with = "duration")]
    pub refresh_ahead: Duration,
    /// How long a failed build is remembered before another is tried. Default 5 s.
    #[serde(default = "default_failed_ttl", deserialize_with = "duration")]
    pub failed_ttl: Duration,
    /// Deadline for one render attempt. Default 10 s.
    #[serde(default = "default_build_timeout", deserialize_with = "duration")]
    pub build_timeout: Duration,
    /// Render attempts before the build fails (upstream 5xx and timeouts). Default 4.
    #[serde(default = "default_max_attempts")]
    pub max_attempts: u32,
    /// HTML shown while the fragment is pending.
    #[serde(default = "default_placeholder")]
    pub placeholder: String,
    /// HTML the browser client shows when it gives up waiting for the fragment.
    #[serde(default = "default_fallback")]
    pub fallback: String,
    /// Broker queue for this route's builds, used exactly as written. Default (absent or
    /// empty): the namespace's own, `{store.namespace}.build` ([`default_queue`]), shared
    /// by every route that names none. Refreshes nobody waits for go to its
    /// [`background_queue`].
    #[serde(default)]
    pub queue: String,
}

/// Suffix of a background queue's name.
const BACKGROUND_SUFFIX: &str = ".background";

/// The queue of builds nobody waits for (refreshes of stale fragments) beside the build
/// queue `queue`: `{queue}.background`. Workers take its builds after waited ones (see
/// [`crate::bus::Turns`]).
pub fn background_queue(queue: &str) -> String {
    format!("{queue}{BACKGROUND_SUFFIX}")
}

/// The queue of routes that name none: `{namespace}.build`, so namespaces sharing a
/// broker never share a queue.
pub fn default_queue(namespace: &str) -> String {
    format!("{namespace}.build")
}

/// Gives each route that names no queue its namespace's [`default_queue`].
fn with_default_queues(mut routes: Vec<FragmentRoute>, namespace: &str) -> Vec<FragmentRoute> {
    for r in routes.iter_mut().filter(|r| r.queue.is_empty()) {
        r.queue = default_queue(namespace);
    }
    routes
}

fn default_fresh() -> Duration {
    Duration::from_secs(60)
}
fn default_stale() -> Duration {
    Duration::from_secs(600)
}
fn default_failed_ttl() -> Duration {
    Duration::from_secs(5)
}
fn default_build_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_max_attempts() -> u32 {
    4
}
fn default_placeholder() -> String {
    r#"<div class="tessera-loading">Loading…</div>"#.into()
}
fn default_fallback() -> String {
    r#"<div class="tessera-unavailable">This content is unavailable right now.</div>"#.into()
}

impl FragmentRoute {
    /// A route with every optional key at its default; its queue is the default
    /// namespace's (`tessera.build`), since a route alone knows no namespace.
    pub fn new(name: impl Into<String>, render: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            render: render.into(),
            params: Vec::new(),
            vary: Vec::new(),
            shareable: false,
            fresh: default_fresh(),
            stale: default_stale(),
            refresh_ahead: Duration::ZERO,
            failed_ttl: default_failed_ttl(),
            build_timeout: default_build_timeout(),
            max_attempts: default_max_attempts(),
            placeholder: default_placeholder(),
            fallback: default_fallback(),
            queue: default_queue(&StoreConfig::default().namespace),
        }
    }

    /// How long a build may hold the pending lease: one attempt plus slack for storing the
    /// result. Workers extend it before each retry, so it never has to cover all attempts.
    pub fn lease_ttl(&self) -> Duration {
        // Saturating: validation bounds `build_timeout`, but a hand-made route need not
        // have passed it.
        self.build_timeout.saturating_add(LEASE_SLACK)
    }
}

/// Added to the build timeout for the lease, covering the store write and event publish.
pub const LEASE_SLACK: Duration = Duration::from_secs(2);

fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let s = String::deserialize(d)?;
    humantime::parse_duration(&s).map_err(|e| {
        serde::de::Error::custom(format!(
            "{s:?} is not a duration ({e}); write e.g. \"250ms\", \"10s\", \"5m\""
        ))
    })
}

fn optional_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    duration(d).map(Some)
}

/// The file as written, before its URLs and addresses are parsed: what serde reads and
/// what the `TESSERA_*` overrides replace. Kept private so that nothing downstream ever
/// sees an unparsed value; [`ConfigFile::resolve`] turns it into a [`Config`].
mod file {
    use super::{
        ByteSize, CacheConfig, Deserialize, Duration, FragmentRoute, HttpConfig, IpNet, duration,
        ip_nets, optional_duration,
    };

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
    }

    impl Default for GatewayFile {
        fn default() -> Self {
            let d = super::GatewayConfig::default();
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
            let d = super::UpstreamConfig::default();
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
    }

    impl Default for StoreFile {
        fn default() -> Self {
            let d = super::StoreConfig::default();
            Self {
                memcached: Vec::new(),
                namespace: d.namespace,
                timeout: d.timeout,
                max_item_size: d.max_item_size,
                memory_capacity: d.memory_capacity,
            }
        }
    }

    /// `[bus]` as written; see [`super::BusConfig`].
    #[derive(Debug, Default, Deserialize)]
    #[serde(deny_unknown_fields, default)]
    pub(super) struct BusFile {
        /// AMQP URL of the broker. Absent: the embedded in-process bus.
        pub amqp: Option<String>,
        #[serde(default, deserialize_with = "optional_duration")]
        pub queue_expiry: Option<Duration>,
        pub queue_type: super::QueueType,
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
    }

    impl Default for WorkersFile {
        fn default() -> Self {
            let d = super::WorkersConfig::default();
            Self {
                embedded: d.embedded,
                concurrency: d.concurrency,
                admin_listen: d.admin_listen.to_string(),
                admin_token: d.admin_token,
            }
        }
    }
}

use file::{ConfigFile, GatewayFile, WorkersFile};

impl ConfigFile {
    fn apply_env(&mut self, env: impl Fn(&str) -> Option<String>) {
        if let Some(v) = env(env::LISTEN) {
            self.gateway.listen = v;
        }
        if let Some(v) = env(env::UPSTREAM_URL) {
            self.upstream.url = v;
        }
        if let Some(v) = env(env::MEMCACHED) {
            self.store.memcached = v
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(String::from)
                .collect();
        }
        if let Some(v) = env(env::AMQP_URL) {
            self.bus.amqp = Some(v).filter(|s| !s.trim().is_empty());
        }
        if let Some(v) = env(env::ADMIN_LISTEN) {
            self.gateway.admin_listen = v;
        }
        if let Some(v) = env(env::ADMIN_TOKEN) {
            self.workers.admin_token.clone_from(&v);
            self.gateway.admin_token = v;
        }
    }

    /// Parses what is still text and checks every rule, section by section in file order,
    /// so the first problem reported is the first one in the file's order.
    fn resolve(self) -> Result<Config, ConfigError> {
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
        };
        store.validate()?;
        let amqp = self
            .bus
            .amqp
            .map(|url| {
                url.parse::<AmqpUrl>()
                    .map_err(|problem| invalid("bus.amqp", problem))
            })
            .transpose()?;
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
        };
        config.validate_routes()?;
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
        };
        workers.validate(backend)?;
        Ok(workers)
    }
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
        file.apply_env(env);
        file.resolve()
    }

    /// Parses and validates a TOML string without looking at the environment.
    pub fn from_toml(text: &str) -> Result<Config, ConfigError> {
        Self::from_sources("<inline>", Some(text), |_| None)
    }

    /// Checks every rule that the types alone cannot express, section by section. URLs
    /// and addresses are valid by their types; a loaded config has passed this already.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.gateway.validate()?;
        self.http.validate()?;
        self.upstream.validate()?;
        self.cache.validate()?;
        self.store.validate()?;
        self.workers.validate(&self.backend)?;
        self.validate_routes()
    }

    /// Each route, and that no two share a name.
    fn validate_routes(&self) -> Result<(), ConfigError> {
        let mut names = HashSet::new();
        for (i, r) in self.fragments.iter().enumerate() {
            r.validate(&format!("fragment[{i}]"))?;
            if !names.insert(r.name.as_str()) {
                return Err(invalid(
                    format!("fragment[{i}].name"),
                    format!("{:?} is used by an earlier route", r.name),
                ));
            }
            if r.queue.ends_with(BACKGROUND_SUFFIX) {
                return Err(invalid(
                    format!("fragment[{i}].queue"),
                    format!(
                        "{:?} ends with {BACKGROUND_SUFFIX:?}, the suffix of the background queue beside every build queue; name it otherwise",
                        r.queue
                    ),
                ));
            }
        }
        Ok(())
    }

    /// The route called `name`.
    pub fn route(&self, name: &str) -> Option<&FragmentRoute> {
        self.fragments.iter().find(|r| r.name == name)
    }

    /// Every queue some route builds on, each once, in route order.
    pub fn queues(&self) -> Vec<String> {
        let mut seen = Vec::new();
        for r in &self.fragments {
            if !seen.contains(&r.queue) {
                seen.push(r.queue.clone());
            }
        }
        if seen.is_empty() {
            seen.push(default_queue(&self.store.namespace));
        }
        seen
    }

    /// The [`background_queue`] of each of [`Self::queues`], in the same order.
    pub fn background_queues(&self) -> Vec<String> {
        self.queues().iter().map(|q| background_queue(q)).collect()
    }

    /// True when the memory store and in-process bus are used.
    pub fn is_embedded(&self) -> bool {
        self.backend == Backend::Embedded
    }
}

impl GatewayConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        admin_needs_token("gateway", self.admin_listen, &self.admin_token)?;
        let prefix = &self.fragment_prefix;
        if !(prefix.starts_with('/') && prefix.ends_with('/'))
            || prefix.len() < 2
            || prefix.starts_with("/_tessera/")
        {
            return Err(invalid(
                "gateway.fragment_prefix",
                format!(
                    "{prefix:?} must start and end with `/`, e.g. \"/fragments/\", and not be under /_tessera/"
                ),
            ));
        }
        if self.threads > MAX_THREADS {
            return Err(invalid(
                "gateway.threads",
                format!("{} is more than {MAX_THREADS}", self.threads),
            ));
        }
        positive("gateway.max_wait", self.max_wait)
    }
}

impl UpstreamConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        positive("upstream.timeout", self.timeout)
    }
}

impl CacheConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        positive("cache.ttl", self.ttl)
    }
}

impl StoreConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        let ns = &self.namespace;
        let ns_ok = !ns.is_empty()
            && ns.len() <= MAX_NAMESPACE
            && ns
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
        if !ns_ok {
            return Err(invalid(
                "store.namespace",
                format!("{ns:?} must be 1 to {MAX_NAMESPACE} letters, digits, `-`, `_` or `.`"),
            ));
        }
        positive("store.timeout", self.timeout)?;
        if self.max_item_size < ByteSize::kib(4) || self.max_item_size > ByteSize::mib(128) {
            return Err(invalid(
                "store.max_item_size",
                "must be between 4KiB and 128MiB (memcached's -I limit)",
            ));
        }
        Ok(())
    }
}

impl WorkersConfig {
    /// `backend` decides whether anything but embedded workers can build.
    fn validate(&self, backend: &Backend) -> Result<(), ConfigError> {
        Self::validate_capacity(backend, self.embedded, self.concurrency)?;
        admin_needs_token("workers", self.admin_listen, &self.admin_token)?;
        if self.embedded > u16::MAX as usize {
            return Err(invalid("workers.embedded", "must be at most 65535"));
        }
        Ok(())
    }

    /// That something can build, and `concurrency` is in range: the rules checked before
    /// `admin_listen`.
    fn validate_capacity(
        backend: &Backend,
        embedded: usize,
        concurrency: usize,
    ) -> Result<(), ConfigError> {
        if backend.amqp().is_none() && embedded == 0 {
            return Err(invalid(
                "workers.embedded",
                "must be at least 1 without bus.amqp: with the embedded bus nothing else can build fragments",
            ));
        }
        if concurrency == 0 || concurrency > u16::MAX as usize {
            return Err(invalid(
                "workers.concurrency",
                "must be between 1 and 65535",
            ));
        }
        Ok(())
    }
}

impl FragmentRoute {
    /// Every rule of one route, `at` being its key (`fragment[2]`).
    fn validate(&self, at: &str) -> Result<(), ConfigError> {
        self.validate_name(at)?;
        self.validate_render(at)?;
        self.validate_identity(at)?;
        self.validate_timings(at)?;
        self.validate_delivery(at)
    }

    fn validate_name(&self, at: &str) -> Result<(), ConfigError> {
        let name_ok = !self.name.is_empty()
            && self.name.len() <= MAX_ROUTE_NAME
            && self
                .name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_');
        if !name_ok {
            return Err(invalid(
                format!("{at}.name"),
                format!(
                    "{:?} must be 1 to {MAX_ROUTE_NAME} lower-case letters, digits, `-` or `_`",
                    self.name
                ),
            ));
        }
        Ok(())
    }

    fn validate_render(&self, at: &str) -> Result<(), ConfigError> {
        let render_ok = self.render.starts_with('/')
            && !self.render.contains(['?', '#'])
            && self.render.parse::<http::uri::PathAndQuery>().is_ok();
        if !render_ok {
            return Err(invalid(
                format!("{at}.render"),
                format!(
                    "{:?} must be a path on the upstream starting with `/`, without query or fragment",
                    self.render
                ),
            ));
        }
        Ok(())
    }

    /// `params` and `vary`: what identifies a fragment.
    fn validate_identity(&self, at: &str) -> Result<(), ConfigError> {
        let mut seen = HashSet::new();
        for p in &self.params {
            let ok = !p.is_empty()
                && p.len() <= 64
                && p.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.[]".contains(&b));
            if !ok {
                return Err(invalid(
                    format!("{at}.params"),
                    format!("{p:?} must be 1 to 64 letters, digits, `-`, `_`, `.`, `[` or `]`"),
                ));
            }
            if !seen.insert(p) {
                return Err(invalid(
                    format!("{at}.params"),
                    format!("{p:?} is listed twice"),
                ));
            }
        }
        let mut seen = HashSet::new();
        for v in &self.vary {
            if !seen.insert(v) {
                return Err(invalid(
                    format!("{at}.vary"),
                    format!("{:?} is listed twice", v.spec()),
                ));
            }
            if matches!(v, VarySource::Header(h) if h == "cookie") {
                return Err(invalid(
                    format!("{at}.vary"),
                    "vary on single cookies with `cookie:NAME`, not on the whole Cookie header",
                ));
            }
        }
        Ok(())
    }

    /// `fresh`, `stale`, `failed_ttl`, `build_timeout`, `max_attempts`.
    fn validate_timings(&self, at: &str) -> Result<(), ConfigError> {
        positive(&format!("{at}.fresh"), self.fresh)?;
        positive(&format!("{at}.failed_ttl"), self.failed_ttl)?;
        positive(&format!("{at}.build_timeout"), self.build_timeout)?;
        let month = Duration::from_secs(30 * 24 * 3600);
        // Saturating: `"18446744073709551615s"` is a valid duration, and the sum must
        // be refused, not overflow.
        if self.fresh.saturating_add(self.stale) > month {
            return Err(invalid(
                format!("{at}.stale"),
                "fresh + stale must be at most 30 days (memcached's relative expiry limit)",
            ));
        }
        if self.refresh_ahead >= self.fresh {
            return Err(invalid(
                format!("{at}.refresh_ahead"),
                "must be shorter than fresh (it is the last stretch of fresh)",
            ));
        }
        if self.lease_ttl() > month {
            return Err(invalid(
                format!("{at}.build_timeout"),
                "must be at most 30 days less 2s: the pending lease outlives it by 2s and \
                 memcached reads a longer expiry as a date",
            ));
        }
        if !(1..=20).contains(&self.max_attempts) {
            return Err(invalid(
                format!("{at}.max_attempts"),
                "must be between 1 and 20",
            ));
        }
        Ok(())
    }

    /// `placeholder` and `queue`: how the fragment is waited for and built.
    fn validate_delivery(&self, at: &str) -> Result<(), ConfigError> {
        if self.placeholder.len() > 16 * 1024 {
            return Err(invalid(
                format!("{at}.placeholder"),
                "must be at most 16KiB",
            ));
        }
        let queue_ok = !self.queue.is_empty()
            && self.queue.len() <= 200
            && !self.queue.starts_with("amq.")
            && self
                .queue
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b));
        if !queue_ok {
            return Err(invalid(
                format!("{at}.queue"),
                format!(
                    "{:?} must be 1 to 200 letters, digits, `-`, `_`, `.` or `:`, not starting with `amq.`",
                    self.queue
                ),
            ));
        }
        Ok(())
    }
}

/// Parses `listen` as `{section}.admin_listen` and checks that an admin listener off
/// loopback has a token: for an address given outside the file, such as
/// `tessera-worker --admin-listen`, which must pass the same rule as the file's.
pub fn admin_listener(section: &str, listen: &str, token: &str) -> Result<SocketAddr, ConfigError> {
    let admin = parse_addr(&format!("{section}.admin_listen"), listen)?;
    admin_needs_token(section, admin, token)?;
    Ok(admin)
}

/// An admin listener off loopback needs `{section}.admin_token`.
fn admin_needs_token(section: &str, admin: SocketAddr, token: &str) -> Result<(), ConfigError> {
    if !admin.ip().is_loopback() && token.is_empty() {
        return Err(invalid(
            format!("{section}.admin_token"),
            format!(
                "required when {section}.admin_listen ({admin}) is not on loopback: anyone who reaches it could {} (set it, or {})",
                if section == "gateway" {
                    "purge content"
                } else {
                    "read its metrics"
                },
                env::ADMIN_TOKEN
            ),
        ));
    }
    Ok(())
}

fn parse_addr(key: &str, value: &str) -> Result<SocketAddr, ConfigError> {
    value.parse().map_err(|_| {
        invalid(
            key,
            format!("{value:?} must be an IP address and port, e.g. \"127.0.0.1:8080\""),
        )
    })
}

fn positive(key: &str, d: Duration) -> Result<(), ConfigError> {
    if d.is_zero() {
        return Err(invalid(key, "must be greater than zero"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(toml: &str) -> String {
        match Config::from_toml(toml) {
            Ok(_) => panic!("config was accepted:\n{toml}"),
            Err(e) => e.to_string(),
        }
    }

    const ROUTE: &str = "[[fragment]]\nname = \"recs\"\nrender = \"/_render/recs\"\n";

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
        assert_eq!(c.backend.amqp().unwrap().as_str(), "amqp://127.0.0.1");
    }

    #[test]
    fn backend_is_resolved_from_memcached_and_amqp() {
        assert_eq!(Config::from_toml("").unwrap().backend, Backend::Embedded);
        let c = Config::from_toml("[store]\nmemcached = [\"memcache://h:11211\"]").unwrap();
        let server: MemcachedServer = "h:11211".parse().unwrap();
        assert_eq!(
            c.backend,
            Backend::Memcached {
                servers: vec![server.clone()]
            }
        );
        assert_eq!((server.host(), server.port()), ("h", 11211));
        assert!(!c.is_embedded());
        let c = Config::from_toml(
            "[store]\nmemcached = [\"h:1\"]\n[bus]\namqp = \"amqp://u:p@b/%2f\"\n[workers]\nembedded = 0",
        )
        .unwrap();
        assert!(matches!(c.backend, Backend::Distributed { .. }));
    }

    #[test]
    fn urls_are_parsed_once_and_printed_safely() {
        let url: UpstreamUrl = "http://app:3000/base/".parse().unwrap();
        assert_eq!(url.base(), "http://app:3000/base");
        assert_eq!(url.uri().authority().unwrap().as_str(), "app:3000");
        assert_eq!(url.to_string(), "http://app:3000/base/");
        assert_eq!(UpstreamUrl::default().as_str(), DEFAULT_UPSTREAM);
        assert_eq!(
            DEFAULT_UPSTREAM.parse::<UpstreamUrl>().unwrap(),
            UpstreamUrl::default()
        );

        let amqp: AmqpUrl = "amqp://user:s3cret@broker:5672/%2f".parse().unwrap();
        assert_eq!(amqp.as_str(), "amqp://user:s3cret@broker:5672/%2f");
        assert_eq!(amqp.to_string(), "amqp://user:***@broker:5672/%2f");
        assert!(!format!("{amqp:?}").contains("s3cret"));
        let plain: AmqpUrl = "amqps://broker/%2f".parse().unwrap();
        assert_eq!(plain.to_string(), "amqps://broker/%2f");
    }

    // A table of cases: long by nature, one line per case.
    #[allow(clippy::too_many_lines)]
    #[test]
    fn every_validation_error_names_its_key() {
        let cases: &[(&str, &str)] = &[
            ("[gateway]\nlisten = \"nope\"", "gateway.listen"),
            (
                "[gateway]\nadmin_listen = \"1.2.3.4\"",
                "gateway.admin_listen",
            ),
            (
                "[gateway]\nadmin_listen = \"0.0.0.0:9090\"",
                "gateway.admin_token",
            ),
            (
                "[gateway]\nfragment_prefix = \"frag\"",
                "gateway.fragment_prefix",
            ),
            ("[gateway]\nmax_wait = \"0s\"", "gateway.max_wait"),
            ("[gateway]\nthreads = 1025", "gateway.threads"),
            ("[upstream]\nurl = \"https://x\"", "upstream.url"),
            ("[upstream]\nurl = \"http://x/?a=1\"", "upstream.url"),
            ("[upstream]\ntimeout = \"0s\"", "upstream.timeout"),
            ("[cache]\nttl = \"0s\"", "cache.ttl"),
            ("[store]\nmemcached = [\"nohost\"]", "store.memcached[0]"),
            ("[store]\nnamespace = \"a b\"", "store.namespace"),
            ("[store]\ntimeout = \"0ms\"", "store.timeout"),
            ("[store]\nmax_item_size = \"1KiB\"", "store.max_item_size"),
            ("[bus]\namqp = \"http://x\"", "bus.amqp"),
            ("[bus]\namqp = \"amqp://x\"", "store.memcached"),
            ("[workers]\nembedded = 0", "workers.embedded"),
            ("[workers]\nconcurrency = 0", "workers.concurrency"),
            ("[workers]\nadmin_listen = \"x\"", "workers.admin_listen"),
            (
                "[workers]\nadmin_listen = \"0.0.0.0:9091\"",
                "workers.admin_token",
            ),
            (
                "[[fragment]]\nname = \"Bad Name\"\nrender = \"/r\"",
                "fragment[0].name",
            ),
            (
                "[[fragment]]\nname = \"a\"\nrender = \"r\"",
                "fragment[0].render",
            ),
            (
                "[[fragment]]\nname = \"a\"\nrender = \"/r?x=1\"",
                "fragment[0].render",
            ),
            (
                "[[fragment]]\nname = \"a\"\nrender = \"/r\"\nparams = [\"a\", \"a\"]",
                "fragment[0].params",
            ),
            (
                "[[fragment]]\nname = \"a\"\nrender = \"/r\"\nparams = [\"a b\"]",
                "fragment[0].params",
            ),
            (
                "[[fragment]]\nname = \"a\"\nrender = \"/r\"\nvary = [\"header:x\", \"header:X\"]",
                "fragment[0].vary",
            ),
            (
                "[[fragment]]\nname = \"a\"\nrender = \"/r\"\nvary = [\"header:cookie\"]",
                "fragment[0].vary",
            ),
            (
                "[[fragment]]\nname = \"a\"\nrender = \"/r\"\nfresh = \"0s\"",
                "fragment[0].fresh",
            ),
            (
                "[[fragment]]\nname = \"a\"\nrender = \"/r\"\nstale = \"31days\"",
                "fragment[0].stale",
            ),
            (
                "[[fragment]]\nname = \"a\"\nrender = \"/r\"\nfresh = \"10s\"\nrefresh_ahead = \"10s\"",
                "fragment[0].refresh_ahead",
            ),
            (
                "[[fragment]]\nname = \"a\"\nrender = \"/r\"\nfailed_ttl = \"0s\"",
                "fragment[0].failed_ttl",
            ),
            (
                "[[fragment]]\nname = \"a\"\nrender = \"/r\"\nbuild_timeout = \"0s\"",
                "fragment[0].build_timeout",
            ),
            (
                "[[fragment]]\nname = \"a\"\nrender = \"/r\"\nmax_attempts = 0",
                "fragment[0].max_attempts",
            ),
            (
                "[[fragment]]\nname = \"a\"\nrender = \"/r\"\nqueue = \"amq.x\"",
                "fragment[0].queue",
            ),
            (
                "[[fragment]]\nname = \"a\"\nrender = \"/r\"\nqueue = \"a b\"",
                "fragment[0].queue",
            ),
        ];
        for (toml, key) in cases {
            let msg = err(toml);
            assert!(
                msg.contains(&format!("`{key}`")),
                "{toml:?} gave {msg:?}, expected key {key}"
            );
        }
        let dup = format!("{ROUTE}{ROUTE}");
        assert!(err(&dup).contains("`fragment[1].name`"));
    }

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
    fn an_admin_listener_off_loopback_needs_a_token_however_it_is_given() {
        let e = admin_listener("workers", "0.0.0.0:9091", "").unwrap_err();
        assert!(e.to_string().contains("`workers.admin_token`"), "{e}");
        let e = admin_listener("workers", "x", "t").unwrap_err();
        assert!(e.to_string().contains("`workers.admin_listen`"), "{e}");
        let addr = admin_listener("workers", "0.0.0.0:9091", "t").unwrap();
        assert_eq!(addr.to_string(), "0.0.0.0:9091");

        let mut c = Config::default();
        c.gateway.admin_listen = SocketAddr::from(([0, 0, 0, 0], 9090));
        let e = c.validate().unwrap_err();
        assert!(e.to_string().contains("`gateway.admin_token`"), "{e}");
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
    fn queues_are_listed_once() {
        let c = Config::from_toml(&format!(
            "{ROUTE}[[fragment]]\nname = \"slow\"\nrender = \"/s\"\nqueue = \"tessera.slow\"\n[[fragment]]\nname = \"b\"\nrender = \"/b\"\n"
        ))
        .unwrap();
        assert_eq!(c.queues(), vec!["tessera.build", "tessera.slow"]);
        assert_eq!(
            c.background_queues(),
            vec!["tessera.build.background", "tessera.slow.background"]
        );
        let msg = err(&format!(
            "{ROUTE}[[fragment]]\nname = \"x\"\nrender = \"/x\"\nqueue = \"tessera.build.background\"\n"
        ));
        assert!(
            msg.contains("fragment[1].queue") && msg.contains("background"),
            "{msg}"
        );
    }

    /// The message of the first problem in `toml` (a route table is not added).
    fn key_of(toml: &str) -> String {
        match Config::from_toml(toml) {
            Ok(_) => panic!("config was accepted:\n{toml}"),
            Err(ConfigError::Invalid { key, .. }) => key,
            Err(e) => panic!("not a validation error: {e}"),
        }
    }

    /// A config with one route whose extra keys are `keys`.
    fn route_with(keys: &str) -> Result<Config, ConfigError> {
        Config::from_toml(&format!("{ROUTE}{keys}\n"))
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
    fn route_defaults_are_pinned() {
        let c = route_with("").unwrap();
        let r = c.route("recs").unwrap();
        assert_eq!(r.render, "/_render/recs");
        assert!(r.params.is_empty() && r.vary.is_empty());
        assert_eq!(r.fresh, Duration::from_secs(60));
        assert_eq!(r.stale, Duration::from_secs(600));
        assert_eq!(r.failed_ttl, Duration::from_secs(5));
        assert_eq!(r.build_timeout, Duration::from_secs(10));
        assert_eq!(r.max_attempts, 4);
        assert_eq!(
            r.placeholder,
            r#"<div class="tessera-loading">Loading…</div>"#
        );
        assert_eq!(
            r.fallback,
            r#"<div class="tessera-unavailable">This content is unavailable right now.</div>"#
        );
        assert_eq!(r.queue, "tessera.build");
        // A route made in code has the same defaults as one read from a file.
        let made = FragmentRoute::new("recs", "/_render/recs");
        assert_eq!(format!("{made:?}"), format!("{r:?}"));
        assert!(c.route("other").is_none());
    }

    #[test]
    fn the_lease_covers_one_attempt_and_the_slack() {
        assert_eq!(
            FragmentRoute::new("a", "/a").lease_ttl(),
            Duration::from_secs(12)
        );
        let c = route_with("build_timeout = \"750ms\"").unwrap();
        assert_eq!(c.fragments[0].lease_ttl(), Duration::from_millis(2750));
    }

    #[test]
    fn fresh_plus_stale_may_reach_thirty_days_but_not_pass_them() {
        let r = route_with("fresh = \"1day\"\nstale = \"29days\"").unwrap();
        assert_eq!(
            r.fragments[0].fresh + r.fragments[0].stale,
            Duration::from_secs(30 * 24 * 3600)
        );
        assert_eq!(
            key_of(&format!("{ROUTE}fresh = \"1day\"\nstale = \"29days 1s\"")),
            "fragment[0].stale"
        );
        assert_eq!(
            key_of(&format!("{ROUTE}fresh = \"30days 1s\"\nstale = \"0s\"")),
            "fragment[0].stale"
        );
        assert!(
            route_with("stale = \"0s\"").is_ok(),
            "no stale window at all"
        );
        // The pending lease (build_timeout + 2s) has the same bound.
        let at = route_with("build_timeout = \"29days 23h 59m 58s\"").unwrap();
        assert_eq!(
            at.fragments[0].lease_ttl(),
            Duration::from_secs(30 * 24 * 3600)
        );
        assert_eq!(
            key_of(&format!("{ROUTE}build_timeout = \"29days 23h 59m 59s\"")),
            "fragment[0].build_timeout"
        );
    }

    #[test]
    fn route_limits_hold_exactly_at_the_limit() {
        let name = "n".repeat(MAX_ROUTE_NAME);
        let ok = format!("[[fragment]]\nname = \"{name}\"\nrender = \"/r\"");
        assert!(Config::from_toml(&ok).is_ok());
        let long = format!("[[fragment]]\nname = \"{name}n\"\nrender = \"/r\"");
        assert_eq!(key_of(&long), "fragment[0].name");
        let ok = "[[fragment]]\nname = \"a-b_9\"\nrender = \"/r\"";
        assert!(Config::from_toml(ok).is_ok());
        for bad in ["", "a.b", "aB"] {
            let toml = format!("[[fragment]]\nname = \"{bad}\"\nrender = \"/r\"");
            assert_eq!(key_of(&toml), "fragment[0].name", "{bad:?}");
        }

        for (keys, key) in [
            ("max_attempts = 1", None),
            ("max_attempts = 20", None),
            ("max_attempts = 21", Some("fragment[0].max_attempts")),
            (&format!("params = [\"{}\"]", "p".repeat(64)), None),
            (
                &format!("params = [\"{}\"]", "p".repeat(65)),
                Some("fragment[0].params"),
            ),
            ("params = [\"a-b_c.d[]\", \"x\"]", None),
            ("params = [\"\"]", Some("fragment[0].params")),
            (&format!("queue = \"{}\"", "q".repeat(200)), None),
            (
                &format!("queue = \"{}\"", "q".repeat(201)),
                Some("fragment[0].queue"),
            ),
            ("queue = \"\"", None),
            ("queue = \"my-app_1.build:slow\"", None),
            ("queue = \"amq\"", None),
            ("render = \"/r#top\"", Some("fragment[0].render")),
            ("render = \"/r x\"", Some("fragment[0].render")),
            ("vary = [\"header:x\", \"cookie:x\"]", None),
        ] {
            let toml = if keys.starts_with("render") {
                format!("[[fragment]]\nname = \"recs\"\n{keys}\n")
            } else {
                format!("{ROUTE}{keys}\n")
            };
            match key {
                None => assert!(Config::from_toml(&toml).is_ok(), "{keys} was refused"),
                Some(key) => assert_eq!(key_of(&toml), key, "{keys}"),
            }
        }
    }

    #[test]
    fn placeholders_may_be_sixteen_kib() {
        let at = format!("placeholder = \"{}\"", "p".repeat(16 * 1024));
        assert!(route_with(&at).is_ok());
        let past = format!("placeholder = \"{}\"", "p".repeat(16 * 1024 + 1));
        assert_eq!(key_of(&format!("{ROUTE}{past}")), "fragment[0].placeholder");
    }

    #[test]
    fn vary_sources_are_parsed_strictly() {
        let name = "n".repeat(128);
        assert_eq!(
            format!("cookie:{name}").parse::<VarySource>(),
            Ok(VarySource::Cookie(name.clone()))
        );
        assert!(format!("cookie:{name}n").parse::<VarySource>().is_err());
        assert_eq!(
            "header:Accept-Language".parse::<VarySource>(),
            Ok(VarySource::Header("accept-language".into()))
        );
        assert_eq!(
            "cookie:Session.ID_x-1".parse::<VarySource>(),
            Ok(VarySource::Cookie("Session.ID_x-1".into()))
        );
        for bad in [
            "cookie:",
            "cookie",
            "cookie:a b",
            "cookie:a:b",
            "query:a",
            ":a",
        ] {
            assert!(bad.parse::<VarySource>().is_err(), "{bad:?}");
        }
        assert_eq!(VarySource::Cookie("sid".into()).spec(), "cookie:sid");
        assert_eq!(VarySource::Header("x-a".into()).spec(), "header:x-a");
    }

    #[test]
    fn memcached_addresses_need_a_host_and_a_port() {
        for bad in [
            ":11211",
            "host:abc",
            "host:0",
            "host:65536",
            "host",
            "host:",
            "memcache://:11211",
            "a b:11211",
            "host/x:11211",
            "user@host:11211",
            "::1:11211",
            "[::1:11211",
            "[fe80::zz]:11211",
        ] {
            let toml = format!("[store]\nmemcached = [\"127.0.0.1:11211\", \"{bad}\"]");
            let msg = err(&toml);
            assert!(
                msg.contains("`store.memcached[1]`") && msg.contains(bad),
                "{bad:?} gave {msg:?}"
            );
        }
        for (good, host, port) in [
            ("127.0.0.1:11211", "127.0.0.1", 11211),
            ("memcache://cache-1.internal:1", "cache-1.internal", 1),
            ("[::1]:65535", "[::1]", 65535),
            ("cache_2:11211", "cache_2", 11211),
        ] {
            let server: MemcachedServer = good.parse().unwrap();
            assert_eq!((server.host(), server.port()), (host, port), "{good}");
            assert_eq!(server.to_string(), format!("{host}:{port}"));
        }
    }

    #[test]
    fn store_limits_hold_exactly_at_the_limit() {
        let ns = "n".repeat(MAX_NAMESPACE);
        assert!(Config::from_toml(&format!("[store]\nnamespace = \"{ns}\"")).is_ok());
        let long = format!("[store]\nnamespace = \"{ns}n\"");
        assert_eq!(key_of(&long), "store.namespace");
        assert_eq!(key_of("[store]\nnamespace = \"\""), "store.namespace");
        assert!(Config::from_toml("[store]\nnamespace = \"my-app_2.prod\"").is_ok());
        for (size, accepted) in [
            ("4KiB", Some(ByteSize::kib(4))),
            ("128MiB", Some(ByteSize::mib(128))),
            ("4095B", None),
            ("134217729B", None),
        ] {
            let toml = format!("[store]\nmax_item_size = \"{size}\"");
            match accepted {
                Some(bytes) => {
                    assert_eq!(Config::from_toml(&toml).unwrap().store.max_item_size, bytes);
                }
                None => assert_eq!(key_of(&toml), "store.max_item_size", "{size}"),
            }
        }
    }

    #[test]
    fn worker_counts_hold_exactly_at_the_limit() {
        let c = Config::from_toml("[workers]\nembedded = 65535\nconcurrency = 65535").unwrap();
        assert_eq!((c.workers.embedded, c.workers.concurrency), (65535, 65535));
        assert_eq!(
            key_of("[workers]\nconcurrency = 65536"),
            "workers.concurrency"
        );
        assert_eq!(key_of("[workers]\nembedded = 65536"), "workers.embedded");
        let c = Config::from_toml("[workers]\nembedded = 1").unwrap();
        assert_eq!(c.workers.embedded, 1);
        // Without a broker nothing but embedded workers can build; memcached alone is no
        // broker.
        assert_eq!(
            key_of("[store]\nmemcached = [\"h:1\"]\n[workers]\nembedded = 0"),
            "workers.embedded"
        );
    }

    #[test]
    fn fragment_prefix_is_a_directory_outside_tessera_s_own() {
        for ok in ["/f/", "/fragments/", "/a/b/"] {
            let toml = format!("[gateway]\nfragment_prefix = \"{ok}\"");
            assert!(Config::from_toml(&toml).is_ok(), "{ok}");
        }
        for bad in ["/", "f/", "/f", "/_tessera/", "/_tessera/f/", ""] {
            let toml = format!("[gateway]\nfragment_prefix = \"{bad}\"");
            assert_eq!(key_of(&toml), "gateway.fragment_prefix", "{bad:?}");
        }
    }

    #[test]
    fn an_admin_listener_off_loopback_needs_a_token() {
        let gateway = err("[gateway]\nadmin_listen = \"0.0.0.0:9090\"");
        assert!(gateway.contains("purge content"), "{gateway}");
        assert!(gateway.contains(env::ADMIN_TOKEN), "{gateway}");
        let workers = err("[workers]\nadmin_listen = \"0.0.0.0:9091\"");
        assert!(workers.contains("read its metrics"), "{workers}");
        let c = Config::from_toml(
            "[gateway]\nadmin_listen = \"0.0.0.0:9090\"\nadmin_token = \"t\"\n[workers]\nadmin_listen = \"[::]:9091\"\nadmin_token = \"t\"",
        );
        assert!(c.is_ok());
        assert!(Config::from_toml("[workers]\nadmin_listen = \"[::1]:9091\"").is_ok());
        let addr = admin_listener("gateway", "127.0.0.2:1", "").unwrap();
        assert_eq!(addr, "127.0.0.2:1".parse::<SocketAddr>().unwrap());
    }

    #[test]
    fn upstream_urls_are_plain_http_with_a_host() {
        for bad in [
            "https://app",
            "http://",
            "/path",
            "app:3000",
            "http://app/?q=1",
        ] {
            let toml = format!("[upstream]\nurl = \"{bad}\"");
            assert_eq!(key_of(&toml), "upstream.url", "{bad:?}");
        }
        let c = Config::from_toml("[upstream]\nurl = \"http://app\"").unwrap();
        assert_eq!(c.upstream.url.base(), "http://app");
        assert_eq!(format!("{:?}", c.upstream.url), "\"http://app\"");
    }

    #[test]
    fn amqp_passwords_never_print() {
        for (url, shown) in [
            ("amqp://u:pw@h:5672/%2f", "amqp://u:***@h:5672/%2f"),
            ("amqp://u:p:w@h/v", "amqp://u:***@h/v"),
            ("amqps://u@h/%2f", "amqps://u@h/%2f"),
            ("amqp://h/v@x:y", "amqp://h/v@x:y"),
            ("amqp://h", "amqp://h"),
            ("amqp://a@b:pw@h", "amqp://a@b:***@h"),
        ] {
            let amqp: AmqpUrl = url.parse().unwrap();
            assert_eq!(amqp.redacted(), shown, "{url}");
            assert_eq!(amqp.to_string(), shown);
            assert_eq!(format!("{amqp:?}"), format!("{shown:?}"));
            assert_eq!(amqp.as_str(), url);
        }
        assert!("amqpx://h".parse::<AmqpUrl>().is_err());
    }

    #[test]
    fn the_backend_says_which_servers_run() {
        assert_eq!(Backend::Embedded.memcached(), None);
        assert_eq!(Backend::Embedded.amqp(), None);
        let server: MemcachedServer = "h:1".parse().unwrap();
        let memcached = Backend::Memcached {
            servers: vec![server.clone()],
        };
        assert_eq!(memcached.memcached(), Some(&[server.clone()][..]));
        assert_eq!(memcached.amqp(), None);
        let amqp: AmqpUrl = "amqp://b".parse().unwrap();
        let distributed = Backend::Distributed {
            servers: vec![server.clone()],
            amqp: amqp.clone(),
        };
        assert_eq!(distributed.memcached(), Some(&[server][..]));
        assert_eq!(distributed.amqp(), Some(&amqp));
        // Only the embedded backend is embedded: memcached alone, or with a broker, is not.
        let c = Config::from_toml("[store]\nmemcached = [\"h:1\"]").unwrap();
        assert!(!c.is_embedded());
        assert!(Config::from_toml("").unwrap().is_embedded());
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

    #[test]
    fn http_limits_hold_exactly_at_the_limit() {
        let connections = "http.max_connections";
        let header = "http.max_header_bytes";
        for (keys, refused) in [
            ("max_connections = 1".to_string(), None),
            (format!("max_connections = {MAX_CONNECTIONS_LIMIT}"), None),
            (
                format!("max_connections = {}", MAX_CONNECTIONS_LIMIT + 1),
                Some(connections),
            ),
            ("max_header_bytes = \"8KiB\"".to_string(), None),
            ("max_header_bytes = \"8191B\"".to_string(), Some(header)),
            ("max_header_bytes = \"1MiB\"".to_string(), None),
            ("max_header_bytes = \"1048577B\"".to_string(), Some(header)),
        ] {
            let toml = format!("[http]\n{keys}");
            match refused {
                None => assert!(Config::from_toml(&toml).is_ok(), "{keys} was refused"),
                Some(key) => assert_eq!(key_of(&toml), key, "{keys}"),
            }
        }
    }

    #[test]
    fn a_config_built_in_code_is_validated_too() {
        let mut c = Config::default();
        assert!(c.validate().is_ok());
        c.fragments.push(FragmentRoute::new("recs", "/r"));
        assert!(c.validate().is_ok());
        c.fragments.push(FragmentRoute::new("recs", "/s"));
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("`fragment[1].name`"), "{e}");
        for (change, key) in [
            (
                (|c: &mut Config| c.gateway.max_wait = Duration::ZERO) as fn(&mut Config),
                "gateway.max_wait",
            ),
            (|c| c.upstream.timeout = Duration::ZERO, "upstream.timeout"),
            (|c| c.cache.ttl = Duration::ZERO, "cache.ttl"),
            (|c| c.store.timeout = Duration::ZERO, "store.timeout"),
            (|c| c.workers.embedded = 0, "workers.embedded"),
            (|c| c.fragments[0].queue.clear(), "fragment[0].queue"),
            (
                |c| c.fragments[0].build_timeout = Duration::ZERO,
                "fragment[0].build_timeout",
            ),
        ] {
            let mut c = Config::default();
            c.fragments.push(FragmentRoute::new("recs", "/r"));
            change(&mut c);
            let e = c.validate().unwrap_err().to_string();
            assert!(e.contains(&format!("`{key}`")), "{key}: {e}");
        }
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

    #[test]
    fn http_limits_have_defaults_parse_and_are_checked() {
        let d = Config::default().http;
        assert_eq!(d.first_byte_timeout, Duration::from_secs(10));
        assert_eq!(d.header_timeout, Duration::from_secs(10));
        assert_eq!(d.idle_timeout, Duration::from_secs(75));
        assert_eq!(d.max_connections, 10_000);
        assert_eq!(d.max_header_bytes, ByteSize::kib(64));
        let c = Config::from_toml(
            "[http]\nfirst_byte_timeout = \"2s\"\nheader_timeout = \"5s\"\nidle_timeout = \"1m\"\nmax_connections = 500\nmax_header_bytes = \"16KiB\"",
        )
        .unwrap();
        assert_eq!(c.http.first_byte_timeout, Duration::from_secs(2));
        assert_eq!(c.http.header_timeout, Duration::from_secs(5));
        assert_eq!(c.http.idle_timeout, Duration::from_secs(60));
        assert_eq!(c.http.max_connections, 500);
        assert_eq!(c.http.max_header_bytes, ByteSize::kib(16));
        for (toml, key) in [
            (
                "[http]\nfirst_byte_timeout = \"0s\"",
                "http.first_byte_timeout",
            ),
            ("[http]\nheader_timeout = \"0s\"", "http.header_timeout"),
            ("[http]\nidle_timeout = \"0s\"", "http.idle_timeout"),
            ("[http]\nmax_connections = 0", "http.max_connections"),
            (
                "[http]\nmax_header_bytes = \"4KiB\"",
                "http.max_header_bytes",
            ),
            (
                "[http]\nmax_header_bytes = \"2MiB\"",
                "http.max_header_bytes",
            ),
        ] {
            let msg = err(toml);
            assert!(msg.contains(&format!("`{key}`")), "{toml:?} gave {msg:?}");
        }
        assert!(err("[http]\nidle = \"1s\"").contains("idle"));
    }

    #[test]
    fn the_default_queue_is_the_namespace_s_own_and_named_ones_are_kept() {
        let c = Config::from_toml(&format!(
            "[store]\nnamespace = \"shop\"\n{ROUTE}[[fragment]]\nname = \"slow\"\nrender = \"/s\"\nqueue = \"tessera.slow\"\n"
        ))
        .unwrap();
        assert_eq!(c.fragments[0].queue, "shop.build");
        assert_eq!(c.fragments[1].queue, "tessera.slow", "kept as written");
        assert_eq!(c.queues(), vec!["shop.build", "tessera.slow"]);
        let no_routes = Config::from_toml("[store]\nnamespace = \"shop\"").unwrap();
        assert_eq!(no_routes.queues(), vec!["shop.build"]);
    }
}
