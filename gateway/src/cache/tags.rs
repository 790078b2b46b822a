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

use tessera_protocol::Envelope;
use tessera_protocol::tags::{Purges, Verdict};

/// Most tags remembered.
pub(crate) const CAPACITY: u64 = 100_000;
/// How long a value is kept as a fallback for a store that cannot answer.
const KEPT: Duration = Duration::from_secs(24 * 3600);

#[derive(Debug, Clone)]
struct Known {
    /// The latest purges heard of.
    purges: Purges,
    /// When the store read that told it started, or the latest event since; `None` when
    /// only events told it (which say nothing of the purge records they do not name).
    read_at: Option<Instant>,
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

    /// The purges of `tag`, if read from the store within `cache.ttl` of `now`.
    pub(crate) fn current(&self, tag: &str, now: Instant) -> Option<Purges> {
        self.known
            .get(tag)
            .filter(|k| {
                k.read_at
                    .is_some_and(|at| now.saturating_duration_since(at) < self.ttl)
            })
            .map(|k| k.purges)
    }

    /// The purges of `tag`, as last read, however long ago: for a store that cannot
    /// answer.
    pub(crate) fn last_known(&self, tag: &str) -> Option<Purges> {
        self.known
            .get(tag)
            .filter(|k| k.read_at.is_some())
            .map(|k| k.purges)
    }

    /// What the purges last read of `envelope`'s tags make of it (what is not known
    /// counts as never purged): for a store that cannot answer.
    pub(crate) fn verdict_as_last_known(&self, envelope: &Envelope) -> Verdict {
        let verdicts = envelope.tags.iter().filter_map(|t| self.last_known(t));
        let worst = verdicts.map(|p| p.verdict(envelope)).max();
        worst.unwrap_or(Verdict::Usable)
    }

    /// Records what a store read that started at `read_at` said of `tag`. The later
    /// purge wins; the later read time too.
    pub(crate) fn learn(&self, tag: &str, purges: &Purges, read_at: Instant) {
        self.add(tag, purges, read_at, true);
    }

    /// Records what an event heard at `now` said of `tag`: a tag read before stays
    /// current (events tell every purge since); one never read is still to be read,
    /// since the event says nothing of the purge records it does not name.
    pub(crate) fn heard(&self, tag: &str, purges: &Purges, now: Instant) {
        self.add(tag, purges, now, false);
    }

    fn add(&self, tag: &str, purges: &Purges, at: Instant, read: bool) {
        self.known
            .entry_by_ref(tag)
            .and_upsert_with(|old| match old.map(|e| e.into_value()) {
                Some(mut old) => {
                    old.purges.merge(purges);
                    old.read_at = match old.read_at {
                        Some(before) => Some(before.max(at)),
                        None => read.then_some(at),
                    };
                    old
                }
                None => Known {
                    purges: purges.clone(),
                    read_at: read.then_some(at),
                },
            });
    }

    /// Forgets everything (events may have been missed).
    pub(crate) fn clear(&self) {
        self.known.invalidate_all();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use tessera_protocol::tags::{AllOf, Record};

    use super::*;

    fn at(purged_at: u64) -> Purges {
        Purges {
            at: purged_at,
            record: Arc::default(),
        }
    }

    #[test]
    fn the_later_purge_wins_and_values_age_out_of_the_hit_path() {
        let tags = TagPurges::new(Duration::from_secs(2));
        let t0 = Instant::now();
        assert_eq!(tags.current("a", t0), None);
        tags.learn("a", &at(0), t0);
        assert_eq!(tags.current("a", t0).unwrap().at, 0);
        // An event, then a store read that started before it and answers after it.
        tags.heard("a", &at(500), t0 + Duration::from_millis(10));
        tags.learn("a", &at(0), t0 + Duration::from_millis(5));
        let now = t0 + Duration::from_millis(20);
        assert_eq!(tags.current("a", now).unwrap().at, 500);
        // Past cache.ttl: no longer for the hit path, still a fallback.
        let late = t0 + Duration::from_secs(3);
        assert_eq!(tags.current("a", late), None);
        assert_eq!(tags.last_known("a").unwrap().at, 500);
        tags.learn("b", &at(1), t0);
        tags.clear();
        assert_eq!(tags.last_known("a"), None);
        assert_eq!(tags.last_known("b"), None);
    }

    #[test]
    fn a_tag_only_events_told_of_is_read_before_it_is_trusted() {
        let tags = TagPurges::new(Duration::from_secs(2));
        let t0 = Instant::now();
        let joint = Purges {
            at: 0,
            record: Arc::new(Record {
                folded: 0,
                all_of: vec![AllOf {
                    at: 7,
                    tags: vec!["a".into(), "b".into()],
                }],
                soft: 0,
            }),
        };
        tags.heard("a", &joint, t0);
        assert_eq!(
            tags.current("a", t0),
            None,
            "its instant is still to be read"
        );
        assert_eq!(tags.last_known("a"), None);
        // The read (which began before the event) is merged with what the event said.
        tags.learn("a", &at(3), t0);
        let known = tags.current("a", t0).unwrap();
        assert_eq!((known.at, known.record.all_of.len()), (3, 1));
    }
}
