//! Latency at an offered load: one-row transactions committed at a fixed rate,
//! and the time from each commit to the broker's acknowledgement of its record.
//!
//! The relay measures that itself: `outbox_relay_commit_to_ack_seconds`, from the
//! commit timestamp in the stream (the server's clock, the same machine here) to
//! the delivery report. Quantiles come from the histogram's buckets, taken
//! before and after each load and subtracted, interpolated within a bucket; the
//! buckets are 0.5 ms to 1 ms wide below 10 ms, so a p99 against a 10 ms goal
//! is read exactly at that bound.
//!
//! Two baselines, in the same run and at the same rate, after the relay's pass:
//! - **pgoutput**: a minimal reader of a slot of its own times each transaction
//!   from its commit timestamp to receiving its Begin message: how late the
//!   server hands a commit to any reader (the floor under the relay's latency);
//! - **broker-only**: a producer configured like the relay's sends records of the
//!   same size straight to the broker and times each from hand-over to
//!   acknowledgement: what the broker and librdkafka alone cost.

use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context};
use outbox_relay::metrics::COMMIT_TO_ACK;

use crate::relay_lab::{on_own_thread, stream_slot, RelayLab};
use crate::throughput::broker_only_producer;

/// Payload bytes of the latency runs.
pub(crate) const PAYLOAD_BYTES: usize = 300;

/// What one offered load measured.
#[derive(Debug, Clone)]
pub(crate) struct Latency {
    pub(crate) offered: u32,
    /// The rate the writer kept (below `offered` when it could not keep up).
    pub(crate) achieved: f64,
    pub(crate) events: u64,
    /// Commit to a minimal reader receiving it: the server's share.
    pub(crate) pgoutput_p50_ms: f64,
    pub(crate) pgoutput_p99_ms: f64,
    pub(crate) relay_p50_ms: f64,
    pub(crate) relay_p99_ms: f64,
    pub(crate) broker_p50_ms: f64,
    pub(crate) broker_p99_ms: f64,
}

impl Latency {
    pub(crate) fn complete(&self) -> bool {
        self.achieved > 0.0
            && [
                self.pgoutput_p50_ms,
                self.pgoutput_p99_ms,
                self.relay_p50_ms,
                self.relay_p99_ms,
                self.broker_p50_ms,
                self.broker_p99_ms,
            ]
            .iter()
            .all(|v| v.is_finite() && *v > 0.0)
    }
}

/// Each offered load for `seconds`, on one lab: first through the running relay,
/// then (the relay stopped, so only one slot is decoded at a time) to the minimal
/// reader, then to the broker-only producer.
pub(crate) async fn run(
    loads: &[u32],
    seconds: f64,
    relay_bin: &Path,
) -> anyhow::Result<Vec<Latency>> {
    let lab = RelayLab::new(relay_bin).await?;
    let mut relay = lab.start_relay(&[]).await?;
    // Warm up: the topic exists and the producer has its id before the clock runs.
    lab.write_paced(100, 1_000, PAYLOAD_BYTES).await?;
    relay.wait_routed(100, Duration::from_secs(120)).await?;
    let events_of = |offered: u32| (f64::from(offered) * seconds).round().max(1.0) as u64;
    let mut results = Vec::new();
    for &offered in loads {
        let events = events_of(offered);
        eprintln!("    {offered} events/s for {seconds} s through the relay");
        let routed_before = relay.routed().await;
        let before = Buckets::parse(&relay.metrics().await, COMMIT_TO_ACK);
        let write_secs = lab.write_paced(events, offered, PAYLOAD_BYTES).await?;
        relay
            .wait_routed(routed_before + events, Duration::from_secs(300))
            .await?;
        let after = Buckets::parse(&relay.metrics().await, COMMIT_TO_ACK);
        let window = after.minus(&before);
        if window.total() < events {
            bail!(
                "the relay's latency histogram counted {} of {events} events",
                window.total()
            );
        }
        results.push(Latency {
            offered,
            achieved: events as f64 / write_secs,
            events,
            pgoutput_p50_ms: f64::NAN,
            pgoutput_p99_ms: f64::NAN,
            relay_p50_ms: window.quantile(0.5) * 1e3,
            relay_p99_ms: window.quantile(0.99) * 1e3,
            broker_p50_ms: f64::NAN,
            broker_p99_ms: f64::NAN,
        });
    }
    relay.stop().await;

    for result in &mut results {
        eprintln!("    {} events/s to a minimal reader", result.offered);
        let reads = read_latencies(&lab, result.offered, result.events).await?;
        (result.pgoutput_p50_ms, result.pgoutput_p99_ms) = p50_p99_ms(reads);
    }

    let producer = broker_only_producer(&lab.broker.bootstrap(), "bench.latency").await?;
    for result in &mut results {
        eprintln!("    {} events/s broker-only", result.offered);
        let acks = broker_latencies(&producer, result.offered, result.events).await?;
        (result.broker_p50_ms, result.broker_p99_ms) = p50_p99_ms(acks);
    }
    // Before the broker stops, or librdkafka reports it down.
    drop(producer);
    lab.close().await;
    Ok(results)
}

/// Writes `events` one-row transactions at `per_second` while a minimal reader
/// streams a slot of its own (made just before), and returns each transaction's
/// seconds from its commit timestamp to the reader receiving its Begin message:
/// how late the server hands a commit to any reader.
async fn read_latencies(lab: &RelayLab, per_second: u32, events: u64) -> anyhow::Result<Vec<f64>> {
    use outbox_relay::pgoutput::{self, LogicalMessage};
    use outbox_relay::replication::ReplicationMessage;
    let slot = format!("bench_latency_{per_second}");
    sqlx::query("SELECT pg_create_logical_replication_slot($1, 'pgoutput')")
        .bind(&slot)
        .execute(&lab.db)
        .await?;
    let (url, reading) = (lab.url.clone(), slot.clone());
    let (started, ready) = tokio::sync::oneshot::channel();
    let reader = tokio::spawn(on_own_thread(move || async move {
        let mut stream = stream_slot(&url, &reading).await?;
        let _ = started.send(());
        let mut latencies = Vec::new();
        while (latencies.len() as u64) < events {
            let Some(message) = stream.next().await? else {
                bail!("the server ended the stream");
            };
            if let ReplicationMessage::XLogData { data, .. } = message {
                if let Ok(LogicalMessage::Begin(begin)) = pgoutput::decode(&data) {
                    if let Some(late) = begin
                        .commit_time()
                        .and_then(|t| std::time::SystemTime::now().duration_since(t).ok())
                    {
                        latencies.push(late.as_secs_f64());
                    }
                }
            }
        }
        anyhow::Ok(latencies)
    }));
    if ready.await.is_err() {
        // It stopped before streaming: its own error says why.
        reader.await??;
        bail!("the minimal reader stopped before streaming");
    }
    lab.write_paced(events, per_second, PAYLOAD_BYTES).await?;
    let latencies = tokio::time::timeout(Duration::from_secs(300), reader)
        .await
        .context("the minimal reader did not see every transaction")???;
    sqlx::query("SELECT pg_drop_replication_slot($1)")
        .bind(&slot)
        .execute(&lab.db)
        .await
        .ok();
    Ok(latencies)
}

/// Sends `events` records at `per_second` (in 1 ms ticks) and returns each one's
/// seconds from hand-over to acknowledgement.
async fn broker_latencies(
    producer: &rdkafka::producer::FutureProducer,
    per_second: u32,
    events: u64,
) -> anyhow::Result<Vec<f64>> {
    crate::sinks::producers::paced(per_second, events, |n| {
        crate::sinks::producers::kafka_one(producer, "bench.latency", n)
    })
    .await
}

/// The median and the 99th percentile of `seconds`, in milliseconds.
pub(crate) fn p50_p99_ms(mut seconds: Vec<f64>) -> (f64, f64) {
    seconds.sort_by(f64::total_cmp);
    (
        quantile(&seconds, 0.5) * 1e3,
        quantile(&seconds, 0.99) * 1e3,
    )
}

/// The `q` quantile of sorted `values` (nearest rank).
pub(crate) fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

/// A Prometheus histogram read from text: (upper bound, cumulative count), the
/// `+Inf` bucket last with an infinite bound.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct Buckets(Vec<(f64, u64)>);

impl Buckets {
    pub(crate) fn parse(text: &str, name: &str) -> Buckets {
        let prefix = format!("{name}_bucket{{le=\"");
        let mut buckets: Vec<(f64, u64)> = text
            .lines()
            .filter_map(|line| {
                let rest = line.strip_prefix(&prefix)?;
                let (bound, rest) = rest.split_once("\"}")?;
                let bound = if bound == "+Inf" {
                    f64::INFINITY
                } else {
                    bound.parse().ok()?
                };
                Some((bound, rest.trim().parse().ok()?))
            })
            .collect();
        buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
        Buckets(buckets)
    }

    /// The observations made between `earlier` and `self`.
    pub(crate) fn minus(&self, earlier: &Buckets) -> Buckets {
        Buckets(
            self.0
                .iter()
                .map(|&(bound, n)| {
                    let before = earlier
                        .0
                        .iter()
                        .find(|(b, _)| *b == bound)
                        .map_or(0, |(_, n)| *n);
                    (bound, n.saturating_sub(before))
                })
                .collect(),
        )
    }

    pub(crate) fn total(&self) -> u64 {
        self.0.last().map_or(0, |(_, n)| *n)
    }

    /// The `q` quantile, interpolated linearly within its bucket (from the bound
    /// below, or 0); in the `+Inf` bucket, the largest finite bound. NaN when
    /// empty.
    pub(crate) fn quantile(&self, q: f64) -> f64 {
        let total = self.total();
        if total == 0 {
            return f64::NAN;
        }
        let target = q * total as f64;
        let mut lower = (0.0, 0u64);
        for &(bound, cumulative) in &self.0 {
            if cumulative as f64 >= target && cumulative > lower.1 {
                if bound.is_infinite() {
                    return lower.0;
                }
                let share = (target - lower.1 as f64) / (cumulative - lower.1) as f64;
                return lower.0 + (bound - lower.0) * share.clamp(0.0, 1.0);
            }
            lower = (bound, cumulative);
        }
        lower.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "# TYPE h histogram\n\
        h_bucket{le=\"0.001\"} 10\n\
        h_bucket{le=\"0.002\"} 90\n\
        h_bucket{le=\"0.005\"} 100\n\
        h_bucket{le=\"+Inf\"} 100\n\
        h_sum 0.2\nh_count 100\n\
        other_bucket{le=\"1\"} 5\n";

    #[test]
    fn reads_and_interpolates_a_histogram() {
        let b = Buckets::parse(TEXT, "h");
        assert_eq!(b.total(), 100);
        // 50th of 100: in (1 ms, 2 ms], 40 of its 80.
        assert!((b.quantile(0.5) - 0.0015).abs() < 1e-12);
        // 99th: in (2 ms, 5 ms], 9 of its 10.
        assert!((b.quantile(0.99) - 0.0047).abs() < 1e-12);
        assert!((b.quantile(0.05) - 0.0005).abs() < 1e-12);
    }

    #[test]
    fn a_window_is_the_difference_of_two_readings() {
        let before = Buckets::parse(TEXT, "h");
        let after = Buckets::parse(
            "h_bucket{le=\"0.001\"} 10\nh_bucket{le=\"0.002\"} 90\n\
             h_bucket{le=\"0.005\"} 110\nh_bucket{le=\"+Inf\"} 120\n",
            "h",
        );
        let window = after.minus(&before);
        assert_eq!(window.total(), 20);
        // Half of the window is beyond the last bound: its p99 is that bound.
        assert!((window.quantile(0.99) - 0.005).abs() < 1e-12);
        assert!(window.quantile(0.25) > 0.002 && window.quantile(0.25) <= 0.005);
        assert!(Buckets::default().quantile(0.5).is_nan());
    }

    #[test]
    fn nearest_rank_quantiles() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(quantile(&v, 0.5), 50.0);
        assert_eq!(quantile(&v, 0.99), 99.0);
        assert_eq!(quantile(&v, 1.0), 100.0);
        assert_eq!(quantile(&[7.0], 0.99), 7.0);
        assert!(quantile(&[], 0.5).is_nan());
    }
}
