//! The shared store on memcached (crate `memcache`, its async meta-protocol client
//! `memcache::exp::AsyncMetaClient`).
//!
//! Promises, beyond the [`Store`] contract:
//! - **Never blocks a runtime thread, no thread hop.** Calls are tokio I/O on pooled
//!   connections, each bounded by `store.timeout` (the client's exchange deadline, and
//!   ours around it).
//! - **Placement that survives growth.** Keys go to servers by rendezvous hashing over
//!   FNV-1a ([`place`]), scored against each server as written in the configuration
//!   (`host:port`): the same in every process and every build, and adding a fifth
//!   server to four moves only the keys the new one wins, about a fifth. Changing the
//!   placement function itself (as from the `fnv1a64 % n` of earlier releases) remaps
//!   most keys once: a cold start, not an error.
//! - **Commands that arrive together go out together.** A `get`, each key of a
//!   `get_many`, and the two commands of an `add_then_get` or a `set_then_delete` join
//!   the batch being formed, or start one: a task of its own yields once so that the
//!   callers ready at that instant join, then sends the batch as one pipelined exchange
//!   per server, each caller's commands in its order. A caller that goes away (its client
//!   hung up) never fails or strands the others. Under load N concurrent calls cost a few
//!   exchanges, not N; alone, a call pays one spawn and one yield. A page's includes, a
//!   worker's claims (a lease and a generation each) and a miss storm's leases batch this
//!   way; lone writes (`add`, `set`, `delete`, `incr`) go out on their own.
//! - **Bounded connections.** At most [`MAX_CONNECTIONS`] per server; a caller past the
//!   cap waits for one within the deadline, then fails `Unavailable`. A memcached that
//!   stops answering costs at most that many waiting exchanges, each ended by the
//!   deadline.
//! - **Recovery.** A connection that fails mid-exchange is dropped, a pooled one that
//!   died while idle is redialed once; after memcached restarts the next calls work
//!   again without a pool rebuild. Start-up never waits for a server: names are resolved
//!   and servers dialed on first use.
//! - **`incr` never creates** (the meta `ma` command without `N` answers `NF`).
//! - **TTLs over 30 days** are sent as Unix times (this host's clock), since memcached reads
//!   any expiration above 30 days as one.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use memcache::exp::{
    AsyncMetaClient, Delete, Error as McError, Get, GetResult, GetStatus, MutationStatus, Op,
    OpResult, Router, ServerAddress, Set,
};
use tokio::sync::{OnceCell, oneshot};

use tessera_protocol::Cause;
use tessera_protocol::config::MemcachedServer;
use tessera_protocol::key::{StoreKey, placed_as};
use tessera_protocol::store::{
    Store, StoreError, add_then_get_in_turn, check_size, set_then_delete_in_turn,
};
use tessera_protocol::time::ceil_secs;

/// Most connections in use per server.
pub const MAX_CONNECTIONS: usize = 64;
/// Idle connections kept per server: as many as may be in use, so that a steady load of
/// more exchanges in flight than half the cap does not close and redial connections on
/// every return (measured: a worker with 64 builds in flight spent its CPU on it).
const MAX_IDLE: usize = MAX_CONNECTIONS;
/// Longest expiration memcached reads as relative seconds.
const MAX_RELATIVE_EXPIRY: u64 = 30 * 24 * 3600;

/// 64-bit FNV-1a: fixed by its definition, so placement never changes between builds.
pub fn fnv1a64(bytes: &[u8]) -> u64 {
    fnv1a64_parts(&[bytes])
}

/// [`fnv1a64`] of the concatenation of `parts`.
fn fnv1a64_parts(parts: &[&[u8]]) -> u64 {
    parts
        .iter()
        .flat_map(|p| p.iter())
        .fold(0xcbf2_9ce4_8422_2325, |h, b| {
            (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
        })
}

/// SplitMix64's finalizer: spreads the combined hash over all 64 bits.
fn mix(mut x: u64) -> u64 {
    x ^= x >> 30;
    x = x.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x ^= x >> 27;
    x = x.wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// The server of `key` among `servers` (as written in the configuration): rendezvous
/// (highest random weight) hashing, each server scored by `mix(fnv(key) ^ fnv(server))`.
/// Adding or removing a server moves only the keys it wins or held; the order of the list
/// does not matter. A lease is placed as its envelope ([`placed_as`]).
pub fn place(key: &[u8], servers: &[String]) -> usize {
    let k = fnv1a64_parts(&placed_as(key));
    servers
        .iter()
        .enumerate()
        .max_by_key(|(_, s)| mix(k ^ fnv1a64(s.as_bytes())))
        .map_or(0, |(i, _)| i)
}

/// [`place`] as the client's router.
#[derive(Debug, Clone, Copy)]
struct Placement;

impl Router for Placement {
    fn route(&self, key: &[u8], servers: &[String]) -> usize {
        place(key, servers)
    }
}

/// memcached, as a [`Store`].
pub struct MemcachedStore {
    /// `host:port` of each server, as configured: the placement's identities.
    servers: Vec<(String, u16)>,
    /// The same, as the router sees them.
    names: Vec<String>,
    client: OnceCell<Connected>,
    timeout: Duration,
    max_item_size: usize,
    /// Calls that failed on the connection (each dropped it; the next call dials anew).
    resets: AtomicU64,
}

impl std::fmt::Debug for MemcachedStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemcachedStore")
            .field("servers", &self.servers)
            .finish_non_exhaustive()
    }
}

impl MemcachedStore {
    /// A store over `servers` (parsed at config load), with the given per-call deadline
    /// and item limit. Does no I/O: names are resolved and servers dialed on first use.
    pub fn new(
        servers: &[MemcachedServer],
        timeout: Duration,
        max_item_size: usize,
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
        Ok(Self {
            names: servers.iter().map(ServerAddress::identity).collect(),
            servers,
            client: OnceCell::new(),
            timeout,
            max_item_size,
            resets: AtomicU64::new(0),
        })
    }

    async fn connected(&self) -> Result<&Connected, McError> {
        self.client
            .get_or_try_init(|| async {
                let client = AsyncMetaClient::builder()
                    .router(Placement)
                    .max_idle(MAX_IDLE)
                    .max_connections(Some(MAX_CONNECTIONS))
                    .connect_timeout(Some(self.timeout))
                    .io_timeout(Some(self.timeout))
                    .connect_multiple_async(self.servers.iter().cloned())
                    .await?;
                Ok(Connected {
                    client,
                    forming: Arc::new(Mutex::new(Vec::new())),
                })
            })
            .await
    }

    /// Runs `call` on the connected client under the deadline, mapping its errors.
    async fn call<'a, T, F>(
        &'a self,
        call: impl FnOnce(&'a Connected) -> F,
    ) -> Result<T, StoreError>
    where
        F: Future<Output = Result<T, McError>>,
    {
        let run = async { call(self.connected().await?).await };
        let result = match tokio::time::timeout(self.timeout, run).await {
            Err(_) => Err(StoreError::Unavailable(
                format!("memcached did not answer within {:?}", self.timeout).into(),
            )),
            Ok(result) => result.map_err(classify),
        };
        if let Err(StoreError::Unavailable(_)) = &result {
            self.resets.fetch_add(1, Ordering::Relaxed);
        }
        result
    }
}

impl MemcachedStore {
    /// Whether `a` and `b` live on one server.
    fn one_server(&self, a: &StoreKey, b: &StoreKey) -> bool {
        self.names.len() == 1
            || place(a.as_str().as_bytes(), &self.names)
                == place(b.as_str().as_bytes(), &self.names)
    }

    /// `first` then `second`, in the batch being formed; each one's own result.
    async fn pair(
        &self,
        first: Op,
        second: Op,
    ) -> Result<[Result<OpResult, StoreError>; 2], StoreError> {
        let results = self.call(|c| c.run(vec![first, second])).await?;
        let mut results = results.into_iter().map(|r| r.map_err(classify));
        match (results.next(), results.next()) {
            (Some(a), Some(b)) => {
                // The connection failed within the exchange: counted as `call` counts one
                // that failed before it.
                if [&a, &b]
                    .iter()
                    .any(|r| matches!(r, Err(StoreError::Unavailable(_))))
                {
                    self.resets.fetch_add(1, Ordering::Relaxed);
                }
                Ok([a, b])
            }
            _ => Err(StoreError::Protocol(
                "memcached: a batch answer is missing".into(),
            )),
        }
    }
}

/// A batch answered with a result of the wrong kind.
fn unexpected(result: &OpResult) -> StoreError {
    StoreError::Protocol(format!("memcached: unexpected answer {result:?}"))
}

/// The client, and the batch being formed.
struct Connected {
    client: AsyncMetaClient,
    /// Commands waiting for the batch; empty when none is forming.
    forming: Arc<Mutex<Vec<Pending>>>,
}

/// One caller's commands waiting for their batch: kept together and in order.
struct Pending {
    ops: Vec<Op>,
    reply: oneshot::Sender<Answers>,
}

/// Each command's own result, in order; the outer error when the batch was refused
/// before anything was sent.
type Answers = Result<Vec<Result<OpResult, McError>>, McError>;

impl Connected {
    /// Runs `ops` in the batch being formed, or in a new one: one pipelined exchange per
    /// server for every caller's commands, each caller's in its order.
    async fn run(&self, ops: Vec<Op>) -> Answers {
        if ops.is_empty() {
            return Ok(Vec::new());
        }
        let count = ops.len();
        let (reply, answer) = oneshot::channel();
        let leads = {
            let mut forming = self.forming.lock().unwrap_or_else(PoisonError::into_inner);
            forming.push(Pending { ops, reply });
            forming.len() == 1
        };
        if leads {
            // In a task of its own, so that a caller that goes away here (its client hung
            // up, its deadline passed) cannot leave the batch forming for ever: let the
            // callers that are ready now join, then send them all.
            let (client, forming) = (self.client.clone(), self.forming.clone());
            tokio::spawn(async move {
                tokio::task::yield_now().await;
                let batch =
                    std::mem::take(&mut *forming.lock().unwrap_or_else(PoisonError::into_inner));
                send_batch(client, batch).await;
            });
        }
        let answers = answer
            .await
            .map_err(|_| McError::Protocol("a batch was abandoned".into()))??;
        if answers.len() != count {
            return Err(McError::Protocol("a batch answer is missing".into()));
        }
        Ok(answers)
    }

    /// The values of `keys`, in order.
    async fn lookup(&self, keys: &[StoreKey]) -> Result<Vec<Option<Bytes>>, McError> {
        let ops = keys.iter().map(|k| Op::Get(Get::new(k.as_str()))).collect();
        self.run(ops)
            .await?
            .into_iter()
            .map(|result| match result? {
                OpResult::Get(found) => Ok(hit(found)),
                other => Err(McError::Protocol(format!("unexpected answer {other:?}"))),
            })
            .collect()
    }
}

/// One pipelined exchange per server for `batch`, each caller's results to it.
async fn send_batch(client: AsyncMetaClient, batch: Vec<Pending>) {
    let mut ops = Vec::new();
    let mut waiting = Vec::with_capacity(batch.len());
    for Pending { ops: mine, reply } in batch {
        // Callers that gave up (their deadline passed) are not sent.
        if !reply.is_closed() {
            waiting.push((mine.len(), reply));
            ops.extend(mine);
        }
    }
    if ops.is_empty() {
        return;
    }
    match client.run_batch(ops).await {
        Ok(results) => {
            let mut results = results.into_iter();
            for (count, reply) in waiting {
                let _ = reply.send(Ok(results.by_ref().take(count).collect()));
            }
        }
        Err(e) => {
            // Refused before anything was sent: a command the protocol cannot carry,
            // which `StoreKey`'s rules and the size check rule out. Every caller of the
            // batch is told, none left waiting.
            for (_, reply) in waiting {
                let _ = reply.send(Err(McError::Protocol(e.to_string())));
            }
        }
    }
}

/// The value of a lookup that found one.
fn hit(found: GetResult) -> Option<Bytes> {
    found
        .value
        .filter(|_| found.status == GetStatus::Hit)
        .map(Bytes::from)
}

fn classify(e: McError) -> StoreError {
    match e {
        // The server answered, with a refusal: not a transport failure.
        McError::Ambiguous { source, .. }
            if !matches!(*source, McError::Io(_) | McError::Timeout { .. }) =>
        {
            classify(*source)
        }
        McError::Server(m) if m.contains("too large") => StoreError::TooLarge { size: 0, max: 0 },
        e @ (McError::Io(_) | McError::Timeout { .. } | McError::Ambiguous { .. }) => {
            StoreError::Unavailable(Cause::context("memcached", e))
        }
        other => StoreError::Protocol(format!("memcached: {other}")),
    }
}

/// memcached's expiry: whole seconds, 0 = never; beyond 30 days a Unix time.
fn expiry(ttl: Duration) -> u32 {
    let secs = ceil_secs(ttl);
    let secs = if secs > MAX_RELATIVE_EXPIRY {
        tessera_protocol::time::now_ms() / 1000 + secs
    } else {
        secs
    };
    u32::try_from(secs).unwrap_or(u32::MAX)
}

#[async_trait]
impl Store for MemcachedStore {
    fn reconnects(&self) -> u64 {
        self.resets.load(Ordering::Relaxed)
    }

    async fn get(&self, key: &StoreKey) -> Result<Option<Bytes>, StoreError> {
        let mut values = self.call(|c| c.lookup(std::slice::from_ref(key))).await?;
        Ok(values.pop().flatten())
    }

    async fn get_many(&self, keys: &[StoreKey]) -> Result<HashMap<StoreKey, Bytes>, StoreError> {
        // Each key joins the batch being formed, with the lookups of other callers.
        let values = self.call(|c| c.lookup(keys)).await?;
        Ok(keys
            .iter()
            .zip(values)
            .filter_map(|(key, value)| Some((key.clone(), value?)))
            .collect())
    }

    async fn add(&self, key: &StoreKey, value: &[u8], ttl: Duration) -> Result<bool, StoreError> {
        check_size(value, self.max_item_size)?;
        let result = self
            .call(|c| {
                c.client
                    .set(key.as_str(), value)
                    .add()
                    .ttl_raw(expiry(ttl))
                    .send()
            })
            .await
            .map(|r| r.status == MutationStatus::Applied);
        too_large(result, value.len(), self.max_item_size)
    }

    async fn set(&self, key: &StoreKey, value: &[u8], ttl: Duration) -> Result<(), StoreError> {
        check_size(value, self.max_item_size)?;
        let result = self
            .call(|c| {
                c.client
                    .set(key.as_str(), value)
                    .ttl_raw(expiry(ttl))
                    .send()
            })
            .await
            .and_then(|r| match r.status {
                MutationStatus::Applied => Ok(()),
                other => Err(StoreError::Protocol(format!("memcached set: {other:?}"))),
            });
        too_large(result, value.len(), self.max_item_size)
    }

    async fn add_then_get(
        &self,
        key: &StoreKey,
        value: &[u8],
        ttl: Duration,
        then: &StoreKey,
    ) -> Result<Option<Option<Bytes>>, StoreError> {
        check_size(value, self.max_item_size)?;
        if !self.one_server(key, then) {
            return add_then_get_in_turn(self, key, value, ttl, then).await;
        }
        // One server handles a connection's commands in order: the get runs after the add.
        let add = Set::new(key.as_str(), value).add().ttl_raw(expiry(ttl));
        let [added, read] = self
            .pair(Op::Set(add), Op::Get(Get::new(then.as_str())))
            .await?;
        let added = match too_large(added, value.len(), self.max_item_size)? {
            OpResult::Mutation(m) => m.status == MutationStatus::Applied,
            other => return Err(unexpected(&other)),
        };
        if !added {
            return Ok(None);
        }
        match read? {
            OpResult::Get(found) => Ok(Some(hit(found))),
            other => Err(unexpected(&other)),
        }
    }

    async fn set_then_delete(
        &self,
        key: &StoreKey,
        value: &[u8],
        ttl: Duration,
        then: &StoreKey,
    ) -> Result<Result<bool, StoreError>, StoreError> {
        check_size(value, self.max_item_size)?;
        if !self.one_server(key, then) {
            return set_then_delete_in_turn(self, key, value, ttl, then).await;
        }
        let set = Set::new(key.as_str(), value).ttl_raw(expiry(ttl));
        let [stored, deleted] = self
            .pair(Op::Set(set), Op::Delete(Delete::new(then.as_str())))
            .await?;
        match too_large(stored, value.len(), self.max_item_size)? {
            OpResult::Mutation(m) if m.status == MutationStatus::Applied => {}
            other => return Err(unexpected(&other)),
        }
        Ok(deleted.and_then(|r| match r {
            OpResult::Mutation(m) => Ok(m.status == MutationStatus::Applied),
            other => Err(unexpected(&other)),
        }))
    }

    async fn delete(&self, key: &StoreKey) -> Result<bool, StoreError> {
        self.call(|c| c.client.delete(key.as_str()).send())
            .await
            .map(|r| r.status == MutationStatus::Applied)
    }

    async fn incr(&self, key: &StoreKey, delta: u64) -> Result<Option<u64>, StoreError> {
        let r = self
            .call(|c| c.client.increment(key.as_str()).delta(delta).send())
            .await?;
        Ok(match r.status {
            MutationStatus::Applied => r.value,
            _ => None,
        })
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.call(|c| c.client.noop()).await
    }
}

/// memcached's own size refusal, reported with the real sizes.
fn too_large<T>(result: Result<T, StoreError>, size: usize, max: usize) -> Result<T, StoreError> {
    match result {
        Err(StoreError::TooLarge { .. }) => Err(StoreError::TooLarge { size, max }),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn servers(n: u16) -> Vec<String> {
        (0..n).map(|i| format!("10.0.0.{i}:11211")).collect()
    }

    #[test]
    fn placement_is_fixed_by_definition() {
        // FNV-1a reference values (draft-eastlake-fnv).
        assert_eq!(fnv1a64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a64(b"foobar"), 0x8594_4171_f739_67e8);
        // Pinned: a change here is a cold start for every deployment.
        let three = servers(3);
        let placed: Vec<usize> = ["a", "b", "c", "tessera:f:x", "foobar"]
            .iter()
            .map(|k| place(k.as_bytes(), &three))
            .collect();
        // Computed independently (a Python transcription of `place`).
        assert_eq!(placed, [1, 2, 0, 1, 2]);
        assert_eq!(place(b"k", &servers(1)), 0);
    }

    #[test]
    fn growing_from_four_to_five_servers_moves_about_a_fifth_of_keys() {
        let (four, five) = (servers(4), servers(5));
        let mut counts = [0usize; 5];
        let mut moved = 0;
        for n in 0..10_000 {
            let key = format!("tessera:f:route:{n}");
            let (before, after) = (place(key.as_bytes(), &four), place(key.as_bytes(), &five));
            counts[after] += 1;
            if before != after {
                assert_eq!(after, 4, "a key only ever moves to the new server");
                moved += 1;
            }
        }
        // The new server wins about 1/5 (2,000); `% n` would move about 4/5.
        assert!(
            (1_700..=2_300).contains(&moved),
            "{moved} of 10,000 keys moved"
        );
        for c in counts {
            assert!((1_700..=2_300).contains(&c), "unbalanced: {counts:?}");
        }
        // The order of the list does not matter.
        let mut shuffled = five.clone();
        shuffled.reverse();
        for n in 0..1_000 {
            let key = format!("k{n}");
            assert_eq!(
                five[place(key.as_bytes(), &five)],
                shuffled[place(key.as_bytes(), &shuffled)]
            );
        }
    }

    #[test]
    fn a_lease_is_placed_with_its_envelope_and_nothing_else_moves() {
        let five = servers(5);
        let mut spread = [0usize; 5];
        for n in 0..1_000 {
            let envelope = format!("ns-1:f:recs:7:{n:032x}");
            let lease = format!("ns-1:p:recs:7:{n:032x}");
            let at = place(envelope.as_bytes(), &five);
            assert_eq!(place(lease.as_bytes(), &five), at, "{lease}");
            spread[at] += 1;
        }
        assert!(spread.iter().all(|&c| c > 100), "unbalanced: {spread:?}");
        // Only the kind right after the namespace is read: other keys place as themselves.
        assert_eq!(placed_as(b"ns:t:a:p:b"), [&b"ns:t:a:p:b"[..], b"", b""]);
        assert_eq!(placed_as(b"ns:p:x"), [&b"ns"[..], b":f:", b"x"]);
    }

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
