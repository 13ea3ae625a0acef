//! Where records go: the [`Sink`] trait and the delivery contract every sink keeps.
//!
//! The relay confirms a WAL position to PostgreSQL only when every record up to it
//! is durable at the destination; everything between the replication stream and
//! that promise rests on the contract below. [`crate::delivery`] is the one loop
//! that drives a sink (for the stream and for the initial snapshot alike);
//! [`kafka`], [`nats`], [`rabbitmq`] and [`redis`] are the destinations ([`any`]
//! picks the configured one), [`memory`] a double of this contract for
//! deterministic tests of the loop.
//!
//! # The contract
//!
//! 1. **Every record handed over ends in exactly one outcome.** [`Sink::send`]
//!    takes a record with a caller-chosen [`Ticket`]. It answers [`Handed::Accepted`]
//!    (the outcome comes later from [`Sink::poll_next`]), [`Handed::Full`] (the sink
//!    pushes back; the record was *not* taken and the caller offers it again after
//!    the next event), or [`Handed::Refused`]. An accepted record later ends
//!    [`Event::Acked`] — durable at the destination, as the destination defines
//!    durable (Kafka: every in-sync replica has it) — or [`Event::Refused`], which
//!    hands the record's value back when the sink still has it.
//! 2. **A refusal is about one record.** [`Refusal`] means this record can never be
//!    accepted as it is (too large, a name the destination cannot have, invalid): the
//!    relay dead-letters it and goes on. A fault of the destination as a whole
//!    (unreachable, access denied, a topic that does not exist) is never a refusal:
//!    the sink fails with a [`SinkError`] instead, the relay stops reading, reports
//!    unhealthy and retries with a new sink, and nothing is confirmed past the
//!    records it could not deliver.
//! 3. **A sink pushes back; it never drops and never expires.** While the
//!    destination is away, records stay accepted and unacknowledged (or `send`
//!    answers `Full`); the relay's in-flight bound stops reading from PostgreSQL.
//! 4. **Order per key.** Records of one key handed over in order are stored in
//!    that order (Kafka: one idempotent producer, one partition per key).
//! 5. **The relay confirms** a WAL position only when every record up to it is
//!    `Acked`, or was `Refused` and replaced by a dead letter that is `Acked`
//!    ([`crate::ack`] keeps that arithmetic).
//!
//! A sink is used by one task. [`Sink::poll_next`] must be cancel-safe: the loop
//! polls it inside `select!` beside the replication stream, so every piece of work
//! in progress (a topic being created, deliveries awaited) lives in the sink, not
//! in the future that polls it.

use std::fmt;
use std::future::poll_fn;

use bytes::Bytes;
use std::task::{Context, Poll};

use crate::routing::OutboxRecord;

pub mod any;
pub mod kafka;
pub mod memory;
pub mod nats;
pub mod rabbitmq;
pub mod redis;
mod worker;

/// The caller's handle on one handed-over record; echoed in its outcome.
pub type Ticket = u64;

/// What [`Sink::send`] did with a record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Handed {
    /// Taken; its outcome comes from [`Sink::poll_next`].
    Accepted,
    /// Not taken: the sink is full (or preparing the destination). Offer the record
    /// again after the next [`Event`].
    Full,
    /// Not taken, and it never will be as it is.
    Refused(Refusal),
}

/// What happened to a handed-over record, or to the sink.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The record is durable at the destination.
    Acked(Ticket),
    /// The destination refused the record for good; with its value, when the sink
    /// can give it back (the relay does not keep the values of records in flight:
    /// the dead letter takes it from here).
    Refused(Ticket, Refusal, Option<Bytes>),
    /// The sink can take records again (after [`Handed::Full`]).
    Ready,
}

/// Why a record can never be accepted as it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub kind: RefusalKind,
    /// The destination's own words, for the dead letter and the log.
    pub detail: String,
}

impl Refusal {
    pub fn new(kind: RefusalKind, detail: impl Into<String>) -> Refusal {
        Refusal {
            kind,
            detail: detail.into(),
        }
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.kind.as_str(), self.detail)
    }
}

/// The kinds of [`Refusal`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RefusalKind {
    /// Larger than the destination accepts.
    TooLarge,
    /// The record's destination name (a rendered topic) is not one the destination
    /// can have.
    BadRoute,
    /// Refused for another reason tied to the record itself.
    Invalid,
}

impl RefusalKind {
    pub const fn as_str(self) -> &'static str {
        match self {
            RefusalKind::TooLarge => "too large",
            RefusalKind::BadRoute => "bad route",
            RefusalKind::Invalid => "invalid",
        }
    }
}

/// The sink failed as a whole: no record is at fault.
#[derive(Debug, thiserror::Error)]
#[error("{sink} sink: {reason}")]
pub struct SinkError {
    pub sink: &'static str,
    pub kind: SinkErrorKind,
    pub reason: String,
    #[source]
    pub source: Option<Box<dyn std::error::Error + Send + Sync>>,
}

/// How the relay reacts to a [`SinkError`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SinkErrorKind {
    /// The destination cannot take records now (access denied, a topic missing,
    /// the client in a state it cannot leave): report unhealthy with the reason,
    /// build a new sink and try again with backoff.
    Unavailable,
    /// The sink cannot work as configured (an option the client rejects): an
    /// operator must act.
    Fatal,
}

impl SinkError {
    pub fn unavailable(sink: &'static str, reason: impl Into<String>) -> SinkError {
        SinkError {
            sink,
            kind: SinkErrorKind::Unavailable,
            reason: reason.into(),
            source: None,
        }
    }

    pub fn fatal(sink: &'static str, reason: impl Into<String>) -> SinkError {
        SinkError {
            sink,
            kind: SinkErrorKind::Fatal,
            reason: reason.into(),
            source: None,
        }
    }

    pub fn with_source(mut self, source: impl std::error::Error + Send + Sync + 'static) -> Self {
        self.source = Some(Box::new(source));
        self
    }

    /// Whether a new sink may succeed later.
    pub fn is_transient(&self) -> bool {
        self.kind == SinkErrorKind::Unavailable
    }
}

/// A destination for outbox records, keeping the contract of this module.
pub trait Sink {
    /// The sink's name in logs and metrics (`kafka`, `nats`, `rabbitmq`, `redis`,
    /// `memory`).
    fn name(&self) -> &'static str;

    /// Whether the destination can have a record under this name (a rendered
    /// topic); `Err` says why not, and the record is dead-lettered as a bad route.
    fn check_name(&self, name: &str) -> Result<(), String>;

    /// The largest record the destination takes, in bytes of key, value and
    /// headers; dead letters are made to fit well below it.
    fn max_record_bytes(&self) -> usize;

    /// Offers one record. The sink copies what it needs; the caller keeps the
    /// record (for its dead letter, should it be refused later).
    fn send(&mut self, ticket: Ticket, record: &OutboxRecord) -> Result<Handed, SinkError>;

    /// The next event. Pending while nothing is in flight and nothing is being
    /// prepared. Cancel-safe (see the module doc).
    fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Result<Event, SinkError>>;
}

/// An error and its causes, `outer: inner`, for `check`'s report.
pub(crate) fn describe(error: &(dyn std::error::Error + 'static)) -> String {
    std::iter::successors(Some(error), |e| e.source())
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(": ")
}

/// Waits for the sink's next event.
pub async fn next_event<S: Sink + ?Sized>(sink: &mut S) -> Result<Event, SinkError> {
    poll_fn(|cx| sink.poll_next(cx)).await
}
