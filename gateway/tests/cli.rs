//! The `tessera-gateway` binary: refuses bad configurations before binding anything.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;

fn run_with_config(toml: &str) -> std::process::Output {
    let dir = std::env::temp_dir().join(format!("tessera-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(format!("{:x}.toml", rand::random::<u64>()));
    std::fs::write(&path, toml).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_tessera-gateway"))
        .arg("--config")
        .arg(&path)
        .env_remove("TESSERA_CONFIG")
        .env_remove("TESSERA_ADMIN_TOKEN")
        .output()
        .expect("the binary runs");
    let _ = std::fs::remove_file(&path);
    out
}

#[test]
fn refuses_an_exposed_admin_listener_without_a_token() {
    let out =
        run_with_config("[gateway]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"0.0.0.0:0\"\n");
    assert_eq!(out.status.code(), Some(2), "exit status");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("gateway.admin_token"), "{stderr}");
}

#[test]
fn names_the_bad_key_and_exits_non_zero() {
    let out = run_with_config("[[fragment]]\nname = \"x\"\nrender = \"/r\"\nmax_attempts = 0\n");
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("fragment[0].max_attempts"), "{stderr}");
}

#[test]
fn help_describes_the_command_line() {
    let out = Command::new(env!("CARGO_BIN_EXE_tessera-gateway"))
        .arg("--help")
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for flag in ["--config", "--demo"] {
        assert!(text.contains(flag), "{text}");
    }
}

/// Starts a gateway in this process with memory backends; returns its admin URL.
async fn running_gateway(token: &str) -> (String, tokio_util::sync::CancellationToken) {
    let mut config = tessera_protocol::Config {
        fragments: vec![tessera_protocol::FragmentRoute::new(
            "news",
            "/_render/news",
        )],
        ..Default::default()
    };
    config.gateway.admin_token = token.into();
    let backends = tessera_protocol::Backends::memory(&config);
    let public = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let admin = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", admin.local_addr().unwrap());
    let stop = tokio_util::sync::CancellationToken::new();
    let s = stop.clone();
    tokio::spawn(async move {
        tessera_gateway::serve(public, Some(admin), config, backends, async move {
            s.cancelled().await
        })
        .await
        .unwrap();
    });
    (url, stop)
}

fn purge(config: &str, args: &[&str]) -> std::process::Output {
    let path = std::env::temp_dir().join(format!("tessera-cli-{:x}.toml", rand::random::<u64>()));
    std::fs::write(&path, config).unwrap();
    Command::new(env!("CARGO_BIN_EXE_tessera-gateway"))
        .arg("--config")
        .arg(&path)
        .args(args)
        .env_remove("TESSERA_CONFIG")
        .env_remove("TESSERA_ADMIN_TOKEN")
        .output()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purge_route_from_the_command_line() {
    let (admin, stop) = running_gateway("tok").await;
    let config =
        "[gateway]\nadmin_token = \"tok\"\n[[fragment]]\nname = \"news\"\nrender = \"/r\"\n";
    let a = admin.clone();
    let out = tokio::task::spawn_blocking(move || {
        purge(config, &["purge", "route", "news", "--admin", &a])
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let body: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(body["route"], "news");
    assert!(body["generation"].as_u64().unwrap() > 0);

    let wrong = "[gateway]\nadmin_token = \"nope\"\n";
    let out = tokio::task::spawn_blocking(move || {
        purge(wrong, &["purge", "route", "news", "--admin", &admin])
    })
    .await
    .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("401"));
    stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purge_tag_from_the_command_line() {
    let (admin, stop) = running_gateway("tok").await;
    let config = "[gateway]\nadmin_token = \"tok\"\n";
    let run = |args: Vec<String>| {
        tokio::task::spawn_blocking(move || {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            purge(config, &args)
        })
    };
    let args = |tag: &str| {
        ["purge", "tag", tag, "--admin", &admin]
            .map(str::to_string)
            .to_vec()
    };
    let out = run(args("50%-off")).await.unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let body: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(body["tag"], "50%-off");
    assert!(body["purged_at"].as_u64().unwrap() > 0);

    // Soft, and waiting for the acknowledgements (the one gateway's own).
    let mut soft = args("p-1");
    soft.extend(["--soft", "--wait", "2s"].map(str::to_string));
    let out = run(soft).await.unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let body: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(body["soft"], true, "{body}");
    assert_eq!(body["acknowledged"]["applied"], 1, "{body}");

    // Several tags: each, or the fragments carrying all of them.
    for all_of in [false, true] {
        let mut several = ["purge", "tag", "a", "b", "--admin", &admin]
            .map(str::to_string)
            .to_vec();
        if all_of {
            several.insert(2, "--all-of".into());
        }
        let out = run(several).await.unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let body: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(body["tags"], serde_json::json!(["a", "b"]));
        assert_eq!(body["all_of"], all_of);
        assert!(body.get("tag").is_none(), "{body}");
    }

    // Refused before any call: not a tag.
    let out = run(args("a/b")).await.unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("token characters"));

    let wrong = "[gateway]\nadmin_token = \"nope\"\n";
    let a = args("p-1");
    let out = tokio::task::spawn_blocking(move || {
        let a: Vec<&str> = a.iter().map(String::as_str).collect();
        purge(wrong, &a)
    })
    .await
    .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("401"));
    stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probe_checks_health_with_the_admin_token() {
    let (admin, stop) = running_gateway("tok").await;
    let probe = |config: &'static str, path: &str| {
        let url = format!("{admin}{path}");
        tokio::task::spawn_blocking(move || purge(config, &["probe", &url]))
    };
    // The workers' token is used when the gateway's is not set.
    for (config, path) in [
        ("[gateway]\nadmin_token = \"tok\"\n", "/readyz"),
        ("[workers]\nadmin_token = \"tok\"\n", "/healthz"),
    ] {
        let ok = probe(config, path).await.unwrap();
        assert!(
            ok.status.success(),
            "{config}: {}",
            String::from_utf8_lossy(&ok.stderr)
        );
    }
    let refused = probe("", "/readyz").await.unwrap();
    assert_eq!(refused.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&refused.stderr).contains("401"));
    stop.cancel();
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let url = format!("http://{closed}/healthz");
    let down = tokio::task::spawn_blocking(move || purge("", &["probe", &url]))
        .await
        .unwrap();
    assert_eq!(
        down.status.code(),
        Some(1),
        "nothing listening fails the probe"
    );
}

#[test]
fn check_validates_a_config_without_starting_anything() {
    let ok = purge(
        "[gateway]\nlisten = \"127.0.0.1:1\"\n[[fragment]]\nname = \"news\"\nrender = \"/r\"\n",
        &["check"],
    );
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let summary = String::from_utf8_lossy(&ok.stdout);
    assert!(
        summary.contains("configuration OK") && summary.contains("routes: news"),
        "{summary}"
    );
    let bad = purge("[cache]\nttl = \"0s\"\n", &["check"]);
    assert_eq!(bad.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("cache.ttl"));
}

/// `check` with no file at all: the defaults, and what they mean without routes.
#[test]
fn check_without_a_config_says_that_no_routes_are_configured() {
    let out = Command::new(env!("CARGO_BIN_EXE_tessera-gateway"))
        .arg("check")
        .env_remove("TESSERA_CONFIG")
        .env_remove("TESSERA_ADMIN_TOKEN")
        .env_remove("TESSERA_RENDER_TOKEN")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let summary = String::from_utf8_lossy(&out.stdout);
    assert!(summary.contains("configuration OK"), "{summary}");
    assert!(
        summary.contains("no routes are configured")
            && summary.contains("every request is proxied to the upstream"),
        "{summary}"
    );
    assert!(!summary.contains("routes: \n"), "{summary}");
}

/// A configuration whose listeners cannot all be bound is refused by `check`, naming the
/// keys, as the gateway itself refuses it before binding anything.
#[test]
fn check_refuses_listeners_that_collide() {
    for (toml, keys) in [
        (
            "[gateway]\nlisten = \"127.0.0.1:9090\"\nadmin_listen = \"127.0.0.1:9090\"\n",
            ["gateway.admin_listen", "gateway.listen"],
        ),
        (
            "[store]\nmemcached = [\"127.0.0.1:11211\"]\n[bus]\namqp = \"amqp://127.0.0.1\"\n\
             [workers]\nadmin_listen = \"0.0.0.0:8080\"\nadmin_token = \"t\"\n",
            ["workers.admin_listen", "gateway.listen"],
        ),
        (
            "[upstream]\nurl = \"http://localhost:8080\"\n",
            ["upstream.url", "gateway.listen"],
        ),
    ] {
        for args in [&["check"][..], &[]] {
            let out = purge(toml, args);
            assert_eq!(out.status.code(), Some(2), "{toml} {args:?}");
            let stderr = String::from_utf8_lossy(&out.stderr);
            for key in keys {
                assert!(stderr.contains(key), "{args:?}: {stderr}");
            }
        }
    }
}

/// `check` names a cluster's nodes (passwords hidden) and its queue type, and warns when
/// classic queues would lose queued builds with a node.
#[test]
fn check_names_the_brokers_nodes_and_warns_about_classic_queues_on_a_cluster() {
    let cluster = "[store]\nmemcached = [\"127.0.0.1:11211\"]\n[workers]\nembedded = 0\n[bus]\n\
                   amqp = [\"amqp://u:s3cret@10.0.0.1:5672/%2f\", \"amqp://u:s3cret@10.0.0.2:5672/%2f\"]\n";
    let out = purge(&format!("{cluster}queue_type = \"quorum\"\n"), &["check"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let summary = String::from_utf8_lossy(&out.stdout);
    assert!(
        summary.contains(
            "bus RabbitMQ amqp://u:***@10.0.0.1:5672/%2f, amqp://u:***@10.0.0.2:5672/%2f (quorum queues)"
        ),
        "{summary}"
    );
    assert!(!summary.contains("s3cret"), "{summary}");
    assert!(
        out.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let classic = purge(cluster, &["check"]);
    assert!(classic.status.success());
    let warning = String::from_utf8_lossy(&classic.stderr);
    assert!(warning.contains("bus.queue_type = \"quorum\""), "{warning}");
}

/// `dead-letters` prints a table (`--json` for scripts) and retries or discards by id or
/// route (issue 32); an unknown id exits 1 naming the 404.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_from_the_command_line() {
    let (admin, stop) = running_gateway("tok").await;
    let config = "[gateway]\nadmin_token = \"tok\"\n";
    let run = |args: &[&str]| {
        let mut args: Vec<String> = args.iter().map(|a| (*a).to_string()).collect();
        args.extend(["--admin".to_string(), admin.clone()]);
        tokio::task::spawn_blocking(move || {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            purge(config, &args)
        })
    };
    let out = run(&["dead-letters"]).await.unwrap();
    assert!(out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stdout), "no dead letters\n");
    let out = run(&["dead-letters", "--json"]).await.unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "[]");
    let out = run(&["dead-letters", "discard", "--route", "news"])
        .await
        .unwrap();
    assert!(out.status.success());
    let body: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(body["discarded"], 0);
    let out = run(&["dead-letters", "retry", "0123456789abcdef"])
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("404"));
    let out = run(&["dead-letters", "retry"]).await.unwrap();
    assert_eq!(out.status.code(), Some(2), "an id or --route is required");
    stop.cancel();
}
