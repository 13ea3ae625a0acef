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
/// The suffix of the default dead-letter topic: `<group_id>.dlq`.
pub const DEAD_LETTER_SUFFIX: &str = ".dlq";

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
    /// librdkafka options for all clients of the consumer (consumer, dead-letter
    /// producer, admin), e.g. TLS or SASL settings. They cannot replace the options
    /// the contracts rest on (offset handling, idempotence, acknowledgements).
    pub options: BTreeMap<String, String>,
}

impl ConsumerConfig {
    /// A configuration with the defaults: dead letters to `<group_id>.dlq`,
    /// [`DEFAULT_MAX_ATTEMPTS`], [`DEFAULT_BACKOFF`] doubling up to
    /// [`DEFAULT_MAX_BACKOFF`], [`DEFAULT_MAX_IN_FLIGHT`].
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
        if self.max_backoff < self.backoff {
            return invalid("max_backoff is shorter than backoff");
        }
        Ok(())
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
            .field("options", &self.options.keys().collect::<Vec<_>>())
            .finish()
    }
}
