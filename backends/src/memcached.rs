//! The shared store on memcached: the meta protocol as `memcache::exp` builds and parses
//! it, over connections of our own (`pipeline`).
//!
//! Promises, beyond the [`Store`] contract:
//! - **Never blocks a runtime thread, no thread hop.** Calls are tokio I/O on long-lived
//!   connections, each bounded by `store.timeout`.
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
//!   thread (at most one per core), whatever the load. A memcached that stops answering fails each call at
//!   `store.timeout`, and the connection with it; nothing is spawned per call, so
//!   nothing piles up.
//! - **Recovery.** A connection that fails (the server restarted or stopped answering)
//!   fails what was in flight on it; the next call dials anew, without a pool rebuild.
//!   Start-up never waits for a server: names are resolved and servers dialed on first
//!   use.
//! - **`incr` never creates** (the meta `ma` command without `N` answers `NF`).
//! - **TTLs over 30 days** are sent as Unix times (this host's clock), since memcached reads
//!   any expiration above 30 days as one.

mod pipeline;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use memcache::exp::{
    ArithmeticOptions, DeleteOptions, Error as McError, GetOptions, MetaCommand, ReturnCode,
    SetMode, SetOptions, build_arithmetic, build_delete, build_get, build_noop, build_set,
};

use tessera_protocol::Cause;
use tessera_protocol::config::MemcachedServer;
use tessera_protocol::key::{StoreKey, placed_as};
use tessera_protocol::store::{
    Store, StoreError, add_then_get_in_turn, check_size, set_then_delete_in_turn,
};
use tessera_protocol::time::ceil_secs;

use pipeline::{Answers, Reply, Server};

pub use pipeline::{LINES, home};

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

/// memcached, as a [`Store`].
pub struct MemcachedStore {
    /// Each server's connections, in configuration order.
    servers: Vec<Server>,
    /// `host:port` of each server, as configured: the placement's identities.
    names: Vec<String>,
    timeout: Duration,
    max_item_size: usize,
    /// Calls that failed on the connection (each failed it; the next call dials anew).
    resets: AtomicU64,
}

impl std::fmt::Debug for MemcachedStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemcachedStore")
            .field("servers", &self.names)
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
            names: servers.iter().map(|(h, p)| format!("{h}:{p}")).collect(),
            servers: servers
                .into_iter()
                .map(|(host, port)| Server::new(host, port, timeout))
                .collect(),
            timeout,
            max_item_size,
            resets: AtomicU64::new(0),
        })
    }

    /// The index of `key`'s server.
    fn server_of(&self, key: &StoreKey) -> usize {
        if self.servers.len() == 1 {
            0
        } else {
            place(key.as_str().as_bytes(), &self.names)
        }
    }

    /// Runs `commands` under the deadline: one pipelined exchange per server, each
    /// server's commands in their order. Each command's own answer, or the error that
    /// failed them all.
    async fn run(
        &self,
        commands: Vec<(&StoreKey, MetaCommand)>,
    ) -> Result<Vec<Result<Reply, McError>>, StoreError> {
        let commands = &commands;
        self.deadline(async {
            let all = || commands.iter().map(|(_, c)| c);
            if self.servers.len() == 1 {
                return self.exchange(0, all()).await;
            }
            let placed: Vec<usize> = commands.iter().map(|(k, _)| self.server_of(k)).collect();
            let first = placed.first().copied().unwrap_or(0);
            if placed.iter().all(|&s| s == first) {
                // All on one server (a pair, a single key): one exchange, answers in order.
                return self.exchange(first, all()).await;
            }
            let mut groups: Vec<Vec<usize>> = vec![Vec::new(); self.servers.len()];
            for (n, &server) in placed.iter().enumerate() {
                groups[server].push(n);
            }
            let exchanges = groups
                .iter()
                .enumerate()
                .filter(|(_, group)| !group.is_empty())
                .map(|(server, group)| async move {
                    let answers = self
                        .exchange(server, group.iter().map(|&n| &commands[n].1))
                        .await?;
                    Ok::<_, McError>(group.iter().copied().zip(answers))
                });
            let mut answers: Vec<Option<Result<Reply, McError>>> =
                commands.iter().map(|_| None).collect();
            for exchanged in futures_util::future::join_all(exchanges).await {
                for (n, answer) in exchanged? {
                    answers[n] = Some(answer);
                }
            }
            answers
                .into_iter()
                .map(|a| a.ok_or_else(|| McError::Protocol("an answer is missing".into())))
                .collect::<Answers>()
        })
        .await
    }

    /// `call` bounded by `store.timeout`, its errors mapped; a call that failed on the
    /// connection is counted.
    async fn deadline<T>(
        &self,
        call: impl Future<Output = Result<T, McError>>,
    ) -> Result<T, StoreError> {
        let result = match tokio::time::timeout(self.timeout, call).await {
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

    /// `commands` as one exchange on server `server`: each one's answer, in order (the
    /// connection hands back exactly one per command).
    async fn exchange(
        &self,
        server: usize,
        commands: impl ExactSizeIterator<Item = &MetaCommand>,
    ) -> Answers {
        let count = commands.len();
        // Room for the usual command (a key and a few flags) without growing; a set's
        // value grows it once.
        let mut payload = Vec::with_capacity(count * 128);
        for command in commands {
            command.encode_into(&mut payload)?;
        }
        self.servers[server].exchange(payload, count).await
    }

    /// The one command's answer.
    async fn one(&self, key: &StoreKey, command: MetaCommand) -> Result<Reply, StoreError> {
        let mut answers = self.run(vec![(key, command)]).await?;
        answers
            .pop()
            .ok_or_else(|| StoreError::Protocol("memcached: an answer is missing".into()))?
            .map_err(classify)
    }

    /// `first` then `second` (on one server), each one's own answer.
    async fn pair(
        &self,
        first: (&StoreKey, MetaCommand),
        second: (&StoreKey, MetaCommand),
    ) -> Result<[Result<Reply, StoreError>; 2], StoreError> {
        let mut answers = self.run(vec![first, second]).await?.into_iter();
        match (answers.next(), answers.next()) {
            (Some(a), Some(b)) => Ok([a.map_err(classify), b.map_err(classify)]),
            _ => Err(StoreError::Protocol(
                "memcached: an answer is missing".into(),
            )),
        }
    }
}

/// `mg <key> v`: the value, or a miss.
fn get_command(key: &StoreKey) -> Result<MetaCommand, StoreError> {
    build_get(key.as_str(), &GetOptions::default()).map_err(classify)
}

/// `ms <key> <size> T<ttl>`, with `ME` (add: only if absent) when `add`.
fn set_command(
    key: &StoreKey,
    value: &[u8],
    ttl: Duration,
    add: bool,
) -> Result<MetaCommand, StoreError> {
    let mut options = SetOptions::default();
    options.ttl = Some(expiry(ttl));
    if add {
        options.mode = SetMode::Add;
    }
    build_set(key.as_str(), value, &options).map_err(classify)
}

/// `md <key>`.
fn delete_command(key: &StoreKey) -> Result<MetaCommand, StoreError> {
    build_delete(key.as_str(), &DeleteOptions::default()).map_err(classify)
}

/// A lookup's value: `VA` is a hit, `EN` a miss.
fn found(reply: Reply) -> Result<Option<Bytes>, StoreError> {
    match reply.rc {
        ReturnCode::Va => Ok(reply.value),
        ReturnCode::En => Ok(None),
        _ => Err(unexpected(&reply)),
    }
}

/// Whether a write was applied: `HD`, or `NS` / `NF` when it was not.
fn applied(reply: Reply) -> Result<bool, StoreError> {
    match reply.rc {
        ReturnCode::Hd => Ok(true),
        ReturnCode::Ns | ReturnCode::Nf => Ok(false),
        _ => Err(unexpected(&reply)),
    }
}

/// An answer of the wrong kind.
fn unexpected(reply: &Reply) -> StoreError {
    StoreError::Protocol(format!("memcached: unexpected answer {:?}", reply.rc))
}

fn classify(e: McError) -> StoreError {
    match e {
        McError::Server(m) if m.contains("too large") => StoreError::TooLarge { size: 0, max: 0 },
        // The connection failed, or the server did not answer (see `pipeline`).
        e @ McError::Io(_) => StoreError::Unavailable(Cause::context("memcached", e)),
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
        found(self.one(key, get_command(key)?).await?)
    }

    async fn get_many(&self, keys: &[StoreKey]) -> Result<HashMap<StoreKey, Bytes>, StoreError> {
        let commands = keys
            .iter()
            .map(|k| Ok((k, get_command(k)?)))
            .collect::<Result<Vec<_>, StoreError>>()?;
        let answers = self.run(commands).await?;
        let mut values = HashMap::with_capacity(keys.len());
        for (key, answer) in keys.iter().zip(answers) {
            if let Some(value) = found(answer.map_err(classify)?)? {
                values.insert(key.clone(), value);
            }
        }
        Ok(values)
    }

    async fn add(&self, key: &StoreKey, value: &[u8], ttl: Duration) -> Result<bool, StoreError> {
        check_size(value, self.max_item_size)?;
        let reply = self.one(key, set_command(key, value, ttl, true)?).await;
        too_large(reply.and_then(applied), value.len(), self.max_item_size)
    }

    async fn set(&self, key: &StoreKey, value: &[u8], ttl: Duration) -> Result<(), StoreError> {
        check_size(value, self.max_item_size)?;
        let reply = self.one(key, set_command(key, value, ttl, false)?).await;
        let stored = reply.and_then(|r| match r.rc {
            ReturnCode::Hd => Ok(()),
            _ => Err(unexpected(&r)),
        });
        too_large(stored, value.len(), self.max_item_size)
    }

    async fn add_then_get(
        &self,
        key: &StoreKey,
        value: &[u8],
        ttl: Duration,
        then: &StoreKey,
    ) -> Result<Option<Option<Bytes>>, StoreError> {
        check_size(value, self.max_item_size)?;
        if self.server_of(key) != self.server_of(then) {
            return add_then_get_in_turn(self, key, value, ttl, then).await;
        }
        // One connection carries an exchange's commands in order: the get runs after the
        // add.
        let [added, read] = self
            .pair(
                (key, set_command(key, value, ttl, true)?),
                (then, get_command(then)?),
            )
            .await?;
        if !too_large(added.and_then(applied), value.len(), self.max_item_size)? {
            return Ok(None);
        }
        Ok(Some(found(read?)?))
    }

    async fn set_then_delete(
        &self,
        key: &StoreKey,
        value: &[u8],
        ttl: Duration,
        then: &StoreKey,
    ) -> Result<Result<bool, StoreError>, StoreError> {
        check_size(value, self.max_item_size)?;
        if self.server_of(key) != self.server_of(then) {
            return set_then_delete_in_turn(self, key, value, ttl, then).await;
        }
        let [stored, deleted] = self
            .pair(
                (key, set_command(key, value, ttl, false)?),
                (then, delete_command(then)?),
            )
            .await?;
        match too_large(stored, value.len(), self.max_item_size)? {
            r if r.rc == ReturnCode::Hd => {}
            other => return Err(unexpected(&other)),
        }
        Ok(deleted.and_then(applied))
    }

    async fn delete(&self, key: &StoreKey) -> Result<bool, StoreError> {
        applied(self.one(key, delete_command(key)?).await?)
    }

    async fn incr(&self, key: &StoreKey, delta: u64) -> Result<Option<u64>, StoreError> {
        let mut options = ArithmeticOptions::default();
        options.delta = Some(delta);
        let command = build_arithmetic(key.as_str(), &options).map_err(classify)?;
        let reply = self.one(key, command).await?;
        match (reply.rc, &reply.value) {
            (ReturnCode::Va, Some(digits)) => std::str::from_utf8(digits)
                .ok()
                .and_then(|d| d.trim().parse().ok())
                .map(Some)
                .ok_or_else(|| StoreError::Protocol("memcached: a bad counter value".into())),
            (ReturnCode::Nf, _) => Ok(None),
            _ => Err(unexpected(&reply)),
        }
    }

    async fn ping(&self) -> Result<(), StoreError> {
        let noop = build_noop();
        for server in 0..self.servers.len() {
            let mut answers = self
                .deadline(self.exchange(server, std::iter::once(&noop)))
                .await?;
            match answers.pop() {
                Some(Ok(r)) if r.rc == ReturnCode::Mn => {}
                Some(Ok(r)) => return Err(unexpected(&r)),
                Some(Err(e)) => return Err(classify(e)),
                None => return Err(StoreError::Protocol("memcached: no answer to mn".into())),
            }
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
