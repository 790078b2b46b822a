//! Losing a RabbitMQ node: a gateway and a worker (real processes, started by
//! `deploy/local/cluster.sh`) on the three-node cluster of `scripts/rabbitmq-cluster.sh`,
//! with quorum queues, and the node both are connected to (the first listed, which also
//! leads the namespace's queues) killed with SIGKILL while builds are rendering,
//! prefetched and queued. No process is restarted; the node is started again at the end
//! (in the background: it rejoins by itself, and the next run's `up` waits for it).
//!
//! The figures the README quotes ("A RabbitMQ cluster") are printed by the test: the
//! time until misses are answered normally again, and the misses answered 503 meanwhile.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use tessera_protocol::FragmentRoute;
use tessera_tests::cluster::{Cluster, RabbitCluster, recorded};
use tessera_tests::harness::{client, text};
use tessera_tests::upstream::{FakeUpstream, Script};
use tessera_tests::{eventually, metric};

/// Builds of route `slow` asked for before the node dies: more than the worker takes
/// at once (8), so some are rendering, some prefetched and some queued when it dies.
const BEFORE: usize = 40;
/// How long a render of `slow` takes: the worker is mid-render when the node dies.
const RENDER: Duration = Duration::from_millis(1500);
/// How long misses of route `fast` keep coming after the node died, one every
/// [`MISS_EVERY`].
const OUTAGE_WINDOW: Duration = Duration::from_secs(8);
const MISS_EVERY: Duration = Duration::from_millis(100);
/// The target: misses are answered normally again this soon after the node died.
const RECOVERY_TARGET: Duration = Duration::from_secs(5);

fn route(name: &str) -> FragmentRoute {
    let mut r = FragmentRoute::new(name, format!("/_render/{name}"));
    r.params = vec!["id".into()];
    r.build_timeout = Duration::from_secs(10);
    r.max_attempts = 3;
    r
}

/// Asks for fragment `id` of `route` without waiting: 202 is a miss queued, 200 a hit.
async fn miss(gateway: &str, route: &str, id: usize) -> StatusCode {
    let url = format!("{gateway}/fragments/{route}?id={id}");
    tokio::time::timeout(Duration::from_secs(15), client().get(url).send())
        .await
        .expect("a miss is answered, not held, while a node is down")
        .map_or(StatusCode::BAD_GATEWAY, |r| r.status())
}

async fn built(gateway: &str, route: &str, id: usize) -> bool {
    client()
        .get(format!("{gateway}/fragments/{route}?id={id}"))
        .header("prefer", "wait=5")
        .send()
        .await
        .is_ok_and(|r| r.status() == StatusCode::OK)
}

/// Renders per fragment id of `route`.
fn renders(up: &FakeUpstream, route: &str) -> BTreeMap<usize, usize> {
    let mut counts = BTreeMap::new();
    for (query, _) in up.requests(&format!("/_render/{route}")) {
        let id = query
            .as_deref()
            .and_then(|q| q.strip_prefix("id="))
            .and_then(|id| id.parse().ok())
            .expect("renders ask for id=N");
        *counts.entry(id).or_insert(0) += 1;
    }
    counts
}

/// Misses of route `fast`, one every [`MISS_EVERY`] from the moment the node died: each
/// id, when it was sent, and its answer.
async fn misses_during_the_outage(gateway: &str) -> Vec<(usize, Duration, StatusCode)> {
    let killed = Instant::now();
    let mut asked = Vec::new();
    while killed.elapsed() < OUTAGE_WINDOW {
        let (id, sent, gateway) = (asked.len(), killed.elapsed(), gateway.to_string());
        let answer = tokio::spawn(async move { miss(&gateway, "fast", id).await });
        asked.push((id, sent, answer));
        tokio::time::sleep(MISS_EVERY).await;
    }
    let mut answered = Vec::new();
    for (id, sent, answer) in asked {
        answered.push((id, sent, answer.await.unwrap()));
    }
    answered
}

/// Checks the answers to the misses sent while the node was down (each 202, or 503 while
/// the processes moved to another node; none hung), prints them, and returns when misses
/// were answered normally again: when the first of the run of 202s that lasts to the end
/// of the window was sent.
fn recovery(outage: &[(usize, Duration, StatusCode)]) -> Duration {
    let unavailable = outage
        .iter()
        .filter(|(_, _, s)| *s == StatusCode::SERVICE_UNAVAILABLE)
        .count();
    let normal_from = outage
        .iter()
        .rposition(|(_, _, s)| *s != StatusCode::ACCEPTED)
        .map_or(0, |last_bad| last_bad + 1);
    let recovered_after = outage.get(normal_from).map(|(_, sent, _)| *sent);
    let answers: Vec<u16> = outage.iter().map(|(_, _, s)| s.as_u16()).collect();
    eprintln!(
        "RabbitMQ node killed: {unavailable} of {} misses answered 503; misses answered \
         normally again {recovered_after:?} after the kill; answers: {answers:?}",
        outage.len(),
    );
    for (id, _, status) in outage {
        assert!(
            *status == StatusCode::ACCEPTED || *status == StatusCode::SERVICE_UNAVAILABLE,
            "miss {id}: {status}"
        );
    }
    recovered_after.expect("misses are answered normally again")
}

/// Each of `ids` of `route` was rendered exactly once, and no other fragment of it twice.
fn assert_built_once(up: &FakeUpstream, route: &str, ids: &[usize]) {
    let counts = renders(up, route);
    let doubled: Vec<_> = counts.iter().filter(|(_, n)| **n > 1).collect();
    assert!(
        doubled.is_empty(),
        "{route}: built more than once (id, renders): {doubled:?}"
    );
    for id in ids {
        assert_eq!(counts.get(id), Some(&1), "fragment {route} {id} built once");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_the_node_a_gateway_and_a_worker_use_loses_and_doubles_no_build() {
    let rabbitmq = tokio::task::block_in_place(RabbitCluster::up);
    let up = FakeUpstream::start().await;
    up.script(
        "/_render/slow",
        Script {
            delay: RENDER,
            ..Script::default()
        },
    );
    let routes = vec![route("slow"), route("fast")];
    let mut cluster = Cluster::on_rabbitmq_cluster(&up.url(), routes, &rabbitmq);
    let gw = cluster.gateway().await;
    cluster.worker();
    let admins: Vec<String> = recorded(&cluster.dir)
        .into_iter()
        .filter(|p| p.kind == "gateway" || p.kind == "worker")
        .map(|p| p.admin)
        .collect();

    for id in 0..BEFORE {
        let status = miss(&gw, "slow", id).await;
        assert_eq!(status, StatusCode::ACCEPTED, "miss {id} before");
    }
    eventually(
        "the worker is rendering",
        Duration::from_secs(20),
        || async { up.renders("/_render/slow") >= 4 },
    )
    .await;

    tokio::task::block_in_place(|| rabbitmq.kill(1));
    let _restart = Restart(rabbitmq);
    let outage = misses_during_the_outage(&gw).await;

    let recovered_after = recovery(&outage);
    assert!(
        recovered_after <= RECOVERY_TARGET,
        "misses answered normally only {recovered_after:?} after the node died"
    );

    // Every build asked for and accepted is built, and exactly once.
    let during: Vec<usize> = outage
        .iter()
        .filter(|(_, _, s)| *s == StatusCode::ACCEPTED)
        .map(|(id, _, _)| *id)
        .collect();
    let accepted = [("slow", (0..BEFORE).collect::<Vec<_>>()), ("fast", during)];
    for (route, ids) in &accepted {
        for &id in ids {
            let what = format!("fragment {route} {id} is built");
            eventually(&what, Duration::from_secs(60), || built(&gw, route, id)).await;
        }
    }
    // Room for a late second render to show.
    tokio::time::sleep(RENDER + Duration::from_secs(1)).await;
    for (route, ids) in &accepted {
        assert_built_once(&up, route, ids);
    }

    assert!(
        cluster.gateway_procs[0].running() && cluster.workers[0].running(),
        "no process was restarted"
    );
    for admin in &admins {
        let metrics = text(format!("{admin}/metrics")).await;
        let reconnects = metric(&metrics, "tessera_bus_reconnects_total");
        assert!(reconnects >= 1.0, "{admin} moved to another node");
        // Copies of builds in hand on the lost connection, redelivered by the broker.
        let dropped = metric(
            &metrics,
            r#"tessera_worker_builds_dropped_total{route="slow"}"#,
        );
        eprintln!("{admin}: builds dropped as already built: {dropped}");
    }
}

/// Starts the killed node again when dropped (without waiting for it), so a failed
/// check leaves the cluster whole for the next run too.
struct Restart(RabbitCluster);

impl Drop for Restart {
    fn drop(&mut self) {
        tokio::task::block_in_place(|| self.0.restart_stopped());
    }
}
