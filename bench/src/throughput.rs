//! Throughput: one backlog of outbox rows drained three ways, each timed from its
//! start until the last event is through:
//!
//! - **pgoutput**: a minimal reader (the relay's replication client, counting the
//!   pgoutput inserts and commits by their tag byte, decoding nothing else,
//!   producing nothing) drains a second slot of the same publication: how fast
//!   PostgreSQL decodes and sends the rows for one slot, the physical limit of any
//!   logical-replication relay. `pg_recvlogical` draining a third slot into
//!   `/dev/null` is shown beside it (it writes each message out, two system calls
//!   apiece, so it is the slower of the two on small transactions);
//! - **broker-only**: a producer configured like the relay's pushes the same number
//!   of records of the same size and waits for every acknowledgement;
//! - **relay**: `outbox-relay` streams the rows to the broker; done when its
//!   `outbox_relay_events_routed_total` (acknowledged events) reaches the count.
//!   `outbox-relay init` ran on the empty table, so the relay publishes no initial
//!   snapshot: every event comes through the stream, once (checked).

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use futures::StreamExt;
use outbox_relay::config::RelayConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};

use crate::relay_lab::{on_own_thread, stream_slot, RelayLab};
use crate::Workload;

/// What one workload measured.
#[derive(Debug, Clone)]
pub(crate) struct Throughput {
    pub(crate) workload: Workload,
    pub(crate) events: u64,
    /// Events per second of each reader.
    pub(crate) pgoutput: f64,
    pub(crate) recvlogical: f64,
    pub(crate) broker: f64,
    pub(crate) relay: f64,
    /// Events per second PostgreSQL committed while the backlog was written.
    pub(crate) written: f64,
    pub(crate) relay_peak_rss_kib: u64,
    /// The relay's CPU time (user + system) per event, microseconds: how much
    /// work an event costs it, steadier than a rate on a shared machine.
    pub(crate) relay_cpu_us: f64,
}

impl Throughput {
    /// Every rate measured and positive.
    pub(crate) fn complete(&self) -> bool {
        [
            self.pgoutput,
            self.recvlogical,
            self.broker,
            self.relay,
            self.written,
            self.relay_cpu_us,
        ]
        .iter()
        .all(|v| v.is_finite() && *v > 0.0)
            && self.relay_peak_rss_kib > 0
    }
}

/// One workload on a fresh lab.
pub(crate) async fn run(
    workload: Workload,
    events: u64,
    relay_bin: &Path,
) -> anyhow::Result<Throughput> {
    let lab = RelayLab::new(relay_bin).await?;
    // The baselines' slots on the relay's publication, made before the rows exist.
    for slot in [READER_SLOT, RECVLOGICAL_SLOT] {
        sqlx::query("SELECT pg_create_logical_replication_slot($1, 'pgoutput')")
            .bind(slot)
            .execute(&lab.db)
            .await?;
    }
    let write_secs = lab.write_rows(workload, events).await?;
    let end_lsn: String = sqlx::query_scalar("SELECT pg_current_wal_lsn()::text")
        .fetch_one(&lab.db)
        .await?;
    let written = lab.written().await?;
    if written != events {
        bail!("{written} rows written, {events} intended");
    }

    let transactions = events.div_ceil(workload.rows_per_txn);
    let url = lab.url.clone();
    let pgoutput_secs = on_own_thread(move || minimal_reader(url, events, transactions)).await?;
    let recvlogical_secs = recvlogical(&lab, &end_lsn).await?;
    let broker_secs = produce_only(&lab.broker.bootstrap(), workload, events).await?;

    let started = Instant::now();
    let mut relay = lab.start_relay(&[]).await?;
    relay.wait_routed(events, Duration::from_secs(600)).await?;
    let relay_secs = started.elapsed().as_secs_f64();
    // Anything beyond the rows (a snapshot of the table, a re-send) would have
    // inflated the rate.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let routed = relay.routed().await;
    if routed != events {
        bail!("the relay routed {routed} events for {events} rows");
    }
    relay.sample();
    let relay_cpu_us = relay.cpu_seconds() * 1e6 / events as f64;
    let relay_peak_rss_kib = relay.peak_rss_kib;
    relay.stop().await;
    lab.close().await;

    let rate = |secs: f64| events as f64 / secs;
    Ok(Throughput {
        workload,
        events,
        pgoutput: rate(pgoutput_secs),
        recvlogical: rate(recvlogical_secs),
        broker: rate(broker_secs),
        relay: rate(relay_secs),
        written: rate(write_secs),
        relay_peak_rss_kib,
        relay_cpu_us,
    })
}

/// The minimal reader's slot and `pg_recvlogical`'s.
const READER_SLOT: &str = "bench_reader";
const RECVLOGICAL_SLOT: &str = "bench_recvlogical";

/// Streams [`READER_SLOT`] until `events` inserts and `transactions` commits came
/// (pgoutput tags `I` and `C`); the seconds it took, connection included.
async fn minimal_reader(url: String, events: u64, transactions: u64) -> anyhow::Result<f64> {
    use outbox_relay::replication::ReplicationMessage;
    let started = Instant::now();
    let mut stream = stream_slot(&url, READER_SLOT).await?;
    let (mut inserts, mut commits) = (0u64, 0u64);
    while inserts < events || commits < transactions {
        match stream.next().await? {
            Some(ReplicationMessage::XLogData { data, .. }) => match data.first() {
                Some(b'I') => inserts += 1,
                Some(b'C') => commits += 1,
                _ => {}
            },
            Some(_) => {}
            None => bail!("the server ended the stream after {inserts} inserts"),
        }
    }
    let secs = started.elapsed().as_secs_f64();
    drop(stream);
    Ok(secs)
}

/// Drains [`RECVLOGICAL_SLOT`] up to `end_lsn` with `pg_recvlogical`; the seconds it took.
async fn recvlogical(lab: &RelayLab, end_lsn: &str) -> anyhow::Result<f64> {
    let program = testkit::pg_bin_dir().join("pg_recvlogical");
    let started = Instant::now();
    let out = tokio::process::Command::new(&program)
        .args([
            "-d",
            &lab.url,
            "-S",
            RECVLOGICAL_SLOT,
            "--start",
            "--no-loop",
        ])
        .args(["-o", "proto_version=1", "-o"])
        .arg(format!(
            "publication_names={}",
            outbox_relay::config::DEFAULT_PUBLICATION
        ))
        .args(["-E", end_lsn, "-f", "/dev/null"])
        .stdin(Stdio::null())
        .output()
        .await
        .with_context(|| format!("running {}", program.display()))?;
    let secs = started.elapsed().as_secs_f64();
    if !out.status.success() {
        bail!(
            "pg_recvlogical failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(secs)
}

/// A producer configured like the relay's, on a topic of 3 partitions made for it,
/// warmed up (topic metadata, producer id) as a running relay's is.
pub(crate) async fn broker_only_producer(
    brokers: &str,
    topic: &str,
) -> anyhow::Result<FutureProducer> {
    let config = RelayConfig::new("postgres://unused@localhost/unused", brokers);
    let admin: AdminClient<_> = outbox_relay::sink::kafka::client_config(&config.kafka).create()?;
    let created = admin
        .create_topics(
            &[NewTopic::new(topic, 3, TopicReplication::Fixed(1))],
            &AdminOptions::new(),
        )
        .await?;
    for result in created {
        if let Err((name, code)) = result {
            bail!("creating topic {name}: {code}");
        }
    }
    let producer: FutureProducer =
        outbox_relay::sink::kafka::producer_config(&config.kafka).create()?;
    let warm = FutureRecord::to(topic).key("warm-up").payload("{}");
    producer
        .send(warm, Duration::from_secs(30))
        .await
        .map_err(|(e, _)| anyhow::anyhow!("warming the producer up: {e}"))?;
    Ok(producer)
}

/// A record like the relay's: key, JSON payload of about `bytes`, headers `id`
/// and `type`; the caller keeps the id and key alive.
pub(crate) fn bench_record<'a>(
    topic: &'a str,
    key: &'a str,
    id: &'a str,
    payload: &'a str,
) -> FutureRecord<'a, str, str> {
    let headers = OwnedHeaders::new()
        .insert(Header {
            key: "id",
            value: Some(id),
        })
        .insert(Header {
            key: "type",
            value: Some("BenchEvent"),
        });
    FutureRecord::to(topic)
        .key(key)
        .payload(payload)
        .headers(headers)
}

/// A JSON payload of about `bytes` bytes.
pub(crate) fn bench_payload(bytes: usize) -> String {
    format!(
        "{{\"n\":0,\"data\":\"{}\"}}",
        "x".repeat(bytes.saturating_sub(30))
    )
}

/// Produces `events` records and waits for every acknowledgement, keeping no more
/// in flight than the relay would; the seconds it took.
pub(crate) async fn produce_only(
    brokers: &str,
    workload: Workload,
    events: u64,
) -> anyhow::Result<f64> {
    let topic = "bench.broker-only";
    let producer = broker_only_producer(brokers, topic).await?;
    let max_in_flight = outbox_relay::config::DEFAULT_MAX_IN_FLIGHT;
    let payload = bench_payload(workload.payload_bytes);
    let started = Instant::now();
    let mut pending: futures::stream::FuturesUnordered<rdkafka::producer::DeliveryFuture> =
        futures::stream::FuturesUnordered::new();
    for n in 0..events {
        let key = (n % 1000).to_string();
        let id = uuid::Uuid::new_v4().to_string();
        let mut record = bench_record(topic, &key, &id, &payload);
        // A full queue is backpressure, as in the relay: librdkafka counts a record
        // until just after its delivery report, so it can be full for a moment
        // below `max_in_flight` futures.
        let delivery = loop {
            match producer.send_result(record) {
                Ok(delivery) => break delivery,
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                    record = back;
                    match pending.next().await {
                        Some(result) => {
                            result?.map_err(|(e, _)| e)?;
                        }
                        None => tokio::time::sleep(Duration::from_millis(1)).await,
                    }
                }
                Err((e, _)) => bail!("handing a record to the producer: {e}"),
            }
        };
        pending.push(delivery);
        while pending.len() >= max_in_flight {
            if let Some(result) = pending.next().await {
                result?.map_err(|(e, _)| e)?;
            }
        }
    }
    while let Some(result) = pending.next().await {
        result?.map_err(|(e, _)| e)?;
    }
    Ok(started.elapsed().as_secs_f64())
}
