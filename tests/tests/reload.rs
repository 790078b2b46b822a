//! Reloading the configuration on SIGHUP (issue 32, item 3), on the real binary: a route
//! added serves, a route removed answers 404, a bad file is refused with the message
//! `check` prints and the old configuration stays, and what needs a restart is named.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use tessera_tests::cluster::{Proc, bin_dir, free_port};
use tessera_tests::eventually;
use tessera_tests::harness::client;
use tessera_tests::upstream::FakeUpstream;

/// A config file for the gateway on `port`/`admin`, with `extra` appended.
fn write_config(path: &Path, port: u16, admin: u16, upstream: &str, extra: &str) {
    std::fs::write(
        path,
        format!(
            "[gateway]\nlisten = \"127.0.0.1:{port}\"\nadmin_listen = \"127.0.0.1:{admin}\"\n\
             [upstream]\nurl = \"{upstream}\"\n{extra}"
        ),
    )
    .unwrap();
}

fn route(name: &str) -> String {
    format!("[[fragment]]\nname = \"{name}\"\nrender = \"/_render/{name}\"\n")
}

/// The status of `GET {base}/fragments/{name}` waiting for its build.
async fn status(base: &str, name: &str) -> u16 {
    client()
        .get(format!("{base}/fragments/{name}"))
        .header("prefer", "wait=5")
        .send()
        .await
        .map_or(0, |r| r.status().as_u16())
}

fn hup(gateway: &Proc) {
    let sent = Command::new("kill")
        .arg("-HUP")
        .arg(gateway.child.id().to_string())
        .status()
        .unwrap();
    assert!(sent.success());
}

/// The gateway binary on `config` with `args`, logging to `log`: at `rust_log`, or, with
/// `None`, `RUST_LOG` unset so the file's `[log] level` decides.
fn spawn_gateway(config: &Path, log: &Path, args: &[&str], rust_log: Option<&str>) -> Proc {
    let mut command = Command::new(bin_dir().join("tessera-gateway"));
    command
        .arg("--config")
        .arg(config)
        .args(args)
        .env_remove("TESSERA_CONFIG")
        .env("NO_COLOR", "1")
        .stdout(std::fs::File::create(log).unwrap())
        .stderr(Stdio::null());
    match rust_log {
        Some(level) => command.env("RUST_LOG", level),
        None => command.env_remove("RUST_LOG"),
    };
    Proc::spawn(&mut command, "tessera-gateway")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_adds_and_removes_routes_and_refuses_a_bad_file() {
    let up = FakeUpstream::start().await;
    let (port, admin) = (free_port(), free_port());
    let dir = std::env::temp_dir().join(format!("tessera-reload-{port}"));
    std::fs::create_dir_all(&dir).unwrap();
    let (config, log) = (dir.join("tessera.toml"), dir.join("gateway.log"));
    write_config(&config, port, admin, &up.url(), &route("old"));
    let gateway = spawn_gateway(&config, &log, &[], Some("info"));
    let base = format!("http://127.0.0.1:{port}");
    eventually(
        "the gateway serves `old`",
        Duration::from_secs(20),
        || async { status(&base, "old").await == 200 },
    )
    .await;
    assert_eq!(status(&base, "new").await, 404);

    // `new` in, `old` out, and a key only a restart changes.
    let extra = format!("[cache]\ncapacity = \"1MiB\"\n{}", route("new"));
    write_config(&config, port, admin, &up.url(), &extra);
    hup(&gateway);
    eventually(
        "the route a reload added serves",
        Duration::from_secs(10),
        || async { status(&base, "new").await == 200 },
    )
    .await;
    assert_eq!(status(&base, "old").await, 404, "the route removed is gone");
    let text = std::fs::read_to_string(&log).unwrap();
    let reloaded = text
        .lines()
        .find(|l| l.contains("configuration reloaded"))
        .unwrap();
    assert!(
        reloaded.contains("cache"),
        "names what needs a restart: {reloaded}"
    );

    // A bad file: refused with `check`'s message, and `new` is still served.
    write_config(&config, port, admin, &up.url(), "[cache]\nttl = \"0s\"\n");
    let check = Command::new(bin_dir().join("tessera-gateway"))
        .arg("--config")
        .arg(&config)
        .arg("check")
        .env_remove("TESSERA_CONFIG")
        .output()
        .unwrap();
    let message = String::from_utf8(check.stderr).unwrap().trim().to_string();
    assert!(message.contains("cache.ttl"), "{message}");
    hup(&gateway);
    eventually("the refusal is logged", Duration::from_secs(10), || async {
        std::fs::read_to_string(&log)
            .unwrap()
            .contains("reload refused")
    })
    .await;
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains(&message),
        "check's message {message:?} in:\n{text}"
    );
    assert_eq!(
        status(&base, "new").await,
        200,
        "the old configuration stays"
    );
    drop(gateway);
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_log_level_follows_the_file_and_its_reloads() {
    let up = FakeUpstream::start().await;
    let (port, admin) = (free_port(), free_port());
    let dir = std::env::temp_dir().join(format!("tessera-reload-log-{port}"));
    std::fs::create_dir_all(&dir).unwrap();
    let (config, log) = (dir.join("tessera.toml"), dir.join("gateway.log"));
    let level = |level: &str, routes: &str| format!("[log]\nlevel = \"{level}\"\n{routes}");
    write_config(&config, port, admin, &up.url(), &level("warn", &route("a")));
    let gateway = spawn_gateway(&config, &log, &[], None);
    let base = format!("http://127.0.0.1:{port}");
    eventually("the gateway serves", Duration::from_secs(20), || async {
        status(&base, "a").await == 200
    })
    .await;
    let lines = |what: &str| {
        let text = std::fs::read_to_string(&log).unwrap();
        text.lines().filter(|l| l.contains(what)).count()
    };
    assert_eq!(lines("gateway listening"), 0, "`warn` hides info lines");

    write_config(&config, port, admin, &up.url(), &level("info", &route("a")));
    hup(&gateway);
    eventually(
        "the reload to `info` is logged at info",
        Duration::from_secs(10),
        || async { lines("configuration reloaded") == 1 },
    )
    .await;

    let routes = format!("{}{}", route("a"), route("b"));
    write_config(&config, port, admin, &up.url(), &level("warn", &routes));
    hup(&gateway);
    eventually(
        "the second reload applies",
        Duration::from_secs(10),
        || async { status(&base, "b").await == 200 },
    )
    .await;
    assert_eq!(
        lines("configuration reloaded"),
        1,
        "back at `warn`, the second reload's info line is not written"
    );

    // A level that is no level is refused, and the running one stays.
    write_config(&config, port, admin, &up.url(), &level("verbose", &routes));
    hup(&gateway);
    eventually("the refusal is logged", Duration::from_secs(10), || async {
        lines("reload refused") == 1
    })
    .await;
    assert!(lines("log.level") >= 1, "the refusal names the key");
    drop(gateway);
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_does_not_end_the_demo() {
    let (port, admin) = (free_port(), free_port());
    let dir = std::env::temp_dir().join(format!("tessera-reload-demo-{port}"));
    std::fs::create_dir_all(&dir).unwrap();
    let (config, log) = (dir.join("tessera.toml"), dir.join("gateway.log"));
    write_config(&config, port, admin, "http://127.0.0.1:9", "");
    let gateway = spawn_gateway(&config, &log, &["--demo"], Some("info"));
    let base = format!("http://127.0.0.1:{port}");
    eventually("the demo serves", Duration::from_secs(20), || async {
        status(&base, "recommendations").await == 200
    })
    .await;
    hup(&gateway);
    eventually(
        "the demo says it does not reload",
        Duration::from_secs(10),
        || async {
            std::fs::read_to_string(&log)
                .unwrap()
                .contains("does not reload")
        },
    )
    .await;
    assert_eq!(status(&base, "recommendations").await, 200, "still serving");
    drop(gateway);
    let _ = std::fs::remove_dir_all(&dir);
}
