//! The consumer: each message's effects applied once (DESIGN contract 3).
//!
//! ```text
//!  Kafka ──stream──▶ run loop ──lane per key──▶ task: BEGIN
//!    ▲   (paused at     │   (the first message     INSERT INTO processed_messages … ON CONFLICT DO NOTHING
//!    │    max_in_flight)│    of each idle lane       0 rows → ROLLBACK, done (a redelivery)
//!    │                  │    at hand: up to          1 row  → handler(tx, message) → COMMIT, done
//!    │                  │    batch_max a task)     or, given up: dead letter, acknowledged → done
//!    │                  ◀──────────── done ───────┘
//!    │  store_offsets(lowest offset not done)     (per partition)
//!    └─ commit: automatic every 5 s, on revocation, on shutdown (of stored offsets only)
//! ```
//!
//! Messages of different lanes that are at hand together (one poll returned them)
//! share one transaction, up to [`ConsumerConfig::batch_max`]: one journal
//! statement for all of them, their handlers, one commit; if anything in it fails,
//! it is rolled back and each message runs alone as drawn above (the `batch`
//! module says why that keeps every promise below).
//!
//! # Why each message's effects happen once
//!
//! Kafka delivers at least once: after a crash, a rebalance or a lost commit, messages
//! come again. The consumer makes that harmless with a journal: one PostgreSQL
//! transaction per message first inserts `(consumer, message id)` into
//! `processed_messages` and then runs the handler on the *same* transaction, so the
//! handler's writes (its effects and any outbox rows) and the journal row commit
//! together or not at all. A redelivered message finds its row: the insert affects no
//! row, the transaction is rolled back and the handler is not called. Two copies handled
//! at the same time (the old and the new owner of a partition during a rebalance) are
//! serialised by the primary key: the second insert waits for the first transaction
//! and then either finds the row (skip) or, if the first rolled back, inserts it.
//!
//! # Why no offset is committed before its work is durable
//!
//! The rdkafka `StreamConsumer` runs with
//! - `enable.auto.offset.store=false`: librdkafka would otherwise *store* each offset
//!   as it hands the message out, before the handler ran, and the next commit would
//!   skip the message after a crash;
//! - `enable.auto.commit=true`: librdkafka commits what has been *stored*, every
//!   `auto.commit.interval.ms`, when partitions are revoked and when the consumer
//!   closes. Only the consumer stores offsets, and only after the work below them is
//!   durable, so no automatic commit can get ahead of the work;
//! - `auto.offset.reset=earliest`: a group without a committed offset starts at the
//!   beginning; librdkafka's default (`latest`) would skip everything produced before
//!   the group's first start;
//! - `isolation.level` at its default, `read_committed`: records of aborted producer
//!   transactions are never handled.
//!
//! A message is *done* when its transaction committed, when it was found in the
//! journal, or when its dead letter was acknowledged by the broker. Messages of one
//! partition finish out of order (different keys run concurrently), so every partition
//! keeps the set of offsets in flight and the consumer stores the lowest of them, or
//! one past the highest received when none is left: the highest offset below which
//! everything is done. A crash between a commit and the next offset commit only causes
//! redeliveries, which the journal turns into no-ops.
//!
//! Offsets are stored with `store_offsets`, which takes the next offset to consume as
//! it is; the single-partition `store_offset` of rdkafka adds one itself.
//!
//! # Order and concurrency
//!
//! Messages with the same Kafka key are handled one after the other, in the order
//! they were received (offset order within a partition; the key is the lane, across
//! the subscribed topics, so a saga's messages never race each other). Messages
//! without a key are serialised per partition. Different lanes run concurrently. At
//! most `max_in_flight` messages are being handled or waiting in a lane; when that many
//! are, the consumer stops pulling from the stream until one is done (backpressure:
//! librdkafka prefetches up to its own queue limits, `queued.min.messages` and
//! `queued.max.messages.kbytes`, which can be lowered through `options`, and then
//! pauses fetching). Rebalance callbacks run only while the stream is polled, and a
//! member that does not poll for `max.poll.interval.ms` (5 minutes) leaves the group,
//! so a single message must be handled well within that time.
//!
//! # Failures
//!
//! - A transient failure (a [`HandlerError::Transient`] error, or a database error a
//!   retry can cure: serialization failure, deadlock, lost connection) rolls the
//!   transaction back, waits (`backoff`, doubling up to `max_backoff`) and runs the
//!   whole transaction again, up to `max_attempts` attempts in all; then the message
//!   is dead-lettered. The journal makes a retry after an ambiguous `COMMIT` (the
//!   connection broke while committing) safe: the retry finds the row and skips.
//!   When the database does not answer the consumer's own statements (beginning the
//!   transaction, the journal insert), that is an outage, not the message's fault:
//!   it is retried with the same backoff for as long as it lasts, without counting
//!   toward `max_attempts`, so a restarted database never sends messages to the
//!   dead-letter topic.
//! - A [`HandlerError::Definite`] error, a panicking handler and a poison message (no
//!   or invalid `id` header, a value that is not JSON, a key that is not UTF-8) are
//!   dead-lettered at once; other keys and the rest of the lane go on.
//! - A dead letter is the original key, value and headers, produced to
//!   `dead_letter_topic` (default `<group_id>.dlq`, created at start if missing) with
//!   the headers `dlq-reason`, `dlq-reason-code`, `dlq-source-topic`,
//!   `dlq-source-partition`, `dlq-source-offset` and `dlq-consumer`, by an idempotent
//!   producer with `acks=all`. The message counts as done only once the broker
//!   acknowledged it. If that fails, the offset is not stored and [`Consumer::run`]
//!   stops with [`ConsumerError::DeadLetter`]: the message comes again after a restart.
//!   A dead-lettered message gets no journal row, so it can be replayed once fixed.
//! - The consumer's own journal statements failing with an error no retry can cure
//!   (the table is missing, a permission is lacking) stop the consumer: that is a
//!   wrong schema, not a bad message, and dead-lettering everything would hide it.
//!
//! # Rebalances
//!
//! When partitions are revoked, their bookkeeping is dropped at once (inside
//! librdkafka's rebalance callback, before the revocation completes): no offset of a
//! revoked partition is stored afterwards, even when the same partition comes back
//! to this consumer (each assignment has its own generation). Messages of revoked
//! partitions that wait in a lane are dropped; those being handled run to their end
//! (their retries stop early, and they are not dead-lettered) and leave their offsets
//! uncommitted. The next owner starts at the last committed offset and handles them
//! again; the journal makes that safe, and its primary key makes the new owner wait
//! for a transaction of the old owner still running, so a key's effects stay in order.
//! Waiting for in-flight work inside the callback was not chosen: the callback runs
//! inside the stream's poll on the runtime, where it cannot wait for async tasks.
//!
//! What a member is assigned and what it loses can be watched with
//! [`Consumer::with_rebalance_observer`] (tests use it to show that a partition was
//! revoked while one of its messages was being handled).
//!
//! # Membership
//!
//! A member killed without leaving its group keeps its partitions until its session
//! times out (`session.timeout.ms`, 10 s here instead of librdkafka's 45 s, with
//! heartbeats every 3 s; both can be set through `options`). A member restarted
//! under the same [`ConsumerConfig::instance_id`] (static membership) takes its
//! predecessor's place at once, so a static member's session only has to outlast
//! a restart and stays at 45 s (a shorter one can expire between the takeover and
//! the new process's first heartbeat, and the membership just taken over is
//! lost); a second live member with the same id fences the first off, which stops
//! with [`ConsumerError::Fenced`]. A watchdog rejoins the group when the member
//! goes without partitions for [`ConsumerConfig::rejoin_after`] although the group
//! owes it some (the `membership` module says why and when), counted in
//! [`ConsumerStats::rejoins`].
//!
//! # Shutdown
//!
//! When the `shutdown` future resolves, [`Consumer::run`] stops pulling messages, lets
//! the messages being handled finish (the attempt that runs completes; no retry is
//! started, and a message waiting for its retry is left to the next run), stores their
//! offsets, commits the group's offsets synchronously, leaves the group and returns.
//! Messages waiting in a lane are not started; their offsets stay uncommitted. (A
//! member with an instance id would not leave on its own when it closes; it leaves
//! so that its partitions move at once. A consumer that stops with an error keeps
//! its membership, for the next run under the same id to take over.)

mod batch;
mod config;
mod dead_letter;
mod error;
mod handling;
mod lanes;
mod membership;
mod message;
mod offsets;
mod rebalance;
pub mod scope;
mod trace;

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use futures::{FutureExt, StreamExt};
use rdkafka::admin::AdminClient;
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{CommitMode, Consumer as _, StreamConsumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::FutureProducer;
use rdkafka::{Offset, TopicPartitionList};
use sqlx::PgPool;
use tokio::sync::watch;
use tracing::Instrument;

pub use config::{
    ConsumerConfig, DEAD_LETTER_SUFFIX, DEFAULT_BACKOFF, DEFAULT_BATCH_MAX,
    DEFAULT_HEARTBEAT_INTERVAL, DEFAULT_MAX_ATTEMPTS, DEFAULT_MAX_BACKOFF, DEFAULT_MAX_IN_FLIGHT,
    DEFAULT_REJOIN_AFTER, DEFAULT_SESSION_TIMEOUT, DEFAULT_STATIC_SESSION_TIMEOUT,
};
pub use dead_letter::{
    DeadLetterReason, DEAD_LETTER_PARTITIONS, DEAD_LETTER_REPLICATION_FACTOR, DEAD_LETTER_TIMEOUT,
    HEADER_CONSUMER, HEADER_REASON, HEADER_REASON_CODE, HEADER_SOURCE_OFFSET,
    HEADER_SOURCE_PARTITION, HEADER_SOURCE_TOPIC,
};
pub use error::{ConsumerError, MessagePosition};
pub use membership::MAX_REJOIN_WAIT;
pub use message::{HandlerError, IncomingMessage, MessageHandler, HEADER_ID, HEADER_TYPE};
pub use rebalance::RebalanceEvent;

use handling::{Outcome, Shared};
use lanes::{Finished, Work};
use membership::{fatal_error, Membership};
use message::RawMessage;
use offsets::OffsetTracker;
use rebalance::RebalanceHooks;

/// What became of the messages a consumer handled, counted since the counters were
/// created (they may outlive several [`Consumer`]s, e.g. across restarts).
#[derive(Debug, Default)]
pub struct ConsumerStats {
    applied: AtomicU64,
    duplicates: AtomicU64,
    retried: AtomicU64,
    dead_lettered: AtomicU64,
    rejoins: AtomicU64,
}

impl ConsumerStats {
    /// Messages whose transaction committed.
    pub fn applied(&self) -> u64 {
        self.applied.load(Ordering::Relaxed)
    }

    /// Redeliveries found in the journal and skipped.
    pub fn duplicates(&self) -> u64 {
        self.duplicates.load(Ordering::Relaxed)
    }

    /// Attempts that failed transiently and were rolled back to be tried again,
    /// and messages of a batch that was rolled back to run them alone.
    pub fn retried(&self) -> u64 {
        self.retried.load(Ordering::Relaxed)
    }

    /// Messages given up on and produced to the dead-letter topic.
    pub fn dead_lettered(&self) -> u64 {
        self.dead_lettered.load(Ordering::Relaxed)
    }

    /// Times a member without partitions left its group and joined it again
    /// ([`ConsumerConfig::rejoin_after`]).
    pub fn rejoins(&self) -> u64 {
        self.rejoins.load(Ordering::Relaxed)
    }

    fn count_rejoin(&self) {
        self.rejoins.fetch_add(1, Ordering::Relaxed);
    }
}

/// A consumer group member that applies each message once through `H`.
pub struct Consumer<H> {
    config: ConsumerConfig,
    pool: PgPool,
    handler: Arc<H>,
    /// Shared with the membership watchdog.
    consumer: Arc<StreamConsumer<RebalanceHooks>>,
    producer: FutureProducer,
    tracker: Arc<Mutex<OffsetTracker>>,
    stats: Arc<ConsumerStats>,
}

impl<H> std::fmt::Debug for Consumer<H> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Consumer")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl<H: MessageHandler> Consumer<H> {
    /// Creates the Kafka clients; nothing is subscribed before [`Consumer::run`].
    pub fn new(
        config: ConsumerConfig,
        pool: PgPool,
        handler: Arc<H>,
    ) -> Result<Consumer<H>, ConsumerError> {
        config.validate()?;
        let client_error = |source| ConsumerError::Client {
            group: config.group_id.clone(),
            source,
        };
        let tracker = Arc::new(Mutex::new(OffsetTracker::default()));
        let hooks = RebalanceHooks {
            tracker: Arc::clone(&tracker),
            observer: Mutex::new(None),
        };
        let consumer: StreamConsumer<RebalanceHooks> = config
            .consumer_config()
            .create_with_context(hooks)
            .map_err(client_error)?;
        let producer: FutureProducer = config.producer_config().create().map_err(client_error)?;
        Ok(Consumer {
            config,
            pool,
            handler,
            consumer: Arc::new(consumer),
            producer,
            tracker,
            stats: Arc::default(),
        })
    }

    /// Counts into `stats` instead of counters of its own.
    #[must_use]
    pub fn with_stats(mut self, stats: Arc<ConsumerStats>) -> Self {
        self.stats = stats;
        self
    }

    /// Calls `observer` with every partition assigned to or revoked from this member
    /// (replacing an observer given before). It runs inside librdkafka's rebalance
    /// callback, on the task that polls the stream: it must return quickly, must not
    /// block and must not panic.
    #[must_use]
    pub fn with_rebalance_observer(
        self,
        observer: impl Fn(&RebalanceEvent) + Send + Sync + 'static,
    ) -> Self {
        *lock(&self.consumer.context().observer) = Some(Box::new(observer));
        self
    }

    /// Consumes until `shutdown` resolves: stops fetching, lets handlers in flight
    /// finish, stores and commits their offsets, returns.
    ///
    /// Returns an error (after the same draining) when a dead letter cannot be
    /// produced, when the journal refuses its statements, or when the Kafka consumer
    /// fails fatally (among others, [`ConsumerError::Fenced`]: a second member runs
    /// with this one's instance id); nothing past the failed message is committed.
    ///
    /// Dropping the returned future instead aborts the handlers in flight: their
    /// transactions roll back and their offsets stay uncommitted, so they run again
    /// after a restart.
    pub async fn run(self, shutdown: impl Future<Output = ()> + Send) -> Result<(), ConsumerError> {
        let span = tracing::info_span!("consumer", group = %self.config.group_id);
        self.run_in_span(shutdown).instrument(span).await
    }

    async fn run_in_span(
        self,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<(), ConsumerError> {
        self.ensure_dead_letter_topic().await?;
        let topics: Vec<&str> = self.config.topics.iter().map(String::as_str).collect();
        self.consumer
            .subscribe(&topics)
            .map_err(|source| ConsumerError::Subscribe {
                topics: self.config.topics.clone(),
                source,
            })?;
        tracing::info!(
            topics = ?self.config.topics,
            dead_letter_topic = %self.config.dead_letter_topic,
            max_in_flight = self.config.max_in_flight,
            "consuming"
        );

        let (stop, stopped) = watch::channel(false);
        let shared = Arc::new(Shared {
            pool: self.pool.clone(),
            handler: Arc::clone(&self.handler),
            producer: self.producer.clone(),
            tracker: Arc::clone(&self.tracker),
            consumer: self.config.group_id.clone(),
            dead_letter_topic: self.config.dead_letter_topic.clone(),
            max_attempts: self.config.max_attempts,
            backoff: self.config.backoff,
            max_backoff: self.config.max_backoff,
            stats: Arc::clone(&self.stats),
            stopped,
        });
        // More transactions at once than the pool has connections would only wait.
        let connections = usize::try_from(self.pool.options().get_max_connections()).unwrap_or(1);
        let mut work = Work::new(
            shared,
            self.config.batch_max,
            connections.min(self.config.max_in_flight),
        );

        // Rejoins while the member has no partitions and should have some; stops
        // (aborted) with the loop.
        let watchdog = tokio::spawn(
            Membership {
                consumer: Arc::clone(&self.consumer),
                group: self.config.group_id.clone(),
                topics: self.config.topics.clone(),
                rejoin_after: self.config.rejoin_after,
                stats: Arc::clone(&self.stats),
            }
            .watch()
            .in_current_span(),
        );
        let mut failure = {
            let mut stream = self.consumer.stream();
            let mut shutdown = std::pin::pin!(shutdown);
            loop {
                tokio::select! {
                    biased;
                    () = &mut shutdown => {
                        tracing::info!(in_flight = work.tasks.len(), "shutting down");
                        break None;
                    }
                    Some(joined) = work.tasks.join_next() => {
                        if let Err(err) = self.finish(&mut work, joined, true) {
                            break Some(err);
                        }
                    }
                    next = stream.next(), if work.pending < self.config.max_in_flight => {
                        if let Err(err) = self.take(&mut work, next) {
                            break Some(err);
                        }
                        // What the stream has at hand joins this message, so that
                        // the ready ones start together.
                        let mut taken = Ok(());
                        while taken.is_ok() && work.pending < self.config.max_in_flight {
                            let Some(next) = stream.next().now_or_never() else {
                                break;
                            };
                            taken = self.take(&mut work, next);
                        }
                        if let Err(err) = taken {
                            break Some(err);
                        }
                    }
                }
                work.launch();
            }
        };
        watchdog.abort();
        if let Some(err) = &failure {
            tracing::error!(error = %err, in_flight = work.tasks.len(), "stopping");
        }

        // Drain: the messages being handled finish; nothing new starts.
        stop.send_replace(true);
        while let Some(joined) = work.tasks.join_next().await {
            if let Err(err) = self.finish(&mut work, joined, false) {
                tracing::error!(error = %err, "a message failed while stopping");
                failure.get_or_insert(err);
            }
        }
        match self.consumer.commit_consumer_state(CommitMode::Sync) {
            Ok(()) => tracing::info!("committed offsets"),
            // Nothing stored since the last commit.
            Err(KafkaError::ConsumerCommit(RDKafkaErrorCode::NoOffset)) => {}
            Err(err) => {
                tracing::error!(error = %err, "committing offsets failed");
                failure.get_or_insert(ConsumerError::Commit(err));
            }
        }
        if failure.is_none() {
            // A member with an instance id does not leave its group when it closes
            // (it expects to come back): leave now, so that its partitions go to the
            // other members at once rather than after the session timeout.
            self.consumer.unsubscribe();
        }
        failure.map_or(Ok(()), Err)
    }

    /// The error a fatal consumer error stops the consumer with: [`ConsumerError::Fenced`]
    /// when another member took this one's instance id.
    fn fatal(&self, err: KafkaError) -> ConsumerError {
        let cause = self.consumer.client().fatal_error();
        fatal_error(&self.config, err, cause.map(|(code, _)| code))
    }

    /// Creates the dead-letter topic unless it exists.
    async fn ensure_dead_letter_topic(&self) -> Result<(), ConsumerError> {
        let topic = &self.config.dead_letter_topic;
        let error = |source| ConsumerError::DeadLetterTopic {
            topic: topic.clone(),
            source,
        };
        let admin: AdminClient<DefaultClientContext> = self
            .config
            .client_config(scope::Kind::Producer)
            .create()
            .map_err(error)?;
        dead_letter::ensure_topic(&admin, topic)
            .await
            .map_err(error)
    }

    /// Books a finished message: stores the offset it allows, starts the next message
    /// of its lane (when `go_on`). Returns the error the consumer must stop with.
    fn finish(
        &self,
        work: &mut Work<H>,
        joined: Result<Vec<Finished>, tokio::task::JoinError>,
        go_on: bool,
    ) -> Result<(), ConsumerError> {
        let finished = joined.map_err(ConsumerError::Task)?;
        let mut fatal = None;
        for Finished {
            lane,
            topic,
            partition,
            offset,
            generation,
            outcome,
        } in finished
        {
            work.pending -= 1;
            match outcome {
                Outcome::Done => {
                    let storable = lock(&self.tracker).done(&topic, partition, generation, offset);
                    if let Some(next) = storable {
                        self.store(&topic, partition, next);
                    }
                }
                Outcome::Abandoned => {}
                Outcome::Fatal(err) => {
                    fatal.get_or_insert(err);
                }
            }
            if go_on && fatal.is_none() {
                work.start_next(lane);
            }
        }
        fatal.map_or(Ok(()), Err)
    }

    /// Takes what the stream gave: a message is accepted; returns the error the
    /// consumer must stop with.
    fn take(
        &self,
        work: &mut Work<H>,
        next: Option<rdkafka::error::KafkaResult<rdkafka::message::BorrowedMessage<'_>>>,
    ) -> Result<(), ConsumerError> {
        match next {
            Some(Ok(message)) => work.accept(RawMessage::of(&message)),
            // librdkafka reports a fatal error (a fenced member among them) to a
            // consumer as the code `Fatal`; the client holds the cause.
            Some(Err(
                err @ (KafkaError::MessageConsumptionFatal(_)
                | KafkaError::MessageConsumption(RDKafkaErrorCode::Fatal)),
            )) => return Err(self.fatal(err)),
            Some(Err(err)) => tracing::warn!(error = %err, "consumer error"),
            None => return Err(ConsumerError::Kafka(KafkaError::NoMessageReceived)),
        }
        Ok(())
    }

    /// Stores `next` as the partition's next offset to consume (committed later).
    fn store(&self, topic: &str, partition: i32, next: i64) {
        let mut list = TopicPartitionList::with_capacity(1);
        let stored = list
            .add_partition_offset(topic, partition, Offset::Offset(next))
            .and_then(|()| self.consumer.store_offsets(&list));
        match stored {
            Ok(()) => tracing::trace!(topic, partition, offset = next, "stored offset"),
            // Only a partition no longer assigned refuses; its next owner redoes the
            // messages, which the journal makes harmless.
            Err(err) => {
                tracing::warn!(topic, partition, offset = next, error = %err, "cannot store offset");
            }
        }
    }
}

/// The tracker and the observer stay consistent even if a holder panicked: every
/// update is a single step.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}
