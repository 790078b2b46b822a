//! `deploy/local/cluster.sh` as a user runs it: a whole cluster with the demo upstream,
//! a fragment served end to end through both gateways, and nothing left behind; and one
//! on memcached servers of its own and the three-node RabbitMQ cluster.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::{Command, Stdio};

use reqwest::StatusCode;
use tessera_tests::cluster::{
    RabbitCluster, bin_dir, cluster_script, pid_alive, recorded, run_script,
};
use tessera_tests::harness::{client, memcached_addr, require_servers, text, unique_namespace};

async fn fragment(gateway: &str, path: &str) -> (StatusCode, String) {
    let r = client()
        .get(format!("{gateway}{path}"))
        .header("prefer", "wait=10")
        .send()
        .await
        .unwrap();
    (r.status(), r.text().await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_local_cluster_serves_through_both_gateways_and_stops_cleanly() {
    require_servers();
    let namespace = unique_namespace();
    let dir = std::env::temp_dir().join(format!("{namespace}-local"));
    let bin = bin_dir();
    let up = tokio::task::block_in_place(|| {
        run_script(
            &dir,
            &[
                "up",
                "--gateways",
                "2",
                "--workers",
                "2",
                "--namespace",
                &namespace,
                "--queue-expiry",
                "10m",
                "--bin",
                &bin.to_string_lossy(),
            ],
        )
    });
    let procs = recorded(&dir);
    let of = |kind: &str| procs.iter().filter(|p| p.kind == kind).collect::<Vec<_>>();
    let (gateways, workers) = (of("gateway"), of("worker"));
    assert_eq!(
        (gateways.len(), workers.len(), of("upstream").len()),
        (2, 2, 1),
        "{up}"
    );
    for g in &gateways {
        assert!(up.contains(&g.url), "up prints every gateway URL:\n{up}");
    }
    assert!(
        of("memcached").is_empty() && of("rabbitmq").is_empty(),
        "the running memcached and RabbitMQ were used, not started again: {procs:?}"
    );

    // Built once by a worker, then served by either gateway from memcached.
    let (status, first) = fragment(&gateways[0].url, "/fragments/weather").await;
    assert_eq!(status, StatusCode::OK, "{first}");
    assert!(first.contains("21 °C"), "{first}");
    let (status, second) = fragment(&gateways[1].url, "/fragments/weather").await;
    assert_eq!((status, &second), (StatusCode::OK, &first));
    let page = text(format!("{}/", gateways[1].url)).await;
    assert!(
        page.contains("Tessera demo") && page.contains("21 °C"),
        "{page}"
    );
    let mut built = 0.0;
    for w in &workers {
        built += tessera_tests::metric(
            &text(format!("{}/metrics", w.admin)).await,
            r#"tessera_worker_builds_succeeded_total{route="weather"}"#,
        );
    }
    assert_eq!(built, 1.0, "one build of the weather fragment");

    let down = tokio::task::block_in_place(|| run_script(&dir, &["down"]));
    assert!(down.contains("stopped 5 processes"), "{down}");
    for p in &procs {
        let pid = p.pid.unwrap();
        assert!(!pid_alive(pid), "{} (pid {pid}) is still running", p.name);
    }
    assert!(
        std::net::TcpStream::connect(memcached_addr()).is_ok(),
        "the memcached the script did not start is left alone"
    );
    let again = tokio::task::block_in_place(|| run_script(&dir, &["down"]));
    assert!(again.contains("nothing running"), "{again}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// `--memcached 2` starts two memcached servers of the cluster's own (and `down` stops
/// them); `--rabbitmq-nodes 3` runs the bus on the RabbitMQ cluster with quorum queues
/// (already running here, so `down` leaves it alone).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_local_cluster_starts_memcached_servers_and_uses_a_rabbitmq_cluster() {
    let rabbitmq = tokio::task::block_in_place(RabbitCluster::up);
    let namespace = unique_namespace();
    let dir = std::env::temp_dir().join(format!("{namespace}-local-nodes"));
    let bin = bin_dir();
    let up = tokio::task::block_in_place(|| {
        run_script(
            &dir,
            &[
                "up",
                "--gateways",
                "1",
                "--workers",
                "1",
                "--memcached",
                "2",
                "--rabbitmq-nodes",
                "3",
                "--namespace",
                &namespace,
                "--queue-expiry",
                "10m",
                "--bin",
                &bin.to_string_lossy(),
            ],
        )
    });
    let procs = recorded(&dir);
    let memcached: Vec<_> = procs.iter().filter(|p| p.kind == "memcached").collect();
    assert_eq!(memcached.len(), 2, "{up}");
    assert!(
        !procs.iter().any(|p| p.kind.starts_with("rabbitmq")),
        "the running RabbitMQ cluster was used: {procs:?}"
    );
    let config = std::fs::read_to_string(dir.join("tessera.toml")).unwrap();
    let nodes = format!("amqp = {:?}", rabbitmq.urls);
    assert!(
        config.contains(&nodes) && config.contains("queue_type = \"quorum\""),
        "{config}"
    );
    for m in &memcached {
        let addr = m.url.trim_start_matches("memcache://");
        assert!(config.contains(&format!("\"{addr}\"")), "{config}");
    }
    let gateway = procs.iter().find(|p| p.kind == "gateway").unwrap();
    let (status, body) = fragment(&gateway.url, "/fragments/weather").await;
    assert_eq!(status, StatusCode::OK, "{body}");

    let down = tokio::task::block_in_place(|| run_script(&dir, &["down"]));
    assert!(down.contains("stopped 5 processes"), "{down}");
    for m in &memcached {
        assert!(!pid_alive(m.pid.unwrap()), "{} still runs", m.name);
    }
    let status = tokio::task::block_in_place(|| {
        Command::new("bash")
            .arg(tessera_tests::cluster::rabbitmq_cluster_script())
            .arg("status")
            .output()
            .unwrap()
    });
    let running = String::from_utf8_lossy(&status.stdout)
        .lines()
        .filter(|l| !l.ends_with(" -"))
        .count();
    assert_eq!(running, 3, "the RabbitMQ cluster is left running");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_script_says_what_is_missing() {
    let dir = std::env::temp_dir().join(format!("{}-nobin", unique_namespace()));
    let out = Command::new("bash")
        .arg(cluster_script())
        .args(["up", "--bin", "/nonexistent", "--dir"])
        .arg(&dir)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("cargo build --release"), "{stderr}");
    let out = Command::new("bash")
        .arg(cluster_script())
        .args(["add", "worker", "--dir"])
        .arg(&dir)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no cluster in"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
