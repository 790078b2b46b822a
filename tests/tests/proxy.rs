//! The reverse proxy: methods, headers both ways, streaming, upgrades, failures.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use bytes::Bytes;
use reqwest::StatusCode;
use tessera_tests::eventually;
use tessera_tests::harness::{Backend, TestGateway, backends, client, config};
use tessera_tests::upstream::{FakeUpstream, Script};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn gateway(up: &FakeUpstream) -> TestGateway {
    let mut c = config(&up.url(), vec![]);
    let b = backends(Backend::Memory, &mut c).await;
    TestGateway::start(c, b).await
}

#[tokio::test]
async fn every_method_is_forwarded_with_forwarding_headers() {
    let up = FakeUpstream::start().await;
    let gw = gateway(&up).await;
    for method in ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"] {
        let r = client()
            .request(method.parse().unwrap(), gw.at("/echo"))
            .header("x-forwarded-for", "203.0.113.7")
            .header("connection", "x-private-hop")
            .header("x-private-hop", "1")
            .header("x-app", "kept")
            .body("hello")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK, "{method}");
        assert!(
            !r.headers().contains_key("x-hop"),
            "response hop-by-hop header leaked"
        );
        assert!(!r.headers().contains_key("keep-alive"));
        assert!(r.headers()["via"].to_str().unwrap().contains("1.1 tessera"));
        let echo: serde_json::Value = r.json().await.unwrap();
        let h = &echo["headers"];
        assert_eq!(echo["method"], method);
        assert_eq!(echo["body_len"], 5);
        assert_eq!(
            h["x-forwarded-for"], "127.0.0.1",
            "an untrusted client's chain is replaced"
        );
        assert_eq!(h["x-forwarded-proto"], "http");
        assert_eq!(h["x-forwarded-host"], gw.url.trim_start_matches("http://"));
        assert_eq!(
            h["host"],
            gw.url.trim_start_matches("http://"),
            "Host is passed through"
        );
        assert!(h["via"].as_str().unwrap().contains("1.1 tessera"));
        assert_eq!(h["x-app"], "kept");
        assert!(
            h.get("x-private-hop").is_none(),
            "request hop-by-hop header leaked: {h}"
        );
    }
}

/// Forwarding headers as a client forges them, claiming to be 203.0.113.7 over HTTPS.
const FORGED: [(&str, &str); 5] = [
    ("forwarded", "for=203.0.113.7;proto=https"),
    ("x-real-ip", "203.0.113.7"),
    ("x-forwarded-for", "203.0.113.7"),
    ("x-forwarded-host", "evil.example"),
    ("x-forwarded-proto", "https"),
];

/// The headers the upstream's `/echo` saw for a GET carrying [`FORGED`].
async fn echoed_forwarding(gw: &TestGateway) -> serde_json::Value {
    let mut r = client().get(gw.at("/echo"));
    for (name, value) in FORGED {
        r = r.header(name, value);
    }
    let r = r.send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    r.json::<serde_json::Value>().await.unwrap()["headers"].clone()
}

#[tokio::test]
async fn forwarding_headers_from_an_untrusted_client_never_reach_the_upstream() {
    let up = FakeUpstream::start().await;
    let gw = gateway(&up).await;
    let h = echoed_forwarding(&gw).await;
    let host = gw.url.trim_start_matches("http://");
    assert_eq!(h["x-real-ip"], "127.0.0.1", "{h}");
    assert_eq!(h["x-forwarded-for"], "127.0.0.1", "{h}");
    assert_eq!(h["x-forwarded-host"], host, "{h}");
    assert_eq!(h["x-forwarded-proto"], "http", "{h}");
    assert_eq!(
        h["forwarded"],
        format!("for=127.0.0.1;host=\"{host}\";proto=http"),
        "{h}"
    );
    let all = h.to_string();
    assert!(
        !all.contains("203.0.113.7"),
        "a forged address got through: {h}"
    );
    assert!(
        !all.contains("evil.example"),
        "a forged host got through: {h}"
    );
}

#[tokio::test]
async fn a_trusted_proxy_chain_is_kept() {
    let up = FakeUpstream::start().await;
    let mut c = config(&up.url(), vec![]);
    c.gateway.trusted_proxies = vec!["127.0.0.0/8".parse().unwrap()];
    let b = backends(Backend::Memory, &mut c).await;
    let gw = TestGateway::start(c, b).await;
    let h = echoed_forwarding(&gw).await;
    let host = gw.url.trim_start_matches("http://");
    assert_eq!(h["x-forwarded-for"], "203.0.113.7, 127.0.0.1", "{h}");
    assert_eq!(h["x-real-ip"], "203.0.113.7", "{h}");
    assert_eq!(h["x-forwarded-proto"], "https", "{h}");
    assert_eq!(h["x-forwarded-host"], "evil.example", "{h}");
    assert_eq!(
        h["forwarded"],
        format!("for=203.0.113.7;proto=https, for=127.0.0.1;host=\"{host}\";proto=http"),
        "{h}"
    );
}

#[tokio::test]
async fn http2_clients_reach_an_http1_upstream() {
    let up = FakeUpstream::start().await;
    let gw = gateway(&up).await;
    let h2 = reqwest::Client::builder()
        .no_proxy()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    let r = h2.get(gw.at("/echo")).send().await.unwrap();
    assert_eq!(r.version(), reqwest::Version::HTTP_2);
    let echo: serde_json::Value = r.json().await.unwrap();
    assert_eq!(echo["version"], "HTTP/1.1");
}

#[tokio::test]
async fn a_50_mb_download_is_streamed() {
    let up = FakeUpstream::start().await;
    let gw = gateway(&up).await;
    let size = 50 * 1024 * 1024;
    let mut r = client()
        .get(gw.at(&format!("/download?bytes={size}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    // The upstream holds back everything after its first chunk until we have seen bytes:
    // a proxy that buffered the body would never deliver any.
    let first = tokio::time::timeout(Duration::from_secs(5), r.chunk())
        .await
        .expect("first bytes arrive while the upstream is still sending: the proxy streams")
        .unwrap()
        .unwrap();
    up.release_download();
    let mut total = first.len();
    while let Some(chunk) = r.chunk().await.unwrap() {
        total += chunk.len();
    }
    assert_eq!(total, size);
}

#[tokio::test]
async fn a_50_mb_upload_is_streamed() {
    let up = FakeUpstream::start().await;
    let gw = gateway(&up).await;
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(2);
    let body = reqwest::Body::wrap_stream(futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    }));
    let send = tokio::spawn(client().post(gw.at("/upload")).body(body).send());
    let mib = Bytes::from(vec![b'u'; 1024 * 1024]);
    tx.send(Ok(mib.clone())).await.unwrap();
    // Only once the upstream has received the first MiB do we send the rest: a proxy
    // that buffered uploads would wait for the end that never comes.
    eventually(
        "the upstream receives the start of the upload",
        Duration::from_secs(5),
        || async { up.uploaded() > 0 },
    )
    .await;
    for _ in 1..50 {
        tx.send(Ok(mib.clone())).await.unwrap();
    }
    drop(tx);
    let r = send.await.unwrap().unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.text().await.unwrap(), (50 * 1024 * 1024).to_string());
}

#[tokio::test]
async fn websocket_upgrades_pass_through() {
    let up = FakeUpstream::start().await;
    let gw = gateway(&up).await;
    let addr = gw.url.trim_start_matches("http://").to_string();
    let mut s = tokio::net::TcpStream::connect(&addr).await.unwrap();
    s.write_all(
        format!("GET /ws HTTP/1.1\r\nHost: {addr}\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n")
            .as_bytes(),
    )
    .await
    .unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut byte))
            .await
            .unwrap()
            .unwrap();
        head.push(byte[0]);
    }
    let head = String::from_utf8(head).unwrap();
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert!(
        head.to_ascii_lowercase().contains("upgrade: echo"),
        "{head}"
    );
    s.write_all(b"ping over the tunnel").await.unwrap();
    let mut back = [0u8; 20];
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut back))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&back, b"ping over the tunnel");
}

#[tokio::test]
async fn an_unreachable_upstream_is_a_502_problem() {
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let mut c = config(&format!("http://{closed}"), vec![]);
    let b = backends(Backend::Memory, &mut c).await;
    let gw = TestGateway::start(c, b).await;
    let started = Instant::now();
    let r = client().get(gw.at("/anything")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::BAD_GATEWAY);
    assert_eq!(r.headers()["content-type"], "application/problem+json");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "no hang: answered within the timeout"
    );
}

#[tokio::test]
async fn a_slow_upstream_is_a_504_within_the_timeout() {
    let up = FakeUpstream::start().await;
    up.script(
        "/slow",
        Script {
            delay: Duration::from_secs(10),
            ..Script::default()
        },
    );
    let mut c = config(&up.url(), vec![]);
    c.upstream.timeout = Duration::from_secs(1);
    let b = backends(Backend::Memory, &mut c).await;
    let gw = TestGateway::start(c, b).await;
    let started = Instant::now();
    let r = client().get(gw.at("/slow")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::GATEWAY_TIMEOUT);
    let took = started.elapsed();
    assert!(
        took >= Duration::from_secs(1) && took < Duration::from_secs(5),
        "took {took:?}"
    );
}
