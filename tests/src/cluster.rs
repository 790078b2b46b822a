//! Real processes for distributed tests: `tessera-gateway` and `tessera-worker` binaries
//! sharing one config (memcached, RabbitMQ, a unique namespace), started and stopped by
//! `deploy/local/cluster.sh` (the script users run), single child processes killed
//! when dropped, and the three-node RabbitMQ cluster of `scripts/rabbitmq-cluster.sh`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tessera_protocol::FragmentRoute;
use tessera_protocol::config::QueueType;

use crate::harness::{amqp_url, memcached_addr, require, require_servers, unique_namespace};

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

/// A TCP port on 127.0.0.1 for a server a test starts, free when asked.
///
/// Not the kernel's pick (`bind` to port 0), which comes from the ephemeral range: there
/// an outgoing connection may take the port before the server binds it, and a port a test
/// freed by killing its server (to start it again on the same port) may be handed to a
/// concurrent test meanwhile. Then two tests share one memcached, and one sees its
/// connections reset when the other's server is killed. So ports come from below the
/// ephemeral range, each at most once per test process, starting at a place the process id
/// picks (another test process runs elsewhere), skipping any another process listens on.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    const FIRST: u32 = 10_000;
    // The first ephemeral port (`ip_local_port_range`), Linux's default where unreadable.
    let end = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse().ok())
        .unwrap_or(32_768u32);
    assert!(
        end > FIRST + 1_000,
        "ip_local_port_range starts at {end}: no room for test ports below it"
    );
    let count = end - FIRST;
    let start = std::process::id().wrapping_mul(7_919) % count;
    loop {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        assert!(n < count, "every test port below {end} was handed out");
        let port = u16::try_from(FIRST + (start + n) % count).expect("below 65536");
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
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

/// A memcached of our own on `127.0.0.1:port` (killed when dropped), answering when this
/// returns; for tests that stop or add servers, which must not touch the shared one.
pub fn memcached(port: u16) -> Proc {
    let proc = Proc::spawn(
        Command::new("memcached").args([
            "-u",
            "root",
            "-l",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-m",
            "64",
        ]),
        "memcached (`bash scripts/services.sh` installs it)",
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "memcached did not answer on 127.0.0.1:{port} within 10 s"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    proc
}

/// `deploy/local/cluster.sh`, the one script that starts and stops local clusters.
pub fn cluster_script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy/local/cluster.sh")
}

/// Runs `cluster.sh ARGS --dir DIR`; returns its stdout, panicking with its output when it
/// fails.
pub fn run_script(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("bash")
        .arg(cluster_script())
        .args(args)
        .arg("--dir")
        .arg(dir)
        .stdin(Stdio::null())
        .output()
        .expect("bash runs");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "cluster.sh {args:?} failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// One process started by `cluster.sh` (not a child of this test: it is signalled by pid).
#[derive(Debug)]
pub struct Member {
    /// Its name in the cluster (`worker-0`).
    pub name: String,
    /// Its pid.
    pub pid: u32,
    dir: PathBuf,
}

impl Member {
    fn signal(&self, signal: &str) {
        let _ = Command::new("kill")
            .args([signal, &self.pid.to_string()])
            .status();
    }

    /// Sends SIGKILL.
    pub fn kill(&mut self) {
        self.signal("-KILL");
    }

    /// Sends SIGTERM (graceful stop) and waits up to `within` for it to exit; returns its
    /// exit status.
    pub fn terminate(&mut self, within: Duration) -> Option<i32> {
        self.signal("-TERM");
        let exit = self.dir.join("run").join(format!("{}.exit", self.name));
        let deadline = std::time::Instant::now() + within;
        while std::time::Instant::now() < deadline {
            if let Some(code) = std::fs::read_to_string(&exit)
                .ok()
                .and_then(|s| s.trim().parse().ok())
            {
                return Some(code);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// Whether it is still running (a zombie is not).
    pub fn running(&self) -> bool {
        pid_alive(self.pid)
    }
}

/// Whether `pid` is a live process (not a zombie).
pub fn pid_alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        // `pid (comm) STATE ...`; comm may contain spaces, so read after the last `)`.
        stat.rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X")
    })
}

/// One line of `DIR/procs`: `KIND NAME PID URL ADMIN_URL`.
#[derive(Debug, Clone)]
pub struct ProcLine {
    /// `gateway`, `worker`, `upstream`, `memcached`, `rabbitmq`, `rabbitmq-cluster`.
    pub kind: String,
    /// `gateway-0`, …
    pub name: String,
    /// Its pid (`None` for a daemon started without one).
    pub pid: Option<u32>,
    /// Public URL (`-` when none).
    pub url: String,
    /// Admin URL (`-` when none).
    pub admin: String,
}

/// Parses a line `cluster.sh` printed or recorded.
pub fn parse_proc_line(line: &str) -> ProcLine {
    let f: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(f.len(), 5, "a cluster.sh process line: {line:?}");
    ProcLine {
        kind: f[0].into(),
        name: f[1].into(),
        pid: f[2].parse().ok(),
        url: f[3].into(),
        admin: f[4].into(),
    }
}

/// Every process recorded in `DIR/procs`.
pub fn recorded(dir: &Path) -> Vec<ProcLine> {
    std::fs::read_to_string(dir.join("procs"))
        .unwrap_or_default()
        .lines()
        .map(parse_proc_line)
        .collect()
}

/// A cluster started with `deploy/local/cluster.sh` from a test's config (memcached,
/// RabbitMQ, a unique namespace), stopped with `cluster.sh down` when dropped.
#[derive(Debug)]
pub struct Cluster {
    /// Its namespace (also the prefix of its queues and exchanges).
    pub namespace: String,
    /// The script's state directory (pids, logs).
    pub dir: PathBuf,
    /// Gateway processes.
    pub gateway_procs: Vec<Member>,
    /// Worker processes.
    pub workers: Vec<Member>,
}

impl Cluster {
    /// Writes a config for `routes` (their queues prefixed with a fresh namespace) against
    /// `upstream`, on `memcached` (default: the test memcached) and the test RabbitMQ, and
    /// brings up an empty cluster (`cluster.sh up --gateways 0 --workers 0`).
    pub fn new(upstream: &str, routes: Vec<FragmentRoute>, memcached: Option<String>) -> Cluster {
        require_servers();
        Self::start(
            upstream,
            routes,
            memcached.unwrap_or_else(memcached_addr),
            &[amqp_url()],
            QueueType::Classic,
        )
    }

    /// Like [`Cluster::new`] on the test memcached, with the bus on `rabbitmq`'s nodes
    /// (listed in that order) and quorum queues, as a cluster should be run.
    pub fn on_rabbitmq_cluster(
        upstream: &str,
        routes: Vec<FragmentRoute>,
        rabbitmq: &RabbitCluster,
    ) -> Cluster {
        require("memcached", &memcached_addr());
        Self::start(
            upstream,
            routes,
            memcached_addr(),
            &rabbitmq.urls,
            QueueType::Quorum,
        )
    }

    fn start(
        upstream: &str,
        mut routes: Vec<FragmentRoute>,
        memcached: String,
        amqp: &[String],
        queue_type: QueueType,
    ) -> Cluster {
        let namespace = unique_namespace();
        for r in &mut routes {
            r.queue = format!("{namespace}.{}", r.queue);
        }
        let mut toml = format!(
            "[upstream]\nurl = \"{upstream}\"\ntimeout = \"5s\"\n[store]\nmemcached = [\"{memcached}\"]\nnamespace = \"{namespace}\"\n\
             [bus]\namqp = {amqp:?}\nqueue_expiry = \"10m\"\nqueue_type = \"{}\"\n[workers]\nembedded = 0\nconcurrency = 8\n[cache]\nttl = \"2s\"\n",
            queue_type.as_str(),
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
        let dir = std::env::temp_dir().join(format!("{namespace}-cluster"));
        std::fs::create_dir_all(&dir).expect("cluster dir");
        let config_path = dir.join("tessera.toml");
        std::fs::write(&config_path, &toml).expect("config written");
        let bin = bin_dir();
        run_script(
            &dir,
            &[
                "up",
                "--config",
                &config_path.to_string_lossy(),
                "--gateways",
                "0",
                "--workers",
                "0",
                "--memcached",
                &memcached,
                "--amqp",
                &amqp.join(","),
                "--bin",
                &bin.to_string_lossy(),
            ],
        );
        Cluster {
            namespace,
            dir,
            gateway_procs: Vec::new(),
            workers: Vec::new(),
        }
    }

    fn add(&self, kind: &str) -> (Member, ProcLine) {
        let dir = self.dir.clone();
        let line = parse_proc_line(run_script(&dir, &["add", kind]).trim());
        let member = Member {
            name: line.name.clone(),
            pid: line.pid.expect("a started process has a pid"),
            dir,
        };
        (member, line)
    }

    /// Starts a gateway (`cluster.sh add gateway` returns once it answers). Returns its URL.
    pub async fn gateway(&mut self) -> String {
        let (member, line) = tokio::task::block_in_place(|| self.add("gateway"));
        self.gateway_procs.push(member);
        line.url
    }

    /// Starts a worker process; returns its index in `workers`.
    pub fn worker(&mut self) -> usize {
        let (member, _) = tokio::task::block_in_place(|| self.add("worker"));
        self.workers.push(member);
        self.workers.len() - 1
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = Command::new("bash")
            .arg(cluster_script())
            .args(["down", "--dir"])
            .arg(&self.dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .status();
        if std::thread::panicking() {
            eprintln!("cluster logs kept in {}", self.dir.join("logs").display());
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// `scripts/rabbitmq-cluster.sh`, which runs a RabbitMQ cluster beside the machine's broker.
pub fn rabbitmq_cluster_script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../scripts/rabbitmq-cluster.sh")
}

/// Runs `rabbitmq-cluster.sh ARGS`; returns its stdout, panicking with its output and how
/// to start the cluster by hand when it fails.
fn run_rabbitmq_cluster_script(args: &[&str]) -> String {
    let out = Command::new("bash")
        .arg(rabbitmq_cluster_script())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("bash runs");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "the test RabbitMQ cluster is not available: `scripts/rabbitmq-cluster.sh {}` failed \
         (start it by hand, as root, with `bash scripts/rabbitmq-cluster.sh up`; Debian's \
         rabbitmq-server must be installed):\n{stdout}\n{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// The three-node RabbitMQ cluster of `scripts/rabbitmq-cluster.sh`, on its own ports
/// (never the machine's broker, which other tests share).
#[derive(Debug)]
pub struct RabbitCluster {
    /// Each node's AMQP URL, node 1 first.
    pub urls: Vec<String>,
}

impl RabbitCluster {
    /// Brings the cluster up (`rabbitmq-cluster.sh up`: nothing to do when it is, about a
    /// minute from nothing) and returns it; panics saying how to start it when it cannot.
    pub fn up() -> RabbitCluster {
        run_rabbitmq_cluster_script(&["up", "--nodes", "3"]);
        let urls: Vec<String> = run_rabbitmq_cluster_script(&["urls"])
            .trim()
            .split(',')
            .map(String::from)
            .collect();
        assert_eq!(urls.len(), 3, "three nodes: {urls:?}");
        RabbitCluster { urls }
    }

    /// The pid of node `i` (from 1), when it runs.
    pub fn pid(&self, i: usize) -> Option<u32> {
        let status = run_rabbitmq_cluster_script(&["status"]);
        let line = status.lines().nth(i - 1)?;
        line.split_whitespace().nth(2)?.parse().ok()
    }

    /// Kills node `i` (from 1) with SIGKILL, as a crash would, and waits until it is gone.
    pub fn kill(&self, i: usize) {
        let pid = self
            .pid(i)
            .unwrap_or_else(|| panic!("RabbitMQ node {i} is not running"));
        let _ = Command::new("kill")
            .args(["-KILL", &pid.to_string()])
            .status();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while pid_alive(pid) {
            assert!(
                std::time::Instant::now() < deadline,
                "RabbitMQ node {i} (pid {pid}) outlived SIGKILL"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Starts every node that is not running again, without waiting for it to answer: it
    /// rejoins the cluster by itself, in some 10–30 s, and the next [`RabbitCluster::up`]
    /// waits for it.
    pub fn restart_stopped(&self) {
        run_rabbitmq_cluster_script(&["up", "--nodes", "3", "--no-wait"]);
    }
}
