//! Closing connections that send nothing: the watchdog beside each connection.
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
//! A request is in flight from its head until its answer is sent (or dropped), and is
//! never cut: its own deadlines (upstream timeout, `max_wait`) bound it. Per request this costs two atomic updates and a clock read when it ends;
//! per socket read, one atomic load; the timer fires about once per deadline.

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
}

impl Activity {
    pub(super) fn new() -> Arc<Self> {
        Arc::new(Self {
            opened: Instant::now(),
            in_flight: AtomicU32::new(0),
            served: AtomicBool::new(false),
            idle_since: AtomicU64::new(0),
            first_read: AtomicU64::new(0),
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

    /// When the connection is to be closed, or `None` while a request is in flight.
    fn deadline(&self, limits: &HttpConfig) -> Option<Instant> {
        if self.in_flight.load(Ordering::Acquire) > 0 {
            return None;
        }
        let first_read = match self.first_read.load(Ordering::Relaxed) {
            0 => None,
            n => Some(Duration::from_millis(n - 1)),
        };
        let after = deadline(
            limits,
            self.served.load(Ordering::Relaxed),
            Duration::from_millis(self.idle_since.load(Ordering::Relaxed)),
            first_read,
        );
        Some(self.opened + after)
    }
}

/// When an idle connection is to be closed, counted from its opening: `served` tells
/// whether it had a request, `idle_since` when its last one ended, `first_read` when the
/// first byte since then arrived.
fn deadline(
    limits: &HttpConfig,
    served: bool,
    idle_since: Duration,
    first_read: Option<Duration>,
) -> Duration {
    match (served, first_read) {
        (false, None) => limits.first_byte_timeout,
        (false, Some(read)) => read + limits.header_timeout,
        (true, None) => idle_since + limits.idle_timeout,
        (true, Some(read)) => (idle_since + limits.idle_timeout).max(read + limits.header_timeout),
    }
}

/// A request in flight on its connection.
#[derive(Debug)]
pub(super) struct InFlight(Arc<Activity>);

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
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
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
    /// Still open and idle `header_timeout` after [`Verdict::Shutdown`] (an h2 peer that
    /// does not answer the PING of a graceful GOAWAY): drop it.
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
            let next = match self.activity.deadline(&self.limits) {
                // Busy: look again later.
                None => now + self.limits.idle_timeout,
                Some(deadline) if deadline > now => deadline,
                Some(_) if self.shut => return Verdict::Close,
                Some(_) => {
                    self.shut = true;
                    verdict = Verdict::Shutdown;
                    now + self.limits.header_timeout
                }
            };
            self.timer.as_mut().reset(next);
        }
        verdict
    }
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
        assert_eq!(deadline(&l, false, secs(0), None), secs(5), "silent");
        assert_eq!(
            deadline(&l, false, secs(0), Some(secs(1))),
            secs(11),
            "a first byte, then no request"
        );
        assert_eq!(deadline(&l, true, secs(100), None), secs(160), "keep-alive");
        assert_eq!(
            deadline(&l, true, secs(100), Some(secs(155))),
            secs(165),
            "a request head begun late gets header_timeout"
        );
        assert_eq!(
            deadline(&l, true, secs(100), Some(secs(101))),
            secs(160),
            "an early stray frame does not shorten the idle time"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn requests_in_flight_hold_the_deadline() {
        let l = limits();
        let a = Activity::new();
        assert_eq!(a.deadline(&l), Some(a.opened + secs(5)));
        tokio::time::advance(secs(2)).await;
        a.note_read();
        assert_eq!(a.deadline(&l), Some(a.opened + secs(12)));
        let first = a.begin();
        let second = a.begin();
        assert_eq!(a.deadline(&l), None);
        tokio::time::advance(secs(100)).await;
        drop(first);
        assert_eq!(a.deadline(&l), None, "one still in flight");
        drop(second);
        assert_eq!(a.deadline(&l), Some(a.opened + secs(162)));
    }
}
