//! The participant's side of the envelope: reading a command and writing its reply
//! through the outbox, in the participant's own transaction.

use serde::Serialize;
use sqlx::PgConnection;
use uuid::Uuid;

use crate::consumer::IncomingMessage;
use crate::outbox::{Outbox, OutboxError, OutboxEvent};
use crate::saga::{
    HEADER_COMPENSATION, HEADER_OUTCOME, HEADER_REPLY_TO, HEADER_REQUEST_ID, HEADER_SAGA_ID,
    HEADER_SAGA_STEP, OUTCOME_FAILURE, OUTCOME_SUCCESS,
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
        })
    }
}

/// How a participant answers a command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Success,
    Failure,
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
    let outcome = match outcome {
        Outcome::Success => OUTCOME_SUCCESS,
        Outcome::Failure => OUTCOME_FAILURE,
    };
    let event = OutboxEvent::new(
        command.reply_to.clone(),
        command.saga_id.clone(),
        reply_type,
        payload,
    )?
    .header(HEADER_SAGA_ID, command.saga_id.clone())
    .header(HEADER_SAGA_STEP, command.step.clone())
    .header(HEADER_REQUEST_ID, command.request_id.clone())
    .header(HEADER_OUTCOME, outcome);
    outbox.publish(tx, &event).await
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

/// The business effect of a command, run in the participant's transaction.
pub type Effect<'c> =
    futures::future::BoxFuture<'c, Result<ParticipantReply, crate::consumer::HandlerError>>;

/// Handles a saga command in the participant's transaction: enters the barrier,
/// runs `effect` only when it proceeds, and writes the reply; all of it commits with
/// the consumer's journal row. A duplicate command does nothing (its reply was
/// committed with the first); a compensation for a step that never ran replies
/// success without an effect (null compensation); a command arriving after its own
/// compensation (hanging) does nothing — the orchestrator no longer waits for it.
pub async fn participate<F>(
    tx: &mut PgConnection,
    outbox: &Outbox,
    message: &IncomingMessage,
    effect: F,
) -> Result<(), crate::consumer::HandlerError>
where
    F: for<'c> FnOnce(&'c mut PgConnection, &'c CommandEnvelope) -> Effect<'c>,
{
    use crate::barrier::{enter, BarrierOp, BarrierOutcome};
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
    let answer = match enter(&mut *tx, &command.saga_id, &command.step, op)
        .await
        .map_err(HandlerError::transient)?
    {
        BarrierOutcome::Proceed => effect(&mut *tx, &command).await?,
        BarrierOutcome::NullCompensation => {
            tracing::info!(saga_id = %command.saga_id, step = %command.step, "null compensation: the step never ran here");
            ParticipantReply::success(
                format!("{}Skipped", command.command_type),
                serde_json::json!({ "nullCompensation": true }),
            )
        }
        skipped @ (BarrierOutcome::Duplicate | BarrierOutcome::Hanging) => {
            tracing::info!(saga_id = %command.saga_id, step = %command.step, barrier = ?skipped, "command skipped by the barrier");
            return Ok(());
        }
    };
    reply(
        tx,
        outbox,
        &command,
        answer.outcome,
        &answer.reply_type,
        &answer.payload,
    )
    .await
    .map_err(|e| {
        if e.is_transient() {
            HandlerError::transient(e)
        } else {
            HandlerError::definite(e.to_string())
        }
    })?;
    Ok(())
}
