//! The Kafka side: producer settings that keep the delivery contract, topic
//! creation, and sending with backpressure.
//!
//! Delivery contract of this sink: a record handed to [`KafkaSink::send`] is either
//! acknowledged by all in-sync replicas (its delivery future resolves `Ok`) or reported
//! failed; it is never dropped and never expires while the broker is away, because
//! `message.timeout.ms` is 0. The relay confirms WAL only on `Ok` deliveries.

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord};
use rdkafka::ClientConfig;

use crate::config::KafkaConfig;
use crate::routing::{OutboxRecord, Position};

/// Bytes the producer may buffer, at most, unless configured otherwise.
pub const DEFAULT_QUEUE_KBYTES: u32 = 32 * 1024;

/// How long an admin request may take.
const ADMIN_TIMEOUT: Duration = Duration::from_secs(30);

/// A client configuration with the brokers and the pass-through options only (for
/// metadata and admin clients).
pub fn client_config(config: &KafkaConfig) -> ClientConfig {
    let mut client = ClientConfig::new();
    for (key, value) in &config.options {
        client.set(key, value);
    }
    client.set("bootstrap.servers", &config.brokers);
    client
}

/// The producer configuration. The options the delivery contract rests on come
/// last, so pass-through options cannot replace them (validation also rejects them).
pub fn producer_config(config: &KafkaConfig) -> ClientConfig {
    let mut options: BTreeMap<&str, String> = BTreeMap::new();
    // Identifies the relay in broker logs and quotas.
    options.insert("client.id", "outbox-relay".to_owned());
    // Batch for a few milliseconds: throughput without visible latency.
    options.insert("linger.ms", "5".to_owned());
    // Bounded memory: the in-flight bound of the relay, and a byte cap. librdkafka's
    // defaults (100 000 messages, 1 GiB) are not a bound worth the name.
    options.insert(
        "queue.buffering.max.messages",
        config.max_in_flight.to_string(),
    );
    options.insert(
        "queue.buffering.max.kbytes",
        DEFAULT_QUEUE_KBYTES.to_string(),
    );
    // Notice dead connections while the broker is unreachable.
    options.insert("socket.keepalive.enable", "true".to_owned());
    for (key, value) in &config.options {
        options.insert(key, value.clone());
    }

    let mut client = ClientConfig::new();
    for (key, value) in options {
        client.set(key, value);
    }
    client
        .set("bootstrap.servers", &config.brokers)
        // No duplicates from internal retries, and order per partition kept with
        // several requests in flight.
        .set("enable.idempotence", "true")
        // A record counts as delivered only when every in-sync replica has it.
        .set("acks", "all")
        // Never expire a record: a re-send after expiry could reorder a key. A broker
        // outage becomes backpressure instead.
        .set("message.timeout.ms", "0")
        // Kafka's Java partitioner (murmur2): a key lands where Debezium and every
        // Java producer put it; keyless records spread at random.
        .set("partitioner", "murmur2_random");
    client
}

/// Why a record was not handed to the producer. The caller keeps the record.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// The producer queue is full: wait for deliveries, then send again.
    #[error("the producer queue is full")]
    QueueFull,
    /// The record can never be sent as it is (too large, invalid).
    #[error("record {position} for topic {topic} cannot be produced")]
    Definite {
        position: Position,
        topic: String,
        #[source]
        source: KafkaError,
    },
    /// Any other producer failure.
    #[error("the producer failed")]
    Producer(#[source] KafkaError),
}

/// Topic creation failed.
#[derive(Debug, thiserror::Error)]
#[error("cannot create topic {topic}")]
pub struct TopicError {
    pub topic: String,
    #[source]
    pub source: KafkaError,
}

impl TopicError {
    /// Whether asking again later may succeed (the broker was unreachable or busy),
    /// as opposed to a refusal of this topic.
    pub fn is_transient(&self) -> bool {
        match &self.source {
            KafkaError::AdminOp(code) => !matches!(
                code,
                RDKafkaErrorCode::InvalidTopic
                    | RDKafkaErrorCode::TopicAuthorizationFailed
                    | RDKafkaErrorCode::ClusterAuthorizationFailed
                    | RDKafkaErrorCode::PolicyViolation
                    | RDKafkaErrorCode::InvalidPartitions
                    | RDKafkaErrorCode::InvalidReplicationFactor
                    | RDKafkaErrorCode::InvalidConfig
                    | RDKafkaErrorCode::InvalidRequest
                    | RDKafkaErrorCode::UnsupportedVersion
            ),
            KafkaError::AdminOpCreation(_) => false,
            _ => true,
        }
    }
}

/// The producer and the topics known to exist.
pub struct KafkaSink {
    producer: FutureProducer,
    admin: Option<AdminClient<DefaultClientContext>>,
    known_topics: HashSet<String>,
    partitions: i32,
    replication_factor: i32,
}

impl std::fmt::Debug for KafkaSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaSink")
            .field("known_topics", &self.known_topics.len())
            .field("creates_topics", &self.admin.is_some())
            .finish_non_exhaustive()
    }
}

impl KafkaSink {
    /// Creates the producer (and the admin client when topics are to be created).
    pub fn new(config: &KafkaConfig) -> Result<KafkaSink, KafkaError> {
        let client = producer_config(config);
        let producer: FutureProducer = client.create()?;
        let admin = if config.create_topics {
            Some(client.create()?)
        } else {
            None
        };
        Ok(KafkaSink {
            producer,
            admin,
            known_topics: HashSet::new(),
            partitions: config.topic_partitions,
            replication_factor: config.topic_replication_factor,
        })
    }

    /// Makes sure `topic` exists, creating it once when topic creation is on.
    pub async fn ensure_topic(&mut self, topic: &str) -> Result<(), TopicError> {
        if self.known_topics.contains(topic) {
            return Ok(());
        }
        let Some(admin) = &self.admin else {
            self.known_topics.insert(topic.to_owned());
            return Ok(());
        };
        let new_topic = NewTopic::new(
            topic,
            self.partitions,
            TopicReplication::Fixed(self.replication_factor),
        );
        let options = AdminOptions::new().operation_timeout(Some(ADMIN_TIMEOUT));
        let error = |source| TopicError {
            topic: topic.to_owned(),
            source,
        };
        let results = admin
            .create_topics([&new_topic], &options)
            .await
            .map_err(error)?;
        for result in results {
            match result {
                Ok(_) => tracing::info!(topic, partitions = self.partitions, "created topic"),
                Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((_, code)) => return Err(error(KafkaError::AdminOp(code))),
            }
        }
        self.known_topics.insert(topic.to_owned());
        Ok(())
    }

    /// Hands a record to the producer without waiting for the broker.
    /// librdkafka copies what it needs, so the record stays with the caller, who
    /// keeps what a dead letter needs without copying it.
    pub fn send(&self, record: &OutboxRecord) -> Result<DeliveryFuture, SendError> {
        let mut headers = OwnedHeaders::new_with_capacity(record.headers.len());
        for (key, value) in &record.headers {
            headers = headers.insert(Header {
                key,
                value: Some(value.as_ref()),
            });
        }
        let mut kafka_record = FutureRecord::to(&record.topic)
            .key(record.key.as_ref())
            .headers(headers);
        if let Some(payload) = &record.payload {
            kafka_record = kafka_record.payload(payload.as_ref());
        }
        match self.producer.send_result(kafka_record) {
            Ok(future) => Ok(future),
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                Err(SendError::QueueFull)
            }
            Err((error, _)) if is_definite(&error) => Err(SendError::Definite {
                position: record.position,
                topic: record.topic.clone(),
                source: error,
            }),
            Err((error, _)) => Err(SendError::Producer(error)),
        }
    }

    /// Waits until every record handed over is acknowledged or failed, up to `timeout`.
    pub fn flush(&self, timeout: Duration) -> Result<(), KafkaError> {
        use rdkafka::producer::Producer;
        self.producer.flush(timeout)
    }
}

/// Whether the error says the record is too large.
pub fn is_too_large(error: &KafkaError) -> bool {
    matches!(
        error,
        KafkaError::MessageProduction(
            RDKafkaErrorCode::MessageSizeTooLarge | RDKafkaErrorCode::InvalidMessageSize
        )
    )
}

/// Errors tied to the record itself: sending it again cannot succeed.
pub fn is_definite(error: &KafkaError) -> bool {
    let code = match error {
        KafkaError::MessageProduction(code) => *code,
        _ => return false,
    };
    matches!(
        code,
        RDKafkaErrorCode::MessageSizeTooLarge
            | RDKafkaErrorCode::InvalidMessageSize
            | RDKafkaErrorCode::InvalidMessage
            | RDKafkaErrorCode::InvalidRecord
            | RDKafkaErrorCode::InvalidTopic
            | RDKafkaErrorCode::TopicAuthorizationFailed
            | RDKafkaErrorCode::UnknownTopicOrPartition
            | RDKafkaErrorCode::UnknownTopic
            | RDKafkaErrorCode::UnknownPartition
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::RelayConfig;

    #[test]
    fn delivery_options_cannot_be_overridden() {
        let mut config = RelayConfig::new("postgres://h/db", "k:1").kafka;
        config
            .options
            .insert("linger.ms".to_owned(), "50".to_owned());
        // Validation rejects these; the producer config must still keep the contract.
        config.options.insert("acks".to_owned(), "1".to_owned());
        config
            .options
            .insert("message.timeout.ms".to_owned(), "1000".to_owned());
        let client = producer_config(&config);
        assert_eq!(client.get("acks"), Some("all"));
        assert_eq!(client.get("message.timeout.ms"), Some("0"));
        assert_eq!(client.get("enable.idempotence"), Some("true"));
        assert_eq!(client.get("partitioner"), Some("murmur2_random"));
        assert_eq!(client.get("linger.ms"), Some("50"));
        assert_eq!(client.get("bootstrap.servers"), Some("k:1"));
        assert_eq!(
            client.get("queue.buffering.max.messages"),
            Some(config.max_in_flight.to_string().as_str())
        );
    }

    #[test]
    fn too_large_is_definite_and_transport_is_not() {
        assert!(is_definite(&KafkaError::MessageProduction(
            RDKafkaErrorCode::MessageSizeTooLarge
        )));
        assert!(!is_definite(&KafkaError::MessageProduction(
            RDKafkaErrorCode::BrokerTransportFailure
        )));
        assert!(!is_definite(&KafkaError::MessageProduction(
            RDKafkaErrorCode::QueueFull
        )));
    }
}
