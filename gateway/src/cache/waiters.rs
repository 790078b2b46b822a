//! Long-poll wake-ups: requests holding `Prefer: wait=N` sleep here until an event says
//! their fragment changed, with no polling loop.
//!
//! A waiter registers *before* it looks the fragment up, so an event that lands between
//! the lookup and the sleep still wakes it (tokio's `Notified::enable`).

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::Notify;
use tokio::sync::futures::OwnedNotified;

/// Registry of keys that requests are waiting on.
#[derive(Debug, Default)]
pub(crate) struct Waiters {
    keys: Mutex<HashMap<String, Arc<Notify>>>,
}

/// One registered waiter; unregisters itself when dropped.
#[derive(Debug)]
pub(crate) struct Waiter<'a> {
    registry: &'a Waiters,
    key: String,
    notify: Arc<Notify>,
    notified: Pin<Box<OwnedNotified>>,
}

impl Waiters {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Notify>>> {
        self.keys.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Starts listening for `key`. Wake-ups from this moment on are not lost.
    pub(crate) fn register(&self, key: &str) -> Waiter<'_> {
        let notify = self.lock().entry(key.to_string()).or_default().clone();
        self.listen(key, notify)
    }

    /// Starts listening for `key` beside the requests already waiting on it; `None`
    /// when none does (so nothing is registered, and [`Waiters::len`] still counts
    /// long-polls alone).
    pub(crate) fn join(&self, key: &str) -> Option<Waiter<'_>> {
        let notify = self.lock().get(key)?.clone();
        Some(self.listen(key, notify))
    }

    /// A waiter on `key`'s `notify`, listening from now on.
    fn listen(&self, key: &str, notify: Arc<Notify>) -> Waiter<'_> {
        let mut notified = Box::pin(notify.clone().notified_owned());
        notified.as_mut().enable();
        Waiter {
            registry: self,
            key: key.to_string(),
            notify,
            notified,
        }
    }

    /// Wakes everything waiting on `key`.
    pub(crate) fn wake(&self, key: &str) {
        if let Some(n) = self.lock().get(key) {
            n.notify_waiters();
        }
    }

    /// Wakes every waiter (events may have been missed, or the gateway is stopping).
    pub(crate) fn wake_all(&self) {
        for n in self.lock().values() {
            n.notify_waiters();
        }
    }

    /// Keys with at least one waiter.
    pub(crate) fn len(&self) -> usize {
        self.lock().len()
    }
}

impl Waiter<'_> {
    /// Resolves at the first wake-up since registration.
    pub(crate) async fn woken(&mut self) {
        self.notified.as_mut().await;
    }
}

impl Drop for Waiter<'_> {
    fn drop(&mut self) {
        let mut keys = self.registry.lock();
        // Two references remain when we are the last waiter: the map's and ours (the
        // `OwnedNotified` holds a third, dropped right after this).
        if Arc::strong_count(&self.notify) <= 3 {
            keys.remove(&self.key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn a_wake_between_register_and_wait_is_not_lost() {
        let w = Waiters::default();
        let mut waiter = w.register("k");
        w.wake("k");
        tokio::time::timeout(Duration::from_secs(1), waiter.woken())
            .await
            .expect("woken");
    }

    #[tokio::test]
    async fn only_the_named_key_wakes() {
        let w = Waiters::default();
        let mut a = w.register("a");
        w.wake("b");
        assert!(
            tokio::time::timeout(Duration::from_millis(30), a.woken())
                .await
                .is_err()
        );
        w.wake_all();
        tokio::time::timeout(Duration::from_secs(1), a.woken())
            .await
            .expect("woken");
    }

    #[tokio::test]
    async fn joining_needs_a_waiter_and_hears_its_wake() {
        let w = Waiters::default();
        assert!(w.join("k").is_none());
        assert_eq!(w.len(), 0);
        let first = w.register("k");
        let mut joined = w.join("k").expect("a waiter is registered");
        drop(first);
        assert_eq!(w.len(), 1);
        w.wake("k");
        tokio::time::timeout(Duration::from_secs(1), joined.woken())
            .await
            .expect("woken");
        drop(joined);
        assert_eq!(w.len(), 0);
    }

    #[tokio::test]
    async fn entries_are_removed_with_the_last_waiter() {
        let w = Waiters::default();
        let a = w.register("k");
        let b = w.register("k");
        assert_eq!(w.len(), 1);
        drop(a);
        assert_eq!(w.len(), 1);
        drop(b);
        assert_eq!(w.len(), 0);
    }
}
