//! The producers the relay is measured against: each publishes to its destination
//! alone, with the relay's client and guarantees, a backlog as fast as it can
//! (at most the relay's window unacknowledged) or records at a fixed rate, each
//! timed from hand-over to acknowledgement.

use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use futures::stream::FuturesUnordered;
use futures::StreamExt;
use lapin::options::{
    BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions,
    QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties, ExchangeKind};

use super::{url, Names, LATENCY_RATE, WINDOW, WORKLOAD};
use crate::throughput::bench_payload;

/// JetStream: the relay's publish (message id, headers, file storage), acknowledged,
/// at most the relay's window awaited.
pub(super) async fn nats_only(names: &Names, events: u64) -> anyhow::Result<f64> {
    use async_nats::jetstream::{self, message::PublishMessage};
    let context = jetstream::ContextBuilder::new()
        .max_ack_inflight(WINDOW)
        .backpressure_on_inflight(true)
        .build(async_nats::connect(url("NATS_URL")?).await?);
    let (stream_name, subject) = nats_stream(&context, names, "BACKLOG").await?;
    let payload = bytes::Bytes::from(bench_payload(WORKLOAD.payload_bytes));
    let started = Instant::now();
    let mut acks = FuturesUnordered::new();
    for n in 0..events {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("key", (n % 1000).to_string().as_str());
        headers.insert("type", "BenchEvent");
        let id = uuid::Uuid::new_v4().to_string();
        headers.insert("id", id.as_str());
        let message = PublishMessage::build()
            .payload(payload.clone())
            .headers(headers)
            .message_id(&id);
        let ack = context.send_publish(subject.clone(), message).await?;
        acks.push(std::future::IntoFuture::into_future(ack));
        while acks.len() >= WINDOW {
            acks.next().await.context("an ack")??;
        }
    }
    while let Some(ack) = acks.next().await {
        ack?;
    }
    let secs = started.elapsed().as_secs_f64();
    let _ = context.delete_stream(stream_name).await;
    Ok(secs)
}

/// A record's hand-over to its acknowledgement.
type Ack = futures::future::BoxFuture<'static, anyhow::Result<()>>;

/// Hands `events` records over at `per_second` (`send(n)` hands record `n` over and
/// returns its acknowledgement), each timed from its hand-over to its
/// acknowledgement; the seconds of each.
pub(crate) async fn paced(
    per_second: u32,
    events: u64,
    mut send: impl FnMut(u64) -> anyhow::Result<Ack>,
) -> anyhow::Result<Vec<f64>> {
    let mut pending = FuturesUnordered::new();
    let mut seconds = Vec::with_capacity(usize::try_from(events)?);
    let started = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut sent = 0u64;
    while sent < events || !pending.is_empty() {
        tokio::select! {
            _ = tick.tick(), if sent < events => {
                let due = (started.elapsed().as_secs_f64() * f64::from(per_second)) as u64;
                while sent < due.min(events) {
                    let ack = send(sent)?;
                    let handed = Instant::now();
                    pending.push(async move { (ack.await, handed.elapsed()) });
                    sent += 1;
                }
            }
            Some((result, elapsed)) = pending.next(), if !pending.is_empty() => {
                result?;
                seconds.push(elapsed.as_secs_f64());
            }
        }
    }
    Ok(seconds)
}

/// Hands record `n` (300 B, like the relay's) to a Kafka producer, for `topic`.
pub(crate) fn kafka_one(
    producer: &rdkafka::producer::FutureProducer,
    topic: &str,
    n: u64,
) -> anyhow::Result<Ack> {
    use futures::FutureExt;
    let payload = bench_payload(WORKLOAD.payload_bytes);
    let (key, id) = ((n % 1000).to_string(), uuid::Uuid::new_v4().to_string());
    let delivery = producer
        .send_result(crate::throughput::bench_record(topic, &key, &id, &payload))
        .map_err(|(e, _)| anyhow::anyhow!("handing a record to the producer: {e}"))?;
    Ok(async move {
        delivery
            .await?
            .map(|_| ())
            .map_err(|(e, _)| anyhow::anyhow!("{e}"))
    }
    .boxed())
}

/// A file-backed stream of the producers', named after `what`, apart from the
/// relay's; its name and the subject to publish to.
async fn nats_stream(
    context: &async_nats::jetstream::Context,
    names: &Names,
    what: &str,
) -> anyhow::Result<(String, String)> {
    use async_nats::jetstream::stream;
    let root = format!("{}_{}", names.producer_root(), what.to_lowercase());
    let name = root.to_uppercase();
    context
        .get_or_create_stream(stream::Config {
            name: name.clone(),
            subjects: vec![format!("{root}.>")],
            storage: stream::StorageType::File,
            ..Default::default()
        })
        .await?;
    Ok((name, format!("{root}.bench")))
}

pub(super) async fn nats_paced(names: &Names, events: u64) -> anyhow::Result<Vec<f64>> {
    use async_nats::jetstream::{self, message::PublishMessage};
    use futures::FutureExt;
    let context = jetstream::new(async_nats::connect(url("NATS_URL")?).await?);
    let (stream_name, subject) = nats_stream(&context, names, "PACED").await?;
    let payload = bytes::Bytes::from(bench_payload(WORKLOAD.payload_bytes));
    let acks = paced(LATENCY_RATE, events, |n| {
        let (context, subject, payload) = (context.clone(), subject.clone(), payload.clone());
        Ok(async move {
            let mut headers = async_nats::HeaderMap::new();
            headers.insert("key", (n % 1000).to_string().as_str());
            let id = uuid::Uuid::new_v4().to_string();
            let message = PublishMessage::build()
                .payload(payload)
                .headers(headers)
                .message_id(&id);
            context.send_publish(subject, message).await?.await?;
            Ok(())
        }
        .boxed())
    })
    .await?;
    let _ = context.delete_stream(stream_name).await;
    Ok(acks)
}

pub(super) async fn redis_paced(names: &Names, events: u64) -> anyhow::Result<Vec<f64>> {
    use futures::FutureExt;
    let client = redis::Client::open(url("REDIS_URL")?)?;
    let connection = client.get_multiplexed_async_connection().await?;
    let stream = format!("{}.paced", names.producer_root());
    let payload = bench_payload(WORKLOAD.payload_bytes);
    let acks = paced(LATENCY_RATE, events, |n| {
        let (mut connection, stream, payload) =
            (connection.clone(), stream.clone(), payload.clone());
        Ok(async move {
            let _: String = redis::cmd("XADD")
                .arg(&stream)
                .arg("*")
                .arg("key")
                .arg((n % 1000).to_string())
                .arg("value")
                .arg(&payload)
                .query_async(&mut connection)
                .await?;
            Ok(())
        }
        .boxed())
    })
    .await?;
    let mut connection = connection;
    let _: () = redis::cmd("DEL")
        .arg(&stream)
        .query_async(&mut connection)
        .await?;
    Ok(acks)
}

/// Redis: `XADD` in pipelines of the relay's batch, one after another on one
/// connection.
pub(super) async fn redis_only(names: &Names, events: u64) -> anyhow::Result<f64> {
    const BATCH: u64 = 256;
    let client = redis::Client::open(url("REDIS_URL")?)?;
    let mut connection = client.get_multiplexed_async_connection().await?;
    let stream = format!("{}.bench", names.producer_root());
    let payload = bench_payload(WORKLOAD.payload_bytes);
    let started = Instant::now();
    let mut sent = 0;
    while sent < events {
        let mut pipe = redis::pipe();
        for n in sent..(sent + BATCH).min(events) {
            let headers = format!(
                "{{\"id\":\"{}\",\"type\":\"BenchEvent\"}}",
                uuid::Uuid::new_v4()
            );
            pipe.cmd("XADD")
                .arg(&stream)
                .arg("*")
                .arg("key")
                .arg((n % 1000).to_string())
                .arg("value")
                .arg(&payload)
                .arg("headers")
                .arg(headers);
        }
        let _: Vec<redis::Value> = pipe.query_async(&mut connection).await?;
        sent = (sent + BATCH).min(events);
    }
    let secs = started.elapsed().as_secs_f64();
    let _: () = redis::cmd("DEL")
        .arg(&stream)
        .query_async(&mut connection)
        .await?;
    Ok(secs)
}

/// A durable queue bound to every routing key of the run's exchange.
pub(super) struct Rabbit {
    connection: Connection,
    pub(super) channel: lapin::Channel,
    pub(super) queue: String,
}

impl Rabbit {
    pub(super) async fn bind(names: &Names) -> anyhow::Result<Rabbit> {
        let connection =
            Connection::connect(&url("RABBITMQ_URL")?, ConnectionProperties::default()).await?;
        let channel = connection.create_channel().await?;
        channel
            .exchange_declare(
                names.prefix.as_str().into(),
                ExchangeKind::Topic,
                ExchangeDeclareOptions {
                    durable: true,
                    ..ExchangeDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await?;
        let queue = format!("{}.all", names.prefix);
        channel
            .queue_declare(
                queue.as_str().into(),
                QueueDeclareOptions {
                    durable: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await?;
        channel
            .queue_bind(
                queue.as_str().into(),
                names.prefix.as_str().into(),
                "#".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
        Ok(Rabbit {
            connection,
            channel,
            queue,
        })
    }

    /// Persistent, mandatory messages with publisher confirms on one channel, at
    /// most the relay's window unconfirmed.
    pub(super) async fn produce(&self, names: &Names, events: u64) -> anyhow::Result<f64> {
        let channel = self.connection.create_channel().await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        let payload = bench_payload(WORKLOAD.payload_bytes);
        let routing_key = format!("{}.only", names.prefix);
        let started = Instant::now();
        let mut confirms = FuturesUnordered::new();
        for n in 0..events {
            let confirm = publish_one(&channel, &names.prefix, &routing_key, &payload, n).await?;
            confirms.push(confirm);
            while confirms.len() >= WINDOW {
                check_confirm(confirms.next().await.context("a confirm")??)?;
            }
        }
        while let Some(confirm) = confirms.next().await {
            check_confirm(confirm?)?;
        }
        Ok(started.elapsed().as_secs_f64())
    }
}

impl Rabbit {
    /// [`Rabbit::produce`]'s messages, one at a time at [`LATENCY_RATE`].
    pub(super) async fn paced(&self, names: &Names, events: u64) -> anyhow::Result<Vec<f64>> {
        use futures::FutureExt;
        let channel = self.connection.create_channel().await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        let payload = bench_payload(WORKLOAD.payload_bytes);
        let (exchange, routing_key) = (names.prefix.clone(), format!("{}.paced", names.prefix));
        paced(LATENCY_RATE, events, |n| {
            let (channel, exchange, routing_key, payload) = (
                channel.clone(),
                exchange.clone(),
                routing_key.clone(),
                payload.clone(),
            );
            Ok(async move {
                let confirm = publish_one(&channel, &exchange, &routing_key, &payload, n).await?;
                check_confirm(confirm.await?)
            }
            .boxed())
        })
        .await
    }
}

/// Publishes record `n` as the relay does: persistent, mandatory, with a message
/// id and the `key` and `type` headers.
async fn publish_one(
    channel: &lapin::Channel,
    exchange: &str,
    routing_key: &str,
    payload: &str,
    n: u64,
) -> lapin::Result<lapin::PublisherConfirm> {
    let mut headers = FieldTable::default();
    headers.insert(
        "key".into(),
        lapin::types::AMQPValue::LongString((n % 1000).to_string().into()),
    );
    headers.insert(
        "type".into(),
        lapin::types::AMQPValue::LongString("BenchEvent".into()),
    );
    let properties = BasicProperties::default()
        .with_delivery_mode(2)
        .with_message_id(uuid::Uuid::new_v4().to_string().into())
        .with_headers(headers);
    channel
        .basic_publish(
            exchange.into(),
            routing_key.into(),
            BasicPublishOptions {
                mandatory: true,
                immediate: false,
            },
            payload.as_bytes(),
            properties,
        )
        .await
}

fn check_confirm(confirmation: lapin::Confirmation) -> anyhow::Result<()> {
    match confirmation {
        lapin::Confirmation::Ack(None) => Ok(()),
        other => bail!("RabbitMQ did not take a record: {other:?}"),
    }
}
