//! The stream loop over a scripted replication stream and the memory sink, under
//! random acknowledgements, refusals, pushback, sink failures, reconnects and
//! crashes. Properties:
//!
//! - a confirmed position never passes a record that was not acknowledged (itself
//!   or as its dead letter) — checked at every status update;
//! - in the end every row is acknowledged, or dead-lettered with its reason;
//! - per key, first deliveries come in commit order;
//! - each restart re-sends at most one window (`max_in_flight`), or one
//!   transaction when a transaction is larger than the window and resume points
//!   are off.
//!
//! The world may also stream transactions while in progress (protocol 2):
//! [`streaming`] has those properties, and the examples of Stream Abort, of
//! aborted subtransactions and of keepalive replies.

use std::cell::RefCell;
use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::rc::Rc;
use std::time::Duration;

use proptest::prelude::*;

use super::*;
use crate::deadletter::{DEFAULT_DEAD_LETTER_TOPIC, HEADER_REASON_CODE};
use crate::health::HealthThresholds;
use crate::pgoutput::encode::{encode, encode_in_stream};
use crate::pgoutput::{
    Begin, Column, Commit, Insert, RelationColumn, ReplicaIdentity, StreamAbort, StreamCommit,
    StreamStart,
};
use crate::resume::{ResumeLink, Stored as ResumeStored, WriterEnd};
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
    /// How the server streams it while in progress, if it does.
    streamed: Option<Plan>,
    /// Rows of a subtransaction that aborted: streamed, never to be published.
    dead: Vec<Row>,
}

/// How a transaction is streamed (protocol 2): in `segments` blocks, the first
/// sent before the transaction `back` places earlier in commit order.
#[derive(Debug, Clone, Copy)]
struct Plan {
    xid: u32,
    segments: usize,
    back: usize,
    /// Whether its first block announces the outbox relation itself (the server
    /// does; the relay must also do with the session's announcement).
    announces: bool,
}

/// A streamed transaction that aborts, sent before the transaction at `slot` in
/// commit order.
#[derive(Debug, Clone)]
struct Aborted {
    xid: u32,
    slot: usize,
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
    aborted: Vec<Aborted>,
    confirmed: Lsn,
    handle: MemoryHandle,
    violations: Vec<String>,
    /// The resume point stored, when resume points are on.
    resume: Option<Option<Position>>,
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

/// The resume point store of the world: stores what the session asks for, late
/// (so that a session which did not wait for it would get ahead of it).
fn store_resume(world: &RefCell<World>, writer: &mut WriterEnd, rng: &mut Rng) {
    if !writer.want.has_changed().unwrap_or(false) || rng.below(20) != 0 {
        return;
    }
    let Some(point) = *writer.want.borrow_and_update() else {
        return;
    };
    world.borrow_mut().resume = Some(Some(point));
    writer.stored.send_replace(ResumeStored {
        working: true,
        point: Some(point),
    });
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
    mut writer: Option<WriterEnd>,
) -> Stop {
    loop {
        tokio::time::sleep(Duration::from_millis(rng.below(3))).await;
        if let Some(writer) = &mut writer {
            store_resume(world, writer, rng);
        }
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

/// A directory of its own for one test's spill files, removed at the end.
struct SpillDir(std::path::PathBuf);

impl SpillDir {
    fn new() -> SpillDir {
        SpillDir(std::env::temp_dir().join(testkit::unique_name("spill")))
    }

    /// The spill files in it.
    fn files(&self) -> usize {
        std::fs::read_dir(&self.0).map_or(0, |d| d.count())
    }
}

impl Drop for SpillDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn config() -> RelayConfig {
    let mut config = RelayConfig::new("postgres://h/db", "k:1");
    config.kafka.max_in_flight = MAX_IN_FLIGHT;
    // Small enough that streamed transactions spill.
    config.postgres.stream_memory_bytes = 600;
    config
}

/// Runs sessions until every transaction is confirmed; returns the restarts.
async fn run_world(world: Rc<RefCell<World>>, seed: u64, mut faults: u32, spill: &SpillDir) -> u32 {
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
        let (confirmed, sink, messages, resume) = {
            let w = world.borrow();
            let messages = script(&w, w.confirmed, &mut rng);
            (w.confirmed, w.handle.new_sink(), messages, w.resume)
        };
        let break_after = (faults > 0 && rng.below(5) == 0)
            .then(|| rng.below(messages.len() as u64 + 1) as usize);
        let wal = ScriptedWal {
            world: world.clone(),
            messages,
            break_after,
        };
        let (link, writer) = match resume {
            Some(start) => {
                let (link, writer) = ResumeLink::new(start);
                (Some(link), Some(writer))
            }
            None => (None, None),
        };
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let session = Session::new(&config, wal, sink, confirmed, observe.clone())
            .spill_to(spill.0.clone())
            .resume_from(resume.flatten(), link)
            .run(async {
                let _ = stopped.await;
            });
        tokio::pin!(session);
        let ended = tokio::select! {
            result = &mut session => Err(result),
            stop = drive(&world, &mut rng, &mut faults, &mut poison, writer) => Ok(stop),
        };
        match ended {
            Ok(Stop::Done) => {
                let _ = stop.send(());
                let drained = session.await.expect("a clean stop");
                assert_eq!(drained.abandoned, 0);
                let metrics = observe.0.render(&observe.1);
                let open = format!("\n{} 0\n", crate::metrics::STREAMED_OPEN);
                assert!(metrics.contains(&open), "streamed transactions left open");
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

fn flaw() -> impl Strategy<Value = Flaw> {
    prop_oneof![
        18 => Just(Flaw::None),
        1 => Just(Flaw::NullKey),
        1 => Just(Flaw::BadTopic),
    ]
}

fn rows() -> impl Strategy<Value = Vec<Vec<(usize, Flaw)>>> {
    prop::collection::vec(prop::collection::vec((0..KEYS, flaw()), 0..6), 1..25)
}

/// The shape of a world: its transactions in commit order (rows, how they are
/// streamed, rows of an aborted subtransaction) and the aborted streamed
/// transactions (before which transaction, how many rows).
/// One transaction of a [`Spec`]: its rows, how it is streamed, and the rows of
/// its aborted subtransaction.
type TxnSpec = (Vec<(usize, Flaw)>, Option<Plan>, usize);

#[derive(Debug, Clone, Default)]
struct Spec {
    txns: Vec<TxnSpec>,
    aborted: Vec<(usize, usize)>,
}

impl Spec {
    /// Transactions sent whole (protocol 1).
    fn plain(txns: Vec<Vec<(usize, Flaw)>>) -> Spec {
        Spec {
            txns: txns.into_iter().map(|rows| (rows, None, 0)).collect(),
            aborted: Vec::new(),
        }
    }
}

fn build(spec: Spec) -> (Vec<Txn>, Vec<Aborted>) {
    let mut seqs = [0u32; KEYS];
    let mut lsn = 0x1000u64;
    let mut n = 0;
    let mut row = |key: usize, flaw: Flaw, live: bool| {
        n += 1;
        let seq = if live {
            seqs[key] += 1;
            seqs[key]
        } else {
            0
        };
        Row {
            id: format!("{}-{n}", if live { "row" } else { "dead" }),
            key,
            seq,
            flaw,
        }
    };
    let txns = spec
        .txns
        .into_iter()
        .enumerate()
        .map(|(i, (rows, streamed, dead))| {
            lsn += 0x100;
            let rows = rows
                .into_iter()
                .map(|(key, flaw)| row(key, flaw, true))
                .collect();
            let dead = match streamed {
                Some(_) => (0..dead)
                    .map(|d| row(d % KEYS, Flaw::None, false))
                    .collect(),
                None => Vec::new(),
            };
            Txn {
                commit_lsn: Lsn::new(lsn),
                end_lsn: Lsn::new(lsn + 0x28),
                rows,
                streamed: streamed.map(|plan| Plan {
                    xid: 1000 + 10 * i as u32,
                    ..plan
                }),
                dead,
            }
        })
        .collect::<Vec<_>>();
    let slots = txns.len();
    let aborted = spec
        .aborted
        .into_iter()
        .enumerate()
        .map(|(i, (slot, rows))| Aborted {
            xid: 100_000 + i as u32,
            slot: slot % (slots + 1),
            rows: (0..rows)
                .map(|r| row(r % KEYS, Flaw::None, false))
                .collect(),
        })
        .collect();
    (txns, aborted)
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
    let dead: std::collections::HashSet<&str> = world
        .txns
        .iter()
        .flat_map(|t| &t.dead)
        .chain(world.aborted.iter().flat_map(|a| &a.rows))
        .map(|r| r.id.as_str())
        .collect();
    if let Some(entry) = stored.iter().find(|e| dead.contains(e.record.id.as_str())) {
        panic!("a row of an aborted (sub)transaction was published: {entry:?}");
    }
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
    // With resume points a restart skips what was acknowledged of a transaction
    // larger than the window.
    let per_restart = match world.resume {
        Some(_) => MAX_IN_FLIGHT,
        None => MAX_IN_FLIGHT.max(max_rows),
    };
    let bound = restarts as usize * per_restart;
    assert!(
        copies <= bound,
        "{copies} copies after {restarts} restarts (bound {bound})"
    );
}

fn run_case(spec: Spec, seed: u64, faults: u32, resume: bool) -> (World, u32) {
    let (txns, aborted) = build(spec);
    let world = Rc::new(RefCell::new(World {
        txns,
        aborted,
        confirmed: Lsn::new(0x1000),
        handle: MemoryHandle::new(5, 4_000),
        violations: Vec::new(),
        resume: resume.then_some(None),
    }));
    let spill = SpillDir::new();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .expect("a runtime");
    let restarts = runtime.block_on(run_world(world.clone(), seed, faults, &spill));
    drop(runtime);
    assert_eq!(spill.files(), 0, "spill files left behind");
    let world = Rc::try_unwrap(world).expect("one owner").into_inner();
    (world, restarts)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn nothing_is_confirmed_early_lost_or_reordered(spec in rows(), seed in any::<u64>(), faults in 0u32..600) {
        let (world, restarts) = run_case(Spec::plain(spec), seed, faults, false);
        check(&world, restarts);
    }
}

#[test]
fn a_calm_run_confirms_everything_without_restarts() {
    let spec = vec![vec![(0, Flaw::None), (1, Flaw::None)]; 30];
    let (world, restarts) = run_case(Spec::plain(spec), 7, 0, false);
    assert_eq!(restarts, 0);
    check(&world, restarts);
    assert_eq!(world.handle.stored().len(), 60);
}

mod script;
mod streaming;

use script::*;
