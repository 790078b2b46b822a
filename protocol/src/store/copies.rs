//! Keys kept twice: invalidation metadata and leases, so that losing one server loses
//! neither a purge nor a lease.
//!
//! A store of several servers places each key on the first server of the key's
//! placement order that it believes up ([`Store::copies`]). That is enough for
//! envelopes: a copy that goes with its server is rebuilt. It is not enough for what
//! decides whether a copy may be served (route generations, tag purges) or who may build
//! (leases): reading "absent" from the next server must not turn into "never purged" or
//! "nobody builds". So those keys are written to the first **two** servers a process
//! believes up, and read from both:
//!
//! - **Registers** ([`Register`]): generations, tag purge instants and the memcached
//!   store's own marks are decimal numbers that only grow. Each copy only ever grows
//!   ([`Store::incr`], [`Store::raise`]); a read takes the largest copy that answered, and
//!   raises the copies found lower or missing to it (read repair), so a server that
//!   came back empty catches up on the first read.
//! - **Leases** ([`crate::lease`]) are taken on both copies, the first before the second,
//!   and held only when both were won; one lost gives the other back.
//!
//! Why two is enough while one server is out: processes may disagree about that one
//! server (some have judged it down, some not yet, or some took it back sooner), so
//! their sets of copies differ by it, but any two such sets of the first two servers
//! share a server that is up. A write made under one view and a read made under another
//! meet there: the read sees the write's value (registers), or the second taker finds
//! the first one's lease. A copy that does not answer is left out (it is the one out of
//! service); a call fails only when no copy answered. Two servers lost at once, or in
//! turn before a key was read again, can lose a key (as memcached's own eviction can):
//! a lost generation starts again from the clock, above every older one; a lost tag
//! purge or lease is lost.

use std::collections::HashMap;

use bytes::Bytes;
use futures_util::future::join_all;

use super::{Store, StoreError, parse_generation};
use crate::key::StoreKey;

/// How many servers keep a key of this kind, when the store has that many up.
pub const COPIES: usize = 2;

/// The stores holding `key`'s copies, first copy first: `store` itself when it keeps a
/// single copy of everything. Empty when a store of several servers has none up.
pub fn copies<'a>(store: &'a dyn Store, key: &StoreKey) -> Vec<&'a dyn Store> {
    store.copies(key).unwrap_or_else(|| vec![store])
}

/// The first error of `results`, when none of them succeeded: a call over copies
/// fails only when no copy answered.
fn none_answered<T>(results: &[Result<T, StoreError>]) -> Option<StoreError> {
    if results.iter().any(Result::is_ok) {
        return None;
    }
    Some(
        results
            .iter()
            .find_map(|r| r.as_ref().err().cloned())
            .unwrap_or_else(no_copy),
    )
}

/// A store of several servers with none of them up.
fn no_copy() -> StoreError {
    StoreError::Unavailable(crate::Cause::new("no server is up to hold the key"))
}

/// A decimal number kept on every copy that only grows: a route's generation, a tag's
/// last purge, a memcached server's count of writes it missed. Its value is the largest
/// copy that answered.
#[derive(Debug)]
pub struct Register<'a> {
    copies: Vec<&'a dyn Store>,
    key: &'a StoreKey,
}

impl<'a> Register<'a> {
    /// The register at `key` of `store`.
    pub fn of(store: &'a dyn Store, key: &'a StoreKey) -> Self {
        Self::on(copies(store, key), key)
    }

    /// The register at `key`, kept on exactly `copies` (a store that places a register
    /// of its own elsewhere than [`Store::copies`] would).
    pub fn on(copies: Vec<&'a dyn Store>, key: &'a StoreKey) -> Self {
        Self { copies, key }
    }

    /// The value, `None` when no copy holds one. Copies found lower or missing are
    /// raised to it before this returns (their failures are ignored: the next read
    /// tries again).
    pub async fn read(&self) -> Result<Option<u64>, StoreError> {
        let found = join_all(self.copies.iter().map(|c| c.get(self.key))).await;
        if let Some(e) = none_answered(&found) {
            return Err(e);
        }
        let mut values = Vec::with_capacity(found.len());
        for answer in found {
            values.push(match answer {
                Ok(Some(bytes)) => Ok(Some(parse_generation(&bytes)?)),
                Ok(None) => Ok(None),
                Err(e) => Err(e),
            });
        }
        let max = values.iter().filter_map(|v| *v.as_ref().ok()?).max();
        if let Some(max) = max {
            self.repair(&values, max).await;
        }
        Ok(max)
    }

    /// Raises every copy that answered lower or empty to `max`.
    async fn repair(&self, values: &[Result<Option<u64>, StoreError>], max: u64) {
        let behind = self
            .copies
            .iter()
            .zip(values)
            .filter(|(_, v)| matches!(v, Ok(v) if v.is_none_or(|v| v < max)))
            .map(|(copy, _)| copy.raise(self.key, max));
        // Best effort: a copy that could not be raised is raised by the next read.
        join_all(behind).await;
    }

    /// Makes the value at least `to` on every copy; returns the value then held (the
    /// largest copy that answered, `to` or more).
    pub async fn raise(&self, to: u64) -> Result<u64, StoreError> {
        let raised = join_all(self.copies.iter().map(|c| c.raise(self.key, to))).await;
        if let Some(e) = none_answered(&raised) {
            return Err(e);
        }
        Ok(raised
            .into_iter()
            .filter_map(Result::ok)
            .max()
            .unwrap_or(to))
    }

    /// Creates the register at `to` where no copy holds one, and returns the value it
    /// then has: whoever else creates it at the same moment, every creator returns the
    /// same value. Each copy is `add`ed (the first to add it keeps it), then all are read:
    /// once a creator's adds are done every copy holds a value no later add changes, so
    /// every creator reads the same largest one. (A `raise` instead would let a later
    /// creator's larger `to` win, after an earlier creator went on with its own.)
    pub async fn create(&self, to: u64) -> Result<u64, StoreError> {
        let value = to.to_string();
        let added = join_all(
            self.copies
                .iter()
                .map(|c| c.add(self.key, value.as_bytes(), std::time::Duration::ZERO)),
        )
        .await;
        if let Some(e) = none_answered(&added) {
            return Err(e);
        }
        match self.read().await? {
            Some(now) => Ok(now),
            // Gone between the add and the read (evicted, a server lost): as new.
            None => self.raise(to).await,
        }
    }

    /// Adds one and returns the new value, greater than any value a read could return
    /// before. A register no copy holds is first created at `seed()`. Copies left lower
    /// (one missed earlier bumps) are raised to the new value.
    pub async fn bump(&self, seed: impl Fn() -> u64) -> Result<u64, StoreError> {
        for _ in 0..3 {
            let counted = join_all(self.copies.iter().map(|c| c.incr(self.key, 1))).await;
            if let Some(e) = none_answered(&counted) {
                return Err(e);
            }
            let values: Vec<Result<Option<u64>, StoreError>> = counted;
            let Some(max) = values.iter().filter_map(|v| *v.as_ref().ok()?).max() else {
                // No copy holds it: create it, then count on the next turn.
                self.raise(seed()).await?;
                continue;
            };
            self.repair(&values, max).await;
            return Ok(max);
        }
        Err(StoreError::Protocol(format!(
            "register {} keeps disappearing",
            self.key
        )))
    }
}

/// The registers at `keys` of `store`, read together (one `get_many` per server that
/// holds copies of any of them): the value of each, 0 when no copy holds one (or holds
/// something that is not a number). Copies found lower are raised, as
/// [`Register::read`] does. Fails when some key had no copy that answered.
pub async fn read_registers(
    store: &dyn Store,
    keys: &[StoreKey],
) -> Result<HashMap<StoreKey, u64>, StoreError> {
    let answers = read_copies(store, keys, |b| parse_generation(b).ok()).await?;
    let mut values = HashMap::with_capacity(keys.len());
    let mut repairs = Vec::new();
    for (key, answered) in &answers {
        let max = answered.iter().filter_map(|(_, v)| *v).max();
        if let Some(max) = max {
            repairs.extend(
                answered
                    .iter()
                    .filter(|(_, v)| v.is_none_or(|v| v < max))
                    .map(move |(copy, _)| copy.raise(key, max)),
            );
        }
        values.insert((*key).clone(), max.unwrap_or(0));
    }
    // Best effort, as in `Register::read`.
    join_all(repairs).await;
    Ok(values)
}

/// What every copy that answered holds of each of `keys` (one `get_many` per server that
/// holds copies of any of them), for values that copies merge (a tag's purge record):
/// nothing is repaired. Fails when some key had no copy that answered.
pub async fn read_all_copies(
    store: &dyn Store,
    keys: &[StoreKey],
) -> Result<HashMap<StoreKey, Vec<Bytes>>, StoreError> {
    let answers = read_copies(store, keys, |b| Some(b.clone())).await?;
    Ok(answers
        .into_iter()
        .map(|(key, answered)| {
            let held = answered.into_iter().filter_map(|(_, v)| v).collect();
            (key.clone(), held)
        })
        .collect())
}

/// [`Store::update`] on every copy of `key`; whether any copy holds a value after it.
/// Fails only when no copy answered.
pub async fn update_everywhere(
    store: &dyn Store,
    key: &StoreKey,
    change: &super::Change<'_>,
) -> Result<bool, StoreError> {
    let copies = copies(store, key);
    if copies.is_empty() {
        return Err(no_copy());
    }
    let updated = join_all(copies.iter().map(|c| c.update(key, change))).await;
    if let Some(e) = none_answered(&updated) {
        return Err(e);
    }
    Ok(updated.iter().any(|u| matches!(u, Ok(Some(_)))))
}

/// One copy's answer about a key: the store holding the copy, and its value there.
type Answer<'a, T> = (&'a dyn Store, Option<T>);

/// What each copy of each of `keys` holds, in one `get_many` per store holding copies,
/// as `parse` reads it (`None`: not a value of the kind). Fails when some key had no copy
/// that answered.
async fn read_copies<'a, 'k, T>(
    store: &'a dyn Store,
    keys: &'k [StoreKey],
    parse: impl Fn(&Bytes) -> Option<T>,
) -> Result<HashMap<&'k StoreKey, Vec<Answer<'a, T>>>, StoreError> {
    // The copies of every key, grouped by the store holding them: the store, and the
    // keys it holds with their places in `keys`.
    let mut groups: Vec<(&dyn Store, Vec<StoreKey>, Vec<usize>)> = Vec::new();
    for (n, key) in keys.iter().enumerate() {
        for copy in copies(store, key) {
            match groups.iter_mut().find(|(c, _, _)| same(*c, copy)) {
                Some((_, held, at)) => {
                    held.push(key.clone());
                    at.push(n);
                }
                None => groups.push((copy, vec![key.clone()], vec![n])),
            }
        }
    }
    let read = join_all(groups.iter().map(|(copy, held, _)| copy.get_many(held))).await;
    let mut answers: HashMap<&StoreKey, Vec<Answer<'a, T>>> = HashMap::new();
    let mut failure = None;
    for ((copy, _, at), found) in groups.iter().zip(read) {
        let found = match found {
            Ok(found) => found,
            Err(e) => {
                failure.get_or_insert(e);
                continue;
            }
        };
        for &n in at {
            let value = found.get(&keys[n]).and_then(&parse);
            answers.entry(&keys[n]).or_default().push((*copy, value));
        }
    }
    if keys.iter().any(|k| !answers.contains_key(k)) {
        return Err(failure.unwrap_or_else(no_copy));
    }
    Ok(answers)
}

/// Whether `a` and `b` are the same store (compared by address: copies are borrowed
/// from one store, which hands out one handle per server).
pub(crate) fn same(a: &dyn Store, b: &dyn Store) -> bool {
    std::ptr::addr_eq(a as *const dyn Store, b as *const dyn Store)
}

/// Deletes `key` from every copy: a purge of one fragment, whose envelope may be on the
/// first or the second server of its order (a process that believed the first down put
/// it on the second). Whether any copy held it; fails only when no copy answered.
pub async fn delete_everywhere(store: &dyn Store, key: &StoreKey) -> Result<bool, StoreError> {
    let deleted = join_all(copies(store, key).iter().map(|c| c.delete(key))).await;
    if let Some(e) = none_answered(&deleted) {
        return Err(e);
    }
    Ok(deleted.into_iter().any(|d| d.unwrap_or(false)))
}

/// Several servers as memory stores, and views of them that disagree about which are
/// out: for the tests of what is kept twice, here and in [`crate::lease`].
#[cfg(test)]
pub(crate) mod fake {
    use std::sync::Arc;
    use std::time::Duration;

    use async_trait::async_trait;
    use bytes::Bytes;

    use super::*;
    use crate::store::MemoryStore;

    /// A server that does not answer.
    #[derive(Debug)]
    pub(crate) struct Unreachable;

    fn unreachable<T>() -> Result<T, StoreError> {
        Err(StoreError::Unavailable(crate::Cause::new("unreachable")))
    }

    #[async_trait]
    impl Store for Unreachable {
        async fn get(&self, _: &StoreKey) -> Result<Option<Bytes>, StoreError> {
            unreachable()
        }
        async fn get_many(&self, _: &[StoreKey]) -> Result<HashMap<StoreKey, Bytes>, StoreError> {
            unreachable()
        }
        async fn add(&self, _: &StoreKey, _: &[u8], _: Duration) -> Result<bool, StoreError> {
            unreachable()
        }
        async fn set(&self, _: &StoreKey, _: &[u8], _: Duration) -> Result<(), StoreError> {
            unreachable()
        }
        async fn delete(&self, _: &StoreKey) -> Result<bool, StoreError> {
            unreachable()
        }
        async fn incr(&self, _: &StoreKey, _: u64) -> Result<Option<u64>, StoreError> {
            unreachable()
        }
        async fn ping(&self) -> Result<(), StoreError> {
            unreachable()
        }
    }

    /// A fresh server.
    pub(crate) fn server() -> Arc<dyn Store> {
        Arc::new(MemoryStore::new(1 << 20, 1 << 20))
    }

    /// One process's view of `servers`: every key's placement order is the servers' own
    /// order, and those in `out` are skipped.
    #[derive(Debug)]
    pub(crate) struct View {
        pub servers: Vec<Arc<dyn Store>>,
        pub out: Vec<usize>,
    }

    impl View {
        pub(crate) fn new(servers: &[Arc<dyn Store>], out: &[usize]) -> Self {
            Self {
                servers: servers.to_vec(),
                out: out.to_vec(),
            }
        }

        fn up(&self) -> impl Iterator<Item = &dyn Store> {
            self.servers
                .iter()
                .enumerate()
                .filter(|(i, _)| !self.out.contains(i))
                .map(|(_, s)| s.as_ref())
        }

        fn home(&self) -> Result<&dyn Store, StoreError> {
            self.up().next().ok_or_else(no_copy)
        }
    }

    #[async_trait]
    impl Store for View {
        async fn get(&self, key: &StoreKey) -> Result<Option<Bytes>, StoreError> {
            self.home()?.get(key).await
        }
        async fn get_many(&self, k: &[StoreKey]) -> Result<HashMap<StoreKey, Bytes>, StoreError> {
            self.home()?.get_many(k).await
        }
        async fn add(&self, key: &StoreKey, v: &[u8], ttl: Duration) -> Result<bool, StoreError> {
            self.home()?.add(key, v, ttl).await
        }
        async fn set(&self, key: &StoreKey, v: &[u8], ttl: Duration) -> Result<(), StoreError> {
            self.home()?.set(key, v, ttl).await
        }
        async fn delete(&self, key: &StoreKey) -> Result<bool, StoreError> {
            self.home()?.delete(key).await
        }
        async fn incr(&self, key: &StoreKey, delta: u64) -> Result<Option<u64>, StoreError> {
            self.home()?.incr(key, delta).await
        }
        async fn ping(&self) -> Result<(), StoreError> {
            self.home()?.ping().await
        }
        fn copies(&self, _: &StoreKey) -> Option<Vec<&dyn Store>> {
            Some(self.up().take(COPIES).collect())
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use super::fake::{Unreachable, View, server};
    use super::*;
    use crate::key::Keyspace;

    fn key(name: &str) -> StoreKey {
        Keyspace::new("t").generation(name)
    }

    async fn held(server: &dyn Store, key: &StoreKey) -> Option<u64> {
        server
            .get(key)
            .await
            .unwrap()
            .map(|b| parse_generation(&b).unwrap())
    }

    #[tokio::test]
    async fn a_register_survives_one_server_out_whichever_view_reads_it() {
        let servers = [server(), server(), server()];
        let all = View::new(&servers, &[]);
        let without_first = View::new(&servers, &[0]);
        let k = key("recs");
        let g0 = crate::store::generation(&all, &k).await.unwrap();
        assert_eq!(held(servers[1].as_ref(), &k).await, Some(g0), "kept twice");
        assert_eq!(held(servers[2].as_ref(), &k).await, None);
        // The first server out: the other views read the second copy, not "absent".
        assert_eq!(
            crate::store::generation(&without_first, &k).await.unwrap(),
            g0
        );
        let g1 = crate::store::bump_generation(&without_first, &k)
            .await
            .unwrap();
        assert_eq!(g1, g0 + 1);
        // A view that has not judged it out yet bumps past it too, never back.
        assert_eq!(crate::store::generation(&all, &k).await.unwrap(), g1);
        // The first server comes back empty: the largest copy wins, and it is repaired.
        let back = [server(), servers[1].clone(), servers[2].clone()];
        let after = View::new(&back, &[]);
        assert_eq!(crate::store::generation(&after, &k).await.unwrap(), g1);
        assert_eq!(held(back[0].as_ref(), &k).await, Some(g1), "read repair");
        assert_eq!(
            crate::store::bump_generation(&after, &k).await.unwrap(),
            g1 + 1
        );
    }

    #[tokio::test]
    async fn two_that_create_a_register_at_once_agree_on_its_value() {
        let servers = [server(), server(), server()];
        let all = View::new(&servers, &[]);
        let k = key("new");
        // Both read "absent"; the first creates it at 1000, the second, a moment later
        // by its own clock, at 2000: the second takes the first's value.
        assert_eq!(Register::of(&all, &k).create(1_000).await.unwrap(), 1_000);
        assert_eq!(Register::of(&all, &k).create(2_000).await.unwrap(), 1_000);
        // Each added one copy first: both read the largest, and the copies agree.
        let other = key("split");
        let (first, second) = (
            Register::on(vec![servers[0].as_ref()], &other),
            Register::on(vec![servers[1].as_ref()], &other),
        );
        first.create(1_000).await.unwrap();
        second.create(2_000).await.unwrap();
        let both = Register::on(vec![servers[0].as_ref(), servers[1].as_ref()], &other);
        assert_eq!(both.create(3_000).await.unwrap(), 2_000);
        assert_eq!(
            held(servers[0].as_ref(), &other).await,
            Some(2_000),
            "repaired"
        );
    }

    #[tokio::test]
    async fn a_copy_that_does_not_answer_is_left_out_and_none_answering_fails() {
        let hung: Arc<dyn Store> = Arc::new(Unreachable);
        let servers = [hung.clone(), server(), server()];
        // A view that has not judged the first server out yet.
        let unaware = View::new(&servers, &[]);
        let k = key("t");
        assert_eq!(Register::of(&unaware, &k).raise(7).await.unwrap(), 7);
        assert_eq!(Register::of(&unaware, &k).read().await.unwrap(), Some(7));
        assert!(delete_everywhere(&unaware, &k).await.unwrap());
        let nothing = View::new(&[hung.clone(), hung], &[]);
        assert!(Register::of(&nothing, &k).read().await.is_err());
        assert!(delete_everywhere(&nothing, &k).await.is_err());
        let none_up = View::new(&servers, &[0, 1, 2]);
        assert!(matches!(
            Register::of(&none_up, &k).read().await,
            Err(StoreError::Unavailable(_))
        ));
    }

    #[tokio::test]
    async fn registers_only_grow_and_are_read_together() {
        let servers = [server(), server(), server()];
        let all = View::new(&servers, &[]);
        let (a, b) = (key("a"), key("b"));
        let register = Register::of(&all, &a);
        assert_eq!(register.read().await.unwrap(), None);
        assert_eq!(register.raise(100).await.unwrap(), 100);
        assert_eq!(register.raise(50).await.unwrap(), 100, "never lowered");
        // Copies that drifted apart: the larger wins, the smaller is raised.
        servers[1].set(&a, b"90", Duration::ZERO).await.unwrap();
        servers[0].set(&b, b"5", Duration::ZERO).await.unwrap();
        servers[1]
            .set(&b, b"not a number", Duration::ZERO)
            .await
            .unwrap();
        let read = read_registers(&all, &[a.clone(), b.clone(), key("never")])
            .await
            .unwrap();
        assert_eq!(read[&a], 100);
        assert_eq!(read[&b], 5);
        assert_eq!(read[&key("never")], 0);
        assert_eq!(held(servers[1].as_ref(), &a).await, Some(100), "repaired");
        assert_eq!(register.bump(|| 1).await.unwrap(), 101);
        assert_eq!(Register::of(&all, &key("new")).bump(|| 7).await.unwrap(), 8);
    }

    #[tokio::test]
    async fn a_purge_of_one_key_deletes_both_copies() {
        let servers = [server(), server(), server()];
        let k = key("f");
        // Written by a view that had the first server out, and by one that had not.
        servers[0].set(&k, b"old", Duration::ZERO).await.unwrap();
        servers[1].set(&k, b"new", Duration::ZERO).await.unwrap();
        let all = View::new(&servers, &[]);
        assert!(delete_everywhere(&all, &k).await.unwrap());
        for s in &servers {
            assert_eq!(s.get(&k).await.unwrap(), None);
        }
        assert!(!delete_everywhere(&all, &k).await.unwrap());
    }
}
