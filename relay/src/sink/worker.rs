//! The publishing task behind the sinks whose clients are asynchronous (NATS
//! JetStream, RabbitMQ, Redis Streams): [`Piped`] keeps the synchronous side of
//! [`Sink`](super::Sink), one task drives the client.
//!
//! ```text
//!   send ──try_send──▶ [jobs, bounded] ──▶ task: publish(batch) in order ──▶ acks
//!   poll_next ◀──────── [outcomes] ◀──────────── each ack as it completes ◀──┘
//! ```
//!
//! Why the contract of [`crate::sink`] holds:
//! - **Order per key.** One task takes the jobs in the order they were sent and
//!   hands each batch to the client before taking the next, over one connection
//!   (one channel for RabbitMQ); the servers store what one connection publishes
//!   in the order it was published.
//! - **Every job ends in one outcome.** An acknowledgement future exists for each
//!   record handed to the client and reports it once; a fault of the destination
//!   (a lost connection, an acknowledgement that never came) ends the task with a
//!   [`SinkError`] and nothing after it is reported as acknowledged, so the relay
//!   starts over from what it confirmed.
//! - **Backpressure.** The job queue holds at most the relay's in-flight bound;
//!   when it is full `send` answers `Full`, and the next outcome wakes the caller.
//! - **Cancel-safe.** `poll_next` only receives from a channel.
//! - **Nothing behind the next session's back.** Dropping the sink aborts the task.

use std::future::Future;
use std::task::{Context, Poll};

use bytes::Bytes;
use futures::future::BoxFuture;
use futures::stream::FuturesUnordered;
use futures::StreamExt;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::{Event, Handed, Refusal, SinkError, Ticket};
use crate::routing::OutboxRecord;

/// Records taken from the queue and handed to the client at once, at most.
const BATCH: usize = 256;

/// A record to publish.
pub(crate) type Job = (Ticket, OutboxRecord);

/// Why a published record was not acknowledged.
#[derive(Debug)]
pub(crate) enum Failure {
    /// The record can never be accepted as it is; with its value.
    Record(Refusal, Option<Bytes>),
    /// The destination is at fault.
    Destination(SinkError),
}

/// The outcomes of records handed to the client, when they are known.
pub(crate) type Acks = BoxFuture<'static, Vec<(Ticket, Result<(), Failure>)>>;

/// A client that publishes records in the order it is given them.
pub(crate) trait Publisher: Send + 'static {
    /// Hands `batch` to the client, in order, and returns the futures of their
    /// acknowledgements. An error here is a fault of the destination.
    fn publish(
        &mut self,
        batch: Vec<Job>,
    ) -> impl Future<Output = Result<Vec<Acks>, SinkError>> + Send;
}

type Report = Result<(Ticket, Result<(), Refusal>, Option<Bytes>), SinkError>;

/// The synchronous half: a bounded job queue and the outcomes.
#[derive(Debug)]
pub(crate) struct Piped {
    name: &'static str,
    jobs: mpsc::Sender<Job>,
    outcomes: mpsc::UnboundedReceiver<Report>,
    task: JoinHandle<()>,
    /// A job the queue had no room for, so `poll_next` wakes the caller once an
    /// outcome makes room.
    waiting: bool,
}

impl Piped {
    /// Starts the task driving `publisher`, with room for `capacity` queued jobs.
    pub(crate) fn start<P: Publisher>(name: &'static str, publisher: P, capacity: usize) -> Piped {
        let (jobs, queue) = mpsc::channel(capacity.max(1));
        let (report, outcomes) = mpsc::unbounded_channel();
        let task = tokio::spawn(run(publisher, queue, report));
        Piped {
            name,
            jobs,
            outcomes,
            task,
            waiting: false,
        }
    }

    /// Queues a record for the task, unless it is larger than `limit` bytes of key,
    /// value and headers (`what` names the limit in the refusal).
    pub(crate) fn send_within(
        &mut self,
        ticket: Ticket,
        record: &OutboxRecord,
        limit: usize,
        what: &str,
    ) -> Result<Handed, SinkError> {
        if record.size() > limit {
            return Ok(Handed::Refused(Refusal::new(
                super::RefusalKind::TooLarge,
                format!("{} bytes with headers; {what} is {limit}", record.size()),
            )));
        }
        self.send(ticket, record)
    }

    /// Queues a record for the task.
    fn send(&mut self, ticket: Ticket, record: &OutboxRecord) -> Result<Handed, SinkError> {
        match self.jobs.try_send((ticket, record.clone())) {
            Ok(()) => Ok(Handed::Accepted),
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.waiting = true;
                Ok(Handed::Full)
            }
            // The task ended: its reason is in the outcomes.
            Err(mpsc::error::TrySendError::Closed(_)) => Ok(Handed::Full),
        }
    }

    pub(crate) fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Result<Event, SinkError>> {
        match self.outcomes.poll_recv(cx) {
            Poll::Ready(Some(Ok((ticket, Ok(()), _)))) => Poll::Ready(Ok(Event::Acked(ticket))),
            Poll::Ready(Some(Ok((ticket, Err(refusal), value)))) => {
                Poll::Ready(Ok(Event::Refused(ticket, refusal, value)))
            }
            Poll::Ready(Some(Err(error))) => Poll::Ready(Err(error)),
            Poll::Ready(None) => Poll::Ready(Err(SinkError::unavailable(
                self.name,
                "the publishing task ended",
            ))),
            Poll::Pending if self.waiting && self.jobs.capacity() > 0 => {
                self.waiting = false;
                Poll::Ready(Ok(Event::Ready))
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

impl Drop for Piped {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The task: takes batches in order, hands each to the client, reports each
/// acknowledgement as it completes; ends at the first fault of the destination.
async fn run<P: Publisher>(
    mut publisher: P,
    mut queue: mpsc::Receiver<Job>,
    report: mpsc::UnboundedSender<Report>,
) {
    let mut acks: FuturesUnordered<Acks> = FuturesUnordered::new();
    let mut open = true;
    loop {
        tokio::select! {
            biased;
            Some(outcomes) = acks.next(), if !acks.is_empty() => {
                for (ticket, outcome) in outcomes {
                    let sent = match outcome {
                        Ok(()) => report.send(Ok((ticket, Ok(()), None))),
                        Err(Failure::Record(refusal, value)) => {
                            report.send(Ok((ticket, Err(refusal), value)))
                        }
                        Err(Failure::Destination(error)) => {
                            let _ = report.send(Err(error));
                            return;
                        }
                    };
                    if sent.is_err() {
                        return;
                    }
                }
            }
            job = queue.recv(), if open => {
                let Some(job) = job else {
                    open = false;
                    continue;
                };
                let mut batch = vec![job];
                while batch.len() < BATCH {
                    match queue.try_recv() {
                        Ok(job) => batch.push(job),
                        Err(_) => break,
                    }
                }
                match publisher.publish(batch).await {
                    Ok(more) => acks.extend(more),
                    Err(error) => {
                        let _ = report.send(Err(error));
                        return;
                    }
                }
            }
            else => return,
        }
    }
}
