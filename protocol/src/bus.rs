//! The broker: build queues and the events fanout.
//!
//! The contract is AMQP's, as RabbitMQ implements it; the in-process twin ([`MemoryBus`])
//! keeps the same semantics so both modes behave alike and share their tests.
//!
//! - `publish_build` returns only once the broker has taken the message (publisher
//!   confirm); an `Err` means it may not have, and the caller must not assume it queued.
//! - A consumer holds at most `prefetch` unacknowledged deliveries. A [`Delivery`] must end
//!   in exactly one of [`Delivery::ack`], [`Delivery::dead_letter`] or
//!   [`Delivery::requeue`]; one dropped without a decision (its task panicked or was
//!   cancelled) is requeued, as AMQP does when a channel closes. Builds must therefore be
//!   idempotent: a request can be delivered more than once.
//! - `publish_retry` delivers the request to its queue again after a delay (AMQP: a retry
//!   queue whose messages dead-letter back to the build exchange).
//! - Dead-lettered messages are kept (bounded) for operators to inspect and re-queue.
//! - A consumer takes builds from two classes of queues: builds someone waits for, and
//!   background ones (refreshes of stale fragments). Waited builds go first; of every
//!   [`BACKGROUND_SHARE`] deliveries while both classes have builds ready, one is a
//!   background build, so refreshes still progress under a steady stream of waited ones
//!   ([`Turns`]).
//! - Events reach every current subscriber. A subscriber that may have missed some (it
//!   fell behind, or its connection was re-established) gets [`Notice::Lagged`] and must
//!   assume anything changed.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, broadcast};

use crate::error::Cause;
use crate::message::{BuildRequest, Event};

/// A bus call failed. Each variant keeps what caused it (the client library's error,
/// reachable through [`Error::source`](std::error::Error::source), or a message when
/// there is none) and says whether a retry helps ([`BusError::is_retryable`]).
#[derive(Debug, Clone, thiserror::Error)]
pub enum BusError {
    /// Not connected, or the broker did not answer in time. Retrying later helps.
    #[error("bus unavailable: {0}")]
    Unavailable(#[source] Cause),
    /// The broker refused the message (queue full, negative confirm, no queue took it).
    /// It decided: the same message sent again at once is refused again.
    #[error("bus refused the message: {0}")]
    Rejected(#[source] Cause),
}

impl BusError {
    /// Whether sending again soon may succeed: the broker could not be reached, rather
    /// than refusing.
    pub fn is_retryable(&self) -> bool {
        matches!(self, BusError::Unavailable(_))
    }
}

/// What a gateway's event subscription yields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Notice {
    /// An event from some worker or gateway.
    Event(Event),
    /// Events may have been missed: drop everything cached.
    Lagged,
}

/// A message that was dead-lettered, as kept for operators.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    /// The queue it came from.
    pub queue: String,
    /// The message as published.
    pub body: Bytes,
    /// Why it was dead-lettered.
    pub reason: String,
    /// When it was dead-lettered, in ms since the Unix epoch; 0 when unknown (a letter
    /// dead-lettered before the time was kept).
    pub at_ms: u64,
}

impl DeadLetter {
    /// Its id: 16 hex digits of the hash of its queue and body. Stable across listings, so
    /// an operator can act on the letter a listing showed; identical letters share one.
    pub fn id(&self) -> String {
        let mut hasher = blake3::Hasher::new();
        hasher.update(self.queue.as_bytes());
        hasher.update(&[0]);
        hasher.update(&self.body);
        hasher.finalize().to_hex()[..16].to_string()
    }

    /// Its build request, when the body decodes as one.
    pub fn request(&self) -> Option<BuildRequest> {
        BuildRequest::decode(&self.body).ok()
    }
}

/// What an operator does with the dead letters picked
/// ([`Bus::settle_dead_letters`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeadAction {
    /// Put back on the queue it came from, to be built again.
    Retry,
    /// Removed for good.
    Discard,
}

/// Which dead letters an action takes.
pub type DeadPick<'a> = &'a (dyn Fn(&DeadLetter) -> bool + Send + Sync);

/// What the broker says about one build queue.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct QueueStats {
    /// Messages waiting to be delivered.
    pub messages: u64,
    /// Consumers attached (worker processes, or embedded worker pools).
    pub consumers: u64,
}

/// The message broker.
#[async_trait]
pub trait Bus: Send + Sync + fmt::Debug + 'static {
    /// Queues a build on `queue`, returning once the broker has confirmed it.
    async fn publish_build(&self, queue: &str, request: &BuildRequest) -> Result<(), BusError>;

    /// Queues a build on `queue` that becomes deliverable after `delay`.
    async fn publish_retry(
        &self,
        queue: &str,
        request: &BuildRequest,
        delay: Duration,
    ) -> Result<(), BusError>;

    /// Starts consuming `queues` (builds someone waits for) and `background` (builds
    /// nobody waits for), with at most `prefetch` unacknowledged deliveries per queue
    /// (AMQP: per consumer); deliveries ready in both classes are handed out as [`Turns`]
    /// says.
    async fn consume(
        &self,
        queues: &[String],
        background: &[String],
        prefetch: u16,
    ) -> Result<Box<dyn Consumer>, BusError>;

    /// Fans `event` out to every gateway.
    async fn publish_event(&self, event: &Event) -> Result<(), BusError>;

    /// Starts receiving events.
    async fn subscribe(&self) -> Result<Box<dyn Subscription>, BusError>;

    /// Checks that the broker answers.
    async fn ping(&self) -> Result<(), BusError>;

    /// Connections re-established after a lost one, since start.
    fn reconnects(&self) -> u64 {
        0
    }

    /// Depth and consumers of `queue`, as the broker reports them.
    async fn queue_stats(&self, queue: &str) -> Result<QueueStats, BusError> {
        let _ = queue;
        Err(BusError::Unavailable(
            "queue statistics are not supported by this bus".into(),
        ))
    }

    /// Up to `limit` dead letters, oldest first, without removing them.
    async fn dead_letters(&self, limit: usize) -> Result<Vec<DeadLetter>, BusError> {
        let _ = limit;
        Err(BusError::Unavailable(
            "dead-letter listing is not supported by this bus".into(),
        ))
    }

    /// Moves up to `limit` dead letters back to the queues they came from; returns how
    /// many moved.
    async fn requeue_dead_letters(&self, limit: usize) -> Result<usize, BusError> {
        self.settle_dead_letters(&|_| true, DeadAction::Retry, limit)
            .await
    }

    /// Reads up to `scan` dead letters, oldest first, and retries or discards each one
    /// `pick` takes; the others stay where they were, in order. Returns how many were
    /// taken. A letter whose queue is unknown is never retried (nor taken by a retry).
    async fn settle_dead_letters(
        &self,
        pick: DeadPick<'_>,
        action: DeadAction,
        scan: usize,
    ) -> Result<usize, BusError> {
        let _ = (pick, action, scan);
        Err(BusError::Unavailable(
            "dead-letter actions are not supported by this bus".into(),
        ))
    }
}

/// While builds of both classes are ready, one delivery in this many is a background one.
pub const BACKGROUND_SHARE: u32 = 4;

/// Which class a consumer looks at first for its next delivery: waited builds, except
/// after [`BACKGROUND_SHARE`]` - 1` waited ones in a row, when a ready background build
/// goes first. Under a steady stream of waited builds, refreshes get a quarter of the
/// deliveries; without one, all of them.
#[derive(Debug, Default, Clone, Copy)]
pub struct Turns {
    waited_in_a_row: u32,
}

impl Turns {
    /// Whether the next delivery is looked for among background builds first.
    pub fn background_first(&self) -> bool {
        self.waited_in_a_row + 1 >= BACKGROUND_SHARE
    }

    /// Records a delivery of a background (`true`) or waited build.
    pub fn took(&mut self, background: bool) {
        self.waited_in_a_row = if background {
            0
        } else {
            self.waited_in_a_row + 1
        };
    }
}

/// A stream of build deliveries.
#[async_trait]
pub trait Consumer: Send + fmt::Debug {
    /// The next delivery; waits while none is ready or while `prefetch` are unacked.
    /// Reconnects by itself; `None` only once the bus is shut down for good.
    async fn next(&mut self) -> Option<Delivery>;
}

/// A stream of events.
#[async_trait]
pub trait Subscription: Send + fmt::Debug {
    /// The next notice; `None` once the bus is shut down for good.
    async fn next(&mut self) -> Option<Notice>;
}

/// How an implementation settles a delivery.
#[async_trait]
pub trait Acker: Send + Sync + fmt::Debug {
    /// Done with it; remove it from the queue.
    async fn ack(self: Box<Self>) -> Result<(), BusError>;
    /// Give it up: back to the queue when `requeue`, else to the dead-letter queue.
    async fn reject(self: Box<Self>, requeue: bool, reason: &str) -> Result<(), BusError>;
    /// Dropped without a decision: requeue it without waiting.
    fn release(self: Box<Self>);
}

/// One message from a build queue. See the module docs for how it must end.
#[derive(Debug)]
pub struct Delivery {
    /// The message as published.
    pub body: Bytes,
    /// The queue it came from.
    pub queue: String,
    /// Whether it was delivered before (to this or another consumer).
    pub redelivered: bool,
    acker: Option<Box<dyn Acker>>,
}

impl Delivery {
    /// For implementations.
    pub fn new(body: Bytes, queue: String, redelivered: bool, acker: Box<dyn Acker>) -> Self {
        Self {
            body,
            queue,
            redelivered,
            acker: Some(acker),
        }
    }

    /// Removes it from the queue.
    pub async fn ack(mut self) -> Result<(), BusError> {
        match self.acker.take() {
            Some(a) => a.ack().await,
            None => Ok(()),
        }
    }

    /// Sends it to the dead-letter queue, never to be redelivered on its own.
    pub async fn dead_letter(mut self, reason: &str) -> Result<(), BusError> {
        match self.acker.take() {
            Some(a) => a.reject(false, reason).await,
            None => Ok(()),
        }
    }

    /// Puts it back on its queue for another consumer.
    pub async fn requeue(mut self) -> Result<(), BusError> {
        match self.acker.take() {
            Some(a) => a.reject(true, "requeued").await,
            None => Ok(()),
        }
    }
}

impl Drop for Delivery {
    fn drop(&mut self) {
        if let Some(a) = self.acker.take() {
            a.release();
        }
    }
}

/// Most messages one in-process queue holds before publishes are refused.
pub const MEMORY_QUEUE_LIMIT: usize = 100_000;
/// Dead letters the in-process bus keeps (oldest dropped first).
pub const MEMORY_DEAD_LETTER_LIMIT: usize = 1_000;
/// Events buffered per subscriber before it is told it lagged.
pub const EVENT_BUFFER: usize = 4_096;

#[derive(Debug)]
struct Message {
    body: Bytes,
    redelivered: bool,
}

#[derive(Debug)]
struct Inner {
    queues: Mutex<HashMap<String, VecDeque<Message>>>,
    ready: Notify,
    events: broadcast::Sender<Event>,
    dead: Mutex<VecDeque<DeadLetter>>,
    /// Consumers attached per queue.
    consumers: Mutex<HashMap<String, u64>>,
}

impl Inner {
    fn queues(&self) -> std::sync::MutexGuard<'_, HashMap<String, VecDeque<Message>>> {
        // A panic while holding the lock leaves plain data behind; keep using it.
        self.queues.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn push(&self, queue: &str, message: Message, front: bool) -> Result<(), BusError> {
        {
            let mut queues = self.queues();
            let q = queues.entry(queue.to_string()).or_default();
            if q.len() >= MEMORY_QUEUE_LIMIT && !front {
                return Err(BusError::Rejected(
                    format!("queue {queue} holds {MEMORY_QUEUE_LIMIT} messages").into(),
                ));
            }
            if front {
                q.push_front(message);
            } else {
                q.push_back(message);
            }
        }
        self.ready.notify_waiters();
        Ok(())
    }

    fn pop(&self, queues: &[String], start: usize) -> Option<(String, Message)> {
        let mut all = self.queues();
        (0..queues.len()).find_map(|i| {
            let name = &queues[(start + i) % queues.len()];
            all.get_mut(name)?.pop_front().map(|m| (name.clone(), m))
        })
    }

    fn dead_letter(&self, letter: DeadLetter) {
        let mut dead = self.dead.lock().unwrap_or_else(PoisonError::into_inner);
        if dead.len() >= MEMORY_DEAD_LETTER_LIMIT {
            dead.pop_front();
        }
        dead.push_back(letter);
    }
}

/// The embedded bus: bounded in-process queues with AMQP's delivery semantics, and a
/// broadcast channel for events. Used when `[bus]` names no broker.
#[derive(Debug, Clone)]
pub struct MemoryBus {
    inner: Arc<Inner>,
}

impl Default for MemoryBus {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryBus {
    /// An empty bus.
    pub fn new() -> Self {
        Self {
            inner: Arc::new(Inner {
                queues: Mutex::new(HashMap::new()),
                ready: Notify::new(),
                events: broadcast::channel(EVENT_BUFFER).0,
                dead: Mutex::new(VecDeque::new()),
                consumers: Mutex::new(HashMap::new()),
            }),
        }
    }

    /// Messages waiting (not delivered) on `queue`.
    pub fn depth(&self, queue: &str) -> usize {
        self.inner.queues().get(queue).map_or(0, VecDeque::len)
    }

    /// The dead letters kept, oldest first.
    pub fn dead_letters(&self) -> Vec<DeadLetter> {
        let dead = self
            .inner
            .dead
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        dead.iter().cloned().collect()
    }

    /// Publishes raw bytes, as another program could; for tests of undecodable input.
    pub fn publish_raw(&self, queue: &str, body: Bytes) -> Result<(), BusError> {
        self.inner.push(
            queue,
            Message {
                body,
                redelivered: false,
            },
            false,
        )
    }
}

#[async_trait]
impl Bus for MemoryBus {
    async fn publish_build(&self, queue: &str, request: &BuildRequest) -> Result<(), BusError> {
        self.publish_raw(queue, Bytes::from(request.encode()))
    }

    async fn publish_retry(
        &self,
        queue: &str,
        request: &BuildRequest,
        delay: Duration,
    ) -> Result<(), BusError> {
        let inner = self.inner.clone();
        let queue = queue.to_string();
        let body = Bytes::from(request.encode());
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            let message = Message {
                body: body.clone(),
                redelivered: false,
            };
            if let Err(e) = inner.push(&queue, message, false) {
                inner.dead_letter(DeadLetter {
                    queue,
                    body,
                    reason: e.to_string(),
                    at_ms: crate::time::now_ms(),
                });
            }
        });
        Ok(())
    }

    async fn consume(
        &self,
        queues: &[String],
        background: &[String],
        prefetch: u16,
    ) -> Result<Box<dyn Consumer>, BusError> {
        {
            let mut consumers = self
                .inner
                .consumers
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            for q in queues.iter().chain(background) {
                *consumers.entry(q.clone()).or_default() += 1;
            }
        }
        Ok(Box::new(MemoryConsumer {
            inner: self.inner.clone(),
            classes: [queues.to_vec(), background.to_vec()],
            permits: Arc::new(Semaphore::new(usize::from(prefetch.max(1)))),
            turn: 0,
            turns: Turns::default(),
        }))
    }

    async fn publish_event(&self, event: &Event) -> Result<(), BusError> {
        // No subscriber is not an error: nobody has anything cached to drop.
        let _ = self.inner.events.send(event.clone());
        Ok(())
    }

    async fn subscribe(&self) -> Result<Box<dyn Subscription>, BusError> {
        Ok(Box::new(MemorySubscription {
            events: self.inner.events.subscribe(),
        }))
    }

    async fn ping(&self) -> Result<(), BusError> {
        Ok(())
    }

    async fn queue_stats(&self, queue: &str) -> Result<QueueStats, BusError> {
        let consumers = self
            .inner
            .consumers
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        Ok(QueueStats {
            messages: self.depth(queue) as u64,
            consumers: consumers.get(queue).copied().unwrap_or(0),
        })
    }

    async fn dead_letters(&self, limit: usize) -> Result<Vec<DeadLetter>, BusError> {
        let dead = self
            .inner
            .dead
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        Ok(dead.iter().take(limit).cloned().collect())
    }

    async fn settle_dead_letters(
        &self,
        pick: DeadPick<'_>,
        action: DeadAction,
        scan: usize,
    ) -> Result<usize, BusError> {
        let taken: Vec<DeadLetter> = {
            let mut dead = self
                .inner
                .dead
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            let mut taken = Vec::new();
            let mut kept = VecDeque::with_capacity(dead.len());
            for (i, letter) in dead.drain(..).enumerate() {
                let retriable = action == DeadAction::Discard || !letter.queue.is_empty();
                if i < scan && retriable && pick(&letter) {
                    taken.push(letter);
                } else {
                    kept.push_back(letter);
                }
            }
            *dead = kept;
            taken
        };
        let moved = taken.len();
        if action == DeadAction::Retry {
            for letter in taken {
                let message = Message {
                    body: letter.body,
                    redelivered: false,
                };
                self.inner.push(&letter.queue, message, false)?;
            }
        }
        Ok(moved)
    }
}

#[derive(Debug)]
struct MemoryConsumer {
    inner: Arc<Inner>,
    /// Waited queues, then background ones.
    classes: [Vec<String>; 2],
    permits: Arc<Semaphore>,
    /// Which queue of a class is looked at first (round robin).
    turn: usize,
    turns: Turns,
}

impl Drop for MemoryConsumer {
    fn drop(&mut self) {
        let mut consumers = self
            .inner
            .consumers
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        for q in self.classes.iter().flatten() {
            if let Some(n) = consumers.get_mut(q) {
                *n = n.saturating_sub(1);
            }
        }
    }
}

#[async_trait]
impl Consumer for MemoryConsumer {
    async fn next(&mut self) -> Option<Delivery> {
        if self.classes.iter().all(Vec::is_empty) {
            return None;
        }
        let permit = self.permits.clone().acquire_owned().await.ok()?;
        loop {
            // Register interest before looking, so a push between the look and the wait
            // still wakes us.
            let notified = self.inner.ready.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            self.turn = self.turn.wrapping_add(1);
            let order = if self.turns.background_first() {
                [1, 0]
            } else {
                [0, 1]
            };
            if let Some((class, (queue, m))) = order.into_iter().find_map(|class| {
                let found = self.inner.pop(&self.classes[class], self.turn)?;
                Some((class, found))
            }) {
                self.turns.took(class == 1);
                let acker = MemoryAcker {
                    inner: self.inner.clone(),
                    queue: queue.clone(),
                    body: m.body.clone(),
                    _permit: permit,
                };
                return Some(Delivery::new(m.body, queue, m.redelivered, Box::new(acker)));
            }
            notified.await;
        }
    }
}

#[derive(Debug)]
struct MemoryAcker {
    inner: Arc<Inner>,
    queue: String,
    body: Bytes,
    /// Holds one of the consumer's prefetch slots until settled.
    _permit: OwnedSemaphorePermit,
}

impl MemoryAcker {
    fn requeue(self) {
        let message = Message {
            body: self.body,
            redelivered: true,
        };
        // Requeues go to the front and are never refused, as in AMQP.
        let _ = self.inner.push(&self.queue, message, true);
    }
}

#[async_trait]
impl Acker for MemoryAcker {
    async fn ack(self: Box<Self>) -> Result<(), BusError> {
        Ok(())
    }

    async fn reject(self: Box<Self>, requeue: bool, reason: &str) -> Result<(), BusError> {
        if requeue {
            self.requeue();
        } else {
            self.inner.dead_letter(DeadLetter {
                queue: self.queue.clone(),
                body: self.body.clone(),
                reason: reason.to_string(),
                at_ms: crate::time::now_ms(),
            });
        }
        Ok(())
    }

    fn release(self: Box<Self>) {
        self.requeue();
    }
}

#[derive(Debug)]
struct MemorySubscription {
    events: broadcast::Receiver<Event>,
}

#[async_trait]
impl Subscription for MemorySubscription {
    async fn next(&mut self) -> Option<Notice> {
        match self.events.recv().await {
            Ok(e) => Some(Notice::Event(e)),
            Err(broadcast::error::RecvError::Lagged(_)) => Some(Notice::Lagged),
            Err(broadcast::error::RecvError::Closed) => None,
        }
    }
}

/// A shared handle, as the gateway and workers hold it.
pub type SharedBus = Arc<dyn Bus>;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::key::Identity;

    fn request(id: &str) -> BuildRequest {
        BuildRequest {
            v: 1,
            id: id.into(),
            key: "k".into(),
            identity: Identity {
                route: "r".into(),
                params: vec![],
                vary: vec![],
            },
            generation: 0,
            attempt: 1,
            requested_at: 0,
            lease_deadline: 0,
            trace_id: String::new(),
            traceparent: None,
        }
    }

    fn queues() -> Vec<String> {
        vec!["q".to_string()]
    }

    async fn next_id(c: &mut Box<dyn Consumer>) -> (String, Delivery) {
        let d = tokio::time::timeout(Duration::from_secs(5), c.next())
            .await
            .expect("a delivery within 5 s")
            .expect("bus open");
        (BuildRequest::decode(&d.body).unwrap().id, d)
    }

    #[tokio::test]
    async fn acked_messages_are_gone_dropped_ones_come_back() {
        let bus = MemoryBus::new();
        bus.publish_build("q", &request("a")).await.unwrap();
        bus.publish_build("q", &request("b")).await.unwrap();
        let mut c = bus.consume(&queues(), &[], 10).await.unwrap();
        let (id, d) = next_id(&mut c).await;
        assert_eq!(id, "a");
        d.ack().await.unwrap();
        let (id, d) = next_id(&mut c).await;
        assert_eq!(id, "b");
        assert!(!d.redelivered);
        drop(d); // as if the build task panicked
        let (id, d) = next_id(&mut c).await;
        assert_eq!(id, "b");
        assert!(d.redelivered);
        d.ack().await.unwrap();
        assert_eq!(bus.depth("q"), 0);
    }

    #[tokio::test]
    async fn prefetch_bounds_unacked_deliveries() {
        let bus = MemoryBus::new();
        for i in 0..3 {
            bus.publish_build("q", &request(&i.to_string()))
                .await
                .unwrap();
        }
        let mut c = bus.consume(&queues(), &[], 2).await.unwrap();
        let (_, d1) = next_id(&mut c).await;
        let (_, _d2) = next_id(&mut c).await;
        assert!(
            tokio::time::timeout(Duration::from_millis(50), c.next())
                .await
                .is_err(),
            "a third delivery while two are unacked"
        );
        d1.ack().await.unwrap();
        let (id, _) = next_id(&mut c).await;
        assert_eq!(id, "2");
    }

    #[tokio::test]
    async fn dead_letters_are_kept_not_redelivered() {
        let bus = MemoryBus::new();
        bus.publish_raw("q", Bytes::from_static(b"garbage"))
            .unwrap();
        let mut c = bus.consume(&queues(), &[], 1).await.unwrap();
        let d = c.next().await.unwrap();
        d.dead_letter("undecodable").await.unwrap();
        assert!(
            tokio::time::timeout(Duration::from_millis(50), c.next())
                .await
                .is_err()
        );
        let dead = bus.dead_letters();
        assert_eq!(dead.len(), 1);
        assert_eq!(dead[0].reason, "undecodable");
        assert_eq!(dead[0].body, Bytes::from_static(b"garbage"));
    }

    #[tokio::test]
    async fn stats_and_dead_letter_requeue() {
        let bus = MemoryBus::new();
        bus.publish_build("q", &request("a")).await.unwrap();
        let c = bus.consume(&queues(), &[], 1).await.unwrap();
        assert_eq!(
            Bus::queue_stats(&bus, "q").await.unwrap(),
            QueueStats {
                messages: 1,
                consumers: 1
            }
        );
        drop(c);
        assert_eq!(Bus::queue_stats(&bus, "q").await.unwrap().consumers, 0);
        let mut c = bus.consume(&queues(), &[], 1).await.unwrap();
        c.next().await.unwrap().dead_letter("boom").await.unwrap();
        assert_eq!(Bus::dead_letters(&bus, 10).await.unwrap().len(), 1);
        assert_eq!(bus.requeue_dead_letters(10).await.unwrap(), 1);
        assert!(Bus::dead_letters(&bus, 10).await.unwrap().is_empty());
        let (id, _) = next_id(&mut c).await;
        assert_eq!(id, "a", "back on its queue");
    }

    #[tokio::test]
    async fn retries_arrive_after_their_delay() {
        tokio::time::pause();
        let bus = MemoryBus::new();
        bus.publish_retry("q", &request("r"), Duration::from_secs(4))
            .await
            .unwrap();
        let mut c = bus.consume(&queues(), &[], 1).await.unwrap();
        let start = tokio::time::Instant::now();
        let (id, _) = next_id(&mut c).await;
        assert_eq!(id, "r");
        assert!(start.elapsed() >= Duration::from_secs(4));
    }

    #[tokio::test]
    async fn consumer_wakes_on_publish_and_reads_several_queues() {
        let bus = MemoryBus::new();
        let mut c = bus
            .consume(&["q".to_string(), "slow".to_string()], &[], 4)
            .await
            .unwrap();
        let waiter = tokio::spawn(async move {
            let d = c.next().await.unwrap();
            d.queue.clone()
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        bus.publish_build("slow", &request("s")).await.unwrap();
        assert_eq!(waiter.await.unwrap(), "slow");
    }

    #[tokio::test]
    async fn events_fan_out_and_lag_is_reported() {
        let bus = MemoryBus::new();
        let mut a = bus.subscribe().await.unwrap();
        let mut b = bus.subscribe().await.unwrap();
        let e = Event::Built {
            key: "k".into(),
            etag: "e".into(),
            build_ms: None,
        };
        bus.publish_event(&e).await.unwrap();
        assert_eq!(a.next().await, Some(Notice::Event(e.clone())));
        assert_eq!(b.next().await, Some(Notice::Event(e.clone())));
        for _ in 0..EVENT_BUFFER + 1 {
            bus.publish_event(&e).await.unwrap();
        }
        assert_eq!(a.next().await, Some(Notice::Lagged));
    }

    #[test]
    fn bus_errors_keep_their_cause_and_say_whether_to_retry() {
        use std::error::Error;

        let io = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        let down = BusError::Unavailable(Cause::context("connect", io));
        assert_eq!(down.to_string(), "bus unavailable: connect: refused");
        assert!(down.is_retryable());
        let cause = down.source().expect("the cause is the source");
        assert_eq!(cause.to_string(), "connect: refused");
        assert_eq!(cause.source().unwrap().to_string(), "refused");
        let BusError::Unavailable(cause) = &down else {
            unreachable!()
        };
        let io = cause.downcast_ref::<std::io::Error>().unwrap();
        assert_eq!(io.kind(), std::io::ErrorKind::ConnectionRefused);

        let refused = BusError::Rejected("negative confirm".into());
        assert_eq!(
            refused.to_string(),
            "bus refused the message: negative confirm"
        );
        assert!(!refused.is_retryable());
    }

    #[test]
    fn a_full_queue_refuses_the_message() {
        let bus = MemoryBus::new();
        for _ in 0..MEMORY_QUEUE_LIMIT {
            bus.publish_raw("full", Bytes::from_static(b"{}")).unwrap();
        }
        let e = bus
            .publish_raw("full", Bytes::from_static(b"{}"))
            .unwrap_err();
        assert!(matches!(e, BusError::Rejected(_)), "{e:?}");
        assert!(!e.is_retryable());
        assert_eq!(
            e.to_string(),
            format!("bus refused the message: queue full holds {MEMORY_QUEUE_LIMIT} messages")
        );
    }
}
