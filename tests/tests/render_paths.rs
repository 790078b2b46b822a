//! Render paths are the workers' (issue 29, item 3): public requests for them are refused
//! however they are spelt, unless `gateway.public_render_paths` opens them; workers prove
//! themselves with `Tessera-Render-Token`, which no client can pass through the gateway.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use reqwest::StatusCode;
use tessera_tests::harness::{Backend, TestGateway, backends, client, config, route};
use tessera_tests::upstream::FakeUpstream;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const TOKEN: &str = "0123456789abcdef0123456789abcdef";

async fn gateway(
    up: &FakeUpstream,
    change: impl FnOnce(&mut tessera_protocol::Config),
) -> TestGateway {
    let mut c = config(&up.url(), vec![route("slow"), route("plain")]);
    change(&mut c);
    let b = backends(Backend::Memory, &mut c).await;
    TestGateway::start(c, b).await
}

/// The status of `GET {target}` sent byte for byte (a client library would normalize it).
async fn raw_status(gw: &TestGateway, target: &str) -> u16 {
    let addr = gw.url.trim_start_matches("http://");
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let head = format!("GET {target} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    s.write_all(head.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut answer))
        .await
        .expect("an answer within 10 s")
        .unwrap();
    let answer = String::from_utf8_lossy(&answer);
    answer
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("no status line: {answer:?}"))
}

/// Spellings of `/_render/slow` that one upstream or another routes to it.
const HOSTILE: [&str; 16] = [
    "/_render/slow",
    "/_render/slow?x=1",
    "/_render/slow/",
    "//_render//slow",
    "/_RENDER/Slow",
    "/_render/slow.json",
    "/_render/slow;jsessionid=1",
    "/%5Frender/%73low",
    "/_render%2Fslow",
    "/_render%252Fslow",
    "/x/../_render/slow",
    "/x/%2e%2e/_render/slow",
    "/_render/./slow",
    "/_render/slow%00",
    "/_render/slow/more",
    "http://evil.example/_render/slow",
];

#[tokio::test]
async fn render_paths_are_refused_to_the_public_however_spelt() {
    let up = FakeUpstream::start().await;
    let gw = gateway(&up, |_| {}).await;
    for target in HOSTILE {
        let status = raw_status(&gw, target).await;
        assert!(status == 404 || status == 400, "{target} answered {status}");
    }
    for method in ["HEAD", "POST", "OPTIONS"] {
        let r = client()
            .request(method.parse().unwrap(), gw.at("/_render/plain"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::NOT_FOUND, "{method}");
    }
    let r = client().get(gw.at("/_render/slow")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    assert_eq!(r.headers()["content-type"], "application/problem+json");
    assert!(
        up.paths().is_empty(),
        "render paths reached the upstream: {:?}",
        up.paths()
    );
    // Everything else is proxied as before, and the workers still render.
    assert_eq!(raw_status(&gw, "/_render/slower").await, 200);
    assert_eq!(raw_status(&gw, "/products/_render/slow").await, 200);
    let built = client()
        .get(gw.at("/fragments/slow"))
        .header("prefer", "wait=5")
        .send()
        .await
        .unwrap();
    assert_eq!(built.status(), StatusCode::OK);
    assert_eq!(
        up.paths(),
        ["/_render/slower", "/products/_render/slow", "/_render/slow"]
    );
    gw.stop().await;
}

#[tokio::test]
async fn workers_send_the_render_token_and_clients_cannot() {
    let up = FakeUpstream::start().await;
    let gw = gateway(&up, |c| c.workers.render_token = TOKEN.into()).await;
    // A client's own token never reaches the application.
    let echo: serde_json::Value = client()
        .get(gw.at("/echo"))
        .header("tessera-render-token", TOKEN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(
        echo["headers"].get("tessera-render-token").is_none(),
        "{echo}"
    );
    assert_eq!(
        echo["headers"]["surrogate-capability"],
        "tessera=\"ESI/1.0\""
    );
    // The workers' render requests carry it, and say that ESI may be answered.
    let built = client()
        .get(gw.at("/fragments/slow"))
        .header("prefer", "wait=5")
        .header("tessera-render-token", "forged-by-the-client")
        .send()
        .await
        .unwrap();
    assert_eq!(built.status(), StatusCode::OK);
    let renders = up.requests("/_render/slow");
    assert_eq!(renders.len(), 1);
    let headers = &renders[0].1;
    let tokens: Vec<_> = headers.get_all("tessera-render-token").iter().collect();
    assert_eq!(tokens, [TOKEN], "{headers:?}");
    assert_eq!(headers["surrogate-capability"], "tessera=\"ESI/1.0\"");
    gw.stop().await;
}

#[tokio::test]
async fn without_a_token_renders_carry_none() {
    let up = FakeUpstream::start().await;
    let gw = gateway(&up, |_| {}).await;
    let built = client()
        .get(gw.at("/fragments/plain"))
        .header("prefer", "wait=5")
        .send()
        .await
        .unwrap();
    assert_eq!(built.status(), StatusCode::OK);
    let renders = up.requests("/_render/plain");
    let headers = &renders[0].1;
    assert!(!headers.contains_key("tessera-render-token"), "{headers:?}");
    assert_eq!(headers["surrogate-capability"], "tessera=\"ESI/1.0\"");
    gw.stop().await;
}

#[tokio::test]
async fn an_operator_can_open_the_render_paths() {
    let up = FakeUpstream::start().await;
    let gw = gateway(&up, |c| c.gateway.public_render_paths = true).await;
    let r = client()
        .get(gw.at("/_render/slow"))
        .header("tessera-render-token", TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let seen = up.requests("/_render/slow");
    assert_eq!(seen.len(), 1);
    assert!(
        !seen[0].1.contains_key("tessera-render-token"),
        "still never passed on"
    );
    gw.stop().await;
}
