//! Connection limits of the gateway's listeners: silent and idle connections are closed,
//! oversized request heads are refused, open connections are exported.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use tessera_protocol::Config;
use tessera_tests::harness::{Backend, TestGateway, backends, client, config, text};
use tessera_tests::upstream::FakeUpstream;
use tessera_tests::{eventually, metric};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

async fn gateway(up: &FakeUpstream, limits: impl FnOnce(&mut Config)) -> TestGateway {
    let mut c = config(&up.url(), vec![]);
    limits(&mut c);
    c.validate().unwrap();
    let b = backends(Backend::Memory, &mut c).await;
    TestGateway::start(c, b).await
}

/// `http://127.0.0.1:PORT` → `127.0.0.1:PORT`
fn addr(url: &str) -> &str {
    url.trim_start_matches("http://")
}

/// Everything the server sends until it closes `stream` (a reset counts as a close).
async fn until_closed(stream: &mut TcpStream, what: &str) -> Vec<u8> {
    let mut seen = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut seen)).await;
    assert!(read.is_ok(), "{what}: still open after 10 s");
    seen
}

async fn open_connections(gw: &TestGateway, listener: &str) -> f64 {
    let metrics = text(format!("{}/metrics", gw.admin)).await;
    metric(
        &metrics,
        &format!("tessera_http_connections{{listener=\"{listener}\"}}"),
    )
}

#[tokio::test]
async fn silent_connections_are_counted_then_closed_on_both_listeners() {
    let up = FakeUpstream::start().await;
    let gw = gateway(&up, |c| c.http.first_byte_timeout = Duration::from_secs(1)).await;
    let mut public = Vec::new();
    for _ in 0..3 {
        public.push(TcpStream::connect(addr(&gw.url)).await.unwrap());
    }
    let mut admin = TcpStream::connect(addr(&gw.admin)).await.unwrap();
    eventually(
        "the gauge counts 3 public connections",
        Duration::from_secs(5),
        || async { open_connections(&gw, "public").await == 3.0 },
    )
    .await;
    assert!(
        open_connections(&gw, "admin").await >= 2.0,
        "the scrape and the silent one"
    );
    for c in &mut public {
        until_closed(c, "a silent public connection").await;
    }
    until_closed(&mut admin, "a silent admin connection").await;
    eventually("the gauge is back to 0", Duration::from_secs(5), || async {
        open_connections(&gw, "public").await == 0.0
    })
    .await;
    gw.stop().await;
}

#[tokio::test]
async fn a_400_kb_request_head_is_answered_431_and_not_forwarded() {
    let up = FakeUpstream::start().await;
    let gw = gateway(&up, |_| {}).await;
    let big = "x".repeat(400 * 1024);
    let head = format!("GET /echo HTTP/1.1\r\nhost: test\r\nx-big: {big}\r\n\r\n");
    let mut stream = TcpStream::connect(addr(&gw.url)).await.unwrap();
    let (mut reader, mut writer) = stream.split();
    // The gateway answers before it has read everything, so the write may fail.
    let (_, answer) = tokio::join!(writer.write_all(head.as_bytes()), async {
        let mut seen = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(10), reader.read_to_end(&mut seen));
        assert!(read.await.is_ok(), "answered and closed within 10 s");
        seen
    });
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 431"), "{answer}");
    let fine = client()
        .get(gw.at("/echo"))
        .header("x-big", &big[..8 * 1024])
        .send()
        .await
        .unwrap();
    assert_eq!(fine.status(), 200, "heads under the limit still pass");
    gw.stop().await;
}
