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

use std::collections::VecDeque;

use crate::Lsn;

/// A transaction as the tracker knows it, identified by its place in the stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TxnId(u64);

#[derive(Debug)]
struct Txn {
    id: TxnId,
    /// Set when the Commit message arrived.
    end_lsn: Option<Lsn>,
    /// Records produced and not yet acknowledged.
    outstanding: usize,
    /// Records produced in all.
    records: usize,
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
}

impl AckTracker {
    /// A tracker that starts at `confirmed`, the slot's confirmed position.
    pub fn new(confirmed: Lsn) -> AckTracker {
        AckTracker {
            confirmable: confirmed,
            ..AckTracker::default()
        }
    }

    /// A Begin message: a transaction opens.
    pub fn begin(&mut self) -> Result<TxnId, AckError> {
        if let Some(open) = self.open {
            return Err(AckError::AlreadyOpen(open));
        }
        let id = TxnId(self.next_id);
        self.next_id += 1;
        self.pending.push_back(Txn {
            id,
            end_lsn: None,
            outstanding: 0,
            records: 0,
        });
        self.open = Some(id);
        Ok(id)
    }

    /// A record of the open transaction was handed to the producer.
    pub fn record_sent(&mut self) -> Result<TxnId, AckError> {
        let open = self.open.ok_or(AckError::NoneOpen)?;
        let txn = self
            .pending
            .back_mut()
            .filter(|t| t.id == open)
            .ok_or(AckError::NoneOpen)?;
        txn.outstanding += 1;
        txn.records += 1;
        self.in_flight += 1;
        self.pending_records += 1;
        Ok(open)
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

    /// The broker acknowledged one record of transaction `id`.
    pub fn acknowledged(&mut self, id: TxnId) -> Result<(), AckError> {
        let txn = self
            .pending
            .iter_mut()
            .find(|t| t.id == id)
            .filter(|t| t.outstanding > 0)
            .ok_or(AckError::NothingInFlight(id))?;
        txn.outstanding -= 1;
        self.in_flight -= 1;
        self.advance();
        Ok(())
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
    /// [`confirmed`](Self::confirmed)), acknowledged or not: what a crash now would
    /// send again, at most.
    pub fn unconfirmed(&self) -> usize {
        self.pending_records + self.unsent_records
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

    #[test]
    fn confirms_only_the_complete_prefix() {
        let mut t = AckTracker::new(lsn(10));
        let a = t.begin().unwrap();
        t.record_sent().unwrap();
        t.record_sent().unwrap();
        t.commit(lsn(100)).unwrap();
        let b = t.begin().unwrap();
        t.record_sent().unwrap();
        t.commit(lsn(200)).unwrap();
        assert_eq!(t.confirmable(), lsn(10));

        // The later transaction completes first: nothing moves.
        t.acknowledged(b).unwrap();
        assert_eq!(t.confirmable(), lsn(10));
        t.acknowledged(a).unwrap();
        assert_eq!(t.confirmable(), lsn(10));
        // The last record of the first transaction releases both.
        t.acknowledged(a).unwrap();
        assert_eq!(t.confirmable(), lsn(200));
        assert_eq!((t.in_flight(), t.pending_transactions()), (0, 0));
    }

    #[test]
    fn a_transaction_without_records_is_complete_at_commit() {
        let mut t = AckTracker::new(Lsn::ZERO);
        t.begin().unwrap();
        t.commit(lsn(50)).unwrap();
        assert_eq!(t.confirmable(), lsn(50));
    }

    #[test]
    fn an_open_transaction_is_not_complete_even_when_acknowledged() {
        let mut t = AckTracker::new(Lsn::ZERO);
        let a = t.begin().unwrap();
        t.record_sent().unwrap();
        t.acknowledged(a).unwrap();
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

        let a = t.begin().unwrap();
        t.record_sent().unwrap();
        t.commit(lsn(90)).unwrap();
        t.idle_position(lsn(120));
        assert_eq!(
            t.confirmable(),
            lsn(40),
            "idle position taken with a record in flight"
        );
        t.acknowledged(a).unwrap();
        assert_eq!(t.confirmable(), lsn(90));
        t.idle_position(lsn(120));
        assert_eq!(t.confirmable(), lsn(120));
    }

    #[test]
    fn protocol_misuse_is_an_error() {
        let mut t = AckTracker::new(Lsn::ZERO);
        assert_eq!(t.record_sent(), Err(AckError::NoneOpen));
        assert_eq!(t.commit(lsn(1)), Err(AckError::NoneOpen));
        let a = t.begin().unwrap();
        assert_eq!(t.begin(), Err(AckError::AlreadyOpen(a)));
        assert_eq!(t.acknowledged(a), Err(AckError::NothingInFlight(a)));
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
            let mut in_flight: Vec<(TxnId, usize)> = Vec::new(); // (id, index into model)
            let mut last = Lsn::ZERO;
            let mut idle_floor = 0u64;
            // The server's sent position: a transaction it sends later commits after it.
            let mut server_pos = 0u64;
            for step in steps {
                match step {
                    Step::Txn { records, gap } => {
                        let id = t.begin().unwrap();
                        for _ in 0..records {
                            prop_assert_eq!(t.record_sent().unwrap(), id);
                            in_flight.push((id, model.len()));
                        }
                        wal = wal.max(server_pos) + gap;
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
