//! Hot answers: the fresh L1 slot last served for each request target (path and raw
//! query) of a route without `vary`, so a repeated hit skips routing, identity parsing,
//! key derivation and both L1 lookups.
//!
//! An entry also keeps the headers of its last answer, rebuilt only when the `Cache-Status`
//! ttl they carry changes (once a second): a hit clones them instead of building them.
//!
//! An entry is only a shortcut to what the full path found: it is used only while nothing
//! at all was invalidated since it was checked (any event, purge — tag purges included,
//! which is how an entry whose envelope carries a purged tag is never answered — or lost
//! event sends every request back through the full path, which repopulates), while what
//! it rests on is younger than `cache.ttl` (as L1's own entries), and while its envelope
//! is fresh. Routes with `vary` never use it: their identity depends on cookies and
//! headers.

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Instant;

use http::HeaderMap;

use super::l1::Slot;
use crate::metrics::RouteMetrics;

/// Most entries; past it, or past its byte budget, the table starts over (entries are
/// cheap to rebuild).
const CAPACITY: usize = 10_000;

/// Bytes an entry holds besides its slot and target: the entry and its kept headers.
const OVERHEAD: usize = 512;

/// One remembered answer.
#[derive(Debug)]
pub(crate) struct Hot {
    /// The request target (path and query) it answers.
    pub target: Box<str>,
    /// Its route's index in `config.fragments`.
    pub route: usize,
    /// The configuration it was found under: after a reload its front has another one,
    /// and the entry is no longer served.
    pub config: Arc<tessera_protocol::Config>,
    /// Its route's counters.
    pub metrics: RouteMetrics,
    /// The slot served.
    pub slot: Arc<Slot>,
    /// When the full path started checking it: no invalidation may have happened since.
    pub checked_at: Instant,
    /// The older of the slot's and the generation's reads from the store.
    pub loaded_at: Instant,
    /// When the envelope stops being fresh.
    pub fresh_until: Instant,
    /// The headers of its last answer.
    pub headers: LastHeaders,
}

/// The headers of an entry's last answer and the `Cache-Status` ttl (seconds) they carry.
#[derive(Debug, Default)]
pub(crate) struct LastHeaders(RwLock<Option<(u64, HeaderMap)>>);

impl LastHeaders {
    /// The headers of an answer with ttl `ttl`: the last ones when built for the same
    /// ttl, else `build`'s (remembered for the next caller).
    pub(crate) fn get(&self, ttl: u64, build: impl FnOnce() -> HeaderMap) -> HeaderMap {
        if let Some((built_for, headers)) = &*self.0.read().unwrap_or_else(PoisonError::into_inner)
            && *built_for == ttl
        {
            return headers.clone();
        }
        let headers = build();
        *self.0.write().unwrap_or_else(PoisonError::into_inner) = Some((ttl, headers.clone()));
        headers
    }
}

/// The table of hot answers of one gateway.
///
/// Entries share their slots with L1, but a slot L1 evicts stays alive while an entry
/// holds it, so the table has a byte budget of its own.
#[derive(Debug)]
pub(crate) struct HotAnswers {
    table: RwLock<Table>,
    budget: usize,
    /// Seeded per process: a client cannot aim targets at one slot of the table.
    hasher: foldhash::fast::RandomState,
}

#[derive(Debug, Default)]
struct Table {
    entries: HashMap<u64, Arc<Hot>>,
    /// What the entries hold, by [`Hot::weight`].
    bytes: usize,
}

impl Hot {
    fn weight(&self) -> usize {
        self.slot.weight() + self.target.len() + OVERHEAD
    }
}

impl HotAnswers {
    /// A table holding at most `budget` bytes of answers.
    pub(crate) fn new(budget: u64) -> Self {
        Self {
            table: RwLock::default(),
            budget: usize::try_from(budget).unwrap_or(usize::MAX),
            hasher: foldhash::fast::RandomState::default(),
        }
    }

    /// The entry for `target`, if any (not yet checked for validity).
    pub(crate) fn get(&self, target: &str) -> Option<Arc<Hot>> {
        let hash = self.hasher.hash_one(target);
        let table = self.table.read().unwrap_or_else(PoisonError::into_inner);
        let hot = table.entries.get(&hash)?;
        (*hot.target == *target).then(|| hot.clone())
    }

    /// Remembers what the full path served (unless it alone is over the budget).
    pub(crate) fn insert(&self, hot: Hot) {
        let weight = hot.weight();
        if weight > self.budget {
            return;
        }
        let hash = self.hasher.hash_one(&*hot.target);
        let mut table = self.table.write().unwrap_or_else(PoisonError::into_inner);
        if let Some(old) = table.entries.remove(&hash) {
            table.bytes -= old.weight();
        }
        if table.entries.len() >= CAPACITY || table.bytes + weight > self.budget {
            *table = Table::default();
        }
        table.entries.insert(hash, Arc::new(hot));
        table.bytes += weight;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn envelope(size: usize) -> tessera_protocol::Envelope {
        tessera_protocol::Envelope::ready(
            bytes::Bytes::from(vec![b'x'; size]),
            "text/html".into(),
            std::time::Duration::from_secs(60),
            std::time::Duration::from_secs(600),
            1,
            1,
        )
    }

    fn hot(target: &str) -> Hot {
        let now = Instant::now();
        Hot {
            target: target.into(),
            route: 0,
            config: Arc::default(),
            metrics: crate::metrics::Metrics::new(["news"]).route("news").clone(),
            slot: Arc::new(Slot::new(envelope(0), now)),
            checked_at: now,
            loaded_at: now,
            fresh_until: now,
            headers: LastHeaders::default(),
        }
    }

    #[test]
    fn answers_only_the_exact_target() {
        let table = HotAnswers::new(1 << 30);
        table.insert(hot("/fragments/news?page=1"));
        table.insert(hot("/fragments/news"));
        assert!(table.get("/fragments/news?page=1").is_some());
        assert!(table.get("/fragments/news").is_some());
        assert!(table.get("/fragments/news?page=2").is_none());
        assert!(table.get("/fragments/news?").is_none());
        assert!(table.get("/fragments/weather?page=1").is_none());
    }

    #[test]
    fn rebuilds_headers_only_for_a_new_ttl() {
        let entry = hot("/fragments/news");
        let built = std::cell::Cell::new(0);
        let build = |ttl: &'static str| {
            built.set(built.get() + 1);
            let mut h = HeaderMap::new();
            h.insert("cache-status", http::HeaderValue::from_static(ttl));
            h
        };
        assert_eq!(entry.headers.get(9, || build("9"))["cache-status"], "9");
        assert_eq!(entry.headers.get(9, || build("other"))["cache-status"], "9");
        assert_eq!(built.get(), 1, "the same ttl reuses the headers");
        assert_eq!(entry.headers.get(8, || build("8"))["cache-status"], "8");
        assert_eq!(built.get(), 2);
    }

    #[test]
    fn stays_within_its_byte_budget() {
        let found = |target: &str, size: usize| Hot {
            slot: Arc::new(Slot::new(envelope(size), Instant::now())),
            ..hot(target)
        };
        let one = found("/f/0", 10_000).weight();
        let table = HotAnswers::new(u64::try_from(3 * one).unwrap());
        for i in 0..3 {
            table.insert(found(&format!("/f/{i}"), 10_000));
        }
        assert_eq!(table.table.read().unwrap().bytes, 3 * one);
        table.insert(found("/f/0", 10_000));
        assert_eq!(
            table.table.read().unwrap().bytes,
            3 * one,
            "a replaced entry"
        );
        assert!(table.get("/f/2").is_some());
        table.insert(found("/f/3", 10_000));
        let t = table.table.read().unwrap();
        assert!(t.bytes <= 3 * one, "{} > {}", t.bytes, 3 * one);
        assert_eq!(t.entries.len(), 1, "past the budget the table starts over");
        drop(t);
        assert!(table.get("/f/3").is_some());
        table.insert(found("/f/big", 4 * 10_000));
        assert!(
            table.get("/f/big").is_none(),
            "over the budget alone: not kept"
        );
    }

    #[test]
    fn an_entry_weighs_its_slot_target_and_overhead() {
        let target = "/fragments/news?page=12";
        let entry = hot(target);
        let weight = entry.slot.weight() + target.len() + OVERHEAD;
        // A budget of exactly one entry keeps it; one byte less keeps nothing.
        let exact = HotAnswers::new(u64::try_from(weight).unwrap());
        exact.insert(hot(target));
        assert!(exact.get(target).is_some());
        assert_eq!(exact.table.read().unwrap().bytes, weight);
        let short = HotAnswers::new(u64::try_from(weight - 1).unwrap());
        short.insert(hot(target));
        assert!(short.get(target).is_none());
        assert_eq!(short.table.read().unwrap().bytes, 0);
    }

    #[test]
    fn stays_bounded() {
        let table = HotAnswers::new(1 << 30);
        let proto = hot("");
        for i in 0..=CAPACITY {
            table.insert(Hot {
                target: format!("/fragments/news?{i}").into(),
                metrics: proto.metrics.clone(),
                config: proto.config.clone(),
                slot: proto.slot.clone(),
                headers: LastHeaders::default(),
                ..proto
            });
        }
        let len = table.table.read().unwrap().entries.len();
        assert!(len <= CAPACITY, "{len}");
        assert!(table.get(&format!("/fragments/news?{CAPACITY}")).is_some());
    }
}
