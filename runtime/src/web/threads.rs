//! One listener served by several threads, each with a single-threaded runtime of its
//! own, as nginx's worker processes serve one listening socket.
//!
//! A multi-threaded runtime hands a request's tasks between threads: the connection's
//! task on one, the memcached connection that answers it on another, woken across by a
//! cross-thread wake and stolen back and forth. Here a connection lives and dies on the
//! thread it was given, and everything its requests start (a memcached connection that
//! thread keeps to, a background rebuild) runs there too. This measured cheaper per
//! memcached hit than one shared runtime (`bench/README.md`, "HTTP threads").
//!
//! - **Balanced.** The caller's runtime accepts, and gives each connection to the thread
//!   with the fewest open: threads that each accepted for themselves on a shared socket
//!   took connections opened at once unevenly, and the busier thread's requests waited.
//! - **One limit.** The `max_connections` slots are shared by all threads.
//! - **Yield before sleeping.** A thread out of work yields its core once before it sleeps
//!   in `epoll_wait`. Beside a busy neighbour on the same cores (the load generator, a
//!   sidecar, the app), the neighbour runs then and sends more, which the thread finds
//!   without sleeping: a sleep and a wake-up per few requests otherwise cost more than
//!   the requests (one per 3.6 L1 hits, against one per 10 for a multi-threaded runtime).
//!   With nothing else to run, the yield returns at once. Measured in
//!   `bench/README.md` (issue 34): the L1 hit went from 0.88× to about 1.03× a plain
//!   hyper server and the memcached hit rose by about 15 %.
//! - **Shutdown.** [`Threads::serve_until`] drains every thread's connections, as
//!   [`serve`](fn@super::serve) does. The threads' runtimes, and whatever their requests
//!   spawned, live on until the [`Threads`] is dropped, so that the caller's own
//!   shutdown (embedded workers finishing a build through a memcached connection a
//!   thread dialed) still has them.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use http::{Request, Response};
use hyper::body::Incoming;
use tokio::net::TcpListener;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_util::sync::{CancellationToken, DropGuard};

use super::body::Body;
use super::drain::Drain;
use super::serve::{ServeOptions, accept, close_all, connection};

/// A connection handed to a thread: the socket (to be registered with the thread's own
/// runtime), its peer and its slot.
type Handed = (std::net::TcpStream, SocketAddr, OwnedSemaphorePermit);

/// A thread's end of the hand-off, and how many connections it has open.
#[derive(Debug)]
struct Lane {
    hand: mpsc::UnboundedSender<Handed>,
    open: Arc<AtomicUsize>,
}

/// Threads serving one listener. Dropping this stops them: they drain their
/// connections, if they were still serving, and their runtimes end.
#[derive(Debug)]
pub struct Threads {
    /// Closed when serving ends.
    listener: Option<TcpListener>,
    slots: Arc<Semaphore>,
    /// Taken (closing every hand-off) when serving ends: each thread then drains.
    lanes: Vec<Lane>,
    /// Cancelled to end the runtimes.
    _keep: DropGuard,
    /// Closed once every thread has drained.
    drained: mpsc::Receiver<()>,
}

impl Threads {
    /// Starts `count` threads (named `{name}-0`, `{name}-1`, …) to serve `listener`'s
    /// connections with `handler`; each runs `on_start` with its index first. Fails only
    /// when a runtime or a thread cannot be created.
    pub fn start<H, F, S>(
        name: &str,
        listener: TcpListener,
        count: usize,
        options: ServeOptions,
        handler: H,
        on_start: S,
    ) -> io::Result<Self>
    where
        H: Fn(Request<Incoming>, SocketAddr) -> F + Clone + Send + Sync + 'static,
        F: Future<Output = Response<Body>> + Send + 'static,
        S: Fn(usize) + Clone + Send + 'static,
    {
        let slots = Arc::new(Semaphore::new(options.http.max_connections));
        let options = Arc::new(options);
        let keep = CancellationToken::new();
        let (drained_tx, drained) = mpsc::channel(1);
        // The guard first: a failure below ends the threads already started.
        let mut threads = Threads {
            listener: Some(listener),
            slots: slots.clone(),
            lanes: Vec::new(),
            _keep: keep.clone().drop_guard(),
            drained,
        };
        for index in 0..count.max(1) {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                // See the module docs, "Yield before sleeping".
                .on_thread_park(std::thread::yield_now)
                .build()?;
            let (hand, handed) = mpsc::unbounded_channel();
            let open = Arc::new(AtomicUsize::new(0));
            let lane = Lane {
                hand,
                open: open.clone(),
            };
            let (slots, options, handler) = (slots.clone(), options.clone(), handler.clone());
            let (keep, drained, on_start) = (keep.clone(), drained_tx.clone(), on_start.clone());
            std::thread::Builder::new()
                .name(format!("{name}-{index}"))
                .spawn(move || {
                    on_start(index);
                    runtime.block_on(async move {
                        let lane = (handed, open);
                        serve_handed(lane, &slots, options, handler).await;
                        drop(drained);
                        keep.cancelled().await;
                    });
                })?;
            threads.lanes.push(lane);
        }
        Ok(threads)
    }

    /// Accepts connections, each given to the thread with the fewest open, until
    /// `shutdown` resolves; then waits for every thread to drain its connections
    /// (bounded by [`DRAIN_DEADLINE`](super::DRAIN_DEADLINE)).
    pub async fn serve_until(&mut self, shutdown: impl Future<Output = ()>) {
        let Some(listener) = self.listener.take() else {
            return;
        };
        tokio::pin!(shutdown);
        loop {
            let accepted = tokio::select! {
                () = &mut shutdown => break,
                accepted = accept(&listener, &self.slots) => accepted,
            };
            let Some((stream, peer, slot)) = accepted else {
                continue;
            };
            // Deregistered here, registered with the thread's runtime there.
            let stream = match stream.into_std() {
                Ok(stream) => stream,
                Err(e) => {
                    tracing::debug!(%peer, error = %e, "accepted connection lost");
                    continue;
                }
            };
            let Some(lane) = self
                .lanes
                .iter()
                .min_by_key(|l| l.open.load(Ordering::Relaxed))
            else {
                break;
            };
            lane.open.fetch_add(1, Ordering::Relaxed);
            // A thread that is gone (its runtime failed) drops the connection.
            let _ = lane.hand.send((stream, peer, slot));
        }
        drop(listener);
        // Closing the hand-offs tells every thread to drain.
        self.lanes.clear();
        while self.drained.recv().await.is_some() {}
    }
}

/// A thread's loop: serves the connections handed to it until the hand-off closes, then
/// drains them.
async fn serve_handed<H, F>(
    (mut handed, open): (mpsc::UnboundedReceiver<Handed>, Arc<AtomicUsize>),
    slots: &Semaphore,
    options: Arc<ServeOptions>,
    handler: H,
) where
    H: Fn(Request<Incoming>, SocketAddr) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<Body>> + Send + 'static,
{
    let drain = Arc::new(Drain::default());
    while let Some((stream, peer, slot)) = handed.recv().await {
        let stream = match tokio::net::TcpStream::from_std(stream) {
            Ok(stream) => stream,
            Err(e) => {
                tracing::warn!(%peer, error = %e, "cannot serve a connection on this thread");
                open.fetch_sub(1, Ordering::Relaxed);
                continue;
            }
        };
        let serving = connection(
            stream,
            peer,
            slot,
            drain.clone(),
            options.clone(),
            handler.clone(),
        );
        let open = open.clone();
        tokio::spawn(async move {
            serving.await;
            open.fetch_sub(1, Ordering::Relaxed);
        });
    }
    close_all(&drain, slots, options.http.max_connections).await;
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;
    use std::time::Duration;

    use tessera_protocol::config::HttpConfig;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;
    use tokio::sync::oneshot;
    use tokio::task::JoinHandle;

    use super::super::full;
    use super::*;

    /// Threads named `test-http-*` answering each request with the name of the thread
    /// that served it, at most `max_connections` connections at once, serving until
    /// told to stop; the task hands the drained threads back.
    async fn start(
        count: usize,
        max_connections: usize,
    ) -> (SocketAddr, oneshot::Sender<()>, JoinHandle<Threads>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let http = HttpConfig {
            max_connections,
            ..HttpConfig::default()
        };
        let handler = |_req, _peer| async {
            let name = std::thread::current().name().unwrap_or("").to_string();
            Response::new(full(name))
        };
        let mut threads = Threads::start(
            "test-http",
            listener,
            count,
            ServeOptions::new(&http),
            handler,
            |_| {},
        )
        .unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            threads
                .serve_until(async move {
                    let _ = stopped.await;
                })
                .await;
            threads
        });
        (addr, stop, task)
    }

    /// Sends one request on `stream` and reads its answer's body (answers are short).
    async fn ask(stream: &mut TcpStream) -> String {
        stream
            .write_all(b"GET / HTTP/1.1\r\nhost: test\r\n\r\n")
            .await
            .unwrap();
        let mut answer = vec![0; 4096];
        let n = stream.read(&mut answer).await.unwrap();
        let answer = String::from_utf8_lossy(&answer[..n]).to_string();
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        answer.rsplit("\r\n\r\n").next().unwrap_or("").to_string()
    }

    #[tokio::test]
    async fn connections_are_spread_over_the_threads_and_shutdown_drains_them() {
        let (addr, stop, task) = start(2, 100).await;
        // Four connections open at once: two on each thread.
        let mut open = Vec::new();
        let mut served_by = Vec::new();
        for _ in 0..4 {
            let mut stream = TcpStream::connect(addr).await.unwrap();
            served_by.push(ask(&mut stream).await);
            open.push(stream);
        }
        let threads: BTreeSet<&str> = served_by.iter().map(String::as_str).collect();
        assert_eq!(
            threads,
            BTreeSet::from(["test-http-0", "test-http-1"]),
            "{served_by:?}"
        );
        for name in ["test-http-0", "test-http-1"] {
            let on_it = served_by.iter().filter(|s| *s == name).count();
            assert_eq!(on_it, 2, "{served_by:?}");
        }
        stop.send(()).unwrap();
        let threads = tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("every thread drained")
            .unwrap();
        // The idle connections were closed, and nothing listens any more.
        for mut stream in open {
            let mut rest = Vec::new();
            let read = tokio::time::timeout(Duration::from_secs(1), stream.read_to_end(&mut rest));
            assert!(
                read.await.is_ok_and(|r| r.is_ok()),
                "a connection stayed open"
            );
        }
        assert!(TcpStream::connect(addr).await.is_err(), "still listening");
        drop(threads);
    }

    #[tokio::test]
    async fn max_connections_counts_over_all_threads() {
        let (addr, _stop, _task) = start(2, 1).await;
        let mut first = TcpStream::connect(addr).await.unwrap();
        ask(&mut first).await;
        // The second connection waits in the backlog while the first holds the slot,
        // though the other thread has none.
        let second = tokio::spawn(async move {
            let mut second = TcpStream::connect(addr).await.unwrap();
            ask(&mut second).await
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!second.is_finished(), "a second connection was served");
        drop(first);
        let answered = tokio::time::timeout(Duration::from_secs(5), second).await;
        assert!(
            answered.is_ok_and(|a| a.is_ok()),
            "the second waited for ever"
        );
    }

    #[tokio::test]
    async fn dropping_the_threads_stops_them() {
        let (addr, _stop, task) = start(2, 100).await;
        ask(&mut TcpStream::connect(addr).await.unwrap()).await;
        task.abort();
        let closed = async {
            while TcpStream::connect(addr).await.is_ok() {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(5), closed)
            .await
            .expect("the listener closed");
    }
}
