//! What this process knows of each memcached server: up or down, the failures in a row
//! that judge it down, and, while it is down, what was written elsewhere in its place
//! (see the store's module docs, "Failover").
//!
//! Reading it costs the hit path one atomic load (`any_down`); everything else runs on
//! failures, on writes made while a server is down, and in the probes.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tessera_protocol::StoreKey;
use tessera_protocol::store::ServerState;
use tokio::sync::Notify;

/// The first retry of a server judged down; each failed retry doubles it, up to the
/// probe interval.
pub(super) const FIRST_RETRY: Duration = Duration::from_millis(100);

/// Most keys remembered per server as written elsewhere in its place (between two
/// probes); past it the server is emptied on its return instead.
pub(super) const JOURNAL_LIMIT: usize = 10_000;

/// Why a call failed, as far as judging its server goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Failure {
    /// A broken connection or a stream that could not be read: counted; `eject_after` in
    /// a row judge the server down.
    Counted,
    /// No answer within the timeout, or a refused connection: down at once.
    Hard,
}

/// Every server's health, in configuration order.
#[derive(Debug)]
pub(super) struct Health {
    servers: Box<[ServerHealth]>,
    names: Box<[String]>,
    /// How many are down: the hit path's one look.
    down: AtomicUsize,
    /// Changes of any server's state, so that a placement can tell it raced one.
    epoch: AtomicU64,
    eject_after: u32,
    probe_interval: Duration,
}

#[derive(Debug, Default)]
struct ServerHealth {
    down: AtomicBool,
    failures: AtomicU32,
    ejections: AtomicU64,
    readmissions: AtomicU64,
    flushes: AtomicU64,
    episode: Mutex<Episode>,
    /// One mark of missed writes at a time (see [`Health::needs_mark`]).
    marking: tokio::sync::Mutex<()>,
    /// Wakes the server's probe when its state changes (held by the probe, which must
    /// not keep the store alive).
    wake: Arc<Notify>,
}

/// What this process did while a server was down.
#[derive(Debug, Default)]
struct Episode {
    /// The server's count of missed writes was raised for this episode.
    marked: bool,
    /// Writes went elsewhere in its place since that mark.
    wrote_since_mark: bool,
    /// Keys written elsewhere in its place since the last failed probe.
    journal: HashSet<StoreKey>,
    /// More than [`JOURNAL_LIMIT`] of them: the journal is incomplete.
    overflowed: bool,
    /// Until the next retry.
    backoff: Duration,
}

/// A server's journal, taken to be replayed before it is used again.
#[derive(Debug, Default)]
pub(super) struct Journal {
    /// Keys written elsewhere in its place since the last failed probe.
    pub keys: Vec<StoreKey>,
    /// Some were not kept: empty the server instead.
    pub overflowed: bool,
}

impl Health {
    /// All of `names` up.
    pub(super) fn new(names: &[String], eject_after: u32, probe_interval: Duration) -> Self {
        Self {
            servers: names.iter().map(|_| ServerHealth::default()).collect(),
            names: names.into(),
            down: AtomicUsize::new(0),
            epoch: AtomicU64::new(0),
            eject_after: eject_after.max(1),
            probe_interval,
        }
    }

    fn episode(&self, server: usize) -> MutexGuard<'_, Episode> {
        self.servers[server]
            .episode
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether any server is down.
    pub(super) fn any_down(&self) -> bool {
        self.down.load(Ordering::Acquire) != 0
    }

    /// Whether `server` is down.
    pub(super) fn is_down(&self, server: usize) -> bool {
        self.servers[server].down.load(Ordering::Acquire)
    }

    /// Bumped by every ejection and re-admission.
    pub(super) fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Acquire)
    }

    /// A call answered: the failures in a row start over.
    pub(super) fn answered(&self, server: usize) {
        let failures = &self.servers[server].failures;
        // A load first: the hit path does not write a shared line when nothing changes.
        if failures.load(Ordering::Relaxed) != 0 {
            failures.store(0, Ordering::Relaxed);
        }
    }

    /// A call failed on `server`; judges it down when that makes `eject_after` in a row
    /// or the failure is hard. Whether this call judged it down.
    pub(super) fn failed(&self, server: usize, failure: Failure, why: &str) -> bool {
        let failures = self.servers[server]
            .failures
            .fetch_add(1, Ordering::Relaxed)
            + 1;
        if failure == Failure::Hard || failures >= self.eject_after {
            return self.eject(server, why);
        }
        false
    }

    /// Judges `server` down (its calls are skipped, its keys go to the next server, and
    /// its probe retries it). Whether it was up.
    pub(super) fn eject(&self, server: usize, why: &str) -> bool {
        let s = &self.servers[server];
        {
            let mut episode = self.episode(server);
            if s.down.swap(true, Ordering::AcqRel) {
                return false;
            }
            *episode = Episode {
                backoff: FIRST_RETRY.min(self.probe_interval),
                ..Episode::default()
            };
        }
        self.down.fetch_add(1, Ordering::AcqRel);
        self.epoch.fetch_add(1, Ordering::AcqRel);
        s.ejections.fetch_add(1, Ordering::Relaxed);
        s.wake.notify_one();
        tracing::warn!(server = %self.names[server], %why, "memcached server judged down: its keys go to the next server until it answers again");
        true
    }

    /// Takes `server` back, unless keys were written elsewhere in its place since its
    /// journal was taken (replay those first). Whether it is up now.
    pub(super) fn readmit(&self, server: usize) -> bool {
        let s = &self.servers[server];
        {
            let episode = self.episode(server);
            if !episode.journal.is_empty() || episode.overflowed {
                return false;
            }
            if !s.down.swap(false, Ordering::AcqRel) {
                return true;
            }
        }
        s.failures.store(0, Ordering::Relaxed);
        self.down.fetch_sub(1, Ordering::AcqRel);
        self.epoch.fetch_add(1, Ordering::AcqRel);
        s.readmissions.fetch_add(1, Ordering::Relaxed);
        s.wake.notify_one();
        true
    }

    /// A write of `key` goes elsewhere in place of `server` (`wrote`), or may (its
    /// copies were just handed out without it): remembered, to be deleted from it before
    /// it is used again. False when `server` is up again (place the write anew).
    pub(super) fn journal(&self, server: usize, key: &StoreKey, wrote: bool) -> bool {
        let mut episode = self.episode(server);
        if !self.is_down(server) {
            return false;
        }
        episode.wrote_since_mark |= wrote;
        if episode.journal.len() < JOURNAL_LIMIT {
            episode.journal.insert(key.clone());
        } else if !episode.journal.contains(key) {
            episode.overflowed = true;
        }
        true
    }

    /// Whether writes elsewhere in place of `server` must first raise its count of
    /// missed writes (once per episode), and the lock that makes it once.
    pub(super) fn needs_mark(&self, server: usize) -> bool {
        !self.episode(server).marked
    }

    /// The lock held while `server`'s missed writes are marked.
    pub(super) fn marking(&self, server: usize) -> &tokio::sync::Mutex<()> {
        &self.servers[server].marking
    }

    /// `server`'s missed writes were marked.
    pub(super) fn marked(&self, server: usize) {
        let mut episode = self.episode(server);
        episode.marked = true;
        episode.wrote_since_mark = false;
    }

    /// A probe of down `server` failed: the next waits twice as long (up to the probe
    /// interval), and the journal starts over (a server that answers nobody is emptied,
    /// or has the keys replayed, only after it answers again, so what came before is
    /// covered by the mark). Whether writes went elsewhere since the last mark (mark
    /// again).
    pub(super) fn retry_failed(&self, server: usize) -> bool {
        let mut episode = self.episode(server);
        episode.backoff = (episode.backoff * 2).min(self.probe_interval);
        episode.journal.clear();
        episode.overflowed = false;
        episode.wrote_since_mark
    }

    /// The journal of down `server`, taken.
    pub(super) fn take_journal(&self, server: usize) -> Journal {
        let mut episode = self.episode(server);
        Journal {
            keys: std::mem::take(&mut episode.journal).into_iter().collect(),
            overflowed: std::mem::take(&mut episode.overflowed),
        }
    }

    /// Down `server`'s journal cannot be trusted (it is emptied on its return instead).
    pub(super) fn overflow(&self, server: usize) {
        self.episode(server).overflowed = true;
    }

    /// `server` was emptied.
    pub(super) fn flushed(&self, server: usize) {
        self.servers[server].flushes.fetch_add(1, Ordering::Relaxed);
    }

    /// How long until `server`'s next probe.
    pub(super) fn next_probe(&self, server: usize) -> Duration {
        if self.is_down(server) {
            self.episode(server).backoff
        } else {
            self.probe_interval
        }
    }

    /// What wakes `server`'s probe when its state changes.
    pub(super) fn waker(&self, server: usize) -> Arc<Notify> {
        self.servers[server].wake.clone()
    }

    /// Each server as `/metrics` shows it.
    pub(super) fn states(&self) -> Vec<ServerState> {
        self.servers
            .iter()
            .zip(self.names.iter())
            .map(|(s, name)| ServerState {
                server: name.clone(),
                up: !s.down.load(Ordering::Acquire),
                ejections: s.ejections.load(Ordering::Relaxed),
                readmissions: s.readmissions.load(Ordering::Relaxed),
                flushes: s.flushes.load(Ordering::Relaxed),
            })
            .collect()
    }

    /// `server` as configured.
    pub(super) fn name(&self, server: usize) -> &str {
        &self.names[server]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tessera_protocol::Keyspace;

    fn health() -> Health {
        Health::new(
            &["a:1".to_string(), "b:1".to_string()],
            3,
            Duration::from_secs(1),
        )
    }

    #[test]
    fn counted_failures_in_a_row_or_one_hard_failure_judge_a_server_down() {
        let h = health();
        assert!(!h.failed(0, Failure::Counted, "reset"));
        assert!(!h.failed(0, Failure::Counted, "reset"));
        h.answered(0);
        assert!(
            !h.failed(0, Failure::Counted, "reset"),
            "an answer starts over"
        );
        assert!(!h.failed(0, Failure::Counted, "reset"));
        assert!(!h.any_down());
        let epoch = h.epoch();
        assert!(h.failed(0, Failure::Counted, "reset"), "the third in a row");
        assert!(h.is_down(0) && h.any_down() && !h.is_down(1));
        assert!(h.epoch() > epoch);
        assert!(!h.failed(0, Failure::Hard, "again"), "judged once");
        assert!(
            h.failed(1, Failure::Hard, "timeout"),
            "a hard failure at once"
        );
        let states = h.states();
        assert_eq!(states[0].server, "a:1");
        assert!(!states[0].up && states[0].ejections == 1);
        assert!(h.readmit(0) && h.readmit(1));
        assert!(!h.any_down());
        assert_eq!(h.states()[1].readmissions, 1);
    }

    #[test]
    fn retries_back_off_up_to_the_probe_interval() {
        let h = health();
        assert_eq!(h.next_probe(0), Duration::from_secs(1), "up: the interval");
        h.eject(0, "test");
        let mut delays = vec![h.next_probe(0)];
        for _ in 0..5 {
            h.retry_failed(0);
            delays.push(h.next_probe(0));
        }
        let ms: Vec<u128> = delays.iter().map(Duration::as_millis).collect();
        assert_eq!(ms, [100, 200, 400, 800, 1000, 1000]);
    }

    #[test]
    fn writes_in_place_of_a_down_server_are_journaled_until_it_is_taken_back() {
        let h = health();
        let key = Keyspace::new("t").generation("k");
        assert!(!h.journal(0, &key, true), "an up server needs no journal");
        h.eject(0, "test");
        assert!(h.needs_mark(0));
        h.marked(0);
        assert!(!h.needs_mark(0));
        assert!(h.journal(0, &key, true));
        assert!(!h.readmit(0), "not while keys wait to be replayed");
        let journal = h.take_journal(0);
        assert_eq!(journal.keys, vec![key.clone()]);
        assert!(!journal.overflowed);
        // A failed probe starts the journal over and says a mark is due.
        assert!(h.journal(0, &key, true));
        assert!(h.retry_failed(0));
        h.marked(0);
        assert!(!h.retry_failed(0), "nothing written since the mark");
        assert!(h.take_journal(0).keys.is_empty());
        assert!(h.readmit(0));
        // The next episode marks again.
        h.eject(0, "again");
        assert!(h.needs_mark(0));
    }

    #[test]
    fn a_journal_past_its_limit_says_so() {
        let h = health();
        h.eject(1, "test");
        let ks = Keyspace::new("t");
        for n in 0..=JOURNAL_LIMIT {
            assert!(h.journal(1, &ks.generation(&format!("k{n}")), true));
        }
        let journal = h.take_journal(1);
        assert_eq!(journal.keys.len(), JOURNAL_LIMIT);
        assert!(journal.overflowed);
    }
}
