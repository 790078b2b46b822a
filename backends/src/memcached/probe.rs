//! Each server's probe: a task per server that checks it every probe interval while it
//! is up (a hang is found without traffic, and a server that missed writes is emptied),
//! and retries it with backoff while it is down, taking it back once it answers: emptied
//! first when writes went elsewhere in its place since it was last emptied, or else
//! cleared of the keys this process wrote elsewhere meanwhile (see the store's module
//! docs, "Failover").
//!
//! A probe holds the store only while it probes: a store that is dropped ends its probes
//! at their next turn.

use std::sync::Arc;

use memcache::exp::{MetaCommand, ReturnCode};
use tessera_protocol::{StoreError, StoreKey};

use super::cluster::Cluster;
use super::commands;

/// Most deletes sent in one exchange when a server is cleared of its journal.
const REPLAY_BATCH: usize = 256;

/// Starts one probe per server of `cluster`, on the current runtime (none outside one:
/// servers judged down are then never taken back).
pub(super) fn start(cluster: &Arc<Cluster>) {
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        tracing::warn!(
            "memcached store made outside a tokio runtime: servers judged down will not be probed"
        );
        return;
    };
    for server in 0..cluster.len() {
        let (weak, wake) = (Arc::downgrade(cluster), cluster.health.waker(server));
        runtime.spawn(async move {
            loop {
                let Some(delay) = weak.upgrade().map(|c| c.health.next_probe(server)) else {
                    return;
                };
                tokio::select! {
                    () = tokio::time::sleep(delay) => {}
                    // A change of state (judged down: retry soon) reschedules.
                    () = wake.notified() => continue,
                }
                let Some(cluster) = weak.upgrade() else {
                    return;
                };
                cluster.probe(server).await;
            }
        });
    }
}

impl Cluster {
    /// One probe of `server`.
    async fn probe(self: &Arc<Self>, server: usize) {
        if self.health.is_down(server) {
            self.retry(server).await;
        } else {
            self.check(server).await;
        }
    }

    /// An up server: does it answer (a call like any other: a timeout judges it down),
    /// and did writes go elsewhere in its place since it was last emptied (by a process
    /// that judged it down while this one did not)? Then it is emptied now.
    async fn check(self: &Arc<Self>, server: usize) {
        let Ok(emptied_for) = self.emptied_for(server).await else {
            return;
        };
        if self.len() < 2 {
            return;
        }
        let Ok(missed) = self.missed_count(server).await else {
            return;
        };
        if missed > emptied_for {
            self.empty(server, missed).await;
        }
    }

    /// A down server: when it answers, it is emptied or cleared as needed and taken back.
    async fn retry(self: &Arc<Self>, server: usize) {
        let emptied_for = match self.emptied_for(server).await {
            Ok(count) => count,
            Err(_) => {
                // Writes that went elsewhere since the last mark are marked again, so
                // that whoever finds it back (or a process that never lost it) empties it.
                if self.health.retry_failed(server) && self.mark_missed(server).await.is_ok() {
                    self.health.marked(server);
                }
                return;
            }
        };
        let mut missed = if self.len() < 2 {
            0
        } else {
            self.missed_count(server).await.unwrap_or(0)
        };
        let journal = self.health.take_journal(server);
        if journal.overflowed {
            // Not every key it missed is known: it must be emptied.
            match self.mark_missed(server).await {
                Ok(marked) => missed = marked,
                Err(_) => return self.health.overflow(server),
            }
        }
        if missed > emptied_for {
            if !self.empty(server, missed).await {
                return;
            }
        } else if !self.replay(server, journal.keys).await {
            // The keys are no longer known: empty it next time.
            return self.health.overflow(server);
        }
        // Keys journaled meanwhile (writes in flight) are cleared before it is used.
        for _ in 0..4 {
            if self.health.readmit(server) {
                tracing::info!(server = %self.health.name(server), "memcached server answers again: taken back");
                return;
            }
            let late = self.health.take_journal(server);
            if late.overflowed || !self.replay(server, late.keys).await {
                return self.health.overflow(server);
            }
        }
    }

    /// The count of missed writes `server` was last emptied for (0: never), read from it
    /// whether it is down or not.
    async fn emptied_for(&self, server: usize) -> Result<u64, StoreError> {
        let command = commands::get(&self.emptied_for)?;
        let mut answers = self.attempt(server, std::iter::once(&command)).await?;
        let reply = answers
            .pop()
            .ok_or_else(|| StoreError::Protocol("memcached: an answer is missing".into()))?
            .map_err(commands::classify)?;
        match commands::found(reply)? {
            Some(digits) => Ok(commands::number(&digits).unwrap_or(0)),
            None => Ok(0),
        }
    }

    /// Empties `server` (`flush_all`) and records the count of missed writes it was
    /// emptied for, in one exchange; with `store.flush_on_return` off, only records it.
    /// Whether it may be used.
    async fn empty(&self, server: usize, missed: u64) -> bool {
        let name = self.health.name(server).to_string();
        let record = match commands::set(
            &self.emptied_for,
            missed.to_string().as_bytes(),
            std::time::Duration::ZERO,
            false,
        ) {
            Ok(command) => command,
            Err(_) => return false,
        };
        let mut payload = Vec::new();
        if self.flush_on_return {
            payload.extend_from_slice(b"flush_all\r\n");
        }
        if record.encode_into(&mut payload).is_err() {
            return false;
        }
        let count = if self.flush_on_return { 2 } else { 1 };
        let emptied = self.send(server, payload, count).await;
        match emptied.map(|answers| {
            answers
                .into_iter()
                .all(|a| a.is_ok_and(|r| r.rc == ReturnCode::Hd))
        }) {
            Ok(true) if self.flush_on_return => {
                self.health.flushed(server);
                tracing::warn!(server = %name, "memcached server emptied (flush_all): writes went elsewhere in its place while it was out");
                true
            }
            Ok(true) => {
                tracing::warn!(server = %name, "memcached server missed writes while it was out and is used as it is (store.flush_on_return = false): it may serve what was purged or rebuilt meanwhile");
                true
            }
            Ok(false) => {
                tracing::error!(server = %name, "memcached server refused flush_all: it stays out of use (set store.flush_on_return = false for servers that must not be flushed)");
                false
            }
            Err(_) => false,
        }
    }

    /// Deletes `keys` from `server` (written elsewhere in its place), in batches.
    /// Whether all were sent and answered.
    async fn replay(&self, server: usize, keys: Vec<StoreKey>) -> bool {
        for batch in keys.chunks(REPLAY_BATCH) {
            let deletes: Result<Vec<MetaCommand>, _> = batch.iter().map(commands::delete).collect();
            let Ok(deletes) = deletes else { return false };
            if self.attempt(server, deletes.iter()).await.is_err() {
                return false;
            }
        }
        true
    }
}
