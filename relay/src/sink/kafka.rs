//! The Kafka sink: one idempotent producer (`acks=all`, records never expire),
//! topic creation, and the sorting of librdkafka's errors into the contract of
//! [`crate::sink`].
//!
//! | librdkafka says | the contract says |
//! |---|---|
//! | delivered | [`Event::Acked`]: every in-sync replica has the record |
//! | `QueueFull` | [`Handed::Full`]: backpressure, offer again after the next event |
//! | `MessageSizeTooLarge`, `InvalidMessageSize` | refused, too large |
//! | `InvalidTopic` (and names Kafka forbids, checked before sending) | refused, bad route |
//! | `InvalidMessage`, `InvalidRecord` | refused, invalid |
//! | authorization, unknown topic or partition, a fatal producer error, anything else | [`SinkError`]: the destination is at fault, not the record |
//!
//! While the broker is away nothing fails: `message.timeout.ms` is 0, deliveries
//! stay pending, and the relay's in-flight bound stops reading. A topic is created
//! (when `create_topics` is on) before the first record for it is accepted; while
//! that request is under way every record waits (`Full`), so order is kept, and
//! the relay keeps its replication connection alive meanwhile.
//!
//! A producer that hit a fatal error (the idempotent producer's unrecoverable
//! states) cannot be used again: the sink fails, and the relay builds a new sink
//! for its next session.

use std::collections::{HashMap, HashSet};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures::future::BoxFuture;
use futures::stream::FuturesUnordered;
use futures::{FutureExt, StreamExt};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::Message;

use super::{Event, Handed, Refusal, RefusalKind, Sink, SinkError, Ticket};
use crate::routing::OutboxRecord;

pub mod config;

pub use config::{client_config, producer_config, KafkaConfig};

/// The sink's name in logs and metrics.
const NAME: &str = "kafka";
/// How long an admin request may take.
const ADMIN_TIMEOUT: Duration = Duration::from_secs(30);
/// Pause before asking again for a topic while the broker is unreachable.
const TOPIC_RETRY: Duration = Duration::from_secs(1);
/// Pause before offering again when the producer queue is full with nothing of
/// ours in it to wait for.
const QUEUE_RETRY: Duration = Duration::from_millis(10);
/// The longest topic name Kafka accepts.
pub const MAX_TOPIC_LENGTH: usize = 249;

/// A delivery's outcome; a failed one with the record's value, handed back by
/// librdkafka.
type Delivery = BoxFuture<'static, (Ticket, Result<(), (KafkaError, Option<Bytes>)>)>;
type Creation = BoxFuture<'static, Result<(), KafkaError>>;

/// Whether Apache Kafka accepts `name` as a topic name: 1 to 249 characters of
/// `[a-zA-Z0-9._-]`, and neither `.` nor `..`.
pub fn check_topic_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("the topic name is empty".to_owned());
    }
    if name == "." || name == ".." {
        return Err(format!("{name:?} is not a valid topic name"));
    }
    if name.len() > MAX_TOPIC_LENGTH {
        return Err(format!(
            "the topic name is {} characters long; Kafka allows {MAX_TOPIC_LENGTH}",
            name.chars().count()
        ));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(format!(
            "topic {name:?} contains {c:?}; Kafka topic names are made of ASCII letters, \
             digits, '.', '_' and '-'"
        ));
    }
    Ok(())
}

/// What an error of librdkafka means for the contract.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// This record can never be accepted as it is.
    Record(RefusalKind),
    /// The destination (or the client) is at fault.
    Destination,
}

/// Sorts a produce or delivery error (see the table in the module doc).
pub fn classify(error: &KafkaError) -> Fault {
    let code = match error {
        KafkaError::MessageProduction(code) => *code,
        _ => return Fault::Destination,
    };
    match code {
        RDKafkaErrorCode::MessageSizeTooLarge | RDKafkaErrorCode::InvalidMessageSize => {
            Fault::Record(RefusalKind::TooLarge)
        }
        RDKafkaErrorCode::InvalidTopic => Fault::Record(RefusalKind::BadRoute),
        RDKafkaErrorCode::InvalidMessage | RDKafkaErrorCode::InvalidRecord => {
            Fault::Record(RefusalKind::Invalid)
        }
        _ => Fault::Destination,
    }
}

/// The producer, the topics known to exist, and the deliveries awaited.
pub struct KafkaSink {
    producer: FutureProducer,
    admin: Option<Arc<AdminClient<DefaultClientContext>>>,
    known_topics: HashSet<String>,
    /// Topics the broker refused to create because of their name.
    refused_topics: HashMap<String, Refusal>,
    /// A topic being created; every record waits meanwhile.
    creating: Option<(String, Creation)>,
    /// When to tell the caller to offer again (after a failed creation or a full
    /// queue with nothing of ours in it).
    retry: Option<Pin<Box<tokio::time::Sleep>>>,
    deliveries: FuturesUnordered<Delivery>,
    partitions: i32,
    replication_factor: i32,
    max_record_bytes: usize,
}

impl std::fmt::Debug for KafkaSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaSink")
            .field("known_topics", &self.known_topics.len())
            .field("creates_topics", &self.admin.is_some())
            .field("in_flight", &self.deliveries.len())
            .finish_non_exhaustive()
    }
}

impl KafkaSink {
    /// Creates the producer (and the admin client when topics are to be created).
    pub fn new(config: &KafkaConfig) -> Result<KafkaSink, SinkError> {
        let refused = |e: KafkaError| {
            SinkError::fatal(NAME, "librdkafka refused the producer configuration").with_source(e)
        };
        let client = producer_config(config);
        let producer: FutureProducer = client.create().map_err(refused)?;
        let admin = if config.create_topics {
            Some(Arc::new(client.create().map_err(refused)?))
        } else {
            None
        };
        Ok(KafkaSink {
            producer,
            admin,
            known_topics: HashSet::new(),
            refused_topics: HashMap::new(),
            creating: None,
            retry: None,
            deliveries: FuturesUnordered::new(),
            partitions: config.topic_partitions,
            replication_factor: config.topic_replication_factor,
            max_record_bytes: config.message_max_bytes(),
        })
    }

    /// The sink error for a fault of the destination, naming librdkafka's fatal
    /// error when the producer is in that state.
    fn destination_fault(&self, doing: &str, error: KafkaError) -> SinkError {
        match self.producer.client().fatal_error() {
            Some((code, reason)) => SinkError::unavailable(
                NAME,
                format!(
                    "the producer hit a fatal error ({code:?}: {reason}) while {doing}; \
                     a new producer will be built"
                ),
            ),
            None => SinkError::unavailable(NAME, format!("the broker failed while {doing}"))
                .with_source(error),
        }
    }

    fn start_creation(&mut self, topic: &str, admin: Arc<AdminClient<DefaultClientContext>>) {
        let new_topic = (
            topic.to_owned(),
            self.partitions,
            TopicReplication::Fixed(self.replication_factor),
        );
        let creation = async move {
            let (name, partitions, replication) = new_topic;
            let new_topic = NewTopic::new(&name, partitions, replication);
            let options = AdminOptions::new().operation_timeout(Some(ADMIN_TIMEOUT));
            let results = admin.create_topics([&new_topic], &options).await?;
            for result in results {
                match result {
                    Ok(_) => tracing::info!(topic = %name, partitions, "created topic"),
                    Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                    Err((_, code)) => return Err(KafkaError::AdminOp(code)),
                }
            }
            Ok(())
        }
        .boxed();
        self.creating = Some((topic.to_owned(), creation));
    }

    /// The outcome of a finished topic creation.
    fn created(&mut self, topic: String, result: Result<(), KafkaError>) -> Result<(), SinkError> {
        let code = match result {
            Ok(()) => {
                self.known_topics.insert(topic);
                return Ok(());
            }
            Err(KafkaError::AdminOp(code)) => code,
            Err(KafkaError::AdminOpCreation(reason)) => {
                return Err(SinkError::fatal(
                    NAME,
                    format!("cannot ask the broker to create topic {topic}: {reason}"),
                ))
            }
            Err(other) => {
                tracing::warn!(%topic, error = %other, "cannot create topic yet; retrying");
                self.retry = Some(Box::pin(tokio::time::sleep(TOPIC_RETRY)));
                return Ok(());
            }
        };
        match code {
            RDKafkaErrorCode::InvalidTopic => {
                tracing::warn!(%topic, "the broker refuses the topic name");
                self.refused_topics.insert(
                    topic.clone(),
                    Refusal::new(
                        RefusalKind::BadRoute,
                        format!("the broker refuses to create topic {topic:?} (InvalidTopic)"),
                    ),
                );
                Ok(())
            }
            RDKafkaErrorCode::TopicAuthorizationFailed
            | RDKafkaErrorCode::ClusterAuthorizationFailed
            | RDKafkaErrorCode::PolicyViolation
            | RDKafkaErrorCode::InvalidPartitions
            | RDKafkaErrorCode::InvalidReplicationFactor
            | RDKafkaErrorCode::InvalidConfig
            | RDKafkaErrorCode::InvalidRequest
            | RDKafkaErrorCode::UnsupportedVersion => Err(SinkError::unavailable(
                NAME,
                format!("the broker refuses to create topic {topic}: {code:?}"),
            )),
            other => {
                tracing::warn!(%topic, error = ?other, "cannot create topic yet; retrying");
                self.retry = Some(Box::pin(tokio::time::sleep(TOPIC_RETRY)));
                Ok(())
            }
        }
    }
}

impl Sink for KafkaSink {
    fn name(&self) -> &'static str {
        NAME
    }

    fn check_name(&self, name: &str) -> Result<(), String> {
        check_topic_name(name)
    }

    fn max_record_bytes(&self) -> usize {
        self.max_record_bytes
    }

    fn send(&mut self, ticket: Ticket, record: &OutboxRecord) -> Result<Handed, SinkError> {
        if self.creating.is_some() || self.retry.is_some() {
            return Ok(Handed::Full);
        }
        if !self.refused_topics.is_empty() {
            if let Some(refusal) = self.refused_topics.get(&record.topic) {
                return Ok(Handed::Refused(refusal.clone()));
            }
        }
        if let Some(admin) = &self.admin {
            if !self.known_topics.contains(&record.topic) {
                let admin = admin.clone();
                self.start_creation(&record.topic, admin);
                return Ok(Handed::Full);
            }
        }
        // Fault point (tests): the producer enters librdkafka's fatal state.
        if failpoints::hit_blocking("relay.kafka-fatal").is_err() {
            fatal::inject(&self.producer);
        }
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
            Ok(future) => {
                self.deliveries.push(
                    async move {
                        let result = match future.await {
                            Ok(Ok(_)) => Ok(()),
                            Ok(Err((error, message))) => {
                                Err((error, message.payload().map(Bytes::copy_from_slice)))
                            }
                            Err(_canceled) => Err((KafkaError::Canceled, None)),
                        };
                        (ticket, result)
                    }
                    .boxed(),
                );
                Ok(Handed::Accepted)
            }
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                if self.deliveries.is_empty() {
                    self.retry = Some(Box::pin(tokio::time::sleep(QUEUE_RETRY)));
                }
                Ok(Handed::Full)
            }
            Err((error, _)) => match classify(&error) {
                Fault::Record(kind) => Ok(Handed::Refused(Refusal::new(kind, error.to_string()))),
                Fault::Destination => Err(self.destination_fault("sending a record", error)),
            },
        }
    }

    fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Result<Event, SinkError>> {
        if let Some((_, creation)) = &mut self.creating {
            if let Poll::Ready(result) = creation.poll_unpin(cx) {
                let (topic, _) = self.creating.take().expect("a creation is under way");
                self.created(topic, result)?;
                if self.retry.is_none() {
                    return Poll::Ready(Ok(Event::Ready));
                }
            }
        }
        if let Some(retry) = &mut self.retry {
            if retry.as_mut().poll_unpin(cx).is_ready() {
                self.retry = None;
                return Poll::Ready(Ok(Event::Ready));
            }
        }
        match self.deliveries.poll_next_unpin(cx) {
            Poll::Ready(Some((ticket, Ok(())))) => Poll::Ready(Ok(Event::Acked(ticket))),
            Poll::Ready(Some((ticket, Err((error, payload))))) => match classify(&error) {
                Fault::Record(kind) => Poll::Ready(Ok(Event::Refused(
                    ticket,
                    Refusal::new(kind, error.to_string()),
                    payload,
                ))),
                Fault::Destination => {
                    Poll::Ready(Err(self.destination_fault("delivering a record", error)))
                }
            },
            Poll::Ready(None) | Poll::Pending => Poll::Pending,
        }
    }
}

/// The fault point `relay.kafka-fatal`: puts the producer in librdkafka's fatal
/// state, as an unrecoverable idempotence error from a real broker would.
mod fatal {
    use rdkafka::producer::{FutureProducer, Producer};

    pub(super) fn inject(producer: &FutureProducer) {
        let reason = c"injected at fault point relay.kafka-fatal";
        let client = producer.client().native_ptr();
        // SAFETY: `client` is the live handle of `producer`, borrowed for this call;
        // librdkafka's test API copies the reason and only flags the client.
        #[allow(unsafe_code)]
        unsafe {
            rdkafka::bindings::rd_kafka_test_fatal_error(
                client,
                rdkafka::bindings::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_OUT_OF_ORDER_SEQUENCE_NUMBER,
                reason.as_ptr(),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kafka_topic_names_follow_apache_kafkas_rules() {
        for good in ["order", "outbox.event.order", "a-b_c.D9", &"x".repeat(249)] {
            assert_eq!(check_topic_name(good), Ok(()), "{good}");
        }
        for bad in [
            "",
            ".",
            "..",
            "order placed",
            "a/b",
            "café",
            "t:1",
            &"x".repeat(250),
        ] {
            assert!(check_topic_name(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn record_faults_and_destination_faults_are_told_apart() {
        let produce = KafkaError::MessageProduction;
        assert_eq!(
            classify(&produce(RDKafkaErrorCode::MessageSizeTooLarge)),
            Fault::Record(RefusalKind::TooLarge)
        );
        assert_eq!(
            classify(&produce(RDKafkaErrorCode::InvalidTopic)),
            Fault::Record(RefusalKind::BadRoute)
        );
        for destination in [
            RDKafkaErrorCode::TopicAuthorizationFailed,
            RDKafkaErrorCode::ClusterAuthorizationFailed,
            RDKafkaErrorCode::UnknownTopicOrPartition,
            RDKafkaErrorCode::UnknownTopic,
            RDKafkaErrorCode::UnknownPartition,
            RDKafkaErrorCode::Fatal,
            RDKafkaErrorCode::BrokerTransportFailure,
        ] {
            assert_eq!(
                classify(&produce(destination)),
                Fault::Destination,
                "{destination:?}"
            );
        }
        assert_eq!(classify(&KafkaError::Canceled), Fault::Destination);
    }
}
