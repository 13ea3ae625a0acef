//! The stored state of a saga's steps (`saga_state.step_status`, one object per
//! step name).

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::status::StepStatus;

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
    /// The name the step's participant knows it by (the `saga-step` header of its
    /// commands, its barrier's branch), when that is not the step's name: a
    /// migration renamed the step after it had sent a command. Its later commands
    /// (a retry, its compensation) keep that name, so that the participant's
    /// barrier matches them with what it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub branch: Option<String>,
    /// The step was added by a newer definition the saga was moved onto after it
    /// had gone past the step's place: it neither runs nor is compensated.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub skipped: bool,
    /// When the step's compensation began (or an operator last retried it): its
    /// retries end [`CompensationRetry::give_up_after`] later.
    ///
    /// [`CompensationRetry::give_up_after`]: crate::saga::CompensationRetry::give_up_after
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compensating_since: Option<chrono::DateTime<chrono::Utc>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

impl StepState {
    pub(crate) fn is(&self, status: StepStatus) -> bool {
        self.status.as_deref() == Some(status.as_str())
    }

    pub(crate) fn set(&mut self, status: StepStatus) {
        self.status = Some(status.as_str().to_owned());
    }

    /// Marks the step failed; `timed_out` when the participant may have run it.
    pub(crate) fn set_failed(&mut self, reason: String, timed_out: bool) {
        self.set(StepStatus::Failed);
        self.reason = Some(reason);
        self.timed_out = timed_out;
        self.request_id = None;
    }

    /// Whether the step ran (or may have run) and is not undone yet: a saga that
    /// aborts must compensate it.
    pub(crate) fn needs_undoing(&self) -> bool {
        self.is(StepStatus::Succeeded)
            || self.is(StepStatus::Compensating)
            || (self.is(StepStatus::Failed) && self.timed_out)
    }

    /// Whether a forward-running saga is past the step (it succeeded, or it was
    /// added behind the saga's position by a migration).
    pub(crate) fn is_passed(&self) -> bool {
        self.is(StepStatus::Succeeded) || self.skipped
    }
}
