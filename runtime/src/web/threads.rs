//! One listener served by several threads, each with a single-threaded runtime of its
//! own, as nginx's worker processes share one listening socket.
//!
//! A multi-threaded runtime hands a request's tasks between threads: the connection's
//! task on one, the memcached connection that answers it on another, woken across by a
//! cross-thread wake and stolen back and forth. Here a connection lives and dies on the
//! thread that accepted it, and everything its requests start (a memcached connection
//! that thread keeps to, a background rebuild) runs there too. On the memcached hit
//! path this cut the gateway's CPU per hit from 18–20 µs to 15–16 µs
//! (`bench/README.md`, "HTTP threads").
//!
//! - **Sharing the listener.** Every thread accepts on the same socket; a busy thread
//!   is not there to take a new connection, so connections go to the ones that are.
//! - **One limit.** The `max_connections` slots are shared by all threads.
//! - **Shutdown.** [`Threads::serve_until`] drains every thread's connections, as
//!   [`serve`](super::serve) does. The threads' runtimes, and whatever their requests
//!   spawned, live on until the [`Threads`] is dropped, so that the caller's own
//!   shutdown (embedded workers finishing a build through a memcached connection a
//!   thread dialed) still has them.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

use http::{Request, Response};
use hyper::body::Incoming;
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, mpsc};
use tokio_util::sync::{CancellationToken, DropGuard};

use super::{Body, ServeOptions, accept_loop};

/// Threads serving one listener. Dropping this stops them: they drain their
/// connections, if they were still serving, and their runtimes end.
#[derive(Debug)]
pub struct Threads {
    /// Cancelled to stop accepting and drain.
    stop: Option<DropGuard>,
    /// Cancelled to end the runtimes.
    _keep: DropGuard,
    /// Closed once every thread has drained.
    drained: mpsc::Receiver<()>,
}

impl Threads {
    /// Starts `count` threads (named `{name}-0`, `{name}-1`, …) serving `listener` with
    /// `handler`; each runs `on_start` with its index first. Fails only when a runtime or
    /// a thread cannot be created.
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
        let listener = listener.into_std()?;
        let slots = Arc::new(Semaphore::new(options.http.max_connections));
        let options = Arc::new(options);
        let (stop, keep) = (CancellationToken::new(), CancellationToken::new());
        let (serving, drained) = mpsc::channel(1);
        // Guards first: a failure below stops the threads already started.
        let threads = Threads {
            stop: Some(stop.clone().drop_guard()),
            _keep: keep.clone().drop_guard(),
            drained,
        };
        for index in 0..count.max(1) {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            // Registered with the thread's own runtime, whose I/O driver polls it.
            let listener = {
                let _in = runtime.enter();
                TcpListener::from_std(listener.try_clone()?)?
            };
            let (slots, options, handler) = (slots.clone(), options.clone(), handler.clone());
            let (stop, keep, serving, on_start) = (
                stop.clone(),
                keep.clone(),
                serving.clone(),
                on_start.clone(),
            );
            std::thread::Builder::new()
                .name(format!("{name}-{index}"))
                .spawn(move || {
                    on_start(index);
                    runtime.block_on(async move {
                        let stopped = stop.cancelled_owned();
                        accept_loop(listener, slots, options, handler, stopped).await;
                        drop(serving);
                        keep.cancelled().await;
                    });
                })?;
        }
        Ok(threads)
    }

    /// Serves until `shutdown` resolves, then waits for every thread to drain its
    /// connections (bounded by [`DRAIN_DEADLINE`](super::DRAIN_DEADLINE)).
    pub async fn serve_until(&mut self, shutdown: impl Future<Output = ()>) {
        shutdown.await;
        drop(self.stop.take());
        // Every thread holds a sender until it has drained.
        while self.drained.recv().await.is_some() {}
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tessera_protocol::config::HttpConfig;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    use super::super::full;
    use super::*;

    /// Threads named `test-http-*` answering each request with the name of the thread
    /// that served it, at most `max_connections` connections at once.
    async fn start(count: usize, max_connections: usize) -> (Threads, SocketAddr) {
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
        let threads = Threads::start(
            "test-http",
            listener,
            count,
            ServeOptions::new(&http),
            handler,
            |_| {},
        )
        .unwrap();
        (threads, addr)
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
    async fn requests_are_served_on_the_threads_and_shutdown_drains_them() {
        let (mut threads, addr) = start(2, 100).await;
        for _ in 0..8 {
            let mut stream = TcpStream::connect(addr).await.unwrap();
            let served_by = ask(&mut stream).await;
            assert!(served_by.starts_with("test-http-"), "{served_by:?}");
        }
        let mut open = TcpStream::connect(addr).await.unwrap();
        ask(&mut open).await;
        tokio::time::timeout(Duration::from_secs(5), threads.serve_until(async {}))
            .await
            .expect("every thread drained");
        // The idle connection was closed, and nothing listens any more.
        let mut rest = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(1), open.read_to_end(&mut rest));
        assert!(
            read.await.is_ok_and(|r| r.is_ok()),
            "the connection stayed open"
        );
        assert!(TcpStream::connect(addr).await.is_err(), "still listening");
    }

    #[tokio::test]
    async fn max_connections_counts_over_all_threads() {
        let (_threads, addr) = start(2, 1).await;
        let mut first = TcpStream::connect(addr).await.unwrap();
        ask(&mut first).await;
        // The second connection waits in the backlog while the first holds the slot,
        // whichever thread would take it.
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
        let (threads, addr) = start(2, 100).await;
        ask(&mut TcpStream::connect(addr).await.unwrap()).await;
        drop(threads);
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
