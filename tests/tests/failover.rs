//! Losing one of three memcached servers and keeping serving: a gateway with embedded
//! workers on three memcached processes of the test's own (killed, stopped with SIGSTOP
//! and resumed) and the test RabbitMQ. See `backends/src/memcached.rs`, "Failover".
//!
//! Tests here time their answers, so they take turns (`ONE_AT_A_TIME`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use futures_util::future::join_all;
use reqwest::StatusCode;
use tessera_protocol::{Config, FragmentRoute, Identity, Keyspace};
use tessera_tests::harness::{TestGateway, client, config, real_backends_on, text};
use tessera_tests::servers::Memcacheds;
use tessera_tests::upstream::{FakeUpstream, Script};
use tessera_tests::{eventually, metric};
use tokio_util::sync::CancellationToken;

static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const WITHIN: Duration = Duration::from_secs(20);

/// A route whose fragments are told apart by `id`, each render numbered (` #N`).
fn route(up: &FakeUpstream, name: &str) -> FragmentRoute {
    up.script(
        &format!("/_render/{name}"),
        Script {
            numbered: true,
            ..Script::default()
        },
    );
    let mut r = tessera_tests::harness::route(name);
    r.params = vec!["id".into()];
    r
}

/// A gateway (4 embedded workers) on `servers` and the test RabbitMQ; `tweak` adjusts
/// its config first. Returns it with its config (namespace and all).
async fn gateway(
    servers: &Memcacheds,
    up: &FakeUpstream,
    routes: Vec<FragmentRoute>,
    tweak: impl FnOnce(&mut Config),
) -> (TestGateway, Config) {
    let mut c = config(&up.url(), routes);
    tweak(&mut c);
    let backends = real_backends_on(servers.servers(), &mut c).await;
    (TestGateway::start(c.clone(), backends).await, c)
}

async fn get(url: &str, wait: bool) -> (StatusCode, String) {
    let mut request = client().get(url);
    if wait {
        request = request.header("prefer", "wait=10");
    }
    let r = request.send().await.expect("answered");
    (r.status(), r.text().await.unwrap_or_default())
}

/// `tessera_store_server_{figure}` of `server` on the gateway's `/metrics` (-1: absent).
async fn server_metric(gw: &TestGateway, figure: &str, server: &str) -> f64 {
    let metrics = text(format!("{}/metrics", gw.admin)).await;
    let line = format!("tessera_store_server_{figure}{{server=\"{server}\"}} ");
    if !metrics.contains(&line) {
        return -1.0;
    }
    metric(&metrics, line.trim_end())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_memcached_stops_failing_cold_misses_once_judged_down() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let up = FakeUpstream::start().await;
    let mut servers = Memcacheds::start(3);
    let (gw, _) = gateway(&servers, &up, vec![route(&up, "cold")], |_| {}).await;
    for id in 0..10 {
        let (status, _) = get(&gw.at(&format!("/fragments/cold?id={id}")), true).await;
        assert_eq!(status, StatusCode::OK, "all three up");
    }

    servers.kill(1);
    let killed = Instant::now();
    // Rounds of 30 new cold fragments for 4 s: a third of them live on the killed
    // server. Once it is judged down they are built on the next server instead.
    let mut last_refused = None;
    let mut id = 1_000;
    while killed.elapsed() < Duration::from_secs(4) {
        let round = join_all((0..30).map(|n| {
            let url = gw.at(&format!("/fragments/cold?id={}", id + n));
            async move { get(&url, false).await.0 }
        }))
        .await;
        id += 30;
        for status in round {
            match status {
                StatusCode::ACCEPTED | StatusCode::OK => {}
                StatusCode::SERVICE_UNAVAILABLE => last_refused = Some(killed.elapsed()),
                other => panic!("a cold miss answered {other}"),
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!("last 503 after the kill: {last_refused:?}");
    assert!(
        last_refused.is_none_or(|at| at < Duration::from_secs(2)),
        "cold misses still failed {last_refused:?} after the kill"
    );
    let dead = &servers.addrs()[1];
    assert_eq!(server_metric(&gw, "up", dead).await, 0.0);
    assert_eq!(server_metric(&gw, "ejections_total", dead).await, 1.0);
    // Every fragment asked for meanwhile is built.
    for n in [1_000, 1_001, id - 1] {
        let (status, body) = get(&gw.at(&format!("/fragments/cold?id={n}")), true).await;
        assert_eq!(status, StatusCode::OK, "{body}");
    }
    // Back on its port, empty: it is taken back.
    servers.restart(1);
    eventually("the restarted server is taken back", WITHIN, || async {
        server_metric(&gw, "up", dead).await == 1.0
    })
    .await;
    let (status, _) = get(&gw.at("/fragments/cold?id=5"), true).await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_memcached_costs_hits_no_timeout_after_detection() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let up = FakeUpstream::start().await;
    let servers = Memcacheds::start(3);
    let timeout = Duration::from_millis(500);
    let (gw, _) = gateway(&servers, &up, vec![route(&up, "hot")], |c| {
        c.store.timeout = timeout;
    })
    .await;
    let urls: Vec<String> = (0..30)
        .map(|id| gw.at(&format!("/fragments/hot?id={id}")))
        .collect();
    for url in &urls {
        assert_eq!(get(url, true).await.0, StatusCode::OK);
    }

    servers.stop(0).await;
    // Judged down by the first call that waits its timeout, or by the probe (every
    // second) without traffic.
    tokio::time::sleep(Duration::from_secs(1) + timeout * 2).await;
    // Then for longer than `cache.ttl` (2 s): L1's copies expire and are read again.
    let mut slowest = Duration::ZERO;
    let until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < until {
        let round = join_all(urls.iter().map(|url| async move {
            let started = Instant::now();
            let (status, _) = get(url, false).await;
            (status, started.elapsed())
        }))
        .await;
        for (status, took) in round {
            assert!(
                status == StatusCode::OK || status == StatusCode::ACCEPTED,
                "{status}"
            );
            slowest = slowest.max(took);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!("slowest answer after detection: {slowest:?}");
    assert!(
        slowest < timeout / 2,
        "an answer took {slowest:?} with a {timeout:?} store timeout"
    );
    let hung = &servers.addrs()[0];
    assert_eq!(server_metric(&gw, "up", hung).await, 0.0);
    // Fragments that lived on it are built again on the next server.
    for url in &urls {
        assert_eq!(get(url, true).await.0, StatusCode::OK);
    }
    servers.resume(0);
    eventually("the resumed server is taken back", WITHIN, || async {
        server_metric(&gw, "up", hung).await == 1.0
    })
    .await;
}

/// Keys of namespace `ns` placed on server `s` of `servers`: the first of `candidates`
/// whose key (made by `key`) lives there.
fn first_on<T: Clone>(
    servers: &Memcacheds,
    s: usize,
    candidates: impl IntoIterator<Item = T>,
    key: impl Fn(&T) -> String,
) -> T {
    candidates
        .into_iter()
        .find(|c| servers.home_of(&key(c)) == s)
        .expect("a candidate placed on the server")
}

/// Things kept on server `s`, for the purges of each kind: the generation of route
/// `r{r}`, the last purge of tag `tag-{tag}` (route `t`'s render carries it) and the
/// envelope of `/fragments/k?id={id}`. Returns the URLs of a fragment of each, with `r`,
/// `id` and `tag`.
async fn placed_on(
    servers: &Memcacheds,
    s: usize,
    up: &FakeUpstream,
    gw: &TestGateway,
    c: &Config,
) -> ([String; 3], usize, usize, usize) {
    let keys = Keyspace::new(&c.store.namespace);
    let r = first_on(servers, s, 0..8, |n| {
        keys.generation(&format!("r{n}")).to_string()
    });
    let tag = first_on(servers, s, 0..1_000, |n| {
        keys.tag(&tessera_protocol::tags::Tag::new(&format!("tag-{n}")).unwrap())
            .to_string()
    });
    up.script(
        "/_render/t",
        Script {
            numbered: true,
            headers: vec![("surrogate-key".into(), format!("tag-{tag}"))],
            ..Script::default()
        },
    );
    // The fragment purged by key: one whose envelope lives on `s`.
    assert_eq!(
        get(&gw.at("/fragments/k?id=0"), true).await.0,
        StatusCode::OK
    );
    let generation = {
        let store = tessera_backends::memcached::MemcachedStore::new(
            &servers.servers(),
            Duration::from_secs(2),
            1 << 20,
        )
        .unwrap();
        tessera_protocol::store::generation(&store, &keys.generation("k"))
            .await
            .unwrap()
    };
    let id = first_on(servers, s, 1..1_000, |id| {
        let identity = Identity {
            route: "k".into(),
            params: vec![("id".into(), id.to_string())],
            vary: vec![],
        };
        keys.fragment(&identity, generation).envelope.to_string()
    });
    let urls = [
        gw.at(&format!("/fragments/k?id={id}")),
        gw.at(&format!("/fragments/r{r}?id=1")),
        gw.at("/fragments/t?id=1"),
    ];
    (urls, r, id, tag)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_returning_memcached_serves_nothing_purged_or_rebuilt_while_it_was_out() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let up = FakeUpstream::start().await;
    let servers = Memcacheds::start(3);
    const S: usize = 0;
    // Candidate routes for the route purge: one whose generation lives on S is used.
    let mut routes: Vec<FragmentRoute> = (0..8).map(|n| route(&up, &format!("r{n}"))).collect();
    routes.push(route(&up, "k"));
    routes.push(route(&up, "t"));
    // L1 off: every answer is read from memcached.
    let (gw, c) = gateway(&servers, &up, routes, |c| {
        c.cache.capacity = tessera_protocol::config::ByteSize::b(0);
    })
    .await;
    let (urls, r, id, tag) = placed_on(&servers, S, &up, &gw, &c).await;
    for url in &urls {
        let (status, body) = get(url, true).await;
        assert!(
            status == StatusCode::OK && body.ends_with(" #1"),
            "{url}: {status} {body}"
        );
    }

    servers.stop(S).await;
    // Purges of every kind are accepted while it hangs. The route purge meets the hang
    // (and judges it down); the others are then never sent to it, so it keeps the old
    // copies (a purge sent to a stopped memcached waits in its socket and is applied
    // when it resumes).
    let admin = client();
    let purge = |what: String| {
        let admin = admin.clone();
        async move {
            let answer = admin.delete(&what).send().await.unwrap();
            assert_eq!(answer.status(), StatusCode::OK, "DELETE {what}");
        }
    };
    purge(format!("{}/routes/r{r}", gw.admin)).await;
    let hung = &servers.addrs()[S];
    eventually("the hung server is judged down", WITHIN, || async {
        server_metric(&gw, "up", hung).await == 0.0
    })
    .await;
    purge(format!("{}/fragments/k?id={id}", gw.admin)).await;
    purge(format!("{}/tags/tag-{tag}", gw.admin)).await;
    // Rebuilt on the other servers meanwhile.
    for url in &urls {
        let (status, body) = get(url, true).await;
        assert!(
            status == StatusCode::OK && body.ends_with(" #2"),
            "{url}: {status} {body}"
        );
    }

    servers.resume(S);
    eventually("the resumed server is taken back", WITHIN, || async {
        server_metric(&gw, "up", hung).await == 1.0
    })
    .await;
    assert!(
        server_metric(&gw, "flushes_total", hung).await >= 1.0,
        "it was emptied"
    );
    // Never the old fragment, whatever the server held.
    let until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < until {
        for url in &urls {
            let (status, body) = get(url, false).await;
            assert!(
                !body.ends_with(" #1"),
                "{url}: the purged copy came back: {status} {body}"
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for url in &urls {
        let (status, body) = get(url, true).await;
        assert!(
            status == StatusCode::OK && !body.ends_with(" #1"),
            "{url}: {status} {body}"
        );
    }
}

/// Two gateways and two worker processes of route `b` (in this process, each with a
/// store of its own, so each judges servers for itself), and what stops the workers.
async fn two_of_each(
    servers: &Memcacheds,
    c: &mut Config,
) -> (
    [TestGateway; 2],
    Vec<tokio::task::JoinHandle<()>>,
    CancellationToken,
) {
    c.workers.embedded = 0;
    let first = real_backends_on(servers.servers(), c).await;
    let second = tessera_backends::connect(c).await.unwrap();
    let gateways = [
        TestGateway::start(c.clone(), first).await,
        TestGateway::start(c.clone(), second).await,
    ];
    let stop = CancellationToken::new();
    let mut workers = Vec::new();
    for _ in 0..2 {
        let backends = tessera_backends::connect(c).await.unwrap();
        let builder = Arc::new(tessera_workers::HttpBuilder::new(c).unwrap());
        let (config, stop) = (Arc::new(c.clone()), stop.clone());
        workers.push(tokio::spawn(async move {
            let metrics = tessera_workers::WorkerMetrics::default();
            tessera_workers::run(
                backends,
                config,
                builder,
                8,
                metrics,
                stop.cancelled_owned(),
            )
            .await
            .unwrap();
        }));
    }
    (gateways, workers, stop)
}

/// `fragments` new fragments of `b`, 20 a second, each asked at one of `urls` (the
/// gateways' `/fragments/b?id=`), then polled at both: how many answers were 503.
fn cold_misses(urls: Vec<String>, fragments: usize) -> tokio::task::JoinHandle<usize> {
    tokio::spawn(async move {
        let refused = Arc::new(AtomicUsize::new(0));
        let mut asks = Vec::new();
        for id in 0..fragments {
            let (urls, refused) = (urls.clone(), refused.clone());
            asks.push(tokio::spawn(async move {
                for (after, gw) in [(0, id % 2), (100, 1 - id % 2), (400, 0), (400, 1)] {
                    tokio::time::sleep(Duration::from_millis(after)).await;
                    let (status, _) = get(&format!("{}{id}", urls[gw]), false).await;
                    if status == StatusCode::SERVICE_UNAVAILABLE {
                        refused.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }));
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        join_all(asks).await;
        refused.load(Ordering::Relaxed)
    })
}

/// Renders of route `b` after each fragment's first: of fragments placed on servers 1
/// and 2 (whose copies went with server 1 or were emptied from server 2), and of those
/// placed on server 0, which lost nothing.
async fn built_again(up: &FakeUpstream, servers: &Memcacheds, c: &Config) -> (usize, usize) {
    let keys = Keyspace::new(&c.store.namespace);
    let generation = {
        let store = tessera_backends::connect(c).await.unwrap().store;
        tessera_protocol::store::generation(store.as_ref(), &keys.generation("b"))
            .await
            .unwrap()
    };
    let mut renders: std::collections::HashMap<String, usize> = Default::default();
    for (query, _) in up.requests("/_render/b") {
        *renders.entry(query.unwrap_or_default()).or_default() += 1;
    }
    let (mut lost, mut kept) = (0, 0);
    for (query, n) in renders {
        let identity = Identity {
            route: "b".into(),
            params: vec![("id".into(), query.trim_start_matches("id=").into())],
            vary: vec![],
        };
        let envelope = keys.fragment(&identity, generation).envelope;
        match servers.home_of(envelope.as_str()) {
            0 => kept += n - 1,
            _ => lost += n - 1,
        }
    }
    (lost, kept)
}

/// Two gateways and two worker processes, each judging servers for itself, under a
/// stream of cold misses while one server is killed and comes back empty and another
/// hangs and resumes: no fragment is built twice at once (a second render starting while
/// the first is being answered), and no answer is a 503 (a call in flight when its
/// server is judged down goes to the key's new home). Fragments built again later are
/// counted, by whether their server lost its copy: the figures `lease.rs` states.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn builds_are_not_doubled_while_processes_disagree_about_servers() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let up = FakeUpstream::start().await;
    up.script(
        "/_render/b",
        Script {
            delay: Duration::from_millis(500),
            ..Script::default()
        },
    );
    let mut r = tessera_tests::harness::route("b");
    r.params = vec!["id".into()];
    r.build_timeout = Duration::from_secs(5);
    let mut servers = Memcacheds::start(3);
    let mut c = config(&up.url(), vec![r]);
    let (gateways, workers, stop) = two_of_each(&servers, &mut c).await;
    let urls: Vec<String> = gateways.iter().map(|g| g.at("/fragments/b?id=")).collect();

    const FRAGMENTS: usize = 160;
    let load = cold_misses(urls.clone(), FRAGMENTS);
    let started = Instant::now();
    let at = |secs: f64| tokio::time::sleep_until((started + Duration::from_secs_f64(secs)).into());
    at(1.5).await;
    servers.kill(1);
    at(3.5).await;
    servers.restart(1);
    at(5.0).await;
    servers.stop(2).await;
    at(6.5).await;
    servers.resume(2);
    let refused = load.await.unwrap();

    for id in 0..FRAGMENTS {
        let url = format!("{}{id}", urls[id % 2]);
        eventually("every fragment is built", WITHIN, || async {
            get(&url, true).await.0 == StatusCode::OK
        })
        .await;
    }
    // Time for a second build of anything to show up.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let renders = up.requests("/_render/b").len();
    let doubled = up.overlapping("/_render/b");
    let (lost, kept) = built_again(&up, &servers, &c).await;
    eprintln!(
        "{FRAGMENTS} fragments, {renders} renders: {doubled} built twice at once; built again \
         later: {lost} on servers 1 and 2, {kept} on server 0; {refused} answers 503"
    );
    stop.cancel();
    for worker in workers {
        let _ = tokio::time::timeout(WITHIN, worker).await;
    }
    assert_eq!(renders, FRAGMENTS + lost + kept, "every fragment built");
    assert_eq!(doubled, 0, "fragments built twice at once");
    // A call in flight when its server was judged down went to the key's new home.
    assert_eq!(refused, 0, "answers 503");
}
