//! The pending lease: the one owner of "exactly one build per key".
//!
//! A lease is a store key beside a fragment's envelope (see [`crate::key`]) whose value
//! is the id of the one `BuildRequest` allowed to build that fragment now:
//!
//! - a gateway that misses **acquires** it with the store's atomic `add`; of all callers
//!   in all gateways exactly one wins and publishes its request, the others answer
//!   "pending";
//! - a worker that picks a request up **claims** the lease for it before rendering:
//!   - held by this request: extended for the render, build;
//!   - held by another request: this one was superseded (its lease expired while it
//!     waited in a backed-up queue, and a newer request took over): dropped;
//!   - held by nobody: the fragment is fresh (someone built it meanwhile, and no tag
//!     purge retired it since, see [`crate::tags`]) and the request is dropped, or the
//!     worker re-takes the lease with `add` and builds;
//! - a worker that schedules a retry **extends** it through the retry's delay, so no
//!   gateway queues a second build meanwhile;
//! - whoever finishes (the worker after storing the envelope, or a gateway whose publish
//!   failed, or that found the fragment just built) **releases** it.
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

use crate::config::FragmentRoute;
use crate::envelope::Envelope;
use crate::key::{FragmentKeys, Keyspace, StoreKey};
use crate::store::{Store, StoreError};
use crate::tags;
use crate::time::{add_ms, now_ms};

/// What a worker's claim found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claim {
    /// The request holds the lease (now extended for the render): build.
    Held,
    /// Another request holds it: drop this one.
    Superseded,
    /// Nobody held it and the fragment is already fresh: drop this one.
    AlreadyBuilt,
}

/// The lease of one fragment, on one store.
#[derive(Debug)]
pub struct Lease<'a> {
    store: &'a dyn Store,
    key: StoreKey,
    envelope: &'a StoreKey,
    keyspace: Keyspace,
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
            ttl: route.lease_ttl(),
        }
    }

    /// The lease's key, for logs.
    pub fn key(&self) -> &StoreKey {
        &self.key
    }

    /// Takes the lease for the request `holder` unless someone holds it. `Some(deadline)`
    /// (Unix ms, for `BuildRequest::lease_deadline`) when this caller won: it must then
    /// queue the request or [`release`](Self::release) the lease. `None` when a build is
    /// already queued or running.
    pub async fn acquire(&self, holder: &str) -> Result<Option<u64>, StoreError> {
        let deadline = self.deadline_after(Duration::ZERO);
        let won = self
            .store
            .add(&self.key, holder.as_bytes(), self.ttl)
            .await?;
        Ok(won.then_some(deadline))
    }

    /// A worker picked the request `holder` up: may it build? See the module docs.
    pub async fn claim(&self, holder: &str) -> Result<Claim, StoreError> {
        match self.store.get(&self.key).await? {
            Some(current) if current == holder.as_bytes() => {
                self.store
                    .set(&self.key, holder.as_bytes(), self.ttl)
                    .await?;
                Ok(Claim::Held)
            }
            Some(_) => Ok(Claim::Superseded),
            None => {
                let fresh = match self
                    .store
                    .get(self.envelope)
                    .await?
                    .and_then(|bytes| Envelope::decode(&bytes).ok())
                {
                    // A fresh envelope a tag purge retired is as good as none.
                    Some(e) if now_ms() < e.fresh_until => {
                        !tags::retired(self.store, &self.keyspace, &e).await?
                    }
                    _ => false,
                };
                if fresh {
                    Ok(Claim::AlreadyBuilt)
                } else if self
                    .store
                    .add(&self.key, holder.as_bytes(), self.ttl)
                    .await?
                {
                    Ok(Claim::Held)
                } else {
                    Ok(Claim::Superseded)
                }
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

    fn setup() -> (MemoryStore, FragmentKeys, FragmentRoute) {
        let route = FragmentRoute::new("recs", "/render/recs");
        let keys = Keyspace::new("t").fragment(&identity(vec![]), 1);
        (MemoryStore::new(1 << 20, 1 << 20), keys, route)
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
        let (store, keys, route) = setup();
        let lease = Lease::new(&store, &keys, &route);
        let before = now_ms();
        let deadline = lease
            .acquire("a")
            .await
            .unwrap()
            .expect("the first caller wins");
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
        let (store, keys, route) = setup();
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
        let (store, keys, route) = setup();
        let lease = Lease::new(&store, &keys, &route);
        let wait = Duration::from_secs(8);
        let before = now_ms();
        let deadline = lease.extend("a", wait).await.unwrap();
        let ttl = ms(wait + route.lease_ttl());
        assert!(deadline >= before + ttl && deadline <= now_ms() + ttl);
        assert_eq!(lease.holder().await.unwrap().as_deref(), Some("a"));
        assert_eq!(lease.acquire("b").await.unwrap(), None);
        assert_eq!(lease.claim("a").await.unwrap(), Claim::Held);
    }

    #[tokio::test]
    async fn only_the_holder_gets_past_its_claim() {
        let (store, keys, route) = setup();
        let lease = Lease::new(&store, &keys, &route);
        lease.acquire("newer").await.unwrap();
        assert_eq!(lease.claim("older").await.unwrap(), Claim::Superseded);
        assert_eq!(lease.claim("newer").await.unwrap(), Claim::Held);
        assert_eq!(lease.holder().await.unwrap().as_deref(), Some("newer"));
    }

    #[tokio::test]
    async fn an_unheld_lease_is_retaken_unless_the_fragment_is_fresh() {
        let (store, keys, route) = setup();
        let lease = Lease::new(&store, &keys, &route);
        // Nobody holds it and nothing is built (a warming request, or a lease that
        // expired with nobody asking again): the request takes it.
        assert_eq!(lease.claim("warm").await.unwrap(), Claim::Held);
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
        assert_eq!(lease.claim("refresh").await.unwrap(), Claim::Held);
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
        assert_eq!(lease.claim("late").await.unwrap(), Claim::AlreadyBuilt);
        assert_eq!(lease.holder().await.unwrap(), None, "nothing taken");
    }

    #[tokio::test]
    async fn a_fresh_fragment_retired_by_a_tag_purge_is_built_again() {
        let (store, keys, route) = setup();
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
        assert_eq!(lease.claim("late").await.unwrap(), Claim::AlreadyBuilt);
        let tag = crate::tags::Tag::new("p-1").unwrap();
        crate::tags::purge(&store, &keys.keyspace(), &tag)
            .await
            .unwrap();
        assert_eq!(lease.claim("after-purge").await.unwrap(), Claim::Held);
    }
}
