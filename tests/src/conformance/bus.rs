//! What every `Bus` promises (see `tessera_protocol::bus`), as cases run against each
//! implementation by [`bus_conformance!`](crate::bus_conformance).
//!
//! Each case gets a fresh bus in its own namespace (on RabbitMQ: its own exchanges,
//! queues and dead-letter queue, expiring when unused) and a second handle on the same
//! bus, as another process would hold it, so what one publishes the other must see.
//!
//! "Nothing arrives" is checked by waiting [`QUIET`] for a delivery that must not come:
//! such a check can miss a late wrong delivery, but never fails a correct bus.

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use lapin::options::{
    BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions, ExchangeDeleteOptions,
};
use lapin::types::{FieldTable, ShortString};
use lapin::{BasicProperties, Confirmation, ExchangeKind};
use tessera_backends::amqp::AmqpBus;
use tessera_protocol::bus::{
    Bus, BusError, Consumer, Delivery, EVENT_BUFFER, MemoryBus, Notice, QueueStats,
};
use tessera_protocol::config::QueueType;
use tessera_protocol::key::Identity;
use tessera_protocol::message::{BuildRequest, Event};

use crate::cluster::free_port;
use crate::eventually;
use crate::harness::{QUEUE_EXPIRY, amqp_addr, amqp_url, require, unique_namespace};

/// How long a check that nothing arrives waits.
pub const QUIET: Duration = Duration::from_millis(400);
/// Longest wait for something that must arrive.
pub const ARRIVES: Duration = Duration::from_secs(10);

/// One implementation under test, fresh for one case.
#[derive(Debug)]
pub struct BusUnderTest {
    /// The bus.
    pub bus: Arc<dyn Bus>,
    /// Another handle on the same bus, as another process holds it (for the in-process
    /// bus, the same one: nothing outside the process can reach it).
    pub peer: Arc<dyn Bus>,
    /// A build queue name no other case uses.
    pub queue: String,
}

impl BusUnderTest {
    /// Another build queue name of this case.
    pub fn queue(&self, suffix: &str) -> String {
        format!("{}.{suffix}", self.queue)
    }
}

/// The embedded bus.
pub fn memory() -> BusUnderTest {
    let bus = Arc::new(MemoryBus::new());
    BusUnderTest {
        peer: bus.clone(),
        bus,
        queue: format!("{}.build", unique_namespace()),
    }
}

/// RabbitMQ at `TESSERA_TEST_AMQP`, two connections on one fresh namespace.
pub fn amqp() -> BusUnderTest {
    amqp_with(QueueType::Classic)
}

/// The RabbitMQ bus with quorum queues (`bus.queue_type = "quorum"`).
pub fn amqp_quorum() -> BusUnderTest {
    amqp_with(QueueType::Quorum)
}

fn amqp_with(kind: QueueType) -> BusUnderTest {
    require("RabbitMQ", &amqp_addr());
    let ns = unique_namespace();
    let bus = || {
        Arc::new(
            AmqpBus::with_queue_expiry(&amqp_url(), &ns, Some(QUEUE_EXPIRY)).with_queue_type(kind),
        )
    };
    BusUnderTest {
        bus: bus(),
        peer: bus(),
        queue: format!("{ns}.build"),
    }
}

/// Expands one `#[tokio::test]` per bus case, each with a fresh bus from `$make`, into
/// the current module. Add a case here and as a function below.
#[macro_export]
macro_rules! bus_conformance {
    ($make:expr) => {
        $crate::bus_conformance!(
            @cases $make,
            published_builds_are_consumed_in_order,
            acked_deliveries_are_gone,
            requeued_and_dropped_deliveries_come_back_redelivered,
            acks_that_come_together_spare_the_delivery_in_their_midst,
            dead_letters_keep_their_reason_and_can_be_requeued,
            dead_letters_are_retried_or_discarded_as_picked,
            retries_arrive_on_their_queue_after_the_delay,
            prefetch_bounds_unacked_deliveries,
            one_consumer_reads_several_queues,
            waited_builds_go_first_and_background_ones_still_progress,
            events_reach_every_subscriber,
            queue_stats_count_waiting_messages_and_consumers,
            a_subscriber_that_falls_behind_is_told_it_lagged,
            ping_answers,
        );
    };
    (@cases $make:expr, $($case:ident),+ $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() {
                $crate::conformance::bus::$case($make).await;
            }
        )+
    };
}

/// A build request whose `id` tells deliveries apart.
pub fn request(id: &str) -> BuildRequest {
    BuildRequest {
        v: 1,
        id: id.into(),
        key: format!("k-{id}"),
        identity: Identity {
            route: "r".into(),
            params: vec![("p".into(), id.into())],
            vary: vec![],
        },
        generation: 7,
        attempt: 1,
        requested_at: 0,
        lease_deadline: 0,
        trace_id: String::new(),
        traceparent: None,
    }
}

/// The next delivery, within [`ARRIVES`].
pub async fn next(consumer: &mut Box<dyn Consumer>) -> Delivery {
    tokio::time::timeout(ARRIVES, consumer.next())
        .await
        .unwrap_or_else(|_| panic!("no delivery within {ARRIVES:?}"))
        .expect("the bus is open")
}

/// The id of a delivery's request.
pub fn id(d: &Delivery) -> String {
    BuildRequest::decode(&d.body).expect("a build request").id
}

/// Panics if a delivery arrives within [`QUIET`].
pub async fn nothing_arrives(consumer: &mut Box<dyn Consumer>, why: &str) {
    if let Ok(d) = tokio::time::timeout(QUIET, consumer.next()).await {
        panic!("{why}, but got {:?}", d.as_ref().map(id));
    }
}

fn built(n: usize) -> Event {
    Event::Built {
        key: format!("key-{n}"),
        etag: format!("etag-{n}"),
        build_ms: Some(n as u64),
    }
}

/// What one handle publishes, a consumer on another receives: the same bytes, from the
/// queue it was published to, in publish order, not marked redelivered.
pub async fn published_builds_are_consumed_in_order(t: BusUnderTest) {
    let (a, b) = (request("a"), request("b"));
    t.bus.publish_build(&t.queue, &a).await.unwrap();
    t.bus.publish_build(&t.queue, &b).await.unwrap();
    let mut c = t
        .peer
        .consume(std::slice::from_ref(&t.queue), &[], 10)
        .await
        .unwrap();
    for want in [&a, &b] {
        let d = next(&mut c).await;
        assert_eq!(BuildRequest::decode(&d.body).unwrap(), *want);
        assert_eq!(
            d.body.as_ref(),
            want.encode().as_slice(),
            "bytes as published"
        );
        assert_eq!(d.queue, t.queue);
        assert!(!d.redelivered);
        d.ack().await.unwrap();
    }
}

/// An acknowledged delivery is never delivered again, to this consumer or a new one.
pub async fn acked_deliveries_are_gone(t: BusUnderTest) {
    t.bus.publish_build(&t.queue, &request("a")).await.unwrap();
    let mut c = t
        .bus
        .consume(std::slice::from_ref(&t.queue), &[], 4)
        .await
        .unwrap();
    next(&mut c).await.ack().await.unwrap();
    drop(c);
    let mut c = t
        .peer
        .consume(std::slice::from_ref(&t.queue), &[], 4)
        .await
        .unwrap();
    nothing_arrives(&mut c, "an acked message came back").await;
}

/// `requeue` and dropping a delivery undecided both put it back, marked redelivered.
pub async fn requeued_and_dropped_deliveries_come_back_redelivered(t: BusUnderTest) {
    t.bus.publish_build(&t.queue, &request("a")).await.unwrap();
    let mut c = t
        .bus
        .consume(std::slice::from_ref(&t.queue), &[], 1)
        .await
        .unwrap();
    let d = next(&mut c).await;
    assert!(!d.redelivered);
    d.requeue().await.unwrap();

    let d = next(&mut c).await;
    assert_eq!(id(&d), "a");
    assert!(d.redelivered, "requeued");
    drop(d); // as when a build task panics or is cancelled

    let d = next(&mut c).await;
    assert_eq!(id(&d), "a");
    assert!(d.redelivered, "dropped undecided");
    d.ack().await.unwrap();
    nothing_arrives(&mut c, "acked after two redeliveries, yet delivered again").await;
}

/// Acks that come together (a worker finishing many builds at once) remove exactly the
/// deliveries acked: one in their midst that is requeued instead comes back, once, and
/// nothing acked does, to this consumer or a new one. (A guard for any ack batching: a
/// `multiple` ack that covered a delivery still in hand would lose it.)
pub async fn acks_that_come_together_spare_the_delivery_in_their_midst(t: BusUnderTest) {
    for i in 0..24 {
        let r = request(&format!("m{i}"));
        t.bus.publish_build(&t.queue, &r).await.unwrap();
    }
    let mut c = t
        .bus
        .consume(std::slice::from_ref(&t.queue), &[], 32)
        .await
        .unwrap();
    let (mut held, mut acks) = (None, Vec::new());
    for _ in 0..24 {
        let d = next(&mut c).await;
        if id(&d) == "m5" {
            held = Some(d);
        } else {
            acks.push(tokio::spawn(d.ack()));
        }
    }
    for ack in acks {
        ack.await.unwrap().unwrap();
    }
    held.expect("m5 was delivered").requeue().await.unwrap();
    let d = next(&mut c).await;
    assert_eq!(id(&d), "m5", "only the requeued delivery comes back");
    assert!(d.redelivered);
    d.ack().await.unwrap();
    nothing_arrives(&mut c, "acked deliveries came back").await;
    drop(c);
    let mut c = t
        .peer
        .consume(std::slice::from_ref(&t.queue), &[], 32)
        .await
        .unwrap();
    nothing_arrives(&mut c, "an acked delivery came back to a new consumer").await;
}

/// A dead-lettered delivery is not redelivered; it is kept with its queue, body and
/// reason, listed oldest first without being removed, and put back on its queue by
/// `requeue_dead_letters`.
pub async fn dead_letters_keep_their_reason_and_can_be_requeued(t: BusUnderTest) {
    for i in 0..3 {
        t.bus
            .publish_build(&t.queue, &request(&format!("d{i}")))
            .await
            .unwrap();
    }
    let mut c = t
        .bus
        .consume(std::slice::from_ref(&t.queue), &[], 4)
        .await
        .unwrap();
    for i in 0..3 {
        let d = next(&mut c).await;
        assert_eq!(id(&d), format!("d{i}"));
        d.dead_letter(&format!("reason {i}")).await.unwrap();
    }
    nothing_arrives(&mut c, "a dead-lettered message was redelivered").await;

    let first_two = t.peer.dead_letters(2).await.unwrap();
    let all = t.peer.dead_letters(10).await.unwrap();
    assert_eq!(first_two.len(), 2, "limit respected");
    assert_eq!(all.len(), 3, "listing removes nothing");
    assert_eq!(first_two[..], all[..2], "oldest first, both times");
    for (i, letter) in all.iter().enumerate() {
        assert_eq!(letter.queue, t.queue);
        assert_eq!(letter.reason, format!("reason {i}"));
        assert_eq!(
            letter.body.as_ref(),
            request(&format!("d{i}")).encode().as_slice()
        );
    }

    assert_eq!(t.peer.requeue_dead_letters(2).await.unwrap(), 2);
    for i in 0..2 {
        let d = next(&mut c).await;
        assert_eq!(id(&d), format!("d{i}"), "back on its queue");
        assert_eq!(d.queue, t.queue);
        d.ack().await.unwrap();
    }
    nothing_arrives(&mut c, "requeued more than asked").await;
    let left = t.peer.dead_letters(10).await.unwrap();
    assert_eq!(left.len(), 1);
    assert_eq!(left[0].reason, "reason 2");
}

/// `settle_dead_letters` retries or discards exactly the letters picked (by id here), and
/// leaves the others in order; each letter says when it was dead-lettered.
pub async fn dead_letters_are_retried_or_discarded_as_picked(t: BusUnderTest) {
    use tessera_protocol::DeadAction;
    for i in 0..3 {
        t.bus
            .publish_build(&t.queue, &request(&format!("p{i}")))
            .await
            .unwrap();
    }
    let mut c = t
        .bus
        .consume(std::slice::from_ref(&t.queue), &[], 4)
        .await
        .unwrap();
    for _ in 0..3 {
        next(&mut c).await.dead_letter("failed").await.unwrap();
    }
    let all = t.peer.dead_letters(10).await.unwrap();
    assert_eq!(all.len(), 3);
    assert!(all.iter().all(|l| l.at_ms > 0), "the time is kept");
    let id_of = |i: usize| all[i].id();
    let one = id_of(1);
    let retried = t
        .peer
        .settle_dead_letters(&|l| l.id() == one, DeadAction::Retry, 10)
        .await
        .unwrap();
    assert_eq!(retried, 1);
    let d = next(&mut c).await;
    assert_eq!(id(&d), "p1", "the one picked is back on its queue");
    d.ack().await.unwrap();
    let zero = id_of(0);
    let discarded = t
        .peer
        .settle_dead_letters(&|l| l.id() == zero, DeadAction::Discard, 10)
        .await
        .unwrap();
    assert_eq!(discarded, 1);
    nothing_arrives(&mut c, "a discarded letter was delivered").await;
    let left = t.peer.dead_letters(10).await.unwrap();
    assert_eq!(left, all[2..], "the rest stays, in order");
}

/// `publish_retry` delivers the request on its own queue, not before the delay.
pub async fn retries_arrive_on_their_queue_after_the_delay(t: BusUnderTest) {
    let delay = Duration::from_secs(1);
    let mut c = t
        .peer
        .consume(std::slice::from_ref(&t.queue), &[], 1)
        .await
        .unwrap();
    let asked = tokio::time::Instant::now();
    t.bus
        .publish_retry(&t.queue, &request("r"), delay)
        .await
        .unwrap();
    let d = next(&mut c).await;
    let waited = asked.elapsed();
    assert_eq!(id(&d), "r");
    assert_eq!(d.queue, t.queue, "retried on its own queue");
    assert!(
        waited >= delay,
        "delivered after {waited:?}, asked {delay:?}"
    );
    d.ack().await.unwrap();
}

/// A consumer never holds more than `prefetch` unacknowledged deliveries; settling one
/// lets the next in.
pub async fn prefetch_bounds_unacked_deliveries(t: BusUnderTest) {
    for i in 0..3 {
        t.bus
            .publish_build(&t.queue, &request(&i.to_string()))
            .await
            .unwrap();
    }
    let mut c = t
        .bus
        .consume(std::slice::from_ref(&t.queue), &[], 2)
        .await
        .unwrap();
    let first = next(&mut c).await;
    let _second = next(&mut c).await;
    nothing_arrives(&mut c, "a third delivery while two are unacked").await;
    first.ack().await.unwrap();
    assert_eq!(id(&next(&mut c).await), "2");
}

/// One consumer takes deliveries from every queue it was given, saying which.
pub async fn one_consumer_reads_several_queues(t: BusUnderTest) {
    let (fast, slow) = (t.queue("fast"), t.queue("slow"));
    let mut c = t
        .bus
        .consume(&[fast.clone(), slow.clone()], &[], 4)
        .await
        .unwrap();
    // Published after the consumer waits: it must wake up for either queue.
    t.peer.publish_build(&slow, &request("s")).await.unwrap();
    let d = next(&mut c).await;
    assert_eq!((id(&d), d.queue.as_str()), ("s".to_string(), slow.as_str()));
    d.ack().await.unwrap();
    t.peer.publish_build(&fast, &request("f")).await.unwrap();
    let d = next(&mut c).await;
    assert_eq!((id(&d), d.queue.as_str()), ("f".to_string(), fast.as_str()));
    d.ack().await.unwrap();
}

/// Builds someone waits for are delivered before background ones, and while both wait,
/// one delivery in `BACKGROUND_SHARE` (4) is a background one: neither class starves.
pub async fn waited_builds_go_first_and_background_ones_still_progress(t: BusUnderTest) {
    let (waited, background) = (t.queue("w"), t.queue("w.background"));
    // Declared (and so kept) by consuming before anything is published.
    let mut c = t
        .bus
        .consume(
            std::slice::from_ref(&waited),
            std::slice::from_ref(&background),
            4,
        )
        .await
        .unwrap();
    for i in 0..8 {
        t.peer
            .publish_build(&background, &request(&format!("b{i}")))
            .await
            .unwrap();
    }
    for i in 0..8 {
        t.peer
            .publish_build(&waited, &request(&format!("w{i}")))
            .await
            .unwrap();
    }
    // Time for a broker to hand both consumers their prefetch.
    tokio::time::sleep(QUIET).await;
    let mut order = String::new();
    for _ in 0..16 {
        let d = next(&mut c).await;
        let class = if d.queue == waited { 'w' } else { 'b' };
        assert_eq!(
            id(&d).chars().next(),
            Some(class),
            "{} from {}",
            id(&d),
            d.queue
        );
        order.push(class);
        // A build takes a moment: the broker hands out the next message meanwhile, as it
        // does while a worker renders.
        tokio::time::sleep(Duration::from_millis(20)).await;
        d.ack().await.unwrap();
    }
    assert!(order.starts_with("www"), "waited builds first: {order}");
    let background_early = order[..8].matches('b').count();
    assert!(
        (1..=3).contains(&background_early),
        "about one background build in four while both wait: {order}"
    );
    assert_eq!(order.matches('w').count(), 8, "{order}");
}

/// Every current subscriber, on either handle, receives every event, in order.
pub async fn events_reach_every_subscriber(t: BusUnderTest) {
    let mut subscribers = [
        t.bus.subscribe().await.unwrap(),
        t.bus.subscribe().await.unwrap(),
        t.peer.subscribe().await.unwrap(),
    ];
    let events = [
        built(1),
        Event::Failed {
            key: "k".into(),
            error: "upstream said 500".into(),
        },
        Event::Purged {
            purge: tessera_protocol::message::Purge::Route {
                route: "r".into(),
                generation: 8,
                soft: false,
            },
            id: None,
        },
    ];
    for e in &events {
        t.peer.publish_event(e).await.unwrap();
    }
    for (n, s) in subscribers.iter_mut().enumerate() {
        for e in &events {
            let got = tokio::time::timeout(ARRIVES, s.next())
                .await
                .unwrap_or_else(|_| panic!("subscriber {n}: no event within {ARRIVES:?}"));
            assert_eq!(got, Some(Notice::Event(e.clone())), "subscriber {n}");
        }
    }
}

/// `queue_stats` reports the messages waiting on a queue and the consumers attached,
/// as they come and go.
pub async fn queue_stats_count_waiting_messages_and_consumers(t: BusUnderTest) {
    for i in 0..3 {
        t.bus
            .publish_build(&t.queue, &request(&i.to_string()))
            .await
            .unwrap();
    }
    let stats = t.peer.queue_stats(&t.queue).await.unwrap();
    assert_eq!((stats.messages, stats.consumers), (3, 0));

    let c = t
        .bus
        .consume(std::slice::from_ref(&t.queue), &[], 1)
        .await
        .unwrap();
    // The broker attaches consumers and pushes up to `prefetch` deliveries to them on its
    // own time: wait, bounded. A pushed delivery no longer waits on the queue.
    let (peer, queue) = (t.peer.clone(), t.queue.clone());
    let stats = || {
        let (peer, queue) = (peer.clone(), queue.clone());
        async move { peer.queue_stats(&queue).await.unwrap() }
    };
    eventually("one consumer attached", ARRIVES, || async {
        stats().await.consumers == 1
    })
    .await;
    let waiting = stats().await.messages;
    assert!((2..=3).contains(&waiting), "{waiting} waiting, prefetch 1");

    drop(c);
    eventually(
        "no consumer, and all three waiting, once it is dropped",
        ARRIVES,
        || async {
            stats().await
                == QueueStats {
                    messages: 3,
                    consumers: 0,
                }
        },
    )
    .await;
}

/// A subscriber that does not keep up is told, with `Notice::Lagged`, that it may have
/// missed events. (The other cause, a re-established broker connection, needs a broker
/// restart; the shared test broker is not restarted for a conformance case.)
pub async fn a_subscriber_that_falls_behind_is_told_it_lagged(t: BusUnderTest) {
    let mut slow = t.bus.subscribe().await.unwrap();
    // Four times the buffer, and a pause before reading: on a busy machine the broker may
    // still be delivering when publishing ends, and a reader that starts early keeps up.
    let total = 4 * EVENT_BUFFER;
    let published: Vec<Result<(), BusError>> = futures_util::stream::iter(0..total)
        .map(|n| {
            let bus = t.peer.clone();
            async move { bus.publish_event(&built(n)).await }
        })
        .buffer_unordered(64)
        .collect()
        .await;
    assert!(published.iter().all(Result::is_ok), "every event published");
    tokio::time::sleep(Duration::from_secs(1)).await;

    for read in 0..=total {
        let notice = tokio::time::timeout(ARRIVES, slow.next())
            .await
            .unwrap_or_else(|_| {
                panic!("{read} events read out of {total}, then nothing and no Lagged")
            })
            .expect("the bus is open");
        if notice == Notice::Lagged {
            assert!(read <= EVENT_BUFFER, "told only after {read} events");
            return;
        }
    }
    panic!("read all {total} events without being told it lagged");
}

/// `ping` answers when the bus does.
pub async fn ping_answers(t: BusUnderTest) {
    t.bus.ping().await.unwrap();
    t.peer.ping().await.unwrap();
}

/// Cases only a bus with a broker can have.
pub mod amqp_only {
    use super::*;

    /// With no broker at the address, calls fail with `Unavailable` (retryable) rather
    /// than hanging or panicking, and `consume`/`subscribe` still hand out streams that
    /// wait for it.
    pub async fn no_broker_is_unavailable() {
        let url = format!("amqp://guest:guest@127.0.0.1:{}/%2f", free_port());
        let bus = AmqpBus::new(&url, &unique_namespace());
        for (what, result) in [
            ("ping", bus.ping().await),
            ("publish_build", bus.publish_build("q", &request("a")).await),
            ("publish_event", bus.publish_event(&built(1)).await),
            ("queue_stats", bus.queue_stats("q").await.map(|_| ())),
            ("dead_letters", bus.dead_letters(1).await.map(|_| ())),
        ] {
            match result {
                Err(BusError::Unavailable(..)) => {}
                other => panic!("{what} with no broker: {other:?}"),
            }
        }
        let mut c = bus.consume(&["q".to_string()], &[], 1).await.unwrap();
        nothing_arrives(&mut c, "a delivery from no broker").await;
    }

    /// A connection of its own to the test broker, to look at what the `Bus` hides.
    async fn raw_connection() -> lapin::Connection {
        lapin::Connection::connect(&amqp_url(), lapin::ConnectionProperties::default())
            .await
            .expect("a raw connection to the test broker")
    }

    /// Whether exchange `name` exists: a passive declare, on a channel of its own since
    /// a missing exchange (404 NOT_FOUND) closes the channel.
    async fn exchange_exists(conn: &lapin::Connection, name: &str) -> bool {
        let channel = conn.create_channel().await.unwrap();
        let options = ExchangeDeclareOptions {
            passive: true,
            ..ExchangeDeclareOptions::default()
        };
        let name = ShortString::from(name.to_string());
        match channel
            .exchange_declare(name, ExchangeKind::Direct, options, FieldTable::default())
            .await
        {
            Ok(()) => true,
            Err(e) if e.to_string().contains("NOT_FOUND") => false,
            Err(e) => panic!("passive declare: {e}"),
        }
    }

    /// Publishes `body` to `exchange` with `routing_key`, mandatory, with a confirm.
    async fn publish_mandatory(
        conn: &lapin::Connection,
        exchange: &str,
        routing_key: &str,
    ) -> Confirmation {
        let channel = conn.create_channel().await.unwrap();
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .unwrap();
        let options = BasicPublishOptions {
            mandatory: true,
            ..BasicPublishOptions::default()
        };
        channel
            .basic_publish(
                ShortString::from(exchange.to_string()),
                ShortString::from(routing_key.to_string()),
                options,
                b"{}",
                BasicProperties::default(),
            )
            .await
            .unwrap()
            .await
            .unwrap()
    }

    /// A retry queue that went while its route queue stayed (retry queues of an
    /// expiring namespace expire when unused; an operator may delete one): the retry
    /// that finds it gone declares it again and arrives.
    pub async fn a_retry_queue_that_went_is_declared_again() {
        let ns = unique_namespace();
        let queue = format!("{ns}.build");
        let bus = AmqpBus::with_queue_expiry(&amqp_url(), &ns, Some(QUEUE_EXPIRY))
            .with_queues(std::slice::from_ref(&queue));
        let delay = Duration::from_secs(1);
        bus.publish_retry(&queue, &request("first"), delay)
            .await
            .unwrap();
        let mut c = bus
            .consume(std::slice::from_ref(&queue), &[], 1)
            .await
            .unwrap();
        next(&mut c).await.ack().await.unwrap();

        let conn = raw_connection().await;
        let channel = conn.create_channel().await.unwrap();
        let retry = ShortString::from(format!("{queue}.retry.1s"));
        channel
            .queue_delete(retry, lapin::options::QueueDeleteOptions::default())
            .await
            .expect("delete the retry queue");
        bus.publish_retry(&queue, &request("again"), delay)
            .await
            .expect("a retry to a queue that went declares it again");
        assert_eq!(id(&next(&mut c).await), "again");
    }

    /// A build queue that went (an operator deleted it, or it expired with no worker
    /// consuming: publishes are no use to RabbitMQ) while a gateway kept publishing to
    /// it: the next build request declares it again and is queued, not refused.
    pub async fn a_build_queue_that_went_is_declared_again() {
        let ns = unique_namespace();
        let queue = format!("{ns}.build");
        let bus = AmqpBus::with_queue_expiry(&amqp_url(), &ns, Some(QUEUE_EXPIRY))
            .with_queues(std::slice::from_ref(&queue));
        bus.publish_build(&queue, &request("first")).await.unwrap();
        let conn = raw_connection().await;
        let channel = conn.create_channel().await.unwrap();
        let deleted = channel
            .queue_delete(
                ShortString::from(queue.clone()),
                lapin::options::QueueDeleteOptions::default(),
            )
            .await
            .expect("delete the build queue");
        assert_eq!(deleted, 1, "the first request was in it");
        bus.publish_build(&queue, &request("again"))
            .await
            .expect("a build request to a queue that went declares it again");
        let mut c = bus
            .consume(std::slice::from_ref(&queue), &[], 1)
            .await
            .unwrap();
        assert_eq!(id(&next(&mut c).await), "again");
    }

    /// With `queue_expiry`, a namespace's exchanges go once its queues expired and its
    /// processes left. Until then they stay, even unbound for longer than the expiry,
    /// and an unroutable mandatory publish still comes back.
    pub async fn exchanges_of_an_expiring_namespace_go_with_it() {
        let ns = unique_namespace();
        let expiry = Duration::from_secs(1);
        let exchanges = ["build", "dead", "events"].map(|e| format!("{ns}.{e}"));
        let conn = raw_connection().await;
        // The bus binds its exchanges right after declaring them; RabbitMQ must not drop
        // an auto-delete exchange that never had a binding meanwhile.
        let unbound = format!("{ns}.unbound");
        let probe = conn.create_channel().await.unwrap();
        let options = ExchangeDeclareOptions {
            auto_delete: true,
            ..ExchangeDeclareOptions::default()
        };
        let name = ShortString::from(unbound.clone());
        probe
            .exchange_declare(
                name.clone(),
                ExchangeKind::Direct,
                options,
                FieldTable::default(),
            )
            .await
            .unwrap();
        {
            let bus = AmqpBus::with_queue_expiry(&amqp_url(), &ns, Some(expiry));
            bus.ping().await.unwrap();
            tokio::time::sleep(3 * expiry).await;
            assert!(
                exchange_exists(&conn, &unbound).await,
                "an unbound one went"
            );
            probe
                .exchange_delete(name, ExchangeDeleteOptions::default())
                .await
                .unwrap();
            for e in &exchanges {
                assert!(exchange_exists(&conn, e).await, "{e} went while in use");
            }
            let returned = publish_mandatory(&conn, &exchanges[0], "nobody").await;
            assert!(
                matches!(returned, Confirmation::Ack(Some(_))),
                "unroutable publish: {returned:?}"
            );
            let mut events = bus.subscribe().await.unwrap();
            let queue = format!("{ns}.build");
            bus.publish_build(&queue, &request("a")).await.unwrap();
            let mut c = bus
                .consume(std::slice::from_ref(&queue), &[], 1)
                .await
                .unwrap();
            next(&mut c).await.ack().await.unwrap();
            bus.publish_event(&built(1)).await.unwrap();
            let notice = tokio::time::timeout(ARRIVES, events.next()).await.unwrap();
            assert_eq!(notice, Some(Notice::Event(built(1))));
        }
        crate::eventually("the namespace's exchanges gone", 3 * ARRIVES, || {
            let (conn, exchanges) = (&conn, &exchanges);
            async move {
                for e in exchanges {
                    if exchange_exists(conn, e).await {
                        return false;
                    }
                }
                true
            }
        })
        .await;
    }
}
