//! What every `Store` promises (see `tessera_protocol::store`), as cases run against each
//! implementation by [`store_conformance!`](crate::store_conformance).
//!
//! Cases use the real clock, not `tokio::time::pause()`: memcached expires items on its
//! own clock, and the same case must run on both. TTL cases therefore take a couple of
//! seconds; they wait for outcomes with bounded deadlines and never assert on speed.
//!
//! Cases that only a network store can have (several servers, a server restart) are at
//! the end, on memcached processes of their own; the memory twin has no server to
//! restart or add.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tessera_backends::memcached::{LINES, MemcachedStore};
use tessera_protocol::Config;
use tessera_protocol::backends::item_limit;
use tessera_protocol::config::MemcachedServer;
use tessera_protocol::key::{Keyspace, StoreKey};
use tessera_protocol::store::{MemoryStore, Store, StoreError};

use crate::cluster::{free_port, memcached};
use crate::eventually;
use crate::harness::{memcached_addr, require, unique_namespace};
use crate::servers::all_threads_stopped;

/// One implementation under test, fresh for one case.
#[derive(Debug)]
pub struct StoreUnderTest {
    /// The store.
    pub store: Arc<dyn Store>,
    /// The largest value it was told to accept.
    pub max_item_size: usize,
    /// A namespace no other case uses.
    pub keys: Keyspace,
}

impl StoreUnderTest {
    /// A key of this case's namespace.
    pub fn key(&self, name: &str) -> StoreKey {
        self.keys.generation(name)
    }
}

/// Item limit the cases run with: small enough that a value exactly at the limit fits a
/// memcached started with the default `-I 1m` (see
/// `memcached_only::the_default_item_limit_fits_a_default_memcached`).
pub const TEST_ITEM_LIMIT: usize = 64 * 1024;

/// Per-call deadline for memcached in the cases: generous, since the machines running
/// tests are busy and the cases test semantics, not latency.
pub const TEST_TIMEOUT: Duration = Duration::from_secs(3);

/// The embedded store.
pub fn memory() -> StoreUnderTest {
    StoreUnderTest {
        store: Arc::new(MemoryStore::new(64 << 20, TEST_ITEM_LIMIT)),
        max_item_size: TEST_ITEM_LIMIT,
        keys: Keyspace::new(&unique_namespace()),
    }
}

/// The memcached store on the test memcached (`TESSERA_TEST_MEMCACHED`).
pub fn memcached_store() -> StoreUnderTest {
    let addr = memcached_addr();
    require("memcached", &addr);
    StoreUnderTest {
        store: Arc::new(
            MemcachedStore::new(
                &[addr.parse().expect("a valid address")],
                TEST_TIMEOUT,
                TEST_ITEM_LIMIT,
            )
            .expect("a valid address"),
        ),
        max_item_size: TEST_ITEM_LIMIT,
        keys: Keyspace::new(&unique_namespace()),
    }
}

/// Expands one `#[tokio::test]` per store case, each with a fresh store from `$make`,
/// into the current module. Add a case here and as a function below.
#[macro_export]
macro_rules! store_conformance {
    ($make:expr) => {
        $crate::store_conformance!(
            @cases $make,
            values_round_trip_byte_for_byte,
            set_replaces_and_delete_removes,
            add_only_stores_when_absent,
            add_has_exactly_one_winner_among_100_callers,
            add_then_get_reads_after_the_add_and_set_then_delete_deletes_after_the_set,
            get_many_returns_the_present_keys_only,
            incr_counts_in_decimal_and_never_creates,
            concurrent_updates_lose_nothing,
            ttls_expire_in_whole_seconds_and_zero_never,
            ttls_beyond_30_days_are_durations_too,
            values_up_to_the_limit_fit_and_bigger_ones_fail_whole,
            ping_answers,
        );
    };
    (@cases $make:expr, $($case:ident),+ $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() {
                $crate::conformance::store::$case($make).await;
            }
        )+
    };
}

/// Values are opaque bytes: every byte value, and the empty value, come back as stored.
pub async fn values_round_trip_byte_for_byte(t: StoreUnderTest) {
    let all: Vec<u8> = (0..=255u8).chain([b'\r', b'\n', 0]).collect();
    t.store
        .set(&t.key("bytes"), &all, Duration::ZERO)
        .await
        .unwrap();
    t.store
        .set(&t.key("empty"), b"", Duration::ZERO)
        .await
        .unwrap();
    assert_eq!(
        t.store.get(&t.key("bytes")).await.unwrap().as_deref(),
        Some(&all[..])
    );
    assert_eq!(
        t.store.get(&t.key("empty")).await.unwrap().as_deref(),
        Some(&b""[..]),
        "an empty value is present, not absent"
    );
    assert_eq!(t.store.get(&t.key("never-set")).await.unwrap(), None);
}

/// `set` replaces whatever was there; `delete` says whether there was something.
pub async fn set_replaces_and_delete_removes(t: StoreUnderTest) {
    let k = t.key("k");
    t.store.set(&k, b"one", Duration::ZERO).await.unwrap();
    t.store
        .set(&k, b"two", Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(t.store.get(&k).await.unwrap().as_deref(), Some(&b"two"[..]));
    assert!(t.store.delete(&k).await.unwrap(), "it was there");
    assert_eq!(t.store.get(&k).await.unwrap(), None);
    assert!(!t.store.delete(&k).await.unwrap(), "it was not there");
}

/// `add` stores only when the key is absent, and never touches a present value.
pub async fn add_only_stores_when_absent(t: StoreUnderTest) {
    let k = t.key("lease");
    assert!(t.store.add(&k, b"first", Duration::ZERO).await.unwrap());
    assert!(!t.store.add(&k, b"second", Duration::ZERO).await.unwrap());
    assert_eq!(
        t.store.get(&k).await.unwrap().as_deref(),
        Some(&b"first"[..])
    );
    t.store.delete(&k).await.unwrap();
    assert!(
        t.store.add(&k, b"third", Duration::ZERO).await.unwrap(),
        "absent again after delete"
    );
}

/// Of 100 concurrent `add`s of one absent key exactly one gets `true`, and the value kept
/// is the winner's. This is what makes "exactly one build".
pub async fn add_has_exactly_one_winner_among_100_callers(t: StoreUnderTest) {
    let k = t.key("race");
    let start = Arc::new(tokio::sync::Barrier::new(100));
    let callers: Vec<_> = (0..100u32)
        .map(|i| {
            let (store, k, start) = (t.store.clone(), k.clone(), start.clone());
            tokio::spawn(async move {
                start.wait().await;
                let won = store
                    .add(&k, i.to_string().as_bytes(), Duration::from_secs(30))
                    .await;
                (i, won)
            })
        })
        .collect();
    let mut winners = Vec::new();
    for caller in callers {
        let (i, won) = caller.await.unwrap();
        // Every caller must get an answer: an error would make "one winner" unprovable.
        if won.unwrap_or_else(|e| panic!("caller {i}: {e}")) {
            winners.push(i);
        }
    }
    assert_eq!(winners.len(), 1, "winners: {winners:?}");
    assert_eq!(
        t.store.get(&k).await.unwrap().as_deref(),
        Some(winners[0].to_string().as_bytes()),
        "the value kept is the winner's"
    );
}

/// `add_then_get` reads only when its add stored, and sees what was there before;
/// `set_then_delete` stores and deletes, reporting whether the deleted key was there.
pub async fn add_then_get_reads_after_the_add_and_set_then_delete_deletes_after_the_set(
    t: StoreUnderTest,
) {
    let (lease, envelope) = (t.key("lease"), t.key("envelope"));
    let ttl = Duration::from_secs(30);
    assert_eq!(
        t.store
            .add_then_get(&lease, b"a", ttl, &envelope)
            .await
            .unwrap(),
        Some(None),
        "stored, nothing to read"
    );
    assert_eq!(
        t.store
            .add_then_get(&lease, b"b", ttl, &envelope)
            .await
            .unwrap(),
        None,
        "held: not stored, not read"
    );
    assert!(
        t.store
            .set_then_delete(&envelope, b"built", ttl, &lease)
            .await
            .unwrap()
            .unwrap(),
        "the lease was there"
    );
    assert_eq!(t.store.get(&lease).await.unwrap(), None);
    assert!(
        !t.store
            .set_then_delete(&envelope, b"again", ttl, &lease)
            .await
            .unwrap()
            .unwrap(),
        "the lease was gone"
    );
    assert_eq!(
        t.store
            .add_then_get(&lease, b"c", ttl, &envelope)
            .await
            .unwrap(),
        Some(Some(bytes::Bytes::from_static(b"again")))
    );
    let big = vec![0u8; t.max_item_size + 1];
    assert!(matches!(
        t.store.set_then_delete(&envelope, &big, ttl, &lease).await,
        Err(StoreError::TooLarge { .. })
    ));
    assert_eq!(
        t.store.get(&lease).await.unwrap().as_deref(),
        Some(&b"c"[..]),
        "a value refused before sending deletes nothing"
    );
}

/// `get_many` returns exactly the present keys, with their values; none asked, none
/// returned.
pub async fn get_many_returns_the_present_keys_only(t: StoreUnderTest) {
    let present: Vec<StoreKey> = (0..20).map(|i| t.key(&format!("p{i}"))).collect();
    for (i, k) in present.iter().enumerate() {
        t.store
            .set(k, format!("v{i}").as_bytes(), Duration::ZERO)
            .await
            .unwrap();
    }
    let mut asked = present.clone();
    asked.extend((0..5).map(|i| t.key(&format!("absent{i}"))));
    let got = t.store.get_many(&asked).await.unwrap();
    let want: HashMap<StoreKey, bytes::Bytes> = present
        .iter()
        .enumerate()
        .map(|(i, k)| (k.clone(), bytes::Bytes::from(format!("v{i}"))))
        .collect();
    assert_eq!(got, want);
    assert!(t.store.get_many(&[]).await.unwrap().is_empty());
}

/// `incr` adds to a decimal value and returns the sum, wraps at 2^64 like memcached,
/// creates nothing for an absent key and refuses a value that is not a number.
pub async fn incr_counts_in_decimal_and_never_creates(t: StoreUnderTest) {
    let n = t.key("n");
    t.store.set(&n, b"41", Duration::ZERO).await.unwrap();
    assert_eq!(t.store.incr(&n, 1).await.unwrap(), Some(42));
    assert_eq!(t.store.incr(&n, 8).await.unwrap(), Some(50));
    assert_eq!(t.store.get(&n).await.unwrap().as_deref(), Some(&b"50"[..]));

    let max = t.key("max");
    t.store
        .set(&max, u64::MAX.to_string().as_bytes(), Duration::ZERO)
        .await
        .unwrap();
    assert_eq!(t.store.incr(&max, 1).await.unwrap(), Some(0), "wraps");

    let absent = t.key("absent");
    assert_eq!(t.store.incr(&absent, 1).await.unwrap(), None);
    assert_eq!(t.store.get(&absent).await.unwrap(), None, "nothing created");

    let text = t.key("text");
    t.store.set(&text, b"abc", Duration::ZERO).await.unwrap();
    let r = t.store.incr(&text, 1).await;
    assert!(matches!(r, Err(StoreError::Protocol(_))), "{r:?}");
}

/// `update` is atomic: 50 concurrent updates each adding its number to one list keep all
/// 50; one that changes nothing writes nothing.
pub async fn concurrent_updates_lose_nothing(t: StoreUnderTest) {
    let k = t.key("record");
    let start = Arc::new(tokio::sync::Barrier::new(50));
    let callers: Vec<_> = (0..50u32)
        .map(|i| {
            let (store, k, start) = (t.store.clone(), k.clone(), start.clone());
            tokio::spawn(async move {
                start.wait().await;
                let add = |held: Option<&[u8]>| {
                    let mut text = String::from_utf8_lossy(held.unwrap_or(b"")).into_owned();
                    text.push_str(&format!("{i},"));
                    Some((text.into_bytes(), Duration::ZERO))
                };
                // memcached's compare-and-swap gives up after a few lost races: the
                // caller tries again, as a purge's caller would.
                for _ in 0..20 {
                    if store.update(&k, &add).await.is_ok() {
                        return;
                    }
                }
                panic!("update {i} kept losing");
            })
        })
        .collect();
    for caller in callers {
        caller.await.unwrap();
    }
    let held = t.store.get(&k).await.unwrap().unwrap();
    let mut numbers: Vec<u32> = String::from_utf8_lossy(&held)
        .split_terminator(',')
        .map(|n| n.parse().unwrap())
        .collect();
    numbers.sort_unstable();
    assert_eq!(numbers, (0..50).collect::<Vec<_>>());
    let same = t
        .store
        .update(&k, &|held| Some((held?.to_vec(), Duration::ZERO)));
    assert_eq!(same.await.unwrap(), Some(held.clone()), "left as it was");
    let left = t.store.update(&k, &|_| None).await.unwrap();
    assert_eq!(left, Some(held), "not written");
    let absent = t.store.update(&t.key("absent"), &|_| None).await.unwrap();
    assert_eq!(absent, None, "nothing created");
}

/// TTLs are durations rounded up to whole seconds (so a sub-second TTL still expires,
/// and 2 s is neither milliseconds nor forever); `Duration::ZERO` never expires; an
/// expired key is absent to every call, `add` included.
pub async fn ttls_expire_in_whole_seconds_and_zero_never(t: StoreUnderTest) {
    let (short, sub_second, forever) = (t.key("short"), t.key("sub"), t.key("forever"));
    t.store
        .set(&short, b"s", Duration::from_secs(2))
        .await
        .unwrap();
    t.store
        .add(&sub_second, b"m", Duration::from_millis(300))
        .await
        .unwrap();
    t.store.set(&forever, b"f", Duration::ZERO).await.unwrap();
    // memcached's clock ticks in whole seconds, so 2 s may be anything above 1 s: the
    // value is certainly there right away.
    assert!(
        t.store.get(&short).await.unwrap().is_some(),
        "a 2 s TTL is not milliseconds"
    );
    eventually(
        "the 2 s and 300 ms items expire",
        Duration::from_secs(6),
        || async {
            let got = t
                .store
                .get_many(&[short.clone(), sub_second.clone()])
                .await
                .unwrap();
            got.is_empty()
        },
    )
    .await;
    assert_eq!(t.store.get(&short).await.unwrap(), None);
    assert_eq!(
        t.store.get(&forever).await.unwrap().as_deref(),
        Some(&b"f"[..]),
        "ZERO never expires"
    );
    assert!(
        t.store.add(&short, b"again", Duration::ZERO).await.unwrap(),
        "an expired key is absent to add"
    );
    assert!(!t.store.delete(&sub_second).await.unwrap());
}

/// A TTL over 30 days is still a duration (memcached reads such numbers as Unix times,
/// which an implementation must translate), so the item is there right after the call.
pub async fn ttls_beyond_30_days_are_durations_too(t: StoreUnderTest) {
    let month = Duration::from_secs(30 * 24 * 3600);
    for (name, ttl) in [
        ("exactly-30-days", month),
        ("31-days", month + Duration::from_secs(24 * 3600)),
        ("a-year", Duration::from_secs(365 * 24 * 3600)),
    ] {
        let k = t.key(name);
        t.store.set(&k, b"long", ttl).await.unwrap();
        assert_eq!(
            t.store.get(&k).await.unwrap().as_deref(),
            Some(&b"long"[..]),
            "set with a TTL of {ttl:?}"
        );
        let added = t.key(&format!("{name}-add"));
        assert!(t.store.add(&added, b"long", ttl).await.unwrap());
        assert!(
            t.store.get(&added).await.unwrap().is_some(),
            "add with a TTL of {ttl:?}"
        );
    }
}

/// A value of exactly `max_item_size` is stored whole; one byte more fails with
/// `TooLarge` naming both sizes, is not retryable, and leaves the key as it was.
pub async fn values_up_to_the_limit_fit_and_bigger_ones_fail_whole(t: StoreUnderTest) {
    let max = t.max_item_size;
    let at_limit: Vec<u8> = (0..max).map(|i| (i % 251) as u8).collect();
    let over = vec![b'x'; max + 1];

    let k = t.key("at-limit");
    t.store.set(&k, &at_limit, Duration::ZERO).await.unwrap();
    let back = t.store.get(&k).await.unwrap().expect("stored");
    assert!(back == at_limit[..], "came back cut or changed");
    assert!(
        t.store
            .add(&t.key("add-at-limit"), &at_limit, Duration::ZERO)
            .await
            .unwrap()
    );

    for (what, result) in [
        (
            "set",
            t.store.set(&k, &over, Duration::ZERO).await.map(|_| true),
        ),
        (
            "add",
            t.store.add(&t.key("add-over"), &over, Duration::ZERO).await,
        ),
    ] {
        match result {
            Err(e @ StoreError::TooLarge { size, max: limit }) => {
                assert_eq!((size, limit), (max + 1, max), "{what}: {e}");
                assert!(!e.is_retryable(), "{what}: too large is permanent");
            }
            other => panic!("{what} of {} bytes: {other:?}", max + 1),
        }
    }
    let still = t.store.get(&k).await.unwrap().expect("still there");
    assert!(still == at_limit[..], "a refused set left the old value");
    assert_eq!(t.store.get(&t.key("add-over")).await.unwrap(), None);
}

/// `ping` answers when the store does.
pub async fn ping_answers(t: StoreUnderTest) {
    t.store.ping().await.unwrap();
}

/// Cases only a store with servers can have, run on memcached processes of their own
/// (never the shared test memcached, which other tests use). The memory twin has no
/// servers: there is nothing to restart and nothing to spread keys over.
pub mod memcached_only {
    use super::*;

    fn store_on(servers: &[u16], limit: usize, timeout: Duration) -> Arc<dyn Store> {
        let servers: Vec<MemcachedServer> = servers
            .iter()
            .map(|p| format!("127.0.0.1:{p}").parse().expect("a valid address"))
            .collect();
        Arc::new(MemcachedStore::new(&servers, timeout, limit).expect("valid addresses"))
    }

    fn unavailable<T: std::fmt::Debug>(what: &str, result: Result<T, StoreError>) {
        assert!(
            matches!(result, Err(StoreError::Unavailable(..))),
            "{what} while memcached is down: {result:?}"
        );
    }

    /// Keys spread over two servers; `get_many` still returns every present one, and
    /// each key lives on exactly one server.
    pub async fn get_many_spans_two_servers() {
        let (a, b) = (free_port(), free_port());
        let (_a, _b) = (memcached(a), memcached(b));
        let both = store_on(&[a, b], TEST_ITEM_LIMIT, TEST_TIMEOUT);
        let (only_a, only_b) = (
            store_on(&[a], TEST_ITEM_LIMIT, TEST_TIMEOUT),
            store_on(&[b], TEST_ITEM_LIMIT, TEST_TIMEOUT),
        );
        let keys = Keyspace::new(&unique_namespace());
        let present: Vec<StoreKey> = (0..40).map(|i| keys.generation(&format!("k{i}"))).collect();
        for k in &present {
            both.set(k, k.as_str().as_bytes(), Duration::ZERO)
                .await
                .unwrap();
        }
        let (on_a, on_b) = (
            only_a.get_many(&present).await.unwrap(),
            only_b.get_many(&present).await.unwrap(),
        );
        assert!(
            !on_a.is_empty() && !on_b.is_empty(),
            "40 keys all on one server ({} and {}): the case proves nothing",
            on_a.len(),
            on_b.len()
        );
        assert_eq!(on_a.len() + on_b.len(), present.len(), "each key once");

        let mut asked = present.clone();
        asked.push(keys.generation("absent"));
        let got = both.get_many(&asked).await.unwrap();
        assert_eq!(got.len(), present.len());
        for k in &present {
            assert_eq!(got[k].as_ref(), k.as_str().as_bytes());
        }
    }

    /// A fragment's lease lives on its envelope's server, so taking it and reading the
    /// envelope back is one ordered exchange, and on one other server (its second copy,
    /// so that no lease is lost with one server); across three servers 100 gateways
    /// racing for one lease still have exactly one winner, and each sees the envelope as
    /// stored.
    pub async fn a_lease_lives_with_its_envelope_and_has_one_winner() {
        let ports = [free_port(), free_port(), free_port()];
        let _servers: Vec<_> = ports.iter().map(|&p| memcached(p)).collect();
        let all = store_on(&ports, TEST_ITEM_LIMIT, TEST_TIMEOUT);
        let singles: Vec<_> = ports
            .iter()
            .map(|&p| store_on(&[p], TEST_ITEM_LIMIT, TEST_TIMEOUT))
            .collect();
        let keys = Keyspace::new(&unique_namespace());
        let route = tessera_protocol::config::FragmentRoute::new("recs", "/render/recs");
        let mut servers_used = std::collections::HashSet::new();
        for n in 0..30 {
            let fragment = keys.fragment(
                &tessera_protocol::key::Identity {
                    route: "recs".into(),
                    params: vec![("id".into(), n.to_string())],
                    vary: vec![],
                },
                1,
            );
            let lease = tessera_protocol::Lease::new(all.as_ref(), &fragment, &route);
            all.set(&fragment.envelope, b"e", Duration::from_secs(30))
                .await
                .unwrap();
            lease.acquire("a").await.unwrap().expect("free");
            let (lease_key, envelope) = (lease.key().clone(), fragment.envelope.clone());
            let mut holders = Vec::new();
            let mut second_copies = 0;
            for (i, single) in singles.iter().enumerate() {
                let found = single
                    .get_many(&[lease_key.clone(), envelope.clone()])
                    .await
                    .unwrap();
                match (
                    found.contains_key(&lease_key),
                    found.contains_key(&envelope),
                ) {
                    (true, true) => holders.push(i),
                    (true, false) => second_copies += 1,
                    (false, false) => {}
                    split => panic!("fragment {n}: lease and envelope apart: {split:?}"),
                }
            }
            assert_eq!(holders.len(), 1, "fragment {n}");
            assert_eq!(second_copies, 1, "fragment {n}: the lease's second copy");
            servers_used.insert(holders[0]);
        }
        assert!(
            servers_used.len() > 1,
            "30 fragments on one server prove nothing"
        );

        let fragment = keys.fragment(
            &tessera_protocol::key::Identity {
                route: "recs".into(),
                params: vec![("id".into(), "race".into())],
                vary: vec![],
            },
            1,
        );
        let start = Arc::new(tokio::sync::Barrier::new(100));
        let racers: Vec<_> = (0..100)
            .map(|i| {
                let (all, fragment, route, start) =
                    (all.clone(), fragment.clone(), route.clone(), start.clone());
                tokio::spawn(async move {
                    start.wait().await;
                    let lease = tessera_protocol::Lease::new(all.as_ref(), &fragment, &route);
                    lease.acquire(&i.to_string()).await.unwrap().is_some()
                })
            })
            .collect();
        let mut winners = 0;
        for racer in racers {
            winners += usize::from(racer.await.unwrap());
        }
        assert_eq!(winners, 1);
    }

    /// While the server is down every call fails with `Unavailable`; once it is back on the same port the same store answers
    /// again, without a new client.
    pub async fn a_restarted_server_is_unavailable_then_recovers() {
        let port = free_port();
        let mut server = memcached(port);
        // A short deadline: while the server is down, connecting waits for all of it.
        let store = store_on(&[port], TEST_ITEM_LIMIT, Duration::from_millis(300));
        let keys = Keyspace::new(&unique_namespace());
        let k = keys.generation("k");
        store.set(&k, b"before", Duration::ZERO).await.unwrap();
        store.ping().await.unwrap();

        server.kill();
        unavailable("get", store.get(&k).await);
        unavailable("get_many", store.get_many(std::slice::from_ref(&k)).await);
        unavailable("set", store.set(&k, b"x", Duration::ZERO).await);
        unavailable("add", store.add(&k, b"x", Duration::ZERO).await);
        unavailable("delete", store.delete(&k).await);
        unavailable("incr", store.incr(&k, 1).await);
        unavailable("ping", store.ping().await);
        assert!(store.get(&k).await.expect_err("still down").is_retryable());

        let _server = memcached(port);
        eventually(
            "the store answers again after the restart",
            Duration::from_secs(10),
            || async { store.ping().await.is_ok() },
        )
        .await;
        // A fresh server: the old value is gone, and every call works again.
        assert_eq!(store.get(&k).await.unwrap(), None);
        store.set(&k, b"after", Duration::ZERO).await.unwrap();
        assert_eq!(store.get(&k).await.unwrap().as_deref(), Some(&b"after"[..]));
        assert!(store.reconnects() >= 1, "the pool was reset");
    }

    /// memcached's `total_connections` statistic (connections ever accepted).
    fn connections_accepted(port: u16) -> u64 {
        use std::io::{BufRead, BufReader, Write};
        let mut conn = std::net::TcpStream::connect(("127.0.0.1", port)).expect("memcached");
        conn.write_all(b"stats\r\n").unwrap();
        BufReader::new(conn)
            .lines()
            .map_while(Result::ok)
            .take_while(|l| l != "END")
            .find_map(|l| l.strip_prefix("STAT total_connections ")?.parse().ok())
            .expect("a total_connections statistic")
    }

    /// 500 lookups started at once share the store's [`LINES`] connections, not one per
    /// lookup in flight, and every lookup gets its own key's value. Half are `get_many`
    /// of two keys (as a worker's claim reads a lease and a generation). That calls
    /// share writes too is `exchanges_sent_together_share_writes` in the pipeline's
    /// tests.
    pub async fn concurrent_lookups_share_exchanges() {
        let port = free_port();
        let _server = memcached(port);
        let store = store_on(&[port], 1024, TEST_TIMEOUT);
        let keys = Keyspace::new(&unique_namespace());
        for n in 0..50 {
            let k = keys.generation(&format!("k{n}"));
            store
                .set(&k, n.to_string().as_bytes(), Duration::ZERO)
                .await
                .unwrap();
        }
        let before = connections_accepted(port);
        let key = |n: usize| keys.generation(&format!("k{}", n % 50));
        let lookups: Vec<_> = (0..500)
            .map(|n| {
                let (store, k, absent) = (store.clone(), key(n), keys.generation("absent"));
                tokio::spawn(async move {
                    let found = if n % 2 == 0 {
                        store.get(&k).await.unwrap()
                    } else {
                        let mut many = store.get_many(&[absent, k.clone()]).await.unwrap();
                        assert_eq!(many.len(), 1, "only the present key is returned");
                        many.remove(&k)
                    };
                    (n % 50, found)
                })
            })
            .collect();
        for lookup in lookups {
            let (n, found) = lookup.await.unwrap();
            assert_eq!(found.as_deref(), Some(n.to_string().as_bytes()));
        }
        // One is this statistics connection.
        let dialed = connections_accepted(port) - before - 1;
        assert!(
            dialed <= LINES as u64,
            "{dialed} connections for 500 concurrent lookups"
        );
    }

    /// 200 leases taken and 200 envelopes stored at once (a miss storm, a busy worker)
    /// share a few pipelined exchanges with the lookups, and each pair keeps its order:
    /// an `add_then_get` reads the envelope as it was when its lease was taken, a
    /// `set_then_delete` deletes only after it stored.
    pub async fn concurrent_pairs_share_exchanges_in_order() {
        let port = free_port();
        let _server = memcached(port);
        let store = store_on(&[port], 1024, TEST_TIMEOUT);
        let keys = Keyspace::new(&unique_namespace());
        let ttl = Duration::from_secs(30);
        for n in 0..200 {
            let k = keys.generation(&format!("release{n}"));
            store.set(&k, b"held", ttl).await.unwrap();
        }
        let before = connections_accepted(port);
        let calls: Vec<_> = (0..400)
            .map(|n| {
                let store = store.clone();
                let (a, b) = (
                    keys.generation(&format!("lease{n}")),
                    keys.generation(&format!("envelope{n}")),
                );
                let release = keys.generation(&format!("release{}", n / 2));
                tokio::spawn(async move {
                    if n % 2 == 0 {
                        // Nothing stored under `b`: the lease is won, and the read is empty.
                        assert_eq!(
                            store.add_then_get(&a, b"h", ttl, &b).await.unwrap(),
                            Some(None)
                        );
                        assert_eq!(store.add_then_get(&a, b"h", ttl, &b).await.unwrap(), None);
                    } else {
                        let deleted = store.set_then_delete(&b, b"built", ttl, &release).await;
                        assert!(deleted.unwrap().unwrap(), "the release was there");
                        assert_eq!(store.get(&b).await.unwrap().as_deref(), Some(&b"built"[..]));
                        assert_eq!(store.get(&release).await.unwrap(), None);
                    }
                })
            })
            .collect();
        for call in calls {
            call.await.unwrap();
        }
        let dialed = connections_accepted(port) - before - 1;
        assert!(
            dialed <= LINES as u64,
            "{dialed} connections for 400 concurrent pairs"
        );
    }

    /// A lookup that goes away while its batch forms (its client hung up, its deadline
    /// passed) leaves no trace: the lookups after it are answered. (An earlier batching,
    /// whose leader ran in its caller's future, left the batch forming for ever when that
    /// caller was dropped, and every later lookup of the gateway timed out.)
    pub async fn a_lookup_dropped_while_its_batch_forms_wedges_nothing() {
        let port = free_port();
        let _server = memcached(port);
        let store = store_on(&[port], 1024, TEST_TIMEOUT);
        let k = Keyspace::new(&unique_namespace()).generation("k");
        store.set(&k, b"v", Duration::ZERO).await.unwrap();
        assert_eq!(store.get(&k).await.unwrap().as_deref(), Some(&b"v"[..]));
        let mut dropped = 0;
        for _ in 0..10 {
            // Polled once (it joins or starts the batch), then dropped. On a runtime of
            // more than one thread the batch may be answered within that poll: then
            // nothing was dropped.
            if futures_util::FutureExt::now_or_never(store.get(&k)).is_none() {
                dropped += 1;
            }
            assert_eq!(
                tokio::time::timeout(TEST_TIMEOUT, store.get(&k))
                    .await
                    .expect("answered")
                    .unwrap()
                    .as_deref(),
                Some(&b"v"[..])
            );
        }
        assert!(
            dropped > 0,
            "no lookup was dropped: the case proves nothing"
        );
    }

    /// A memcached that stops answering (SIGSTOP: connections still accepted, nothing
    /// read): 1,000 concurrent lookups and writes each fail `Unavailable` near
    /// `store.timeout`, none hangs, the tasks they left behind end, and the store answers
    /// again once the server resumes.
    pub async fn a_stopped_server_fails_fast_without_a_pile_up() {
        let port = free_port();
        let server = memcached(port);
        let pid = server.child.id().to_string();
        let timeout = Duration::from_millis(300);
        let store = store_on(&[port], 1024, timeout);
        let keys = Keyspace::new(&unique_namespace());
        let k = keys.generation("k");
        store.set(&k, b"v", Duration::ZERO).await.unwrap();
        let baseline = tokio::runtime::Handle::current()
            .metrics()
            .num_alive_tasks();

        let signal = |s: &str| {
            let ok = std::process::Command::new("kill").args([s, &pid]).status();
            assert!(ok.is_ok_and(|s| s.success()), "kill {s} memcached");
        };
        signal("-STOP");
        // `kill` returns before every thread of memcached has stopped: one still running
        // could answer the first calls.
        eventually(
            "every memcached thread is stopped",
            Duration::from_secs(5),
            || async { all_threads_stopped(&pid) },
        )
        .await;
        let started = std::time::Instant::now();
        let calls: Vec<_> = (0..1000)
            .map(|n| {
                let (store, key) = (store.clone(), keys.generation(&format!("k{}", n % 50)));
                tokio::spawn(async move {
                    let began = std::time::Instant::now();
                    let result = if n % 4 == 0 {
                        store.set(&key, b"x", Duration::ZERO).await.map(|()| None)
                    } else {
                        store.get(&key).await
                    };
                    (result, began.elapsed())
                })
            })
            .collect();
        let mut slowest = Duration::ZERO;
        for call in calls {
            let (result, took) = call.await.unwrap();
            unavailable("a call", result);
            slowest = slowest.max(took);
        }
        // Each call is cut at `store.timeout`; the margin is for a loaded machine only.
        assert!(
            slowest < timeout * 5,
            "slowest call {slowest:?}, timeout {timeout:?}"
        );
        eventually(
            "the tasks the storm started have ended",
            Duration::from_secs(10),
            || async {
                tokio::runtime::Handle::current()
                    .metrics()
                    .num_alive_tasks()
                    <= baseline + 2
            },
        )
        .await;
        let storm = started.elapsed();

        signal("-CONT");
        eventually(
            "the store answers again once memcached resumes",
            Duration::from_secs(10),
            || async { store.get(&k).await.is_ok_and(|v| v.is_some()) },
        )
        .await;
        assert!(storm < Duration::from_secs(10), "storm took {storm:?}");
        drop(server);
    }

    /// The documented default item limit (`store.max_item_size`, "memcached's -I") on a
    /// memcached started with its default `-I 1m`: a value of exactly the limit must fit.
    pub async fn the_default_item_limit_fits_a_default_memcached() {
        let port = free_port();
        let _server = memcached(port);
        let limit = item_limit(&Config::default());
        let store = store_on(&[port], limit, TEST_TIMEOUT);
        let k = Keyspace::new(&unique_namespace()).generation("big");
        let result = store.set(&k, &vec![b'x'; limit], Duration::ZERO).await;
        assert!(
            result.is_ok(),
            "a value of exactly store.max_item_size ({limit} bytes): {result:?}"
        );
    }
}
