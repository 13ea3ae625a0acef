//! The orchestrator: runs saga instances of one definition against `saga_state`,
//! each by the version of the definition it started with
//! ([`versions`](crate::saga::versions)).
//!
//! Every change to an instance happens in one database transaction of the caller's:
//! the state row (checked and bumped `version`), the effects of local steps, and the
//! outbox rows of the commands it sends. So a command is sent exactly when the state
//! that expects its reply is stored, and the relay delivers it at least once.
//!
//! Why each step has one outcome:
//! - A reply is applied only to the step that stores its `request-id` (unique per
//!   command sent), and only while that step waits for it; a duplicate or late
//!   reply (after a timeout or a resend) finds another request id or another state
//!   and is ignored. The request id, not the `saga-step` header, finds the step, so
//!   a reply to a command sent before a migration renamed its step still finds it.
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
//! - A definition may suspend a saga whose step failed instead of compensating it
//!   at once ([`Suspension`](crate::saga::Suspension), [`suspend`] says why that is
//!   safe): it waits on the failed step for an operator's restart or abort, and
//!   compensates when the suspension's deadline passes, like any other deadline.
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
//!   their timeouts and compensation retries. A saga on a definition version this
//!   code cannot drive is not even loaded by the sweeper: it is listed
//!   ([`Orchestrator::unknown_version_sagas`]) and its replies are held.
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

use sqlx::PgConnection;
use uuid::Uuid;

use crate::outbox::Outbox;
use crate::saga::audit::{EventKind, PendingEvent, Snapshot};
use crate::saga::clock::{Clock, SystemClock};
use crate::saga::definition::{DefinitionError, SagaData, SagaDefinition};
use crate::saga::state::StepState;
use crate::saga::versions::Versions;
use crate::status::{SagaStatus, StepStatus};

mod advance;
mod drive;
mod reply;
mod store;
mod suspend;
mod sweep;

pub(crate) use drive::plan_of;
pub use drive::VERSION_CHECK_INTERVAL;

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
    /// The saga's definition version is neither kept by this code nor migratable
    /// onto one it has: it is not driven (see [`crate::saga::versions`]).
    #[error("saga {id}: {reason}")]
    UnknownVersion {
        id: Uuid,
        version: u32,
        reason: String,
    },
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
    /// For a saga on a definition version this code cannot drive: kept in
    /// `saga_held_replies` until an orchestrator that can drive it applies it.
    Held,
}

/// A saga instance as loaded from `saga_state`.
#[derive(Debug, Clone)]
pub struct SagaInstance<D> {
    pub id: Uuid,
    pub status: SagaStatus,
    pub current_step: Option<String>,
    pub data: D,
    pub steps: BTreeMap<String, StepState>,
    /// The optimistic lock: bumped by every change.
    pub version: i32,
    /// The version of the definition the saga runs on (it started on it, or was
    /// moved onto it by a migration).
    pub definition_version: u32,
    /// When the sweeper must look at it (a reply's timeout, a retry's backoff).
    pub deadline: Option<chrono::DateTime<chrono::Utc>>,
    /// What happened in the transition under way, for the audit trail (written when
    /// the instance is stored).
    pub(crate) trail: Vec<PendingEvent>,
    /// The state as it was loaded, so that the trail records what changed.
    pub(crate) loaded: Option<Snapshot>,
    /// The commands of the transition under way, written to the outbox with the
    /// state that expects their replies (in the same statement).
    pub(crate) outgoing: Vec<crate::outbox::OutboxEvent>,
}

impl<D> SagaInstance<D> {
    /// Records an event of the transition under way.
    pub(crate) fn record(
        &mut self,
        kind: EventKind,
        step: Option<&str>,
        detail: serde_json::Value,
    ) {
        if telemetry::enabled() {
            // The transition as an event of the span it happens in (the order
            // request, or the handling of a participant's reply).
            let mut attributes = vec![
                telemetry::KeyValue::new("saga.id", self.id.to_string()),
                telemetry::KeyValue::new("saga.event", kind.as_str()),
            ];
            if let Some(step) = step {
                attributes.push(telemetry::KeyValue::new("saga.step", step.to_owned()));
            }
            let name = format!("{} {}", step.unwrap_or("saga"), kind.as_str());
            telemetry::event(name, attributes);
        }
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

/// Runs sagas of one definition: its current version, and the older versions it
/// keeps or can migrate from.
pub struct Orchestrator<D> {
    versions: Versions<D>,
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
    /// Running sagas on definition versions this code cannot drive.
    unknown: Mutex<drive::UnknownSagas>,
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
            .field("saga", &self.versions.current().name)
            .field("versions", &self.versions.outlines().known())
            .field("reply_topic", &self.reply_topic)
            .finish()
    }
}

impl<D: SagaData + Clone> Orchestrator<D> {
    /// An orchestrator whose participants reply to `reply_topic` (e.g. `order.reply`);
    /// it starts sagas on `definition`'s version.
    pub fn new(
        definition: SagaDefinition<D>,
        outbox: Outbox,
        reply_topic: impl Into<String>,
    ) -> Self {
        Orchestrator {
            versions: Versions::new(definition),
            outbox,
            reply_topic: reply_topic.into(),
            conflicts: AtomicU64::new(0),
            clock: Arc::new(SystemClock),
            skipped: Mutex::new(HashMap::new()),
            unknown: Mutex::new(drive::UnknownSagas::default()),
        }
    }

    /// Keeps `previous`, an older version of the definition, so that the sagas
    /// started on it finish on it (its steps, commands and compensations), while new
    /// sagas start on the current version. It must be a version of the same saga,
    /// older than the current one and than those kept already.
    pub fn with_previous(mut self, previous: SagaDefinition<D>) -> Result<Self, DefinitionError> {
        self.versions.keep(previous)?;
        Ok(self)
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

    /// The current definition: the one new sagas start on.
    pub fn definition(&self) -> &SagaDefinition<D> {
        self.versions.current()
    }

    /// The definition of `version`, if this orchestrator keeps it.
    pub fn definition_version(&self, version: u32) -> Option<&SagaDefinition<D>> {
        self.versions.get(version)
    }

    /// The definition versions this orchestrator has (the current and the kept
    /// ones), oldest first.
    pub fn known_versions(&self) -> Vec<u32> {
        self.versions.outlines().known()
    }

    /// Starts a saga in the caller's transaction: runs its first local steps and
    /// sends the first command; everything commits with the caller's own writes.
    pub async fn start(
        &self,
        tx: &mut PgConnection,
        id: Uuid,
        data: D,
    ) -> Result<SagaInstance<D>, SagaError> {
        let definition_version = self.definition().version;
        let mut instance = SagaInstance {
            id,
            status: SagaStatus::Started,
            current_step: None,
            data,
            steps: BTreeMap::new(),
            version: 0,
            definition_version,
            deadline: None,
            trail: Vec::new(),
            loaded: None,
            outgoing: Vec::new(),
        };
        let detail = serde_json::json!({"definition_version": definition_version});
        instance.record(EventKind::SagaStarted, None, detail);
        self.advance(tx, &mut instance).await?;
        self.insert_new(tx, &mut instance).await?;
        instance.version = 1;
        Ok(instance)
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
        let definition = self.drive(&mut instance).map_err(|reason| {
            let version = instance.definition_version;
            SagaError::UnknownVersion {
                id,
                version,
                reason,
            }
        })?;
        // The current step's name in the version the saga runs on now.
        let step = instance.current_step.clone().unwrap_or(step);
        let index = definition
            .step_index(&step)
            .ok_or_else(|| SagaError::Invalid {
                id,
                reason: format!("unknown step {step}"),
            })?;
        let retries = definition.steps[index].retries;
        let deadline = instance.deadline.take();
        if instance.status == SagaStatus::Suspended {
            let detail = serde_json::json!({"waited_for": "an operator", "deadline": deadline});
            instance.record(EventKind::DeadlinePassed, Some(&step), detail);
            self.end_suspension(&mut instance, &step);
            self.advance(tx, &mut instance).await?;
            self.save(tx, &mut instance).await?;
            return Ok(true);
        }
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
                tracing::info!(saga_id = %id, step = %step, "step timed out");
            }
            let detail =
                serde_json::json!({"reason": "timed out", "timed_out": true, "retrying": retrying});
            instance.record(EventKind::StepFailed, Some(&step), detail);
            if !retrying {
                self.fail_forward(&mut instance, definition, &step, true);
            }
        } else if waiting_compensation {
            state.request_id = None;
            let reason = Some("compensation timed out".to_owned());
            self.compensation_failed(&mut instance, definition, &step, reason);
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
            definition_version: instance.definition_version,
            current_step: instance.current_step.clone(),
            deadline: instance.deadline,
            payload,
            steps: match steps {
                serde_json::Value::Object(steps) => steps,
                _ => serde_json::Map::new(),
            },
        })
    }

    /// Records a reply no step waited for. The saga is unchanged, unless it was
    /// moved onto a newer definition version as it was loaded: that move is
    /// stored with the reply.
    async fn record_stale(
        &self,
        tx: &mut PgConnection,
        instance: &mut SagaInstance<D>,
        step: &str,
        detail: serde_json::Value,
    ) -> Result<(), SagaError> {
        instance
            .trail
            .retain(|e| e.kind == EventKind::DefinitionMigrated);
        instance.record(EventKind::ReplyReceived, Some(step), detail);
        let after = self.snapshot(instance)?;
        if instance.loaded.as_ref() != Some(&after) {
            return self.save(tx, instance).await;
        }
        self.write_trail(tx, instance, instance.version, after)
            .await
    }
}

/// A definition version as `saga_state.definition_version` (an `int`) holds it;
/// definitions refuse versions above `i32::MAX` when they are built.
fn to_column(version: u32) -> i32 {
    i32::try_from(version).unwrap_or(i32::MAX)
}
