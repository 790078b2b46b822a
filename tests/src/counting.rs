//! A `Store` that counts calls, to check how many round trips an operation costs.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use tessera_protocol::store::SharedStore;
use tessera_protocol::{Store, StoreError, StoreKey};

/// Calls made so far, by kind.
#[derive(Debug, Default)]
pub struct Calls {
    /// `get` of envelope keys (`:f:`).
    pub envelope_gets: AtomicUsize,
    /// `get_many` of envelopes (a worker's claim, which reads a lease and a generation,
    /// is not counted).
    pub get_many: AtomicUsize,
    /// Keys asked for through those.
    pub get_many_keys: AtomicUsize,
    /// `add` of pending leases (`:p:`).
    pub lease_adds: AtomicUsize,
}

impl Calls {
    /// Reads a counter.
    pub fn read(c: &AtomicUsize) -> usize {
        c.load(Ordering::SeqCst)
    }

    /// Sets every counter to zero.
    pub fn reset(&self) {
        for c in [
            &self.envelope_gets,
            &self.get_many,
            &self.get_many_keys,
            &self.lease_adds,
        ] {
            c.store(0, Ordering::SeqCst);
        }
    }
}

/// Wraps a store, counting calls.
#[derive(Debug)]
pub struct CountingStore {
    inner: SharedStore,
    /// The counters.
    pub calls: Arc<Calls>,
}

impl CountingStore {
    /// Wraps `inner`.
    pub fn wrap(inner: SharedStore) -> (Arc<CountingStore>, Arc<Calls>) {
        let calls = Arc::new(Calls::default());
        (
            Arc::new(CountingStore {
                inner,
                calls: calls.clone(),
            }),
            calls,
        )
    }
}

#[async_trait]
impl Store for CountingStore {
    async fn get(&self, key: &StoreKey) -> Result<Option<Bytes>, StoreError> {
        if key.as_str().contains(":f:") {
            self.calls.envelope_gets.fetch_add(1, Ordering::SeqCst);
        }
        self.inner.get(key).await
    }
    async fn get_many(&self, keys: &[StoreKey]) -> Result<HashMap<StoreKey, Bytes>, StoreError> {
        if keys.iter().any(|k| k.as_str().contains(":f:")) {
            self.calls.get_many.fetch_add(1, Ordering::SeqCst);
            self.calls
                .get_many_keys
                .fetch_add(keys.len(), Ordering::SeqCst);
        }
        self.inner.get_many(keys).await
    }
    async fn add(&self, key: &StoreKey, value: &[u8], ttl: Duration) -> Result<bool, StoreError> {
        if key.as_str().contains(":p:") {
            self.calls.lease_adds.fetch_add(1, Ordering::SeqCst);
        }
        self.inner.add(key, value, ttl).await
    }
    async fn set(&self, key: &StoreKey, value: &[u8], ttl: Duration) -> Result<(), StoreError> {
        self.inner.set(key, value, ttl).await
    }
    async fn delete(&self, key: &StoreKey) -> Result<bool, StoreError> {
        self.inner.delete(key).await
    }
    async fn incr(&self, key: &StoreKey, delta: u64) -> Result<Option<u64>, StoreError> {
        self.inner.incr(key, delta).await
    }
    async fn ping(&self) -> Result<(), StoreError> {
        self.inner.ping().await
    }
}
