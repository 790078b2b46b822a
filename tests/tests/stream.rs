//! The push stream (`/_tessera/stream`): one connection carries a page's fragments, each
//! sent as it is built, with the fragment endpoint's guarantees.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use futures_util::StreamExt;
use reqwest::StatusCode;
use serde_json::Value;
use tessera_protocol::FragmentRoute;
use tessera_tests::eventually;
use tessera_tests::harness::{Backend, TestGateway, backends, client, config, route};
use tessera_tests::upstream::FakeUpstream;

/// One server-sent event: its name and data.
#[derive(Debug)]
struct Event {
    name: String,
    data: Value,
}

/// Opens a stream for `srcs` with `cookie`, returning the events in the order they came
/// (until the gateway ends the stream) and the time each came, from the start.
async fn events(gw: &TestGateway, srcs: &[&str], cookie: Option<&str>) -> Vec<(Event, Duration)> {
    let query: Vec<String> = srcs
        .iter()
        .map(|s| format!("src={}", urlencode(s)))
        .collect();
    let mut req = client().get(gw.at(&format!("/_tessera/stream?{}", query.join("&"))));
    if let Some(c) = cookie {
        req = req.header("cookie", c);
    }
    let started = std::time::Instant::now();
    let r = req.send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(
        r.headers()["content-type"],
        "text/event-stream; charset=utf-8"
    );
    let mut body = r.bytes_stream();
    let mut text = String::new();
    let mut out = Vec::new();
    while let Some(chunk) = body.next().await {
        text.push_str(std::str::from_utf8(&chunk.unwrap()).unwrap());
        while let Some(end) = text.find("\n\n") {
            let block: String = text.drain(..end + 2).collect();
            let mut name = String::from("message");
            let mut data = None;
            for line in block.lines() {
                if let Some(n) = line.strip_prefix("event: ") {
                    name = n.to_string();
                } else if let Some(d) = line.strip_prefix("data: ") {
                    data = Some(serde_json::from_str(d).unwrap());
                }
            }
            if let Some(data) = data {
                out.push((Event { name, data }, started.elapsed()));
            }
        }
    }
    out
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'/' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

async fn gateway(up: &FakeUpstream, routes: Vec<FragmentRoute>, kind: Backend) -> TestGateway {
    let mut c = config(&up.url(), routes);
    c.gateway.max_wait = Duration::from_secs(5);
    c.workers.embedded = 8;
    let b = backends(kind, &mut c).await;
    TestGateway::start(c, b).await
}

async fn metric(gw: &TestGateway, name: &str) -> f64 {
    let text = tessera_tests::harness::text(format!("{}/metrics", gw.admin)).await;
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .unwrap_or_else(|| panic!("{name} in {text}"))
        .parse()
        .unwrap()
}

/// Every fragment comes as soon as it is ready, errors too, all on one stream; the
/// builds are queued at once (two 1.5 s renders end together), nothing comes twice, and
/// the stream ends saying nothing is left.
async fn fragments_arrive_as_they_are_built(kind: Backend) {
    let up = FakeUpstream::start().await;
    let routes = vec![
        up.render("warm", 0, "<b>warm</b>"),
        up.render("slow", 1_500, "<b>slow</b>"),
        up.render("slower", 1_500, "<b>slower</b>"),
    ];
    let gw = gateway(&up, routes, kind).await;
    let warmed = client()
        .get(gw.at("/fragments/warm"))
        .header("prefer", "wait=5")
        .send()
        .await
        .unwrap();
    assert_eq!(warmed.status(), StatusCode::OK);

    let got = events(
        &gw,
        &[
            "/fragments/slow",
            "/fragments/warm",
            "/fragments/nope",
            "/fragments/slower",
        ],
        None,
    )
    .await;
    let names: Vec<&str> = got.iter().map(|(e, _)| e.name.as_str()).collect();
    assert_eq!(
        names,
        ["fragment", "fragment", "fragment", "fragment", "end"],
        "{got:?}"
    );
    let by_src = |src: &str| {
        got.iter()
            .find(|(e, _)| e.data["src"] == src)
            .unwrap_or_else(|| panic!("{src} in {got:?}"))
    };
    let (warm, warm_at) = by_src("/fragments/warm");
    assert_eq!(
        (warm.data["status"].as_u64(), warm.data["html"].as_str()),
        (Some(200), Some("<b>warm</b>"))
    );
    assert_eq!(by_src("/fragments/nope").0.data["status"], 404);
    let (slow, slow_at) = by_src("/fragments/slow");
    let (slower, slower_at) = by_src("/fragments/slower");
    assert_eq!(slow.data["html"], "<b>slow</b>");
    assert_eq!(slower.data["html"], "<b>slower</b>");
    assert!(
        warm_at < slow_at,
        "a ready fragment is not held back by a cold one"
    );
    let apart = slow_at.abs_diff(*slower_at);
    assert!(
        apart < Duration::from_millis(1_000),
        "both builds were queued at once: {slow_at:?} and {slower_at:?}"
    );
    assert_eq!(got.last().unwrap().0.data["pending"], serde_json::json!([]));
    assert_eq!(up.renders("/_render/slow"), 1);
    eventually(
        "the stream is closed in the metrics",
        Duration::from_secs(5),
        || async { metric(&gw, "tessera_streams").await == 0.0 },
    )
    .await;
    gw.stop().await;
}

/// A fragment that varies on a cookie is built and sent for the stream's own cookie only.
async fn vary_fragments_follow_the_streams_cookies(kind: Backend) {
    let up = FakeUpstream::start().await;
    let mut me = route("me");
    me.vary = vec!["cookie:sid".parse().unwrap()];
    let gw = gateway(&up, vec![me], kind).await;
    for sid in ["alice", "bob"] {
        let got = events(
            &gw,
            &["/fragments/me"],
            Some(&format!("sid={sid}; other=x")),
        )
        .await;
        let html = got[0].0.data["html"].as_str().unwrap().to_string();
        assert!(html.contains(&format!("sid={sid}")), "{sid}: {html}");
        assert!(
            !html.contains("other"),
            "only vary cookies are forwarded: {html}"
        );
    }
    gw.stop().await;
}

/// A fragment still not built when the stream's time (`gateway.max_wait`) is up is listed
/// as pending in `end`, for the client to ask again.
async fn what_is_not_built_in_time_is_listed_as_pending(kind: Backend) {
    let up = FakeUpstream::start().await;
    let mut glacial = up.render("glacial", 6_000, "g");
    glacial.build_timeout = Duration::from_secs(20);
    let routes = vec![up.render("quick", 0, "q"), glacial];
    let mut c = config(&up.url(), routes);
    c.gateway.max_wait = Duration::from_secs(3);
    let b = backends(kind, &mut c).await;
    let gw = TestGateway::start(c, b).await;
    let got = events(&gw, &["/fragments/glacial", "/fragments/quick"], None).await;
    assert_eq!(got.len(), 2, "{got:?}");
    assert_eq!(got[0].0.data["src"], "/fragments/quick");
    assert_eq!(got[1].0.name, "end");
    assert_eq!(
        got[1].0.data["pending"],
        serde_json::json!(["/fragments/glacial"])
    );
    assert!(
        got[1].1 < Duration::from_secs(5),
        "ended at max_wait: {:?}",
        got[1].1
    );
    gw.stop().await;
}

tessera_tests::on_both_backends!(
    fragments_arrive_as_they_are_built,
    vary_fragments_follow_the_streams_cookies,
    what_is_not_built_in_time_is_listed_as_pending,
);

/// `GET /_tessera/stream?{query}`, answered (its body not read).
async fn open(gw: &TestGateway, query: &str) -> reqwest::Response {
    client()
        .get(gw.at(&format!("/_tessera/stream?{query}")))
        .send()
        .await
        .unwrap()
}

/// Bad requests are refused with a problem; past `gateway.max_streams` a stream is a
/// 503, and a client that goes away frees its place.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_are_limited_and_checked() {
    let up = FakeUpstream::start().await;
    let mut c = config(&up.url(), vec![up.render("slow", 3_000, "s")]);
    c.gateway.max_streams = 1;
    let b = backends(Backend::Memory, &mut c).await;
    let gw = TestGateway::start(c, b).await;
    let many: Vec<String> = (0..33)
        .map(|i| format!("src=/fragments/slow%3Fi%3D{i}"))
        .collect();
    for query in [
        "",
        "src=fragments/slow",
        "src=//elsewhere/x",
        many.join("&").as_str(),
    ] {
        let r = open(&gw, query).await;
        assert_eq!(r.status(), StatusCode::BAD_REQUEST, "{query}");
        assert_eq!(r.headers()["content-type"], "application/problem+json");
    }
    let r = client()
        .post(gw.at("/_tessera/stream?src=/fragments/slow"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::METHOD_NOT_ALLOWED);

    let held = open(&gw, "src=/fragments/slow").await;
    assert_eq!(held.status(), StatusCode::OK);
    assert_eq!(metric(&gw, "tessera_streams").await, 1.0);
    let refused = open(&gw, "src=/fragments/slow").await;
    assert_eq!(refused.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(refused.headers().contains_key("retry-after"));
    drop(held);
    eventually(
        "a stream whose client left is closed",
        Duration::from_secs(5),
        || async { metric(&gw, "tessera_streams").await == 0.0 },
    )
    .await;
    gw.stop().await;
}

/// Sources that name one fragment (junk params do not make another) are looked up once,
/// and each gets its event, with the same HTML.
#[tokio::test]
async fn sources_naming_one_fragment_share_one_lookup() {
    let up = FakeUpstream::start().await;
    let mut recs = up.render("recs", 0, "<b>\"recs\"\n</b>");
    recs.params = vec!["id".into()];
    let gw = gateway(&up, vec![recs], Backend::Memory).await;
    let warmed = client()
        .get(gw.at("/fragments/recs?id=1"))
        .header("prefer", "wait=5")
        .send()
        .await
        .unwrap();
    assert_eq!(warmed.status(), StatusCode::OK);
    let lookups = || async {
        let text = tessera_tests::harness::text(format!("{}/metrics", gw.admin)).await;
        tessera_tests::metric(
            &text,
            "tessera_requests_total{route=\"recs\",cache=\"hit\"}",
        )
    };
    let before = lookups().await;
    let srcs = [
        "/fragments/recs?id=1&junk=1",
        "/fragments/recs?junk=2&id=1",
        "/fragments/recs?id=1",
        "/fragments/recs?id=2&junk=1",
    ];
    let got = events(&gw, &srcs, None).await;
    let fragments: Vec<&Event> = got
        .iter()
        .map(|(e, _)| e)
        .filter(|e| e.name == "fragment")
        .collect();
    assert_eq!(fragments.len(), 4, "{got:?}");
    for src in &srcs[..3] {
        let e = fragments.iter().find(|e| e.data["src"] == *src).unwrap();
        assert_eq!(e.data["html"], "<b>\"recs\"\n</b>", "{src}");
    }
    assert_eq!(
        lookups().await - before,
        1.0,
        "the three sources of id=1 were one lookup (id=2 was built, no hit)"
    );
    assert_eq!(up.renders("/_render/recs"), 2, "id=1 and id=2, once each");
    gw.stop().await;
}
