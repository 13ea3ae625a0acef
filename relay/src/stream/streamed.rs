//! The session's side of streamed transactions (protocol 2) and of resume points:
//! changes kept while their transaction is open, replayed through the delivery
//! loop at its Stream Commit; resume points asked for as records are acknowledged.

use std::sync::Arc;

use bytes::Bytes;

use super::txbuffer::{Change, OrderError};
use super::{Replaying, Session, StreamError, WalStream};
use crate::heartbeat::HEARTBEAT_PREFIX;
use crate::pgoutput::{self, LogicalMessage, StreamCommit};
use crate::resume::Stored;
use crate::sink::Sink;

/// Changes replayed per turn of the loop, between looks at the sink and timers.
const REPLAY_BATCH: usize = 256;

impl<W: WalStream, S: Sink> Session<'_, W, S> {
    /// A change inside the stream block of transaction `xid`, made by
    /// (sub)transaction `subxid`: kept if publishing needs it.
    pub(super) fn streamed_change(
        &mut self,
        xid: u32,
        subxid: u32,
        message: LogicalMessage,
        data: &Bytes,
    ) -> Result<(), StreamError> {
        let spilled = match message {
            LogicalMessage::Relation(relation) => {
                // Announced for this transaction only: its layout may be one the
                // transaction is making, and it may abort.
                if let Some(layout) = self.outbox_layout(&relation) {
                    self.buffers
                        .relation(xid, relation.id, layout.map(Arc::new))?;
                }
                0
            }
            LogicalMessage::Insert(insert) => {
                let session = self
                    .outbox
                    .as_ref()
                    .filter(|o| o.oid == insert.relation_id)
                    .map(|o| Ok(o.layout.clone()));
                if session.is_none() && !self.buffers.announced(xid, insert.relation_id) {
                    return Ok(());
                }
                self.buffers
                    .push(xid, subxid, Some((insert.relation_id, session)), data)?
            }
            LogicalMessage::Message(message) if message.prefix == HEARTBEAT_PREFIX => 0,
            LogicalMessage::Message(message) if self.routes_messages_of(&message.prefix) => {
                if !message.transactional() {
                    tracing::warn!(lsn = %message.lsn, prefix = %message.prefix, "ignoring a non-transactional logical message");
                    return Ok(());
                }
                self.buffers.push(xid, subxid, None, data)?
            }
            _ => 0,
        };
        if spilled > 0 {
            self.metrics.spilled_bytes(spilled);
        }
        Ok(())
    }

    /// A Stream Commit: the transaction's kept changes are published, in order,
    /// before anything else is read.
    pub(super) fn stream_commit(&mut self, commit: &StreamCommit) -> Result<(), StreamError> {
        let changes = self
            .buffers
            .commit(commit.xid)
            .ok_or(OrderError::CommittedUnstarted(commit.xid))?
            .map_err(StreamError::Replay)?;
        self.metrics.set_streamed_open(self.buffers.len() as u64);
        self.open_txn(commit.commit_lsn, commit.commit_time())?;
        self.replay = Some(Replaying {
            changes,
            end_lsn: commit.end_lsn,
        });
        Ok(())
    }

    /// Publishes the next changes of the transaction being replayed, while the
    /// window allows; ends its replay after the last.
    pub(super) fn replay_some(&mut self) -> Result<(), StreamError> {
        // Replaying is the stream's progress while reading waits for it.
        self.health.stream_progress();
        for _ in 0..REPLAY_BATCH {
            if !self.can_read() {
                return Ok(());
            }
            let Some(replaying) = self.replay.as_mut() else {
                return Ok(());
            };
            match replaying
                .changes
                .next_change()
                .map_err(StreamError::Replay)?
            {
                Some(change) => self.replay_change(change)?,
                None => {
                    let end_lsn = replaying.end_lsn;
                    self.replay = None;
                    self.tracker.commit(end_lsn)?;
                    self.open = None;
                    self.confirm_soon();
                    return Ok(());
                }
            }
        }
        Ok(())
    }

    fn replay_change(&mut self, change: Change) -> Result<(), StreamError> {
        let decoded =
            pgoutput::decode_in_stream(&change.bytes).map_err(|source| StreamError::Decode {
                wal_start: self
                    .open
                    .as_ref()
                    .map_or(crate::Lsn::ZERO, |o| o.commit_lsn),
                source,
            })?;
        match (decoded.message, change.layout) {
            (LogicalMessage::Insert(insert), Some(layout)) => {
                let layout = layout?;
                self.route(&layout, &insert.tuple)
            }
            (LogicalMessage::Message(message), None) => {
                self.route_message(&message.prefix, &message.content)
            }
            // Kept changes are only those two.
            _ => Ok(()),
        }
    }

    /// The writer stored a resume point, or failed to.
    pub(super) fn resume_stored(&mut self, stored: Stored) {
        self.resume_working = stored.working;
        if let Some(point) = stored.point {
            self.tracker.resume_stored(point);
        }
    }

    /// Asks for the oldest incomplete transaction's resume point to be stored when
    /// the transaction is large against the window (at least half of it handed
    /// over) and an eighth of the window more was acknowledged since the last
    /// point: small transactions are confirmed by their commit instead.
    pub(super) fn store_resume_soon(&mut self) {
        let Some(link) = &self.resume else {
            return;
        };
        let max = self.config.kafka.max_in_flight;
        let Some((records, gain)) = self.tracker.resume_progress() else {
            return;
        };
        if records < max / 2 || gain < (max / 8).max(1) {
            return;
        }
        if let Some(point) = self.tracker.resume_point() {
            if self.resume_wanted != Some(point) {
                link.want(point);
                self.resume_wanted = Some(point);
            }
        }
    }
}
