//! Orchestrated sagas: a definition DSL, the orchestrator that runs instances
//! against `saga_state` (each by the definition version it started with, see
//! [`versions`]), helpers for participants, and the operator's view.
//!
//! Messages follow the envelope of DESIGN.md: key = saga id, headers `id`, `type`,
//! `saga-id`, `saga-step`, `request-id` (unique per command sent), plus `reply-to`
//! and `saga-attempt` on commands and `outcome` (`success` or `failure`) on replies (and `saga-replay:
//! true` on a reply that answers a duplicate command again).

mod admin;
pub mod audit;
pub mod cli;
mod clock;
mod definition;
mod engine;
mod participant;
mod state;
mod step_map;
pub mod versions;

pub use admin::{
    SagaAdmin, SagaSummary, StuckReason, StuckRules, StuckSaga, DEFAULT_ACTOR, DEFAULT_STUCK_AFTER,
    DEFAULT_STUCK_TIMEOUTS,
};
pub use clock::{Clock, SystemClock};
pub use definition::{
    Command, CommandFn, CompensationRetry, DefinitionError, LocalFn, Reply, SagaBuilder, SagaData,
    SagaDefinition, Step, StepBuilder, StepFailed, SuspendOn, Suspension,
    DEFAULT_COMPENSATION_BACKOFF, DEFAULT_COMPENSATION_GIVE_UP_AFTER,
    DEFAULT_COMPENSATION_MAX_BACKOFF, DEFAULT_COMPENSATION_TIMEOUT, DEFAULT_DEFINITION_VERSION,
};
pub use engine::{
    Orchestrator, ReplyDisposition, SagaError, SagaInstance, SKIPPED_RETRY, VERSION_CHECK_INTERVAL,
};
pub use participant::{
    participate, read_command, reply, unknown_command, CommandEnvelope, Effect, Outcome,
    ParticipantReply,
};
pub use state::StepState;
pub use step_map::StepMap;

/// Header: the saga instance's id (also the Kafka key).
pub const HEADER_SAGA_ID: &str = "saga-id";
/// Header: the saga type.
pub const HEADER_SAGA_TYPE: &str = "saga-type";
/// Header: the step a command or reply belongs to.
pub const HEADER_SAGA_STEP: &str = "saga-step";
/// Header: unique per attempt, so a stale reply is known.
pub const HEADER_REQUEST_ID: &str = "request-id";
/// Header on commands: the topic the participant replies to.
pub const HEADER_REPLY_TO: &str = "reply-to";
/// Header on commands: the command's number among those sent for the step's action
/// (or, on a compensation, for its compensation), from 1. A participant runs a
/// higher attempt again after refusing a lower one ([`crate::barrier`]); absent, 1.
pub const HEADER_ATTEMPT: &str = "saga-attempt";
/// Header on commands: `true` for a compensation.
pub const HEADER_COMPENSATION: &str = "compensation";
/// Header on replies: `success` or `failure`.
pub const HEADER_OUTCOME: &str = "outcome";
/// Header on replies: `true` when a participant answers a duplicate command again
/// with the answer it stored the first time (the effect did not run again).
pub const HEADER_REPLAY: &str = "saga-replay";
/// The `outcome` of a successful reply.
pub const OUTCOME_SUCCESS: &str = "success";
/// The `outcome` of a failed reply.
pub const OUTCOME_FAILURE: &str = "failure";
