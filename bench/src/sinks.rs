//! Sinks: the relay publishing one backlog to each of its four destinations,
//! against a producer that publishes the same number of records of the same size
//! to that destination with the relay's client and guarantees (acknowledged,
//! persistent, at most the relay's window in flight) and nothing else; then
//! commit → acknowledgement at 1 k events/s, from the relay's histogram, beside
//! that producer's own hand-over → acknowledgement at the same rate.
//!
//! Kafka is the lab's private broker; NATS, RabbitMQ and Redis are the servers
//! `scripts/env up` found or started (`NATS_URL`, `RABBITMQ_URL`, `REDIS_URL`),
//! each run on names of its own, removed afterwards.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use lapin::options::{ExchangeDeleteOptions, QueueDeleteOptions};

pub(crate) mod producers;

use producers::{kafka_one, nats_only, nats_paced, paced, redis_only, redis_paced, Rabbit};

use crate::latency::Buckets;
use crate::relay_lab::RelayLab;
use crate::throughput::produce_only;
use crate::Workload;

/// The backlog's shape: transactions of 100 rows of 300 B.
pub(crate) const WORKLOAD: Workload = Workload {
    rows_per_txn: 100,
    payload_bytes: 300,
};
/// The offered load of the latency measurement, events per second.
pub(crate) const LATENCY_RATE: u32 = 1_000;
/// Records a producer keeps in flight: the relay's window.
pub(super) const WINDOW: usize = outbox_relay::config::DEFAULT_MAX_IN_FLIGHT;

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
    /// The producer's hand-over → acknowledgement at [`LATENCY_RATE`].
    pub(crate) producer_p50_ms: f64,
    pub(crate) producer_p99_ms: f64,
}

impl SinkRun {
    pub(crate) fn complete(&self) -> bool {
        [
            self.producer,
            self.relay,
            self.relay_cpu_us,
            self.p50_ms,
            self.p99_ms,
            self.producer_p50_ms,
            self.producer_p99_ms,
        ]
        .iter()
        .all(|v| v.is_finite() && *v > 0.0)
    }
}

/// Where a sink's records go in one run.
pub(super) struct Names {
    /// Topic prefix; also the RabbitMQ exchange and, in capitals, the NATS stream.
    pub(super) prefix: String,
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

    pub(super) fn stream(&self) -> String {
        self.prefix.to_uppercase()
    }

    /// The producers' names: apart from the relay's (a JetStream subject belongs
    /// to one stream).
    pub(super) fn producer_root(&self) -> String {
        format!("{}_p", self.prefix)
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

pub(super) fn url(name: &str) -> anyhow::Result<String> {
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

    eprintln!("    {sink}: the producer alone at {LATENCY_RATE} events/s");
    let acks = match sink {
        "kafka" => {
            let producer =
                crate::throughput::broker_only_producer(&lab.broker.bootstrap(), "bench.paced")
                    .await?;
            let acks = paced(LATENCY_RATE, latency_events, |n| {
                kafka_one(&producer, "bench.paced", n)
            })
            .await?;
            drop(producer);
            acks
        }
        "nats" => nats_paced(&names, latency_events).await?,
        "rabbitmq" => {
            rabbit
                .as_ref()
                .context("bound")?
                .paced(&names, latency_events)
                .await?
        }
        _ => redis_paced(&names, latency_events).await?,
    };
    let (producer_p50_ms, producer_p99_ms) = crate::latency::p50_p99_ms(acks);
    lab.close().await;
    cleanup(sink, &names, rabbit).await;
    Ok(SinkRun {
        producer_p50_ms,
        producer_p99_ms,
        sink,
        events,
        producer: events as f64 / producer_secs,
        relay: events as f64 / relay_secs,
        relay_cpu_us,
        p50_ms: window.quantile(0.5) * 1e3,
        p99_ms: window.quantile(0.99) * 1e3,
    })
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
