//! Server problems the relay cannot fix by itself (`wal_level` below logical, an
//! invalidated slot): `outbox-relay check` names them, and a running relay reports
//! them on `/health` and keeps running instead of working around them. Each test
//! has a private PostgreSQL cluster, since the shared one must not have these
//! settings.

mod support;

use std::time::{Duration, Instant};

use serde_json::Value;
use sqlx::PgPool;
use support::{relay_subcommand, Relay, RelaySettings};
use testkit::{settings, unique_name, PrivateCluster};

/// The outbox table, as services create it.
const OUTBOX_DDL: &str = include_str!("../../sql/shared/0001_outbox.sql");

/// The slot the relay uses by default for database `postgres`.
const SLOT: &str = "outbox_relay_postgres";

/// How long the relay may take to report a failure on `/health`.
const HEALTH_DEADLINE: Duration = Duration::from_secs(60);

/// How long the relay is watched after reporting a failure: it must keep running
/// and keep reporting it (the next retry is 60 s away).
const STILL_FAILED_FOR: Duration = Duration::from_secs(3);

/// How long generating WAL may take to get the slot invalidated.
const INVALIDATION_DEADLINE: Duration = Duration::from_secs(120);

/// A private cluster with `server_settings` and the outbox table in database
/// `postgres`, and a pool on that database.
async fn outbox_cluster(server_settings: &[(&str, &str)]) -> (PrivateCluster, PgPool) {
    let cluster = PrivateCluster::start(server_settings);
    let pool = PgPool::connect(&cluster.url("postgres"))
        .await
        .expect("connect to the private cluster");
    sqlx::raw_sql(OUTBOX_DDL)
        .execute(&pool)
        .await
        .expect("create the outbox table");
    (cluster, pool)
}

fn relay_settings(cluster: &PrivateCluster) -> RelaySettings {
    RelaySettings {
        postgres_url: cluster.url("postgres"),
        brokers: settings().kafka_brokers.clone(),
        topic_prefix: unique_name("relay"),
        extra: vec![],
        args: vec![],
    }
}

/// The line of `outbox-relay check`'s report about `subject`.
fn line<'a>(report: &'a str, subject: &str) -> &'a str {
    report
        .lines()
        .find(|l| l.split_whitespace().nth(1) == Some(subject))
        .unwrap_or_else(|| panic!("no {subject} line in:\n{report}"))
}

/// `/health` once: (HTTP status, the JSON body).
async fn health(relay: &Relay) -> (u16, Value) {
    let (status, body) = relay.http_get("/health").await;
    let json = serde_json::from_str(&body).unwrap_or(Value::Null);
    (status, json)
}

fn is_failed(status: u16, json: &Value) -> bool {
    status == 503 && json["status"] == "failed"
}

/// Waits until `/health` answers 503 with status `failed`, then checks that the
/// relay keeps running and keeps saying so for a while; returns the reason.
async fn wait_for_failed_health(relay: &mut Relay) -> String {
    let deadline = Instant::now() + HEALTH_DEADLINE;
    let json = loop {
        assert!(
            relay.is_running(),
            "the relay exited instead of reporting the failure; log:\n{}",
            relay.log_text()
        );
        let (status, json) = health(relay).await;
        if is_failed(status, &json) {
            break json;
        }
        assert!(
            Instant::now() < deadline,
            "/health did not report failed within {HEALTH_DEADLINE:?}; last answer {status} \
             {json}; log:\n{}",
            relay.log_text()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };

    let watched_until = Instant::now() + STILL_FAILED_FOR;
    while Instant::now() < watched_until {
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(
            relay.is_running(),
            "the relay exited after reporting the failure; log:\n{}",
            relay.log_text()
        );
        let (status, later) = health(relay).await;
        assert!(
            is_failed(status, &later),
            "/health stopped reporting the failure: {status} {later}"
        );
    }

    eprintln!("/health: {json}");
    json["reason"]
        .as_str()
        .unwrap_or_else(|| panic!("a failed /health without a reason: {json}"))
        .to_owned()
}

/// The slot's `wal_status`: `None` when the slot does not exist.
async fn slot_wal_status(pool: &PgPool) -> Option<Option<String>> {
    sqlx::query_scalar("SELECT wal_status FROM pg_replication_slots WHERE slot_name = $1")
        .bind(SLOT)
        .fetch_optional(pool)
        .await
        .expect("read pg_replication_slots")
}

/// Writes and recycles WAL until the checkpointer invalidates the slot (nobody reads
/// from it, and `max_slot_wal_keep_size` lets the server remove what it holds).
async fn invalidate_slot(pool: &PgPool, cluster: &PrivateCluster) {
    let deadline = Instant::now() + INVALIDATION_DEADLINE;
    let mut rounds = 0;
    loop {
        let status = slot_wal_status(pool).await;
        match status.as_ref().map(Option::as_deref) {
            Some(Some("lost")) => break,
            Some(_) => {}
            None => panic!("slot {SLOT} disappeared while generating WAL"),
        }
        assert!(
            Instant::now() < deadline,
            "slot {SLOT} was not invalidated after {rounds} rounds of WAL ({INVALIDATION_DEADLINE:?}): \
             wal_status {status:?}; server log:\n{}",
            cluster.log_text()
        );
        for statement in [
            "CREATE TABLE IF NOT EXISTS filler (x text)",
            "INSERT INTO filler SELECT repeat('x', 1000) FROM generate_series(1, 5000)",
            "SELECT pg_switch_wal()",
            "CHECKPOINT",
        ] {
            sqlx::query(statement)
                .execute(pool)
                .await
                .unwrap_or_else(|e| panic!("{statement}: {e}"));
        }
        rounds += 1;
    }
    eprintln!("slot {SLOT} invalidated after {rounds} rounds of WAL");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wal_level_replica_is_reported_by_check_and_health() {
    let (cluster, pool) = outbox_cluster(&[("wal_level", "replica")]).await;
    let settings = relay_settings(&cluster);

    let (code, report, err) = relay_subcommand(&settings, "check");
    assert_eq!(code, 1, "{report}{err}");
    assert!(line(&report, "postgres").starts_with("ok"), "{report}");
    let wal_level = line(&report, "wal_level");
    eprintln!("{wal_level}");
    assert!(wal_level.starts_with("FAIL"), "{report}");
    assert!(wal_level.contains("wal_level=replica"), "{report}");
    assert!(wal_level.contains("logical"), "{report}");

    let mut relay = Relay::start(&settings);
    let reason = wait_for_failed_health(&mut relay).await;
    assert!(reason.contains("wal_level"), "{reason}");
    assert!(reason.contains("replica"), "{reason}");
    relay.kill();

    pool.close().await;
    drop(cluster);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalidated_slot_is_reported_and_never_recreated() {
    let (cluster, pool) = outbox_cluster(&[
        ("wal_level", "logical"),
        ("max_slot_wal_keep_size", "1MB"),
        ("max_wal_size", "32MB"),
        ("min_wal_size", "32MB"),
        ("wal_keep_size", "0"),
        ("checkpoint_timeout", "30s"),
    ])
    .await;
    let settings = relay_settings(&cluster);

    let (code, out, err) = relay_subcommand(&settings, "init");
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains(SLOT), "{out}");
    let status = slot_wal_status(&pool).await;
    assert!(
        matches!(status.as_ref().map(Option::as_deref), Some(Some(s)) if s != "lost"),
        "after init: wal_status {status:?}"
    );

    // No relay reads from the slot: the server may remove the WAL it holds.
    invalidate_slot(&pool, &cluster).await;

    let (code, report, err) = relay_subcommand(&settings, "check");
    assert_eq!(code, 1, "{report}{err}");
    let slot = line(&report, "slot");
    eprintln!("{slot}");
    assert!(slot.starts_with("FAIL"), "{report}");
    assert!(slot.contains("invalidated"), "{report}");

    let mut relay = Relay::start(&settings);
    let reason = wait_for_failed_health(&mut relay).await;
    assert!(reason.contains("invalidated"), "{reason}");
    relay.kill();

    // The relay neither dropped nor recreated the slot: it is still the lost one.
    let slots: Vec<(String, Option<String>)> =
        sqlx::query_as("SELECT slot_name::text, wal_status FROM pg_replication_slots")
            .fetch_all(&pool)
            .await
            .expect("read pg_replication_slots");
    assert_eq!(
        slots,
        vec![(SLOT.to_owned(), Some("lost".to_owned()))],
        "log:\n{}",
        relay.log_text()
    );

    pool.close().await;
    drop(cluster);
}
