//! The replication loop: WAL in, Kafka records out, confirmed positions back.
//!
//! ```text
//!   PostgreSQL walsender                         outbox-relay                        Kafka
//!   ───────────────────            ──────────────────────────────────────          ─────────
//!   XLogData(Begin)        ──▶  tracker.begin()
//!   XLogData(Relation)     ──▶  relation cache (this session only)
//!   XLogData(Insert outbox)──▶  route ──▶ sink.send ──────────────────────────────▶ produce
//!                               tracker.record_sent()          ack ◀──────────────── acks=all
//!   XLogData(Commit end=E) ──▶  tracker.commit(E)          tracker.acknowledged()
//!   Keepalive(P)           ──▶  tracker.idle_position(P)
//!   ◀── standby status update (flush = tracker.confirmable()) every status interval
//! ```
//!
//! Why nothing is lost: the only position ever sent as `flush` is
//! [`AckTracker::confirmable`], which by construction lies at or before the end of
//! the last transaction whose records were all acknowledged, with every earlier
//! transaction also acknowledged (see [`crate::ack`]). Whatever was not confirmed
//! is sent again by the server after a restart: at-least-once, with duplicates
//! bounded by what was in flight.
//!
//! Why memory stays bounded: the loop reads from the server only while fewer than
//! `max_in_flight` records await acknowledgement. While the broker is away,
//! deliveries stop resolving (records never expire: `message.timeout.ms=0`), the
//! bound is reached and reading stops; the server's send buffer fills and it waits.
//!
//! Why the connection survives a broker outage: status updates are sent on a timer
//! in every state of the loop, reading or not, so `wal_sender_timeout` never fires.
//!
//! Order per key: records are handed to one idempotent producer in commit order, and
//! a record that cannot be handed over stops the loop before any later record is
//! sent; the producer keeps per-partition order.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use futures::stream::FuturesUnordered;
use futures::StreamExt;
use rdkafka::error::KafkaError;
use tokio::time::{Instant, Interval, MissedTickBehavior};

use crate::ack::{AckError, AckTracker, TxnId};
use crate::config::RelayConfig;
use crate::deadletter::{self, Reason, RecordSummary};
use crate::health::Health;
use crate::heartbeat::HEARTBEAT_PREFIX;
use crate::kafka::{KafkaSink, SendError, TopicError};
use crate::metrics::Metrics;
use crate::pgoutput::{self, LogicalMessage};
use crate::replication::{ReplicationError, ReplicationMessage, ReplicationStream, StandbyStatus};
use crate::routing::{
    self, BadRow, ColumnValue, OutboxLayout, OutboxRecord, Position, SchemaError,
};
use crate::Lsn;

/// How long a graceful stop waits for in-flight records before giving up on them
/// (they are not confirmed, so the next start sends them again).
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// How long ending the stream may take after the final status update.
const FINISH_TIMEOUT: Duration = Duration::from_secs(10);

/// Backoff between attempts to create a topic while the broker is unreachable.
const TOPIC_RETRY: Duration = Duration::from_secs(1);

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
    #[error("outbox row at {position} cannot be routed")]
    BadRow {
        position: Position,
        #[source]
        source: BadRow,
    },
    #[error(transparent)]
    Delivery(Box<DeliveryFailure>),
    #[error(transparent)]
    Send(#[from] SendError),
    #[error(transparent)]
    Topic(#[from] TopicError),
    #[error("the replication stream broke transaction order")]
    Order(#[from] AckError),
}

impl StreamError {
    /// Whether reconnecting and resuming from the slot may succeed.
    pub fn is_transient(&self) -> bool {
        match self {
            StreamError::Replication(e) => e.is_transient(),
            StreamError::Ended => true,
            _ => false,
        }
    }
}

/// The broker refused a record for good.
#[derive(Debug, thiserror::Error)]
#[error("record {position} (id {id}, topic {topic}) was not delivered")]
pub struct DeliveryFailure {
    pub position: Position,
    pub id: String,
    pub topic: String,
    #[source]
    pub source: KafkaError,
}

type DeliveryResult = (TxnId, RecordSummary, Result<(), KafkaError>);
type PendingDelivery = Pin<Box<dyn Future<Output = DeliveryResult> + Send>>;

/// The relay's view of the open transaction.
#[derive(Debug)]
struct OpenTxn {
    commit_lsn: Lsn,
    commit_time: Option<SystemTime>,
    next_index: u32,
}

/// The outbox relation as announced in this session.
#[derive(Debug)]
struct OutboxRelation {
    oid: u32,
    layout: OutboxLayout,
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
pub struct Session<'a> {
    config: &'a RelayConfig,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    stream: ReplicationStream,
    sink: &'a mut KafkaSink,
    tracker: AckTracker,
    deliveries: FuturesUnordered<PendingDelivery>,
    status_timer: Interval,
    received: Lsn,
    sent_flush: Lsn,
    open: Option<OpenTxn>,
    outbox: Option<OutboxRelation>,
    /// Relation ids of other tables seen in this session (never cached across sessions).
    others: HashMap<u32, String>,
    /// Dead letters waiting to be produced in place of refused records, with the
    /// transaction they count for.
    letters: VecDeque<(TxnId, OutboxRecord, Reason, Option<SystemTime>)>,
}

impl std::fmt::Debug for Session<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("received", &self.received)
            .field("confirmable", &self.tracker.confirmable())
            .field("in_flight", &self.tracker.in_flight())
            .finish_non_exhaustive()
    }
}

impl<'a> Session<'a> {
    /// A session on a started stream whose slot had confirmed `confirmed`.
    pub fn new(
        config: &'a RelayConfig,
        stream: ReplicationStream,
        sink: &'a mut KafkaSink,
        confirmed: Lsn,
        observe: (Arc<Metrics>, Arc<Health>),
    ) -> Session<'a> {
        let (metrics, health) = observe;
        let mut status_timer = tokio::time::interval(config.postgres.status_interval);
        status_timer.set_missed_tick_behavior(MissedTickBehavior::Delay);
        Session {
            config,
            metrics,
            health,
            stream,
            sink,
            tracker: AckTracker::new(confirmed),
            deliveries: FuturesUnordered::new(),
            status_timer,
            received: confirmed,
            sent_flush: confirmed,
            open: None,
            outbox: None,
            others: HashMap::new(),
            letters: VecDeque::new(),
        }
    }

    /// Streams until `shutdown` resolves (then drains, confirms and ends the stream)
    /// or an error stops it. After an error that is not the connection's, the records
    /// already handed to the producer are still awaited and what completed is
    /// confirmed, so a restart re-sends as little as possible; nothing at or after
    /// the failing record is confirmed.
    pub async fn run(mut self, shutdown: impl Future<Output = ()>) -> Result<Drained, StreamError> {
        match self.stream_until(shutdown).await {
            Ok(()) => self.drain().await,
            Err(error) => {
                if !matches!(error, StreamError::Replication(_) | StreamError::Ended) {
                    self.settle().await;
                }
                Err(error)
            }
        }
    }

    async fn stream_until(
        &mut self,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), StreamError> {
        tokio::pin!(shutdown);
        loop {
            let in_flight = self.tracker.in_flight();
            let can_read = in_flight < self.config.kafka.max_in_flight;
            self.health.reading_paused(!can_read);
            self.health.records_in_flight(in_flight);
            self.metrics.set_in_flight(in_flight as u64);
            tokio::select! {
                biased;
                () = &mut shutdown => return Ok(()),
                Some(done) = self.deliveries.next(), if !self.deliveries.is_empty() => {
                    self.delivered(done)?;
                }
                _ = self.status_timer.tick() => self.send_status().await?,
                message = self.stream.next(), if can_read => {
                    match message? {
                        Some(message) => {
                            self.health.stream_progress();
                            self.handle(message).await?;
                        }
                        None => return Err(StreamError::Ended),
                    }
                }
            }
            self.send_letters().await?;
        }
    }

    /// After an error: waits (bounded) for the records in flight and confirms what
    /// completed. Failures here are logged, not returned: the first error wins.
    async fn settle(&mut self) {
        let deadline = Instant::now() + DRAIN_TIMEOUT;
        while !self.deliveries.is_empty() {
            tokio::select! {
                Some((txn, meta, result)) = self.deliveries.next() => {
                    match result {
                        Ok(()) => {
                            if let Err(e) = self.tracker.acknowledged(txn) {
                                tracing::warn!(error = %e, "acknowledgement out of order");
                            }
                        }
                        Err(e) => tracing::warn!(position = %meta.position, error = %e, "record not delivered"),
                    }
                }
                _ = self.status_timer.tick() => {
                    if let Err(e) = self.send_status().await {
                        tracing::warn!(error = %e, "cannot confirm");
                        return;
                    }
                }
                () = tokio::time::sleep_until(deadline) => break,
            }
        }
        if let Err(e) = self.send_status().await {
            tracing::warn!(error = %e, "cannot confirm");
        }
    }

    /// Waits for in-flight records (bounded by [`DRAIN_TIMEOUT`]), confirms what is
    /// complete and ends the stream.
    async fn drain(mut self) -> Result<Drained, StreamError> {
        tracing::info!(in_flight = self.tracker.in_flight(), "draining");
        let deadline = Instant::now() + DRAIN_TIMEOUT;
        while !self.deliveries.is_empty() {
            tokio::select! {
                Some(done) = self.deliveries.next() => {
                    self.delivered(done)?;
                    self.send_letters().await?;
                }
                _ = self.status_timer.tick() => self.send_status().await?,
                () = tokio::time::sleep_until(deadline) => {
                    tracing::warn!(
                        in_flight = self.tracker.in_flight(),
                        "records still unacknowledged at the end of the drain; they will be sent again"
                    );
                    break;
                }
            }
        }
        self.send_status().await?;
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
                self.handle_logical(wal_start, data).await
            }
            ReplicationMessage::Keepalive {
                wal_end,
                reply_requested,
                ..
            } => {
                self.received = self.received.max(wal_end);
                self.tracker.idle_position(wal_end);
                if self.tracker.pending_transactions() == 0 {
                    self.metrics.set_behind_source_ms(0);
                }
                if reply_requested {
                    self.send_status().await?;
                }
                Ok(())
            }
        }
    }

    async fn handle_logical(&mut self, wal_start: Lsn, data: Bytes) -> Result<(), StreamError> {
        let message =
            pgoutput::decode(&data).map_err(|source| StreamError::Decode { wal_start, source })?;
        match message {
            LogicalMessage::Begin(begin) => {
                self.tracker.begin()?;
                self.open = Some(OpenTxn {
                    commit_lsn: begin.final_lsn,
                    commit_time: begin.commit_time(),
                    next_index: 0,
                });
            }
            LogicalMessage::Commit(commit) => {
                self.tracker.commit(commit.end_lsn)?;
                self.open = None;
            }
            LogicalMessage::Relation(relation) => self.relation(relation)?,
            LogicalMessage::Insert(insert) => {
                let is_outbox = self
                    .outbox
                    .as_ref()
                    .is_some_and(|o| o.oid == insert.relation_id);
                if is_outbox {
                    self.route(&insert.tuple).await?;
                }
            }
            LogicalMessage::Message(message) if message.prefix == HEARTBEAT_PREFIX => {
                tracing::debug!(lsn = %message.lsn, "heartbeat returned");
            }
            LogicalMessage::Message(message)
                if self
                    .config
                    .outbox
                    .messages
                    .as_ref()
                    .is_some_and(|m| m.prefix == message.prefix) =>
            {
                if message.transactional() && self.open.is_some() {
                    self.route_message(&message.prefix, &message.content)
                        .await?;
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

    fn relation(&mut self, relation: pgoutput::Relation) -> Result<(), StreamError> {
        let table = &self.config.postgres.table;
        if relation.namespace == table.schema && relation.name == table.name {
            let names: Vec<&str> = relation.columns.iter().map(|c| c.name.as_str()).collect();
            let layout =
                OutboxLayout::resolve(&self.config.outbox.columns, &table.to_string(), &names)?;
            if !layout.has_headers() {
                tracing::debug!(table = %table, "the outbox table has no headers column");
            }
            self.outbox = Some(OutboxRelation {
                oid: relation.id,
                layout,
            });
        } else {
            self.others.insert(
                relation.id,
                format!("{}.{}", relation.namespace, relation.name),
            );
        }
        Ok(())
    }

    async fn route(&mut self, tuple: &[pgoutput::Column]) -> Result<(), StreamError> {
        let (Some(open), Some(outbox)) = (self.open.as_mut(), self.outbox.as_ref()) else {
            return Err(AckError::NoneOpen.into());
        };
        let position = Position {
            commit_lsn: open.commit_lsn,
            index: open.next_index,
        };
        open.next_index += 1;
        let values: Vec<ColumnValue<'_>> = tuple.iter().map(column_value).collect();
        let commit_time = open.commit_time;
        let (record, letter) = match outbox.layout.route(&self.config.outbox, &values, position) {
            Ok(record) => (record, None),
            Err(source) => match &self.config.outbox.dead_letter_topic {
                Some(dlq) => {
                    tracing::warn!(%position, error = %source, topic = %dlq, "dead-lettering an outbox row");
                    let letter = deadletter::bad_row(
                        dlq,
                        outbox.layout.column_names(),
                        &values,
                        outbox.layout.aggregate_id(&values),
                        position,
                        &source,
                    );
                    (letter, Some(Reason::BadRow))
                }
                None => return Err(StreamError::BadRow { position, source }),
            },
        };
        let txn = self.tracker.record_sent()?;
        self.produce(txn, record, letter, commit_time).await
    }

    /// Routes a transactional logical message of the table-less outbox.
    async fn route_message(&mut self, prefix: &str, content: &Bytes) -> Result<(), StreamError> {
        let (Some(open), Some(messages)) =
            (self.open.as_mut(), self.config.outbox.messages.as_ref())
        else {
            return Err(AckError::NoneOpen.into());
        };
        let position = Position {
            commit_lsn: open.commit_lsn,
            index: open.next_index,
        };
        open.next_index += 1;
        let commit_time = open.commit_time;
        let (record, letter) = match routing::route_message(
            &self.config.outbox,
            &messages.topics,
            content,
            position,
        ) {
            Ok(record) => (record, None),
            Err(source) => match &self.config.outbox.dead_letter_topic {
                Some(dlq) => {
                    tracing::warn!(%position, error = %source, topic = %dlq, "dead-lettering a logical message");
                    let columns = ["prefix".to_owned(), "content".to_owned()];
                    let values = [
                        ColumnValue::Text(prefix.as_bytes()),
                        ColumnValue::Text(content.as_ref()),
                    ];
                    let letter =
                        deadletter::bad_row(dlq, &columns, &values, None, position, &source);
                    (letter, Some(Reason::BadRow))
                }
                None => return Err(StreamError::BadRow { position, source }),
            },
        };
        let txn = self.tracker.record_sent()?;
        self.produce(txn, record, letter, commit_time).await
    }

    /// Creates the record's topic when needed, retrying while the broker is away
    /// and keeping the replication connection alive meanwhile.
    async fn ensure_topic(&mut self, topic: &str) -> Result<(), StreamError> {
        loop {
            let attempt = self.sink.ensure_topic(topic).await;
            match attempt {
                Ok(()) => return Ok(()),
                Err(e) if e.is_transient() => {
                    tracing::warn!(topic, error = %e, "cannot create topic yet; retrying");
                    let retry_at = Instant::now() + TOPIC_RETRY;
                    loop {
                        tokio::select! {
                            () = tokio::time::sleep_until(retry_at) => break,
                            _ = self.status_timer.tick() => self.send_status().await?,
                        }
                    }
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Hands `record`, counted for transaction `txn`, to the producer. A record the
    /// producer refuses for good is replaced by its dead letter (when a dead-letter
    /// topic is configured), which then counts for the transaction instead.
    async fn produce(
        &mut self,
        txn: TxnId,
        mut record: OutboxRecord,
        mut letter: Option<Reason>,
        commit_time: Option<SystemTime>,
    ) -> Result<(), StreamError> {
        self.ensure_topic(&record.topic).await?;
        loop {
            match self.sink.send(&record) {
                Ok(future) => {
                    let summary = RecordSummary::of(record, letter, commit_time);
                    self.deliveries.push(Box::pin(async move {
                        let result = match future.await {
                            Ok(Ok(_)) => Ok(()),
                            Ok(Err((error, _))) => Err(error),
                            Err(_canceled) => Err(KafkaError::Canceled),
                        };
                        (txn, summary, result)
                    }));
                    return Ok(());
                }
                Err(SendError::QueueFull) => {
                    // Backpressure: let one delivery finish, keep the server informed.
                    tokio::select! {
                        Some(done) = self.deliveries.next(), if !self.deliveries.is_empty() => self.delivered(done)?,
                        _ = self.status_timer.tick() => self.send_status().await?,
                    }
                }
                Err(SendError::Definite {
                    position,
                    topic,
                    source,
                }) => {
                    let summary = RecordSummary::of(record, letter, commit_time);
                    match self.letter_for(&summary, &source) {
                        Some((reason, replacement)) => {
                            record = replacement;
                            letter = Some(reason);
                            self.ensure_topic(&record.topic).await?;
                        }
                        None => {
                            return Err(SendError::Definite {
                                position,
                                topic,
                                source,
                            }
                            .into())
                        }
                    }
                }
                Err(other) => return Err(other.into()),
            }
        }
    }

    /// The dead letter replacing a refused record, or `None` when the record must
    /// stop the relay (no dead-letter topic, a transient error, or the record is
    /// itself a dead letter).
    fn letter_for(
        &self,
        summary: &RecordSummary,
        error: &KafkaError,
    ) -> Option<(Reason, OutboxRecord)> {
        deadletter::replacement(
            self.config.outbox.dead_letter_topic.as_deref(),
            summary,
            error,
        )
    }

    fn delivered(&mut self, (txn, summary, result): DeliveryResult) -> Result<(), StreamError> {
        match result {
            Ok(()) => {
                // Fault point (scenarios): a crash after the broker acknowledged,
                // before the position is confirmed; the server sends it again.
                let _ = failpoints::hit_blocking("relay.after-ack");
                self.tracker.acknowledged(txn)?;
                self.health.broker_progress();
                match summary.letter {
                    Some(reason) => self.metrics.dead_lettered(reason.into()),
                    None => {
                        self.metrics.events_routed(1);
                        self.metrics.bytes_routed(summary.bytes as u64);
                    }
                }
                if let Some(elapsed) = summary
                    .commit_time
                    .and_then(|t| SystemTime::now().duration_since(t).ok())
                {
                    self.metrics.set_behind_source_ms(
                        u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX),
                    );
                    self.metrics.commit_to_ack(elapsed);
                }
                Ok(())
            }
            Err(source) => match self.letter_for(&summary, &source) {
                // Still outstanding for `txn`: its dead letter takes its place.
                Some((reason, letter)) => {
                    self.letters
                        .push_back((txn, letter, reason, summary.commit_time));
                    Ok(())
                }
                None => Err(StreamError::Delivery(Box::new(DeliveryFailure {
                    position: summary.position,
                    id: summary.id,
                    topic: summary.topic,
                    source,
                }))),
            },
        }
    }

    /// Produces the dead letters of records the broker refused.
    async fn send_letters(&mut self) -> Result<(), StreamError> {
        while let Some((txn, letter, reason, commit_time)) = self.letters.pop_front() {
            self.produce(txn, letter, Some(reason), commit_time).await?;
        }
        Ok(())
    }

    async fn send_status(&mut self) -> Result<(), StreamError> {
        let flush = self.tracker.confirmable().max(self.sent_flush);
        self.stream
            .send_status(StandbyStatus {
                write: self.received.max(flush),
                flush,
                apply: flush,
                reply_requested: false,
            })
            .await?;
        if flush > self.sent_flush {
            tracing::debug!(lsn = %flush, "confirmed");
        }
        self.sent_flush = flush;
        self.metrics.set_confirmed_lsn(flush);
        Ok(())
    }
}

fn column_value(column: &pgoutput::Column) -> ColumnValue<'_> {
    match column {
        pgoutput::Column::Null => ColumnValue::Null,
        pgoutput::Column::UnchangedToast => ColumnValue::Unchanged,
        pgoutput::Column::Text(bytes) | pgoutput::Column::Binary(bytes) => {
            ColumnValue::Text(bytes.as_ref())
        }
    }
}
