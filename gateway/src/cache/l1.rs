//! L1: the in-process cache in front of the store.
//!
//! Two moka caches: entries (what the store said about one envelope key — an envelope in
//! its [`Slot`], or "pending") and route generations, and beside them what is known of
//! tag purges ([`super::tags`]), which an envelope's tags are checked against on every use. Both
//! caches are bounded (bytes for slots) and hold entries for at most `cache.ttl`; events
//! evict sooner.
//!
//! Concurrent misses on one key share one load: a burst of identical requests costs one
//! store lookup (and, on a cold key, one lease attempt). A load may answer its callers
//! without L1 keeping the answer ([`Loaded::once`]): the cache does so for a build the
//! load itself queued. The callers waiting for a load are kept apart from the cache
//! itself (moka's own coalescing keeps every answer it shares).
//!
//! Eviction by event has a race that a plain `invalidate` does not close: a load that
//! started *before* an event can finish *after* it and insert what it read. So every event
//! is also written to an invalidation log, every entry remembers when its load started,
//! and an entry loaded before a logged invalidation is treated as absent. This is what
//! makes "a purged fragment is never served again" and "a long-poll wakes the moment the
//! fragment is built" hold under concurrency, not just usually.
//!
//! The log is a fixed table of [`LOG_SLOTS`] timestamps indexed by a hash of the key (or
//! route): each slot holds the latest invalidation of any key that hashes to it. Its
//! memory is fixed (1 MiB) however many events arrive, and it never forgets: two keys that
//! share a slot only cost the other one an early reload, never a missed invalidation.

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use http::HeaderValue;
use tessera_protocol::time::now_ms;
use tessera_protocol::{Envelope, StoreKey};
use tokio::sync::OnceCell;

use super::CacheError;
use super::tags::TagPurges;
use crate::compress::{Encoded, compressible, eligible};
use tessera_protocol::tags::{AllOf, Purges, Record, Verdict};

/// What the store said about one envelope key.
#[derive(Debug)]
pub(crate) enum SlotState {
    /// An envelope (ready or failed).
    Found(Envelope),
    /// No envelope; a build is queued or running (the lease is held).
    Pending,
}

/// What a load found, and whether L1 keeps it.
#[derive(Debug)]
pub(crate) struct Loaded {
    /// What the store said.
    state: SlotState,
    /// False for an answer given once and not kept (see [`Loaded::once`]).
    keep: bool,
}

impl Loaded {
    /// `state`, answered to the callers waiting for this load but not kept.
    pub(crate) fn once(state: SlotState) -> Self {
        Self { state, keep: false }
    }
}

impl From<SlotState> for Loaded {
    fn from(state: SlotState) -> Self {
        Self { state, keep: true }
    }
}

/// A fragment L1 holds: an envelope the store had (ready or failed), with what serving
/// it needs, worked out once rather than on every hit.
#[derive(Debug)]
pub(crate) struct Slot {
    /// The envelope.
    pub envelope: Envelope,
    /// When the load that produced it started.
    loaded_at: Instant,
    /// Set once a rebuild was requested from this slot, so a stale entry served to many
    /// requests asks for one rebuild, not one per request.
    rebuild_requested: AtomicBool,
    /// `Content-Type` and `ETag` of the envelope, validated once rather than on every
    /// hit; `None` when a value cannot be a header (it is then left out).
    pub content_type: Option<HeaderValue>,
    /// See `content_type`.
    pub etag: Option<HeaderValue>,
    /// The body's compressed copies, made on the first hit that asks for each.
    pub encoded: Encoded,
    /// Whether the body is compressed for clients that ask (see
    /// [`crate::compress::eligible`]), decided once rather than on every hit.
    pub compressible: bool,
}

impl Slot {
    pub(crate) fn new(envelope: Envelope, loaded_at: Instant) -> Self {
        let content_type = HeaderValue::from_str(&envelope.content_type).ok();
        let etag = HeaderValue::from_str(&envelope.etag).ok();
        let compressible = content_type
            .as_ref()
            .is_some_and(|ct| eligible(ct.as_bytes(), envelope.body.len()));
        Self {
            envelope,
            loaded_at,
            rebuild_requested: AtomicBool::new(false),
            content_type,
            etag,
            encoded: Encoded::default(),
            compressible,
        }
    }

    /// When the load that produced it started.
    pub(crate) fn loaded_at(&self) -> Instant {
        self.loaded_at
    }

    /// The bytes it holds with its bookkeeping (what L1's byte budget counts, with its
    /// key). A compressible body counts twice: its compressed copies, each kept only
    /// while smaller than the body, may come to as much again.
    pub(crate) fn weight(&self) -> usize {
        let e = &self.envelope;
        let copies = if compressible(e.content_type.as_bytes()) {
            e.body.len()
        } else {
            0
        };
        e.body.len() + copies + e.content_type.len() + e.etag.len() + SLOT_OVERHEAD
    }

    /// True for the first caller only.
    pub(crate) fn claim_rebuild(&self) -> bool {
        !self.rebuild_requested.swap(true, Ordering::AcqRel)
    }
}

/// What L1 holds for one envelope key.
#[derive(Debug, Clone)]
pub(crate) enum Entry {
    /// The store had an envelope.
    Found(Arc<Slot>),
    /// The store had none, and a build is queued or running (the lease is held).
    Pending {
        /// When the load that found it started.
        loaded_at: Instant,
    },
}

impl Entry {
    fn new(state: SlotState, loaded_at: Instant) -> Self {
        match state {
            SlotState::Found(envelope) => Entry::Found(Arc::new(Slot::new(envelope, loaded_at))),
            SlotState::Pending => Entry::Pending { loaded_at },
        }
    }

    /// When the load that produced it started.
    pub(crate) fn loaded_at(&self) -> Instant {
        match self {
            Entry::Found(slot) => slot.loaded_at,
            Entry::Pending { loaded_at } => *loaded_at,
        }
    }

    fn weight(&self) -> usize {
        match self {
            Entry::Found(slot) => slot.weight(),
            Entry::Pending { .. } => SLOT_OVERHEAD,
        }
    }
}

/// What one slot costs beyond its key and envelope bytes: the slot and envelope structs,
/// the built headers, moka's entry with its queue and timer nodes, the allocator's
/// headers. Measured with heaptrack after a burst (`bench/memory.sh`, figures in
/// `bench/README.md`), so that `cache.capacity` bounds the memory L1 really holds: 512
/// bytes, before the slot grew the cells of its compressed copies, counted here by their
/// size (the copies' bytes are counted in [`Slot::weight`]).
const SLOT_OVERHEAD: usize = 512 + std::mem::size_of::<Encoded>();

#[derive(Debug, Clone, Copy)]
struct Generation {
    value: u64,
    /// The route's last soft purge (Unix ms; 0 for none), read with the generation.
    soft_at: u64,
    loaded_at: Instant,
}

/// Slots of the invalidation log: 1 MiB of timestamps. At 1,000 events a second and a
/// `cache.ttl` of 2 s, an entry shares a slot with a fresh event about 1.5 % of the time
/// (an early reload).
pub(crate) const LOG_SLOTS: usize = 1 << 17;
/// Most route generations cached.
const GENERATION_CAPACITY: u64 = 10_000;
/// How long a generation read from the store is kept as a fallback for a store that
/// cannot answer (it is read again after `cache.ttl` while the store answers).
const GENERATION_KEPT: Duration = Duration::from_secs(24 * 3600);

struct SlotExpiry {
    ttl: Duration,
}

impl moka::Expiry<StoreKey, Entry> for SlotExpiry {
    fn expire_after_create(&self, _: &StoreKey, entry: &Entry, _: Instant) -> Option<Duration> {
        let ttl = match entry {
            // Read for `cache.ttl`, then kept as a fallback for a store that cannot answer,
            // but never past the moment the store would drop it.
            Entry::Found(slot) => slot.envelope.store_ttl(now_ms()),
            Entry::Pending { .. } => self.ttl,
        };
        Some(ttl)
    }
}

impl moka::Expiry<StoreKey, Arc<Slot>> for SlotExpiry {
    fn expire_after_create(&self, _: &StoreKey, slot: &Arc<Slot>, _: Instant) -> Option<Duration> {
        Some(slot.envelope.store_ttl(now_ms()))
    }
}

/// What [`L1::read`] found.
#[derive(Debug)]
pub(crate) enum Read {
    /// What L1 holds, or what a load found, within `cache.ttl`.
    Current(Entry),
    /// The store could not be reached: the copy L1 last read, past `cache.ttl`.
    Fallback(Arc<Slot>),
}

/// L1's hasher, for its maps and the invalidation log: seeded per process, and several
/// times faster than the standard library's SipHash on keys this short (SipHash was a
/// few per cent of a gateway's samples in a miss storm).
type Hasher = foldhash::fast::RandomState;

/// The L1 cache of one gateway.
pub(crate) struct L1 {
    slots: Option<moka::future::Cache<StoreKey, Entry, Hasher>>,
    /// Loads in flight, each shared by every caller that missed the key meanwhile.
    loading: Mutex<HashMap<StoreKey, Arc<Load>, Hasher>>,
    /// Entries past `cache.ttl` taken out of `slots` to be read again: what every
    /// concurrent reader falls back to while the store cannot answer, not only the one
    /// that took it out. Dropped once a read succeeds.
    reloading: moka::sync::Cache<StoreKey, Arc<Slot>, Hasher>,
    generations: moka::future::Cache<String, Generation, Hasher>,
    /// The last generation read of each route, for the same fallback.
    known: moka::sync::Cache<String, Generation, Hasher>,
    /// Nanoseconds after `base` of the latest invalidation of the keys hashing to each slot.
    log: Box<[AtomicU64]>,
    hasher: Hasher,
    /// Entries loaded before `base + everything_before` nanoseconds are invalid.
    base: Instant,
    everything_before: AtomicU64,
    /// Nanoseconds after `base` of the latest invalidation of any kind.
    last_invalidation: AtomicU64,
    /// `cache.ttl`.
    ttl: Duration,
    /// What is known of tag purges, so a hit checks its envelope's tags without I/O.
    pub tags: TagPurges,
}

/// One load in flight: its outcome, once known, for every caller waiting on it.
type Load = OnceCell<Result<Entry, CacheError>>;

/// A caller's share of the load of `key`: the load in flight, or a new one. Dropped, it
/// takes the load out of [`L1::loading`] (the first caller done does, so a key is never
/// left there, even by a cancelled request); callers still waiting keep their share.
struct Waiting<'a> {
    l1: &'a L1,
    key: &'a StoreKey,
    load: Arc<Load>,
}

impl<'a> Waiting<'a> {
    fn join(l1: &'a L1, key: &'a StoreKey) -> Self {
        let load = l1.loading().entry(key.clone()).or_default().clone();
        Self { l1, key, load }
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        let mut loading = self.l1.loading();
        if loading
            .get(self.key)
            .is_some_and(|l| Arc::ptr_eq(l, &self.load))
        {
            loading.remove(self.key);
        }
    }
}

impl std::fmt::Debug for L1 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("L1")
            .field("entries", &self.entry_count())
            .field("bytes", &self.weighted_size())
            .finish()
    }
}

/// What an invalidation is logged under. Hashed as it is, so the hit path that checks a
/// route's generation makes no string for it.
#[derive(Debug, Clone, Copy, Hash)]
enum Logged<'a> {
    Key(&'a str),
    /// A route's generation.
    Route(&'a str),
    Tag(&'a str),
}

impl L1 {
    /// A cache of at most `capacity` bytes whose entries live at most `ttl`.
    /// `capacity == 0` disables slot caching (every request reads the store).
    pub(crate) fn new(capacity: u64, ttl: Duration) -> Self {
        let slots = (capacity > 0).then(|| {
            moka::future::Cache::builder()
                .max_capacity(capacity)
                .weigher(|k: &StoreKey, e: &Entry| {
                    u32::try_from(k.as_str().len() + e.weight()).unwrap_or(u32::MAX)
                })
                .expire_after(SlotExpiry { ttl })
                .build_with_hasher(Hasher::default())
        });
        Self {
            slots,
            loading: Mutex::default(),
            reloading: moka::sync::Cache::builder()
                .max_capacity(capacity)
                .weigher(|k: &StoreKey, s: &Arc<Slot>| {
                    u32::try_from(k.as_str().len() + s.weight()).unwrap_or(u32::MAX)
                })
                .expire_after(SlotExpiry { ttl })
                .build_with_hasher(Hasher::default()),
            generations: moka::future::Cache::builder()
                .max_capacity(GENERATION_CAPACITY)
                .time_to_live(ttl)
                .build_with_hasher(Hasher::default()),
            known: moka::sync::Cache::builder()
                .max_capacity(GENERATION_CAPACITY)
                .time_to_live(ttl.max(GENERATION_KEPT))
                .build_with_hasher(Hasher::default()),
            log: (0..LOG_SLOTS).map(|_| AtomicU64::new(0)).collect(),
            hasher: Hasher::default(),
            base: Instant::now(),
            everything_before: AtomicU64::new(0),
            last_invalidation: AtomicU64::new(0),
            ttl,
            tags: TagPurges::new(ttl),
        }
    }

    fn still_valid(&self, logged: Logged<'_>, loaded_at: Instant) -> bool {
        let at =
            |nanos: &AtomicU64| self.base + Duration::from_nanos(nanos.load(Ordering::Acquire));
        // Fast path: loaded after the latest invalidation of anything.
        if loaded_at > at(&self.last_invalidation) {
            return true;
        }
        loaded_at > at(&self.everything_before) && loaded_at > at(self.log_slot(logged))
    }

    fn log_slot(&self, logged: Logged<'_>) -> &AtomicU64 {
        // The low bits of a 64-bit hash; the cast keeps them.
        #[allow(clippy::cast_possible_truncation)]
        let i = self.hasher.hash_one(logged) as usize % LOG_SLOTS;
        &self.log[i]
    }

    /// Logs an invalidation of `logged` now.
    fn log(&self, logged: Logged<'_>) {
        let nanos = u64::try_from(self.base.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.log_slot(logged).fetch_max(nanos, Ordering::AcqRel);
        self.last_invalidation.fetch_max(nanos, Ordering::AcqRel);
    }

    /// The generation of `route` and its last soft purge, from L1 or from `load`, and
    /// when they were read from the store. Past `cache.ttl` they are read again; when the
    /// store cannot answer then, what L1 last read serves on (a route purge would have
    /// invalidated it).
    pub(crate) async fn generation<L, F>(
        &self,
        route: &str,
        load: L,
    ) -> Result<(u64, u64, Instant), CacheError>
    where
        L: FnOnce() -> F,
        F: Future<Output = Result<(u64, u64), CacheError>>,
    {
        let logged = Logged::Route(route);
        let started = Instant::now();
        if let Some(g) = self.generations.get(route).await {
            if self.still_valid(logged, g.loaded_at)
                && started.saturating_duration_since(g.loaded_at) < self.ttl
            {
                return Ok((g.value, g.soft_at, g.loaded_at));
            }
            self.generations.invalidate(route).await;
        }
        // Boxed, like the miss path of `slot`: it keeps the hit path's future small.
        let loaded = Box::pin(
            self.generations
                .try_get_with(route.to_string(), async move {
                    load().await.map(|(value, soft_at)| Generation {
                        value,
                        soft_at,
                        loaded_at: started,
                    })
                }),
        )
        .await
        .map_err(Arc::unwrap_or_clone);
        match loaded {
            Ok(g) => {
                if self.still_valid(logged, g.loaded_at) {
                    self.known.insert(route.to_string(), g);
                } else {
                    // The load straddled a purge: answer it, keep nothing.
                    self.generations.invalidate(route).await;
                }
                Ok((g.value, g.soft_at, g.loaded_at))
            }
            Err(CacheError::Store(e)) => self
                .known
                .get(route)
                .filter(|g| self.still_valid(logged, g.loaded_at))
                .map(|g| (g.value, g.soft_at, g.loaded_at))
                .ok_or(CacheError::Store(e)),
            Err(e) => Err(e),
        }
    }

    /// Whether nothing was invalidated since `at` (events, purges, lost events), and
    /// an entry loaded at `loaded_at` is, `now`, within `cache.ttl`: what lets a hot
    /// answer checked at `at` be reused without looking anything up.
    pub(crate) fn unchanged_since(&self, at: Instant, loaded_at: Instant, now: Instant) -> bool {
        let last = self.base + Duration::from_nanos(self.last_invalidation.load(Ordering::Acquire));
        at > last && now.saturating_duration_since(loaded_at) < self.ttl
    }

    /// Whether slots are cached at all (`cache.capacity` > 0).
    pub(crate) fn enabled(&self) -> bool {
        self.slots.is_some()
    }

    /// What L1 holds for `key`, or what `load` finds (one load shared by concurrent
    /// callers).
    ///
    /// An entry past `cache.ttl` is loaded again; when the store cannot answer then, the
    /// entry serves on as a [`Read::Fallback`] while its envelope is servable (within
    /// the route's `stale` window). Invalidated entries (events, purges) are never used.
    ///
    /// `load` builds the loading future only on a miss, and the miss path is boxed: a hit
    /// then creates and moves a small future, which is most of what a hit costs.
    pub(crate) async fn read<L, F, S>(&self, key: &StoreKey, load: L) -> Result<Read, CacheError>
    where
        L: FnOnce() -> F,
        F: Future<Output = Result<S, CacheError>>,
        S: Into<Loaded>,
    {
        let started = Instant::now();
        let Some(slots) = &self.slots else {
            let loaded: Loaded = Box::pin(load()).await?.into();
            return Ok(Read::Current(Entry::new(loaded.state, started)));
        };
        if let Some(entry) = slots.get(key).await {
            let loaded_at = entry.loaded_at();
            if !self.still_valid(Logged::Key(key.as_str()), loaded_at) {
                slots.invalidate(key).await;
            } else if started.saturating_duration_since(loaded_at) < self.ttl {
                return Ok(Read::Current(entry));
            } else {
                if let Entry::Found(slot) = entry {
                    self.reloading.insert(key.clone(), slot);
                }
                slots.invalidate(key).await;
            }
        }
        Box::pin(self.reload(slots, key, load, started)).await
    }

    /// The miss path of [`Self::read`]: loads (or waits for the load another caller
    /// started), and falls back to the copy waiting in `reloading` when the store cannot
    /// answer.
    async fn reload<L, F, S>(
        &self,
        slots: &moka::future::Cache<StoreKey, Entry, Hasher>,
        key: &StoreKey,
        load: L,
        started: Instant,
    ) -> Result<Read, CacheError>
    where
        L: FnOnce() -> F,
        F: Future<Output = Result<S, CacheError>>,
        S: Into<Loaded>,
    {
        // Taken out of `loading` when this caller is done, however it ends (a cancelled
        // request too), so a key never stays there.
        let shared = Waiting::join(self, key);
        let outcome = shared
            .load
            .get_or_init(|| async {
                let loaded: Loaded = load().await?.into();
                let entry = Entry::new(loaded.state, started);
                // Kept before its callers are answered, so a caller that comes after
                // them finds it in L1.
                if loaded.keep && self.still_valid(Logged::Key(key.as_str()), started) {
                    slots.insert(key.clone(), entry.clone()).await;
                }
                Ok(entry)
            })
            .await
            .clone();
        drop(shared);
        match outcome {
            Ok(entry) => {
                self.reloading.invalidate(key);
                Ok(Read::Current(entry))
            }
            Err(CacheError::Store(e)) => self
                .reloading
                .get(key)
                .filter(|slot| self.usable_fallback(key, slot))
                .map(Read::Fallback)
                .ok_or(CacheError::Store(e)),
            Err(e) => Err(e),
        }
    }

    fn loading(&self) -> std::sync::MutexGuard<'_, HashMap<StoreKey, Arc<Load>, Hasher>> {
        self.loading.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether `slot`, past `cache.ttl`, may still be served while the store is down:
    /// valid, servable, and not retired by any tag purge heard of.
    fn usable_fallback(&self, key: &StoreKey, slot: &Slot) -> bool {
        let e = &slot.envelope;
        self.still_valid(Logged::Key(key.as_str()), slot.loaded_at)
            && e.servable(now_ms())
            && self.tags.verdict_as_last_known(e) != Verdict::Retired
    }

    /// The slot of `key` loaded past `cache.ttl` ago, still valid and servable: what to
    /// serve when the store cannot be asked. Never loads.
    pub(crate) async fn kept(&self, key: &StoreKey) -> Option<Arc<Slot>> {
        let slot = match self.slots.as_ref()?.get(key).await {
            Some(Entry::Found(slot)) => slot,
            Some(Entry::Pending { .. }) => return None,
            None => self.reloading.get(key)?,
        };
        self.usable_fallback(key, &slot).then_some(slot)
    }

    /// The cached entry of `key`, if there is a valid one within `cache.ttl`; never
    /// loads.
    pub(crate) async fn peek(&self, key: &StoreKey) -> Option<Entry> {
        let entry = self.slots.as_ref()?.get(key).await?;
        let loaded_at = entry.loaded_at();
        (self.still_valid(Logged::Key(key.as_str()), loaded_at) && loaded_at.elapsed() < self.ttl)
            .then_some(entry)
    }

    /// Caches what a batch load that started at `loaded_at` found for `key` (unless it is
    /// [`Loaded::once`]), and returns it.
    pub(crate) async fn insert(
        &self,
        key: &StoreKey,
        loaded: impl Into<Loaded>,
        loaded_at: Instant,
    ) -> Entry {
        let loaded = loaded.into();
        let entry = Entry::new(loaded.state, loaded_at);
        if let Some(slots) = &self.slots
            && loaded.keep
            && self.still_valid(Logged::Key(key.as_str()), loaded_at)
        {
            slots.insert(key.clone(), entry.clone()).await;
        }
        entry
    }

    /// Forgets `key` and anything loaded for it before now (built, failed, purged).
    pub(crate) async fn invalidate_key(&self, key: &StoreKey) {
        self.log(Logged::Key(key.as_str()));
        self.reloading.invalidate(key);
        if let Some(slots) = &self.slots {
            slots.invalidate(key).await;
        }
    }

    /// A route moved to a new generation: forget its cached generation.
    pub(crate) async fn invalidate_route(&self, route: &str) {
        self.log(Logged::Route(route));
        self.known.invalidate(route);
        self.generations.invalidate(route).await;
    }

    /// `tag` was purged at `purged_at` (Unix ms), or softly purged. Hot answers are
    /// dropped with it (they check no tags).
    pub(crate) fn invalidate_tag(&self, tag: &str, purged_at: u64, soft: bool) {
        let purges = if soft {
            Purges {
                at: 0,
                record: Arc::new(Record {
                    soft: purged_at,
                    ..Record::default()
                }),
            }
        } else {
            Purges {
                at: purged_at,
                record: Arc::default(),
            }
        };
        self.tags.heard(tag, &purges, Instant::now());
        self.log(Logged::Tag(tag));
    }

    /// The fragments carrying all of `tags` (sorted, the first one their record's) were
    /// purged at `purged_at` (Unix ms). Hot answers are dropped with them.
    pub(crate) fn invalidate_all_of(&self, tags: &[String], purged_at: u64) {
        let Some(home) = tags.first() else { return };
        let record = Record {
            folded: 0,
            all_of: vec![AllOf {
                at: purged_at,
                tags: tags.to_vec(),
            }],
            soft: 0,
        };
        let purges = Purges {
            at: 0,
            record: Arc::new(record),
        };
        self.tags.heard(home, &purges, Instant::now());
        self.log(Logged::Tag(home));
    }

    /// Events may have been missed: forget everything loaded before now.
    pub(crate) fn invalidate_all(&self) {
        let nanos = u64::try_from(self.base.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.everything_before.fetch_max(nanos, Ordering::AcqRel);
        self.last_invalidation.fetch_max(nanos, Ordering::AcqRel);
        if let Some(slots) = &self.slots {
            slots.invalidate_all();
        }
        self.reloading.invalidate_all();
        self.generations.invalidate_all();
        self.known.invalidate_all();
        self.tags.clear();
    }

    /// Brings the entry and byte counts up to date (moka counts lazily).
    pub(crate) async fn settle_counts(&self) {
        if let Some(slots) = &self.slots {
            slots.run_pending_tasks().await;
        }
    }

    /// Entries held (approximate until [`L1::settle_counts`]).
    pub(crate) fn entry_count(&self) -> u64 {
        self.slots.as_ref().map_or(0, |s| s.entry_count())
    }

    /// Bytes held (approximate).
    pub(crate) fn weighted_size(&self) -> u64 {
        self.slots.as_ref().map_or(0, |s| s.weighted_size())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use tessera_protocol::{Identity, Keyspace};

    fn key(n: u64) -> StoreKey {
        let id = Identity {
            route: "r".into(),
            params: vec![],
            vary: vec![],
        };
        Keyspace::new("t").fragment(&id, n).envelope
    }

    #[tokio::test]
    async fn concurrent_misses_load_once() {
        let l1 = Arc::new(L1::new(1 << 20, Duration::from_secs(2)));
        let loads = Arc::new(AtomicUsize::new(0));
        let tasks: Vec<_> = (0..100)
            .map(|_| {
                let (l1, loads) = (l1.clone(), loads.clone());
                tokio::spawn(async move {
                    l1.read(&key(1), || async {
                        loads.fetch_add(1, Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        Ok(SlotState::Pending)
                    })
                    .await
                    .unwrap()
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(loads.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn an_answer_given_once_is_shared_but_not_kept() {
        let l1 = Arc::new(L1::new(1 << 20, Duration::from_secs(2)));
        let loads = Arc::new(AtomicUsize::new(0));
        let load = |loads: Arc<AtomicUsize>| async move {
            loads.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(20)).await;
            Ok(Loaded::once(SlotState::Pending))
        };
        let tasks: Vec<_> = (0..100)
            .map(|_| {
                let (l1, loads) = (l1.clone(), loads.clone());
                tokio::spawn(async move { l1.read(&key(1), || load(loads)).await.unwrap() })
            })
            .collect();
        for t in tasks {
            let read = t.await.unwrap();
            assert!(matches!(read, Read::Current(Entry::Pending { .. })));
        }
        assert_eq!(loads.load(Ordering::SeqCst), 1, "callers share the load");
        l1.settle_counts().await;
        assert_eq!(l1.entry_count(), 0, "nothing kept");
        l1.read(&key(1), || load(loads.clone())).await.unwrap();
        assert_eq!(
            loads.load(Ordering::SeqCst),
            2,
            "the next caller loads again"
        );
        // What a batch load answers once is not kept either.
        l1.insert(&key(2), Loaded::once(SlotState::Pending), Instant::now())
            .await;
        assert!(l1.peek(&key(2)).await.is_none());
        l1.insert(&key(2), SlotState::Pending, Instant::now()).await;
        assert!(l1.peek(&key(2)).await.is_some());
    }

    #[tokio::test]
    async fn a_load_that_straddles_an_invalidation_is_not_served() {
        let l1 = Arc::new(L1::new(1 << 20, Duration::from_secs(60)));
        let (started_tx, started_rx) = tokio::sync::oneshot::channel();
        let (finish_tx, finish_rx) = tokio::sync::oneshot::channel::<()>();
        let loader = {
            let l1 = l1.clone();
            tokio::spawn(async move {
                l1.read(&key(1), || async move {
                    started_tx.send(()).unwrap();
                    finish_rx.await.unwrap();
                    Ok(SlotState::Pending)
                })
                .await
                .unwrap()
            })
        };
        started_rx.await.unwrap();
        // The event arrives while the load is in flight…
        l1.invalidate_key(&key(1)).await;
        finish_tx.send(()).unwrap();
        loader.await.unwrap();
        // …so what it inserted must not be used: the next read loads again.
        let reloaded = AtomicBool::new(false);
        l1.read(&key(1), || async {
            reloaded.store(true, Ordering::SeqCst);
            Ok(SlotState::Pending)
        })
        .await
        .unwrap();
        assert!(reloaded.load(Ordering::SeqCst));
    }

    #[tokio::test]
    async fn the_log_remembers_under_many_events_and_only_for_its_key() {
        let l1 = L1::new(1 << 20, Duration::from_secs(60));
        let loaded = Instant::now();
        l1.invalidate_key(&key(0)).await;
        // Twice as many other events as the log has slots: every slot written again.
        for n in 1..=(2 * LOG_SLOTS as u64) {
            l1.log(Logged::Key(key(n).as_str()));
        }
        assert!(
            !l1.still_valid(Logged::Key(key(0).as_str()), loaded),
            "a load from before the event stays invalid"
        );
        let later = Instant::now();
        l1.invalidate_key(&key(0)).await;
        // Other keys loaded before it are untouched, bar a rare shared slot.
        let untouched = (1..=20)
            .filter(|n| l1.still_valid(Logged::Key(key(2 * LOG_SLOTS as u64 + n).as_str()), later))
            .count();
        assert!(untouched >= 19, "only {untouched} of 20 other keys kept");
        assert!(
            l1.still_valid(Logged::Key(key(0).as_str()), Instant::now()),
            "loads after it are valid"
        );
    }

    #[tokio::test]
    async fn errors_are_not_cached() {
        let l1 = L1::new(1 << 20, Duration::from_secs(60));
        let e = l1
            .read(&key(1), || async {
                Err::<SlotState, _>(CacheError::Store(
                    tessera_protocol::StoreError::Unavailable("x".into()),
                ))
            })
            .await;
        assert!(matches!(e, Err(CacheError::Store(_))));
        let ok = l1.read(&key(1), || async { Ok(SlotState::Pending) }).await;
        assert!(ok.is_ok());
    }

    #[tokio::test]
    async fn route_invalidation_reloads_the_generation() {
        let l1 = L1::new(1 << 20, Duration::from_secs(60));
        assert_eq!(
            l1.generation("r", || async { Ok((1, 0)) }).await.unwrap().0,
            1
        );
        assert_eq!(
            l1.generation("r", || async { Ok((2, 0)) }).await.unwrap().0,
            1,
            "cached"
        );
        l1.invalidate_route("r").await;
        assert_eq!(
            l1.generation("r", || async { Ok((2, 0)) }).await.unwrap().0,
            2
        );
        l1.invalidate_all();
        assert_eq!(
            l1.generation("r", || async { Ok((3, 0)) }).await.unwrap().0,
            3
        );
    }

    #[tokio::test]
    async fn unchanged_since_sees_every_invalidation_and_the_ttl() {
        let l1 = L1::new(1 << 20, Duration::from_secs(60));
        let checked = Instant::now();
        assert!(l1.unchanged_since(checked, checked, Instant::now()));
        l1.invalidate_key(&key(1)).await;
        assert!(
            !l1.unchanged_since(checked, checked, Instant::now()),
            "any key's event"
        );
        let checked = Instant::now();
        assert!(l1.unchanged_since(checked, checked, Instant::now()));
        l1.invalidate_route("r").await;
        assert!(
            !l1.unchanged_since(checked, checked, Instant::now()),
            "a route purge"
        );
        let checked = Instant::now();
        l1.invalidate_all();
        assert!(
            !l1.unchanged_since(checked, checked, Instant::now()),
            "lost events"
        );
        let checked = Instant::now();
        let long_ago = checked.checked_sub(Duration::from_secs(61)).unwrap();
        assert!(
            !l1.unchanged_since(checked, long_ago, Instant::now()),
            "older than cache.ttl"
        );
    }

    #[tokio::test]
    async fn disabled_cache_always_loads() {
        let l1 = L1::new(0, Duration::from_secs(60));
        let loads = AtomicUsize::new(0);
        for _ in 0..3 {
            l1.read(&key(1), || async {
                loads.fetch_add(1, Ordering::SeqCst);
                Ok(SlotState::Pending)
            })
            .await
            .unwrap();
        }
        assert_eq!(loads.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn rebuild_is_claimed_once() {
        let SlotState::Found(envelope) = found(Duration::ZERO) else {
            unreachable!()
        };
        let slot = Slot::new(envelope, Instant::now());
        assert!(slot.claim_rebuild());
        assert!(!slot.claim_rebuild());
    }

    fn found(stale: Duration) -> SlotState {
        SlotState::Found(Envelope::ready(
            bytes::Bytes::from_static(b"<p>x</p>"),
            "text/html".into(),
            Duration::ZERO,
            stale,
            1,
            1,
        ))
    }

    fn store_down() -> CacheError {
        CacheError::Store(tessera_protocol::StoreError::Unavailable("down".into()))
    }

    const TTL: Duration = Duration::from_millis(50);

    #[tokio::test]
    async fn past_the_ttl_a_dead_store_gets_the_copy_l1_kept() {
        let l1 = L1::new(1 << 20, TTL);
        let first = l1
            .read(&key(1), || async { Ok(found(Duration::from_secs(60))) })
            .await;
        assert!(matches!(first.unwrap(), Read::Current(Entry::Found(_))));
        std::thread::sleep(TTL * 2);
        let read = l1
            .read(&key(1), || async { Err::<SlotState, _>(store_down()) })
            .await;
        let read = read.expect("served from L1");
        assert!(matches!(read, Read::Fallback(_)));
        assert!(l1.kept(&key(1)).await.is_some());
        assert!(
            l1.peek(&key(1)).await.is_none(),
            "past the ttl: not current"
        );
        // The store answers again: it is read, not the copy.
        let read = l1.read(&key(1), || async { Ok(SlotState::Pending) }).await;
        assert!(matches!(
            read.unwrap(),
            Read::Current(Entry::Pending { .. })
        ));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_concurrent_reader_past_the_ttl_gets_the_kept_copy() {
        let l1 = Arc::new(L1::new(1 << 20, TTL));
        l1.read(&key(1), || async { Ok(found(Duration::from_secs(60))) })
            .await
            .unwrap();
        assert_eq!(
            l1.generation("r", || async { Ok((7, 0)) }).await.unwrap().0,
            7
        );
        std::thread::sleep(TTL * 2);
        // The store hangs a little, then fails: the readers overlap.
        let reads: Vec<_> = (0..20)
            .map(|_| {
                let l1 = l1.clone();
                tokio::spawn(async move {
                    let hang = || tokio::time::sleep(Duration::from_millis(20));
                    let generation = l1
                        .generation("r", || async {
                            hang().await;
                            Err(store_down())
                        })
                        .await
                        .map(|g| g.0);
                    let slot = l1
                        .read(&key(1), || async {
                            hang().await;
                            Err::<SlotState, _>(store_down())
                        })
                        .await
                        .map(|r| matches!(r, Read::Fallback(_)));
                    (generation, slot)
                })
            })
            .collect();
        for read in reads {
            let (generation, slot) = read.await.unwrap();
            assert_eq!(generation.expect("the kept generation"), 7);
            assert!(slot.expect("the kept copy"), "served as a fallback");
        }
    }

    #[tokio::test]
    async fn no_copy_of_an_invalidated_or_unservable_entry() {
        let l1 = L1::new(1 << 20, TTL);
        l1.read(&key(1), || async { Ok(found(Duration::from_secs(60))) })
            .await
            .unwrap();
        // Past its stale window: nothing to serve.
        l1.read(&key(2), || async { Ok(found(Duration::ZERO)) })
            .await
            .unwrap();
        l1.read(&key(3), || async { Ok(SlotState::Pending) })
            .await
            .unwrap();
        l1.invalidate_key(&key(1)).await;
        std::thread::sleep(TTL * 2);
        for n in 1..=3 {
            let read = l1
                .read(&key(n), || async { Err::<SlotState, _>(store_down()) })
                .await;
            assert!(read.is_err(), "key {n}");
            assert!(l1.kept(&key(n)).await.is_none(), "key {n}");
        }
    }

    #[tokio::test]
    async fn a_generation_outlives_a_dead_store_but_not_a_purge() {
        let l1 = L1::new(1 << 20, TTL);
        assert_eq!(
            l1.generation("r", || async { Ok((4, 0)) }).await.unwrap().0,
            4
        );
        std::thread::sleep(TTL * 2);
        let kept = l1.generation("r", || async { Err(store_down()) }).await;
        assert_eq!(kept.unwrap().0, 4);
        assert_eq!(
            l1.generation("r", || async { Ok((5, 0)) }).await.unwrap().0,
            5
        );
        l1.invalidate_route("r").await;
        std::thread::sleep(TTL * 2);
        assert!(
            l1.generation("r", || async { Err(store_down()) })
                .await
                .is_err()
        );
    }
}
