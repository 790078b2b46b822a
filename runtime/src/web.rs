//! The HTTP pieces the gateway and `tessera-worker` share: the accept loop, the response
//! body type, problem responses, and the admin surface both expose (token check,
//! readiness, `/metrics` and the backends' reconnect counters).
//!
//! The accept loop serves HTTP/1.1 and h2c on one port with the `[http]` limits: a bound
//! on open connections (counted in a gauge), on the request head (431 past it), and on
//! the time a connection may stay silent or idle (see [`idle`]); and graceful shutdown
//! under a deadline.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures_util::task::AtomicWaker;
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, combinators::BoxBody};
use hyper::body::Incoming;
use hyper::body::{Frame, SizeHint};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulConnection;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use tessera_protocol::Backends;
use tessera_protocol::config::HttpConfig;

mod idle;
mod threads;

pub use threads::Threads;

/// Errors a body stream can end with.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The body of every response: bytes in hand (fragments, problems, placeholders), or a
/// stream (proxied responses). Bytes in hand are not boxed: a cached hit allocates none.
#[derive(Debug)]
pub enum Body {
    /// Bytes in hand.
    Full(Full<Bytes>),
    /// A stream.
    Stream(BoxBody<Bytes, BoxError>),
}

impl hyper::body::Body for Body {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            Body::Full(full) => Pin::new(full)
                .poll_frame(cx)
                .map_err(|never| match never {}),
            Body::Stream(stream) => Pin::new(stream).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Body::Full(full) => full.is_end_stream(),
            Body::Stream(stream) => stream.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Body::Full(full) => full.size_hint(),
            Body::Stream(stream) => stream.size_hint(),
        }
    }
}

/// A body of bytes in hand.
pub fn full(bytes: impl Into<Bytes>) -> Body {
    Body::Full(Full::new(bytes.into()))
}

/// An empty body (304, HEAD).
pub fn empty() -> Body {
    full(Bytes::new())
}

/// A streamed body.
pub fn stream<B>(body: B) -> Body
where
    B: hyper::body::Body<Data = Bytes> + Send + Sync + 'static,
    B::Error: Into<BoxError>,
{
    Body::Stream(body.map_err(Into::into).boxed())
}

/// How long shutdown waits for in-flight requests before closing their connections.
pub const DRAIN_DEADLINE: Duration = Duration::from_secs(10);
/// Deadline for each readiness check.
pub const READY_TIMEOUT: Duration = Duration::from_secs(2);

/// How one listener treats its connections: the `[http]` limits, and a gauge of the
/// connections open on it.
#[derive(Debug, Clone, Default)]
pub struct ServeOptions {
    http: HttpConfig,
    open: Gauge,
}

impl ServeOptions {
    /// The limits of `http`, counting open connections in a gauge nobody reads.
    pub fn new(http: &HttpConfig) -> Self {
        Self {
            http: http.clone(),
            open: Gauge::default(),
        }
    }

    /// Counts open connections in `open`.
    #[must_use]
    pub fn counted_by(mut self, open: Gauge) -> Self {
        self.open = open;
        self
    }
}

/// `tessera_http_connections{listener}`: connections open on each listener.
#[derive(Debug, Clone, Default)]
pub struct ConnectionGauges(Family<ListenerLabels, Gauge>);

/// Labels of [`ConnectionGauges`].
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ListenerLabels {
    listener: &'static str,
}

impl ConnectionGauges {
    /// Registers the family in `registry` (prefixed `tessera`).
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "http_connections",
            "Open HTTP connections by listener",
            self.0.clone(),
        );
    }

    /// The gauge of the listener called `name` (`public`, `admin`).
    pub fn listener(&self, name: &'static str) -> Gauge {
        self.0
            .get_or_create(&ListenerLabels { listener: name })
            .clone()
    }
}

/// Serves `listener` with `handler` until `shutdown` resolves, then drains (bounded by
/// [`DRAIN_DEADLINE`]).
pub async fn serve<H, F>(
    listener: TcpListener,
    options: ServeOptions,
    handler: H,
    shutdown: impl Future<Output = ()>,
) where
    H: Fn(Request<Incoming>, SocketAddr) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<Body>> + Send + 'static,
{
    let drain = Arc::new(Drain::default());
    let max = options.http.max_connections;
    let slots = Arc::new(Semaphore::new(max));
    let options = Arc::new(options);
    tokio::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            () = &mut shutdown => break,
            accepted = accept(&listener, &slots) => accepted,
        };
        let Some((stream, peer, slot)) = accepted else {
            continue;
        };
        tokio::spawn(connection(
            stream,
            peer,
            slot,
            drain.clone(),
            options.clone(),
            handler.clone(),
        ));
    }
    drop(listener);
    close_all(&drain, &slots, max).await;
}

/// Serves one accepted connection until it closes, holding its `slot` meanwhile.
async fn connection<H, F>(
    stream: tokio::net::TcpStream,
    peer: SocketAddr,
    slot: tokio::sync::OwnedSemaphorePermit,
    drain: Arc<Drain>,
    options: Arc<ServeOptions>,
    handler: H,
) where
    H: Fn(Request<Incoming>, SocketAddr) -> F + Send + Sync + 'static,
    F: Future<Output = Response<Body>> + Send + 'static,
{
    let _slot = slot;
    let _open = OpenConnection::count(&options.open);
    let activity = idle::Activity::new();
    let watchdog = idle::Watchdog::new(activity.clone(), &options.http);
    let io = TokioIo::new(idle::Watched::new(stream, activity.clone()));
    let service = service_fn(move |req| {
        let in_flight = activity.begin();
        let answer = handler(req, peer);
        async move {
            let answer = answer.await.map(|body| Counted {
                body,
                _in_flight: in_flight,
            });
            Ok::<_, Infallible>(answer)
        }
    });
    // `serve_connection*` borrows the builder, so each connection builds its own.
    let builder = connection_builder(&options.http);
    let connection = builder.serve_connection_with_upgrades(io, service);
    if let Err(e) = drain.watch(connection.into_owned(), watchdog).await {
        tracing::debug!(%peer, error = %e, "connection ended with an error");
    }
}

/// An answer's body, which keeps its request in flight (for the [`idle`] watchdog) until
/// it is sent or dropped: a long download is not idle time.
struct Counted {
    body: Body,
    _in_flight: idle::InFlight,
}

impl hyper::body::Body for Counted {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// One open connection in a listener's gauge, for as long as it lives.
struct OpenConnection(Gauge);

impl OpenConnection {
    fn count(gauge: &Gauge) -> Self {
        gauge.inc();
        Self(gauge.clone())
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// HTTP/1.1 and h2c with the head bounded by `http.max_header_bytes` (hyper answers 431
/// past it on both). Idle and silent connections are closed by the [`idle`] watchdog,
/// which also times request heads: hyper's own header-read timeout would start on every
/// idle keep-alive connection and close it after `header_timeout` rather than
/// `idle_timeout`, so it is switched off.
fn connection_builder(http: &HttpConfig) -> auto::Builder<TokioExecutor> {
    // Both were checked at load: 8 KiB (hyper's least) to 1 MiB.
    let max_head = usize::try_from(http.max_header_bytes.as_u64()).unwrap_or(usize::MAX);
    let max_list = u32::try_from(http.max_header_bytes.as_u64()).unwrap_or(u32::MAX);
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(None)
        .max_buf_size(max_head.max(8192));
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(max_list);
    builder
}

/// Asks every open connection to close after its request, and waits (at most
/// [`DRAIN_DEADLINE`]) until all did.
async fn close_all(drain: &Drain, slots: &Semaphore, max: usize) {
    drain.start();
    // Every open connection holds a slot: all are back once every connection closed.
    let all = u32::try_from(max).unwrap_or(u32::MAX);
    if tokio::time::timeout(DRAIN_DEADLINE, slots.acquire_many(all))
        .await
        .is_err()
    {
        tracing::warn!("connections still open after {DRAIN_DEADLINE:?}; closing them");
    }
}

/// Asks every open connection to finish the request in hand and close, at shutdown.
///
/// hyper-util's `GracefulShutdown` does this with a watch channel that every connection
/// polls along with itself, on every poll, which measured as a tenth of the CPU a cached
/// hit costs. Here a poll costs an atomic load (and registering the task's waker when it
/// changed), and the list of connections is touched only when one opens or closes.
#[derive(Debug, Default)]
struct Drain {
    stopping: AtomicBool,
    open: Mutex<HashMap<u64, Arc<AtomicWaker>>>,
    next_id: AtomicU64,
}

impl Drain {
    /// Asks every connection, open now or opened later, to close after its request.
    fn start(&self) {
        self.stopping.store(true, Ordering::SeqCst);
        for waker in self
            .open
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
        {
            waker.wake();
        }
    }

    fn watch<C: GracefulConnection>(
        self: &Arc<Self>,
        connection: C,
        watchdog: idle::Watchdog,
    ) -> Draining<C> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let waker = Arc::new(AtomicWaker::new());
        self.open
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(id, waker.clone());
        Draining {
            connection: Box::pin(connection),
            drain: self.clone(),
            id,
            waker,
            registered: None,
            asked: false,
            watchdog,
        }
    }
}

/// A connection that closes gracefully once its [`Drain`] starts, or once its watchdog
/// finds it idle past its deadline.
struct Draining<C> {
    connection: Pin<Box<C>>,
    drain: Arc<Drain>,
    id: u64,
    waker: Arc<AtomicWaker>,
    /// The waker last registered: a task's waker rarely changes, so most polls skip
    /// registering again.
    registered: Option<std::task::Waker>,
    asked: bool,
    watchdog: idle::Watchdog,
}

impl<C> Future for Draining<C>
where
    C: GracefulConnection,
    C::Error: From<std::io::Error>,
{
    type Output = C::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<C::Output> {
        let this = &mut *self;
        // Register before looking at the flag: a start after the look wakes this waker.
        // A waker registered earlier is still held (only `start` takes it), so an
        // unchanged one need not be registered again.
        let new_waker = !this
            .registered
            .as_ref()
            .is_some_and(|w| w.will_wake(cx.waker()));
        if new_waker {
            this.waker.register(cx.waker());
            this.registered = Some(cx.waker().clone());
        }
        let verdict = this.watchdog.check(cx, new_waker);
        if verdict == idle::Verdict::Close {
            let idle = std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "idle connection did not close when asked",
            );
            return Poll::Ready(Err(idle.into()));
        }
        if !this.asked
            && (verdict == idle::Verdict::Shutdown || this.drain.stopping.load(Ordering::SeqCst))
        {
            this.asked = true;
            this.connection.as_mut().graceful_shutdown();
        }
        this.connection.as_mut().poll(cx)
    }
}

impl<C> Drop for Draining<C> {
    fn drop(&mut self) {
        self.drain
            .open
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&self.id);
    }
}

async fn accept(
    listener: &TcpListener,
    slots: &Arc<Semaphore>,
) -> Option<(
    tokio::net::TcpStream,
    SocketAddr,
    tokio::sync::OwnedSemaphorePermit,
)> {
    // The semaphore is never closed, so acquiring only fails if it were.
    let slot = slots.clone().acquire_owned().await.ok()?;
    match listener.accept().await {
        Ok((stream, peer)) => {
            let _ = stream.set_nodelay(true);
            Some((stream, peer, slot))
        }
        Err(e) => {
            // Usually EMFILE: back off instead of spinning on the error.
            tracing::warn!(error = %e, "accept failed");
            tokio::time::sleep(Duration::from_millis(50)).await;
            None
        }
    }
}

/// An RFC 9457 problem response. `code` is a stable machine-readable name.
pub fn problem(status: StatusCode, code: &str, detail: &str) -> Response<Body> {
    let body = serde_json::json!({
        "type": "about:blank",
        "title": status.canonical_reason().unwrap_or("Error"),
        "status": status.as_u16(),
        "detail": detail,
        "code": code,
    });
    text(status, "application/problem+json", body.to_string())
}

/// An uncacheable response of `content_type`.
pub fn text(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Response<Body> {
    let mut r = Response::new(full(body));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

/// An uncacheable JSON response.
pub fn json(status: StatusCode, value: &serde_json::Value) -> Response<Body> {
    text(status, "application/json", value.to_string())
}

/// Content type of `/metrics` in OpenMetrics, served to scrapers that ask for it.
const OPENMETRICS_CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Whether `headers` carry the admin `token`: `Authorization: Bearer {token}`, or HTTP
/// Basic with the token as password (how a browser logs in to a dashboard). The scheme
/// is matched in any case (RFC 9110 §11.1). An empty token admits everyone.
pub fn authorized(headers: &HeaderMap, token: &str) -> bool {
    let token = token.as_bytes();
    if token.is_empty() {
        return true;
    }
    let Some(auth) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    let (scheme, credentials) = auth.trim().split_once(' ').unwrap_or((auth, ""));
    let credentials = credentials.trim();
    let given = if scheme.eq_ignore_ascii_case("bearer") {
        credentials.as_bytes().to_vec()
    } else if scheme.eq_ignore_ascii_case("basic") {
        use base64::Engine;
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(credentials)
            .unwrap_or_default();
        // `user:password`; the user name is not checked.
        match decoded.iter().position(|b| *b == b':') {
            Some(colon) => decoded[colon + 1..].to_vec(),
            None => return false,
        }
    } else {
        return false;
    };
    constant_time_eq(&given, token)
}

/// The 401 for a request without the admin token named by `key`.
pub fn unauthorized(key: &str) -> Response<Body> {
    let mut r = problem(
        StatusCode::UNAUTHORIZED,
        "unauthorized",
        &format!("this admin endpoint needs `Authorization: Bearer <{key}>`"),
    );
    r.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static(r#"Bearer, Basic realm="tessera admin""#),
    );
    r
}

/// What every admin listener checks before routing, `None` meaning go on:
/// - `GET /healthz` answers to anyone: liveness probes carry no token, and it tells
///   nothing but that the process runs;
/// - every other request needs the token `key` names (see [`authorized`]);
/// - a state-changing request must not come from another site (see [`cross_site`]): a
///   browser resends HTTP Basic credentials by itself, so a page elsewhere could
///   otherwise purge or requeue through a logged-in operator's browser.
pub fn admin_gate<B>(req: &Request<B>, token: &str, key: &str) -> Option<Response<Body>> {
    if req.method() == http::Method::GET && req.uri().path() == "/healthz" {
        return Some(alive());
    }
    if !authorized(req.headers(), token) {
        return Some(unauthorized(key));
    }
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .or_else(|| req.uri().authority().map(http::uri::Authority::as_str));
    let why = cross_site(req.method(), host, req.headers())?;
    Some(problem(
        StatusCode::FORBIDDEN,
        "cross_site",
        &format!(
            "cross-site request refused: {why}. Admin requests that change state must come \
             from the dashboard itself, or from a client that sends no Origin or Referer \
             (curl, scripts, `tessera-gateway purge`)"
        ),
    ))
}

/// Why a request that changes state (any method but GET, HEAD and OPTIONS) comes from
/// another site than `host` (the request's `Host`), if it does. It does when
/// `Sec-Fetch-Site` is anything but `same-origin` or `none` (typed by the user), or when
/// `Origin` or `Referer` names another `host:port`. A request without any of them (curl,
/// scripts, the CLI) is not cross-site: no browser sends a state-changing request
/// without `Origin`.
pub fn cross_site(
    method: &http::Method,
    host: Option<&str>,
    headers: &HeaderMap,
) -> Option<String> {
    use http::Method;
    if matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS) {
        return None;
    }
    if let Some(site) = headers.get("sec-fetch-site") {
        let site = site.to_str().unwrap_or("").trim();
        if !(site.eq_ignore_ascii_case("same-origin") || site.eq_ignore_ascii_case("none")) {
            return Some("Sec-Fetch-Site is not same-origin".into());
        }
    }
    for name in [header::ORIGIN, header::REFERER] {
        if let Some(source) = headers.get(&name) {
            let same = source
                .to_str()
                .is_ok_and(|source| host.is_some_and(|host| same_origin(source, host)));
            if !same {
                return Some(format!(
                    "{name} is not this admin listener ({})",
                    host.unwrap_or("no Host")
                ));
            }
        }
    }
    None
}

/// Whether the URL `source` (an `Origin`, or a `Referer` with its path) is on `host`
/// (`host[:port]`), a port left out being the default of `source`'s scheme.
fn same_origin(source: &str, host: &str) -> bool {
    let Some((scheme, rest)) = source.split_once("://") else {
        return false; // `null`, or not a URL
    };
    let default_port = match scheme.to_ascii_lowercase().as_str() {
        "http" => 80,
        "https" => 443,
        _ => return false,
    };
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    let (Ok(theirs), Ok(ours)) = (
        authority.parse::<http::uri::Authority>(),
        host.parse::<http::uri::Authority>(),
    ) else {
        return false;
    };
    theirs.host().eq_ignore_ascii_case(ours.host())
        && theirs.port_u16().unwrap_or(default_port) == ours.port_u16().unwrap_or(default_port)
}

/// Adds what every admin answer carries: no MIME sniffing, never shown in a frame
/// (clickjacking a purge button), and a policy that loads nothing unless the answer set
/// its own (the dashboard does).
pub fn harden(headers: &mut HeaderMap) {
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers
        .entry(header::CONTENT_SECURITY_POLICY)
        .or_insert(HeaderValue::from_static(
            "default-src 'none'; frame-ancestors 'none'",
        ));
}

/// Compares without leaking where the first difference is.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// `("ok" | why, "ok" | why)` for the store and the bus, each bounded by
/// [`READY_TIMEOUT`].
pub async fn readiness(backends: &Backends) -> (String, String) {
    let (store, bus) = tokio::join!(
        tokio::time::timeout(READY_TIMEOUT, backends.store.ping()),
        tokio::time::timeout(READY_TIMEOUT, backends.bus.ping()),
    );
    let verdict = |r: Result<Result<(), String>, tokio::time::error::Elapsed>| match r {
        Ok(Ok(())) => "ok".to_string(),
        Ok(Err(e)) => e,
        Err(_) => format!("no answer within {READY_TIMEOUT:?}"),
    };
    (
        verdict(store.map(|r| r.map_err(|e| e.to_string()))),
        verdict(bus.map(|r| r.map_err(|e| e.to_string()))),
    )
}

/// `/readyz`: 200 when the store and the bus answer, else 503 naming which does not.
pub async fn ready(backends: &Backends) -> Response<Body> {
    let (store, bus) = readiness(backends).await;
    let status = if store == "ok" && bus == "ok" {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    json(status, &serde_json::json!({ "store": store, "bus": bus }))
}

/// `/healthz`: the process answers.
pub fn alive() -> Response<Body> {
    text(StatusCode::OK, "text/plain; charset=utf-8", "ok\n")
}

/// `/metrics`: everything `registry` holds, collectors included, in the format the
/// request's `Accept` asks for (see [`wants_openmetrics`]): the Prometheus text format
/// 0.0.4 by default, which `promtool check metrics` and older scrapers read, or
/// OpenMetrics 1.0.0.
pub fn metrics(registry: &Registry, request: &HeaderMap) -> Response<Body> {
    use prometheus_client::encoding::{prometheus_text, text};
    let openmetrics = wants_openmetrics(request);
    let mut out = String::new();
    let encoded = if openmetrics {
        text::encode(&mut out, registry)
    } else {
        prometheus_text::encode(&mut out, registry)
    };
    if let Err(e) = encoded {
        // Writing to a `String` cannot fail; only a collector could report an error.
        tracing::warn!(error = %e, "metrics did not encode");
        out.clear();
        if openmetrics {
            out.push_str("# EOF\n");
        }
    }
    let content_type = if openmetrics {
        OPENMETRICS_CONTENT_TYPE
    } else {
        prometheus_text::CONTENT_TYPE
    };
    text(StatusCode::OK, content_type, out)
}

/// Whether `Accept` asks for OpenMetrics: `application/openmetrics-text` with a quality
/// above zero and at least that of the Prometheus text format (`text/plain`, `text/*`
/// or `*/*`). Prometheus itself sends both, OpenMetrics first; a request without
/// `Accept`, or one naming only `text/plain`, gets the Prometheus text format.
pub fn wants_openmetrics(request: &HeaderMap) -> bool {
    let (mut openmetrics, mut plain) = (0.0_f32, 0.0_f32);
    let ranges = request
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','));
    for range in ranges {
        let mut parts = range.split(';').map(str::trim);
        let media = parts.next().unwrap_or("").to_ascii_lowercase();
        let quality = parts
            .filter_map(|p| p.split_once('='))
            .find(|(k, _)| k.trim().eq_ignore_ascii_case("q"))
            .map_or(1.0, |(_, q)| q.trim().parse().unwrap_or(0.0));
        match media.as_str() {
            "application/openmetrics-text" => openmetrics = openmetrics.max(quality),
            "text/plain" | "text/*" | "*/*" => plain = plain.max(quality),
            _ => {}
        }
    }
    openmetrics > 0.0 && openmetrics >= plain
}

/// The backends' reconnect counters, read at each scrape: `{prefix}_store_reconnects` and
/// `{prefix}_bus_reconnects`. Register it in a registry prefixed `tessera`.
#[derive(Debug, Clone)]
pub struct BackendMetrics {
    backends: Backends,
}

impl BackendMetrics {
    /// Reads the counters of `backends`.
    pub fn new(backends: Backends) -> Self {
        Self { backends }
    }
}

impl Collector for BackendMetrics {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        for (name, help, value) in [
            (
                "store_reconnects",
                "Store calls that failed on their connection (dropped and dialed anew).",
                self.backends.store.reconnects(),
            ),
            (
                "bus_reconnects",
                "Broker connections re-established after a lost one.",
                self.backends.bus.reconnects(),
            ),
        ] {
            let counter = ConstCounter::new(value);
            let metric = encoder.encode_descriptor(name, help, None, counter.metric_type())?;
            counter.encode(metric)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Serves answers that take `delay` on a free port until `stop` fires; returns the
    /// address and the serving task.
    async fn server(
        delay: Duration,
        stop: tokio::sync::oneshot::Receiver<()>,
    ) -> (SocketAddr, tokio::task::JoinHandle<()>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let handler = move |_req, _peer| async move {
            tokio::time::sleep(delay).await;
            Response::new(full("done"))
        };
        let task = tokio::spawn(serve(
            listener,
            ServeOptions::default(),
            handler,
            async move {
                let _ = stop.await;
            },
        ));
        (addr, task)
    }

    async fn send_request(stream: &mut tokio::net::TcpStream) {
        stream
            .write_all(b"GET / HTTP/1.1\r\nhost: test\r\n\r\n")
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn shutdown_finishes_the_request_in_hand_then_closes() {
        let (stop_tx, stop) = tokio::sync::oneshot::channel();
        let (addr, task) = server(Duration::from_millis(500), stop).await;
        let mut busy = tokio::net::TcpStream::connect(addr).await.unwrap();
        send_request(&mut busy).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        let started = Instant::now();
        stop_tx.send(()).unwrap();
        let mut answer = String::new();
        tokio::time::timeout(Duration::from_secs(5), busy.read_to_string(&mut answer))
            .await
            .expect("the connection is closed after its answer")
            .unwrap();
        assert!(answer.starts_with("HTTP/1.1 200 OK"), "{answer}");
        assert!(answer.ends_with("done"), "the whole answer: {answer}");
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("serve returns once the connection closed")
            .unwrap();
        assert!(started.elapsed() < DRAIN_DEADLINE);
    }

    #[tokio::test]
    async fn shutdown_closes_idle_connections_at_once() {
        let (stop_tx, stop) = tokio::sync::oneshot::channel();
        let (addr, task) = server(Duration::ZERO, stop).await;
        // One connection that answered a request and is kept alive, one that never sent
        // anything: neither may hold the shutdown.
        let mut idle = tokio::net::TcpStream::connect(addr).await.unwrap();
        send_request(&mut idle).await;
        let mut buf = [0; 1024];
        let n = idle.read(&mut buf).await.unwrap();
        assert!(buf[..n].starts_with(b"HTTP/1.1 200 OK"));
        let _silent = tokio::net::TcpStream::connect(addr).await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        let started = Instant::now();
        stop_tx.send(()).unwrap();
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("serve returns without waiting for idle connections")
            .unwrap();
        assert!(started.elapsed() < Duration::from_secs(2));
        assert_eq!(
            idle.read(&mut buf).await.unwrap(),
            0,
            "the idle connection is closed"
        );
    }

    /// Short limits, so that the tests below wait little.
    fn short_limits() -> HttpConfig {
        HttpConfig {
            first_byte_timeout: Duration::from_millis(300),
            header_timeout: Duration::from_millis(300),
            idle_timeout: Duration::from_millis(300),
            max_header_bytes: tessera_protocol::config::ByteSize::kib(16),
            ..HttpConfig::default()
        }
    }

    /// Like [`server`], with `options`; the server stops when the test's runtime does.
    async fn limited_server(options: ServeOptions, delay: Duration) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let handler = move |_req, _peer| async move {
            tokio::time::sleep(delay).await;
            Response::new(full("done"))
        };
        tokio::spawn(serve(listener, options, handler, std::future::pending()));
        addr
    }

    /// Reads until the server closes `stream`; panics if it has not within 5 s.
    async fn closed_by_server(stream: &mut tokio::net::TcpStream, what: &str) -> Vec<u8> {
        let mut seen = Vec::new();
        match tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut seen)).await {
            Ok(Ok(_)) => {}
            // A reset is a close too.
            Ok(Err(e)) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}"),
            Err(_) => panic!("{what}: still open after 5 s"),
        }
        seen
    }

    /// The client half of an h2c connection to `addr`, its connection driven by a task
    /// that ends when the server closes it.
    async fn h2_client(
        addr: SocketAddr,
    ) -> (
        hyper::client::conn::http2::SendRequest<http_body_util::Empty<Bytes>>,
        tokio::task::JoinHandle<()>,
    ) {
        let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (sender, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
                .await
                .unwrap();
        let task = tokio::spawn(async move {
            let _ = conn.await;
        });
        (sender, task)
    }

    #[tokio::test]
    async fn silent_connections_are_closed() {
        let addr = limited_server(ServeOptions::new(&short_limits()), Duration::ZERO).await;
        let mut silent = tokio::net::TcpStream::connect(addr).await.unwrap();
        closed_by_server(&mut silent, "a connection that sent nothing").await;
        // A first byte that leaves the protocol undecided (a prefix of the h2 preface).
        let mut stalled = tokio::net::TcpStream::connect(addr).await.unwrap();
        stalled.write_all(b"PRI * HT").await.unwrap();
        closed_by_server(&mut stalled, "a connection that sent 8 bytes").await;
        // Slow loris: a request head begun and never finished.
        let mut loris = tokio::net::TcpStream::connect(addr).await.unwrap();
        loris
            .write_all(b"GET / HTTP/1.1\r\nhost: te")
            .await
            .unwrap();
        closed_by_server(&mut loris, "a connection with half a request head").await;
    }

    #[tokio::test]
    async fn h2c_connections_without_a_request_are_closed() {
        let addr = limited_server(ServeOptions::new(&short_limits()), Duration::ZERO).await;
        let mut preface = tokio::net::TcpStream::connect(addr).await.unwrap();
        preface
            .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
            .await
            .unwrap();
        closed_by_server(&mut preface, "a connection that sent only the h2 preface").await;
        // The preface and an empty SETTINGS frame: a handshake, then nothing.
        let mut settings = tokio::net::TcpStream::connect(addr).await.unwrap();
        settings
            .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0")
            .await
            .unwrap();
        closed_by_server(&mut settings, "a connection that sent only its settings").await;
    }

    #[tokio::test]
    async fn idle_keep_alive_connections_are_closed() {
        let addr = limited_server(ServeOptions::new(&short_limits()), Duration::ZERO).await;
        let mut h1 = tokio::net::TcpStream::connect(addr).await.unwrap();
        send_request(&mut h1).await;
        let answer = closed_by_server(&mut h1, "an idle HTTP/1.1 connection").await;
        assert!(answer.starts_with(b"HTTP/1.1 200 OK"));
        let (mut h2, conn) = h2_client(addr).await;
        let request = Request::get("http://test/")
            .body(http_body_util::Empty::new())
            .unwrap();
        assert_eq!(h2.send_request(request).await.unwrap().status(), 200);
        tokio::time::timeout(Duration::from_secs(5), conn)
            .await
            .expect("an idle HTTP/2 connection is closed")
            .unwrap();
    }

    #[tokio::test]
    async fn a_request_in_flight_outlasts_the_idle_timeout() {
        let limits = short_limits();
        let slow = limits.idle_timeout * 3;
        let addr = limited_server(ServeOptions::new(&limits), slow).await;
        let mut h1 = tokio::net::TcpStream::connect(addr).await.unwrap();
        send_request(&mut h1).await;
        let answer = closed_by_server(&mut h1, "a connection after its answer").await;
        let answer = String::from_utf8_lossy(&answer);
        assert!(answer.starts_with("HTTP/1.1 200 OK"), "{answer}");
        assert!(answer.ends_with("done"), "{answer}");
    }

    #[tokio::test]
    async fn headers_past_the_limit_are_answered_431() {
        let addr = limited_server(ServeOptions::new(&short_limits()), Duration::ZERO).await;
        let big = "x".repeat(40 * 1024);
        let mut h1 = tokio::net::TcpStream::connect(addr).await.unwrap();
        let head = format!("GET / HTTP/1.1\r\nhost: test\r\nx-big: {big}\r\n\r\n");
        let (mut reader, mut writer) = h1.split();
        // The server may answer and close before it has read everything.
        let (_, answer) = tokio::join!(writer.write_all(head.as_bytes()), async {
            let mut seen = Vec::new();
            let _ = tokio::time::timeout(Duration::from_secs(5), reader.read_to_end(&mut seen))
                .await
                .expect("the connection is answered and closed");
            seen
        });
        let answer = String::from_utf8_lossy(&answer);
        assert!(answer.starts_with("HTTP/1.1 431"), "{answer}");

        let (mut h2, _conn) = h2_client(addr).await;
        let request = Request::get("http://test/")
            .header("x-big", &big)
            .body(http_body_util::Empty::new())
            .unwrap();
        assert_eq!(h2.send_request(request).await.unwrap().status(), 431);
        let fine = Request::get("http://test/")
            .header("x-big", &big[..1024])
            .body(http_body_util::Empty::new())
            .unwrap();
        assert_eq!(h2.send_request(fine).await.unwrap().status(), 200);
    }

    #[tokio::test]
    async fn open_connections_are_counted() {
        let gauges = ConnectionGauges::default();
        let options =
            ServeOptions::new(&HttpConfig::default()).counted_by(gauges.listener("public"));
        let addr = limited_server(options, Duration::ZERO).await;
        let gauge = gauges.listener("public");
        let eventually = |want: i64| {
            let gauge = gauge.clone();
            async move {
                for _ in 0..250 {
                    if gauge.get() == want {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                panic!("open connections: {} instead of {want}", gauge.get());
            }
        };
        let mut open = Vec::new();
        for _ in 0..3 {
            let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
            send_request(&mut c).await;
            let mut buf = [0; 256];
            assert!(c.read(&mut buf).await.unwrap() > 0);
            open.push(c);
        }
        eventually(3).await;
        open.pop();
        eventually(2).await;
        open.clear();
        eventually(0).await;
        let mut registry = Registry::with_prefix("tessera");
        gauges.register(&mut registry);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        assert!(
            text.contains("tessera_http_connections{listener=\"public\"} 0\n"),
            "{text}"
        );
    }

    /// The `/metrics` answer to a request with `accept`: its content type and body.
    async fn scrape(registry: &Registry, accept: Option<&'static str>) -> (String, String) {
        let mut request = HeaderMap::new();
        if let Some(accept) = accept {
            request.insert(header::ACCEPT, HeaderValue::from_static(accept));
        }
        let response = metrics(registry, &request);
        let content_type = response.headers()[header::CONTENT_TYPE]
            .to_str()
            .unwrap()
            .to_string();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        (content_type, String::from_utf8(body.to_vec()).unwrap())
    }

    #[tokio::test]
    async fn backend_reconnects_are_read_at_scrape() {
        let backends = Backends::memory(&tessera_protocol::Config::default());
        let mut registry = Registry::with_prefix("tessera");
        registry.register_collector(Box::new(BackendMetrics::new(backends)));
        let (content_type, text) = scrape(&registry, Some("application/openmetrics-text")).await;
        assert_eq!(content_type, OPENMETRICS_CONTENT_TYPE);
        for line in [
            "# HELP tessera_store_reconnects Store calls that failed on their connection (dropped and dialed anew).\n",
            "# TYPE tessera_store_reconnects counter\ntessera_store_reconnects_total 0\n",
            "# HELP tessera_bus_reconnects Broker connections re-established after a lost one.\n",
            "# TYPE tessera_bus_reconnects counter\ntessera_bus_reconnects_total 0\n",
        ] {
            assert!(text.contains(line), "missing {line:?} in\n{text}");
        }
        assert!(text.ends_with("# EOF\n"), "{text}");
    }

    #[tokio::test]
    async fn metrics_are_prometheus_text_unless_openmetrics_is_asked_for() {
        let backends = Backends::memory(&tessera_protocol::Config::default());
        let mut registry = Registry::with_prefix("tessera");
        registry.register_collector(Box::new(BackendMetrics::new(backends)));
        for accept in [
            None,
            Some("text/plain"),
            Some("*/*"),
            Some("text/plain;version=0.0.4"),
        ] {
            let (content_type, text) = scrape(&registry, accept).await;
            assert_eq!(
                content_type, "text/plain; version=0.0.4; charset=utf-8",
                "{accept:?}"
            );
            // The 0.0.4 format describes a counter under its sample's name, and has no EOF.
            assert!(
                text.contains("# HELP tessera_store_reconnects_total Store calls that failed on their connection (dropped and dialed anew).\n# TYPE tessera_store_reconnects_total counter\ntessera_store_reconnects_total 0\n"),
                "{accept:?}: {text}"
            );
            assert!(!text.contains("# EOF"), "{accept:?}: {text}");
        }
        let (content_type, text) = scrape(&registry, Some("application/openmetrics-text")).await;
        assert!(content_type.starts_with("application/openmetrics-text"));
        assert!(text.ends_with("# EOF\n"), "{text}");
    }

    #[test]
    fn accept_negotiates_openmetrics_by_quality() {
        let asks = |accept: &'static str| {
            let mut h = HeaderMap::new();
            h.insert(header::ACCEPT, HeaderValue::from_static(accept));
            wants_openmetrics(&h)
        };
        // What Prometheus 2.x sends by default.
        assert!(asks(
            "application/openmetrics-text;version=1.0.0;q=0.5,application/openmetrics-text;version=0.0.1;q=0.4,text/plain;version=0.0.4;q=0.3,*/*;q=0.2"
        ));
        assert!(asks("Application/OpenMetrics-Text; version=1.0.0"));
        assert!(asks("text/plain;q=0.5, application/openmetrics-text"));
        assert!(!asks("text/plain, application/openmetrics-text;q=0.5"));
        assert!(!asks("application/openmetrics-text;q=0"));
        assert!(!asks("text/plain"));
        assert!(!asks("*/*"));
        assert!(!wants_openmetrics(&HeaderMap::new()));
    }

    #[test]
    fn token_comparison() {
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(!constant_time_eq(b"secret", b"secreT"));
        assert!(!constant_time_eq(b"secret", b"secret2"));
        assert!(!constant_time_eq(b"", b"x"));
    }

    #[test]
    fn bearer_and_basic_tokens() {
        let with = |v: &str| {
            let mut h = HeaderMap::new();
            h.insert(header::AUTHORIZATION, HeaderValue::from_str(v).unwrap());
            h
        };
        assert!(authorized(&HeaderMap::new(), ""));
        assert!(!authorized(&HeaderMap::new(), "s3cret"));
        assert!(authorized(&with("Bearer s3cret"), "s3cret"));
        assert!(!authorized(&with("Bearer s3cre"), "s3cret"));
        // "admin:s3cret"
        assert!(authorized(&with("Basic YWRtaW46czNjcmV0"), "s3cret"));
        // "admin:nope"
        assert!(!authorized(&with("Basic YWRtaW46bm9wZQ=="), "s3cret"));
        assert!(!authorized(&with("Token s3cret"), "s3cret"));
        // The scheme in any case (RFC 9110 §11.1).
        assert!(authorized(&with("bearer s3cret"), "s3cret"));
        assert!(authorized(&with("BEARER  s3cret "), "s3cret"));
        assert!(authorized(&with("basic YWRtaW46czNjcmV0"), "s3cret"));
        assert!(!authorized(&with("bearers3cret"), "s3cret"));
    }

    #[test]
    fn cross_site_requests() {
        use http::Method;
        let with = |pairs: &[(&'static str, &'static str)]| {
            let mut h = HeaderMap::new();
            for (k, v) in pairs {
                h.insert(*k, HeaderValue::from_static(v));
            }
            h
        };
        let host = Some("127.0.0.1:9090");
        let refused = |method: Method, pairs| cross_site(&method, host, &with(pairs)).is_some();
        for hostile in [
            &[("origin", "http://evil.example")][..],
            &[("origin", "null")],
            &[("origin", "http://127.0.0.1:9091")],
            &[("origin", "http://127.0.0.1")],
            &[
                ("origin", "http://127.0.0.1:9090"),
                ("sec-fetch-site", "same-site"),
            ],
            &[("sec-fetch-site", "cross-site")],
            &[("referer", "http://evil.example/admin?x")],
            &[("referer", "http://127.0.0.1:9090.evil.example/")],
        ] {
            assert!(refused(Method::POST, hostile), "{hostile:?}");
            assert!(refused(Method::DELETE, hostile), "{hostile:?}");
            assert!(!refused(Method::GET, hostile), "reads are not refused");
        }
        for fine in [
            &[][..],
            &[("origin", "http://127.0.0.1:9090")],
            &[
                ("origin", "HTTP://127.0.0.1:9090"),
                ("sec-fetch-site", "same-origin"),
            ],
            &[("sec-fetch-site", "none")],
            &[("referer", "http://127.0.0.1:9090/?x=1")],
        ] {
            assert!(!refused(Method::POST, fine), "{fine:?}");
        }
        // Default ports count as written.
        let plain = with(&[("origin", "https://admin.example")]);
        assert!(cross_site(&Method::PUT, Some("admin.example:443"), &plain).is_none());
        assert!(cross_site(&Method::PUT, Some("admin.example"), &plain).is_none());
        assert!(cross_site(&Method::PUT, None, &plain).is_some());
    }
}
