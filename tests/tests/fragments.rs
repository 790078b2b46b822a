//! The fragment lifecycle end to end: gateway, embedded workers, fake upstream.
//!
//! Every scenario is a function of the backend kind; the macro at the bottom runs each
//! against every kind, so memory and real backends are held to the same behaviour.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::future::join_all;
use reqwest::StatusCode;
use tessera_backends::amqp::AmqpBus;
use tessera_protocol::Bus as _;
use tessera_tests::harness::{
    Backend, TestGateway, amqp_url, backends, client, config, route, text,
};
use tessera_tests::upstream::{FakeUpstream, Script};
use tessera_tests::{eventually, metric};

const WITHIN: Duration = Duration::from_secs(15);

async fn get(url: &str) -> reqwest::Response {
    client().get(url).send().await.expect("request answered")
}

async fn wait_for(url: &str, secs: u64) -> reqwest::Response {
    client()
        .get(url)
        .header("prefer", format!("wait={secs}"))
        .send()
        .await
        .expect("request answered")
}

async fn problem(r: reqwest::Response) -> serde_json::Value {
    assert_eq!(r.headers()["content-type"], "application/problem+json");
    r.json().await.expect("problem body is JSON")
}

pub async fn burst_of_cold_requests_builds_once(kind: Backend) {
    let up = FakeUpstream::start().await;
    up.script(
        "/_render/burst",
        Script {
            delay: Duration::from_millis(300),
            ..Script::default()
        },
    );
    let mut c = config(&up.url(), vec![route("burst")]);
    let b = backends(kind, &mut c).await;
    let gw = TestGateway::start(c, b).await;
    let http = client();
    let url = gw.at("/fragments/burst?x=1");
    let answers = join_all((0..500).map(|_| {
        let (http, url) = (http.clone(), url.clone());
        async move {
            tokio::time::timeout(Duration::from_secs(20), http.get(&url).send())
                .await
                .expect("no request hangs")
                .expect("answered")
                .status()
        }
    }))
    .await;
    for s in &answers {
        assert!(
            *s == StatusCode::OK || *s == StatusCode::ACCEPTED,
            "answer {s}"
        );
    }
    eventually("the fragment is served", WITHIN, || async {
        get(&url).await.status() == 200
    })
    .await;
    // Give any duplicate build time to show up before counting.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        up.renders("/_render/burst"),
        1,
        "exactly one render for 500 cold requests"
    );
    gw.stop().await;
}

pub async fn long_poll_answers_when_built(kind: Backend) {
    let up = FakeUpstream::start().await;
    up.script(
        "/_render/slow",
        Script {
            delay: Duration::from_millis(300),
            ..Script::default()
        },
    );
    let mut c = config(&up.url(), vec![route("slow")]);
    let b = backends(kind, &mut c).await;
    let gw = TestGateway::start(c, b).await;
    let started = Instant::now();
    let r = wait_for(&gw.at("/fragments/slow"), 5).await;
    let took = started.elapsed();
    assert_eq!(r.status(), StatusCode::OK);
    assert!(r.text().await.unwrap().contains("/_render/slow"));
    // The render takes 300 ms; a woken long-poll answers right after it, one that was
    // not woken answers at its 5 s deadline (the margin is for a loaded machine).
    assert!(took < Duration::from_secs(3), "long-poll took {took:?}");
    gw.stop().await;
}

pub async fn long_poll_gives_up_at_its_deadline(kind: Backend) {
    let up = FakeUpstream::start().await;
    up.script(
        "/_render/glacial",
        Script {
            delay: Duration::from_secs(10),
            ..Script::default()
        },
    );
    let mut r = route("glacial");
    r.build_timeout = Duration::from_secs(20);
    let mut c = config(&up.url(), vec![r]);
    let b = backends(kind, &mut c).await;
    let gw = TestGateway::start(c, b).await;
    let started = Instant::now();
    let r = wait_for(&gw.at("/fragments/glacial"), 1).await;
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    assert!(started.elapsed() >= Duration::from_secs(1));
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "held past its deadline"
    );
    gw.stop().await;
}

/// A wait too large for any integer is capped at `gateway.max_wait`, not read as 0.
pub async fn an_out_of_range_wait_is_capped(kind: Backend) {
    let up = FakeUpstream::start().await;
    up.script(
        "/_render/huge",
        Script {
            delay: Duration::from_secs(10),
            ..Script::default()
        },
    );
    let mut r = route("huge");
    r.build_timeout = Duration::from_secs(20);
    let mut c = config(&up.url(), vec![r]);
    c.gateway.max_wait = Duration::from_secs(1);
    let b = backends(kind, &mut c).await;
    let gw = TestGateway::start(c, b).await;
    let started = Instant::now();
    let r = client()
        .get(gw.at("/fragments/huge"))
        .header("prefer", "wait=99999999999999999999")
        .send()
        .await
        .expect("request answered");
    let took = started.elapsed();
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    assert!(
        took >= Duration::from_millis(900),
        "answered after {took:?}: the wait was not held up to max_wait"
    );
    assert!(
        took < Duration::from_secs(5),
        "held past max_wait: {took:?}"
    );
    gw.stop().await;
}

pub async fn fresh_hits_carry_cache_headers_and_revalidate(kind: Backend) {
    let up = FakeUpstream::start().await;
    let mut c = config(&up.url(), vec![route("hit")]);
    let b = backends(kind, &mut c).await;
    let gw = TestGateway::start(c, b).await;
    let url = gw.at("/fragments/hit");
    let first = get(&url).await;
    assert_eq!(first.status(), StatusCode::ACCEPTED);
    assert_eq!(first.headers()["retry-after"], "1");
    assert!(
        first.text().await.unwrap().contains("tessera-loading"),
        "HTML placeholder"
    );
    let r = wait_for(&url, 5).await;
    assert_eq!(r.status(), StatusCode::OK);
    let etag = r.headers()["etag"].to_str().unwrap().to_string();
    let status = r.headers()["cache-status"].to_str().unwrap().to_string();
    // Built before this request came, or while it waited (RFC 9211: it went forward).
    let built = ["tessera; hit; ttl=", "tessera; fwd=miss; stored; ttl="];
    assert!(built.iter().any(|b| status.starts_with(b)), "{status}");
    assert_eq!(r.headers()["cache-control"], "public, no-cache");
    let content_type = r.headers()["content-type"].clone();
    let body = r.text().await.unwrap();
    // Repeated hits (answered from the hot answers) carry the same headers and body.
    for _ in 0..3 {
        let again = get(&url).await;
        assert_eq!(again.status(), StatusCode::OK);
        assert_eq!(again.headers()["etag"], etag.as_str());
        assert_eq!(again.headers()["content-type"], content_type);
        assert_eq!(again.headers()["cache-control"], "public, no-cache");
        assert_eq!(
            again.headers()["content-length"],
            body.len().to_string().as_str()
        );
        let status = again.headers()["cache-status"].to_str().unwrap();
        assert!(status.starts_with("tessera; hit; ttl="), "{status}");
        assert_eq!(again.text().await.unwrap(), body);
    }
    let h2 = reqwest::Client::builder()
        .no_proxy()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    let over_h2 = h2.get(&url).send().await.unwrap();
    assert_eq!(over_h2.version(), reqwest::Version::HTTP_2);
    assert_eq!(over_h2.status(), StatusCode::OK);
    assert_eq!(over_h2.headers()["etag"], etag.as_str());
    assert_eq!(
        over_h2.headers()["content-length"],
        body.len().to_string().as_str()
    );
    assert_eq!(over_h2.text().await.unwrap(), body);
    let r = client()
        .get(&url)
        .header("if-none-match", &etag)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_MODIFIED);
    assert_eq!(r.headers()["etag"], etag.as_str());
    assert!(r.headers().get("content-type").is_none());
    assert!(r.bytes().await.unwrap().is_empty());
    let r = client()
        .get(&url)
        .header("if-none-match", "\"other\"")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let head = client().head(&url).send().await.unwrap();
    assert_eq!(head.status(), StatusCode::OK);
    assert_eq!(
        head.headers()["content-length"],
        body.len().to_string().as_str(),
        "HEAD tells the length of what GET would send"
    );
    assert!(head.bytes().await.unwrap().is_empty());
    assert_eq!(up.renders("/_render/hit"), 1);
    gw.stop().await;
}

pub async fn pending_answers_json_when_asked(kind: Backend) {
    let up = FakeUpstream::start().await;
    up.script(
        "/_render/j",
        Script {
            delay: Duration::from_secs(2),
            ..Script::default()
        },
    );
    let mut c = config(&up.url(), vec![route("j")]);
    let b = backends(kind, &mut c).await;
    let gw = TestGateway::start(c, b).await;
    let r = client()
        .get(gw.at("/fragments/j"))
        .header("accept", "application/json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["status"], "pending");
    assert_eq!(body["route"], "j");
    gw.stop().await;
}

pub async fn stale_is_served_and_rebuilt_once(kind: Backend) {
    let up = FakeUpstream::start().await;
    let mut r = route("stale");
    r.build_timeout = Duration::from_secs(10);
    r.fresh = Duration::from_secs(1);
    r.stale = Duration::from_secs(60);
    let mut c = config(&up.url(), vec![r]);
    c.cache.ttl = Duration::from_millis(200);
    let b = backends(kind, &mut c).await;
    let gw = TestGateway::start(c, b).await;
    let url = gw.at("/fragments/stale");
    assert_eq!(wait_for(&url, 5).await.status(), StatusCode::OK);
    assert_eq!(up.renders("/_render/stale"), 1);
    // The rebuild takes long enough for all 50 to be answered before it lands, on a
    // loaded machine too.
    up.script(
        "/_render/stale",
        Script {
            delay: Duration::from_secs(2),
            ..Script::default()
        },
    );
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let answers = join_all((0..50).map(|_| get(&url))).await;
    for a in answers {
        assert_eq!(
            a.status(),
            StatusCode::OK,
            "stale copy served, not a placeholder"
        );
        let status = a.headers()["cache-status"].to_str().unwrap().to_string();
        // RFC 9211: served from the cache, past its freshness.
        assert!(status.starts_with("tessera; hit; ttl=-"), "{status}");
    }
    let metrics = text(format!("{}/metrics", gw.admin)).await;
    assert!(
        metrics.contains(r#"tessera_requests_total{route="stale",cache="stale"} 50"#),
        "stale answers are counted as stale: {metrics}"
    );
    eventually("the rebuild lands", WITHIN, || async {
        let r = get(&url).await;
        let status = r.headers()["cache-status"].to_str().unwrap();
        status.starts_with("tessera; hit; ttl=") && !status.contains("ttl=-")
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(up.renders("/_render/stale"), 2, "exactly one rebuild");
    gw.stop().await;
}

pub async fn upstream_errors_are_retried_then_fail(kind: Backend) {
    let up = FakeUpstream::start().await;
    up.script(
        "/_render/broken",
        Script {
            then: Some(500),
            ..Script::default()
        },
    );
    let mut c = config(&up.url(), vec![route("broken")]);
    let b = backends(kind, &mut c).await;
    let gw = TestGateway::start(c, b).await;
    let url = gw.at("/fragments/broken");
    assert_eq!(get(&url).await.status(), StatusCode::ACCEPTED);
    eventually("the build fails for good", WITHIN, || async {
        get(&url).await.status() == StatusCode::BAD_GATEWAY
    })
    .await;
    let r = get(&url).await;
    assert_eq!(r.status(), StatusCode::BAD_GATEWAY);
    assert!(r.headers().contains_key("retry-after"));
    let body = problem(r).await;
    assert_eq!(body["status"], 502);
    assert!(
        !body.to_string().contains("500"),
        "worker detail is not shown: {body}"
    );
    assert_eq!(up.renders("/_render/broken"), 3, "max_attempts renders");
    gw.stop().await;
}

pub async fn upstream_4xx_is_not_retried(kind: Backend) {
    let up = FakeUpstream::start().await;
    up.script(
        "/_render/missing",
        Script {
            then: Some(404),
            ..Script::default()
        },
    );
    let mut c = config(&up.url(), vec![route("missing")]);
    let b = backends(kind, &mut c).await;
    let gw = TestGateway::start(c, b).await;
    let url = gw.at("/fragments/missing");
    let r = wait_for(&url, 5).await;
    assert_eq!(r.status(), StatusCode::BAD_GATEWAY);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(up.renders("/_render/missing"), 1, "a 4xx is final");
    gw.stop().await;
}

pub async fn client_mistakes_are_problems(kind: Backend) {
    let up = FakeUpstream::start().await;
    let mut r = route("p");
    r.params = vec!["q".into()];
    let mut c = config(&up.url(), vec![r]);
    let b = backends(kind, &mut c).await;
    let gw = TestGateway::start(c, b).await;
    let r = get(&gw.at("/fragments/nope")).await;
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    assert!(
        problem(r).await["detail"]
            .as_str()
            .unwrap()
            .contains("nope")
    );
    let long = format!("/fragments/p?q={}", "a".repeat(10 * 1024));
    let r = get(&gw.at(&long)).await;
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    assert_eq!(problem(r).await["status"], 400);
    let r = get(&gw.at("/fragments/p?q=%ff")).await;
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    let r = client().post(gw.at("/fragments/p")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(r.headers()["allow"], "GET, HEAD");
    assert_eq!(
        up.renders("/_render/p"),
        0,
        "nothing was built for bad requests"
    );
    gw.stop().await;
}

pub async fn params_are_allow_listed(kind: Backend) {
    let up = FakeUpstream::start().await;
    let mut r = route("listed");
    r.params = vec!["user_id".into(), "limit".into()];
    let mut c = config(&up.url(), vec![r]);
    let b = backends(kind, &mut c).await;
    let gw = TestGateway::start(c, b).await;
    let r = wait_for(&gw.at("/fragments/listed?limit=5&utm=x&user_id=7"), 5).await;
    assert_eq!(r.status(), StatusCode::OK);
    // Same identity in another order and without the junk: a hit, not a new build.
    let r = get(&gw.at("/fragments/listed?user_id=7&limit=5&_=123")).await;
    assert_eq!(r.status(), StatusCode::OK);
    let reqs = up.requests("/_render/listed");
    assert_eq!(reqs.len(), 1);
    assert_eq!(reqs[0].0.as_deref(), Some("limit=5&user_id=7"));
    assert!(!reqs[0].1.contains_key("cookie"), "no cookie without vary");
    gw.stop().await;
}

pub async fn vary_cookies_never_cross(kind: Backend) {
    let up = FakeUpstream::start().await;
    let mut r = route("me");
    r.vary = vec!["cookie:session_id".parse().unwrap()];
    let mut c = config(&up.url(), vec![r]);
    let b = backends(kind, &mut c).await;
    let gw = TestGateway::start(c, b).await;
    let as_user = |sid: &'static str| {
        let url = gw.at("/fragments/me");
        async move {
            client()
                .get(url)
                .header("prefer", "wait=5")
                .header("cookie", format!("theme=dark; session_id={sid}; other=1"))
                .send()
                .await
                .unwrap()
        }
    };
    let (a, b2) = tokio::join!(as_user("alice"), as_user("bob"));
    assert_eq!(a.status(), StatusCode::OK);
    assert_eq!(b2.status(), StatusCode::OK);
    assert_eq!(a.headers()["cache-control"], "private, no-cache");
    let (a, b2) = (a.text().await.unwrap(), b2.text().await.unwrap());
    assert!(a.contains("cookie=[session_id=alice]"), "{a}");
    assert!(b2.contains("cookie=[session_id=bob]"), "{b2}");
    for _ in 0..3 {
        let a2 = as_user("alice").await.text().await.unwrap();
        assert_eq!(a2, a, "alice only ever sees alice's fragment");
    }
    assert_eq!(up.renders("/_render/me"), 2);
    gw.stop().await;
}

pub async fn an_abandoned_lease_expires(kind: Backend) {
    let up = FakeUpstream::start().await;
    let mut r = route("orphan");
    r.build_timeout = Duration::from_secs(1);
    let mut c = config(&up.url(), vec![r.clone()]);
    let b = backends(kind, &mut c).await;
    // A build that died: its lease is held, its message is gone.
    let generation =
        tessera_protocol::store::generation(b.store.as_ref(), &b.keys.generation("orphan"))
            .await
            .unwrap();
    let identity = tessera_protocol::Identity {
        route: "orphan".into(),
        params: vec![],
        vary: vec![],
    };
    let keys = b.keys.fragment(&identity, generation);
    let lease = tessera_protocol::Lease::new(b.store.as_ref(), &keys, &r);
    assert!(lease.acquire("a-dead-build").await.unwrap().is_some());
    let gw = TestGateway::start(c, b).await;
    let url = gw.at("/fragments/orphan");
    assert_eq!(get(&url).await.status(), StatusCode::ACCEPTED);
    assert_eq!(
        up.renders("/_render/orphan"),
        0,
        "pending while the lease is held"
    );
    eventually("a new build after the lease expired", WITHIN, || async {
        wait_for(&url, 2).await.status() == StatusCode::OK
    })
    .await;
    assert_eq!(up.renders("/_render/orphan"), 1);
    gw.stop().await;
}

/// The queue backs up past a request's lease: the next poll queues a second request for
/// the same fragment, and when workers reach both, only one renders.
pub async fn a_backed_up_queue_still_builds_once(kind: Backend) {
    let up = FakeUpstream::start().await;
    let mut r = route("backlog");
    r.build_timeout = Duration::from_secs(1);
    let lease_ttl = r.lease_ttl();
    let mut c = config(&up.url(), vec![r]);
    let b = backends(kind, &mut c).await;
    let workers = c.workers.embedded;
    c.workers.embedded = 0;
    let first = TestGateway::start(c.clone(), b.clone()).await;
    let path = "/fragments/backlog";
    assert_eq!(get(&first.at(path)).await.status(), StatusCode::ACCEPTED);
    // No worker runs: the request waits in its queue while its lease runs out…
    tokio::time::sleep(lease_ttl + Duration::from_millis(500)).await;
    // …so the next poll (at another gateway, whose L1 has not seen the first) queues a
    // second request for the same fragment.
    let second = TestGateway::start(c.clone(), b.clone()).await;
    assert_eq!(get(&second.at(path)).await.status(), StatusCode::ACCEPTED);
    // Workers catch up with both requests.
    c.workers.embedded = workers;
    let workers = TestGateway::start(c, b).await;
    eventually("the fragment is built", WITHIN, || async {
        get(&workers.at(path)).await.status() == StatusCode::OK
    })
    .await;
    // Give the other request time to be taken and settled before counting.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        up.renders("/_render/backlog"),
        1,
        "one render for two requests"
    );
    for gw in [first, second, workers] {
        gw.stop().await;
    }
}

pub async fn a_build_killed_midway_is_redone(kind: Backend) {
    let up = FakeUpstream::start().await;
    up.script(
        "/_render/crash",
        Script {
            first_delay: Some(Duration::from_secs(30)),
            ..Script::default()
        },
    );
    let mut r = route("crash");
    r.build_timeout = Duration::from_secs(60);
    let mut c = config(&up.url(), vec![r]);
    let b = backends(kind, &mut c).await;
    let first = TestGateway::start(c.clone(), b.clone()).await;
    assert_eq!(
        get(&first.at("/fragments/crash")).await.status(),
        StatusCode::ACCEPTED
    );
    eventually("the first build is running", WITHIN, || async {
        up.renders("/_render/crash") == 1
    })
    .await;
    first.kill();
    let second = TestGateway::start(c, b).await;
    let r = wait_for(&second.at("/fragments/crash"), 10).await;
    assert_eq!(
        r.status(),
        StatusCode::OK,
        "rebuilt by the surviving workers"
    );
    assert_eq!(up.renders("/_render/crash"), 2);
    second.stop().await;
}

pub async fn graceful_stop_answers_waiting_clients(kind: Backend) {
    let up = FakeUpstream::start().await;
    up.script(
        "/_render/hold",
        Script {
            delay: Duration::from_secs(3),
            ..Script::default()
        },
    );
    let mut c = config(&up.url(), vec![route("hold")]);
    let b = backends(kind, &mut c).await;
    let gw = Arc::new(TestGateway::start(c, b).await);
    let url = gw.at("/fragments/hold");
    let waiting = tokio::spawn(async move { wait_for(&url, 20).await.status() });
    let metrics = format!("{}/metrics", gw.admin);
    eventually("the long-poll is held", WITHIN, || async {
        metric(&text(metrics.clone()).await, "tessera_long_polls ") == 1.0
    })
    .await;
    let started = Instant::now();
    Arc::try_unwrap(gw).unwrap().stop().await;
    let status = waiting.await.unwrap();
    assert_eq!(
        status,
        StatusCode::ACCEPTED,
        "a long-poll is answered when stopping"
    );
    assert!(started.elapsed() < Duration::from_secs(10));
}

pub async fn other_programs_can_warm_the_cache(kind: Backend) {
    let up = FakeUpstream::start().await;
    let mut r = route("warm");
    r.params = vec!["id".into()];
    let mut c = config(&up.url(), vec![r.clone()]);
    let b = backends(kind, &mut c).await;
    let queue = c.fragments[0].queue.clone();
    let gw = TestGateway::start(c, b.clone()).await;
    // What a Rails app would publish: no key, generation 0 ("current").
    let json = br#"{"v":1,"id":"warm-1","key":"","route":"warm","params":[["id","7"]],
        "vary":[],"generation":0,"attempt":1,"requested_at":0,"lease_deadline":0,"trace_id":""}"#;
    let request = tessera_protocol::BuildRequest::decode(json).unwrap();
    b.bus.publish_build(&queue, &request).await.unwrap();
    eventually("the warmed fragment is rendered", WITHIN, || async {
        up.renders("/_render/warm") == 1
    })
    .await;
    let url = gw.at("/fragments/warm?id=7");
    eventually("and served as a hit", WITHIN, || async {
        get(&url).await.status() == StatusCode::OK
    })
    .await;
    assert_eq!(
        up.renders("/_render/warm"),
        1,
        "served from the warmed cache, not rebuilt"
    );
    gw.stop().await;
}

/// Issue 12's case: 4 workers, 200 refreshes of 100 ms queued behind stale answers, then
/// a cold fragment someone waits for. It is built next, not after the refreshes: when
/// its answer comes, most refreshes have not run. The refreshes still all run.
pub async fn a_waited_build_goes_ahead_of_queued_refreshes(kind: Backend) {
    let up = FakeUpstream::start().await;
    let mut shelf = route("shelf");
    shelf.params = vec!["id".into()];
    shelf.fresh = Duration::from_secs(1);
    let mut c = config(&up.url(), vec![shelf, route("cart")]);
    c.cache.ttl = Duration::from_millis(100);
    let b = backends(kind, &mut c).await;
    let gw = TestGateway::start(c, b).await;
    let shelves: Vec<String> = (0..200)
        .map(|i| gw.at(&format!("/fragments/shelf?id={i}")))
        .collect();
    for answer in join_all(shelves.iter().map(|u| wait_for(u, 10))).await {
        assert_eq!(answer.status(), StatusCode::OK, "built");
    }
    let first_builds = up.renders("/_render/shelf");
    // Refreshes from now on take 100 ms each.
    let slow = |ms| Script {
        delay: Duration::from_millis(ms),
        ..Script::default()
    };
    up.script("/_render/shelf", slow(100));
    up.script("/_render/cart", slow(100));
    tokio::time::sleep(Duration::from_millis(1100)).await;
    for answer in join_all(shelves.iter().map(|u| get(u))).await {
        assert_eq!(answer.status(), StatusCode::OK, "stale is served");
    }

    let started = Instant::now();
    let cart = wait_for(&gw.at("/fragments/cart"), 10).await;
    let took = started.elapsed();
    assert_eq!(cart.status(), StatusCode::OK);
    let refreshed = up.renders("/_render/shelf") - first_builds;
    eprintln!("waited build answered in {took:?}, after {refreshed} of 200 refreshes");
    assert!(
        refreshed < 100,
        "the waited build went ahead of most refreshes: {refreshed} of 200 ran first ({took:?})"
    );
    eventually("every refresh runs", WITHIN, || async {
        up.renders("/_render/shelf") - first_builds >= 200
    })
    .await;
    gw.stop().await;
}

/// A route with `refresh_ahead`, read all the time, is rebuilt before `fresh` ends:
/// never served stale, and rebuilt about once per `fresh`, not once per hit.
pub async fn refresh_ahead_keeps_a_hot_fragment_fresh(kind: Backend) {
    let up = FakeUpstream::start().await;
    let mut hot = route("hot");
    hot.fresh = Duration::from_secs(2);
    hot.refresh_ahead = Duration::from_millis(1500);
    let mut c = config(&up.url(), vec![hot]);
    c.cache.ttl = Duration::from_millis(100);
    let b = backends(kind, &mut c).await;
    let gw = TestGateway::start(c, b).await;
    let url = gw.at("/fragments/hot");
    assert_eq!(wait_for(&url, 10).await.status(), StatusCode::OK);
    let until = Instant::now() + Duration::from_secs(5);
    let mut answers = 0;
    while Instant::now() < until {
        let r = get(&url).await;
        assert_eq!(r.status(), StatusCode::OK);
        let status = r.headers()["cache-status"].to_str().unwrap().to_string();
        assert!(
            !status.contains("ttl=-"),
            "served stale after {answers} answers: {status}"
        );
        answers += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let renders = up.renders("/_render/hot");
    assert!(
        (3..=12).contains(&renders),
        "{renders} renders for {answers} hits over 5 s of a 2 s fresh"
    );
    gw.stop().await;
}

/// How a route's generation moves under a waiting long-poll, with no event naming the
/// fragment to wake it.
#[derive(Debug, Clone, Copy)]
enum NewGeneration {
    /// `DELETE /routes/{name}` on the admin listener.
    Purge,
    /// The store loses the route's generation and the fragment's lease, as in a memcached
    /// restart (the next reader seeds a new generation).
    StoreLost,
}

/// A long-poll whose route moves to a new generation while it waits, and whose build
/// of the old generation is then dropped as purged, is answered 202 at its deadline: a
/// build must follow with nobody asking again. The last look is made in the generation
/// current then (soak run 4's lost build, `bench/README.md`, "Soak").
async fn a_long_poll_across_a_new_generation_still_gets_its_build(
    kind: Backend,
    how: NewGeneration,
) {
    let up = FakeUpstream::start().await;
    let mut r = route("moved");
    r.build_timeout = Duration::from_secs(1);
    let mut c = config(&up.url(), vec![r.clone()]);
    let b = backends(kind, &mut c).await;
    let workers = c.workers.embedded;
    c.workers.embedded = 0;
    let gw = TestGateway::start(c.clone(), b.clone()).await;
    let url = gw.at("/fragments/moved");
    // Past `cache.ttl` (2 s), so the gateway reads the route's generation again.
    let poll = tokio::spawn(async move { wait_for(&url, 4).await.status() });
    // No worker runs: the long-poll's request waits in its queue, its lease held.
    let generation_key = b.keys.generation("moved");
    let generation = tessera_protocol::store::generation(b.store.as_ref(), &generation_key)
        .await
        .unwrap();
    let identity = tessera_protocol::Identity {
        route: "moved".into(),
        params: vec![],
        vary: vec![],
    };
    let keys = b.keys.fragment(&identity, generation);
    let lease = tessera_protocol::Lease::new(b.store.as_ref(), &keys, &r);
    eventually("the long-poll queued its build", WITHIN, || async {
        lease.holder().await.unwrap().is_some()
    })
    .await;
    match how {
        NewGeneration::Purge => {
            let purged = client()
                .delete(format!("{}/routes/moved", gw.admin))
                .send()
                .await
                .unwrap();
            assert!(purged.status().is_success(), "{}", purged.status());
        }
        NewGeneration::StoreLost => {
            b.store.delete(&generation_key).await.unwrap();
            b.store.delete(lease.key()).await.unwrap();
        }
    }
    assert_eq!(poll.await.unwrap(), StatusCode::ACCEPTED);
    // Workers start; nobody asks for the fragment again.
    c.workers.embedded = workers;
    let workers = TestGateway::start(c, b.clone()).await;
    eventually(
        "the build accepted at the deadline is made",
        WITHIN,
        || async { up.renders("/_render/moved") == 1 },
    )
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(up.renders("/_render/moved"), 1);
    gw.stop().await;
    workers.stop().await;
}

pub async fn a_long_poll_across_a_route_purge_still_gets_its_build(kind: Backend) {
    a_long_poll_across_a_new_generation_still_gets_its_build(kind, NewGeneration::Purge).await;
}

pub async fn a_long_poll_across_a_store_restart_still_gets_its_build(kind: Backend) {
    a_long_poll_across_a_new_generation_still_gets_its_build(kind, NewGeneration::StoreLost).await;
}

tessera_tests::on_both_backends!(
    burst_of_cold_requests_builds_once,
    long_poll_answers_when_built,
    long_poll_gives_up_at_its_deadline,
    an_out_of_range_wait_is_capped,
    fresh_hits_carry_cache_headers_and_revalidate,
    pending_answers_json_when_asked,
    stale_is_served_and_rebuilt_once,
    upstream_errors_are_retried_then_fail,
    upstream_4xx_is_not_retried,
    client_mistakes_are_problems,
    params_are_allow_listed,
    vary_cookies_never_cross,
    an_abandoned_lease_expires,
    a_backed_up_queue_still_builds_once,
    a_long_poll_across_a_route_purge_still_gets_its_build,
    a_long_poll_across_a_store_restart_still_gets_its_build,
    a_build_killed_midway_is_redone,
    graceful_stop_answers_waiting_clients,
    other_programs_can_warm_the_cache,
    a_waited_build_goes_ahead_of_queued_refreshes,
    refresh_ahead_keeps_a_hot_fragment_fresh,
);

/// A build this gateway just queued is answered pending but not kept in L1: in a storm
/// of keys asked once, such entries would only churn it. Asked again while the build
/// runs, the key is read from the store once more and its lease found held; that answer
/// is kept, so the polls after it are answered from L1, and one build is made.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_build_just_queued_is_not_kept_but_a_polled_one_is() {
    use tessera_tests::counting::{Calls, CountingStore};
    let up = FakeUpstream::start().await;
    up.script(
        "/_render/polled",
        Script {
            delay: Duration::from_secs(3),
            ..Script::default()
        },
    );
    let mut polled = route("polled");
    polled.build_timeout = Duration::from_secs(20);
    let mut c = config(&up.url(), vec![polled]);
    assert!(c.cache.capacity.as_u64() > 0, "L1 is on");
    let mut b = backends(Backend::Memory, &mut c).await;
    let (store, calls) = CountingStore::wrap(b.store.clone());
    b.store = store;
    let gw = TestGateway::start(c, b).await;
    let url = gw.at("/fragments/polled");
    let reads = || {
        (
            Calls::read(&calls.envelope_gets),
            Calls::read(&calls.lease_adds),
        )
    };

    assert_eq!(get(&url).await.status(), StatusCode::ACCEPTED);
    // The memory store reads the envelope back after the lease in a call of its own.
    assert_eq!(
        reads(),
        (2, 1),
        "a miss: a lookup, a lease taken and a re-check"
    );
    assert_eq!(get(&url).await.status(), StatusCode::ACCEPTED);
    assert_eq!(
        reads(),
        (3, 2),
        "asked again: looked up, the lease found held"
    );
    for _ in 0..3 {
        assert_eq!(get(&url).await.status(), StatusCode::ACCEPTED);
    }
    assert_eq!(reads(), (3, 2), "polls from then on are answered from L1");
    let r = wait_for(&url, 10).await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(up.renders("/_render/polled"), 1, "one build");
    gw.stop().await;
}

/// The store dies after a fragment was cached: past `cache.ttl` the gateway cannot ask
/// it again, and serves L1's copy (within the route's `stale` window) marked
/// stale-if-error instead of a 503. A fragment it never held still gets a 503.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_store_does_not_take_cached_fragments_down() {
    let port = tessera_tests::cluster::free_port();
    let mut memcached = tessera_tests::cluster::memcached(port);
    let up = FakeUpstream::start().await;
    let mut c = config(&up.url(), vec![route("kept"), route("never")]);
    c.cache.ttl = Duration::from_secs(1);
    c.store.timeout = Duration::from_millis(250);
    c.store.namespace = tessera_tests::harness::unique_namespace();
    c.backend = tessera_protocol::Backend::Memcached {
        servers: vec![format!("127.0.0.1:{port}").parse().unwrap()],
    };
    c.validate().unwrap();
    let b = tessera_backends::connect(&c).await.unwrap();
    let gw = TestGateway::start(c, b).await;
    let url = gw.at("/fragments/kept");
    let first = wait_for(&url, 5).await;
    assert_eq!(first.status(), StatusCode::OK);
    let body = first.text().await.unwrap();
    assert_eq!(get(&url).await.status(), StatusCode::OK, "a hot answer");

    memcached.kill();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    for _ in 0..3 {
        let r = get(&url).await;
        assert_eq!(r.status(), StatusCode::OK, "L1's copy is served");
        let status = r.headers()["cache-status"].to_str().unwrap().to_string();
        assert!(status.contains("detail=stale-if-error"), "{status}");
        assert_eq!(r.text().await.unwrap(), body);
    }
    let never = get(&gw.at("/fragments/never")).await;
    assert_eq!(never.status(), StatusCode::SERVICE_UNAVAILABLE);
    gw.stop().await;
}

/// A render answer marked `Cache-Control: private` on a route without `vary` would be
/// shared with every user: its build fails, naming the route and the fix, and is not
/// retried. A route that varies, or one declared `shareable`, stores it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn private_render_answers_are_not_shared() {
    let up = FakeUpstream::start().await;
    for name in ["mine", "varied", "declared"] {
        up.script(
            &format!("/_render/{name}"),
            Script {
                headers: vec![("cache-control".into(), "private, max-age=0".into())],
                ..Script::default()
            },
        );
    }
    let mut varied = route("varied");
    varied.vary = vec!["cookie:session".parse().unwrap()];
    let mut declared = route("declared");
    declared.shareable = true;
    let mut c = config(&up.url(), vec![route("mine"), varied, declared]);
    let b = backends(Backend::Memory, &mut c).await;
    let gw = TestGateway::start(c, b).await;

    let refused = wait_for(&gw.at("/fragments/mine"), 5).await;
    assert_eq!(refused.status(), StatusCode::BAD_GATEWAY);
    assert_eq!(up.renders("/_render/mine"), 1, "not retried");
    let status: serde_json::Value =
        serde_json::from_str(&text(format!("{}/api/status", gw.admin)).await).unwrap();
    let error = status["recent_failures"][0]["error"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        error.contains("\"mine\"") && error.contains("private") && error.contains("vary"),
        "{error}"
    );

    let ok = client()
        .get(gw.at("/fragments/varied"))
        .header("cookie", "session=a")
        .header("prefer", "wait=5")
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), StatusCode::OK);
    assert_eq!(ok.headers()["cache-control"], "private, no-cache");
    let ok = wait_for(&gw.at("/fragments/declared"), 5).await;
    assert_eq!(ok.status(), StatusCode::OK);
    gw.stop().await;
}

/// A fresh gateway connects to RabbitMQ and declares its route queues as it starts, so
/// the first burst of misses does not wait for the declarations (tens of ms on quorum
/// queues).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_declares_its_route_queues_as_it_starts() {
    let up = FakeUpstream::start().await;
    let mut c = config(&up.url(), vec![route("early")]);
    c.workers.embedded = 0; // no consumer to declare the queue either
    let b = backends(Backend::Real, &mut c).await;
    let queue = c.queues()[0].clone();
    // Another program looking at the broker, on the test namespace's terms.
    let look = AmqpBus::with_queue_expiry(&amqp_url(), &c.store.namespace, c.bus.queue_expiry);
    assert!(
        look.queue_stats(&queue).await.is_err(),
        "{queue} exists before any gateway started"
    );
    let gw = TestGateway::start(c, b).await;
    eventually("the route queue is declared", WITHIN, || async {
        look.queue_stats(&queue).await.is_ok()
    })
    .await;
    gw.stop().await;
}
