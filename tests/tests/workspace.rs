//! The shape of the workspace: the contract crate stays lean.
//!
//! `tessera-protocol` is what an application links to publish build requests or read
//! envelopes; it must not pull in the network clients or the HTTP stack, which live in
//! `tessera-backends` and `tessera-runtime`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::process::Command;

/// The crates that `package` links in normal (non-dev, non-build) builds.
fn normal_dependencies(package: &str) -> BTreeSet<String> {
    let out = Command::new(env!("CARGO"))
        .args([
            "tree",
            "--locked",
            "--offline",
            "-e",
            "normal",
            "--prefix",
            "none",
        ])
        .args(["--format", "{p}", "-p", package])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("cargo tree runs");
    assert!(
        out.status.success(),
        "cargo tree -p {package} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .filter_map(|line| line.split_whitespace().next().map(str::to_string))
        .collect()
}

const HEAVY: [&str; 7] = [
    "lapin",
    "memcache",
    "r2d2",
    "hyper",
    "hyper-util",
    "tracing-subscriber",
    "prometheus-client",
];

#[test]
fn the_contract_crate_links_no_network_client_or_http_stack() {
    let contract = normal_dependencies("tessera-protocol");
    let heavy: Vec<_> = HEAVY.iter().filter(|c| contract.contains(**c)).collect();
    assert!(heavy.is_empty(), "tessera-protocol links {heavy:?}");
    // The same query sees them where they belong, so an empty answer is not a pass.
    let backends = normal_dependencies("tessera-backends");
    assert!(backends.contains("lapin") && backends.contains("memcache"));
    let runtime = normal_dependencies("tessera-runtime");
    assert!(runtime.contains("hyper") && runtime.contains("tracing-subscriber"));
}
