//! Where the orchestrator reads the time.
//!
//! Every deadline of a saga (a step's reply timeout, a compensation's timeout, the
//! backoff before a compensation is tried again) is set from, and compared with, one
//! [`Clock`]. The default is [`SystemClock`]; tests put a clock they move by hand in
//! its place (`saga_core::testing::ManualClock`), so a timeout passes when the test
//! says so instead of after a sleep.

use sqlx::types::chrono;

/// The time source of an [`Orchestrator`](crate::saga::Orchestrator): what "now" is
/// when it sets a deadline and when it decides that a deadline has passed.
pub trait Clock: Send + Sync {
    /// The current time.
    fn now(&self) -> chrono::DateTime<chrono::Utc>;
}

/// The system's wall clock: the default of every orchestrator.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> chrono::DateTime<chrono::Utc> {
        chrono::Utc::now()
    }
}
