//! The typed sections of a configuration: what every process works from once the file
//! is loaded. Each field has its documented default here; URLs and addresses are parsed
//! into types of their own, so a value of one of these types is well-formed. The rules
//! the types alone cannot express live in `validate`.

use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

use bytesize::ByteSize;
use ipnet::IpNet;
use serde::{Deserialize, Deserializer};

use super::queues::default_queue;

/// Longest route name; keeps every store key far below memcached's 250 bytes.
pub const MAX_ROUTE_NAME: usize = 64;
/// Longest namespace.
pub const MAX_NAMESPACE: usize = 32;
/// Largest `max_renders` of a route: a waiting build reads every slot's key.
pub const MAX_RENDERS: u32 = 1000;
/// Largest `renders_per_second` of a route.
pub const MAX_RENDERS_PER_SECOND: u32 = 100_000;

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
    /// Proxy public requests for a route's `render` path to the upstream like any other
    /// page. Default false: they are answered 404, so nobody can load the render paths
    /// directly and bypass the cache and the build queue; only the workers reach them.
    pub public_render_paths: bool,
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
            public_render_paths: false,
        }
    }
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
    /// A connection whose answer makes no progress for this long is closed: the client
    /// reads nothing (its socket takes no byte, or, over HTTP/2, it opens no flow-control
    /// window), so the answer, and whatever it holds (an upstream connection, a stream's
    /// fragments), is dropped. Timed between two writes that make progress, as nginx's
    /// `send_timeout`: a client that keeps reading, however slowly, is served. Default 60 s.
    #[serde(deserialize_with = "duration")]
    pub send_timeout: Duration,
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
            send_timeout: Duration::from_secs(60),
            max_connections: 10_000,
            max_header_bytes: ByteSize::kib(64),
        }
    }
}

/// `[otel]` — OpenTelemetry traces, exported over OTLP (HTTP/protobuf). Off unless an
/// endpoint is set, in the file or in `OTEL_EXPORTER_OTLP_ENDPOINT`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OtelConfig {
    /// The collector's base URL, `http://host:4318`; spans go to `{endpoint}/v1/traces`.
    /// Empty: no traces (the default).
    pub endpoint: String,
    /// `service.name` of the spans; empty: the binary's name (`tessera-gateway`,
    /// `tessera-worker`).
    pub service_name: String,
    /// Share of new traces sampled, 0 to 1; a request that comes with a `traceparent`
    /// follows its sampled flag (parent-based). Default 1.
    pub sample_ratio: f64,
}

impl Default for OtelConfig {
    fn default() -> Self {
        Self {
            endpoint: String::new(),
            service_name: String::new(),
            sample_ratio: 1.0,
        }
    }
}

/// Most connections a listener may be configured to hold.
pub const MAX_CONNECTIONS_LIMIT: usize = 1_000_000;

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

/// `[log]` — the process's own log (the access log is `[access_log]`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// What is written, spelled as `RUST_LOG` is: a level (`error`, `warn`, `info`,
    /// `debug`, `trace`) or directives per module (`info,tessera_gateway=debug`). Applied
    /// at start and again by every reload; `RUST_LOG`, when set, wins. Default `info`.
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            level: "info".into(),
        }
    }
}

/// `[access_log]` — one line per request on the gateway's public listener, as nginx
/// writes. Off by default (no `path`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AccessLogConfig {
    /// Where the lines go: `"stdout"`, or a file, appended to and reopened on SIGUSR1
    /// (for logrotate). Absent: no access log.
    pub path: Option<String>,
    /// `combined` (nginx's and Apache's format, Tessera's fields appended) or `json` (one
    /// object per line). Default `combined`.
    pub format: AccessLogFormat,
}

impl AccessLogConfig {
    /// The `path` that means standard output.
    pub const STDOUT: &'static str = "stdout";
}

/// `access_log.format`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AccessLogFormat {
    /// `addr - - [time] "request" status bytes "referer" "user-agent"`, then
    /// `route=… cache="…" upstream_ms=… trace=…`.
    #[default]
    Combined,
    /// One JSON object per line.
    Json,
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

/// `[store]` — L2. Its `memcached` servers are resolved into
/// [`Config::backend`](super::Config::backend).
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
    /// Calls in a row that must fail on a memcached server (a broken connection, an
    /// error answer to a whole exchange) before this process judges it down, skips it
    /// and sends its keys to the next server. A call not answered within `timeout`, or a
    /// refused connection, judges it down at once. At least 1. Default 3.
    pub eject_after: u32,
    /// How often each process checks every memcached server: one it uses, to find a
    /// hang even without traffic and to empty it if it missed writes; one it judged
    /// down, to take it back once it answers (retried sooner at first: after 100 ms,
    /// doubling up to this). Default 1 s.
    pub probe_interval: Duration,
    /// Empty a memcached server (`flush_all`) that comes back after writes went
    /// elsewhere in its place, before using it again, so that nothing purged or rebuilt
    /// meanwhile is served from it. Only for servers Tessera does not share: turned off,
    /// a returning server may serve what it held before it left. Default true.
    pub flush_on_return: bool,
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            namespace: "tessera".into(),
            timeout: Duration::from_millis(250),
            max_item_size: ByteSize::kib(1023),
            memory_capacity: ByteSize::mib(256),
            eject_after: 3,
            probe_interval: Duration::from_secs(1),
            flush_on_return: true,
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

/// `[bus]` — the broker's node URLs, `amqp`, are resolved into
/// [`Config::backend`](super::Config::backend).
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
    /// minority of nodes, costs a write to a majority per message. The choice for a
    /// cluster (`bus.amqp` listing several nodes).
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

/// One node of `bus.amqp`, checked once: an `amqp://` or `amqps://` URL with a host, and
/// a port from 1 when it names one. A problem is described without the URL, which may
/// carry a password.
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
        let Some(rest) = s
            .strip_prefix("amqp://")
            .or_else(|| s.strip_prefix("amqps://"))
        else {
            return Err(
                "must be an amqp:// or amqps:// URL, e.g. \"amqp://guest:guest@127.0.0.1:5672/%2f\""
                    .into(),
            );
        };
        let authority = &rest[..rest.find(['/', '?']).unwrap_or(rest.len())];
        let host_port = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
        let (host, port) = match host_port.strip_prefix('[') {
            Some(v6) => match v6.split_once(']') {
                Some((host, after)) => (host, after.strip_prefix(':')),
                None => return Err("opens an IPv6 address with `[` and never closes it".into()),
            },
            None => match host_port.rsplit_once(':') {
                Some((host, port)) => (host, Some(port)),
                None => (host_port, None),
            },
        };
        if host.is_empty() {
            return Err("names no host, e.g. \"amqp://guest:guest@127.0.0.1:5672/%2f\"".into());
        }
        if port.is_some_and(|p| !p.parse::<u16>().is_ok_and(|p| p > 0)) {
            return Err("has a port that is not a number from 1 to 65535".into());
        }
        Ok(Self(s.to_string()))
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
        /// `bus.amqp`, never empty: the broker's nodes, in the order a process tries them
        /// (one URL for a single broker, one per node of a cluster).
        amqp: Vec<AmqpUrl>,
    },
}

impl Backend {
    /// The memcached servers, when the store is memcached.
    pub fn memcached(&self) -> Option<&[MemcachedServer]> {
        match self {
            Backend::Embedded => None,
            Backend::Memcached { servers } | Backend::Distributed { servers, .. } => Some(servers),
        }
    }

    /// The broker's nodes, when the bus is AMQP.
    pub fn amqp(&self) -> Option<&[AmqpUrl]> {
        match self {
            Backend::Distributed { amqp, .. } => Some(amqp),
            _ => None,
        }
    }
}

/// `[workers]`
#[derive(Clone)]
pub struct WorkersConfig {
    /// Build tasks inside each gateway. Default 4; `0` with a broker leaves building to
    /// `tessera-worker` processes.
    pub embedded: usize,
    /// Concurrent builds per `tessera-worker` process (also its prefetch). Default 16.
    pub concurrency: usize,
    /// Where each `tessera-worker` serves its metrics and health (`--admin-listen`
    /// overrides it per process, through [`admin_listener`](super::admin_listener)).
    /// Default `127.0.0.1:9091`.
    pub admin_listen: SocketAddr,
    /// Bearer token for the worker admin listener; required when it is not on loopback.
    pub admin_token: String,
    /// Secret sent in [`RENDER_TOKEN_HEADER`] with every render request, so the upstream
    /// can refuse render requests that do not come from a worker. Empty (the default):
    /// none is sent. The gateway never forwards a client's own header of that name.
    pub render_token: String,
}

/// The header that carries `workers.render_token` to the upstream.
pub const RENDER_TOKEN_HEADER: &str = "tessera-render-token";

impl Default for WorkersConfig {
    fn default() -> Self {
        Self {
            embedded: 4,
            concurrency: 16,
            admin_listen: SocketAddr::from(([127, 0, 0, 1], 9091)),
            admin_token: String::new(),
            render_token: String::new(),
        }
    }
}

/// Secrets print as `***` when set.
impl fmt::Debug for WorkersConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let secret = |s: &str| if s.is_empty() { "" } else { "***" };
        f.debug_struct("WorkersConfig")
            .field("embedded", &self.embedded)
            .field("concurrency", &self.concurrency)
            .field("admin_listen", &self.admin_listen)
            .field("admin_token", &secret(&self.admin_token))
            .field("render_token", &secret(&self.render_token))
            .finish()
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
    /// [`background_queue`](super::background_queue).
    #[serde(default)]
    pub queue: String,
    /// At most this many renders of the route at once, over every worker of the
    /// deployment (embedded ones too): a store-held slot per render. A limited route
    /// builds on a queue of its own (default `{store.namespace}.build.{name}`). Default 0:
    /// no limit but the workers' own concurrency.
    #[serde(default)]
    pub max_renders: u32,
    /// At most this many renders of the route start in each second (of the workers'
    /// clocks), over every worker of the deployment. Default 0: no limit.
    #[serde(default)]
    pub renders_per_second: u32,
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
            max_renders: 0,
            renders_per_second: 0,
        }
    }

    /// Whether the route's renders are limited over the deployment (`max_renders` or
    /// `renders_per_second`): its builds then wait for the limit on a queue of its own.
    pub fn limited(&self) -> bool {
        self.max_renders > 0 || self.renders_per_second > 0
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

pub(super) fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let s = String::deserialize(d)?;
    humantime::parse_duration(&s).map_err(|e| {
        serde::de::Error::custom(format!(
            "{s:?} is not a duration ({e}); write e.g. \"250ms\", \"10s\", \"5m\""
        ))
    })
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::config::Config;
    use crate::config::test_support::{err, key_of, route_with};

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
    fn amqp_urls_name_a_host_and_a_real_port() {
        for url in [
            "amqp://h",
            "amqp://h:5672",
            "amqps://u:p@h:5671/vhost?heartbeat=10",
            "amqp://[::1]:5672/%2f",
            "amqp://[::1]",
            "amqp://h?heartbeat=10",
        ] {
            assert!(url.parse::<AmqpUrl>().is_ok(), "{url}");
        }
        for (url, problem) in [
            ("amqp://", "names no host"),
            ("amqp://u:p@/%2f", "names no host"),
            ("amqp://:5672", "names no host"),
            ("amqp://h:0", "port"),
            ("amqp://h:70000/%2f", "port"),
            ("amqp://h:x", "port"),
            ("amqp://[::1/x", "never closes"),
        ] {
            let e = url.parse::<AmqpUrl>().unwrap_err();
            // The URL is not repeated: it may carry a password.
            assert!(e.contains(problem) && !e.contains("u:p"), "{url}: {e}");
        }
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
            amqp: vec![amqp.clone()],
        };
        assert_eq!(distributed.memcached(), Some(&[server][..]));
        assert_eq!(distributed.amqp(), Some(&[amqp][..]));
        // Only the embedded backend is embedded: memcached alone, or with a broker, is not.
        let c = Config::from_toml("[store]\nmemcached = [\"h:1\"]").unwrap();
        assert!(!c.is_embedded());
        assert!(Config::from_toml("").unwrap().is_embedded());
    }
}
