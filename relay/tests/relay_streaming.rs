//! Large transactions against the real PostgreSQL and broker: streamed by the
//! server while in progress (protocol 2) and published only at their commit, never
//! after an abort or from an aborted subtransaction, in commit order among other
//! sessions' transactions; a relay killed halfway through publishing one re-sends
//! at most one window; transactions confirmed while a streamed one is open do not
//! lose it.
//!
//! Each database sets `logical_decoding_work_mem` to its minimum (64 kB), which
//! its walsender takes at connection: a transaction of a few hundred rows is
//! streamed. The relay keeps 64 KiB of streamed changes in memory, so they spill.

mod support;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use sqlx::{PgPool, Postgres, Transaction};
use support::{scale, Collector, OutboxDb, Received, Relay, RelaySettings};
use testkit::{settings, unique_name};

const KEYS: i64 = 8;
const NO_PROGRESS: Duration = Duration::from_secs(60);
/// Bytes of padding per row: a few hundred rows outgrow 64 kB.
const PAD: i32 = 200;

/// Events of the test in the order the test commits them: `(key, seq)`, each
/// key's `seq` counting up in commit order.
#[derive(Debug, Default)]
struct Plan {
    next: HashMap<i64, i64>,
    committed: Vec<(i64, i64)>,
}

impl Plan {
    /// `n` events over the keys, numbered after the ones planned so far: the
    /// caller commits them after those.
    fn events(&mut self, n: usize) -> Vec<(i64, i64)> {
        (0..n as i64)
            .map(|i| {
                let key = i % KEYS;
                let seq = self.next.entry(key).or_insert(0);
                *seq += 1;
                (key, *seq)
            })
            .collect()
    }

    fn committed(&mut self, events: &[(i64, i64)]) {
        self.committed.extend_from_slice(events);
    }
}

/// A database for streaming, the relay's settings (spill directory of its own)
/// and the relay, streaming.
struct World {
    db: OutboxDb,
    settings: RelaySettings,
    spill: PathBuf,
    brokers: String,
}

impl World {
    async fn new(extra: &[(&str, String)]) -> World {
        let db = OutboxDb::new().await;
        sqlx::raw_sql(&format!(
            "ALTER DATABASE {} SET logical_decoding_work_mem = '64kB'",
            db.db.name()
        ))
        .execute(db.pool())
        .await
        .expect("set logical_decoding_work_mem");
        let brokers = settings().kafka_brokers.clone();
        let spill = std::env::temp_dir().join(unique_name("spill"));
        let mut settings = RelaySettings::new(&db, &brokers)
            .with("OUTBOX_RELAY_STREAM_MEMORY_BYTES", 65_536)
            .with("OUTBOX_RELAY_SPILL_DIR", spill.display());
        for (name, value) in extra {
            settings = settings.with(name, value);
        }
        World {
            db,
            settings,
            spill,
            brokers,
        }
    }

    fn pool(&self) -> &PgPool {
        self.db.pool()
    }

    /// Starts the relay and waits until its server process decodes new
    /// transactions whole: a marker committed after that arrives.
    ///
    /// A walsender decodes (and streams) only once it has a consistent view of
    /// the transactions running in the cluster; starting without a snapshot saved
    /// on disk, it must wait for those running when it started to end. A
    /// transaction opened before that point would be waited for itself and so
    /// could never be streamed: the test would wait on its own open transaction.
    async fn start(&self) -> Relay {
        let relay = Relay::start(&self.settings);
        self.db.wait_for_streaming().await;
        let deadline = Instant::now() + NO_PROGRESS;
        loop {
            let before = routed(&relay).await;
            sqlx::query(
                "INSERT INTO outbox (id, aggregatetype, aggregateid, type, payload) \
                 VALUES (gen_random_uuid(), 'ready', 'ready', 'Ready', '{}')",
            )
            .execute(self.pool())
            .await
            .expect("insert a marker");
            let attempt = Instant::now() + Duration::from_secs(3);
            while Instant::now() < attempt {
                if routed(&relay).await > before {
                    return relay;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            assert!(
                Instant::now() < deadline,
                "no marker arrived; log:\n{}",
                relay.log_text()
            );
        }
    }

    async fn collector(&self) -> Collector {
        Collector::new(&self.brokers, &[self.settings.topic("order")], 3).await
    }

    /// The slot's statistics: (stream_txns, stream_count, spill_bytes).
    async fn slot_stats(&self) -> (i64, i64, i64) {
        sqlx::query_as(
            "SELECT stream_txns, stream_count, spill_bytes FROM pg_stat_replication_slots \
             WHERE slot_name = $1",
        )
        .bind(self.db.slot())
        .fetch_optional(self.pool())
        .await
        .expect("read pg_stat_replication_slots")
        .unwrap_or((0, 0, 0))
    }

    /// Waits until the server has streamed more than `count` blocks from the slot.
    async fn wait_streamed_beyond(&self, count: i64) {
        let deadline = Instant::now() + NO_PROGRESS;
        while self.slot_stats().await.1 <= count {
            assert!(Instant::now() < deadline, "the server streamed nothing");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Begins a transaction of `events` (`dead`: never to be published) and waits
    /// until the server streamed it and the relay holds it open.
    async fn open_streamed(
        &self,
        relay: &Relay,
        events: &[(i64, i64)],
        dead: bool,
    ) -> Transaction<'static, Postgres> {
        let (_, streamed, _) = self.slot_stats().await;
        let mut tx = self.pool().begin().await.expect("begin");
        insert(&mut tx, events, dead).await;
        self.wait_streamed_beyond(streamed).await;
        wait_metric(relay, "outbox_relay_streamed_transactions_open", 1.0).await;
        tx
    }

    /// The relay holds no streamed transaction, and no spill file is left.
    async fn assert_nothing_held(&self, relay: &Relay) {
        wait_metric(relay, "outbox_relay_streamed_transactions_open", 0.0).await;
        let files = self.spill_files();
        assert!(files.is_empty(), "spill files left: {files:?}");
    }

    /// Spill files left in the relay's spill directory.
    fn spill_files(&self) -> Vec<PathBuf> {
        let mut files = Vec::new();
        let mut dirs = vec![self.spill.clone()];
        while let Some(dir) = dirs.pop() {
            for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
                let path = entry.path();
                if path.is_dir() {
                    dirs.push(path);
                } else {
                    files.push(path);
                }
            }
        }
        files
    }
}

impl Drop for World {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.spill);
    }
}

/// Inserts `events` in the open transaction `tx`; `dead` marks events that must
/// never be published.
async fn insert(tx: &mut Transaction<'_, Postgres>, events: &[(i64, i64)], dead: bool) {
    let keys: Vec<i64> = events.iter().map(|e| e.0).collect();
    let seqs: Vec<i64> = events.iter().map(|e| e.1).collect();
    sqlx::query(
        "INSERT INTO outbox (id, aggregatetype, aggregateid, type, payload) \
         SELECT gen_random_uuid(), 'order', 'key-' || k, 'Changed', \
                jsonb_build_object('key', k, 'seq', s, 'dead', $3::bool, 'pad', repeat('x', $4)) \
         FROM unnest($1::bigint[], $2::bigint[]) AS e(k, s)",
    )
    .bind(&keys)
    .bind(&seqs)
    .bind(dead)
    .bind(PAD)
    .execute(&mut **tx)
    .await
    .expect("insert outbox rows");
}

/// `n` events that must never arrive, numbered apart from the plan's.
fn dead_events(n: i64) -> Vec<(i64, i64)> {
    (0..n).map(|i| (i % KEYS, 1_000_000 + i)).collect()
}

/// Commits `n` events of the plan in a transaction of their own.
async fn commit_small(pool: &PgPool, plan: &mut Plan, n: usize) {
    let events = plan.events(n);
    let mut tx = pool.begin().await.expect("begin");
    insert(&mut tx, &events, false).await;
    tx.commit().await.expect("commit");
    plan.committed(&events);
}

fn event(record: &Received) -> (i64, i64, bool) {
    let payload = record.payload.as_ref().expect("a payload");
    let field = |name: &str| payload[name].as_i64().expect("a number");
    (
        field("key"),
        field("seq"),
        payload["dead"].as_bool().unwrap_or(false),
    )
}

/// Reads until every committed event of the plan arrived.
async fn collect_all(collector: &mut Collector, plan: &Plan) {
    let expected: HashSet<(i64, i64)> = plan.committed.iter().copied().collect();
    let seen = std::cell::RefCell::new((0, HashSet::new()));
    collector
        .until(NO_PROGRESS, |received| {
            let (counted, got) = &mut *seen.borrow_mut();
            for record in &received[*counted..] {
                let (key, seq, _) = event(record);
                got.insert((key, seq));
            }
            *counted = received.len();
            expected.iter().all(|e| got.contains(e))
        })
        .await;
    collector.drain_for(Duration::from_secs(1)).await;
}

/// Checks what arrived against the plan: every committed event, nothing else
/// (nothing marked dead), each key's first deliveries in commit order. Returns
/// the number of copies (records delivered more than once).
fn check(received: &[Received], plan: &Plan) -> usize {
    let expected: HashSet<(i64, i64)> = plan.committed.iter().copied().collect();
    let mut by_partition: BTreeMap<i32, Vec<&Received>> = BTreeMap::new();
    for record in received {
        let (key, seq, dead) = event(record);
        assert!(
            !dead,
            "an event of an aborted (sub)transaction arrived: key {key}, seq {seq}"
        );
        assert!(
            expected.contains(&(key, seq)),
            "unexpected event {key}/{seq}"
        );
        assert_eq!(record.key, format!("key-{key}"));
        by_partition
            .entry(record.partition)
            .or_default()
            .push(record);
    }
    let mut first: HashSet<(i64, i64)> = HashSet::new();
    let mut last: HashMap<i64, i64> = HashMap::new();
    let mut copies = 0;
    for (_, mut records) in by_partition {
        records.sort_by_key(|r| r.offset);
        for record in records {
            let (key, seq, _) = event(record);
            if !first.insert((key, seq)) {
                copies += 1;
                continue;
            }
            let before = last.entry(key).or_insert(0);
            assert!(
                seq > *before,
                "key {key}: event {seq} arrived after {before}"
            );
            *before = seq;
        }
    }
    let missing = expected.len() - first.len();
    assert_eq!(
        missing,
        0,
        "{missing} of {} events never arrived",
        expected.len()
    );
    copies
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streamed_transaction_is_published_at_its_commit_in_bounded_memory() {
    let _serial = SERIAL.lock().await;
    let world = World::new(&[]).await;
    let relay = world.start().await;
    let mut plan = Plan::default();

    let (streams_before, _, _) = world.slot_stats().await;
    let big = plan.events(2_000 * scale());
    // The server streams it, and the relay holds it open, before the commit.
    let tx = world.open_streamed(&relay, &big, false).await;
    tx.commit().await.expect("commit");
    plan.committed(&big);
    let mut collector = world.collector().await;
    collect_all(&mut collector, &plan).await;
    assert_eq!(
        check(&collector.received, &plan),
        0,
        "copies without a crash"
    );

    let (streams, _, spill_bytes) = world.slot_stats().await;
    assert!(streams > streams_before, "the transaction was not streamed");
    assert_eq!(spill_bytes, 0, "the server spilled a streamed transaction");
    let spilled = relay.metric("outbox_relay_spilled_bytes_total").await;
    assert!(
        spilled.unwrap_or_default() > 0.0,
        "the relay kept ~600 kB in a 64 KiB budget without spilling"
    );
    world.assert_nothing_held(&relay).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_aborted_streamed_transaction_publishes_nothing() {
    let _serial = SERIAL.lock().await;
    let world = World::new(&[]).await;
    let relay = world.start().await;
    let mut plan = Plan::default();

    // Events that never happened take no numbers.
    let doomed = dead_events(2_000);
    let tx = world.open_streamed(&relay, &doomed, true).await;
    tx.rollback().await.expect("rollback");
    // Committed after the abort: once it arrived, the abort was handled.
    commit_small(world.pool(), &mut plan, 3).await;
    let mut collector = world.collector().await;
    collect_all(&mut collector, &plan).await;
    check(&collector.received, &plan);
    world.assert_nothing_held(&relay).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_changes_of_an_aborted_subtransaction_are_left_out() {
    let _serial = SERIAL.lock().await;
    let world = World::new(&[]).await;
    let _relay = world.start().await;
    let mut plan = Plan::default();

    let before = plan.events(1_000);
    let mut tx = world.pool().begin().await.expect("begin");
    insert(&mut tx, &before, false).await;
    world.wait_streamed_beyond(0).await;
    sqlx::query("SAVEPOINT doomed")
        .execute(&mut *tx)
        .await
        .unwrap();
    // Events of the savepoint take no numbers: they never happened.
    let doomed = dead_events(1_000);
    let (_, streamed, _) = world.slot_stats().await;
    insert(&mut tx, &doomed, true).await;
    // Some of them were streamed before the rollback.
    world.wait_streamed_beyond(streamed).await;
    sqlx::query("ROLLBACK TO SAVEPOINT doomed")
        .execute(&mut *tx)
        .await
        .unwrap();
    let after = plan.events(500);
    insert(&mut tx, &after, false).await;
    tx.commit().await.expect("commit");
    plan.committed(&before);
    plan.committed(&after);
    let mut collector = world.collector().await;
    collect_all(&mut collector, &plan).await;
    assert_eq!(check(&collector.received, &plan), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streamed_transaction_among_small_ones_of_other_sessions_keeps_commit_order() {
    let _serial = SERIAL.lock().await;
    let world = World::new(&[]).await;
    let _relay = world.start().await;
    let mut plan = Plan::default();

    // Numbered in commit order: the small transactions committed while the big
    // one is open, the big one, the small ones after it.
    let early = plan.events(40);
    let big = plan.events(1_500);
    let late = plan.events(40);
    let (first_half, second_half) = big.split_at(750);
    let mut tx = world.pool().begin().await.expect("begin");
    insert(&mut tx, first_half, false).await;
    world.wait_streamed_beyond(0).await;
    commit_in_parts(world.pool(), &early).await;
    let (_, streamed, _) = world.slot_stats().await;
    insert(&mut tx, second_half, false).await;
    world.wait_streamed_beyond(streamed).await;
    tx.commit().await.expect("commit");
    commit_in_parts(world.pool(), &late).await;
    for events in [&early, &big, &late] {
        plan.committed(events);
    }
    let mut collector = world.collector().await;
    collect_all(&mut collector, &plan).await;
    assert_eq!(check(&collector.received, &plan), 0);
}

/// Commits `events` in transactions of 8.
async fn commit_in_parts(pool: &PgPool, events: &[(i64, i64)]) {
    for part in events.chunks(8) {
        let mut tx = pool.begin().await.expect("begin");
        insert(&mut tx, part, false).await;
        tx.commit().await.expect("commit");
    }
}

/// A transaction of 30,000 rows is committed, the relay SIGKILLed a third of the
/// way through publishing it and started again: what it sends twice is at most
/// one window, thanks to the resume point it stored.
async fn killed_halfway_resends_at_most_a_window(streaming: bool) {
    const WINDOW: usize = 500;
    let _serial = SERIAL.lock().await;
    let world = World::new(&[
        ("OUTBOX_RELAY_MAX_IN_FLIGHT", WINDOW.to_string()),
        ("OUTBOX_RELAY_STREAMING", streaming.to_string()),
    ])
    .await;
    let mut relay = world.start().await;
    let markers = routed(&relay).await;
    let mut plan = Plan::default();
    let total = 30_000 * scale();
    let big = plan.events(total);
    let mut tx = world.pool().begin().await.expect("begin");
    insert(&mut tx, &big, false).await;
    tx.commit().await.expect("commit");
    plan.committed(&big);

    let deadline = Instant::now() + NO_PROGRESS;
    let routed = loop {
        let routed = routed(&relay).await - markers;
        if routed >= total / 3 {
            break routed;
        }
        assert!(
            Instant::now() < deadline,
            "no progress:\n{}",
            relay.log_text()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    relay.kill();
    assert!(
        routed < total,
        "published whole before the kill: nothing to judge"
    );
    let stored: Option<i64> =
        sqlx::query_scalar("SELECT records FROM outbox_relay_resume WHERE slot_name = $1")
            .bind(world.db.slot())
            .fetch_optional(world.pool())
            .await
            .expect("read the resume point");
    assert!(
        stored.is_some_and(|n| n > 0),
        "no resume point stored after {routed} records: {stored:?}"
    );

    let (_, streamed, _) = world.slot_stats().await;
    assert_eq!(
        streamed > 0,
        streaming,
        "protocol 2 with streaming exactly when asked for"
    );
    let relay = world.start().await;
    let mut collector = world.collector().await;
    collect_all(&mut collector, &plan).await;
    let copies = check(&collector.received, &plan);
    eprintln!("{total} events, killed after {routed}, resume point {stored:?}, {copies} copies");
    assert!(
        copies <= WINDOW,
        "{copies} copies after one kill: more than the window ({WINDOW})"
    );
    assert!(relay.log_text().contains("resuming inside a transaction"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_killed_halfway_through_a_streamed_transaction_resends_at_most_a_window() {
    killed_halfway_resends_at_most_a_window(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_killed_halfway_through_a_protocol_1_transaction_resends_at_most_a_window() {
    killed_halfway_resends_at_most_a_window(false).await;
}

/// The rule of `ack.rs`, against the server: transactions that commit while a
/// streamed one is open are confirmed (the slot's position passes the open
/// transaction's first change); a relay killed then and started again still gets
/// all of the open transaction once it commits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transactions_confirmed_past_an_open_streamed_one_do_not_lose_it() {
    let _serial = SERIAL.lock().await;
    let world = World::new(&[]).await;
    let mut relay = world.start().await;
    let mut plan = Plan::default();

    let early = plan.events(16);
    let big = plan.events(2_000);
    let tx = world.open_streamed(&relay, &big, false).await;
    commit_in_parts(world.pool(), &early).await;
    let after_early = current_lsn(world.pool()).await;
    let deadline = Instant::now() + NO_PROGRESS;
    loop {
        let confirmed = world.db.confirmed_flush().await.unwrap_or_default();
        if confirmed
            .parse::<outbox_relay::Lsn>()
            .is_ok_and(|c| c >= after_early)
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the slot stayed at {confirmed} while a streamed transaction was open, \
             below {after_early}; log:\n{}",
            relay.log_text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    relay.kill();

    let _relay = world.start().await;
    tx.commit().await.expect("commit");
    plan.committed(&early);
    plan.committed(&big);
    let mut collector = world.collector().await;
    collect_all(&mut collector, &plan).await;
    assert_eq!(
        check(&collector.received, &plan),
        0,
        "confirmed transactions came again"
    );
}

async fn current_lsn(pool: &PgPool) -> outbox_relay::Lsn {
    let lsn: String = sqlx::query_scalar("SELECT pg_current_wal_lsn()::text")
        .fetch_one(pool)
        .await
        .expect("the WAL position");
    lsn.parse().expect("an LSN")
}

/// Events the relay routed so far (0 while it does not answer).
async fn routed(relay: &Relay) -> usize {
    relay
        .metric("outbox_relay_events_routed_total")
        .await
        .unwrap_or_default() as usize
}

/// Tests that hold a transaction open run one at a time: a walsender starting
/// while another test's transaction is open waits for it to end (see
/// [`World::start`]), and two such tests could wait for each other.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Waits until the relay's unlabelled metric `name` equals `value`.
async fn wait_metric(relay: &Relay, name: &str, value: f64) {
    let deadline = Instant::now() + NO_PROGRESS;
    loop {
        let got = relay.metric(name).await;
        if got == Some(value) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{name} stayed {got:?}, not {value}; log:\n{}",
            relay.log_text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A relay whose role may not create tables in the outbox table's schema (on
/// PostgreSQL 15 and later, anyone but the database's owner) warns and works
/// without resume points.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_privilege_to_create_the_resume_table_the_relay_works_without() {
    let _serial = SERIAL.lock().await;
    let db = OutboxDb::new().await;
    // The test's role owns everything it could be refused, so the outbox table
    // goes into a schema whose owner gave up creating in it.
    sqlx::raw_sql(
        "CREATE SCHEMA app;
         CREATE TABLE app.outbox (LIKE public.outbox INCLUDING ALL);
         REVOKE CREATE ON SCHEMA app FROM CURRENT_USER;",
    )
    .execute(db.pool())
    .await
    .expect("an outbox table in a schema nobody may create in");
    let brokers = settings().kafka_brokers.clone();
    let settings = RelaySettings::new(&db, &brokers)
        .with("OUTBOX_RELAY_TABLE", "app.outbox")
        .with("OUTBOX_RELAY_SNAPSHOT_MODE", "never");
    let relay = Relay::start(&settings);
    db.wait_for_streaming().await;

    let mut plan = Plan::default();
    let events = plan.events(5);
    let mut tx = db.pool().begin().await.expect("begin");
    sqlx::query("SET LOCAL search_path = app")
        .execute(&mut *tx)
        .await
        .expect("write to app.outbox");
    insert(&mut tx, &events, false).await;
    tx.commit().await.expect("commit");
    plan.committed(&events);
    let mut collector = Collector::new(&brokers, &[settings.topic("order")], 3).await;
    collect_all(&mut collector, &plan).await;
    assert_eq!(check(&collector.received, &plan), 0);
    let log = relay.log_text();
    assert!(
        log.contains("cannot create the resume point table"),
        "no warning; log:\n{log}"
    );
    let table: Option<String> =
        sqlx::query_scalar("SELECT to_regclass('app.outbox_relay_resume')::text")
            .fetch_one(db.pool())
            .await
            .expect("look for the table");
    assert_eq!(table, None);
}
