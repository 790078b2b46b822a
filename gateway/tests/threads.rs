//! `gateway.threads`: the public listener on threads of its own, or on the process's
//! runtime. Alone in its test binary, so the threads counted are this test's gateways'.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Threads of this process named after the public listener's (`tessera-http-N`).
fn http_threads() -> usize {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .flatten()
        .filter(|task| {
            std::fs::read_to_string(task.path().join("comm"))
                .is_ok_and(|name| name.starts_with("tessera-http"))
        })
        .count()
}

/// A gateway with `threads`, answering the client script (which needs no upstream) on its
/// public listener; stopped once the script was fetched and its threads counted.
async fn serves_with(threads: usize) -> usize {
    let mut config = tessera_protocol::Config::default();
    config.gateway.threads = threads;
    let backends = tessera_protocol::Backends::memory(&config);
    let public = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = public.local_addr().unwrap();
    let stop = tokio_util::sync::CancellationToken::new();
    let gateway = tokio::spawn(tessera_gateway::serve(
        public,
        None,
        config,
        backends,
        stop.clone().cancelled_owned(),
    ));
    let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
    conn.write_all(b"GET /_tessera/client.js HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), conn.read_to_end(&mut answer))
        .await
        .expect("answered")
        .unwrap();
    assert!(
        answer.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&answer[..answer.len().min(200)])
    );
    let counted = http_threads();
    stop.cancel();
    tokio::time::timeout(Duration::from_secs(10), gateway)
        .await
        .expect("the gateway stops")
        .unwrap()
        .unwrap();
    counted
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zero_threads_serve_on_the_process_runtime_and_n_threads_start_n() {
    assert_eq!(serves_with(0).await, 0, "threads = 0 started threads");
    assert_eq!(serves_with(3).await, 3);
    // The threads end with the gateway.
    tokio::time::timeout(Duration::from_secs(10), async {
        while http_threads() > 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the public threads ended with their gateway");
}
