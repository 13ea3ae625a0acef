//! Applying a participant's reply: to the step that waits for its request, by the
//! definition of the saga's version; held for a saga this code cannot drive.

use sqlx::types::chrono;
use sqlx::PgConnection;
use uuid::Uuid;

use super::{Orchestrator, ReplyDisposition, SagaError};
use crate::consumer::IncomingMessage;
use crate::saga::audit::EventKind;
use crate::saga::definition::SagaData;
use crate::saga::{
    HEADER_OUTCOME, HEADER_REPLAY, HEADER_REQUEST_ID, HEADER_SAGA_ID, HEADER_SAGA_STEP,
    OUTCOME_SUCCESS,
};
use crate::status::{SagaStatus, StepStatus};

impl<D: SagaData + Clone> Orchestrator<D> {
    /// Applies a participant's reply in the caller's transaction (the consumer's, with
    /// its journal row). A reply for another request or a step no longer waiting is
    /// [`ReplyDisposition::Stale`]; one for a saga on a definition version this
    /// code cannot drive is kept for later ([`ReplyDisposition::Held`]).
    pub async fn handle_reply(
        &self,
        tx: &mut PgConnection,
        message: &IncomingMessage,
    ) -> Result<ReplyDisposition, SagaError> {
        self.apply_reply(tx, message, None).await
    }

    /// [`Orchestrator::handle_reply`]; `held_at`: when the reply was held, for
    /// one applied after a hold.
    pub(super) async fn apply_reply(
        &self,
        tx: &mut PgConnection,
        message: &IncomingMessage,
        held_at: Option<chrono::DateTime<chrono::Utc>>,
    ) -> Result<ReplyDisposition, SagaError> {
        let header = |name: &str| message.header(name).map(str::to_owned);
        let Some(id) = header(HEADER_SAGA_ID).and_then(|v| v.parse::<Uuid>().ok()) else {
            return Err(SagaError::Invalid {
                id: Uuid::nil(),
                reason: format!("reply {} has no valid {HEADER_SAGA_ID} header", message.id),
            });
        };
        let request = header(HEADER_REQUEST_ID).and_then(|v| v.parse::<Uuid>().ok());
        let success = header(HEADER_OUTCOME).as_deref() == Some(OUTCOME_SUCCESS);
        let mut instance = self.load(tx, id).await?;
        let received = |applied: bool| {
            let mut detail = serde_json::json!({
                "message_id": message.id,
                "type": message.message_type,
                "outcome": header(HEADER_OUTCOME),
                "request_id": request,
                "replay": header(HEADER_REPLAY).as_deref() == Some("true"),
                "applied": applied,
                "topic": message.topic,
                "headers": message.headers,
            });
            if let Some(at) = held_at {
                detail["held_at"] = serde_json::json!(at);
            }
            detail
        };
        let named = header(HEADER_SAGA_STEP).unwrap_or_default();
        if matches!(instance.status, SagaStatus::Completed | SagaStatus::Aborted) {
            // Nothing waits for a reply any more, whatever the version.
            self.record_stale(tx, &mut instance, &named, received(false))
                .await?;
            return Ok(ReplyDisposition::Stale);
        }
        let definition = match self.drive(&mut instance) {
            Ok(definition) => definition,
            Err(reason) => {
                self.hold(tx, &instance, message, &named, &reason).await?;
                return Ok(ReplyDisposition::Held);
            }
        };
        // The step that waits for this request; a saga moved onto a newer version
        // since the command was sent knows it by its new name.
        let step = request
            .and_then(|r| {
                let waiting = instance.steps.iter().find(|(_, s)| s.request_id == Some(r));
                waiting.map(|(name, _)| name.clone())
            })
            .unwrap_or(named);
        let Some(index) = definition.step_index(&step) else {
            self.record_stale(tx, &mut instance, &step, received(false))
                .await?;
            return Ok(ReplyDisposition::Stale);
        };
        let state = instance.steps.get(&step).cloned().unwrap_or_default();
        let forward = state.is(StepStatus::Started) && instance.status == SagaStatus::Started;
        let compensating = state.is(StepStatus::Compensating);
        if request.is_none() || state.request_id != request || (!forward && !compensating) {
            self.record_stale(tx, &mut instance, &step, received(false))
                .await?;
            return Ok(ReplyDisposition::Stale);
        }
        instance.record(EventKind::ReplyReceived, Some(&step), received(true));
        // The reply ends the wait: its timeout no longer applies.
        instance.deadline = None;
        if forward {
            if let (Some(kind), Some(payload)) = (message.message_type.as_deref(), &message.payload)
            {
                if let Some(apply) = definition.steps[index].replies.get(kind) {
                    apply(&mut instance.data, payload.clone()).map_err(|e| SagaError::Invalid {
                        id,
                        reason: format!("reply {kind} of step {step} does not fit its type: {e}"),
                    })?;
                }
            }
            let retries = definition.steps[index].retries;
            let state = instance.steps.entry(step.clone()).or_default();
            state.request_id = None;
            if success {
                state.set(StepStatus::Succeeded);
                instance.record(EventKind::StepSucceeded, Some(&step), serde_json::json!({}));
            } else {
                let retrying = state.attempts <= retries;
                if retrying {
                    state.status = None; // sent again by `advance`
                } else {
                    state.set(StepStatus::Failed);
                    state.reason = message.message_type.clone();
                }
                let detail = serde_json::json!({
                    "reason": message.message_type,
                    "timed_out": false,
                    "retrying": retrying,
                });
                instance.record(EventKind::StepFailed, Some(&step), detail);
                if !retrying {
                    self.fail_forward(&mut instance, definition, &step, false);
                }
            }
        } else {
            let state = instance.steps.entry(step.clone()).or_default();
            state.request_id = None;
            if success {
                state.set(StepStatus::Compensated);
                instance.record(
                    EventKind::CompensationDone,
                    Some(&step),
                    serde_json::json!({}),
                );
            } else {
                let reason = message.message_type.clone();
                self.compensation_failed(&mut instance, definition, &step, reason);
            }
        }
        self.advance(tx, &mut instance).await?;
        self.save(tx, &mut instance).await?;
        Ok(ReplyDisposition::Applied)
    }
}

/// The orchestrator as the handler of its reply topic: run it with a
/// [`crate::consumer::Consumer`]. A version conflict is a transient error, so the
/// consumer retries the message, which reloads the saga and re-applies the reply.
impl<D: SagaData + Clone> crate::consumer::MessageHandler for Orchestrator<D> {
    fn handle<'a>(
        &'a self,
        tx: &'a mut PgConnection,
        message: &'a IncomingMessage,
    ) -> futures::future::BoxFuture<'a, Result<(), crate::consumer::HandlerError>> {
        Box::pin(async move {
            match self.handle_reply(tx, message).await {
                Ok(ReplyDisposition::Applied) => Ok(()),
                Ok(ReplyDisposition::Stale) => {
                    tracing::debug!(message_id = %message.id, "stale saga reply ignored");
                    Ok(())
                }
                // Kept in this transaction, with the journal row: done here.
                Ok(ReplyDisposition::Held) => Ok(()),
                // A reply for a saga of another type on a shared topic.
                Err(SagaError::NotFound(id)) => {
                    tracing::debug!(saga_id = %id, "reply for an unknown saga ignored");
                    Ok(())
                }
                Err(e) if e.is_transient() => Err(crate::consumer::HandlerError::transient(e)),
                Err(e) => Err(crate::consumer::HandlerError::definite(e.to_string())),
            }
        })
    }
}
