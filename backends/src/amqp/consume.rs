//! Taking messages off the broker: build consumers on both classes of queues (each
//! delivery with its acker, which dead-letters with the reason kept), the events
//! subscription, and dead letters read back for operators. Consumers and subscriptions
//! reconnect by themselves after a [`Backoff`].
//!
//! # One copy of a message at a time
//! A consumer hands on at most one delivery of the same message (the same bytes) at a
//! time; a copy that arrives while another is in hand waits, outside the worker, until
//! that one is settled (acknowledged, rejected or released), and is handed on then. Two
//! copies of one build request meet in one consumer in two ways, both around a lost
//! connection: the broker redelivers what was in hand on the lost connection (which can no
//! longer be acknowledged) while it is still being built, and a publish whose confirm was
//! lost is sent again although the broker had taken it. Handed on together, both copies
//! pass the lease's claim (same request, same holder) and the fragment is built twice;
//! handed on after the first is settled, the copy finds it built and is dropped. Copies
//! that reach two different consumers are not held back: the lease and idempotent builds
//! are what bound those.

use std::collections::hash_map::Entry;
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, PoisonError, Weak};

use bytes::Bytes;
use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicGetOptions, BasicQosOptions, QueueBindOptions,
    QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString};
use tokio::sync::mpsc;

use async_trait::async_trait;
use tessera_protocol::bus::{
    Acker, BusError, Consumer, DeadAction, DeadLetter, DeadPick, Delivery, Notice, Subscription,
    Turns,
};
use tessera_protocol::message::Event;

use super::publish::{persistent, unroutable};
use super::settle::Settler;
use super::{AmqpBus, Backoff, EVENT_BUFFER, OP_TIMEOUT, close, short, timed, unavailable};

impl AmqpBus {
    /// Reads up to `scan` dead letters, and settles those `act` picks as it says (a retry
    /// publishes the letter back to its queue first); everything else read is returned to
    /// the dead-letter queue, in order, when the channel closes. Returns the letters read
    /// and how many were settled.
    pub(super) async fn take_dead_letters(
        &self,
        scan: usize,
        act: Option<(DeadPick<'_>, DeadAction)>,
    ) -> Result<(Vec<DeadLetter>, usize), BusError> {
        let link = self.link().await?;
        let channel = timed("open channel", link.conn.create_channel()).await?;
        let mut letters = Vec::new();
        let mut held = Vec::new();
        let mut settled = 0;
        while letters.len() < scan {
            let Some(msg) = timed(
                "read dead letter",
                channel.basic_get(short(&self.exchange("dead")), BasicGetOptions::default()),
            )
            .await?
            else {
                break;
            };
            let letter = letter_of(&msg.delivery);
            let action = act.and_then(|(pick, action)| {
                let retriable = action == DeadAction::Discard || !letter.queue.is_empty();
                (retriable && pick(&letter)).then_some(action)
            });
            match action {
                Some(action) => {
                    if action == DeadAction::Retry {
                        self.publish_to_queue(&letter.queue, &letter.body, persistent())
                            .await?;
                    }
                    timed(
                        "ack dead letter",
                        msg.delivery.acker.ack(BasicAckOptions::default()),
                    )
                    .await?;
                    settled += 1;
                }
                None => held.push(msg.delivery.acker.clone()),
            }
            letters.push(letter);
        }
        // Closing the channel returns everything read but not acknowledged, in order.
        drop(held);
        close(&channel).await;
        Ok((letters, settled))
    }
}

/// A dead letter as read back: its body and the headers `reject` gave it.
fn letter_of(delivery: &lapin::message::Delivery) -> DeadLetter {
    let header = |name: &str| {
        delivery
            .properties
            .headers()
            .as_ref()
            .and_then(|h| h.inner().get(name))
            .map(|v| match v {
                AMQPValue::LongString(s) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
                other => format!("{other:?}"),
            })
    };
    DeadLetter {
        queue: header("x-tessera-queue").unwrap_or_default(),
        body: Bytes::from(delivery.data.clone()),
        reason: header("x-tessera-error").unwrap_or_else(|| "rejected".into()),
        at_ms: header("x-tessera-time")
            .and_then(|t| t.parse().ok())
            .unwrap_or(0),
    }
}

/// A consumer's deliveries handed on and not settled yet, by message, each with the copies
/// of it that arrived meanwhile (see the module docs), and where each class's deliveries
/// go. Kept across reconnections: a copy redelivered on a new connection waits for the
/// delivery still in hand from the old one.
struct InHand {
    copies: Mutex<HashMap<Bytes, VecDeque<(usize, Delivery)>>>,
    /// Deliveries of waited builds, then of background ones.
    txs: [mpsc::Sender<Delivery>; 2],
    /// The settles of the channel consuming now, flushed when the consumer goes.
    settler: Mutex<Weak<Settler>>,
}

impl std::fmt::Debug for InHand {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InHand").finish_non_exhaustive()
    }
}

/// The worker's side of the consumer is gone.
struct Closed;

impl InHand {
    fn copies(&self) -> std::sync::MutexGuard<'_, HashMap<Bytes, VecDeque<(usize, Delivery)>>> {
        self.copies.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Hands `delivery` (of `class`) on, unless a copy of it is in hand: then it waits
    /// for that one to be settled.
    async fn arrive(&self, class: usize, delivery: Delivery) -> Result<(), Closed> {
        match self.copies().entry(delivery.body.clone()) {
            Entry::Occupied(mut waiting) => {
                tracing::debug!(
                    redelivered = delivery.redelivered,
                    "a copy of a delivery in hand waits for it"
                );
                waiting.get_mut().push_back((class, delivery));
                return Ok(());
            }
            Entry::Vacant(none) => {
                none.insert(VecDeque::new());
            }
        }
        self.txs[class].send(delivery).await.map_err(|_| Closed)
    }

    /// The delivery of `body` in hand was settled: hands on the next copy, if any.
    fn settled(&self, body: &Bytes) {
        let (class, next) = {
            let mut copies = self.copies();
            let Some(waiting) = copies.get_mut(body) else {
                return;
            };
            match waiting.pop_front() {
                Some(next) => next,
                None => {
                    copies.remove(body);
                    return;
                }
            }
        };
        // Outside the lock: a delivery that cannot be handed on is released when dropped,
        // which settles it in turn.
        let tx = self.txs[class].clone();
        if let Err(mpsc::error::TrySendError::Full(next)) = tx.try_send(next)
            && let Ok(handle) = tokio::runtime::Handle::try_current()
        {
            handle.spawn(async move {
                let _ = tx.send(next).await;
            });
        }
    }
}

/// Keeps a consumer on both classes of queues (waited, background) alive across
/// reconnections, feeding each class's deliveries to its sender.
async fn consume_loop(
    bus: AmqpBus,
    classes: [Vec<String>; 2],
    prefetch: u16,
    in_hand: Arc<InHand>,
) {
    let mut backoff = Backoff::default();
    loop {
        match consume_once(&bus, &classes, prefetch, &in_hand, &mut backoff).await {
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
    in_hand: &Arc<InHand>,
    backoff: &mut Backoff,
) -> Result<(), BusError> {
    let link = bus.link().await?;
    let channel = timed("open channel", link.conn.create_channel()).await?;
    let settler = Arc::new(Settler::new(
        channel.clone(),
        Settler::hold(usize::from(prefetch)),
    ));
    *in_hand
        .settler
        .lock()
        .unwrap_or_else(PoisonError::into_inner) = Arc::downgrade(&settler);
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
        let body = Bytes::from(d.data);
        let acker = AmqpAcker {
            bus: bus.clone(),
            settler: settler.clone(),
            tag: d.delivery_tag,
            queue: queue.clone(),
            body: body.clone(),
            settled: false,
            in_hand: Arc::downgrade(in_hand),
        };
        let delivery = Delivery::new(body, queue, d.redelivered, Box::new(acker));
        if in_hand.arrive(class, delivery).await.is_err() {
            return Ok(());
        }
    }
    Err(unavailable("consumer stream ended"))
}

#[derive(Debug)]
pub(super) struct AmqpConsumer {
    /// Deliveries of waited builds, then of background ones.
    rx: [mpsc::Receiver<Delivery>; 2],
    turns: Turns,
    in_hand: Arc<InHand>,
    _task: tokio_util::task::AbortOnDropHandle<()>,
}

impl Drop for AmqpConsumer {
    /// Acks held for a delivery below them go out one by one before the channel goes,
    /// so that builds done are not handed out again.
    fn drop(&mut self) {
        let settler = self
            .in_hand
            .settler
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .upgrade();
        if let Some(settler) = settler {
            settler.flush();
        }
    }
}

impl AmqpConsumer {
    /// Consumes `queues` (waited builds) and `background` in a task of its own.
    pub(super) fn start(
        bus: AmqpBus,
        queues: &[String],
        background: &[String],
        prefetch: u16,
    ) -> Self {
        let prefetch = prefetch.max(1);
        // Room for every delivery the broker may hand out unacknowledged (`prefetch` per
        // queue), so feeding one class never waits on the other being taken.
        let room = |qs: &[String]| usize::from(prefetch) * qs.len().max(1);
        let (waited_tx, waited) = mpsc::channel(room(queues));
        let (background_tx, background_rx) = mpsc::channel(room(background));
        let in_hand = Arc::new(InHand {
            copies: Mutex::new(HashMap::new()),
            txs: [waited_tx, background_tx],
            settler: Mutex::new(Weak::new()),
        });
        let task = tokio::spawn(consume_loop(
            bus,
            [queues.to_vec(), background.to_vec()],
            prefetch,
            in_hand.clone(),
        ));
        Self {
            rx: [waited, background_rx],
            turns: Turns::default(),
            in_hand,
            _task: tokio_util::task::AbortOnDropHandle::new(task),
        }
    }
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
    /// Its channel's settles: acks may go out several to a frame (see `settle`).
    settler: Arc<Settler>,
    /// Its delivery tag on that channel.
    tag: u64,
    queue: String,
    body: Bytes,
    settled: bool,
    /// Its consumer's deliveries in hand: told when this one is done with (dropped,
    /// once settled), so a copy waiting for it goes on. Weak: the copies waiting there
    /// hold ackers too, and go (released) with the consumer.
    in_hand: Weak<InHand>,
}

impl Drop for AmqpAcker {
    fn drop(&mut self) {
        if let Some(in_hand) = self.in_hand.upgrade() {
            in_hand.settled(&self.body);
        }
    }
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
        self.settler.ack(self.tag).await
    }

    async fn reject(mut self: Box<Self>, requeue: bool, reason: &str) -> Result<(), BusError> {
        self.settled = true;
        if requeue {
            return self.settler.nack(self.tag, true).await;
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
        headers.insert(
            short("x-tessera-time"),
            AMQPValue::LongString(LongString::from(
                tessera_protocol::time::now_ms().to_string(),
            )),
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
            Ok(()) => self.settler.ack(self.tag).await,
            Err(e) => {
                tracing::warn!(error = %e, "could not publish the dead letter with its reason; rejecting");
                self.settler.nack(self.tag, false).await
            }
        }
    }

    fn release(mut self: Box<Self>) {
        if self.settled {
            return;
        }
        self.settled = true;
        // Dropped mid-build: hand it back now rather than when the channel closes.
        self.settler.nack_now(self.tag);
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
pub(super) struct AmqpSubscription {
    rx: mpsc::Receiver<Notice>,
    _task: tokio_util::task::AbortOnDropHandle<()>,
}

impl AmqpSubscription {
    /// Follows the events exchange in a task of its own.
    pub(super) async fn start(bus: AmqpBus) -> Self {
        let (tx, rx) = mpsc::channel(EVENT_BUFFER);
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(subscribe_loop(bus, tx, ready_tx));
        // Wait (bounded) for the first subscription, so events published after
        // `subscribe` returns are seen; a broker that is down is not fatal.
        let _ = tokio::time::timeout(OP_TIMEOUT, ready_rx).await;
        Self {
            rx,
            _task: tokio_util::task::AbortOnDropHandle::new(task),
        }
    }
}

#[async_trait]
impl Subscription for AmqpSubscription {
    async fn next(&mut self) -> Option<Notice> {
        self.rx.recv().await
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use tessera_protocol::Bus;

    async fn next(consumer: &mut Box<dyn Consumer>) -> Option<Delivery> {
        tokio::time::timeout(Duration::from_secs(10), consumer.next())
            .await
            .ok()
            .flatten()
    }

    /// Acks sent several to a frame cover only what was settled: after the connection
    /// closes, the deliveries acknowledged (two, by one `multiple` ack) do not come back,
    /// the one still in hand does, and so does one acknowledged above it (held for it,
    /// never sent).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn only_a_contiguous_settled_prefix_is_acknowledged() {
        let url = "amqp://guest:guest@127.0.0.1:5672/%2f";
        let ns = format!("settled-prefix-{}", std::process::id());
        let bus = AmqpBus::with_queue_expiry(url, &ns, Some(Duration::from_secs(60)));
        let queue = format!("{ns}.build");
        for body in ["m1", "m2", "m3", "m4"] {
            bus.publish_raw(&queue, body.as_bytes())
                .await
                .expect("publish (is RabbitMQ running on 127.0.0.1:5672?)");
        }
        let mut consumer = bus
            .consume(std::slice::from_ref(&queue), &[], 10)
            .await
            .unwrap();
        let mut taken = Vec::new();
        for _ in 0..4 {
            taken.push(next(&mut consumer).await.expect("a delivery"));
        }
        let bodies: Vec<&[u8]> = taken.iter().map(|d| &d.body[..]).collect();
        assert_eq!(bodies, [&b"m1"[..], b"m2", b"m3", b"m4"]);
        let [m1, m2, m3, m4] = <[Delivery; 4]>::try_from(taken).unwrap();
        m2.ack().await.unwrap(); // held: m1 is in hand
        m1.ack().await.unwrap(); // one ack, multiple, for m1 and m2
        m4.ack().await.unwrap(); // held: m3 is in hand
        // A reconnection is attempted at most once per RECONNECT_MIN.
        tokio::time::sleep(crate::amqp::RECONNECT_MIN).await;
        let link = bus.live_link().expect("connected");
        let _ = link.conn.close(320, short("closed by the test")).await;
        drop(m3); // its requeue fails with the channel: the broker requeues it
        bus.publish_raw(&queue, b"m5")
            .await
            .expect("publish on a new connection");
        // Requeued messages keep their place, ahead of m5: whatever comes back does so
        // before it.
        let mut back = Vec::new();
        loop {
            let d = next(&mut consumer).await.expect("redeliveries, then m5");
            let body = String::from_utf8_lossy(&d.body).into_owned();
            d.ack().await.unwrap();
            if body == "m5" {
                break;
            }
            back.push(body);
        }
        assert_eq!(back, ["m3", "m4"], "acknowledged: m1, m2; not sent: m4");
    }

    /// Two copies of one message (a publish sent again after its confirm was lost) are
    /// not handed on together: the second waits until the first is settled.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_copy_of_a_delivery_in_hand_waits_until_it_is_settled() {
        let url = "amqp://guest:guest@127.0.0.1:5672/%2f";
        let ns = format!("copies-wait-{}", std::process::id());
        let bus = AmqpBus::with_queue_expiry(url, &ns, Some(Duration::from_secs(60)));
        let queue = format!("{ns}.build");
        for body in ["same", "other", "same"] {
            bus.publish_raw(&queue, body.as_bytes())
                .await
                .expect("publish (is RabbitMQ running on 127.0.0.1:5672?)");
        }
        let mut consumer = bus.consume(&[queue], &[], 10).await.unwrap();
        let first = next(&mut consumer).await.expect("the first copy");
        let other = next(&mut consumer).await.expect("the other message");
        assert_eq!(
            (&first.body[..], &other.body[..]),
            (&b"same"[..], &b"other"[..])
        );
        assert!(
            tokio::time::timeout(Duration::from_millis(500), consumer.next())
                .await
                .is_err(),
            "the second copy waits while the first is in hand"
        );
        first.ack().await.unwrap();
        let copy = next(&mut consumer)
            .await
            .expect("the second copy, once the first is settled");
        assert_eq!(&copy.body[..], b"same");
        copy.ack().await.unwrap();
        other.ack().await.unwrap();
    }
}
