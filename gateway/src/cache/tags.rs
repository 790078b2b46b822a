//! What this gateway knows of tag purges: tag → when it was last purged (Unix ms, 0 for
//! never), so the hit path can tell whether a tag purge retired an L1 entry without I/O.
//!
//! Filled from the store (the tag keys of an envelope read on a miss, in one `get_many`,
//! see [`super`]) and from `purged` events, which carry the instant of the purge.
//! A value is trusted for `cache.ttl` after it was read, like L1's own entries; past it,
//! the tag is read again, and the old value is kept only as the fallback for a store that
//! cannot answer. Values only grow: a store read that started before a purge and answers
//! after its event never lowers what the event said. A lost event clears the table with
//! L1 ([`super::l1::L1::invalidate_all`]).
//!
//! Bounded: at most [`CAPACITY`] tags, each kept at most [`KEPT`].

use std::time::{Duration, Instant};

/// Most tags remembered.
pub(crate) const CAPACITY: u64 = 100_000;
/// How long a value is kept as a fallback for a store that cannot answer.
const KEPT: Duration = Duration::from_secs(24 * 3600);

#[derive(Debug, Clone, Copy)]
struct Known {
    /// Unix ms of the latest purge heard of; 0 for never.
    purged_at: u64,
    /// When the store read (or event) that told it started.
    read_at: Instant,
}

/// The tag table of one gateway.
pub(crate) struct TagPurges {
    known: moka::sync::Cache<String, Known, foldhash::fast::RandomState>,
    ttl: Duration,
}

impl std::fmt::Debug for TagPurges {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TagPurges")
            .field("tags", &self.known.entry_count())
            .finish()
    }
}

impl TagPurges {
    /// A table whose values are trusted for `ttl` (`cache.ttl`).
    pub(crate) fn new(ttl: Duration) -> Self {
        Self {
            known: moka::sync::Cache::builder()
                .max_capacity(CAPACITY)
                .time_to_live(ttl.max(KEPT))
                .build_with_hasher(foldhash::fast::RandomState::default()),
            ttl,
        }
    }

    /// When `tag` was last purged, if read within `cache.ttl` of `now`.
    pub(crate) fn current(&self, tag: &str, now: Instant) -> Option<u64> {
        self.known
            .get(tag)
            .filter(|k| now.saturating_duration_since(k.read_at) < self.ttl)
            .map(|k| k.purged_at)
    }

    /// When `tag` was last purged, as last heard, however long ago: for a store that
    /// cannot answer.
    pub(crate) fn last_known(&self, tag: &str) -> Option<u64> {
        self.known.get(tag).map(|k| k.purged_at)
    }

    /// Records what a store read (or an event) that started at `read_at` said of `tag`.
    /// The later purge wins; the later read time too.
    pub(crate) fn learn(&self, tag: &str, purged_at: u64, read_at: Instant) {
        self.known
            .entry_by_ref(tag)
            .and_upsert_with(|old| match old.map(|e| e.into_value()) {
                Some(old) => Known {
                    purged_at: old.purged_at.max(purged_at),
                    read_at: old.read_at.max(read_at),
                },
                None => Known { purged_at, read_at },
            });
    }

    /// Forgets everything (events may have been missed).
    pub(crate) fn clear(&self) {
        self.known.invalidate_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_later_purge_wins_and_values_age_out_of_the_hit_path() {
        let tags = TagPurges::new(Duration::from_secs(2));
        let t0 = Instant::now();
        assert_eq!(tags.current("a", t0), None);
        tags.learn("a", 0, t0);
        assert_eq!(tags.current("a", t0), Some(0));
        // An event, then a store read that started before it and answers after it.
        tags.learn("a", 500, t0 + Duration::from_millis(10));
        tags.learn("a", 0, t0 + Duration::from_millis(5));
        assert_eq!(tags.current("a", t0 + Duration::from_millis(20)), Some(500));
        // Past cache.ttl: no longer for the hit path, still a fallback.
        let late = t0 + Duration::from_secs(3);
        assert_eq!(tags.current("a", late), None);
        assert_eq!(tags.last_known("a"), Some(500));
        tags.learn("b", 1, t0);
        tags.clear();
        assert_eq!(tags.last_known("a"), None);
        assert_eq!(tags.last_known("b"), None);
    }
}
