//! What the gateway and its workers write to their logs: structured JSON on request, the
//! request's trace id carried to the worker that builds it, and never a cookie value.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::{Command, Stdio};
use std::time::Duration;

use tessera_tests::cluster::{Proc, bin_dir, free_port};
use tessera_tests::eventually;
use tessera_tests::harness::client;
use tessera_tests::upstream::FakeUpstream;

/// Human-readable logs written to a file (or a pipe) carry no terminal colour codes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_to_a_file_have_no_colour_codes() {
    let (port, admin) = (free_port(), free_port());
    let dir = std::env::temp_dir().join(format!("tessera-plain-logs-{port}"));
    std::fs::create_dir_all(&dir).unwrap();
    let log = dir.join("gateway.log");
    let mut gateway = Proc::spawn(
        Command::new(bin_dir().join("tessera-gateway"))
            .env("TESSERA_LISTEN", format!("127.0.0.1:{port}"))
            .env("TESSERA_ADMIN_LISTEN", format!("127.0.0.1:{admin}"))
            .env("RUST_LOG", "info")
            .env_remove("TESSERA_CONFIG")
            .env_remove("TESSERA_LOG_FORMAT")
            .env_remove("NO_COLOR")
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(Stdio::null()),
        "tessera-gateway",
    );
    eventually(
        "the gateway logs that it listens",
        Duration::from_secs(20),
        || async { std::fs::read_to_string(&log).is_ok_and(|l| l.contains("INFO")) },
    )
    .await;
    eventually(
        "the gateway logs its start-up line",
        Duration::from_secs(20),
        || async { std::fs::read_to_string(&log).is_ok_and(|l| l.contains("gateway listening")) },
    )
    .await;
    gateway.kill();
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        !text.contains('\x1b'),
        "colour codes in a log file:\n{text}"
    );
    // One start-up line names both listeners as addresses, not as Rust values.
    let start = text
        .lines()
        .find(|l| l.contains("gateway listening"))
        .unwrap_or_else(|| panic!("no start-up line in:\n{text}"));
    assert!(
        start.contains(&format!("addr=127.0.0.1:{port}"))
            && start.contains(&format!("admin=127.0.0.1:{admin}")),
        "the start-up line names both listeners: {start}"
    );
    assert!(
        !text.contains("Some("),
        "a Rust Option in the logs:\n{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_carry_the_trace_id_and_no_cookie() {
    let up = FakeUpstream::start().await;
    let (port, admin) = (free_port(), free_port());
    let dir = std::env::temp_dir().join(format!("tessera-logs-{port}"));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("tessera.toml");
    std::fs::write(
        &config,
        format!(
            "[gateway]\nlisten = \"127.0.0.1:{port}\"\nadmin_listen = \"127.0.0.1:{admin}\"\n\
             [upstream]\nurl = \"{}\"\n[[fragment]]\nname = \"me\"\nrender = \"/_render/me\"\n\
             vary = [\"cookie:session_id\"]\n",
            up.url()
        ),
    )
    .unwrap();
    let log = dir.join("gateway.log");
    let mut gateway = Proc::spawn(
        Command::new(bin_dir().join("tessera-gateway"))
            .arg("--config")
            .arg(&config)
            .env("RUST_LOG", "debug")
            .env("TESSERA_LOG_FORMAT", "json")
            .env_remove("TESSERA_CONFIG")
            // Logs go to stdout, as a twelve-factor process's do.
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(Stdio::null()),
        "tessera-gateway",
    );
    let url = format!("http://127.0.0.1:{port}/fragments/me");
    eventually("the gateway answers", Duration::from_secs(20), || async {
        client()
            .get(format!("http://127.0.0.1:{admin}/healthz"))
            .send()
            .await
            .is_ok()
    })
    .await;

    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let secret = "s3cr3t-session-4711";
    let r = client()
        .get(&url)
        .header("prefer", "wait=5")
        .header("traceparent", format!("00-{trace}-00f067aa0ba902b7-01"))
        .header("cookie", format!("session_id={secret}; theme=dark"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), reqwest::StatusCode::OK);
    assert!(
        r.text().await.unwrap().contains(secret),
        "the upstream did get the cookie"
    );
    let exit = tokio::task::block_in_place(|| gateway.terminate(Duration::from_secs(20)));
    assert!(exit.is_some_and(|s| s.success()), "graceful exit: {exit:?}");

    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        !text.contains(secret),
        "a cookie value reached the logs:\n{text}"
    );
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        serde_json::from_str::<serde_json::Value>(line)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
    }
    let with_trace: Vec<&str> = text.lines().filter(|l| l.contains(trace)).collect();
    assert!(
        with_trace.iter().any(|l| l.contains("build queued")),
        "the gateway logs the trace id with the build it queued:\n{text}"
    );
    assert!(
        with_trace
            .iter()
            .any(|l| l.contains(r#""message":"built""#)),
        "the worker that built it logs the trace id:\n{text}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// During a broker outage every cold fragment is a 503: the gateway writes the first of
/// them, then one line per interval saying how many more there were, not a line each
/// (issue 29: 1,067 lines in 20 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_writes_a_count_not_a_line_per_failure() {
    tessera_tests::harness::require("memcached", &tessera_tests::harness::memcached_addr());
    let up = FakeUpstream::start().await;
    let (port, admin, broker) = (free_port(), free_port(), free_port());
    let dir = std::env::temp_dir().join(format!("tessera-outage-logs-{port}"));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("tessera.toml");
    std::fs::write(
        &config,
        format!(
            "[gateway]\nlisten = \"127.0.0.1:{port}\"\nadmin_listen = \"127.0.0.1:{admin}\"\n\
             [upstream]\nurl = \"{}\"\n[store]\nmemcached = [\"{}\"]\nnamespace = \"{}\"\n\
             [bus]\namqp = \"amqp://guest:guest@127.0.0.1:{broker}/%2f\"\n\
             [workers]\nembedded = 0\n\
             [[fragment]]\nname = \"news\"\nrender = \"/_render/news\"\n",
            up.url(),
            tessera_tests::harness::memcached_addr(),
            tessera_tests::harness::unique_namespace(),
        ),
    )
    .unwrap();
    let log = dir.join("gateway.log");
    let mut gateway = Proc::spawn(
        Command::new(bin_dir().join("tessera-gateway"))
            .arg("--config")
            .arg(&config)
            .env("RUST_LOG", "warn")
            .env("TESSERA_LOG_FORMAT", "json")
            .env_remove("TESSERA_CONFIG")
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(Stdio::null()),
        "tessera-gateway",
    );
    let url = format!("http://127.0.0.1:{port}/fragments/news");
    eventually("the gateway answers", Duration::from_secs(20), || async {
        client().get(&url).send().await.is_ok()
    })
    .await;
    let mut unavailable = 0;
    for _ in 0..200 {
        let r = client().get(&url).send().await.unwrap();
        if r.status() == reqwest::StatusCode::SERVICE_UNAVAILABLE {
            unavailable += 1;
        }
    }
    assert!(unavailable >= 190, "{unavailable} of 200 were 503s");
    // Stopping ends the interval early: its count is written on the way out.
    tokio::task::block_in_place(|| gateway.terminate(Duration::from_secs(20)));
    let text = std::fs::read_to_string(&log).unwrap();
    let lines: Vec<serde_json::Value> = text
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let failed = lines
        .iter()
        .filter(|l| l["message"] == "request failed")
        .count();
    assert!(
        (1..=3).contains(&failed),
        "{failed} lines for {unavailable} failures:\n{text}"
    );
    let counted: u64 = lines
        .iter()
        .filter(|l| l["message"] == "similar warnings suppressed" && l["kind"] == "unavailable")
        .map(|l| l["suppressed"].as_u64().unwrap())
        .sum();
    // The request that found the gateway up failed the same way.
    assert_eq!(
        counted + failed as u64,
        unavailable + 1,
        "every failure is written or counted:\n{text}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// A gateway whose access log (JSON lines) goes to `{dir}/access.log`, on a route `me`
/// that varies on a cookie and on `User-Agent`; answering when this returns.
async fn gateway_with_access_log(up: &FakeUpstream) -> (Proc, String, std::path::PathBuf) {
    let (port, admin) = (free_port(), free_port());
    let dir = std::env::temp_dir().join(format!("tessera-access-log-{port}"));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("tessera.toml");
    std::fs::write(
        &config,
        format!(
            "[gateway]\nlisten = \"127.0.0.1:{port}\"\nadmin_listen = \"127.0.0.1:{admin}\"\n\
             [upstream]\nurl = \"{}\"\n[access_log]\npath = \"{}\"\nformat = \"json\"\n\
             [[fragment]]\nname = \"me\"\nrender = \"/_render/me\"\n\
             vary = [\"cookie:session_id\", \"header:user-agent\"]\n",
            up.url(),
            dir.join("access.log").display(),
        ),
    )
    .unwrap();
    let gateway = Proc::spawn(
        Command::new(bin_dir().join("tessera-gateway"))
            .arg("--config")
            .arg(&config)
            .env_remove("TESSERA_CONFIG")
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
        "tessera-gateway",
    );
    let base = format!("http://127.0.0.1:{port}");
    eventually("the gateway answers", Duration::from_secs(20), || async {
        client().get(format!("{base}/up")).send().await.is_ok()
    })
    .await;
    (gateway, base, dir)
}

/// The lines of an access log in JSON (none when the file is missing).
fn access_lines(path: &std::path::Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect()
}

/// A waited request with a trace, a session cookie and a user agent.
fn headers(trace: &str, secret: &str, agent: &str) -> reqwest::header::HeaderMap {
    let mut h = reqwest::header::HeaderMap::new();
    let traceparent = format!("00-{trace}-00f067aa0ba902b7-01");
    for (name, value) in [
        ("prefer", "wait=5".to_string()),
        ("traceparent", traceparent),
        ("cookie", format!("session_id={secret}")),
        ("user-agent", agent.to_string()),
    ] {
        h.insert(name, value.parse().unwrap());
    }
    h
}

/// The access log (item 2 of issue 32): a line per public request with the route, the
/// `Cache-Status`, the upstream's time and the trace id; never a cookie or a vary value.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_access_log_has_a_line_per_request_and_reopens_on_sigusr1() {
    let up = FakeUpstream::start().await;
    let (gateway, base, dir) = gateway_with_access_log(&up).await;
    let access = dir.join("access.log");
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let (secret, agent) = ("s3cr3t-session-4711", "secret-agent-0099");
    for _ in 0..2 {
        let r = client()
            .get(format!("{base}/fragments/me"))
            .headers(headers(trace, secret, agent));
        assert_eq!(r.send().await.unwrap().status(), reqwest::StatusCode::OK);
    }
    eventually(
        "three lines are written",
        Duration::from_secs(10),
        || async { access_lines(&access).len() >= 3 },
    )
    .await;
    let text = std::fs::read_to_string(&access).unwrap();
    assert!(
        !text.contains(secret),
        "a cookie in the access log:\n{text}"
    );
    assert!(
        !text.contains(agent),
        "a vary value in the access log:\n{text}"
    );
    let written = access_lines(&access);
    let fragments: Vec<_> = written.iter().filter(|l| l["route"] == "me").collect();
    assert_eq!(fragments.len(), 2, "{text}");
    assert!(
        fragments
            .iter()
            .all(|l| l["trace_id"] == trace && l["status"] == 200)
    );
    let cache = |l: &serde_json::Value| l["cache_status"].as_str().unwrap_or("").to_string();
    assert!(cache(fragments[0]).contains("fwd=miss"), "{text}");
    assert!(cache(fragments[1]).contains("hit"), "{text}");
    let page = written.iter().find(|l| l["target"] == "/up").unwrap();
    assert!(
        page["upstream_ms"].is_f64(),
        "a proxied request's upstream time: {page}"
    );
    assert_eq!(page["route"], serde_json::Value::Null);
    assert_eq!(
        page["trace_id"].as_str().unwrap().len(),
        32,
        "a trace id is made up"
    );

    // logrotate: rename, then SIGUSR1; the lines go to a new file of the old name.
    let rotated = dir.join("access.log.1");
    std::fs::rename(&access, &rotated).unwrap();
    let pid = gateway.child.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-USR1", &pid])
            .status()
            .unwrap()
            .success()
    );
    eventually(
        "lines go to the reopened file",
        Duration::from_secs(10),
        || async {
            let _ = client().get(format!("{base}/after-rotation")).send().await;
            access_lines(&access)
                .iter()
                .any(|l| l["target"] == "/after-rotation")
        },
    )
    .await;
    assert!(
        access_lines(&rotated).len() >= 3,
        "the rotated file keeps what it had"
    );
    drop(gateway);
    let _ = std::fs::remove_dir_all(&dir);
}
