//! The operator's view of sagas: what is stuck (and why) or failed, and the
//! actions that move a saga by hand: retry a failed compensation, abort a running
//! or suspended saga, send a waiting step's command again, restart a suspended
//! saga's failed step.

use serde_json::json;
use sqlx::postgres::PgRow;
use sqlx::types::chrono;
use sqlx::{PgPool, Row};
use uuid::Uuid;

use crate::saga::audit::{self, EventKind, PendingEvent};
use crate::saga::engine::{Orchestrator, SagaError, SagaInstance};
use crate::saga::SagaData;
use crate::status::{SagaStatus, StepStatus};

mod stuck;

pub use stuck::{StuckReason, StuckRules, StuckSaga, DEFAULT_STUCK_AFTER, DEFAULT_STUCK_TIMEOUTS};

/// One saga as an operator lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SagaSummary {
    pub id: Uuid,
    pub saga_type: String,
    /// The version of the definition it runs on.
    pub definition_version: u32,
    pub status: String,
    pub current_step: Option<String>,
    pub updated_at: chrono::DateTime<chrono::Utc>,
    pub deadline: Option<chrono::DateTime<chrono::Utc>>,
}

/// Operator actions over `saga_state`, each recorded in the saga's audit trail
/// with who took it.
#[derive(Debug, Clone)]
pub struct SagaAdmin {
    pool: PgPool,
    actor: String,
}

/// Who an operator action is recorded as when nobody said ([`SagaAdmin::acting_as`]).
pub const DEFAULT_ACTOR: &str = "operator";

impl SagaAdmin {
    pub fn new(pool: PgPool) -> SagaAdmin {
        SagaAdmin {
            pool,
            actor: DEFAULT_ACTOR.to_owned(),
        }
    }

    /// The database the sagas are in.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Records the actions taken through this handle as `actor`'s (a user name).
    #[must_use]
    pub fn acting_as(mut self, actor: impl Into<String>) -> SagaAdmin {
        self.actor = actor.into();
        self
    }

    /// Sagas in `COMPENSATION_FAILED`: they will not move without an operator.
    pub async fn failed(&self) -> Result<Vec<SagaSummary>, SagaError> {
        self.list("status = 'COMPENSATION_FAILED'").await
    }

    /// Sagas that wait for an operator: `COMPENSATION_FAILED` ones, and
    /// `SUSPENDED` ones (which compensate by themselves when their suspension
    /// ends), longest waiting first.
    pub async fn waiting_for_operator(&self) -> Result<Vec<SagaSummary>, SagaError> {
        self.list("status IN ('COMPENSATION_FAILED', 'SUSPENDED')")
            .await
    }

    /// How many sagas are in each status (for metrics: `COMPENSATION_FAILED` above
    /// zero needs someone's attention).
    pub async fn counts(&self) -> Result<Vec<(String, String, i64)>, SagaError> {
        let rows = sqlx::query(
            "SELECT saga_type, status, count(*) FROM saga_state GROUP BY 1, 2 ORDER BY 1, 2",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| Ok((r.try_get(0)?, r.try_get(1)?, r.try_get(2)?)))
            .collect::<Result<_, sqlx::Error>>()
            .map_err(SagaError::from)
    }

    /// The saga counts as Prometheus text: `saga_instances{saga_type, status}`.
    pub async fn prometheus(&self) -> Result<String, SagaError> {
        let mut text = String::from(
            "# HELP saga_instances Saga instances by type and status.\n# TYPE saga_instances gauge\n",
        );
        for (saga_type, status, count) in self.counts().await? {
            text.push_str(&format!(
                "saga_instances{{saga_type=\"{}\",status=\"{status}\"}} {count}\n",
                saga_type.replace('\\', "\\\\").replace('"', "\\\"")
            ));
        }
        Ok(text)
    }

    async fn list(&self, filter: &str) -> Result<Vec<SagaSummary>, SagaError> {
        let sql = format!(
            "SELECT id, saga_type, definition_version, status, current_step, updated_at, deadline \
             FROM saga_state WHERE {filter} ORDER BY updated_at"
        );
        let rows = sqlx::query(&sql).fetch_all(&self.pool).await?;
        rows.iter().map(summary_of).collect()
    }

    /// Tries the failed compensation of a `COMPENSATION_FAILED` saga again, then
    /// carries on compensating: a new attempt (the participant runs it even if it
    /// refused the last one), with the retries' full time before it gives up again.
    pub async fn retry_compensation<D: SagaData + Clone>(
        &self,
        orchestrator: &Orchestrator<D>,
        id: Uuid,
    ) -> Result<(), SagaError> {
        self.intervene(
            orchestrator,
            id,
            &[SagaStatus::CompensationFailed],
            SagaStatus::Aborting,
            json!({"action": "retry_compensation"}),
            |instance| {
                if let Some(step) = instance.current_step.clone() {
                    let state = instance.steps.entry(step).or_default();
                    // The attempt count goes on (the next command must be a new
                    // attempt to the participant's barrier); the time starts anew.
                    state.compensating_since = None;
                    state.request_id = None;
                    state.status = Some(StepStatus::Compensating.as_str().to_owned());
                }
                Ok(())
            },
        )
        .await
    }

    /// Aborts a running saga: its current step counts as failed (and, if it waited
    /// for a participant, as possibly run, so it is compensated too), then every
    /// completed step is compensated. A suspended saga's step failed already: it
    /// is compensated now rather than when its suspension ends.
    pub async fn abort<D: SagaData + Clone>(
        &self,
        orchestrator: &Orchestrator<D>,
        id: Uuid,
        reason: &str,
    ) -> Result<(), SagaError> {
        let action = json!({"action": "abort", "reason": reason});
        let from = [SagaStatus::Started, SagaStatus::Suspended];
        let aborting = SagaStatus::Aborting;
        self.intervene(orchestrator, id, &from, aborting, action, |instance| {
            if instance.status == SagaStatus::Suspended {
                return Ok(()); // its failure (and whether it timed out) stands
            }
            if let Some(step) = instance.current_step.clone() {
                let state = instance.steps.entry(step.clone()).or_default();
                let waited = state.request_id.is_some();
                let why = format!("aborted by an operator: {reason}");
                state.set_failed(why.clone(), waited);
                let detail = json!({"reason": why, "timed_out": waited, "retrying": false});
                instance.record(EventKind::StepFailed, Some(&step), detail);
            }
            Ok(())
        })
        .await
    }

    /// Sends the command of the step a running saga waits on again, as a new
    /// attempt with a new request id: for a command a participant never got, or
    /// whose reply was lost, without waiting for the step's timeout. The reply to
    /// the earlier attempt becomes stale; the participant's barrier answers the new
    /// attempt with its first answer if it ran the step already (or runs it again
    /// after a refusal), so nothing runs twice.
    pub async fn retry_step<D: SagaData + Clone>(
        &self,
        orchestrator: &Orchestrator<D>,
        id: Uuid,
    ) -> Result<(), SagaError> {
        let started = SagaStatus::Started;
        let action = json!({"action": "retry_step"});
        self.intervene(orchestrator, id, &[started], started, action, |instance| {
            let waiting = instance
                .current_step
                .clone()
                .and_then(|step| instance.steps.get_mut(&step))
                .filter(|s| s.is(StepStatus::Started) && s.request_id.is_some());
            let Some(state) = waiting else {
                return Err("is not waiting for a participant's reply".to_owned());
            };
            // `advance` sends it again; the attempt count goes on.
            state.status = None;
            state.request_id = None;
            Ok(())
        })
        .await
    }

    /// Restarts the failed step of a suspended saga ([`crate::saga::Suspension`]),
    /// once whatever made it fail is mended: its command is sent again as a new
    /// attempt (a local step runs again), and the saga runs on from there. A
    /// participant that refused the last attempt runs the new one; one that ran
    /// the step after all (a timed-out step whose command arrived late) answers
    /// with what it did then, so nothing runs twice.
    pub async fn restart_step<D: SagaData + Clone>(
        &self,
        orchestrator: &Orchestrator<D>,
        id: Uuid,
    ) -> Result<(), SagaError> {
        let from = [SagaStatus::Suspended];
        let action = json!({"action": "restart_step"});
        self.intervene(
            orchestrator,
            id,
            &from,
            SagaStatus::Started,
            action,
            |instance| {
                let failed = instance
                    .current_step
                    .clone()
                    .and_then(|step| instance.steps.get_mut(&step))
                    .filter(|s| s.is(StepStatus::Failed));
                let Some(state) = failed else {
                    return Err("has no failed step to restart".to_owned());
                };
                // `advance` runs it again; the attempt count goes on, so that the
                // participant's barrier sees a new attempt.
                state.status = None;
                state.request_id = None;
                state.timed_out = false;
                state.reason = None;
                Ok(())
            },
        )
        .await
    }

    /// Records in saga `id`'s trail an operator action taken beside it rather
    /// than on it (a message of the saga's replayed from a dead-letter topic):
    /// `action` with who took it, at the saga's current version; the saga itself
    /// is unchanged. Whether the saga is in this database (nothing is recorded
    /// when it is not).
    pub async fn record_action(
        &self,
        id: Uuid,
        mut action: serde_json::Value,
    ) -> Result<bool, SagaError> {
        let mut tx = self.pool.begin().await?;
        // The row lock orders the event after every change committed before it.
        let saga: Option<(String, i32)> =
            sqlx::query_as("SELECT saga_type, version FROM saga_state WHERE id = $1 FOR SHARE")
                .bind(id)
                .fetch_optional(&mut *tx)
                .await?;
        let Some((saga_type, version)) = saga else {
            return Ok(false);
        };
        action["actor"] = json!(self.actor);
        let event = PendingEvent::new(EventKind::OperatorAction, None, action);
        let now = sqlx::types::chrono::Utc::now();
        audit::write(&mut tx, id, &saga_type, version, now, &[event], None).await?;
        tx.commit().await?;
        Ok(true)
    }

    /// Changes a saga in one of the statuses `expected` by hand, puts it in status `then`
    /// (compensating, or running on) and lets it move: one transaction, under the
    /// same version check as every other change.
    async fn intervene<D: SagaData + Clone>(
        &self,
        orchestrator: &Orchestrator<D>,
        id: Uuid,
        expected: &[SagaStatus],
        then: SagaStatus,
        mut action: serde_json::Value,
        change: impl FnOnce(&mut SagaInstance<D>) -> Result<(), String>,
    ) -> Result<(), SagaError> {
        let mut tx = self.pool.begin().await?;
        let mut instance = orchestrator.load_to_drive(&mut tx, id).await?;
        if !expected.contains(&instance.status) {
            let expected: Vec<&str> = expected.iter().map(|s| s.as_str()).collect();
            return Err(SagaError::Invalid {
                id,
                reason: format!(
                    "is {}, this needs a {} saga",
                    instance.status,
                    expected.join(" or ")
                ),
            });
        }
        action["actor"] = json!(self.actor);
        let step = instance.current_step.clone();
        instance.record(EventKind::OperatorAction, step.as_deref(), action);
        change(&mut instance).map_err(|reason| SagaError::Invalid { id, reason })?;
        instance.status = then;
        instance.deadline = None;
        orchestrator.advance(&mut tx, &mut instance).await?;
        orchestrator.save_instance(&mut tx, &mut instance).await?;
        tx.commit().await?;
        Ok(())
    }
}

/// A saga as listed, from a row with its columns.
fn summary_of(r: &PgRow) -> Result<SagaSummary, SagaError> {
    let version: i32 = r.try_get("definition_version")?;
    Ok(SagaSummary {
        id: r.try_get("id")?,
        saga_type: r.try_get("saga_type")?,
        definition_version: u32::try_from(version).unwrap_or_default(),
        status: r.try_get("status")?,
        current_step: r.try_get("current_step")?,
        updated_at: r.try_get("updated_at")?,
        deadline: r.try_get("deadline")?,
    })
}
