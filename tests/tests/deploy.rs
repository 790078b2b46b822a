//! Everything in `deploy/` that can be checked without a container engine or a cluster:
//! Kubernetes manifests against the Kubernetes schemas (and the KEDA ScaledObject against
//! KEDA's), the compose file against the compose spec, the Procfile, the Dockerfile lint,
//! the systemd units, the shell scripts, and the shipped TOML configs against Tessera's own
//! validation. Each validator is also shown a broken input, so a validator that accepts
//! everything fails here.
//!
//! The validators are pinned in `deploy/check/` and installed by `scripts/deploy-tools.sh`
//! (part of the test command).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use tessera_tests::cluster::bin_dir;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .canonicalize()
        .unwrap()
}

/// A validator from `target/deploy-tools/venv/bin`, or a clear failure saying how to
/// install it.
fn tool(name: &str) -> Command {
    let path = root().join("target/deploy-tools/venv/bin").join(name);
    assert!(
        path.exists(),
        "{} is missing: run `bash scripts/deploy-tools.sh` (the test command `bash \
         scripts/test.sh` does)",
        path.display()
    );
    let mut c = Command::new(path);
    c.current_dir(root());
    c
}

fn run(mut command: Command) -> Output {
    command.output().expect("the validator runs")
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn assert_ok(out: &Output, what: &str) {
    assert!(out.status.success(), "{what} failed:\n{}", text(out));
}

fn assert_refused(out: &Output, what: &str) {
    assert!(
        !out.status.success(),
        "{what}: the validator accepted a broken input:\n{}",
        text(out)
    );
}

/// A fresh directory under the system's temporary directory.
fn temp_dir() -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "tessera-deploy-{}-{:x}",
        std::process::id(),
        rand::random::<u32>()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// `contents` written to `name` in a fresh temporary directory.
fn temp(name: &str, contents: &str) -> PathBuf {
    let path = temp_dir().join(name);
    std::fs::write(&path, contents).unwrap();
    path
}

fn manifests() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(root().join("deploy/kubernetes"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    files
}

#[test]
fn kubernetes_manifests_validate_against_the_kubernetes_schemas() {
    let files = manifests();
    let mut validate = tool("kubernetes-validate");
    validate.args(["--strict", "--kubernetes-version", "1.30.0"]);
    validate.args(&files);
    let out = run(validate);
    assert_ok(&out, "kubernetes-validate");
    let report = text(&out);
    // Every built-in kind passed; only the two non-core kinds have no bundled schema
    // (they are checked by the next tests).
    for file in &files {
        let name = file.file_name().unwrap().to_string_lossy();
        let lines: Vec<&str> = report.lines().filter(|l| l.contains(&*name)).collect();
        assert!(!lines.is_empty(), "{name} was not validated:\n{report}");
        if name == "keda-scaledobject.yaml" || name == "kustomization.yaml" {
            continue;
        }
        assert!(
            lines.iter().all(|l| l.contains(" passed ")),
            "{name}:\n{report}"
        );
    }
    for kind in [
        "Deployment",
        "Service",
        "PodDisruptionBudget",
        "ConfigMap",
        "Secret",
    ] {
        let needle = format!("{}/", kind.to_lowercase());
        assert!(report.contains(&needle), "no {kind} validated:\n{report}");
    }

    let broken = temp(
        "broken.yaml",
        "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: x}\nspec:\n  replicas: two\n  \
         selector: {matchLabels: {a: b}}\n  template:\n    metadata: {labels: {a: b}}\n    \
         spec: {containers: [{name: c, image: i, livenessProbe: {exec: {command: x}}}]}\n",
    );
    let mut validate = tool("kubernetes-validate");
    validate.arg("--strict").arg(&broken);
    assert_refused(&run(validate), "kubernetes-validate");
}

#[test]
fn the_keda_scaled_object_validates_against_the_keda_schema() {
    let script = root().join("deploy/check/keda.js");
    assert!(
        root()
            .join("deploy/check/node_modules/@kubernetes-models/keda")
            .exists(),
        "the KEDA schema is missing: run `bash scripts/deploy-tools.sh`"
    );
    let node = |file: &Path| {
        let mut c = Command::new("node");
        c.arg(&script).arg(file);
        run(c)
    };
    let file = root().join("deploy/kubernetes/keda-scaledobject.yaml");
    let out = node(&file);
    assert_ok(&out, "the KEDA schema check");
    assert!(
        text(&out).contains("ScaledObject tessera-worker is valid"),
        "{}",
        text(&out)
    );
    let manifest = std::fs::read_to_string(&file).unwrap();
    assert!(manifest.contains("type: rabbitmq") && manifest.contains("queueName: tessera.build"));
    let broken = temp(
        "keda.yaml",
        &manifest.replace("minReplicaCount: 1", "minReplicaCount: one"),
    );
    assert_refused(&node(&broken), "the KEDA schema check");
}

#[test]
fn kustomization_applies_every_manifest_but_the_hpa_alternative() {
    let kustomization =
        std::fs::read_to_string(root().join("deploy/kubernetes/kustomization.yaml")).unwrap();
    let listed: Vec<&str> = kustomization
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- "))
        .collect();
    for file in manifests() {
        let name = file.file_name().unwrap().to_string_lossy().into_owned();
        let expected = !matches!(name.as_str(), "kustomization.yaml" | "hpa.yaml");
        assert_eq!(
            listed.contains(&name.as_str()),
            expected,
            "{name} in kustomization.yaml"
        );
    }
    for name in &listed {
        assert!(
            root().join("deploy/kubernetes").join(name).exists(),
            "{name}"
        );
    }
}

#[test]
fn worker_termination_grace_outlasts_the_longest_build() {
    let worker = std::fs::read_to_string(root().join("deploy/kubernetes/worker.yaml")).unwrap();
    let grace: u64 = worker
        .lines()
        .find_map(|l| l.trim().strip_prefix("terminationGracePeriodSeconds:"))
        .expect("worker.yaml sets terminationGracePeriodSeconds")
        .trim()
        .parse()
        .unwrap();
    let config = configmap_toml();
    // The ConfigMap relies on the Secret's variables, as the pods do.
    let longest =
        tessera_protocol::Config::from_sources("configmap", Some(&config), |var| match var {
            "TESSERA_AMQP_URL" => Some("amqp://127.0.0.1".into()),
            "TESSERA_ADMIN_TOKEN" => Some("t".into()),
            _ => None,
        })
        .unwrap()
        .fragments
        .iter()
        .map(|r| r.build_timeout.as_secs())
        .max()
        .unwrap_or(10);
    assert!(
        grace > longest + 5,
        "terminationGracePeriodSeconds {grace} must exceed the longest build_timeout \
         ({longest} s) + 5 s"
    );
}

/// The `tessera.toml` key of the ConfigMap.
fn configmap_toml() -> String {
    let mut python = tool("python3");
    python.args([
        "-c",
        "import sys, yaml; print(yaml.safe_load(open(sys.argv[1]))['data']['tessera.toml'])",
        "deploy/kubernetes/configmap.yaml",
    ]);
    let out = run(python);
    assert_ok(&out, "reading the ConfigMap");
    String::from_utf8(out.stdout).unwrap()
}

/// A changed configuration rolls the pods: both pod templates carry the sha256 of the
/// ConfigMap's `tessera.toml` (deploy/README.md says how to recompute it).
#[test]
fn the_pod_templates_carry_the_configs_checksum() {
    let mut toml = configmap_toml();
    toml.pop(); // print's newline
    let out = Command::new("sha256sum")
        .arg(temp("tessera.toml", &toml))
        .output()
        .expect("sha256sum runs");
    assert_ok(&out, "sha256sum");
    let sum = String::from_utf8_lossy(&out.stdout)[..64].to_string();
    for manifest in ["gateway.yaml", "worker.yaml"] {
        let text =
            std::fs::read_to_string(root().join("deploy/kubernetes").join(manifest)).unwrap();
        assert!(
            text.contains(&format!("checksum/config: \"{sum}\"")),
            "{manifest}: set the pod template's checksum/config to {sum}"
        );
    }
}

/// `tessera-gateway --config FILE check` with `env`.
fn check_config(file: &Path, env: &[(&str, &str)]) -> Output {
    let mut c = Command::new(bin_dir().join("tessera-gateway"));
    c.arg("--config").arg(file).arg("check");
    for var in [
        "TESSERA_CONFIG",
        "TESSERA_LISTEN",
        "TESSERA_ADMIN_LISTEN",
        "TESSERA_UPSTREAM_URL",
        "TESSERA_MEMCACHED",
        "TESSERA_AMQP_URL",
        "TESSERA_ADMIN_TOKEN",
    ] {
        c.env_remove(var);
    }
    c.envs(env.iter().copied());
    run(c)
}

#[test]
fn the_shipped_configs_pass_tesseras_own_validation() {
    // Compose: the token comes from the environment, as docker-compose.yml passes it.
    let compose = root().join("deploy/tessera.compose.toml");
    let out = check_config(&compose, &[("TESSERA_ADMIN_TOKEN", "t")]);
    assert_ok(&out, "deploy/tessera.compose.toml");
    assert!(text(&out).contains("bus RabbitMQ"), "{}", text(&out));
    let out = check_config(&compose, &[]);
    assert_eq!(out.status.code(), Some(2), "no token: {}", text(&out));
    assert!(text(&out).contains("gateway.admin_token"));

    // Kubernetes: the ConfigMap plus the Secret's variables.
    let secret = std::fs::read_to_string(root().join("deploy/kubernetes/secret.yaml")).unwrap();
    let value = |key: &str| {
        secret
            .lines()
            .find_map(|l| l.trim().strip_prefix(&format!("{key}: ")))
            .unwrap_or_else(|| panic!("{key} in secret.yaml"))
            .trim_matches('"')
            .to_string()
    };
    let (amqp, token) = (value("TESSERA_AMQP_URL"), value("TESSERA_ADMIN_TOKEN"));
    let configmap = temp("tessera.toml", &configmap_toml());
    let out = check_config(
        &configmap,
        &[("TESSERA_AMQP_URL", &amqp), ("TESSERA_ADMIN_TOKEN", &token)],
    );
    assert_ok(&out, "the ConfigMap's tessera.toml with the Secret");
    assert!(text(&out).contains("0 embedded workers"), "{}", text(&out));
}

#[test]
fn the_compose_file_follows_the_compose_spec() {
    let mut check = tool("check-jsonschema");
    check.args([
        "--builtin-schema",
        "vendor.compose-spec",
        "deploy/docker-compose.yml",
    ]);
    assert_ok(&run(check), "check-jsonschema (compose spec)");
    let compose = std::fs::read_to_string(root().join("deploy/docker-compose.yml")).unwrap();
    for service in [
        "rabbitmq:",
        "memcached:",
        "upstream:",
        "gateway:",
        "worker:",
    ] {
        assert!(
            compose.contains(&format!("\n  {service}")),
            "service {service}"
        );
    }
    // `--scale worker=N` needs a worker without a fixed name or host port.
    let worker = compose.split("\n  worker:").nth(1).unwrap();
    assert!(!worker.contains("container_name") && !worker.contains("ports:"));

    let broken = temp(
        "compose.yml",
        "services:\n  web:\n    image: x\n    ports: 8080\n    restart: sometimes\n",
    );
    let mut check = tool("check-jsonschema");
    check
        .args(["--builtin-schema", "vendor.compose-spec"])
        .arg(&broken);
    assert_refused(&run(check), "check-jsonschema (compose spec)");
}

#[test]
fn the_procfile_parses_with_web_on_port_and_a_worker() {
    let mut honcho = tool("honcho");
    honcho.args(["-f", "deploy/Procfile", "check"]);
    let out = run(honcho);
    assert_ok(&out, "honcho check");
    assert!(
        text(&out).contains("Valid procfile detected (web, worker)"),
        "{}",
        text(&out)
    );
    let procfile = std::fs::read_to_string(root().join("deploy/Procfile")).unwrap();
    for line in procfile
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
    {
        let (name, command) = line.split_once(": ").unwrap_or(("", ""));
        assert!(
            !name.is_empty()
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
                && !command.trim().is_empty(),
            "not a `name: command` line: {line:?}"
        );
    }
    let web = procfile.lines().find(|l| l.starts_with("web:")).unwrap();
    assert!(
        web.contains("$PORT") && web.contains("tessera-gateway"),
        "{web}"
    );
    // honcho is lenient about syntax (hence the check above) but refuses duplicates.
    let broken = temp("Procfile", "web: a\nweb: b\n");
    let mut honcho = tool("honcho");
    honcho.arg("-f").arg(&broken).arg("check");
    assert_refused(&run(honcho), "honcho check");
}

#[test]
fn the_dockerfile_passes_hadolint_and_runs_as_non_root() {
    let mut lint = tool("hadolint");
    lint.arg("deploy/Dockerfile");
    assert_ok(&run(lint), "hadolint");
    let dockerfile = std::fs::read_to_string(root().join("deploy/Dockerfile")).unwrap();
    assert!(dockerfile.matches("\nFROM ").count() >= 2, "multi-stage");
    let user = dockerfile
        .lines()
        .rev()
        .find_map(|l| l.strip_prefix("USER "))
        .expect("a USER line");
    assert!(
        !user.starts_with("root") && !user.starts_with('0'),
        "{user}"
    );
    for binary in ["tessera-gateway", "tessera-worker"] {
        assert!(dockerfile.contains(&format!("/out/{binary}")), "{binary}");
    }
    let broken = temp(
        "Dockerfile",
        "FROM debian\nRUN cd /tmp && apt-get install curl\n",
    );
    let mut lint = tool("hadolint");
    lint.arg(&broken);
    assert_refused(&run(lint), "hadolint");
}

#[test]
fn the_systemd_units_verify() {
    let dir = temp_dir();
    let bin = bin_dir();
    let mut units = Vec::new();
    for (source, name) in [
        ("tessera-gateway.service", "tessera-gateway.service"),
        ("tessera-worker@.service", "tessera-worker@9091.service"),
    ] {
        let text = std::fs::read_to_string(root().join("deploy/systemd").join(source)).unwrap();
        assert!(text.contains("ProtectSystem=strict") && text.contains("NoNewPrivileges=yes"));
        assert!(
            text.contains("ExecReload=/bin/kill -HUP $MAINPID"),
            "{source}: `systemctl reload` sends SIGHUP"
        );
        // Verify against the built binaries: the units name /usr/local/bin.
        let text = text.replace("/usr/local/bin/", &format!("{}/", bin.display()));
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        units.push(path);
    }
    let verify = |units: &[PathBuf]| {
        let mut c = Command::new("systemd-analyze");
        c.arg("verify").args(units);
        c.output()
            .expect("systemd-analyze runs (bash scripts/deploy-tools.sh installs Debian's systemd)")
    };
    assert_ok(&verify(&units), "systemd-analyze verify");
    let broken = dir.join("broken.service");
    std::fs::write(&broken, "[Service]\nExecStart=relative/path\n").unwrap();
    assert_refused(&verify(&[broken]), "systemd-analyze verify");
}

#[test]
fn the_scripts_pass_shellcheck() {
    let mut check = tool("shellcheck");
    check.args([
        "deploy/local/cluster.sh",
        "scripts/test.sh",
        "scripts/services.sh",
        "scripts/rabbitmq-cluster.sh",
        "scripts/deploy-tools.sh",
        "bench/hit-path.sh",
        "bench/hit-path-instructions.sh",
        "bench/distributed.sh",
        "bench/compression.sh",
        "bench/soak.sh",
        "bench/memory.sh",
        "bench/time-to-content.sh",
        "bench/purge-storm.sh",
        "bench/purge-ack.sh",
        "bench/chaos.sh",
        "bench/slow-readers.sh",
        "bench/ports.sh",
        ".ci/run",
    ]);
    assert_ok(&run(check), "shellcheck");
    let broken = temp("broken.sh", "#!/bin/bash\nrm -rf $1/*\n");
    let mut check = tool("shellcheck");
    check.arg(&broken);
    assert_refused(&run(check), "shellcheck");
}
