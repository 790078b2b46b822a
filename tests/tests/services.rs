//! `scripts/services.sh`, which `scripts/test.sh` runs first: it starts the memcached the
//! tests need when none answers, and stops on the way out what it started, and only
//! that: a memcached it found running is left running (other test runs use it).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use tessera_tests::cluster::free_port;
use tessera_tests::harness::{amqp_addr, require};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn answers(port: u16) -> bool {
    TcpStream::connect_timeout(
        &format!("127.0.0.1:{port}").parse().unwrap(),
        Duration::from_millis(300),
    )
    .is_ok()
}

/// `bash scripts/services.sh ARGS` with memcached on `port`, recording in `started`.
fn services(port: u16, started: &Path, args: &[&str]) {
    let out = Command::new("bash")
        .arg("scripts/services.sh")
        .args(args)
        .env("TESSERA_TEST_MEMCACHED_PORT", port.to_string())
        .env("TESSERA_SERVICES_STARTED", started)
        .current_dir(root())
        .output()
        .expect("bash runs");
    assert!(
        out.status.success(),
        "services.sh {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Kills the memcached whose pid file this names when dropped, so a failing test leaves
/// none of its own running.
struct Stop(PathBuf);

impl Drop for Stop {
    fn drop(&mut self) {
        if let Ok(pid) = std::fs::read_to_string(&self.0) {
            let _ = Command::new("kill").arg(pid.trim()).status();
        }
    }
}

fn closed_within(port: u16, within: Duration) -> bool {
    let until = Instant::now() + within;
    while Instant::now() < until {
        if !answers(port) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    false
}

#[test]
fn the_memcached_it_started_is_stopped_and_only_that() {
    // With RabbitMQ answering, the script starts nothing but memcached.
    require("RabbitMQ", &amqp_addr());
    let dir = std::env::temp_dir().join(format!("tessera-services-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();

    // None answers on this port: it starts one, lists it, and stops it.
    let port = free_port();
    assert!(!answers(port));
    let started = dir.join("started");
    let _theirs = Stop(std::env::temp_dir().join(format!("tessera-memcached-{port}.pid")));
    services(port, &started, &[]);
    assert!(answers(port), "memcached started on {port}");
    let listed = std::fs::read_to_string(&started).unwrap();
    assert!(listed.starts_with("memcached "), "{listed}");
    services(port, &started, &["stop", started.to_str().unwrap()]);
    assert!(
        closed_within(port, Duration::from_secs(5)),
        "still answering on {port}"
    );

    // One answers already (started here, as another run would have): it is not listed,
    // and stopping leaves it running.
    let port = free_port();
    let pidfile = dir.join("ours.pid");
    let running = Stop(pidfile.clone());
    let ours = Command::new("memcached")
        .args(["-d", "-u", "root", "-l", "127.0.0.1", "-m", "8", "-p"])
        .arg(port.to_string())
        .arg("-P")
        .arg(&pidfile)
        .status()
        .unwrap();
    assert!(ours.success());
    let until = Instant::now() + Duration::from_secs(5);
    while !answers(port) && Instant::now() < until {
        std::thread::sleep(Duration::from_millis(50));
    }
    let started = dir.join("started-again");
    services(port, &started, &[]);
    assert!(
        std::fs::read_to_string(&started)
            .unwrap_or_default()
            .is_empty(),
        "a memcached found running is not listed"
    );
    services(port, &started, &["stop", started.to_str().unwrap()]);
    std::thread::sleep(Duration::from_millis(300));
    assert!(answers(port), "the memcached it found was stopped");
    drop(running);
    assert!(closed_within(port, Duration::from_secs(5)));
    let _ = std::fs::remove_dir_all(&dir);
}
