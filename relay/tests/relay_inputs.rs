//! Inputs and deployments that once stopped the relay or lost events, on the real
//! PostgreSQL and broker: a partitioned outbox table, aggregate types that make
//! topic names Kafka refuses, a bad row with a large payload, a missing topic
//! without topic creation, a producer in librdkafka's fatal state, and SQL
//! literals under `standard_conforming_strings = off`.

mod support;

use std::time::Duration;

use serde_json::Value;
use support::{relay_subcommand, Collector, OutboxDb, Received, Relay, RelaySettings, Row};
use testkit::{create_topic_on, settings, unique_name, TestDatabase};

const NO_PROGRESS: Duration = Duration::from_secs(60);

/// A partitioned outbox table (by `created_at`, as pruning jobs like it) with one
/// partition for the present.
const PARTITIONED_OUTBOX: &str = "
CREATE TABLE outbox (
    id            uuid NOT NULL,
    aggregatetype text NOT NULL,
    aggregateid   text NOT NULL,
    type          text NOT NULL,
    payload       jsonb,
    headers       jsonb,
    created_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (id, created_at)
) PARTITION BY RANGE (created_at);
CREATE TABLE outbox_present PARTITION OF outbox FOR VALUES FROM ('2000-01-01') TO ('2100-01-01');
";

async fn partitioned_db() -> OutboxDb {
    OutboxDb::with_ddl(PARTITIONED_OUTBOX).await
}

fn ids(received: &[Received]) -> Vec<String> {
    received.iter().map(|r| r.id().to_owned()).collect()
}

/// Every row arrived, in order (a re-sent record right after its first copy
/// aside).
fn assert_all_arrived_in_order(received: &[Received], rows: &[Row]) {
    let mut delivered = ids(received);
    delivered.dedup();
    assert_eq!(
        delivered,
        rows.iter().map(|r| r.id.to_string()).collect::<Vec<_>>()
    );
}

fn code(record: &Received) -> &str {
    record
        .headers
        .get("dlq-reason-code")
        .map_or("", String::as_str)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partitioned_outbox_table_is_published_through_its_root() {
    let db = partitioned_db().await;
    let brokers = settings().kafka_brokers.clone();
    let settings = RelaySettings::new(&db, &brokers);
    let relay = Relay::start(&settings);
    db.wait_for_streaming().await;

    let present: Vec<Row> = (0..50).map(|n| Row::event(0, n + 1)).collect();
    for chunk in present.chunks(10) {
        db.write(chunk, false).await;
    }
    // A partition attached while the relay streams is published too.
    sqlx::raw_sql(
        "CREATE TABLE outbox_future (LIKE outbox INCLUDING DEFAULTS);
         ALTER TABLE outbox ATTACH PARTITION outbox_future
             FOR VALUES FROM ('2100-01-01') TO ('2200-01-01');",
    )
    .execute(db.pool())
    .await
    .expect("attach a partition");
    let future: Vec<Row> = (0..20).map(|n| Row::event(0, 51 + n)).collect();
    support::write_rows_at(db.pool(), &future, false, Some("2150-06-01")).await;

    let last = future.last().expect("rows").id.to_string();
    let collector = Collector::through(&brokers, &[settings.topic("order")], &last).await;
    let expected: Vec<String> = present
        .iter()
        .chain(&future)
        .map(|r| r.id.to_string())
        .collect();
    assert_eq!(ids(&collector.received), expected);
    assert_eq!(
        relay.metric("outbox_relay_events_routed_total").await,
        Some(70.0)
    );
    let (code, report, _) = relay_subcommand(&settings, "check");
    assert_eq!(code, 0, "{report}");
    assert!(report.contains("partitioned"), "{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publication_of_the_partitions_instead_of_the_root_is_refused_naming_the_fix() {
    let db = partitioned_db().await;
    sqlx::query("CREATE PUBLICATION outbox_relay FOR TABLE outbox")
        .execute(db.pool())
        .await
        .expect("create a publication without publish_via_partition_root");
    let brokers = settings().kafka_brokers.clone();
    let settings = RelaySettings::new(&db, &brokers);

    let (code, report, _) = relay_subcommand(&settings, "check");
    assert_eq!(code, 1, "{report}");
    let line = report
        .lines()
        .find(|l| l.contains("publication"))
        .unwrap_or_default();
    assert!(
        line.starts_with("FAIL") && line.contains("publish_via_partition_root = true"),
        "{report}"
    );

    let relay = Relay::start(&settings);
    let body = relay
        .wait_for_health("failed", |status, body| {
            status == 503 && body.contains("\"failed\"")
        })
        .await;
    assert!(body.contains("publish_via_partition_root"), "{body}");
    let slots: i64 =
        sqlx::query_scalar("SELECT count(*) FROM pg_replication_slots WHERE database = $1")
            .bind(db.db.name())
            .fetch_one(db.pool())
            .await
            .expect("count slots");
    assert_eq!(
        slots, 0,
        "no slot may be created before the publication is right"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aggregate_types_that_make_topic_names_kafka_refuses_are_dead_lettered() {
    let db = OutboxDb::new().await;
    let brokers = settings().kafka_brokers.clone();
    let prefix = unique_name("names");
    let dlq = format!("{prefix}.dlq");
    // The services' template: the aggregate type is the whole topic name.
    let settings = RelaySettings::new(&db, &brokers)
        .with("OUTBOX_RELAY_TOPIC_TEMPLATE", "{aggregatetype}")
        .with("OUTBOX_RELAY_DEAD_LETTER_TOPIC", &dlq);
    let relay = Relay::start(&settings);
    db.wait_for_streaming().await;

    let good_topic = format!("{prefix}.good");
    let row = |aggregate_type: &str, seq: usize| {
        let mut row = Row::event(0, seq);
        row.aggregate_type = aggregate_type.to_owned();
        row
    };
    let first = row(&good_topic, 1);
    let bad: Vec<Row> = [
        String::new(),
        "order placed".to_owned(),
        "a/b".to_owned(),
        "café".to_owned(),
        "x".repeat(250),
        "..".to_owned(),
    ]
    .iter()
    .enumerate()
    .map(|(i, t)| row(t, i + 2))
    .collect();
    let last = row(&good_topic, 10);
    db.write(std::slice::from_ref(&first), false).await;
    db.write(&bad, false).await;
    db.write(std::slice::from_ref(&last), false).await;

    let collector = Collector::through(&brokers, &[good_topic], &last.id.to_string()).await;
    assert_eq!(
        ids(&collector.received),
        [first.id.to_string(), last.id.to_string()]
    );
    let mut letters = Collector::new(&brokers, std::slice::from_ref(&dlq), 3).await;
    letters.until(NO_PROGRESS, |r| r.len() >= bad.len()).await;
    letters.drain_for(Duration::from_secs(1)).await;
    assert_eq!(
        ids(&letters.received),
        bad.iter().map(|r| r.id.to_string()).collect::<Vec<_>>()
    );
    for (letter, row) in letters.received.iter().zip(&bad) {
        assert_eq!(code(letter), "bad_route", "{letter:?}");
        let body = letter.payload.as_ref().expect("a letter has a body");
        // The payload is kept: the name was the problem, not the event.
        let payload: Value =
            serde_json::from_str(body["payload"].as_str().expect("the payload text"))
                .expect("JSON");
        assert_eq!(payload, row.payload);
        assert_eq!(
            letter.headers.get("dlq-original-topic"),
            Some(&row.aggregate_type)
        );
    }
    let body = relay
        .wait_for_health("streaming", |status, _| status == 200)
        .await;
    assert!(body.contains("\"streaming\""), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_row_with_a_large_payload_is_dead_lettered_with_its_digest() {
    let db = OutboxDb::new().await;
    let brokers = settings().kafka_brokers.clone();
    let base = RelaySettings::new(&db, &brokers);
    let dlq = format!("{}.dlq", base.topic_prefix);
    let settings = base.with("OUTBOX_RELAY_DEAD_LETTER_TOPIC", &dlq);
    let relay = Relay::start(&settings);
    db.wait_for_streaming().await;

    // Headers that are not an object make a bad row; its 2 MB payload cannot be
    // copied into a letter under the broker's 1 MB limit.
    let mut bad = Row::event(0, 1);
    bad.headers = Some(serde_json::json!(["not", "an", "object"]));
    bad.payload = serde_json::json!({ "blob": "y".repeat(2 * 1024 * 1024) });
    let good = Row::event(0, 2);
    db.write(std::slice::from_ref(&bad), false).await;
    db.write(std::slice::from_ref(&good), false).await;

    let collector =
        Collector::through(&brokers, &[settings.topic("order")], &good.id.to_string()).await;
    assert_eq!(ids(&collector.received), [good.id.to_string()]);
    let mut letters = Collector::new(&brokers, std::slice::from_ref(&dlq), 3).await;
    letters.until(NO_PROGRESS, |r| !r.is_empty()).await;
    let letter = &letters.received[0];
    assert_eq!(code(letter), "bad_row");
    let body = letter.payload.as_ref().expect("a letter has a body");
    assert_eq!(body["row"]["id"], bad.id.to_string());
    assert_eq!(
        body["row"]["aggregateid"], "key-0",
        "small columns are kept"
    );
    let digest: String = sqlx::query_scalar(
        "SELECT encode(sha256(convert_to(payload::text, 'UTF8')), 'hex') FROM outbox WHERE id = $1",
    )
    .bind(bad.id)
    .fetch_one(db.pool())
    .await
    .expect("the payload's digest");
    assert_eq!(body["row"]["payload"]["sha256"], digest.as_str());
    assert!(body["row"]["payload"]["bytes"].as_u64() > Some(2 * 1024 * 1024));
    relay
        .wait_for_health("streaming", |status, _| status == 200)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_topic_stops_reading_without_dead_letters_until_it_exists() {
    let db = OutboxDb::new().await;
    let brokers = settings().kafka_brokers.clone();
    let base = RelaySettings::new(&db, &brokers);
    let dlq = format!("{}.dlq", base.topic_prefix);
    create_topic_on(Some(&brokers), &dlq, 1).await;
    // Topic creation off, and the records' topic missing: a deployment mistake,
    // not a fault of any record. librdkafka fails such records after
    // topic.metadata.propagation.max.ms (30 s by default; shortened here).
    let settings = base
        .with("OUTBOX_RELAY_DEAD_LETTER_TOPIC", &dlq)
        .with("OUTBOX_RELAY_CREATE_TOPICS", "false")
        .with(
            "OUTBOX_RELAY_KAFKA_OPTIONS",
            "topic.metadata.propagation.max.ms=2000",
        );
    let relay = Relay::start(&settings);
    // Streaming, not in the snapshot: rows written from now on come through the
    // stream, and the slot's position says whether they were confirmed.
    relay
        .wait_for_health("streaming", |status, _| status == 200)
        .await;
    let rows: Vec<Row> = (0..5).map(|n| Row::event(0, n + 1)).collect();
    db.write(&rows, false).await;
    let written: String = sqlx::query_scalar("SELECT pg_current_wal_lsn()::text")
        .fetch_one(db.pool())
        .await
        .expect("the WAL position");

    let body = relay
        .wait_for_health("destination_failed", |status, body| {
            status == 503 && body.contains("\"destination_failed\"")
        })
        .await;
    assert!(body.to_lowercase().contains("topic"), "{body}");
    let mut letters = Collector::new(&brokers, std::slice::from_ref(&dlq), 1).await;
    letters.drain_for(Duration::from_secs(2)).await;
    assert!(
        letters.received.is_empty(),
        "records were dead-lettered for the destination's fault: {:?}",
        letters.received
    );
    let confirmed = db.confirmed_flush().await.unwrap_or_default();
    assert!(
        confirmed.parse::<outbox_relay::Lsn>().ok() < written.parse().ok(),
        "the slot moved past undelivered rows: {confirmed} >= {written}; log:\n{}",
        relay.log_text()
    );

    // The operator creates the topic: the relay delivers everything.
    create_topic_on(Some(&brokers), &settings.topic("order"), 3).await;
    let last = rows.last().expect("rows").id.to_string();
    let collector = Collector::through(&brokers, &[settings.topic("order")], &last).await;
    assert_all_arrived_in_order(&collector.received, &rows);
    relay
        .wait_for_health("streaming", |status, _| status == 200)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_producer_in_librdkafkas_fatal_state_is_replaced_by_a_new_one() {
    let db = OutboxDb::new().await;
    let brokers = settings().kafka_brokers.clone();
    // The first record sent puts the producer in the fatal state, as an
    // unrecoverable idempotence error from a broker does.
    let settings =
        RelaySettings::new(&db, &brokers).with("OUTBOX_FAILPOINTS", "relay.kafka-fatal=error*1");
    let relay = Relay::start(&settings);
    db.wait_for_streaming().await;
    let rows: Vec<Row> = (0..10).map(|n| Row::event(0, n + 1)).collect();
    db.write(&rows, false).await;

    let last = rows.last().expect("rows").id.to_string();
    let collector = Collector::through(&brokers, &[settings.topic("order")], &last).await;
    assert_all_arrived_in_order(&collector.received, &rows);
    let log = relay.log_text();
    assert!(log.contains("fatal error"), "{log}");
    relay
        .wait_for_health("streaming", |status, _| status == 200)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sql_literals_keep_their_value_without_standard_conforming_strings() {
    let db = TestDatabase::create().await;
    let mut connection = db.connect().await;
    sqlx::raw_sql("SET standard_conforming_strings = off")
        .execute(&mut connection)
        .await
        .expect("turn standard_conforming_strings off");
    for value in [
        "plain",
        "it's",
        r"back\slash",
        r"x\'; SELECT pg_terminate_backend(pg_backend_pid()); --",
        r"\\'",
        r"trailing\",
    ] {
        let sql = format!("SELECT {}::text", outbox_relay::sql::literal(value));
        let read: String = sqlx::query_scalar(&sql)
            .fetch_one(&mut connection)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
        assert_eq!(read, value, "{sql}");
    }
}
