//! Hot answers: the fresh L1 slot last served for each request target (path and raw
//! query) of a route without `vary`, so a repeated hit skips routing, identity parsing,
//! key derivation and both L1 lookups.
//!
//! An entry is only a shortcut to what the full path found: it is used only while nothing
//! at all was invalidated since it was checked (any event, purge — tag purges included,
//! which is how an entry whose envelope carries a purged tag is never answered — or lost
//! event sends every request back through the full path, which repopulates), while what
//! it rests on is younger than `cache.ttl` (as L1's own entries), and while its envelope
//! is fresh. Routes with `vary` never use it: their identity depends on cookies and
//! headers.
//!
//! **Per thread.** The table is shared; each thread answers from its own [`Copy`] of the
//! entries it served: the body's bytes and the headers of its last answer (rebuilt when
//! the `Cache-Status` ttl they carry changes, once a second), so that a hit writes no
//! memory another thread writes. Two HTTP threads answering from one lock, one reference
//! count and one body's shared count moved those cache lines between the cores on every
//! hit, and cost more than the rest of the hit (`bench/README.md`, issue 34). A copy
//! follows its entry: once the table replaces or drops the entry, the copy is dropped at
//! its next use. Each thread's copies keep to a share of the table's byte budget
//! ([`HotAnswers::new`]).

use std::cell::RefCell;
use std::collections::HashMap;
use std::hash::BuildHasher;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Instant;

use bytes::Bytes;
use http::HeaderMap;

use super::l1::Slot;
use crate::metrics::RouteMetrics;

/// Most entries; past it, or past its byte budget, the table starts over (entries are
/// cheap to rebuild). The same holds for each thread's copies.
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
    /// Set once the table no longer holds it: threads' copies of it are then dropped.
    pub gone: AtomicBool,
}

impl Hot {
    fn weight(&self) -> usize {
        self.slot.weight() + self.target.len() + OVERHEAD
    }
}

/// A thread's copy of an entry: what a hit on this thread reads and clones.
#[derive(Debug)]
pub(crate) struct Copy {
    pub hot: Arc<Hot>,
    /// The envelope's body, copied: its count of owners is this thread's alone.
    pub body: Bytes,
    /// The headers of its last answer on this thread, and the ttl they carry.
    headers: RefCell<Option<(u64, HeaderMap)>>,
}

impl Copy {
    /// The headers of an answer with ttl `ttl`: the last ones when built for the same
    /// ttl, else `build`'s (remembered for the next hit).
    pub(crate) fn headers(&self, ttl: u64, build: impl FnOnce() -> HeaderMap) -> HeaderMap {
        let mut last = self.headers.borrow_mut();
        match &*last {
            Some((built_for, headers)) if *built_for == ttl => headers.clone(),
            _ => last.insert((ttl, build())).1.clone(),
        }
    }
}

/// The table of hot answers of one gateway.
///
/// Entries share their slots with L1, but a slot L1 evicts stays alive while an entry
/// holds it, so the table has a byte budget of its own.
#[derive(Debug)]
pub(crate) struct HotAnswers {
    /// Names this table in the threads' copies.
    id: u64,
    table: RwLock<Table>,
    budget: usize,
    /// What each thread's copies may hold.
    copies_budget: usize,
    /// Seeded per process: a client cannot aim targets at one slot of the table.
    hasher: foldhash::fast::RandomState,
}

#[derive(Debug, Default)]
struct Table {
    entries: HashMap<u64, Arc<Hot>>,
    /// What the entries hold, by [`Hot::weight`].
    bytes: usize,
}

impl Table {
    /// Drops every entry, telling the threads' copies.
    fn clear(&mut self) {
        for hot in self.entries.values() {
            hot.gone.store(true, Ordering::Relaxed);
        }
        *self = Table::default();
    }
}

/// A thread's copies, of one table at a time (the last one it served from).
#[derive(Default)]
struct Copies {
    table: u64,
    entries: HashMap<u64, Rc<Copy>, foldhash::fast::RandomState>,
    bytes: usize,
}

thread_local! {
    static COPIES: RefCell<Copies> = RefCell::default();
}

impl HotAnswers {
    /// A table holding at most `budget` bytes of answers; each thread's copies hold at
    /// most `budget` divided by the machine's cores (all threads together about
    /// `budget` more, when one thread per core answers).
    pub(crate) fn new(budget: u64) -> Self {
        static IDS: AtomicU64 = AtomicU64::new(1);
        let budget = usize::try_from(budget).unwrap_or(usize::MAX);
        let cores = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
        Self {
            id: IDS.fetch_add(1, Ordering::Relaxed),
            table: RwLock::default(),
            budget,
            copies_budget: budget / cores,
            hasher: foldhash::fast::RandomState::default(),
        }
    }

    /// This thread's copy of the entry for `target`, if there is one (not yet checked
    /// for validity).
    pub(crate) fn get(&self, target: &str) -> Option<Rc<Copy>> {
        let hash = self.hasher.hash_one(target);
        COPIES.with_borrow_mut(|copies| {
            if copies.table != self.id {
                // Another gateway's (a test's): its copies go.
                *copies = Copies {
                    table: self.id,
                    ..Copies::default()
                };
            }
            if let Some(copy) = copies.entries.get(&hash)
                && !copy.hot.gone.load(Ordering::Relaxed)
                && *copy.hot.target == *target
            {
                return Some(copy.clone());
            }
            if let Some(old) = copies.entries.remove(&hash) {
                copies.bytes -= old.hot.weight();
            }
            let hot = self.shared(hash, target)?;
            Some(self.copy(copies, hash, hot))
        })
    }

    /// The table's entry for `target` (hashed: `hash`).
    fn shared(&self, hash: u64, target: &str) -> Option<Arc<Hot>> {
        let table = self.table.read().unwrap_or_else(PoisonError::into_inner);
        let hot = table.entries.get(&hash)?;
        (*hot.target == *target).then(|| hot.clone())
    }

    /// Makes this thread's copy of `hot`, kept unless it alone is over the copies'
    /// budget (past it, the copies start over).
    fn copy(&self, copies: &mut Copies, hash: u64, hot: Arc<Hot>) -> Rc<Copy> {
        let weight = hot.weight();
        let copy = Rc::new(Copy {
            body: Bytes::copy_from_slice(&hot.slot.envelope.body),
            hot,
            headers: RefCell::default(),
        });
        if weight <= self.copies_budget {
            if copies.entries.len() >= CAPACITY || copies.bytes + weight > self.copies_budget {
                copies.entries.clear();
                copies.bytes = 0;
            }
            copies.entries.insert(hash, copy.clone());
            copies.bytes += weight;
        }
        copy
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
            old.gone.store(true, Ordering::Relaxed);
            table.bytes -= old.weight();
        }
        if table.entries.len() >= CAPACITY || table.bytes + weight > self.budget {
            table.clear();
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
            gone: AtomicBool::default(),
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
        let table = HotAnswers::new(1 << 30);
        table.insert(hot("/fragments/news"));
        let copy = table.get("/fragments/news").unwrap();
        let built = std::cell::Cell::new(0);
        let build = |ttl: &'static str| {
            built.set(built.get() + 1);
            let mut h = HeaderMap::new();
            h.insert("cache-status", http::HeaderValue::from_static(ttl));
            h
        };
        assert_eq!(copy.headers(9, || build("9"))["cache-status"], "9");
        assert_eq!(copy.headers(9, || build("other"))["cache-status"], "9");
        assert_eq!(built.get(), 1, "the same ttl reuses the headers");
        assert_eq!(copy.headers(8, || build("8"))["cache-status"], "8");
        assert_eq!(built.get(), 2);
    }

    #[test]
    fn each_thread_answers_from_its_own_copy_while_the_entry_lasts() {
        let table = HotAnswers::new(1 << 30);
        let first = Hot {
            slot: Arc::new(Slot::new(envelope(100), Instant::now())),
            ..hot("/f")
        };
        table.insert(first);
        let mine = table.get("/f").unwrap();
        assert!(Rc::ptr_eq(&mine, &table.get("/f").unwrap()), "kept");
        assert_eq!(mine.body, mine.hot.slot.envelope.body);
        assert_ne!(
            mine.body.as_ptr(),
            mine.hot.slot.envelope.body.as_ptr(),
            "the body's bytes are the thread's own"
        );
        let theirs = std::thread::scope(|s| {
            s.spawn(|| table.get("/f").map(|c| c.body.as_ptr() as usize))
                .join()
                .unwrap()
        });
        assert_ne!(theirs, Some(mine.body.as_ptr() as usize));
        // The table replaces the entry: the copy goes with it.
        table.insert(Hot {
            slot: Arc::new(Slot::new(envelope(200), Instant::now())),
            ..hot("/f")
        });
        let now = table.get("/f").unwrap();
        assert_eq!(now.body.len(), 200);
        assert!(mine.hot.gone.load(Ordering::Relaxed));
        // The table starts over: every copy goes.
        let small = HotAnswers::new(u64::try_from(now.hot.weight()).unwrap());
        small.insert(hot("/a"));
        let a = small.get("/a").unwrap();
        small.insert(hot("/b"));
        assert!(a.hot.gone.load(Ordering::Relaxed));
        assert!(small.get("/a").is_none());
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
                gone: AtomicBool::default(),
                ..proto
            });
        }
        let len = table.table.read().unwrap().entries.len();
        assert!(len <= CAPACITY, "{len}");
        assert!(table.get(&format!("/fragments/news?{CAPACITY}")).is_some());
    }
}
