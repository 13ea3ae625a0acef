//! The orchestrator: runs saga instances of one definition against `saga_state`.
//!
//! Every change to an instance happens in one database transaction of the caller's:
//! the state row (checked and bumped `version`), the effects of local steps, and the
//! outbox rows of the commands it sends. So a command is sent exactly when the state
//! that expects its reply is stored, and the relay delivers it at least once.
//!
//! Why each step has one outcome:
//! - A reply is applied only if its `request-id` is the one stored for its step and
//!   the step still waits for it; a duplicate or late reply (after a timeout or a
//!   resend) finds another request id or another state and is ignored.
//! - Two orchestrator instances (or a reply racing the timeout sweeper) may load
//!   the same version; the update checks `version`, so only one commits. The loser
//!   gets [`SagaError::Conflict`], which the consumer retries: it reloads, sees the
//!   winner's state, and its reply is now stale or applies to the new state.
//!
//! Why a failed saga undoes exactly what ran:
//! - Compensation walks the steps backwards and compensates every step that
//!   succeeded, and a participant step that timed out (the participant may have run
//!   it; its barrier turns a compensation of a step that never ran into a no-op).
//!   A step whose participant replied failure did nothing, so it is not compensated.
//! - A compensation that fails (a failure reply, no reply within the step's timeout,
//!   a local compensation's error) is tried again after a backoff doubling up to a
//!   cap (the timeout sweeper finds it by `deadline`), for as long as the
//!   definition's [`CompensationRetry::give_up_after`] (a day by default): long
//!   enough to outlast a participant's outage, so a restart or an outage never
//!   leaves half-undone sagas behind. Only past it is the saga
//!   `COMPENSATION_FAILED`, where operators find it ([`SagaAdmin`]).
//! - Every command carries its attempt number (per step, per action or
//!   compensation). A participant answers a repeat of an attempt, or any attempt
//!   after a success, with its first answer, and runs a later attempt after a
//!   refusal again ([`crate::barrier`]): a retry really retries, and nothing runs
//!   twice.
//! - One saga never holds up the others: the sweeper handles each due saga in its
//!   own transaction, and one whose state this definition cannot handle (data that
//!   no longer parses, a step it does not know) is rolled back, logged, listed
//!   ([`Orchestrator::skipped_sagas`]) and left out of the sweeper's query for a
//!   while, so neither its error nor its old deadline keeps the sagas behind it from
//!   their timeouts and compensation retries.
//!
//! Where "now" comes from:
//! - Every "now" the orchestrator uses comes from its [`Clock`] ([`SystemClock`]
//!   unless [`Orchestrator::with_clock`] gave another): the deadlines it stores
//!   (step timeouts, compensation timeouts and backoffs), the check in
//!   [`Orchestrator::handle_deadline`], and the sweeper's query, which gets that time
//!   as a parameter instead of the database server's `now()`. So one clock decides
//!   when a deadline has passed: a skew between the service's and the database's
//!   clocks cannot make the query pick a saga that `handle_deadline` then finds not
//!   yet due (or the other way round). The row's `created_at` and `updated_at` stay
//!   the server's time stamps: they record when the row was written and decide
//!   nothing.
//! - Tests replace the clock with one they move by hand
//!   (`saga_core::testing::ManualClock`): a timeout passes when the test moves the
//!   clock past it, not after a sleep that hopes enough time went by.
//!
//! [`SagaAdmin`]: crate::saga::SagaAdmin

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use sqlx::{PgConnection, Row};
use uuid::Uuid;

use crate::consumer::IncomingMessage;
use crate::outbox::Outbox;
use crate::saga::audit::{self, EventKind, PendingEvent, Snapshot};
use crate::saga::clock::{Clock, SystemClock};
use crate::saga::definition::{SagaData, SagaDefinition};
use crate::saga::{
    HEADER_OUTCOME, HEADER_REPLAY, HEADER_REQUEST_ID, HEADER_SAGA_ID, HEADER_SAGA_STEP,
    OUTCOME_SUCCESS,
};
use crate::status::{SagaStatus, StepStatus};

mod advance;
mod sweep;

/// How long a participant compensation may take before it counts as failed, when
/// its step has no timeout of its own.
pub const DEFAULT_COMPENSATION_TIMEOUT: Duration = Duration::from_secs(30);

/// Why an operation on a saga failed.
#[derive(Debug, thiserror::Error)]
pub enum SagaError {
    /// Another transaction changed the saga first: reload and try again.
    #[error("saga {0} was changed concurrently")]
    Conflict(Uuid),
    #[error("saga {0} does not exist")]
    NotFound(Uuid),
    #[error("saga {id}: {reason}")]
    Invalid { id: Uuid, reason: String },
    #[error("saga state of {0} cannot be read")]
    State(Uuid, #[source] serde_json::Error),
    /// The audit trail does not rebuild `saga_state` (the report says where).
    #[error("the audit trail does not rebuild saga_state:\n{0}")]
    Trail(String),
    #[error("writing a saga message failed")]
    Outbox(#[from] crate::outbox::OutboxError),
    #[error("database error")]
    Database(#[from] sqlx::Error),
}

impl SagaError {
    /// Whether retrying the whole transaction may succeed.
    pub fn is_transient(&self) -> bool {
        match self {
            SagaError::Conflict(_) => true,
            SagaError::Database(e) => !matches!(e, sqlx::Error::RowNotFound),
            _ => false,
        }
    }
}

/// What became of a reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyDisposition {
    Applied,
    /// Not for the step's current request (duplicate, late, or after a timeout).
    Stale,
}

/// The stored state of one step.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepState {
    /// `None` until the step starts.
    pub status: Option<String>,
    /// The request the step waits for a reply to.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request_id: Option<Uuid>,
    /// Commands sent forward (or compensation attempts while compensating).
    #[serde(default)]
    pub attempts: u32,
    /// The step failed by timing out: the participant may have run it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub timed_out: bool,
    /// When the step's compensation began (or an operator last retried it): its
    /// retries end [`CompensationRetry::give_up_after`] later.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compensating_since: Option<chrono::DateTime<chrono::Utc>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

impl StepState {
    fn is(&self, status: StepStatus) -> bool {
        self.status.as_deref() == Some(status.as_str())
    }

    fn set(&mut self, status: StepStatus) {
        self.status = Some(status.as_str().to_owned());
    }

    /// Marks the step failed; `timed_out` when the participant may have run it.
    pub(crate) fn set_failed(&mut self, reason: String, timed_out: bool) {
        self.set(StepStatus::Failed);
        self.reason = Some(reason);
        self.timed_out = timed_out;
        self.request_id = None;
    }
}

/// A saga instance as loaded from `saga_state`.
#[derive(Debug, Clone)]
pub struct SagaInstance<D> {
    pub id: Uuid,
    pub status: SagaStatus,
    pub current_step: Option<String>,
    pub data: D,
    pub steps: BTreeMap<String, StepState>,
    pub version: i32,
    /// When the sweeper must look at it (a reply's timeout, a retry's backoff).
    pub deadline: Option<chrono::DateTime<chrono::Utc>>,
    /// What happened in the transition under way, for the audit trail (written when
    /// the instance is stored).
    pub(crate) trail: Vec<PendingEvent>,
    /// The state as it was loaded, so that the trail records what changed.
    pub(crate) loaded: Option<Snapshot>,
}

impl<D> SagaInstance<D> {
    /// Records an event of the transition under way.
    pub(crate) fn record(
        &mut self,
        kind: EventKind,
        step: Option<&str>,
        detail: serde_json::Value,
    ) {
        self.trail.push(PendingEvent::new(kind, step, detail));
    }
}

impl<D> SagaInstance<D> {
    /// Ends the saga in a terminal `status`: nothing is current, nothing is due.
    fn finish(&mut self, status: SagaStatus) {
        self.status = status;
        self.current_step = None;
        self.deadline = None;
    }
}

/// Runs sagas of one definition.
pub struct Orchestrator<D> {
    definition: Arc<SagaDefinition<D>>,
    outbox: Outbox,
    reply_topic: String,
    /// Saves that lost to a concurrent change of the same saga (and were retried
    /// or left to the next sweep).
    conflicts: AtomicU64,
    /// What "now" is for every deadline this orchestrator sets or checks.
    clock: Arc<dyn Clock>,
    /// Sagas the sweep could not handle (see [`Orchestrator::sweep`]): why, and
    /// when to try again.
    skipped: Mutex<HashMap<Uuid, Skipped>>,
}

/// How long the sweep leaves a saga it could not handle before trying it again.
pub const SKIPPED_RETRY: Duration = Duration::from_secs(300);

/// A saga the sweep skipped.
#[derive(Debug, Clone)]
struct Skipped {
    reason: String,
    retry_at: chrono::DateTime<chrono::Utc>,
}

impl<D> std::fmt::Debug for Orchestrator<D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Orchestrator")
            .field("saga", &self.definition.name)
            .field("reply_topic", &self.reply_topic)
            .finish()
    }
}

impl<D: SagaData + Clone> Orchestrator<D> {
    /// An orchestrator whose participants reply to `reply_topic` (e.g. `order.reply`).
    pub fn new(
        definition: SagaDefinition<D>,
        outbox: Outbox,
        reply_topic: impl Into<String>,
    ) -> Self {
        Orchestrator {
            definition: Arc::new(definition),
            outbox,
            reply_topic: reply_topic.into(),
            conflicts: AtomicU64::new(0),
            clock: Arc::new(SystemClock),
            skipped: Mutex::new(HashMap::new()),
        }
    }

    /// Reads the time from `clock` instead of the system clock: for every deadline
    /// it sets (step and compensation timeouts, compensation backoffs) and every
    /// check whether one has passed, the sweeper's included.
    #[must_use]
    pub fn with_clock(mut self, clock: impl Clock + 'static) -> Self {
        self.clock = Arc::new(clock);
        self
    }

    /// How many saves lost to a concurrent change of the same saga (another
    /// instance, or a reply racing the sweeper) since this orchestrator was made.
    pub fn version_conflicts(&self) -> u64 {
        self.conflicts.load(Ordering::Relaxed)
    }

    /// The definition this orchestrator runs.
    pub fn definition(&self) -> &SagaDefinition<D> {
        &self.definition
    }

    /// Starts a saga in the caller's transaction: runs its first local steps and
    /// sends the first command; everything commits with the caller's own writes.
    pub async fn start(
        &self,
        tx: &mut PgConnection,
        id: Uuid,
        data: D,
    ) -> Result<SagaInstance<D>, SagaError> {
        let mut instance = SagaInstance {
            id,
            status: SagaStatus::Started,
            current_step: None,
            data,
            steps: BTreeMap::new(),
            version: 0,
            deadline: None,
            trail: Vec::new(),
            loaded: None,
        };
        instance.record(EventKind::SagaStarted, None, serde_json::json!({}));
        self.advance(tx, &mut instance).await?;
        let after = self.snapshot(&instance)?;
        sqlx::query(
            "INSERT INTO saga_state (id, saga_type, current_step, payload, status, step_status, version, deadline) \
             VALUES ($1, $2, $3, $4, $5, $6, 1, $7)",
        )
        .bind(id)
        .bind(&self.definition.name)
        .bind(&instance.current_step)
        .bind(&after.payload)
        .bind(instance.status.as_str())
        .bind(sqlx::types::Json(&after.steps))
        .bind(instance.deadline)
        .execute(&mut *tx)
        .await?;
        self.write_trail(tx, &mut instance, 1, after).await?;
        instance.version = 1;
        Ok(instance)
    }

    /// Loads an instance of this saga type.
    pub async fn load(
        &self,
        conn: &mut PgConnection,
        id: Uuid,
    ) -> Result<SagaInstance<D>, SagaError> {
        let row = sqlx::query(
            "SELECT status, current_step, payload, step_status, version, deadline \
             FROM saga_state WHERE id = $1 AND saga_type = $2",
        )
        .bind(id)
        .bind(&self.definition.name)
        .fetch_optional(&mut *conn)
        .await?
        .ok_or(SagaError::NotFound(id))?;
        let status: String = row.try_get("status")?;
        let status: SagaStatus =
            status
                .parse()
                .map_err(|e: crate::status::UnknownStatus| SagaError::Invalid {
                    id,
                    reason: e.to_string(),
                })?;
        let payload: serde_json::Value = row.try_get("payload")?;
        let steps: serde_json::Value = row.try_get("step_status")?;
        let current_step: Option<String> = row.try_get("current_step")?;
        let deadline = row.try_get("deadline")?;
        let data = serde_json::from_value(payload.clone()).map_err(|e| SagaError::State(id, e))?;
        let step_states =
            serde_json::from_value(steps.clone()).map_err(|e| SagaError::State(id, e))?;
        let loaded = Snapshot {
            status: status.as_str().to_owned(),
            current_step: current_step.clone(),
            deadline,
            payload,
            steps: match steps {
                serde_json::Value::Object(steps) => steps,
                _ => serde_json::Map::new(),
            },
        };
        Ok(SagaInstance {
            id,
            status,
            current_step,
            data,
            steps: step_states,
            version: row.try_get("version")?,
            deadline,
            trail: Vec::new(),
            loaded: Some(loaded),
        })
    }

    /// Applies a participant's reply in the caller's transaction (the consumer's, with
    /// its journal row). A reply for another request or a step no longer waiting is
    /// [`ReplyDisposition::Stale`].
    pub async fn handle_reply(
        &self,
        tx: &mut PgConnection,
        message: &IncomingMessage,
    ) -> Result<ReplyDisposition, SagaError> {
        let header = |name: &str| message.header(name).map(str::to_owned);
        let Some(id) = header(HEADER_SAGA_ID).and_then(|v| v.parse::<Uuid>().ok()) else {
            return Err(SagaError::Invalid {
                id: Uuid::nil(),
                reason: format!("reply {} has no valid {HEADER_SAGA_ID} header", message.id),
            });
        };
        let step = header(HEADER_SAGA_STEP).unwrap_or_default();
        let request = header(HEADER_REQUEST_ID).and_then(|v| v.parse::<Uuid>().ok());
        let success = header(HEADER_OUTCOME).as_deref() == Some(OUTCOME_SUCCESS);
        let mut instance = self.load(tx, id).await?;
        let received = |applied: bool| {
            serde_json::json!({
                "message_id": message.id,
                "type": message.message_type,
                "outcome": header(HEADER_OUTCOME),
                "request_id": request,
                "replay": header(HEADER_REPLAY).as_deref() == Some("true"),
                "applied": applied,
                "topic": message.topic,
                "headers": message.headers,
            })
        };
        let Some(index) = self.definition.step_index(&step) else {
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
                if let Some(apply) = self.definition.steps[index].replies.get(kind) {
                    apply(&mut instance.data, payload.clone()).map_err(|e| SagaError::Invalid {
                        id,
                        reason: format!("reply {kind} of step {step} does not fit its type: {e}"),
                    })?;
                }
            }
            let retries = self.definition.steps[index].retries;
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
                    instance.status = SagaStatus::Aborting;
                }
                let detail = serde_json::json!({
                    "reason": message.message_type,
                    "timed_out": false,
                    "retrying": retrying,
                });
                instance.record(EventKind::StepFailed, Some(&step), detail);
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
                self.compensation_failed(&mut instance, &step, message.message_type.clone());
            }
        }
        self.advance(tx, &mut instance).await?;
        self.save(tx, &mut instance).await?;
        Ok(ReplyDisposition::Applied)
    }

    /// Handles a passed deadline of saga `id` in the caller's transaction: a reply
    /// that did not come (the step fails, or is sent again while retries are left),
    /// or a compensation retry that is due. Returns whether anything changed.
    pub async fn handle_deadline(
        &self,
        tx: &mut PgConnection,
        id: Uuid,
    ) -> Result<bool, SagaError> {
        let mut instance = self.load(tx, id).await?;
        let due = instance.deadline.is_some_and(|d| d <= self.clock.now());
        if !due || instance.status.is_terminal() {
            return Ok(false);
        }
        let Some(step) = instance.current_step.clone() else {
            return Ok(false);
        };
        let index = self
            .definition
            .step_index(&step)
            .ok_or_else(|| SagaError::Invalid {
                id,
                reason: format!("unknown step {step}"),
            })?;
        let retries = self.definition.steps[index].retries;
        let deadline = instance.deadline.take();
        let state = instance.steps.get(&step).cloned().unwrap_or_default();
        let waiting_forward =
            state.is(StepStatus::Started) && instance.status == SagaStatus::Started;
        let waiting_compensation = state.is(StepStatus::Compensating) && state.request_id.is_some();
        let what = if waiting_forward {
            "reply"
        } else if waiting_compensation {
            "compensation reply"
        } else {
            "compensation retry"
        };
        instance.record(
            EventKind::DeadlinePassed,
            Some(&step),
            serde_json::json!({"waited_for": what, "deadline": deadline}),
        );
        let state = instance.steps.entry(step.clone()).or_default();
        if waiting_forward {
            state.request_id = None;
            let retrying = state.attempts <= retries;
            if retrying {
                state.status = None;
            } else {
                state.set(StepStatus::Failed);
                state.timed_out = true;
                state.reason = Some("timed out".to_owned());
                instance.status = SagaStatus::Aborting;
                tracing::info!(saga_id = %id, step = %step, "step timed out; compensating");
            }
            let detail =
                serde_json::json!({"reason": "timed out", "timed_out": true, "retrying": retrying});
            instance.record(EventKind::StepFailed, Some(&step), detail);
        } else if waiting_compensation {
            state.request_id = None;
            self.compensation_failed(
                &mut instance,
                &step,
                Some("compensation timed out".to_owned()),
            );
        }
        // Otherwise a compensation retry is due: `advance` runs it again.
        self.advance(tx, &mut instance).await?;
        self.save(tx, &mut instance).await?;
        Ok(true)
    }

    fn serialise(
        &self,
        instance: &SagaInstance<D>,
    ) -> Result<(serde_json::Value, serde_json::Value), SagaError> {
        let payload =
            serde_json::to_value(&instance.data).map_err(|e| SagaError::State(instance.id, e))?;
        let steps =
            serde_json::to_value(&instance.steps).map_err(|e| SagaError::State(instance.id, e))?;
        Ok((payload, steps))
    }

    /// Stores the instance if nobody changed it since it was loaded (for the
    /// operator actions).
    pub(crate) async fn save_instance(
        &self,
        tx: &mut PgConnection,
        instance: &mut SagaInstance<D>,
    ) -> Result<(), SagaError> {
        self.save(tx, instance).await
    }

    /// The state the audit trail compares.
    fn snapshot(&self, instance: &SagaInstance<D>) -> Result<Snapshot, SagaError> {
        let (payload, steps) = self.serialise(instance)?;
        Ok(Snapshot {
            status: instance.status.as_str().to_owned(),
            current_step: instance.current_step.clone(),
            deadline: instance.deadline,
            payload,
            steps: match steps {
                serde_json::Value::Object(steps) => steps,
                _ => serde_json::Map::new(),
            },
        })
    }

    /// Writes the transition's events (the audit trail), once its change of
    /// `saga_state` passed the version check: with what it changed on the first,
    /// and the saga's change of status last.
    async fn write_trail(
        &self,
        tx: &mut PgConnection,
        instance: &mut SagaInstance<D>,
        version: i32,
        after: Snapshot,
    ) -> Result<(), SagaError> {
        let before = instance.loaded.as_ref();
        let from = before.map_or(SagaStatus::Started.as_str(), |b| b.status.as_str());
        if from != after.status {
            let detail = serde_json::json!({"from": from, "to": after.status});
            instance.record(EventKind::StatusChanged, None, detail);
        }
        let changes = audit::changes(&self.definition.name, instance.loaded.as_ref(), &after);
        if instance.trail.is_empty() && changes.is_some() {
            // Every path records its cause first; a change without one is still kept.
            instance.record(EventKind::StatusChanged, None, serde_json::json!({}));
        }
        let events = std::mem::take(&mut instance.trail);
        audit::write(
            tx,
            instance.id,
            &self.definition.name,
            version,
            self.clock.now(),
            &events,
            changes,
        )
        .await?;
        instance.loaded = Some(after);
        Ok(())
    }

    /// Records a reply no step waited for (the saga is unchanged).
    async fn record_stale(
        &self,
        tx: &mut PgConnection,
        instance: &mut SagaInstance<D>,
        step: &str,
        detail: serde_json::Value,
    ) -> Result<(), SagaError> {
        instance.trail.clear();
        instance.record(EventKind::ReplyReceived, Some(step), detail);
        let unchanged = self.snapshot(instance)?;
        self.write_trail(tx, instance, instance.version, unchanged)
            .await
    }

    /// Stores the instance if nobody changed it since it was loaded, with its
    /// events.
    async fn save(
        &self,
        tx: &mut PgConnection,
        instance: &mut SagaInstance<D>,
    ) -> Result<(), SagaError> {
        let after = self.snapshot(instance)?;
        let updated = sqlx::query(
            "UPDATE saga_state SET current_step = $3, payload = $4, status = $5, step_status = $6, \
             deadline = $7, version = version + 1, updated_at = now() WHERE id = $1 AND version = $2",
        )
        .bind(instance.id)
        .bind(instance.version)
        .bind(&instance.current_step)
        .bind(&after.payload)
        .bind(instance.status.as_str())
        .bind(sqlx::types::Json(&after.steps))
        .bind(instance.deadline)
        .execute(&mut *tx)
        .await?;
        if updated.rows_affected() == 0 {
            self.conflicts.fetch_add(1, Ordering::Relaxed);
            return Err(SagaError::Conflict(instance.id));
        }
        self.write_trail(tx, instance, instance.version + 1, after)
            .await?;
        instance.version += 1;
        Ok(())
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
