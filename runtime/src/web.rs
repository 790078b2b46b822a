//! The HTTP pieces the gateway and `tessera-worker` share: the accept loop, the response
//! body type, problem responses, and the admin surface both expose (token check,
//! readiness, `/metrics` and the backends' reconnect counters).
//!
//! The accept loop serves HTTP/1.1 and h2c on one port, bounded, with a header-read
//! timeout and graceful shutdown under a deadline.

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
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use tessera_protocol::Backends;

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

/// Most connections served at once; further clients wait in the listen backlog.
pub const MAX_CONNECTIONS: usize = 10_000;
/// A client must send its request headers within this (slow-loris guard).
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// How long shutdown waits for in-flight requests before closing their connections.
pub const DRAIN_DEADLINE: Duration = Duration::from_secs(10);
/// Deadline for each readiness check.
pub const READY_TIMEOUT: Duration = Duration::from_secs(2);

/// Serves `listener` with `handler` until `shutdown` resolves, then drains (bounded by
/// [`DRAIN_DEADLINE`]).
pub async fn serve<H, F>(listener: TcpListener, handler: H, shutdown: impl Future<Output = ()>)
where
    H: Fn(Request<Incoming>, SocketAddr) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<Body>> + Send + 'static,
{
    let drain = Arc::new(Drain::default());
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
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
            handler.clone(),
        ));
    }
    drop(listener);
    close_all(&drain, &slots).await;
}

/// Serves one accepted connection until it closes, holding its `slot` meanwhile.
async fn connection<H, F>(
    stream: tokio::net::TcpStream,
    peer: SocketAddr,
    slot: tokio::sync::OwnedSemaphorePermit,
    drain: Arc<Drain>,
    handler: H,
) where
    H: Fn(Request<Incoming>, SocketAddr) -> F + Send + Sync + 'static,
    F: Future<Output = Response<Body>> + Send + 'static,
{
    let _slot = slot;
    let service = service_fn(move |req| {
        let answer = handler(req, peer);
        async move { Ok::<_, Infallible>(answer.await) }
    });
    // `serve_connection*` borrows the builder, so each connection builds its own.
    let builder = connection_builder();
    let connection = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
    if let Err(e) = drain.watch(connection.into_owned()).await {
        tracing::debug!(%peer, error = %e, "connection ended with an error");
    }
}

/// HTTP/1.1 and h2c, with timers (without one hyper silently skips the header-read
/// timeout).
fn connection_builder() -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT);
    builder.http2().timer(TokioTimer::new());
    builder
}

/// Asks every open connection to close after its request, and waits (at most
/// [`DRAIN_DEADLINE`]) until all did.
async fn close_all(drain: &Drain, slots: &Semaphore) {
    drain.start();
    // Every open connection holds a slot: all are back once every connection closed.
    let all = u32::try_from(MAX_CONNECTIONS).unwrap_or(u32::MAX);
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

    fn watch<C: GracefulConnection>(self: &Arc<Self>, connection: C) -> Draining<C> {
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
        }
    }
}

/// A connection that closes gracefully once its [`Drain`] starts.
struct Draining<C> {
    connection: Pin<Box<C>>,
    drain: Arc<Drain>,
    id: u64,
    waker: Arc<AtomicWaker>,
    /// The waker last registered: a task's waker rarely changes, so most polls skip
    /// registering again.
    registered: Option<std::task::Waker>,
    asked: bool,
}

impl<C: GracefulConnection> Future for Draining<C> {
    type Output = C::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<C::Output> {
        let this = &mut *self;
        // Register before looking at the flag: a start after the look wakes this waker.
        // A waker registered earlier is still held (only `start` takes it), so an
        // unchanged one need not be registered again.
        if !this
            .registered
            .as_ref()
            .is_some_and(|w| w.will_wake(cx.waker()))
        {
            this.waker.register(cx.waker());
            this.registered = Some(cx.waker().clone());
        }
        if !this.asked && this.drain.stopping.load(Ordering::SeqCst) {
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

/// Content type of `/metrics`.
const METRICS_CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Whether `headers` carry the admin `token`: `Authorization: Bearer {token}`, or HTTP
/// Basic with the token as password (how a browser logs in to a dashboard). An empty
/// token admits everyone.
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
    let given = if let Some(bearer) = auth.strip_prefix("Bearer ") {
        bearer.trim().as_bytes().to_vec()
    } else if let Some(basic) = auth.strip_prefix("Basic ") {
        use base64::Engine;
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(basic.trim())
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

/// `/metrics`: everything `registry` holds, collectors included, in the OpenMetrics text
/// format.
pub fn metrics(registry: &Registry) -> Response<Body> {
    let mut out = String::new();
    if let Err(e) = prometheus_client::encoding::text::encode(&mut out, registry) {
        // Writing to a `String` cannot fail; only a collector could report an error.
        tracing::warn!(error = %e, "metrics did not encode");
        out.clear();
        out.push_str("# EOF\n");
    }
    text(StatusCode::OK, METRICS_CONTENT_TYPE, out)
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
                "Store connection resets after connection failures.",
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
        let task = tokio::spawn(serve(listener, handler, async move {
            let _ = stop.await;
        }));
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

    #[test]
    fn backend_reconnects_are_read_at_scrape() {
        let backends = Backends::memory(&tessera_protocol::Config::default());
        let mut registry = Registry::with_prefix("tessera");
        registry.register_collector(Box::new(BackendMetrics::new(backends)));
        let response = metrics(&registry);
        assert_eq!(
            response.headers()[header::CONTENT_TYPE],
            METRICS_CONTENT_TYPE
        );
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        for line in [
            "# HELP tessera_store_reconnects Store connection resets after connection failures.\n",
            "# TYPE tessera_store_reconnects counter\ntessera_store_reconnects_total 0\n",
            "# HELP tessera_bus_reconnects Broker connections re-established after a lost one.\n",
            "# TYPE tessera_bus_reconnects counter\ntessera_bus_reconnects_total 0\n",
        ] {
            assert!(text.contains(line), "missing {line:?} in\n{text}");
        }
        assert!(text.ends_with("# EOF\n"), "{text}");
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
    }
}
