//! Which WAL position may be confirmed to the server.
//!
//! The relay promises (DESIGN contract 1) to confirm a position *C* only after the
//! broker acknowledged every record of every transaction whose commit ends at or
//! before *C*. The tracker keeps that promise with one rule:
//!
//! > the confirmable position is the end LSN of the longest run of *complete*
//! > transactions at the head of the stream, where a transaction is complete once
//! > its Commit was seen and every record it produced was acknowledged.
//!
//! Why this is enough:
//! - pgoutput (protocol 1, no streaming) sends whole transactions in commit order,
//!   so the order in which transactions enter the tracker is the order of their end
//!   LSNs, and a prefix of the stream is a prefix of the WAL.
//! - Records are acknowledged in any order (they go to different partitions), but a
//!   transaction's end LSN becomes confirmable only when it *and every transaction
//!   before it* is complete, so a later acknowledgement can never confirm past an
//!   earlier record that is still in flight.
//! - The end LSN (not the commit LSN) is confirmed: on restart the server re-sends
//!   every transaction whose commit record ends after the confirmed position, so
//!   confirming the commit LSN would re-send the last transaction.
//! - When nothing is open or in flight, a keepalive's position may be confirmed:
//!   every transaction the server sent before it has been received and is complete,
//!   and a transaction still being decoded commits after that position, so it will be
//!   sent again after a restart. This keeps the slot moving on a database busy with
//!   tables the relay does not publish. While a transaction is open no idle position
//!   is taken.
//!
//! The confirmed position never moves backwards.
//!
//! The tracker also counts what a crash would send again,
//! [`AckTracker::unconfirmed`]: every record handed over since the position last
//! confirmed to the server. The stream stops reading when that reaches
//! `max_in_flight` and confirms promptly (see [`crate::stream`]), so a crash
//! re-sends at most one window.
//!
//! **Streamed transactions** (protocol 2) enter the tracker only at their Stream
//! Commit, when the stream replays them, whole and without reading further: so
//! transactions still enter in commit order and the rule above holds unchanged.
//! While one is still open (streamed, not yet committed) the server may send
//! other transactions that commit before it, and the stream confirms them as they
//! complete. That is safe: the open transaction commits after them, so it ends
//! after any position confirmed for them, and after a restart the server decodes
//! again from the slot's `restart_lsn` — which it never moves past the first change
//! of a transaction still in progress — and sends the open transaction again, whole.
//! (Checked against the server by `relay/tests/relay_streaming.rs`: a relay killed
//! while a streamed transaction is open and later ones were confirmed loses
//! nothing of it.) It is also necessary: a transaction open for an hour must not
//! hold every later one unconfirmed, or the window would fill and reading stop
//! before its Stream Commit could arrive. A keepalive's position is not taken
//! while a streamed transaction is open (the stream does not offer it): it stands
//! for "everything sent so far is complete", which an open transaction contradicts.
//!
//! **Resume points.** A transaction larger than the window can only be confirmed
//! after its last record, so without more a crash re-sends it whole. The tracker
//! keeps, for the oldest incomplete transaction, the count of its records
//! acknowledged without a gap from its start ([`AckTracker::resume_point`], a
//! [`Position`]: every record of the transaction committing at `commit_lsn` with an
//! index below `index` was acknowledged). The stream has it stored where a restart
//! finds it ([`crate::resume`]), tells the tracker what was stored
//! ([`AckTracker::resume_stored`]), and [`AckTracker::unconfirmed`] leaves the
//! stored part out: a restart skips those records of that transaction
//! ([`AckTracker::begin`]'s `first_index`), so they are not sent again.

use std::collections::{BTreeSet, VecDeque};

use crate::routing::Position;
use crate::Lsn;

/// A transaction as the tracker knows it, identified by its place in the stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TxnId(u64);

/// One record handed over: its transaction and its index in it (the index of its
/// [`Position`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Tag {
    pub txn: TxnId,
    pub index: u32,
}

#[derive(Debug)]
struct Txn {
    id: TxnId,
    commit_lsn: Lsn,
    /// Set when the Commit message arrived.
    end_lsn: Option<Lsn>,
    /// Records produced and not yet acknowledged.
    outstanding: usize,
    /// Records produced in all (in this session).
    records: usize,
    /// The index of the first record produced in this session: the records before
    /// it were acknowledged in an earlier one (a resume point).
    first_index: u32,
    /// The index of the next record.
    next_index: u32,
    /// Every record below this index is acknowledged.
    acked_below: u32,
    /// Acknowledged records at or above `acked_below`.
    acked_above: BTreeSet<u32>,
}

/// The tracker was driven out of protocol order; these are bugs in the caller.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AckError {
    #[error("a transaction began while transaction {0:?} was still open")]
    AlreadyOpen(TxnId),
    #[error("no transaction is open")]
    NoneOpen,
    #[error("transaction {0:?} has no record in flight to acknowledge")]
    NothingInFlight(TxnId),
    #[error("record {1} of transaction {0:?} is not in flight")]
    NotInFlight(TxnId, u32),
}

/// Tracks transactions from Begin to the acknowledgement of their last record.
#[derive(Debug, Default)]
pub struct AckTracker {
    /// Transactions not yet confirmable, oldest first; the last one may be open.
    pending: VecDeque<Txn>,
    next_id: u64,
    open: Option<TxnId>,
    confirmable: Lsn,
    in_flight: usize,
    /// Complete transactions not yet confirmed to the server: (end LSN, records).
    unsent: VecDeque<(Lsn, usize)>,
    unsent_records: usize,
    /// Records of the transactions in `pending`.
    pending_records: usize,
    /// The last resume point stored where a restart finds it.
    stored: Option<Position>,
}

impl AckTracker {
    /// A tracker that starts at `confirmed`, the slot's confirmed position.
    pub fn new(confirmed: Lsn) -> AckTracker {
        AckTracker {
            confirmable: confirmed,
            ..AckTracker::default()
        }
    }

    /// A Begin message (or a streamed transaction's replay): the transaction
    /// committing at `commit_lsn` opens; its first `first_index` records were
    /// acknowledged in an earlier session and are not produced again.
    pub fn begin(&mut self, commit_lsn: Lsn, first_index: u32) -> Result<TxnId, AckError> {
        if let Some(open) = self.open {
            return Err(AckError::AlreadyOpen(open));
        }
        let id = TxnId(self.next_id);
        self.next_id += 1;
        self.pending.push_back(Txn {
            id,
            commit_lsn,
            end_lsn: None,
            outstanding: 0,
            records: 0,
            first_index,
            next_index: first_index,
            acked_below: first_index,
            acked_above: BTreeSet::new(),
        });
        self.open = Some(id);
        Ok(id)
    }

    /// The next record of the open transaction was handed to the producer; its tag.
    pub fn record_sent(&mut self) -> Result<Tag, AckError> {
        let open = self.open.ok_or(AckError::NoneOpen)?;
        let txn = self
            .pending
            .back_mut()
            .filter(|t| t.id == open)
            .ok_or(AckError::NoneOpen)?;
        let index = txn.next_index;
        txn.next_index += 1;
        txn.outstanding += 1;
        txn.records += 1;
        self.in_flight += 1;
        self.pending_records += 1;
        Ok(Tag { txn: open, index })
    }

    /// A Commit message: the open transaction ends at `end_lsn`.
    pub fn commit(&mut self, end_lsn: Lsn) -> Result<(), AckError> {
        let open = self.open.take().ok_or(AckError::NoneOpen)?;
        let txn = self
            .pending
            .back_mut()
            .filter(|t| t.id == open)
            .ok_or(AckError::NoneOpen)?;
        txn.end_lsn = Some(end_lsn);
        self.advance();
        Ok(())
    }

    /// The broker acknowledged the record `tag`.
    pub fn acknowledged(&mut self, tag: Tag) -> Result<(), AckError> {
        let txn = self
            .pending
            .iter_mut()
            .find(|t| t.id == tag.txn)
            .filter(|t| t.outstanding > 0)
            .ok_or(AckError::NothingInFlight(tag.txn))?;
        let in_flight = tag.index >= txn.acked_below
            && tag.index < txn.next_index
            && !txn.acked_above.contains(&tag.index);
        if !in_flight {
            return Err(AckError::NotInFlight(tag.txn, tag.index));
        }
        if tag.index == txn.acked_below {
            txn.acked_below += 1;
            while txn.acked_above.remove(&txn.acked_below) {
                txn.acked_below += 1;
            }
        } else {
            txn.acked_above.insert(tag.index);
        }
        txn.outstanding -= 1;
        self.in_flight -= 1;
        self.advance();
        Ok(())
    }

    /// The resume point of the oldest incomplete transaction: the position below
    /// which all its records are acknowledged, when some are. `None` when nothing
    /// is pending or none of its records was acknowledged yet.
    pub fn resume_point(&self) -> Option<Position> {
        let head = self.pending.front()?;
        (head.acked_below > 0).then_some(Position {
            commit_lsn: head.commit_lsn,
            index: head.acked_below,
        })
    }

    /// Records of the oldest incomplete transaction handed over in this session,
    /// and how many of them a resume point stored now would cover beyond the one
    /// stored: the stream stores a point when this grows large against the window.
    pub fn resume_progress(&self) -> Option<(usize, usize)> {
        let head = self.pending.front()?;
        let base = self.stored_index(head).unwrap_or(head.first_index);
        let gain = head.acked_below.saturating_sub(base);
        Some((head.records, gain as usize))
    }

    /// `point` was stored where a restart finds it: a restart skips the records it
    /// covers, so they no longer count as [`unconfirmed`](Self::unconfirmed).
    pub fn resume_stored(&mut self, point: Position) {
        self.stored = Some(point);
    }

    /// The stored resume point's index, if it is about `txn`.
    fn stored_index(&self, txn: &Txn) -> Option<u32> {
        self.stored
            .filter(|p| p.commit_lsn == txn.commit_lsn)
            .map(|p| p.index)
    }

    /// A position reported while the relay may have nothing to do (a keepalive's
    /// WAL end). Taken only when no transaction is open or in flight.
    pub fn idle_position(&mut self, lsn: Lsn) {
        if self.pending.is_empty() && self.open.is_none() && lsn > self.confirmable {
            self.confirmable = lsn;
        }
    }

    /// The highest position that may be confirmed now.
    pub fn confirmable(&self) -> Lsn {
        self.confirmable
    }

    /// Records handed to the producer and not yet acknowledged.
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// Records of complete transactions whose end was not yet confirmed to the
    /// server: what a crash now would send again, beside the records in flight.
    pub fn confirmable_unsent(&self) -> usize {
        self.unsent_records
    }

    /// Records handed over since the position last confirmed to the server (see
    /// [`confirmed`](Self::confirmed)), acknowledged or not, less those of the
    /// oldest incomplete transaction a stored resume point covers: what a crash now
    /// would send again, at most.
    pub fn unconfirmed(&self) -> usize {
        let covered = self.pending.front().map_or(0, |head| {
            let stored = self.stored_index(head).unwrap_or(head.first_index);
            (stored.saturating_sub(head.first_index) as usize).min(head.records)
        });
        self.pending_records + self.unsent_records - covered
    }

    /// Records handed over for the open transaction.
    pub fn open_records(&self) -> usize {
        match (self.open, self.pending.back()) {
            (Some(open), Some(txn)) if txn.id == open => txn.records,
            _ => 0,
        }
    }

    /// `flush` was sent to the server as the confirmed position.
    pub fn confirmed(&mut self, flush: Lsn) {
        while let Some(&(end, records)) = self.unsent.front() {
            if end > flush {
                break;
            }
            self.unsent_records -= records;
            self.unsent.pop_front();
        }
    }

    /// Transactions seen and not yet confirmable (the open one included).
    pub fn pending_transactions(&self) -> usize {
        self.pending.len()
    }

    /// Whether a transaction is open (Begin seen, Commit not yet).
    pub fn is_open(&self) -> bool {
        self.open.is_some()
    }

    fn advance(&mut self) {
        while let Some(head) = self.pending.front() {
            match head.end_lsn {
                Some(end) if head.outstanding == 0 => {
                    if end > self.confirmable {
                        self.confirmable = end;
                    }
                    if head.records > 0 {
                        self.unsent.push_back((end, head.records));
                        self.unsent_records += head.records;
                        self.pending_records -= head.records;
                    }
                    self.pending.pop_front();
                }
                _ => break,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn lsn(n: u64) -> Lsn {
        Lsn::new(n)
    }

    /// Begins a transaction committing at `commit` and hands over `n` records.
    fn txn(t: &mut AckTracker, commit: u64, n: usize) -> Vec<Tag> {
        t.begin(lsn(commit), 0).unwrap();
        (0..n).map(|_| t.record_sent().unwrap()).collect()
    }

    #[test]
    fn confirms_only_the_complete_prefix() {
        let mut t = AckTracker::new(lsn(10));
        let a = txn(&mut t, 90, 2);
        t.commit(lsn(100)).unwrap();
        let b = txn(&mut t, 190, 1);
        t.commit(lsn(200)).unwrap();
        assert_eq!(t.confirmable(), lsn(10));

        // The later transaction completes first: nothing moves.
        t.acknowledged(b[0]).unwrap();
        assert_eq!(t.confirmable(), lsn(10));
        t.acknowledged(a[1]).unwrap();
        assert_eq!(t.confirmable(), lsn(10));
        // The last record of the first transaction releases both.
        t.acknowledged(a[0]).unwrap();
        assert_eq!(t.confirmable(), lsn(200));
        assert_eq!((t.in_flight(), t.pending_transactions()), (0, 0));
    }

    #[test]
    fn a_transaction_without_records_is_complete_at_commit() {
        let mut t = AckTracker::new(Lsn::ZERO);
        txn(&mut t, 40, 0);
        t.commit(lsn(50)).unwrap();
        assert_eq!(t.confirmable(), lsn(50));
    }

    #[test]
    fn an_open_transaction_is_not_complete_even_when_acknowledged() {
        let mut t = AckTracker::new(Lsn::ZERO);
        let a = txn(&mut t, 50, 1);
        t.acknowledged(a[0]).unwrap();
        assert_eq!(t.confirmable(), Lsn::ZERO);
        t.idle_position(lsn(70));
        assert_eq!(
            t.confirmable(),
            Lsn::ZERO,
            "idle position taken mid-transaction"
        );
        t.commit(lsn(60)).unwrap();
        assert_eq!(t.confirmable(), lsn(60));
    }

    #[test]
    fn idle_positions_move_only_when_nothing_is_pending() {
        let mut t = AckTracker::new(lsn(5));
        t.idle_position(lsn(40));
        assert_eq!(t.confirmable(), lsn(40));
        t.idle_position(lsn(30));
        assert_eq!(t.confirmable(), lsn(40), "moved backwards");

        let a = txn(&mut t, 80, 1);
        t.commit(lsn(90)).unwrap();
        t.idle_position(lsn(120));
        assert_eq!(
            t.confirmable(),
            lsn(40),
            "idle position taken with a record in flight"
        );
        t.acknowledged(a[0]).unwrap();
        assert_eq!(t.confirmable(), lsn(90));
        t.idle_position(lsn(120));
        assert_eq!(t.confirmable(), lsn(120));
    }

    #[test]
    fn protocol_misuse_is_an_error() {
        let mut t = AckTracker::new(Lsn::ZERO);
        assert_eq!(t.record_sent(), Err(AckError::NoneOpen));
        assert_eq!(t.commit(lsn(1)), Err(AckError::NoneOpen));
        let a = t.begin(lsn(1), 0).unwrap();
        assert_eq!(t.begin(lsn(2), 0), Err(AckError::AlreadyOpen(a)));
        let tag = Tag { txn: a, index: 0 };
        assert_eq!(t.acknowledged(tag), Err(AckError::NothingInFlight(a)));
        let first = t.record_sent().unwrap();
        let second = t.record_sent().unwrap();
        assert_eq!(
            t.acknowledged(Tag { txn: a, index: 2 }),
            Err(AckError::NotInFlight(a, 2))
        );
        t.acknowledged(second).unwrap();
        assert_eq!(t.acknowledged(second), Err(AckError::NotInFlight(a, 1)));
        t.acknowledged(first).unwrap();
        assert_eq!(t.acknowledged(first), Err(AckError::NothingInFlight(a)));
    }

    #[test]
    fn the_resume_point_is_the_gapless_acknowledged_prefix_of_the_oldest_transaction() {
        let mut t = AckTracker::new(Lsn::ZERO);
        assert_eq!(t.resume_point(), None);
        let tags = txn(&mut t, 500, 5);
        assert_eq!(t.resume_point(), None);
        t.acknowledged(tags[1]).unwrap();
        t.acknowledged(tags[2]).unwrap();
        assert_eq!(t.resume_point(), None, "record 0 is still in flight");
        t.acknowledged(tags[0]).unwrap();
        let at = |index| {
            Some(Position {
                commit_lsn: lsn(500),
                index,
            })
        };
        assert_eq!(t.resume_point(), at(3));
        t.acknowledged(tags[4]).unwrap();
        assert_eq!(t.resume_point(), at(3));
        assert_eq!(t.resume_progress(), Some((5, 3)));
        // Storing it takes the covered records out of what a crash re-sends.
        assert_eq!(t.unconfirmed(), 5);
        t.resume_stored(Position {
            commit_lsn: lsn(500),
            index: 3,
        });
        assert_eq!(t.unconfirmed(), 2);
        assert_eq!(t.resume_progress(), Some((5, 0)));
        // A point of another transaction covers nothing.
        t.resume_stored(Position {
            commit_lsn: lsn(400),
            index: 3,
        });
        assert_eq!(t.unconfirmed(), 5);
    }

    #[test]
    fn a_resumed_transaction_starts_at_its_first_index() {
        let mut t = AckTracker::new(Lsn::ZERO);
        t.resume_stored(Position {
            commit_lsn: lsn(500),
            index: 1000,
        });
        t.begin(lsn(500), 1000).unwrap();
        let tag = t.record_sent().unwrap();
        assert_eq!(tag.index, 1000);
        let at = |index| {
            Some(Position {
                commit_lsn: lsn(500),
                index,
            })
        };
        assert_eq!(t.resume_point(), at(1000), "the stored point still holds");
        assert_eq!(
            t.unconfirmed(),
            1,
            "the skipped records were never handed over"
        );
        assert_eq!(t.resume_progress(), Some((1, 0)));
        t.acknowledged(tag).unwrap();
        assert_eq!(t.resume_point(), at(1001));
        t.commit(lsn(510)).unwrap();
        assert_eq!(t.confirmable(), lsn(510));
    }

    /// One step of a random stream: the stream side (transactions with their record
    /// counts) interleaved with acknowledgements in random order.
    #[derive(Debug, Clone)]
    enum Step {
        Txn { records: usize, gap: u64 },
        Ack { pick: usize },
        Idle { ahead: u64 },
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            (0usize..5, 1u64..1000).prop_map(|(records, gap)| Step::Txn { records, gap }),
            any::<usize>().prop_map(|pick| Step::Ack { pick }),
            (0u64..500).prop_map(|ahead| Step::Idle { ahead }),
        ]
    }

    proptest! {
        /// Against a model: the confirmable position is always the end LSN of the
        /// last transaction before the first incomplete one, never beyond a record
        /// in flight, and never decreasing.
        #[test]
        fn never_confirms_past_an_unacknowledged_record(steps in prop::collection::vec(step(), 1..200)) {
            let mut t = AckTracker::new(Lsn::ZERO);
            let mut wal = 0u64;
            // (end_lsn, records still unacknowledged) of every transaction, in order.
            let mut model: Vec<(u64, usize)> = Vec::new();
            let mut in_flight: Vec<(Tag, usize)> = Vec::new(); // (tag, index into model)
            let mut last = Lsn::ZERO;
            let mut idle_floor = 0u64;
            // The server's sent position: a transaction it sends later commits after it.
            let mut server_pos = 0u64;
            for step in steps {
                match step {
                    Step::Txn { records, gap } => {
                        wal = wal.max(server_pos) + gap;
                        let id = t.begin(Lsn::new(wal - 1), 0).unwrap();
                        for i in 0..records {
                            let tag = t.record_sent().unwrap();
                            prop_assert_eq!(tag, Tag { txn: id, index: i as u32 });
                            in_flight.push((tag, model.len()));
                        }
                        t.commit(Lsn::new(wal)).unwrap();
                        model.push((wal, records));
                    }
                    Step::Ack { pick } => {
                        if !in_flight.is_empty() {
                            let (id, index) = in_flight.swap_remove(pick % in_flight.len());
                            t.acknowledged(id).unwrap();
                            model[index].1 -= 1;
                        }
                    }
                    Step::Idle { ahead } => {
                        let position = wal.max(server_pos) + ahead;
                        server_pos = position;
                        t.idle_position(Lsn::new(position));
                        if model.iter().all(|(_, left)| *left == 0) {
                            idle_floor = idle_floor.max(position);
                        }
                    }
                }
                let prefix_end = model
                    .iter()
                    .take_while(|(_, left)| *left == 0)
                    .last()
                    .map_or(0, |(end, _)| *end);
                let expected = prefix_end.max(idle_floor);
                prop_assert_eq!(t.confirmable(), Lsn::new(expected));
                if let Some((end, _)) = model.iter().find(|(_, left)| *left > 0) {
                    prop_assert!(t.confirmable() < Lsn::new(*end));
                }
                prop_assert!(t.confirmable() >= last);
                last = t.confirmable();
                prop_assert_eq!(t.in_flight(), in_flight.len());
            }
        }
    }
}
