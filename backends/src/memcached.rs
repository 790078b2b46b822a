//! The shared store on memcached (crate `memcache`, binary protocol).
//!
//! Promises, beyond the [`Store`] contract:
//! - **Never blocks a runtime thread.** The `memcache` client is blocking; every call runs
//!   on tokio's blocking pool and is bounded by `store.timeout` (plus socket read/write
//!   timeouts of the same length, so blocked threads do not pile up).
//! - **Stable placement.** Each key goes to `servers[fnv1a64(key) % n]`, the same in every
//!   process and every build (the crate's default uses std's `DefaultHasher`, which is not
//!   stable across Rust releases). Changing the server list remaps keys: a cold start, not
//!   an error.
//! - **One pool per server**, sized for the expected concurrency, without the extra round
//!   trip r2d2 makes to test each connection on check-out.
//! - **Recovery.** The crate never marks a pooled connection broken, so after memcached
//!   restarts every pooled connection would fail forever. A server whose call fails with
//!   an I/O or pool error gets a fresh pool (at most once per [`REBUILD_EVERY`]); calls
//!   fail with [`StoreError::Unavailable`] meanwhile. Start-up never waits for a server.
//! - **`incr` never creates.** The crate's binary `incr` asks memcached to create an absent
//!   key at 0 (it sends expiration 0, not `0xffffffff`), so `incr` goes over a small
//!   second pool in the ASCII protocol, whose `incr` answers `NOT_FOUND` instead.
//! - **TTLs over 30 days** are sent as Unix times (this host's clock), since memcached reads
//!   any expiration above 30 days as one.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use memcache::{Client, CommandError, ConnectionManager, MemcacheError, Url};

use tessera_protocol::Cause;
use tessera_protocol::config::MemcachedServer;
use tessera_protocol::key::StoreKey;
use tessera_protocol::store::{Store, StoreError, check_size};
use tessera_protocol::time::ceil_secs;

/// Connections per server.
pub const POOL_SIZE: u32 = 32;
/// ASCII-protocol connections per server, for `incr` (generation bumps only).
pub const COUNTER_POOL_SIZE: u32 = 2;
/// Longest expiration memcached reads as relative seconds.
const MAX_RELATIVE_EXPIRY: u64 = 30 * 24 * 3600;
/// Least time between two pool rebuilds for one server.
pub const REBUILD_EVERY: Duration = Duration::from_millis(500);

/// 64-bit FNV-1a: fixed by its definition, so placement never changes between builds.
pub fn fnv1a64(key: &str) -> u64 {
    key.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

struct Server {
    url: Url,
    /// `url` in the ASCII protocol, for `incr`.
    ascii: Url,
    client: RwLock<Arc<Client>>,
    counter: RwLock<Arc<Client>>,
    rebuilt: Mutex<Instant>,
}

/// memcached, as a [`Store`].
pub struct MemcachedStore {
    servers: Vec<Server>,
    timeout: Duration,
    max_item_size: usize,
    /// Pool resets after connection failures.
    resets: std::sync::atomic::AtomicU64,
}

impl std::fmt::Debug for MemcachedStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let urls: Vec<_> = self.servers.iter().map(|s| s.url.as_str()).collect();
        f.debug_struct("MemcachedStore")
            .field("servers", &urls)
            .finish()
    }
}

fn pool(url: &Url, size: u32, timeout: Duration) -> Result<Arc<Client>, StoreError> {
    let pool = r2d2::Pool::builder()
        .max_size(size)
        .min_idle(Some(0))
        .test_on_check_out(false)
        .connection_timeout(timeout)
        // Unchecked: start-up never waits for a server that is down.
        .build_unchecked(ConnectionManager::new(url.clone()));
    Client::with_pool(pool)
        .map(Arc::new)
        .map_err(|e| StoreError::Protocol(format!("memcached client: {e}")))
}

impl MemcachedStore {
    /// A store over `servers` (parsed at config load), with the given per-call deadline
    /// and item limit. Does no I/O: servers that are down are connected to on first use.
    pub fn new(
        servers: &[MemcachedServer],
        timeout: Duration,
        max_item_size: usize,
    ) -> Result<Self, StoreError> {
        let secs = timeout.as_secs_f64();
        let servers = servers
            .iter()
            .map(|s| {
                let url = Url::parse(&format!("memcache://{s}?timeout={secs}&tcp_nodelay=true"))
                    .map_err(|e| {
                        StoreError::Protocol(format!(
                            "bad memcached address {:?}: {e}",
                            s.to_string()
                        ))
                    })?;
                let mut ascii = url.clone();
                ascii.query_pairs_mut().append_pair("protocol", "ascii");
                Ok(Server {
                    client: RwLock::new(pool(&url, POOL_SIZE, timeout)?),
                    counter: RwLock::new(pool(&ascii, COUNTER_POOL_SIZE, timeout)?),
                    url,
                    ascii,
                    rebuilt: Mutex::new(Instant::now()),
                })
            })
            .collect::<Result<Vec<_>, StoreError>>()?;
        if servers.is_empty() {
            return Err(StoreError::Protocol(
                "no memcached servers configured".into(),
            ));
        }
        Ok(Self {
            servers,
            timeout,
            max_item_size,
            resets: std::sync::atomic::AtomicU64::new(0),
        })
    }

    fn server_of(&self, key: &str) -> usize {
        // The modulo of a u64 by a small count always fits in usize.
        usize::try_from(fnv1a64(key) % self.servers.len() as u64).unwrap_or(0)
    }

    /// Runs `op` against server `i` on the blocking pool, under the deadline.
    async fn call<T, F>(&self, i: usize, op: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Client) -> Result<T, MemcacheError> + Send + 'static,
    {
        self.call_on(i, false, op).await
    }

    /// Like [`Self::call`], on the ASCII pool when `counter`.
    async fn call_on<T, F>(&self, i: usize, counter: bool, op: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Client) -> Result<T, MemcacheError> + Send + 'static,
    {
        let server = &self.servers[i];
        let client = if counter {
            &server.counter
        } else {
            &server.client
        }
        .read()
        .unwrap_or_else(PoisonError::into_inner)
        .clone();
        let task = tokio::task::spawn_blocking(move || op(&client));
        let result = match tokio::time::timeout(self.timeout, task).await {
            Err(_) => Err(StoreError::Unavailable(
                format!(
                    "{} did not answer within {:?}",
                    server.url.host_str().unwrap_or("memcached"),
                    self.timeout
                )
                .into(),
            )),
            Ok(Err(join)) => Err(StoreError::Unavailable(Cause::context(
                "store call failed",
                join,
            ))),
            Ok(Ok(result)) => result.map_err(|e| classify(&server.url, e)),
        };
        if let Err(StoreError::Unavailable(_)) = &result {
            self.rebuild(i);
        }
        result
    }

    /// Replaces a server's pool after a connection-level failure (rate limited).
    fn rebuild(&self, i: usize) {
        let server = &self.servers[i];
        let mut last = server
            .rebuilt
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if last.elapsed() < REBUILD_EVERY {
            return;
        }
        *last = Instant::now();
        match pool(&server.url, POOL_SIZE, self.timeout)
            .and_then(|c| Ok((c, pool(&server.ascii, COUNTER_POOL_SIZE, self.timeout)?)))
        {
            Ok((fresh, counter)) => {
                *server
                    .client
                    .write()
                    .unwrap_or_else(PoisonError::into_inner) = fresh;
                *server
                    .counter
                    .write()
                    .unwrap_or_else(PoisonError::into_inner) = counter;
                self.resets
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            Err(e) => tracing::warn!(error = %e, "could not reset memcached connections"),
        }
        tracing::info!(server = %server.url.host_str().unwrap_or("?"), "memcached connections reset");
    }
}

fn classify(url: &Url, e: MemcacheError) -> StoreError {
    let server = url.host_str().unwrap_or("memcached");
    match e {
        MemcacheError::IOError(e) => StoreError::Unavailable(Cause::context(server, e)),
        MemcacheError::PoolError(e) => StoreError::Unavailable(Cause::context(server, e)),
        MemcacheError::CommandError(CommandError::ValueTooLarge) => {
            StoreError::TooLarge { size: 0, max: 0 }
        }
        other => StoreError::Protocol(format!("{server}: {other}")),
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
        self.resets.load(std::sync::atomic::Ordering::Relaxed)
    }

    async fn get(&self, key: &StoreKey) -> Result<Option<Bytes>, StoreError> {
        let k = key.as_str().to_string();
        self.call(self.server_of(&k), move |c| c.get::<Vec<u8>>(&k))
            .await
            .map(|v| v.map(Bytes::from))
    }

    async fn get_many(&self, keys: &[StoreKey]) -> Result<HashMap<StoreKey, Bytes>, StoreError> {
        let mut by_server: HashMap<usize, Vec<&StoreKey>> = HashMap::new();
        for k in keys {
            by_server
                .entry(self.server_of(k.as_str()))
                .or_default()
                .push(k);
        }
        // One multi-get per server, all servers at once.
        let calls = by_server.into_iter().map(|(i, ks)| {
            let names: Vec<String> = ks.iter().map(|k| k.as_str().to_string()).collect();
            async move {
                self.call(i, move |c| {
                    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
                    c.gets::<Vec<u8>>(&refs)
                })
                .await
            }
        });
        let mut out = HashMap::new();
        for found in futures_util::future::join_all(calls).await {
            for (k, v) in found? {
                if let Some(key) = keys.iter().find(|key| key.as_str() == k) {
                    out.insert(key.clone(), Bytes::from(v));
                }
            }
        }
        Ok(out)
    }

    async fn add(&self, key: &StoreKey, value: &[u8], ttl: Duration) -> Result<bool, StoreError> {
        check_size(value, self.max_item_size)?;
        let (k, v, exp) = (key.as_str().to_string(), value.to_vec(), expiry(ttl));
        let result = self
            .call(self.server_of(&k), move |c| {
                match c.add(&k, v.as_slice(), exp) {
                    Ok(()) => Ok(true),
                    Err(MemcacheError::CommandError(CommandError::KeyExists)) => Ok(false),
                    Err(e) => Err(e),
                }
            })
            .await;
        too_large(result, value.len(), self.max_item_size)
    }

    async fn set(&self, key: &StoreKey, value: &[u8], ttl: Duration) -> Result<(), StoreError> {
        check_size(value, self.max_item_size)?;
        let (k, v, exp) = (key.as_str().to_string(), value.to_vec(), expiry(ttl));
        let result = self
            .call(self.server_of(&k), move |c| c.set(&k, v.as_slice(), exp))
            .await;
        too_large(result, value.len(), self.max_item_size)
    }

    async fn delete(&self, key: &StoreKey) -> Result<bool, StoreError> {
        let k = key.as_str().to_string();
        self.call(self.server_of(&k), move |c| c.delete(&k)).await
    }

    async fn incr(&self, key: &StoreKey, delta: u64) -> Result<Option<u64>, StoreError> {
        let k = key.as_str().to_string();
        self.call_on(self.server_of(&k), true, move |c| {
            match c.increment(&k, delta) {
                Ok(v) => Ok(Some(v)),
                Err(MemcacheError::CommandError(CommandError::KeyNotFound)) => Ok(None),
                Err(e) => Err(e),
            }
        })
        .await
    }

    async fn ping(&self) -> Result<(), StoreError> {
        for i in 0..self.servers.len() {
            self.call(i, |c| c.version().map(|_| ())).await?;
        }
        Ok(())
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

    #[test]
    fn placement_is_fixed_by_definition() {
        // FNV-1a reference values (draft-eastlake-fnv).
        assert_eq!(fnv1a64(""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64("a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a64("foobar"), 0x8594_4171_f739_67e8);
        let store = MemcachedStore::new(
            &[
                "127.0.0.1:1".parse().unwrap(),
                "127.0.0.1:2".parse().unwrap(),
                "127.0.0.1:3".parse().unwrap(),
            ],
            Duration::from_millis(100),
            1024,
        )
        .unwrap();
        assert_eq!(
            store.server_of("foobar"),
            (0x8594_4171_f739_67e8u64 % 3) as usize
        );
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
