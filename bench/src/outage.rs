//! Memory through a broker outage under load: the writer commits one-row
//! transactions at a steady rate throughout; after a warm-up the broker is paused
//! (SIGSTOP: a memory-storage broker must not be restarted) for the outage, then
//! resumed. The relay's resident memory and records in flight are sampled every
//! 250 ms. The relay must stop reading once its window is full (`max_in_flight`
//! records handed over and not yet confirmed, most of them awaiting their
//! acknowledgement), so from then on its memory levels off instead of growing with
//! the backlog; and everything must arrive afterwards.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
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
    pub(crate) in_flight_bound: usize,
    /// Highest resident memory (KiB) before the outage.
    pub(crate) rss_before_kib: u64,
    /// Resident memory when the records in flight first reached the bound, and
    /// how far into the outage that was.
    pub(crate) rss_at_bound_kib: u64,
    pub(crate) bound_after: Duration,
    /// Highest resident memory from then until the broker returned.
    pub(crate) rss_after_bound_kib: u64,
    pub(crate) in_flight_max: u64,
    /// Events committed when the broker returned (all unacknowledged or in flight).
    pub(crate) backlog: u64,
    /// From the broker's return until that backlog was acknowledged.
    pub(crate) recovery: Duration,
}

impl Outage {
    pub(crate) fn complete(&self) -> bool {
        self.rss_before_kib > 0 && self.rss_at_bound_kib > 0 && self.rss_after_bound_kib > 0
    }
}

/// A broker outage of `outage` under the relay's default settings; its in-flight
/// bound is reached after `bound / RATE` seconds of it.
pub(crate) async fn run(outage: Duration, relay_bin: &Path) -> anyhow::Result<Outage> {
    let bound = outbox_relay::config::DEFAULT_MAX_IN_FLIGHT;
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
    let mut at_bound: Option<(u64, Duration)> = None;
    let mut after_bound = 0;
    let mut in_flight_max = 0;
    let mut paused_at: Option<Instant> = None;
    loop {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let rss = relay.sample().context("the relay is gone")?;
        let in_flight = metric_sum(&relay.metrics().await, RECORDS_IN_FLIGHT);
        in_flight_max = in_flight_max.max(in_flight);
        match paused_at {
            None if started.elapsed() < WARM => rss_before = rss_before.max(rss),
            None => {
                lab.broker.pause();
                paused_at = Some(Instant::now());
                eprintln!("    broker paused for {outage:?}");
            }
            Some(at) if at.elapsed() >= outage => break,
            Some(at) => {
                if at_bound.is_none() && relay.reading_paused().await {
                    at_bound = Some((rss, at.elapsed()));
                }
                if at_bound.is_some() {
                    after_bound = after_bound.max(rss);
                }
            }
        }
    }
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
    let Some((rss_at_bound, bound_after)) = at_bound else {
        bail!("the relay never stopped reading at its window of {bound} during the outage ({in_flight_max} records in flight at most)");
    };
    Ok(Outage {
        outage,
        events,
        in_flight_bound: bound,
        rss_before_kib: rss_before,
        rss_at_bound_kib: rss_at_bound,
        bound_after,
        rss_after_bound_kib: after_bound,
        in_flight_max,
        backlog,
        recovery,
    })
}
