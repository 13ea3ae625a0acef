//! Large transactions: one transaction of many outbox rows (300 B of payload
//! each), relayed with the relay's defaults twice in the same run — asking for
//! protocol 2 with streaming (the server sends the transaction while it is being
//! written; the relay keeps it in bounded memory, spilling to its own files, and
//! publishes it at the commit) and with protocol 1 (the server decodes it whole,
//! spilling to its own disk, and sends it after the commit). Per variant, on a
//! cluster and broker of its own:
//!
//! - the relay's peak resident memory (`VmHWM`) over the whole variant;
//! - what the walsender spilled (`pg_stat_replication_slots.spill_bytes`) and
//!   streamed, and what the relay spilled;
//! - the time from the COMMIT returning to the broker's acknowledgement of the
//!   last record (the relay's routed counter reaching it);
//! - a second transaction of the same size, the relay SIGKILLed halfway through
//!   publishing it and started again: the records the topic holds beyond the
//!   events committed are the duplicates, against `max_in_flight`.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use rdkafka::consumer::BaseConsumer;

use crate::relay_lab::{RelayLab, RelayProcess};
use crate::Workload;

/// Payload bytes per row.
pub(crate) const PAYLOAD_BYTES: usize = 300;
/// The topic of the lab's rows (the relay's default template).
/// The relay's slot in the lab's database `bench`.
const SLOT: &str = "outbox_relay_bench";
/// The longest the relay may take for one large transaction.
const LIMIT: Duration = Duration::from_secs(900);

/// One variant's figures.
#[derive(Debug, Clone, Default)]
pub(crate) struct Variant {
    pub(crate) streaming: bool,
    /// Seconds the writer took for the transaction, COMMIT included.
    pub(crate) write_s: f64,
    /// From the COMMIT returning to the last record acknowledged.
    pub(crate) commit_to_last_ack_s: f64,
    pub(crate) peak_rss_kib: u64,
    /// The walsender's spill and stream counters for the first transaction.
    pub(crate) server_spill_bytes: i64,
    pub(crate) server_stream_bytes: i64,
    /// Bytes the relay wrote to its spill files.
    pub(crate) relay_spill_bytes: u64,
    /// Events acknowledged when the relay was killed, and the resume point it
    /// had stored for the transaction then.
    pub(crate) killed_at: u64,
    pub(crate) resume_point: Option<i64>,
    pub(crate) duplicates: u64,
}

#[derive(Debug, Clone)]
pub(crate) struct LargeTx {
    pub(crate) rows: u64,
    /// `logical_decoding_work_mem` of the labs' database (`None`: the server's
    /// default, 64 MB).
    pub(crate) work_mem: Option<&'static str>,
    pub(crate) max_in_flight: usize,
    pub(crate) variants: Vec<Variant>,
}

impl LargeTx {
    pub(crate) fn complete(&self) -> bool {
        self.variants.len() == 2
            && self
                .variants
                .iter()
                .all(|v| v.peak_rss_kib > 0 && v.commit_to_last_ack_s > 0.0 && v.killed_at > 0)
    }
}

/// Both variants with transactions of `rows` rows; `work_mem` lowers the
/// server's `logical_decoding_work_mem` (for small runs, so that they stream).
pub(crate) async fn run(
    rows: u64,
    work_mem: Option<&'static str>,
    relay_bin: &Path,
) -> anyhow::Result<LargeTx> {
    let mut variants = Vec::new();
    for streaming in [true, false] {
        let label = if streaming {
            "protocol 2"
        } else {
            "protocol 1"
        };
        eprintln!("    {label}: one transaction of {rows} rows, then another killed halfway");
        let variant = variant(rows, work_mem, streaming, relay_bin)
            .await
            .context(label)?;
        variants.push(variant);
    }
    Ok(LargeTx {
        rows,
        work_mem,
        max_in_flight: outbox_relay::config::DEFAULT_MAX_IN_FLIGHT,
        variants,
    })
}

async fn variant(
    rows: u64,
    work_mem: Option<&'static str>,
    streaming: bool,
    relay_bin: &Path,
) -> anyhow::Result<Variant> {
    let lab = RelayLab::new(relay_bin).await?;
    if let Some(work_mem) = work_mem {
        // Taken by the walsender when the relay connects.
        sqlx::query(&format!(
            "ALTER DATABASE bench SET logical_decoding_work_mem = '{work_mem}'"
        ))
        .execute(&lab.db)
        .await?;
    }
    let spill_dir = lab.cluster.dir().join("relay-spill");
    let settings = [
        ("OUTBOX_RELAY_STREAMING", streaming.to_string()),
        ("OUTBOX_RELAY_SPILL_DIR", spill_dir.display().to_string()),
    ];
    let one = Workload {
        rows_per_txn: 1,
        payload_bytes: PAYLOAD_BYTES,
    };
    let big = Workload {
        rows_per_txn: rows,
        payload_bytes: PAYLOAD_BYTES,
    };
    let mut relay = lab.start_relay(&settings).await?;
    // One event through, so the relay streams before the transaction begins.
    lab.write_rows(one, 1).await?;
    relay.wait_routed(1, Duration::from_secs(120)).await?;
    sqlx::query("SELECT pg_stat_reset_replication_slot($1)")
        .bind(SLOT)
        .execute(&lab.db)
        .await?;

    let write_s = lab.write_rows(big, rows).await?;
    let committed = Instant::now();
    relay.wait_routed(1 + rows, LIMIT).await?;
    let commit_to_last_ack_s = committed.elapsed().as_secs_f64();
    relay.sample();
    let (server_spill_bytes, server_stream_bytes): (i64, i64) = sqlx::query_as(
        "SELECT spill_bytes, stream_bytes FROM pg_stat_replication_slots WHERE slot_name = $1",
    )
    .bind(SLOT)
    .fetch_one(&lab.db)
    .await
    .context("reading pg_stat_replication_slots")?;
    let relay_spill_bytes = spilled(&relay).await;
    let peak_rss_kib = relay.peak_rss_kib;

    // The same again, killed halfway through publishing it.
    let before = relay.routed().await;
    lab.write_rows(big, rows).await?;
    let end: String = sqlx::query_scalar("SELECT pg_current_wal_lsn()::text")
        .fetch_one(&lab.db)
        .await?;
    let end: outbox_relay::Lsn = end.parse().context("the WAL position")?;
    relay.wait_routed(before + rows / 2, LIMIT).await?;
    let killed_at = relay.routed().await.saturating_sub(before);
    relay.kill().await;
    let resume_point: Option<i64> =
        sqlx::query_scalar("SELECT records FROM outbox_relay_resume WHERE slot_name = $1")
            .bind(SLOT)
            .fetch_optional(&lab.db)
            .await?;
    if killed_at >= rows {
        bail!("the relay published the whole transaction before it was killed");
    }
    let restarted = lab.start_relay(&settings).await?;
    wait_confirmed(&lab, end).await?;
    let written = lab.written().await?;
    let duplicates = records_in_topic(&lab.broker.bootstrap())?.saturating_sub(written);
    restarted.stop().await;
    lab.close().await;
    Ok(Variant {
        streaming,
        write_s,
        commit_to_last_ack_s,
        peak_rss_kib,
        server_spill_bytes,
        server_stream_bytes,
        relay_spill_bytes,
        killed_at,
        resume_point,
        duplicates,
    })
}

/// The relay's spilled bytes.
async fn spilled(relay: &RelayProcess) -> u64 {
    testkit::process::metric_sum(&relay.metrics().await, outbox_relay::metrics::SPILLED_BYTES)
}

/// Waits until the slot confirmed `end`: everything before it was acknowledged.
async fn wait_confirmed(lab: &RelayLab, end: outbox_relay::Lsn) -> anyhow::Result<()> {
    let deadline = Instant::now() + LIMIT;
    loop {
        let confirmed: Option<String> = sqlx::query_scalar(
            "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1",
        )
        .bind(SLOT)
        .fetch_optional(&lab.db)
        .await?
        .flatten();
        if confirmed
            .as_deref()
            .and_then(|c| c.parse::<outbox_relay::Lsn>().ok())
            .is_some_and(|c| c >= end)
        {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("the restarted relay did not confirm {end} within {LIMIT:?} (at {confirmed:?})");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Records in the lab's topic, all partitions (high minus low watermarks).
fn records_in_topic(brokers: &str) -> anyhow::Result<u64> {
    let consumer: BaseConsumer = testkit::consumer_config_on(Some(brokers), "bench-large-tx")
        .create()
        .context("creating a consumer")?;
    Ok(crate::relay_lab::watermarks(&consumer)?
        .into_iter()
        .map(|(_, low, high)| u64::try_from(high - low).unwrap_or(0))
        .sum())
}

/// The part's table.
pub(crate) fn print(l: &LargeTx) {
    let bytes = |n: f64| {
        if n >= 1e6 {
            format!("{:.0} MB", n / 1e6)
        } else {
            format!("{:.0} kB", n / 1e3)
        }
    };
    println!(
        "\nLarge transactions: one transaction of {} rows (about {} of payload) written by one \
         statement, relayed with the relay's defaults; server logical_decoding_work_mem {}\n\
         {:<12} {:>8} {:>11} {:>10} {:>9} {:>9} {:>9} {:>9} {:>9} {:>6}",
        l.rows,
        bytes((l.rows * PAYLOAD_BYTES as u64) as f64),
        l.work_mem.unwrap_or("64MB (the default)"),
        "protocol",
        "write s",
        "COMMIT->ack",
        "relay RSS",
        "srv spill",
        "srv strm",
        "relay spl",
        "killed at",
        "resumed",
        "dups"
    );
    for v in &l.variants {
        println!(
            "{:<12} {:>8.1} {:>9.1} s {:>10} {:>9} {:>9} {:>9} {:>9} {:>9} {:>6}",
            if v.streaming { "2 streaming" } else { "1" },
            v.write_s,
            v.commit_to_last_ack_s,
            crate::mib(v.peak_rss_kib),
            bytes(v.server_spill_bytes as f64),
            bytes(v.server_stream_bytes as f64),
            bytes(v.relay_spill_bytes as f64),
            v.killed_at,
            v.resume_point.map_or("-".to_owned(), |n| n.to_string()),
            v.duplicates
        );
    }
    if let [two, one] = &l.variants[..] {
        println!(
            "protocol 2 / protocol 1: COMMIT -> last ack {:.2}, relay peak RSS {:.2}; duplicates \
             after a SIGKILL halfway against max_in_flight {}",
            two.commit_to_last_ack_s / one.commit_to_last_ack_s,
            two.peak_rss_kib as f64 / one.peak_rss_kib as f64,
            l.max_in_flight
        );
    }
}
