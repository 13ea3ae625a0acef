//! The consumer against the real PostgreSQL and broker: each message's effects are
//! applied once, failures are retried or dead-lettered, offsets are committed only
//! past finished work, and one key's messages never run at the same time.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::future::Future;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use rdkafka::consumer::{BaseConsumer, Consumer as _, StreamConsumer};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};
use saga_core::consumer::{
    Consumer, ConsumerConfig, ConsumerError, HandlerError, IncomingMessage, MessageHandler,
    RebalanceEvent,
};
use sqlx::{PgConnection, PgPool};
use testkit::TestDatabase;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use uuid::Uuid;

static NO_SERVICE: sqlx::migrate::Migrator = sqlx::migrate::Migrator::DEFAULT;

/// How long any awaited condition may take.
const DEADLINE: Duration = Duration::from_secs(90);

// ---------------------------------------------------------------------------------
// Environment

/// A fresh database with the shared tables and an `effects` table, and a topic.
async fn setup(partitions: i32) -> (TestDatabase, String) {
    let db = TestDatabase::create().await;
    saga_core::schema::migrate(db.pool(), &NO_SERVICE)
        .await
        .unwrap();
    sqlx::query(
        "CREATE TABLE effects (
             seq             bigserial PRIMARY KEY,  -- the order effects were applied in
             message_id      uuid   NOT NULL,
             key             text,
             n               bigint NOT NULL,
             kafka_partition int    NOT NULL,
             kafka_offset    bigint NOT NULL,
             txid            bigint NOT NULL DEFAULT txid_current()  -- the transaction it ran in
         )",
    )
    .execute(db.pool())
    .await
    .unwrap();
    let topic = testkit::unique_name("consumer");
    testkit::create_topic(&topic, partitions).await;
    (db, topic)
}

fn config(group: &str, topic: &str) -> ConsumerConfig {
    let mut config = ConsumerConfig::new(&testkit::settings().kafka_brokers, group, [topic]);
    config.backoff = Duration::from_millis(20);
    config.max_backoff = Duration::from_millis(200);
    config
}

/// A record to produce.
#[derive(Clone)]
struct Record {
    key: Option<String>,
    /// Header `id`; `None` leaves the header out.
    id: Option<Uuid>,
    kind: &'static str,
    payload: Vec<u8>,
}

impl Record {
    fn new(key: &str, kind: &'static str, n: i64) -> Record {
        Record {
            key: Some(key.to_owned()),
            id: Some(Uuid::now_v7()),
            kind,
            payload: serde_json::to_vec(&serde_json::json!({ "n": n })).unwrap(),
        }
    }
}

/// Produces `records` in this order; returns each one's (partition, offset).
async fn produce(topic: &str, records: &[Record]) -> Vec<(i32, i64)> {
    let producer: FutureProducer = testkit::producer_config().create().unwrap();
    send(&producer, topic, records).await
}

/// [`produce`], each record in a record batch of its own.
///
/// The local broker (tansu 0.6) returns no records for a fetch that starts inside a
/// batch. After a rebalance the new owner of a partition resumes at the committed
/// offset, which may be anywhere; with one record per batch, every offset starts one.
async fn produce_one_per_batch(topic: &str, records: &[Record]) -> Vec<(i32, i64)> {
    let producer: FutureProducer = testkit::producer_config().create().unwrap();
    let mut positions = Vec::with_capacity(records.len());
    for record in records {
        positions.extend(send(&producer, topic, std::slice::from_ref(record)).await);
    }
    positions
}

async fn send(producer: &FutureProducer, topic: &str, records: &[Record]) -> Vec<(i32, i64)> {
    let mut deliveries = Vec::with_capacity(records.len());
    for record in records {
        let mut headers = OwnedHeaders::new().insert(Header {
            key: "type",
            value: Some(record.kind),
        });
        let id = record.id.map(|id| id.to_string());
        if let Some(id) = &id {
            headers = headers.insert(Header {
                key: "id",
                value: Some(id.as_str()),
            });
        }
        let mut kafka_record = FutureRecord::<str, [u8]>::to(topic)
            .payload(record.payload.as_slice())
            .headers(headers);
        if let Some(key) = &record.key {
            kafka_record = kafka_record.key(key.as_str());
        }
        // Handed over synchronously, so the producer keeps this order per partition.
        deliveries.push(
            producer
                .send_result(kafka_record)
                .map_err(|(e, _)| e)
                .unwrap(),
        );
    }
    let mut positions = Vec::with_capacity(deliveries.len());
    for delivery in deliveries {
        let delivered = delivery.await.unwrap().map_err(|(e, _)| e).unwrap();
        positions.push((delivered.partition, delivered.offset));
    }
    positions
}

/// The offset after the last record of each partition.
fn ends(positions: &[(i32, i64)]) -> BTreeMap<i32, i64> {
    let mut ends = BTreeMap::new();
    for &(partition, offset) in positions {
        let end = ends.entry(partition).or_insert(0);
        *end = (*end).max(offset + 1);
    }
    ends
}

/// A consumer running in a task until told to stop.
struct Running {
    stop: oneshot::Sender<()>,
    task: JoinHandle<Result<(), ConsumerError>>,
}

/// Starts a member whose assignment changes `handler` sees.
fn start(config: ConsumerConfig, pool: &PgPool, handler: &Arc<TestHandler>) -> Running {
    let observer = Arc::clone(handler);
    let consumer = Consumer::new(config, pool.clone(), Arc::clone(handler))
        .unwrap()
        .with_rebalance_observer(move |event| observer.rebalanced(event));
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(consumer.run(async move {
        let _ = stopped.await;
    }));
    Running { stop, task }
}

impl Running {
    /// Shuts the consumer down gracefully and returns what `run` returned.
    async fn stop(self) -> Result<(), ConsumerError> {
        let _ = self.stop.send(());
        tokio::time::timeout(DEADLINE, self.task)
            .await
            .expect("the consumer stops in time")
            .unwrap()
    }
}

/// Waits until `check` holds, failing the test after [`DEADLINE`].
async fn wait_until<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + DEADLINE;
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn count(pool: &PgPool, sql: &str) -> i64 {
    sqlx::query_scalar(sql).fetch_one(pool).await.unwrap()
}

async fn wait_for_count(pool: &PgPool, sql: &str, expected: i64) {
    wait_until(&format!("{sql} = {expected}"), || async {
        let seen = count(pool, sql).await;
        assert!(seen <= expected, "{sql} = {seen}, more than {expected}");
        seen == expected
    })
    .await;
}

async fn effects_of(pool: &PgPool, id: Uuid) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM effects WHERE message_id = $1")
        .bind(id)
        .fetch_one(pool)
        .await
        .unwrap()
}

/// The group's committed offset of each partition in `0..partitions`.
async fn committed(group: &str, topic: &str, partitions: i32) -> BTreeMap<i32, Offset> {
    let checker: BaseConsumer = testkit::consumer_config(group).create().unwrap();
    let mut list = TopicPartitionList::new();
    for partition in 0..partitions {
        list.add_partition(topic, partition);
    }
    let committed = tokio::task::spawn_blocking(move || {
        checker.committed_offsets(list, Duration::from_secs(20))
    })
    .await
    .unwrap()
    .unwrap();
    committed
        .elements()
        .iter()
        .map(|e| (e.partition(), e.offset()))
        .collect()
}

fn expected_offsets(ends: &BTreeMap<i32, i64>, partitions: i32) -> BTreeMap<i32, Offset> {
    (0..partitions)
        .map(|p| {
            let offset = ends
                .get(&p)
                .map_or(Offset::Invalid, |&end| Offset::Offset(end));
            (p, offset)
        })
        .collect()
}

// ---------------------------------------------------------------------------------
// The handler

/// Writes one `effects` row per call through the consumer's transaction, and
/// misbehaves on request: type `flaky` fails transiently twice, `broken` always,
/// `reject` definitely, `panic` panics. Counts calls and concurrent executions, and
/// records each call's partition and whether its member lost that partition while
/// the call ran.
#[derive(Default)]
struct TestHandler {
    calls: AtomicUsize,
    flaky_attempts: AtomicU32,
    /// How long each call takes at least (to let calls overlap).
    work: Duration,
    concurrency: Mutex<Concurrency>,
    /// The member's assignment changes, from its rebalance observer.
    assignment: Mutex<Assignment>,
    /// Every call, in the order they ended.
    log: Mutex<Vec<Call>>,
}

/// What a member's rebalance observer saw.
#[derive(Debug, Default, Clone)]
struct Assignment {
    /// Partitions assigned to the member at some point.
    ever_assigned: BTreeSet<i32>,
    /// Revocations per partition so far.
    revocations: HashMap<i32, u64>,
}

/// One call of the handler.
#[derive(Debug, Clone)]
struct Call {
    partition: i32,
    offset: i64,
    /// The member's partition was revoked after the call began and before it ended.
    revoked_meanwhile: bool,
}

#[derive(Default)]
struct Concurrency {
    per_lane: HashMap<String, usize>,
    max_per_lane: usize,
    running: usize,
    max_running: usize,
}

impl TestHandler {
    fn taking(work: Duration) -> TestHandler {
        TestHandler {
            work,
            ..TestHandler::default()
        }
    }

    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }

    /// The member's rebalance observer.
    fn rebalanced(&self, event: &RebalanceEvent) {
        let mut assignment = self.assignment.lock().unwrap();
        match event {
            RebalanceEvent::Assigned { partition, .. } => {
                assignment.ever_assigned.insert(*partition);
            }
            RebalanceEvent::Revoked { partition, .. } => {
                *assignment.revocations.entry(*partition).or_default() += 1;
            }
            _ => {}
        }
    }

    fn revocations_of(&self, partition: i32) -> u64 {
        let assignment = self.assignment.lock().unwrap();
        assignment.revocations.get(&partition).copied().unwrap_or(0)
    }

    fn assignment(&self) -> Assignment {
        self.assignment.lock().unwrap().clone()
    }

    fn log(&self) -> Vec<Call> {
        self.log.lock().unwrap().clone()
    }

    fn enter(&self, lane: &str) {
        let mut c = self.concurrency.lock().unwrap();
        let in_lane = c.per_lane.entry(lane.to_owned()).or_default();
        *in_lane += 1;
        let in_lane = *in_lane;
        c.max_per_lane = c.max_per_lane.max(in_lane);
        c.running += 1;
        c.max_running = c.max_running.max(c.running);
    }

    fn leave(&self, lane: &str) {
        let mut c = self.concurrency.lock().unwrap();
        *c.per_lane.get_mut(lane).unwrap() -= 1;
        c.running -= 1;
    }

    async fn apply(
        &self,
        tx: &mut PgConnection,
        message: &IncomingMessage,
    ) -> Result<(), HandlerError> {
        if !self.work.is_zero() {
            tokio::time::sleep(self.work).await;
        }
        #[derive(serde::Deserialize)]
        struct Payload {
            n: i64,
        }
        let n = message.payload_as::<Payload>()?.n;
        sqlx::query(
            "INSERT INTO effects (message_id, key, n, kafka_partition, kafka_offset) \
             VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(message.id)
        .bind(&message.key)
        .bind(n)
        .bind(message.partition)
        .bind(message.offset)
        .execute(&mut *tx)
        .await?;
        match message.message_type.as_deref() {
            Some("flaky") if self.flaky_attempts.fetch_add(1, Ordering::SeqCst) < 2 => Err(
                HandlerError::transient("the participant is down (simulated)"),
            ),
            Some("broken") => Err(HandlerError::transient("always down (simulated)")),
            Some("reject") => Err(HandlerError::definite("rejected by the test handler")),
            Some("panic") => panic!("the test handler panics"),
            _ => Ok(()),
        }
    }
}

impl MessageHandler for TestHandler {
    fn handle<'a>(
        &'a self,
        tx: &'a mut PgConnection,
        message: &'a IncomingMessage,
    ) -> BoxFuture<'a, Result<(), HandlerError>> {
        Box::pin(async move {
            self.calls.fetch_add(1, Ordering::SeqCst);
            let lane = match &message.key {
                Some(key) => format!("key {key}"),
                None => format!("keyless {}", message.partition),
            };
            let revocations = self.revocations_of(message.partition);
            self.enter(&lane);
            let result = self.apply(tx, message).await;
            self.leave(&lane);
            self.log.lock().unwrap().push(Call {
                partition: message.partition,
                offset: message.offset,
                revoked_meanwhile: self.revocations_of(message.partition) != revocations,
            });
            result
        })
    }
}

/// Per key, the `n` of its effects in the order they were applied.
async fn applied_order(pool: &PgPool) -> BTreeMap<String, Vec<i64>> {
    let rows: Vec<(Option<String>, i64)> =
        sqlx::query_as("SELECT key, n FROM effects ORDER BY seq")
            .fetch_all(pool)
            .await
            .unwrap();
    let mut order: BTreeMap<String, Vec<i64>> = BTreeMap::new();
    for (key, n) in rows {
        order.entry(key.unwrap_or_default()).or_default().push(n);
    }
    order
}

fn assert_increasing(order: &BTreeMap<String, Vec<i64>>) {
    for (key, ns) in order {
        assert!(
            ns.windows(2).all(|w| w[0] < w[1]),
            "key {key} was applied out of order: {ns:?}"
        );
    }
}

// ---------------------------------------------------------------------------------
// Tests

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_message_is_applied_once() {
    let (db, topic) = setup(3).await;
    let group = testkit::unique_name("group");
    let mut records = Vec::new();
    for n in 0..300 {
        let record = Record::new(&format!("key-{}", n % 10), "effect", n);
        records.push(record.clone());
        if n % 10 == 3 {
            // Produced twice with the same id, right behind the original.
            records.push(record);
        }
    }
    assert_eq!(records.len(), 330);
    produce(&topic, &records).await;

    let handler = Arc::new(TestHandler::default());
    let running = start(config(&group, &topic), db.pool(), &handler);
    wait_for_count(db.pool(), "SELECT count(*) FROM processed_messages", 300).await;
    wait_for_count(db.pool(), "SELECT count(*) FROM effects", 300).await;
    running.stop().await.unwrap();

    assert_eq!(count(db.pool(), "SELECT count(*) FROM effects").await, 300);
    assert_eq!(
        count(db.pool(), "SELECT count(DISTINCT message_id) FROM effects").await,
        300
    );
    let journal: Vec<(String, i64)> =
        sqlx::query_as("SELECT consumer, count(*) FROM processed_messages GROUP BY consumer")
            .fetch_all(db.pool())
            .await
            .unwrap();
    assert_eq!(journal, [(group.clone(), 300)]);
    // The duplicates were recognised before the handler ran.
    assert_eq!(handler.calls(), 300);
    let order = applied_order(db.pool()).await;
    assert_eq!(order.len(), 10);
    assert_increasing(&order);
    // Within a partition, effects of one key follow the offsets.
    let offsets: Vec<(String, i64)> =
        sqlx::query_as("SELECT key, kafka_offset FROM effects ORDER BY seq")
            .fetch_all(db.pool())
            .await
            .unwrap();
    let mut last: HashMap<String, i64> = HashMap::new();
    for (key, offset) in offsets {
        let previous = last.insert(key.clone(), offset);
        assert!(
            previous.is_none_or(|p| p < offset),
            "key {key}: {previous:?} then {offset}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_transient_failure_is_retried_and_its_writes_rolled_back() {
    let (db, topic) = setup(1).await;
    let group = testkit::unique_name("group");
    let records = [
        Record::new("a", "effect", 1),
        Record::new("a", "flaky", 2),
        Record::new("a", "effect", 3),
        Record::new("b", "effect", 1),
    ];
    produce(&topic, &records).await;

    let handler = Arc::new(TestHandler::default());
    let running = start(config(&group, &topic), db.pool(), &handler);
    wait_for_count(db.pool(), "SELECT count(*) FROM processed_messages", 4).await;
    running.stop().await.unwrap();

    // Two failed attempts and the one that committed.
    assert_eq!(handler.flaky_attempts.load(Ordering::SeqCst), 3);
    // Each failed attempt wrote an effect row before failing; none of them remains.
    assert_eq!(effects_of(db.pool(), records[1].id.unwrap()).await, 1);
    assert_eq!(count(db.pool(), "SELECT count(*) FROM effects").await, 4);
    // The retries held up key "a" only: its third message came after the second.
    let order = applied_order(db.pool()).await;
    assert_eq!(order["a"], [1, 2, 3]);
    assert_eq!(order["b"], [1]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn poison_messages_are_dead_lettered_and_the_line_moves_on() {
    let (db, topic) = setup(1).await;
    let group = testkit::unique_name("group");
    let no_id = Record {
        id: None,
        ..Record::new("k1", "effect", 1)
    };
    let not_json = Record {
        payload: b"this is not JSON".to_vec(),
        ..Record::new("k1", "effect", 2)
    };
    let records = [
        no_id,
        not_json,
        Record::new("k2", "reject", 1),
        Record::new("k3", "broken", 1),
        Record::new("k4", "panic", 1),
        // Later messages, of the same and of other keys.
        Record::new("k1", "effect", 3),
        Record::new("k2", "effect", 2),
        Record::new("k3", "effect", 2),
        Record::new("k4", "effect", 2),
        Record::new("k5", "effect", 1),
    ];
    let positions = produce(&topic, &records).await;

    let handler = Arc::new(TestHandler::default());
    let mut config = config(&group, &topic);
    config.max_attempts = 3;
    let dead_letter_topic = config.dead_letter_topic.clone();
    assert_eq!(dead_letter_topic, format!("{group}.dlq"));
    let running = start(config, db.pool(), &handler);
    wait_for_count(db.pool(), "SELECT count(*) FROM effects", 5).await;

    // Read the dead-letter topic (created by the consumer) with a plain consumer.
    let reader: StreamConsumer = testkit::consumer_config(&testkit::unique_name("dlq_reader"))
        .create()
        .unwrap();
    reader.subscribe(&[&dead_letter_topic]).unwrap();
    let mut letters = Vec::new();
    while letters.len() < 5 {
        let message = tokio::time::timeout(DEADLINE, reader.recv())
            .await
            .expect("five dead letters arrive in time")
            .unwrap();
        letters.push(message.detach());
    }
    running.stop().await.unwrap();
    // Different keys are dead-lettered concurrently: order the letters by source.
    let source_offset = |letter: &rdkafka::message::OwnedMessage| -> i64 {
        let header = letter
            .headers()
            .unwrap()
            .iter()
            .find(|h| h.key == "dlq-source-offset")
            .unwrap();
        std::str::from_utf8(header.value.unwrap())
            .unwrap()
            .parse()
            .unwrap()
    };
    letters.sort_by_key(source_offset);

    let expected = [
        (0, "poison", "header \"id\" is missing"),
        (1, "poison", "the payload is not JSON"),
        (2, "definite", "rejected by the test handler"),
        (3, "exhausted", "gave up after 3 attempts"),
        (4, "panicked", "the test handler panics"),
    ];
    for (letter, (index, code, reason)) in letters.iter().zip(expected) {
        let headers: HashMap<&str, String> = letter
            .headers()
            .unwrap()
            .iter()
            .map(|h| {
                (
                    h.key,
                    String::from_utf8_lossy(h.value.unwrap()).into_owned(),
                )
            })
            .collect();
        let record = &records[index];
        assert_eq!(headers["dlq-reason-code"], code, "{headers:?}");
        assert!(headers["dlq-reason"].contains(reason), "{headers:?}");
        assert_eq!(headers["dlq-source-topic"], topic);
        assert_eq!(
            headers["dlq-source-partition"],
            positions[index].0.to_string()
        );
        assert_eq!(headers["dlq-source-offset"], positions[index].1.to_string());
        assert_eq!(headers["dlq-consumer"], group);
        // The original record, unchanged.
        assert_eq!(headers["type"], record.kind);
        assert_eq!(
            headers.get("id"),
            record.id.map(|id| id.to_string()).as_ref()
        );
        assert_eq!(letter.key(), record.key.as_deref().map(str::as_bytes));
        assert_eq!(letter.payload(), Some(record.payload.as_slice()));
    }

    // Every later message was applied; the failed ones left no effects and no journal row.
    let order = applied_order(db.pool()).await;
    let expected_order: BTreeMap<String, Vec<i64>> =
        [("k1", 3), ("k2", 2), ("k3", 2), ("k4", 2), ("k5", 1)]
            .into_iter()
            .map(|(k, n)| (k.to_owned(), vec![n]))
            .collect();
    assert_eq!(order, expected_order);
    assert_eq!(
        count(db.pool(), "SELECT count(*) FROM processed_messages").await,
        5
    );
    // The dead letters count as done: the committed offset is past everything.
    assert_eq!(
        committed(&group, &topic, 1).await,
        expected_offsets(&ends(&positions), 1)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_graceful_shutdown_commits_past_every_processed_message() {
    let (db, topic) = setup(3).await;
    let group = testkit::unique_name("group");
    let records: Vec<Record> = (0..60)
        .map(|n| Record::new(&format!("key-{}", n % 6), "effect", n))
        .collect();
    let positions = produce(&topic, &records).await;

    let handler = Arc::new(TestHandler::default());
    let running = start(config(&group, &topic), db.pool(), &handler);
    wait_for_count(db.pool(), "SELECT count(*) FROM effects", 60).await;
    running.stop().await.unwrap();
    assert_eq!(
        committed(&group, &topic, 3).await,
        expected_offsets(&ends(&positions), 3)
    );

    // A restart of the group handles only what came after.
    let restarted = Arc::new(TestHandler::default());
    let running = start(config(&group, &topic), db.pool(), &restarted);
    let marker = Record::new("key-0", "effect", 1000);
    let marker_position = produce(&topic, std::slice::from_ref(&marker)).await;
    wait_for_count(db.pool(), "SELECT count(*) FROM effects", 61).await;
    running.stop().await.unwrap();
    assert_eq!(restarted.calls(), 1);
    assert_eq!(effects_of(db.pool(), marker.id.unwrap()).await, 1);
    assert_eq!(
        count(db.pool(), "SELECT count(*) FROM processed_messages").await,
        61
    );
    let all: Vec<(i32, i64)> = positions.into_iter().chain(marker_position).collect();
    assert_eq!(
        committed(&group, &topic, 3).await,
        expected_offsets(&ends(&all), 3)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn messages_already_in_the_journal_are_skipped_and_passed() {
    let (db, topic) = setup(2).await;
    let group = testkit::unique_name("group");

    // A crash after the transaction committed and before the offset was: the journal
    // has the rows, the group has no offsets.
    let processed: Vec<Record> = (0..5)
        .map(|n| Record::new(&format!("key-{}", n % 3), "effect", n))
        .collect();
    for record in &processed {
        sqlx::query("INSERT INTO processed_messages (consumer, message_id) VALUES ($1, $2)")
            .bind(&group)
            .bind(record.id.unwrap())
            .execute(db.pool())
            .await
            .unwrap();
    }
    let fresh: Vec<Record> = (5..10)
        .map(|n| Record::new(&format!("key-{}", n % 3), "effect", n))
        .collect();
    let records: Vec<Record> = processed
        .iter()
        .cloned()
        .chain(fresh.iter().cloned())
        .collect();
    let mut positions = produce(&topic, &records).await;

    let handler = Arc::new(TestHandler::default());
    let running = start(config(&group, &topic), db.pool(), &handler);
    // Every key with a journaled message also has a fresh one behind it (keys
    // n % 3), so once the fresh ones are applied, the journaled ones were passed.
    wait_for_count(db.pool(), "SELECT count(*) FROM processed_messages", 10).await;
    wait_for_count(db.pool(), "SELECT count(*) FROM effects", 5).await;
    running.stop().await.unwrap();
    assert_eq!(
        handler.calls(),
        5,
        "the handler ran for a journaled message"
    );
    for record in &processed {
        assert_eq!(effects_of(db.pool(), record.id.unwrap()).await, 0);
    }
    assert_eq!(
        committed(&group, &topic, 2).await,
        expected_offsets(&ends(&positions), 2)
    );

    // Redeliveries of handled messages (a producer retry, a replay) after a restart,
    // each followed by a new marker of its key: a key's messages are handled in
    // order, so once the markers are applied, the redeliveries are done too.
    let again: Vec<Record> = fresh.iter().take(3).cloned().collect();
    let markers: Vec<Record> = again
        .iter()
        .map(|r| Record::new(r.key.as_deref().unwrap(), "effect", 1000))
        .collect();
    let batch: Vec<Record> = again.into_iter().chain(markers).collect();
    positions.extend(produce(&topic, &batch).await);

    let restarted = Arc::new(TestHandler::default());
    let running = start(config(&group, &topic), db.pool(), &restarted);
    wait_for_count(db.pool(), "SELECT count(*) FROM effects", 8).await;
    running.stop().await.unwrap();
    assert_eq!(restarted.calls(), 3, "only the markers were new");
    assert_eq!(
        count(db.pool(), "SELECT count(*) FROM processed_messages").await,
        13
    );
    assert_eq!(
        committed(&group, &topic, 2).await,
        expected_offsets(&ends(&positions), 2)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn messages_at_hand_share_a_transaction_unless_batches_are_off() {
    for batch_max in [8, 1] {
        let (db, topic) = setup(1).await;
        let group = testkit::unique_name("group");
        // One key each: all 40 are the first of their lanes, and one fetch brings
        // them.
        let records: Vec<Record> = (0..40)
            .map(|n| Record::new(&format!("key-{n}"), "effect", n))
            .collect();
        let positions = produce(&topic, &records).await;

        let handler = Arc::new(TestHandler::default());
        let mut config = config(&group, &topic);
        config.batch_max = batch_max;
        let running = start(config, db.pool(), &handler);
        wait_for_count(db.pool(), "SELECT count(*) FROM effects", 40).await;
        running.stop().await.unwrap();

        assert_eq!(
            count(db.pool(), "SELECT count(DISTINCT message_id) FROM effects").await,
            40
        );
        assert_eq!(handler.calls(), 40);
        let transactions = count(db.pool(), "SELECT count(DISTINCT txid) FROM effects").await;
        let largest = count(
            db.pool(),
            "SELECT max(n) FROM (SELECT count(*) AS n FROM effects GROUP BY txid) AS t",
        )
        .await;
        if batch_max == 1 {
            assert_eq!(transactions, 40, "batch_max 1 batched");
        } else {
            assert!(
                transactions < 40,
                "40 messages at hand took {transactions} transactions"
            );
            assert!(largest <= 8, "a batch of {largest} with batch_max 8");
        }
        // The journal rows commit with their effects.
        assert_eq!(
            count(
                db.pool(),
                "SELECT count(*) FROM processed_messages p JOIN effects e \
                 ON e.message_id = p.message_id AND e.txid % 4294967296 = p.xmin::text::bigint"
            )
            .await,
            40
        );
        assert_eq!(
            committed(&group, &topic, 1).await,
            expected_offsets(&ends(&positions), 1)
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failure_in_a_batch_runs_each_of_its_messages_alone() {
    let (db, topic) = setup(1).await;
    let group = testkit::unique_name("group");
    let mut records: Vec<Record> = (0..30)
        .map(|n| Record::new(&format!("key-{n}"), "effect", n))
        .collect();
    records.insert(5, Record::new("flaky", "flaky", 1));
    records.insert(12, Record::new("rejected", "reject", 1));
    records.insert(20, Record::new("panics", "panic", 1));
    let positions = produce(&topic, &records).await;

    let handler = Arc::new(TestHandler::default());
    let mut config = config(&group, &topic);
    config.batch_max = 64;
    config.max_attempts = 3;
    let running = start(config, db.pool(), &handler);
    wait_for_count(db.pool(), "SELECT count(*) FROM effects", 31).await;
    running.stop().await.unwrap();

    // Every message that could be applied was, once; the batch's rolled-back
    // writes left nothing behind.
    for record in &records {
        let expected = match record.kind {
            "effect" | "flaky" => 1,
            _ => 0,
        };
        assert_eq!(
            effects_of(db.pool(), record.id.unwrap()).await,
            expected,
            "{}",
            record.kind
        );
    }
    assert_eq!(
        count(db.pool(), "SELECT count(*) FROM processed_messages").await,
        31,
        "the refused and the panicking message are not journalled"
    );
    // Alone, the messages take 35 calls (the flaky one three). More calls: the
    // handlers before the first failure also ran in the batch that was rolled back.
    assert!(
        handler.calls() > 35,
        "{} calls: no batch ran",
        handler.calls()
    );
    assert_eq!(handler.flaky_attempts.load(Ordering::SeqCst), 3);
    assert_eq!(
        committed(&group, &topic, 1).await,
        expected_offsets(&ends(&positions), 1)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_key_never_runs_twice_at_once_while_keys_overlap() {
    let (db, topic) = setup(1).await;
    let group = testkit::unique_name("group");
    let mut records = Vec::new();
    for n in 0..10 {
        for key in 0..6 {
            records.push(Record::new(&format!("key-{key}"), "effect", n));
        }
        records.push(Record {
            key: None,
            ..Record::new("", "effect", n)
        });
    }
    produce(&topic, &records).await;

    let handler = Arc::new(TestHandler::taking(Duration::from_millis(30)));
    let mut config = config(&group, &topic);
    config.max_in_flight = 8;
    let running = start(config, db.pool(), &handler);
    wait_for_count(db.pool(), "SELECT count(*) FROM effects", 70).await;
    running.stop().await.unwrap();

    {
        let concurrency = handler.concurrency.lock().unwrap();
        assert_eq!(
            concurrency.max_per_lane, 1,
            "two messages of one key ran at once"
        );
        assert!(
            concurrency.max_running > 1,
            "messages of different keys never overlapped"
        );
        assert!(
            concurrency.max_running <= 8,
            "more than max_in_flight messages ran at once: {}",
            concurrency.max_running
        );
    }
    let order = applied_order(db.pool()).await;
    assert_eq!(order.len(), 7);
    assert!(order.values().all(|ns| ns.len() == 10));
    assert_increasing(&order);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_dead_letter_that_cannot_be_produced_stops_the_consumer_before_its_offset() {
    let (db, topic) = setup(1).await;
    let group = testkit::unique_name("group");
    // Larger than the producer will accept (message.max.bytes below), and not JSON.
    let too_large = Record {
        payload: vec![b'x'; 4000],
        ..Record::new("k2", "effect", 1)
    };
    let records = [
        Record::new("k1", "effect", 1),
        too_large,
        Record::new("k2", "effect", 2),
    ];
    let positions = produce(&topic, &records).await;

    let handler = Arc::new(TestHandler::default());
    let mut config = config(&group, &topic);
    config
        .options
        .insert("message.max.bytes".to_owned(), "1000".to_owned());
    let consumer = Consumer::new(config, db.pool().clone(), Arc::clone(&handler)).unwrap();
    let result = tokio::time::timeout(DEADLINE, consumer.run(std::future::pending()))
        .await
        .expect("the consumer stops on its own");
    match result {
        Err(ConsumerError::DeadLetter { message, .. }) => {
            assert_eq!((message.partition, message.offset), positions[1]);
        }
        other => panic!("expected a dead-letter error, got {other:?}"),
    }
    // The message before was applied; the one behind it in its key's lane was not,
    // and the committed offset stops at the message that could not be dead-lettered.
    assert_eq!(effects_of(db.pool(), records[0].id.unwrap()).await, 1);
    assert_eq!(effects_of(db.pool(), records[2].id.unwrap()).await, 0);
    assert_eq!(
        committed(&group, &topic, 1).await,
        BTreeMap::from([(0, Offset::Offset(positions[1].1))])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rebalance_between_two_members_applies_every_message_once_in_key_order() {
    let (db, topic) = setup(3).await;
    let group = testkit::unique_name("group");
    // About 9 s of work for one member, while a rebalance takes a few seconds.
    let records: Vec<Record> = (0..180)
        .map(|n| Record::new(&format!("key-{}", n % 12), "effect", n))
        .collect();
    let positions = produce_one_per_batch(&topic, &records).await;

    let first = Arc::new(TestHandler::taking(Duration::from_millis(200)));
    let second = Arc::new(TestHandler::taking(Duration::from_millis(200)));
    let mut config = config(&group, &topic);
    config.max_in_flight = 4;
    let running_first = start(config.clone(), db.pool(), &first);
    wait_until("the first member to make progress", || async {
        count(db.pool(), "SELECT count(*) FROM effects").await >= 10
    })
    .await;
    // The second member joins: the group rebalances while the first is busy. Under
    // librdkafka's default (eager) protocol every partition of the first member is
    // revoked, with messages in its handler, and some of them move to the second.
    let running_second = start(config, db.pool(), &second);
    wait_until("the second member to get work", || async {
        second.calls() > 0
    })
    .await;
    wait_for_count(db.pool(), "SELECT count(*) FROM processed_messages", 180).await;
    wait_for_count(db.pool(), "SELECT count(*) FROM effects", 180).await;
    running_second.stop().await.unwrap();
    running_first.stop().await.unwrap();

    assert_eq!(
        count(db.pool(), "SELECT count(DISTINCT message_id) FROM effects").await,
        180
    );
    assert_increasing(&applied_order(db.pool()).await);
    assert_eq!(
        committed(&group, &topic, 3).await,
        expected_offsets(&ends(&positions), 3)
    );
    // What the test is about: a partition was taken from the first member while its
    // handler was in the middle of one of that partition's messages (revocations when
    // a member leaves or stops find no work in flight and do not count). Whether
    // that partition then went to the second member or back to the first is the
    // assignor's choice, so only that the second member got partitions is checked.
    let revoked_in_handler: Vec<Call> = first
        .log()
        .into_iter()
        .filter(|call| call.revoked_meanwhile)
        .collect();
    let (first_saw, second_saw) = (first.assignment(), second.assignment());
    assert!(
        !revoked_in_handler.is_empty(),
        "no partition was revoked from the first member while its handler ran a message \
         of that partition; first member: {first_saw:?}, {} calls",
        first.calls()
    );
    assert!(
        !second_saw.ever_assigned.is_empty(),
        "the second member was never assigned a partition"
    );
    println!(
        "handler calls: first member {}, second member {}; revoked from the first while \
         in its handler: {:?}; first member {first_saw:?}; second member {second_saw:?}",
        first.calls(),
        second.calls(),
        revoked_in_handler
            .iter()
            .map(|call| (call.partition, call.offset))
            .collect::<Vec<_>>()
    );
}
