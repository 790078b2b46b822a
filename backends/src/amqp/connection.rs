//! The one broker connection of a process: the [`Link`] (the connection and the
//! confirm-mode channel publishers share), opened on first use and opened again when it
//! is lost — on behalf of publishers at most every [`RECONNECT_MIN`], by consumers and
//! subscriptions after a [`Backoff`]. Every new connection declares the shared topology
//! before anyone uses it. Its socket has `TCP_NODELAY` set, as the memcached and HTTP
//! sockets do: every frame goes out when written.
//!
//! # Several nodes
//! The broker may be a cluster: a list of node URLs ([`Connector::new`]). A connection
//! attempt tries them in turn, each within [`OP_TIMEOUT`](super::OP_TIMEOUT), from the
//! node after the one the last connection was made to, and keeps the first that connects
//! and declares the topology. So the first connection goes to the first node listed, and
//! a lost one moves to the next node at once (the lost node is tried last), without
//! waiting for the node that went away to come back. A node that does not answer at all
//! (a host gone without a reset) costs one `OP_TIMEOUT` per attempt until the attempts
//! have moved past it. With one URL this is the one broker, as ever.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use lapin::options::ConfirmSelectOptions;
use lapin::{Channel, Connection, ConnectionProperties};

use tessera_protocol::bus::BusError;
use tessera_protocol::config::AmqpUrl;

use super::topology::Declarations;
use super::{AmqpBus, BACKOFF_MAX, BACKOFF_MIN, RECONNECT_MIN, short, timed, unavailable};

/// How long a consumer or subscription waits before each reconnection attempt: `min`,
/// doubling up to `max`, and `min` again once a connection worked ([`Backoff::reset`]),
/// so a broker restart hours after the last one is not waited out for `max`.
#[derive(Debug, Clone)]
pub struct Backoff {
    next: Duration,
    min: Duration,
    max: Duration,
}

impl Default for Backoff {
    /// [`BACKOFF_MIN`] doubling to [`BACKOFF_MAX`].
    fn default() -> Self {
        Self::new(BACKOFF_MIN, BACKOFF_MAX)
    }
}

impl Backoff {
    /// Starts at `min`, doubles up to `max`.
    pub fn new(min: Duration, max: Duration) -> Self {
        Self {
            next: min,
            min,
            max: max.max(min),
        }
    }

    /// The wait before this attempt; the next one waits twice as long, at most `max`.
    pub fn next_delay(&mut self) -> Duration {
        let delay = self.next;
        self.next = self.next.saturating_mul(2).min(self.max);
        delay
    }

    /// A connection worked: the next failure waits `min` again.
    pub fn reset(&mut self) {
        self.next = self.min;
    }
}

/// A live connection and the confirm-mode channel publishers share.
pub(super) struct Link {
    pub(super) conn: Connection,
    /// The publish channel; replaced when the broker refuses a publish on it
    /// ([`Link::renew_publisher`]).
    publish: Mutex<Channel>,
    /// Held while the publish channel is replaced: one replacement at a time.
    renewing: tokio::sync::Mutex<()>,
    /// Route queues declared on this connection, and the declaration under way.
    pub(super) queues: Declarations,
}

impl Link {
    fn new(conn: Connection, publish: Channel) -> Self {
        Self {
            conn,
            publish: Mutex::new(publish),
            renewing: tokio::sync::Mutex::new(()),
            queues: Declarations::default(),
        }
    }

    pub(super) fn alive(&self) -> bool {
        self.conn.status().connected() && self.publisher().status().connected()
    }

    /// The confirm-mode channel to publish on.
    pub(super) fn publisher(&self) -> Channel {
        self.publish
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Replaces the publish channel `refused` (unless another caller already did) with a
    /// new one, and closes it.
    ///
    /// A channel keeps what it learnt of each queue it published to. When a quorum
    /// queue's leader dies, a channel that first published to the queue while its
    /// record still named the dead leader keeps sending there, and RabbitMQ (3.10)
    /// refuses every publish on it (a negative confirm) long after a new leader took
    /// over, while a new channel publishes at once. So a refusal costs the channel.
    pub(super) async fn renew_publisher(&self, refused: &Channel) -> Result<(), BusError> {
        let _renewing = self.renewing.lock().await;
        if self.publisher().id() != refused.id() {
            return Ok(());
        }
        let fresh = timed("open channel", self.conn.create_channel()).await?;
        timed(
            "confirm_select",
            fresh.confirm_select(ConfirmSelectOptions::default()),
        )
        .await?;
        *self.publish.lock().unwrap_or_else(PoisonError::into_inner) = fresh;
        tracing::info!("the broker refused a publish; publishing on a new channel");
        let refused = refused.clone();
        // Publishes still waiting for their confirms on it fail with the close.
        tokio::spawn(async move { super::close(&refused).await });
        Ok(())
    }
}

/// One node of the broker.
struct Node {
    /// What to connect to, password included.
    url: String,
    /// What logs say: the URL without its password.
    name: String,
}

impl Node {
    fn new(url: &str, index: usize) -> Self {
        let name = url
            .parse::<AmqpUrl>()
            .map_or_else(|_| format!("node {index}"), |u| u.redacted());
        Self {
            url: url.to_string(),
            name,
        }
    }
}

/// The broker this process connects to, and its connection when there is one.
pub(super) struct Connector {
    /// The broker's nodes, in the order they are tried.
    nodes: Vec<Node>,
    /// Where the next connection attempt starts: the node after the one the last
    /// connection was made to.
    next: AtomicUsize,
    /// The live link, if any: looked at by every publish, so not held across I/O.
    link: Mutex<Option<Arc<Link>>>,
    /// Held while connecting: one connection attempt at a time.
    connecting: tokio::sync::Mutex<()>,
    last_attempt: Mutex<Option<Instant>>,
    /// Set after the first successful connection.
    connected: AtomicBool,
    /// Connections made after a lost one.
    reconnects: AtomicU64,
}

impl Connector {
    /// Not connected yet: the first call that needs the broker connects, to the first of
    /// `urls` that answers.
    pub(super) fn new(urls: &[String]) -> Self {
        Self {
            nodes: urls
                .iter()
                .enumerate()
                .map(|(i, url)| Node::new(url, i))
                .collect(),
            next: AtomicUsize::new(0),
            link: Mutex::new(None),
            connecting: tokio::sync::Mutex::new(()),
            last_attempt: Mutex::new(None),
            connected: AtomicBool::new(false),
            reconnects: AtomicU64::new(0),
        }
    }

    /// Connections re-established after a lost one, since start.
    pub(super) fn reconnects(&self) -> u64 {
        self.reconnects.load(Ordering::Relaxed)
    }
}

/// Opens a connection to `url` on a socket with `TCP_NODELAY`. lapin leaves Nagle's
/// algorithm on, so a small frame written while an earlier one is unacknowledged (an
/// ack behind a publish, a publish behind a confirm's read) waits for the peer's ACK,
/// which a delayed ACK holds back: latency on every build's path (bench/README.md,
/// "Time to content").
async fn connect_without_delay(url: &str) -> lapin::Result<Connection> {
    use lapin::tcp::{AMQPUriTcpExt, AsyncTcpStream};
    let uri: lapin::uri::AMQPUri = url.parse().map_err(std::io::Error::other)?;
    let runtime = lapin::runtime::default_runtime()?;
    let properties = ConnectionProperties::default();
    Connection::connector(
        uri,
        runtime,
        async |uri, runtime| {
            let stream = uri.connect_async(&runtime).await?;
            // TLS streams keep Nagle: their records are written whole.
            if let AsyncTcpStream::Plain(plain) = &stream {
                plain.get_ref().set_nodelay(true)?;
            }
            Ok(stream)
        },
        properties,
    )
    .await
}

impl AmqpBus {
    /// Connects to the first node that answers, trying each once from the one after the
    /// last connection's; the last node's error when none does.
    async fn connect(&self) -> Result<Link, BusError> {
        let connection = &self.inner.connection;
        let count = connection.nodes.len();
        let start = connection.next.load(Ordering::Relaxed);
        let mut failed = unavailable("no broker node is configured");
        for i in (start..start + count).map(|i| i % count) {
            let node = &connection.nodes[i];
            match self.connect_to(node).await {
                Ok(link) => {
                    connection.next.store((i + 1) % count, Ordering::Relaxed);
                    tracing::info!(node = %node.name, "connected to the broker");
                    return Ok(link);
                }
                Err(e) => {
                    if count > 1 {
                        tracing::warn!(node = %node.name, error = %e, "broker node unavailable; trying the next");
                    }
                    failed = e;
                }
            }
        }
        Err(failed)
    }

    /// Opens a connection to `node`, declares the shared topology; closes the connection
    /// when that fails, so a node that answers but refuses keeps no half-made link.
    async fn connect_to(&self, node: &Node) -> Result<Link, BusError> {
        let conn = timed("connect", connect_without_delay(&node.url)).await?;
        let set_up = async {
            let publish = timed("open channel", conn.create_channel()).await?;
            timed(
                "confirm_select",
                publish.confirm_select(ConfirmSelectOptions::default()),
            )
            .await?;
            self.declare_shared(&publish).await?;
            if self.inner.expiry.is_some() {
                self.declare_anchor(&publish).await?;
            }
            Ok(publish)
        }
        .await;
        match set_up {
            Ok(publish) => Ok(Link::new(conn, publish)),
            Err(e) => {
                let _ = timed("close", conn.close(200, short("set-up failed"))).await;
                Err(e)
            }
        }
    }

    /// The live link, reconnecting when it is gone (rate limited, so publishers fail fast
    /// while the broker is down).
    pub(super) async fn link(&self) -> Result<Arc<Link>, BusError> {
        if let Some(link) = self.live_link() {
            return Ok(link);
        }
        let connection = &self.inner.connection;
        let _connecting = connection.connecting.lock().await;
        // Another caller may have connected while this one waited.
        if let Some(link) = self.live_link() {
            return Ok(link);
        }
        {
            let mut last = connection
                .last_attempt
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if last.is_some_and(|t| t.elapsed() < RECONNECT_MIN) {
                return Err(unavailable("broker connection lost; reconnecting"));
            }
            *last = Some(Instant::now());
        }
        match self.connect().await {
            Ok(link) => {
                if connection.connected.swap(true, Ordering::Relaxed) {
                    connection.reconnects.fetch_add(1, Ordering::Relaxed);
                }
                let link = Arc::new(link);
                *self.slot() = Some(link.clone());
                Ok(link)
            }
            Err(e) => {
                *self.slot() = None;
                Err(e)
            }
        }
    }

    fn slot(&self) -> std::sync::MutexGuard<'_, Option<Arc<Link>>> {
        self.inner
            .connection
            .link
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    pub(super) fn live_link(&self) -> Option<Arc<Link>> {
        self.slot().as_ref().filter(|l| l.alive()).cloned()
    }

    /// Drops `link` after it failed, so the next call reconnects (unless another caller
    /// already put a new link in its place).
    pub(super) fn drop_link(&self, link: &Arc<Link>) {
        let mut slot = self.slot();
        if slot.as_ref().is_some_and(|l| Arc::ptr_eq(l, link)) {
            *slot = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tessera_protocol::Bus;

    #[test]
    fn backoff_doubles_up_to_its_cap() {
        let mut b = Backoff::default();
        let waits: Vec<Duration> = (0..8).map(|_| b.next_delay()).collect();
        let expected = [100, 200, 400, 800, 1600, 3200, 5000, 5000].map(Duration::from_millis);
        assert_eq!(waits, expected);
    }

    #[test]
    fn backoff_starts_over_after_a_good_connection() {
        let mut b = Backoff::new(Duration::from_millis(10), Duration::from_millis(35));
        assert_eq!(b.next_delay(), Duration::from_millis(10));
        assert_eq!(b.next_delay(), Duration::from_millis(20));
        assert_eq!(b.next_delay(), Duration::from_millis(35));
        b.reset();
        assert_eq!(b.next_delay(), Duration::from_millis(10));
        assert_eq!(b.next_delay(), Duration::from_millis(20));
    }

    /// A URL nothing answers on.
    fn dead_node() -> String {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        format!("amqp://guest:guest@127.0.0.1:{port}/%2f")
    }

    /// A node that does not answer is passed over, on the first connection and on a
    /// reconnection alike; a lost connection moves to the next node.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn connections_go_to_the_next_node_that_answers() {
        let live = "amqp://guest:guest@127.0.0.1:5672/%2f".to_string();
        let ns = format!("next-node-{}", std::process::id());
        let bus = AmqpBus::on_nodes(
            &[dead_node(), live.clone(), dead_node()],
            &ns,
            Some(Duration::from_secs(60)),
        );
        let queue = format!("{ns}.build");
        let publish = || bus.publish_raw(&queue, b"{}");
        publish()
            .await
            .expect("published through the second node (is RabbitMQ running on 127.0.0.1:5672?)");
        assert_eq!(bus.inner.connection.next.load(Ordering::Relaxed), 2);
        let link = bus.live_link().expect("connected");
        let _ = link.conn.close(320, short("closed by the test")).await;
        tokio::time::sleep(RECONNECT_MIN).await;
        // The next attempt starts at the third node, goes round to the first, then the
        // second.
        publish().await.expect("published after a reconnection");
        assert_eq!(bus.reconnects(), 1);
        assert_eq!(bus.inner.connection.next.load(Ordering::Relaxed), 2);
        let nowhere = AmqpBus::on_nodes(&[dead_node(), dead_node()], &ns, None);
        let e = nowhere.publish_raw(&queue, b"{}").await.unwrap_err();
        assert!(e.is_retryable(), "{e}");
        let none = AmqpBus::on_nodes(&[], &ns, None);
        assert!(
            none.ping()
                .await
                .unwrap_err()
                .to_string()
                .contains("no broker node")
        );
    }

    #[test]
    fn backoff_with_a_cap_below_its_start_waits_the_start() {
        let mut b = Backoff::new(Duration::from_secs(2), Duration::from_secs(1));
        assert_eq!(b.next_delay(), Duration::from_secs(2));
        assert_eq!(b.next_delay(), Duration::from_secs(2));
    }
}
