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
//! which is why builds are idempotent. Nothing here panics or exits the process.

use std::collections::{BTreeSet, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicGetOptions, BasicNackOptions, BasicPublishOptions,
    BasicQosOptions, ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions,
    QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{
    BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, ExchangeKind,
};
use tokio::sync::mpsc;

use tessera_protocol::bus::{
    Acker, Bus, BusError, Consumer, DeadLetter, Delivery, Notice, QueueStats, Subscription, Turns,
};
use tessera_protocol::config::QueueType;
use tessera_protocol::message::{BuildRequest, Event};

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

fn unavailable(e: impl std::fmt::Display) -> BusError {
    BusError::Unavailable(e.to_string())
}

async fn timed<T>(
    what: &str,
    f: impl std::future::Future<Output = lapin::Result<T>>,
) -> Result<T, BusError> {
    match tokio::time::timeout(OP_TIMEOUT, f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(unavailable(format!("{what}: {e}"))),
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

/// A live connection and the confirm-mode channel publishers share.
struct Link {
    conn: Connection,
    publish: Channel,
    /// Queues declared on this connection.
    declared: Mutex<HashSet<String>>,
    /// Held while a queue is declared: callers that need the same queue at once (the
    /// first burst of misses) wait for one declaration instead of each making its own.
    /// It keeps the last declaration that failed, which those waiting for it share
    /// rather than each trying again in turn (against a broker that stopped answering,
    /// one timeout after another).
    declaring: tokio::sync::Mutex<Option<Refused>>,
    /// Declarations ended on this connection, failed or not.
    declarations_ended: AtomicU64,
}

/// A declaration that failed.
struct Refused {
    queue: String,
    /// Its place in `Link::declarations_ended`.
    ended: u64,
    error: BusError,
}

impl Link {
    fn alive(&self) -> bool {
        self.conn.status().connected() && self.publish.status().connected()
    }
}

struct Inner {
    url: String,
    ns: String,
    /// `x-expires` for this namespace's durable queues, when set.
    expiry: Option<Duration>,
    /// `bus.queue_type` is `quorum`.
    quorum: std::sync::atomic::AtomicBool,
    /// The live link, if any: looked at by every publish, so not held across I/O.
    link: Mutex<Option<Arc<Link>>>,
    /// Held while connecting: one connection attempt at a time.
    connecting: tokio::sync::Mutex<()>,
    last_attempt: Mutex<Option<Instant>>,
    /// Set after the first successful connection.
    connected: std::sync::atomic::AtomicBool,
    /// Connections made after a lost one.
    reconnects: std::sync::atomic::AtomicU64,
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
        Self {
            inner: Arc::new(Inner {
                expiry,
                quorum: std::sync::atomic::AtomicBool::new(false),
                url: url.to_string(),
                ns: namespace.to_string(),
                link: Mutex::new(None),
                connecting: tokio::sync::Mutex::new(()),
                last_attempt: Mutex::new(None),
                connected: std::sync::atomic::AtomicBool::new(false),
                reconnects: std::sync::atomic::AtomicU64::new(0),
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

    /// Arguments every durable queue of this namespace gets.
    fn queue_args(&self) -> FieldTable {
        let mut args = FieldTable::default();
        if self.inner.quorum.load(Ordering::Relaxed) {
            args.insert(
                short("x-queue-type"),
                AMQPValue::LongString(LongString::from(QueueType::Quorum.as_str())),
            );
        }
        if let Some(expiry) = self.inner.expiry {
            let ms = i32::try_from(expiry.as_millis()).unwrap_or(i32::MAX);
            args.insert(short("x-expires"), AMQPValue::LongInt(ms));
        }
        args
    }

    /// Opens a connection, declares the shared topology.
    async fn connect(&self) -> Result<Link, BusError> {
        let conn = timed(
            "connect",
            Connection::connect(&self.inner.url, ConnectionProperties::default()),
        )
        .await?;
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
        Ok(Link {
            conn,
            publish,
            declared: Mutex::new(HashSet::new()),
            declaring: tokio::sync::Mutex::new(None),
            declarations_ended: AtomicU64::new(0),
        })
    }

    /// The namespace's exchanges and dead-letter queue. With a queue expiry the exchanges
    /// are auto-delete: RabbitMQ drops each once its last binding goes (see the module
    /// docs), since exchanges cannot carry `x-expires`.
    async fn declare_shared(&self, publish: &Channel) -> Result<(), BusError> {
        let options = ExchangeDeclareOptions {
            durable: true,
            auto_delete: self.inner.expiry.is_some(),
            ..ExchangeDeclareOptions::default()
        };
        for (name, kind) in [
            (self.exchange("build"), ExchangeKind::Direct),
            (self.exchange("dead"), ExchangeKind::Fanout),
            (self.exchange("events"), ExchangeKind::Fanout),
        ] {
            timed(
                &format!("declare exchange {name}"),
                publish.exchange_declare(short(&name), kind, options, FieldTable::default()),
            )
            .await?;
        }
        let dead = self.exchange("dead");
        timed(
            "declare dead-letter queue",
            publish.queue_declare(
                short(&dead),
                QueueDeclareOptions::durable(),
                self.queue_args(),
            ),
        )
        .await?;
        timed(
            "bind dead-letter queue",
            publish.queue_bind(
                short(&dead),
                short(&dead),
                short(""),
                QueueBindOptions::default(),
                FieldTable::default(),
            ),
        )
        .await
    }

    /// Holds the auto-delete exchanges while this connection lives: an exclusive queue
    /// that keeps nothing (`x-max-length` 0), bound to each exchange (to the build
    /// exchange under its own server-given name, which no build is sent to).
    async fn declare_anchor(&self, channel: &Channel) -> Result<(), BusError> {
        let options = QueueDeclareOptions {
            exclusive: true,
            auto_delete: true,
            ..QueueDeclareOptions::default()
        };
        let mut args = FieldTable::default();
        args.insert(short("x-max-length"), AMQPValue::LongInt(0));
        let anchor = timed(
            "declare anchor queue",
            channel.queue_declare(short(""), options, args),
        )
        .await?;
        let name = anchor.name().clone();
        for exchange in ["build", "dead", "events"] {
            timed(
                "bind anchor queue",
                channel.queue_bind(
                    name.clone(),
                    short(&self.exchange(exchange)),
                    name.clone(),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                ),
            )
            .await?;
        }
        Ok(())
    }

    /// The live link, reconnecting when it is gone (rate limited, so publishers fail fast
    /// while the broker is down).
    async fn link(&self) -> Result<Arc<Link>, BusError> {
        if let Some(link) = self.live_link() {
            return Ok(link);
        }
        let _connecting = self.inner.connecting.lock().await;
        // Another caller may have connected while this one waited.
        if let Some(link) = self.live_link() {
            return Ok(link);
        }
        {
            let mut last = self
                .inner
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
                tracing::info!("connected to the broker");
                if self.inner.connected.swap(true, Ordering::Relaxed) {
                    self.inner.reconnects.fetch_add(1, Ordering::Relaxed);
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
            .link
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn live_link(&self) -> Option<Arc<Link>> {
        self.slot().as_ref().filter(|l| l.alive()).cloned()
    }

    /// Drops `link` after it failed, so the next call reconnects (unless another caller
    /// already put a new link in its place).
    fn drop_link(&self, link: &Arc<Link>) {
        let mut slot = self.slot();
        if slot.as_ref().is_some_and(|l| Arc::ptr_eq(l, link)) {
            *slot = None;
        }
    }

    /// Declares a route queue and its retry queues, once per link, on a channel of its
    /// own: a refused declare (406 PRECONDITION_FAILED, the queue exists with other
    /// arguments) closes the channel it was made on. A failure is shared only with the
    /// callers that waited for it, so the next publish, consumer reconnection or
    /// [`Bus::ping`] tries again.
    async fn declare_queue(&self, link: &Link, queue: &str) -> Result<(), BusError> {
        self.known_queues().insert(queue.to_string());
        let declared = || {
            link.declared
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .contains(queue)
        };
        if declared() {
            return Ok(());
        }
        let waited_from = link.declarations_ended.load(Ordering::Acquire);
        let mut refused = link.declaring.lock().await;
        if declared() {
            return Ok(());
        }
        if let Some(r) = refused.as_ref()
            && r.queue == queue
            && r.ended > waited_from
        {
            return Err(r.error.clone());
        }
        self.inner.declarations.fetch_add(1, Ordering::Relaxed);
        let result = async {
            let channel = timed("open channel", link.conn.create_channel()).await?;
            let declared = self.declare_route_queue(&channel, queue).await;
            close(&channel).await;
            declared
        }
        .await;
        let ended = link.declarations_ended.fetch_add(1, Ordering::AcqRel) + 1;
        match &result {
            Ok(()) => {
                link.declared
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .insert(queue.to_string());
                *refused = None;
            }
            Err(error) => {
                *refused = Some(Refused {
                    queue: queue.to_string(),
                    ended,
                    error: error.clone(),
                });
            }
        }
        result
    }

    /// The queue, its binding and its retry queues, on `channel`.
    async fn declare_route_queue(&self, channel: &Channel, queue: &str) -> Result<(), BusError> {
        let mut args = self.queue_args();
        args.insert(
            short("x-dead-letter-exchange"),
            AMQPValue::LongString(LongString::from(self.exchange("dead"))),
        );
        timed(
            &format!("declare queue {queue}"),
            channel.queue_declare(short(queue), QueueDeclareOptions::durable(), args),
        )
        .await?;
        let build = self.exchange("build");
        timed(
            "bind queue",
            channel.queue_bind(
                short(queue),
                short(&build),
                short(queue),
                QueueBindOptions::default(),
                FieldTable::default(),
            ),
        )
        .await?;
        for secs in RETRY_BUCKETS {
            let mut args = self.queue_args();
            args.insert(
                short("x-message-ttl"),
                AMQPValue::LongInt(i32::try_from(secs * 1000).unwrap_or(i32::MAX)),
            );
            args.insert(
                short("x-dead-letter-exchange"),
                AMQPValue::LongString(LongString::from(build.clone())),
            );
            args.insert(
                short("x-dead-letter-routing-key"),
                AMQPValue::LongString(LongString::from(queue.to_string())),
            );
            let retry = retry_queue(queue, secs);
            timed(
                &format!("declare retry queue {retry}"),
                channel.queue_declare(short(&retry), QueueDeclareOptions::durable(), args),
            )
            .await?;
        }
        Ok(())
    }

    /// Publishes with a confirm: `Ok(true)` once the broker took the message into a queue,
    /// `Ok(false)` when it confirmed it but no queue took it (it came back).
    async fn publish(
        &self,
        link: &Arc<Link>,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        props: BasicProperties,
    ) -> Result<bool, BusError> {
        let options = BasicPublishOptions {
            mandatory: true,
            ..BasicPublishOptions::default()
        };
        let result = async {
            let confirm = timed(
                "publish",
                link.publish.basic_publish(
                    short(exchange),
                    short(routing_key),
                    options,
                    body,
                    props,
                ),
            )
            .await?;
            match timed("publisher confirm", confirm).await? {
                Confirmation::Ack(None) | Confirmation::NotRequested => Ok(true),
                Confirmation::Ack(Some(_)) => Ok(false),
                Confirmation::Nack(_) => {
                    Err(BusError::Rejected("the broker refused the message".into()))
                }
            }
        }
        .await;
        if let Err(BusError::Unavailable(_)) = &result {
            // Let the next call reconnect.
            self.drop_link(link);
        }
        result
    }

    /// Publishes raw bytes to a build queue, as any other program could.
    pub async fn publish_raw(&self, queue: &str, body: &[u8]) -> Result<(), BusError> {
        self.publish_to_queue(queue, body).await
    }

    async fn publish_to_queue(&self, queue: &str, body: &[u8]) -> Result<(), BusError> {
        self.publish_declared(queue, &self.exchange("build"), queue, body)
            .await
    }

    /// Declares `queue` (with its retry queues) once per link, then publishes, trying a
    /// second time in two cases where the broker did not take the message:
    /// - No queue took it: a queue went (an operator deleted it, or it expired: RabbitMQ
    ///   does not count publishes as use). The queues are declared again, so a miss storm
    ///   against a deleted queue is not answered with a storm of 503s.
    /// - The connection closed under it (RabbitMQ closes it with 541 INTERNAL_ERROR when
    ///   a publish meets a queue's deletion, or it restarted): the message goes out on a
    ///   new connection. The first may have taken it after all: a second copy is
    ///   harmless, since builds are idempotent and a copy picked up after the first was
    ///   built is dropped as already built.
    ///
    /// A publish that timed out on a connection still open is not tried again: the broker
    /// is slow, and a second wait would double the caller's.
    async fn publish_declared(
        &self,
        queue: &str,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
    ) -> Result<(), BusError> {
        let mut link = self.link().await?;
        for attempt in 0..2 {
            self.declare_queue(&link, queue).await?;
            match self
                .publish(&link, exchange, routing_key, body, persistent())
                .await
            {
                Ok(true) => return Ok(()),
                Ok(false) => {
                    link.declared
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .remove(queue);
                }
                Err(BusError::Unavailable(_)) if attempt == 0 && !link.alive() => {
                    link = self.link().await?;
                }
                Err(e) => return Err(e),
            }
        }
        Err(unroutable(exchange, routing_key))
    }
}

/// A publish the broker confirmed but no queue took.
fn unroutable(exchange: &str, routing_key: &str) -> BusError {
    BusError::Rejected(format!(
        "no queue is bound for {routing_key:?} on {exchange:?}"
    ))
}

fn persistent() -> BasicProperties {
    BasicProperties::default()
        .with_delivery_mode(2)
        .with_content_type(short("application/json"))
}

fn retry_queue(queue: &str, secs: u64) -> String {
    format!("{queue}.retry.{secs}s")
}

/// The smallest bucket at least as long as `delay` (the longest for longer delays).
pub fn retry_bucket(delay: Duration) -> u64 {
    let secs = delay.as_secs_f64();
    RETRY_BUCKETS
        .iter()
        .copied()
        .find(|b| *b as f64 >= secs)
        .unwrap_or(RETRY_BUCKETS[RETRY_BUCKETS.len() - 1])
}

#[async_trait]
impl Bus for AmqpBus {
    fn reconnects(&self) -> u64 {
        self.inner.reconnects.load(Ordering::Relaxed)
    }

    async fn publish_build(&self, queue: &str, request: &BuildRequest) -> Result<(), BusError> {
        self.publish_to_queue(queue, &request.encode()).await
    }

    async fn publish_retry(
        &self,
        queue: &str,
        request: &BuildRequest,
        delay: Duration,
    ) -> Result<(), BusError> {
        let retry = retry_queue(queue, retry_bucket(delay));
        // The default exchange routes straight to the bucket queue.
        self.publish_declared(queue, "", &retry, &request.encode())
            .await
    }

    async fn consume(
        &self,
        queues: &[String],
        background: &[String],
        prefetch: u16,
    ) -> Result<Box<dyn Consumer>, BusError> {
        let prefetch = prefetch.max(1);
        // Room for every delivery the broker may hand out unacknowledged (`prefetch` per
        // queue), so feeding one class never waits on the other being taken.
        let room = |qs: &[String]| usize::from(prefetch) * qs.len().max(1);
        let (waited_tx, waited) = mpsc::channel(room(queues));
        let (background_tx, background_rx) = mpsc::channel(room(background));
        let task = tokio::spawn(consume_loop(
            self.clone(),
            [queues.to_vec(), background.to_vec()],
            prefetch,
            [waited_tx, background_tx],
        ));
        Ok(Box::new(AmqpConsumer {
            rx: [waited, background_rx],
            turns: Turns::default(),
            _task: tokio_util::task::AbortOnDropHandle::new(task),
        }))
    }

    async fn publish_event(&self, event: &Event) -> Result<(), BusError> {
        let props = BasicProperties::default().with_content_type(short("application/json"));
        // Fanout: routable whenever the exchange exists, even with no subscriber.
        let link = self.link().await?;
        let confirm = timed(
            "publish event",
            link.publish.basic_publish(
                short(&self.exchange("events")),
                short(""),
                BasicPublishOptions::default(),
                &event.encode(),
                props,
            ),
        )
        .await?;
        timed("event confirm", confirm).await.map(|_| ())
    }

    async fn subscribe(&self) -> Result<Box<dyn Subscription>, BusError> {
        let (tx, rx) = mpsc::channel(EVENT_BUFFER);
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(subscribe_loop(self.clone(), tx, ready_tx));
        // Wait (bounded) for the first subscription, so events published after
        // `subscribe` returns are seen; a broker that is down is not fatal.
        let _ = tokio::time::timeout(OP_TIMEOUT, ready_rx).await;
        Ok(Box::new(AmqpSubscription {
            rx,
            _task: tokio_util::task::AbortOnDropHandle::new(task),
        }))
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
        let link = self.link().await?;
        // A passive declare of a missing queue closes its channel: use a throwaway one.
        let channel = timed("open channel", link.conn.create_channel()).await?;
        let options = QueueDeclareOptions {
            passive: true,
            ..QueueDeclareOptions::default()
        };
        let q = timed(
            "inspect queue",
            channel.queue_declare(short(queue), options, FieldTable::default()),
        )
        .await;
        close(&channel).await;
        let q = q?;
        Ok(QueueStats {
            messages: u64::from(q.message_count()),
            consumers: u64::from(q.consumer_count()),
        })
    }

    async fn dead_letters(&self, limit: usize) -> Result<Vec<DeadLetter>, BusError> {
        self.take_dead_letters(limit, false).await
    }

    async fn requeue_dead_letters(&self, limit: usize) -> Result<usize, BusError> {
        self.take_dead_letters(limit, true).await.map(|l| l.len())
    }
}

impl AmqpBus {
    /// Reads up to `limit` dead letters; with `requeue`, publishes each back to its queue
    /// and removes it, otherwise leaves them all where they were.
    async fn take_dead_letters(
        &self,
        limit: usize,
        requeue: bool,
    ) -> Result<Vec<DeadLetter>, BusError> {
        let link = self.link().await?;
        let channel = timed("open channel", link.conn.create_channel()).await?;
        let mut letters = Vec::new();
        let mut held = Vec::new();
        while letters.len() < limit {
            let Some(msg) = timed(
                "read dead letter",
                channel.basic_get(short(&self.exchange("dead")), BasicGetOptions::default()),
            )
            .await?
            else {
                break;
            };
            let header = |name: &str| {
                msg.delivery
                    .properties
                    .headers()
                    .as_ref()
                    .and_then(|h| h.inner().get(name))
                    .map(|v| match v {
                        AMQPValue::LongString(s) => {
                            String::from_utf8_lossy(s.as_bytes()).into_owned()
                        }
                        other => format!("{other:?}"),
                    })
            };
            let letter = DeadLetter {
                queue: header("x-tessera-queue").unwrap_or_default(),
                body: Bytes::from(msg.delivery.data.clone()),
                reason: header("x-tessera-error").unwrap_or_else(|| "rejected".into()),
            };
            if requeue && !letter.queue.is_empty() {
                self.publish_to_queue(&letter.queue, &letter.body).await?;
                timed(
                    "ack dead letter",
                    msg.delivery.acker.ack(BasicAckOptions::default()),
                )
                .await?;
            } else {
                held.push(msg.delivery.acker.clone());
            }
            letters.push(letter);
        }
        // Closing the channel returns everything read but not acknowledged, in order.
        drop(held);
        close(&channel).await;
        Ok(letters)
    }
}

/// Keeps a consumer on both classes of queues (waited, background) alive across
/// reconnections, feeding each class's deliveries to its sender.
async fn consume_loop(
    bus: AmqpBus,
    classes: [Vec<String>; 2],
    prefetch: u16,
    txs: [mpsc::Sender<Delivery>; 2],
) {
    let mut backoff = Backoff::default();
    loop {
        match consume_once(&bus, &classes, prefetch, &txs, &mut backoff).await {
            Ok(()) => return, // the receiving side is gone
            Err(e) => {
                let delay = backoff.next_delay();
                tracing::warn!(error = %e, ?delay, "build consumer lost; reconnecting");
                tokio::time::sleep(delay).await;
            }
        }
    }
}

/// Consumes every queue of `classes` on one channel until it fails (the broker's
/// `prefetch` applies per queue's consumer); resets `backoff` once consuming.
async fn consume_once(
    bus: &AmqpBus,
    classes: &[Vec<String>; 2],
    prefetch: u16,
    txs: &[mpsc::Sender<Delivery>; 2],
    backoff: &mut Backoff,
) -> Result<(), BusError> {
    let link = bus.link().await?;
    let channel = timed("open channel", link.conn.create_channel()).await?;
    timed(
        "qos",
        channel.basic_qos(prefetch, BasicQosOptions::default()),
    )
    .await?;
    let mut streams = Vec::new();
    for (class, queues) in classes.iter().enumerate() {
        for q in queues {
            bus.declare_queue(&link, q).await?;
            let consumer = timed(
                "consume",
                channel.basic_consume(
                    short(q),
                    short(""),
                    BasicConsumeOptions::default(),
                    FieldTable::default(),
                ),
            )
            .await?;
            streams.push(consumer.map(move |d| (d, q.clone(), class)));
        }
    }
    tracing::info!(waited = ?classes[0], background = ?classes[1], prefetch, "consuming build requests");
    backoff.reset();
    let mut all = futures_util::stream::select_all(streams);
    while let Some((delivery, queue, class)) = all.next().await {
        let d = delivery.map_err(unavailable)?;
        let acker = AmqpAcker {
            bus: bus.clone(),
            acker: d.acker,
            queue: queue.clone(),
            body: Bytes::from(d.data.clone()),
            settled: false,
        };
        let delivery = Delivery::new(Bytes::from(d.data), queue, d.redelivered, Box::new(acker));
        if txs[class].send(delivery).await.is_err() {
            return Ok(());
        }
    }
    Err(unavailable("consumer stream ended"))
}

#[derive(Debug)]
struct AmqpConsumer {
    /// Deliveries of waited builds, then of background ones.
    rx: [mpsc::Receiver<Delivery>; 2],
    turns: Turns,
    _task: tokio_util::task::AbortOnDropHandle<()>,
}

#[async_trait]
impl Consumer for AmqpConsumer {
    async fn next(&mut self) -> Option<Delivery> {
        let first = usize::from(self.turns.background_first());
        // What is in hand already, in the order the turns say; else whatever comes first.
        let ready = [first, 1 - first]
            .into_iter()
            .find_map(|class| Some((class, self.rx[class].try_recv().ok()?)));
        let (class, delivery) = match ready {
            Some(found) => found,
            None => {
                let [waited, background] = &mut self.rx;
                tokio::select! {
                    Some(d) = waited.recv() => (0, d),
                    Some(d) = background.recv() => (1, d),
                    else => return None,
                }
            }
        };
        self.turns.took(class == 1);
        Some(delivery)
    }
}

struct AmqpAcker {
    bus: AmqpBus,
    acker: lapin::Acker,
    queue: String,
    body: Bytes,
    settled: bool,
}

impl std::fmt::Debug for AmqpAcker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AmqpAcker")
            .field("queue", &self.queue)
            .finish()
    }
}

#[async_trait]
impl Acker for AmqpAcker {
    async fn ack(mut self: Box<Self>) -> Result<(), BusError> {
        self.settled = true;
        timed("ack", self.acker.ack(BasicAckOptions::default()))
            .await
            .map(|_| ())
    }

    async fn reject(mut self: Box<Self>, requeue: bool, reason: &str) -> Result<(), BusError> {
        self.settled = true;
        if requeue {
            let options = BasicNackOptions {
                requeue: true,
                ..BasicNackOptions::default()
            };
            return timed("nack", self.acker.nack(options)).await.map(|_| ());
        }
        // Keep the reason: publish a copy with headers to the dead-letter exchange, then
        // acknowledge. If that publish fails, a plain reject still dead-letters it.
        let mut headers = FieldTable::default();
        headers.insert(
            short("x-tessera-error"),
            AMQPValue::LongString(LongString::from(reason.to_string())),
        );
        headers.insert(
            short("x-tessera-queue"),
            AMQPValue::LongString(LongString::from(self.queue.clone())),
        );
        let props = persistent().with_headers(headers);
        let dead = self.bus.exchange("dead");
        let published = match self.bus.link().await {
            Ok(link) => match self.bus.publish(&link, &dead, "", &self.body, props).await {
                Ok(true) => Ok(()),
                Ok(false) => Err(unroutable(&dead, "")),
                Err(e) => Err(e),
            },
            Err(e) => Err(e),
        };
        match published {
            Ok(()) => timed("ack", self.acker.ack(BasicAckOptions::default()))
                .await
                .map(|_| ()),
            Err(e) => {
                tracing::warn!(error = %e, "could not publish the dead letter with its reason; rejecting");
                let options = BasicNackOptions {
                    requeue: false,
                    ..BasicNackOptions::default()
                };
                timed("nack", self.acker.nack(options)).await.map(|_| ())
            }
        }
    }

    fn release(mut self: Box<Self>) {
        if self.settled {
            return;
        }
        self.settled = true;
        let acker = self.acker.clone();
        // Dropped mid-build: hand it back now rather than when the channel closes.
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            handle.spawn(async move {
                let options = BasicNackOptions {
                    requeue: true,
                    ..BasicNackOptions::default()
                };
                let _ = tokio::time::timeout(OP_TIMEOUT, acker.nack(options)).await;
            });
        }
    }
}

/// Keeps an events subscription alive across reconnections.
async fn subscribe_loop(
    bus: AmqpBus,
    tx: mpsc::Sender<Notice>,
    ready: tokio::sync::oneshot::Sender<()>,
) {
    let mut ready = Some(ready);
    let mut backoff = Backoff::default();
    let mut first = true;
    loop {
        let result = subscribe_once(&bus, &tx, &mut ready, first, &mut backoff).await;
        first = false;
        match result {
            Ok(()) => return,
            Err(e) => {
                let delay = backoff.next_delay();
                tracing::warn!(error = %e, ?delay, "event subscription lost; reconnecting");
                tokio::time::sleep(delay).await;
            }
        }
    }
}

/// Follows the events exchange on one connection until it fails; resets `backoff` once
/// subscribed.
async fn subscribe_once(
    bus: &AmqpBus,
    tx: &mpsc::Sender<Notice>,
    ready: &mut Option<tokio::sync::oneshot::Sender<()>>,
    first: bool,
    backoff: &mut Backoff,
) -> Result<(), BusError> {
    let link = bus.link().await?;
    let channel = timed("open channel", link.conn.create_channel()).await?;
    let options = QueueDeclareOptions {
        exclusive: true,
        auto_delete: true,
        ..QueueDeclareOptions::default()
    };
    let queue = timed(
        "declare event queue",
        channel.queue_declare(short(""), options, FieldTable::default()),
    )
    .await?;
    let name = queue.name().clone();
    timed(
        "bind event queue",
        channel.queue_bind(
            name.clone(),
            short(&bus.exchange("events")),
            short(""),
            QueueBindOptions::default(),
            FieldTable::default(),
        ),
    )
    .await?;
    let options = BasicConsumeOptions {
        no_ack: true,
        ..BasicConsumeOptions::default()
    };
    let mut consumer = timed(
        "consume events",
        channel.basic_consume(name, short(""), options, FieldTable::default()),
    )
    .await?;
    backoff.reset();
    if let Some(ready) = ready.take() {
        let _ = ready.send(());
    }
    if !first && tx.send(Notice::Lagged).await.is_err() {
        return Ok(());
    }
    while let Some(d) = consumer.next().await {
        let d = d.map_err(unavailable)?;
        let notice = match Event::decode(&d.data) {
            Ok(e) => Notice::Event(e),
            Err(e) => {
                tracing::warn!(error = %e, "undecodable event ignored");
                continue;
            }
        };
        match tx.try_send(notice) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => {
                // The gateway fell behind: tell it once there is room.
                if tx.send(Notice::Lagged).await.is_err() {
                    return Ok(());
                }
            }
            Err(mpsc::error::TrySendError::Closed(_)) => return Ok(()),
        }
    }
    Err(unavailable("event stream ended"))
}

#[derive(Debug)]
struct AmqpSubscription {
    rx: mpsc::Receiver<Notice>,
    _task: tokio_util::task::AbortOnDropHandle<()>,
}

#[async_trait]
impl Subscription for AmqpSubscription {
    async fn next(&mut self) -> Option<Notice> {
        self.rx.recv().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_wait_for_the_next_bucket_up() {
        assert_eq!(retry_bucket(Duration::from_millis(300)), 1);
        assert_eq!(retry_bucket(Duration::from_secs(1)), 1);
        assert_eq!(retry_bucket(Duration::from_millis(1001)), 2);
        assert_eq!(retry_bucket(Duration::from_secs(9)), 16);
        assert_eq!(retry_bucket(Duration::from_secs(600)), 32);
    }

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

    /// The first burst of publishes to a queue not yet declared on the connection (a
    /// miss storm on a fresh gateway) makes one declaration, not one per publish.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_first_publishes_declare_their_queue_once() {
        let ns = format!("declare-once-{}", std::process::id());
        let bus = AmqpBus::with_queue_expiry(
            "amqp://guest:guest@127.0.0.1:5672/%2f",
            &ns,
            Some(Duration::from_secs(60)),
        );
        let queue = format!("{ns}.build");
        let bodies: Vec<String> = (0..32).map(|i| i.to_string()).collect();
        let published = futures_util::future::join_all(
            bodies.iter().map(|b| bus.publish_raw(&queue, b.as_bytes())),
        )
        .await;
        for p in published {
            p.expect("publish (is RabbitMQ running on 127.0.0.1:5672?)");
        }
        assert_eq!(bus.inner.declarations.load(Ordering::Relaxed), 1);
        bus.ping().await.unwrap();
        assert_eq!(
            bus.inner.declarations.load(Ordering::Relaxed),
            1,
            "declared once per connection"
        );
    }

    /// Callers that waited for a declaration the broker refused share its refusal
    /// instead of each declaring again in turn: against a broker that stopped answering,
    /// the last of them would otherwise wait one timeout per caller before it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn callers_waiting_for_a_refused_declaration_share_the_refusal() {
        let url = "amqp://guest:guest@127.0.0.1:5672/%2f";
        let ns = format!("declare-refused-{}", std::process::id());
        let queue = format!("{ns}.build");
        // Another namespace took the name first, with its own dead-letter exchange.
        AmqpBus::with_queue_expiry(url, &format!("{ns}-first"), Some(Duration::from_secs(6)))
            .publish_raw(&queue, b"{}")
            .await
            .expect("publish (is RabbitMQ running on 127.0.0.1:5672?)");
        let bus = AmqpBus::with_queue_expiry(url, &ns, Some(Duration::from_secs(60)));
        let bodies: Vec<String> = (0..32).map(|i| i.to_string()).collect();
        let published = futures_util::future::join_all(
            bodies.iter().map(|b| bus.publish_raw(&queue, b.as_bytes())),
        )
        .await;
        for p in published {
            assert!(
                matches!(p, Err(BusError::Unavailable(_) | BusError::Rejected(_))),
                "{p:?}"
            );
        }
        assert_eq!(bus.inner.declarations.load(Ordering::Relaxed), 1);
        // Not remembered beyond those who waited: the next call tries again.
        assert!(bus.publish_raw(&queue, b"{}").await.is_err());
        assert_eq!(bus.inner.declarations.load(Ordering::Relaxed), 2);
    }

    /// Publishes waiting for their confirms when the connection closes under them (as
    /// RabbitMQ closes it with 541 INTERNAL_ERROR when a publish meets a queue's
    /// deletion) go out again on a new connection, instead of each failing.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn publishes_in_flight_when_the_connection_closes_go_out_again() {
        let url = "amqp://guest:guest@127.0.0.1:5672/%2f";
        let ns = format!("closed-under-publishes-{}", std::process::id());
        let bus = AmqpBus::with_queue_expiry(url, &ns, Some(Duration::from_secs(60)));
        let queue = format!("{ns}.build");
        bus.publish_raw(&queue, b"first")
            .await
            .expect("publish (is RabbitMQ running on 127.0.0.1:5672?)");
        // A reconnection is attempted at most once per RECONNECT_MIN.
        tokio::time::sleep(RECONNECT_MIN).await;
        let link = bus.live_link().expect("connected");
        let bodies: Vec<String> = (0..64).map(|i| i.to_string()).collect();
        let publishes = futures_util::future::join_all(
            bodies.iter().map(|b| bus.publish_raw(&queue, b.as_bytes())),
        );
        let close = async {
            // Once every publish above is sent and waits for its confirm.
            tokio::task::yield_now().await;
            let _ = link.conn.close(320, short("closed by the test")).await;
        };
        let (published, ()) = tokio::join!(publishes, close);
        for p in published {
            p.expect("published on a new connection");
        }
        assert_eq!(bus.reconnects(), 1);
        let waiting = bus.queue_stats(&queue).await.unwrap().messages;
        assert!(waiting >= 65, "{waiting} messages queued, not 65 or more");
    }

    #[test]
    fn backoff_with_a_cap_below_its_start_waits_the_start() {
        let mut b = Backoff::new(Duration::from_secs(2), Duration::from_secs(1));
        assert_eq!(b.next_delay(), Duration::from_secs(2));
        assert_eq!(b.next_delay(), Duration::from_secs(2));
    }
}
