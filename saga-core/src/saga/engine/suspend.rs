//! A step that failed for good: the saga compensates, or, when its definition
//! suspends such failures ([`Suspension`]), waits for an operator on the failed
//! step until the suspension ends.
//!
//! Why a suspended saga is safe to restart on its failed step, and to compensate:
//! - It is left exactly as a compensating saga would find it: the failed step is
//!   `FAILED` (with `timed_out` when its participant may have run it), every step
//!   before it succeeded, nothing waits for a reply (a late reply to the failed
//!   attempt finds no request id and is stale), nothing is sent.
//! - A restart sends the step's command as a new attempt
//!   ([`SagaAdmin::restart_step`](crate::saga::SagaAdmin::restart_step)). The
//!   participant's barrier runs a new attempt after a refusal, and answers it with
//!   its stored answer when an earlier attempt succeeded (a timed-out step that did
//!   run late): the effect happens at most once, and the saga learns its outcome.
//! - Ending the suspension (its deadline, or an operator's abort) is the
//!   compensation the failure would have started at once: it undoes what ran,
//!   the failed step too when it timed out.

use serde_json::json;

use super::{Orchestrator, SagaInstance};
use crate::saga::audit::EventKind;
use crate::saga::definition::{SagaData, SagaDefinition};
use crate::status::SagaStatus;

impl<D: SagaData + Clone> Orchestrator<D> {
    /// The current step failed for good (its retries spent; `timed_out`: not
    /// answered in time): compensate, or suspend when the definition says so.
    pub(super) fn fail_forward(
        &self,
        instance: &mut SagaInstance<D>,
        definition: &SagaDefinition<D>,
        step: &str,
        timed_out: bool,
    ) {
        match definition.suspension.filter(|s| s.covers(timed_out)) {
            Some(suspension) => {
                let until = self.clock.now() + suspension.hold;
                instance.status = SagaStatus::Suspended;
                instance.deadline = Some(until);
                tracing::warn!(saga_id = %instance.id, step, %until, "step failed; saga suspended for an operator");
                instance.record(
                    EventKind::SagaSuspended,
                    Some(step),
                    json!({"until": until}),
                );
            }
            None => instance.status = SagaStatus::Aborting,
        }
    }

    /// A suspension ended without an operator restarting the step: the saga
    /// compensates, as it would have at the failure.
    pub(super) fn end_suspension(&self, instance: &mut SagaInstance<D>, step: &str) {
        tracing::info!(saga_id = %instance.id, step, "suspension over; compensating");
        instance.status = SagaStatus::Aborting;
    }
}
