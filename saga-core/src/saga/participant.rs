//! The participant's side of the envelope: reading a command and writing its reply
//! through the outbox, in the participant's own transaction.
//!
//! [`participate`] puts the barrier ([`crate::barrier`]) in front of the effect and
//! answers every command the orchestrator may still wait for:
//!
//! - The orchestrator resends a step's command under a new `request-id` when the
//!   reply did not come in time (a forward retry, a compensation retry) and applies
//!   only the reply carrying the request id it stored for the step. A duplicate of
//!   a command that was applied is therefore answered again, with the answer given
//!   the first time, under the duplicate's own request id and with the header
//!   [`HEADER_REPLAY`] set to `true`; the effect does not run again.
//! - A command sent again after the participant *refused* (a failure reply, then a
//!   retry of the definition's or an operator's) carries a higher attempt number
//!   ([`crate::saga::HEADER_ATTEMPT`]) and runs the effect again: a refusal changed
//!   nothing, and the retry exists because the world may have changed since. Only
//!   the same attempt again, or any attempt after a success, is a duplicate.
//! - That answer is the one that was sent: it is stored on the barrier row in the
//!   transaction that ran the effect and wrote the first reply
//!   ([`crate::barrier::record_answer`]), so both commit or neither does.
//! - Answering again is harmless: the orchestrator ignores a reply whose request id
//!   is not the one it waits for, so of the first reply and its replays exactly one
//!   is applied per attempt, and a replay for an attempt it gave up on is stale.
//! - A barrier row written before the answers were kept holds none: its duplicate is
//!   not answered (logged), as before. A hanging action is never answered: its
//!   compensation already ran, and the orchestrator no longer waits for it.

use serde::de::DeserializeOwned;
use serde::Serialize;
use sqlx::PgConnection;
use tracing::Instrument as _;
use uuid::Uuid;

use crate::consumer::IncomingMessage;
use crate::outbox::{Outbox, OutboxError, OutboxEvent};
use crate::saga::{
    HEADER_ATTEMPT, HEADER_COMPENSATION, HEADER_OUTCOME, HEADER_REPLAY, HEADER_REPLY_TO,
    HEADER_REQUEST_ID, HEADER_SAGA_ID, HEADER_SAGA_STEP, OUTCOME_FAILURE, OUTCOME_SUCCESS,
};

/// A saga command as a participant receives it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandEnvelope {
    pub saga_id: String,
    pub step: String,
    pub request_id: String,
    pub reply_to: String,
    /// The command's type (`type` header).
    pub command_type: String,
    /// Whether it undoes the step (the barrier's `Compensate`).
    pub compensation: bool,
    /// The orchestrator's number of this command among those it sent for the
    /// step's action or compensation ([`HEADER_ATTEMPT`]); 1 when the header is
    /// absent or unreadable.
    pub attempt: u32,
}

impl CommandEnvelope {
    /// Reads the saga headers of `message`; `None` when it is not a saga command.
    pub fn of(message: &IncomingMessage) -> Option<CommandEnvelope> {
        Some(CommandEnvelope {
            saga_id: message.header(HEADER_SAGA_ID)?.to_owned(),
            step: message.header(HEADER_SAGA_STEP)?.to_owned(),
            request_id: message.header(HEADER_REQUEST_ID)?.to_owned(),
            reply_to: message.header(HEADER_REPLY_TO)?.to_owned(),
            command_type: message.message_type.clone()?,
            compensation: message.header(HEADER_COMPENSATION) == Some("true"),
            attempt: message
                .header(HEADER_ATTEMPT)
                .and_then(|a| a.parse().ok())
                .filter(|a| *a >= 1)
                .unwrap_or(1),
        })
    }
}

/// How a participant answers a command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Success,
    Failure,
}

impl Outcome {
    /// The reply's `outcome` header (also stored as `saga_barrier.reply_outcome`).
    pub const fn as_str(self) -> &'static str {
        match self {
            Outcome::Success => OUTCOME_SUCCESS,
            Outcome::Failure => OUTCOME_FAILURE,
        }
    }

    /// The outcome an `outcome` header names; `None` for any other text.
    pub fn from_header(value: &str) -> Option<Outcome> {
        match value {
            OUTCOME_SUCCESS => Some(Outcome::Success),
            OUTCOME_FAILURE => Some(Outcome::Failure),
            _ => None,
        }
    }
}

/// Writes the reply to `command` into the outbox, in the participant's transaction
/// (with its barrier row and its business effect). `reply_type` names the reply
/// (`CreditReserved`, `CreditLimitExceeded`, ...), which the orchestrator's typed
/// handlers match on.
pub async fn reply(
    tx: &mut PgConnection,
    outbox: &Outbox,
    command: &CommandEnvelope,
    outcome: Outcome,
    reply_type: &str,
    payload: &impl Serialize,
) -> Result<Uuid, OutboxError> {
    publish_reply(tx, outbox, command, outcome, reply_type, payload, false).await
}

/// Writes a reply to `command`; `replay` marks an answer given again to a duplicate.
async fn publish_reply(
    tx: &mut PgConnection,
    outbox: &Outbox,
    command: &CommandEnvelope,
    outcome: Outcome,
    reply_type: &str,
    payload: &impl Serialize,
    replay: bool,
) -> Result<Uuid, OutboxError> {
    let event = reply_event(command, outcome, reply_type, payload, replay)?;
    outbox.publish(tx, &event).await
}

/// The reply to `command`; `replay` marks an answer given again to a duplicate.
fn reply_event(
    command: &CommandEnvelope,
    outcome: Outcome,
    reply_type: &str,
    payload: &impl Serialize,
    replay: bool,
) -> Result<OutboxEvent, OutboxError> {
    let mut event = OutboxEvent::new(
        command.reply_to.clone(),
        command.saga_id.clone(),
        reply_type,
        payload,
    )?
    .header(HEADER_SAGA_ID, command.saga_id.clone())
    .header(HEADER_SAGA_STEP, command.step.clone())
    .header(HEADER_REQUEST_ID, command.request_id.clone())
    .header(HEADER_OUTCOME, outcome.as_str());
    if replay {
        event = event.header(HEADER_REPLAY, "true");
    }
    Ok(event)
}

/// What a participant's business logic answers to a command.
#[derive(Debug, Clone, PartialEq)]
pub struct ParticipantReply {
    pub outcome: Outcome,
    /// The reply's type, e.g. `CreditReserved` or `CreditLimitExceeded`.
    pub reply_type: String,
    pub payload: serde_json::Value,
}

impl ParticipantReply {
    pub fn success(reply_type: impl Into<String>, payload: serde_json::Value) -> Self {
        ParticipantReply {
            outcome: Outcome::Success,
            reply_type: reply_type.into(),
            payload,
        }
    }

    pub fn failure(reply_type: impl Into<String>, payload: serde_json::Value) -> Self {
        ParticipantReply {
            outcome: Outcome::Failure,
            reply_type: reply_type.into(),
            payload,
        }
    }
}

/// The payload of the saga command `message` as `T`, checked before the barrier is
/// entered, so that a command that can never be applied is dead-lettered instead of
/// recorded as having run: it must be sent as a compensation exactly when
/// `compensation` says (the barrier decides by that header whether it undoes a
/// step, so a compensation sent as an action would take the action's place), and
/// its payload must read as `T`. Both mismatches are [`HandlerError::Definite`],
/// naming the command type.
///
/// [`HandlerError::Definite`]: crate::consumer::HandlerError::Definite
pub fn read_command<T: DeserializeOwned>(
    message: &IncomingMessage,
    compensation: bool,
) -> Result<T, crate::consumer::HandlerError> {
    use crate::consumer::HandlerError;
    let kind = message.message_type.as_deref().unwrap_or("a command");
    if (message.header(HEADER_COMPENSATION) == Some("true")) != compensation {
        return Err(HandlerError::definite(format!(
            "{kind} must be sent {}a compensation (header {HEADER_COMPENSATION})",
            if compensation { "as " } else { "not as " }
        )));
    }
    message.payload_as().map_err(|e| match e {
        HandlerError::Definite(reason) => HandlerError::definite(format!("{kind}: {reason}")),
        other => other,
    })
}

/// The error for a command `participant` does not handle (its types are
/// `handled`), or for a message without a type: definite, so it is dead-lettered.
pub fn unknown_command(
    message: &IncomingMessage,
    participant: &str,
    handled: &[&str],
) -> crate::consumer::HandlerError {
    let reason = match message.message_type.as_deref() {
        Some(other) => format!(
            "unknown command type {other:?}: {participant} handles {}",
            handled.join(", ")
        ),
        None => format!("message {} has no type header", message.id),
    };
    crate::consumer::HandlerError::definite(reason)
}

/// The business effect of a command, run in the participant's transaction.
pub type Effect<'c> =
    futures::future::BoxFuture<'c, Result<ParticipantReply, crate::consumer::HandlerError>>;

/// Handles a saga command in the participant's transaction: enters the barrier,
/// runs `effect` only when it proceeds, stores its answer on the barrier row and
/// writes the reply; all of it commits with the consumer's journal row.
///
/// A compensation for a step that never ran replies success without an effect
/// (null compensation, reply type `<command type>Skipped`), and that answer is
/// stored too. A later attempt after a refusal runs `effect` again. A duplicate
/// (the same attempt again, or any attempt after a success, under any request id)
/// runs nothing and is answered again with the stored answer under
/// its own request id, marked [`HEADER_REPLAY`]; a duplicate of a row without a
/// stored answer (written before answers were kept) is not answered. A command
/// arriving after its own compensation (hanging) does nothing and is not answered
/// — the orchestrator no longer waits for it. See the module documentation.
pub async fn participate<F>(
    tx: &mut PgConnection,
    outbox: &Outbox,
    message: &IncomingMessage,
    effect: F,
) -> Result<(), crate::consumer::HandlerError>
where
    F: for<'c> FnOnce(&'c mut PgConnection, &'c CommandEnvelope) -> Effect<'c>,
{
    use crate::barrier::{
        answer_arguments, enter_attempt, recorded_answer, BarrierOp, BarrierOutcome,
        RECORD_ANSWER_CTE,
    };
    use crate::consumer::HandlerError;

    let Some(command) = CommandEnvelope::of(message) else {
        return Err(HandlerError::definite(format!(
            "message {} is not a saga command (saga headers missing)",
            message.id
        )));
    };
    let op = if command.compensation {
        BarrierOp::Compensate
    } else {
        BarrierOp::Action
    };
    let answer = match enter_attempt(
        &mut *tx,
        &command.saga_id,
        &command.step,
        op,
        command.attempt,
    )
    .await
    .map_err(HandlerError::transient)?
    {
        BarrierOutcome::Proceed => {
            let span = effect_span(&command);
            effect(&mut *tx, &command).instrument(span).await?
        }
        BarrierOutcome::NullCompensation => {
            tracing::info!(saga_id = %command.saga_id, step = %command.step, "null compensation: the step never ran here");
            ParticipantReply::success(
                format!("{}Skipped", command.command_type),
                serde_json::json!({ "nullCompensation": true }),
            )
        }
        BarrierOutcome::Duplicate => {
            let Some(stored) =
                recorded_answer(&mut *tx, &command.saga_id, &command.step, op).await?
            else {
                tracing::warn!(
                    saga_id = %command.saga_id,
                    step = %command.step,
                    op = %op,
                    request_id = %command.request_id,
                    "duplicate command not answered: its barrier row holds no answer (written before answers were kept)"
                );
                return Ok(());
            };
            tracing::info!(
                saga_id = %command.saga_id,
                step = %command.step,
                op = %op,
                request_id = %command.request_id,
                reply = %stored.reply_type,
                "duplicate command: answered again with the stored answer"
            );
            publish_reply(
                tx,
                outbox,
                &command,
                stored.outcome,
                &stored.reply_type,
                &stored.payload,
                true,
            )
            .await
            .map_err(outbox_failure)?;
            return Ok(());
        }
        BarrierOutcome::Hanging => {
            tracing::info!(saga_id = %command.saga_id, step = %command.step, "hanging command skipped by the barrier: its compensation came first");
            return Ok(());
        }
    };
    // The answer stored on the barrier row and the reply in one statement.
    let event = reply_event(
        &command,
        answer.outcome,
        &answer.reply_type,
        &answer.payload,
        false,
    )
    .map_err(outbox_failure)?;
    let args = answer_arguments(&command.saga_id, &command.step, op, &answer)
        .map_err(HandlerError::transient)?;
    let written = outbox
        .publish_after(tx, &event, RECORD_ANSWER_CTE, "answered", args)
        .await
        .map_err(outbox_failure)?;
    if !written {
        // No barrier row to hold the answer: the same error `record_answer` gives.
        return Err(sqlx::Error::RowNotFound.into());
    }
    Ok(())
}

/// The span of a command's business effect, inside the handling of the command;
/// disabled when tracing is off.
fn effect_span(command: &CommandEnvelope) -> tracing::Span {
    if !telemetry::enabled() {
        return tracing::Span::none();
    }
    tracing::info_span!(
        "effect",
        otel.kind = "internal",
        otel.name = %format_args!("effect {}", command.command_type),
        "saga.id" = %command.saga_id,
        "saga.step" = %command.step,
        "saga.compensation" = command.compensation,
        "saga.attempt" = command.attempt,
        "saga.request_id" = %command.request_id,
    )
}

/// An outbox write that failed, as the consumer's error.
fn outbox_failure(e: OutboxError) -> crate::consumer::HandlerError {
    if e.is_transient() {
        crate::consumer::HandlerError::transient(e)
    } else {
        crate::consumer::HandlerError::definite(e.to_string())
    }
}
