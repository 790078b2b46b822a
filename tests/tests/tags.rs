//! Purge by tag (`Surrogate-Key`) end to end: two gateways sharing one store and bus, the
//! embedded workers, a fake upstream that tags every fragment. Every scenario runs on both
//! backends (memory; memcached + RabbitMQ).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use futures_util::StreamExt;
use reqwest::StatusCode;
use tessera_tests::harness::{Backend, TestGateway, backends, client, config, route, text};
use tessera_tests::upstream::{FakeUpstream, Script};
use tessera_tests::{eventually, metric};

const WITHIN: Duration = Duration::from_secs(30);
const ROUTES: [&str; 3] = ["shelf", "product", "teaser"];
const PER_ROUTE: usize = 100;

/// Fragment `i` of every route is tagged `item-{i}` and `group-{i % 10}`.
fn tags_of(query: &str) -> Vec<(String, String)> {
    let i: usize = query
        .strip_prefix("i=")
        .and_then(|i| i.parse().ok())
        .unwrap_or(0);
    vec![("surrogate-key".into(), format!("item-{i} group-{}", i % 10))]
}

/// A fake upstream tagging and numbering every render of `routes`.
async fn tagging_upstream(routes: &[&str]) -> FakeUpstream {
    let up = FakeUpstream::start().await;
    for name in routes {
        up.script(
            &format!("/_render/{name}"),
            Script {
                headers_for_query: Some(tags_of),
                numbered: true,
                ..Script::default()
            },
        );
    }
    up
}

/// Renders of fragment `i` of `route` so far.
fn renders(up: &FakeUpstream, route: &str, i: usize) -> usize {
    let query = format!("i={i}");
    up.requests(&format!("/_render/{route}"))
        .iter()
        .filter(|(q, _)| q.as_deref() == Some(query.as_str()))
        .count()
}

async fn get(url: &str, wait: bool) -> reqwest::Response {
    let mut r = client().get(url);
    if wait {
        r = r.header("prefer", "wait=10");
    }
    r.send().await.expect("request answered")
}

/// Two gateways on one set of backends, routes taking `i`, L1 kept long enough that
/// only events and tags can retire what it holds.
async fn two_gateways(
    kind: Backend,
    up: &FakeUpstream,
    fresh: Duration,
) -> (TestGateway, TestGateway) {
    let routes = ROUTES
        .iter()
        .map(|name| {
            let mut r = route(name);
            r.params = vec!["i".into()];
            r.fresh = fresh;
            r.stale = Duration::from_secs(600);
            r
        })
        .collect();
    let mut c = config(&up.url(), routes);
    c.cache.ttl = Duration::from_secs(60);
    let b = backends(kind, &mut c).await;
    let one = TestGateway::start(c.clone(), b.clone()).await;
    let two = TestGateway::start(c, b).await;
    (one, two)
}

async fn purge_tag(gw: &TestGateway, tag: &str) -> u64 {
    let r = client()
        .delete(format!("{}/tags/{tag}", gw.admin))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["tag"], tag);
    body["purged_at"].as_u64().unwrap()
}

fn every_fragment() -> impl Iterator<Item = (&'static str, usize)> {
    ROUTES
        .iter()
        .flat_map(|r| (0..PER_ROUTE).map(move |i| (*r, i)))
}

/// Every fragment of every route at `gw`, with its route and `i`.
fn urls(gw: &TestGateway) -> Vec<(&'static str, usize, String)> {
    every_fragment()
        .map(|(r, i)| (r, i, gw.at(&format!("/fragments/{r}?i={i}"))))
        .collect()
}

/// Builds every fragment once (through `one`), then has both gateways' L1 hold it.
async fn warm(up: &FakeUpstream, one: &TestGateway, two: &TestGateway) {
    futures_util::stream::iter(urls(one))
        .for_each_concurrent(32, |(r, i, url)| async move {
            let first = get(&url, true).await;
            assert_eq!(first.status(), StatusCode::OK, "{r} {i}");
            assert!(
                !first.headers().contains_key("surrogate-key"),
                "Surrogate-Key is not for browsers"
            );
        })
        .await;
    for (r, i, url) in urls(two) {
        assert_eq!(get(&url, false).await.status(), StatusCode::OK, "{r} {i}");
    }
    for (r, i) in every_fragment() {
        assert_eq!(renders(up, r, i), 1, "{r} {i} built once");
    }
}

/// Purging `group-3` retires exactly the 30 fragments carrying it, on every route and in
/// both gateways (whose L1 held them): each next request is a 202 (a rebuild queued, as
/// for a cold miss) or, once rebuilt, the new render; the 270 others stay hits, with no
/// new render.
pub async fn a_tag_purge_retires_exactly_its_fragments(kind: Backend) {
    let up = tagging_upstream(&ROUTES).await;
    let (one, two) = two_gateways(kind, &up, Duration::from_secs(300)).await;
    warm(&up, &one, &two).await;

    purge_tag(&one, "group-3").await;

    // The other gateway first: it hears of the purge from the event, which takes a moment
    // to arrive; one retired fragment shows when it did.
    let first = two.at("/fragments/shelf?i=3");
    eventually("the other gateway heard of the purge", WITHIN, || async {
        let answer = get(&first, false).await;
        let status = answer.status();
        !(status == StatusCode::OK && answer.text().await.unwrap().ends_with(" #1"))
    })
    .await;
    for (r, i, url) in urls(&two) {
        if (r, i) == ("shelf", 3) {
            continue;
        }
        let answer = get(&url, false).await;
        if i % 10 == 3 {
            assert_eq!(answer.status(), StatusCode::ACCEPTED, "{r} {i} is retired");
        } else {
            assert_eq!(answer.status(), StatusCode::OK, "{r} {i} stays");
            let status = answer.headers()["cache-status"].to_str().unwrap();
            assert!(status.contains("hit"), "{r} {i}: {status}");
        }
    }
    // The purging gateway: a retired fragment is pending, or already the new render.
    for (r, i, url) in urls(&one) {
        let answer = get(&url, false).await;
        let status = answer.status();
        let body = answer.text().await.unwrap();
        let new = status == StatusCode::OK && !body.ends_with(" #1");
        if i % 10 == 3 {
            assert!(
                status == StatusCode::ACCEPTED || new,
                "{r} {i}: {status} {body}"
            );
        } else {
            assert!(status == StatusCode::OK && !new, "{r} {i}: {status} {body}");
        }
    }
    // Rebuilt: the new render is served by both, and is not retired again.
    for (r, i) in every_fragment().filter(|(_, i)| i % 10 == 3) {
        for gw in [&one, &two] {
            let answer = get(&gw.at(&format!("/fragments/{r}?i={i}")), true).await;
            assert_eq!(answer.status(), StatusCode::OK, "{r} {i}");
            let body = answer.text().await.unwrap();
            assert!(
                !body.ends_with(" #1"),
                "{r} {i} served the purged copy: {body}"
            );
        }
    }
    for (r, i) in every_fragment() {
        let n = renders(&up, r, i);
        if i % 10 == 3 {
            assert!(n >= 2, "{r} {i} rebuilt ({n} renders)");
        } else {
            assert_eq!(n, 1, "{r} {i} never rendered again");
        }
    }
    one.stop().await;
    two.stop().await;
}

/// A fragment past fresh is served stale while it rebuilds, unless a purge of one of its
/// tags retired it: then it is a 202, like a cold miss, in both gateways.
pub async fn a_retired_fragment_is_not_served_stale(kind: Backend) {
    let up = tagging_upstream(&ROUTES).await;
    let (one, two) = two_gateways(kind, &up, Duration::from_secs(1)).await;
    let url = |gw: &TestGateway, i: usize| gw.at(&format!("/fragments/shelf?i={i}"));
    for i in [1, 2, 11] {
        assert_eq!(get(&url(&one, i), true).await.status(), StatusCode::OK);
        assert_eq!(get(&url(&two, i), false).await.status(), StatusCode::OK);
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    purge_tag(&two, "item-1").await;
    // `one` knows of the purge once its event arrives: every entry it holds until then is
    // served as it was.
    eventually("the other gateway heard of the purge", WITHIN, || async {
        let metrics = text(format!("{}/metrics", one.admin)).await;
        metric(&metrics, "tessera_tag_purges_heard_total ") == 1.0
    })
    .await;
    // Untouched fragments are served stale (each asked first at one gateway: its
    // background refresh may be done by the time the other asks).
    for (gw, i) in [(&two, 2), (&one, 11)] {
        let stale = get(&url(gw, i), false).await;
        assert_eq!(stale.status(), StatusCode::OK, "{i} is served stale");
        let status = stale.headers()["cache-status"]
            .to_str()
            .unwrap()
            .to_string();
        assert!(status.starts_with("tessera; hit; ttl=-"), "{i}: {status}");
    }
    // item-1 is only on fragment 1 (11 carries item-11 and group-1).
    let retired = get(&url(&one, 1), false).await;
    assert_eq!(retired.status(), StatusCode::ACCEPTED, "not served stale");
    let rebuilt = get(&url(&two, 1), true).await;
    assert_eq!(rebuilt.status(), StatusCode::OK);
    assert!(!rebuilt.text().await.unwrap().ends_with(" #1"));
    assert_eq!(get(&url(&one, 11), false).await.status(), StatusCode::OK);
    eventually(
        "the stale ones are refreshed in the background",
        WITHIN,
        || async { renders(&up, "shelf", 2) >= 2 && renders(&up, "shelf", 11) >= 2 },
    )
    .await;
    one.stop().await;
    two.stop().await;
}

/// Purges tags through the admin API at `path` (after `/tags/`): the answer.
async fn purge_tags(gw: &TestGateway, path: &str) -> serde_json::Value {
    let r = client()
        .delete(format!("{}/tags/{path}", gw.admin))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    r.json().await.unwrap()
}

/// Whether `gw` serves the first render of `shelf?i={i}` (asked without waiting).
/// Builds shelf fragments 0 to 19 through `one`, and checks `two` serves each first render.
async fn warm_shelf(one: &TestGateway, two: &TestGateway) {
    for i in 0..20 {
        let url = format!("/fragments/shelf?i={i}");
        assert_eq!(get(&one.at(&url), true).await.status(), StatusCode::OK);
        assert!(serves_first_render(two, i).await, "{i}");
    }
}

async fn serves_first_render(gw: &TestGateway, i: usize) -> bool {
    let answer = get(&gw.at(&format!("/fragments/shelf?i={i}")), false).await;
    answer.status() == StatusCode::OK && answer.text().await.unwrap().ends_with(" #1")
}

/// `?all_of=1` retires only the fragments carrying every tag named (13 carries `item-13`
/// and `group-3`; 3 carries `group-3` only), in both gateways; a list retires the
/// fragments of each of its tags. Nothing else is rendered again.
pub async fn all_of_and_lists_retire_exactly_their_fragments(kind: Backend) {
    let up = tagging_upstream(&["shelf"]).await;
    let (one, two) = two_gateways(kind, &up, Duration::from_secs(300)).await;
    warm_shelf(&one, &two).await;
    let body = purge_tags(&one, "item-13,group-3?all_of=1").await;
    assert_eq!(body["all_of"], true);
    assert!(!serves_first_render(&one, 13).await, "retired at once here");
    eventually("the other gateway heard of the purge", WITHIN, || async {
        !serves_first_render(&two, 13).await
    })
    .await;
    for gw in [&one, &two] {
        for i in (0..20).filter(|i| *i != 13) {
            assert!(serves_first_render(gw, i).await, "{i} stays");
        }
    }

    let body = purge_tags(&two, "item-1,item-2").await;
    assert_eq!(body["tags"], serde_json::json!(["item-1", "item-2"]));
    for i in [1, 2] {
        assert!(!serves_first_render(&two, i).await, "{i} retired at once");
    }
    eventually("the other gateway heard of the purge", WITHIN, || async {
        !serves_first_render(&one, 1).await && !serves_first_render(&one, 2).await
    })
    .await;
    for gw in [&one, &two] {
        for i in [3, 11, 12] {
            assert!(serves_first_render(gw, i).await, "{i} stays");
        }
    }
    for i in [1, 2, 13] {
        let url = format!("/fragments/shelf?i={i}");
        let rebuilt = get(&one.at(&url), true).await;
        assert_eq!(rebuilt.status(), StatusCode::OK);
        assert!(!rebuilt.text().await.unwrap().ends_with(" #1"), "{i}");
    }
    for i in (0..20).filter(|i| ![1, 2, 13].contains(i)) {
        assert_eq!(renders(&up, "shelf", i), 1, "{i} never rendered again");
    }
    one.stop().await;
    two.stop().await;
}

/// What `gw` answers for `shelf?i={i}`, asked without waiting: status, whether the body
/// is the first render, and `Cache-Status`.
async fn answer(gw: &TestGateway, i: usize) -> (StatusCode, bool, String) {
    let answer = get(&gw.at(&format!("/fragments/shelf?i={i}")), false).await;
    let status = answer.status();
    let cache = answer.headers()["cache-status"]
        .to_str()
        .unwrap()
        .to_string();
    let first = answer.text().await.unwrap().ends_with(" #1");
    (status, first, cache)
}

/// A soft purge of `group-3` (fragments 3 and 13): both are served stale at once, the
/// old body with `fwd=stale`, never a placeholder, in both gateways, while exactly one
/// rebuild each runs (renders take 1.5 s, and are asked for again and again meanwhile);
/// then the new body is served. A soft purge of one fragment (5) does the same.
pub async fn a_soft_purge_serves_stale_while_one_rebuild_runs(kind: Backend) {
    let up = tagging_upstream(&["shelf"]).await;
    let (one, two) = two_gateways(kind, &up, Duration::from_secs(300)).await;
    warm_shelf(&one, &two).await;
    let slow = Script {
        headers_for_query: Some(tags_of),
        numbered: true,
        delay: Duration::from_millis(1500),
        ..Script::default()
    };
    up.script("/_render/shelf", slow);
    let body = purge_tags(&one, "group-3?soft=1").await;
    assert_eq!(body["soft"], true);
    let r = client()
        .delete(format!("{}/fragments/shelf?i=5&soft=1", two.admin))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    for gw in [&one, &two] {
        let metrics = text(format!("{}/metrics", gw.admin)).await;
        assert_eq!(metric(&metrics, "tessera_soft_purges_total "), 1.0);
    }
    for _ in 0..3 {
        for i in [3, 13] {
            let (status, first, cache) = answer(&one, i).await;
            assert_eq!(status, StatusCode::OK, "{i}: never a placeholder");
            assert!(first, "{i}: the old body");
            assert_eq!(cache, "tessera; fwd=stale; detail=soft-purge", "{i}");
        }
        let (status, first, _) = answer(&two, 5).await;
        assert!(status == StatusCode::OK && first, "5: the old body, stale");
        for gw in [&one, &two] {
            for i in [3, 5, 13] {
                let (status, _, cache) = answer(gw, i).await;
                assert_eq!(status, StatusCode::OK, "{i}: {cache}");
            }
            let (status, first, cache) = answer(gw, 4).await;
            assert!(status == StatusCode::OK && first, "4 untouched");
            assert!(cache.starts_with("tessera; hit; ttl="), "4: {cache}");
        }
    }
    eventually("the new bodies are served", WITHIN, || async {
        let mut all = true;
        for gw in [&one, &two] {
            for i in [3, 5, 13] {
                all &= !answer(gw, i).await.1;
            }
        }
        all
    })
    .await;
    for i in 0..20 {
        let expected = if [3, 5, 13].contains(&i) { 2 } else { 1 };
        assert_eq!(renders(&up, "shelf", i), expected, "{i}");
    }
    one.stop().await;
    two.stop().await;
}

/// A soft purge of a whole route (`teaser`, 3 fragments): its generation stays, every
/// fragment is served stale at once (old body, `fwd=stale`), in both gateways, while one
/// rebuild each runs; then the new bodies are served. Another route is untouched.
pub async fn a_soft_route_purge_serves_stale_while_one_rebuild_runs(kind: Backend) {
    let up = tagging_upstream(&["teaser", "shelf"]).await;
    let (one, two) = two_gateways(kind, &up, Duration::from_secs(300)).await;
    let url = |gw: &TestGateway, route: &str, i: usize| gw.at(&format!("/fragments/{route}?i={i}"));
    for (route, i) in [("teaser", 0), ("teaser", 1), ("teaser", 2), ("shelf", 0)] {
        assert_eq!(
            get(&url(&one, route, i), true).await.status(),
            StatusCode::OK
        );
        assert_eq!(
            get(&url(&two, route, i), false).await.status(),
            StatusCode::OK
        );
    }
    let slow = Script {
        headers_for_query: Some(tags_of),
        numbered: true,
        delay: Duration::from_millis(1500),
        ..Script::default()
    };
    up.script("/_render/teaser", slow);
    let r = client()
        .delete(format!("{}/routes/teaser?soft=1", one.admin))
        .send()
        .await
        .unwrap();
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["soft"], true);
    let stale = |answer: reqwest::Response| async move {
        let status = answer.status();
        let cache = answer.headers()["cache-status"]
            .to_str()
            .unwrap()
            .to_string();
        let old = answer.text().await.unwrap().ends_with(" #1");
        (status, old, cache)
    };
    for i in 0..3 {
        let (status, old, cache) = stale(get(&url(&one, "teaser", i), false).await).await;
        assert!(
            status == StatusCode::OK && old,
            "{i}: the old body, never a placeholder"
        );
        assert_eq!(cache, "tessera; fwd=stale; detail=soft-purge", "{i}");
    }
    for gw in [&one, &two] {
        for i in 0..3 {
            let status = get(&url(gw, "teaser", i), false).await.status();
            assert_eq!(status, StatusCode::OK, "{i}");
        }
        let (status, old, cache) = stale(get(&url(gw, "shelf", 0), false).await).await;
        assert!(
            status == StatusCode::OK && old && cache.contains("hit"),
            "{cache}"
        );
    }
    eventually("the new bodies are served", WITHIN, || async {
        let mut all = true;
        for gw in [&one, &two] {
            for i in 0..3 {
                all &= !stale(get(&url(gw, "teaser", i), false).await).await.1;
            }
        }
        all
    })
    .await;
    for i in 0..3 {
        assert_eq!(renders(&up, "teaser", i), 2, "{i} rebuilt once");
    }
    assert_eq!(renders(&up, "shelf", 0), 1);
    one.stop().await;
    two.stop().await;
}

tessera_tests::on_both_backends!(
    a_soft_route_purge_serves_stale_while_one_rebuild_runs,
    a_tag_purge_retires_exactly_its_fragments,
    a_retired_fragment_is_not_served_stale,
    all_of_and_lists_retire_exactly_their_fragments,
    a_soft_purge_serves_stale_while_one_rebuild_runs,
);

/// A render answer over the tag limit fails its build, naming the limit, and is not
/// retried; a proxied page never passes `Surrogate-Key` on to the browser.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_many_tags_fail_the_build_and_pages_do_not_leak_them() {
    let up = FakeUpstream::start().await;
    let many: Vec<String> = (0..=tessera_protocol::tags::MAX_TAGS)
        .map(|i| format!("t{i}"))
        .collect();
    for path in ["/_render/overtagged", "/page"] {
        up.script(
            path,
            Script {
                headers: vec![("surrogate-key".into(), many.join(" "))],
                ..Script::default()
            },
        );
    }
    let mut c = config(&up.url(), vec![route("overtagged")]);
    let b = backends(Backend::Memory, &mut c).await;
    let gw = TestGateway::start(c, b).await;
    let refused = get(&gw.at("/fragments/overtagged"), true).await;
    assert_eq!(refused.status(), StatusCode::BAD_GATEWAY);
    assert_eq!(up.renders("/_render/overtagged"), 1, "not retried");
    let status: serde_json::Value =
        serde_json::from_str(&text(format!("{}/api/status", gw.admin)).await).unwrap();
    let error = status["recent_failures"][0]["error"].as_str().unwrap();
    assert!(
        error.contains("Surrogate-Key") && error.contains("at most 32"),
        "{error}"
    );

    let page = get(&gw.at("/page"), false).await;
    assert_eq!(page.status(), StatusCode::OK);
    assert!(!page.headers().contains_key("surrogate-key"));
    gw.stop().await;
}

/// A composed page's includes are checked too (the batch lookup of ESI includes): after
/// a purge, a retired include is a placeholder (or its new render), never the old copy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retired_include_is_not_composed_into_a_page() {
    let up = tagging_upstream(&["shelf"]).await;
    up.script(
        "/",
        Script {
            body: Some(
                r#"<main><esi:include src="/fragments/shelf?i=3"/><esi:include src="/fragments/shelf?i=4"/></main>"#
                    .into(),
            ),
            headers: vec![("surrogate-control".into(), r#"content="ESI/1.0""#.into())],
            ..Script::default()
        },
    );
    let mut r = route("shelf");
    r.params = vec!["i".into()];
    let mut c = config(&up.url(), vec![r]);
    c.cache.ttl = Duration::from_secs(60);
    let b = backends(Backend::Memory, &mut c).await;
    let gw = TestGateway::start(c, b).await;
    for i in [3, 4] {
        let url = gw.at(&format!("/fragments/shelf?i={i}"));
        assert_eq!(get(&url, true).await.status(), StatusCode::OK);
    }
    let old = |i: usize| format!("/_render/shelf?i={i} cookie=[]</p> #1");
    let page = text(gw.at("/")).await;
    assert!(page.contains(&old(3)) && page.contains(&old(4)), "{page}");

    purge_tag(&gw, "group-3").await;
    let page = text(gw.at("/")).await;
    assert!(
        !page.contains(&old(3)),
        "the retired include was composed: {page}"
    );
    assert!(page.contains(&old(4)), "{page}");
    eventually("the include is rebuilt", WITHIN, || async {
        text(gw.at("/"))
            .await
            .contains("/_render/shelf?i=3 cookie=[]</p> #2")
    })
    .await;
    gw.stop().await;
}
