//! The bus on RabbitMQ (crate `lapin`, AMQP 0-9-1).
//!
//! # Topology
//! Declared idempotently by whichever process connects first, on every (re)connection.
//! Every name starts with the store namespace (`{ns}`), so deployments sharing a vhost,
//! and parallel tests, stay apart. The one exception is a route queue named in the
//! configuration (`queue = "..."`), used exactly as written.
//!
//! | name | kind | role |
//! | --- | --- | --- |
//! | `{ns}.build` | direct exchange, durable | build requests, routing key = queue name |
//! | `{queue}` | durable queue | one per route queue, by default `{ns}.build` (`tessera_protocol::config::default_queue`); rejected messages dead-letter to `{ns}.dead` |
//! | `{queue}.background` | durable queue | beside each route queue: refreshes nobody waits for (`tessera_protocol::config::background_queue`), consumed after waited builds ([`tessera_protocol::bus::Turns`]); dead-letters like `{queue}` |
//! | `{queue}.retry.{N}s` | durable queue, `x-message-ttl` N s | delayed retries; expired messages dead-letter back to `{ns}.build` with routing key `{queue}` |
//! | `{ns}.dead` | fanout exchange + durable queue | dead letters, with headers `x-tessera-error` and `x-tessera-queue` |
//! | `{ns}.events` | fanout exchange | built / failed / purged events |
//! | (server-named) | exclusive, auto-delete queue | one per subscribing gateway |
//! | (server-named) | exclusive, `x-max-length` 0 | with a queue expiry only: one per connection, holding the exchanges |
//!
//! A queue declared with other arguments than these (another namespace's dead-letter
//! exchange, another `x-expires`) is refused with 406 PRECONDITION_FAILED. Queues are
//! therefore declared on a channel of their own (the refusal closes it), a failure is
//! retried by the next call rather than remembered, and [`Bus::ping`] declares every
//! queue this bus serves ([`AmqpBus::with_queues`] and any used since), so `/readyz`
//! reports the conflict before and after traffic, until the declaration succeeds. A queue
//! is declared once per connection: callers that need it at the same moment (the first
//! burst of misses) wait for one declaration and share its outcome, failure included,
//! and a gateway declares its route queues as it starts ([`Bus::ping`]), so traffic does
//! not wait for them at all.
//!
//! # Throw-away namespaces
//! With a queue expiry (`bus.queue_expiry`), durable queues get `x-expires`. Exchanges
//! cannot expire, so they are declared auto-delete: RabbitMQ drops one when its last
//! binding goes. An exchange that never had a binding stays (checked against the broker
//! in the conformance suite), so none can vanish between its declaration and the first
//! bind. To keep the exchanges while any process is connected, whatever expired, each
//! connection binds an exclusive queue that keeps nothing (`x-max-length` 0) to all three
//! (to `{ns}.build` under its own server-given name, which no build is sent to). Once
//! every process left and the queues expired, the exchanges go too. An auto-delete
//! exchange routes, confirms and returns unroutable mandatory publishes like any other.
//!
//! Retries use fixed delay buckets (1, 2, 4, … 32 s) rather than per-message TTLs,
//! which RabbitMQ only expires at the head of a queue: a long delay never holds back a
//! short one. A retry waits for the smallest bucket at least as long as asked.
//!
//! # Delivery and failure
//! Build messages are persistent and published with publisher confirms (bounded by
//! [`OP_TIMEOUT`]); unroutable ones come back (`mandatory`) and count as failures.
//! Consumers set `basic_qos(prefetch)` before consuming and acknowledge manually.
//!
//! One connection per process. When it drops, a publish that was waiting for its confirm
//! is sent once more on a new connection; publishes fail fast with
//! [`BusError::Unavailable`] while a reconnection is attempted (at most every
//! [`RECONNECT_MIN`]); consumers and subscriptions reconnect by themselves with one
//! backoff policy ([`Backoff`]: 100 ms doubling to 5 s, back to 100 ms once a connection
//! consumes again), re-declare and resume; a subscription then yields
//! [`Notice::Lagged`], since events may have been lost meanwhile. Deliveries taken before
//! a reconnection can no longer be acknowledged — the broker redelivers them instead,
//! which is why builds are idempotent; a consumer hands such a copy on only once the
//! delivery it copies is settled, so the copy finds its build done (`consume`). Nothing
//! here panics or exits the process.
//!
//! # A cluster
//! The bus may be given several node URLs ([`AmqpBus::on_nodes`], `bus.amqp` as a list).
//! It connects to the first that answers, and a new connection after a lost one starts
//! with the next node, so losing the node a process is connected to costs what any lost
//! connection costs — the resend, the reconnections above, a [`Notice::Lagged`] — and
//! the process carries on with another node at once. Nothing is lost with the node when
//! the queues are quorum queues (`bus.queue_type = "quorum"`), which the cluster keeps
//! on a majority of nodes: classic queues live on one node and go with it. The event
//! queues are exclusive to their connection, so they are made anew on the new node.
//!
//! # Layout
//! - `connection`: the one connection and its publish channel, reconnection (to the next
//!   node of a cluster), [`Backoff`].
//! - `topology`: exchanges, route and retry queues, their arguments, declared once per
//!   connection.
//! - `publish`: confirmed publishes, the resend on a closed connection, unroutable ones.
//! - `consume`: build consumers and their ackers (one copy of a message in hand at a
//!   time), the events subscription, dead letters.
//! - `settle`: a consumer channel's acks and nacks, several acks to a `multiple` frame
//!   when they cover a contiguous settled prefix of delivery tags.
//!
//! [`Notice::Lagged`]: tessera_protocol::Notice::Lagged

mod connection;
mod consume;
mod publish;
mod settle;
mod topology;

use std::collections::BTreeSet;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use lapin::Channel;
use lapin::types::ShortString;

use tessera_protocol::Cause;
use tessera_protocol::bus::{
    Bus, BusError, Consumer, DeadAction, DeadLetter, DeadPick, QueueStats, Subscription,
};
use tessera_protocol::config::QueueType;
use tessera_protocol::message::{BuildRequest, Event};

use connection::Connector;
use consume::{AmqpConsumer, AmqpSubscription};
use publish::build_properties;
use topology::retry_queue;

pub use connection::Backoff;
pub use topology::retry_bucket;

/// Deadline for one broker operation (connect, declare, publish confirm, ack).
pub const OP_TIMEOUT: Duration = Duration::from_secs(5);
/// Least time between two connection attempts made on behalf of publishers.
pub const RECONNECT_MIN: Duration = Duration::from_millis(500);
/// First wait of a consumer or subscription before reconnecting.
pub const BACKOFF_MIN: Duration = Duration::from_millis(100);
/// Longest wait of a consumer or subscription before reconnecting.
pub const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// Retry delay buckets, in seconds.
pub const RETRY_BUCKETS: [u64; 6] = [1, 2, 4, 8, 16, 32];
/// Events buffered for a slow subscriber before it is told it lagged.
const EVENT_BUFFER: usize = 4096;

/// The broker could not be reached or did not answer: `cause` (lapin's error, or a
/// message when there is none) is kept as the source.
fn unavailable(cause: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> BusError {
    BusError::Unavailable(Cause::new(cause))
}

async fn timed<T>(
    what: &str,
    f: impl std::future::Future<Output = lapin::Result<T>>,
) -> Result<T, BusError> {
    match tokio::time::timeout(OP_TIMEOUT, f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(BusError::Unavailable(Cause::context(what, e))),
        Err(_) => Err(unavailable(format!(
            "{what}: no answer within {OP_TIMEOUT:?}"
        ))),
    }
}

/// Closes a channel opened for one task, within [`OP_TIMEOUT`] (a broker that stopped
/// answering would never confirm the close). A failure leaves it to the connection.
async fn close(channel: &Channel) {
    let _ = timed("close channel", channel.close(200, short("done"))).await;
}

fn short(s: &str) -> ShortString {
    ShortString::from(s.to_string())
}

struct Inner {
    ns: String,
    /// `x-expires` for this namespace's durable queues, when set.
    expiry: Option<Duration>,
    /// `bus.queue_type` is `quorum`.
    quorum: std::sync::atomic::AtomicBool,
    /// The broker connection, made and re-made as needed.
    connection: Connector,
    /// Build queues this bus serves (configured, published to or consumed): `ping`
    /// checks that each can be declared.
    queues: Mutex<BTreeSet<String>>,
    /// Route queue declarations made (each with its retry queues): what the tests count.
    declarations: std::sync::atomic::AtomicU64,
}

/// RabbitMQ, as a [`Bus`].
#[derive(Clone)]
pub struct AmqpBus {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for AmqpBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AmqpBus")
            .field("namespace", &self.inner.ns)
            .finish()
    }
}

impl AmqpBus {
    /// A bus on the broker at `url`, naming its exchanges after `namespace`. Connects
    /// lazily: a broker that is down at start-up is not an error.
    pub fn new(url: &str, namespace: &str) -> Self {
        Self::with_queue_expiry(url, namespace, None)
    }

    /// Like [`AmqpBus::new`]; with `expiry`, RabbitMQ deletes the namespace's queues once
    /// unused that long (throw-away namespaces only, see `bus.queue_expiry`).
    pub fn with_queue_expiry(url: &str, namespace: &str, expiry: Option<Duration>) -> Self {
        Self::on_nodes(&[url.to_string()], namespace, expiry)
    }

    /// Like [`AmqpBus::with_queue_expiry`], on a broker of several nodes (a cluster):
    /// connects to the first of `urls` that answers, and when that connection is lost,
    /// to the next (see the module docs). With no URL every call is
    /// [`BusError::Unavailable`].
    pub fn on_nodes(urls: &[String], namespace: &str, expiry: Option<Duration>) -> Self {
        Self {
            inner: Arc::new(Inner {
                expiry,
                quorum: std::sync::atomic::AtomicBool::new(false),
                ns: namespace.to_string(),
                connection: Connector::new(urls),
                queues: Mutex::new(BTreeSet::new()),
                declarations: std::sync::atomic::AtomicU64::new(0),
            }),
        }
    }

    /// Adds `queues` to those [`Bus::ping`] checks, so a queue the broker refuses to
    /// declare shows before the first build is published or consumed.
    #[must_use]
    pub fn with_queues(self, queues: &[String]) -> Self {
        self.known_queues().extend(queues.iter().cloned());
        self
    }

    /// Declares the namespace's durable queues (build, retry, dead-letter) as `kind`
    /// (`bus.queue_type`). A queue that exists as another kind is refused by the broker
    /// (`PRECONDITION_FAILED`), which `/readyz` reports.
    #[must_use]
    pub fn with_queue_type(self, kind: QueueType) -> Self {
        self.inner
            .quorum
            .store(kind == QueueType::Quorum, Ordering::Relaxed);
        self
    }

    fn known_queues(&self) -> std::sync::MutexGuard<'_, BTreeSet<String>> {
        self.inner
            .queues
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn exchange(&self, what: &str) -> String {
        format!("{}.{what}", self.inner.ns)
    }
}

#[async_trait]
impl Bus for AmqpBus {
    fn reconnects(&self) -> u64 {
        self.inner.connection.reconnects()
    }

    async fn publish_build(&self, queue: &str, request: &BuildRequest) -> Result<(), BusError> {
        self.publish_to_queue(queue, &request.encode(), build_properties(request))
            .await
    }

    async fn publish_retry(
        &self,
        queue: &str,
        request: &BuildRequest,
        delay: Duration,
    ) -> Result<(), BusError> {
        let retry = retry_queue(queue, retry_bucket(delay));
        // The default exchange routes straight to the bucket queue.
        self.publish_declared(
            queue,
            "",
            &retry,
            &request.encode(),
            build_properties(request),
        )
        .await
    }

    async fn consume(
        &self,
        queues: &[String],
        background: &[String],
        prefetch: u16,
    ) -> Result<Box<dyn Consumer>, BusError> {
        Ok(Box::new(AmqpConsumer::start(
            self.clone(),
            queues,
            background,
            prefetch,
        )))
    }

    async fn publish_event(&self, event: &Event) -> Result<(), BusError> {
        self.fan_out(event).await
    }

    async fn subscribe(&self) -> Result<Box<dyn Subscription>, BusError> {
        Ok(Box::new(AmqpSubscription::start(self.clone()).await))
    }

    /// Connected, and every queue this bus serves can be declared (each checked once
    /// per connection; one that failed is tried again on every call).
    async fn ping(&self) -> Result<(), BusError> {
        let link = self.link().await?;
        let queues: Vec<String> = self.known_queues().iter().cloned().collect();
        for queue in &queues {
            self.declare_queue(&link, queue).await?;
        }
        Ok(())
    }

    async fn queue_stats(&self, queue: &str) -> Result<QueueStats, BusError> {
        self.inspect_queue(queue).await
    }

    async fn dead_letters(&self, limit: usize) -> Result<Vec<DeadLetter>, BusError> {
        Ok(self.take_dead_letters(limit, None).await?.0)
    }

    async fn settle_dead_letters(
        &self,
        pick: DeadPick<'_>,
        action: DeadAction,
        scan: usize,
    ) -> Result<usize, BusError> {
        Ok(self.take_dead_letters(scan, Some((pick, action))).await?.1)
    }
}

#[cfg(test)]
mod tests {
    use std::error::Error;

    use super::*;

    /// A broker call that failed keeps lapin's error (and what lies beneath it) as the
    /// source, and reads as it always did.
    #[tokio::test]
    async fn a_failed_call_keeps_lapins_error() {
        let refused = || std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        let e = timed("connect", async {
            Err::<(), _>(lapin::Error::from(refused()))
        })
        .await
        .unwrap_err();
        let lapin_says = lapin::Error::from(refused()).to_string();
        assert_eq!(
            e.to_string(),
            format!("bus unavailable: connect: {lapin_says}")
        );
        assert!(e.is_retryable());
        let BusError::Unavailable(cause) = &e else {
            panic!("{e:?}")
        };
        let lapin = cause
            .downcast_ref::<lapin::Error>()
            .expect("lapin's error kept");
        assert!(matches!(lapin.kind(), lapin::ErrorKind::IOError(_)));
        assert_eq!(
            e.source().unwrap().source().unwrap().to_string(),
            lapin_says
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_call_without_an_answer_is_unavailable_at_the_deadline() {
        let e = timed(
            "publisher confirm",
            std::future::pending::<lapin::Result<()>>(),
        )
        .await
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "bus unavailable: publisher confirm: no answer within 5s"
        );
        assert!(e.is_retryable());
    }
}
