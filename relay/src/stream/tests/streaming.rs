//! Protocol 2: transactions streamed while in progress, interleaved with others,
//! committed, aborted, with aborted subtransactions, spilled past a tiny memory
//! budget; resume points; keepalive replies for `/health`.

use tokio::sync::mpsc;

use super::*;
use crate::health::{ManualClock, Status};

fn plan() -> impl Strategy<Value = Plan> {
    (1usize..4, 0usize..4, any::<bool>()).prop_map(|(segments, back, announces)| Plan {
        xid: 0,
        segments,
        back,
        announces,
    })
}

/// Transactions of up to 20 rows (the window is 8), half of them streamed, some
/// with an aborted subtransaction; a few streamed transactions that abort.
fn streamed_spec() -> impl Strategy<Value = Spec> {
    let txn = (
        prop::collection::vec((0..KEYS, flaw()), 0..20),
        prop::option::weighted(0.5, plan()),
        0usize..4,
    );
    (
        prop::collection::vec(txn, 1..15),
        prop::collection::vec((0usize..16, 1usize..5), 0..3),
    )
        .prop_map(|(txns, aborted)| Spec { txns, aborted })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// The properties of the module, with streamed transactions, and with resume
    /// points on or off: nothing confirmed early, lost or reordered; nothing of an
    /// aborted (sub)transaction published; no spill file left; each restart
    /// re-sends at most one window with resume points, one transaction without.
    #[test]
    fn streamed_transactions_are_published_at_commit_only(
        spec in streamed_spec(),
        seed in any::<u64>(),
        faults in 0u32..600,
        resume in any::<bool>(),
    ) {
        let (world, restarts) = run_case(spec, seed, faults, resume);
        check(&world, restarts);
    }
}

fn keyed(keys: &[usize]) -> Vec<(usize, Flaw)> {
    keys.iter().map(|&k| (k, Flaw::None)).collect()
}

fn streamed(segments: usize, back: usize) -> Option<Plan> {
    Some(Plan {
        xid: 0,
        segments,
        back,
        announces: true,
    })
}

#[test]
fn a_streamed_transaction_interleaved_with_others_is_published_in_commit_order() {
    let spec = Spec {
        txns: vec![
            (keyed(&[0, 1]), None, 0),
            (keyed(&[0]), None, 0),
            // Streamed in three blocks, from before the first transaction on.
            (
                keyed(&[0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3]),
                streamed(3, 2),
                0,
            ),
            (keyed(&[0, 3]), None, 0),
        ],
        aborted: Vec::new(),
    };
    let (world, restarts) = run_case(spec, 11, 0, true);
    assert_eq!(restarts, 0);
    check(&world, restarts);
    assert_eq!(world.handle.stored().len(), 17);
}

#[test]
fn an_aborted_streamed_transaction_and_an_aborted_subtransaction_publish_nothing() {
    let spec = Spec {
        txns: vec![
            (keyed(&[0, 1]), None, 0),
            // Three rows of a subtransaction rolled back halfway.
            (keyed(&[2, 3, 2, 3]), streamed(2, 1), 3),
            (keyed(&[1]), None, 0),
        ],
        // Streamed and aborted before the second and the last transaction.
        aborted: vec![(1, 4), (3, 2)],
    };
    let (world, restarts) = run_case(spec, 5, 0, false);
    assert_eq!(restarts, 0);
    check(&world, restarts);
    assert_eq!(world.handle.stored().len(), 7);
}

#[test]
fn a_crash_halfway_through_a_large_streamed_transaction_resends_at_most_a_window() {
    // 60 rows, the window is 8: without resume points each restart would send
    // the transaction again from its start.
    let rows: Vec<usize> = (0..60).map(|n| n % KEYS).collect();
    let mut restarted = 0;
    for seed in 1..=8 {
        let spec = Spec {
            txns: vec![(keyed(&rows), streamed(3, 0), 2), (keyed(&[0]), None, 0)],
            aborted: Vec::new(),
        };
        let (world, restarts) = run_case(spec, seed, 400, true);
        check(&world, restarts);
        restarted += restarts;
    }
    assert!(restarted > 0, "no run crashed: the test tested nothing");
}

/// A replication stream fed by the test through a channel, recording the
/// positions confirmed; with `reply`, a status update asking for a reply gets a
/// keepalive, as from a server busy decoding.
#[derive(Debug)]
struct Fed {
    messages: mpsc::UnboundedReceiver<ReplicationMessage>,
    replies: Option<mpsc::UnboundedSender<ReplicationMessage>>,
    flushes: Rc<RefCell<Vec<Lsn>>>,
}

impl WalStream for Fed {
    async fn next(&mut self) -> Result<Option<ReplicationMessage>, ReplicationError> {
        match self.messages.recv().await {
            Some(message) => Ok(Some(message)),
            None => std::future::pending().await,
        }
    }

    async fn send_status(&mut self, status: StandbyStatus) -> Result<(), ReplicationError> {
        self.flushes.borrow_mut().push(status.flush);
        if let (true, Some(replies)) = (status.reply_requested, &self.replies) {
            let _ = replies.send(ReplicationMessage::Keepalive {
                wal_end: status.flush,
                server_time_micros: 0,
                reply_requested: false,
            });
        }
        Ok(())
    }

    async fn finish(self) -> Result<(), ReplicationError> {
        Ok(())
    }
}

fn paused_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .expect("a runtime")
}

fn row(id: &str, key: usize, seq: u32) -> Row {
    Row {
        id: id.to_owned(),
        key,
        seq,
        flaw: Flaw::None,
    }
}

#[test]
fn an_open_streamed_transaction_holds_back_keepalive_positions_but_not_later_commits() {
    let spill = SpillDir::new();
    let config = config();
    let handle = MemoryHandle::new(100, 4_000);
    let (feed, messages) = mpsc::unbounded_channel();
    let flushes = Rc::new(RefCell::new(Vec::new()));
    let wal = Fed {
        messages,
        replies: None,
        flushes: flushes.clone(),
    };
    let observe = (
        Arc::new(Metrics::new()),
        Arc::new(Health::new(HealthThresholds::default())),
    );
    let start = Lsn::new(0x1000);
    let runtime = paused_runtime();
    let _entered = runtime.enter();
    let session = Session::new(&config, wal, handle.new_sink(), start, observe)
        .spill_to(spill.0.clone())
        .run(std::future::pending());
    let at = Lsn::new(0x1500);
    let send = |m: ReplicationMessage| feed.send(m).expect("the session reads");
    let steps = async {
        // Settles everything, then reports the position last confirmed.
        let settle = || async {
            for _ in 0..3 {
                tokio::time::sleep(Duration::from_millis(300)).await;
                for entry in handle.pending() {
                    handle.ack(entry.ticket);
                }
            }
            *flushes.borrow().last().expect("a status update")
        };
        let (a, b) = (row("a", 0, 2), row("b", 0, 1));
        send(xlog(Lsn::ZERO, at, &relation_message()));
        for message in block(7, true, true, &[(7, &a)], at) {
            send(message);
        }
        send(ReplicationMessage::Keepalive {
            wal_end: Lsn::new(0x5000),
            server_time_micros: 0,
            reply_requested: true,
        });
        assert_eq!(
            settle().await,
            start,
            "a keepalive confirmed past an open transaction"
        );

        // A transaction committing while the streamed one is open is confirmed.
        let (commit, end) = (Lsn::new(0x2000), Lsn::new(0x2028));
        let begin = Begin {
            final_lsn: commit,
            commit_timestamp: 0,
            xid: 9,
        };
        send(xlog(commit, end, &LogicalMessage::Begin(begin)));
        send(xlog(commit, end, &insert(&b)));
        let done = Commit {
            flags: 0,
            commit_lsn: commit,
            end_lsn: end,
            commit_timestamp: 0,
        };
        send(xlog(end, end, &LogicalMessage::Commit(done)));
        assert_eq!(settle().await, end);
        assert!(
            handle.stored().iter().all(|e| e.record.id == "b"),
            "a published before its commit"
        );

        let stream_commit = StreamCommit {
            xid: 7,
            flags: 0,
            commit_lsn: Lsn::new(0x3000),
            end_lsn: Lsn::new(0x3028),
            commit_timestamp: 0,
        };
        send(xlog(at, at, &LogicalMessage::StreamCommit(stream_commit)));
        assert_eq!(settle().await, Lsn::new(0x3028));
        let ids: Vec<String> = handle
            .stored()
            .iter()
            .map(|e| e.record.id.clone())
            .collect();
        assert_eq!(ids, ["b", "a"]);

        // Nothing open: a keepalive's position is taken again.
        send(ReplicationMessage::Keepalive {
            wal_end: Lsn::new(0x5000),
            server_time_micros: 0,
            reply_requested: true,
        });
        assert_eq!(settle().await, Lsn::new(0x5000));
    };
    runtime.block_on(async {
        tokio::select! {
            result = session => panic!("the session ended: {result:?}"),
            () = steps => {}
        }
    });
}

/// A server that sends nothing but answers the status updates that ask for a
/// reply (busy decoding a large transaction) keeps `/health` streaming; one that
/// does not answer is stalled after the threshold.
fn busy_server(replies: bool) -> Vec<Status> {
    let mut config = config();
    config.postgres.status_interval = Duration::from_secs(10);
    let clock = ManualClock::new();
    let stall = Duration::from_secs(30);
    let health = Arc::new(Health::with_clock(
        HealthThresholds {
            stream_stall: stall,
            broker_stall: stall,
        },
        Arc::new(clock.clone()),
    ));
    let (feed, messages) = mpsc::unbounded_channel();
    let wal = Fed {
        messages,
        replies: replies.then_some(feed),
        flushes: Rc::new(RefCell::new(Vec::new())),
    };
    let handle = MemoryHandle::new(10, 4_000);
    let observe = (Arc::new(Metrics::new()), health.clone());
    health.streaming();
    let runtime = paused_runtime();
    let _entered = runtime.enter();
    let session = Session::new(&config, wal, handle.new_sink(), Lsn::new(0x1000), observe)
        .run(std::future::pending());
    let watch = async {
        let mut seen = Vec::new();
        for _ in 0..24 {
            tokio::time::sleep(Duration::from_secs(5)).await;
            clock.advance(Duration::from_secs(5));
            for _ in 0..10 {
                tokio::task::yield_now().await;
            }
            seen.push(health.report().status);
        }
        seen
    };
    runtime.block_on(async {
        tokio::select! {
            result = session => panic!("the session ended: {result:?}"),
            seen = watch => seen,
        }
    })
}

#[test]
fn a_server_busy_decoding_that_answers_status_updates_is_not_stalled() {
    let seen = busy_server(true);
    assert!(seen.iter().all(|s| *s == Status::Streaming), "{seen:?}");
    let silent = busy_server(false);
    assert_eq!(silent.last(), Some(&Status::Stalled), "{silent:?}");
}
