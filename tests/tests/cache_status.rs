//! `Cache-Status` (RFC 9211) for every outcome of the fragment endpoint: `hit` when the
//! answer came from the cache without going forward (a stale copy, a remembered failure
//! too), `fwd=miss` when the request went forward: it waited for a build (`Prefer:
//! wait`), or left one pending. `ttl` is the freshness left, negative when stale;
//! `stored` says the build it waited for was stored; `detail` names the rest.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::VecDeque;
use std::time::Duration;

use reqwest::StatusCode;
use tessera_tests::harness::{Backend, TestGateway, backends, client, config, route};
use tessera_tests::upstream::{FakeUpstream, Script};

async fn get(url: &str, wait: Option<u64>) -> (StatusCode, String) {
    let mut r = client().get(url);
    if let Some(secs) = wait {
        r = r.header("prefer", format!("wait={secs}"));
    }
    let r = r.send().await.unwrap();
    let status = r
        .headers()
        .get("cache-status")
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default();
    (r.status(), status)
}

/// `status` is `tessera; {first}; ttl=N{rest}` with `N` of the sign asked for.
fn assert_ttl(status: &str, first: &str, positive: bool, rest: &str) {
    let ttl = status
        .strip_prefix(&format!("tessera; {first}; ttl="))
        .and_then(|t| t.strip_suffix(rest))
        .unwrap_or_else(|| panic!("{status:?} is not `tessera; {first}; ttl=N{rest}`"));
    let ttl: i64 = ttl.parse().unwrap_or_else(|_| panic!("ttl of {status:?}"));
    assert_eq!(ttl > 0, positive, "{status:?}");
    assert!(
        positive || ttl < 0,
        "a stale copy's ttl is negative: {status:?}"
    );
}

#[tokio::test]
async fn every_outcome_has_its_rfc_9211_cache_status() {
    let up = FakeUpstream::start().await;
    let mut flaky = route("flaky");
    flaky.fresh = Duration::from_secs(1);
    flaky.max_attempts = 1;
    up.script(
        "/_render/flaky",
        Script {
            statuses: VecDeque::from([200]),
            then: Some(500),
            ..Script::default()
        },
    );
    let mut broken = route("broken");
    broken.max_attempts = 1;
    up.script(
        "/_render/broken",
        Script {
            then: Some(500),
            ..Script::default()
        },
    );
    // Two fragments of one route: the first stays pending, the second is waited for (its
    // own build, so it cannot have been built already when asked).
    let mut plain = route("plain");
    plain.params = vec!["x".into()];
    let mut c = config(&up.url(), vec![plain, flaky, broken]);
    let b = backends(Backend::Memory, &mut c).await;
    let gw = TestGateway::start(c, b).await;
    let at = |name: &str| gw.at(&format!("/fragments/{name}"));

    // Pending: the request went forward, nothing to serve yet.
    assert_eq!(
        get(&at("plain?x=1"), None).await,
        (
            StatusCode::ACCEPTED,
            "tessera; fwd=miss; detail=pending".into()
        )
    );
    // Waited: it went forward and was answered with what the build stored; not a hit.
    let (status, cache) = get(&at("plain?x=2"), Some(5)).await;
    assert_eq!(status, StatusCode::OK);
    assert_ttl(&cache, "fwd=miss; stored", true, "");
    // Hit: fresh from the cache.
    let (status, cache) = get(&at("plain?x=2"), None).await;
    assert_eq!(status, StatusCode::OK);
    assert_ttl(&cache, "hit", true, "");

    // Stale: still from the cache (its rebuild goes forward on its own): a hit with a
    // negative ttl, not `fwd=stale`.
    assert_eq!(get(&at("flaky"), Some(5)).await.0, StatusCode::OK);
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let (status, cache) = get(&at("flaky"), None).await;
    assert_eq!(status, StatusCode::OK);
    assert_ttl(&cache, "hit", false, "");
    // Stale-if-error: the rebuild failed; the old copy is served because of it.
    tessera_tests::eventually("the rebuild failed", Duration::from_secs(10), || async {
        get(&at("flaky"), None)
            .await
            .1
            .ends_with("; detail=stale-if-error")
    })
    .await;
    let (status, cache) = get(&at("flaky"), None).await;
    assert_eq!(status, StatusCode::OK);
    assert_ttl(&cache, "hit", false, "; detail=stale-if-error");

    // Failed, after waiting for the build: it went forward, and the build failed.
    assert_eq!(
        get(&at("broken"), Some(5)).await,
        (
            StatusCode::BAD_GATEWAY,
            "tessera; fwd=miss; detail=failed".into()
        )
    );
    // Failed, remembered: answered from the cache without going forward.
    assert_eq!(
        get(&at("broken"), None).await,
        (
            StatusCode::BAD_GATEWAY,
            "tessera; hit; detail=failed".into()
        )
    );
    gw.stop().await;
}
