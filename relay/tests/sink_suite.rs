//! The delivery promises, kept by every sink alike: each test below runs against
//! Kafka, NATS JetStream, RabbitMQ and Redis Streams on the real servers. Every
//! row arrives with its topic, key, headers and payload, in order per key; SIGKILLs
//! lose nothing; SIGTERM drains; a paused broker stops reading without growing the
//! relay and loses nothing; rows and records that cannot be delivered become dead
//! letters while the stream goes on.

mod support;

use std::collections::HashSet;
use std::time::Duration;

use support::sinks::{check_sink_properties, Backend, SinkCollector};
use support::{
    check_records, relay_subcommand, scale, seed, write_workload, OutboxDb, Received, Relay,
    RelaySettings, Rng, Row, KEYS,
};
use testkit::{PausableProxy, PrivateBroker};

const NO_PROGRESS: Duration = Duration::from_secs(60);

/// The tests of this file, once per backend: `kafka::every_row_arrives_…`, ….
macro_rules! for_every_sink {
    ($($test:ident),* $(,)?) => {
        for_every_sink!(@backend kafka, Kafka, $($test),*);
        for_every_sink!(@backend nats, Nats, $($test),*);
        for_every_sink!(@backend rabbitmq, Rabbitmq, $($test),*);
        for_every_sink!(@backend redis, Redis, $($test),*);
    };
    (@backend $module:ident, $backend:ident, $($test:ident),*) => {
        mod $module {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $test() {
                    super::$test(super::Backend::$backend).await;
                }
            )*
        }
    };
}

for_every_sink!(
    every_row_arrives_with_its_fields_in_order_per_key,
    sigterm_drains_confirms_and_a_restart_resends_nothing,
    sigkill_at_random_points_loses_nothing,
    a_paused_broker_stops_reading_keeps_the_connection_and_loses_nothing,
    rows_and_records_that_cannot_be_delivered_are_dead_lettered,
    check_reports_the_sink_and_fails_when_it_cannot_reach_it,
);

fn topics(settings: &RelaySettings) -> Vec<String> {
    vec![settings.topic("order"), settings.topic("customer")]
}

/// Writes a marker row (key 0, number `seq`), reads until it arrived and then
/// whatever else comes within a second; the marker.
async fn read_through_marker(db: &OutboxDb, collector: &mut SinkCollector, seq: usize) -> Row {
    let marker = Row::event(0, seq);
    db.write(std::slice::from_ref(&marker), false).await;
    let marker_id = marker.id.to_string();
    collector
        .until(NO_PROGRESS, |r| r.iter().any(|x| x.id() == marker_id))
        .await;
    collector.drain_for(Duration::from_secs(1)).await;
    marker
}

async fn every_row_arrives_with_its_fields_in_order_per_key(backend: Backend) {
    let db = OutboxDb::new().await;
    let settings = backend.settings(&db);
    let mut collector = SinkCollector::start(backend, &settings, &topics(&settings)).await;
    let relay = Relay::start(&settings);
    db.wait_for_slot().await;

    let mut rng = Rng::new(seed());
    let mut seqs = vec![0; KEYS];
    let written = write_workload(db.pool(), &mut rng, 30 * scale(), &mut seqs).await;
    let expected = written.len();
    collector.until(NO_PROGRESS, |r| r.len() >= expected).await;
    collector.drain_for(Duration::from_secs(1)).await;
    check_records(&settings, &written, &collector.received, true);
    check_sink_properties(backend, &collector.received);

    // The metrics count what was delivered, labelled by the sink.
    let deadline = std::time::Instant::now() + NO_PROGRESS;
    while relay.metric("outbox_relay_events_routed_total").await != Some(expected as f64) {
        assert!(
            std::time::Instant::now() < deadline,
            "events_routed never reached {expected}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (_, metrics) = relay.http_get("/metrics").await;
    let info = format!("outbox_relay_sink_info{{sink=\"{}\"}} 1", backend.name());
    assert!(metrics.contains(&info), "no {info} in:\n{metrics}");
    let (status, body) = relay.http_get("/health").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        relay.metric("outbox_relay_records_in_flight").await,
        Some(0.0)
    );
}

async fn sigterm_drains_confirms_and_a_restart_resends_nothing(backend: Backend) {
    let db = OutboxDb::new().await;
    // A long status interval: only the drain on SIGTERM confirms.
    let settings = backend
        .settings(&db)
        .with("OUTBOX_RELAY_STATUS_INTERVAL_MS", "600000");
    let mut collector = SinkCollector::start(backend, &settings, &topics(&settings)).await;
    let mut relay = Relay::start(&settings);
    db.wait_for_slot().await;
    let before = db.confirmed_flush().await;

    let mut rng = Rng::new(seed());
    let mut seqs = vec![0; KEYS];
    let written = write_workload(db.pool(), &mut rng, 8, &mut seqs).await;
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
    let marker = read_through_marker(&db, &mut collector, 10_000).await;
    let mut all = written;
    all.push(marker);
    check_records(&settings, &all, &collector.received, true);
}

/// Nothing is lost; into JetStream nothing is stored twice either, since every
/// re-sent record carries its outbox id as `Nats-Msg-Id` and the kills are far
/// shorter than the duplicate window.
async fn sigkill_at_random_points_loses_nothing(backend: Backend) {
    let db = OutboxDb::new().await;
    let settings = backend.settings(&db);
    let mut collector = SinkCollector::start(backend, &settings, &topics(&settings)).await;
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
    let mut dropped = 0;
    for _ in 0..kills {
        tokio::time::sleep(Duration::from_millis(rng.range(200, 1500))).await;
        dropped += relay.log_text().matches("dropped a duplicate").count();
        relay.kill();
        relay = Relay::start(&settings);
    }
    let written = writer.await.expect("the writer finished");

    let ids: HashSet<String> = written.iter().map(|r| r.id.to_string()).collect();
    collector
        .until(NO_PROGRESS, |r| {
            let got: HashSet<&str> = r.iter().map(Received::id).collect();
            ids.iter().all(|id| got.contains(id.as_str()))
        })
        .await;
    collector.drain_for(Duration::from_secs(1)).await;
    dropped += relay.log_text().matches("dropped a duplicate").count();
    check_records(
        &settings,
        &written,
        &collector.received,
        backend == Backend::Nats,
    );
    eprintln!(
        "{}: {} events, {} records stored after {kills} kills{}",
        backend.name(),
        written.len(),
        collector.received.len(),
        if backend == Backend::Nats {
            format!("; JetStream dropped {dropped} records sent again")
        } else {
            String::new()
        }
    );
}

async fn a_paused_broker_stops_reading_keeps_the_connection_and_loses_nothing(backend: Backend) {
    // Kafka: a private broker stopped with SIGSTOP (its clients follow the address
    // it advertises); the others: a proxy in front of the shared server that stops
    // forwarding, connections open.
    let (broker, proxy) = match backend {
        Backend::Kafka => (Some(PrivateBroker::start()), None),
        _ => (
            None,
            Some(PausableProxy::start(&backend.server_address()).await),
        ),
    };
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
    let settings = match (&broker, &proxy) {
        (Some(broker), _) => {
            let mut settings = backend.settings(&db);
            settings.brokers = broker.bootstrap();
            settings
        }
        (_, Some(proxy)) => backend.settings_via(&db, &proxy.address()),
        _ => unreachable!(),
    }
    .with("OUTBOX_RELAY_MAX_IN_FLIGHT", 500)
    .with("OUTBOX_RELAY_STATUS_INTERVAL_MS", 500)
    .with("OUTBOX_RELAY_HEARTBEAT_INTERVAL_MS", 1000)
    .with("OUTBOX_RELAY_STALL_TIMEOUT_MS", 3000);
    let mut collector = SinkCollector::start(backend, &settings, &topics(&settings)).await;
    let mut relay = Relay::start(&settings);
    db.wait_for_slot().await;

    let mut rng = Rng::new(seed());
    let mut seqs = vec![0; KEYS];
    let mut written = write_workload(db.pool(), &mut rng, 5, &mut seqs).await;
    collector
        .until(NO_PROGRESS, |r| r.len() >= written.len())
        .await;
    let walsender = db.wait_for_streaming().await;
    let rss_before = relay.rss_kib();

    let pause = |paused: bool| match (&broker, &proxy) {
        (Some(broker), _) if paused => broker.pause(),
        (Some(broker), _) => broker.resume(),
        (_, Some(proxy)) if paused => proxy.pause(),
        (_, Some(proxy)) => proxy.resume(),
        _ => unreachable!(),
    };
    pause(true);
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
        "the replication connection did not survive the pause:\n{}",
        relay.log_text()
    );
    // Records have been unacknowledged for longer than the stall timeout.
    let (status, body) = relay.http_get("/health").await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("broker_unreachable"), "{body}");
    pause(false);

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
        "{}: {} events; relay RSS {rss_before} KiB before the pause, peak {rss_peak} KiB during it",
        backend.name(),
        written.len()
    );
    assert!(
        growth_kib < 32 * 1024,
        "relay memory grew by {growth_kib} KiB while the broker was paused"
    );
}

/// A row the relay cannot turn into a record (headers not an object), a record
/// larger than the destination takes, and a record the destination itself refuses
/// for its route (Kafka and NATS: a name they cannot have; RabbitMQ: a routing key
/// no queue is bound to; Redis: a key that holds another type) each become a dead
/// letter with the reason, in order, and the rows after them arrive.
async fn rows_and_records_that_cannot_be_delivered_are_dead_lettered(backend: Backend) {
    const LIMIT: usize = 1_000_000;
    let db = OutboxDb::new().await;
    let settings = match backend {
        // librdkafka's and NATS's default limits are 1 MB already.
        Backend::Kafka | Backend::Nats => backend.settings(&db),
        Backend::Rabbitmq => backend
            .settings(&db)
            .with("OUTBOX_RELAY_RABBITMQ_MAX_MESSAGE_BYTES", LIMIT),
        Backend::Redis => backend
            .settings(&db)
            .with("OUTBOX_RELAY_REDIS_MAX_RECORD_BYTES", LIMIT),
    };
    let dlq = format!("{}.dlq", settings.topic_prefix);
    let order = settings.topic("order");
    // RabbitMQ: nothing is bound to the routing key of `customer`.
    let mut collector =
        SinkCollector::start(backend, &settings, &[order.clone(), dlq.clone()]).await;
    let unroutable = match backend {
        Backend::Kafka | Backend::Nats => "bad route",
        Backend::Rabbitmq => "customer",
        Backend::Redis => {
            let client = ::redis::Client::open(testkit::service_url("REDIS_URL")).unwrap();
            let mut connection = client.get_multiplexed_async_connection().await.unwrap();
            let key = settings.topic("customer");
            ::redis::cmd("SET")
                .arg(&key)
                .arg("not a stream")
                .query_async::<()>(&mut connection)
                .await
                .unwrap();
            "customer"
        }
    };
    let _relay = Relay::start(&settings);
    db.wait_for_slot().await;

    let first = Row::event(0, 1);
    let mut bad_headers = Row::event(0, 2);
    bad_headers.headers = Some(serde_json::json!("not an object"));
    let mut too_large = Row::event(0, 3);
    too_large.payload = serde_json::json!({ "blob": "x".repeat(2 * 1024 * 1024) });
    let mut refused = Row::event(0, 4);
    refused.aggregate_type = unroutable.to_owned();
    let last = Row::event(0, 5);
    db.write(std::slice::from_ref(&first), false).await;
    db.write(&[bad_headers.clone(), too_large.clone()], false)
        .await;
    db.write(std::slice::from_ref(&refused), false).await;
    db.write(std::slice::from_ref(&last), false).await;

    let last_id = last.id.to_string();
    collector
        .until(NO_PROGRESS, |r| {
            r.iter().any(|x| x.id() == last_id) && r.iter().filter(|x| x.topic == dlq).count() >= 3
        })
        .await;
    collector.drain_for(Duration::from_secs(1)).await;
    let ids: Vec<&str> = collector
        .received
        .iter()
        .filter(|r| r.topic == order)
        .map(Received::id)
        .collect();
    assert_eq!(ids, [first.id.to_string(), last_id.clone()]);

    let letters: Vec<&Received> = collector
        .received
        .iter()
        .filter(|r| r.topic == dlq)
        .collect();
    assert_eq!(letters.len(), 3, "{letters:?}");
    let code = |r: &Received| {
        r.headers
            .get("dlq-reason-code")
            .cloned()
            .unwrap_or_default()
    };
    let bad = letters[0];
    assert_eq!(code(bad), "bad_row");
    assert_eq!(bad.key, "key-0");
    let body = bad.payload.as_ref().expect("a dead letter has a body");
    assert_eq!(body["row"]["id"], bad_headers.id.to_string());
    assert!(body["reason"]
        .as_str()
        .unwrap_or_default()
        .contains("not a JSON object"));
    let large = letters[1];
    assert_eq!(code(large), "too_large");
    assert_eq!(large.id(), too_large.id.to_string());
    assert_eq!(large.headers.get("dlq-original-topic"), Some(&order));
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
    let route = letters[2];
    assert_eq!(code(route), "bad_route", "{route:?}");
    assert_eq!(route.id(), refused.id.to_string());
    assert_eq!(
        route.headers.get("dlq-original-topic"),
        Some(&settings.topic(unroutable))
    );
    eprintln!(
        "{}: refused as a bad route: {}",
        backend.name(),
        route.headers.get("dlq-reason").cloned().unwrap_or_default()
    );
}

/// `outbox-relay check` looks at the configured sink (and only at it) and says
/// what it found; pointed at a port nothing listens on, it fails naming the sink.
async fn check_reports_the_sink_and_fails_when_it_cannot_reach_it(backend: Backend) {
    let db = OutboxDb::new().await;
    let settings = backend.settings(&db);
    let (code, _, err) = relay_subcommand(&settings, "init");
    assert_eq!(code, 0, "{err}");
    let (code, out, err) = relay_subcommand(&settings, "check");
    let line = out
        .lines()
        .find(|l| l.split_whitespace().nth(1) == Some(backend.name()))
        .unwrap_or_else(|| panic!("no line for {}:\n{out}{err}", backend.name()))
        .to_owned();
    assert!(line.starts_with("ok"), "{line}\n{out}{err}");
    assert_eq!(code, 0, "{out}{err}");
    eprintln!("{line}");

    let unreachable = match backend {
        Backend::Kafka => {
            let mut settings = backend.settings(&db);
            settings.brokers = format!("127.0.0.1:{}", testkit::free_port());
            settings
        }
        _ => backend.settings_via(&db, &format!("127.0.0.1:{}", testkit::free_port())),
    };
    let (code, out, err) = relay_subcommand(&unreachable, "check");
    assert_eq!(code, 1, "{out}{err}");
    let line = out
        .lines()
        .find(|l| l.split_whitespace().nth(1) == Some(backend.name()))
        .unwrap_or_else(|| panic!("no line for {}:\n{out}{err}", backend.name()));
    assert!(line.starts_with("FAIL"), "{line}");
}

/// JetStream stores a record once however often it is published within the
/// duplicate window: a second relay with a slot of its own publishes every row of
/// the table again (its initial snapshot), and the stream keeps one copy of each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_keeps_one_copy_of_rows_published_twice() {
    let backend = Backend::Nats;
    let db = OutboxDb::new().await;
    let settings = backend.settings(&db);
    let mut collector = SinkCollector::start(backend, &settings, &topics(&settings)).await;
    let mut first = Relay::start(&settings);
    db.wait_for_slot().await;
    let rows: Vec<Row> = (1..=50).map(|seq| Row::event(seq % 5, seq)).collect();
    db.write(&rows, false).await;
    collector
        .until(NO_PROGRESS, |r| r.len() >= rows.len())
        .await;
    first.kill();

    let again = settings.clone().with(
        "OUTBOX_RELAY_SLOT",
        format!("{}_again", settings.topic_prefix),
    );
    let second = Relay::start(&again);
    let marker = read_through_marker(&db, &mut collector, 1_000).await;
    let dropped = second.log_text().matches("dropped a duplicate").count();
    let mut all = rows;
    all.push(marker);
    check_records(&settings, &all, &collector.received, true);
    assert_eq!(
        dropped,
        all.len() - 1,
        "the second relay's snapshot should have been dropped whole:\n{}",
        second.log_text()
    );
}

/// `redis.maxlen` trims each stream to about that many entries (`MAXLEN ~`: whole
/// macro nodes, so a little above it), keeping the newest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_trims_streams_to_about_maxlen() {
    let backend = Backend::Redis;
    let db = OutboxDb::new().await;
    let settings = backend.settings(&db).with("OUTBOX_RELAY_REDIS_MAXLEN", 100);
    let mut collector = SinkCollector::start(backend, &settings, &topics(&settings)).await;
    let _relay = Relay::start(&settings);
    db.wait_for_slot().await;
    // 1,000 rows of key 0 (topic `order`), in ten transactions.
    let rows: Vec<Row> = (1..=1_000).map(|seq| Row::event(0, seq)).collect();
    for chunk in rows.chunks(100) {
        db.write(chunk, false).await;
    }
    let last = rows.last().expect("rows").id.to_string();
    collector
        .until(NO_PROGRESS, |r| r.iter().any(|x| x.id() == last))
        .await;
    let client = ::redis::Client::open(testkit::service_url("REDIS_URL")).unwrap();
    let mut connection = client.get_multiplexed_async_connection().await.unwrap();
    let length: u64 = ::redis::cmd("XLEN")
        .arg(settings.topic("order"))
        .query_async(&mut connection)
        .await
        .unwrap();
    assert!(
        (100..1_000).contains(&length),
        "the stream holds {length} entries with maxlen 100"
    );
    eprintln!("redis: {length} entries kept of 1000 with maxlen 100");
}
