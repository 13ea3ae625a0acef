//! The stream loop over a scripted replication stream and the memory sink, under
//! random acknowledgements, refusals, pushback, sink failures, reconnects and
//! crashes. Properties:
//!
//! - a confirmed position never passes a record that was not acknowledged (itself
//!   or as its dead letter) — checked at every status update;
//! - in the end every row is acknowledged, or dead-lettered with its reason;
//! - per key, first deliveries come in commit order;
//! - each restart re-sends at most one window (`max_in_flight`), or one
//!   transaction when a transaction is larger than the window.

use std::cell::RefCell;
use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::rc::Rc;
use std::time::Duration;

use proptest::prelude::*;

use super::*;
use crate::deadletter::{DEFAULT_DEAD_LETTER_TOPIC, HEADER_REASON_CODE};
use crate::health::HealthThresholds;
use crate::pgoutput::encode::encode;
use crate::pgoutput::{Begin, Column, Commit, Insert, RelationColumn, ReplicaIdentity};
use crate::sink::memory::{Entry, MemoryHandle, Stored};
use crate::sink::{RefusalKind, SinkErrorKind};

const OUTBOX_OID: u32 = 16_384;
const KEYS: usize = 4;
const MAX_IN_FLIGHT: usize = 8;

/// How a generated row goes wrong, if it does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Flaw {
    None,
    /// NULL aggregate id: a bad row.
    NullKey,
    /// An aggregate type with a space: a topic the sink refuses.
    BadTopic,
}

#[derive(Debug, Clone)]
struct Row {
    id: String,
    key: usize,
    seq: u32,
    flaw: Flaw,
}

#[derive(Debug, Clone)]
struct Txn {
    commit_lsn: Lsn,
    end_lsn: Lsn,
    rows: Vec<Row>,
}

/// A small deterministic generator for the driver's choices.
#[derive(Debug)]
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n.max(1)
    }
}

/// The server's side: the transactions, and what it holds as confirmed.
#[derive(Debug)]
struct World {
    txns: Vec<Txn>,
    confirmed: Lsn,
    handle: MemoryHandle,
    violations: Vec<String>,
}

impl World {
    /// Whether the row was acknowledged, itself or as its dead letter.
    fn acked(&self, row: &Row) -> bool {
        self.handle.is_acked(&row.id, &topic(row)) || self.handle.is_acked(&row.id, DLQ)
    }

    /// The server receives a status update.
    fn confirm(&mut self, flush: Lsn) {
        for txn in self.txns.iter().filter(|t| t.end_lsn <= flush) {
            for row in &txn.rows {
                if !self.acked(row) {
                    let violation = format!(
                        "{flush} confirmed before row {} of the transaction ending at {} was acknowledged",
                        row.id, txn.end_lsn
                    );
                    self.violations.push(violation);
                }
            }
        }
        self.confirmed = self.confirmed.max(flush);
    }

    fn last_end(&self) -> Lsn {
        self.txns.last().map_or(Lsn::ZERO, |t| t.end_lsn)
    }
}

const DLQ: &str = DEFAULT_DEAD_LETTER_TOPIC;

fn aggregate_type(row: &Row) -> String {
    match row.flaw {
        Flaw::BadTopic => "bad type".to_owned(),
        _ => format!("agg{}", row.key % 2),
    }
}

fn topic(row: &Row) -> String {
    format!("outbox.event.{}", aggregate_type(row))
}

fn text(value: &str) -> Column {
    Column::Text(Bytes::copy_from_slice(value.as_bytes()))
}

fn xlog(wal_start: Lsn, wal_end: Lsn, message: &LogicalMessage) -> ReplicationMessage {
    ReplicationMessage::XLogData {
        wal_start,
        wal_end,
        server_time_micros: 0,
        data: encode(message),
    }
}

fn relation() -> LogicalMessage {
    let column = |name: &str, type_oid: u32| RelationColumn {
        flags: u8::from(name == "id"),
        name: name.to_owned(),
        type_oid,
        type_modifier: -1,
    };
    LogicalMessage::Relation(pgoutput::Relation {
        id: OUTBOX_OID,
        namespace: "public".to_owned(),
        name: "outbox".to_owned(),
        replica_identity: ReplicaIdentity::Default,
        columns: vec![
            column("id", 2950),
            column("aggregatetype", 25),
            column("aggregateid", 25),
            column("type", 25),
            column("payload", 3802),
            column("headers", 3802),
        ],
    })
}

/// The messages the server sends a session starting after `confirmed`.
fn script(txns: &[Txn], confirmed: Lsn, rng: &mut Rng) -> VecDeque<ReplicationMessage> {
    let mut messages = VecDeque::new();
    messages.push_back(xlog(Lsn::ZERO, confirmed, &relation()));
    for txn in txns.iter().filter(|t| t.end_lsn > confirmed) {
        messages.push_back(xlog(
            txn.commit_lsn,
            txn.end_lsn,
            &LogicalMessage::Begin(Begin {
                final_lsn: txn.commit_lsn,
                commit_timestamp: 0,
                xid: 1,
            }),
        ));
        for row in &txn.rows {
            let key = match row.flaw {
                Flaw::NullKey => Column::Null,
                _ => text(&format!("key-{}", row.key)),
            };
            let insert = LogicalMessage::Insert(Insert {
                relation_id: OUTBOX_OID,
                tuple: vec![
                    text(&row.id),
                    text(&aggregate_type(row)),
                    key,
                    text("Changed"),
                    text(&format!("{{\"seq\": {}}}", row.seq)),
                    Column::Null,
                ],
            });
            messages.push_back(xlog(txn.commit_lsn, txn.end_lsn, &insert));
        }
        messages.push_back(xlog(
            txn.end_lsn,
            txn.end_lsn,
            &LogicalMessage::Commit(Commit {
                flags: 0,
                commit_lsn: txn.commit_lsn,
                end_lsn: txn.end_lsn,
                commit_timestamp: 0,
            }),
        ));
        if rng.below(4) == 0 {
            messages.push_back(ReplicationMessage::Keepalive {
                wal_end: txn.end_lsn,
                server_time_micros: 0,
                reply_requested: rng.below(2) == 0,
            });
        }
    }
    messages
}

/// The scripted replication stream of one session.
#[derive(Debug)]
struct ScriptedWal {
    world: Rc<RefCell<World>>,
    messages: VecDeque<ReplicationMessage>,
    /// The connection breaks before this many messages were read.
    break_after: Option<usize>,
}

impl WalStream for ScriptedWal {
    // Taken when polled, not when called: a read dropped by `select!` before it
    // was polled loses nothing, as with the real stream.
    async fn next(&mut self) -> Result<Option<ReplicationMessage>, ReplicationError> {
        let next = match &mut self.break_after {
            Some(0) => Some(Err(ReplicationError::ConnectionClosed {
                peer: "scripted".to_owned(),
                during: "streaming",
            })),
            Some(left) => {
                *left -= 1;
                self.messages.pop_front().map(|m| Ok(Some(m)))
            }
            None => self.messages.pop_front().map(|m| Ok(Some(m))),
        };
        match next {
            Some(result) => result,
            // Nothing more to send: the server waits.
            None => std::future::pending().await,
        }
    }

    fn send_status(
        &mut self,
        status: StandbyStatus,
    ) -> impl Future<Output = Result<(), ReplicationError>> {
        self.world.borrow_mut().confirm(status.flush);
        std::future::ready(Ok(()))
    }

    async fn finish(self) -> Result<(), ReplicationError> {
        Ok(())
    }
}

/// How a driver round ended.
#[derive(Debug)]
enum Stop {
    Crash,
    Done,
}

/// Settles records at random while `faults` lasts, then acknowledges everything
/// until the server holds the last transaction confirmed. A record refused once
/// is refused every time it comes again (a destination's refusal is a property of
/// the record); dead letters are never refused (a destination that refuses its
/// dead-letter topic stops the relay, which the delivery tests cover).
async fn drive(
    world: &RefCell<World>,
    rng: &mut Rng,
    faults: &mut u32,
    poison: &mut HashMap<String, RefusalKind>,
) -> Stop {
    loop {
        tokio::time::sleep(Duration::from_millis(rng.below(3))).await;
        let handle = world.borrow().handle.clone();
        let pending = handle.pending();
        for entry in &pending {
            if let Some(&kind) = poison.get(&entry.record.id) {
                if entry.record.topic != DLQ {
                    handle.refuse(entry.ticket, kind);
                }
            }
        }
        let pending: Vec<Entry> = handle.pending();
        let records: Vec<&Entry> = pending.iter().filter(|e| e.record.topic != DLQ).collect();
        if *faults > 0 {
            *faults -= 1;
            match rng.below(1000) {
                0..=4 => return Stop::Crash,
                5..=8 => handle.fail(SinkErrorKind::Unavailable),
                9..=40 if !records.is_empty() => {
                    let entry = records[rng.below(records.len() as u64) as usize];
                    let kind = if rng.below(2) == 0 {
                        RefusalKind::TooLarge
                    } else {
                        RefusalKind::Invalid
                    };
                    poison.insert(entry.record.id.clone(), kind);
                    handle.refuse(entry.ticket, kind);
                }
                41..=700 if !pending.is_empty() => {
                    handle.ack(pending[rng.below(pending.len() as u64) as usize].ticket);
                }
                _ => {}
            }
        } else {
            for entry in pending {
                handle.ack(entry.ticket);
            }
            let world = world.borrow();
            if world.confirmed >= world.last_end() && handle.pending().is_empty() {
                return Stop::Done;
            }
        }
    }
}

fn config() -> RelayConfig {
    let mut config = RelayConfig::new("postgres://h/db", "k:1");
    config.kafka.max_in_flight = MAX_IN_FLIGHT;
    config
}

/// Runs sessions until every transaction is confirmed; returns the restarts.
async fn run_world(world: Rc<RefCell<World>>, seed: u64, mut faults: u32) -> u32 {
    let config = config();
    let mut rng = Rng(seed | 1);
    let observe = (
        Arc::new(Metrics::new()),
        Arc::new(Health::new(HealthThresholds::default())),
    );
    let mut restarts = 0;
    let mut poison = HashMap::new();
    loop {
        assert!(restarts < 500, "no end in sight");
        let (confirmed, sink, messages) = {
            let w = world.borrow();
            let messages = script(&w.txns, w.confirmed, &mut rng);
            (w.confirmed, w.handle.new_sink(), messages)
        };
        let break_after = (faults > 0 && rng.below(5) == 0)
            .then(|| rng.below(messages.len() as u64 + 1) as usize);
        let wal = ScriptedWal {
            world: world.clone(),
            messages,
            break_after,
        };
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let session = Session::new(&config, wal, sink, confirmed, observe.clone()).run(async {
            let _ = stopped.await;
        });
        tokio::pin!(session);
        let ended = tokio::select! {
            result = &mut session => Err(result),
            stop = drive(&world, &mut rng, &mut faults, &mut poison) => Ok(stop),
        };
        match ended {
            Ok(Stop::Done) => {
                let _ = stop.send(());
                let drained = session.await.expect("a clean stop");
                assert_eq!(drained.abandoned, 0);
                return restarts;
            }
            Ok(Stop::Crash) => {}
            Err(Ok(drained)) => panic!("the session ended unasked: {drained:?}"),
            Err(Err(error)) => assert!(error.is_transient(), "a definite error: {error}"),
        }
        restarts += 1;
        let handle = world.borrow().handle.clone();
        // A record the destination refuses never lands.
        handle.crash(|record| {
            (record.topic == DLQ || !poison.contains_key(&record.id)) && rng.below(2) == 0
        });
    }
}

fn rows() -> impl Strategy<Value = Vec<Vec<(usize, Flaw)>>> {
    let flaw = prop_oneof![
        18 => Just(Flaw::None),
        1 => Just(Flaw::NullKey),
        1 => Just(Flaw::BadTopic),
    ];
    prop::collection::vec(prop::collection::vec((0..KEYS, flaw), 0..6), 1..25)
}

fn build(spec: Vec<Vec<(usize, Flaw)>>) -> Vec<Txn> {
    let mut seqs = [0u32; KEYS];
    let mut lsn = 0x1000u64;
    let mut n = 0;
    spec.into_iter()
        .map(|rows| {
            lsn += 0x100;
            let commit_lsn = Lsn::new(lsn);
            let end_lsn = Lsn::new(lsn + 0x28);
            let rows = rows
                .into_iter()
                .map(|(key, flaw)| {
                    seqs[key] += 1;
                    n += 1;
                    Row {
                        id: format!("row-{n}"),
                        key,
                        seq: seqs[key],
                        flaw,
                    }
                })
                .collect();
            Txn {
                commit_lsn,
                end_lsn,
                rows,
            }
        })
        .collect()
}

fn check(world: &World, restarts: u32) {
    assert!(
        world.violations.is_empty(),
        "{} violations, first {:?}; stored {:?}",
        world.violations.len(),
        world.violations.first(),
        world.handle.stored().iter().take(3).collect::<Vec<_>>()
    );
    assert_eq!(world.confirmed, world.last_end());
    let stored = world.handle.stored();
    let rows: Vec<&Row> = world.txns.iter().flat_map(|t| &t.rows).collect();
    let mut max_rows = 0;
    for txn in &world.txns {
        max_rows = max_rows.max(txn.rows.len());
    }
    for row in &rows {
        assert!(world.acked(row), "row {} never acknowledged", row.id);
        let letters: Vec<_> = stored
            .iter()
            .filter(|e| e.record.id == row.id && e.record.topic == DLQ)
            .collect();
        let expected = match row.flaw {
            Flaw::None => None,
            Flaw::NullKey => Some("bad_row"),
            Flaw::BadTopic => Some("bad_route"),
        };
        if let Some(code) = expected {
            let codes: Vec<_> = letters
                .iter()
                .filter_map(|e| {
                    e.record
                        .headers
                        .iter()
                        .find(|(k, _)| k == HEADER_REASON_CODE)
                        .map(|(_, v)| v.clone())
                })
                .collect();
            assert!(
                codes.iter().any(|c| c.as_ref() == code.as_bytes()),
                "row {} should be dead-lettered as {code}: {codes:?}",
                row.id
            );
        }
    }
    // Order per key: first deliveries in commit order.
    let seq_of: HashMap<&str, (usize, u32)> = rows
        .iter()
        .map(|r| (r.id.as_str(), (r.key, r.seq)))
        .collect();
    let mut seen = std::collections::HashSet::new();
    let mut last = [0u32; KEYS];
    for entry in stored.iter().filter(|e| e.record.topic != DLQ) {
        assert!(matches!(entry.state, Stored::Acked | Stored::Landed));
        if !seen.insert(entry.record.id.clone()) {
            continue;
        }
        let (key, seq) = seq_of[entry.record.id.as_str()];
        assert!(
            seq > last[key],
            "key {key}: event {seq} stored after {}; the key's log: {:?}",
            last[key],
            stored
                .iter()
                .filter(|e| e.record.key == format!("key-{key}").as_bytes() && e.record.topic != DLQ)
                .map(|e| (seq_of[e.record.id.as_str()].1, e.state, e.generation))
                .collect::<Vec<_>>()
        );
        last[key] = seq;
    }
    // Copies: at most one window (or one transaction, if larger) per restart.
    let distinct = |dead: bool| {
        stored
            .iter()
            .filter(|e| (e.record.topic == DLQ) == dead)
            .map(|e| e.record.id.as_str())
            .collect::<std::collections::HashSet<_>>()
            .len()
    };
    let copies = stored.len() - distinct(true) - distinct(false);
    let bound = restarts as usize * MAX_IN_FLIGHT.max(max_rows);
    assert!(
        copies <= bound,
        "{copies} copies after {restarts} restarts (bound {bound})"
    );
}

fn run_case(spec: Vec<Vec<(usize, Flaw)>>, seed: u64, faults: u32) -> (World, u32) {
    let world = Rc::new(RefCell::new(World {
        txns: build(spec),
        confirmed: Lsn::new(0x1000),
        handle: MemoryHandle::new(5, 4_000),
        violations: Vec::new(),
    }));
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .expect("a runtime");
    let restarts = runtime.block_on(run_world(world.clone(), seed, faults));
    drop(runtime);
    let world = Rc::try_unwrap(world).expect("one owner").into_inner();
    (world, restarts)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn nothing_is_confirmed_early_lost_or_reordered(spec in rows(), seed in any::<u64>(), faults in 0u32..600) {
        let (world, restarts) = run_case(spec, seed, faults);
        check(&world, restarts);
    }
}

#[test]
fn a_calm_run_confirms_everything_without_restarts() {
    let spec = vec![vec![(0, Flaw::None), (1, Flaw::None)]; 30];
    let (world, restarts) = run_case(spec, 7, 0);
    assert_eq!(restarts, 0);
    check(&world, restarts);
    assert_eq!(world.handle.stored().len(), 60);
}
