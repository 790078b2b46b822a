//! Pipelined connections to one memcached server: the transport under
//! [`MemcachedStore`](super::MemcachedStore). The meta protocol's own layer (commands
//! built and encoded by `memcache::exp`, answer lines parsed by its `MetaResponse`) is
//! the crate's; the connection handling is ours, because the crate's async client pays
//! a pool checkout, a liveness probe, a timer per answer and several allocations per
//! exchange, and waits for one exchange's answers before a connection carries the next.
//!
//! - **Long-lived, pipelined.** Each server has [`LINES`] connections that calls take
//!   turns over, and one per core kept for the threads that keep to a connection of
//!   their own ([`home`]: the gateway's HTTP threads; threads beyond the cores share
//!   one), all dialed on first use. Each is served by two tasks: a writer that sends
//!   every exchange queued since its last write in one write, and a reader that parses
//!   answers as they arrive and hands each exchange its own, in order (memcached answers
//!   a connection's commands in the order they came). No exchange waits for another's
//!   answers before it is sent.
//! - **Batching across callers**, as Nagle's algorithm does: on an idle connection an
//!   exchange goes out at once; while answers are outstanding, the writer yields once
//!   before it writes, so that every caller ready at that instant joins the same write:
//!   N concurrent lookups cost memcached one read, not N.
//! - **Bounds.** One write gathers at most [`MAX_WRITE`] bytes (and one exchange); what
//!   is queued or waiting for answers is what callers sent within one timeout, since
//!   the oldest unanswered exchange fails the connection once it is that old.
//! - **Deadlines.** An exchange not answered within the store's timeout fails the
//!   connection and everything waiting on it, and the next call dials anew; a caller
//!   that has given up is not sent. Nothing waits for ever and no task is spawned per
//!   call: a memcached that stops answering costs the callers' own deadlines and two
//!   tasks per connection.
//! - **Recovery.** A connection the server closed (a restart) fails what was in flight on
//!   it; the next call dials.

use std::collections::VecDeque;
use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use memcache::exp::{Error as McError, MetaResponse, ReturnCode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::{Notify, mpsc, oneshot};
use tokio::time::Instant;

/// Connections per server that calls take turns over. Two let a memcached started with
/// `-t 2` (or more) answer on two threads, and still leave each write a good share of
/// the concurrent callers.
pub const LINES: usize = 2;
/// The largest write the writer gathers before sending (more waits for the next write).
const MAX_WRITE: usize = 256 * 1024;
/// Read buffer: room for many answers per read.
const READ_CHUNK: usize = 64 * 1024;
/// Longest answer line accepted (a meta answer line is a code and a few flags).
const MAX_LINE: usize = 8 * 1024;
/// Largest data block accepted, as `memcache` bounds it.
const MAX_VALUE: usize = 1 << 30;

thread_local! {
    /// The connection this thread keeps to, if it has one ([`home`]).
    static HOME: std::cell::Cell<Option<usize>> = const { std::cell::Cell::new(None) };
}

/// Makes this thread's calls use a connection of each server kept for it (home `index`,
/// modulo the cores), instead of taking turns over the [`LINES`] shared ones. A thread
/// that runs its own single-threaded runtime (the gateway's HTTP threads) calls this
/// once: no other thread dials or uses that connection, so its tasks run on that
/// runtime, and an answer wakes its caller without a hand-off to another thread.
pub fn home(index: usize) {
    HOME.with(|home| home.set(Some(index)));
}

/// One command's answer: its return code, for `VA` its data block, and the item's CAS
/// when the command asked for it (`c`).
#[derive(Debug)]
pub(super) struct Reply {
    pub rc: ReturnCode,
    pub value: Option<Bytes>,
    pub cas: Option<u64>,
}

/// Each command's own answer, in order (a `SERVER_ERROR` or `CLIENT_ERROR` is that
/// command's error); the outer error when the exchange failed as a whole (the
/// connection, the deadline).
pub(super) type Answers = Result<Vec<Result<Reply, McError>>, McError>;

/// Encoded commands and where their answers go.
struct Exchange {
    payload: Vec<u8>,
    count: usize,
    reply: oneshot::Sender<Answers>,
}

/// One memcached server's connections.
pub(super) struct Server {
    host: String,
    port: u16,
    timeout: Duration,
    /// The connections calls take turns over.
    lines: [Line; LINES],
    /// One connection per home thread ([`home`]), one per core.
    homes: Box<[Line]>,
    next: AtomicUsize,
    /// Writes made on this server's connections (each may carry many exchanges).
    writes: Arc<AtomicUsize>,
}

/// A connection slot: the live connection's queue, if any.
#[derive(Default)]
struct Line {
    queue: Mutex<Option<mpsc::UnboundedSender<Exchange>>>,
    dialing: tokio::sync::Mutex<()>,
}

impl Server {
    /// A server at `host:port`, not dialed yet; `timeout` bounds dialing and every
    /// exchange.
    pub(super) fn new(host: String, port: u16, timeout: Duration) -> Self {
        Self {
            host,
            port,
            timeout,
            lines: Default::default(),
            homes: (0..std::thread::available_parallelism().map_or(1, usize::from))
                .map(|_| Line::default())
                .collect(),
            next: AtomicUsize::new(0),
            writes: Arc::default(),
        }
    }

    /// Sends `payload` (`count` encoded commands) and waits for their answers. The
    /// caller bounds the wait; the connection fails the exchange itself when the server
    /// does not answer within the timeout.
    pub(super) async fn exchange(&self, payload: Vec<u8>, count: usize) -> Answers {
        if count == 0 {
            return Ok(Vec::new());
        }
        let (reply, answer) = oneshot::channel();
        let line = match HOME.with(std::cell::Cell::get) {
            Some(home) => &self.homes[home % self.homes.len()],
            None => &self.lines[self.next.fetch_add(1, Ordering::Relaxed) % LINES],
        };
        line.send(
            self,
            Exchange {
                payload,
                count,
                reply,
            },
        )
        .await?;
        answer
            .await
            .map_err(|_| broken(io::ErrorKind::BrokenPipe, "the connection was dropped"))?
    }

    async fn dial(&self) -> Result<mpsc::UnboundedSender<Exchange>, McError> {
        let connect = TcpStream::connect((self.host.as_str(), self.port));
        let stream = match tokio::time::timeout(self.timeout, connect).await {
            Ok(stream) => stream?,
            Err(_) => {
                return Err(broken(
                    io::ErrorKind::TimedOut,
                    &format!("no connection within {:?}", self.timeout),
                ));
            }
        };
        stream.set_nodelay(true)?;
        let (input, output) = stream.into_split();
        let (queue, exchanges) = mpsc::unbounded_channel();
        let shared = Arc::new(Shared::default());
        let writes = self.writes.clone();
        tokio::spawn(write(
            exchanges,
            output,
            shared.clone(),
            writes,
            self.timeout,
        ));
        tokio::spawn(read(input, shared, self.timeout));
        Ok(queue)
    }
}

impl Line {
    /// Queues `exchange` on the live connection, dialing one if there is none (or it
    /// closed): one dial at a time per slot, the callers meanwhile waiting for it.
    async fn send(&self, server: &Server, exchange: Exchange) -> Result<(), McError> {
        let Err(exchange) = self.queue_on_live(exchange) else {
            return Ok(());
        };
        let _dialing = self.dialing.lock().await;
        // Another caller may have dialed while this one waited.
        let Err(exchange) = self.queue_on_live(exchange) else {
            return Ok(());
        };
        let queue = server.dial().await?;
        let sent = queue.send(exchange).map_err(|_| {
            broken(
                io::ErrorKind::BrokenPipe,
                "the connection closed as it opened",
            )
        });
        *self.queue.lock().unwrap_or_else(PoisonError::into_inner) = Some(queue);
        sent
    }

    fn queue_on_live(&self, exchange: Exchange) -> Result<(), Exchange> {
        match &*self.queue.lock().unwrap_or_else(PoisonError::into_inner) {
            Some(queue) => queue.send(exchange).map_err(|back| back.0),
            None => Err(exchange),
        }
    }
}

/// What a connection's writer and reader share: the exchanges sent and not yet
/// answered, oldest first.
#[derive(Default)]
struct Shared {
    waiting: Mutex<Waiting>,
    /// Told to the writer when the reader failed the connection.
    closed: Notify,
}

#[derive(Default)]
struct Waiting {
    sent: VecDeque<Waiter>,
    /// Why the connection failed, once it has: nothing more is sent on it.
    failed: Option<(io::ErrorKind, String)>,
}

struct Waiter {
    at: Instant,
    count: usize,
    answers: Vec<Result<Reply, McError>>,
    reply: oneshot::Sender<Answers>,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, Waiting> {
        self.waiting.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Fails the connection: every exchange waiting on it gets the error, and nothing
    /// more is sent on it.
    fn fail(&self, kind: io::ErrorKind, why: String) {
        let waiters = {
            let mut waiting = self.lock();
            if waiting.failed.is_some() {
                return;
            }
            waiting.failed = Some((kind, why.clone()));
            std::mem::take(&mut waiting.sent)
        };
        for waiter in waiters {
            let _ = waiter.reply.send(Err(broken(kind, &why)));
        }
        self.closed.notify_one();
    }

    /// Hands `answer` to the oldest exchange waiting; a stray answer is an error.
    fn deliver(&self, answer: Result<Reply, McError>) -> Result<(), String> {
        let done = {
            let mut waiting = self.lock();
            let Some(oldest) = waiting.sent.front_mut() else {
                return Err("memcached sent an answer nothing asked for".into());
            };
            oldest.answers.push(answer);
            if oldest.answers.len() < oldest.count {
                return Ok(());
            }
            waiting.sent.pop_front()
        };
        if let Some(waiter) = done {
            let _ = waiter.reply.send(Ok(waiter.answers));
        }
        Ok(())
    }
}

/// A transport failure, as `memcache` reports one.
fn broken(kind: io::ErrorKind, why: &str) -> McError {
    McError::Io(io::Error::new(kind, why.to_string()))
}

/// The writer: every exchange queued since the last write goes out in one.
async fn write(
    mut exchanges: mpsc::UnboundedReceiver<Exchange>,
    mut output: OwnedWriteHalf,
    shared: Arc<Shared>,
    writes: Arc<AtomicUsize>,
    timeout: Duration,
) {
    let mut buffer = Vec::with_capacity(16 * 1024);
    loop {
        let first = tokio::select! {
            biased;
            // The reader failed the connection.
            () = shared.closed.notified() => break,
            next = exchanges.recv() => match next {
                Some(exchange) => exchange,
                // The store was dropped: dropping `output` closes the connection.
                None => return,
            },
        };
        // As Nagle's algorithm does: on an idle connection the exchange goes out at once;
        // while answers are outstanding, every caller ready now joins this write.
        if !shared.lock().sent.is_empty() {
            tokio::task::yield_now().await;
        }
        buffer.clear();
        {
            let mut waiting = shared.lock();
            if let Some((kind, why)) = &waiting.failed {
                let _ = first.reply.send(Err(broken(*kind, why)));
                break;
            }
            let at = Instant::now();
            let mut next = Some(first);
            while let Some(exchange) = next.take() {
                // A caller that gave up (its deadline passed) is not sent.
                if !exchange.reply.is_closed() {
                    buffer.extend_from_slice(&exchange.payload);
                    waiting.sent.push_back(Waiter {
                        at,
                        count: exchange.count,
                        answers: Vec::with_capacity(exchange.count),
                        reply: exchange.reply,
                    });
                }
                if buffer.len() < MAX_WRITE {
                    next = exchanges.try_recv().ok();
                }
            }
        }
        if buffer.is_empty() {
            continue;
        }
        writes.fetch_add(1, Ordering::Relaxed);
        match tokio::time::timeout(timeout, output.write_all(&buffer)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                shared.fail(e.kind(), format!("writing to memcached: {e}"));
                break;
            }
            Err(_) => {
                let why = format!("memcached did not take a write within {timeout:?}");
                shared.fail(io::ErrorKind::TimedOut, why);
                break;
            }
        }
    }
    // Whatever is queued behind the failure is failed too; later calls dial anew.
    exchanges.close();
    let failed = shared.lock().failed.clone();
    let (kind, why) = failed.unwrap_or((io::ErrorKind::BrokenPipe, String::new()));
    while let Ok(exchange) = exchanges.try_recv() {
        let _ = exchange.reply.send(Err(broken(kind, &why)));
    }
}

/// The reader: answers as they arrive, each to its exchange in order.
async fn read(mut input: OwnedReadHalf, shared: Arc<Shared>, timeout: Duration) {
    let mut buffer = BytesMut::with_capacity(READ_CHUNK);
    let (kind, why) = 'connection: loop {
        loop {
            match parse(&mut buffer) {
                Ok(None) => break,
                Ok(Some(answer)) => {
                    if let Err(why) = shared.deliver(answer) {
                        break 'connection (io::ErrorKind::InvalidData, why);
                    }
                }
                Err(why) => break 'connection (io::ErrorKind::InvalidData, why),
            }
        }
        let oldest = {
            let waiting = shared.lock();
            if waiting.failed.is_some() {
                return;
            }
            waiting.sent.front().map(|w| w.at)
        };
        if buffer.capacity() - buffer.len() < READ_CHUNK / 4 {
            buffer.reserve(READ_CHUNK);
        }
        // Idle, the reader wakes once per `timeout` to look again.
        let deadline = oldest.unwrap_or_else(Instant::now) + timeout;
        match tokio::time::timeout_at(deadline, input.read_buf(&mut buffer)).await {
            Ok(Ok(0)) => {
                break (
                    io::ErrorKind::UnexpectedEof,
                    "memcached closed the connection".into(),
                );
            }
            Ok(Ok(_)) => {}
            Ok(Err(e)) => break (e.kind(), format!("reading from memcached: {e}")),
            Err(_) if oldest.is_some() => {
                break (
                    io::ErrorKind::TimedOut,
                    format!("memcached did not answer within {timeout:?}"),
                );
            }
            Err(_) => {}
        }
    };
    shared.fail(kind, why);
}

/// The first whole answer in `buffer`, taken out of it; `None` until one has arrived.
/// An error means the stream cannot be read on (the connection is failed).
fn parse(buffer: &mut BytesMut) -> Result<Option<Result<Reply, McError>>, String> {
    let Some(end) = buffer.iter().position(|&b| b == b'\n') else {
        if buffer.len() > MAX_LINE {
            return Err(format!("an answer line longer than {MAX_LINE} bytes"));
        }
        return Ok(None);
    };
    let line = buffer[..end].strip_suffix(b"\r").unwrap_or(&buffer[..end]);
    if let Some(rest) = line.strip_prefix(b"VA ") {
        let mut tokens = rest.split(|&b| b == b' ');
        let length = tokens
            .next()
            .and_then(|t| std::str::from_utf8(t).ok())
            .and_then(|t| t.parse::<usize>().ok())
            .filter(|&n| n <= MAX_VALUE)
            .ok_or_else(|| format!("a bad VA line {:?}", String::from_utf8_lossy(line)))?;
        let whole = end + 1 + length + 2;
        if buffer.len() < whole {
            buffer.reserve(whole - buffer.len());
            return Ok(None);
        }
        if &buffer[whole - 2..whole] != b"\r\n" {
            return Err("a data block without its CRLF".into());
        }
        let cas = tokens.find_map(cas_flag);
        let value = Bytes::copy_from_slice(&buffer[end + 1..end + 1 + length]);
        buffer.advance(whole);
        return Ok(Some(Ok(Reply {
            rc: ReturnCode::Va,
            value: Some(value),
            cas,
        })));
    }
    let answer = if line == b"OK" {
        // The classic protocol's answer to `flush_all`.
        Ok(Reply {
            rc: ReturnCode::Hd,
            value: None,
            cas: None,
        })
    } else {
        MetaResponse::parse_header(line).map(|r| Reply {
            rc: r.rc(),
            value: None,
            cas: r.flags().find_map(cas_flag),
        })
    };
    buffer.advance(end + 1);
    Ok(Some(answer))
}

/// The CAS of a `c<cas>` return flag.
fn cas_flag(flag: &[u8]) -> Option<u64> {
    std::str::from_utf8(flag.strip_prefix(b"c")?)
        .ok()?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parsed(wire: &[u8]) -> (Vec<Result<Reply, McError>>, usize) {
        let mut buffer = BytesMut::from(wire);
        let mut answers = Vec::new();
        while let Some(answer) = parse(&mut buffer).unwrap() {
            answers.push(answer);
        }
        (answers, buffer.len())
    }

    #[test]
    fn answers_are_parsed_whole_and_in_order() {
        let (answers, left) =
            parsed(b"VA 3 f0\r\nabc\r\nEN\r\nHD\r\nSERVER_ERROR object too large for cache\r\nVA 0\r\n\r\nNS\r\nVA 5\r\nab");
        assert_eq!(left, b"VA 5\r\nab".len(), "a partial data block waits");
        let codes: Vec<_> = answers
            .iter()
            .map(|a| a.as_ref().map(|r| r.rc).map_err(ToString::to_string))
            .collect();
        assert_eq!(codes.len(), 6);
        assert_eq!(
            answers[0].as_ref().unwrap().value.as_deref(),
            Some(&b"abc"[..])
        );
        assert_eq!(codes[1], Ok(ReturnCode::En));
        assert_eq!(codes[2], Ok(ReturnCode::Hd));
        assert!(matches!(answers[3], Err(McError::Server(ref m)) if m.contains("too large")));
        assert_eq!(
            answers[4].as_ref().unwrap().value.as_deref(),
            Some(&b""[..])
        );
        assert_eq!(codes[5], Ok(ReturnCode::Ns));
    }

    #[test]
    fn a_corrupt_stream_is_an_error_not_a_guess() {
        for wire in [&b"VA x\r\n"[..], b"VA 3\r\nabcXY", b"VA 99999999999999\r\n"] {
            assert!(parse(&mut BytesMut::from(wire)).is_err(), "{wire:?}");
        }
        let long = vec![b'H'; MAX_LINE + 1];
        assert!(parse(&mut BytesMut::from(&long[..])).is_err());
        // An unknown code is that answer's error; the stream reads on.
        let (answers, left) = parsed(b"ZZ\r\nHD\r\n");
        assert!(answers[0].is_err() && answers[1].is_ok() && left == 0);
    }

    /// A fake memcached: the n-th connection it accepts answers each request line with
    /// `answers(n)` (nothing when empty). Returns its port and the count of connections.
    async fn fake(answers: fn(usize) -> &'static [u8]) -> (u16, Arc<AtomicUsize>) {
        use tokio::io::AsyncBufReadExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let n = count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let (input, mut output) = stream.into_split();
                    let mut lines = tokio::io::BufReader::new(input).lines();
                    while let Ok(Some(_)) = lines.next_line().await {
                        if output.write_all(answers(n)).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        (port, accepted)
    }

    fn get() -> Vec<u8> {
        b"mg k v\r\n".to_vec()
    }

    #[tokio::test]
    async fn an_answer_nothing_asked_for_fails_the_connection_and_the_next_call_dials() {
        // The first connection answers twice per command; the others as they should.
        let (port, accepted) = fake(|n| if n == 0 { b"EN\r\nHD\r\n" } else { b"EN\r\n" }).await;
        let server = Server::new("127.0.0.1".into(), port, Duration::from_secs(5));
        let first = server.exchange(get(), 1).await.unwrap();
        assert_eq!(first[0].as_ref().unwrap().rc, ReturnCode::En);
        // The next call may meet the failed connection (an error, never the stray `HD`
        // as its answer) before its line dials anew.
        let mut answered = 0;
        for _ in 0..(2 * LINES + 2) {
            if let Ok(answers) = server.exchange(get(), 1).await {
                assert_eq!(answers[0].as_ref().unwrap().rc, ReturnCode::En);
                answered += 1;
            }
        }
        assert!(answered >= 2, "only {answered} answered");
        // Each line dialed once, and the failed one again.
        assert_eq!(
            accepted.load(Ordering::SeqCst),
            LINES + 1,
            "never dialed anew"
        );
    }

    #[tokio::test]
    async fn a_server_that_never_answers_fails_the_exchange_at_the_deadline() {
        // The first connection reads and never answers; later ones answer.
        let (port, accepted) = fake(|n| if n == 0 { b"" } else { b"HD\r\n" }).await;
        let timeout = Duration::from_millis(200);
        let server = Server::new("127.0.0.1".into(), port, timeout);
        let started = std::time::Instant::now();
        let silent = tokio::time::timeout(Duration::from_secs(10), server.exchange(get(), 1))
            .await
            .expect("the connection's own deadline ended the exchange");
        assert!(
            matches!(&silent, Err(McError::Io(e)) if e.kind() == io::ErrorKind::TimedOut),
            "{silent:?}"
        );
        assert!(started.elapsed() < timeout * 5, "{:?}", started.elapsed());
        // The line that failed dials anew; the other line dials for the first time.
        for _ in 0..LINES {
            let answers = server.exchange(get(), 1).await.unwrap();
            assert_eq!(answers[0].as_ref().unwrap().rc, ReturnCode::Hd);
        }
        assert_eq!(accepted.load(Ordering::SeqCst), LINES + 1);
    }

    #[tokio::test]
    async fn a_thread_that_keeps_home_uses_a_connection_of_its_own() {
        let (port, accepted) = fake(|_| b"EN\r\n").await;
        let server = Arc::new(Server::new(
            "127.0.0.1".into(),
            port,
            Duration::from_secs(5),
        ));
        // Calls elsewhere take turns over the shared connections.
        for _ in 0..(2 * LINES) {
            server.exchange(get(), 1).await.unwrap();
        }
        assert_eq!(accepted.load(Ordering::SeqCst), LINES);
        let at_home = server.clone();
        let calls = std::thread::spawn(move || {
            home(1);
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async {
                for _ in 0..(4 * LINES) {
                    at_home.exchange(get(), 1).await.unwrap();
                }
            });
        });
        tokio::task::spawn_blocking(move || calls.join().unwrap())
            .await
            .unwrap();
        // The home thread dialed one connection, its own, and used no other.
        assert_eq!(accepted.load(Ordering::SeqCst), LINES + 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn exchanges_sent_together_share_writes() {
        let (port, _) = fake(|_| b"EN\r\n").await;
        let server = Arc::new(Server::new(
            "127.0.0.1".into(),
            port,
            Duration::from_secs(5),
        ));
        for _ in 0..LINES {
            server.exchange(get(), 1).await.unwrap(); // every line dialed
        }
        let before = server.writes.load(Ordering::SeqCst);
        let calls: Vec<_> = (0..500)
            .map(|_| {
                let server = server.clone();
                tokio::spawn(async move { server.exchange(get(), 1).await })
            })
            .collect();
        for call in calls {
            let answers = call.await.unwrap().unwrap();
            assert_eq!(answers[0].as_ref().unwrap().rc, ReturnCode::En);
        }
        let writes = server.writes.load(Ordering::SeqCst) - before;
        assert!(
            writes <= 250,
            "{writes} writes for 500 concurrent exchanges"
        );
    }
}
