//! Who applied a purge. Every gateway announces itself on the events exchange every
//! [`HEARTBEAT`] and is known to the others while its last heartbeat is younger than
//! [`KNOWN_FOR`] (three beats). A purge event carries an id; every gateway that applied
//! it (its L1, hot answers and tag table) answers with a `purge_applied` event naming the
//! id and itself, the purging gateway too (in embedded mode, the only one). A purge made
//! with `?wait=` holds its answer until every known gateway has answered or the wait is
//! over, and says who missed ([`Report`]).
//!
//! Bounded: at most [`MAX_PEERS`] gateways are remembered (the stalest forgotten first),
//! and a purge waits at most [`MAX_WAIT`].

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

/// How often a gateway announces itself.
pub(crate) const HEARTBEAT: Duration = Duration::from_secs(2);
/// How long after its last heartbeat a gateway is still counted on to acknowledge.
pub(crate) const KNOWN_FOR: Duration = Duration::from_secs(6);
/// Most gateways remembered.
pub(crate) const MAX_PEERS: usize = 1_024;
/// Longest a purge's answer waits for acknowledgements.
pub(crate) const MAX_WAIT: Duration = Duration::from_secs(10);

/// What the acknowledgements of one purge amount to, as the purge's answer shows them.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub(crate) struct Report {
    /// Gateways that applied it.
    pub applied: usize,
    /// Gateways known (a fresh heartbeat, or an acknowledgement) when the wait ended.
    pub known: usize,
    /// Known gateways that did not acknowledge it within the wait, by id.
    pub missed: Vec<String>,
    /// From the purge to its last acknowledgement, or to the end of the wait when some
    /// gateway missed (ms).
    pub ms: u64,
}

/// The acknowledgements collected for one purge.
#[derive(Debug, Default)]
struct Pending {
    applied: Mutex<Vec<(String, Instant)>>,
    changed: Notify,
}

/// This gateway's view of its peers, and the purges it waits on.
#[derive(Debug)]
pub(crate) struct Acks {
    /// This gateway's id, as its heartbeats and acknowledgements name it.
    me: String,
    /// Gateway → when its last heartbeat arrived.
    peers: Mutex<HashMap<String, Instant>>,
    /// Purge id → its acknowledgements so far.
    pending: Mutex<HashMap<String, Arc<Pending>>>,
}

impl Acks {
    /// The view of a gateway named `me`.
    pub(crate) fn new(me: String) -> Self {
        Self {
            me,
            peers: Mutex::default(),
            pending: Mutex::default(),
        }
    }

    /// This gateway's id.
    pub(crate) fn me(&self) -> &str {
        &self.me
    }

    /// A heartbeat from `gateway` arrived at `now`.
    pub(crate) fn heartbeat(&self, gateway: &str, now: Instant) {
        let mut peers = self.peers.lock().unwrap_or_else(PoisonError::into_inner);
        if peers.len() >= MAX_PEERS && !peers.contains_key(gateway) {
            peers.retain(|_, at| now.saturating_duration_since(*at) < KNOWN_FOR);
            if peers.len() >= MAX_PEERS {
                return;
            }
        }
        peers.insert(gateway.to_string(), now);
    }

    /// The gateways known at `now`: those with a fresh heartbeat, and this one.
    pub(crate) fn known(&self, now: Instant) -> Vec<String> {
        let peers = self.peers.lock().unwrap_or_else(PoisonError::into_inner);
        let mut known: Vec<String> = peers
            .iter()
            .filter(|(_, at)| now.saturating_duration_since(**at) < KNOWN_FOR)
            .map(|(g, _)| g.clone())
            .collect();
        if !known.contains(&self.me) {
            known.push(self.me.clone());
        }
        known.sort();
        known
    }

    /// `gateway` applied the purge `purge_id` (ignored unless someone here waits on it).
    pub(crate) fn applied(&self, purge_id: &str, gateway: &str, now: Instant) {
        let pending = self.pending.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(p) = pending.get(purge_id) else {
            return;
        };
        let mut applied = p.applied.lock().unwrap_or_else(PoisonError::into_inner);
        if !applied.iter().any(|(g, _)| g == gateway) {
            applied.push((gateway.to_string(), now));
            p.changed.notify_waiters();
        }
    }

    /// Starts collecting the acknowledgements of a new purge, before its event is sent.
    pub(crate) fn open(&self) -> Ticket<'_> {
        let id = format!("{:016x}", rand::random::<u64>());
        let pending = Arc::new(Pending::default());
        self.pending
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(id.clone(), pending.clone());
        Ticket {
            acks: self,
            id,
            pending,
            started: Instant::now(),
        }
    }
}

/// The acknowledgements of one purge, collected while it lives.
#[derive(Debug)]
pub(crate) struct Ticket<'a> {
    acks: &'a Acks,
    id: String,
    pending: Arc<Pending>,
    started: Instant,
}

impl Ticket<'_> {
    /// The purge's id, for its event.
    pub(crate) fn id(&self) -> &str {
        &self.id
    }

    /// Waits, at most `within` (and [`MAX_WAIT`]), until every gateway known has applied
    /// the purge.
    pub(crate) async fn wait(&self, within: Duration) -> Report {
        let deadline = tokio::time::Instant::now() + within.min(MAX_WAIT);
        loop {
            let changed = self.pending.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            let report = self.report(Instant::now());
            if report.missed.is_empty() {
                return report;
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                return self.report(Instant::now());
            }
        }
    }

    /// Where the acknowledgements stand at `now`.
    fn report(&self, now: Instant) -> Report {
        let applied = self
            .pending
            .applied
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let mut known = self.acks.known(now);
        for (g, _) in &applied {
            if !known.contains(g) {
                known.push(g.clone());
            }
        }
        let missed: Vec<String> = known
            .iter()
            .filter(|k| !applied.iter().any(|(g, _)| g == *k))
            .cloned()
            .collect();
        let last = match (missed.is_empty(), applied.iter().map(|(_, at)| *at).max()) {
            (true, Some(last)) => last,
            _ => now,
        };
        Report {
            applied: applied.len(),
            known: known.len(),
            missed,
            ms: u64::try_from(last.saturating_duration_since(self.started).as_millis())
                .unwrap_or(u64::MAX),
        }
    }
}

impl Drop for Ticket<'_> {
    fn drop(&mut self) {
        self.acks
            .pending
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&self.id);
    }
}

/// A gateway id: the host's name (letters, digits, `-` and `_` of `HOSTNAME`, at most
/// 40) and 8 random hex digits, so that two gateways on one host differ.
pub(crate) fn gateway_id() -> String {
    let host: String = std::env::var("HOSTNAME")
        .unwrap_or_default()
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '_')
        .take(40)
        .collect();
    let host = if host.is_empty() { "gateway" } else { &host };
    format!("{host}-{:08x}", rand::random::<u32>())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_purge_waits_for_every_known_gateway_and_names_who_missed() {
        let acks = Acks::new("me".into());
        let t0 = Instant::now();
        acks.heartbeat("other", t0);
        acks.heartbeat("gone", t0 - KNOWN_FOR);
        assert_eq!(
            acks.known(t0),
            vec!["me", "other"],
            "a stale heartbeat is gone"
        );
        let ticket = acks.open();
        acks.applied(ticket.id(), "me", Instant::now());
        acks.applied("another-purge", "other", Instant::now());
        let report = ticket.wait(Duration::from_millis(20)).await;
        assert_eq!((report.applied, report.known), (1, 2));
        assert_eq!(report.missed, vec!["other"]);
        // Heard late: the next wait ends as it comes in.
        let waiting = ticket.wait(Duration::from_secs(5));
        let late = async {
            tokio::task::yield_now().await;
            acks.applied(ticket.id(), "other", Instant::now());
        };
        let (report, ()) = tokio::join!(waiting, late);
        assert_eq!((report.applied, report.known), (2, 2));
        assert!(report.missed.is_empty());
        drop(ticket);
        assert!(
            acks.pending.lock().unwrap().is_empty(),
            "forgotten once answered"
        );
    }

    #[test]
    fn gateway_ids_are_ids() {
        let id = gateway_id();
        assert!(tessera_protocol::message::is_id(&id), "{id}");
        assert_ne!(id, gateway_id());
    }
}
