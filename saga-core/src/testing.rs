//! Testing a participant's handler against a real database, without a broker:
//! saga commands built as the consumer hands them over, a handler run in a
//! transaction of its own as the consumer runs it, and the rows it left in the
//! outbox. And, for an orchestrator's tests, a [`ManualClock`] that lets a step's
//! timeout pass without waiting for it.
//!
//! ```no_run
//! # async fn example(pool: sqlx::PgPool, handler: impl saga_core::consumer::MessageHandler) {
//! use saga_core::outbox::Outbox;
//! use saga_core::testing::{handle, outbox_rows, SagaCommand};
//!
//! let reserve = SagaCommand::new("saga-1", "reserve-credit", "ReserveCredit")
//!     .reply_to("order.reply")
//!     .payload(serde_json::json!({ "amountCents": 500 }));
//! handle(&pool, &handler, &reserve.message()).await.unwrap();
//! let replies = outbox_rows(&pool, &Outbox::new()).await.unwrap();
//! assert_eq!(replies[0].header("outcome"), Some("success"));
//! # }
//! ```

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use serde_json::Value;
use sqlx::types::chrono;
use sqlx::PgPool;
use uuid::Uuid;

use crate::consumer::{HandlerError, IncomingMessage, MessageHandler, HEADER_ID, HEADER_TYPE};
use crate::outbox::Outbox;
use crate::saga::{
    Clock, HEADER_ATTEMPT, HEADER_COMPENSATION, HEADER_OUTCOME, HEADER_REPLAY, HEADER_REPLY_TO,
    HEADER_REQUEST_ID, HEADER_SAGA_ID, HEADER_SAGA_STEP,
};

/// A saga command as an orchestrator sends it: the step's request (or, with
/// [`SagaCommand::compensation`], its compensation) for one attempt.
#[derive(Clone, Debug)]
pub struct SagaCommand {
    topic: String,
    saga_id: String,
    step: String,
    command_type: String,
    compensation: bool,
    request_id: Uuid,
    attempt: u32,
    reply_to: String,
    payload: Value,
}

impl SagaCommand {
    /// Command `command_type` of step `step` of saga `saga_id`: an action, a new
    /// request id, replies to topic `reply`, an empty JSON object as payload.
    pub fn new(saga_id: impl ToString, step: &str, command_type: &str) -> SagaCommand {
        SagaCommand {
            topic: "request".to_owned(),
            saga_id: saga_id.to_string(),
            step: step.to_owned(),
            command_type: command_type.to_owned(),
            compensation: false,
            request_id: Uuid::now_v7(),
            attempt: 1,
            reply_to: "reply".to_owned(),
            payload: Value::Object(Default::default()),
        }
    }

    /// The step's compensation (`true`) or its action (`false`, the default).
    pub fn compensation(mut self, yes: bool) -> SagaCommand {
        self.compensation = yes;
        self
    }

    /// The attempt's request id (a resend of a step is a new attempt with a new id).
    pub fn request_id(mut self, request_id: Uuid) -> SagaCommand {
        self.request_id = request_id;
        self
    }

    /// The attempt's number (1, the default, for the first command of the step's
    /// action or compensation; a retry after a refusal sends a higher one).
    pub fn attempt(mut self, attempt: u32) -> SagaCommand {
        self.attempt = attempt;
        self
    }

    /// The topic (the outbox's `aggregatetype`) replies are to go to.
    pub fn reply_to(mut self, topic: &str) -> SagaCommand {
        self.reply_to = topic.to_owned();
        self
    }

    /// The topic the command arrives on.
    pub fn topic(mut self, topic: &str) -> SagaCommand {
        self.topic = topic.to_owned();
        self
    }

    /// The command's payload.
    pub fn payload(mut self, payload: Value) -> SagaCommand {
        self.payload = payload;
        self
    }

    /// The record as the consumer hands it to a handler. Each call is another
    /// record (a fresh message id), as when the orchestrator's outbox row is written
    /// twice; a redelivery of one record is the same message handled again.
    pub fn message(&self) -> IncomingMessage {
        let id = Uuid::now_v7();
        let headers: BTreeMap<String, String> = [
            (HEADER_ID, id.to_string()),
            (HEADER_TYPE, self.command_type.clone()),
            (HEADER_SAGA_ID, self.saga_id.clone()),
            (HEADER_SAGA_STEP, self.step.clone()),
            (HEADER_REQUEST_ID, self.request_id.to_string()),
            (HEADER_REPLY_TO, self.reply_to.clone()),
            (HEADER_COMPENSATION, self.compensation.to_string()),
            (HEADER_ATTEMPT, self.attempt.to_string()),
        ]
        .into_iter()
        .map(|(name, value)| (name.to_owned(), value))
        .collect();
        IncomingMessage {
            topic: self.topic.clone(),
            partition: 0,
            offset: 0,
            key: Some(self.saga_id.clone()),
            id,
            message_type: Some(self.command_type.clone()),
            headers,
            payload: Some(self.payload.clone()),
        }
    }
}

/// Runs `handler` on `message` in a transaction of its own that commits when the
/// handler succeeds and rolls back when it fails, as the consumer does (without
/// the journal: a redelivery reaches the handler again, which is how a test shows
/// what the handler itself does with a duplicate).
pub async fn handle(
    pool: &PgPool,
    handler: &impl MessageHandler,
    message: &IncomingMessage,
) -> Result<(), HandlerError> {
    let mut tx = pool
        .begin()
        .await
        .map_err(|e| HandlerError::transient(format!("begin: {e}")))?;
    let result = handler.handle(&mut tx, message).await;
    let end = if result.is_ok() {
        tx.commit().await
    } else {
        tx.rollback().await
    };
    end.map_err(|e| HandlerError::transient(format!("end of the transaction: {e}")))?;
    result
}

/// A row of an outbox table.
#[derive(Clone, Debug, PartialEq, sqlx::FromRow)]
pub struct OutboxRow {
    pub aggregatetype: String,
    pub aggregateid: String,
    /// Column `type`.
    #[sqlx(rename = "type")]
    pub kind: String,
    pub payload: Value,
    /// The `headers` column (a JSON object, or null without headers).
    pub headers: Value,
}

impl OutboxRow {
    /// Header `name`, when present and a string.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(Value::as_str)
    }
}

/// The rows in `outbox`'s table, oldest first (UUIDv7 ids order by time).
pub async fn outbox_rows(pool: &PgPool, outbox: &Outbox) -> sqlx::Result<Vec<OutboxRow>> {
    sqlx::query_as(&format!(
        "SELECT aggregatetype, aggregateid, type, payload, headers FROM {} ORDER BY id",
        outbox.table_name()
    ))
    .fetch_all(pool)
    .await
}

/// Asserts that reply `replay` answers a repeated command with exactly the answer
/// of `first`: the same type, payload, outcome, saga and step, marked as a replay
/// (and `first` not).
#[track_caller]
pub fn assert_replay(replay: &OutboxRow, first: &OutboxRow) {
    assert_eq!(
        first.header(HEADER_REPLAY),
        None,
        "a first answer: {first:?}"
    );
    assert_eq!(replay.header(HEADER_REPLAY), Some("true"), "{replay:?}");
    let answer = |row: &OutboxRow| {
        (
            row.aggregatetype.clone(),
            row.aggregateid.clone(),
            row.kind.clone(),
            row.payload.clone(),
            [HEADER_OUTCOME, HEADER_SAGA_ID, HEADER_SAGA_STEP]
                .map(|h| row.header(h).map(str::to_owned)),
        )
    };
    assert_eq!(answer(replay), answer(first));
}

/// A [`Clock`] that stands still until it is moved: give a clone to
/// [`Orchestrator::with_clock`](crate::saga::Orchestrator::with_clock) and
/// [`advance`](ManualClock::advance) it past a deadline instead of sleeping.
///
/// ```
/// use std::time::Duration;
/// use saga_core::saga::Clock;
/// use saga_core::testing::ManualClock;
///
/// let clock = ManualClock::new();
/// let start = clock.now();
/// clock.advance(Duration::from_secs(30));
/// assert_eq!((clock.now() - start).num_seconds(), 30);
/// ```
#[derive(Debug, Clone)]
pub struct ManualClock {
    now: Arc<Mutex<chrono::DateTime<chrono::Utc>>>,
}

impl ManualClock {
    /// A clock standing at the current time, to the microsecond (what `timestamptz`
    /// keeps), so a deadline read back from the database equals the one computed.
    pub fn new() -> ManualClock {
        let now = chrono::Utc::now();
        let now = chrono::DateTime::from_timestamp_micros(now.timestamp_micros())
            .expect("the current time is within the range of timestamps");
        ManualClock {
            now: Arc::new(Mutex::new(now)),
        }
    }

    /// Moves the clock (and every clone of it) forward by `by`.
    pub fn advance(&self, by: Duration) {
        let mut now = self.now.lock().unwrap_or_else(PoisonError::into_inner);
        *now += by;
    }
}

impl Default for ManualClock {
    fn default() -> ManualClock {
        ManualClock::new()
    }
}

impl Clock for ManualClock {
    fn now(&self) -> chrono::DateTime<chrono::Utc> {
        *self.now.lock().unwrap_or_else(PoisonError::into_inner)
    }
}
