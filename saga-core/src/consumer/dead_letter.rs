//! Dead letters: a message the consumer gives up on is produced, unchanged (key,
//! value, headers), to the group's dead-letter topic with headers that say why and
//! where it came from. The consumer moves past it only once the broker has
//! acknowledged the dead letter (DESIGN contract 5: nothing is dropped without a trace).

use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::util::Timeout;

use super::message::RawMessage;

/// Header: why the message was dead-lettered, in words.
pub const HEADER_REASON: &str = "dlq-reason";
/// Header: why, as a code (see [`DeadLetterReason::code`]).
pub const HEADER_REASON_CODE: &str = "dlq-reason-code";
/// Header: the topic the message was consumed from.
pub const HEADER_SOURCE_TOPIC: &str = "dlq-source-topic";
/// Header: its partition.
pub const HEADER_SOURCE_PARTITION: &str = "dlq-source-partition";
/// Header: its offset.
pub const HEADER_SOURCE_OFFSET: &str = "dlq-source-offset";
/// Header: the consumer (group and journal name) that gave up on it.
pub const HEADER_CONSUMER: &str = "dlq-consumer";

/// Partitions of a dead-letter topic the consumer creates: one, so the dead letters
/// of a group read in the order they were written.
pub const DEAD_LETTER_PARTITIONS: i32 = 1;
/// Replication factor of a dead-letter topic the consumer creates: the broker's default.
pub const DEAD_LETTER_REPLICATION_FACTOR: i32 = -1;
/// How long producing a dead letter may take before the consumer stops with an error.
pub const DEAD_LETTER_TIMEOUT: Duration = Duration::from_secs(30);
/// How long creating the dead-letter topic may take.
const ADMIN_TIMEOUT: Duration = Duration::from_secs(30);

/// Why a message became a dead letter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DeadLetterReason {
    /// The record is not a message: no or an invalid `id` header, a value that is
    /// not JSON, a key that is not UTF-8.
    Poison,
    /// The handler said the message can never be applied.
    Definite,
    /// Every attempt failed transiently.
    Exhausted,
    /// The handler panicked.
    Panicked,
}

impl DeadLetterReason {
    /// The code in header `dlq-reason-code`.
    pub const fn code(self) -> &'static str {
        match self {
            DeadLetterReason::Poison => "poison",
            DeadLetterReason::Definite => "definite",
            DeadLetterReason::Exhausted => "exhausted",
            DeadLetterReason::Panicked => "panicked",
        }
    }
}

/// Produces `raw` with the dead-letter headers to `topic` and waits for the broker's
/// acknowledgement.
pub(crate) async fn produce(
    producer: &FutureProducer,
    topic: &str,
    consumer: &str,
    raw: &RawMessage,
    reason: DeadLetterReason,
    reason_text: &str,
) -> Result<(), KafkaError> {
    let partition = raw.partition.to_string();
    let offset = raw.offset.to_string();
    let mut headers = OwnedHeaders::new_with_capacity(raw.headers.len() + 6);
    for (key, value) in &raw.headers {
        headers = headers.insert(Header {
            key,
            value: value.as_deref(),
        });
    }
    for (key, value) in [
        (HEADER_REASON, reason_text),
        (HEADER_REASON_CODE, reason.code()),
        (HEADER_SOURCE_TOPIC, raw.topic.as_str()),
        (HEADER_SOURCE_PARTITION, partition.as_str()),
        (HEADER_SOURCE_OFFSET, offset.as_str()),
        (HEADER_CONSUMER, consumer),
    ] {
        headers = headers.insert(Header {
            key,
            value: Some(value),
        });
    }
    let mut record = FutureRecord::<[u8], [u8]>::to(topic).headers(headers);
    if let Some(key) = &raw.key {
        record = record.key(key.as_slice());
    }
    if let Some(payload) = &raw.payload {
        record = record.payload(payload.as_slice());
    }
    // Waiting for room in the producer queue is backpressure; the delivery itself is
    // bounded by `message.timeout.ms`.
    producer
        .send(record, Timeout::Never)
        .await
        .map(|_| ())
        .map_err(|(err, _)| err)
}

/// Creates `topic` unless it exists.
pub(crate) async fn ensure_topic(
    admin: &AdminClient<DefaultClientContext>,
    topic: &str,
) -> Result<(), KafkaError> {
    let new_topic = NewTopic::new(
        topic,
        DEAD_LETTER_PARTITIONS,
        TopicReplication::Fixed(DEAD_LETTER_REPLICATION_FACTOR),
    );
    let options = AdminOptions::new().operation_timeout(Some(ADMIN_TIMEOUT));
    for result in admin.create_topics([&new_topic], &options).await? {
        match result {
            Ok(_) => tracing::info!(topic, "created the dead-letter topic"),
            Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((_, code)) => return Err(KafkaError::AdminOp(code)),
        }
    }
    Ok(())
}
