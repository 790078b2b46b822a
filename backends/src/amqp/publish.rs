//! Publishing with publisher confirms: build requests to their route queues (declared
//! first, sent once more when the connection closed under them, no queue took them or
//! the broker refused them on a channel it then replaced),
//! retries to their delay buckets, dead letters with their reason, and events to the
//! fanout. A publish the broker confirmed but no queue took is a failure.

use std::sync::Arc;

use lapin::options::BasicPublishOptions;
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Confirmation};

use tessera_protocol::bus::BusError;
use tessera_protocol::message::{BuildRequest, Event};

use super::connection::Link;
use super::{AmqpBus, short, timed};

impl AmqpBus {
    /// Publishes with a confirm: `Ok(true)` once the broker took the message into a queue,
    /// `Ok(false)` when it confirmed it but no queue took it (it came back).
    pub(super) async fn publish(
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
        let channel = link.publisher();
        let result = async {
            let confirm = timed(
                "publish",
                channel.basic_publish(short(exchange), short(routing_key), options, body, props),
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
        match &result {
            // Let the next call reconnect.
            Err(BusError::Unavailable(_)) => self.drop_link(link),
            Err(BusError::Rejected(_)) => {
                if let Err(e) = link.renew_publisher(&channel).await {
                    tracing::warn!(error = %e, "could not open a new publish channel");
                    self.drop_link(link);
                }
            }
            Ok(_) => {}
        }
        result
    }

    /// Publishes raw bytes to a build queue, as any other program could.
    pub async fn publish_raw(&self, queue: &str, body: &[u8]) -> Result<(), BusError> {
        self.publish_to_queue(queue, body, persistent()).await
    }

    pub(super) async fn publish_to_queue(
        &self,
        queue: &str,
        body: &[u8],
        props: BasicProperties,
    ) -> Result<(), BusError> {
        self.publish_declared(queue, &self.exchange("build"), queue, body, props)
            .await
    }

    /// Declares `queue` (with its retry queues) once per link, then publishes, trying a
    /// second time in three cases where the broker did not take the message:
    /// - No queue took it: a queue went (an operator deleted it, or it expired: RabbitMQ
    ///   does not count publishes as use). The queues are declared again, so a miss storm
    ///   against a deleted queue is not answered with a storm of 503s.
    /// - The connection closed under it (RabbitMQ closes it with 541 INTERNAL_ERROR when
    ///   a publish meets a queue's deletion, or it restarted): the message goes out on a
    ///   new connection. The first may have taken it after all: a second copy is
    ///   harmless, since builds are idempotent and a copy picked up after the first was
    ///   built is dropped as already built (and a consumer holding both hands the copy
    ///   on only after the first is settled).
    /// - The broker refused it (a negative confirm): the channel may hold a dead quorum
    ///   queue leader (see [`Link::renew_publisher`]); it goes out once more on the new
    ///   channel the refusal bought. A second refusal is the caller's.
    ///
    /// A publish that timed out on a connection still open is not tried again: the broker
    /// is slow, and a second wait would double the caller's.
    pub(super) async fn publish_declared(
        &self,
        queue: &str,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        props: BasicProperties,
    ) -> Result<(), BusError> {
        let mut link = self.link().await?;
        for attempt in 0..2 {
            self.declare_queue(&link, queue).await?;
            match self
                .publish(&link, exchange, routing_key, body, props.clone())
                .await
            {
                Ok(true) => return Ok(()),
                Ok(false) => link.queues.forget(queue),
                Err(BusError::Rejected(_)) if attempt == 0 => {}
                Err(e) if e.is_retryable() && attempt == 0 && !link.alive() => {
                    link = self.link().await?;
                }
                Err(e) => return Err(e),
            }
        }
        Err(unroutable(exchange, routing_key))
    }

    /// Fans `event` out to every gateway, with a confirm.
    pub(super) async fn fan_out(&self, event: &Event) -> Result<(), BusError> {
        let props = BasicProperties::default().with_content_type(short("application/json"));
        // Fanout: routable whenever the exchange exists, even with no subscriber.
        let link = self.link().await?;
        let confirm = timed(
            "publish event",
            link.publisher().basic_publish(
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
}

/// A publish the broker confirmed but no queue took.
pub(super) fn unroutable(exchange: &str, routing_key: &str) -> BusError {
    BusError::Rejected(format!("no queue is bound for {routing_key:?} on {exchange:?}").into())
}

pub(super) fn persistent() -> BasicProperties {
    BasicProperties::default()
        .with_delivery_mode(2)
        .with_content_type(short("application/json"))
}

/// The properties of `request`'s message: persistent, with its `traceparent` (when
/// traces are on) as a header too, where the messaging conventions put trace context.
pub(super) fn build_properties(request: &BuildRequest) -> BasicProperties {
    let props = persistent();
    match &request.traceparent {
        Some(traceparent) => {
            let mut headers = FieldTable::default();
            headers.insert(
                short("traceparent"),
                AMQPValue::LongString(traceparent.as_str().into()),
            );
            props.with_headers(headers)
        }
        None => props,
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::amqp::RECONNECT_MIN;
    use tessera_protocol::Bus;

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
}
