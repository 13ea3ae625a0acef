//! A sink in memory: a double of the [`Sink`] contract, for deterministic tests of
//! the delivery loop and the stream above it.
//!
//! Records are *stored* in the order they are accepted (contract 4) and stay
//! pending until the test settles them through a [`MemoryHandle`]: acknowledged,
//! refused, or — when the test simulates a crash — landed or lost without an
//! outcome. The handle also fails the sink as a whole. Nothing happens by itself,
//! so a test decides every interleaving (from a seed, for property tests).

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, Waker};

use super::{Event, Handed, Refusal, RefusalKind, Sink, SinkError, SinkErrorKind, Ticket};
use crate::routing::OutboxRecord;

const NAME: &str = "memory";

/// Where a stored record stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stored {
    /// Accepted, no outcome yet.
    Pending,
    /// Durable and acknowledged.
    Acked,
    /// Durable, but the sink that took it went away before acknowledging it (a
    /// crash after the destination stored it): a copy the relay will send again.
    Landed,
}

/// One record the sink accepted.
#[derive(Debug, Clone)]
pub struct Entry {
    pub ticket: Ticket,
    pub record: OutboxRecord,
    pub state: Stored,
    /// Which sink (by [`MemoryHandle::new_sink`] order) accepted it.
    pub generation: u64,
}

#[derive(Debug, Default)]
struct State {
    /// Every accepted record, in acceptance order; refused and lost ones removed.
    log: Vec<Entry>,
    /// Outcomes to report, in order.
    events: std::collections::VecDeque<Event>,
    failure: Option<SinkError>,
    /// Pending records at most; beyond, `send` pushes back.
    capacity: usize,
    /// The current sink's generation; older sinks are dead.
    generation: u64,
    waker: Option<Waker>,
}

/// The test's side of memory sinks: builds them, settles their records, reads
/// what was stored. Clones share the state.
#[derive(Debug, Clone)]
pub struct MemoryHandle {
    state: Arc<Mutex<State>>,
    max_record_bytes: usize,
}

impl MemoryHandle {
    /// A handle whose sinks hold at most `capacity` pending records and take
    /// records up to `max_record_bytes`.
    pub fn new(capacity: usize, max_record_bytes: usize) -> MemoryHandle {
        MemoryHandle {
            state: Arc::new(Mutex::new(State {
                capacity,
                ..State::default()
            })),
            max_record_bytes,
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A new sink; the previous one is dead from now on (its pending records
    /// stay pending until [`crash`](Self::crash) decides their fate).
    pub fn new_sink(&self) -> MemorySink {
        let mut state = self.lock();
        state.generation += 1;
        state.events.clear();
        state.failure = None;
        MemorySink {
            handle: self.clone(),
            generation: state.generation,
        }
    }

    /// The current sink's pending records, in acceptance order.
    pub fn pending(&self) -> Vec<Entry> {
        let state = self.lock();
        state
            .log
            .iter()
            .filter(|e| e.state == Stored::Pending && e.generation == state.generation)
            .cloned()
            .collect()
    }

    /// Acknowledges a pending record of the current sink, and first every earlier
    /// pending record of its key: a key's records are stored in order (contract
    /// 4), so one stored means the earlier ones are too.
    pub fn ack(&self, ticket: Ticket) {
        let earlier: Vec<Ticket> = {
            let state = self.lock();
            let generation = state.generation;
            let pending = |e: &&Entry| e.generation == generation && e.state == Stored::Pending;
            let Some(key) = state
                .log
                .iter()
                .filter(pending)
                .find(|e| e.ticket == ticket)
                .map(|e| e.record.key.clone())
            else {
                return;
            };
            state
                .log
                .iter()
                .filter(pending)
                .take_while(|e| e.ticket != ticket)
                .filter(|e| e.record.key == key)
                .map(|e| e.ticket)
                .collect()
        };
        for earlier in earlier {
            self.settle(earlier, None);
        }
        self.settle(ticket, None);
    }

    /// Refuses a pending record of the current sink (it is not stored).
    pub fn refuse(&self, ticket: Ticket, kind: RefusalKind) {
        self.settle(ticket, Some(kind));
    }

    fn settle(&self, ticket: Ticket, refusal: Option<RefusalKind>) {
        let mut state = self.lock();
        let generation = state.generation;
        let Some(at) = state.log.iter().position(|e| {
            e.ticket == ticket && e.generation == generation && e.state == Stored::Pending
        }) else {
            return;
        };
        match refusal {
            None => {
                state.log[at].state = Stored::Acked;
                state.events.push_back(Event::Acked(ticket));
            }
            Some(kind) => {
                let entry = state.log.remove(at);
                state.events.push_back(Event::Refused(
                    ticket,
                    Refusal::new(kind, "refused by the memory sink"),
                    entry.record.payload,
                ));
            }
        }
        if let Some(waker) = state.waker.take() {
            waker.wake();
        }
    }

    /// Fails the current sink as a whole.
    pub fn fail(&self, kind: SinkErrorKind) {
        let mut state = self.lock();
        state.failure = Some(SinkError {
            sink: NAME,
            kind,
            reason: "failed by the test".to_owned(),
            source: None,
        });
        if let Some(waker) = state.waker.take() {
            waker.wake();
        }
    }

    /// The relay went away: each pending record of every sink either landed
    /// (`landed(record)` true) or was lost. As in a partition of a log, a record
    /// of a key lands only if every earlier pending record of that key landed.
    pub fn crash(&self, mut landed: impl FnMut(&OutboxRecord) -> bool) {
        let mut state = self.lock();
        let mut cut: std::collections::HashSet<bytes::Bytes> = std::collections::HashSet::new();
        state.log.retain_mut(|e| {
            if e.state != Stored::Pending {
                return true;
            }
            let keep = !cut.contains(&e.record.key) && landed(&e.record);
            if !keep {
                cut.insert(e.record.key.clone());
            }
            e.state = Stored::Landed;
            keep
        });
        state.events.clear();
    }

    /// Every stored record (acknowledged or landed), in the order stored.
    pub fn stored(&self) -> Vec<Entry> {
        self.lock()
            .log
            .iter()
            .filter(|e| e.state != Stored::Pending)
            .cloned()
            .collect()
    }

    /// Whether the record with this position and id was acknowledged.
    pub fn is_acked(&self, id: &str, topic: &str) -> bool {
        self.lock()
            .log
            .iter()
            .any(|e| e.state == Stored::Acked && e.record.id == id && e.record.topic == topic)
    }
}

/// A sink of a [`MemoryHandle`].
#[derive(Debug)]
pub struct MemorySink {
    handle: MemoryHandle,
    generation: u64,
}

impl MemorySink {
    /// A name the memory sink refuses, to test bad routes: empty, or containing a
    /// space.
    fn bad_name(name: &str) -> Option<String> {
        if name.is_empty() || name.contains(' ') {
            Some(format!("{name:?} is not a name the memory sink takes"))
        } else {
            None
        }
    }
}

impl Sink for MemorySink {
    fn name(&self) -> &'static str {
        NAME
    }

    fn check_name(&self, name: &str) -> Result<(), String> {
        match MemorySink::bad_name(name) {
            Some(reason) => Err(reason),
            None => Ok(()),
        }
    }

    fn max_record_bytes(&self) -> usize {
        self.handle.max_record_bytes
    }

    fn send(&mut self, ticket: Ticket, record: &OutboxRecord) -> Result<Handed, SinkError> {
        if record.size() > self.handle.max_record_bytes {
            return Ok(Handed::Refused(Refusal::new(
                RefusalKind::TooLarge,
                format!(
                    "{} bytes, more than {}",
                    record.size(),
                    self.handle.max_record_bytes
                ),
            )));
        }
        let mut state = self.handle.lock();
        if state.generation != self.generation {
            return Err(SinkError::unavailable(NAME, "this sink was replaced"));
        }
        let pending = state
            .log
            .iter()
            .filter(|e| e.state == Stored::Pending && e.generation == self.generation)
            .count();
        if pending >= state.capacity {
            return Ok(Handed::Full);
        }
        let generation = self.generation;
        state.log.push(Entry {
            ticket,
            record: record.clone(),
            state: Stored::Pending,
            generation,
        });
        Ok(Handed::Accepted)
    }

    fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Result<Event, SinkError>> {
        let mut state = self.handle.lock();
        if state.generation != self.generation {
            return Poll::Pending;
        }
        if let Some(error) = state.failure.take() {
            return Poll::Ready(Err(error));
        }
        if let Some(event) = state.events.pop_front() {
            return Poll::Ready(Ok(event));
        }
        state.waker = Some(cx.waker().clone());
        Poll::Pending
    }
}
