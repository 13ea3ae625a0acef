//! `bench`: outbox-relay and the saga shop measured against the limits they sit
//! between, in the same run on the same machine (these machines are noisy, so
//! only ratios against a same-run baseline mean much):
//!
//! - [`throughput`]: the relay against the raw pgoutput rate of one slot
//!   (`pg_recvlogical`) and a broker-only producer, per workload (1- and 100-row
//!   transactions, 300 B and 3 KB payloads), with the relay's peak RSS;
//! - [`latency`]: commit → broker acknowledgement at offered loads of 1 k and
//!   5 k events/s, beside the broker-only producer's own latency at that rate;
//! - [`outage`]: the relay's memory through a broker outage under load;
//! - [`takeover`]: three relays on one slot; how fast a standby takes over from
//!   an active relay that is killed, stopped or hung, and what it re-sends;
//! - [`large_tx`]: one transaction of a million rows, streamed by the server
//!   while in progress (protocol 2) against protocol 1: the relay's memory, what
//!   the server spilled, COMMIT → last acknowledgement, duplicates after a SIGKILL
//!   halfway;
//! - [`sagas`]: order sagas through the four services and their relays: at
//!   saturation, at 100/s, and 1,000 in flight at once;
//! - [`sinks`]: the relay to Kafka, NATS JetStream, RabbitMQ and Redis Streams,
//!   each against a producer to that destination alone, and commit → ack at
//!   1 k events/s.
//!
//! Each part gets a fresh private cluster and broker. The output is one set of
//! tables; the run fails when a number could not be produced, never on a
//! threshold (the goals are in BENCHMARKS.md).

#![allow(clippy::print_stdout)] // the tables are the program's output

mod large_tx;
mod latency;
mod legs;
mod lost;
mod outage;
mod relay_lab;
mod sagas;
mod sinks;
mod statements;
mod takeover;
mod throughput;

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Parser;
use testkit::process::own_bin_dir;

#[derive(Debug, Parser)]
#[command(
    name = "bench",
    about = "outbox-relay and the saga shop against baselines measured in the same run"
)]
struct Cli {
    /// A smoke run: small sizes, to check every number is produced (a few minutes).
    #[arg(long)]
    quick: bool,
    /// Events per throughput workload [default: 100000, 2000 with --quick].
    #[arg(long)]
    events: Option<u64>,
    /// Only these parts (comma-separated): throughput, latency, outage, takeover,
    /// sagas, large-tx, sinks.
    #[arg(long, value_delimiter = ',', value_parser = ["throughput", "latency", "outage", "takeover", "sagas", "large-tx", "sinks"])]
    only: Vec<String>,
    /// Rows of the large-tx part's transactions [default: 1000000, 20000 with
    /// --quick].
    #[arg(long, value_name = "N")]
    large_tx_rows: Option<u64>,
    /// Only these throughput workloads, as ROWSxBYTES (comma-separated), e.g.
    /// 100x3000 for 100-row transactions of 3 KB payloads [default: 1x300,
    /// 100x300, 1x3000, 100x3000].
    #[arg(long, value_delimiter = ',', value_parser = parse_workload)]
    workload: Vec<Workload>,
    /// Where outbox-relay and the services are (default: beside this binary).
    #[arg(long, value_name = "DIR")]
    bin_dir: Option<PathBuf>,
    /// Where the shop's logs go.
    #[arg(long, value_name = "DIR", default_value = ".local/bench")]
    log_dir: PathBuf,
}

/// Rows per transaction and payload size of a throughput workload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Workload {
    pub(crate) rows_per_txn: u64,
    pub(crate) payload_bytes: usize,
}

impl std::fmt::Display for Workload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let size = if self.payload_bytes >= 1000 {
            format!("{} KB", self.payload_bytes / 1000)
        } else {
            format!("{} B", self.payload_bytes)
        };
        write!(f, "{}-row txns, {size}", self.rows_per_txn)
    }
}

fn parse_workload(text: &str) -> Result<Workload, String> {
    let (rows, bytes) = text
        .split_once('x')
        .ok_or_else(|| format!("{text:?} is not ROWSxBYTES, e.g. 100x3000"))?;
    let rows_per_txn: u64 = rows
        .parse()
        .map_err(|_| format!("{rows:?} is not a number of rows"))?;
    let payload_bytes: usize = bytes
        .parse()
        .map_err(|_| format!("{bytes:?} is not a number of bytes"))?;
    if rows_per_txn == 0 || payload_bytes < 30 {
        return Err(format!(
            "{text:?}: at least 1 row per transaction and 30 bytes of payload"
        ));
    }
    Ok(Workload {
        rows_per_txn,
        payload_bytes,
    })
}

const WORKLOADS: [Workload; 4] = [
    Workload {
        rows_per_txn: 1,
        payload_bytes: 300,
    },
    Workload {
        rows_per_txn: 100,
        payload_bytes: 300,
    },
    Workload {
        rows_per_txn: 1,
        payload_bytes: 3_000,
    },
    Workload {
        rows_per_txn: 100,
        payload_bytes: 3_000,
    },
];

/// Offered loads of the latency part, events per second.
const LOADS: [u32; 2] = [1_000, 5_000];

/// How big each part is.
#[derive(Debug, Clone, Copy)]
struct Plan {
    events: u64,
    latency_seconds: f64,
    outage: Duration,
    takeover: takeover::Plan,
    sagas: sagas::Sizes,
    /// Rows of the large transactions, and the server's
    /// `logical_decoding_work_mem` for them (`None`: its default, 64 MB).
    large_tx: (u64, Option<&'static str>),
}

impl Plan {
    fn new(quick: bool, events: Option<u64>, large_tx_rows: Option<u64>) -> Plan {
        if quick {
            Plan {
                events: events.unwrap_or(2_000),
                latency_seconds: 2.0,
                outage: Duration::from_secs(6),
                takeover: takeover::Plan {
                    kills: 1,
                    terms: 1,
                    stops: 1,
                    status_interval: Duration::from_secs(1),
                    takeover_after: Duration::from_secs(4),
                },
                sagas: sagas::Sizes {
                    saturation: 200,
                    latency_seconds: 2.0,
                    in_flight: 200,
                },
                // Small enough to be quick, with the server's minimum work
                // memory so that it is streamed all the same.
                large_tx: (large_tx_rows.unwrap_or(20_000), Some("64kB")),
            }
        } else {
            Plan {
                events: events.unwrap_or(100_000),
                latency_seconds: 20.0,
                outage: Duration::from_secs(30),
                // The relay's defaults.
                takeover: takeover::Plan {
                    kills: 3,
                    terms: 3,
                    stops: 1,
                    status_interval: Duration::from_millis(
                        outbox_relay::config::DEFAULT_STATUS_INTERVAL_MS,
                    ),
                    takeover_after: Duration::from_millis(
                        outbox_relay::config::DEFAULT_TAKEOVER_AFTER_MS,
                    ),
                },
                sagas: sagas::Sizes {
                    saturation: 3_000,
                    latency_seconds: 20.0,
                    in_flight: 1_000,
                },
                large_tx: (large_tx_rows.unwrap_or(1_000_000), None),
            }
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    shop::log_to_stderr();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("bench: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let outcome = runtime.block_on(async {
        tokio::select! {
            outcome = run(cli) => Some(outcome),
            signal = testkit::leftovers::interrupted() => {
                eprintln!("bench: {signal}: stopping what the run started");
                None
            }
        }
    });
    let Some(outcome) = outcome else {
        return ExitCode::from(130);
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let plan = Plan::new(cli.quick, cli.events, cli.large_tx_rows);
    let parts: BTreeSet<&str> = if cli.only.is_empty() {
        [
            "throughput",
            "latency",
            "outage",
            "takeover",
            "sagas",
            "large-tx",
            "sinks",
        ]
        .into()
    } else {
        cli.only.iter().map(String::as_str).collect()
    };
    let bin_dir = match cli.bin_dir {
        Some(dir) => dir,
        None => own_bin_dir().context("the executable's own directory")?,
    };
    let relay_bin = bin_dir.join("outbox-relay");
    for program in [
        "outbox-relay",
        "order-service",
        "customer-service",
        "inventory-service",
        "payment-service",
    ] {
        if !bin_dir.join(program).is_file() {
            bail!(
                "{} not found; build it first (scripts/bench does)",
                bin_dir.join(program).display()
            );
        }
    }
    let started = Instant::now();
    println!(
        "machine: {} cores, {}, {}; PostgreSQL {}; {}",
        std::thread::available_parallelism().map_or(0, usize::from),
        machine_memory(),
        cpu_model(),
        pg_version(),
        match (cli.quick, cfg!(debug_assertions)) {
            (true, true) => "quick run, debug build (a smoke run: no measurement)",
            (true, false) => "quick run, release build",
            (false, true) => "full run, debug build (no measurement)",
            (false, false) => "full run, release build",
        }
    );

    if parts.contains("throughput") {
        let mut rows = Vec::new();
        let workloads = if cli.workload.is_empty() {
            WORKLOADS.to_vec()
        } else {
            cli.workload.clone()
        };
        for workload in workloads {
            eprintln!("==> throughput: {workload}, {} events", plan.events);
            let row = throughput::run(workload, plan.events, &relay_bin)
                .await
                .with_context(|| format!("throughput, {workload}"))?;
            rows.push(row);
        }
        print_throughput(&rows);
        if let Some(bad) = rows.iter().find(|r| !r.complete()) {
            bail!("throughput, {}: a number is missing: {bad:?}", bad.workload);
        }
    }

    if parts.contains("latency") {
        eprintln!("==> latency");
        let rows = latency::run(&LOADS, plan.latency_seconds, &relay_bin)
            .await
            .context("latency")?;
        print_latency(&rows);
        if let Some(bad) = rows.iter().find(|r| !r.complete()) {
            bail!(
                "latency at {} events/s: a number is missing: {bad:?}",
                bad.offered
            );
        }
    }

    if parts.contains("outage") {
        eprintln!("==> memory through a {:?} broker outage", plan.outage);
        let outage = outage::run(plan.outage, &relay_bin)
            .await
            .context("broker outage")?;
        print_outage(&outage);
        if !outage.complete() {
            bail!("broker outage: a number is missing: {outage:?}");
        }
    }

    if parts.contains("takeover") {
        eprintln!("==> takeover: {} relays on one slot", takeover::RELAYS);
        let result = takeover::run(plan.takeover, &relay_bin)
            .await
            .context("takeover")?;
        print_takeover(&result);
        if !result.complete() {
            bail!("takeover: a number is missing: {result:?}");
        }
    }

    if parts.contains("sagas") {
        eprintln!("==> sagas");
        let result = sagas::run(&bin_dir, &cli.log_dir, plan.sagas)
            .await
            .context("sagas")?;
        print_sagas(&result);
        if !result.complete() {
            bail!("sagas: a number is missing: {result:?}");
        }
    }
    if parts.contains("large-tx") {
        let (rows, work_mem) = plan.large_tx;
        eprintln!("==> large transactions of {rows} rows");
        let result = large_tx::run(rows, work_mem, &relay_bin)
            .await
            .context("large transactions")?;
        large_tx::print(&result);
        if !result.complete() {
            bail!("large transactions: a number is missing: {result:?}");
        }
    }
    if parts.contains("sinks") {
        eprintln!("==> sinks");
        let rows = sinks::run(plan.events, plan.latency_seconds, &relay_bin)
            .await
            .context("sinks")?;
        print_sinks(&rows);
        if let Some(bad) = rows.iter().find(|r| !r.complete()) {
            bail!("sinks, {}: a number is missing: {bad:?}", bad.sink);
        }
    }
    println!("\n(the run took {:.0} s)", started.elapsed().as_secs_f64());
    Ok(())
}

fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

fn print_sinks(rows: &[sinks::SinkRun]) {
    println!(
        "\nSinks: one backlog ({}) drained by a producer to the destination alone and by the \
         relay, events/s; at {} events/s, ms: relay commit -> ack, producer hand-over -> ack\n\
         {:<9} {:>7} {:>9} {:>8} {:>7} {:>8} {:>9} {:>9} {:>9} {:>9}",
        sinks::WORKLOAD,
        sinks::LATENCY_RATE,
        "sink",
        "events",
        "producer",
        "relay",
        "r/prod",
        "CPU/ev",
        "relay p50",
        "relay p99",
        "prod p50",
        "prod p99"
    );
    for r in rows {
        println!(
            "{:<9} {:>7} {:>9.0} {:>8.0} {:>7.2} {:>5.1} us {:>9.2} {:>9.2} {:>9.2} {:>9.2}",
            r.sink,
            r.events,
            r.producer,
            r.relay,
            r.relay / r.producer,
            r.relay_cpu_us,
            r.p50_ms,
            r.p99_ms,
            r.producer_p50_ms,
            r.producer_p99_ms
        );
    }
}

fn print_throughput(rows: &[throughput::Throughput]) {
    println!(
        "\nRelay throughput: one backlog drained by each reader, events/s \
         (pgoutput: a minimal reader of the slot, the limit; recvlog: pg_recvlogical); \
         the relay's CPU time per event\n\
         {:<20} {:>7} {:>8} {:>8} {:>8} {:>8} {:>8} {:>7} {:>7} {:>8} {:>9}",
        "workload",
        "events",
        "written",
        "pgoutput",
        "recvlog",
        "broker",
        "relay",
        "r/pgout",
        "r/brkr",
        "CPU/ev",
        "relay RSS"
    );
    for r in rows {
        println!(
            "{:<20} {:>7} {:>8.0} {:>8.0} {:>8.0} {:>8.0} {:>8.0} {:>7.2} {:>7.2} {:>5.1} us {:>9}",
            r.workload.to_string(),
            r.events,
            r.written,
            r.pgoutput,
            r.recvlogical,
            r.broker,
            r.relay,
            r.relay / r.pgoutput,
            r.relay / r.broker,
            r.relay_cpu_us,
            mib(r.relay_peak_rss_kib)
        );
    }
}

fn print_latency(rows: &[latency::Latency]) {
    println!(
        "\nLatency, ms: 1-row transactions of {} B at an offered rate. relay: commit -> broker ack; \
         pgoutput: commit -> read by a minimal reader; broker: hand-over -> ack of a broker-only producer\n\
         {:>8} {:>9} {:>8} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}",
        latency::PAYLOAD_BYTES,
        "offered",
        "achieved",
        "events",
        "relay p50",
        "relay p99",
        "pgout p50",
        "pgout p99",
        "brkr p50",
        "brkr p99"
    );
    for r in rows {
        println!(
            "{:>8} {:>9.0} {:>8} {:>9.2} {:>9.2} {:>9.2} {:>9.2} {:>9.2} {:>9.2}",
            r.offered,
            r.achieved,
            r.events,
            r.relay_p50_ms,
            r.relay_p99_ms,
            r.pgoutput_p50_ms,
            r.pgoutput_p99_ms,
            r.broker_p50_ms,
            r.broker_p99_ms
        );
    }
}

fn print_outage(o: &outage::Outage) {
    println!(
        "\nMemory through a {:.0} s broker outage (SIGSTOP) at {} events/s of {} B, max_in_flight {}\n\
         relay RSS before {}; {} when the bound was reached ({:.1} s into the outage); \
         at most {} from then until the broker returned ({:+.1} %)\n\
         records in flight at most {}; {} events committed by the broker's return, \
         acknowledged {:.2} s after it; {} events in all, every one acknowledged",
        o.outage.as_secs_f64(),
        outage::RATE,
        outage::PAYLOAD_BYTES,
        o.in_flight_bound,
        mib(o.rss_before_kib),
        mib(o.rss_at_bound_kib),
        o.bound_after.as_secs_f64(),
        mib(o.rss_after_bound_kib),
        (o.rss_after_bound_kib as f64 / o.rss_at_bound_kib as f64 - 1.0) * 100.0,
        o.in_flight_max,
        o.backlog,
        o.recovery.as_secs_f64(),
        o.events
    );
}

fn print_takeover(t: &takeover::Takeover) {
    println!(
        "\nTakeover: {} relays on one slot, {} events/s of one-row transactions; status \
         interval {:.0} s, takeover bound {:.0} s; ms from the signal to the standby streaming",
        takeover::RELAYS,
        takeover::RATE,
        t.plan.status_interval.as_secs_f64(),
        t.plan.takeover_after.as_secs_f64()
    );
    for (cause, times) in &t.times {
        let ms: Vec<String> = times
            .iter()
            .map(|d| format!("{:.0}", d.as_secs_f64() * 1000.0))
            .collect();
        let worst = times.iter().max().map_or(0.0, |d| d.as_secs_f64() * 1000.0);
        println!(
            "{:<8} {:>8.0} max   ({})",
            cause.name(),
            worst,
            ms.join(", ")
        );
    }
    println!(
        "{} events, every one delivered; {} records: {} duplicates over {} takeovers \
         (max_in_flight {} per takeover)",
        t.events,
        t.records,
        t.duplicates(),
        t.takeovers(),
        t.max_in_flight
    );
}

fn print_sagas(s: &sagas::Sagas) {
    println!(
        "\nSagas (order placement: 3 participants, {:.1} outbox events per saga)\n\
         saturation: {} orders from {} clients: accepted {:.0}/s, completed {:.0} sagas/s ({:.2} of the acceptance rate)\n\
         steady {:.0}/s: {} sagas, acceptance -> end p50 {:.0} ms, p99 {:.0} ms\n\
         in flight: {} accepted while the payment service was paused, {} running at once; \
         all ended {:.1} s after it resumed ({:.0} sagas/s)",
        s.events_per_saga,
        s.saturation_orders,
        sagas::CLIENTS,
        s.accepted_per_s,
        s.completed_per_s,
        s.completed_per_s / s.accepted_per_s,
        sagas::LATENCY_RATE,
        s.latency_orders,
        s.latency_p50_ms,
        s.latency_p99_ms,
        s.in_flight_orders,
        s.in_flight_peak,
        s.in_flight_drain.as_secs_f64(),
        s.in_flight_orders as f64 / s.in_flight_drain.as_secs_f64()
    );
    let cpu: Vec<String> = s
        .cpu_ms_per_saga
        .iter()
        .map(|(part, ms)| format!("{part} {ms:.2}"))
        .collect();
    println!(
        "CPU ms per saga at saturation: {} (total {:.2}; the machine has {} cores)",
        cpu.join(", "),
        s.cpu_ms_per_saga.values().sum::<f64>(),
        std::thread::available_parallelism().map_or(0, usize::from)
    );
    println!(
        "statements per saga at saturation: {}",
        statements::describe(&s.statements_per_saga)
    );
    println!("  the statements that took the most server time, per saga: calls, ms, database");
    for top in &s.top_statements {
        println!(
            "  {:>5.2} {:>6.3} ms  {:<9} {}",
            top.calls, top.ms, top.database, top.query
        );
    }
    if !s.legs.is_empty() {
        println!(
            "steady {:.0}/s, each participant step, ms p50/p99: command leg (written -> the \
             participant's transaction begins), reply leg (-> the reply applied)",
            sagas::LATENCY_RATE
        );
        for leg in &s.legs {
            println!(
                "  {:<16} {:>6} commands  command {:>6.1} / {:>6.1}  reply {:>6.1} / {:>6.1}",
                leg.step,
                leg.count,
                leg.command_ms.0,
                leg.command_ms.1,
                leg.reply_ms.0,
                leg.reply_ms.1
            );
        }
        let relays: Vec<String> = s
            .relay_ms
            .iter()
            .map(|r| {
                format!(
                    "{} {:.1} ({:.1} to the producer) / {:.1}",
                    r.relay, r.ack_p50, r.send_p50, r.ack_p99
                )
            })
            .collect();
        println!(
            "  relays, commit -> broker ack ms p50 (commit -> handed to the producer) / p99: {}",
            relays.join(", ")
        );
    }
    let peaks: Vec<String> = s
        .peak_rss_kib
        .iter()
        .map(|(name, kib)| format!("{name} {}", mib(*kib)))
        .collect();
    println!("peak RSS: {}", peaks.join(", "));
    if s.timed_out > 0 {
        println!(
            "{} sagas ended by a step's timeout instead and are left out above:",
            s.timed_out
        );
        for line in &s.lost {
            println!("  {line}");
        }
    }
}

fn machine_memory() -> String {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            let kib: u64 = m
                .lines()
                .find(|l| l.starts_with("MemTotal:"))?
                .split_whitespace()
                .nth(1)?
                .parse()
                .ok()?;
            Some(format!("{:.0} GiB memory", kib as f64 / 1024.0 / 1024.0))
        })
        .unwrap_or_else(|| "memory unknown".to_owned())
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_owned())
        })
        .unwrap_or_else(|| "CPU unknown".to_owned())
}

fn pg_version() -> String {
    std::process::Command::new(testkit::pg_bin_dir().join("postgres"))
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        // "postgres (PostgreSQL) 15.20 (Debian 15.20-0+deb12u1)"
        .and_then(|v| v.split_whitespace().nth(2).map(str::to_owned))
        .unwrap_or_else(|| "unknown".to_owned())
}
