//! Several relays configured alike for one database (the sidecars of a replicated
//! service): one streams, the others stand by, healthy and ready, and one of them
//! takes the slot over when the active relay is killed, stopped or hangs. Nothing
//! is lost, and the takeover times are printed.

mod support;

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use support::{
    check_records, write_workload, Collector, OutboxDb, Received, Relay, RelaySettings, Rng, Row,
    KEYS,
};
use testkit::settings;

/// The takeover bound of these tests: a holder silent this long is ended.
const TAKEOVER_AFTER: Duration = Duration::from_secs(3);
/// How long a test waits for a takeover before it fails; far above the targets
/// (5 s after SIGKILL, 2 s after SIGTERM, the bound after SIGSTOP), which are printed.
const TAKEOVER_LIMIT: Duration = Duration::from_secs(30);
const ANSWER: Duration = Duration::from_secs(2);

/// The index of the relay reporting `status` among `relays` (skipping `except`),
/// waiting up to `limit`.
async fn wait_for_status(
    relays: &[Relay],
    except: Option<usize>,
    status: &str,
    limit: Duration,
) -> usize {
    let deadline = Instant::now() + limit;
    loop {
        for (i, relay) in relays.iter().enumerate() {
            if Some(i) == except {
                continue;
            }
            if relay.health_status(ANSWER).await.as_deref() == Some(status) {
                return i;
            }
        }
        if Instant::now() >= deadline {
            let logs: Vec<String> = relays.iter().map(Relay::log_text).collect();
            panic!(
                "no relay reported {status} within {limit:?}; logs:\n{}",
                logs.join("\n-----\n")
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Every relay but `except` answers `/health` with `standby` (200) and `/ready`
/// with 200, and exactly one other streams.
async fn assert_one_active_rest_standby(relays: &[Relay], except: Option<usize>) -> usize {
    let active = wait_for_status(relays, except, "streaming", TAKEOVER_LIMIT).await;
    for (i, relay) in relays.iter().enumerate() {
        if i == active || Some(i) == except {
            continue;
        }
        let body = relay
            .wait_for_health("standby", |status, body| {
                status == 200 && body.contains("\"status\":\"standby\"")
            })
            .await;
        assert!(body.contains("\"role\":\"standby\""), "{body}");
        let (ready, body) = relay.http_get("/ready").await;
        assert_eq!(ready, 200, "a standby is ready: {body}");
    }
    active
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_takes_over_when_the_active_relay_is_killed_stopped_or_hangs() {
    let db = OutboxDb::new().await;
    let brokers = settings().kafka_brokers.clone();
    let settings = RelaySettings::new(&db, &brokers)
        .with("OUTBOX_RELAY_TAKEOVER_AFTER_MS", TAKEOVER_AFTER.as_millis());
    // Started together, as a Deployment's pods are: they race to create the slot.
    let mut relays: Vec<Relay> = (0..3).map(|_| Relay::start(&settings)).collect();
    let mut active = assert_one_active_rest_standby(&relays, None).await;
    let (_, metrics) = relays[active].http_get("/metrics").await;
    assert!(
        metrics.contains("outbox_relay_role{role=\"active\"} 1"),
        "{metrics}"
    );

    // Writers run throughout.
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let pool = db.pool().clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut rng = Rng::new(0x51d3_ca45);
            let mut seqs = vec![0; KEYS];
            let mut written = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                written.extend(write_workload(&pool, &mut rng, 1, &mut seqs).await);
                tokio::time::sleep(Duration::from_millis(rng.range(40, 120))).await;
            }
            written
        })
    };

    let mut report = Vec::new();
    for how in ["SIGKILL", "SIGTERM", "SIGSTOP"] {
        // Let the active relay deliver for a while first.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let started = Instant::now();
        match how {
            "SIGKILL" => relays[active].kill(),
            "SIGTERM" => {
                relays[active].terminate(Duration::from_secs(35));
            }
            _ => relays[active].signal("STOP"),
        }
        let next = wait_for_status(&relays, Some(active), "streaming", TAKEOVER_LIMIT).await;
        let took = started.elapsed();
        eprintln!("takeover after {how}: {} ms", took.as_millis());
        report.push((how, took));
        if how == "SIGSTOP" {
            // Woken up, the old relay finds its session ended and stands by.
            relays[active].signal("CONT");
            relays[active]
                .wait_for_health("standby", |status, body| {
                    status == 200 && body.contains("\"status\":\"standby\"")
                })
                .await;
            // One of the standbys ended the hung holder (both may have).
            let mut ended = 0.0;
            for (i, relay) in relays.iter().enumerate() {
                if i != active {
                    ended += relay
                        .metric("outbox_relay_takeovers_total")
                        .await
                        .unwrap_or(0.0);
                }
            }
            assert!(ended >= 1.0, "no standby ended the hung holder");
        } else {
            // The replaced pod comes back, as a standby.
            relays[active] = Relay::start(&settings);
        }
        active = assert_one_active_rest_standby(&relays, None).await;
        assert_eq!(active, next, "the relay that took over still streams");
    }
    stop.store(true, Ordering::Relaxed);
    let written = writer.await.expect("the writer finished");

    let topics = [settings.topic("order"), settings.topic("customer")];
    let mut collector = Collector::new(&brokers, &topics, 3).await;
    let ids: HashSet<String> = written.iter().map(|r| r.id.to_string()).collect();
    collector
        .until(Duration::from_secs(60), |r| {
            let got: HashSet<&str> = r.iter().map(Received::id).collect();
            ids.iter().all(|id| got.contains(id.as_str()))
        })
        .await;
    collector.drain_for(Duration::from_secs(1)).await;
    check_records(&settings, &written, &collector.received, false);
    let copies = collector.received.len() - ids.len();
    eprintln!(
        "{} events, {} records, {copies} delivered twice over 3 takeovers; {}",
        ids.len(),
        collector.received.len(),
        report
            .iter()
            .map(|(how, took)| format!("{how} {} ms", took.as_millis()))
            .collect::<Vec<_>>()
            .join(", ")
    );
    assert!(
        copies <= 3 * outbox_relay::config::DEFAULT_MAX_IN_FLIGHT,
        "{copies} copies: more than one window per takeover"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_names_the_slot_holder() {
    let db = OutboxDb::new().await;
    let brokers = settings().kafka_brokers.clone();
    let settings = RelaySettings::new(&db, &brokers);
    let relay = Relay::start(&settings);
    let walsender = db.wait_for_streaming().await;
    relay
        .wait_for_health("streaming", |status, _| status == 200)
        .await;
    let (code, report, err) = support::relay_subcommand(&settings, "check");
    assert_eq!(code, 0, "{report}{err}");
    let slot = report
        .lines()
        .find(|l| l.split_whitespace().nth(1) == Some("slot"))
        .unwrap_or_default()
        .to_owned();
    assert!(
        slot.contains(&format!("held by server process {walsender}")),
        "{report}"
    );
    // Whether a standby could end a hung holder is reported, not failed.
    let takeover = report
        .lines()
        .find(|l| l.split_whitespace().nth(1) == Some("takeover"))
        .unwrap_or_default();
    assert!(
        takeover.contains("ends a hung one") || takeover.contains("pg_read_all_stats"),
        "{report}"
    );
}

/// The slot is free while its initial snapshot is read, yet it belongs to the relay
/// publishing that snapshot: a relay starting beside it stands by instead of
/// streaming changes of the same keys at the same time, and takes the snapshot up
/// when the publisher is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_stands_by_while_another_publishes_the_initial_snapshot() {
    let db = OutboxDb::new().await;
    let brokers = settings().kafka_brokers.clone();
    let settings = RelaySettings::new(&db, &brokers);
    // Rows before the slot: `init` creates it and leaves the snapshot to the first
    // start.
    let rows: Vec<Row> = (0..20).map(|seq| Row::event(seq % 4, seq)).collect();
    db.write(&rows, false).await;
    let (code, out, err) = support::relay_subcommand(&settings, "init");
    assert_eq!(code, 0, "{out}{err}");

    // What a relay publishing the snapshot holds on its setup connection.
    let mut publisher = db.pool().acquire().await.unwrap();
    sqlx::query("SELECT pg_advisory_lock($1, hashtext($2))")
        .bind(outbox_relay::setup::SNAPSHOT_LOCK_CLASS)
        .bind(db.slot())
        .execute(&mut *publisher)
        .await
        .unwrap();
    let relay = Relay::start(&settings);
    let body = relay
        .wait_for_health("standby", |status, body| {
            status == 200 && body.contains("\"status\":\"standby\"")
        })
        .await;
    assert!(body.contains("initial snapshot"), "{body}");
    assert_eq!(
        db.slot_pid().await,
        Some(None),
        "the slot was taken meanwhile"
    );

    // The publisher goes away unfinished: this relay publishes the snapshot.
    publisher.close().await.unwrap();
    relay
        .wait_for_health("streaming", |status, body| {
            status == 200 && body.contains("\"status\":\"streaming\"")
        })
        .await;
    let topics = [settings.topic("order"), settings.topic("customer")];
    let last = rows.last().unwrap().id.to_string();
    let collector = Collector::through(&brokers, &topics, &last).await;
    let got: HashSet<&str> = collector.received.iter().map(Received::id).collect();
    for row in &rows {
        assert!(
            got.contains(row.id.to_string().as_str()),
            "{} missing",
            row.id
        );
    }
}
