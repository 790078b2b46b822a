//! Real processes for distributed tests: `tessera-gateway` and `tessera-worker` binaries
//! sharing one config (memcached, RabbitMQ, a unique namespace), killed when dropped.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tessera_protocol::FragmentRoute;

use crate::harness::{amqp_url, memcached_addr, require_servers, unique_namespace};

/// Where the workspace's binaries are: `TESSERA_BIN_DIR`, else next to this test
/// executable (`target/<profile>/`), where they are brought up to date with cargo once per
/// test process (stale binaries would test old code).
pub fn bin_dir() -> PathBuf {
    static DIR: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    DIR.get_or_init(|| {
        if let Some(dir) = std::env::var_os("TESSERA_BIN_DIR") {
            return PathBuf::from(dir);
        }
        let exe = std::env::current_exe().expect("test executable path");
        let dir = exe
            .parent()
            .and_then(|deps| deps.parent())
            .expect("target/<profile>/deps/<test>")
            .to_path_buf();
        let status = Command::new(env!("CARGO"))
            .args([
                "build",
                "-q",
                "-p",
                "tessera-gateway",
                "-p",
                "tessera-workers",
                "--bins",
            ])
            .status()
            .expect("cargo runs");
        assert!(status.success(), "building the binaries failed");
        dir
    })
    .clone()
}

/// A free TCP port on 127.0.0.1 (free when asked; good enough for tests).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// A child process, killed (SIGKILL) when dropped.
#[derive(Debug)]
pub struct Proc {
    /// The process.
    pub child: Child,
    /// What it is, for messages.
    pub name: String,
}

impl Proc {
    /// Sends SIGKILL and reaps it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Sends SIGTERM (graceful stop) and waits up to `within` for it to exit.
    pub fn terminate(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        let deadline = std::time::Instant::now() + within;
        while std::time::Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// Whether it is still running.
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Proc {
    /// Starts `command`; the process is killed when the returned value is dropped.
    pub fn spawn(command: &mut Command, name: &str) -> Proc {
        let child = command
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        Proc {
            child,
            name: name.to_string(),
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A config file and the processes started from it.
#[derive(Debug)]
pub struct Cluster {
    /// The TOML every process reads (gateways get their listeners prepended).
    pub base_toml: String,
    /// The workers' config file.
    pub config_path: PathBuf,
    /// Its namespace (also the prefix of its queues and exchanges).
    pub namespace: String,
    /// Public URLs of the gateways started so far.
    pub gateways: Vec<String>,
    /// Admin URLs, in the same order.
    pub admins: Vec<String>,
    /// Gateway processes.
    pub gateway_procs: Vec<Proc>,
    /// Worker processes.
    pub workers: Vec<Proc>,
}

impl Cluster {
    /// Writes a config for `routes` (their queues prefixed with a fresh namespace) against
    /// `upstream`, on `memcached` (default: the test memcached) and the test RabbitMQ.
    pub fn new(
        upstream: &str,
        mut routes: Vec<FragmentRoute>,
        memcached: Option<String>,
    ) -> Cluster {
        require_servers();
        let namespace = unique_namespace();
        for r in &mut routes {
            r.queue = format!("{namespace}.{}", r.queue);
        }
        let mut toml = format!(
            "[upstream]\nurl = \"{upstream}\"\ntimeout = \"5s\"\n[store]\nmemcached = [\"{}\"]\nnamespace = \"{namespace}\"\n\
             [bus]\namqp = \"{}\"\nqueue_expiry = \"10m\"\n[workers]\nembedded = 0\nconcurrency = 8\n[cache]\nttl = \"2s\"\n",
            memcached.unwrap_or_else(memcached_addr),
            amqp_url(),
        );
        for r in &routes {
            toml.push_str(&format!(
                "[[fragment]]\nname = \"{}\"\nrender = \"{}\"\nparams = {:?}\nbuild_timeout = \"{}s\"\nmax_attempts = {}\nqueue = \"{}\"\n",
                r.name,
                r.render,
                r.params,
                r.build_timeout.as_secs().max(1),
                r.max_attempts,
                r.queue
            ));
        }
        let config_path = std::env::temp_dir().join(format!("{namespace}.toml"));
        std::fs::write(&config_path, &toml).expect("config written");
        Cluster {
            base_toml: toml,
            config_path,
            namespace,
            gateways: Vec::new(),
            admins: Vec::new(),
            gateway_procs: Vec::new(),
            workers: Vec::new(),
        }
    }

    /// Starts a gateway process; waits (bounded) until it answers. Returns its URL.
    pub async fn gateway(&mut self) -> String {
        let (port, admin) = (free_port(), free_port());
        let n = self.gateway_procs.len();
        let path = std::env::temp_dir().join(format!("{}-gw{n}.toml", self.namespace));
        let toml = format!(
            "[gateway]\nlisten = \"127.0.0.1:{port}\"\nadmin_listen = \"127.0.0.1:{admin}\"\n{}",
            self.base_toml
        );
        std::fs::write(&path, toml).expect("gateway config written");
        let child = Command::new(bin_dir().join("tessera-gateway"))
            .arg("--config")
            .arg(&path)
            .env("RUST_LOG", "warn")
            .env_remove("TESSERA_CONFIG")
            .env_remove("TESSERA_LISTEN")
            .stdout(Stdio::null())
            .spawn()
            .expect("gateway starts");
        self.gateway_procs.push(Proc {
            child,
            name: format!("gateway {n}"),
        });
        let (url, admin_url) = (
            format!("http://127.0.0.1:{port}"),
            format!("http://127.0.0.1:{admin}"),
        );
        let health = format!("{admin_url}/healthz");
        crate::eventually("the gateway answers", Duration::from_secs(20), || {
            let health = health.clone();
            async move { crate::harness::client().get(health).send().await.is_ok() }
        })
        .await;
        self.gateways.push(url.clone());
        self.admins.push(admin_url);
        url
    }

    /// Starts a worker process.
    pub fn worker(&mut self) -> usize {
        let child = Command::new(bin_dir().join("tessera-worker"))
            .arg("--config")
            .arg(&self.config_path)
            .args(["--admin-listen", "127.0.0.1:0"])
            .env("RUST_LOG", "warn")
            .env_remove("TESSERA_CONFIG")
            .stdout(Stdio::null())
            .spawn()
            .expect("worker starts");
        let n = self.workers.len();
        self.workers.push(Proc {
            child,
            name: format!("worker {n}"),
        });
        n
    }
}
