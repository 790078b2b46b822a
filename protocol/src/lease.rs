//! The pending lease: the one owner of "exactly one build per key".
//!
//! A lease is a store key beside a fragment's envelope (see [`crate::key`]) whose value
//! is the id of the one `BuildRequest` allowed to build that fragment now:
//!
//! - a gateway that misses **acquires** it with the store's atomic `add`; of all callers
//!   in all gateways exactly one wins and publishes its request, the others answer
//!   "pending";
//! - a worker that picks a request up **claims** the lease for it before rendering
//!   (a request from a generation its route has left since is dropped first):
//!   - held by this request: extended for the render, build;
//!   - held by another request: this one was superseded (its lease expired while it
//!     waited in a backed-up queue, and a newer request took over): dropped;
//!   - held by nobody: the worker takes it as a gateway does (`add`, reading the
//!     envelope back); if the fragment is fresh (someone built it meanwhile, and no tag
//!     purge retired it since, see [`crate::tags`]) it gives the lease back and drops
//!     the request, otherwise it builds;
//! - a worker that schedules a retry **extends** it through the retry's delay, so no
//!   gateway queues a second build meanwhile;
//! - whoever finishes (the worker after storing the envelope, or a gateway whose publish
//!   failed, or that found the fragment just built) **releases** it. The worker
//!   [`finish`](Lease::finish)es: store, then release, in one ordered exchange.
//!
//! On memcached a lease lives on its envelope's server ([`crate::key::placed_as`]), so
//! "take the lease, then read the envelope" and "store the envelope, then release" are one
//! pipelined exchange each, executed in order. A miss costs two store exchanges (the
//! lookup, then the lease with the re-check) and one confirmed publish. memcached's
//! one-command lookup-or-lease (`mg` with `N`) could fold the lookup into the lease, for
//! a new key scheme; it is not adopted (what it would save, measured: `bench/README.md`,
//! "Lookup-or-lease in one command").
//!
//! However long a request waits in its queue, at most one request per key gets past its
//! claim: a lease that expired in the queue lets the next poll publish again, and the
//! older request then finds the newer one's id and steps aside. A build nobody waits for
//! any more may be dropped this way; it is never doubled.
//!
//! Its TTL is [`FragmentRoute::lease_ttl`] (the render deadline plus a margin), so a lease
//! whose holder died expires by itself and no key stays pending forever. This module is
//! the only code that reads or writes lease keys.

use std::time::Duration;

use bytes::Bytes;

use crate::config::FragmentRoute;
use crate::envelope::Envelope;
use crate::key::{FragmentKeys, Keyspace, StoreKey};
use crate::store::{self, Store, StoreError};
use crate::tags;
use crate::time::{add_ms, now_ms};

/// What a worker's claim found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claim {
    /// The request holds the lease (now extended for the render): build.
    Held,
    /// The route was purged since the request was made: drop it.
    Purged,
    /// Another request holds it: drop this one.
    Superseded,
    /// Nobody held it and the fragment is already fresh: drop this one.
    AlreadyBuilt,
}

/// What a gateway that took the lease holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Acquired {
    /// When the lease ends (Unix ms), for `BuildRequest::lease_deadline`.
    pub deadline: u64,
    /// The fragment's envelope as read just after the lease was taken.
    pub envelope: Option<Bytes>,
}

/// The lease of one fragment, on one store.
#[derive(Debug)]
pub struct Lease<'a> {
    store: &'a dyn Store,
    key: StoreKey,
    envelope: &'a StoreKey,
    keyspace: Keyspace,
    route: &'a str,
    ttl: Duration,
}

impl<'a> Lease<'a> {
    /// The lease of the fragment at `keys`, of `route`, kept in `store`.
    pub fn new(store: &'a dyn Store, keys: &'a FragmentKeys, route: &FragmentRoute) -> Self {
        Self {
            store,
            key: keys.lease(),
            envelope: &keys.envelope,
            keyspace: keys.keyspace(),
            route: keys.route(),
            ttl: route.lease_ttl(),
        }
    }

    /// The lease's key, for logs.
    pub fn key(&self) -> &StoreKey {
        &self.key
    }

    /// Takes the lease for the request `holder` unless someone holds it. `Some` when this
    /// caller won: it must then queue the request or [`release`](Self::release) the lease.
    /// `None` when a build is already queued or running.
    ///
    /// The envelope is read back after the lease is taken, in the same exchange on
    /// memcached (the two share a server): a worker that stored a result and released its
    /// lease between the caller's lookup and this call is seen, and not built twice.
    pub async fn acquire(&self, holder: &str) -> Result<Option<Acquired>, StoreError> {
        let deadline = self.deadline_after(Duration::ZERO);
        let won = self
            .store
            .add_then_get(&self.key, holder.as_bytes(), self.ttl, self.envelope)
            .await?;
        Ok(won.map(|envelope| Acquired { deadline, envelope }))
    }

    /// A worker picked the request `holder`, made in `generation` of the route, up: may
    /// it build? See the module docs. The route's generation and the lease are read in
    /// one exchange.
    pub async fn claim(&self, holder: &str, generation: u64) -> Result<Claim, StoreError> {
        let generation_key = self.keyspace.generation(self.route);
        let mut found = self
            .store
            .get_many(&[self.key.clone(), generation_key.clone()])
            .await?;
        let route_generation = match found.remove(&generation_key) {
            Some(bytes) => store::parse_generation(&bytes)?,
            None => store::generation(self.store, &generation_key).await?,
        };
        if generation < route_generation {
            return Ok(Claim::Purged);
        }
        match found.remove(&self.key) {
            Some(current) if current == holder.as_bytes() => {
                self.store
                    .set(&self.key, holder.as_bytes(), self.ttl)
                    .await?;
                Ok(Claim::Held)
            }
            Some(_) => Ok(Claim::Superseded),
            None => {
                // Take it, reading the envelope back in the same exchange.
                let Some(won) = self.acquire(holder).await? else {
                    return Ok(Claim::Superseded);
                };
                let fresh = match won.envelope.and_then(|bytes| Envelope::decode(&bytes).ok()) {
                    // A fresh envelope a tag purge retired is as good as none.
                    Some(e) if now_ms() < e.fresh_until => {
                        !tags::retired(self.store, &self.keyspace, &e).await?
                    }
                    _ => false,
                };
                if !fresh {
                    return Ok(Claim::Held);
                }
                // Nothing to build: give it back. One that cannot be given back expires
                // by itself, and the fragment is fresh meanwhile.
                let _ = self.release().await;
                Ok(Claim::AlreadyBuilt)
            }
        }
    }

    /// Holds the lease for the request `holder` `wait` more than its usual TTL, from
    /// now: through a retry's delay and the retried render. Returns the new deadline
    /// (Unix ms), the same as [`deadline_after`](Self::deadline_after) gives.
    pub async fn extend(&self, holder: &str, wait: Duration) -> Result<u64, StoreError> {
        let deadline = self.deadline_after(wait);
        self.store
            .set(&self.key, holder.as_bytes(), wait + self.ttl)
            .await?;
        Ok(deadline)
    }

    /// When a lease held `wait` more than its usual TTL from now ends (Unix ms).
    pub fn deadline_after(&self, wait: Duration) -> u64 {
        add_ms(now_ms(), wait + self.ttl)
    }

    /// Gives the lease back: the next request may queue a build at once instead of
    /// waiting for the lease to expire.
    pub async fn release(&self) -> Result<(), StoreError> {
        self.store.delete(&self.key).await.map(drop)
    }

    /// Stores the envelope `bytes` for `ttl`, then gives the lease back, in that order
    /// (one exchange on memcached). The outer result is the store's; the inner one the
    /// release's, which only delays the next build when it fails (the lease expires).
    pub async fn finish(
        &self,
        bytes: &[u8],
        ttl: Duration,
    ) -> Result<Result<(), StoreError>, StoreError> {
        let released = self
            .store
            .set_then_delete(self.envelope, bytes, ttl, &self.key)
            .await?;
        Ok(released.map(drop))
    }

    /// The id of the request holding the lease now, if any.
    pub async fn holder(&self) -> Result<Option<String>, StoreError> {
        let value = self.store.get(&self.key).await?;
        Ok(value.map(|v| String::from_utf8_lossy(&v).into_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::key::{Identity, Keyspace};
    use crate::store::MemoryStore;

    /// A route in generation 1, and the keys of one of its fragments.
    async fn setup() -> (MemoryStore, FragmentKeys, FragmentRoute) {
        let route = FragmentRoute::new("recs", "/render/recs");
        let keyspace = Keyspace::new("t");
        let keys = keyspace.fragment(&identity(vec![]), 1);
        let store = MemoryStore::new(1 << 20, 1 << 20);
        store
            .set(&keyspace.generation("recs"), b"1", Duration::ZERO)
            .await
            .unwrap();
        (store, keys, route)
    }

    fn identity(params: Vec<(String, String)>) -> Identity {
        Identity {
            route: "recs".into(),
            params,
            vary: vec![],
        }
    }

    fn ms(d: Duration) -> u64 {
        u64::try_from(d.as_millis()).unwrap()
    }

    #[tokio::test]
    async fn one_caller_wins_until_released() {
        let (store, keys, route) = setup().await;
        let lease = Lease::new(&store, &keys, &route);
        let before = now_ms();
        let Acquired { deadline, envelope } = lease
            .acquire("a")
            .await
            .unwrap()
            .expect("the first caller wins");
        assert_eq!(envelope, None, "nothing built yet");
        let ttl = ms(route.lease_ttl());
        assert!(deadline >= before + ttl && deadline <= now_ms() + ttl);
        assert_eq!(lease.holder().await.unwrap().as_deref(), Some("a"));
        assert_eq!(
            lease.acquire("b").await.unwrap(),
            None,
            "held: nobody else wins"
        );
        assert_eq!(lease.holder().await.unwrap().as_deref(), Some("a"));
        lease.release().await.unwrap();
        assert_eq!(lease.holder().await.unwrap(), None);
        assert!(
            lease.acquire("b").await.unwrap().is_some(),
            "released: the next wins"
        );
    }

    #[tokio::test]
    async fn leases_are_per_fragment_and_apart_from_the_envelope() {
        let (store, keys, route) = setup().await;
        let lease = Lease::new(&store, &keys, &route);
        assert_ne!(lease.key(), &keys.envelope);
        let other_keys = Keyspace::new("t").fragment(&identity(vec![("id".into(), "2".into())]), 1);
        assert!(lease.acquire("a").await.unwrap().is_some());
        let other = Lease::new(&store, &other_keys, &route);
        assert!(other.acquire("b").await.unwrap().is_some());
        assert!(store.get(&keys.envelope).await.unwrap().is_none());
    }

    #[tokio::test]
    async fn extend_holds_the_lease_for_the_wait_and_a_render() {
        let (store, keys, route) = setup().await;
        let lease = Lease::new(&store, &keys, &route);
        let wait = Duration::from_secs(8);
        let before = now_ms();
        let deadline = lease.extend("a", wait).await.unwrap();
        let ttl = ms(wait + route.lease_ttl());
        assert!(deadline >= before + ttl && deadline <= now_ms() + ttl);
        assert_eq!(lease.holder().await.unwrap().as_deref(), Some("a"));
        assert_eq!(lease.acquire("b").await.unwrap(), None);
        assert_eq!(lease.claim("a", 1).await.unwrap(), Claim::Held);
    }

    #[tokio::test]
    async fn only_the_holder_gets_past_its_claim() {
        let (store, keys, route) = setup().await;
        let lease = Lease::new(&store, &keys, &route);
        lease.acquire("newer").await.unwrap();
        assert_eq!(lease.claim("older", 1).await.unwrap(), Claim::Superseded);
        assert_eq!(lease.claim("newer", 1).await.unwrap(), Claim::Held);
        assert_eq!(lease.holder().await.unwrap().as_deref(), Some("newer"));
    }

    #[tokio::test]
    async fn an_unheld_lease_is_retaken_unless_the_fragment_is_fresh() {
        let (store, keys, route) = setup().await;
        let lease = Lease::new(&store, &keys, &route);
        // Nobody holds it and nothing is built (a warming request, or a lease that
        // expired with nobody asking again): the request takes it.
        assert_eq!(lease.claim("warm", 1).await.unwrap(), Claim::Held);
        assert_eq!(lease.holder().await.unwrap().as_deref(), Some("warm"));
        lease.release().await.unwrap();
        // A stale copy does not stop a build…
        let stale = Envelope::ready(
            bytes::Bytes::from_static(b"x"),
            "text/html".into(),
            Duration::ZERO,
            Duration::from_secs(60),
            1,
            1,
        );
        store
            .set(&keys.envelope, &stale.encode(), Duration::from_secs(60))
            .await
            .unwrap();
        assert_eq!(lease.claim("refresh", 1).await.unwrap(), Claim::Held);
        lease.release().await.unwrap();
        // …a fresh one does: someone built it while the request waited.
        let fresh = Envelope::ready(
            bytes::Bytes::from_static(b"x"),
            "text/html".into(),
            Duration::from_secs(60),
            Duration::from_secs(60),
            1,
            1,
        );
        store
            .set(&keys.envelope, &fresh.encode(), Duration::from_secs(60))
            .await
            .unwrap();
        assert_eq!(lease.claim("late", 1).await.unwrap(), Claim::AlreadyBuilt);
        assert_eq!(lease.holder().await.unwrap(), None, "nothing taken");
    }

    #[tokio::test]
    async fn a_fresh_fragment_retired_by_a_tag_purge_is_built_again() {
        let (store, keys, route) = setup().await;
        let lease = Lease::new(&store, &keys, &route);
        let fresh = Envelope::ready(
            bytes::Bytes::from_static(b"x"),
            "text/html".into(),
            Duration::from_secs(60),
            Duration::from_secs(60),
            1,
            1,
        )
        .with_tags(vec!["p-1".into()], now_ms() - 1);
        store
            .set(&keys.envelope, &fresh.encode(), Duration::from_secs(60))
            .await
            .unwrap();
        assert_eq!(lease.claim("late", 1).await.unwrap(), Claim::AlreadyBuilt);
        let tag = crate::tags::Tag::new("p-1").unwrap();
        crate::tags::purge(&store, &keys.keyspace(), &tag)
            .await
            .unwrap();
        assert_eq!(lease.claim("after-purge", 1).await.unwrap(), Claim::Held);
    }

    #[tokio::test]
    async fn the_winner_sees_an_envelope_stored_before_its_lease() {
        let (store, keys, route) = setup().await;
        let lease = Lease::new(&store, &keys, &route);
        // A worker stored its result and released its lease after this caller's lookup.
        lease.acquire("worker").await.unwrap().unwrap();
        lease
            .finish(b"built", Duration::from_secs(60))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(lease.holder().await.unwrap(), None, "finish releases");
        let won = lease.acquire("late").await.unwrap().expect("free again");
        assert_eq!(won.envelope.as_deref(), Some(&b"built"[..]));
    }

    #[tokio::test]
    async fn a_request_of_a_generation_since_purged_is_dropped() {
        let (store, keys, route) = setup().await;
        let lease = Lease::new(&store, &keys, &route);
        lease.acquire("old").await.unwrap().unwrap();
        crate::store::bump_generation(&store, &Keyspace::new("t").generation("recs"))
            .await
            .unwrap();
        assert_eq!(lease.claim("old", 1).await.unwrap(), Claim::Purged);
        assert_eq!(lease.claim("old", 2).await.unwrap(), Claim::Held);
        // A generation the store lost starts over at the current time: older than it.
        store
            .delete(&Keyspace::new("t").generation("recs"))
            .await
            .unwrap();
        assert_eq!(lease.claim("old", 2).await.unwrap(), Claim::Purged);
    }
}
