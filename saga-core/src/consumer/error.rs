//! Why a consumer could not start or stopped, and where a message came from.

use rdkafka::error::{KafkaError, RDKafkaErrorCode};

/// Why a [`Consumer`](super::Consumer) could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum ConsumerError {
    #[error("invalid consumer configuration: {0}")]
    Config(String),
    #[error("cannot create the Kafka clients of consumer group {group}")]
    Client {
        group: String,
        #[source]
        source: KafkaError,
    },
    #[error("cannot create the dead-letter topic {topic}")]
    DeadLetterTopic {
        topic: String,
        #[source]
        source: KafkaError,
    },
    #[error("cannot subscribe to the topics {topics:?}")]
    Subscribe {
        topics: Vec<String>,
        #[source]
        source: KafkaError,
    },
    #[error("the Kafka consumer failed fatally")]
    Kafka(#[source] KafkaError),
    #[error(
        "another member of consumer group {group} joined with the instance id {instance_id} \
         and fenced this one off; give every process its own instance id"
    )]
    Fenced { group: String, instance_id: String },
    #[error("cannot dead-letter {message} to {dead_letter_topic}; its offset was not stored")]
    DeadLetter {
        message: Box<MessagePosition>,
        dead_letter_topic: String,
        #[source]
        source: KafkaError,
    },
    #[error(
        "the journal (processed_messages) refused {message}; are the shared migrations \
         applied (saga_core::schema::migrate)?"
    )]
    Journal {
        message: Box<MessagePosition>,
        #[source]
        source: sqlx::Error,
    },
    #[error("committing the offsets of the consumer group failed")]
    Commit(#[source] KafkaError),
    #[error("a message task ended abnormally")]
    Task(#[source] tokio::task::JoinError),
}

/// Where a message was consumed from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MessagePosition {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
}

impl std::fmt::Display for MessagePosition {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "topic {} partition {} offset {}",
            self.topic, self.partition, self.offset
        )
    }
}

impl ConsumerError {
    /// Whether starting the consumer again may succeed without a change of
    /// configuration or schema (the broker was away, a commit failed).
    pub fn is_transient(&self) -> bool {
        match self {
            ConsumerError::Config(_)
            | ConsumerError::Client { .. }
            | ConsumerError::Subscribe { .. }
            | ConsumerError::Fenced { .. }
            | ConsumerError::Journal { .. } => false,
            ConsumerError::DeadLetterTopic { source, .. } => !matches!(
                source,
                KafkaError::AdminOp(
                    RDKafkaErrorCode::TopicAuthorizationFailed
                        | RDKafkaErrorCode::ClusterAuthorizationFailed
                        | RDKafkaErrorCode::InvalidTopic
                        | RDKafkaErrorCode::PolicyViolation
                        | RDKafkaErrorCode::InvalidReplicationFactor
                )
            ),
            ConsumerError::Kafka(_)
            | ConsumerError::DeadLetter { .. }
            | ConsumerError::Commit(_)
            | ConsumerError::Task(_) => true,
        }
    }
}
