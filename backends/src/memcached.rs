//! The shared store on memcached: the meta protocol as `memcache::exp` builds and parses
//! it, over connections of our own (`pipeline`).
//!
//! Promises, beyond the [`Store`] contract:
//! - **Never blocks a runtime thread, no thread hop.** Calls are tokio I/O on long-lived
//!   connections, each exchange bounded by `store.timeout`.
//! - **Placement that survives growth.** Keys go to servers by rendezvous hashing over
//!   FNV-1a ([`place`]), scored against each server as written in the configuration
//!   (`host:port`): the same in every process and every build, and adding a fifth
//!   server to four moves only the keys the new one wins, about a fifth. Changing the
//!   placement function itself (as from the `fnv1a64 % n` of earlier releases) remaps
//!   most keys once: a cold start, not an error.
//! - **Commands that arrive together go out together.** Each server has [`LINES`]
//!   shared pipelined connections, and one per gateway HTTP thread ([`home`]). A call's
//!   commands (a `get`, every key of a `get_many` on that
//!   server, the two of an `add_then_get` or a `set_then_delete`) are one exchange, kept
//!   together and in order on one connection; exchanges queued while a connection has
//!   answers outstanding go out in one write. Under load N concurrent calls cost a few
//!   writes and reads, not N round trips; alone, a call goes out at once (as with
//!   Nagle's algorithm). A caller that goes away (its client hung up) is not sent and
//!   never fails or strands the others.
//! - **Bounded connections.** [`LINES`] per server, and on a gateway one per HTTP
//!   thread (at most one per core), whatever the load. A memcached that stops answering
//!   fails each exchange at `store.timeout`, and the connection with it; nothing is
//!   spawned per call, so nothing piles up.
//! - **Recovery.** A connection that fails (the server restarted or stopped answering)
//!   fails what was in flight on it; the next call dials anew, without a pool rebuild.
//!   Start-up never waits for a server: names are resolved and servers dialed on first
//!   use.
//! - **`incr` never creates** (the meta `ma` command without `N` answers `NF`).
//! - **`raise` is a compare-and-swap** (`mg … c`, then `ms … C<cas>`, again if someone
//!   changed the key in between).
//! - **TTLs over 30 days** are sent as Unix times (this host's clock), since memcached reads
//!   any expiration above 30 days as one.
//!
//! # Failover
//!
//! Each process judges every server for itself, from what its own calls see, and
//! serves on while one of several servers is out. The aim: no call waits on a server
//! already judged down, no purge is refused or lost, no lease has two holders, and
//! nothing a server held before it left is served after it comes back.
//!
//! **Judged down.** `store.eject_after` calls in a row that fail on a server (a broken
//! connection, an unreadable stream) judge it down; so does one exchange not answered
//! within `store.timeout`, or one refused connection (as mcrouter's "hard TKO": a
//! server that does not listen will not answer the next call either). From then on its
//! calls fail at once (one server) or its keys go to the next server of their
//! rendezvous order, which is what rendezvous hashing makes cheap: only the keys the
//! server held move, each to the same place in every process. Metadata and leases,
//! kept on the first two servers up ([`tessera_protocol::store::copies`]), lose one
//! copy of two.
//!
//! **Probes.** A task per server checks it every `store.probe_interval` while it is up,
//! so that a hang is found without traffic (an idle worker learns it too); a server
//! judged down is retried after 100 ms, then at twice the wait each time, up to the
//! probe interval, and taken back once it answers. Every process reaches the same view
//! from the same signals, within about one probe interval plus `store.timeout` of each
//! other.
//!
//! **What a returning server held.** A server that hung (SIGSTOP, a network partition)
//! comes back with everything it held, while its keys were rebuilt or purged elsewhere.
//! Generations and tag purges need nothing: every view reads them from two copies and
//! takes the largest, and a copy only grows. Envelopes and leases do: an old envelope
//! on the returning server would be served again, and an old lease would stall a
//! build. So the store keeps count of writes a server missed:
//!
//! - before the first write that goes elsewhere in place of a down server (a key whose
//!   home, or one of whose two copies, it is), a process raises that server's count of
//!   missed writes (`{ns}:m:{server}`, kept on two other servers), once per outage, and
//!   again at a failed probe when it wrote elsewhere since;
//! - every server holds the count it was last emptied for (`{ns}:i`, on itself);
//! - a server whose count of missed writes is above what it was emptied for is emptied
//!   (`flush_all`, then the new count recorded, in one exchange) before the process that
//!   finds it uses it: the process taking it back, or any process whose check of an up
//!   server finds it (a process that never saw the outage, or took the server back
//!   first);
//! - a process that takes a server back that someone else already emptied deletes from
//!   it the keys it wrote elsewhere since its own last failed probe (its journal,
//!   bounded at 10,000 keys; past that, it empties it again).
//!
//! So a process that judged a server down never uses it again before what it missed is
//! gone from it; a process that did not (a hang shorter than its probe interval with no
//! call of its own in it) uses it until its next check, at most one probe interval.
//! Emptying costs the returning server's keys a cold start (placeholders and rebuilds);
//! leases survive it on their other copy. Tessera's memcached servers should be its own:
//! `flush_all` empties every namespace on the server. Servers shared with other
//! applications can keep their data with `store.flush_on_return = false`, at the price
//! of serving, from a server that hung, fragments purged or rebuilt while it was out,
//! until they expire. A store of one server has nowhere to send keys: its calls fail at
//! once while it is judged down, and it is taken back as it is.
//!
//! **Builds doubled.** A lease is never held twice while processes disagree about one
//! server (see [`tessera_protocol::lease`]): leases are taken on both copies, and any
//! two views share a copy that is up. A build is done twice only when its lease is lost:
//! both copies gone at once (two servers lost, or one lost while the other copy was
//! being refilled), or its holder ran past the lease's TTL, as without failover. A call
//! whose failure judged its server down runs once more at its keys' new home, so the
//! calls in flight at that moment do not fail either. Measured, with the builds done
//! again after a lost copy: [`tessera_protocol::lease`].

mod cluster;
mod commands;
mod health;
mod ops;
mod pipeline;
mod placement;
mod probe;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;

use tessera_protocol::config::{MemcachedServer, StoreConfig};
use tessera_protocol::key::StoreKey;
use tessera_protocol::store::{
    Change, ServerState, Store, StoreError, add_then_get_in_turn, set_then_delete_in_turn,
};

use cluster::{Cluster, Place};

pub use pipeline::{LINES, home};
pub use placement::{fnv1a64, place};

/// How servers are judged down and taken back: `[store]`'s failover keys.
#[derive(Debug, Clone)]
pub struct Failover {
    /// `store.namespace`: the store's own keys (counts of missed writes) live under it.
    pub namespace: String,
    /// `store.eject_after`.
    pub eject_after: u32,
    /// `store.probe_interval`.
    pub probe_interval: Duration,
    /// `store.flush_on_return`.
    pub flush_on_return: bool,
}

impl Failover {
    /// The keys of `store`.
    pub fn of(store: &StoreConfig) -> Self {
        Self {
            namespace: store.namespace.clone(),
            eject_after: store.eject_after,
            probe_interval: store.probe_interval,
            flush_on_return: store.flush_on_return,
        }
    }
}

impl Default for Failover {
    fn default() -> Self {
        Self::of(&StoreConfig::default())
    }
}

/// memcached, as a [`Store`].
pub struct MemcachedStore {
    cluster: Arc<Cluster>,
    /// One store per server, whose calls all go to it: the copies handed out by
    /// [`Store::copies`].
    copies: Box<[Pinned]>,
}

impl std::fmt::Debug for MemcachedStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemcachedStore")
            .field("servers", &self.cluster.health.states())
            .finish_non_exhaustive()
    }
}

impl MemcachedStore {
    /// A store over `servers` (parsed at config load), with the given per-call deadline
    /// and item limit, and the default failover settings. Does no I/O: names are
    /// resolved and servers dialed on first use. Made inside a tokio runtime, where it
    /// starts its probes.
    pub fn new(
        servers: &[MemcachedServer],
        timeout: Duration,
        max_item_size: usize,
    ) -> Result<Self, StoreError> {
        Self::with_failover(servers, timeout, max_item_size, Failover::default())
    }

    /// [`new`](Self::new) with the failover settings of `failover`.
    pub fn with_failover(
        servers: &[MemcachedServer],
        timeout: Duration,
        max_item_size: usize,
        failover: Failover,
    ) -> Result<Self, StoreError> {
        if servers.is_empty() {
            return Err(StoreError::Protocol(
                "no memcached servers configured".into(),
            ));
        }
        let servers: Vec<(String, u16)> = servers
            .iter()
            .map(|s| {
                let host = s.host().trim_start_matches('[').trim_end_matches(']');
                (host.to_string(), s.port())
            })
            .collect();
        let cluster = Arc::new(Cluster::new(servers, timeout, max_item_size, &failover));
        probe::start(&cluster);
        Ok(Self {
            copies: (0..cluster.len())
                .map(|s| Pinned::new(cluster.clone(), Place::Copy(s)))
                .collect(),
            cluster,
        })
    }
}

/// One server of a store, as a store: every call goes to it (unless it is down).
#[derive(Debug)]
pub(crate) struct Pinned {
    cluster: Arc<Cluster>,
    place: Place,
}

impl Pinned {
    fn new(cluster: Arc<Cluster>, place: Place) -> Self {
        Self { cluster, place }
    }
}

#[async_trait]
impl Store for MemcachedStore {
    fn reconnects(&self) -> u64 {
        self.cluster.resets()
    }

    fn copies(&self, key: &StoreKey) -> Option<Vec<&dyn Store>> {
        let servers = self.cluster.copies(key)?;
        Some(
            servers
                .into_iter()
                .map(|s| &self.copies[s] as &dyn Store)
                .collect(),
        )
    }

    fn servers(&self) -> Vec<ServerState> {
        self.cluster.health.states()
    }

    async fn get(&self, key: &StoreKey) -> Result<Option<Bytes>, StoreError> {
        self.cluster.get(Place::Home, key).await
    }

    async fn get_many(&self, keys: &[StoreKey]) -> Result<HashMap<StoreKey, Bytes>, StoreError> {
        self.cluster.get_many(Place::Home, keys).await
    }

    async fn add(&self, key: &StoreKey, value: &[u8], ttl: Duration) -> Result<bool, StoreError> {
        self.cluster.add(Place::Home, key, value, ttl).await
    }

    async fn set(&self, key: &StoreKey, value: &[u8], ttl: Duration) -> Result<(), StoreError> {
        self.cluster.set(Place::Home, key, value, ttl).await
    }

    async fn add_then_get(
        &self,
        key: &StoreKey,
        value: &[u8],
        ttl: Duration,
        then: &StoreKey,
    ) -> Result<Option<Option<Bytes>>, StoreError> {
        if !self.cluster.same_home(key, then) {
            return add_then_get_in_turn(self, key, value, ttl, then).await;
        }
        // One connection carries an exchange's commands in order: the get runs after the
        // add.
        self.cluster
            .add_then_get(Place::Home, key, value, ttl, then)
            .await
    }

    async fn set_then_delete(
        &self,
        key: &StoreKey,
        value: &[u8],
        ttl: Duration,
        then: &StoreKey,
    ) -> Result<Result<bool, StoreError>, StoreError> {
        if !self.cluster.same_home(key, then) {
            return set_then_delete_in_turn(self, key, value, ttl, then).await;
        }
        self.cluster
            .set_then_delete(Place::Home, key, value, ttl, then)
            .await
    }

    async fn delete(&self, key: &StoreKey) -> Result<bool, StoreError> {
        self.cluster.delete(Place::Home, key).await
    }

    async fn incr(&self, key: &StoreKey, delta: u64) -> Result<Option<u64>, StoreError> {
        self.cluster.incr(Place::Home, key, delta).await
    }

    async fn raise(&self, key: &StoreKey, to: u64) -> Result<u64, StoreError> {
        self.cluster.raise(Place::Home, key, to).await
    }

    async fn update(
        &self,
        key: &StoreKey,
        change: &Change<'_>,
    ) -> Result<Option<Bytes>, StoreError> {
        self.cluster.update(Place::Home, key, change).await
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.cluster.ping().await
    }
}

#[async_trait]
impl Store for Pinned {
    async fn get(&self, key: &StoreKey) -> Result<Option<Bytes>, StoreError> {
        self.cluster.get(self.place, key).await
    }

    async fn get_many(&self, keys: &[StoreKey]) -> Result<HashMap<StoreKey, Bytes>, StoreError> {
        self.cluster.get_many(self.place, keys).await
    }

    async fn add(&self, key: &StoreKey, value: &[u8], ttl: Duration) -> Result<bool, StoreError> {
        self.cluster.add(self.place, key, value, ttl).await
    }

    async fn set(&self, key: &StoreKey, value: &[u8], ttl: Duration) -> Result<(), StoreError> {
        self.cluster.set(self.place, key, value, ttl).await
    }

    async fn add_then_get(
        &self,
        key: &StoreKey,
        value: &[u8],
        ttl: Duration,
        then: &StoreKey,
    ) -> Result<Option<Option<Bytes>>, StoreError> {
        self.cluster
            .add_then_get(self.place, key, value, ttl, then)
            .await
    }

    async fn set_then_delete(
        &self,
        key: &StoreKey,
        value: &[u8],
        ttl: Duration,
        then: &StoreKey,
    ) -> Result<Result<bool, StoreError>, StoreError> {
        self.cluster
            .set_then_delete(self.place, key, value, ttl, then)
            .await
    }

    async fn delete(&self, key: &StoreKey) -> Result<bool, StoreError> {
        self.cluster.delete(self.place, key).await
    }

    async fn incr(&self, key: &StoreKey, delta: u64) -> Result<Option<u64>, StoreError> {
        self.cluster.incr(self.place, key, delta).await
    }

    async fn raise(&self, key: &StoreKey, to: u64) -> Result<u64, StoreError> {
        self.cluster.raise(self.place, key, to).await
    }

    async fn update(
        &self,
        key: &StoreKey,
        change: &Change<'_>,
    ) -> Result<Option<Bytes>, StoreError> {
        self.cluster.update(self.place, key, change).await
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.cluster.ping().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_server_that_is_down_is_unavailable_not_a_hang() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let store = MemcachedStore::new(
            &[format!("127.0.0.1:{port}").parse().unwrap()],
            Duration::from_millis(200),
            1024,
        )
        .unwrap();
        let key = tessera_protocol::key::Keyspace::new("t").generation("x");
        let started = std::time::Instant::now();
        assert!(matches!(
            store.get(&key).await,
            Err(StoreError::Unavailable(_))
        ));
        assert!(started.elapsed() < Duration::from_secs(2));
        assert!(store.ping().await.is_err());
    }
}
