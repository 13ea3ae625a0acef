//! One relay benchmark's world: a private PostgreSQL cluster and broker, a
//! database with the outbox table, its publication and slot made by
//! `outbox-relay init`, writers that fill the outbox from server-side procedures
//! (no client round trip per row, so the writer costs the machine as little as it
//! can), and the relay as a child process watched through `/metrics` and `/proc`.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use rdkafka::consumer::{BaseConsumer, Consumer};
use sqlx::postgres::PgPoolOptions;
use sqlx::PgPool;
use testkit::process::{cpu_seconds, memory_kib, metric_sum};
use testkit::{PrivateBroker, PrivateCluster};

use crate::Workload;

/// The topic the lab's events go to: the relay's default template with the
/// writers' aggregate type, `bench`.
pub(crate) const TOPIC: &str = "outbox.event.bench";

/// [`TOPIC`]'s partitions, each with its low and high watermark.
pub(crate) fn watermarks(consumer: &BaseConsumer) -> anyhow::Result<Vec<(i32, i64, i64)>> {
    let timeout = Duration::from_secs(10);
    let metadata = consumer.fetch_metadata(Some(TOPIC), timeout)?;
    let mut partitions = Vec::new();
    for topic in metadata.topics() {
        for partition in topic.partitions() {
            let (low, high) = consumer.fetch_watermarks(TOPIC, partition.id(), timeout)?;
            partitions.push((partition.id(), low, high));
        }
    }
    Ok(partitions)
}

/// The relay's routed-events counter.
pub(crate) const ROUTED: &str = outbox_relay::metrics::EVENTS_ROUTED;

/// A cluster, a broker and a database whose outbox the relay has been set up for.
#[derive(Debug)]
pub(crate) struct RelayLab {
    pub(crate) cluster: PrivateCluster,
    pub(crate) broker: PrivateBroker,
    pub(crate) url: String,
    pub(crate) db: PgPool,
    relay_bin: PathBuf,
}

impl RelayLab {
    /// Starts the cluster and broker, creates database `bench` with the outbox
    /// table and the writer procedures, and runs `outbox-relay init`.
    pub(crate) async fn new(relay_bin: &Path) -> anyhow::Result<RelayLab> {
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
        sqlx::raw_sql(WRITERS)
            .execute(&db)
            .await
            .context("creating the writer procedures")?;
        let lab = RelayLab {
            cluster,
            broker,
            url,
            db,
            relay_bin: relay_bin.to_owned(),
        };
        let init = tokio::process::Command::new(&lab.relay_bin)
            .arg("init")
            .envs(lab.relay_env(0))
            .output()
            .await?;
        if !init.status.success() {
            bail!(
                "outbox-relay init failed: {}",
                String::from_utf8_lossy(&init.stderr)
            );
        }
        Ok(lab)
    }

    /// The relay's settings on this lab, its HTTP endpoints on `port`.
    fn relay_env(&self, port: u16) -> Vec<(&'static str, String)> {
        vec![
            ("OUTBOX_RELAY_POSTGRES_URL", self.url.clone()),
            ("OUTBOX_RELAY_KAFKA_BROKERS", self.broker.bootstrap()),
            ("OUTBOX_RELAY_HTTP_LISTEN", format!("127.0.0.1:{port}")),
            ("OUTBOX_RELAY_TOPIC_PARTITIONS", "3".to_owned()),
            ("OUTBOX_RELAY_LOG", "warn".to_owned()),
        ]
    }

    /// Starts the relay (default settings but for `extra`).
    pub(crate) async fn start_relay(
        &self,
        extra: &[(&str, String)],
    ) -> anyhow::Result<RelayProcess> {
        let port = testkit::free_port();
        let child = tokio::process::Command::new(&self.relay_bin)
            .envs(self.relay_env(port))
            .envs(extra.iter().map(|(k, v)| (*k, v.as_str())))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .context("starting outbox-relay")?;
        let pid = child.id().context("the relay's pid")?;
        testkit::leftovers::record(pid);
        Ok(RelayProcess {
            child,
            pid,
            metrics_url: format!("http://127.0.0.1:{port}/metrics"),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(5))
                .build()?,
            peak_rss_kib: 0,
        })
    }

    /// Writes `events` outbox rows, `rows_per_txn` per transaction, as fast as one
    /// backend can; the seconds it took.
    pub(crate) async fn write_rows(&self, workload: Workload, events: u64) -> anyhow::Result<f64> {
        let started = Instant::now();
        sqlx::query("CALL bench_write($1, $2, $3)")
            .bind(i64::try_from(events)?)
            .bind(i64::try_from(workload.rows_per_txn)?)
            .bind(i32::try_from(workload.payload_bytes)?)
            .execute(&self.db)
            .await
            .context("writing the outbox rows")?;
        Ok(started.elapsed().as_secs_f64())
    }

    /// Writes `events` one-row transactions at `per_second`, `bytes` of payload
    /// each, paced by the server; the seconds it took (more than
    /// `events / per_second` when the server could not keep the pace).
    pub(crate) async fn write_paced(
        &self,
        events: u64,
        per_second: u32,
        bytes: usize,
    ) -> anyhow::Result<f64> {
        let started = Instant::now();
        sqlx::query("CALL bench_paced($1, $2, $3)")
            .bind(i64::try_from(events)?)
            .bind(i32::try_from(per_second)?)
            .bind(i32::try_from(bytes)?)
            .execute(&self.db)
            .await
            .context("writing paced outbox rows")?;
        Ok(started.elapsed().as_secs_f64())
    }

    /// Rows in the outbox table.
    pub(crate) async fn written(&self) -> anyhow::Result<u64> {
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox")
            .fetch_one(&self.db)
            .await?;
        Ok(u64::try_from(n)?)
    }

    /// The ids of the rows in the outbox table, as the relay sends them (header `id`).
    pub(crate) async fn event_ids(&self) -> anyhow::Result<Vec<String>> {
        Ok(sqlx::query_scalar("SELECT id::text FROM outbox")
            .fetch_all(&self.db)
            .await?)
    }

    /// Stops everything.
    pub(crate) async fn close(self) {
        self.db.close().await;
        drop(self.broker);
        drop(self.cluster);
    }
}

/// The writers: `bench_write` fills the outbox as fast as it can (a COMMIT per
/// transaction of `per_txn` rows); `bench_paced` commits one row at a time on a
/// schedule of `per_second`, sleeping whenever it is more than a millisecond ahead.
/// Keys cycle over 1,000 aggregates; the payload is JSON of about `bytes` bytes.
const WRITERS: &str = "
CREATE PROCEDURE bench_write(total bigint, per_txn bigint, bytes int) LANGUAGE plpgsql AS $$
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
END $$;

CREATE PROCEDURE bench_paced(total bigint, per_second int, bytes int) LANGUAGE plpgsql AS $$
DECLARE
  started timestamptz := clock_timestamp();
  done bigint := 0;
  ahead float8;
BEGIN
  WHILE done < total LOOP
    INSERT INTO outbox (id, aggregatetype, aggregateid, type, payload)
    VALUES (gen_random_uuid(), 'bench', (done % 1000)::text, 'BenchEvent',
            jsonb_build_object('n', done, 'data', repeat('x', greatest(bytes - 30, 0))));
    COMMIT;
    done := done + 1;
    ahead := done::float8 / per_second - extract(epoch FROM clock_timestamp() - started);
    IF ahead > 0.001 THEN
      PERFORM pg_sleep(ahead);
    END IF;
  END LOOP;
END $$;
";

/// The relay as a child process.
#[derive(Debug)]
pub(crate) struct RelayProcess {
    child: tokio::process::Child,
    pub(crate) pid: u32,
    metrics_url: String,
    http: reqwest::Client,
    /// The highest `VmHWM` seen by [`RelayProcess::sample`].
    pub(crate) peak_rss_kib: u64,
}

impl RelayProcess {
    /// Its `/metrics` text; empty while it does not answer yet.
    pub(crate) async fn metrics(&self) -> String {
        match self.http.get(&self.metrics_url).send().await {
            Ok(response) => response.text().await.unwrap_or_default(),
            Err(_) => String::new(),
        }
    }

    /// Whether it has stopped reading at its window (`/health`'s
    /// `reading_paused`); false while it does not answer.
    pub(crate) async fn reading_paused(&self) -> bool {
        let url = self.metrics_url.replace("/metrics", "/health");
        match self.http.get(&url).send().await {
            Ok(response) => response
                .text()
                .await
                .unwrap_or_default()
                .contains("\"reading_paused\":true"),
            Err(_) => false,
        }
    }

    /// The `status` of its `/health` report; `None` while it does not answer.
    pub(crate) async fn status(&self) -> Option<String> {
        let url = self.metrics_url.replace("/metrics", "/health");
        let response = self
            .http
            .get(&url)
            .timeout(Duration::from_secs(1))
            .send()
            .await
            .ok()?;
        let body = response.text().await.ok()?;
        let status = body.split("\"status\":\"").nth(1)?;
        Some(status.split('"').next()?.to_owned())
    }

    /// Sends signal `name` (`STOP`, `CONT`).
    pub(crate) fn signal(&self, name: &str) -> anyhow::Result<()> {
        let status = std::process::Command::new("kill")
            .args([format!("-{name}"), self.pid.to_string()])
            .status()?;
        if !status.success() {
            bail!("kill -{name} {} failed", self.pid);
        }
        Ok(())
    }

    /// SIGKILL, and waits for the exit.
    pub(crate) async fn kill(&mut self) {
        let _ = self.child.kill().await;
    }

    /// SIGTERM, and waits for the exit (20 s at most).
    pub(crate) async fn terminate(&mut self) {
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &self.pid.to_string()])
            .status();
        let _ = tokio::time::timeout(Duration::from_secs(20), self.child.wait()).await;
    }

    /// Events routed and acknowledged so far.
    pub(crate) async fn routed(&self) -> u64 {
        metric_sum(&self.metrics().await, ROUTED)
    }

    /// Resident memory now (KiB), and records the peak.
    pub(crate) fn sample(&mut self) -> Option<u64> {
        let (rss, hwm) = memory_kib(self.pid)?;
        self.peak_rss_kib = self.peak_rss_kib.max(hwm);
        Some(rss)
    }

    /// CPU seconds (user + system) it has used so far.
    pub(crate) fn cpu_seconds(&self) -> f64 {
        cpu_seconds(self.pid).unwrap_or(f64::NAN)
    }

    /// Polls every 20 ms until `events` are routed; fails after `timeout` or when
    /// the relay exits.
    pub(crate) async fn wait_routed(
        &mut self,
        events: u64,
        timeout: Duration,
    ) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            self.sample();
            let routed = self.routed().await;
            if routed >= events {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("the relay routed {routed} of {events} events in {timeout:?}");
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                bail!("the relay exited early: {status}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// SIGTERM, and waits for it to exit (20 s at most).
    pub(crate) async fn stop(mut self) {
        self.sample();
        self.terminate().await;
    }
}

/// Runs the future `make` returns on a thread of its own, under a single-threaded
/// runtime, as the relay's binary runs: a reader in the benchmark's own
/// multi-threaded runtime pays a wake-up across threads for every read, which on
/// small transactions made it slower than the relay it is the baseline of.
pub(crate) async fn on_own_thread<F, Fut, T>(make: F) -> anyhow::Result<T>
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = anyhow::Result<T>>,
    T: Send + 'static,
{
    let (done, result) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("bench-reader".to_owned())
        .spawn(move || {
            let outcome = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(anyhow::Error::from)
                .and_then(|runtime| runtime.block_on(make()));
            let _ = done.send(outcome);
        })?;
    result
        .await
        .context("the reader's thread ended without an answer")?
}

/// Streams slot `slot` of the database at `url` from its confirmed position, with
/// the relay's publication and protocol version: a minimal reader's stream.
pub(crate) async fn stream_slot(
    url: &str,
    slot: &str,
) -> anyhow::Result<outbox_relay::replication::ReplicationStream> {
    use outbox_relay::replication::{ConnectConfig, ReplicationClient};
    let client = ReplicationClient::connect(&ConnectConfig::from_url(url)?).await?;
    Ok(client
        .start_logical_replication(
            slot,
            outbox_relay::Lsn::new(0),
            &[
                ("proto_version", "1"),
                (
                    "publication_names",
                    outbox_relay::config::DEFAULT_PUBLICATION,
                ),
            ],
        )
        .await?)
}

async fn pool(url: &str) -> anyhow::Result<PgPool> {
    PgPoolOptions::new()
        .max_connections(2)
        .connect(url)
        .await
        .with_context(|| format!("connecting to {url}"))
}
