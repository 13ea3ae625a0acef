//! The initial snapshot: rows already in the outbox table when the slot is created.

mod support;

use std::collections::HashMap;
use std::time::Duration;

use support::{relay_subcommand, Collector, OutboxDb, Received, Relay, RelaySettings, Row};
use testkit::settings;

const NO_PROGRESS: Duration = Duration::from_secs(60);

fn rows(keys: usize, per_key: usize, first_seq: usize) -> Vec<Row> {
    (0..per_key)
        .flat_map(|seq| (0..keys).map(move |key| Row::event(key, first_seq + seq)))
        .collect()
}

/// The completed snapshot record of the database's slot: (rows, consistent point).
async fn snapshot_record(db: &OutboxDb) -> Option<(Option<i64>, Option<String>, bool)> {
    sqlx::query_as(
        "SELECT rows_published, consistent_point::text, completed_at IS NOT NULL \
         FROM outbox_relay_snapshots WHERE slot_name = $1",
    )
    .bind(db.slot())
    .fetch_optional(db.pool())
    .await
    .unwrap()
}

/// Every id in `ids` arrived; returns how often each did.
async fn collect_all(
    brokers: &str,
    settings: &RelaySettings,
    ids: &[String],
) -> (Collector, HashMap<String, usize>) {
    let topics = [settings.topic("order"), settings.topic("customer")];
    let mut collector = Collector::new(brokers, &topics, 3).await;
    collector
        .until(NO_PROGRESS, |r| {
            ids.iter().all(|id| r.iter().any(|x| x.id() == id))
        })
        .await;
    collector.drain_for(Duration::from_secs(1)).await;
    let mut counts = HashMap::new();
    for record in &collector.received {
        *counts.entry(record.id().to_owned()).or_default() += 1;
    }
    (collector, counts)
}

/// In partition order, each key's first deliveries come in `seq` order.
fn assert_order_per_key(received: &[Received]) {
    let mut sorted: Vec<&Received> = received.iter().collect();
    sorted.sort_by_key(|r| (r.topic.clone(), r.partition, r.offset));
    let mut last: HashMap<&str, u64> = HashMap::new();
    let mut seen = std::collections::HashSet::new();
    for record in sorted {
        if !seen.insert(record.id().to_owned()) {
            continue;
        }
        let seq = record
            .payload
            .as_ref()
            .and_then(|p| p["seq"].as_u64())
            .unwrap();
        let previous = last.entry(&record.key).or_default();
        assert!(
            seq > *previous,
            "key {}: {seq} after {previous}",
            record.key
        );
        *previous = seq;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_written_before_the_first_start_are_published_once_then_the_stream() {
    let db = OutboxDb::new().await;
    let before = rows(4, 10, 1);
    for chunk in before.chunks(7) {
        db.write(chunk, false).await;
    }
    let brokers = settings().kafka_brokers.clone();
    let settings = RelaySettings::new(&db, &brokers);
    let _relay = Relay::start(&settings);
    db.wait_for_streaming().await;
    let after = rows(4, 3, 11);
    db.write(&after, false).await;

    let ids: Vec<String> = before
        .iter()
        .chain(&after)
        .map(|r| r.id.to_string())
        .collect();
    let (collector, counts) = collect_all(&brokers, &settings, &ids).await;
    assert!(
        counts.values().all(|&n| n == 1),
        "the exported snapshot and the stream overlap: {counts:?}"
    );
    assert_eq!(counts.len(), ids.len());
    assert_order_per_key(&collector.received);
    let (published, position, completed) = snapshot_record(&db).await.expect("a snapshot record");
    assert!(completed);
    assert_eq!(published, Some(before.len() as i64));
    let snapshot_positions: Vec<&str> = collector
        .received
        .iter()
        .filter(|r| before.iter().any(|b| b.id.to_string() == r.id()))
        .map(|r| r.headers["outbox-commit-lsn"].as_str())
        .collect();
    assert!(
        snapshot_positions
            .iter()
            .all(|p| Some(*p) == position.as_deref()),
        "snapshot records carry the slot's consistent point {position:?}: {snapshot_positions:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_mode_never_publishes_only_what_commits_after_the_slot() {
    let db = OutboxDb::new().await;
    db.write(&rows(2, 3, 1), false).await;
    let brokers = settings().kafka_brokers.clone();
    let settings = RelaySettings::new(&db, &brokers).arg("--snapshot-mode=never");
    let _relay = Relay::start(&settings);
    db.wait_for_streaming().await;
    let marker = Row::event(0, 100);
    db.write(std::slice::from_ref(&marker), false).await;

    let marker_id = marker.id.to_string();
    let collector = Collector::through(&brokers, &[settings.topic("order")], &marker_id).await;
    let ids: Vec<&str> = collector.received.iter().map(Received::id).collect();
    assert_eq!(ids, [marker_id.as_str()]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unfinished_snapshot_is_published_again_at_least_once() {
    let db = OutboxDb::new().await;
    let before = rows(3, 4, 1);
    db.write(&before, false).await;
    let brokers = settings().kafka_brokers.clone();
    let settings = RelaySettings::new(&db, &brokers);

    // `init` records the snapshot as begun and creates the slot, but publishes
    // nothing: exactly the state a crash during the snapshot leaves behind.
    let (code, out, err) = relay_subcommand(&settings, "init");
    assert_eq!(code, 0, "{out}{err}");
    let (_, _, completed) = snapshot_record(&db).await.expect("a snapshot record");
    assert!(!completed);
    let between = rows(3, 2, 5);
    db.write(&between, false).await;

    let _relay = Relay::start(&settings);
    let ids: Vec<String> = before
        .iter()
        .chain(&between)
        .map(|r| r.id.to_string())
        .collect();
    let (collector, counts) = collect_all(&brokers, &settings, &ids).await;
    assert_eq!(counts.len(), ids.len(), "{counts:?}");
    // Rows committed after the slot was created come through the stream too.
    for row in &between {
        assert!(counts[&row.id.to_string()] >= 1);
    }
    assert_order_per_key(&collector.received);
    let (published, _, completed) = snapshot_record(&db).await.expect("a snapshot record");
    assert!(completed);
    assert_eq!(published, Some((before.len() + between.len()) as i64));
}
