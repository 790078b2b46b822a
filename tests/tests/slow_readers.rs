//! Clients that read nothing: every answer that makes no progress for `http.send_timeout`
//! is cut off, with what it holds (an upstream connection, a stream's fragments); a
//! request head not finished within `header_timeout` is cut off then, not later.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use tessera_protocol::Config;
use tessera_tests::harness::{Backend, TestGateway, backends, client, config, text};
use tessera_tests::upstream::{FakeUpstream, Script};
use tessera_tests::{eventually, metric};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

const SEND_TIMEOUT: Duration = Duration::from_secs(1);

async fn gateway(up: &FakeUpstream, routes: Vec<tessera_protocol::FragmentRoute>) -> TestGateway {
    let mut c: Config = config(&up.url(), routes);
    c.http.send_timeout = SEND_TIMEOUT;
    c.gateway.max_wait = Duration::from_secs(30);
    let b = backends(Backend::Memory, &mut c).await;
    TestGateway::start(c, b).await
}

/// A connection to the gateway that asks for `path` and then reads nothing (its receive
/// buffer as small as the kernel allows, so the gateway's writes soon find it full).
async fn never_reads(gw: &TestGateway, path: &str) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let addr = gw.url.trim_start_matches("http://").parse().unwrap();
    let mut stream = socket.connect(addr).await.unwrap();
    let head = format!("GET {path} HTTP/1.1\r\nhost: test\r\n\r\n");
    stream.write_all(head.as_bytes()).await.unwrap();
    stream
}

async fn open_public_connections(gw: &TestGateway) -> f64 {
    let metrics = text(format!("{}/metrics", gw.admin)).await;
    metric(&metrics, "tessera_http_connections{listener=\"public\"}")
}

#[tokio::test]
async fn a_proxied_download_nobody_reads_frees_the_upstream_connection() {
    let up = FakeUpstream::start().await;
    let gw = gateway(&up, vec![]).await;
    let mut clients = Vec::new();
    for _ in 0..4 {
        clients.push(never_reads(&gw, "/big?bytes=50000000").await);
    }
    eventually(
        "the upstream serves the 4 downloads",
        Duration::from_secs(5),
        || async { up.open_connections() >= 4 },
    )
    .await;
    eventually(
        "the gateway cuts the readers off and lets the upstream go",
        Duration::from_secs(10),
        || async { up.open_connections() == 0 && open_public_connections(&gw).await == 0.0 },
    )
    .await;
    // The upstream is not left short of connections: a request that reads is served.
    let fine = client()
        .get(gw.at("/big?bytes=100000"))
        .send()
        .await
        .unwrap();
    assert_eq!(fine.bytes().await.unwrap().len(), 100_000);
    drop(clients);
    gw.stop().await;
}

#[tokio::test]
async fn a_push_stream_nobody_reads_is_cut_off_and_its_fragment_built_once() {
    let up = FakeUpstream::start().await;
    // Control bytes are six times their size in the event's JSON.
    let html = "\u{1}".repeat(900 * 1024);
    up.script(
        "/_render/big",
        Script {
            body: Some(html.into()),
            headers: vec![("content-type".into(), "text/html".into())],
            ..Script::default()
        },
    );
    let mut big = tessera_tests::harness::route("big");
    big.params = vec!["id".into()];
    let gw = gateway(&up, vec![big]).await;
    // 32 sources, one fragment: junk params do not make it another.
    let srcs: Vec<String> = (0..32)
        .map(|n| format!("src=%2Ffragments%2Fbig%3Fid%3D1%26junk%3D{n}"))
        .collect();
    let mut stream = never_reads(&gw, &format!("/_tessera/stream?{}", srcs.join("&"))).await;
    eventually("the fragment is built", Duration::from_secs(10), || async {
        up.renders("/_render/big") == 1
    })
    .await;
    assert_eq!(
        open_public_connections(&gw).await,
        1.0,
        "the stream is open"
    );
    eventually(
        "the gateway cuts the stream off",
        Duration::from_secs(15),
        || async { open_public_connections(&gw).await == 0.0 },
    )
    .await;
    assert_eq!(up.renders("/_render/big"), 1, "one fragment, built once");
    // What it had sent before it gave up, then the close.
    let mut seen = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut seen)).await;
    assert!(
        seen.starts_with(b"HTTP/1.1 200"),
        "{:?}",
        &seen[..seen.len().min(64)]
    );
    gw.stop().await;
}

#[tokio::test]
async fn a_request_head_unfinished_at_header_timeout_is_closed_then() {
    let up = FakeUpstream::start().await;
    let mut c: Config = config(&up.url(), vec![]);
    c.http.header_timeout = Duration::from_secs(2);
    let b = backends(Backend::Memory, &mut c).await;
    let gw = TestGateway::start(c, b).await;
    let mut stream = TcpStream::connect(gw.url.trim_start_matches("http://"))
        .await
        .unwrap();
    stream
        .write_all(b"GET / HTTP/1.1\r\nhost: te")
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let mut seen = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut seen)).await;
    assert!(closed.is_ok(), "still open after 10 s");
    // Closed at header_timeout (2 s), not at twice it, as before: the margin is a second.
    let took = started.elapsed();
    assert!(took < Duration::from_secs(3), "closed after {took:?}");
    gw.stop().await;
}
