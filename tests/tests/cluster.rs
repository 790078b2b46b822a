//! The worker pattern across real processes: gateways and workers as separate
//! `tessera-gateway` / `tessera-worker` processes on memcached and RabbitMQ.
//!
//! Tests here restart servers, so they take turns (`ONE_AT_A_TIME`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;
use std::time::Duration;

use futures_util::future::join_all;
use reqwest::StatusCode;
use tessera_backends::amqp::AmqpBus;
use tessera_protocol::{Bus, FragmentRoute};
use tessera_tests::cluster::{Cluster, free_port, memcached as start_memcached};
use tessera_tests::eventually;
use tessera_tests::harness::{amqp_url, client};
use tessera_tests::upstream::{FakeUpstream, Script};

static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn route(name: &str) -> FragmentRoute {
    let mut r = FragmentRoute::new(name, format!("/_render/{name}"));
    r.params = vec!["id".into()];
    r.build_timeout = Duration::from_secs(5);
    r.max_attempts = 3;
    r
}

/// A bus of its own on the cluster's namespace, and the cluster's build queue: to look
/// at the queue or publish to it as another program would.
fn build_queue(cluster: &Cluster) -> (AmqpBus, String) {
    let bus = AmqpBus::with_queue_expiry(
        &amqp_url(),
        &cluster.namespace,
        Some(Duration::from_secs(600)),
    );
    (bus, format!("{}.tessera.build", cluster.namespace))
}

async fn status(url: &str) -> StatusCode {
    client()
        .get(url)
        .send()
        .await
        .map(|r| r.status())
        .unwrap_or(StatusCode::BAD_GATEWAY)
}

async fn built(url: &str) -> bool {
    client()
        .get(url)
        .header("prefer", "wait=5")
        .send()
        .await
        .is_ok_and(|r| r.status() == StatusCode::OK)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_cold_requests_over_two_gateways_render_each_key_once() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let up = FakeUpstream::start().await;
    up.script(
        "/_render/hot",
        Script {
            delay: Duration::from_millis(300),
            ..Script::default()
        },
    );
    let mut cluster = Cluster::new(&up.url(), vec![route("hot")], None);
    let (a, b) = (cluster.gateway().await, cluster.gateway().await);
    for _ in 0..3 {
        cluster.worker();
    }
    let http = client();
    let requests = (0..1000).map(|i| {
        let gw = if i % 2 == 0 { &a } else { &b };
        let url = format!("{gw}/fragments/hot?id={}", i % 10);
        let http = http.clone();
        async move {
            let s = tokio::time::timeout(Duration::from_secs(30), http.get(&url).send())
                .await
                .expect("no request hangs")
                .expect("answered")
                .status();
            assert!(s == StatusCode::OK || s == StatusCode::ACCEPTED, "{s}");
        }
    });
    join_all(requests).await;
    for id in 0..10 {
        for gw in [&a, &b] {
            let url = format!("{gw}/fragments/hot?id={id}");
            eventually("every key is built", Duration::from_secs(30), || {
                built(&url)
            })
            .await;
        }
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let requests = up.requests("/_render/hot");
    assert_eq!(
        requests.len(),
        10,
        "one render per key across both gateways and three workers"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_mid_render_loses_nothing() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let up = FakeUpstream::start().await;
    up.script(
        "/_render/slow",
        Script {
            first_delay: Some(Duration::from_secs(2)),
            ..Script::default()
        },
    );
    let mut cluster = Cluster::new(&up.url(), vec![route("slow")], None);
    let gw = cluster.gateway().await;
    let first = cluster.worker();
    let url = format!("{gw}/fragments/slow?id=1");
    assert_eq!(status(&url).await, StatusCode::ACCEPTED);
    eventually(
        "the only worker is rendering",
        Duration::from_secs(20),
        || async { up.renders("/_render/slow") == 1 },
    )
    .await;
    cluster.workers[first].kill(); // SIGKILL in the middle of the 2 s render
    cluster.worker();
    cluster.worker();
    eventually("another worker builds it", Duration::from_secs(30), || {
        built(&url)
    })
    .await;
    assert_eq!(
        up.renders("/_render/slow"),
        2,
        "redelivered once to a surviving worker"
    );
}

/// A worker stopped with SIGTERM finishes the build in hand, and its message is not handed
/// to another worker meanwhile (which would render it a second time: same request, same
/// lease holder).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_finishes_the_build_in_hand() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let up = FakeUpstream::start().await;
    up.script(
        "/_render/slow",
        Script {
            delay: Duration::from_millis(3000),
            ..Script::default()
        },
    );
    let mut cluster = Cluster::new(&up.url(), vec![route("slow")], None);
    let gw = cluster.gateway().await;
    let w = cluster.worker();
    let url = format!("{gw}/fragments/slow?id=1");
    assert_eq!(status(&url).await, StatusCode::ACCEPTED);
    eventually(
        "the worker is rendering",
        Duration::from_secs(20),
        || async { up.renders("/_render/slow") == 1 },
    )
    .await;
    // A second worker, consuming, that a requeued message would go to.
    cluster.worker();
    let (bus, queue) = build_queue(&cluster);
    eventually("both workers consume", Duration::from_secs(20), || async {
        bus.queue_stats(&queue)
            .await
            .is_ok_and(|s| s.consumers == 2)
    })
    .await;
    let exit =
        tokio::task::block_in_place(|| cluster.workers[w].terminate(Duration::from_secs(20)));
    assert_eq!(exit, Some(0), "graceful exit");
    assert!(
        built(&url).await,
        "the build in hand was finished before exiting"
    );
    tokio::time::sleep(Duration::from_millis(3500)).await;
    assert_eq!(
        up.renders("/_render/slow"),
        1,
        "rendered once: the message stayed with the worker finishing it"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_on_the_build_queue_is_dead_lettered() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let up = FakeUpstream::start().await;
    let mut cluster = Cluster::new(&up.url(), vec![route("ok")], None);
    let gw = cluster.gateway().await;
    cluster.worker();
    let (bus, queue) = build_queue(&cluster);
    bus.publish_raw(&queue, b"\x00 this is not a build request")
        .await
        .unwrap();
    bus.publish_raw(&queue, br#"{"v":1,"id":"x","key":"","route":"nope","params":[],"vary":[],"generation":0,"attempt":1,"requested_at":0,"lease_deadline":0,"trace_id":""}"#)
        .await
        .unwrap();
    eventually(
        "both are dead-lettered",
        Duration::from_secs(20),
        || async {
            bus.dead_letters(10)
                .await
                .map(|d| d.len() == 2)
                .unwrap_or(false)
        },
    )
    .await;
    let dead = bus.dead_letters(10).await.unwrap();
    assert!(
        dead.iter().any(|d| d.reason.contains("undecodable")),
        "{dead:?}"
    );
    assert!(
        dead.iter().any(|d| d.reason.contains("unknown route")),
        "{dead:?}"
    );
    assert!(dead.iter().all(|d| d.queue == queue));
    // Listing left them there; the worker kept going.
    assert_eq!(bus.dead_letters(10).await.unwrap().len(), 2);
    assert!(built(&format!("{gw}/fragments/ok?id=1")).await);
    assert!(cluster.workers[0].running());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_restart_loses_no_queued_build() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let up = FakeUpstream::start().await;
    let mut r = route("many");
    r.build_timeout = Duration::from_secs(30); // the lease outlives the restart
    let mut cluster = Cluster::new(&up.url(), vec![r], None);
    let gw = cluster.gateway().await;
    for id in 0..200 {
        assert_eq!(
            status(&format!("{gw}/fragments/many?id={id}")).await,
            StatusCode::ACCEPTED
        );
    }
    let restart = |what: &str| {
        let ok = Command::new("rabbitmqctl")
            .arg(what)
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "rabbitmqctl {what} failed");
    };
    tokio::task::block_in_place(|| {
        restart("stop_app");
        restart("start_app");
    });
    eventually("the broker is back", Duration::from_secs(60), || async {
        std::net::TcpStream::connect(("127.0.0.1", 5672)).is_ok()
    })
    .await;
    cluster.worker();
    cluster.worker();
    for id in 0..200 {
        let url = format!("{gw}/fragments/many?id={id}");
        eventually(
            "every queued build is done",
            Duration::from_secs(60),
            || built(&url),
        )
        .await;
    }
    assert!(
        cluster.gateway_procs[0].running(),
        "the gateway rode out the restart"
    );
    assert!(cluster.workers.iter_mut().all(|w| w.running()));
    let renders = up.requests("/_render/many").len();
    assert!(
        (200..=220).contains(&renders),
        "{renders} renders for 200 fragments"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_memcached_restart_is_ridden_out() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let port = free_port();
    let mut memcached = start_memcached(port);
    let up = FakeUpstream::start().await;
    let mut cluster = Cluster::new(
        &up.url(),
        vec![route("m")],
        Some(format!("127.0.0.1:{port}")),
    );
    let gw = cluster.gateway().await;
    cluster.worker();
    assert!(built(&format!("{gw}/fragments/m?id=1")).await);

    memcached.kill();
    // Meanwhile: placeholders or 503, never a hang or a crash.
    for id in 2..5 {
        let s = tokio::time::timeout(
            Duration::from_secs(5),
            status(&format!("{gw}/fragments/m?id={id}")),
        )
        .await
        .expect("answered while memcached is down");
        assert!(
            s == StatusCode::SERVICE_UNAVAILABLE || s == StatusCode::ACCEPTED,
            "{s}"
        );
    }
    let memcached = start_memcached(port);
    eventually(
        "the gateway recovers without a restart",
        Duration::from_secs(30),
        || {
            let url = format!("{gw}/fragments/m?id=9");
            async move { built(&url).await }
        },
    )
    .await;
    assert!(cluster.gateway_procs[0].running());
    drop(memcached);
}
