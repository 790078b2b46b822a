//! Hot answers: the fresh L1 slot last served for each `(route, raw query)` of a route
//! without `vary`, so a repeated hit skips identity parsing, key derivation and both L1
//! lookups.
//!
//! An entry is only a shortcut to what the full path found: it is used only while nothing
//! at all was invalidated since it was checked (any event, purge or lost event sends every
//! request back through the full path, which repopulates), while what it rests on is
//! younger than `cache.ttl` (as L1's own entries), and while its envelope is fresh. Routes
//! with `vary` never use it: their identity depends on cookies and headers.

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Instant;

use crate::cache::Slot;

/// Most entries; past it the table starts over (entries are cheap to rebuild).
const CAPACITY: usize = 10_000;

/// One remembered answer.
#[derive(Debug)]
pub struct Hot {
    route: Box<str>,
    query: Option<Box<str>>,
    /// The slot served.
    pub slot: Arc<Slot>,
    /// When the full path started checking it: no invalidation may have happened since.
    pub checked_at: Instant,
    /// The older of the slot's and the generation's reads from the store.
    pub loaded_at: Instant,
}

/// The table of hot answers of one gateway.
#[derive(Debug, Default)]
pub struct HotAnswers {
    table: RwLock<HashMap<u64, Arc<Hot>>>,
    hasher: std::hash::RandomState,
}

impl HotAnswers {
    fn hash(&self, route: &str, query: Option<&str>) -> u64 {
        self.hasher.hash_one((route, query))
    }

    /// The entry for `route` and `query`, if any (not yet checked for validity).
    pub fn get(&self, route: &str, query: Option<&str>) -> Option<Arc<Hot>> {
        let hash = self.hash(route, query);
        let table = self.table.read().unwrap_or_else(PoisonError::into_inner);
        let hot = table.get(&hash)?;
        (&*hot.route == route && hot.query.as_deref() == query).then(|| hot.clone())
    }

    /// Remembers what the full path served.
    pub fn insert(
        &self,
        route: &str,
        query: Option<&str>,
        slot: Arc<Slot>,
        checked_at: Instant,
        loaded_at: Instant,
    ) {
        let hash = self.hash(route, query);
        let hot = Arc::new(Hot {
            route: route.into(),
            query: query.map(Into::into),
            slot,
            checked_at,
            loaded_at,
        });
        let mut table = self.table.write().unwrap_or_else(PoisonError::into_inner);
        if table.len() >= CAPACITY {
            table.clear();
        }
        table.insert(hash, hot);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::SlotState;

    fn slot() -> Arc<Slot> {
        Arc::new(Slot::new(SlotState::Pending, Instant::now()))
    }

    #[test]
    fn answers_only_the_exact_route_and_query() {
        let hot = HotAnswers::default();
        let now = Instant::now();
        hot.insert("news", Some("page=1"), slot(), now, now);
        hot.insert("news", None, slot(), now, now);
        assert!(hot.get("news", Some("page=1")).is_some());
        assert!(hot.get("news", None).is_some());
        assert!(hot.get("news", Some("page=2")).is_none());
        assert!(hot.get("news", Some("")).is_none());
        assert!(hot.get("weather", Some("page=1")).is_none());
    }

    #[test]
    fn stays_bounded() {
        let hot = HotAnswers::default();
        let now = Instant::now();
        for i in 0..=CAPACITY {
            hot.insert("r", Some(&i.to_string()), slot(), now, now);
        }
        let len = hot.table.read().unwrap().len();
        assert!(len <= CAPACITY, "{len}");
        assert!(hot.get("r", Some(&CAPACITY.to_string())).is_some());
    }
}
