//! RabbitMQ's own rates on this broker, through lapin with nothing of Tessera's in the
//! way: the reference the distributed benchmarks compare against.
//!
//! `amqp-rates MESSAGES IN_FLIGHT [classic|quorum]`: publishes MESSAGES persistent
//! 200-byte messages to a fresh durable queue of that type (default classic) with publisher
//! confirms, IN_FLIGHT unconfirmed at a time, then
//! consumes them with prefetch IN_FLIGHT and a manual ack each. Prints both rates.
//! Needs RabbitMQ on 127.0.0.1:5672 (guest/guest).

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Confirmation, Connection, ConnectionProperties};

const AMQP: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (messages, in_flight, kind) = match args.as_slice() {
        [m, f] => (m, f, "classic"),
        [m, f, k] if k == "classic" || k == "quorum" => (m, f, k.as_str()),
        _ => anyhow::bail!("usage: amqp-rates MESSAGES IN_FLIGHT [classic|quorum]"),
    };
    let (messages, in_flight): (usize, u16) = (messages.parse()?, in_flight.parse()?);
    anyhow::ensure!(
        messages > 0 && in_flight > 0,
        "amqp-rates: MESSAGES and IN_FLIGHT must be at least 1"
    );
    let conn = Connection::connect(AMQP, ConnectionProperties::default()).await?;
    let channel = conn.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let queue = ShortString::from(format!("bench{:x}.rates", rand::random::<u32>()));
    let mut args = FieldTable::default();
    // Dropped by the broker once unused for a minute.
    args.insert("x-expires".into(), AMQPValue::LongInt(60_000));
    args.insert("x-queue-type".into(), AMQPValue::LongString(kind.into()));
    let durable = QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    };
    channel.queue_declare(queue.clone(), durable, args).await?;

    let body = [b'x'; 200];
    let started = Instant::now();
    let mut pending = FuturesUnordered::new();
    // Each message's time from publish to confirm.
    let mut waits = Vec::with_capacity(messages);
    for _ in 0..messages {
        if pending.len() >= usize::from(in_flight) {
            waits.push(confirmed(pending.next().await)?);
        }
        let sent = Instant::now();
        let confirm = channel
            .basic_publish(
                "".into(),
                queue.clone(),
                BasicPublishOptions::default(),
                &body,
                BasicProperties::default().with_delivery_mode(2),
            )
            .await?;
        pending.push(async move { (sent, confirm.await) });
    }
    while let Some(c) = pending.next().await {
        waits.push(confirmed(Some(c))?);
    }
    let publish = rate(messages, started.elapsed());
    waits.sort_unstable();

    let consumer_channel = conn.create_channel().await?;
    consumer_channel
        .basic_qos(in_flight, BasicQosOptions::default())
        .await?;
    let mut consumer = consumer_channel
        .basic_consume(
            queue,
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let started = Instant::now();
    for _ in 0..messages {
        let delivery = tokio::time::timeout(Duration::from_secs(30), consumer.next())
            .await?
            .ok_or_else(|| anyhow::anyhow!("consumer closed"))??;
        delivery.acker.ack(BasicAckOptions::default()).await?;
    }
    let consume = rate(messages, started.elapsed());
    println!(
        "RabbitMQ publish+confirm, {kind} queue, {in_flight} in flight: {publish:.0} msg/s, \
         publish to confirm p50 {:.2} ms, p99 {:.2} ms",
        percentile_ms(&waits, 50),
        percentile_ms(&waits, 99)
    );
    println!("RabbitMQ consume+ack, {kind} queue, prefetch {in_flight}: {consume:.0} msg/s");
    Ok(())
}

/// How long a confirmed message waited for its confirm.
fn confirmed(c: Option<(Instant, lapin::Result<Confirmation>)>) -> anyhow::Result<Duration> {
    match c {
        Some((sent, Ok(Confirmation::Ack(_) | Confirmation::NotRequested))) => Ok(sent.elapsed()),
        other => anyhow::bail!("not confirmed: {:?}", other.map(|(_, c)| c)),
    }
}

/// The `p`th percentile of sorted `waits`, in milliseconds.
fn percentile_ms(waits: &[Duration], p: usize) -> f64 {
    waits[(waits.len() - 1) * p / 100].as_secs_f64() * 1000.0
}

#[allow(clippy::cast_precision_loss)]
fn rate(n: usize, took: Duration) -> f64 {
    n as f64 / took.as_secs_f64()
}
