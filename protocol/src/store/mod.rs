//! L2: where envelopes, pending leases and route generations live.
//!
//! The contract is memcached's, because that is the shared store in distributed mode; the
//! in-memory twin ([`MemoryStore`]) keeps the same semantics so the gateway and workers
//! behave the same in both modes and the same tests run against both.
//!
//! - Values are opaque bytes, at most `max_item_size`; bigger ones fail with
//!   [`StoreError::TooLarge`] and are never cut.
//! - TTLs are durations rounded up to whole seconds; [`Duration::ZERO`] means "never
//!   expires" (the store may still evict under memory pressure).
//! - `add` is atomic across every process sharing the store: of many concurrent callers
//!   for one absent key exactly one gets `true`. This is what makes "exactly one build".
//! - A lost connection is a [`StoreError::Unavailable`]; the implementation reconnects on
//!   a later call by itself. Every call has a deadline.
//!
//! # Several servers, and losing one
//!
//! A store may spread keys over several servers and keep serving when one of them is
//! out (the memcached store does; its module docs say how it finds a server out, skips
//! it, and takes it back). Then:
//!
//! - an **envelope** lives on one server, the first of its placement order that is up;
//!   a copy lost with its server is rebuilt;
//! - **invalidation metadata and leases** are kept on the first two servers up
//!   ([`copies`]), so that no purge and no lease is lost with one server, whichever
//!   server each process believes out;
//! - a **purge of one fragment** deletes it from both ([`copies::delete_everywhere`]);
//!   purges of every kind are accepted while one server is out;
//! - a server that **comes back** never serves what it held before it left: the store
//!   empties it (or deletes what was written elsewhere in its place) before using it
//!   again, so nothing purged or rebuilt meanwhile comes back with it.
//!
//! The callers that need it ([`generation`], [`bump_generation`], [`crate::tags`],
//! [`crate::lease`]) work on the copies; everything else sees one store.

pub mod copies;

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;

use crate::error::Cause;
use crate::key::StoreKey;
use crate::time::{ceil_secs, now_ms};

pub use copies::{COPIES, Register, copies};

/// A store call failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// The store did not answer in time or the connection failed. Retrying later helps.
    #[error("store unavailable: {0}")]
    Unavailable(#[source] Cause),
    /// The value is bigger than the store accepts. Permanent for this value.
    #[error("value of {size} bytes exceeds the store's item limit of {max} bytes")]
    TooLarge {
        /// Encoded size.
        size: usize,
        /// The limit.
        max: usize,
    },
    /// The store answered something unexpected.
    #[error("store protocol error: {0}")]
    Protocol(String),
}

impl StoreError {
    /// Whether trying again later may succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(self, StoreError::Unavailable(_))
    }
}

/// The shared key-value store (memcached semantics).
#[async_trait]
pub trait Store: Send + Sync + fmt::Debug + 'static {
    /// The value of `key`, or `None` when absent or expired.
    async fn get(&self, key: &StoreKey) -> Result<Option<Bytes>, StoreError>;

    /// The values of all present `keys` in one round trip per server.
    async fn get_many(&self, keys: &[StoreKey]) -> Result<HashMap<StoreKey, Bytes>, StoreError>;

    /// Stores `value` only if `key` is absent. Atomic across all processes sharing the
    /// store: `Ok(true)` for exactly one of concurrent callers, `Ok(false)` for the rest.
    async fn add(&self, key: &StoreKey, value: &[u8], ttl: Duration) -> Result<bool, StoreError>;

    /// Stores `value`, replacing any previous one.
    async fn set(&self, key: &StoreKey, value: &[u8], ttl: Duration) -> Result<(), StoreError>;

    /// [`add`](Self::add), then, only when it stored, the value of `then`, read after the
    /// add took effect: it sees every write that reached the store before the add.
    /// `None` when the add did not store. memcached does both in one exchange when the
    /// two keys live on one server (a lease and its envelope always do).
    async fn add_then_get(
        &self,
        key: &StoreKey,
        value: &[u8],
        ttl: Duration,
        then: &StoreKey,
    ) -> Result<Option<Option<Bytes>>, StoreError> {
        add_then_get_in_turn(self, key, value, ttl, then).await
    }

    /// [`set`](Self::set), then a delete of `then`, applied after the set so nobody sees
    /// `then` gone before `key` written. The outer result is the set's; the inner one the
    /// delete's (whether `then` was there). memcached does both in one exchange when the
    /// two keys live on one server, and then applies the delete even when the set failed.
    async fn set_then_delete(
        &self,
        key: &StoreKey,
        value: &[u8],
        ttl: Duration,
        then: &StoreKey,
    ) -> Result<Result<bool, StoreError>, StoreError> {
        set_then_delete_in_turn(self, key, value, ttl, then).await
    }

    /// Removes `key`. `Ok(false)` when it was not there.
    async fn delete(&self, key: &StoreKey) -> Result<bool, StoreError>;

    /// Atomically adds `delta` to the decimal number stored at `key` and returns the new
    /// value; `Ok(None)` when the key is absent (nothing is created).
    async fn incr(&self, key: &StoreKey, delta: u64) -> Result<Option<u64>, StoreError>;

    /// Atomically makes the decimal number at `key` at least `to`, creating it (without
    /// expiry) when absent, and returns the number then stored: never lowers it, whatever
    /// runs beside it. A value that is not a number is a [`StoreError::Protocol`].
    ///
    /// The default reads and then writes, which a concurrent raise can undo; stores
    /// shared between processes implement it with an atomic primitive.
    async fn raise(&self, key: &StoreKey, to: u64) -> Result<u64, StoreError> {
        for _ in 0..3 {
            match self.get(key).await? {
                Some(bytes) => {
                    let now = parse_generation(&bytes)?;
                    if now >= to {
                        return Ok(now);
                    }
                    self.set(key, to.to_string().as_bytes(), Duration::ZERO)
                        .await?;
                    return Ok(to);
                }
                None => {
                    if self
                        .add(key, to.to_string().as_bytes(), Duration::ZERO)
                        .await?
                    {
                        return Ok(to);
                    }
                }
            }
        }
        Err(StoreError::Protocol(format!("{key} keeps changing")))
    }

    /// Atomically replaces the value of `key` with what `change` makes of it (`None`:
    /// absent): a value and its TTL, or `None` to leave it as it is. Returns the value
    /// then held. `change` may run more than once (again on a value someone changed
    /// meanwhile), so it must depend on its input only. A value left as it was is not
    /// written.
    ///
    /// The default reads and then writes, which a concurrent update can undo; stores
    /// shared between processes implement it with an atomic primitive.
    async fn update(
        &self,
        key: &StoreKey,
        change: &Change<'_>,
    ) -> Result<Option<Bytes>, StoreError> {
        let held = self.get(key).await?;
        match change(held.as_deref()) {
            Some((value, ttl)) if held.as_deref() != Some(&value[..]) => {
                self.set(key, &value, ttl).await?;
                Ok(Some(Bytes::from(value)))
            }
            _ => Ok(held),
        }
    }

    /// Checks that the store answers (a store of several servers: that every server it
    /// believes up answers, and that one is).
    async fn ping(&self) -> Result<(), StoreError>;

    /// Calls that failed on their connection (which was dropped), since start.
    fn reconnects(&self) -> u64 {
        0
    }

    /// The stores holding the copies of `key` when it is kept twice ([`copies`]): the
    /// first [`COPIES`] servers up in its placement order, each as a store whose calls go
    /// to that server only, first copy first (where its envelope lives). Computed at
    /// once, so the copies are distinct servers. `None` when this store keeps a single
    /// copy of everything (the memory twin, one memcached server): then the store itself
    /// is the copy.
    fn copies(&self, _key: &StoreKey) -> Option<Vec<&dyn Store>> {
        None
    }

    /// The state of each server, in configuration order, as this process sees it (empty
    /// for a store without servers).
    fn servers(&self) -> Vec<ServerState> {
        Vec::new()
    }
}

/// What [`Store::update`] makes of a value (`None`: absent): the value to write and its
/// TTL (`Duration::ZERO`: none), or `None` to leave it.
pub type Change<'a> = dyn Fn(Option<&[u8]>) -> Option<(Vec<u8>, Duration)> + Send + Sync + 'a;

/// One server of a store, as this process sees it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ServerState {
    /// `host:port`, as configured.
    pub server: String,
    /// Whether calls use it (false: judged out, and probed until it answers).
    pub up: bool,
    /// Times this process judged it out, since start.
    pub ejections: u64,
    /// Times this process took it back, since start.
    pub readmissions: u64,
    /// Times this process emptied it (`flush_all`) before taking it back, since start.
    pub flushes: u64,
}

/// [`Store::add_then_get`] as two calls, one after the other.
pub async fn add_then_get_in_turn<S: Store + ?Sized>(
    store: &S,
    key: &StoreKey,
    value: &[u8],
    ttl: Duration,
    then: &StoreKey,
) -> Result<Option<Option<Bytes>>, StoreError> {
    if !store.add(key, value, ttl).await? {
        return Ok(None);
    }
    store.get(then).await.map(Some)
}

/// [`Store::set_then_delete`] as two calls, one after the other.
pub async fn set_then_delete_in_turn<S: Store + ?Sized>(
    store: &S,
    key: &StoreKey,
    value: &[u8],
    ttl: Duration,
    then: &StoreKey,
) -> Result<Result<bool, StoreError>, StoreError> {
    store.set(key, value, ttl).await?;
    Ok(store.delete(then).await)
}

/// Reads a route's generation, creating it when absent. Kept on two servers when the
/// store has several ([`Register`]): the largest copy is the generation.
///
/// A new generation starts at the current Unix time in milliseconds, not at 0: if the
/// store ever loses the key (eviction, restart, the servers holding it lost), the
/// recreated generation is still higher than any generation whose entries may linger,
/// so a purged route never comes back.
pub async fn generation(store: &dyn Store, key: &StoreKey) -> Result<u64, StoreError> {
    let register = Register::of(store, key);
    if let Some(current) = register.read().await? {
        return Ok(current);
    }
    // Someone may create it at once: the first to add it wins, and both read its value
    // (with `raise` the later clock won, and the first went on with a generation the
    // store no longer held: its builds were dropped as purged).
    register.create(now_ms()).await
}

/// Moves a route to a new generation and returns it. Entries of older generations are
/// never looked up again and age out on their own ("ignore rather than expire").
pub async fn bump_generation(store: &dyn Store, key: &StoreKey) -> Result<u64, StoreError> {
    Register::of(store, key).bump(now_ms).await
}

pub(crate) fn parse_generation(bytes: &[u8]) -> Result<u64, StoreError> {
    std::str::from_utf8(bytes)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .ok_or_else(|| StoreError::Protocol("generation is not a decimal number".into()))
}

/// Rejects values over `max`, for implementations to share.
pub fn check_size(value: &[u8], max: usize) -> Result<(), StoreError> {
    if value.len() > max {
        return Err(StoreError::TooLarge {
            size: value.len(),
            max,
        });
    }
    Ok(())
}

#[derive(Clone)]
struct Item {
    data: Bytes,
    /// On tokio's clock, so tests can pause time; `None` never expires.
    expires_at: Option<tokio::time::Instant>,
    ttl: Option<Duration>,
}

impl Item {
    fn live(&self, now: tokio::time::Instant) -> bool {
        self.expires_at.is_none_or(|t| now < t)
    }
}

struct ItemExpiry;

impl moka::Expiry<StoreKey, Item> for ItemExpiry {
    // Only reclaims memory; reads check `expires_at` themselves, on tokio's clock.
    fn expire_after_create(
        &self,
        _: &StoreKey,
        item: &Item,
        _: std::time::Instant,
    ) -> Option<Duration> {
        item.ttl
    }

    fn expire_after_update(
        &self,
        _: &StoreKey,
        item: &Item,
        _: std::time::Instant,
        _: Option<Duration>,
    ) -> Option<Duration> {
        item.ttl
    }
}

/// The embedded store: a bounded moka cache with memcached's semantics (atomic `add`,
/// whole-second TTLs, item size limit, decimal `incr`). Used when `[store]` names no
/// memcached servers.
#[derive(Clone)]
pub struct MemoryStore {
    items: moka::sync::Cache<StoreKey, Item>,
    max_item_size: usize,
}

impl fmt::Debug for MemoryStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryStore")
            .field("entries", &self.items.entry_count())
            .field("max_item_size", &self.max_item_size)
            .finish()
    }
}

/// What one entry costs beyond its key and value bytes: moka's entry with its queue and
/// timer nodes, the item and the allocator's headers. Measured with heaptrack after a
/// burst (`bench/memory.sh`, figures in `bench/README.md`), so that `memory_capacity`
/// bounds the memory the store really holds.
pub const ENTRY_OVERHEAD: usize = 448;

impl MemoryStore {
    /// A store holding at most `capacity` bytes, each value at most `max_item_size`.
    pub fn new(capacity: u64, max_item_size: usize) -> Self {
        let items = moka::sync::Cache::builder()
            .max_capacity(capacity)
            .weigher(|k: &StoreKey, v: &Item| {
                u32::try_from(k.as_str().len() + v.data.len() + ENTRY_OVERHEAD).unwrap_or(u32::MAX)
            })
            .expire_after(ItemExpiry)
            .build();
        Self {
            items,
            max_item_size,
        }
    }

    fn item(value: &[u8], ttl: Duration) -> Item {
        // memcached counts whole seconds; do the same so both backends expire alike.
        let ttl = (!ttl.is_zero()).then(|| Duration::from_secs(ceil_secs(ttl)));
        Item {
            data: Bytes::copy_from_slice(value),
            expires_at: ttl.map(|t| tokio::time::Instant::now() + t),
            ttl,
        }
    }

    fn live(&self, key: &StoreKey) -> Option<Item> {
        let now = tokio::time::Instant::now();
        self.items.get(key).filter(|i| i.live(now))
    }
}

#[async_trait]
impl Store for MemoryStore {
    async fn get(&self, key: &StoreKey) -> Result<Option<Bytes>, StoreError> {
        Ok(self.live(key).map(|i| i.data))
    }

    async fn get_many(&self, keys: &[StoreKey]) -> Result<HashMap<StoreKey, Bytes>, StoreError> {
        Ok(keys
            .iter()
            .filter_map(|k| self.live(k).map(|i| (k.clone(), i.data)))
            .collect())
    }

    async fn add(&self, key: &StoreKey, value: &[u8], ttl: Duration) -> Result<bool, StoreError> {
        check_size(value, self.max_item_size)?;
        let now = tokio::time::Instant::now();
        let item = Self::item(value, ttl);
        let result = self
            .items
            .entry(key.clone())
            .and_compute_with(|existing| match existing {
                Some(e) if e.value().live(now) => moka::ops::compute::Op::Nop,
                _ => moka::ops::compute::Op::Put(item),
            });
        Ok(matches!(
            result,
            moka::ops::compute::CompResult::Inserted(_)
                | moka::ops::compute::CompResult::ReplacedWith(_)
        ))
    }

    async fn set(&self, key: &StoreKey, value: &[u8], ttl: Duration) -> Result<(), StoreError> {
        check_size(value, self.max_item_size)?;
        self.items.insert(key.clone(), Self::item(value, ttl));
        Ok(())
    }

    async fn delete(&self, key: &StoreKey) -> Result<bool, StoreError> {
        let now = tokio::time::Instant::now();
        Ok(self.items.remove(key).is_some_and(|i| i.live(now)))
    }

    async fn incr(&self, key: &StoreKey, delta: u64) -> Result<Option<u64>, StoreError> {
        let now = tokio::time::Instant::now();
        let mut outcome = Ok(None);
        self.items
            .entry(key.clone())
            .and_compute_with(|existing| match existing {
                Some(e) if e.value().live(now) => match parse_generation(&e.value().data) {
                    Ok(n) => {
                        // memcached wraps at 2^64; so do we.
                        let next = n.wrapping_add(delta);
                        outcome = Ok(Some(next));
                        let mut item = e.into_value();
                        item.data = Bytes::from(next.to_string());
                        moka::ops::compute::Op::Put(item)
                    }
                    Err(_) => {
                        outcome = Err(StoreError::Protocol(
                            "cannot increment or decrement non-numeric value".into(),
                        ));
                        moka::ops::compute::Op::Nop
                    }
                },
                _ => moka::ops::compute::Op::Nop,
            });
        outcome
    }

    async fn raise(&self, key: &StoreKey, to: u64) -> Result<u64, StoreError> {
        let now = tokio::time::Instant::now();
        let mut outcome = Ok(to);
        self.items
            .entry(key.clone())
            .and_compute_with(|existing| match existing {
                Some(e) if e.value().live(now) => match parse_generation(&e.value().data) {
                    Ok(held) if held >= to => {
                        outcome = Ok(held);
                        moka::ops::compute::Op::Nop
                    }
                    Ok(_) => moka::ops::compute::Op::Put(Self::item(
                        to.to_string().as_bytes(),
                        Duration::ZERO,
                    )),
                    Err(e) => {
                        outcome = Err(e);
                        moka::ops::compute::Op::Nop
                    }
                },
                _ => moka::ops::compute::Op::Put(Self::item(
                    to.to_string().as_bytes(),
                    Duration::ZERO,
                )),
            });
        outcome
    }

    async fn update(
        &self,
        key: &StoreKey,
        change: &Change<'_>,
    ) -> Result<Option<Bytes>, StoreError> {
        let now = tokio::time::Instant::now();
        let mut outcome = Ok(None);
        self.items.entry(key.clone()).and_compute_with(|existing| {
            let held = existing.map(|e| e.into_value()).filter(|i| i.live(now));
            outcome = Ok(held.as_ref().map(|i| i.data.clone()));
            let Some((value, ttl)) = change(held.as_ref().map(|i| &i.data[..])) else {
                return moka::ops::compute::Op::Nop;
            };
            if let Err(e) = check_size(&value, self.max_item_size) {
                outcome = Err(e);
                return moka::ops::compute::Op::Nop;
            }
            if held.is_some_and(|i| i.data[..] == value[..]) {
                return moka::ops::compute::Op::Nop;
            }
            let item = Self::item(&value, ttl);
            outcome = Ok(Some(item.data.clone()));
            moka::ops::compute::Op::Put(item)
        });
        outcome
    }

    async fn ping(&self) -> Result<(), StoreError> {
        Ok(())
    }
}

/// A shared handle, as the gateway and workers hold it.
pub type SharedStore = Arc<dyn Store>;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::key::Keyspace;

    fn key(n: &str) -> StoreKey {
        Keyspace::new("t").generation(n)
    }

    #[tokio::test]
    async fn add_is_exclusive_until_expiry() {
        tokio::time::pause();
        let s = MemoryStore::new(1 << 20, 1024);
        let k = key("a");
        assert!(s.add(&k, b"1", Duration::from_millis(1500)).await.unwrap());
        assert!(!s.add(&k, b"2", Duration::from_secs(10)).await.unwrap());
        assert_eq!(s.get(&k).await.unwrap().as_deref(), Some(&b"1"[..]));
        // 1.5 s rounds up to 2 s, like memcached.
        tokio::time::advance(Duration::from_millis(1900)).await;
        assert!(s.get(&k).await.unwrap().is_some());
        tokio::time::advance(Duration::from_millis(200)).await;
        assert!(s.get(&k).await.unwrap().is_none());
        assert!(s.add(&k, b"3", Duration::ZERO).await.unwrap());
    }

    #[tokio::test]
    async fn concurrent_adds_have_one_winner() {
        let s = Arc::new(MemoryStore::new(1 << 20, 1024));
        let k = key("race");
        let tasks: Vec<_> = (0..64)
            .map(|_| {
                let (s, k) = (s.clone(), k.clone());
                tokio::spawn(async move { s.add(&k, b"x", Duration::from_secs(5)).await.unwrap() })
            })
            .collect();
        let mut winners = 0;
        for t in tasks {
            winners += usize::from(t.await.unwrap());
        }
        assert_eq!(winners, 1);
    }

    #[tokio::test]
    async fn oversize_values_fail_whole() {
        let s = MemoryStore::new(1 << 20, 8);
        let k = key("big");
        let e = s.set(&k, b"123456789", Duration::ZERO).await.unwrap_err();
        assert!(matches!(e, StoreError::TooLarge { size: 9, max: 8 }));
        assert!(!e.is_retryable());
        assert!(s.get(&k).await.unwrap().is_none());
    }

    #[tokio::test]
    async fn get_many_returns_present_keys_only() {
        let s = MemoryStore::new(1 << 20, 1024);
        s.set(&key("a"), b"A", Duration::ZERO).await.unwrap();
        s.set(&key("c"), b"C", Duration::ZERO).await.unwrap();
        let got = s.get_many(&[key("a"), key("b"), key("c")]).await.unwrap();
        assert_eq!(got.len(), 2);
        assert_eq!(got[&key("c")], Bytes::from_static(b"C"));
        assert!(s.delete(&key("a")).await.unwrap());
        assert!(!s.delete(&key("a")).await.unwrap());
    }

    #[tokio::test]
    async fn generations_start_high_and_only_grow() {
        let s = MemoryStore::new(1 << 20, 1024);
        let k = key("recs");
        let g0 = generation(&s, &k).await.unwrap();
        assert!(g0 >= now_ms() - 10_000, "seeded from the clock");
        assert_eq!(generation(&s, &k).await.unwrap(), g0);
        let g1 = bump_generation(&s, &k).await.unwrap();
        assert_eq!(g1, g0 + 1);
        assert_eq!(generation(&s, &k).await.unwrap(), g1);
        // Losing the key never goes back to an old generation.
        s.delete(&k).await.unwrap();
        assert!(generation(&s, &k).await.unwrap() >= g0);
        assert_eq!(s.incr(&key("absent"), 1).await.unwrap(), None);
        s.set(&key("text"), b"abc", Duration::ZERO).await.unwrap();
        assert!(s.incr(&key("text"), 1).await.is_err());
    }
}
