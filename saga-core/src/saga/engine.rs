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
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use sqlx::{PgConnection, PgPool, Row};
use uuid::Uuid;

use crate::consumer::IncomingMessage;
use crate::outbox::{Outbox, OutboxEvent};
use crate::saga::clock::{Clock, SystemClock};
use crate::saga::definition::{Action, CompensationRetry, SagaData, SagaDefinition};
use crate::saga::{
    HEADER_ATTEMPT, HEADER_COMPENSATION, HEADER_OUTCOME, HEADER_REPLY_TO, HEADER_REQUEST_ID,
    HEADER_SAGA_ID, HEADER_SAGA_STEP, HEADER_SAGA_TYPE, OUTCOME_SUCCESS,
};
use crate::status::{SagaStatus, StepStatus};

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

    /// Sagas whose passed deadline the sweep could not handle (their state cannot
    /// be read or moved by this definition), with the reason, oldest first. They
    /// are left as they are for an operator, and tried again every
    /// [`SKIPPED_RETRY`].
    pub fn skipped_sagas(&self) -> Vec<(Uuid, String)> {
        let skipped = self.skipped.lock().unwrap_or_else(PoisonError::into_inner);
        let mut list: Vec<(Uuid, String)> = skipped
            .iter()
            .map(|(id, s)| (*id, s.reason.clone()))
            .collect();
        list.sort();
        list
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
        };
        self.advance(tx, &mut instance).await?;
        let (payload, steps) = self.serialise(&instance)?;
        sqlx::query(
            "INSERT INTO saga_state (id, saga_type, current_step, payload, status, step_status, version, deadline) \
             VALUES ($1, $2, $3, $4, $5, $6, 1, $7)",
        )
        .bind(id)
        .bind(&self.definition.name)
        .bind(&instance.current_step)
        .bind(payload)
        .bind(instance.status.as_str())
        .bind(steps)
        .bind(instance.deadline)
        .execute(&mut *tx)
        .await?;
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
        let status =
            status
                .parse()
                .map_err(|e: crate::status::UnknownStatus| SagaError::Invalid {
                    id,
                    reason: e.to_string(),
                })?;
        let payload: serde_json::Value = row.try_get("payload")?;
        let steps: serde_json::Value = row.try_get("step_status")?;
        Ok(SagaInstance {
            id,
            status,
            current_step: row.try_get("current_step")?,
            data: serde_json::from_value(payload).map_err(|e| SagaError::State(id, e))?,
            steps: serde_json::from_value(steps).map_err(|e| SagaError::State(id, e))?,
            version: row.try_get("version")?,
            deadline: row.try_get("deadline")?,
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
        let Some(index) = self.definition.step_index(&step) else {
            return Ok(ReplyDisposition::Stale);
        };
        let state = instance.steps.entry(step.clone()).or_default();
        if request.is_none() || state.request_id != request {
            return Ok(ReplyDisposition::Stale);
        }
        let forward = state.is(StepStatus::Started) && instance.status == SagaStatus::Started;
        let compensating = state.is(StepStatus::Compensating);
        if !forward && !compensating {
            return Ok(ReplyDisposition::Stale);
        }
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
            } else if state.attempts <= retries {
                state.status = None; // sent again by `advance`
            } else {
                state.set(StepStatus::Failed);
                state.reason = message.message_type.clone();
                instance.status = SagaStatus::Aborting;
            }
        } else {
            let state = instance.steps.entry(step.clone()).or_default();
            state.request_id = None;
            if success {
                state.set(StepStatus::Compensated);
            } else {
                self.compensation_failed(&mut instance, &step, message.message_type.clone());
            }
        }
        self.advance(tx, &mut instance).await?;
        self.save(tx, &instance).await?;
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
        instance.deadline = None;
        let state = instance.steps.entry(step.clone()).or_default();
        if state.is(StepStatus::Started) && instance.status == SagaStatus::Started {
            state.request_id = None;
            if state.attempts <= retries {
                state.status = None;
            } else {
                state.set(StepStatus::Failed);
                state.timed_out = true;
                state.reason = Some("timed out".to_owned());
                instance.status = SagaStatus::Aborting;
                tracing::info!(saga_id = %id, step = %step, "step timed out; compensating");
            }
        } else if state.is(StepStatus::Compensating) && state.request_id.is_some() {
            state.request_id = None;
            self.compensation_failed(
                &mut instance,
                &step,
                Some("compensation timed out".to_owned()),
            );
        }
        // Otherwise a compensation retry is due: `advance` runs it again.
        self.advance(tx, &mut instance).await?;
        self.save(tx, &instance).await?;
        Ok(true)
    }

    /// Handles every saga of this type whose deadline passed by the orchestrator's
    /// clock, each in its own transaction; a saga changed concurrently is left for
    /// the next sweep. A saga whose state this definition cannot handle is skipped,
    /// logged and listed by [`Orchestrator::skipped_sagas`] for [`SKIPPED_RETRY`],
    /// so that it never holds up the others; a database error ends the sweep.
    pub async fn sweep(&self, pool: &PgPool, limit: i64) -> Result<usize, SagaError> {
        let now = self.clock.now();
        let passed: Vec<Uuid> = {
            let mut skipped = self.skipped.lock().unwrap_or_else(PoisonError::into_inner);
            // Skipped sagas come back after a while: an operator may have mended them.
            skipped.retain(|_, s| s.retry_at > now);
            skipped.keys().copied().collect()
        };
        let due: Vec<Uuid> = sqlx::query_scalar(
            "SELECT id FROM saga_state WHERE saga_type = $1 AND status IN ('STARTED', 'ABORTING') \
             AND deadline <= $3 AND NOT (id = ANY($4)) ORDER BY deadline LIMIT $2",
        )
        .bind(&self.definition.name)
        .bind(limit)
        .bind(now)
        .bind(&passed)
        .fetch_all(pool)
        .await?;
        let mut handled = 0;
        for id in due {
            let mut tx = pool.begin().await?;
            match self.handle_deadline(&mut tx, id).await {
                Ok(changed) => {
                    tx.commit().await?;
                    handled += usize::from(changed);
                }
                Err(SagaError::Conflict(_)) => tx.rollback().await?,
                // The database's trouble, not the saga's: the next sweep tries again.
                Err(e) if e.is_transient() => return Err(e),
                // This saga's own trouble (its state does not fit the definition):
                // one bad saga must not hold up the timeouts and compensation
                // retries of every other, so it is left for an operator and the
                // sweep goes on.
                Err(e) => {
                    tx.rollback().await?;
                    let reason = e.to_string();
                    tracing::error!(saga = %self.definition.name, saga_id = %id, error = %reason, retry_in = ?SKIPPED_RETRY, "cannot handle the saga's passed deadline; skipped it");
                    let retry_at = now + SKIPPED_RETRY;
                    self.skipped
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .insert(id, Skipped { reason, retry_at });
                }
            }
        }
        Ok(handled)
    }

    /// Marks a failed compensation attempt: tried again after a backoff, or, once
    /// the retries' time is up, the saga is `COMPENSATION_FAILED`.
    fn compensation_failed(
        &self,
        instance: &mut SagaInstance<D>,
        step: &str,
        reason: Option<String>,
    ) {
        let retry: CompensationRetry = self.definition.compensation_retry;
        let now = self.clock.now();
        let state = instance.steps.entry(step.to_owned()).or_default();
        state.reason = reason;
        let since = *state.compensating_since.get_or_insert(now);
        let trying_for = (now - since).to_std().unwrap_or_default();
        if trying_for >= retry.give_up_after {
            instance.status = SagaStatus::CompensationFailed;
            tracing::error!(saga_id = %instance.id, step, attempts = state.attempts, trying_for = ?trying_for, reason = ?state.reason, "compensation failed for good");
        } else {
            let backoff = retry.backoff(state.attempts);
            tracing::warn!(saga_id = %instance.id, step, attempts = state.attempts, retry_in = ?backoff, reason = ?state.reason, "compensation failed; trying again");
            // The step stays COMPENSATING without a request: the sweeper tries again.
            instance.deadline = Some(now + backoff);
        }
    }

    /// Moves the instance as far as it can go without waiting: local steps run,
    /// the next command is sent, compensations walk backwards.
    pub(crate) async fn advance(
        &self,
        tx: &mut PgConnection,
        instance: &mut SagaInstance<D>,
    ) -> Result<(), SagaError> {
        loop {
            match instance.status {
                SagaStatus::Started => {
                    let next = self.definition.steps.iter().position(|s| {
                        !instance
                            .steps
                            .get(&s.name)
                            .is_some_and(|st| st.is(StepStatus::Succeeded))
                    });
                    let Some(index) = next else {
                        instance.finish(SagaStatus::Completed);
                        return Ok(());
                    };
                    let step = &self.definition.steps[index];
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
                            }
                            Err(failed) => {
                                let state = instance.steps.entry(step.name.clone()).or_default();
                                state.set_failed(failed.0, false);
                                instance.status = SagaStatus::Aborting;
                            }
                        },
                        Action::Participant(command) => {
                            state.attempts += 1;
                            let attempt = state.attempts;
                            let command = command(&instance.data);
                            let request = self
                                .send(tx, instance.id, &step.name, &command, false, attempt)
                                .await?;
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
                    let pending = self.definition.steps.iter().rposition(|s| {
                        instance.steps.get(&s.name).is_some_and(|st| {
                            st.is(StepStatus::Succeeded)
                                || st.is(StepStatus::Compensating)
                                || (st.is(StepStatus::Failed) && st.timed_out)
                        })
                    });
                    let Some(index) = pending else {
                        instance.finish(SagaStatus::Aborted);
                        return Ok(());
                    };
                    let step = &self.definition.steps[index];
                    instance.current_step = Some(step.name.clone());
                    let state = instance.steps.entry(step.name.clone()).or_default();
                    if state.is(StepStatus::Compensating)
                        && (state.request_id.is_some() || instance.deadline.is_some())
                    {
                        return Ok(()); // waiting for the reply, or for the retry's backoff
                    }
                    match &step.compensation {
                        None => state.set(StepStatus::Compensated),
                        Some(Action::Local(action)) => {
                            if !state.is(StepStatus::Compensating)
                                || state.compensating_since.is_none()
                            {
                                state.compensating_since = Some(self.clock.now());
                            }
                            state.set(StepStatus::Compensating);
                            state.attempts += 1;
                            match run_local(tx, action, &mut instance.data).await? {
                                Ok(()) => {
                                    let state =
                                        instance.steps.entry(step.name.clone()).or_default();
                                    state.set(StepStatus::Compensated);
                                }
                                Err(failed) => {
                                    // Retried when its backoff passes, or the saga is
                                    // COMPENSATION_FAILED past the bound.
                                    let name = step.name.clone();
                                    self.compensation_failed(instance, &name, Some(failed.0));
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
                            let request = self
                                .send(tx, instance.id, &step.name, &command, true, attempt)
                                .await?;
                            let state = instance.steps.entry(step.name.clone()).or_default();
                            state.request_id = Some(request);
                            let timeout = step.timeout.unwrap_or(DEFAULT_COMPENSATION_TIMEOUT);
                            instance.deadline = Some(self.clock.now() + timeout);
                            return Ok(());
                        }
                    }
                }
                SagaStatus::Aborted | SagaStatus::Completed | SagaStatus::CompensationFailed => {
                    return Ok(())
                }
            }
        }
    }

    /// Writes the command to the outbox with the saga envelope (`attempt`: its number
    /// among the commands sent for the step's action, or its compensation); returns
    /// its request id.
    async fn send(
        &self,
        tx: &mut PgConnection,
        id: Uuid,
        step: &str,
        command: &crate::saga::Command,
        compensation: bool,
        attempt: u32,
    ) -> Result<Uuid, SagaError> {
        let request = Uuid::now_v7();
        let event = OutboxEvent::new(
            command.topic.clone(),
            id.to_string(),
            command.command_type.clone(),
            &command.payload,
        )?
        .header(HEADER_SAGA_ID, id.to_string())
        .header(HEADER_SAGA_TYPE, self.definition.name.clone())
        .header(HEADER_SAGA_STEP, step)
        .header(HEADER_REQUEST_ID, request.to_string())
        .header(HEADER_REPLY_TO, self.reply_topic.clone())
        .header(HEADER_COMPENSATION, compensation.to_string())
        .header(HEADER_ATTEMPT, attempt.to_string());
        self.outbox.publish(tx, &event).await?;
        tracing::debug!(saga_id = %id, step, command = %command.command_type, compensation, attempt, "command sent");
        Ok(request)
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
        instance: &SagaInstance<D>,
    ) -> Result<(), SagaError> {
        self.save(tx, instance).await
    }

    /// Stores the instance if nobody changed it since it was loaded.
    async fn save(
        &self,
        tx: &mut PgConnection,
        instance: &SagaInstance<D>,
    ) -> Result<(), SagaError> {
        let (payload, steps) = self.serialise(instance)?;
        let updated = sqlx::query(
            "UPDATE saga_state SET current_step = $3, payload = $4, status = $5, step_status = $6, \
             deadline = $7, version = version + 1, updated_at = now() WHERE id = $1 AND version = $2",
        )
        .bind(instance.id)
        .bind(instance.version)
        .bind(&instance.current_step)
        .bind(payload)
        .bind(instance.status.as_str())
        .bind(steps)
        .bind(instance.deadline)
        .execute(&mut *tx)
        .await?;
        if updated.rows_affected() == 0 {
            self.conflicts.fetch_add(1, Ordering::Relaxed);
            return Err(SagaError::Conflict(instance.id));
        }
        Ok(())
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

impl<D: SagaData + Clone> Orchestrator<D> {
    /// Sweeps for passed deadlines every `interval` until `shutdown` resolves.
    pub async fn run_sweeper(
        &self,
        pool: &PgPool,
        interval: Duration,
        shutdown: impl std::future::Future<Output = ()>,
    ) {
        tokio::pin!(shutdown);
        let mut timer = tokio::time::interval(interval);
        timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = &mut shutdown => return,
                _ = timer.tick() => {
                    match self.sweep(pool, 100).await {
                        Ok(0) => {}
                        Ok(n) => tracing::debug!(saga = %self.definition.name, handled = n, "deadlines handled"),
                        Err(e) => tracing::warn!(saga = %self.definition.name, error = %e, "sweeping deadlines failed"),
                    }
                }
            }
        }
    }
}
