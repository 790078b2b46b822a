//! The namespace's exchanges and queues, as the module docs of [`super`] list them: the
//! arguments every durable queue gets, the exchanges and dead-letter queue declared on
//! each new connection (with the anchor that holds auto-delete exchanges), each route
//! queue with its retry queues (declared once per connection, callers that need one at
//! the same moment sharing a single declaration), the retry buckets, and the passive
//! declare that reads a queue's depth.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{Channel, ExchangeKind};

use tessera_protocol::bus::{BusError, QueueStats};
use tessera_protocol::config::QueueType;

use super::connection::Link;
use super::{AmqpBus, RETRY_BUCKETS, close, short, timed};

/// The route queues declared on one connection (a new connection declares them again).
#[derive(Default)]
pub(super) struct Declarations {
    /// Queues declared on this connection.
    declared: Mutex<HashSet<String>>,
    /// Held while a queue is declared: callers that need the same queue at once (the
    /// first burst of misses) wait for one declaration instead of each making its own.
    /// It keeps the last declaration that failed, which those waiting for it share
    /// rather than each trying again in turn (against a broker that stopped answering,
    /// one timeout after another).
    declaring: tokio::sync::Mutex<Option<Refused>>,
    /// Declarations ended on this connection, failed or not.
    ended: AtomicU64,
}

impl Declarations {
    fn declared(&self) -> std::sync::MutexGuard<'_, HashSet<String>> {
        self.declared.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// `queue` went (no queue took a publish to it): the next publish declares it again.
    pub(super) fn forget(&self, queue: &str) {
        self.declared().remove(queue);
    }
}

/// A declaration that failed.
struct Refused {
    queue: String,
    /// Its place in `Declarations::ended`.
    ended: u64,
    error: BusError,
}

impl AmqpBus {
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

    /// The namespace's exchanges and dead-letter queue. With a queue expiry the exchanges
    /// are auto-delete: RabbitMQ drops each once its last binding goes (see the `amqp`
    /// module docs), since exchanges cannot carry `x-expires`.
    pub(super) async fn declare_shared(&self, publish: &Channel) -> Result<(), BusError> {
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
    pub(super) async fn declare_anchor(&self, channel: &Channel) -> Result<(), BusError> {
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

    /// Declares a route queue and its retry queues, once per link, on a channel of its
    /// own: a refused declare (406 PRECONDITION_FAILED, the queue exists with other
    /// arguments) closes the channel it was made on. A failure is shared only with the
    /// callers that waited for it, so the next publish, consumer reconnection or
    /// [`Bus::ping`](tessera_protocol::Bus::ping) tries again.
    pub(super) async fn declare_queue(&self, link: &Link, queue: &str) -> Result<(), BusError> {
        self.known_queues().insert(queue.to_string());
        let queues = &link.queues;
        if queues.declared().contains(queue) {
            return Ok(());
        }
        let waited_from = queues.ended.load(Ordering::Acquire);
        let mut refused = queues.declaring.lock().await;
        if queues.declared().contains(queue) {
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
        let ended = queues.ended.fetch_add(1, Ordering::AcqRel) + 1;
        match &result {
            Ok(()) => {
                queues.declared().insert(queue.to_string());
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

    /// Depth and consumers of `queue`, by a passive declare.
    pub(super) async fn inspect_queue(&self, queue: &str) -> Result<QueueStats, BusError> {
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
}

pub(super) fn retry_queue(queue: &str, secs: u64) -> String {
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

#[cfg(test)]
mod tests {
    use super::*;
    use tessera_protocol::Bus;

    #[test]
    fn retries_wait_for_the_next_bucket_up() {
        assert_eq!(retry_bucket(Duration::from_millis(300)), 1);
        assert_eq!(retry_bucket(Duration::from_secs(1)), 1);
        assert_eq!(retry_bucket(Duration::from_millis(1001)), 2);
        assert_eq!(retry_bucket(Duration::from_secs(9)), 16);
        assert_eq!(retry_bucket(Duration::from_secs(600)), 32);
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
}
