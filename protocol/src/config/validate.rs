//! The rules checked at load that the types alone cannot express, and [`ConfigError`],
//! the refusal that names the key at fault. Each section checks its own keys; a loaded
//! configuration has passed them all, and one built in code passes them through
//! [`Config::validate`].

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use bytesize::ByteSize;

use super::queues::BACKGROUND_SUFFIX;
use super::schema::{
    AccessLogConfig, AmqpUrl, Backend, CacheConfig, FragmentRoute, GatewayConfig, HttpConfig,
    LogConfig, MAX_CONNECTIONS_LIMIT, MAX_NAMESPACE, MAX_RENDERS, MAX_RENDERS_PER_SECOND,
    MAX_ROUTE_NAME, MAX_THREADS, MemcachedServer, OtelConfig, RENDER_TOKEN_HEADER, StoreConfig,
    UpstreamConfig, VarySource, WorkersConfig,
};
use super::{Config, env};

/// Shortest `workers.render_token`: a secret that cannot be guessed.
const MIN_RENDER_TOKEN: usize = 16;
/// Longest `workers.render_token`.
const MAX_RENDER_TOKEN: usize = 256;

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

pub(super) fn invalid(key: impl Into<String>, problem: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        problem: problem.into(),
    }
}

impl Config {
    /// Checks every rule that the types alone cannot express, section by section. URLs
    /// and addresses are valid by their types; a loaded config has passed this already.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.gateway.validate()?;
        self.http.validate()?;
        self.upstream.validate()?;
        self.cache.validate()?;
        self.log.validate()?;
        self.access_log.validate()?;
        self.store.validate()?;
        self.workers.validate(&self.backend)?;
        self.otel.validate()?;
        self.validate_routes()?;
        self.validate_listeners()
    }

    /// That the listeners can all be bound, and the upstream is none of them: addresses
    /// that are set apart in the file but would collide on one host. Worker processes
    /// exist only with a broker; their admin listener is then checked as if they ran
    /// beside the gateway, since one file describes both.
    pub(super) fn validate_listeners(&self) -> Result<(), ConfigError> {
        let mut listeners = vec![
            ("gateway.listen", self.gateway.listen),
            ("gateway.admin_listen", self.gateway.admin_listen),
        ];
        if self.backend.amqp().is_some() {
            listeners.push(("workers.admin_listen", self.workers.admin_listen));
        }
        for (i, &(key, addr)) in listeners.iter().enumerate() {
            if let Some((earlier, other)) = listeners[..i].iter().find(|(_, o)| clash(addr, *o)) {
                return Err(invalid(
                    key,
                    format!(
                        "{addr} collides with {earlier} ({other}): two listeners cannot share a port on one host; give each its own port"
                    ),
                ));
            }
        }
        let upstream = self.upstream.url.uri();
        let port = upstream.port_u16().unwrap_or(80);
        let host = upstream.host().unwrap_or("");
        if let Some((key, addr)) = listeners
            .iter()
            .find(|(_, addr)| addr.port() == port && reaches(host, addr.ip()))
        {
            return Err(invalid(
                "upstream.url",
                format!(
                    "{} is this deployment's own {key} ({addr}): requests would be proxied back to it; point it at the application",
                    self.upstream.url
                ),
            ));
        }
        Ok(())
    }

    /// Each route, and that no two share a name.
    pub(super) fn validate_routes(&self) -> Result<(), ConfigError> {
        let mut names = HashSet::new();
        for (i, r) in self.fragments.iter().enumerate() {
            r.validate(&format!("fragment[{i}]"))?;
            if !names.insert(r.name.as_str()) {
                return Err(invalid(
                    format!("fragment[{i}].name"),
                    format!("{:?} is used by an earlier route", r.name),
                ));
            }
            // The gateway closes render paths and everything below them to the public.
            if !self.gateway.public_render_paths
                && r.render.split('/').all(|s| s.is_empty() || s == ".")
            {
                return Err(invalid(
                    format!("fragment[{i}].render"),
                    format!(
                        "{:?} is the upstream's root: closed to the public as render paths are, it would close every page; give render paths a prefix of their own (\"/_render/…\"), or set gateway.public_render_paths",
                        r.render
                    ),
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
            self.validate_own_queue(i, r)?;
        }
        Ok(())
    }

    /// That a route whose renders are limited shares its queue with no other route: its
    /// builds wait there for the limit, and would hold up the other route's.
    fn validate_own_queue(&self, i: usize, r: &FragmentRoute) -> Result<(), ConfigError> {
        let shared = |other: &FragmentRoute| other.name != r.name && other.queue == r.queue;
        if let Some(j) = self.fragments.iter().position(shared) {
            let (limited, other) = if r.limited() { (i, j) } else { (j, i) };
            if r.limited() || self.fragments[j].limited() {
                return Err(invalid(
                    format!("fragment[{}].queue", limited.max(other)),
                    format!(
                        "{:?} is the queue of fragment[{limited}], whose renders are limited (max_renders, renders_per_second), and of fragment[{other}]: a limited route builds on a queue of its own, so that its builds waiting for the limit hold up no other route's; leave its `queue` out (it then gets \"{{namespace}}.build.{{name}}\") or name another",
                        r.queue
                    ),
                ));
            }
        }
        Ok(())
    }
}

impl Backend {
    /// The rules that tie `store.memcached` and `bus.amqp` together.
    pub(super) fn resolve(
        servers: Vec<MemcachedServer>,
        amqp: Option<Vec<AmqpUrl>>,
    ) -> Result<Self, ConfigError> {
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
}

impl GatewayConfig {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
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

impl HttpConfig {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        positive("http.first_byte_timeout", self.first_byte_timeout)?;
        positive("http.header_timeout", self.header_timeout)?;
        positive("http.idle_timeout", self.idle_timeout)?;
        positive("http.send_timeout", self.send_timeout)?;
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

impl OtelConfig {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        if !self.endpoint.is_empty() {
            let uri = self
                .endpoint
                .parse::<http::Uri>()
                .map_err(|e| invalid("otel.endpoint", format!("not a URL: {e}")))?;
            if uri.scheme_str() != Some("http") || uri.host().is_none() || uri.query().is_some() {
                return Err(invalid(
                    "otel.endpoint",
                    "must be http://host[:port][/path], the collector's OTLP/HTTP base URL",
                ));
            }
        }
        if self.service_name.len() > 255 || self.service_name.chars().any(char::is_control) {
            return Err(invalid(
                "otel.service_name",
                "must be at most 255 bytes, without control characters",
            ));
        }
        if !(0.0..=1.0).contains(&self.sample_ratio) {
            return Err(invalid("otel.sample_ratio", "must be between 0 and 1"));
        }
        Ok(())
    }
}

impl UpstreamConfig {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        positive("upstream.timeout", self.timeout)
    }
}

impl LogConfig {
    /// Accepts what `RUST_LOG` accepts minus span filters: directives separated by commas,
    /// each a level or `module=level` (`module` a Rust path). A bare word that is no level
    /// is refused: `EnvFilter` would read it as a module to log at `trace` with everything
    /// else off, so a typo (`level = "verbose"`) would silence the log.
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        const LEVELS: [&str; 6] = ["error", "warn", "info", "debug", "trace", "off"];
        let is_level = |l: &str| LEVELS.iter().any(|n| n.eq_ignore_ascii_case(l));
        let is_module = |m: &str| {
            !m.is_empty()
                && m.split("::").all(|part| {
                    !part.is_empty()
                        && part
                            .bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
                })
        };
        let bad = self.level.split(',').find(|d| match d.split_once('=') {
            None => !is_level(d),
            Some((module, level)) => !is_module(module) || !is_level(level),
        });
        match bad {
            None => Ok(()),
            Some(d) => Err(invalid(
                "log.level",
                format!(
                    "{d:?} is neither a level (error, warn, info, debug, trace, off) nor \
                     `module=level` (e.g. \"info,tessera_gateway=debug\"; no spaces)"
                ),
            )),
        }
    }
}

impl AccessLogConfig {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        match self.path.as_deref() {
            Some(p) if p.trim().is_empty() => Err(invalid(
                "access_log.path",
                "is empty: name a file or \"stdout\", or leave it out for no access log",
            )),
            _ => Ok(()),
        }
    }
}

impl CacheConfig {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        positive("cache.ttl", self.ttl)
    }
}

impl StoreConfig {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
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
        if self.eject_after == 0 {
            return Err(invalid(
                "store.eject_after",
                "must be at least 1 (calls in a row that fail before a server is judged down)",
            ));
        }
        positive("store.probe_interval", self.probe_interval)?;
        if self.probe_interval > MAX_PROBE_INTERVAL {
            return Err(invalid(
                "store.probe_interval",
                "must be at most 1h: a server out of service is taken back no later than this",
            ));
        }
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
    pub(super) fn validate(&self, backend: &Backend) -> Result<(), ConfigError> {
        Self::validate_capacity(backend, self.embedded, self.concurrency)?;
        admin_needs_token("workers", self.admin_listen, &self.admin_token)?;
        if self.embedded > u16::MAX as usize {
            return Err(invalid("workers.embedded", "must be at most 65535"));
        }
        let token = &self.render_token;
        let token_ok = token.is_empty()
            || ((MIN_RENDER_TOKEN..=MAX_RENDER_TOKEN).contains(&token.len())
                && token
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-._~+/=".contains(&b)));
        if !token_ok {
            return Err(invalid(
                "workers.render_token",
                format!(
                    "must be empty or {MIN_RENDER_TOKEN} to {MAX_RENDER_TOKEN} letters, digits, `-`, `.`, `_`, `~`, `+`, `/` or `=` (e.g. `openssl rand -hex 32`)"
                ),
            ));
        }
        Ok(())
    }

    /// That something can build, and `concurrency` is in range: the rules checked before
    /// `admin_listen`.
    pub(super) fn validate_capacity(
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
        self.validate_delivery(at)?;
        self.validate_limits(at)
    }

    /// `max_renders` and `renders_per_second`.
    fn validate_limits(&self, at: &str) -> Result<(), ConfigError> {
        if self.max_renders > MAX_RENDERS {
            return Err(invalid(
                format!("{at}.max_renders"),
                format!(
                    "{} is over {MAX_RENDERS}: each render in flight holds a store key, and a waiting build reads them all (0: no limit)",
                    self.max_renders
                ),
            ));
        }
        if self.renders_per_second > MAX_RENDERS_PER_SECOND {
            return Err(invalid(
                format!("{at}.renders_per_second"),
                format!(
                    "{} is over {MAX_RENDERS_PER_SECOND} (0: no limit)",
                    self.renders_per_second
                ),
            ));
        }
        Ok(())
    }

    fn validate_name(&self, at: &str) -> Result<(), ConfigError> {
        if !is_route_name(&self.name) {
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
            if !is_param_name(p) {
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
            if matches!(v, VarySource::Header(h) if h == RENDER_TOKEN_HEADER) {
                return Err(invalid(
                    format!("{at}.vary"),
                    format!(
                        "{RENDER_TOKEN_HEADER:?} is the workers' own header (workers.render_token); a client's is never passed on"
                    ),
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

/// Whether `name` can be a route's name: 1 to [`MAX_ROUTE_NAME`] lower-case letters,
/// digits, `-` or `_` (it becomes part of store keys and queue names).
pub fn is_route_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_ROUTE_NAME
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
}

/// Whether `name` can be an allow-listed param: 1 to 64 letters, digits, `-`, `_`, `.`,
/// `[` or `]`.
pub fn is_param_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.[]".contains(&b))
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

/// Whether listeners on `a` and `b` cannot both be bound on one host: the same port (not
/// 0, which picks a free one) on the same address, or on any address when either is the
/// unspecified one (`0.0.0.0` and `[::]` take every address, of both families on a
/// dual-stack host).
fn clash(a: SocketAddr, b: SocketAddr) -> bool {
    a.port() != 0
        && a.port() == b.port()
        && (a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified())
}

/// Whether a connection to `host` (an `upstream.url` host) would reach a listener on `ip`
/// of this host, as far as the name alone says: the same address, a loopback name or
/// address for a loopback or unspecified listener. Other names are not resolved.
fn reaches(host: &str, ip: std::net::IpAddr) -> bool {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let loopback = host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|h| h.is_loopback());
    match host.parse::<std::net::IpAddr>() {
        Ok(h) if h == ip => true,
        _ => loopback && (ip.is_loopback() || ip.is_unspecified()),
    }
}

pub(super) fn parse_addr(key: &str, value: &str) -> Result<SocketAddr, ConfigError> {
    value.parse().map_err(|_| {
        invalid(
            key,
            format!("{value:?} must be an IP address and port, e.g. \"127.0.0.1:8080\""),
        )
    })
}

/// Longest `store.probe_interval`.
const MAX_PROBE_INTERVAL: Duration = Duration::from_secs(3600);

fn positive(key: &str, d: Duration) -> Result<(), ConfigError> {
    if d.is_zero() {
        return Err(invalid(key, "must be greater than zero"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;
    use std::time::Duration;

    use bytesize::ByteSize;

    use super::*;
    use crate::config::test_support::{ROUTE, err, key_of, route_with};

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
    fn the_log_level_takes_levels_and_module_directives() {
        assert_eq!(Config::from_toml("").unwrap().log.level, "info");
        for level in ["warn", "DEBUG", "info,tessera_gateway=debug"] {
            let c = Config::from_toml(&format!("[log]\nlevel = \"{level}\"")).unwrap();
            assert_eq!(c.log.level, level);
        }
    }

    #[test]
    fn the_access_log_is_off_unless_a_path_is_given() {
        let c = Config::from_toml("").unwrap();
        assert_eq!(c.access_log.path, None);
        let c = Config::from_toml("[access_log]\npath = \"stdout\"\nformat = \"json\"").unwrap();
        assert_eq!(c.access_log.path.as_deref(), Some(AccessLogConfig::STDOUT));
        assert_eq!(c.access_log.format, super::super::AccessLogFormat::Json);
        assert!(err("[access_log]\nformat = \"common\"").contains("unknown variant"));
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
            ("[access_log]\npath = \" \"", "access_log.path"),
            ("[log]\nlevel = \"\"", "log.level"),
            ("[log]\nlevel = \"verbose\"", "log.level"),
            ("[log]\nlevel = \"info,tessera_gateway=loud\"", "log.level"),
            ("[log]\nlevel = \"warn, lapin=error\"", "log.level"),
            ("[log]\nlevel = \"info,[span]=debug\"", "log.level"),
            ("[log]\nlevel = \"info,\"", "log.level"),
            ("[cache]\nttl = \"0s\"", "cache.ttl"),
            ("[store]\nmemcached = [\"nohost\"]", "store.memcached[0]"),
            ("[store]\nnamespace = \"a b\"", "store.namespace"),
            ("[store]\ntimeout = \"0ms\"", "store.timeout"),
            ("[store]\nmax_item_size = \"1KiB\"", "store.max_item_size"),
            ("[store]\neject_after = 0", "store.eject_after"),
            ("[store]\nprobe_interval = \"0s\"", "store.probe_interval"),
            ("[store]\nprobe_interval = \"61m\"", "store.probe_interval"),
            ("[otel]\nendpoint = \"collector:4318\"", "otel.endpoint"),
            ("[otel]\nendpoint = \"https://c:4318\"", "otel.endpoint"),
            ("[otel]\nendpoint = \"http://c:4318/?x=1\"", "otel.endpoint"),
            ("[otel]\nservice_name = \"a\\nb\"", "otel.service_name"),
            ("[otel]\nsample_ratio = 1.5", "otel.sample_ratio"),
            ("[otel]\nsample_ratio = -0.1", "otel.sample_ratio"),
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
            ("max_renders = 1000", None),
            ("max_renders = 1001", Some("fragment[0].max_renders")),
            ("renders_per_second = 100000", None),
            (
                "renders_per_second = 100001",
                Some("fragment[0].renders_per_second"),
            ),
            ("render = \"/r#top\"", Some("fragment[0].render")),
            ("render = \"/r x\"", Some("fragment[0].render")),
            ("vary = [\"header:x\", \"cookie:x\"]", None),
        ] {
            let toml = if keys.starts_with("render =") {
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
    fn listeners_that_would_collide_on_one_host_are_refused() {
        const BROKER: &str = "[store]\nmemcached = [\"h:1\"]\n[bus]\namqp = \"amqp://b\"\n";
        for (toml, key, names) in [
            (
                "[gateway]\nlisten = \"127.0.0.1:9090\"".to_string(),
                "gateway.admin_listen",
                "gateway.listen",
            ),
            (
                "[gateway]\nlisten = \"0.0.0.0:9090\"".to_string(),
                "gateway.admin_listen",
                "gateway.listen",
            ),
            (
                "[gateway]\nlisten = \"[::]:7000\"\nadmin_listen = \"127.0.0.1:7000\"".to_string(),
                "gateway.admin_listen",
                "gateway.listen",
            ),
            (
                format!("{BROKER}[workers]\nadmin_listen = \"127.0.0.1:8080\""),
                "workers.admin_listen",
                "gateway.listen",
            ),
            (
                format!("{BROKER}[workers]\nadmin_listen = \"127.0.0.1:9090\""),
                "workers.admin_listen",
                "gateway.admin_listen",
            ),
            (
                "[upstream]\nurl = \"http://127.0.0.1:8080\"".to_string(),
                "upstream.url",
                "gateway.listen",
            ),
            (
                "[upstream]\nurl = \"http://localhost:9090/app\"".to_string(),
                "upstream.url",
                "gateway.admin_listen",
            ),
            (
                "[gateway]\nlisten = \"0.0.0.0:80\"\n[upstream]\nurl = \"http://[::1]\""
                    .to_string(),
                "upstream.url",
                "gateway.listen",
            ),
            (
                format!("{BROKER}[upstream]\nurl = \"http://127.0.0.1:9091\""),
                "upstream.url",
                "workers.admin_listen",
            ),
        ] {
            let msg = err(&toml);
            assert!(
                msg.contains(&format!("`{key}`")) && msg.contains(names),
                "{toml:?} gave {msg:?}, expected key {key} naming {names}"
            );
        }
        for ok in [
            "[gateway]\nlisten = \"127.0.0.2:9090\"",
            "[gateway]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"",
            // Without a broker there are no worker processes, so no worker listener.
            "[workers]\nadmin_listen = \"127.0.0.1:8080\"",
            "[upstream]\nurl = \"http://app:8080\"",
            "[upstream]\nurl = \"http://127.0.0.1:8081\"",
            "[upstream]\nurl = \"http://10.0.0.5:8080\"",
        ] {
            assert!(Config::from_toml(ok).is_ok(), "{ok} was refused");
        }
        // A configuration made in code passes the same rule.
        let mut c = Config::default();
        c.gateway.admin_listen = c.gateway.listen;
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("`gateway.admin_listen`"), "{e}");
    }

    #[test]
    fn render_tokens_are_long_header_safe_secrets() {
        let token = "t".repeat(16);
        let c = Config::from_toml(&format!("[workers]\nrender_token = \"{token}\"")).unwrap();
        assert_eq!(c.workers.render_token, token);
        assert!(
            Config::from_toml("")
                .unwrap()
                .workers
                .render_token
                .is_empty()
        );
        let hex = "0123456789abcdef".repeat(4);
        let b64 = "ab+/cd-_.~EF01==";
        for ok in [hex.as_str(), b64, &"x".repeat(256)] {
            let toml = format!("[workers]\nrender_token = \"{ok}\"");
            assert!(Config::from_toml(&toml).is_ok(), "{ok}");
        }
        for bad in [
            "short",
            &"t".repeat(15),
            "has space 0123456789",
            &"x".repeat(257),
            "new\\nline0123456789",
        ] {
            let toml = format!("[workers]\nrender_token = \"{bad}\"");
            let msg = err(&toml);
            assert!(
                msg.contains("`workers.render_token`") && msg.contains("openssl rand"),
                "{bad:?} gave {msg:?}"
            );
            assert!(!msg.contains(bad), "the secret is not echoed: {msg}");
        }
        let c = Config::from_sources("t", None, |k| {
            (k == env::RENDER_TOKEN).then(|| " from-the-environment ".to_string())
        })
        .unwrap();
        assert_eq!(c.workers.render_token, "from-the-environment");
        let c = Config::from_sources(
            "t",
            Some(&format!("[workers]\nrender_token = \"{token}\"")),
            |k| (k == env::RENDER_TOKEN).then(String::new),
        )
        .unwrap();
        assert!(
            c.workers.render_token.is_empty(),
            "a blank variable turns it off"
        );
        assert!(
            !format!(
                "{:?}",
                Config::from_toml(&format!("[workers]\nrender_token = \"{token}\"")).unwrap()
            )
            .contains(&token)
        );
        assert_eq!(
            key_of(&format!("{ROUTE}vary = [\"header:Tessera-Render-Token\"]")),
            "fragment[0].vary"
        );
    }

    #[test]
    fn render_paths_are_closed_unless_opened() {
        assert!(!Config::default().gateway.public_render_paths);
        let c = Config::from_toml("[gateway]\npublic_render_paths = true").unwrap();
        assert!(c.gateway.public_render_paths);
        // A render path at the root would close every page.
        for root in ["/", "//", "/./"] {
            let toml = format!("[[fragment]]\nname = \"a\"\nrender = \"{root}\"\n");
            assert_eq!(key_of(&toml), "fragment[0].render", "{root}");
            let open = format!("[gateway]\npublic_render_paths = true\n{toml}");
            assert!(Config::from_toml(&open).is_ok(), "{root}");
        }
    }

    #[test]
    fn http_limits_have_defaults_parse_and_are_checked() {
        let d = Config::default().http;
        assert_eq!(d.first_byte_timeout, Duration::from_secs(10));
        assert_eq!(d.header_timeout, Duration::from_secs(10));
        assert_eq!(d.idle_timeout, Duration::from_secs(75));
        assert_eq!(d.send_timeout, Duration::from_secs(60));
        assert_eq!(d.max_connections, 10_000);
        assert_eq!(d.max_header_bytes, ByteSize::kib(64));
        let c = Config::from_toml(
            "[http]\nfirst_byte_timeout = \"2s\"\nheader_timeout = \"5s\"\nidle_timeout = \"1m\"\nsend_timeout = \"30s\"\nmax_connections = 500\nmax_header_bytes = \"16KiB\"",
        )
        .unwrap();
        assert_eq!(c.http.first_byte_timeout, Duration::from_secs(2));
        assert_eq!(c.http.header_timeout, Duration::from_secs(5));
        assert_eq!(c.http.idle_timeout, Duration::from_secs(60));
        assert_eq!(c.http.send_timeout, Duration::from_secs(30));
        assert_eq!(c.http.max_connections, 500);
        assert_eq!(c.http.max_header_bytes, ByteSize::kib(16));
        for (toml, key) in [
            (
                "[http]\nfirst_byte_timeout = \"0s\"",
                "http.first_byte_timeout",
            ),
            ("[http]\nheader_timeout = \"0s\"", "http.header_timeout"),
            ("[http]\nidle_timeout = \"0s\"", "http.idle_timeout"),
            ("[http]\nsend_timeout = \"0s\"", "http.send_timeout"),
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
}
