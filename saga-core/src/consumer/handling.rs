//! One message to its end: the journal transaction with the handler in it, the
//! retries of transient failures, the dead letter of a message given up on (see the
//! `consumer` module's documentation for why its effects happen once).

use std::panic::AssertUnwindSafe;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::FutureExt;
use rdkafka::producer::FutureProducer;
use sqlx::PgPool;
use tokio::sync::watch;
use tracing::Instrument as _;

use super::dead_letter::{self, DeadLetterReason};
use super::message::{is_transient_database_error, RawMessage};
use super::offsets::OffsetTracker;
use super::{lock, ConsumerError, ConsumerStats, HandlerError, IncomingMessage, MessageHandler};

/// The journal insert; its primary key is `(consumer, message_id)`.
const JOURNAL_INSERT: &str =
    "INSERT INTO processed_messages (consumer, message_id) VALUES ($1, $2) ON CONFLICT DO NOTHING";

/// What the message tasks share.
pub(super) struct Shared<H> {
    pub(super) pool: PgPool,
    pub(super) handler: Arc<H>,
    pub(super) producer: FutureProducer,
    pub(super) tracker: Arc<Mutex<OffsetTracker>>,
    /// The journal's consumer name (the group id).
    pub(super) consumer: String,
    pub(super) dead_letter_topic: String,
    pub(super) max_attempts: u32,
    pub(super) backoff: Duration,
    pub(super) max_backoff: Duration,
    pub(super) stats: Arc<ConsumerStats>,
    /// Becomes `true` when the consumer stops: no further attempts.
    pub(super) stopped: watch::Receiver<bool>,
}

/// Messages that must not run at the same time.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(super) enum Lane {
    /// All messages with this Kafka key.
    Key(Vec<u8>),
    /// Messages without a key, per partition.
    Keyless { topic: String, partition: i32 },
}

/// A message and the assignment generation of its partition.
pub(super) struct Job {
    pub(super) raw: RawMessage,
    pub(super) generation: u64,
    pub(super) lane: Lane,
}

pub(super) enum Outcome {
    /// Applied, found in the journal, or dead-lettered: the offset may be stored.
    Done,
    /// Left for the next run or the partition's next owner: the offset stays.
    Abandoned,
    /// The consumer must stop; the offset stays.
    Fatal(ConsumerError),
}

/// Why one attempt did not apply the message.
enum Failure {
    /// The database did not answer the consumer's own statements (begin, journal):
    /// an outage, not the message's fault. Retried until it answers or the consumer
    /// stops, without counting toward `max_attempts`.
    Unavailable(sqlx::Error),
    Transient(Box<dyn std::error::Error + Send + Sync>),
    Definite(String),
    Panicked(String),
    Fatal(sqlx::Error),
}

impl From<HandlerError> for Failure {
    fn from(err: HandlerError) -> Failure {
        match err {
            HandlerError::Transient(source) => Failure::Transient(source),
            HandlerError::Definite(reason) => Failure::Definite(reason),
        }
    }
}

/// What an attempt that succeeded did.
enum Applied {
    Committed,
    AlreadyProcessed,
}

/// Handles one message to its end: applied, skipped, dead-lettered or given back.
pub(super) async fn process<H: MessageHandler>(shared: &Shared<H>, job: &Job) -> Outcome {
    let message = match job.raw.parse() {
        Ok(message) => message,
        Err(reason) => {
            return dead_letter(shared, job, DeadLetterReason::Poison, &reason).await;
        }
    };
    let mut delay = shared.backoff;
    let mut attempt: u32 = 1;
    loop {
        let failure = match apply(shared, &message).await {
            Ok(Applied::Committed) => {
                tracing::debug!(attempt, "applied");
                shared.stats.applied.fetch_add(1, Ordering::Relaxed);
                return Outcome::Done;
            }
            Ok(Applied::AlreadyProcessed) => {
                tracing::debug!("already processed, skipped");
                shared.stats.duplicates.fetch_add(1, Ordering::Relaxed);
                return Outcome::Done;
            }
            Err(failure) => failure,
        };
        match failure {
            Failure::Unavailable(err) => {
                tracing::warn!(
                    attempt,
                    retry_in_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX),
                    error = %err,
                    "database unavailable, retrying"
                );
                // An outage says nothing about the message: this try does not count.
                attempt = attempt.saturating_sub(1);
            }
            Failure::Transient(err) => {
                let error = error_chain(err.as_ref());
                if attempt >= shared.max_attempts {
                    let reason = format!("gave up after {attempt} attempts: {error}");
                    return dead_letter(shared, job, DeadLetterReason::Exhausted, &reason).await;
                }
                tracing::warn!(
                    attempt,
                    retry_in_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX),
                    error = %error,
                    "transient failure, retrying"
                );
                shared.stats.retried.fetch_add(1, Ordering::Relaxed);
            }
            Failure::Definite(reason) => {
                return dead_letter(shared, job, DeadLetterReason::Definite, &reason).await;
            }
            Failure::Panicked(reason) => {
                let reason = format!("the handler panicked: {reason}");
                return dead_letter(shared, job, DeadLetterReason::Panicked, &reason).await;
            }
            Failure::Fatal(source) => {
                return Outcome::Fatal(ConsumerError::Journal {
                    message: Box::new(job.raw.position()),
                    source,
                });
            }
        }
        let mut stopped = shared.stopped.clone();
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            _ = stopped.wait_for(|stopped| *stopped) => {
                tracing::info!(attempt, "stopping, retry left to the next run");
                return Outcome::Abandoned;
            }
        }
        if !is_current(shared, job) {
            tracing::info!(attempt, "partition revoked, retry left to its next owner");
            return Outcome::Abandoned;
        }
        delay = (delay * 2).min(shared.max_backoff);
        attempt += 1;
    }
}

/// One transaction: journal row, handler, commit.
async fn apply<H: MessageHandler>(
    shared: &Shared<H>,
    message: &IncomingMessage,
) -> Result<Applied, Failure> {
    // Errors of the consumer's own statements: transient ones are retried, the
    // others mean a wrong schema or missing permissions.
    let own = |err: sqlx::Error| {
        if is_transient_database_error(&err) {
            Failure::Unavailable(err)
        } else {
            Failure::Fatal(err)
        }
    };
    let mut tx = shared.pool.begin().await.map_err(own)?;
    let inserted = sqlx::query(JOURNAL_INSERT)
        .bind(&shared.consumer)
        .bind(message.id)
        .execute(&mut *tx)
        .await
        .map_err(own)?
        .rows_affected();
    if inserted == 0 {
        rollback(tx).await;
        return Ok(Applied::AlreadyProcessed);
    }
    // Fault point (scenarios): a slow handler, holding its transaction open.
    let _ = failpoints::hit("consumer.before-handler").await;
    let span = super::trace::handling(&shared.consumer, message);
    let handled = AssertUnwindSafe(shared.handler.handle(&mut tx, message))
        .catch_unwind()
        .instrument(span.clone())
        .await;
    match handled {
        Ok(Ok(())) => {}
        Ok(Err(err)) => {
            super::trace::failed(&span, &err);
            rollback(tx).await;
            return Err(err.into());
        }
        Err(panic) => {
            rollback(tx).await;
            return Err(Failure::Panicked(panic_message(panic.as_ref())));
        }
    }
    // Fault point (scenarios): the handler's work done, then a failure before the
    // commit; the transaction rolls back like for any transient handler error.
    if let Err(injected) = failpoints::hit("consumer.before-commit").await {
        rollback(tx).await;
        return Err(Failure::Transient(Box::new(injected)));
    }
    // A deferred constraint of the handler's writes fails here: that is the
    // message's fault, like any definite handler error.
    tx.commit().await.map_err(HandlerError::from)?;
    // Fault point (scenarios): a crash after the commit, before the offset is
    // stored; the redelivery after the restart must be skipped by the journal.
    let _ = failpoints::hit("consumer.after-commit").await;
    Ok(Applied::Committed)
}

/// Rolls back; if that fails, the connection is closed by sqlx and the server rolls
/// back on its own.
pub(super) async fn rollback(tx: sqlx::Transaction<'_, sqlx::Postgres>) {
    if let Err(err) = tx.rollback().await {
        tracing::debug!(error = %err, "rollback failed");
    }
}

/// Produces the dead letter; the message is done once the broker acknowledged it.
async fn dead_letter<H>(
    shared: &Shared<H>,
    job: &Job,
    reason: DeadLetterReason,
    reason_text: &str,
) -> Outcome {
    if !is_current(shared, job) {
        tracing::info!("partition revoked, message left to its next owner");
        return Outcome::Abandoned;
    }
    let produced = dead_letter::produce(
        &shared.producer,
        &shared.dead_letter_topic,
        &shared.consumer,
        &job.raw,
        reason,
        reason_text,
    )
    .await;
    match produced {
        Ok(()) => {
            tracing::warn!(
                dead_letter_topic = %shared.dead_letter_topic,
                reason = reason.code(),
                detail = %reason_text,
                "dead-lettered"
            );
            shared.stats.dead_lettered.fetch_add(1, Ordering::Relaxed);
            Outcome::Done
        }
        Err(source) => Outcome::Fatal(ConsumerError::DeadLetter {
            message: Box::new(job.raw.position()),
            dead_letter_topic: shared.dead_letter_topic.clone(),
            source,
        }),
    }
}

pub(super) fn is_current<H>(shared: &Shared<H>, job: &Job) -> bool {
    lock(&shared.tracker).is_current(&job.raw.topic, job.raw.partition, job.generation)
}

/// The error and its sources, joined by ": ".
pub(super) fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    if let Some(text) = panic.downcast_ref::<&str>() {
        (*text).to_owned()
    } else if let Some(text) = panic.downcast_ref::<String>() {
        text.clone()
    } else {
        "a panic without message".to_owned()
    }
}
