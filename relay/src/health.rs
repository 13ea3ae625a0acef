//! Whether the relay is doing its job, for `/health` and the `outbox_relay_healthy`
//! gauge.
//!
//! The relay's job is to move committed outbox rows from the replication stream to
//! the broker. It can stop doing that in three ways, and each is a rule here. Once
//! it has started streaming, the relay is **unhealthy** exactly when one of them
//! holds:
//!
//! 1. **Definite failure.** [`Health::failed`] was called (the outbox table lacks a
//!    column, the slot was dropped, the configuration is refused): retrying will not
//!    help, a person must act. The relay stays unhealthy with that reason until the
//!    next [`Health::streaming`], whatever else is reported in between.
//! 2. **Stalled stream.** The relay is not paused for backpressure and nothing came
//!    from the server for [`HealthThresholds::stream_stall`]. Status `stalled` while
//!    a session is believed open, `reconnecting` (with the last connection error as
//!    the reason) while the runner is reconnecting. A TCP connection that died
//!    without a reset, a walsender stuck behind a lock, or a reconnect loop that never
//!    gets through all look like this: no message arrives, yet no error is raised
//!    either, or errors are raised and retried forever. A reconnect that succeeds
//!    within the threshold is not unhealthy: the grace counts from the last progress,
//!    not from the last reconnect attempt, so a relay that keeps failing to reconnect
//!    becomes unhealthy after one threshold however often it retries.
//! 3. **Unreachable broker.** Records are in flight and the broker acknowledged none
//!    of them for [`HealthThresholds::broker_stall`]. The producer retries
//!    internally and raises no error while the broker is down or partitioned away, so
//!    without this rule a relay that routes nothing would look busy. This rule also
//!    catches a pause that never ends: the relay pauses reading only because too
//!    many records are in flight, and those records drain only through
//!    acknowledgements.
//!
//! Before the first session has started ([`Health::starting`] until
//! [`Health::streaming`] or [`Health::standby`]) the relay reports `starting` and is
//! neither healthy nor ready, also while it retries a failed first connection (the
//! last error is the reason). Give a liveness probe on `/health` an initial delay or
//! a startup probe, so that a slow first connection is not mistaken for a dead
//! process.
//!
//! **A standby is healthy.** Relays configured alike for one slot (the sidecars of a
//! replicated service) take turns: the one holding the slot streams (role
//! `active`), the others report `standby`, healthy and ready, and take the slot
//! when it is free (see [`crate::standby`]). Waiting is their job; nothing is
//! expected of their stream or their broker.
//!
//! **Liveness and readiness differ.** `/health` (the liveness probe, and what
//! monitoring alerts on) answers 503 whenever one of the rules above holds: a
//! restart may help a stalled relay, and a person should look at a failed one.
//! `/ready` (the readiness probe) answers 503 only before the relay has found its
//! place and after a definite failure: a sidecar that is not ready takes its whole
//! pod out of service, which a broker outage must not do to a service that keeps
//! writing its outbox meanwhile, while a rollout should wait for a new relay that
//! cannot start.
//!
//! **An idle database is not unhealthy.** When no transaction touches the outbox,
//! the stream still progresses: the relay periodically writes a heartbeat
//! (`pg_logical_emit_message`), which travels through the WAL and comes back through
//! its own slot as a logical decoding message; the server's keepalives, when it
//! sends them, arrive too. Each counts as [`Health::stream_progress`], so an idle
//! relay with a working connection keeps progressing, while a relay whose heartbeats
//! stop coming back is exactly the stuck relay rule 2 is for. Likewise nothing in
//! flight counts as broker progress: an idle broker is not an unreachable one.
//!
//! All times come from a [`Clock`], so tests drive the transitions with a
//! [`ManualClock`] instead of sleeping. [`crate::http::serve`] answers
//! `/health` and `/metrics` over HTTP.

use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use serde::Serialize;

/// The default for both stall thresholds.
pub const DEFAULT_STALL: Duration = Duration::from_secs(60);

/// How long the relay may go without progress before it is unhealthy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HealthThresholds {
    /// How long the stream may stay silent while the relay is reading (not paused).
    /// Must exceed the heartbeat interval and the server's
    /// `wal_sender_timeout / 2` keepalive interval, or an idle relay looks stalled.
    pub stream_stall: Duration,
    /// How long records may stay in flight without any acknowledgement.
    pub broker_stall: Duration,
}

impl Default for HealthThresholds {
    fn default() -> HealthThresholds {
        HealthThresholds {
            stream_stall: DEFAULT_STALL,
            broker_stall: DEFAULT_STALL,
        }
    }
}

/// Where health reads the time.
pub trait Clock: fmt::Debug + Send + Sync + 'static {
    /// The current instant.
    fn now(&self) -> Instant;
}

/// The monotonic system clock.
#[derive(Clone, Copy, Debug, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Instant {
        Instant::now()
    }
}

/// A clock that moves only when told to; clones share the same time.
#[derive(Clone, Debug)]
pub struct ManualClock {
    now: Arc<Mutex<Instant>>,
}

impl ManualClock {
    /// A clock standing at the current instant.
    pub fn new() -> ManualClock {
        ManualClock {
            now: Arc::new(Mutex::new(Instant::now())),
        }
    }

    /// Moves the clock forward by `by`.
    pub fn advance(&self, by: Duration) {
        let mut now = self.now.lock().unwrap_or_else(PoisonError::into_inner);
        *now += by;
    }
}

impl Default for ManualClock {
    fn default() -> ManualClock {
        ManualClock::new()
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Instant {
        *self.now.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The state `/health` reports. Serialized in `snake_case`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum Status {
    /// No session has started yet (the reason, if any, is the last connection
    /// error). Unhealthy.
    Starting,
    /// A session is open and progressing (or paused for backpressure). Healthy.
    Streaming,
    /// A session is believed open but nothing arrived for the stream threshold.
    /// Unhealthy.
    Stalled,
    /// Records are in flight and none was acknowledged for the broker threshold.
    /// Unhealthy.
    BrokerUnreachable,
    /// Between sessions; healthy until the stream threshold has passed since the last
    /// progress.
    Reconnecting,
    /// Stopped on a definite error until the next session starts. Unhealthy.
    Failed,
    /// The destination refused to work (access denied, a topic missing, the
    /// client in a state it cannot leave): reading stopped, retrying with a new
    /// sink. Unhealthy until the destination acknowledges a record again.
    DestinationFailed,
    /// Another relay holds the slot; this one watches it and takes over when it is
    /// free (the reason names the holder). Healthy and ready.
    Standby,
}

impl Status {
    /// The name `/health` reports.
    pub const fn as_str(self) -> &'static str {
        match self {
            Status::Starting => "starting",
            Status::Streaming => "streaming",
            Status::Stalled => "stalled",
            Status::BrokerUnreachable => "broker_unreachable",
            Status::Reconnecting => "reconnecting",
            Status::Failed => "failed",
            Status::DestinationFailed => "destination_failed",
            Status::Standby => "standby",
        }
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Which part a relay plays among the relays configured alike for one slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// It holds the slot and streams.
    Active,
    /// Another process holds the slot; this relay takes over when it is free.
    Standby,
}

impl Role {
    /// Both roles, in the order metrics list them.
    pub const ALL: [Role; 2] = [Role::Active, Role::Standby];

    /// The name reports and metrics use.
    pub const fn as_str(self) -> &'static str {
        match self {
            Role::Active => "active",
            Role::Standby => "standby",
        }
    }
}

/// What `/health` and `/ready` answer, as JSON.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct HealthReport {
    /// Whether the relay is doing its job; `/health` answers 200 if so, 503 if not.
    pub healthy: bool,
    /// Whether the relay has found its place: it streams (perhaps through a
    /// transient fault it retries) or stands by. `false` before the first session
    /// and after a definite failure. `/ready` answers 200 if so, 503 if not.
    pub ready: bool,
    /// The relay's part now: `active` while it streams, `standby` while another
    /// process holds the slot, `null` in between.
    pub role: Option<Role>,
    /// The state the relay is in.
    pub status: Status,
    /// Why the relay is unhealthy or reconnecting; `None` when there is nothing to
    /// explain.
    pub reason: Option<String>,
    /// Whole seconds the relay has waited for the stream: since the last message from
    /// the server, or since reading resumed. 0 while reading is paused, when no
    /// progress is expected.
    pub seconds_since_stream_progress: u64,
    /// Whole seconds the relay has waited for the broker: since the last
    /// acknowledgement, or since records went in flight. 0 while nothing is in
    /// flight, when no acknowledgement is expected.
    pub seconds_since_broker_progress: u64,
    /// Records handed to the producer and not yet acknowledged.
    pub in_flight: usize,
    /// Whether reading is paused for backpressure.
    pub reading_paused: bool,
}

#[derive(Debug)]
enum Phase {
    /// Before the first session; with the last connection error, if any.
    Starting(Option<String>),
    Streaming,
    /// Another process holds the slot (described by the string).
    Standby(String),
    Reconnecting(String),
    Failed(String),
}

#[derive(Debug)]
struct State {
    phase: Phase,
    /// Since when the stream has been expected to progress without doing so.
    stream_waiting_since: Instant,
    /// Since when the broker has been expected to acknowledge without doing so.
    broker_waiting_since: Instant,
    in_flight: usize,
    paused: bool,
    /// Why the destination refused to work, until it acknowledges a record again.
    destination_fault: Option<String>,
}

/// The relay's health, shared through an `Arc` between the replication loop (which
/// reports) and the HTTP server (which reads). Every method holds a lock only for a
/// few assignments.
#[derive(Debug)]
pub struct Health {
    thresholds: HealthThresholds,
    clock: Arc<dyn Clock>,
    state: Mutex<State>,
}

impl Health {
    /// Health on the system clock, in the `starting` state.
    pub fn new(thresholds: HealthThresholds) -> Health {
        Health::with_clock(thresholds, Arc::new(SystemClock))
    }

    /// Health reading the time from `clock`, in the `starting` state.
    pub fn with_clock(thresholds: HealthThresholds, clock: Arc<dyn Clock>) -> Health {
        let now = clock.now();
        Health {
            thresholds,
            clock,
            state: Mutex::new(State {
                phase: Phase::Starting(None),
                stream_waiting_since: now,
                broker_waiting_since: now,
                in_flight: 0,
                paused: false,
                destination_fault: None,
            }),
        }
    }

    /// The thresholds this health judges by.
    pub fn thresholds(&self) -> HealthThresholds {
        self.thresholds
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // Every update is a handful of plain assignments, so a panic elsewhere while
        // the lock was held cannot have left the state half-written.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The relay is preparing its first session. Unhealthy (`starting`) until
    /// [`Health::streaming`]. Does not clear a definite failure; between sessions
    /// report [`Health::reconnecting`] instead.
    pub fn starting(&self) {
        let mut state = self.state();
        if !matches!(state.phase, Phase::Failed(_)) {
            state.phase = Phase::Starting(None);
        }
    }

    /// A replication session has started. Clears `starting`, `reconnecting` and
    /// `failed`, and counts as stream progress.
    pub fn streaming(&self) {
        let now = self.clock.now();
        let mut state = self.state();
        state.phase = Phase::Streaming;
        state.stream_waiting_since = now;
    }

    /// Another process holds the slot (`holder` says which); the relay watches it.
    /// Healthy and ready (`standby`): waiting is this relay's job now, and nothing
    /// it streamed or delivered is expected to progress. Clears `starting`,
    /// `reconnecting`, `failed` and a destination fault: that destination is the
    /// active relay's concern now.
    pub fn standby(&self, holder: String) {
        let now = self.clock.now();
        let mut state = self.state();
        state.phase = Phase::Standby(holder);
        state.stream_waiting_since = now;
        state.broker_waiting_since = now;
        state.in_flight = 0;
        state.paused = false;
        state.destination_fault = None;
    }

    /// A message arrived from the server: data, a keepalive, or the relay's own
    /// heartbeat coming back.
    pub fn stream_progress(&self) {
        let now = self.clock.now();
        self.state().stream_waiting_since = now;
    }

    /// The broker acknowledged a delivery (success or a definite failure: either way
    /// it answered). Clears a destination fault: the destination works again.
    pub fn broker_progress(&self) {
        let now = self.clock.now();
        let mut state = self.state();
        state.broker_waiting_since = now;
        state.destination_fault = None;
    }

    /// `n` records are in flight. Going from none to some starts the wait for an
    /// acknowledgement; none in flight is progress.
    pub fn records_in_flight(&self, n: usize) {
        let mut state = self.state();
        if n == 0 || state.in_flight == 0 {
            state.broker_waiting_since = self.clock.now();
        }
        state.in_flight = n;
    }

    /// Reading from the server is paused for backpressure (`true`) or resumed
    /// (`false`). While paused the stream is not expected to progress; on resume the
    /// wait starts anew.
    pub fn reading_paused(&self, paused: bool) {
        let mut state = self.state();
        if state.paused != paused {
            state.stream_waiting_since = self.clock.now();
        }
        state.paused = paused;
    }

    /// The relay stopped on a definite error that retrying will not fix. Unhealthy
    /// with `reason` until the next [`Health::streaming`].
    pub fn failed(&self, reason: String) {
        self.state().phase = Phase::Failed(reason);
    }

    /// The destination failed as a whole; the relay stopped reading and retries
    /// with a new sink. Unhealthy (`destination_failed`) with `reason` until the
    /// destination acknowledges a record again ([`Health::broker_progress`]), new
    /// sessions notwithstanding: a destination that refuses every record must not
    /// look healthy between two attempts. A definite failure still comes first.
    pub fn destination_failed(&self, reason: String) {
        self.state().destination_fault = Some(reason);
    }

    /// Whether a destination fault is reported (the relay keeps backing off).
    pub fn destination_fault(&self) -> Option<String> {
        self.state().destination_fault.clone()
    }

    /// The session ended, or could not start, on a transient error and the relay is
    /// reconnecting. Healthy until the stream threshold has passed since the last
    /// progress, then unhealthy with `reason`. Before the first session the relay
    /// stays `starting` (unhealthy) and only reports `reason`. Does not clear a
    /// definite failure; ends the pause, as a new session starts reading.
    pub fn reconnecting(&self, reason: String) {
        let now = self.clock.now();
        let mut state = self.state();
        if state.paused {
            state.paused = false;
            state.stream_waiting_since = now;
        }
        match state.phase {
            Phase::Failed(_) => {}
            Phase::Starting(_) => state.phase = Phase::Starting(Some(reason)),
            Phase::Streaming | Phase::Standby(_) | Phase::Reconnecting(_) => {
                state.phase = Phase::Reconnecting(reason);
            }
        }
    }

    /// The relay's health now.
    pub fn report(&self) -> HealthReport {
        let now = self.clock.now();
        let state = self.state();
        let stream_wait = if state.paused {
            Duration::ZERO
        } else {
            now.saturating_duration_since(state.stream_waiting_since)
        };
        let broker_wait = if state.in_flight == 0 {
            Duration::ZERO
        } else {
            now.saturating_duration_since(state.broker_waiting_since)
        };
        let stream_stalled = stream_wait >= self.thresholds.stream_stall;
        let broker_stalled = state.in_flight > 0 && broker_wait >= self.thresholds.broker_stall;

        let (healthy, status, reason) = match &state.phase {
            Phase::Failed(reason) => (false, Status::Failed, Some(reason.clone())),
            Phase::Standby(holder) => (true, Status::Standby, Some(holder.clone())),
            _ if state.destination_fault.is_some() => (
                false,
                Status::DestinationFailed,
                state.destination_fault.clone(),
            ),
            Phase::Starting(reason) => (false, Status::Starting, reason.clone()),
            Phase::Reconnecting(reason) if stream_stalled => {
                (false, Status::Reconnecting, Some(reason.clone()))
            }
            _ if broker_stalled => (
                false,
                Status::BrokerUnreachable,
                Some(format!(
                    "{} records in flight and none acknowledged for {} s",
                    state.in_flight,
                    broker_wait.as_secs()
                )),
            ),
            Phase::Reconnecting(reason) => (true, Status::Reconnecting, Some(reason.clone())),
            Phase::Streaming if stream_stalled => (
                false,
                Status::Stalled,
                Some(format!(
                    "no message from the server for {} s",
                    stream_wait.as_secs()
                )),
            ),
            Phase::Streaming => (true, Status::Streaming, None),
        };
        let ready = !matches!(state.phase, Phase::Starting(_) | Phase::Failed(_));
        let role = match state.phase {
            Phase::Streaming => Some(Role::Active),
            Phase::Standby(_) => Some(Role::Standby),
            _ => None,
        };
        HealthReport {
            healthy,
            ready,
            role,
            status,
            reason,
            seconds_since_stream_progress: stream_wait.as_secs(),
            seconds_since_broker_progress: broker_wait.as_secs(),
            in_flight: state.in_flight,
            reading_paused: state.paused,
        }
    }
}

#[cfg(test)]
mod tests;
