//! The states of a saga instance and of its steps, as stored in `saga_state`.
//!
//! The text forms are part of the schema: `saga_state.status` has a CHECK constraint
//! listing exactly [`SagaStatus::ALL`], and operators query by these names.

use std::fmt;
use std::str::FromStr;

/// The state of a saga instance (`saga_state.status`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SagaStatus {
    /// Steps are running forward.
    Started,
    /// A step failed and the definition suspends such failures
    /// ([`crate::saga::Suspension`]): the saga waits, with the failed step current,
    /// for an operator to restart that step or abort it, and compensates by itself
    /// when the suspension ends (its deadline).
    Suspended,
    /// A step failed; compensations of the completed steps are running.
    Aborting,
    /// Every completed step was compensated.
    Aborted,
    /// Every step succeeded.
    Completed,
    /// A compensation kept failing past its retry bound; an operator must act.
    CompensationFailed,
}

/// The state of one step (`saga_state.step_status`, a JSON object by step name).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StepStatus {
    Started,
    Succeeded,
    Failed,
    Compensating,
    Compensated,
}

/// A stored status text that names no known state.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown {kind} status {text:?}")]
pub struct UnknownStatus {
    kind: &'static str,
    text: String,
}

macro_rules! status_text {
    ($ty:ident, $kind:literal, { $($variant:ident => $text:literal),+ $(,)? }) => {
        impl $ty {
            /// Every state, in lifecycle order.
            pub const ALL: &'static [$ty] = &[$($ty::$variant),+];

            /// The stored text of this state.
            pub const fn as_str(self) -> &'static str {
                match self {
                    $($ty::$variant => $text),+
                }
            }
        }

        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl FromStr for $ty {
            type Err = UnknownStatus;

            fn from_str(text: &str) -> Result<$ty, UnknownStatus> {
                match text {
                    $($text => Ok($ty::$variant),)+
                    _ => Err(UnknownStatus { kind: $kind, text: text.to_owned() }),
                }
            }
        }
    };
}

status_text!(SagaStatus, "saga", {
    Started => "STARTED",
    Suspended => "SUSPENDED",
    Aborting => "ABORTING",
    Aborted => "ABORTED",
    Completed => "COMPLETED",
    CompensationFailed => "COMPENSATION_FAILED",
});

status_text!(StepStatus, "step", {
    Started => "STARTED",
    Succeeded => "SUCCEEDED",
    Failed => "FAILED",
    Compensating => "COMPENSATING",
    Compensated => "COMPENSATED",
});

impl SagaStatus {
    /// Whether the saga will not move again without an operator.
    pub const fn is_terminal(self) -> bool {
        matches!(
            self,
            SagaStatus::Aborted | SagaStatus::Completed | SagaStatus::CompensationFailed
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_round_trips() {
        for status in SagaStatus::ALL {
            assert_eq!(status.as_str().parse::<SagaStatus>(), Ok(*status));
        }
        for status in StepStatus::ALL {
            assert_eq!(status.to_string().parse::<StepStatus>(), Ok(*status));
        }
    }

    #[test]
    fn unknown_text_is_an_error() {
        let err = "SUCCEEDED".parse::<SagaStatus>().unwrap_err();
        assert_eq!(err.to_string(), "unknown saga status \"SUCCEEDED\"");
        assert!("started".parse::<StepStatus>().is_err());
    }

    #[test]
    fn terminal_states() {
        let terminal: Vec<_> = SagaStatus::ALL.iter().filter(|s| s.is_terminal()).collect();
        assert_eq!(
            terminal,
            [
                &SagaStatus::Aborted,
                &SagaStatus::Completed,
                &SagaStatus::CompensationFailed
            ]
        );
    }
}
