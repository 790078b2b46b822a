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

/// The gateway's cache core (`gateway/src/cache/`) knows nothing of HTTP: it imports
/// nothing from the front (`gateway/src/http/`), the server or hyper. The front uses the
/// core, never the other way round, so the two halves cannot grow into a circle again.
#[test]
fn the_gateway_cache_core_imports_nothing_of_the_http_front() {
    let core = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../gateway/src/cache");
    let mut files = 0;
    for entry in std::fs::read_dir(&core).unwrap() {
        let path = entry.unwrap().path();
        let text = std::fs::read_to_string(&path).unwrap();
        files += 1;
        for (n, line) in text.lines().enumerate() {
            let code = line.split("//").next().unwrap();
            for front in [
                "crate::http",
                "super::super::http",
                "hyper::",
                "tessera_runtime::web",
            ] {
                assert!(
                    !code.contains(front),
                    "{}:{}: the cache core names {front}: {line}",
                    path.display(),
                    n + 1
                );
            }
        }
    }
    assert!(files >= 6, "found only {files} files in {}", core.display());
}
