//! The options, each declared once: one struct per section of the file, read by
//! serde from TOML (the field name is the key, unknown keys are refused) and by
//! clap from flags and environment variables (`#[arg(long, env)]`), flattened into
//! the command line. Every value is optional at this stage; [`Layer::or`] puts one
//! source over another, and [`Sections::resolve`] applies the defaults and
//! validates.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::fmt;
use std::path::PathBuf;

use serde::{Deserialize, Deserializer};

use super::{InitialSnapshot, NatsStorage, PayloadFormat, Secret, SinkKind};

/// One source of options laid over a lower one.
pub trait Layer {
    /// `self` where it sets a value, `lower` where it does not.
    fn or(self, lower: Self) -> Self;
}

impl<T> Layer for Option<T> {
    fn or(self, lower: Option<T>) -> Option<T> {
        Option::or(self, lower)
    }
}

/// librdkafka options add up key by key: the lower layer's come first, so that an
/// upper layer's value for the same key replaces it when they become a map.
impl Layer for Vec<KafkaOption> {
    fn or(self, mut lower: Vec<KafkaOption>) -> Vec<KafkaOption> {
        lower.extend(self);
        lower
    }
}

/// Declares a section: the struct, readable from the file (serde, unknown keys
/// refused, a missing key is `None`) and from flags and the environment (clap), and
/// its [`Layer`], field by field.
macro_rules! section {
    (
        $(#[$meta:meta])*
        pub struct $name:ident {
            $(
                $(#[$field_meta:meta])*
                pub $field:ident: $ty:ty,
            )*
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Default, Clone, clap::Args, Deserialize)]
        #[serde(deny_unknown_fields, default)]
        pub struct $name {
            $(
                $(#[$field_meta])*
                pub $field: $ty,
            )*
        }

        impl Layer for $name {
            fn or(self, lower: $name) -> $name {
                $name {
                    $($field: Layer::or(self.$field, lower.$field),)*
                }
            }
        }
    };
}

section! {
    /// Every option: the whole file, and every flag but `--config`. The order of
    /// the fields is the order of `--help`.
    pub struct Sections {
        #[command(flatten)]
        pub postgres: PostgresSection,
        #[command(flatten)]
        pub outbox: OutboxSection,
        #[command(flatten)]
        pub http: HttpSection,

        /// Where records go: kafka, nats (JetStream), rabbitmq or redis (streams);
        /// each has its own section of options [default: kafka].
        #[arg(long, env = "OUTBOX_RELAY_SINK", value_name = "SINK")]
        pub sink: Option<SinkKind>,

        #[command(flatten)]
        pub kafka: KafkaSection,
        #[command(flatten)]
        pub nats: NatsSection,
        #[command(flatten)]
        pub rabbitmq: RabbitmqSection,
        #[command(flatten)]
        pub redis: RedisSection,
    }
}

section! {
    /// `[postgres]`: where the relay reads from.
    pub struct PostgresSection {
        /// PostgreSQL connection URL of the service database
        /// (postgres://user:password@host:port/database).
        #[arg(
            long = "postgres-url",
            env = "OUTBOX_RELAY_POSTGRES_URL",
            value_name = "URL",
            hide_env_values = true,
            value_parser = secret
        )]
        #[serde(deserialize_with = "optional_secret")]
        pub url: Option<Secret>,

        /// Logical replication slot [default: outbox_relay_<database>].
        #[arg(long, env = "OUTBOX_RELAY_SLOT", value_name = "NAME")]
        pub slot: Option<String>,

        /// Publication to stream [default: outbox_relay].
        #[arg(long, env = "OUTBOX_RELAY_PUBLICATION", value_name = "NAME")]
        pub publication: Option<String>,

        /// Create the publication (FOR TABLE the outbox table) when it is missing
        /// [default: true].
        #[arg(long, env = "OUTBOX_RELAY_CREATE_PUBLICATION", value_name = "BOOL")]
        pub create_publication: Option<bool>,

        /// Outbox table, optionally schema-qualified [default: public.outbox].
        #[arg(long, env = "OUTBOX_RELAY_TABLE", value_name = "TABLE")]
        pub table: Option<String>,

        /// Milliseconds between standby status updates to the server when nothing
        /// new can be confirmed; progress is confirmed within 100 ms of being made
        /// [default: 10000].
        #[arg(long, env = "OUTBOX_RELAY_STATUS_INTERVAL_MS", value_name = "MS")]
        pub status_interval_ms: Option<u64>,

        /// Whether a new slot starts with publishing the rows already in the outbox
        /// table (`initial`, like Debezium's snapshot.mode=initial) or not (`never`)
        /// [default: initial].
        #[arg(long, env = "OUTBOX_RELAY_SNAPSHOT_MODE", value_name = "MODE")]
        pub snapshot_mode: Option<InitialSnapshot>,

        /// Milliseconds between heartbeats: a transactional pg_logical_emit_message that
        /// keeps the slot moving on an idle database and proves the stream alive; 0 turns
        /// them off [default: 10000].
        #[arg(long, env = "OUTBOX_RELAY_HEARTBEAT_INTERVAL_MS", value_name = "MS")]
        pub heartbeat_interval_ms: Option<u64>,

        /// Milliseconds between two looks at the slot while another relay holds it
        /// (this relay is a standby) [default: 1000].
        #[arg(long, env = "OUTBOX_RELAY_STANDBY_POLL_INTERVAL_MS", value_name = "MS")]
        pub standby_poll_interval_ms: Option<u64>,

        /// Milliseconds the slot's holder may go without a status update before a
        /// standby ends its server process and takes the slot over (a hung relay);
        /// 0: never; unset, at least three status intervals [default: 30000].
        #[arg(long, env = "OUTBOX_RELAY_TAKEOVER_AFTER_MS", value_name = "MS")]
        pub takeover_after_ms: Option<u64>,

        /// Ask the server (PostgreSQL 14 or newer) to stream transactions still in
        /// progress once they outgrow its logical_decoding_work_mem, instead of
        /// decoding them whole at commit; the relay buffers them until they commit
        /// [default: true].
        #[arg(long, env = "OUTBOX_RELAY_STREAMING", value_name = "BOOL")]
        pub streaming: Option<bool>,

        /// Bytes of streamed, not yet committed transactions the relay keeps in
        /// memory; beyond that it writes them to files in --spill-dir
        /// [default: 16777216].
        #[arg(long, env = "OUTBOX_RELAY_STREAM_MEMORY_BYTES", value_name = "BYTES")]
        pub stream_memory_bytes: Option<u64>,

        /// Directory for streamed transactions that outgrew --stream-memory-bytes, a
        /// folder per slot in it [default: outbox-relay in the system's temporary
        /// directory].
        #[arg(long, env = "OUTBOX_RELAY_SPILL_DIR", value_name = "DIR")]
        pub spill_dir: Option<PathBuf>,
    }
}

section! {
    /// `[outbox]`: how rows become records.
    pub struct OutboxSection {
        /// Topic of a record; `{aggregatetype}` (or Debezium's `${routedByValue}`) is
        /// replaced by the row's aggregate type [default: outbox.event.{aggregatetype}].
        #[arg(long, env = "OUTBOX_RELAY_TOPIC_TEMPLATE", value_name = "TEMPLATE")]
        pub topic_template: Option<String>,

        /// How the payload column becomes the Kafka value: `json` (the jsonb text as it
        /// is) or `json-string` (a JSON string holding that text, as Debezium's outbox
        /// event router emits it by default) [default: json].
        #[arg(long, env = "OUTBOX_RELAY_PAYLOAD_FORMAT", value_name = "FORMAT")]
        pub payload_format: Option<PayloadFormat>,

        /// Also route transactional pg_logical_emit_message messages with this prefix,
        /// whose content is a JSON object with the outbox column names as keys (a
        /// table-less outbox; PostgreSQL 14 or newer). Off unless set, because any role
        /// can emit such messages: see --message-topics.
        #[arg(long, env = "OUTBOX_RELAY_MESSAGE_PREFIX", value_name = "PREFIX")]
        pub message_prefix: Option<String>,

        /// The only topics logical messages may be routed to (comma-separated); a message
        /// for another topic is dead-lettered. Required with --message-prefix.
        #[arg(
            long,
            env = "OUTBOX_RELAY_MESSAGE_TOPICS",
            value_name = "TOPICS",
            value_delimiter = ','
        )]
        pub message_topics: Option<Vec<String>>,

        /// `[outbox.columns]`.
        #[command(flatten)]
        pub columns: ColumnsSection,

        /// Topic for rows and records that cannot be delivered as they are, with the
        /// reason and source position in headers; an empty value stops the relay on such
        /// a row instead [default: outbox.dlq].
        #[arg(long, env = "OUTBOX_RELAY_DEAD_LETTER_TOPIC", value_name = "TOPIC")]
        pub dead_letter_topic: Option<String>,
    }
}

section! {
    /// `[outbox.columns]`: the columns of the outbox table.
    pub struct ColumnsSection {
        /// Column holding the event id (Kafka header `id`) [default: id].
        #[arg(long = "column-id", env = "OUTBOX_RELAY_COLUMN_ID", value_name = "COLUMN")]
        pub id: Option<String>,

        /// Column that routes the topic [default: aggregatetype].
        #[arg(
            long = "column-aggregate-type",
            env = "OUTBOX_RELAY_COLUMN_AGGREGATE_TYPE",
            value_name = "COLUMN"
        )]
        pub aggregate_type: Option<String>,

        /// Column holding the Kafka key [default: aggregateid].
        #[arg(
            long = "column-aggregate-id",
            env = "OUTBOX_RELAY_COLUMN_AGGREGATE_ID",
            value_name = "COLUMN"
        )]
        pub aggregate_id: Option<String>,

        /// Column holding the event type (Kafka header `type`) [default: type].
        #[arg(
            long = "column-event-type",
            env = "OUTBOX_RELAY_COLUMN_EVENT_TYPE",
            value_name = "COLUMN"
        )]
        pub event_type: Option<String>,

        /// Column holding the Kafka value [default: payload].
        #[arg(
            long = "column-payload",
            env = "OUTBOX_RELAY_COLUMN_PAYLOAD",
            value_name = "COLUMN"
        )]
        pub payload: Option<String>,

        /// Optional jsonb column whose entries become Kafka headers; ignored when the
        /// table has no such column [default: headers].
        #[arg(
            long = "column-headers",
            env = "OUTBOX_RELAY_COLUMN_HEADERS",
            value_name = "COLUMN"
        )]
        pub headers: Option<String>,

        /// Optional column with the trace context as Debezium's outbox event router
        /// keeps it (`traceparent=…` lines, or a bare traceparent); it becomes the
        /// record's traceparent/tracestate headers unless the headers column has one;
        /// ignored when the table has no such column [default: tracingspancontext].
        #[arg(
            long = "column-tracing-span-context",
            env = "OUTBOX_RELAY_COLUMN_TRACING_SPAN_CONTEXT",
            value_name = "COLUMN"
        )]
        pub tracing_span_context: Option<String>,
    }
}

section! {
    /// `[http]`: the operator's endpoint and the health rules.
    pub struct HttpSection {
        /// Address of the HTTP endpoint serving /metrics (Prometheus), /health
        /// (liveness) and /ready (readiness); an
        /// empty value turns it off, and the relay then exits on a definite error
        /// instead of reporting it and retrying [default: 0.0.0.0:9187].
        #[arg(long = "http-listen", env = "OUTBOX_RELAY_HTTP_LISTEN", value_name = "ADDR")]
        pub listen: Option<String>,

        /// Milliseconds without progress (of the stream while reading, or of the broker
        /// while records are in flight) after which /health reports the relay unhealthy;
        /// must exceed twice the heartbeat interval [default: 60000].
        #[arg(long, env = "OUTBOX_RELAY_STALL_TIMEOUT_MS", value_name = "MS")]
        pub stall_timeout_ms: Option<u64>,
    }
}

section! {
    /// `[kafka]`: where the relay writes to.
    pub struct KafkaSection {
        /// Kafka bootstrap servers (host:port,...).
        #[arg(long = "kafka-brokers", env = "OUTBOX_RELAY_KAFKA_BROKERS", value_name = "LIST")]
        pub brokers: Option<String>,

        /// A librdkafka producer option, KEY=VALUE; repeatable (security.protocol,
        /// sasl.*, ssl.*, linger.ms, ...). The delivery guarantees
        /// (enable.idempotence, acks, message.timeout.ms, partitioner) cannot be
        /// overridden.
        #[arg(
            long = "kafka-option",
            env = "OUTBOX_RELAY_KAFKA_OPTIONS",
            value_name = "KEY=VALUE",
            value_delimiter = ','
        )]
        #[serde(deserialize_with = "options_table")]
        pub options: Vec<KafkaOption>,

        /// Records sent to the broker and not yet acknowledged, at most; the relay stops
        /// reading WAL at this bound [default: 2000].
        #[arg(long, env = "OUTBOX_RELAY_MAX_IN_FLIGHT", value_name = "N")]
        pub max_in_flight: Option<usize>,

        /// Create missing topics through the admin API [default: true].
        #[arg(long, env = "OUTBOX_RELAY_CREATE_TOPICS", value_name = "BOOL")]
        pub create_topics: Option<bool>,

        /// Partitions of a created topic [default: 1].
        #[arg(long, env = "OUTBOX_RELAY_TOPIC_PARTITIONS", value_name = "N")]
        pub topic_partitions: Option<i32>,

        /// Replication factor of a created topic; -1 takes the broker's default
        /// [default: -1].
        #[arg(long, env = "OUTBOX_RELAY_TOPIC_REPLICATION_FACTOR", value_name = "N")]
        pub topic_replication_factor: Option<i32>,
    }
}

section! {
    /// `[nats]`: the NATS JetStream sink (`sink = "nats"`).
    pub struct NatsSection {
        /// NATS server URLs, comma-separated; may hold user:password@
        /// [default: nats://127.0.0.1:4222].
        #[arg(
            id = "nats_url",
            long = "nats-url",
            env = "OUTBOX_RELAY_NATS_URL",
            value_name = "URL",
            hide_env_values = true,
            value_parser = secret
        )]
        #[serde(deserialize_with = "optional_secret")]
        pub url: Option<Secret>,

        /// PEM file of certificate authorities to trust; with it the connection must
        /// be TLS (tls:// URLs use the system's roots otherwise).
        #[arg(id = "nats_ca_file", long = "nats-ca-file", env = "OUTBOX_RELAY_NATS_CA_FILE", value_name = "FILE")]
        pub ca_file: Option<PathBuf>,

        /// A .creds file (user JWT and NKey seed) to authenticate with.
        #[arg(long = "nats-credentials-file", env = "OUTBOX_RELAY_NATS_CREDENTIALS_FILE", value_name = "FILE")]
        pub credentials_file: Option<PathBuf>,

        /// The JetStream stream records are published into; a record's topic is its
        /// subject, and must be one of the stream's subjects [default: OUTBOX].
        #[arg(id = "nats_stream", long = "nats-stream", env = "OUTBOX_RELAY_NATS_STREAM", value_name = "NAME")]
        pub stream: Option<String>,

        /// Subjects of the stream when the relay creates it, comma-separated; they
        /// must cover the topic template and the dead-letter topic [default: outbox.>].
        #[arg(
            long = "nats-subjects",
            env = "OUTBOX_RELAY_NATS_SUBJECTS",
            value_name = "SUBJECTS",
            value_delimiter = ','
        )]
        pub subjects: Option<Vec<String>>,

        /// Create the stream when it is missing [default: true].
        #[arg(long = "nats-create-stream", env = "OUTBOX_RELAY_NATS_CREATE_STREAM", value_name = "BOOL")]
        pub create_stream: Option<bool>,

        /// Storage of a created stream: file or memory [default: file].
        #[arg(long = "nats-storage", env = "OUTBOX_RELAY_NATS_STORAGE", value_name = "STORAGE")]
        pub storage: Option<NatsStorage>,

        /// Replicas of a created stream [default: 1].
        #[arg(long = "nats-replicas", env = "OUTBOX_RELAY_NATS_REPLICAS", value_name = "N")]
        pub replicas: Option<usize>,

        /// Milliseconds JetStream remembers a message id (Nats-Msg-Id, the outbox id)
        /// to drop a re-sent record, for a created stream [default: 120000].
        #[arg(long = "nats-duplicate-window-ms", env = "OUTBOX_RELAY_NATS_DUPLICATE_WINDOW_MS", value_name = "MS")]
        pub duplicate_window_ms: Option<u64>,

        /// Milliseconds a publish acknowledgement may take; past that the relay starts
        /// over from what it confirmed [default: 30000].
        #[arg(long = "nats-ack-timeout-ms", env = "OUTBOX_RELAY_NATS_ACK_TIMEOUT_MS", value_name = "MS")]
        pub ack_timeout_ms: Option<u64>,
    }
}

section! {
    /// `[rabbitmq]`: the RabbitMQ sink (`sink = "rabbitmq"`).
    pub struct RabbitmqSection {
        /// AMQP URL, amqp://user:password@host:port/vhost, or amqps:// for TLS
        /// [default: amqp://guest:guest@127.0.0.1:5672/%2f].
        #[arg(
            id = "rabbitmq_url",
            long = "rabbitmq-url",
            env = "OUTBOX_RELAY_RABBITMQ_URL",
            value_name = "URL",
            hide_env_values = true,
            value_parser = secret
        )]
        #[serde(deserialize_with = "optional_secret")]
        pub url: Option<Secret>,

        /// PEM file of the certificate authorities to trust for amqps:// instead of
        /// the system's.
        #[arg(id = "rabbitmq_ca_file", long = "rabbitmq-ca-file", env = "OUTBOX_RELAY_RABBITMQ_CA_FILE", value_name = "FILE")]
        pub ca_file: Option<PathBuf>,

        /// Exchange records are published to; {topic} is replaced by the record's
        /// topic [default: outbox].
        #[arg(long = "rabbitmq-exchange", env = "OUTBOX_RELAY_RABBITMQ_EXCHANGE", value_name = "TEMPLATE")]
        pub exchange: Option<String>,

        /// Type of a declared exchange: topic, direct, fanout or headers [default: topic].
        #[arg(long = "rabbitmq-exchange-type", env = "OUTBOX_RELAY_RABBITMQ_EXCHANGE_TYPE", value_name = "TYPE")]
        pub exchange_type: Option<String>,

        /// Declare the exchange (durable) when it is missing [default: true].
        #[arg(long = "rabbitmq-declare-exchange", env = "OUTBOX_RELAY_RABBITMQ_DECLARE_EXCHANGE", value_name = "BOOL")]
        pub declare_exchange: Option<bool>,

        /// Routing key of a record; {topic} is replaced by the record's topic
        /// [default: {topic}].
        #[arg(long = "rabbitmq-routing-key", env = "OUTBOX_RELAY_RABBITMQ_ROUTING_KEY", value_name = "TEMPLATE")]
        pub routing_key: Option<String>,

        /// The largest record sent, in bytes of key, value and headers; larger ones
        /// are dead-lettered [default: 134217728, RabbitMQ's max_message_size].
        #[arg(long = "rabbitmq-max-message-bytes", env = "OUTBOX_RELAY_RABBITMQ_MAX_MESSAGE_BYTES", value_name = "BYTES")]
        pub max_message_bytes: Option<usize>,
    }
}

section! {
    /// `[redis]`: the Redis Streams sink (`sink = "redis"`).
    pub struct RedisSection {
        /// Redis URL, redis://[user:password@]host:port[/db], or rediss:// for TLS
        /// [default: redis://127.0.0.1:6379].
        #[arg(
            id = "redis_url",
            long = "redis-url",
            env = "OUTBOX_RELAY_REDIS_URL",
            value_name = "URL",
            hide_env_values = true,
            value_parser = secret
        )]
        #[serde(deserialize_with = "optional_secret")]
        pub url: Option<Secret>,

        /// PEM file of the certificate authorities to trust for rediss:// instead of
        /// the system's.
        #[arg(id = "redis_ca_file", long = "redis-ca-file", env = "OUTBOX_RELAY_REDIS_CA_FILE", value_name = "FILE")]
        pub ca_file: Option<PathBuf>,

        /// Stream key of a record; {topic} is replaced by the record's topic
        /// [default: {topic}].
        #[arg(id = "redis_stream", long = "redis-stream", env = "OUTBOX_RELAY_REDIS_STREAM", value_name = "TEMPLATE")]
        pub stream: Option<String>,

        /// Trim each stream to about this many entries (XADD MAXLEN ~); unset keeps
        /// every entry.
        #[arg(long = "redis-maxlen", env = "OUTBOX_RELAY_REDIS_MAXLEN", value_name = "N")]
        pub maxlen: Option<u64>,

        /// Replicas that must have an entry (WAIT) before it counts as delivered
        /// [default: 0].
        #[arg(long = "redis-wait-replicas", env = "OUTBOX_RELAY_REDIS_WAIT_REPLICAS", value_name = "N")]
        pub wait_replicas: Option<u32>,

        /// Milliseconds a reply may take; past that the relay starts over from what it
        /// confirmed [default: 30000].
        #[arg(long = "redis-response-timeout-ms", env = "OUTBOX_RELAY_REDIS_RESPONSE_TIMEOUT_MS", value_name = "MS")]
        pub response_timeout_ms: Option<u64>,

        /// The largest record sent, in bytes of key, value and headers; larger ones
        /// are dead-lettered [default: 67108864].
        #[arg(long = "redis-max-record-bytes", env = "OUTBOX_RELAY_REDIS_MAX_RECORD_BYTES", value_name = "BYTES")]
        pub max_record_bytes: Option<usize>,
    }
}

/// One librdkafka option: `KEY=VALUE` from a flag or the environment, an entry of
/// `[kafka.options]` from the file. Debug prints the key only, since values may be
/// secrets (`sasl.password`).
#[derive(Clone, PartialEq, Eq)]
pub struct KafkaOption {
    /// The key; for text without `=`, the text as given.
    pub key: String,
    /// `None`: the text had no `=`, which [`Sections::resolve`] reports.
    pub value: Option<String>,
}

/// Flags and environment variables: `KEY=VALUE`, both sides trimmed.
impl From<&str> for KafkaOption {
    fn from(text: &str) -> KafkaOption {
        match text.split_once('=') {
            Some((key, value)) => KafkaOption {
                key: key.trim().to_owned(),
                value: Some(value.trim().to_owned()),
            },
            None => KafkaOption {
                key: text.to_owned(),
                value: None,
            },
        }
    }
}

impl fmt::Debug for KafkaOption {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.value {
            Some(_) => write!(f, "{:?}=..", self.key),
            None => f.write_str("(not KEY=VALUE)"),
        }
    }
}

/// `[kafka.options]`: a table of strings, taken as it is.
fn options_table<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<KafkaOption>, D::Error> {
    let table = BTreeMap::<String, String>::deserialize(deserializer)?;
    Ok(table
        .into_iter()
        .map(|(key, value)| KafkaOption {
            key,
            value: Some(value),
        })
        .collect())
}

/// A secret from a flag or an environment variable.
fn secret(text: &str) -> Result<Secret, Infallible> {
    Ok(Secret::new(text))
}

/// A secret from the file.
fn optional_secret<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<Secret>, D::Error> {
    String::deserialize(deserializer).map(|text| Some(Secret::new(text)))
}
