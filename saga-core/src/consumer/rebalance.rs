//! What a member is assigned and what it loses: librdkafka's rebalance callbacks
//! drop a revoked partition's bookkeeping before the revocation completes, and report
//! every change to an optional observer.

use std::sync::{Arc, Mutex};

use rdkafka::client::ClientContext;
use rdkafka::consumer::{BaseConsumer, ConsumerContext, Rebalance};
use rdkafka::error::{KafkaError, KafkaResult, RDKafkaErrorCode};
use rdkafka::TopicPartitionList;

use super::lock;
use super::offsets::OffsetTracker;

/// A change of a member's assignment, as librdkafka's rebalance callbacks report it
/// to a [`Consumer::with_rebalance_observer`](super::Consumer::with_rebalance_observer) observer.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum RebalanceEvent {
    /// The partition was assigned to this member.
    Assigned { topic: String, partition: i32 },
    /// The partition was taken from this member. `unfinished` of its messages had
    /// been received and were not done (being handled, or waiting in their lane):
    /// their offsets stay uncommitted and the partition's next owner handles them.
    /// Reported after the partition's bookkeeping was dropped, before the revocation
    /// completes.
    Revoked {
        topic: String,
        partition: i32,
        unfinished: usize,
    },
}

/// What [`Consumer::with_rebalance_observer`](super::Consumer::with_rebalance_observer) calls.
pub(super) type RebalanceObserver = Box<dyn Fn(&RebalanceEvent) + Send + Sync>;

/// librdkafka's rebalance callbacks: revoked partitions lose their bookkeeping before
/// the revocation completes. They run inside the stream's poll, in the run loop's task.
pub(super) struct RebalanceHooks {
    pub(super) tracker: Arc<Mutex<OffsetTracker>>,
    pub(super) observer: Mutex<Option<RebalanceObserver>>,
}

impl RebalanceHooks {
    fn observe(&self, event: RebalanceEvent) {
        if let Some(observer) = lock(&self.observer).as_ref() {
            observer(&event);
        }
    }
}

impl ClientContext for RebalanceHooks {}

impl ConsumerContext for RebalanceHooks {
    fn pre_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Revoke(partitions) => {
                let mut revoked = Vec::new();
                {
                    let mut tracker = lock(&self.tracker);
                    for element in partitions.elements() {
                        let unfinished = tracker.revoke(element.topic(), element.partition());
                        tracing::info!(
                            topic = element.topic(),
                            partition = element.partition(),
                            unfinished,
                            "partition revoked"
                        );
                        revoked.push(RebalanceEvent::Revoked {
                            topic: element.topic().to_owned(),
                            partition: element.partition(),
                            unfinished,
                        });
                    }
                }
                for event in revoked {
                    self.observe(event);
                }
            }
            Rebalance::Assign(_) => {}
            Rebalance::Error(err) => tracing::warn!(error = %err, "rebalance failed"),
        }
    }

    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(partitions) = rebalance {
            for element in partitions.elements() {
                tracing::info!(
                    topic = element.topic(),
                    partition = element.partition(),
                    "partition assigned"
                );
                self.observe(RebalanceEvent::Assigned {
                    topic: element.topic().to_owned(),
                    partition: element.partition(),
                });
            }
        }
    }

    fn commit_callback(&self, result: KafkaResult<()>, offsets: &TopicPartitionList) {
        match result {
            Ok(()) => tracing::debug!(partitions = offsets.count(), "offsets committed"),
            Err(KafkaError::ConsumerCommit(RDKafkaErrorCode::NoOffset)) => {}
            // The offsets stay stored and go with the next commit; meanwhile a
            // restart redoes a few messages, which the journal skips.
            Err(err) => tracing::warn!(error = %err, "committing offsets failed"),
        }
    }
}
