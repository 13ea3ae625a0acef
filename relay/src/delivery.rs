//! The one delivery loop: records in, settlements out, at most `max_in_flight`
//! between. The stream ([`crate::stream`]) and the initial snapshot
//! ([`crate::snapshot`]) both hand their records to a [`Delivery`].
//!
//! ```text
//!   push(tag, record) ──▶ waiting ──send──▶ sink ──Acked──────────────▶ Settled(tag)
//!                            ▲  Full: wait     │
//!                            │                 └─Refused──▶ dead letter ──▶ waiting (front)
//!                            └──────────── Ready / an outcome: offer again
//! ```
//!
//! Why it keeps the contract of [`crate::sink`]:
//! - **Nothing settles that is not durable.** A tag is settled only by the
//!   sink's `Acked` for its record, or for the dead letter that replaced it. A
//!   refused record's letter inherits its tag, so the transaction it counts for
//!   stays incomplete until the letter is acknowledged. A record that cannot be
//!   dead-lettered (no dead-letter topic, or the letter refused even when shrunk to
//!   digests) stops the loop with [`DeliveryError::Undeliverable`]: never settled.
//! - **Bounded.** Records waiting for the sink count like records in flight;
//!   [`Delivery::can_accept`] is false at the bound and callers stop reading. The
//!   loop never blocks a caller: backpressure is the caller waiting on
//!   [`Delivery::next`] beside whatever keeps its own connection alive.
//! - **Values kept once.** A record's value goes to the sink; if the sink
//!   refuses the record later, it hands the value back for the dead letter.
//! - **Order.** Records are offered in push order, and a record the sink pushes
//!   back holds every later one back with it.
//! - **Cancel-safe.** [`Delivery::next`] awaits only the sink's cancel-safe
//!   `poll_next` and changes state only after it returned, so it can sit in
//!   `select!` beside the replication stream.
//!
//! A fault of the destination as a whole ([`SinkError`]) ends the loop: the caller
//! stops, confirms nothing it did not see settled, and starts over with a new sink.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::SystemTime;

use crate::deadletter::{self, Reason};
use crate::health::Health;
use crate::metrics::Metrics;
use crate::routing::{OutboxRecord, Position};
use crate::sink::{self, Event, Handed, Refusal, RefusalKind, Sink, SinkError, Ticket};
use crate::trace::PublishSpan;

/// The loop cannot go on.
#[derive(Debug, thiserror::Error)]
pub enum DeliveryError {
    #[error(transparent)]
    Sink(#[from] SinkError),
    /// A record was refused and cannot be dead-lettered.
    #[error("record {position} (id {id}, topic {topic}) cannot be delivered: {refusal}{why}")]
    Undeliverable {
        position: Position,
        id: String,
        topic: String,
        refusal: Refusal,
        /// Why no dead letter took its place.
        why: &'static str,
    },
}

impl DeliveryError {
    /// Whether a new sink may succeed.
    pub fn is_transient(&self) -> bool {
        match self {
            DeliveryError::Sink(e) => e.is_transient(),
            DeliveryError::Undeliverable { .. } => false,
        }
    }
}

/// A record settled: acknowledged, itself or as its dead letter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settled<T> {
    pub tag: T,
    /// Why it went to the dead-letter topic, if it did.
    pub letter: Option<Reason>,
}

#[derive(Debug)]
struct Flight<T> {
    tag: T,
    /// The record; once the sink accepted it, without its value, which the sink
    /// hands back should it refuse the record later. Values of records in flight
    /// are not kept twice (keeping them cost a fifth of the throughput on small
    /// records, in allocator work).
    record: OutboxRecord,
    /// Key, value and header bytes, for the metrics.
    size: usize,
    /// Why this record is a dead letter, if it is one.
    letter: Option<Reason>,
    /// Whether it is a dead letter shrunk to digests (the last resort).
    shrunk: bool,
    commit_time: Option<SystemTime>,
    /// The record's span when it is traced; it ends when the flight is settled.
    trace: Option<PublishSpan>,
}

/// The records accepted by the sink, by ticket. Tickets are handed out in
/// increasing order and mostly settle in that order, so a ring indexed from the
/// oldest unsettled ticket finds each one without hashing.
#[derive(Debug)]
struct InFlight<T> {
    /// The ticket of `slots[0]`.
    first: Ticket,
    slots: VecDeque<Option<Flight<T>>>,
    len: usize,
}

impl<T> Default for InFlight<T> {
    fn default() -> InFlight<T> {
        InFlight {
            first: 0,
            slots: VecDeque::new(),
            len: 0,
        }
    }
}

impl<T> InFlight<T> {
    fn next_ticket(&self) -> Ticket {
        self.first + self.slots.len() as Ticket
    }

    /// Keeps `flight` under [`next_ticket`](Self::next_ticket).
    fn insert(&mut self, flight: Flight<T>) {
        self.slots.push_back(Some(flight));
        self.len += 1;
    }

    fn remove(&mut self, ticket: Ticket) -> Option<Flight<T>> {
        let index = usize::try_from(ticket.checked_sub(self.first)?).ok()?;
        let flight = self.slots.get_mut(index)?.take()?;
        self.len -= 1;
        while matches!(self.slots.front(), Some(None)) {
            self.slots.pop_front();
            self.first += 1;
        }
        Some(flight)
    }

    fn len(&self) -> usize {
        self.len
    }
}

/// The delivery loop over sink `S`, settling tags `T`.
pub struct Delivery<S, T> {
    sink: S,
    dead_letter_topic: Option<String>,
    budget: usize,
    max_in_flight: usize,
    in_flight: InFlight<T>,
    waiting: VecDeque<Flight<T>>,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
}

impl<S, T> std::fmt::Debug for Delivery<S, T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Delivery")
            .field("in_flight", &self.in_flight.len())
            .field("waiting", &self.waiting.len())
            .finish_non_exhaustive()
    }
}

impl<S: Sink, T: Copy> Delivery<S, T> {
    /// A loop over `sink` holding at most `max_in_flight` records, dead-lettering
    /// refused records to `dead_letter_topic` (`None`: a refusal stops the loop).
    pub fn new(
        sink: S,
        max_in_flight: usize,
        dead_letter_topic: Option<String>,
        metrics: Arc<Metrics>,
        health: Arc<Health>,
    ) -> Delivery<S, T> {
        let budget = deadletter::budget(sink.max_record_bytes());
        Delivery {
            sink,
            dead_letter_topic,
            budget,
            max_in_flight,
            in_flight: InFlight::default(),
            waiting: VecDeque::new(),
            metrics,
            health,
        }
    }

    /// The sink, once nothing is left to settle (the snapshot hands it on to the
    /// stream).
    pub fn into_sink(self) -> S {
        self.sink
    }

    /// Records pushed and not yet settled.
    pub fn len(&self) -> usize {
        self.in_flight.len() + self.waiting.len()
    }

    /// Whether nothing awaits settlement.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether the caller may push another record (below the in-flight bound).
    pub fn can_accept(&self) -> bool {
        self.len() < self.max_in_flight
    }

    /// The dead letter's budget, for letters of rows that could not be routed.
    pub fn letter_budget(&self) -> usize {
        self.budget
    }

    /// Hands over a record counted for `tag` (`letter`: it is already a dead
    /// letter, of a row that could not be routed). Never waits: past the bound it
    /// queues; call [`next`](Self::next) to make room.
    pub fn push(
        &mut self,
        tag: T,
        record: OutboxRecord,
        letter: Option<Reason>,
        commit_time: Option<SystemTime>,
    ) -> Result<(), DeliveryError> {
        if let Some(elapsed) = commit_time.and_then(|t| SystemTime::now().duration_since(t).ok()) {
            self.metrics.commit_to_send(elapsed);
        }
        let mut record = record;
        let trace = PublishSpan::start(&mut record, self.sink.name());
        let mut flight = Flight {
            tag,
            size: record.size(),
            record,
            letter,
            shrunk: false,
            commit_time,
            trace,
        };
        if let Err(reason) = self.sink.check_name(&flight.record.topic) {
            flight = self.replace(flight, Refusal::new(RefusalKind::BadRoute, reason))?;
        }
        self.waiting.push_back(flight);
        self.offer()
    }

    /// Pushes a record, first waiting for room below the bound (for callers with
    /// no connection to keep alive meanwhile: the snapshot).
    pub async fn push_when_room(
        &mut self,
        tag: T,
        record: OutboxRecord,
        letter: Option<Reason>,
    ) -> Result<(), DeliveryError> {
        while !self.can_accept() {
            self.next().await?;
        }
        self.push(tag, record, letter, None)
    }

    /// Waits for the next settled record. Pending for ever when nothing awaits
    /// settlement. Cancel-safe.
    pub async fn next(&mut self) -> Result<Settled<T>, DeliveryError> {
        loop {
            match sink::next_event(&mut self.sink).await? {
                Event::Acked(ticket) => {
                    let Some(flight) = self.in_flight.remove(ticket) else {
                        continue;
                    };
                    self.settled(&flight);
                    self.offer()?;
                    return Ok(Settled {
                        tag: flight.tag,
                        letter: flight.letter,
                    });
                }
                Event::Refused(ticket, refusal, payload) => {
                    if let Some(mut flight) = self.in_flight.remove(ticket) {
                        flight.record.payload = payload;
                        let letter = self.replace(flight, refusal)?;
                        self.waiting.push_front(letter);
                    }
                    self.offer()?;
                }
                Event::Ready => self.offer()?,
            }
        }
    }

    /// Offers the waiting records, in order, until the sink pushes back.
    fn offer(&mut self) -> Result<(), DeliveryError> {
        while let Some(flight) = self.waiting.front() {
            let ticket = self.in_flight.next_ticket();
            match self.sink.send(ticket, &flight.record)? {
                Handed::Accepted => {
                    if let Some(mut flight) = self.waiting.pop_front() {
                        flight.record.payload = None;
                        self.in_flight.insert(flight);
                    }
                }
                Handed::Full => break,
                Handed::Refused(refusal) => {
                    if let Some(flight) = self.waiting.pop_front() {
                        let letter = self.replace(flight, refusal)?;
                        self.waiting.push_front(letter);
                    }
                }
            }
        }
        Ok(())
    }

    /// The dead letter taking a refused record's place, counted for its tag.
    fn replace(&self, mut flight: Flight<T>, refusal: Refusal) -> Result<Flight<T>, DeliveryError> {
        if let Some(trace) = &mut flight.trace {
            trace.refused(&refusal);
        }
        let undeliverable = |flight: Flight<T>, refusal, why| {
            Err(DeliveryError::Undeliverable {
                position: flight.record.position,
                id: flight.record.id,
                topic: flight.record.topic,
                refusal,
                why,
            })
        };
        if let Some(reason) = flight.letter {
            if refusal.kind == RefusalKind::TooLarge && !flight.shrunk {
                tracing::warn!(position = %flight.record.position, %refusal, "a dead letter was refused as too large; sending its digests");
                let record = deadletter::shrink(&flight.record, &refusal);
                return Ok(Flight {
                    size: record.size(),
                    record,
                    letter: Some(reason),
                    shrunk: true,
                    ..flight
                });
            }
            return undeliverable(flight, refusal, "; it is itself a dead letter");
        }
        let Some(dlq) = &self.dead_letter_topic else {
            return undeliverable(flight, refusal, " (no dead-letter topic is configured)");
        };
        tracing::warn!(
            position = %flight.record.position,
            topic = %flight.record.topic,
            %refusal,
            dlq = %dlq,
            "dead-lettering a refused record"
        );
        let record = deadletter::refused(dlq, &flight.record, &refusal, self.budget);
        Ok(Flight {
            size: record.size(),
            record,
            letter: Some(Reason::of(refusal.kind)),
            ..flight
        })
    }

    fn settled(&self, flight: &Flight<T>) {
        self.health.broker_progress();
        match flight.letter {
            Some(reason) => self.metrics.dead_lettered(reason),
            None => {
                self.metrics.events_routed(1);
                self.metrics.bytes_routed(flight.size as u64);
            }
        }
        if let Some(elapsed) = flight
            .commit_time
            .and_then(|t| SystemTime::now().duration_since(t).ok())
        {
            self.metrics
                .set_behind_source_ms(u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX));
            self.metrics.commit_to_ack(elapsed);
        }
    }
}

#[cfg(test)]
mod tests;
