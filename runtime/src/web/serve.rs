//! The accept loop and the connections it serves: HTTP/1.1 and h2c on one port with the
//! `[http]` limits, a bound on open connections (each holding a slot, and counted in the
//! listener's gauge), and at shutdown a drain bounded by [`DRAIN_DEADLINE`].

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use hyper::body::{Frame, Incoming, SizeHint};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use prometheus_client::metrics::gauge::Gauge;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use tessera_protocol::config::HttpConfig;

use super::body::{Body, BoxError};
use super::drain::Drain;
use super::idle;

/// Most bytes an HTTP/2 stream holds unsent.
const MAX_SEND_BUF: usize = 64 * 1024;

/// How long shutdown waits for in-flight requests before closing their connections.
pub const DRAIN_DEADLINE: Duration = Duration::from_secs(10);

/// How one listener treats its connections: the `[http]` limits, and a gauge of the
/// connections open on it.
#[derive(Debug, Clone, Default)]
pub struct ServeOptions {
    pub(super) http: HttpConfig,
    pub(super) open: Gauge,
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
pub(super) async fn connection<H, F>(
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
                in_flight,
                waiting: false,
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
/// it is sent or dropped: a long download is not idle time. It tells the watchdog when it
/// hands a frame out and when it is asked for the next, so an answer the client does not
/// take is found out.
struct Counted {
    body: Body,
    in_flight: idle::InFlight,
    /// A frame was handed out and the next not asked for yet.
    waiting: bool,
}

impl Counted {
    /// No longer waiting to be asked for the next frame.
    fn followed(&mut self) {
        if std::mem::take(&mut self.waiting) {
            self.in_flight.activity().frame_followed();
        }
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.followed();
    }
}

impl hyper::body::Body for Counted {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.followed();
        let polled = Pin::new(&mut self.body).poll_frame(cx);
        if let Poll::Ready(Some(Ok(_))) = &polled {
            self.in_flight.activity().frame_out();
            self.waiting = true;
        }
        polled
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
        .max_header_list_size(max_list)
        // What one HTTP/2 stream may hold unsent (hyper's default is 400 KiB): a client that
        // opens no flow-control window pins at most this per stream until send_timeout.
        .max_send_buf_size(MAX_SEND_BUF);
    builder
}

/// Asks every open connection to close after its request, and waits (at most
/// [`DRAIN_DEADLINE`]) until all did.
pub(super) async fn close_all(drain: &Drain, slots: &Semaphore, max: usize) {
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

pub(super) async fn accept(
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::web::{ConnectionGauges, full};
    use prometheus_client::registry::Registry;
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
    async fn a_head_begun_is_due_at_header_timeout_whatever_first_byte_timeout() {
        let limits = HttpConfig {
            first_byte_timeout: Duration::from_secs(30),
            ..short_limits()
        };
        let addr = limited_server(ServeOptions::new(&limits), Duration::ZERO).await;
        let mut loris = tokio::net::TcpStream::connect(addr).await.unwrap();
        loris
            .write_all(b"GET / HTTP/1.1\r\nhost: te")
            .await
            .unwrap();
        closed_by_server(
            &mut loris,
            "half a request head, long before first_byte_timeout",
        )
        .await;
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
}
