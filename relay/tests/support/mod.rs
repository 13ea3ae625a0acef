//! Shared pieces of the relay's integration tests: an outbox database, the relay
//! as a child process, and a consumer that collects what arrived.

#![allow(dead_code, unreachable_pub)]

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use futures::StreamExt;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::Headers;
use rdkafka::Message;
use serde_json::{json, Value};
use sqlx::PgPool;
use testkit::{consumer_config_on, unique_name, wait_for_topic_on, TestDatabase};
use uuid::Uuid;

pub mod sinks;

/// The outbox table, as services create it.
const OUTBOX_DDL: &str = include_str!("../../../sql/shared/0001_outbox.sql");

/// How much bigger the long form of a test is; `OUTBOX_TEST_SCALE=10` for a soak.
pub fn scale() -> usize {
    std::env::var("OUTBOX_TEST_SCALE")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&n| n > 0)
        .unwrap_or(1)
}

/// A seed from `OUTBOX_TEST_SEED`, or a fresh one; printed so a failure can be replayed.
pub fn seed() -> u64 {
    let seed = std::env::var("OUTBOX_TEST_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(7)
                | 1
        });
    eprintln!("OUTBOX_TEST_SEED={seed}");
    seed
}

/// A small deterministic generator (xorshift64*), enough for test choices.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.max(1))
    }

    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// A number in `low..=high`.
    pub fn range(&mut self, low: u64, high: u64) -> u64 {
        low + self.next() % (high - low + 1)
    }
}

/// One outbox row as a test writes it.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    pub id: Uuid,
    pub aggregate_type: String,
    pub aggregate_id: String,
    pub event_type: String,
    pub payload: Value,
    pub headers: Option<Value>,
}

impl Row {
    /// The `seq`-th event of `key`; the aggregate type follows from the key.
    pub fn event(key: usize, seq: usize) -> Row {
        let aggregate_type = if key % 2 == 0 { "order" } else { "customer" };
        Row {
            id: Uuid::now_v7(),
            aggregate_type: aggregate_type.to_owned(),
            aggregate_id: format!("key-{key}"),
            event_type: "Changed".to_owned(),
            payload: json!({ "key": key, "seq": seq, "note": "x".repeat(key % 7 * 10) }),
            headers: Some(json!({ "traceparent": format!("00-{key:032x}-{seq:016x}-01") })),
        }
    }
}

/// A fresh database with the outbox table.
#[derive(Debug)]
pub struct OutboxDb {
    pub db: TestDatabase,
}

impl OutboxDb {
    pub async fn new() -> OutboxDb {
        OutboxDb::with_ddl(OUTBOX_DDL).await
    }

    /// A fresh database whose outbox table `ddl` creates.
    pub async fn with_ddl(ddl: &str) -> OutboxDb {
        let db = TestDatabase::create().await;
        sqlx::raw_sql(ddl)
            .execute(db.pool())
            .await
            .expect("create the outbox table");
        OutboxDb { db }
    }

    pub fn pool(&self) -> &PgPool {
        self.db.pool()
    }

    /// The slot the relay uses by default for this database.
    pub fn slot(&self) -> String {
        format!("outbox_relay_{}", self.db.name())
    }

    /// Writes `rows` in one transaction; with `delete_after`, deletes them again in
    /// the same transaction (the insert is still in the WAL).
    pub async fn write(&self, rows: &[Row], delete_after: bool) {
        write_rows(self.pool(), rows, delete_after).await;
    }

    /// Waits until the relay's slot is listed. Rows committed from then on reach the
    /// relay: through the stream, or through the initial snapshot while the slot
    /// still waits for a consistent point.
    pub async fn wait_for_slot(&self) {
        self.wait_slot(|active| active.is_some(), "exist").await;
    }

    /// Waits until a walsender streams from the slot, returning its pid.
    pub async fn wait_for_streaming(&self) -> i32 {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(Some(pid)) = self.slot_pid().await {
                return pid;
            }
            assert!(
                Instant::now() < deadline,
                "nobody streams from slot {}",
                self.slot()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// `None`: no slot; `Some(None)`: the slot is inactive; `Some(Some(pid))`: active.
    pub async fn slot_pid(&self) -> Option<Option<i32>> {
        sqlx::query_scalar("SELECT active_pid FROM pg_replication_slots WHERE slot_name = $1")
            .bind(self.slot())
            .fetch_optional(self.pool())
            .await
            .expect("read pg_replication_slots")
    }

    async fn wait_slot(&self, done: impl Fn(Option<Option<i32>>) -> bool, what: &str) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !done(self.slot_pid().await) {
            assert!(
                Instant::now() < deadline,
                "slot {} did not {what}",
                self.slot()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The slot's `confirmed_flush_lsn` as text.
    pub async fn confirmed_flush(&self) -> Option<String> {
        sqlx::query_scalar(
            "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1",
        )
        .bind(self.slot())
        .fetch_optional(self.pool())
        .await
        .expect("read pg_replication_slots")
        .flatten()
    }
}

/// The relay binary as a child process.
#[derive(Debug)]
pub struct Relay {
    child: Child,
    pub log: PathBuf,
}

/// How a test's relay is configured.
#[derive(Debug, Clone)]
pub struct RelaySettings {
    pub postgres_url: String,
    pub brokers: String,
    pub topic_prefix: String,
    pub extra: Vec<(String, String)>,
    pub args: Vec<String>,
}

impl RelaySettings {
    pub fn new(db: &OutboxDb, brokers: &str) -> RelaySettings {
        RelaySettings {
            postgres_url: db.db.url(),
            brokers: brokers.to_owned(),
            topic_prefix: unique_name("relay"),
            extra: Vec::new(),
            args: Vec::new(),
        }
    }

    /// A command-line argument for the relay.
    pub fn arg(mut self, arg: impl Into<String>) -> RelaySettings {
        self.args.push(arg.into());
        self
    }

    pub fn with(mut self, name: &str, value: impl ToString) -> RelaySettings {
        self.extra.push((name.to_owned(), value.to_string()));
        self
    }

    pub fn topic(&self, aggregate_type: &str) -> String {
        format!("{}.{aggregate_type}", self.topic_prefix)
    }
}

/// The relay binary configured by `settings` (environment and arguments).
/// `OUTBOX_TEST_RELAY_BIN` runs another build of the relay instead of this
/// crate's (an older one, to see a test fail before its fix).
fn relay_command(settings: &RelaySettings) -> Command {
    let binary = std::env::var_os("OUTBOX_TEST_RELAY_BIN")
        .unwrap_or_else(|| env!("CARGO_BIN_EXE_outbox-relay").into());
    let mut command = Command::new(binary);
    command
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("OUTBOX_RELAY_LOG", "info,outbox_relay=debug")
        .env("OUTBOX_RELAY_POSTGRES_URL", &settings.postgres_url)
        .env("OUTBOX_RELAY_KAFKA_BROKERS", &settings.brokers)
        .env(
            "OUTBOX_RELAY_TOPIC_TEMPLATE",
            format!("{}.{{aggregatetype}}", settings.topic_prefix),
        )
        .env("OUTBOX_RELAY_TOPIC_PARTITIONS", "3")
        .env("OUTBOX_RELAY_TOPIC_REPLICATION_FACTOR", "1")
        .env("OUTBOX_RELAY_STATUS_INTERVAL_MS", "200")
        .env("OUTBOX_RELAY_HTTP_LISTEN", "127.0.0.1:0")
        .stdin(Stdio::null());
    for (name, value) in &settings.extra {
        command.env(name, value);
    }
    command
}

/// Runs `outbox-relay <subcommand>` to its end: (exit code, stdout, stderr).
pub fn relay_subcommand(settings: &RelaySettings, subcommand: &str) -> (i32, String, String) {
    let output = relay_command(settings)
        .arg(subcommand)
        .args(&settings.args)
        .output()
        .expect("run outbox-relay");
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

impl Relay {
    pub fn start(settings: &RelaySettings) -> Relay {
        let log = std::env::temp_dir().join(format!("{}.log", unique_name("relay")));
        let file = std::fs::File::create(&log).expect("create the relay log");
        let mut command = relay_command(settings);
        command
            .stdout(Stdio::null())
            .stderr(file)
            .args(&settings.args);
        let child = command.spawn().expect("start outbox-relay");
        Relay { child, log }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL, and reap the process.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, then waits up to `timeout` for the exit.
    pub fn terminate(&mut self, timeout: Duration) -> ExitStatus {
        let _ = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status();
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("poll the relay") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "the relay did not exit within {timeout:?} of SIGTERM; log:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Sends signal `name` (`STOP`, `CONT`, ...) to the process.
    pub fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .args([&format!("-{name}"), &self.pid().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{name} failed");
    }

    /// Whether the process still runs.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Resident memory in KiB, from /proc.
    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .expect("read /proc/<pid>/status");
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .expect("VmRSS in /proc/<pid>/status")
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The address of the relay's HTTP endpoint, from its log (it binds port 0).
    pub async fn http_address(&self) -> String {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let log = self.log_text();
            let found = log
                .lines()
                .filter(|l| l.contains("serving /metrics"))
                .find_map(|l| l.split("address=").nth(1))
                .and_then(|rest| rest.split_whitespace().next())
                .map(str::to_owned);
            if let Some(address) = found {
                return address;
            }
            assert!(
                Instant::now() < deadline,
                "no HTTP address in the log:\n{log}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// GET `path` from the relay's HTTP endpoint: (status, body).
    pub async fn http_get(&self, path: &str) -> (u16, String) {
        self.try_http_get(path, Duration::from_secs(10))
            .await
            .unwrap_or_else(|e| panic!("GET {path}: {e}"))
    }

    /// GET `path`, or why it failed (no connection, no answer within `timeout`).
    pub async fn try_http_get(
        &self,
        path: &str,
        timeout: Duration,
    ) -> Result<(u16, String), String> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let address = self.http_address().await;
        let exchange = async {
            let mut stream = tokio::net::TcpStream::connect(&address).await?;
            let request =
                format!("GET {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n");
            stream.write_all(request.as_bytes()).await?;
            let mut response = String::new();
            stream.read_to_string(&mut response).await?;
            Ok::<_, std::io::Error>(response)
        };
        let response = tokio::time::timeout(timeout, exchange)
            .await
            .map_err(|_| format!("no answer within {timeout:?}"))?
            .map_err(|e| e.to_string())?;
        let status = response
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        let body = response
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_owned())
            .unwrap_or_default();
        Ok((status, body))
    }

    /// The `status` field of `/health`, or `None` when the relay does not answer
    /// within `timeout` (stopped, dead, not listening).
    pub async fn health_status(&self, timeout: Duration) -> Option<String> {
        let (_, body) = self.try_http_get("/health", timeout).await.ok()?;
        let report: Value = serde_json::from_str(&body).ok()?;
        report["status"].as_str().map(str::to_owned)
    }

    /// The value of an unlabelled metric from /metrics.
    /// Polls `/health` until `done(status, body)`, failing with the log after a
    /// minute; returns the body.
    pub async fn wait_for_health(&self, what: &str, done: impl Fn(u16, &str) -> bool) -> String {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let (status, body) = self.http_get("/health").await;
            if done(status, &body) {
                return body;
            }
            assert!(
                Instant::now() < deadline,
                "/health never showed {what}: {status} {body}; log:\n{}",
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub async fn metric(&self, name: &str) -> Option<f64> {
        let (_, body) = self.http_get("/metrics").await;
        body.lines()
            .find(|l| l.split_whitespace().next() == Some(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!(
                "--- relay log {} ---\n{}",
                self.log.display(),
                self.log_text()
            );
        } else {
            let _ = std::fs::remove_file(&self.log);
        }
    }
}

/// A record as a test sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct Received {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub key: String,
    pub payload: Option<Value>,
    pub headers: BTreeMap<String, String>,
}

impl Received {
    pub fn id(&self) -> &str {
        self.headers.get("id").map(String::as_str).unwrap_or("")
    }

    /// (commit LSN, index): the position headers.
    pub fn position(&self) -> (String, String) {
        (
            self.headers
                .get("outbox-commit-lsn")
                .cloned()
                .unwrap_or_default(),
            self.headers
                .get("outbox-index")
                .cloned()
                .unwrap_or_default(),
        )
    }
}

/// A consumer of the given topics, reading from the beginning.
pub struct Collector {
    consumer: StreamConsumer,
    pub received: Vec<Received>,
}

impl Collector {
    /// Waits until every topic exists with `partitions` partitions, then subscribes.
    pub async fn new(brokers: &str, topics: &[String], partitions: i32) -> Collector {
        for topic in topics {
            wait_for_topic_on(Some(brokers), topic, partitions).await;
        }
        // The local broker holds every fetch for fetch.wait.max.ms even with data
        // waiting: with librdkafka's 500 ms, a topic written in many small batches
        // (several relays, a light load) takes minutes to read.
        let consumer: StreamConsumer = consumer_config_on(Some(brokers), &unique_name("group"))
            .set("fetch.wait.max.ms", "10")
            .create()
            .expect("create the consumer");
        let names: Vec<&str> = topics.iter().map(String::as_str).collect();
        consumer.subscribe(&names).expect("subscribe");
        Collector {
            consumer,
            received: Vec::new(),
        }
    }

    /// Subscribes to `topics` and reads until a record with id `id` arrived, then
    /// whatever else comes within a second.
    pub async fn through(brokers: &str, topics: &[String], id: &str) -> Collector {
        let mut collector = Collector::new(brokers, topics, 3).await;
        collector
            .until(Duration::from_secs(60), |r| r.iter().any(|x| x.id() == id))
            .await;
        collector.drain_for(Duration::from_secs(1)).await;
        collector
    }

    /// Reads until `done(received)` holds, failing after `timeout` without progress.
    pub async fn until(&mut self, timeout: Duration, done: impl Fn(&[Received]) -> bool) {
        let mut stream = self.consumer.stream();
        while !done(&self.received) {
            let next = tokio::time::timeout(timeout, stream.next()).await;
            let message = match next {
                Ok(Some(Ok(message))) => message,
                Ok(Some(Err(e))) => panic!("consumer error: {e}"),
                Ok(None) => panic!("the consumer stream ended"),
                Err(_) => panic!(
                    "no record for {timeout:?}; {} received so far",
                    self.received.len()
                ),
            };
            self.received.push(received(&message));
        }
    }

    /// The next record, if one comes within `wait`.
    pub async fn next(&mut self, wait: Duration) -> Option<Received> {
        let mut stream = self.consumer.stream();
        match tokio::time::timeout(wait, stream.next()).await {
            Ok(Some(Ok(message))) => Some(received(&message)),
            Ok(Some(Err(e))) => panic!("consumer error: {e}"),
            Ok(None) => panic!("the consumer stream ended"),
            Err(_) => None,
        }
    }

    /// Reads whatever arrives within `quiet`, for checks that nothing more comes.
    pub async fn drain_for(&mut self, quiet: Duration) {
        let deadline = Instant::now() + quiet;
        let mut stream = self.consumer.stream();
        while let Ok(Some(Ok(message))) =
            tokio::time::timeout_at(deadline.into(), stream.next()).await
        {
            self.received.push(received(&message));
        }
    }
}

fn received(message: &rdkafka::message::BorrowedMessage<'_>) -> Received {
    let mut headers = BTreeMap::new();
    if let Some(h) = message.headers() {
        for header in h.iter() {
            let value = header
                .value
                .map(|v| String::from_utf8_lossy(v).into_owned())
                .unwrap_or_default();
            headers.insert(header.key.to_owned(), value);
        }
    }
    Received {
        topic: message.topic().to_owned(),
        partition: message.partition(),
        offset: message.offset(),
        key: String::from_utf8_lossy(message.key().unwrap_or_default()).into_owned(),
        payload: message
            .payload()
            .map(|p| serde_json::from_slice(p).expect("payload is JSON")),
        headers,
    }
}

/// Writes `rows` in one transaction; with `delete_after`, deletes them again in the
/// same transaction (the insert is still in the WAL).
pub async fn write_rows(pool: &PgPool, rows: &[Row], delete_after: bool) {
    write_rows_at(pool, rows, delete_after, None).await;
}

/// [`write_rows`] with the rows' `created_at` set (`None`: the column's default).
pub async fn write_rows_at(
    pool: &PgPool,
    rows: &[Row],
    delete_after: bool,
    created_at: Option<&str>,
) {
    let mut tx = pool.begin().await.expect("begin");
    for row in rows {
        sqlx::query(
            "INSERT INTO outbox (id, aggregatetype, aggregateid, type, payload, headers, created_at) \
             VALUES ($1, $2, $3, $4, $5, $6, coalesce($7::timestamptz, now()))",
        )
        .bind(row.id)
        .bind(&row.aggregate_type)
        .bind(&row.aggregate_id)
        .bind(&row.event_type)
        .bind(&row.payload)
        .bind(&row.headers)
        .bind(created_at)
        .execute(&mut *tx)
        .await
        .expect("insert an outbox row");
    }
    if delete_after {
        let ids: Vec<Uuid> = rows.iter().map(|r| r.id).collect();
        sqlx::query("DELETE FROM outbox WHERE id = ANY($1)")
            .bind(&ids)
            .execute(&mut *tx)
            .await
            .expect("delete the outbox rows");
    }
    tx.commit().await.expect("commit");
}

pub const KEYS: usize = 50;

/// Writes `transactions` transactions of 1 to 100 rows over [`KEYS`] keys, each key's
/// events numbered in commit order; every seventh transaction deletes its rows again
/// before committing.
pub async fn write_workload(
    pool: &sqlx::PgPool,
    rng: &mut Rng,
    transactions: usize,
    seqs: &mut [usize],
) -> Vec<Row> {
    let mut written = Vec::new();
    for t in 0..transactions {
        let size = rng.range(1, 100) as usize;
        let rows: Vec<Row> = (0..size)
            .map(|_| {
                let key = rng.range(0, KEYS as u64 - 1) as usize;
                seqs[key] += 1;
                Row::event(key, seqs[key])
            })
            .collect();
        write_rows(pool, &rows, t % 7 == 3).await;
        written.extend(rows);
    }
    written
}

/// Checks every record against the row it came from, and order per key.
pub fn check_records(
    settings: &RelaySettings,
    written: &[Row],
    received: &[Received],
    exactly_once: bool,
) {
    let rows: HashMap<String, &Row> = written.iter().map(|r| (r.id.to_string(), r)).collect();
    let mut first: HashMap<&str, &Received> = HashMap::new();
    for record in received {
        let row = rows
            .get(record.id())
            .unwrap_or_else(|| panic!("a record with an unknown id: {record:?}"));
        assert_eq!(record.topic, settings.topic(&row.aggregate_type));
        assert_eq!(record.key, row.aggregate_id);
        assert_eq!(
            record.headers.get("type").map(String::as_str),
            Some("Changed")
        );
        assert_eq!(
            record.headers.get("traceparent"),
            row.headers
                .as_ref()
                .and_then(|h| h["traceparent"].as_str())
                .map(str::to_owned)
                .as_ref()
        );
        assert_eq!(
            record.payload.as_ref(),
            Some(&row.payload),
            "record {} arrived with another value",
            record.id()
        );
        match first.get(record.id()) {
            None => {
                first.insert(record.id(), record);
            }
            Some(original) => {
                assert!(!exactly_once, "{} delivered twice", record.id());
                assert_eq!(
                    original.position(),
                    record.position(),
                    "a duplicate of {} carries another position",
                    record.id()
                );
                assert_eq!(original.payload, record.payload);
            }
        }
    }
    let missing: Vec<&String> = rows
        .keys()
        .filter(|id| !first.contains_key(id.as_str()))
        .collect();
    assert!(
        missing.is_empty(),
        "{} of {} events never arrived, e.g. {:?}",
        missing.len(),
        rows.len(),
        missing.first()
    );

    // Order per key: in partition order, the first deliveries of a key's events come
    // in the order the events were committed.
    let mut by_partition: BTreeMap<(String, i32), Vec<&Received>> = BTreeMap::new();
    for record in received {
        by_partition
            .entry((record.topic.clone(), record.partition))
            .or_default()
            .push(record);
    }
    let mut key_partition: HashMap<&str, (String, i32)> = HashMap::new();
    let mut last_seq: HashMap<String, u64> = HashMap::new();
    let mut seen: HashSet<&str> = HashSet::new();
    for (place, mut records) in by_partition {
        records.sort_by_key(|r| r.offset);
        for record in records {
            let other = key_partition
                .entry(&record.key)
                .or_insert_with(|| place.clone());
            assert_eq!(*other, place, "key {} in two partitions", record.key);
            if !seen.insert(record.id()) {
                continue;
            }
            let seq = rows[record.id()].payload["seq"].as_u64().expect("seq");
            let last = last_seq.entry(record.key.clone()).or_default();
            assert!(
                seq > *last,
                "key {}: event {seq} arrived after {last}",
                record.key
            );
            *last = seq;
        }
    }
}
