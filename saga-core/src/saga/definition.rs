//! The saga definition DSL: steps, their actions, replies and compensations; the
//! definition's version, and how instances of older versions move onto it.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use serde::de::DeserializeOwned;
use serde::Serialize;
use sqlx::PgConnection;

use crate::saga::step_map::StepMap;

/// The data a saga carries from step to step, stored as JSON in `saga_state.payload`.
pub trait SagaData: Serialize + DeserializeOwned + Send + Sync + 'static {}
impl<T: Serialize + DeserializeOwned + Send + Sync + 'static> SagaData for T {}

/// Why a local step (or local compensation) did not succeed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct StepFailed(pub String);

impl StepFailed {
    pub fn new(reason: impl Into<String>) -> StepFailed {
        StepFailed(reason.into())
    }
}

/// A local action: runs in the orchestrator's transaction and may change `data`.
/// An error fails the step; its writes are rolled back to a savepoint.
pub type LocalFn<D> = Arc<
    dyn for<'a> Fn(&'a mut D, &'a mut PgConnection) -> BoxFuture<'a, Result<(), StepFailed>>
        + Send
        + Sync,
>;

/// A participant command: what to send, built from the saga's data.
#[derive(Debug, Clone, PartialEq)]
pub struct Command {
    /// The participant's request topic, e.g. `customer.request`.
    pub topic: String,
    /// The command's type (Kafka header `type`), e.g. `ReserveCredit`.
    pub command_type: String,
    pub payload: serde_json::Value,
}

impl Command {
    /// A command with a payload serialised from `payload`.
    pub fn new(
        topic: impl Into<String>,
        command_type: impl Into<String>,
        payload: &impl Serialize,
    ) -> Result<Command, serde_json::Error> {
        Ok(Command {
            topic: topic.into(),
            command_type: command_type.into(),
            payload: serde_json::to_value(payload)?,
        })
    }
}

/// Builds a participant command from the saga's data.
pub type CommandFn<D> = Arc<dyn Fn(&D) -> Command + Send + Sync>;

/// A typed reply a step reacts to, identified by its `type` header.
pub trait Reply: DeserializeOwned + Send + 'static {
    /// The reply's type, as in its `type` header.
    const TYPE: &'static str;
}

/// Updates the saga's data from a reply payload of one type.
pub(crate) type ReplyFn<D> =
    Arc<dyn Fn(&mut D, serde_json::Value) -> Result<(), serde_json::Error> + Send + Sync>;

/// What a step does going forward.
#[derive(Clone)]
pub(crate) enum Action<D> {
    Local(LocalFn<D>),
    Participant(CommandFn<D>),
}

/// One step of a saga.
#[derive(Clone)]
pub struct Step<D> {
    pub(crate) name: String,
    pub(crate) action: Action<D>,
    pub(crate) compensation: Option<Action<D>>,
    pub(crate) replies: HashMap<String, ReplyFn<D>>,
    pub(crate) timeout: Option<Duration>,
    pub(crate) retries: u32,
}

impl<D> Step<D> {
    /// The step's name, as stored in `saga_state`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether the step waits for a participant's reply.
    pub fn is_participant(&self) -> bool {
        matches!(self.action, Action::Participant(_))
    }
}

impl<D> fmt::Debug for Step<D> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Step")
            .field("name", &self.name)
            .field("participant", &self.is_participant())
            .field("compensated", &self.compensation.is_some())
            .field("replies", &self.replies.keys().collect::<Vec<_>>())
            .field("timeout", &self.timeout)
            .field("retries", &self.retries)
            .finish()
    }
}

/// The version of a definition that declares none.
pub const DEFAULT_DEFINITION_VERSION: u32 = 1;

/// A saga type: its name, its version and its steps, in order.
///
/// Every instance is pinned to the version it started with
/// (`saga_state.definition_version`) and is driven by that version's steps only:
/// a service that changes the steps (adds, renames, removes, reorders one) gives
/// the definition a new [`version`](SagaBuilder::version), and either keeps the old
/// definition beside it ([`Orchestrator::with_previous`]) so that instances started
/// on it finish on it, or declares how they move onto the new one
/// ([`migrate_from`](SagaBuilder::migrate_from)).
///
/// [`Orchestrator::with_previous`]: crate::saga::Orchestrator::with_previous
pub struct SagaDefinition<D> {
    pub(crate) name: String,
    pub(crate) version: u32,
    pub(crate) steps: Vec<Step<D>>,
    pub(crate) compensation_retry: CompensationRetry,
    /// Which failed instances wait for an operator before they compensate.
    pub(crate) suspension: Option<Suspension>,
    /// How instances of older versions move onto this one, by their version.
    pub(crate) migrations: BTreeMap<u32, StepMap>,
}

impl<D> fmt::Debug for SagaDefinition<D> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SagaDefinition")
            .field("name", &self.name)
            .field("version", &self.version)
            .field("steps", &self.steps)
            .field("migrations", &self.migrations)
            .field("compensation_retry", &self.compensation_retry)
            .field("suspension", &self.suspension)
            .finish()
    }
}

impl<D: SagaData> SagaDefinition<D> {
    /// Starts the definition of saga type `name`.
    pub fn builder(name: impl Into<String>) -> SagaBuilder<D> {
        SagaBuilder {
            name: name.into(),
            version: DEFAULT_DEFINITION_VERSION,
            steps: Vec::new(),
            compensation_retry: CompensationRetry::default(),
            suspension: None,
            migrations: BTreeMap::new(),
            error: None,
        }
    }

    /// The saga type's name (`saga_state.saga_type`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The definition's version (`saga_state.definition_version` of the instances
    /// it starts).
    pub fn version(&self) -> u32 {
        self.version
    }

    /// The older versions whose instances this definition can take over, with
    /// how their steps map onto its own.
    pub fn migrations(&self) -> &BTreeMap<u32, StepMap> {
        &self.migrations
    }

    /// The steps, in order.
    pub fn steps(&self) -> &[Step<D>] {
        &self.steps
    }

    /// How a failing compensation is retried.
    pub fn compensation_retry(&self) -> CompensationRetry {
        self.compensation_retry
    }

    /// Which failed instances wait for an operator before they compensate (none
    /// unless [`SagaBuilder::suspend_failed`] said so).
    pub fn suspension(&self) -> Option<Suspension> {
        self.suspension
    }

    pub(crate) fn step_index(&self, name: &str) -> Option<usize> {
        self.steps.iter().position(|s| s.name == name)
    }
}

/// How long a participant compensation may take before it counts as failed, when
/// its step has no timeout of its own.
pub const DEFAULT_COMPENSATION_TIMEOUT: Duration = Duration::from_secs(30);

/// How long a step's compensation is retried before the saga is
/// `COMPENSATION_FAILED`: a day. An outage of a participant (a deployment, a broken
/// node, a database failover) lasts minutes to hours; undoing a saga must outlast it
/// rather than hand every saga of the outage to an operator.
pub const DEFAULT_COMPENSATION_GIVE_UP_AFTER: Duration = Duration::from_secs(24 * 60 * 60);
/// The first delay before a failed compensation is tried again; it doubles.
pub const DEFAULT_COMPENSATION_BACKOFF: Duration = Duration::from_secs(1);
/// The longest delay between two tries of a compensation.
pub const DEFAULT_COMPENSATION_MAX_BACKOFF: Duration = Duration::from_secs(60);

/// How a failing compensation is tried again: after `first_backoff`, doubling up to
/// `max_backoff`, until `give_up_after` has passed since the step's compensation
/// began; the next failure after that makes the saga `COMPENSATION_FAILED`. A
/// compensation that "fails" by not being answered within its step's timeout is
/// retried the same way. Forward steps are not affected: they keep their timeouts
/// and retries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CompensationRetry {
    pub first_backoff: Duration,
    pub max_backoff: Duration,
    pub give_up_after: Duration,
}

impl Default for CompensationRetry {
    fn default() -> Self {
        CompensationRetry {
            first_backoff: DEFAULT_COMPENSATION_BACKOFF,
            max_backoff: DEFAULT_COMPENSATION_MAX_BACKOFF,
            give_up_after: DEFAULT_COMPENSATION_GIVE_UP_AFTER,
        }
    }
}

impl CompensationRetry {
    /// The delay before try `failed + 1`, after `failed` tries failed (from 1).
    pub fn backoff(&self, failed: u32) -> Duration {
        let doublings = failed.saturating_sub(1).min(31);
        self.first_backoff
            .saturating_mul(1u32 << doublings)
            .min(self.max_backoff.max(self.first_backoff))
    }
}

/// Which failures of a step suspend the saga ([`Suspension`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SuspendOn {
    /// A participant step that was not answered in time, after its retries: its
    /// participant (or the way to it) is down, which an operator can mend before
    /// restarting the step. A refusal or a local step's error compensates at once.
    Timeouts,
    /// Every failure of a step: a refusal too (an operator may change what made
    /// the participant refuse), and a local step's error.
    AnyFailure,
}

/// Failed sagas that wait for an operator before they compensate (an "incident"
/// in the words of workflow engines).
///
/// Without a suspension a step that fails for good (its retries spent) starts the
/// saga's compensation at once. With one, a failure it covers leaves the saga
/// `SUSPENDED` on the failed step for up to `hold`: an operator restarts the step
/// ([`SagaAdmin::restart_step`](crate::saga::SagaAdmin::restart_step)), as a new
/// attempt after mending what made it fail, and the saga runs on from there; or
/// aborts it, and it compensates now. When `hold` passes with neither, the saga
/// compensates by itself, as it would have without a suspension: a suspension
/// delays the outcome, it never leaves a saga without one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Suspension {
    pub on: SuspendOn,
    pub hold: Duration,
}

impl Suspension {
    /// Whether a step failure (`timed_out`: not answered in time) suspends.
    pub fn covers(&self, timed_out: bool) -> bool {
        timed_out || self.on == SuspendOn::AnyFailure
    }
}

/// The definition is not usable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DefinitionError {
    #[error("saga {0} has no steps")]
    NoSteps(String),
    #[error("saga {saga} has two steps named {step}")]
    DuplicateStep { saga: String, step: String },
    #[error("step {step} of saga {saga}: {what} needs a step declared before it")]
    NoStep {
        saga: String,
        step: String,
        what: &'static str,
    },
    #[error("step {step} of saga {saga}: {what} applies to participant steps only")]
    NotParticipant {
        saga: String,
        step: String,
        what: &'static str,
    },
    #[error("saga {saga}: version {version} is not a positive 32-bit integer")]
    Version { saga: String, version: u32 },
    #[error("saga {saga} version {version}: the migration from version {from}: {reason}")]
    Migration {
        saga: String,
        version: u32,
        from: u32,
        reason: String,
    },
    /// An orchestrator's definitions must be versions of one saga type.
    #[error("saga {saga} version {version} cannot run beside saga {other}")]
    OtherSaga {
        saga: String,
        version: u32,
        other: String,
    },
    /// An orchestrator keeps older versions beside its current one, each once.
    #[error(
        "saga {saga}: version {version} is not older than the versions already given ({known:?})"
    )]
    NotPrevious {
        saga: String,
        version: u32,
        known: Vec<u32>,
    },
}

/// Builds a [`SagaDefinition`] step by step, in the shape of the DSL in DESIGN.md.
pub struct SagaBuilder<D> {
    name: String,
    version: u32,
    steps: Vec<Step<D>>,
    compensation_retry: CompensationRetry,
    suspension: Option<Suspension>,
    migrations: BTreeMap<u32, StepMap>,
    error: Option<DefinitionError>,
}

impl<D> fmt::Debug for SagaBuilder<D> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SagaBuilder")
            .field("name", &self.name)
            .field("version", &self.version)
            .field("steps", &self.steps.len())
            .finish()
    }
}

/// The builder, positioned on a step whose action is not set yet.
#[derive(Debug)]
pub struct StepBuilder<D> {
    saga: SagaBuilder<D>,
    name: String,
}

impl<D: SagaData> SagaBuilder<D> {
    /// Begins a step named `name`.
    pub fn step(self, name: impl Into<String>) -> StepBuilder<D> {
        StepBuilder {
            saga: self,
            name: name.into(),
        }
    }

    /// The definition's version (default 1): every instance it starts is pinned to
    /// it. Give a definition a new version whenever its steps change.
    pub fn version(mut self, version: u32) -> Self {
        self.version = version;
        self
    }

    /// How instances started on the older version `from` move onto this one when
    /// the running code no longer has that version's definition: their steps are
    /// renamed, added and removed as `map` says, in the transaction of their next
    /// change. Without a migration (and without the old definition) such
    /// instances are not driven; see [`Orchestrator`](crate::saga::Orchestrator).
    pub fn migrate_from(mut self, from: u32, map: StepMap) -> Self {
        if self.migrations.insert(from, map).is_some() {
            let e = DefinitionError::Migration {
                saga: self.name.clone(),
                version: self.version,
                from,
                reason: "declared twice".to_owned(),
            };
            self.fail(e);
        }
        self
    }

    /// How a failing compensation is tried again (default
    /// [`CompensationRetry::default`]: from 1 s doubling up to 1 min, for a day).
    pub fn compensation_retry(mut self, retry: CompensationRetry) -> Self {
        self.compensation_retry = retry;
        self
    }

    /// Suspends a saga whose step fails in a way `on` covers, for up to `hold`,
    /// instead of compensating it at once ([`Suspension`]). A zero `hold` keeps
    /// the default: compensate at once.
    pub fn suspend_failed(mut self, on: SuspendOn, hold: Duration) -> Self {
        self.suspension = (!hold.is_zero()).then_some(Suspension { on, hold });
        self
    }

    /// A local compensation for the last step: runs in the orchestrator's transaction.
    pub fn with_compensation<F>(self, compensation: F) -> Self
    where
        F: for<'a> Fn(&'a mut D, &'a mut PgConnection) -> BoxFuture<'a, Result<(), StepFailed>>
            + Send
            + Sync
            + 'static,
    {
        self.set_compensation("with_compensation", Action::Local(Arc::new(compensation)))
    }

    /// A participant compensation for the last step: a command sent to the
    /// participant, whose success reply completes it.
    pub fn with_participant_compensation<F>(self, command: F) -> Self
    where
        F: Fn(&D) -> Command + Send + Sync + 'static,
    {
        self.set_compensation(
            "with_participant_compensation",
            Action::Participant(Arc::new(command)),
        )
    }

    /// Updates the saga's data when the last step's participant replies with `R`
    /// (success or a named failure, e.g. `CreditLimitExceeded`).
    pub fn on_reply<R: Reply>(mut self, handler: fn(&mut D, R)) -> Self {
        let apply: ReplyFn<D> = Arc::new(move |data, payload| {
            let reply: R = serde_json::from_value(payload)?;
            handler(data, reply);
            Ok(())
        });
        match self.last_participant("on_reply") {
            Ok(step) => {
                step.replies.insert(R::TYPE.to_owned(), apply);
            }
            Err(e) => self.fail(e),
        }
        self
    }

    /// A deadline for the last step's reply: past it the step counts as failed (and
    /// is compensated too, since the participant may have run it).
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        match self.last_participant("with_timeout") {
            Ok(step) => step.timeout = Some(timeout),
            Err(e) => self.fail(e),
        }
        self
    }

    /// Sends the last step's command again (with a new request id) up to `retries`
    /// times after a failure reply or a timeout before the step fails.
    pub fn with_retries(mut self, retries: u32) -> Self {
        match self.last_participant("with_retries") {
            Ok(step) => step.retries = retries,
            Err(e) => self.fail(e),
        }
        self
    }

    /// The definition, checked.
    pub fn build(self) -> Result<SagaDefinition<D>, DefinitionError> {
        if let Some(error) = self.error {
            return Err(error);
        }
        if self.steps.is_empty() {
            return Err(DefinitionError::NoSteps(self.name));
        }
        for (i, step) in self.steps.iter().enumerate() {
            if self.steps[..i].iter().any(|s| s.name == step.name) {
                return Err(DefinitionError::DuplicateStep {
                    saga: self.name,
                    step: step.name.clone(),
                });
            }
        }
        // Stored as a PostgreSQL `int`.
        if self.version == 0 || i32::try_from(self.version).is_err() {
            return Err(DefinitionError::Version {
                saga: self.name,
                version: self.version,
            });
        }
        let names: Vec<&str> = self.steps.iter().map(|s| s.name.as_str()).collect();
        for (&from, map) in &self.migrations {
            let reason = if from == 0 || from >= self.version {
                Some(format!(
                    "it must come from an older version than {}",
                    self.version
                ))
            } else {
                map.check(&names).err()
            };
            if let Some(reason) = reason {
                return Err(DefinitionError::Migration {
                    saga: self.name.clone(),
                    version: self.version,
                    from,
                    reason,
                });
            }
        }
        Ok(SagaDefinition {
            name: self.name,
            version: self.version,
            steps: self.steps,
            compensation_retry: self.compensation_retry,
            suspension: self.suspension,
            migrations: self.migrations,
        })
    }

    fn set_compensation(mut self, what: &'static str, compensation: Action<D>) -> Self {
        match self.steps.last_mut() {
            Some(step) => step.compensation = Some(compensation),
            None => {
                let e = DefinitionError::NoStep {
                    saga: self.name.clone(),
                    step: String::new(),
                    what,
                };
                self.fail(e);
            }
        }
        self
    }

    fn last_participant(&mut self, what: &'static str) -> Result<&mut Step<D>, DefinitionError> {
        let saga = self.name.clone();
        match self.steps.last_mut() {
            Some(step) if step.is_participant() => Ok(step),
            Some(step) => Err(DefinitionError::NotParticipant {
                saga,
                step: step.name.clone(),
                what,
            }),
            None => Err(DefinitionError::NoStep {
                saga,
                step: String::new(),
                what,
            }),
        }
    }

    fn fail(&mut self, error: DefinitionError) {
        self.error.get_or_insert(error);
    }

    fn push(mut self, name: String, action: Action<D>) -> Self {
        self.steps.push(Step {
            name,
            action,
            compensation: None,
            replies: HashMap::new(),
            timeout: None,
            retries: 0,
        });
        self
    }
}

impl<D: SagaData> StepBuilder<D> {
    /// The step runs locally, in the orchestrator's transaction.
    pub fn invoke_local<F>(self, action: F) -> SagaBuilder<D>
    where
        F: for<'a> Fn(&'a mut D, &'a mut PgConnection) -> BoxFuture<'a, Result<(), StepFailed>>
            + Send
            + Sync
            + 'static,
    {
        self.saga.push(self.name, Action::Local(Arc::new(action)))
    }

    /// The step sends a command to a participant and waits for its reply.
    pub fn invoke_participant<F>(self, command: F) -> SagaBuilder<D>
    where
        F: Fn(&D) -> Command + Send + Sync + 'static,
    {
        self.saga
            .push(self.name, Action::Participant(Arc::new(command)))
    }
}
