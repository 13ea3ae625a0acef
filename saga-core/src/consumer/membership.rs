//! The membership watchdog: a member that should have partitions and has none for a
//! while leaves its group and joins it again.
//!
//! # Why it is needed
//!
//! A member killed without leaving (SIGKILL, a node lost, a pod restarted) stays in
//! its group until the broker stops hearing its heartbeats for `session.timeout.ms`.
//! Its successor joins meanwhile. Apache Kafka waits for the dead member's session to
//! expire before it completes the rebalance; some brokers (tansu 0.6) never complete
//! it for the joining member, which then waits without partitions for good, healthy
//! as far as anyone can tell. An instance id (`group.instance.id`) avoids the wait
//! for a member restarted under the same id; the watchdog rescues the others, and any
//! member a broker failed to rebalance.
//!
//! (tansu 0.6 completes a rebalance when the member it holds for leader sends its
//! assignment, and checks sessions only when requests come in. A member whose
//! successor's first heartbeat comes after the session expired is dropped, and if
//! it was the leader the group waits for a leader that no longer exists: no rejoin
//! cures that. A static member's session of 45 s, longer than a restart and the
//! takeover, keeps restarts out of it; see `DEFAULT_STATIC_SESSION_TIMEOUT`.)
//!
//! # Why it holds
//!
//! Every second it looks at the member's assignment (a local call). When the member
//! has had no partition for `rejoin_after` (12 s by default: longer than a join
//! takes, about a session timeout), it asks the broker for the subscribed topics'
//! partitions and the group's members. Only when the group has no more members than
//! the topic with the most partitions has partitions, every member is owed at least
//! one under both of librdkafka's eager assignors (`range` gives each topic's
//! partitions to the first members, `roundrobin` deals all of them out); then the
//! member unsubscribes (leaving the group) and subscribes again (joining anew). A
//! member idle because the group has more members than partitions is left alone.
//! Members that died but have not expired count too, so a group whose partitions are
//! all owed to dead members does not rejoin in vain. After a rejoin the next one
//! waits twice as long, up to [`MAX_REJOIN_WAIT`]; a member that gets a partition
//! starts again at `rejoin_after`.
//!
//! A rejoin loses nothing: the member owned no partition, so it had no offsets to
//! store, and leaving and joining is what a restart of the process would have done.
//!
//! # Fenced members
//!
//! Two live members with one instance id cannot both consume: the broker fences
//! the older one off (`FENCED_INSTANCE_ID`), which librdkafka makes a fatal error.
//! The consumer stops with [`ConsumerError::Fenced`], naming the id, instead of
//! staying alive without partitions.

use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::consumer::{Consumer as _, ConsumerContext, StreamConsumer};
use rdkafka::error::{KafkaError, KafkaResult, RDKafkaErrorCode};

use super::{ConsumerConfig, ConsumerError, ConsumerStats};

/// The longest wait between two rejoins of a member that stays without partitions.
pub const MAX_REJOIN_WAIT: Duration = Duration::from_secs(120);

/// How often the assignment is looked at, at most.
const TICK: Duration = Duration::from_secs(1);

/// How long a request for the group's view may take.
const VIEW_TIMEOUT: Duration = Duration::from_secs(5);

/// The subscribed topics and the group, as the broker describes them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct GroupView {
    /// The partitions of the subscribed topic that has the most.
    pub(super) partitions: usize,
    /// The group's members, the dead but unexpired included.
    pub(super) members: usize,
}

impl GroupView {
    /// Whether every member of the group is owed a partition.
    pub(super) fn owes_every_member(self) -> bool {
        self.partitions > 0 && self.members <= self.partitions
    }
}

/// When a member without partitions should look at its group, and rejoin.
#[derive(Debug)]
pub(super) struct Watchdog {
    first_wait: Duration,
    wait: Duration,
    /// Since when the member has had no partition.
    idle_since: Option<Instant>,
    /// The next look at the group, once it was looked at or rejoined.
    next_look: Option<Instant>,
}

impl Watchdog {
    pub(super) fn new(rejoin_after: Duration) -> Watchdog {
        Watchdog {
            first_wait: rejoin_after,
            wait: rejoin_after,
            idle_since: None,
            next_look: None,
        }
    }

    /// Records whether the member has partitions at `now`; whether it is time to look
    /// at the group (the member has been without partitions for the current wait).
    pub(super) fn due(&mut self, now: Instant, assigned: bool) -> bool {
        if assigned {
            self.wait = self.first_wait;
            self.idle_since = None;
            self.next_look = None;
            return false;
        }
        let idle_since = *self.idle_since.get_or_insert(now);
        now >= self.next_look.unwrap_or(idle_since + self.wait)
    }

    /// The group was looked at and owes this member nothing (or could not be seen):
    /// the next look comes after the current wait.
    pub(super) fn looked(&mut self, now: Instant) {
        self.next_look = Some(now + self.wait);
    }

    /// The member rejoined at `now`: the next rejoin waits twice as long.
    pub(super) fn rejoined(&mut self, now: Instant) {
        self.wait = (self.wait * 2).min(MAX_REJOIN_WAIT);
        self.next_look = Some(now + self.wait);
    }

    /// How long the member has been without partitions at `now`.
    fn idle_for(&self, now: Instant) -> Duration {
        self.idle_since
            .map_or(Duration::ZERO, |since| now.duration_since(since))
    }
}

/// What the watchdog of one consumer works on.
pub(super) struct Membership<C: ConsumerContext + 'static> {
    pub(super) consumer: Arc<StreamConsumer<C>>,
    pub(super) group: String,
    pub(super) topics: Vec<String>,
    pub(super) rejoin_after: Duration,
    pub(super) stats: Arc<ConsumerStats>,
}

impl<C: ConsumerContext + 'static> Membership<C> {
    /// Watches until dropped (the consumer's run loop aborts it when it stops).
    pub(super) async fn watch(self) {
        let mut watchdog = Watchdog::new(self.rejoin_after);
        let mut ticks = tokio::time::interval(TICK.min(self.rejoin_after));
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Set when a rejoin left the member unsubscribed: subscribe at the next tick.
        let mut resubscribe = false;
        loop {
            ticks.tick().await;
            if resubscribe {
                resubscribe = self.subscribe().await.is_err();
                continue;
            }
            let consumer = Arc::clone(&self.consumer);
            let assignment = tokio::task::spawn_blocking(move || consumer.assignment())
                .await
                .expect("reading the assignment does not panic");
            let assigned = match assignment {
                Ok(assignment) => assignment.count() > 0,
                Err(err) => {
                    tracing::debug!(error = %err, "cannot read the assignment");
                    continue;
                }
            };
            let now = Instant::now();
            if !watchdog.due(now, assigned) {
                continue;
            }
            let view = match self.view().await {
                Ok(view) => view,
                Err(err) => {
                    tracing::debug!(error = %err, "cannot describe the group");
                    watchdog.looked(now);
                    continue;
                }
            };
            if !view.owes_every_member() {
                tracing::debug!(?view, "without partitions, and not owed any");
                watchdog.looked(now);
                continue;
            }
            tracing::warn!(
                idle_s = watchdog.idle_for(now).as_secs(),
                partitions = view.partitions,
                members = view.members,
                "no partition assigned although the group owes every member one; rejoining"
            );
            self.stats.count_rejoin();
            watchdog.rejoined(now);
            resubscribe = self.rejoin().await.is_err();
        }
    }

    /// Leaves the group and joins it again.
    async fn rejoin(&self) -> KafkaResult<()> {
        self.resubscribe(true).await
    }

    async fn subscribe(&self) -> KafkaResult<()> {
        self.resubscribe(false).await
    }

    async fn resubscribe(&self, leave_first: bool) -> KafkaResult<()> {
        let consumer = Arc::clone(&self.consumer);
        let topics = self.topics.clone();
        let subscribed = tokio::task::spawn_blocking(move || {
            if leave_first {
                consumer.unsubscribe();
            }
            let topics: Vec<&str> = topics.iter().map(String::as_str).collect();
            consumer.subscribe(&topics)
        })
        .await
        .expect("subscribing does not panic");
        if let Err(err) = &subscribed {
            tracing::warn!(error = %err, "cannot subscribe again; trying again in a second");
        }
        subscribed
    }

    /// The subscribed topics' partitions and the group's members, from the broker.
    async fn view(&self) -> KafkaResult<GroupView> {
        let consumer = Arc::clone(&self.consumer);
        let (group, topics) = (self.group.clone(), self.topics.clone());
        tokio::task::spawn_blocking(move || {
            let mut partitions = 0;
            for topic in &topics {
                let metadata = consumer.fetch_metadata(Some(topic), VIEW_TIMEOUT)?;
                let count = metadata
                    .topics()
                    .iter()
                    .filter(|t| t.name() == topic && t.error().is_none())
                    .map(|t| t.partitions().len())
                    .sum::<usize>();
                partitions = partitions.max(count);
            }
            let groups = consumer.fetch_group_list(Some(&group), VIEW_TIMEOUT)?;
            let members = groups
                .groups()
                .iter()
                .filter(|g| g.name() == group)
                .map(|g| g.members().len())
                .sum();
            Ok(GroupView {
                partitions,
                members,
            })
        })
        .await
        .expect("describing the group does not panic")
    }
}

/// The error a fatal consumer error `err` stops the consumer with, given the
/// client's fatal error code `cause`: [`ConsumerError::Fenced`] when a member that
/// joined later with the same instance id took this one's place (librdkafka makes
/// that fatal: the member must not consume beside its successor).
pub(super) fn fatal_error(
    config: &ConsumerConfig,
    err: KafkaError,
    cause: Option<RDKafkaErrorCode>,
) -> ConsumerError {
    match (cause, config.effective_instance_id()) {
        (Some(RDKafkaErrorCode::FencedInstanceId | RDKafkaErrorCode::Fenced), Some(id)) => {
            ConsumerError::Fenced {
                group: config.group_id.clone(),
                instance_id: id.to_owned(),
            }
        }
        _ => ConsumerError::Kafka(cause.map_or(err, KafkaError::MessageConsumptionFatal)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const WAIT: Duration = Duration::from_secs(12);

    #[test]
    fn a_fenced_member_stops_with_its_instance_id_and_is_not_retried_as_transient() {
        let mut config = ConsumerConfig::new("b:9092", "orders", ["t"]);
        config.instance_id = Some("order-0".into());
        let fatal = || KafkaError::MessageConsumption(RDKafkaErrorCode::Fatal);
        let err = fatal_error(&config, fatal(), Some(RDKafkaErrorCode::FencedInstanceId));
        match &err {
            ConsumerError::Fenced {
                group, instance_id, ..
            } => assert_eq!(
                (group.as_str(), instance_id.as_str()),
                ("orders", "order-0")
            ),
            other => panic!("{other:?}"),
        }
        assert!(!err.is_transient());
        assert!(err.to_string().contains("order-0"), "{err}");

        // Another fatal error, and a fatal error of a member without instance id.
        let other = fatal_error(
            &config,
            fatal(),
            Some(RDKafkaErrorCode::InvalidSessionTimeout),
        );
        assert!(matches!(
            other,
            ConsumerError::Kafka(KafkaError::MessageConsumptionFatal(
                RDKafkaErrorCode::InvalidSessionTimeout
            ))
        ));
        config.instance_id = None;
        let unknown = fatal_error(&config, fatal(), Some(RDKafkaErrorCode::FencedInstanceId));
        assert!(matches!(unknown, ConsumerError::Kafka(_)));
        // The id given among the options counts as well.
        config
            .options
            .insert("group.instance.id".into(), "order-1".into());
        let fenced = fatal_error(&config, fatal(), Some(RDKafkaErrorCode::Fenced));
        assert!(
            matches!(fenced, ConsumerError::Fenced { ref instance_id, .. } if instance_id == "order-1")
        );
    }

    #[test]
    fn a_member_is_owed_a_partition_when_the_group_has_no_more_members_than_partitions() {
        let view = |partitions, members| GroupView {
            partitions,
            members,
        };
        assert!(view(3, 1).owes_every_member());
        assert!(view(3, 3).owes_every_member());
        assert!(!view(3, 4).owes_every_member());
        assert!(!view(0, 1).owes_every_member());
    }

    #[test]
    fn looks_after_the_wait_without_partitions_and_waits_longer_after_each_rejoin() {
        let start = Instant::now();
        let at = |s: u64| start + Duration::from_secs(s);
        let mut dog = Watchdog::new(WAIT);
        assert!(!dog.due(at(0), false));
        assert!(!dog.due(at(11), false));
        assert!(dog.due(at(12), false));
        dog.rejoined(at(12));
        // 24 s, 48 s, 96 s, then 120 s at most.
        assert!(!dog.due(at(35), false));
        assert!(dog.due(at(36), false));
        dog.rejoined(at(36));
        assert!(dog.due(at(84), false));
        dog.rejoined(at(84));
        assert!(dog.due(at(180), false));
        dog.rejoined(at(180));
        assert!(!dog.due(at(299), false));
        assert!(dog.due(at(300), false));
        dog.rejoined(at(300));
        assert!(dog.due(at(420), false));
    }

    #[test]
    fn partitions_reset_the_wait() {
        let start = Instant::now();
        let at = |s: u64| start + Duration::from_secs(s);
        let mut dog = Watchdog::new(WAIT);
        assert!(!dog.due(at(0), false));
        assert!(dog.due(at(12), false));
        dog.rejoined(at(12));
        assert!(!dog.due(at(13), true));
        // Without partitions again: the first wait, from then on.
        assert!(!dog.due(at(20), false));
        assert!(!dog.due(at(31), false));
        assert!(dog.due(at(32), false));
    }

    #[test]
    fn a_group_that_owes_nothing_is_looked_at_again_after_the_wait() {
        let start = Instant::now();
        let at = |s: u64| start + Duration::from_secs(s);
        let mut dog = Watchdog::new(WAIT);
        assert!(!dog.due(at(0), false));
        assert!(dog.due(at(12), false));
        dog.looked(at(12));
        assert!(!dog.due(at(23), false));
        assert!(dog.due(at(24), false));
    }
}
