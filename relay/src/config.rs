//! Relay configuration.
//!
//! Every option can come from a TOML file (`--config`), an environment variable
//! (`OUTBOX_RELAY_*`) or a flag; a flag beats the environment, which beats the file,
//! which beats the default. [`Args`] is the command line, [`RelayConfig`] the
//! validated result that [`crate::run`] takes.
//!
//! An option is declared once, as an `Option` field of its section's struct
//! ([`PostgresSection`], [`OutboxSection`], [`ColumnsSection`], [`HttpSection`],
//! [`KafkaSection`], [`NatsSection`], [`RabbitmqSection`], [`RedisSection`],
//! together [`Sections`]): the field name is the TOML key, its
//! `#[arg]` names the flag and the environment variable, and its doc comment is the
//! `--help` text, which states the default. The same struct is read from the file
//! (serde, unknown keys refused) and flattened into the command line (clap), so the
//! three sources cannot drift apart, and a new option is one field.
//!
//! Layering is generic: clap puts a flag over its environment variable, then
//! [`Layer::or`] puts the command line over the file, field by field
//! (`[kafka.options]` entries add up key by key). [`Sections::resolve`] takes each
//! value still missing from [`RelayConfig::new`], the one place the defaults are
//! assembled, and parses what types alone cannot (table name, topic template,
//! address); [`RelayConfig::validate`] then checks what spans several options.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::sql;

mod options;
mod validate;

pub use crate::replication::Secret;
pub use crate::routing::outbox::{
    Columns, Ident, MessageRouting, OutboxConfig, PayloadFormat, TopicTemplate, DEFAULT_COLUMNS,
    DEFAULT_TOPIC_TEMPLATE,
};
pub use crate::sink::any::SinkKind;
pub use crate::sink::kafka::config::{
    KafkaConfig, DEFAULT_MAX_IN_FLIGHT, DEFAULT_TOPIC_PARTITIONS, DEFAULT_TOPIC_REPLICATION_FACTOR,
    PROTECTED_KAFKA_OPTIONS,
};
pub use crate::sink::nats::{NatsConfig, NatsStorage};
pub use crate::sink::rabbitmq::RabbitmqConfig;
pub use crate::sink::redis::RedisConfig;
pub use options::{
    ColumnsSection, HttpSection, KafkaOption, KafkaSection, Layer, NatsSection, OutboxSection,
    PostgresSection, RabbitmqSection, RedisSection, Sections,
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
/// How often a standby looks at the slot, in milliseconds.
pub const DEFAULT_STANDBY_POLL_INTERVAL_MS: u64 = 1_000;
/// How long the slot's holder may go without a status update before a standby takes
/// the slot over, in milliseconds.
pub const DEFAULT_TAKEOVER_AFTER_MS: u64 = 30_000;
/// Bytes of open streamed transactions kept in memory before they spill to files.
pub const DEFAULT_STREAM_MEMORY_BYTES: u64 = 16 * 1024 * 1024;
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

    /// Every other option; each also a key of the file.
    #[command(flatten)]
    pub options: Sections,
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
    /// How often a standby looks at the slot.
    pub standby_poll_interval: Duration,
    /// `None`: never end another relay's server process.
    pub takeover_after: Option<Duration>,
    /// Whether to ask for in-progress transactions (protocol 2) where the server
    /// can send them.
    pub streaming: bool,
    /// Bytes of open streamed transactions kept in memory.
    pub stream_memory_bytes: u64,
    /// Where open streamed transactions beyond that go.
    pub spill_dir: PathBuf,
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
    /// Where records go; only its section is used.
    pub sink: SinkKind,
    /// The Kafka sink; `max_in_flight` bounds every sink.
    pub kafka: KafkaConfig,
    pub nats: NatsConfig,
    pub rabbitmq: RabbitmqConfig,
    pub redis: RedisConfig,
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
                standby_poll_interval: Duration::from_millis(DEFAULT_STANDBY_POLL_INTERVAL_MS),
                takeover_after: Some(Duration::from_millis(DEFAULT_TAKEOVER_AFTER_MS)),
                streaming: true,
                stream_memory_bytes: DEFAULT_STREAM_MEMORY_BYTES,
                spill_dir: std::env::temp_dir().join("outbox-relay"),
            },
            outbox: OutboxConfig {
                topic_template: TopicTemplate::parse(DEFAULT_TOPIC_TEMPLATE)
                    .expect("the default topic template is valid"),
                dead_letter_topic: Some(DEFAULT_DEAD_LETTER_TOPIC.to_owned()),
                payload_format: PayloadFormat::Json,
                messages: None,
                columns: DEFAULT_COLUMNS,
            },
            sink: SinkKind::Kafka,
            kafka: KafkaConfig {
                brokers: brokers.into(),
                ..KafkaConfig::default()
            },
            nats: NatsConfig::default(),
            rabbitmq: RabbitmqConfig::default(),
            redis: RedisConfig::default(),
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
            None => Sections::default(),
        };
        args.options.clone().or(file).resolve()
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

fn read_file(path: &Path) -> Result<Sections, ConfigError> {
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
mod tests;
