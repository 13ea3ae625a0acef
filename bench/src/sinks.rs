//! Sinks: the relay publishing one backlog to each of its four destinations,
//! against a producer that publishes the same number of records of the same size
//! to that destination with the relay's client and guarantees (acknowledged,
//! persistent, at most the relay's window in flight) and nothing else; then
//! commit → acknowledgement at 1 k events/s, from the relay's histogram.
//!
//! Kafka is the lab's private broker; NATS, RabbitMQ and Redis are the servers
//! `scripts/env up` found or started (`NATS_URL`, `RABBITMQ_URL`, `REDIS_URL`),
//! each run on names of its own, removed afterwards.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use futures::stream::FuturesUnordered;
use futures::StreamExt;
use lapin::options::{
    BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions, ExchangeDeleteOptions,
    QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties, ExchangeKind};

use crate::latency::Buckets;
use crate::relay_lab::RelayLab;
use crate::throughput::{bench_payload, produce_only};
use crate::Workload;

/// The backlog's shape: transactions of 100 rows of 300 B.
pub(crate) const WORKLOAD: Workload = Workload {
    rows_per_txn: 100,
    payload_bytes: 300,
};
/// The offered load of the latency measurement, events per second.
pub(crate) const LATENCY_RATE: u32 = 1_000;
/// Records a producer keeps in flight: the relay's window.
const WINDOW: usize = outbox_relay::config::DEFAULT_MAX_IN_FLIGHT;

/// The four sinks, in the order of the table.
pub(crate) const SINKS: [&str; 4] = ["kafka", "nats", "rabbitmq", "redis"];

/// What one sink measured.
#[derive(Debug, Clone)]
pub(crate) struct SinkRun {
    pub(crate) sink: &'static str,
    pub(crate) events: u64,
    /// Events per second of the sink-only producer and of the relay.
    pub(crate) producer: f64,
    pub(crate) relay: f64,
    pub(crate) relay_cpu_us: f64,
    pub(crate) p50_ms: f64,
    pub(crate) p99_ms: f64,
}

impl SinkRun {
    pub(crate) fn complete(&self) -> bool {
        [
            self.producer,
            self.relay,
            self.relay_cpu_us,
            self.p50_ms,
            self.p99_ms,
        ]
        .iter()
        .all(|v| v.is_finite() && *v > 0.0)
    }
}

/// Where a sink's records go in one run.
struct Names {
    /// Topic prefix; also the RabbitMQ exchange and, in capitals, the NATS stream.
    prefix: String,
}

impl Names {
    fn new() -> Names {
        Names {
            prefix: testkit::unique_name("bench"),
        }
    }

    fn topic(&self) -> String {
        format!("{}.bench", self.prefix)
    }

    fn stream(&self) -> String {
        self.prefix.to_uppercase()
    }

    /// The relay's settings for `sink` (beside the lab's own).
    fn relay_env(&self, sink: &str) -> anyhow::Result<Vec<(&'static str, String)>> {
        let mut env = vec![
            ("OUTBOX_RELAY_SINK", sink.to_owned()),
            (
                "OUTBOX_RELAY_TOPIC_TEMPLATE",
                format!("{}.{{aggregatetype}}", self.prefix),
            ),
            (
                "OUTBOX_RELAY_DEAD_LETTER_TOPIC",
                format!("{}.dlq", self.prefix),
            ),
        ];
        match sink {
            "kafka" => {}
            "nats" => env.extend([
                ("OUTBOX_RELAY_NATS_URL", url("NATS_URL")?),
                ("OUTBOX_RELAY_NATS_STREAM", self.stream()),
                ("OUTBOX_RELAY_NATS_SUBJECTS", format!("{}.>", self.prefix)),
            ]),
            "rabbitmq" => env.extend([
                ("OUTBOX_RELAY_RABBITMQ_URL", url("RABBITMQ_URL")?),
                ("OUTBOX_RELAY_RABBITMQ_EXCHANGE", self.prefix.clone()),
            ]),
            "redis" => env.push(("OUTBOX_RELAY_REDIS_URL", url("REDIS_URL")?)),
            other => bail!("no sink {other}"),
        }
        Ok(env)
    }
}

fn url(name: &str) -> anyhow::Result<String> {
    testkit::setting(name).with_context(|| {
        format!("{name} is not set: the sinks part needs `scripts/env up` (NATS, RabbitMQ, Redis)")
    })
}

/// Each sink on a fresh lab.
pub(crate) async fn run(
    events: u64,
    latency_seconds: f64,
    relay_bin: &Path,
) -> anyhow::Result<Vec<SinkRun>> {
    let mut runs = Vec::new();
    for sink in SINKS {
        eprintln!(
            "    {sink}: {events} events, then {LATENCY_RATE} events/s for {latency_seconds} s"
        );
        runs.push(
            one(sink, events, latency_seconds, relay_bin)
                .await
                .with_context(|| format!("sink {sink}"))?,
        );
    }
    Ok(runs)
}

async fn one(
    sink: &'static str,
    events: u64,
    latency_seconds: f64,
    relay_bin: &Path,
) -> anyhow::Result<SinkRun> {
    let lab = RelayLab::new(relay_bin).await?;
    let names = Names::new();
    // RabbitMQ drops what no queue takes (and the relay dead-letters it): a queue
    // bound to everything, as a consumer would have.
    let rabbit = if sink == "rabbitmq" {
        Some(Rabbit::bind(&names).await?)
    } else {
        None
    };
    lab.write_rows(WORKLOAD, events).await?;

    let producer_secs = match sink {
        "kafka" => produce_only(&lab.broker.bootstrap(), WORKLOAD, events).await?,
        "nats" => nats_only(&names, events).await?,
        "rabbitmq" => {
            rabbit
                .as_ref()
                .context("bound")?
                .produce(&names, events)
                .await?
        }
        _ => redis_only(&names, events).await?,
    };

    let started = Instant::now();
    let mut relay = lab.start_relay(&names.relay_env(sink)?).await?;
    relay.wait_routed(events, Duration::from_secs(600)).await?;
    let relay_secs = started.elapsed().as_secs_f64();
    relay.sample();
    let relay_cpu_us = relay.cpu_seconds() * 1e6 / events as f64;

    let latency_events = (f64::from(LATENCY_RATE) * latency_seconds).round().max(1.0) as u64;
    let before = Buckets::parse(&relay.metrics().await, outbox_relay::metrics::COMMIT_TO_ACK);
    lab.write_paced(latency_events, LATENCY_RATE, WORKLOAD.payload_bytes)
        .await?;
    relay
        .wait_routed(events + latency_events, Duration::from_secs(300))
        .await?;
    let after = Buckets::parse(&relay.metrics().await, outbox_relay::metrics::COMMIT_TO_ACK);
    let window = after.minus(&before);
    if window.total() < latency_events {
        bail!(
            "the relay's latency histogram counted {} of {latency_events} events",
            window.total()
        );
    }
    relay.stop().await;
    lab.close().await;
    cleanup(sink, &names, rabbit).await;
    Ok(SinkRun {
        sink,
        events,
        producer: events as f64 / producer_secs,
        relay: events as f64 / relay_secs,
        relay_cpu_us,
        p50_ms: window.quantile(0.5) * 1e3,
        p99_ms: window.quantile(0.99) * 1e3,
    })
}

/// JetStream: the relay's publish (message id, headers, file storage), acknowledged,
/// at most the relay's window awaited.
async fn nats_only(names: &Names, events: u64) -> anyhow::Result<f64> {
    use async_nats::jetstream::{self, message::PublishMessage, stream};
    let client = async_nats::connect(url("NATS_URL")?).await?;
    let context = jetstream::ContextBuilder::new()
        .max_ack_inflight(WINDOW)
        .backpressure_on_inflight(true)
        .build(client);
    let stream_name = format!("{}_ONLY", names.stream());
    context
        .get_or_create_stream(stream::Config {
            name: stream_name.clone(),
            subjects: vec![format!("{}.only.>", names.prefix)],
            storage: stream::StorageType::File,
            ..Default::default()
        })
        .await?;
    let subject = format!("{}.only.bench", names.prefix);
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

/// Redis: `XADD` in pipelines of the relay's batch, one after another on one
/// connection.
async fn redis_only(names: &Names, events: u64) -> anyhow::Result<f64> {
    const BATCH: u64 = 256;
    let client = redis::Client::open(url("REDIS_URL")?)?;
    let mut connection = client.get_multiplexed_async_connection().await?;
    let stream = format!("{}.only.bench", names.prefix);
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
struct Rabbit {
    connection: Connection,
    channel: lapin::Channel,
    queue: String,
}

impl Rabbit {
    async fn bind(names: &Names) -> anyhow::Result<Rabbit> {
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
    async fn produce(&self, names: &Names, events: u64) -> anyhow::Result<f64> {
        let channel = self.connection.create_channel().await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        let payload = bench_payload(WORKLOAD.payload_bytes);
        let routing_key = format!("{}.only", names.prefix);
        let started = Instant::now();
        let mut confirms = FuturesUnordered::new();
        for n in 0..events {
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
            let confirm = channel
                .basic_publish(
                    names.prefix.as_str().into(),
                    routing_key.as_str().into(),
                    BasicPublishOptions {
                        mandatory: true,
                        immediate: false,
                    },
                    payload.as_bytes(),
                    properties,
                )
                .await?;
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

fn check_confirm(confirmation: lapin::Confirmation) -> anyhow::Result<()> {
    match confirmation {
        lapin::Confirmation::Ack(None) => Ok(()),
        other => bail!("RabbitMQ did not take a record: {other:?}"),
    }
}

/// Removes what the run left on the shared servers.
async fn cleanup(sink: &str, names: &Names, rabbit: Option<Rabbit>) {
    match sink {
        "nats" => {
            if let Ok(client) = async_nats::connect(url("NATS_URL").unwrap_or_default()).await {
                let _ = async_nats::jetstream::new(client)
                    .delete_stream(names.stream())
                    .await;
            }
        }
        "rabbitmq" => {
            if let Some(rabbit) = rabbit {
                let dlq = format!("{}.dlq", names.prefix);
                for queue in [rabbit.queue.as_str(), dlq.as_str()] {
                    let _ = rabbit
                        .channel
                        .queue_delete(queue.into(), QueueDeleteOptions::default())
                        .await;
                }
                let _ = rabbit
                    .channel
                    .exchange_delete(
                        names.prefix.as_str().into(),
                        ExchangeDeleteOptions::default(),
                    )
                    .await;
            }
        }
        "redis" => {
            if let Ok(client) = redis::Client::open(url("REDIS_URL").unwrap_or_default()) {
                if let Ok(mut connection) = client.get_multiplexed_async_connection().await {
                    let _: Result<(), _> = redis::cmd("DEL")
                        .arg(names.topic())
                        .query_async(&mut connection)
                        .await;
                }
            }
        }
        _ => {}
    }
}
