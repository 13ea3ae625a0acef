//! Relay configuration.
//!
//! Every option can come from a TOML file (`--config`), an environment variable
//! (`OUTBOX_RELAY_*`) or a flag; a flag beats the environment, which beats the file,
//! which beats the default. [`Args`] is the command line, [`RelayConfig`] the
//! validated result that [`crate::run`] takes.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::sql;

pub use crate::replication::Secret;
pub use crate::routing::outbox::{
    Columns, Ident, MessageRouting, OutboxConfig, PayloadFormat, TopicTemplate, DEFAULT_COLUMNS,
    DEFAULT_TOPIC_TEMPLATE,
};
pub use crate::sink::kafka::config::{
    KafkaConfig, DEFAULT_MAX_IN_FLIGHT, DEFAULT_TOPIC_PARTITIONS, DEFAULT_TOPIC_REPLICATION_FACTOR,
    PROTECTED_KAFKA_OPTIONS,
};

/// The outbox table.
pub const DEFAULT_TABLE: &str = "public.outbox";
/// The publication the relay reads.
pub const DEFAULT_PUBLICATION: &str = "outbox_relay";
/// Prefix of the default slot name; the database name follows.
pub const DEFAULT_SLOT_PREFIX: &str = "outbox_relay_";
/// How often the relay reports its position to the server, in milliseconds.
pub const DEFAULT_STATUS_INTERVAL_MS: u64 = 10_000;
/// How often the relay emits a heartbeat message into its database, in milliseconds.
pub const DEFAULT_HEARTBEAT_INTERVAL_MS: u64 = 10_000;
/// How long a slot held by another (perhaps dying) process is retried, in milliseconds.
pub const DEFAULT_SLOT_BUSY_TIMEOUT_MS: u64 = 30_000;
/// Where records the relay cannot deliver go.
pub const DEFAULT_DEAD_LETTER_TOPIC: &str = "outbox.dlq";
/// Where `/metrics` and `/health` are served.
pub const DEFAULT_HTTP_LISTEN: &str = "0.0.0.0:9187";
/// How long the stream or the broker may make no progress before the relay reports
/// itself unhealthy, in milliseconds.
pub const DEFAULT_STALL_TIMEOUT_MS: u64 = 60_000;
/// The command line of `outbox-relay` (the `run` options; subcommands wrap it).
#[derive(Debug, Default, Clone, clap::Args)]
pub struct Args {
    /// TOML file with any of the options below; flags and environment variables
    /// override it.
    #[arg(long, short = 'c', env = "OUTBOX_RELAY_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// PostgreSQL connection URL of the service database
    /// (postgres://user:password@host:port/database).
    #[arg(
        long,
        env = "OUTBOX_RELAY_POSTGRES_URL",
        value_name = "URL",
        hide_env_values = true
    )]
    pub postgres_url: Option<String>,

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

    /// Milliseconds between standby status updates to the server [default: 10000].
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

    /// Milliseconds to keep retrying a slot that another process still holds (a
    /// killed relay's server process lingers) [default: 30000].
    #[arg(long, env = "OUTBOX_RELAY_SLOT_BUSY_TIMEOUT_MS", value_name = "MS")]
    pub slot_busy_timeout_ms: Option<u64>,

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
    pub message_topics: Vec<String>,

    /// Column holding the event id (Kafka header `id`) [default: id].
    #[arg(long, env = "OUTBOX_RELAY_COLUMN_ID", value_name = "COLUMN")]
    pub column_id: Option<String>,

    /// Column that routes the topic [default: aggregatetype].
    #[arg(
        long,
        env = "OUTBOX_RELAY_COLUMN_AGGREGATE_TYPE",
        value_name = "COLUMN"
    )]
    pub column_aggregate_type: Option<String>,

    /// Column holding the Kafka key [default: aggregateid].
    #[arg(long, env = "OUTBOX_RELAY_COLUMN_AGGREGATE_ID", value_name = "COLUMN")]
    pub column_aggregate_id: Option<String>,

    /// Column holding the event type (Kafka header `type`) [default: type].
    #[arg(long, env = "OUTBOX_RELAY_COLUMN_EVENT_TYPE", value_name = "COLUMN")]
    pub column_event_type: Option<String>,

    /// Column holding the Kafka value [default: payload].
    #[arg(long, env = "OUTBOX_RELAY_COLUMN_PAYLOAD", value_name = "COLUMN")]
    pub column_payload: Option<String>,

    /// Optional jsonb column whose entries become Kafka headers; ignored when the
    /// table has no such column [default: headers].
    #[arg(long, env = "OUTBOX_RELAY_COLUMN_HEADERS", value_name = "COLUMN")]
    pub column_headers: Option<String>,

    /// Topic for rows and records that cannot be delivered as they are, with the
    /// reason and source position in headers; an empty value stops the relay on such
    /// a row instead [default: outbox.dlq].
    #[arg(long, env = "OUTBOX_RELAY_DEAD_LETTER_TOPIC", value_name = "TOPIC")]
    pub dead_letter_topic: Option<String>,

    /// Address of the HTTP endpoint serving /metrics (Prometheus) and /health; an
    /// empty value turns it off, and the relay then exits on a definite error
    /// instead of reporting it and retrying [default: 0.0.0.0:9187].
    #[arg(long, env = "OUTBOX_RELAY_HTTP_LISTEN", value_name = "ADDR")]
    pub http_listen: Option<String>,

    /// Milliseconds without progress (of the stream while reading, or of the broker
    /// while records are in flight) after which /health reports the relay unhealthy;
    /// must exceed twice the heartbeat interval [default: 60000].
    #[arg(long, env = "OUTBOX_RELAY_STALL_TIMEOUT_MS", value_name = "MS")]
    pub stall_timeout_ms: Option<u64>,

    /// Kafka bootstrap servers (host:port,...).
    #[arg(long, env = "OUTBOX_RELAY_KAFKA_BROKERS", value_name = "LIST")]
    pub kafka_brokers: Option<String>,

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
    pub kafka_options: Vec<String>,

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

/// The TOML file. Sections mirror the flags: `[postgres]`, `[outbox]`,
/// `[outbox.columns]`, `[kafka]`, `[kafka.options]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct FileConfig {
    postgres: FilePostgres,
    outbox: FileOutbox,
    kafka: FileKafka,
    http: FileHttp,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct FileHttp {
    listen: Option<String>,
    stall_timeout_ms: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct FilePostgres {
    url: Option<String>,
    slot: Option<String>,
    publication: Option<String>,
    create_publication: Option<bool>,
    table: Option<String>,
    status_interval_ms: Option<u64>,
    snapshot_mode: Option<InitialSnapshot>,
    heartbeat_interval_ms: Option<u64>,
    slot_busy_timeout_ms: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct FileOutbox {
    topic_template: Option<String>,
    message_prefix: Option<String>,
    message_topics: Option<Vec<String>>,
    payload_format: Option<PayloadFormat>,
    dead_letter_topic: Option<String>,
    columns: FileColumns,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct FileColumns {
    id: Option<String>,
    aggregate_type: Option<String>,
    aggregate_id: Option<String>,
    event_type: Option<String>,
    payload: Option<String>,
    headers: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct FileKafka {
    brokers: Option<String>,
    options: BTreeMap<String, String>,
    max_in_flight: Option<usize>,
    create_topics: Option<bool>,
    topic_partitions: Option<i32>,
    topic_replication_factor: Option<i32>,
}

/// A schema-qualified table name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableName {
    pub schema: String,
    pub name: String,
}

impl TableName {
    /// Parses `name` or `schema.name` (unquoted identifiers).
    pub fn parse(text: &str) -> Result<TableName, ConfigError> {
        let bad = || ConfigError::Invalid {
            option: "table",
            reason: format!("{text:?} is not a table name (expected name or schema.name)"),
        };
        let (schema, name) = match text.split_once('.') {
            Some((schema, name)) => (schema, name),
            None => ("public", text),
        };
        if schema.is_empty() || name.is_empty() || name.contains('.') {
            return Err(bad());
        }
        Ok(TableName {
            schema: schema.to_owned(),
            name: name.to_owned(),
        })
    }

    /// The name quoted for SQL.
    pub fn quoted(&self) -> String {
        format!("{}.{}", sql::ident(&self.schema), sql::ident(&self.name))
    }
}

impl fmt::Display for TableName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.schema, self.name)
    }
}

/// What a new slot starts with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum InitialSnapshot {
    /// Publish the rows already in the outbox table, then stream.
    #[default]
    Initial,
    /// Only stream what commits after the slot exists.
    Never,
}

/// Where the relay reads from.
#[derive(Debug, Clone)]
pub struct PostgresConfig {
    /// The connection URL; it holds the password.
    pub url: Secret,
    /// `None`: `outbox_relay_<database>`.
    pub slot: Option<String>,
    pub publication: String,
    pub create_publication: bool,
    pub table: TableName,
    pub status_interval: Duration,
    /// `None`: no heartbeats.
    pub heartbeat_interval: Option<Duration>,
    /// What a new slot starts with.
    pub snapshot: InitialSnapshot,
    pub slot_busy_timeout: Duration,
}

/// The operator's view: the HTTP endpoint and the health rules.
#[derive(Debug, Clone)]
pub struct HttpConfig {
    /// `None`: no endpoint (and definite errors end the process).
    pub listen: Option<std::net::SocketAddr>,
    pub stall_timeout: Duration,
}

/// The validated configuration of one relay.
#[derive(Debug, Clone)]
pub struct RelayConfig {
    pub postgres: PostgresConfig,
    pub outbox: OutboxConfig,
    pub kafka: KafkaConfig,
    pub http: HttpConfig,
}

/// The configuration is incomplete or wrong.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read the configuration file {path}", path = .path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the configuration file {path} is not valid", path = .path.display())]
    Parse {
        path: PathBuf,
        #[source]
        source: Box<toml::de::Error>,
    },
    #[error("{option} is required: set it in the configuration file, as --{flag} or as {env}")]
    Missing {
        option: &'static str,
        flag: &'static str,
        env: &'static str,
    },
    #[error("invalid {option}: {reason}")]
    Invalid {
        option: &'static str,
        reason: String,
    },
}

impl RelayConfig {
    /// A configuration with every default, for `url` and `brokers`.
    pub fn new(url: impl Into<String>, brokers: impl Into<String>) -> RelayConfig {
        RelayConfig {
            postgres: PostgresConfig {
                url: Secret::new(url),
                slot: None,
                publication: DEFAULT_PUBLICATION.to_owned(),
                create_publication: true,
                table: TableName {
                    schema: "public".to_owned(),
                    name: "outbox".to_owned(),
                },
                status_interval: Duration::from_millis(DEFAULT_STATUS_INTERVAL_MS),
                heartbeat_interval: Some(Duration::from_millis(DEFAULT_HEARTBEAT_INTERVAL_MS)),
                snapshot: InitialSnapshot::Initial,
                slot_busy_timeout: Duration::from_millis(DEFAULT_SLOT_BUSY_TIMEOUT_MS),
            },
            outbox: OutboxConfig {
                topic_template: TopicTemplate::parse(DEFAULT_TOPIC_TEMPLATE)
                    .expect("the default topic template is valid"),
                dead_letter_topic: Some(DEFAULT_DEAD_LETTER_TOPIC.to_owned()),
                payload_format: PayloadFormat::Json,
                messages: None,
                columns: DEFAULT_COLUMNS,
            },
            kafka: KafkaConfig {
                brokers: brokers.into(),
                ..KafkaConfig::default()
            },
            http: HttpConfig {
                listen: DEFAULT_HTTP_LISTEN.parse().ok(),
                stall_timeout: Duration::from_millis(DEFAULT_STALL_TIMEOUT_MS),
            },
        }
    }

    /// Resolves flags and environment (already merged by clap) over the file over
    /// the defaults, then validates.
    pub fn from_args(args: &Args) -> Result<RelayConfig, ConfigError> {
        let file = match &args.config {
            Some(path) => read_file(path)?,
            None => FileConfig::default(),
        };
        let url = args
            .postgres_url
            .clone()
            .or(file.postgres.url)
            .ok_or(ConfigError::Missing {
                option: "postgres.url",
                flag: "postgres-url",
                env: "OUTBOX_RELAY_POSTGRES_URL",
            })?;
        let brokers =
            args.kafka_brokers
                .clone()
                .or(file.kafka.brokers)
                .ok_or(ConfigError::Missing {
                    option: "kafka.brokers",
                    flag: "kafka-brokers",
                    env: "OUTBOX_RELAY_KAFKA_BROKERS",
                })?;
        let mut config = RelayConfig::new(url, brokers);

        let pg = &mut config.postgres;
        pg.slot = args.slot.clone().or(file.postgres.slot);
        if let Some(v) = args.publication.clone().or(file.postgres.publication) {
            pg.publication = v;
        }
        if let Some(v) = args.create_publication.or(file.postgres.create_publication) {
            pg.create_publication = v;
        }
        if let Some(v) = args.table.clone().or(file.postgres.table) {
            pg.table = TableName::parse(&v)?;
        }
        if let Some(v) = args.status_interval_ms.or(file.postgres.status_interval_ms) {
            pg.status_interval = Duration::from_millis(v);
        }
        if let Some(v) = args.snapshot_mode.or(file.postgres.snapshot_mode) {
            pg.snapshot = v;
        }
        if let Some(v) = args
            .heartbeat_interval_ms
            .or(file.postgres.heartbeat_interval_ms)
        {
            pg.heartbeat_interval = Some(Duration::from_millis(v)).filter(|d| !d.is_zero());
        }
        if let Some(v) = args
            .slot_busy_timeout_ms
            .or(file.postgres.slot_busy_timeout_ms)
        {
            pg.slot_busy_timeout = Duration::from_millis(v);
        }

        let outbox = &mut config.outbox;
        if let Some(v) = args.topic_template.clone().or(file.outbox.topic_template) {
            outbox.topic_template = TopicTemplate::parse(&v).map_err(|e| ConfigError::Invalid {
                option: "topic_template",
                reason: e.0,
            })?;
        }
        if let Some(v) = args.payload_format.or(file.outbox.payload_format) {
            outbox.payload_format = v;
        }
        if let Some(prefix) = args
            .message_prefix
            .clone()
            .or(file.outbox.message_prefix)
            .filter(|p| !p.is_empty())
        {
            let topics = if args.message_topics.is_empty() {
                file.outbox.message_topics.unwrap_or_default()
            } else {
                args.message_topics.clone()
            };
            outbox.messages = Some(MessageRouting {
                prefix,
                topics: topics
                    .into_iter()
                    .map(|t| t.trim().to_owned())
                    .filter(|t| !t.is_empty())
                    .collect(),
            });
        }
        if let Some(v) = args
            .dead_letter_topic
            .clone()
            .or(file.outbox.dead_letter_topic)
        {
            outbox.dead_letter_topic = Some(v).filter(|t| !t.trim().is_empty());
        }
        let fc = file.outbox.columns;
        let cols = &mut outbox.columns;
        for (slot, flag, from_file) in [
            (&mut cols.id, &args.column_id, fc.id),
            (
                &mut cols.aggregate_type,
                &args.column_aggregate_type,
                fc.aggregate_type,
            ),
            (
                &mut cols.aggregate_id,
                &args.column_aggregate_id,
                fc.aggregate_id,
            ),
            (&mut cols.event_type, &args.column_event_type, fc.event_type),
            (&mut cols.payload, &args.column_payload, fc.payload),
            (&mut cols.headers, &args.column_headers, fc.headers),
        ] {
            if let Some(v) = flag.clone().or(from_file) {
                *slot = Ident::Owned(v);
            }
        }

        let kafka = &mut config.kafka;
        kafka.options = file.kafka.options;
        for option in &args.kafka_options {
            let (key, value) = option.split_once('=').ok_or_else(|| ConfigError::Invalid {
                option: "kafka-option",
                reason: format!("{option:?} is not KEY=VALUE"),
            })?;
            kafka
                .options
                .insert(key.trim().to_owned(), value.trim().to_owned());
        }
        if let Some(v) = args.max_in_flight.or(file.kafka.max_in_flight) {
            kafka.max_in_flight = v;
        }
        if let Some(v) = args.create_topics.or(file.kafka.create_topics) {
            kafka.create_topics = v;
        }
        if let Some(v) = args.topic_partitions.or(file.kafka.topic_partitions) {
            kafka.topic_partitions = v;
        }
        if let Some(v) = args
            .topic_replication_factor
            .or(file.kafka.topic_replication_factor)
        {
            kafka.topic_replication_factor = v;
        }

        let http = &mut config.http;
        if let Some(v) = args.http_listen.clone().or(file.http.listen) {
            http.listen = if v.trim().is_empty() {
                None
            } else {
                Some(v.trim().parse().map_err(|_| ConfigError::Invalid {
                    option: "http_listen",
                    reason: format!("{v:?} is not an address such as 0.0.0.0:9187"),
                })?)
            };
        }
        if let Some(v) = args.stall_timeout_ms.or(file.http.stall_timeout_ms) {
            http.stall_timeout = Duration::from_millis(v);
        }

        config.validate()?;
        Ok(config)
    }

    /// Checks values that types alone do not rule out.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |option, reason: String| Err(ConfigError::Invalid { option, reason });
        if let Some(slot) = &self.postgres.slot {
            if let Err(reason) = check_slot_name(slot) {
                return invalid("slot", reason);
            }
        }
        if self.postgres.publication.is_empty() {
            return invalid("publication", "the name is empty".to_owned());
        }
        if self.postgres.status_interval.is_zero() {
            return invalid("status_interval_ms", "must be above 0".to_owned());
        }
        if let Some(topic) = &self.outbox.dead_letter_topic {
            if let Some(c) = topic
                .chars()
                .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
            {
                return invalid(
                    "dead_letter_topic",
                    format!("{topic:?} contains {c:?}, which is not valid in a topic name"),
                );
            }
        }
        if let Some(messages) = &self.outbox.messages {
            if messages.topics.is_empty() {
                return invalid(
                    "message_topics",
                    "routing logical messages needs an allow-list of topics: any database \
                     role can emit a message"
                        .to_owned(),
                );
            }
            if messages.prefix == crate::heartbeat::HEARTBEAT_PREFIX {
                return invalid(
                    "message_prefix",
                    format!("{} is the relay's heartbeat prefix", messages.prefix),
                );
            }
        }
        if let Some(heartbeat) = self.postgres.heartbeat_interval {
            if self.http.stall_timeout < heartbeat * 2 {
                return invalid(
                    "stall_timeout_ms",
                    format!(
                        "{:?} is less than twice the heartbeat interval ({heartbeat:?}): an idle \
                         relay would be reported as stalled",
                        self.http.stall_timeout
                    ),
                );
            }
        }
        if let Err((option, reason)) = self.kafka.validate() {
            return invalid(option, reason);
        }
        let cols = &self.outbox.columns;
        let names = [
            &cols.id,
            &cols.aggregate_type,
            &cols.aggregate_id,
            &cols.event_type,
            &cols.payload,
            &cols.headers,
        ];
        for (i, a) in names.iter().enumerate() {
            if a.as_str().is_empty() {
                return invalid("columns", "a column name is empty".to_owned());
            }
            if names[i + 1..].contains(a) {
                return invalid("columns", format!("column {a} is configured twice"));
            }
        }
        Ok(())
    }

    /// The slot name: configured, or `outbox_relay_<database>`.
    pub fn slot_name(&self, database: &str) -> String {
        if let Some(slot) = &self.postgres.slot {
            return slot.clone();
        }
        let mut name = String::from(DEFAULT_SLOT_PREFIX);
        name.extend(database.chars().map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '_'
            }
        }));
        name.truncate(63);
        name
    }
}

/// Slot names are lower-case letters, digits and underscores, at most 63 bytes.
fn check_slot_name(slot: &str) -> Result<(), String> {
    if slot.is_empty() || slot.len() > 63 {
        return Err(format!("{slot:?} must be 1 to 63 characters"));
    }
    if !slot
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
    {
        return Err(format!(
            "{slot:?} may contain only lower-case letters, digits and underscores"
        ));
    }
    Ok(())
}

fn read_file(path: &Path) -> Result<FileConfig, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    toml::from_str(&text).map_err(|source| ConfigError::Parse {
        path: path.to_owned(),
        source: Box::new(source),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        args: Args,
    }

    fn args(flags: &[&str]) -> Args {
        let mut argv = vec!["outbox-relay"];
        argv.extend_from_slice(flags);
        Cli::try_parse_from(argv).expect("valid flags").args
    }

    const REQUIRED: [&str; 4] = [
        "--postgres-url",
        "postgres://u:p@h/db",
        "--kafka-brokers",
        "k:9092",
    ];

    #[test]
    fn defaults_apply_without_a_file() {
        let config = RelayConfig::from_args(&args(&REQUIRED)).unwrap();
        assert_eq!(config.postgres.publication, DEFAULT_PUBLICATION);
        assert_eq!(config.postgres.table.to_string(), DEFAULT_TABLE);
        assert_eq!(
            config.outbox.topic_template.to_string(),
            DEFAULT_TOPIC_TEMPLATE
        );
        assert_eq!(config.outbox.columns, DEFAULT_COLUMNS);
        assert_eq!(config.kafka.max_in_flight, DEFAULT_MAX_IN_FLIGHT);
        assert_eq!(config.slot_name("Orders-DB"), "outbox_relay_orders_db");
    }

    #[test]
    fn flags_beat_the_file_which_beats_defaults() {
        let dir = std::env::temp_dir().join(format!("relay-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("relay.toml");
        std::fs::write(
            &file,
            r#"
[postgres]
url = "postgres://file/db"
slot = "from_file"
table = "app.events"

[outbox]
topic_template = "events.${routedByValue}"
[outbox.columns]
payload = "body"

[kafka]
brokers = "file:9092"
max_in_flight = 5
[kafka.options]
"linger.ms" = "20"
"#,
        )
        .unwrap();
        let path = file.to_str().unwrap();
        let config = RelayConfig::from_args(&args(&[
            "--config",
            path,
            "--slot",
            "from_flag",
            "--kafka-option",
            "linger.ms=1",
            "--kafka-option",
            "compression.type=lz4",
        ]))
        .unwrap();
        assert_eq!(config.postgres.url.expose(), "postgres://file/db");
        assert_eq!(config.postgres.slot.as_deref(), Some("from_flag"));
        assert_eq!(config.postgres.table.quoted(), "\"app\".\"events\"");
        assert_eq!(config.outbox.topic_template.render("order"), "events.order");
        assert_eq!(config.outbox.columns.payload.as_str(), "body");
        assert_eq!(config.outbox.columns.id.as_str(), "id");
        assert_eq!(config.kafka.brokers, "file:9092");
        assert_eq!(config.kafka.max_in_flight, 5);
        assert_eq!(config.kafka.options["linger.ms"], "1");
        assert_eq!(config.kafka.options["compression.type"], "lz4");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn the_example_file_is_valid_and_states_the_defaults() {
        let path = testkit::crate_dir(env!("CARGO_MANIFEST_DIR")).join("relay.example.toml");
        let path = path.to_str().expect("a UTF-8 path");
        let config = RelayConfig::from_args(&args(&["--config", path])).unwrap();
        let defaults = RelayConfig::new("", "");
        assert_eq!(config.postgres.publication, defaults.postgres.publication);
        assert_eq!(config.postgres.table, defaults.postgres.table);
        assert_eq!(
            config.postgres.status_interval,
            defaults.postgres.status_interval
        );
        assert_eq!(
            config.postgres.slot_busy_timeout,
            defaults.postgres.slot_busy_timeout
        );
        assert_eq!(config.outbox.topic_template, defaults.outbox.topic_template);
        assert_eq!(config.outbox.columns, defaults.outbox.columns);
        assert_eq!(config.kafka.max_in_flight, defaults.kafka.max_in_flight);
        assert_eq!(
            config.kafka.topic_partitions,
            defaults.kafka.topic_partitions
        );
        assert_eq!(
            config.kafka.topic_replication_factor,
            defaults.kafka.topic_replication_factor
        );
        assert_eq!(config.slot_name("orders"), "outbox_relay_orders");
    }

    #[test]
    fn unknown_file_keys_are_rejected() {
        let dir = std::env::temp_dir().join(format!("relay-config-bad-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("relay.toml");
        std::fs::write(&file, "[postgres]\nslott = \"x\"\n").unwrap();
        let err = RelayConfig::from_args(&args(&["--config", file.to_str().unwrap()])).unwrap_err();
        let chain = format!("{err}: {}", std::error::Error::source(&err).unwrap());
        assert!(chain.contains("slott"), "{chain}");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn missing_and_invalid_values_are_named() {
        let err = RelayConfig::from_args(&args(&[])).unwrap_err().to_string();
        assert!(
            err.contains("postgres.url") && err.contains("OUTBOX_RELAY_POSTGRES_URL"),
            "{err}"
        );

        for (flags, expect) in [
            (&["--slot", "Bad-Slot"][..], "slot"),
            (
                &["--topic-template", "a/{aggregatetype}"][..],
                "topic_template",
            ),
            (&["--kafka-option", "acks=1"][..], "acks"),
            (&["--kafka-option", "novalue"][..], "KEY=VALUE"),
            (&["--column-payload", "id"][..], "configured twice"),
            (&["--max-in-flight", "0"][..], "max_in_flight"),
            (
                &["--topic-replication-factor", "0"][..],
                "topic_replication_factor",
            ),
            (&["--table", "a.b.c"][..], "table"),
            (&["--message-prefix", "outbox"][..], "allow-list"),
            (
                &[
                    "--heartbeat-interval-ms",
                    "40000",
                    "--stall-timeout-ms",
                    "60000",
                ][..],
                "twice the heartbeat",
            ),
        ] {
            let mut all = REQUIRED.to_vec();
            all.extend_from_slice(flags);
            let err = RelayConfig::from_args(&args(&all)).unwrap_err().to_string();
            assert!(err.contains(expect), "{flags:?}: {err}");
        }
    }

    #[test]
    fn secrets_do_not_print() {
        let config = RelayConfig::new("postgres://u:hunter2@h/db", "k:1");
        assert!(!format!("{config:?}").contains("hunter2"));
    }

    #[test]
    fn help_states_every_default() {
        use clap::CommandFactory;
        let help = Cli::command().render_long_help().to_string();
        for default in [
            DEFAULT_TOPIC_TEMPLATE.to_owned(),
            DEFAULT_TABLE.to_owned(),
            DEFAULT_PUBLICATION.to_owned(),
            format!("{DEFAULT_SLOT_PREFIX}<database>"),
            DEFAULT_STATUS_INTERVAL_MS.to_string(),
            DEFAULT_SLOT_BUSY_TIMEOUT_MS.to_string(),
            DEFAULT_HEARTBEAT_INTERVAL_MS.to_string(),
            DEFAULT_MAX_IN_FLIGHT.to_string(),
            DEFAULT_TOPIC_PARTITIONS.to_string(),
            DEFAULT_TOPIC_REPLICATION_FACTOR.to_string(),
            DEFAULT_DEAD_LETTER_TOPIC.to_owned(),
            DEFAULT_HTTP_LISTEN.to_owned(),
            DEFAULT_STALL_TIMEOUT_MS.to_string(),
        ] {
            assert!(
                help.contains(&format!("[default: {default}]")),
                "--help lacks {default}"
            );
        }
        let cols = DEFAULT_COLUMNS;
        for col in [
            cols.id,
            cols.aggregate_type,
            cols.aggregate_id,
            cols.event_type,
            cols.payload,
            cols.headers,
        ] {
            assert!(
                help.contains(&format!("[default: {col}]")),
                "--help lacks {col}"
            );
        }
    }
}
