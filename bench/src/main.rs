//! `bench`: outbox-relay's throughput against the two limits it sits between,
//! measured in the same run on the same machine (these machines are noisy, so
//! only ratios against a same-run baseline mean anything):
//!
//! - **pgoutput**: how fast PostgreSQL decodes the outbox rows for one slot,
//!   drained by `pg_recvlogical` into `/dev/null` (the physical limit on one slot);
//! - **broker-only**: the same records pushed by a producer configured like the
//!   relay's (idempotent, `acks=all`) and acknowledged;
//! - **relay**: the same rows through the `outbox-relay` binary, acknowledged by
//!   the broker (its `outbox_relay_events_routed_total`), and its peak RSS.
//!
//! Each workload (rows per transaction × payload size) gets a fresh private
//! cluster and broker. The rows are written before anything reads them, so every
//! reader drains the same backlog.

#![allow(clippy::print_stdout)] // the table is the program's output

use std::path::{Path, PathBuf};
use std::process::{ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Parser;
use futures::StreamExt;
use outbox_relay::config::RelayConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use sqlx::postgres::PgPoolOptions;
use sqlx::PgPool;
use testkit::process::{memory_kib, metric_sum, own_bin_dir};
use testkit::{PrivateBroker, PrivateCluster};

#[derive(Debug, Parser)]
#[command(
    name = "bench",
    about = "outbox-relay against the raw pgoutput rate and a broker-only producer"
)]
struct Cli {
    /// A smoke run: few events, to check every number is produced.
    #[arg(long)]
    quick: bool,
    /// Events per workload [default: 100000, 2000 with --quick].
    #[arg(long)]
    events: Option<u64>,
    /// Where outbox-relay is (default: beside this binary).
    #[arg(long, value_name = "DIR")]
    bin_dir: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy)]
struct Workload {
    rows_per_txn: u64,
    payload_bytes: usize,
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

#[derive(Debug, Default)]
struct Row {
    label: String,
    events: u64,
    pgoutput: f64,
    broker: f64,
    relay: f64,
    relay_rss_kib: u64,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
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
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let events = cli
        .events
        .unwrap_or(if cli.quick { 2_000 } else { 100_000 });
    let bin_dir = match cli.bin_dir {
        Some(dir) => dir,
        None => own_bin_dir().context("the executable's own directory")?,
    };
    let relay_bin = bin_dir.join("outbox-relay");
    if !relay_bin.is_file() {
        bail!(
            "{} not found; build it first (scripts/bench does)",
            relay_bin.display()
        );
    }
    println!(
        "machine: {} cores, {}; {events} events per workload",
        std::thread::available_parallelism().map_or(0, usize::from),
        machine_memory()
    );
    let mut rows = Vec::new();
    for workload in WORKLOADS {
        let label = format!(
            "{}-row txns, {} B",
            workload.rows_per_txn, workload.payload_bytes
        );
        eprintln!("==> {label}");
        let row = throughput(workload, events, &relay_bin)
            .await
            .with_context(|| format!("workload {label}"))?;
        rows.push(Row { label, ..row });
    }
    println!(
        "\n{:<22} {:>8} {:>14} {:>14} {:>12} {:>11} {:>11} {:>10}",
        "workload",
        "events",
        "pgoutput ev/s",
        "broker ev/s",
        "relay ev/s",
        "relay/pgout",
        "relay/brkr",
        "relay RSS"
    );
    for r in &rows {
        println!(
            "{:<22} {:>8} {:>14.0} {:>14.0} {:>12.0} {:>11.2} {:>11.2} {:>7.1} MiB",
            r.label,
            r.events,
            r.pgoutput,
            r.broker,
            r.relay,
            r.relay / r.pgoutput,
            r.relay / r.broker,
            r.relay_rss_kib as f64 / 1024.0
        );
    }
    for r in &rows {
        for (what, value) in [
            ("pgoutput", r.pgoutput),
            ("broker-only", r.broker),
            ("relay", r.relay),
        ] {
            if !(value.is_finite() && value > 0.0) {
                bail!("{}: no {what} rate was measured", r.label);
            }
        }
    }
    Ok(())
}

/// One workload: fresh cluster and broker, the rows written, then each reader.
async fn throughput(workload: Workload, events: u64, relay_bin: &Path) -> anyhow::Result<Row> {
    let cluster = tokio::task::spawn_blocking(|| {
        PrivateCluster::start(&[
            ("wal_level", "logical"),
            ("max_replication_slots", "8"),
            ("max_wal_senders", "8"),
            ("shared_buffers", "256MB"),
            ("max_wal_size", "4GB"),
        ])
    })
    .await?;
    let broker = tokio::task::spawn_blocking(PrivateBroker::start).await?;
    let admin = pool(&cluster.url("postgres")).await?;
    sqlx::query("CREATE DATABASE bench").execute(&admin).await?;
    admin.close().await;
    let url = cluster.url("bench");
    let db = pool(&url).await?;
    sqlx::raw_sql(include_str!("../../sql/shared/0001_outbox.sql"))
        .execute(&db)
        .await
        .context("creating the outbox table")?;

    // The relay's publication and slot, and a second slot on the same publication
    // for the baseline, both before the rows exist.
    let relay_env = |port: u16| {
        vec![
            ("OUTBOX_RELAY_POSTGRES_URL", url.clone()),
            ("OUTBOX_RELAY_KAFKA_BROKERS", broker.bootstrap()),
            ("OUTBOX_RELAY_HTTP_LISTEN", format!("127.0.0.1:{port}")),
            ("OUTBOX_RELAY_TOPIC_PARTITIONS", "3".to_owned()),
            ("OUTBOX_RELAY_LOG", "warn".to_owned()),
        ]
    };
    let init = tokio::process::Command::new(relay_bin)
        .arg("init")
        .envs(relay_env(0))
        .output()
        .await?;
    if !init.status.success() {
        bail!(
            "outbox-relay init failed: {}",
            String::from_utf8_lossy(&init.stderr)
        );
    }
    let publication = outbox_relay::config::DEFAULT_PUBLICATION;
    sqlx::query("SELECT pg_create_logical_replication_slot('bench_raw', 'pgoutput')")
        .execute(&db)
        .await?;

    write_rows(&db, workload, events).await?;
    let end_lsn: String = sqlx::query_scalar("SELECT pg_current_wal_lsn()::text")
        .fetch_one(&db)
        .await?;
    let written: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox")
        .fetch_one(&db)
        .await?;
    if u64::try_from(written).unwrap_or(0) != events {
        bail!("{written} rows written, {events} intended");
    }

    // pgoutput: pg_recvlogical drains the baseline slot up to the end position.
    let recvlogical = testkit::pg_bin_dir().join("pg_recvlogical");
    let started = Instant::now();
    let out = tokio::process::Command::new(&recvlogical)
        .args(["-d", &url, "-S", "bench_raw", "--start", "--no-loop"])
        .args(["-o", "proto_version=1", "-o"])
        .arg(format!("publication_names={publication}"))
        .args(["-E", &end_lsn, "-f", "/dev/null"])
        .stdin(Stdio::null())
        .output()
        .await
        .with_context(|| format!("running {}", recvlogical.display()))?;
    let pgoutput_secs = started.elapsed().as_secs_f64();
    if !out.status.success() {
        bail!(
            "pg_recvlogical failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    // Broker-only: the same records from a producer configured like the relay's.
    let broker_secs = produce_only(&broker.bootstrap(), workload, events).await?;

    // The relay: from its start until the broker acknowledged every row.
    let port = testkit::free_port();
    let started = Instant::now();
    let mut relay = tokio::process::Command::new(relay_bin)
        .envs(relay_env(port))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .context("starting outbox-relay")?;
    let pid = relay.id().context("the relay's pid")?;
    let metrics_url = format!("http://127.0.0.1:{port}/metrics");
    let http = reqwest::Client::new();
    let deadline = started + Duration::from_secs(600);
    let mut peak = 0;
    loop {
        if let Some((_, hwm)) = memory_kib(pid) {
            peak = peak.max(hwm);
        }
        let routed = match http.get(&metrics_url).send().await {
            Ok(r) => metric_sum(
                &r.text().await.unwrap_or_default(),
                "outbox_relay_events_routed_total",
            ),
            Err(_) => 0,
        };
        if routed >= events {
            break;
        }
        if Instant::now() > deadline {
            bail!("the relay routed {routed} of {events} events in 600 s");
        }
        if let Ok(Some(status)) = relay.try_wait() {
            bail!("the relay exited early: {status}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let relay_secs = started.elapsed().as_secs_f64();
    if let Some((_, hwm)) = memory_kib(pid) {
        peak = peak.max(hwm);
    }
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status();
    let _ = tokio::time::timeout(Duration::from_secs(20), relay.wait()).await;
    db.close().await;
    drop(broker);
    drop(cluster);
    let rate = |secs: f64| events as f64 / secs;
    Ok(Row {
        label: String::new(),
        events,
        pgoutput: rate(pgoutput_secs),
        broker: rate(broker_secs),
        relay: rate(relay_secs),
        relay_rss_kib: peak,
    })
}

/// Writes `events` outbox rows, `rows_per_txn` per transaction, from a server-side
/// procedure (one round trip for the lot, a COMMIT per transaction).
async fn write_rows(db: &PgPool, workload: Workload, events: u64) -> anyhow::Result<()> {
    sqlx::raw_sql(
        "CREATE PROCEDURE bench_write(total bigint, per_txn bigint, bytes int) LANGUAGE plpgsql AS $$
         DECLARE done bigint := 0;
         BEGIN
           WHILE done < total LOOP
             INSERT INTO outbox (id, aggregatetype, aggregateid, type, payload)
             SELECT gen_random_uuid(), 'bench', ((done + i) % 1000)::text, 'BenchEvent',
                    jsonb_build_object('n', done + i, 'data', repeat('x', greatest(bytes - 30, 0)))
             FROM generate_series(1, least(per_txn, total - done)) AS i;
             done := done + least(per_txn, total - done);
             COMMIT;
           END LOOP;
         END $$",
    )
    .execute(db)
    .await?;
    sqlx::query("CALL bench_write($1, $2, $3)")
        .bind(i64::try_from(events)?)
        .bind(i64::try_from(workload.rows_per_txn)?)
        .bind(i32::try_from(workload.payload_bytes)?)
        .execute(db)
        .await
        .context("writing the outbox rows")?;
    Ok(())
}

/// Produces `events` records like the relay's and waits for every acknowledgement;
/// the seconds it took.
async fn produce_only(brokers: &str, workload: Workload, events: u64) -> anyhow::Result<f64> {
    let topic = "bench.broker-only";
    let config = RelayConfig::new("postgres://unused@localhost/unused", brokers);
    let admin: AdminClient<_> = outbox_relay::kafka::client_config(&config.kafka).create()?;
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
    let producer: FutureProducer = outbox_relay::kafka::producer_config(&config.kafka).create()?;
    let payload = format!(
        "{{\"n\":0,\"data\":\"{}\"}}",
        "x".repeat(workload.payload_bytes.saturating_sub(30))
    );
    // Outside the clock: the topic's metadata and the idempotent producer's id,
    // which a running relay has long had.
    let warm = FutureRecord::to(topic).key("warm-up").payload(&payload);
    producer
        .send(warm, Duration::from_secs(30))
        .await
        .map_err(|(e, _)| anyhow::anyhow!("warming the producer up: {e}"))?;
    let started = Instant::now();
    let mut pending = futures::stream::FuturesUnordered::new();
    for n in 0..events {
        let key = (n % 1000).to_string();
        let id = uuid::Uuid::new_v4().to_string();
        let headers = OwnedHeaders::new()
            .insert(Header {
                key: "id",
                value: Some(id.as_str()),
            })
            .insert(Header {
                key: "type",
                value: Some("BenchEvent"),
            });
        let record = FutureRecord::to(topic)
            .key(&key)
            .payload(&payload)
            .headers(headers);
        let delivery = producer
            .send_result(record)
            .map_err(|(e, _)| anyhow::anyhow!("handing a record to the producer: {e}"))?;
        pending.push(delivery);
        // Stay within the producer's queue, like the relay's in-flight bound.
        while pending.len() >= config.kafka.max_in_flight {
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

async fn pool(url: &str) -> anyhow::Result<PgPool> {
    PgPoolOptions::new()
        .max_connections(2)
        .connect(url)
        .await
        .with_context(|| format!("connecting to {url}"))
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
