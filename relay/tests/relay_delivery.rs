//! The relay end to end on the real PostgreSQL and Kafka broker: what is and is not
//! published, what a bad row does without a dead-letter topic, how often a crash
//! re-sends. What every sink promises alike (every row once and in order, SIGKILL,
//! SIGTERM, a paused broker, dead letters) is in `sink_suite.rs`.

mod support;

use std::collections::HashSet;
use std::time::Duration;

use support::{Collector, OutboxDb, Received, Relay, RelaySettings, Row};
use testkit::settings;

const NO_PROGRESS: Duration = Duration::from_secs(60);

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
