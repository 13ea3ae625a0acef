//! Memory through a broker outage under load: the writer commits one-row
//! transactions at a steady rate throughout; after a warm-up the broker is paused
//! (SIGSTOP: a memory-storage broker must not be restarted) for the outage, then
//! resumed. The relay's resident memory and records in flight are sampled every
//! 250 ms. It must stop reading at its in-flight bound, so its memory levels off
//! instead of growing with the backlog, and everything must arrive afterwards.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context;
use outbox_relay::metrics::RECORDS_IN_FLIGHT;
use testkit::process::metric_sum;

use crate::relay_lab::RelayLab;

/// The writer's rate during the outage run, events per second.
pub(crate) const RATE: u32 = 1_000;
/// Payload bytes during the outage run.
pub(crate) const PAYLOAD_BYTES: usize = 300;
/// Load before the outage and after it.
const WARM: Duration = Duration::from_secs(5);

#[derive(Debug, Clone)]
pub(crate) struct Outage {
    pub(crate) outage: Duration,
    pub(crate) events: u64,
    /// Highest resident memory while the broker was up, before the outage (KiB).
    pub(crate) rss_before_kib: u64,
    /// Highest resident memory in the first and the second half of the outage.
    pub(crate) rss_first_half_kib: u64,
    pub(crate) rss_second_half_kib: u64,
    pub(crate) in_flight_max: u64,
    pub(crate) in_flight_bound: u64,
    /// Events committed when the broker returned (all unacknowledged or in flight).
    pub(crate) backlog: u64,
    /// From the broker's return until that backlog was acknowledged.
    pub(crate) recovery: Duration,
}

impl Outage {
    pub(crate) fn complete(&self) -> bool {
        self.rss_before_kib > 0 && self.rss_first_half_kib > 0 && self.rss_second_half_kib > 0
    }
}

pub(crate) async fn run(outage: Duration, relay_bin: &Path) -> anyhow::Result<Outage> {
    let lab = RelayLab::new(relay_bin).await?;
    let mut relay = lab.start_relay(&[]).await?;
    lab.write_paced(100, RATE, PAYLOAD_BYTES).await?;
    relay.wait_routed(100, Duration::from_secs(120)).await?;

    let total = WARM + outage + WARM;
    let events = (f64::from(RATE) * total.as_secs_f64()) as u64;
    let writer = {
        let url = lab.url.clone();
        tokio::spawn(async move {
            let db = sqlx::PgPool::connect(&url).await?;
            sqlx::query("CALL bench_paced($1, $2, $3)")
                .bind(i64::try_from(events)?)
                .bind(i32::try_from(RATE)?)
                .bind(i32::try_from(PAYLOAD_BYTES)?)
                .execute(&db)
                .await?;
            anyhow::Ok(())
        })
    };
    let started = Instant::now();
    let mut rss_before = 0;
    let mut first_half = 0;
    let mut second_half = 0;
    let mut in_flight_max = 0;
    let mut paused = false;
    while started.elapsed() < WARM + outage {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let at = started.elapsed();
        let rss = relay.sample().context("the relay is gone")?;
        in_flight_max = in_flight_max.max(metric_sum(&relay.metrics().await, RECORDS_IN_FLIGHT));
        if at < WARM {
            rss_before = rss_before.max(rss);
            continue;
        }
        if !paused {
            lab.broker.pause();
            paused = true;
            eprintln!("    broker paused for {outage:?}");
            continue;
        }
        if at < WARM + outage / 2 {
            first_half = first_half.max(rss);
        } else {
            second_half = second_half.max(rss);
        }
    }
    if !paused {
        lab.broker.pause();
    }
    // /metrics is served while the broker is away, so the in-flight count was read.
    let backlog = lab.written().await?;
    lab.broker.resume();
    let resumed = Instant::now();
    relay.wait_routed(backlog, Duration::from_secs(300)).await?;
    let recovery = resumed.elapsed();
    writer.await.context("the writer")??;
    relay
        .wait_routed(events + 100, Duration::from_secs(300))
        .await?;
    relay.stop().await;
    lab.close().await;
    Ok(Outage {
        outage,
        events,
        rss_before_kib: rss_before,
        rss_first_half_kib: first_half,
        rss_second_half_kib: second_half,
        in_flight_max,
        in_flight_bound: outbox_relay::config::DEFAULT_MAX_IN_FLIGHT as u64,
        backlog,
        recovery,
    })
}
