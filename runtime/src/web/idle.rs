//! Closing connections that send nothing, or read nothing: the watchdog beside each
//! connection.
//!
//! hyper's header-read timeout only starts once hyper-util's auto builder has read enough
//! bytes to tell HTTP/1 from h2c, and HTTP/2 has no timeout at all for a connection that
//! sends no request. So each connection carries an [`Activity`]: its service counts the
//! requests in flight ([`Activity::begin`]), its socket notes the first byte read since it
//! went idle ([`Watched`]), and its future looks at both when its timer fires
//! ([`Watchdog::check`]). A connection past its deadline with nothing in flight is asked
//! to shut down gracefully: HTTP/2 sends GOAWAY, HTTP/1 closes, and a connection still
//! being detected is dropped. An HTTP/2 peer must answer the GOAWAY's PING before hyper
//! closes; one still silent `header_timeout` later is dropped.
//!
//! Deadlines of a connection with no request in flight (see [`deadline`]):
//! - before its first request: `first_byte_timeout` after it opened, or
//!   `header_timeout` after its first byte (protocol detection, the h2 preface and
//!   settings, the first request head);
//! - after one: `idle_timeout` after its last request ended, or `header_timeout` after the
//!   first byte since then if that is later (a request head on a keep-alive connection; a
//!   stray h2 PING or WINDOW_UPDATE does not cut the idle time short).
//!
//! A connection past its deadline while a request head is only partly read is closed at
//! once: there is no request to let finish.
//!
//! A request is in flight from its head until its answer is sent (or dropped), and is not
//! cut for taking long: its own deadlines (upstream timeout, `max_wait`) bound it. But an
//! answer that makes no progress for `send_timeout` is (nginx's `send_timeout`): a client
//! that reads nothing would otherwise hold the answer, and what it holds (an upstream
//! connection, a stream's fragments), for as long as it likes. Two signs of it:
//! - the socket takes no byte: a write returned `Pending` and none has made progress since
//!   ([`Watched`] notes when);
//! - an answer's body handed a frame to hyper and was not asked for the next one since
//!   ([`Activity::frame_out`], [`Activity::frame_followed`]), while no other answer on the
//!   connection made progress: over HTTP/2 a client that opens no flow-control window
//!   stalls its streams without ever blocking the socket.
//!
//! Either closes the connection `send_timeout` after it began (the second is sampled by the
//! watchdog once per `send_timeout` while requests are in flight, so it closes between one
//! and two `send_timeout`s after the stall began).
//!
//! Per request this costs two atomic updates and a clock read when it ends; per frame of an
//! answer, three atomic updates; per socket read or write, one atomic load; the timer fires
//! about once per deadline.

use std::future::Future;
use std::io::IoSlice;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tessera_protocol::config::HttpConfig;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

/// What one connection is doing, shared by its service, its socket and its watchdog.
#[derive(Debug)]
pub(super) struct Activity {
    opened: Instant,
    in_flight: AtomicU32,
    served: AtomicBool,
    /// Milliseconds after `opened` when the last request ended (0: none did).
    idle_since: AtomicU64,
    /// 1 + milliseconds after `opened` of the first byte read since the connection went
    /// idle; 0 when none was.
    first_read: AtomicU64,
    /// 1 + milliseconds after `opened` of the first write that found the socket full since
    /// the last one that made progress; 0 when writes make progress.
    write_blocked: AtomicU64,
    /// Frames the connection's answers handed to hyper.
    frames_out: AtomicU64,
    /// Answers that handed a frame out and were not asked for the next one since.
    bodies_waiting: AtomicU32,
}

impl Activity {
    pub(super) fn new() -> Arc<Self> {
        Arc::new(Self {
            opened: Instant::now(),
            in_flight: AtomicU32::new(0),
            served: AtomicBool::new(false),
            idle_since: AtomicU64::new(0),
            first_read: AtomicU64::new(0),
            write_blocked: AtomicU64::new(0),
            frames_out: AtomicU64::new(0),
            bodies_waiting: AtomicU32::new(0),
        })
    }

    fn millis(&self) -> u64 {
        u64::try_from(self.opened.elapsed().as_millis()).unwrap_or(u64::MAX - 1)
    }

    /// A request starts; it counts as in flight until the guard is dropped.
    pub(super) fn begin(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        self.served.store(true, Ordering::Relaxed);
        InFlight(self.clone())
    }

    fn note_read(&self) {
        if self.first_read.load(Ordering::Relaxed) == 0 {
            self.first_read.store(self.millis() + 1, Ordering::Relaxed);
        }
    }

    /// A write found the socket full.
    fn note_write_blocked(&self) {
        if self.write_blocked.load(Ordering::Relaxed) == 0 {
            self.write_blocked
                .store(self.millis() + 1, Ordering::Relaxed);
        }
    }

    /// A write made progress.
    fn note_written(&self) {
        if self.write_blocked.load(Ordering::Relaxed) != 0 {
            self.write_blocked.store(0, Ordering::Relaxed);
        }
    }

    /// An answer's body handed a frame out, and waits to be asked for the next.
    pub(super) fn frame_out(&self) {
        self.frames_out.fetch_add(1, Ordering::Relaxed);
        self.bodies_waiting.fetch_add(1, Ordering::Relaxed);
    }

    /// An answer's body that handed a frame out is asked for the next, or dropped.
    pub(super) fn frame_followed(&self) {
        self.bodies_waiting.fetch_sub(1, Ordering::Relaxed);
    }

    /// When the connection is to be closed for idling, and how, or `None` while a
    /// request is in flight.
    fn deadline(&self, limits: &HttpConfig) -> Option<(Instant, Idle)> {
        if self.in_flight.load(Ordering::Acquire) > 0 {
            return None;
        }
        let first_read = match self.first_read.load(Ordering::Relaxed) {
            0 => None,
            n => Some(Duration::from_millis(n - 1)),
        };
        let (after, idle) = deadline(
            limits,
            self.served.load(Ordering::Relaxed),
            Duration::from_millis(self.idle_since.load(Ordering::Relaxed)),
            first_read,
        );
        Some((self.opened + after, idle))
    }

    /// When the socket stopped taking bytes, if it did.
    fn write_blocked_at(&self) -> Option<Instant> {
        match self.write_blocked.load(Ordering::Relaxed) {
            0 => None,
            n => Some(self.opened + Duration::from_millis(n - 1)),
        }
    }

    /// The count of frames handed out, when some answer waits to be asked for its next.
    fn frame_waiting(&self) -> Option<u64> {
        (self.bodies_waiting.load(Ordering::Relaxed) > 0)
            .then(|| self.frames_out.load(Ordering::Relaxed))
    }
}

/// What an idle connection past its deadline gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Idle {
    /// Nothing begun: asked to shut down gracefully (HTTP/2: GOAWAY).
    Quiet,
    /// A request head begun and not finished within `header_timeout`: closed.
    Head,
}

/// When an idle connection is to be closed, counted from its opening, and how: `served`
/// tells whether it had a request, `idle_since` when its last one ended, `first_read` when
/// the first byte since then arrived.
fn deadline(
    limits: &HttpConfig,
    served: bool,
    idle_since: Duration,
    first_read: Option<Duration>,
) -> (Duration, Idle) {
    let head = |read: Duration| (read + limits.header_timeout, Idle::Head);
    match (served, first_read) {
        (false, None) => (limits.first_byte_timeout, Idle::Quiet),
        (false, Some(read)) => head(read),
        (true, None) => (idle_since + limits.idle_timeout, Idle::Quiet),
        (true, Some(read)) => {
            let idle = (idle_since + limits.idle_timeout, Idle::Quiet);
            // A stray frame early in the idle time does not shorten it.
            if head(read).0 > idle.0 {
                head(read)
            } else {
                idle
            }
        }
    }
}

/// A request in flight on its connection.
#[derive(Debug)]
pub(super) struct InFlight(Arc<Activity>);

impl InFlight {
    /// The connection this request is on.
    pub(super) fn activity(&self) -> &Activity {
        &self.0
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let activity = &self.0;
        // Before the count drops, so a watchdog that sees it at 0 sees this end too.
        activity
            .idle_since
            .store(activity.millis(), Ordering::Relaxed);
        activity.first_read.store(0, Ordering::Relaxed);
        activity.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A socket that tells its [`Activity`] when bytes arrive.
#[derive(Debug)]
pub(super) struct Watched<S> {
    inner: S,
    activity: Arc<Activity>,
}

impl<S> Watched<S> {
    pub(super) fn new(inner: S, activity: Arc<Activity>) -> Self {
        Self { inner, activity }
    }
}

impl<S> Watched<S> {
    /// Notes whether a write made progress or found the socket full.
    fn note(&self, polled: &Poll<std::io::Result<usize>>) {
        match polled {
            Poll::Pending => self.activity.note_write_blocked(),
            Poll::Ready(Ok(n)) if *n > 0 => self.activity.note_written(),
            Poll::Ready(_) => {}
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Watched<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.activity.note_read();
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Watched<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.note(&polled);
        polled
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.note(&polled);
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// What a connection's watchdog asks of it.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Verdict {
    /// Carry on.
    Open,
    /// Idle past its deadline: shut down gracefully.
    Shutdown,
    /// Drop it: still open and idle `header_timeout` after [`Verdict::Shutdown`] (an h2
    /// peer that does not answer the PING of a graceful GOAWAY), a request head not
    /// finished within `header_timeout`, or an answer that made no progress for
    /// `send_timeout`.
    Close,
}

/// The timer of one connection, checked from the connection's own future.
#[derive(Debug)]
pub(super) struct Watchdog {
    activity: Arc<Activity>,
    limits: HttpConfig,
    /// Boxed once per connection: `Sleep` is not `Unpin`.
    timer: Pin<Box<Sleep>>,
    /// Whether [`Verdict::Shutdown`] was given.
    shut: bool,
    /// The count of frames handed out when the watchdog last found one waiting.
    waiting_frame: Option<u64>,
    /// Whether the timer was brought forward to the first request head's deadline.
    head_timed: bool,
}

impl Watchdog {
    pub(super) fn new(activity: Arc<Activity>, limits: &HttpConfig) -> Self {
        let timer = Box::pin(tokio::time::sleep_until(
            activity.opened + limits.first_byte_timeout,
        ));
        Self {
            activity,
            limits: limits.clone(),
            timer,
            shut: false,
            waiting_frame: None,
            head_timed: false,
        }
    }

    /// What the connection must do now. The timer is only polled when it fired or when
    /// `rearm` says the task's waker changed (the timer must learn the new one), so most
    /// polls of a busy connection cost one check of a flag.
    pub(super) fn check(&mut self, cx: &mut Context<'_>, rearm: bool) -> Verdict {
        if !rearm && !self.timer.is_elapsed() {
            return Verdict::Open;
        }
        let mut verdict = Verdict::Open;
        // Each turn either returns or resets the timer to a later instant, then polls it
        // so that it wakes this task.
        while self.timer.as_mut().poll(cx).is_ready() {
            let now = Instant::now();
            let next = match self.due(now) {
                Due::At(next) => next,
                Due::Close => return Verdict::Close,
                Due::Shutdown if self.shut => return Verdict::Close,
                Due::Shutdown => {
                    self.shut = true;
                    verdict = Verdict::Shutdown;
                    now + self.limits.header_timeout
                }
            };
            self.timer.as_mut().reset(next);
        }
        verdict
    }

    /// Called after each poll of the connection that leaves it waiting: once the first
    /// bytes of a connection arrived, its first request head is due `header_timeout`
    /// after them, which may come before `first_byte_timeout`, what the timer waits for
    /// until then. Later heads are never due before the idle deadline the timer holds.
    pub(super) fn after_poll(&mut self, cx: &mut Context<'_>) {
        if self.head_timed || self.activity.first_read.load(Ordering::Relaxed) == 0 {
            return;
        }
        self.head_timed = true;
        if let Some((deadline, _)) = self.activity.deadline(&self.limits)
            && deadline < self.timer.deadline()
        {
            self.timer.as_mut().reset(deadline);
            // Polled so that it wakes this task.
            let _ = self.timer.as_mut().poll(cx);
        }
    }

    /// What is due for the connection `now`, or when to look again.
    fn due(&mut self, now: Instant) -> Due {
        let send_timeout = self.limits.send_timeout;
        if let Some(blocked) = self.activity.write_blocked_at() {
            let at = blocked + send_timeout;
            return if at <= now { Due::Close } else { Due::At(at) };
        }
        let Some((deadline, idle)) = self.activity.deadline(&self.limits) else {
            // Busy: look again within `send_timeout`, when a frame still waiting since this
            // look has waited at least that long.
            let waiting = self.activity.frame_waiting();
            if waiting.is_some() && waiting == self.waiting_frame {
                return Due::Close;
            }
            self.waiting_frame = waiting;
            return Due::At(now + send_timeout.min(self.limits.idle_timeout));
        };
        self.waiting_frame = None;
        match idle {
            _ if deadline > now => Due::At(deadline),
            Idle::Head => Due::Close,
            Idle::Quiet => Due::Shutdown,
        }
    }
}

/// What [`Watchdog::due`] found.
#[derive(Debug, PartialEq, Eq)]
enum Due {
    /// Nothing yet; look again then.
    At(Instant),
    /// Idle past its deadline.
    Shutdown,
    /// To be dropped now.
    Close,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> HttpConfig {
        HttpConfig {
            first_byte_timeout: Duration::from_secs(5),
            header_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            ..HttpConfig::default()
        }
    }

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    #[test]
    fn deadlines_of_idle_connections() {
        let l = limits();
        let quiet = |s| (secs(s), Idle::Quiet);
        let head = |s| (secs(s), Idle::Head);
        assert_eq!(deadline(&l, false, secs(0), None), quiet(5), "silent");
        assert_eq!(
            deadline(&l, false, secs(0), Some(secs(1))),
            head(11),
            "a first byte, then no request: closed header_timeout after it"
        );
        assert_eq!(
            deadline(&l, true, secs(100), None),
            quiet(160),
            "keep-alive"
        );
        assert_eq!(
            deadline(&l, true, secs(100), Some(secs(155))),
            head(165),
            "a request head begun late gets header_timeout"
        );
        assert_eq!(
            deadline(&l, true, secs(100), Some(secs(101))),
            quiet(160),
            "an early stray frame does not shorten the idle time"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn requests_in_flight_hold_the_deadline() {
        let l = limits();
        let a = Activity::new();
        assert_eq!(a.deadline(&l), Some((a.opened + secs(5), Idle::Quiet)));
        tokio::time::advance(secs(2)).await;
        a.note_read();
        assert_eq!(a.deadline(&l), Some((a.opened + secs(12), Idle::Head)));
        let first = a.begin();
        let second = a.begin();
        assert_eq!(a.deadline(&l), None);
        tokio::time::advance(secs(100)).await;
        drop(first);
        assert_eq!(a.deadline(&l), None, "one still in flight");
        drop(second);
        assert_eq!(a.deadline(&l), Some((a.opened + secs(162), Idle::Quiet)));
    }

    #[tokio::test(start_paused = true)]
    async fn an_answer_that_makes_no_progress_is_closed_after_send_timeout() {
        let l = HttpConfig {
            send_timeout: secs(30),
            ..limits()
        };
        let a = Activity::new();
        let mut dog = Watchdog::new(a.clone(), &l);
        let _request = a.begin();
        let now = Instant::now();
        assert_eq!(
            dog.due(now),
            Due::At(now + secs(30)),
            "busy: looked at again"
        );
        // The socket stops taking bytes.
        a.note_write_blocked();
        tokio::time::advance(secs(10)).await;
        a.note_write_blocked();
        assert_eq!(
            dog.due(Instant::now()),
            Due::At(now + secs(30)),
            "timed from the first"
        );
        tokio::time::advance(secs(20)).await;
        assert_eq!(dog.due(Instant::now()), Due::Close);
        // A write that makes progress starts it over.
        a.note_written();
        let now = Instant::now();
        assert_eq!(dog.due(now), Due::At(now + secs(30)));
    }

    #[tokio::test(start_paused = true)]
    async fn a_frame_never_followed_is_closed_at_the_second_look() {
        let l = HttpConfig {
            send_timeout: secs(30),
            ..limits()
        };
        let a = Activity::new();
        let mut dog = Watchdog::new(a.clone(), &l);
        let _request = a.begin();
        a.frame_out();
        assert!(matches!(dog.due(Instant::now()), Due::At(_)), "first seen");
        // Asked again and another frame out: progress, so not the same one waiting.
        a.frame_followed();
        a.frame_out();
        assert!(matches!(dog.due(Instant::now()), Due::At(_)), "a new one");
        assert_eq!(
            dog.due(Instant::now()),
            Due::Close,
            "the same one, a look later"
        );
        // A body waiting on its own source (asked, nothing handed out) is no stall.
        let b = Activity::new();
        let mut dog = Watchdog::new(b.clone(), &l);
        let _request = b.begin();
        b.frame_out();
        b.frame_followed();
        for _ in 0..3 {
            assert!(matches!(dog.due(Instant::now()), Due::At(_)));
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_head_not_finished_in_time_is_closed_not_asked_to_shut_down() {
        let l = limits();
        let a = Activity::new();
        let mut dog = Watchdog::new(a.clone(), &l);
        tokio::time::advance(secs(1)).await;
        a.note_read();
        tokio::time::advance(secs(10)).await;
        assert_eq!(
            dog.due(Instant::now()),
            Due::Close,
            "at header_timeout, not twice it"
        );
        let quiet = Activity::new();
        let mut dog = Watchdog::new(quiet.clone(), &l);
        tokio::time::advance(secs(5)).await;
        assert_eq!(
            dog.due(Instant::now()),
            Due::Shutdown,
            "a silent one is asked first"
        );
    }
}
