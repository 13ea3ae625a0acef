//! The replication loop: WAL in, records to the delivery loop, confirmed positions
//! back.
//!
//! ```text
//!   PostgreSQL walsender                         outbox-relay                          sink
//!   ───────────────────            ──────────────────────────────────────────        ──────
//!   XLogData(Begin)        ──▶  tracker.begin()
//!   XLogData(Relation)     ──▶  relation cache (this session only)
//!   XLogData(Insert outbox)──▶  route ──▶ delivery.push(txn) ───────────────────────▶ send
//!                               tracker.record_sent()        Settled(txn) ◀────────── Acked
//!   XLogData(Commit end=E) ──▶  tracker.commit(E)          tracker.acknowledged(txn)
//!   Keepalive(P)           ──▶  tracker.idle_position(P)
//!   ◀── standby status update (flush = tracker.confirmable()): promptly when it
//!       advanced, and every status interval in any state (that one asks for a
//!       keepalive in reply)
//!
//!   protocol 2, a transaction streamed while in progress:
//!   Stream Start(x) .. changes of x .. Stream Stop ──▶ kept ([`txbuffer`]): memory,
//!                                                       then a file past the budget
//!   Stream Abort(x, sub)   ──▶  drop x, or the changes of subtransaction sub
//!   Stream Commit(x, end=E)──▶  tracker.begin(); replay x: route ──▶ delivery.push
//!                               (reading waits meanwhile); tracker.commit(E)
//! ```
//!
//! Why nothing is lost: the only position ever sent as `flush` is
//! [`AckTracker::confirmable`], which by construction lies at or before the end of
//! the last transaction whose records were all settled, with every earlier
//! transaction also settled (see [`crate::ack`]); a record settles only when the
//! sink acknowledged it or its dead letter (see [`crate::delivery`]). Whatever was
//! not confirmed is sent again by the server after a restart.
//!
//! Why a crash re-sends at most one in-flight window: reading pauses while the
//! records handed over and not yet confirmed to the server reach `max_in_flight`
//! ([`AckTracker::unconfirmed`]), and progress is confirmed as soon as the
//! confirmable position advanced — at once when an eighth of the window waits for
//! it, otherwise within [`CONFIRM_DELAY`] (so the server gets at most ten updates
//! a second from the rate limit, and one per eighth of a window under load). A crash
//! re-sends what was not confirmed: at most the window. A single transaction
//! larger than the window is the exception: it can only be confirmed after its
//! Commit, so reading goes on through it (bounded by the records in flight) and a
//! crash re-sends it whole.
//!
//! Why memory stays bounded: reading stops at that bound; while the sink is
//! away deliveries stop settling, the bound is reached, the server's send buffer
//! fills and it waits.
//!
//! Why the connection survives a sink outage: status updates go out on a timer in
//! every state of the loop, reading or not, so `wal_sender_timeout` never fires.
//!
//! Order per key: records are pushed to the delivery loop in commit order, which
//! offers them to the sink in that order. A streamed transaction is replayed at
//! its Stream Commit, which comes in commit order, and nothing else is read until
//! its last record is pushed.
//!
//! Why a transaction larger than the window re-sends at most one window after a
//! crash: with resume points on ([`crate::resume`]), the window counts the records
//! handed over beyond the stored point, which a restart skips; without, the rule
//! above (reading goes on through it, bounded by the records in flight) applies.
//!
//! Why `/health` does not call a server busy decoding a large transaction stalled:
//! the periodic status update asks for a reply, which the server sends between
//! the records it decodes, and every message counts as stream progress.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;

use tokio::time::{Instant, Interval, MissedTickBehavior, Sleep};

use crate::ack::{AckError, AckTracker, Tag, TxnId};
use crate::config::RelayConfig;
use crate::delivery::{Delivery, DeliveryError, Settled};
use crate::health::Health;
use crate::heartbeat::HEARTBEAT_PREFIX;
use crate::metrics::Metrics;
use crate::pgoutput::{self, LogicalMessage};
use crate::replication::{ReplicationError, ReplicationMessage, ReplicationStream, StandbyStatus};
use crate::resume::{ResumeLink, Stored};
use crate::routing::{BadRow, OutboxLayout, Position, SchemaError};
use crate::sink::Sink;
use crate::Lsn;

mod records;
mod streamed;
pub mod txbuffer;

use txbuffer::{Buffers, OrderError, PushError, Replay};

/// How long a graceful stop waits for in-flight records before giving up on them
/// (they are not confirmed, so the next start sends them again).
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// The longest a confirmable position waits before it is confirmed; also the
/// least time between two prompt confirmations.
pub const CONFIRM_DELAY: Duration = Duration::from_millis(100);

/// How long ending the stream may take after the final status update.
const FINISH_TIMEOUT: Duration = Duration::from_secs(10);

/// The replication connection as the loop uses it; [`ReplicationStream`] in
/// production, a scripted double in tests.
pub trait WalStream {
    /// The next message; `Ok(None)` when the server ended the stream. Cancel-safe.
    fn next(
        &mut self,
    ) -> impl Future<Output = Result<Option<ReplicationMessage>, ReplicationError>>;
    /// Sends a standby status update.
    fn send_status(
        &mut self,
        status: StandbyStatus,
    ) -> impl Future<Output = Result<(), ReplicationError>>;
    /// Ends the stream.
    fn finish(self) -> impl Future<Output = Result<(), ReplicationError>>;
}

impl WalStream for ReplicationStream {
    fn next(
        &mut self,
    ) -> impl Future<Output = Result<Option<ReplicationMessage>, ReplicationError>> {
        ReplicationStream::next(self)
    }

    fn send_status(
        &mut self,
        status: StandbyStatus,
    ) -> impl Future<Output = Result<(), ReplicationError>> {
        ReplicationStream::send_status(self, status)
    }

    fn finish(self) -> impl Future<Output = Result<(), ReplicationError>> {
        ReplicationStream::finish(self)
    }
}

/// Why the loop stopped without being asked to.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error("replication stream failed")]
    Replication(#[from] ReplicationError),
    #[error("the server ended the replication stream")]
    Ended,
    #[error("cannot decode the message at WAL {wal_start}")]
    Decode {
        wal_start: Lsn,
        #[source]
        source: pgoutput::DecodeError,
    },
    #[error(transparent)]
    Schema(#[from] SchemaError),
    #[error("outbox row at {position} cannot be routed (and no dead-letter topic is configured)")]
    BadRow {
        position: Position,
        #[source]
        source: BadRow,
    },
    #[error(transparent)]
    Delivery(#[from] DeliveryError),
    #[error("the replication stream broke transaction order")]
    Order(#[from] AckError),
    #[error("the replication stream broke the order of streamed transactions")]
    StreamOrder(#[from] OrderError),
    #[error("cannot keep a change of a streamed transaction")]
    Keep(#[from] PushError),
    #[error("cannot read back a streamed transaction from its spill file")]
    Replay(#[source] std::io::Error),
}

impl StreamError {
    /// Whether reconnecting and resuming from the slot may succeed.
    pub fn is_transient(&self) -> bool {
        match self {
            StreamError::Replication(e) => e.is_transient(),
            StreamError::Ended => true,
            StreamError::Delivery(e) => e.is_transient(),
            _ => false,
        }
    }
}

/// The relay's view of the open transaction.
#[derive(Debug)]
struct OpenTxn {
    id: TxnId,
    commit_lsn: Lsn,
    commit_time: Option<SystemTime>,
    next_index: u32,
    /// Records below this index were acknowledged in an earlier session (the
    /// stored resume point): they are not routed again.
    skip: u32,
}

/// The outbox relation as announced in this session.
#[derive(Debug)]
struct OutboxRelation {
    oid: u32,
    layout: Arc<OutboxLayout>,
}

/// A committed streamed transaction being published.
#[derive(Debug)]
struct Replaying {
    changes: Replay,
    end_lsn: Lsn,
}

/// How a session ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Drained {
    /// The last position confirmed to the server.
    pub confirmed: Lsn,
    /// Records still unacknowledged when the drain gave up (0 on a clean stop).
    pub abandoned: usize,
}

/// One replication session: from START_REPLICATION until shutdown or error.
pub struct Session<'a, W, S> {
    config: &'a RelayConfig,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    stream: W,
    delivery: Delivery<S, Tag>,
    tracker: AckTracker,
    decoder: pgoutput::Decoder,
    status_timer: Interval,
    /// When the last status update went out.
    last_status: Instant,
    /// When a prompt confirmation is due (armed by [`Session::confirm_soon`]); one
    /// timer for the session, reset rather than created per loop iteration.
    confirm_timer: Pin<Box<Sleep>>,
    confirm_armed: bool,
    received: Lsn,
    sent_flush: Lsn,
    open: Option<OpenTxn>,
    outbox: Option<OutboxRelation>,
    /// Relation ids of other tables seen in this session (never cached across sessions).
    others: HashMap<u32, String>,
    /// Streamed transactions not yet ended (protocol 2).
    buffers: Buffers,
    /// A committed streamed transaction being published; reading waits meanwhile.
    replay: Option<Replaying>,
    /// The resume point stored when the session began.
    resume_start: Option<Position>,
    resume: Option<ResumeLink>,
    /// Whether resume points are being stored.
    resume_working: bool,
    /// The last point asked to be stored.
    resume_wanted: Option<Position>,
}

impl<W, S> std::fmt::Debug for Session<'_, W, S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("received", &self.received)
            .field("confirmable", &self.tracker.confirmable())
            .field("in_flight", &self.tracker.in_flight())
            .finish_non_exhaustive()
    }
}

impl<'a, W: WalStream, S: Sink> Session<'a, W, S> {
    /// A session on a started stream whose slot had confirmed `confirmed`,
    /// delivering to `sink`.
    pub fn new(
        config: &'a RelayConfig,
        stream: W,
        sink: S,
        confirmed: Lsn,
        observe: (Arc<Metrics>, Arc<Health>),
    ) -> Session<'a, W, S> {
        let (metrics, health) = observe;
        let mut status_timer = tokio::time::interval(config.postgres.status_interval);
        status_timer.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let delivery = Delivery::new(
            sink,
            config.kafka.max_in_flight,
            config.outbox.dead_letter_topic.clone(),
            metrics.clone(),
            health.clone(),
        );
        Session {
            config,
            metrics,
            health,
            stream,
            delivery,
            tracker: AckTracker::new(confirmed),
            decoder: pgoutput::Decoder::new(),
            status_timer,
            last_status: Instant::now(),
            confirm_timer: Box::pin(tokio::time::sleep(Duration::ZERO)),
            confirm_armed: false,
            received: confirmed,
            sent_flush: confirmed,
            open: None,
            outbox: None,
            others: HashMap::new(),
            buffers: Buffers::new(
                config.postgres.spill_dir.clone(),
                usize::try_from(config.postgres.stream_memory_bytes).unwrap_or(usize::MAX),
            ),
            replay: None,
            resume_start: None,
            resume: None,
            resume_working: false,
            resume_wanted: None,
        }
    }

    /// Streamed transactions past the memory budget spill to files in `dir`
    /// (default: the configured spill directory itself).
    pub fn spill_to(mut self, dir: std::path::PathBuf) -> Self {
        self.buffers = Buffers::new(
            dir,
            usize::try_from(self.config.postgres.stream_memory_bytes).unwrap_or(usize::MAX),
        );
        self
    }

    /// Resumes from `start`, the slot's stored resume point, and stores new ones
    /// through `link` (none: a crash re-sends a large transaction whole).
    pub fn resume_from(mut self, start: Option<Position>, link: Option<ResumeLink>) -> Self {
        self.resume_start = start;
        if let Some(point) = start {
            self.tracker.resume_stored(point);
        }
        self.resume_working = link.is_some();
        self.resume = link;
        self
    }

    /// Streams until `shutdown` resolves (then drains, confirms and ends the stream)
    /// or an error stops it. After an error that is not the connection's, the records
    /// already handed over are still awaited and what completed is confirmed, so a
    /// restart re-sends as little as possible; nothing at or after the failing
    /// record is confirmed.
    pub async fn run(mut self, shutdown: impl Future<Output = ()>) -> Result<Drained, StreamError> {
        match self.stream_until(shutdown).await {
            Ok(()) => self.drain().await,
            Err(error) => {
                let connection_lost =
                    matches!(error, StreamError::Replication(_) | StreamError::Ended);
                let sink_lost = matches!(error, StreamError::Delivery(DeliveryError::Sink(_)));
                if !connection_lost && !sink_lost {
                    self.settle().await;
                }
                Err(error)
            }
        }
    }

    /// Whether the loop may read another message (or replay another change):
    /// below the window of records handed over and not yet confirmed
    /// ([`AckTracker::unconfirmed`], less what a stored resume point covers). An
    /// open transaction that alone fills the window can only be confirmed after
    /// its Commit; without resume points reading goes on through it, bounded by
    /// the records in flight.
    fn can_read(&self) -> bool {
        let max = self.config.kafka.max_in_flight;
        if self.resume_working {
            return self.tracker.unconfirmed() < max;
        }
        if self.tracker.open_records() >= max {
            self.tracker.in_flight() < max
        } else {
            self.tracker.unconfirmed() < max
        }
    }

    async fn stream_until(
        &mut self,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), StreamError> {
        tokio::pin!(shutdown);
        loop {
            let in_flight = self.tracker.in_flight();
            let can_read = self.can_read();
            let replaying = self.replay.is_some();
            self.health.reading_paused(!can_read);
            self.health.records_in_flight(in_flight);
            self.metrics.set_in_flight(in_flight as u64);
            let confirm_armed = self.confirm_armed;
            let resuming = self.resume.is_some();
            tokio::select! {
                biased;
                () = &mut shutdown => return Ok(()),
                settled = self.delivery.next(), if !self.delivery.is_empty() => {
                    self.settled(settled?)?;
                }
                () = &mut self.confirm_timer, if confirm_armed => self.send_status(false).await?,
                _ = self.status_timer.tick() => self.send_status(true).await?,
                stored = resume_changed(&mut self.resume), if resuming => self.resume_stored(stored),
                () = std::future::ready(()), if can_read && replaying => self.replay_some()?,
                message = self.stream.next(), if can_read && !replaying => {
                    match message? {
                        Some(message) => {
                            self.health.stream_progress();
                            self.handle(message).await?;
                        }
                        None => return Err(StreamError::Ended),
                    }
                }
            }
        }
    }

    /// After an error: waits (bounded) for the records in flight and confirms what
    /// completed. Failures here are logged, not returned: the first error wins.
    async fn settle(&mut self) {
        let deadline = Instant::now() + DRAIN_TIMEOUT;
        while !self.delivery.is_empty() {
            tokio::select! {
                settled = self.delivery.next() => match settled {
                    Ok(settled) => {
                        if let Err(e) = self.tracker.acknowledged(settled.tag) {
                            tracing::warn!(error = %e, "acknowledgement out of order");
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "records in flight not delivered");
                        break;
                    }
                },
                _ = self.status_timer.tick() => {
                    if let Err(e) = self.send_status(false).await {
                        tracing::warn!(error = %e, "cannot confirm");
                        return;
                    }
                }
                () = tokio::time::sleep_until(deadline) => break,
            }
        }
        if let Err(e) = self.send_status(false).await {
            tracing::warn!(error = %e, "cannot confirm");
        }
    }

    /// Waits for in-flight records (bounded by [`DRAIN_TIMEOUT`]), confirms what is
    /// complete and ends the stream.
    async fn drain(mut self) -> Result<Drained, StreamError> {
        tracing::info!(in_flight = self.tracker.in_flight(), "draining");
        let deadline = Instant::now() + DRAIN_TIMEOUT;
        while !self.delivery.is_empty() {
            tokio::select! {
                settled = self.delivery.next() => self.settled(settled?)?,
                _ = self.status_timer.tick() => self.send_status(false).await?,
                () = tokio::time::sleep_until(deadline) => {
                    tracing::warn!(
                        in_flight = self.tracker.in_flight(),
                        "records still unacknowledged at the end of the drain; they will be sent again"
                    );
                    break;
                }
            }
        }
        self.send_status(false).await?;
        let drained = Drained {
            confirmed: self.sent_flush,
            abandoned: self.tracker.in_flight(),
        };
        // The server may still be sending the rest of a transaction; do not wait on
        // it forever.
        match tokio::time::timeout(FINISH_TIMEOUT, self.stream.finish()).await {
            Ok(result) => result?,
            Err(_) => tracing::warn!("the server did not end the stream in time; closing"),
        }
        Ok(drained)
    }

    async fn handle(&mut self, message: ReplicationMessage) -> Result<(), StreamError> {
        match message {
            ReplicationMessage::XLogData {
                wal_start,
                wal_end,
                data,
                ..
            } => {
                self.received = self.received.max(wal_end);
                self.handle_logical(wal_start, data)
            }
            ReplicationMessage::Keepalive {
                wal_end,
                reply_requested,
                ..
            } => {
                self.received = self.received.max(wal_end);
                // An open streamed transaction is not complete: no idle position.
                if self.buffers.is_empty() {
                    self.tracker.idle_position(wal_end);
                }
                if self.tracker.pending_transactions() == 0 {
                    self.metrics.set_behind_source_ms(0);
                }
                if reply_requested {
                    self.send_status(false).await?;
                }
                Ok(())
            }
        }
    }

    fn handle_logical(&mut self, wal_start: Lsn, data: Bytes) -> Result<(), StreamError> {
        let decoded = self
            .decoder
            .decode(&data)
            .map_err(|source| StreamError::Decode { wal_start, source })?;
        if let (Some(subxid), Some(xid)) = (decoded.xid, self.decoder.open_block()) {
            return self.streamed_change(xid, subxid, decoded.message, &data);
        }
        match decoded.message {
            LogicalMessage::Begin(begin) => {
                self.open_txn(begin.final_lsn, begin.commit_time())?;
            }
            LogicalMessage::Commit(commit) => {
                self.tracker.commit(commit.end_lsn)?;
                self.open = None;
                self.confirm_soon();
            }
            LogicalMessage::Relation(relation) => self.relation(relation)?,
            LogicalMessage::Insert(insert) => {
                let layout = self
                    .outbox
                    .as_ref()
                    .filter(|o| o.oid == insert.relation_id)
                    .map(|o| o.layout.clone());
                if let Some(layout) = layout {
                    self.route(&layout, &insert.tuple)?;
                }
            }
            LogicalMessage::StreamStart(start) => {
                self.buffers.start(start.xid, start.first_segment)?;
                self.metrics.set_streamed_open(self.buffers.len() as u64);
            }
            LogicalMessage::StreamCommit(commit) => self.stream_commit(&commit)?,
            LogicalMessage::StreamAbort(abort) => {
                self.buffers.abort(abort.xid, abort.subxid);
                self.metrics.set_streamed_open(self.buffers.len() as u64);
            }
            LogicalMessage::Message(message) if message.prefix == HEARTBEAT_PREFIX => {
                tracing::debug!(lsn = %message.lsn, "heartbeat returned");
            }
            LogicalMessage::Message(message) if self.routes_messages_of(&message.prefix) => {
                if message.transactional() && self.open.is_some() {
                    self.route_message(&message.prefix, &message.content)?;
                } else {
                    // Decoded even when its transaction rolled back: never routed.
                    tracing::warn!(lsn = %message.lsn, prefix = %message.prefix, "ignoring a non-transactional logical message");
                }
            }
            // Updates, deletes and truncates of the outbox (pruning) and every other
            // table are not events; nor are types, origins or other logical messages.
            _ => {}
        }
        Ok(())
    }

    fn settled(&mut self, settled: Settled<Tag>) -> Result<(), StreamError> {
        // Fault point (scenarios): a crash after the broker acknowledged, before
        // the position is confirmed; the server sends it again.
        let _ = failpoints::hit_blocking("relay.after-ack");
        self.tracker.acknowledged(settled.tag)?;
        self.confirm_soon();
        self.store_resume_soon();
        Ok(())
    }

    /// Schedules a status update when the confirmable position advanced: at once
    /// when an eighth of the window waits for it or the rate limit allows,
    /// otherwise at the end of the rate limit.
    fn confirm_soon(&mut self) {
        if self.tracker.confirmable() <= self.sent_flush {
            return;
        }
        let urgent = self.tracker.confirmable_unsent() >= self.config.kafka.max_in_flight / 8;
        let at = if urgent {
            Instant::now()
        } else {
            self.last_status + CONFIRM_DELAY
        };
        if !self.confirm_armed || at < self.confirm_timer.deadline() {
            self.confirm_timer.as_mut().reset(at);
            self.confirm_armed = true;
        }
    }

    /// Sends a status update; with `reply_requested` the server answers with a
    /// keepalive, which counts as stream progress even while it is busy decoding.
    async fn send_status(&mut self, reply_requested: bool) -> Result<(), StreamError> {
        let flush = self.tracker.confirmable().max(self.sent_flush);
        self.stream
            .send_status(StandbyStatus {
                write: self.received.max(flush),
                flush,
                apply: flush,
                reply_requested,
            })
            .await?;
        if flush > self.sent_flush {
            tracing::debug!(lsn = %flush, "confirmed");
        }
        self.sent_flush = flush;
        self.tracker.confirmed(flush);
        self.last_status = Instant::now();
        self.confirm_armed = false;
        self.metrics.set_confirmed_lsn(flush);
        Ok(())
    }
}

/// The writer's next report; pending for ever without a writer. Cancel-safe.
async fn resume_changed(link: &mut Option<ResumeLink>) -> Stored {
    match link {
        Some(link) => link.changed().await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests;
