//! Takeover: three relays configured alike on one slot (the sidecars of a service
//! with three replicas) while a writer commits one-row transactions at a steady
//! rate. The active relay is SIGKILLed, SIGTERMed (a rolling deploy) and SIGSTOPped
//! (a hung process) in turn; the time from the signal until another relay reports
//! `streaming` on `/health` is the takeover time. A killed or stopped relay comes
//! back (a new process, or SIGCONT) and must stand by. At the end every committed
//! event must be in the topic; the records beyond them are the duplicates the
//! takeovers caused.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Headers;
use rdkafka::{Message, Offset, TopicPartitionList};

use crate::relay_lab::{RelayLab, RelayProcess, TOPIC};

/// The writer's rate, events per second.
pub(crate) const RATE: u32 = 500;
/// Payload bytes per event.
const PAYLOAD_BYTES: usize = 300;
/// Relays on the slot.
pub(crate) const RELAYS: usize = 3;
/// The longest a takeover may take before the run fails.
const LIMIT: Duration = Duration::from_secs(120);
/// Load between two takeovers.
const BETWEEN: Duration = Duration::from_secs(2);

/// How a takeover is provoked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Cause {
    Kill,
    Term,
    Stop,
}

impl Cause {
    pub(crate) const fn name(self) -> &'static str {
        match self {
            Cause::Kill => "SIGKILL",
            Cause::Term => "SIGTERM",
            Cause::Stop => "SIGSTOP",
        }
    }
}

/// How many takeovers of each cause, and the relays' settings.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Plan {
    pub(crate) kills: usize,
    pub(crate) terms: usize,
    pub(crate) stops: usize,
    /// `postgres.status_interval_ms`.
    pub(crate) status_interval: Duration,
    /// `postgres.takeover_after_ms`: how long a hung holder keeps the slot.
    pub(crate) takeover_after: Duration,
}

#[derive(Debug, Clone)]
pub(crate) struct Takeover {
    pub(crate) plan: Plan,
    /// Per cause, the takeover times.
    pub(crate) times: Vec<(Cause, Vec<Duration>)>,
    pub(crate) events: u64,
    pub(crate) records: u64,
    pub(crate) max_in_flight: usize,
}

impl Takeover {
    pub(crate) fn complete(&self) -> bool {
        self.events > 0 && self.times.iter().all(|(_, t)| !t.is_empty())
    }

    pub(crate) fn duplicates(&self) -> u64 {
        self.records.saturating_sub(self.events)
    }

    pub(crate) fn takeovers(&self) -> usize {
        self.times.iter().map(|(_, t)| t.len()).sum()
    }
}

pub(crate) async fn run(plan: Plan, relay_bin: &Path) -> anyhow::Result<Takeover> {
    let lab = RelayLab::new(relay_bin).await?;
    let settings = [
        (
            "OUTBOX_RELAY_STATUS_INTERVAL_MS",
            plan.status_interval.as_millis().to_string(),
        ),
        (
            "OUTBOX_RELAY_TAKEOVER_AFTER_MS",
            plan.takeover_after.as_millis().to_string(),
        ),
    ];
    let mut relays = Vec::new();
    for _ in 0..RELAYS {
        relays.push(lab.start_relay(&settings).await?);
    }
    let mut active = settle(&relays).await?;

    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let url = lab.url.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let db = sqlx::PgPool::connect(&url).await?;
            while !stop.load(Ordering::Relaxed) {
                // A second of load at a time, until told to stop.
                sqlx::query("CALL bench_paced($1, $2, $3)")
                    .bind(i64::from(RATE))
                    .bind(i32::try_from(RATE)?)
                    .bind(i32::try_from(PAYLOAD_BYTES)?)
                    .execute(&db)
                    .await?;
            }
            db.close().await;
            anyhow::Ok(())
        })
    };

    let mut times: Vec<(Cause, Vec<Duration>)> = Vec::new();
    let rounds = [
        (Cause::Kill, plan.kills),
        (Cause::Term, plan.terms),
        (Cause::Stop, plan.stops),
    ];
    for (cause, count) in rounds {
        let mut measured = Vec::new();
        for _ in 0..count {
            tokio::time::sleep(BETWEEN).await;
            let signalled = Instant::now();
            match cause {
                Cause::Kill => relays[active].kill().await,
                Cause::Term => relays[active].terminate().await,
                Cause::Stop => relays[active].signal("STOP")?,
            }
            let next = wait_streaming(&relays, Some(active), LIMIT).await?;
            let took = signalled.elapsed();
            eprintln!(
                "    takeover after {}: {} ms",
                cause.name(),
                took.as_millis()
            );
            measured.push(took);
            match cause {
                Cause::Stop => relays[active].signal("CONT")?,
                Cause::Kill | Cause::Term => {
                    relays[active] = lab.start_relay(&settings).await?;
                }
            }
            active = settle(&relays).await?;
            if active != next {
                bail!("the relay that took over ({next}) lost the slot to {active}");
            }
        }
        times.push((cause, measured));
    }
    stop.store(true, Ordering::Relaxed);
    writer.await.context("the writer")??;

    // Every committed event must arrive; the records beyond them are duplicates.
    let ids = lab.event_ids().await?;
    let events = ids.len() as u64;
    let deadline = Instant::now() + Duration::from_secs(300);
    let records = loop {
        let (records, seen) = read_topic(&lab).await?;
        let missing = ids.iter().filter(|id| !seen.contains(*id)).count();
        if missing == 0 {
            break records;
        }
        if Instant::now() > deadline {
            bail!("{missing} of {events} events never arrived ({records} records in the topic)");
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    };
    for relay in relays {
        relay.stop().await;
    }
    lab.close().await;
    Ok(Takeover {
        plan,
        times,
        events,
        records,
        max_in_flight: outbox_relay::config::DEFAULT_MAX_IN_FLIGHT,
    })
}

/// Waits until one relay streams and every other stands by; returns the active one.
async fn settle(relays: &[RelayProcess]) -> anyhow::Result<usize> {
    let deadline = Instant::now() + LIMIT;
    loop {
        let mut statuses = Vec::new();
        for relay in relays {
            statuses.push(relay.status().await);
        }
        let streaming: Vec<usize> = (0..relays.len())
            .filter(|&i| statuses[i].as_deref() == Some("streaming"))
            .collect();
        let standing_by = statuses
            .iter()
            .filter(|s| s.as_deref() == Some("standby"))
            .count();
        if let ([active], true) = (streaming.as_slice(), standing_by == relays.len() - 1) {
            return Ok(*active);
        }
        if Instant::now() > deadline {
            bail!(
                "the relays never settled into one active and the rest standing by: {statuses:?}"
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The index of a relay other than `except` reporting `streaming`.
async fn wait_streaming(
    relays: &[RelayProcess],
    except: Option<usize>,
    limit: Duration,
) -> anyhow::Result<usize> {
    let deadline = Instant::now() + limit;
    loop {
        for (i, relay) in relays.iter().enumerate() {
            if Some(i) != except && relay.status().await.as_deref() == Some("streaming") {
                return Ok(i);
            }
        }
        if Instant::now() > deadline {
            bail!("no relay took over within {limit:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Reads [`TOPIC`] from the beginning up to its end now: the records, and the event
/// ids (header `id`) among them.
async fn read_topic(lab: &RelayLab) -> anyhow::Result<(u64, HashSet<String>)> {
    let brokers = lab.broker.bootstrap();
    tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer = testkit::consumer_config_on(Some(&brokers), "bench-takeover")
            .create()
            .context("creating a consumer")?;
        let mut ends = HashMap::new();
        let mut assignment = TopicPartitionList::new();
        for (partition, low, high) in crate::relay_lab::watermarks(&consumer)? {
            if high > low {
                ends.insert(partition, high);
                assignment.add_partition_offset(TOPIC, partition, Offset::Offset(low))?;
            }
        }
        let mut records = 0;
        let mut ids = HashSet::new();
        if ends.is_empty() {
            return Ok((records, ids));
        }
        consumer.assign(&assignment)?;
        let deadline = Instant::now() + Duration::from_secs(120);
        while !ends.is_empty() {
            if Instant::now() > deadline {
                bail!("reading {TOPIC} did not reach its end: {ends:?} left");
            }
            let Some(message) = consumer.poll(Duration::from_millis(500)) else {
                continue;
            };
            let message = message?;
            records += 1;
            if let Some(id) = message
                .headers()
                .and_then(|h| h.iter().find(|h| h.key == "id"))
                .and_then(|h| h.value)
            {
                ids.insert(String::from_utf8_lossy(id).into_owned());
            }
            if ends
                .get(&message.partition())
                .is_some_and(|&end| message.offset() + 1 >= end)
            {
                ends.remove(&message.partition());
            }
        }
        anyhow::Ok((records, ids))
    })
    .await?
}
