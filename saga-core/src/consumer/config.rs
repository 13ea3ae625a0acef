//! What a consumer reads, where it puts dead letters, how it retries, and the
//! librdkafka configuration of its clients.

use std::collections::BTreeMap;
use std::time::Duration;

use rdkafka::ClientConfig;

use super::dead_letter::DEAD_LETTER_TIMEOUT;
use super::scope;
use super::ConsumerError;

/// Attempts per message, at most, before it is dead-lettered.
pub const DEFAULT_MAX_ATTEMPTS: u32 = 5;
/// The delay before the first retry; it doubles with every further one.
pub const DEFAULT_BACKOFF: Duration = Duration::from_millis(100);
/// The longest delay between two attempts.
pub const DEFAULT_MAX_BACKOFF: Duration = Duration::from_secs(10);
/// Messages being handled or waiting for their key, at most.
pub const DEFAULT_MAX_IN_FLIGHT: usize = 64;
/// The default for [`ConsumerConfig::batch_max`].
pub const DEFAULT_BATCH_MAX: usize = 32;
/// The suffix of the default dead-letter topic: `<group_id>.dlq`.
pub const DEAD_LETTER_SUFFIX: &str = ".dlq";
/// `session.timeout.ms` of a member without instance id, unless the options say
/// otherwise: how long a member killed without leaving holds its partitions, and so
/// how long its successor waits for them (librdkafka's default is 45 s).
pub const DEFAULT_SESSION_TIMEOUT: Duration = Duration::from_secs(10);
/// `session.timeout.ms` of a member with an instance id, unless the options say
/// otherwise. Its successor takes the membership over under the same id without
/// waiting, so the session only has to outlast a restart: the new process's first
/// heartbeat must come within the session of the old one's last, or the broker
/// drops the membership the new process just took over (and some brokers, tansu
/// 0.6 among them, then leave the group without a leader for good). Kafka's own
/// advice for static members is a session longer than a restart; 45 s is
/// librdkafka's default. A member that stops cleanly leaves at once either way.
pub const DEFAULT_STATIC_SESSION_TIMEOUT: Duration = Duration::from_secs(45);
/// `heartbeat.interval.ms` unless the options say otherwise: a third of the session
/// timeout, so that one lost heartbeat does not cost a member its partitions.
pub const DEFAULT_HEARTBEAT_INTERVAL: Duration = Duration::from_secs(3);
/// How long a member that should have partitions goes without any before it
/// rejoins its group (see the `membership` module).
pub const DEFAULT_REJOIN_AFTER: Duration = Duration::from_secs(12);
/// The longest instance id Apache Kafka accepts.
const MAX_INSTANCE_ID_LEN: usize = 249;

/// What a [`Consumer`](super::Consumer) reads, where it puts dead letters and how it retries.
#[derive(Clone)]
pub struct ConsumerConfig {
    /// `bootstrap.servers`.
    pub brokers: String,
    /// The consumer group; also the journal's `consumer` value, so it must stay the
    /// same for as long as the journal's rows should count.
    pub group_id: String,
    /// The topics to subscribe to.
    pub topics: Vec<String>,
    /// Where dead letters go; default `<group_id>.dlq`.
    pub dead_letter_topic: String,
    /// Attempts per message (the first included) before a transiently failing message
    /// is dead-lettered; at least 1.
    pub max_attempts: u32,
    /// The delay before the first retry; doubles with every further one.
    pub backoff: Duration,
    /// The longest delay between two attempts.
    pub max_backoff: Duration,
    /// Messages being handled or waiting for their key, at most; at least 1.
    pub max_in_flight: usize,
    /// Messages of different keys handled in one transaction, at most; 1 handles
    /// every message in a transaction of its own. Messages are batched only when
    /// they are at hand together (a poll returned several), so a batch never waits
    /// to fill up.
    pub batch_max: usize,
    /// The member's instance id (`group.instance.id`, static membership): a member
    /// started again under the same id, while its predecessor's membership has not
    /// expired, takes that membership over at once instead of waiting for the
    /// session timeout. It must be stable across restarts of one process and unique
    /// among the live members of the group: a second live member with the same id
    /// fences the first off ([`ConsumerError::Fenced`]). Letters, digits, `.`, `_`
    /// and `-`. `None`: an ordinary member (or a `group.instance.id` in `options`).
    pub instance_id: Option<String>,
    /// How long a member that should have partitions goes without any before it
    /// leaves and joins its group again; doubles after each rejoin, up to
    /// [`MAX_REJOIN_WAIT`](super::MAX_REJOIN_WAIT).
    pub rejoin_after: Duration,
    /// librdkafka options for all clients of the consumer (consumer, dead-letter
    /// producer, admin), e.g. TLS or SASL settings, or `session.timeout.ms` and
    /// `heartbeat.interval.ms` (default [`DEFAULT_SESSION_TIMEOUT`], or
    /// [`DEFAULT_STATIC_SESSION_TIMEOUT`] with an instance id, and
    /// [`DEFAULT_HEARTBEAT_INTERVAL`]). They cannot replace the options the contracts
    /// rest on (offset handling, idempotence, acknowledgements).
    pub options: BTreeMap<String, String>,
}

impl ConsumerConfig {
    /// A configuration with the defaults: dead letters to `<group_id>.dlq`,
    /// [`DEFAULT_MAX_ATTEMPTS`], [`DEFAULT_BACKOFF`] doubling up to
    /// [`DEFAULT_MAX_BACKOFF`], [`DEFAULT_MAX_IN_FLIGHT`], no instance id, a rejoin
    /// after [`DEFAULT_REJOIN_AFTER`] without partitions.
    pub fn new<T: Into<String>>(
        brokers: impl Into<String>,
        group_id: impl Into<String>,
        topics: impl IntoIterator<Item = T>,
    ) -> ConsumerConfig {
        let group_id = group_id.into();
        ConsumerConfig {
            brokers: brokers.into(),
            dead_letter_topic: format!("{group_id}{DEAD_LETTER_SUFFIX}"),
            group_id,
            topics: topics.into_iter().map(Into::into).collect(),
            max_attempts: DEFAULT_MAX_ATTEMPTS,
            backoff: DEFAULT_BACKOFF,
            max_backoff: DEFAULT_MAX_BACKOFF,
            max_in_flight: DEFAULT_MAX_IN_FLIGHT,
            batch_max: DEFAULT_BATCH_MAX,
            instance_id: None,
            rejoin_after: DEFAULT_REJOIN_AFTER,
            options: BTreeMap::new(),
        }
    }

    /// Checks what the consumer relies on.
    pub fn validate(&self) -> Result<(), ConsumerError> {
        let invalid = |reason: &str| Err(ConsumerError::Config(reason.to_owned()));
        if self.brokers.trim().is_empty() {
            return invalid("brokers is empty");
        }
        if self.group_id.trim().is_empty() {
            return invalid("group_id is empty");
        }
        if self.topics.is_empty() {
            return invalid("topics is empty: subscribe to at least one topic");
        }
        if self.dead_letter_topic.trim().is_empty() {
            return invalid("dead_letter_topic is empty");
        }
        if self.topics.contains(&self.dead_letter_topic) {
            return Err(ConsumerError::Config(format!(
                "dead_letter_topic {} is also consumed: dead letters would come back",
                self.dead_letter_topic
            )));
        }
        if self.max_attempts == 0 {
            return invalid("max_attempts is 0: every message needs at least one attempt");
        }
        if self.max_in_flight == 0 {
            return invalid("max_in_flight is 0: no message could ever be handled");
        }
        if self.batch_max == 0 {
            return invalid("batch_max is 0: use 1 for a transaction per message");
        }
        if self.max_backoff < self.backoff {
            return invalid("max_backoff is shorter than backoff");
        }
        if let Some(id) = &self.instance_id {
            let legal = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-');
            if id.is_empty() || id.len() > MAX_INSTANCE_ID_LEN || !id.chars().all(legal) {
                return Err(ConsumerError::Config(format!(
                    "instance_id {id:?} is not 1 to {MAX_INSTANCE_ID_LEN} letters, digits, \
                     '.', '_' or '-'"
                )));
            }
        }
        if self.rejoin_after.is_zero() {
            return invalid("rejoin_after is 0: a member would rejoin while it joins");
        }
        Ok(())
    }

    /// The member's instance id: [`ConsumerConfig::instance_id`], or the
    /// `group.instance.id` among the options.
    pub fn effective_instance_id(&self) -> Option<&str> {
        self.instance_id
            .as_deref()
            .or_else(|| self.options.get("group.instance.id").map(String::as_str))
    }

    /// The brokers and the pass-through options a client of `kind` reads (see
    /// [`scope`]); for [`scope::Kind::Producer`], the admin client's configuration.
    pub(super) fn client_config(&self, kind: scope::Kind) -> ClientConfig {
        let mut client = ClientConfig::new();
        // Identifies the group's clients in broker logs; a pass-through may replace it.
        client.set("client.id", &self.group_id);
        scope::set_options(&mut client, kind, &self.options);
        client.set("bootstrap.servers", &self.brokers);
        client
    }

    /// The consumer's configuration; the options the contracts rest on come last, so
    /// pass-through options cannot replace them.
    pub(super) fn consumer_config(&self) -> ClientConfig {
        let mut client = self.client_config(scope::Kind::Consumer);
        // A member killed without leaving holds its partitions for the session
        // timeout; a static member's successor takes them over at once, so its
        // session only has to outlast a restart. With the heartbeats at most a third
        // of it apart, one lost heartbeat does not cost a live member its
        // partitions. Options may set either.
        let session = if self.effective_instance_id().is_some() {
            DEFAULT_STATIC_SESSION_TIMEOUT
        } else {
            DEFAULT_SESSION_TIMEOUT
        };
        for (key, default) in [
            ("session.timeout.ms", session),
            ("heartbeat.interval.ms", DEFAULT_HEARTBEAT_INTERVAL),
        ] {
            if !self.options.contains_key(key) {
                client.set(key, default.as_millis().to_string());
            }
        }
        // Static membership: a restarted member takes its predecessor's place.
        if let Some(id) = &self.instance_id {
            client.set("group.instance.id", id);
        }
        client
            .set("group.id", &self.group_id)
            // Commit what has been *stored*, periodically, on revocation and on close.
            // Offsets are stored only after the work below them is durable.
            .set("enable.auto.commit", "true")
            // Never store an offset when librdkafka hands a message out: only after
            // its transaction committed or its dead letter was acknowledged.
            .set("enable.auto.offset.store", "false")
            // A new group starts at the beginning of each partition, not at its end.
            .set("auto.offset.reset", "earliest");
        // isolation.level: left at its default, read_committed.
        client
    }

    /// The dead-letter producer's configuration.
    pub(super) fn producer_config(&self) -> ClientConfig {
        let mut client = self.client_config(scope::Kind::Producer);
        client
            // No duplicates or reordering from librdkafka's internal retries.
            .set("enable.idempotence", "true")
            // A dead letter counts only when every in-sync replica has it.
            .set("acks", "all")
            // A dead letter the broker does not acknowledge in time fails, and the
            // consumer stops with an error instead of hanging without a trace.
            .set(
                "message.timeout.ms",
                DEAD_LETTER_TIMEOUT.as_millis().to_string(),
            )
            // Kafka's Java partitioner: a key lands where Java clients put it.
            .set("partitioner", "murmur2_random");
        client
    }
}

/// Shows option names only: their values may be secrets (`sasl.password`).
impl std::fmt::Debug for ConsumerConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConsumerConfig")
            .field("brokers", &self.brokers)
            .field("group_id", &self.group_id)
            .field("topics", &self.topics)
            .field("dead_letter_topic", &self.dead_letter_topic)
            .field("max_attempts", &self.max_attempts)
            .field("backoff", &self.backoff)
            .field("max_backoff", &self.max_backoff)
            .field("max_in_flight", &self.max_in_flight)
            .field("batch_max", &self.batch_max)
            .field("instance_id", &self.instance_id)
            .field("rejoin_after", &self.rejoin_after)
            .field("options", &self.options.keys().collect::<Vec<_>>())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> ConsumerConfig {
        ConsumerConfig::new("b:9092", "orders", ["order.reply"])
    }

    #[test]
    fn the_session_defaults_give_way_to_the_options() {
        let consumer = config().consumer_config();
        assert_eq!(consumer.get("session.timeout.ms"), Some("10000"));
        assert_eq!(consumer.get("heartbeat.interval.ms"), Some("3000"));
        assert_eq!(consumer.get("group.instance.id"), None);

        let mut config = config();
        config
            .options
            .insert("session.timeout.ms".into(), "45000".into());
        let consumer = config.consumer_config();
        assert_eq!(consumer.get("session.timeout.ms"), Some("45000"));
        assert_eq!(consumer.get("heartbeat.interval.ms"), Some("3000"));
        // Only the consumer reads them.
        assert_eq!(config.producer_config().get("session.timeout.ms"), None);
        assert_eq!(config.producer_config().get("heartbeat.interval.ms"), None);
    }

    #[test]
    fn a_static_member_gets_a_session_that_outlasts_a_restart() {
        let mut config = config();
        config.instance_id = Some("order-0".into());
        let consumer = config.consumer_config();
        assert_eq!(consumer.get("session.timeout.ms"), Some("45000"));
        assert_eq!(consumer.get("heartbeat.interval.ms"), Some("3000"));
        // An id among the options makes a static member too.
        let mut config = self::config();
        config
            .options
            .insert("group.instance.id".into(), "order-1".into());
        assert_eq!(
            config.consumer_config().get("session.timeout.ms"),
            Some("45000")
        );
        // The options still win.
        config
            .options
            .insert("session.timeout.ms".into(), "20000".into());
        assert_eq!(
            config.consumer_config().get("session.timeout.ms"),
            Some("20000")
        );
    }

    #[test]
    fn the_instance_id_goes_to_the_consumer_only_and_wins_over_the_options() {
        let mut config = config();
        config
            .options
            .insert("group.instance.id".into(), "from-options".into());
        assert_eq!(config.effective_instance_id(), Some("from-options"));
        config.instance_id = Some("order-0".into());
        assert_eq!(config.effective_instance_id(), Some("order-0"));
        assert_eq!(
            config.consumer_config().get("group.instance.id"),
            Some("order-0")
        );
        assert_eq!(config.producer_config().get("group.instance.id"), None);
    }

    #[test]
    fn instance_ids_are_checked() {
        for good in ["order-0", "shop.order_service-7d9f8c-x2k4q", "a"] {
            let mut config = config();
            config.instance_id = Some(good.into());
            assert!(config.validate().is_ok(), "{good}");
        }
        for bad in ["", "order 0", "order/0", "ü", &"x".repeat(250)] {
            let mut config = config();
            config.instance_id = Some(bad.into());
            assert!(
                matches!(config.validate(), Err(ConsumerError::Config(_))),
                "{bad:?}"
            );
        }
        let mut config = config();
        config.rejoin_after = Duration::ZERO;
        assert!(config.validate().is_err());
    }
}
