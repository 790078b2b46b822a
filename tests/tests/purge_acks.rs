//! Purge acknowledgements: every gateway answers each purge it applied, and a purge made
//! with `?wait=` says how many gateways applied it, of how many known, and who missed.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use reqwest::StatusCode;
use tessera_tests::eventually;
use tessera_tests::harness::{Backend, TestGateway, backends, client, config, route, text};
use tessera_tests::upstream::FakeUpstream;

/// Longer than a heartbeat going stale (6 s).
const WITHIN: Duration = Duration::from_secs(30);

async fn status(gw: &TestGateway) -> serde_json::Value {
    serde_json::from_str(&text(format!("{}/api/status", gw.admin)).await).unwrap()
}

/// Purges `path` at `gw`, waiting up to `wait`: what the acknowledgements amount to.
async fn purge(gw: &TestGateway, path: &str, wait: &str) -> serde_json::Value {
    let joint = if path.contains('?') { '&' } else { '?' };
    let r = client()
        .delete(format!("{}{path}{joint}wait={wait}", gw.admin))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK, "{path}");
    let body: serde_json::Value = r.json().await.unwrap();
    body["acknowledged"].clone()
}

/// Embedded mode: the one gateway acknowledges itself; without `wait` nothing is waited.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_embedded_gateway_acknowledges_itself() {
    let up = FakeUpstream::start().await;
    let mut c = config(&up.url(), vec![route("news")]);
    let b = backends(Backend::Memory, &mut c).await;
    let gw = TestGateway::start(c, b).await;
    let me = status(&gw).await["gateway"].as_str().unwrap().to_string();
    let acked = purge(&gw, "/tags/a", "5s").await;
    assert_eq!(acked["applied"], 1, "{acked}");
    assert_eq!(acked["known"], 1, "{acked}");
    assert_eq!(acked["missed"], serde_json::json!([]));
    assert!(acked["ms"].as_u64().is_some());
    let r = client()
        .delete(format!("{}/routes/news", gw.admin))
        .send()
        .await
        .unwrap();
    let body: serde_json::Value = r.json().await.unwrap();
    assert!(body.get("acknowledged").is_none(), "{body}");
    let refused = client()
        .delete(format!("{}/routes/news?wait=forever", gw.admin))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), StatusCode::BAD_REQUEST);
    assert!(!me.is_empty());
    gw.stop().await;
}

/// Two gateways on RabbitMQ, each with its own connection: every kind of purge is
/// applied by both. With one stopped, a purge names it as missed while its heartbeat is
/// fresh, and no longer counts it once the heartbeat is stale.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_gateway_acknowledges_and_a_stopped_one_is_named() {
    let up = FakeUpstream::start().await;
    let mut c = config(&up.url(), vec![route("news")]);
    let b = backends(Backend::Real, &mut c).await;
    let one = TestGateway::start(c.clone(), b).await;
    let own = tessera_backends::connect(&c)
        .await
        .expect("backends connect");
    let two = TestGateway::start(c, own).await;
    let gone = status(&two).await["gateway"].as_str().unwrap().to_string();
    eventually("the gateways know each other", WITHIN, || async {
        status(&one).await["gateways"].as_array().unwrap().len() == 2
    })
    .await;
    for path in [
        "/routes/news",
        "/fragments/news",
        "/tags/a",
        "/tags/a,b",
        "/tags/a,b?all_of=1",
    ] {
        let acked = purge(&one, path, "10s").await;
        assert_eq!(acked["applied"], 2, "{path}: {acked}");
        assert_eq!(acked["known"], 2, "{path}: {acked}");
        assert_eq!(acked["missed"], serde_json::json!([]), "{path}");
    }

    two.stop().await;
    // Its last heartbeat is at most 2 s old: still known for 4 s more.
    let acked = purge(&one, "/tags/a", "200ms").await;
    assert_eq!(acked["applied"], 1, "{acked}");
    assert_eq!(acked["known"], 2, "{acked}");
    assert_eq!(acked["missed"], serde_json::json!([gone]));
    eventually("the stopped gateway is no longer known", WITHIN, || async {
        let acked = purge(&one, "/tags/a", "200ms").await;
        acked["known"] == 1 && acked["applied"] == 1
    })
    .await;
    one.stop().await;
}
