//! Moving a saga on: local steps run, the next command is sent, compensations walk
//! backwards, failed compensations wait for their backoff.

use serde_json::json;
use sqlx::PgConnection;
use uuid::Uuid;

use super::{Orchestrator, SagaError, SagaInstance};
use crate::outbox::OutboxEvent;
use crate::saga::audit::EventKind;
use crate::saga::definition::{Action, SagaDefinition, DEFAULT_COMPENSATION_TIMEOUT};
use crate::saga::{
    SagaData, HEADER_ATTEMPT, HEADER_COMPENSATION, HEADER_REPLY_TO, HEADER_REQUEST_ID,
    HEADER_SAGA_ID, HEADER_SAGA_STEP, HEADER_SAGA_TYPE,
};
use crate::status::{SagaStatus, StepStatus};

impl<D: SagaData + Clone> Orchestrator<D> {
    /// Marks a failed compensation attempt: tried again after a backoff, or, once
    /// the retries' time is up, the saga is `COMPENSATION_FAILED`.
    pub(super) fn compensation_failed(
        &self,
        instance: &mut SagaInstance<D>,
        definition: &SagaDefinition<D>,
        step: &str,
        reason: Option<String>,
    ) {
        let retry = definition.compensation_retry;
        let now = self.clock.now();
        let state = instance.steps.entry(step.to_owned()).or_default();
        state.reason = reason.clone();
        let since = *state.compensating_since.get_or_insert(now);
        let trying_for = (now - since).to_std().unwrap_or_default();
        let attempt = state.attempts;
        let detail = if trying_for >= retry.give_up_after {
            instance.status = SagaStatus::CompensationFailed;
            tracing::error!(saga_id = %instance.id, step, attempts = attempt, trying_for = ?trying_for, reason = ?reason, "compensation failed for good");
            json!({"reason": reason, "attempt": attempt, "gave_up": true})
        } else {
            let backoff = retry.backoff(attempt);
            tracing::warn!(saga_id = %instance.id, step, attempts = attempt, retry_in = ?backoff, reason = ?reason, "compensation failed; trying again");
            // The step stays COMPENSATING without a request: the sweeper tries again.
            let retry_at = now + backoff;
            instance.deadline = Some(retry_at);
            json!({"reason": reason, "attempt": attempt, "retry_at": retry_at})
        };
        instance.record(EventKind::CompensationFailed, Some(step), detail);
    }

    /// Moves the instance as far as it can go without waiting, by the definition
    /// of its version: local steps run, the next command is sent, compensations
    /// walk backwards.
    pub(crate) async fn advance(
        &self,
        tx: &mut PgConnection,
        instance: &mut SagaInstance<D>,
    ) -> Result<(), SagaError> {
        let definition = self.definition_of(instance)?;
        loop {
            match instance.status {
                SagaStatus::Started => {
                    // The first step not done yet (a step a migration added behind
                    // the saga counts as done).
                    let next = definition.steps.iter().position(|s| {
                        !instance.steps.get(&s.name).is_some_and(|st| st.is_passed())
                    });
                    let Some(index) = next else {
                        instance.finish(SagaStatus::Completed);
                        return Ok(());
                    };
                    let step = &definition.steps[index];
                    instance.current_step = Some(step.name.clone());
                    let state = instance.steps.entry(step.name.clone()).or_default();
                    if state.is(StepStatus::Started) && state.request_id.is_some() {
                        return Ok(()); // waiting for the reply
                    }
                    match &step.action {
                        Action::Local(action) => match run_local(tx, action, &mut instance.data)
                            .await?
                        {
                            Ok(()) => {
                                let state = instance.steps.entry(step.name.clone()).or_default();
                                state.set(StepStatus::Succeeded);
                                instance.record(
                                    EventKind::StepSucceeded,
                                    Some(&step.name),
                                    json!({"local": true}),
                                );
                            }
                            Err(failed) => {
                                let detail = json!({"reason": failed.0, "timed_out": false, "retrying": false, "local": true});
                                let state = instance.steps.entry(step.name.clone()).or_default();
                                state.set_failed(failed.0, false);
                                instance.record(EventKind::StepFailed, Some(&step.name), detail);
                                self.fail_forward(instance, definition, &step.name, false);
                            }
                        },
                        Action::Participant(command) => {
                            state.attempts += 1;
                            let attempt = state.attempts;
                            let command = command(&instance.data);
                            instance.record(
                                EventKind::StepStarted,
                                Some(&step.name),
                                json!({"attempt": attempt}),
                            );
                            let request =
                                self.send(instance, &step.name, &command, false, attempt)?;
                            let state = instance.steps.entry(step.name.clone()).or_default();
                            state.set(StepStatus::Started);
                            state.request_id = Some(request);
                            instance.deadline = step.timeout.map(|t| self.clock.now() + t);
                            return Ok(());
                        }
                    }
                }
                SagaStatus::Aborting => {
                    // The last step that needs undoing, walking backwards.
                    let pending = definition.steps.iter().rposition(|s| {
                        instance
                            .steps
                            .get(&s.name)
                            .is_some_and(|st| st.needs_undoing())
                    });
                    let Some(index) = pending else {
                        instance.finish(SagaStatus::Aborted);
                        return Ok(());
                    };
                    let step = &definition.steps[index];
                    instance.current_step = Some(step.name.clone());
                    let state = instance.steps.entry(step.name.clone()).or_default();
                    if state.is(StepStatus::Compensating)
                        && (state.request_id.is_some() || instance.deadline.is_some())
                    {
                        return Ok(()); // waiting for the reply, or for the retry's backoff
                    }
                    match &step.compensation {
                        None => {
                            state.set(StepStatus::Compensated);
                            let detail = json!({"nothing_to_undo": true});
                            instance.record(EventKind::CompensationDone, Some(&step.name), detail);
                        }
                        Some(Action::Local(action)) => {
                            if !state.is(StepStatus::Compensating)
                                || state.compensating_since.is_none()
                            {
                                state.compensating_since = Some(self.clock.now());
                            }
                            state.set(StepStatus::Compensating);
                            state.attempts += 1;
                            let detail = json!({"attempt": state.attempts, "local": true});
                            instance.record(
                                EventKind::CompensationStarted,
                                Some(&step.name),
                                detail,
                            );
                            match run_local(tx, action, &mut instance.data).await? {
                                Ok(()) => {
                                    let state =
                                        instance.steps.entry(step.name.clone()).or_default();
                                    state.set(StepStatus::Compensated);
                                    instance.record(
                                        EventKind::CompensationDone,
                                        Some(&step.name),
                                        json!({"local": true}),
                                    );
                                }
                                Err(failed) => {
                                    // Retried when its backoff passes, or the saga is
                                    // COMPENSATION_FAILED past the bound.
                                    let name = step.name.clone();
                                    let reason = Some(failed.0);
                                    self.compensation_failed(instance, definition, &name, reason);
                                    return Ok(());
                                }
                            }
                        }
                        Some(Action::Participant(command)) => {
                            if !state.is(StepStatus::Compensating) {
                                state.attempts = 0;
                                state.compensating_since = None;
                            }
                            if state.compensating_since.is_none() {
                                state.compensating_since = Some(self.clock.now());
                            }
                            state.set(StepStatus::Compensating);
                            state.attempts += 1;
                            let attempt = state.attempts;
                            let command = command(&instance.data);
                            instance.record(
                                EventKind::CompensationStarted,
                                Some(&step.name),
                                json!({"attempt": attempt}),
                            );
                            let request =
                                self.send(instance, &step.name, &command, true, attempt)?;
                            let state = instance.steps.entry(step.name.clone()).or_default();
                            state.request_id = Some(request);
                            let timeout = step.timeout.unwrap_or(DEFAULT_COMPENSATION_TIMEOUT);
                            instance.deadline = Some(self.clock.now() + timeout);
                            return Ok(());
                        }
                    }
                }
                SagaStatus::Suspended
                | SagaStatus::Aborted
                | SagaStatus::Completed
                | SagaStatus::CompensationFailed => return Ok(()),
            }
        }
    }

    /// Queues the command with the saga envelope (`attempt`: its number among the
    /// commands sent for the step's action, or its compensation) for the outbox, to
    /// be written with the state that waits for its reply; returns its request id.
    fn send(
        &self,
        instance: &mut SagaInstance<D>,
        step: &str,
        command: &crate::saga::Command,
        compensation: bool,
        attempt: u32,
    ) -> Result<Uuid, SagaError> {
        let id = instance.id;
        let request = Uuid::now_v7();
        // The name the participant knows the step by (its barrier's branch).
        let branch = instance.steps.get(step).and_then(|s| s.branch.clone());
        let event = OutboxEvent::new(
            command.topic.clone(),
            id.to_string(),
            command.command_type.clone(),
            &command.payload,
        )?
        .header(HEADER_SAGA_ID, id.to_string())
        .header(HEADER_SAGA_TYPE, self.definition().name.clone())
        .header(HEADER_SAGA_STEP, branch.as_deref().unwrap_or(step))
        .header(HEADER_REQUEST_ID, request.to_string())
        .header(HEADER_REPLY_TO, self.reply_topic.clone())
        .header(HEADER_COMPENSATION, compensation.to_string())
        .header(HEADER_ATTEMPT, attempt.to_string());
        instance.record(
            EventKind::CommandSent,
            Some(step),
            json!({
                "message_id": event.id,
                "type": event.event_type,
                "topic": event.aggregate_type,
                "request_id": request,
                "attempt": attempt,
                "compensation": compensation,
                "headers": event.headers,
            }),
        );
        tracing::debug!(saga_id = %id, step, command = %command.command_type, compensation, attempt, "command sent");
        // Written with the state that waits for its reply.
        instance.outgoing.push(event);
        Ok(request)
    }
}

/// Runs a local action inside a savepoint: its writes are undone when it fails.
async fn run_local<D>(
    tx: &mut PgConnection,
    action: &crate::saga::definition::LocalFn<D>,
    data: &mut D,
) -> Result<Result<(), crate::saga::StepFailed>, SagaError> {
    sqlx::query("SAVEPOINT saga_step").execute(&mut *tx).await?;
    let outcome = action(data, &mut *tx).await;
    let end = if outcome.is_ok() {
        "RELEASE SAVEPOINT saga_step"
    } else {
        "ROLLBACK TO SAVEPOINT saga_step"
    };
    sqlx::query(end).execute(&mut *tx).await?;
    Ok(outcome)
}
