//! The relay end to end on the real PostgreSQL and broker: what arrives, in which
//! order, and what survives SIGKILL, SIGTERM and a paused broker.

mod support;

use std::collections::HashSet;
use std::time::Duration;

use support::{
    check_records, scale, seed, write_workload, Collector, OutboxDb, Received, Relay,
    RelaySettings, Rng, Row, KEYS,
};
use testkit::{settings, PrivateBroker};

const NO_PROGRESS: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_committed_row_arrives_in_order_per_key() {
    let db = OutboxDb::new().await;
    let brokers = settings().kafka_brokers.clone();
    let settings = RelaySettings::new(&db, &brokers);
    let relay = Relay::start(&settings);
    db.wait_for_slot().await;

    let mut rng = Rng::new(seed());
    let mut seqs = vec![0; KEYS];
    let written = write_workload(db.pool(), &mut rng, 30 * scale(), &mut seqs).await;

    let topics = [settings.topic("order"), settings.topic("customer")];
    let mut collector = Collector::new(&brokers, &topics, 3).await;
    let expected = written.len();
    collector.until(NO_PROGRESS, |r| r.len() >= expected).await;
    collector.drain_for(Duration::from_secs(1)).await;
    check_records(&settings, &written, &collector.received, true);

    // The metrics count what was delivered.
    let deadline = std::time::Instant::now() + NO_PROGRESS;
    while relay.metric("outbox_relay_events_routed_total").await != Some(expected as f64) {
        assert!(
            std::time::Instant::now() < deadline,
            "events_routed never reached {expected}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (status, body) = relay.http_get("/health").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        relay.metric("outbox_relay_records_in_flight").await,
        Some(0.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_tables_updates_and_deletes_are_not_published() {
    let db = OutboxDb::new().await;
    sqlx::raw_sql(
        "CREATE TABLE other (id int PRIMARY KEY, note text);
         CREATE PUBLICATION outbox_relay FOR TABLE outbox, other;",
    )
    .execute(db.pool())
    .await
    .unwrap();
    let brokers = settings().kafka_brokers.clone();
    let settings =
        RelaySettings::new(&db, &brokers).with("OUTBOX_RELAY_CREATE_PUBLICATION", "false");
    let _relay = Relay::start(&settings);
    db.wait_for_slot().await;

    let (a, b) = (Row::event(0, 1), Row::event(0, 2));
    sqlx::query("INSERT INTO other VALUES (1, 'x')")
        .execute(db.pool())
        .await
        .unwrap();
    db.write(&[a.clone(), b.clone()], false).await;
    sqlx::raw_sql(&format!(
        "UPDATE outbox SET payload = '{{\"changed\": true}}' WHERE id = '{}';
         DELETE FROM outbox WHERE id = '{}';
         UPDATE other SET note = 'y';
         TRUNCATE other;",
        a.id, b.id
    ))
    .execute(db.pool())
    .await
    .unwrap();
    let marker = Row::event(0, 3);
    db.write(std::slice::from_ref(&marker), false).await;

    let marker_id = marker.id.to_string();
    let collector = Collector::through(&brokers, &[settings.topic("order")], &marker_id).await;
    let ids: Vec<&str> = collector.received.iter().map(Received::id).collect();
    assert_eq!(ids, [a.id.to_string(), b.id.to_string(), marker_id]);
    assert_eq!(collector.received[0].payload, Some(a.payload));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_confirms_and_a_restart_resends_nothing() {
    let db = OutboxDb::new().await;
    let brokers = settings().kafka_brokers.clone();
    // A long status interval: only the drain on SIGTERM confirms.
    let settings =
        RelaySettings::new(&db, &brokers).with("OUTBOX_RELAY_STATUS_INTERVAL_MS", "600000");
    let mut relay = Relay::start(&settings);
    db.wait_for_slot().await;
    let before = db.confirmed_flush().await;

    let mut rng = Rng::new(seed());
    let mut seqs = vec![0; KEYS];
    let written = write_workload(db.pool(), &mut rng, 8, &mut seqs).await;
    let topics = [settings.topic("order"), settings.topic("customer")];
    let mut collector = Collector::new(&brokers, &topics, 3).await;
    collector
        .until(NO_PROGRESS, |r| r.len() >= written.len())
        .await;

    let status = relay.terminate(Duration::from_secs(40));
    assert!(
        status.success(),
        "exit status {status}; log:\n{}",
        relay.log_text()
    );
    let after = db.confirmed_flush().await;
    assert_ne!(before, after, "the drain did not confirm");

    let _relay = Relay::start(&settings);
    db.wait_for_streaming().await;
    let marker = Row::event(0, 10_000);
    db.write(std::slice::from_ref(&marker), false).await;
    let marker_id = marker.id.to_string();
    collector
        .until(NO_PROGRESS, |r| r.iter().any(|x| x.id() == marker_id))
        .await;
    collector.drain_for(Duration::from_secs(1)).await;
    let mut all = written;
    all.push(marker);
    check_records(&settings, &all, &collector.received, true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_at_random_points_loses_nothing() {
    let db = OutboxDb::new().await;
    let brokers = settings().kafka_brokers.clone();
    let settings = RelaySettings::new(&db, &brokers);
    let mut relay = Relay::start(&settings);
    db.wait_for_slot().await;

    let seed = seed();
    let mut rng = Rng::new(seed);
    // The writer runs on its own while the relay is killed and restarted.
    let writer = {
        let pool = db.pool().clone();
        let transactions = 60 * scale();
        tokio::spawn(async move {
            let mut rng = Rng::new(seed ^ 0x5eed);
            let mut seqs = vec![0; KEYS];
            let mut written = Vec::new();
            for _ in 0..transactions {
                written.extend(write_workload(&pool, &mut rng, 1, &mut seqs).await);
                tokio::time::sleep(Duration::from_millis(rng.range(0, 40))).await;
            }
            written
        })
    };
    let kills = 3 * scale();
    for _ in 0..kills {
        tokio::time::sleep(Duration::from_millis(rng.range(200, 1500))).await;
        relay.kill();
        relay = Relay::start(&settings);
    }
    let written = writer.await.expect("the writer finished");

    let topics = [settings.topic("order"), settings.topic("customer")];
    let mut collector = Collector::new(&brokers, &topics, 3).await;
    let ids: HashSet<String> = written.iter().map(|r| r.id.to_string()).collect();
    collector
        .until(NO_PROGRESS, |r| {
            let got: HashSet<&str> = r.iter().map(Received::id).collect();
            ids.iter().all(|id| got.contains(id.as_str()))
        })
        .await;
    collector.drain_for(Duration::from_secs(1)).await;
    check_records(&settings, &written, &collector.received, false);
    eprintln!(
        "{} events, {} records delivered after {kills} kills",
        written.len(),
        collector.received.len()
    );
}

/// With the documented defaults (a standby status update every 10 s, a window of
/// 2,000 records), a relay SIGKILLed again and again while it drains a backlog
/// re-sends at most one window per kill: progress is confirmed as soon as it is
/// made, not only at the status interval.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_kill_during_a_drain_resends_at_most_one_window() {
    use outbox_relay::config::{DEFAULT_MAX_IN_FLIGHT, DEFAULT_STATUS_INTERVAL_MS};
    const TRANSACTIONS: usize = 1_000;
    const ROWS: usize = 30;
    const MAX_KILLS: usize = 8;
    let db = OutboxDb::new().await;
    let brokers = settings().kafka_brokers.clone();
    let settings = RelaySettings::new(&db, &brokers).with(
        "OUTBOX_RELAY_STATUS_INTERVAL_MS",
        DEFAULT_STATUS_INTERVAL_MS,
    );
    // The slot first, so that the backlog comes through the stream.
    let (code, _, err) = support::relay_subcommand(&settings, "init");
    assert_eq!(code, 0, "{err}");
    for t in 0..TRANSACTIONS {
        sqlx::query(
            "INSERT INTO outbox (id, aggregatetype, aggregateid, type, payload) \
             SELECT gen_random_uuid(), 'order', 'key-' || (n % 50), 'Changed', \
                    jsonb_build_object('n', $1::int * 30 + n) \
             FROM generate_series(0, 29) n",
        )
        .bind(i32::try_from(t).expect("small"))
        .execute(db.pool())
        .await
        .expect("write the backlog");
    }
    let total = TRANSACTIONS * ROWS;

    let backlog_end: String = sqlx::query_scalar("SELECT pg_current_wal_lsn()::text")
        .fetch_one(db.pool())
        .await
        .expect("the WAL position");
    let backlog_end: outbox_relay::Lsn = backlog_end.parse().expect("an LSN");

    let mut relay = Relay::start(&settings);
    let mut kills = 0;
    'lives: while kills < MAX_KILLS {
        // Each relay delivers one and a half windows, then dies mid-drain; no more
        // kills once the whole backlog is confirmed.
        let deadline = std::time::Instant::now() + NO_PROGRESS;
        loop {
            let routed = relay
                .metric("outbox_relay_events_routed_total")
                .await
                .unwrap_or_default();
            if routed >= (3 * DEFAULT_MAX_IN_FLIGHT / 2) as f64 {
                break;
            }
            let confirmed = db.confirmed_flush().await.unwrap_or_default();
            if confirmed
                .parse::<outbox_relay::Lsn>()
                .is_ok_and(|c| c >= backlog_end)
            {
                break 'lives;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the relay made no progress:\n{}",
                relay.log_text()
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        relay.kill();
        kills += 1;
        relay = Relay::start(&settings);
    }
    assert!(
        kills >= 4,
        "the backlog drained after {kills} kills: too few to judge"
    );
    let mut collector = Collector::new(&brokers, &[settings.topic("order")], 3).await;
    // Ids seen so far, counted as records arrive (not recounted per record).
    let seen = std::cell::RefCell::new((0, HashSet::new()));
    let all_arrived = |r: &[Received]| {
        let (counted, ids) = &mut *seen.borrow_mut();
        for record in &r[*counted..] {
            ids.insert(record.id().to_owned());
        }
        *counted = r.len();
        ids.len() >= total
    };
    collector.until(NO_PROGRESS, all_arrived).await;
    collector.drain_for(Duration::from_secs(2)).await;
    let copies = collector.received.len() - total;
    eprintln!("{total} events, {kills} kills, {copies} records delivered twice");
    assert!(
        copies <= kills * DEFAULT_MAX_IN_FLIGHT,
        "{copies} copies after {kills} kills: more than one window ({DEFAULT_MAX_IN_FLIGHT}) per kill"
    );
    drop(relay);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_broker_stops_reading_keeps_the_connection_and_loses_nothing() {
    let broker = PrivateBroker::start();
    let db = OutboxDb::new().await;
    // The server drops a replication connection silent for this long; the pause
    // below lasts several times as long.
    sqlx::raw_sql(&format!(
        "ALTER DATABASE {} SET wal_sender_timeout = '3s'",
        db.db.name()
    ))
    .execute(db.pool())
    .await
    .unwrap();
    let brokers = broker.bootstrap();
    let settings = RelaySettings::new(&db, &brokers)
        .with("OUTBOX_RELAY_MAX_IN_FLIGHT", 500)
        .with("OUTBOX_RELAY_STATUS_INTERVAL_MS", 500)
        .with("OUTBOX_RELAY_HEARTBEAT_INTERVAL_MS", 1000)
        .with("OUTBOX_RELAY_STALL_TIMEOUT_MS", 3000);
    let mut relay = Relay::start(&settings);
    db.wait_for_slot().await;

    let mut rng = Rng::new(seed());
    let mut seqs = vec![0; KEYS];
    let mut written = write_workload(db.pool(), &mut rng, 5, &mut seqs).await;
    let topics = [settings.topic("order"), settings.topic("customer")];
    let mut collector = Collector::new(&brokers, &topics, 3).await;
    collector
        .until(NO_PROGRESS, |r| r.len() >= written.len())
        .await;
    let walsender = db.wait_for_streaming().await;
    let rss_before = relay.rss_kib();

    broker.pause();
    let mut rss_peak = rss_before;
    for _ in 0..5 {
        written.extend(write_workload(db.pool(), &mut rng, 20, &mut seqs).await);
        tokio::time::sleep(Duration::from_secs(2)).await;
        rss_peak = rss_peak.max(relay.rss_kib());
        assert!(
            relay.is_running(),
            "the relay died while the broker was paused:\n{}",
            relay.log_text()
        );
    }
    assert_eq!(
        db.slot_pid().await,
        Some(Some(walsender)),
        "the replication connection did not survive the pause"
    );
    // Records have been unacknowledged for longer than the stall timeout.
    let (status, body) = relay.http_get("/health").await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("broker_unreachable"), "{body}");
    broker.resume();

    collector
        .until(NO_PROGRESS, |r| {
            let got: HashSet<&str> = r.iter().map(Received::id).collect();
            written
                .iter()
                .all(|w| got.contains(w.id.to_string().as_str()))
        })
        .await;
    check_records(&settings, &written, &collector.received, false);
    let deadline = std::time::Instant::now() + NO_PROGRESS;
    loop {
        let (status, body) = relay.http_get("/health").await;
        if status == 200 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "/health stayed {status} after the broker came back: {body}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let growth_kib = rss_peak.saturating_sub(rss_before);
    eprintln!(
        "{} events; relay RSS {rss_before} KiB before the pause, peak {rss_peak} KiB during it",
        written.len()
    );
    assert!(
        growth_kib < 32 * 1024,
        "relay memory grew by {growth_kib} KiB while the broker was paused"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unrelated_writes_do_not_hold_wal() {
    let db = OutboxDb::new().await;
    sqlx::query("CREATE TABLE busy (id serial PRIMARY KEY, note text)")
        .execute(db.pool())
        .await
        .unwrap();
    let brokers = settings().kafka_brokers.clone();
    let settings = RelaySettings::new(&db, &brokers);
    let _relay = Relay::start(&settings);
    db.wait_for_streaming().await;
    let start = db.confirmed_flush().await;

    // Only the unpublished table changes: no record is ever in flight, so the
    // server's keepalive positions may be confirmed.
    for _ in 0..20 {
        sqlx::query("INSERT INTO busy (note) SELECT repeat('x', 200) FROM generate_series(1, 500)")
            .execute(db.pool())
            .await
            .unwrap();
    }
    let target: String = sqlx::query_scalar("SELECT pg_current_wal_lsn()::text")
        .fetch_one(db.pool())
        .await
        .unwrap();
    let reached = |confirmed: &str| {
        confirmed.parse::<outbox_relay::Lsn>().unwrap() >= target.parse().unwrap()
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let confirmed = db.confirmed_flush().await.expect("the slot exists");
        if reached(&confirmed) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the slot stayed at {confirmed} (started at {start:?}), behind {target}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Starts a relay without a dead-letter topic, writes `row` after a good one, and
/// expects the relay to stop with an error that names the bad row's position, having
/// delivered the good one.
async fn a_bad_row_stops_the_relay(row: Row, expect_in_log: &str) {
    let db = OutboxDb::new().await;
    let brokers = settings().kafka_brokers.clone();
    // Without a dead-letter topic.
    let settings = RelaySettings::new(&db, &brokers).arg("--dead-letter-topic=");
    let mut relay = Relay::start(&settings);
    db.wait_for_slot().await;
    let good = Row::event(0, 1);
    db.write(std::slice::from_ref(&good), false).await;
    db.write(std::slice::from_ref(&row), false).await;

    let mut collector = Collector::new(&brokers, &[settings.topic("order")], 3).await;
    let good_id = good.id.to_string();
    collector
        .until(NO_PROGRESS, |r| r.iter().any(|x| x.id() == good_id))
        .await;
    // The relay stops streaming and says why on /health (it stays up to report it).
    let body = relay
        .wait_for_health("failed", |status, body| {
            status == 503 && body.contains("\"failed\"")
        })
        .await;
    assert!(body.contains(expect_in_log), "{body}");
    let log = relay.log_text();
    assert!(
        log.contains(expect_in_log),
        "log lacks {expect_in_log:?}:\n{log}"
    );
    relay.kill();
    collector.drain_for(Duration::from_secs(1)).await;
    assert!(
        collector
            .received
            .iter()
            .all(|r| r.id() != row.id.to_string()),
        "the bad row was delivered"
    );
    // Nothing past the bad row was confirmed: a restart meets it again.
    let _again = Relay::start(&settings);
    let deadline = std::time::Instant::now() + NO_PROGRESS;
    loop {
        let log = _again.log_text();
        if log.contains(expect_in_log) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "a restart did not meet the bad row:\n{log}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_too_large_for_the_producer_stops_the_relay_naming_it() {
    let mut row = Row::event(0, 2);
    row.payload = serde_json::json!({ "blob": "x".repeat(2 * 1024 * 1024) });
    a_bad_row_stops_the_relay(row, "cannot be delivered").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headers_that_are_not_an_object_stop_the_relay_naming_the_row() {
    let mut row = Row::event(0, 2);
    row.headers = Some(serde_json::json!(["not", "an", "object"]));
    a_bad_row_stops_the_relay(row, "is not a JSON object").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_that_cannot_be_delivered_are_dead_lettered_and_the_stream_goes_on() {
    let db = OutboxDb::new().await;
    let brokers = settings().kafka_brokers.clone();
    let base = RelaySettings::new(&db, &brokers);
    let dlq = format!("{}.dlq", base.topic_prefix);
    let settings = base.with("OUTBOX_RELAY_DEAD_LETTER_TOPIC", &dlq);
    let _relay = Relay::start(&settings);
    db.wait_for_slot().await;

    let first = Row::event(0, 1);
    let mut bad_headers = Row::event(0, 2);
    bad_headers.headers = Some(serde_json::json!("not an object"));
    let mut too_large = Row::event(0, 3);
    too_large.payload = serde_json::json!({ "blob": "x".repeat(2 * 1024 * 1024) });
    let last = Row::event(0, 4);
    db.write(std::slice::from_ref(&first), false).await;
    db.write(&[bad_headers.clone(), too_large.clone()], false)
        .await;
    db.write(std::slice::from_ref(&last), false).await;

    let last_id = last.id.to_string();
    let collector = Collector::through(&brokers, &[settings.topic("order")], &last_id).await;
    let ids: Vec<&str> = collector.received.iter().map(Received::id).collect();
    assert_eq!(ids, [first.id.to_string(), last_id.clone()]);

    let mut letters = Collector::new(&brokers, std::slice::from_ref(&dlq), 3).await;
    letters.until(NO_PROGRESS, |r| r.len() >= 2).await;
    letters.drain_for(Duration::from_secs(1)).await;
    assert_eq!(letters.received.len(), 2, "{:?}", letters.received);
    let code = |r: &Received| {
        r.headers
            .get("dlq-reason-code")
            .cloned()
            .unwrap_or_default()
    };
    let bad = &letters.received[0];
    assert_eq!(code(bad), "bad_row");
    assert_eq!(bad.key, "key-0");
    let body = bad.payload.as_ref().expect("a dead letter has a body");
    assert_eq!(body["row"]["id"], bad_headers.id.to_string());
    assert!(body["reason"]
        .as_str()
        .unwrap_or_default()
        .contains("not a JSON object"));
    let large = &letters.received[1];
    assert_eq!(code(large), "too_large");
    assert_eq!(large.id(), too_large.id.to_string());
    assert_eq!(
        large.headers.get("dlq-original-topic"),
        Some(&settings.topic("order"))
    );
    // Both came from the same transaction, in order.
    assert_eq!(
        bad.headers.get("dlq-source-lsn"),
        large.headers.get("dlq-source-lsn")
    );
    assert_eq!(
        (
            bad.headers.get("dlq-source-index").map(String::as_str),
            large.headers.get("dlq-source-index").map(String::as_str)
        ),
        (Some("0"), Some("1"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeats_come_back_through_the_stream_and_are_not_published() {
    let db = OutboxDb::new().await;
    let brokers = settings().kafka_brokers.clone();
    let settings =
        RelaySettings::new(&db, &brokers).with("OUTBOX_RELAY_HEARTBEAT_INTERVAL_MS", 200);
    let relay = Relay::start(&settings);
    db.wait_for_streaming().await;
    let start: String = sqlx::query_scalar("SELECT pg_current_wal_lsn()::text")
        .fetch_one(db.pool())
        .await
        .unwrap();

    // Nothing is written to this database but the heartbeats, which come back as
    // logical messages and are confirmed like any transaction.
    let deadline = std::time::Instant::now() + NO_PROGRESS;
    loop {
        let returned = relay.log_text().matches("heartbeat returned").count();
        // NULL while the slot is still being created.
        let confirmed = db.confirmed_flush().await.unwrap_or_default();
        let past_start = confirmed
            .parse::<outbox_relay::Lsn>()
            .is_ok_and(|c| c > start.parse().unwrap());
        if returned >= 3 && past_start {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{returned} heartbeats returned, slot at {confirmed}, start {start}:\n{}",
            relay.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // An outbox row still arrives, alone: heartbeats are never routed.
    let row = Row::event(0, 1);
    db.write(std::slice::from_ref(&row), false).await;
    let mut collector = Collector::new(&brokers, &[settings.topic("order")], 3).await;
    collector.until(NO_PROGRESS, |r| !r.is_empty()).await;
    collector.drain_for(Duration::from_secs(1)).await;
    let ids: Vec<&str> = collector.received.iter().map(Received::id).collect();
    assert_eq!(ids, [row.id.to_string()]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transactional_logical_messages_with_the_prefix_are_routed_within_the_allow_list() {
    let db = OutboxDb::new().await;
    let brokers = settings().kafka_brokers.clone();
    let base = RelaySettings::new(&db, &brokers);
    let order_topic = base.topic("order");
    let dlq = format!("{}.dlq", base.topic_prefix);
    let settings = base
        .with("OUTBOX_RELAY_MESSAGE_PREFIX", "outbox")
        .with("OUTBOX_RELAY_MESSAGE_TOPICS", &order_topic)
        .with("OUTBOX_RELAY_DEAD_LETTER_TOPIC", &dlq);
    let relay = Relay::start(&settings);
    // Streaming, not just a slot: the slot is listed while it still waits for the
    // cluster's open transactions, and a message committed before it is
    // consistent is in no snapshot (unlike a row).
    db.wait_for_streaming().await;

    let message = |id: &str, aggregate_type: &str| {
        serde_json::json!({
            "id": id, "aggregatetype": aggregate_type, "aggregateid": "key-0",
            "type": "Emitted", "payload": {"n": 1}, "headers": {"traceparent": "00-a-b-01"}
        })
        .to_string()
    };
    let emit = |transactional: bool, prefix: &str, content: String| {
        let pool = db.pool().clone();
        let prefix = prefix.to_owned();
        async move {
            sqlx::query("SELECT pg_logical_emit_message($1, $2, $3)")
                .bind(transactional)
                .bind(prefix)
                .bind(content)
                .execute(&pool)
                .await
                .unwrap();
        }
    };
    // Routed: transactional, with the prefix, to an allowed topic.
    emit(true, "outbox", message("routed", "order")).await;
    // Not routed: non-transactional, another prefix, a rolled-back transaction.
    emit(false, "outbox", message("non-transactional", "order")).await;
    emit(true, "other", message("other-prefix", "order")).await;
    let mut tx = db.pool().begin().await.unwrap();
    sqlx::query("SELECT pg_logical_emit_message(true, 'outbox', $1)")
        .bind(message("rolled-back", "order"))
        .execute(&mut *tx)
        .await
        .unwrap();
    tx.rollback().await.unwrap();
    // Dead-lettered: a topic outside the allow-list.
    emit(true, "outbox", message("not-allowed", "secret")).await;
    // A row of the same key after them all marks the end (same partition: in order).
    let marker = Row::event(0, 1);
    db.write(std::slice::from_ref(&marker), false).await;

    let marker_id = marker.id.to_string();
    let collector =
        Collector::through(&brokers, std::slice::from_ref(&order_topic), &marker_id).await;
    let ids: Vec<&str> = collector.received.iter().map(Received::id).collect();
    if ids != ["routed", marker_id.as_str()] {
        // Tell a record the relay never sent from one the consumer missed.
        let again =
            Collector::through(&brokers, std::slice::from_ref(&order_topic), &marker_id).await;
        let again: Vec<&str> = again.received.iter().map(Received::id).collect();
        panic!(
            "read {ids:?}, a second consumer read {again:?}; the relay routed {:?} records:\n{}",
            relay.metric("outbox_relay_events_routed_total").await,
            relay.log_text()
        );
    }
    let routed = &collector.received[0];
    assert_eq!(routed.key, "key-0");
    assert_eq!(routed.payload, Some(serde_json::json!({"n": 1})));
    assert_eq!(
        routed.headers.get("traceparent").map(String::as_str),
        Some("00-a-b-01")
    );

    let mut letters = Collector::new(&brokers, std::slice::from_ref(&dlq), 3).await;
    letters.until(NO_PROGRESS, |r| !r.is_empty()).await;
    letters.drain_for(Duration::from_secs(1)).await;
    assert_eq!(letters.received.len(), 1, "{:?}", letters.received);
    let body = letters.received[0].payload.as_ref().unwrap();
    assert!(
        body["reason"]
            .as_str()
            .unwrap_or_default()
            .contains("allow-list"),
        "{body}"
    );
}
