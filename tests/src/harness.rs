//! Start gateways the way the binary does (`tessera_gateway::serve` on `127.0.0.1:0`),
//! with backends of either kind.

use std::net::SocketAddr;
use std::time::Duration;

use tessera_protocol::config::Config;
use tessera_protocol::{Backends, FragmentRoute};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Which `Store`/`Bus` implementations a scenario runs against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// In-process memory store and bus (embedded mode).
    Memory,
    /// memcached and RabbitMQ (distributed mode), on their test addresses.
    Real,
}

/// memcached for tests: `TESSERA_TEST_MEMCACHED`, default `127.0.0.1:11211`.
pub fn memcached_addr() -> String {
    std::env::var("TESSERA_TEST_MEMCACHED").unwrap_or_else(|_| "127.0.0.1:11211".into())
}

/// RabbitMQ for tests: `TESSERA_TEST_AMQP`, default the local guest account.
pub fn amqp_url() -> String {
    std::env::var("TESSERA_TEST_AMQP")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

/// Where the test RabbitMQ listens (`host:port`), read from [`amqp_url`].
pub fn amqp_addr() -> String {
    amqp_url()
        .rsplit('@')
        .next()
        .and_then(|rest| rest.split('/').next())
        .unwrap_or("127.0.0.1:5672")
        .to_string()
}

/// Fails the test, saying how to start them, unless memcached and RabbitMQ answer.
pub fn require_servers() {
    require("memcached", &memcached_addr());
    require("RabbitMQ", &amqp_addr());
}

/// Fails the test, saying how to start it, unless `what` answers at `addr` (`host:port`).
pub fn require(what: &str, addr: &str) {
    let reachable = addr
        .parse::<std::net::SocketAddr>()
        .ok()
        .and_then(|a| std::net::TcpStream::connect_timeout(&a, Duration::from_secs(2)).ok())
        .is_some();
    assert!(
        reachable,
        "{what} is not reachable at {addr}: start the test servers with `bash scripts/services.sh` \
         (or point TESSERA_TEST_MEMCACHED / TESSERA_TEST_AMQP at running ones)"
    );
}

/// Test queues are deleted by RabbitMQ once unused this long.
pub const QUEUE_EXPIRY: Duration = Duration::from_secs(600);

/// A namespace no other test uses, so tests share servers without seeing each other.
pub fn unique_namespace() -> String {
    format!("t{:016x}", rand::random::<u64>())
}

/// A config for tests: free port, the given upstream and routes, short L1 TTL.
pub fn config(upstream_url: &str, routes: Vec<FragmentRoute>) -> Config {
    let mut c = Config::default();
    c.gateway.listen = SocketAddr::from(([127, 0, 0, 1], 0));
    c.upstream.url = upstream_url.parse().expect("test upstream URL is valid");
    c.upstream.timeout = Duration::from_secs(5);
    c.fragments = routes;
    c.workers.embedded = 4;
    c
}

/// A route with test-friendly timings: builds time out after 2 s, retries are few.
pub fn route(name: &str) -> FragmentRoute {
    let mut r = FragmentRoute::new(name, format!("/_render/{name}"));
    r.build_timeout = Duration::from_secs(2);
    r.max_attempts = 3;
    r
}

/// Backends of `kind` for `config`, unique to the caller.
pub async fn backends(kind: Backend, config: &mut Config) -> Backends {
    match kind {
        Backend::Memory => {
            config.validate().expect("test config is valid");
            Backends::memory(config)
        }
        Backend::Real => {
            require_servers();
            let servers = vec![
                memcached_addr()
                    .parse()
                    .expect("memcached address is valid"),
            ];
            real_backends_on(servers, config).await
        }
    }
}

/// memcached on `servers` and the test RabbitMQ for `config`, in a namespace of the
/// caller's own.
pub async fn real_backends_on(
    servers: Vec<tessera_protocol::config::MemcachedServer>,
    config: &mut Config,
) -> Backends {
    require("RabbitMQ", &amqp_addr());
    let ns = unique_namespace();
    config.backend = tessera_protocol::Backend::Distributed {
        servers,
        amqp: vec![amqp_url().parse().expect("AMQP URL is valid")],
    };
    config.bus.queue_expiry = Some(QUEUE_EXPIRY);
    for route in &mut config.fragments {
        route.queue = format!("{ns}.{}", route.queue);
    }
    config.store.namespace = ns;
    config.validate().expect("test config is valid");
    tessera_backends::connect(config)
        .await
        .expect("backends connect")
}

/// A gateway running in this process.
#[derive(Debug)]
pub struct TestGateway {
    /// `http://127.0.0.1:PORT`
    pub url: String,
    /// The admin listener, `http://127.0.0.1:PORT`.
    pub admin: String,
    stop: CancellationToken,
    task: Option<JoinHandle<()>>,
}

impl TestGateway {
    /// Starts a gateway on a free port with `backends`.
    pub async fn start(config: Config, backends: Backends) -> TestGateway {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let admin = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let admin_url = format!("http://{}", admin.local_addr().unwrap());
        let stop = CancellationToken::new();
        let s = stop.clone();
        let task = tokio::spawn(async move {
            tessera_gateway::serve(listener, Some(admin), config, backends, async move {
                s.cancelled().await
            })
            .await
            .expect("gateway runs");
        });
        TestGateway {
            url,
            admin: admin_url,
            stop,
            task: Some(task),
        }
    }

    /// `url` + `path`.
    pub fn at(&self, path: &str) -> String {
        format!("{}{path}", self.url)
    }

    /// Graceful shutdown; panics if it takes longer than 30 s.
    pub async fn stop(mut self) {
        self.stop.cancel();
        if let Some(task) = self.task.take() {
            tokio::time::timeout(Duration::from_secs(30), task)
                .await
                .expect("gateway stops within 30 s")
                .expect("gateway task did not panic");
        }
    }

    /// Stops it the hard way: its tasks are dropped mid-flight, as in a crash.
    pub fn kill(mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

impl Drop for TestGateway {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// An HTTP client that never uses a proxy and never waits more than 30 s.
pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(30))
        .pool_max_idle_per_host(64)
        .build()
        .unwrap()
}

/// The body of `GET url`, panicking when it cannot be fetched.
pub async fn text(url: impl reqwest::IntoUrl) -> String {
    client()
        .get(url)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}
