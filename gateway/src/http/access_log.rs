//! The access log: one line per request on the public listener, as nginx writes, in the
//! `combined` format (Tessera's fields appended) or as JSON lines (`[access_log]`).
//!
//! It is off by default: [`Front::access_log`](super::Front) is then `None`, and
//! [`super::handle`] pays one branch for it. When on, a request only gathers the line's
//! fields ([`Entry`]) and hands them to a bounded channel without waiting (`try_send`); a
//! thread of its own formats them and writes each batch with one `write`, whenever the
//! channel runs dry. A request never waits for the disk: when the channel is full (the
//! disk is that far behind) the line is dropped, and a throttled warning counts the drops.
//! SIGUSR1 asks the thread to reopen the file, as nginx does after logrotate renamed it.
//!
//! What a line carries besides nginx's fields: the fragment route (`-` for other
//! requests), the `Cache-Status` answered, the upstream's time to its answer's head (`-`
//! when the request did not go upstream), the time to our answer's head, and the trace
//! id. A request that came without a trace (no `traceparent`, no usable `X-Request-Id`)
//! is given an `X-Request-Id`, so that its build request and the upstream see the id the
//! line shows.
//!
//! Never written: cookies, and the values a route varies on. The only headers a line
//! carries are `Referer` and `User-Agent`, and each is written as `-` when any route of
//! the request's configuration varies on it (`vary = ["header:user-agent"]`). The request target is written as sent:
//! its query holds the routes' params, which are public by definition; vary values never
//! come from the query.

use std::io::Write;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError, sync_channel};
use std::time::{Duration, Instant, SystemTime};

use http::{HeaderMap, HeaderValue, Method, Request, Response, Version, header};
use tessera_protocol::config::{AccessLogConfig, AccessLogFormat, VarySource};
use tessera_protocol::{Config, FragmentRoute};

use super::headers;

/// Lines waiting for the writer at most; beyond, lines are dropped.
const QUEUE: usize = 16 * 1024;
/// How often an idle writer looks whether SIGUSR1 asked for a reopen.
const REOPEN_CHECK: Duration = Duration::from_millis(200);
/// A batch is written once it holds this much, even if more lines are waiting.
const BATCH: usize = 64 * 1024;

/// The upstream's time to its answer's head, left on a proxied response for the log.
#[derive(Debug, Clone, Copy)]
pub(crate) struct UpstreamTime(pub Duration);

/// The sending side of the access log, held by the front.
#[derive(Debug)]
pub(crate) struct AccessLog {
    lines: SyncSender<Entry>,
}

/// The writer thread, joined at shutdown so the last lines reach the file.
#[derive(Debug)]
pub(crate) struct Writer {
    thread: std::thread::JoinHandle<()>,
    /// Set by SIGUSR1.
    pub reopen: Arc<AtomicBool>,
}

/// Where lines go.
enum Sink {
    Stdout,
    File(std::fs::File),
}

impl std::fmt::Debug for Sink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Sink::Stdout => "stdout",
            Sink::File(_) => "file",
        })
    }
}

fn open(path: &str) -> std::io::Result<Sink> {
    if path == AccessLogConfig::STDOUT {
        return Ok(Sink::Stdout);
    }
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map(Sink::File)
}

impl Sink {
    fn write_all(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        match self {
            Sink::Stdout => {
                let mut out = std::io::stdout().lock();
                out.write_all(bytes)?;
                out.flush()
            }
            Sink::File(file) => file.write_all(bytes),
        }
    }
}

impl AccessLog {
    /// Opens the log `config.access_log` asks for, and starts its writer; `None` when
    /// it is off.
    pub(crate) fn start(config: &Config) -> std::io::Result<Option<(AccessLog, Writer)>> {
        let Some(path) = config.access_log.path.clone() else {
            return Ok(None);
        };
        let sink = open(&path)?;
        let (lines, rx) = sync_channel(QUEUE);
        let reopen = Arc::new(AtomicBool::new(false));
        let format = config.access_log.format;
        let flag = reopen.clone();
        let thread = std::thread::Builder::new()
            .name("tessera-access-log".into())
            .spawn(move || write_loop(&rx, sink, &path, format, &flag))?;
        Ok(Some((AccessLog { lines }, Writer { thread, reopen })))
    }

    /// The line's fields known before the answer; gives `req` an `X-Request-Id` when it
    /// has no trace of its own.
    pub(crate) fn begin<B>(
        &self,
        config: &Config,
        req: &mut Request<B>,
        peer: SocketAddr,
    ) -> Entry {
        let trace = match headers::given_trace_id(req.headers()) {
            Some(id) => id,
            None => {
                let id = headers::new_trace_id();
                if let Ok(v) = HeaderValue::from_str(&id) {
                    req.headers_mut().insert("x-request-id", v);
                }
                id
            }
        };
        let h = req.headers();
        let route = req
            .uri()
            .path()
            .strip_prefix(config.gateway.fragment_prefix.as_str())
            .and_then(|name| config.route(name))
            .map(|r: &FragmentRoute| r.name.clone());
        Entry {
            time: SystemTime::now(),
            started: Instant::now(),
            peer: peer.ip(),
            method: req.method().clone(),
            target: req.uri().path_and_query().map(|p| p.as_str().to_string()),
            version: req.version(),
            // Checked against the request's configuration: a reload may add such a route.
            referer: header_text(h, header::REFERER, varies_on(config, "referer")),
            user_agent: header_text(h, header::USER_AGENT, varies_on(config, "user-agent")),
            route,
            trace,
            status: 0,
            bytes: None,
            cache: None,
            upstream: None,
            took: Duration::ZERO,
        }
    }

    /// Completes `entry` with what `response` says and hands it to the writer.
    pub(crate) fn finish<B: hyper::body::Body>(&self, mut entry: Entry, response: &Response<B>) {
        entry.took = entry.started.elapsed();
        entry.status = response.status().as_u16();
        entry.bytes = response.body().size_hint().exact();
        entry.cache = response
            .headers()
            .get("cache-status")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        entry.upstream = response.extensions().get::<UpstreamTime>().map(|t| t.0);
        match self.lines.try_send(entry) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                tessera_runtime::warn_throttled!("access log", "access log behind: line dropped");
            }
            // The writer stopped (it cannot write): it said why.
            Err(TrySendError::Disconnected(_)) => {}
        }
    }
}

impl Writer {
    /// Waits (at most `deadline`) for the writer to write what it was handed; it stops
    /// once every [`AccessLog`] is dropped.
    pub(crate) async fn join(self, deadline: Duration) {
        let joined = tokio::task::spawn_blocking(move || self.thread.join());
        if tokio::time::timeout(deadline, joined).await.is_err() {
            tracing::warn!("the access log writer did not stop within {deadline:?}");
        }
    }
}

/// Whether any route of `config` varies on the header `name`.
fn varies_on(config: &Config, name: &str) -> bool {
    config.fragments.iter().any(|r| {
        r.vary
            .iter()
            .any(|v| matches!(v, VarySource::Header(h) if h == name))
    })
}

fn header_text(h: &HeaderMap, name: header::HeaderName, hidden: bool) -> Option<String> {
    if hidden {
        return None;
    }
    h.get(name)
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
}

/// One request's line, before formatting.
#[derive(Debug)]
pub(crate) struct Entry {
    time: SystemTime,
    started: Instant,
    peer: IpAddr,
    method: Method,
    target: Option<String>,
    version: Version,
    status: u16,
    bytes: Option<u64>,
    referer: Option<String>,
    user_agent: Option<String>,
    route: Option<String>,
    cache: Option<String>,
    upstream: Option<Duration>,
    took: Duration,
    trace: String,
}

/// The writer thread: batches what is waiting, writes it, reopens on request; stops when
/// every sender is gone.
fn write_loop(
    rx: &Receiver<Entry>,
    mut sink: Sink,
    path: &str,
    format: AccessLogFormat,
    reopen: &AtomicBool,
) {
    let mut batch = Vec::with_capacity(BATCH);
    loop {
        let first = match rx.recv_timeout(REOPEN_CHECK) {
            Ok(entry) => Some(entry),
            Err(RecvTimeoutError::Timeout) => None,
            Err(RecvTimeoutError::Disconnected) => return,
        };
        if reopen.swap(false, Ordering::Relaxed) {
            match open(path) {
                Ok(s) => sink = s,
                Err(e) => {
                    tracing::warn!(path, error = %e, "cannot reopen the access log; writing on to the old file")
                }
            }
        }
        let mut next = first;
        while let Some(entry) = next {
            format_line(&mut batch, &entry, format);
            next = if batch.len() < BATCH {
                rx.try_recv().ok()
            } else {
                None
            };
        }
        if !batch.is_empty() {
            if let Err(e) = sink.write_all(&batch) {
                tessera_runtime::warn_throttled!("access log", path, error = %e, "cannot write the access log");
            }
            batch.clear();
        }
    }
}

/// Appends `e`'s line to `out`.
fn format_line(out: &mut Vec<u8>, e: &Entry, format: AccessLogFormat) {
    match format {
        AccessLogFormat::Combined => combined(out, e),
        AccessLogFormat::Json => json(out, e),
    }
    out.push(b'\n');
}

fn millis(d: Duration) -> String {
    format!("{:.3}", d.as_secs_f64() * 1000.0)
}

/// `addr - - [10/Oct/2026:13:55:36 +0000] "GET /x HTTP/1.1" 200 512 "referer" "agent"
/// route=r cache="…" upstream_ms=1.234 request_ms=1.500 trace=…`
fn combined(out: &mut Vec<u8>, e: &Entry) {
    let (y, mo, d, h, mi, s) = civil(e.time);
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let month = MONTHS[(mo as usize).saturating_sub(1) % 12];
    let _ = write!(
        out,
        "{} - - [{d:02}/{month}/{y}:{h:02}:{mi:02}:{s:02} +0000] \"",
        e.peer
    );
    quoted(
        out,
        &format!(
            "{} {} {:?}",
            e.method,
            e.target.as_deref().unwrap_or("-"),
            e.version
        ),
    );
    let bytes = e.bytes.map_or("-".to_string(), |b| b.to_string());
    let _ = write!(out, "\" {} {bytes} \"", e.status);
    quoted(out, e.referer.as_deref().unwrap_or("-"));
    out.extend_from_slice(b"\" \"");
    quoted(out, e.user_agent.as_deref().unwrap_or("-"));
    let _ = write!(
        out,
        "\" route={} cache=\"",
        e.route.as_deref().unwrap_or("-")
    );
    quoted(out, e.cache.as_deref().unwrap_or("-"));
    let upstream = e.upstream.map_or("-".to_string(), millis);
    let _ = write!(
        out,
        "\" upstream_ms={upstream} request_ms={} trace={}",
        millis(e.took),
        e.trace
    );
}

/// Text inside double quotes, escaped as nginx does: `"`, `\` and bytes outside printable
/// ASCII as `\xHH`.
fn quoted(out: &mut Vec<u8>, text: &str) {
    for b in text.bytes() {
        if b == b'"' || b == b'\\' || !(0x20..0x7f).contains(&b) {
            let _ = write!(out, "\\x{b:02X}");
        } else {
            out.push(b);
        }
    }
}

fn json(out: &mut Vec<u8>, e: &Entry) {
    let (y, mo, d, h, mi, s) = civil(e.time);
    let line = serde_json::json!({
        "time": format!("{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{s:02}Z"),
        "remote_addr": e.peer.to_string(),
        "method": e.method.as_str(),
        "target": e.target,
        "protocol": format!("{:?}", e.version),
        "status": e.status,
        "bytes": e.bytes,
        "referer": e.referer,
        "user_agent": e.user_agent,
        "route": e.route,
        "cache_status": e.cache,
        "upstream_ms": e.upstream.map(|d| d.as_secs_f64() * 1000.0),
        "request_ms": e.took.as_secs_f64() * 1000.0,
        "trace_id": e.trace,
    });
    let _ = serde_json::to_writer(out, &line);
}

/// UTC year, month, day, hour, minute, second of `t` (Howard Hinnant's days-to-civil).
pub(crate) fn civil(t: SystemTime) -> (i64, u32, u32, u64, u64, u64) {
    let secs = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day, rem / 3600, rem % 3600 / 60, rem % 60)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry() -> Entry {
        Entry {
            // 2026-12-07T19:00:36Z
            time: SystemTime::UNIX_EPOCH + Duration::from_secs(1_796_670_036),
            started: Instant::now(),
            peer: IpAddr::from([10, 0, 0, 1]),
            method: Method::GET,
            target: Some("/fragments/recs?user_id=7".into()),
            version: Version::HTTP_11,
            status: 200,
            bytes: Some(512),
            referer: None,
            user_agent: Some("curl \"8\"".into()),
            route: Some("recs".into()),
            cache: Some("tessera; hit; ttl=9".into()),
            upstream: None,
            took: Duration::from_micros(1500),
            trace: "0af7651916cd43dd8448eb211c80319c".into(),
        }
    }

    #[test]
    fn combined_lines_carry_nginx_fields_then_ours() {
        let mut out = Vec::new();
        format_line(&mut out, &entry(), AccessLogFormat::Combined);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "10.0.0.1 - - [07/Dec/2026:19:00:36 +0000] \"GET /fragments/recs?user_id=7 HTTP/1.1\" \
             200 512 \"-\" \"curl \\x228\\x22\" route=recs cache=\"tessera; hit; ttl=9\" \
             upstream_ms=- request_ms=1.500 trace=0af7651916cd43dd8448eb211c80319c\n"
        );
    }

    #[test]
    fn json_lines_are_one_object() {
        let mut e = entry();
        e.upstream = Some(Duration::from_millis(2));
        let mut out = Vec::new();
        format_line(&mut out, &e, AccessLogFormat::Json);
        assert_eq!(out.last(), Some(&b'\n'));
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["time"], "2026-12-07T19:00:36Z");
        assert_eq!(v["route"], "recs");
        assert_eq!(v["cache_status"], "tessera; hit; ttl=9");
        assert_eq!(v["upstream_ms"], 2.0);
        assert_eq!(v["referer"], serde_json::Value::Null);
        assert_eq!(v["trace_id"], "0af7651916cd43dd8448eb211c80319c");
    }

    #[test]
    fn headers_a_route_varies_on_are_hidden() {
        let mut config = Config::default();
        assert!(!varies_on(&config, "user-agent"));
        let mut route = FragmentRoute::new("me", "/_render/me");
        route.vary = vec!["header:user-agent".parse().unwrap()];
        config.fragments.push(route);
        assert!(varies_on(&config, "user-agent"));
        assert!(!varies_on(&config, "referer"));
    }

    #[test]
    fn civil_dates() {
        let at = |s| civil(SystemTime::UNIX_EPOCH + Duration::from_secs(s));
        assert_eq!(at(0), (1970, 1, 1, 0, 0, 0));
        assert_eq!(at(951_782_400), (2000, 2, 29, 0, 0, 0));
        assert_eq!(at(1_709_251_199), (2024, 2, 29, 23, 59, 59));
    }
}
