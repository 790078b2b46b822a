//! The pending lease: the one owner of "exactly one build per key".
//!
//! A lease is a no-data store key beside a fragment's envelope (see [`crate::key`]). It
//! is present while exactly one build of that fragment is queued or running:
//!
//! - a gateway that misses **acquires** it with the store's atomic `add`; of all callers
//!   in all gateways exactly one wins and publishes the `BuildRequest`, the others answer
//!   "pending";
//! - a worker that schedules a retry **extends** it through the retry's delay, so no
//!   gateway queues a second build meanwhile;
//! - whoever finishes (the worker after storing the envelope, or a gateway whose publish
//!   failed, or that found the fragment just built) **releases** it.
//!
//! Its TTL is [`FragmentRoute::lease_ttl`] (the render deadline plus a margin), so a lease
//! whose holder died expires by itself and no key stays pending forever. This module is
//! the only code that reads or writes lease keys.

use std::time::Duration;

use crate::config::FragmentRoute;
use crate::key::{FragmentKeys, StoreKey};
use crate::store::{Store, StoreError};
use crate::time::{add_ms, now_ms};

/// The lease of one fragment, on one store.
#[derive(Debug)]
pub struct Lease<'a> {
    store: &'a dyn Store,
    key: StoreKey,
    ttl: Duration,
}

impl<'a> Lease<'a> {
    /// The lease of the fragment at `keys`, of `route`, kept in `store`.
    pub fn new(store: &'a dyn Store, keys: &FragmentKeys, route: &FragmentRoute) -> Self {
        Self {
            store,
            key: keys.lease(),
            ttl: route.lease_ttl(),
        }
    }

    /// The lease's key, for logs.
    pub fn key(&self) -> &StoreKey {
        &self.key
    }

    /// Takes the lease unless someone holds it. `Some(deadline)` (Unix ms, for
    /// `BuildRequest::lease_deadline`) when this caller won: it must then queue the build
    /// or [`release`](Self::release) the lease. `None` when a build is already queued or
    /// running.
    pub async fn acquire(&self) -> Result<Option<u64>, StoreError> {
        let now = now_ms();
        let won = self.store.add(&self.key, b"", self.ttl).await?;
        Ok(won.then(|| add_ms(now, self.ttl)))
    }

    /// Holds the lease for `wait` more than its usual TTL, from now: through a retry's
    /// delay and the retried render. Returns the new deadline (Unix ms), the same as
    /// [`deadline_after`](Self::deadline_after) gives.
    pub async fn extend(&self, wait: Duration) -> Result<u64, StoreError> {
        let deadline = self.deadline_after(wait);
        self.store.set(&self.key, b"", wait + self.ttl).await?;
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

    /// Whether someone holds the lease now.
    pub async fn is_held(&self) -> Result<bool, StoreError> {
        Ok(self.store.get(&self.key).await?.is_some())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::key::{Identity, Keyspace};
    use crate::store::MemoryStore;
    use crate::time::now_ms;

    fn setup() -> (MemoryStore, FragmentKeys, FragmentRoute) {
        let route = FragmentRoute::new("recs", "/render/recs");
        let identity = Identity {
            route: "recs".into(),
            params: vec![],
            vary: vec![],
        };
        let keys = Keyspace::new("t").fragment(&identity, 1);
        (MemoryStore::new(1 << 20, 1 << 20), keys, route)
    }

    #[tokio::test]
    async fn one_caller_wins_until_released() {
        let (store, keys, route) = setup();
        let lease = Lease::new(&store, &keys, &route);
        let before = now_ms();
        let deadline = lease
            .acquire()
            .await
            .unwrap()
            .expect("the first caller wins");
        let ttl = u64::try_from(route.lease_ttl().as_millis()).unwrap();
        assert!(deadline >= before + ttl && deadline <= now_ms() + ttl);
        assert!(lease.is_held().await.unwrap());
        let other = Lease::new(&store, &keys, &route);
        assert_eq!(
            other.acquire().await.unwrap(),
            None,
            "held: nobody else wins"
        );
        lease.release().await.unwrap();
        assert!(!lease.is_held().await.unwrap());
        assert!(
            other.acquire().await.unwrap().is_some(),
            "released: the next wins"
        );
    }

    #[tokio::test]
    async fn leases_are_per_fragment_and_apart_from_the_envelope() {
        let (store, keys, route) = setup();
        let lease = Lease::new(&store, &keys, &route);
        assert_ne!(lease.key(), &keys.envelope);
        let other_keys = Keyspace::new("t").fragment(
            &Identity {
                route: "recs".into(),
                params: vec![("id".into(), "2".into())],
                vary: vec![],
            },
            1,
        );
        assert!(lease.acquire().await.unwrap().is_some());
        let other = Lease::new(&store, &other_keys, &route);
        assert!(other.acquire().await.unwrap().is_some());
        assert!(store.get(&keys.envelope).await.unwrap().is_none());
    }

    #[tokio::test]
    async fn extend_holds_the_lease_for_the_wait_and_a_render() {
        let (store, keys, route) = setup();
        let lease = Lease::new(&store, &keys, &route);
        let wait = Duration::from_secs(8);
        let before = now_ms();
        let deadline = lease.extend(wait).await.unwrap();
        let ttl = u64::try_from((wait + route.lease_ttl()).as_millis()).unwrap();
        assert!(deadline >= before + ttl && deadline <= now_ms() + ttl);
        assert!(
            lease.is_held().await.unwrap(),
            "extend takes a lease nobody held"
        );
        assert_eq!(lease.acquire().await.unwrap(), None);
    }
}
