//! Closing open connections gracefully: all of a listener's at shutdown ([`Drain`]), or
//! one that its [`idle`] watchdog finds silent past its deadline.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};

use futures_util::task::AtomicWaker;
use hyper_util::server::graceful::GracefulConnection;

use super::idle;

/// Asks every open connection to finish the request in hand and close, at shutdown.
///
/// hyper-util's `GracefulShutdown` does this with a watch channel that every connection
/// polls along with itself, on every poll, which measured as a tenth of the CPU a cached
/// hit costs. Here a poll costs an atomic load (and registering the task's waker when it
/// changed), and the list of connections is touched only when one opens or closes.
#[derive(Debug, Default)]
pub(super) struct Drain {
    stopping: AtomicBool,
    open: Mutex<HashMap<u64, Arc<AtomicWaker>>>,
    next_id: AtomicU64,
}

impl Drain {
    /// Asks every connection, open now or opened later, to close after its request.
    pub(super) fn start(&self) {
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

    pub(super) fn watch<C: GracefulConnection>(
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
pub(super) struct Draining<C> {
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
        let polled = this.connection.as_mut().poll(cx);
        if polled.is_pending() {
            this.watchdog.after_poll(cx);
        }
        polled
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
