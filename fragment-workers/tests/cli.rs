//! The `tessera-worker` binary: refuses what it cannot run before connecting anywhere.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;

const DISTRIBUTED: &str =
    "[store]\nmemcached = [\"127.0.0.1:1\"]\n[bus]\namqp = \"amqp://127.0.0.1:1\"\n";

fn worker(toml: &str, args: &[&str]) -> std::process::Output {
    let path = std::env::temp_dir().join(format!(
        "tessera-worker-cli-{}-{:x}.toml",
        std::process::id(),
        rand::random::<u64>()
    ));
    std::fs::write(&path, toml).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_tessera-worker"))
        .arg("--config")
        .arg(&path)
        .args(args)
        .env_remove("TESSERA_CONFIG")
        .env_remove("TESSERA_ADMIN_TOKEN")
        .env_remove("TESSERA_MEMCACHED")
        .env_remove("TESSERA_AMQP_URL")
        .output()
        .expect("the binary runs");
    let _ = std::fs::remove_file(&path);
    out
}

#[test]
fn refuses_an_exposed_admin_listener_without_a_token() {
    let out = worker(DISTRIBUTED, &["--admin-listen", "0.0.0.0:0"]);
    assert_eq!(out.status.code(), Some(2), "exit status");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("workers.admin_token"), "{stderr}");
}

#[test]
fn needs_a_broker_and_a_store() {
    let out = worker("", &[]);
    assert_eq!(out.status.code(), Some(2), "exit status");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("[bus] amqp"), "{stderr}");
}

#[test]
fn help_describes_the_command_line() {
    let out = Command::new(env!("CARGO_BIN_EXE_tessera-worker"))
        .arg("--help")
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for flag in ["--config", "--concurrency", "--admin-listen"] {
        assert!(text.contains(flag), "{text}");
    }
}
