//! From layered options to a [`RelayConfig`]: defaults for what no source set,
//! values parsed into their types, then the checks that span several options.

use std::collections::BTreeMap;
use std::time::Duration;

use super::{
    Columns, ColumnsSection, ConfigError, HttpConfig, HttpSection, Ident, KafkaConfig,
    KafkaSection, MessageRouting, NatsConfig, NatsSection, OutboxConfig, OutboxSection,
    PostgresConfig, PostgresSection, RabbitmqConfig, RabbitmqSection, RedisConfig, RedisSection,
    RelayConfig, Secret, Sections, SinkKind, TableName, TopicTemplate,
};

impl Sections {
    /// The validated configuration: every option left unset takes its default from
    /// [`RelayConfig::new`]. The URL and the brokers have none.
    pub fn resolve(self) -> Result<RelayConfig, ConfigError> {
        let Sections {
            mut postgres,
            outbox,
            http,
            sink,
            kafka,
            nats,
            rabbitmq,
            redis,
        } = self;
        let sink = sink.unwrap_or_default();
        let url = postgres.url.take().ok_or(ConfigError::Missing {
            option: "postgres.url",
            flag: "postgres-url",
            env: "OUTBOX_RELAY_POSTGRES_URL",
        })?;
        // The brokers are required only of the Kafka sink.
        let brokers = match (kafka.brokers.clone(), sink) {
            (Some(brokers), _) => brokers,
            (None, SinkKind::Kafka) => {
                return Err(ConfigError::Missing {
                    option: "kafka.brokers",
                    flag: "kafka-brokers",
                    env: "OUTBOX_RELAY_KAFKA_BROKERS",
                })
            }
            (None, _) => String::new(),
        };
        let defaults = RelayConfig::new("", brokers);
        let config = RelayConfig {
            postgres: postgres.resolve(url, defaults.postgres)?,
            outbox: outbox.resolve(defaults.outbox)?,
            sink,
            kafka: kafka.resolve(defaults.kafka)?,
            nats: nats.resolve(defaults.nats),
            rabbitmq: rabbitmq.resolve(defaults.rabbitmq),
            redis: redis.resolve(defaults.redis),
            http: http.resolve(defaults.http)?,
        };
        config.validate()?;
        Ok(config)
    }
}

impl PostgresSection {
    fn resolve(self, url: Secret, default: PostgresConfig) -> Result<PostgresConfig, ConfigError> {
        let status_interval = millis(self.status_interval_ms, default.status_interval);
        Ok(PostgresConfig {
            url,
            slot: self.slot,
            publication: self.publication.unwrap_or(default.publication),
            create_publication: self
                .create_publication
                .unwrap_or(default.create_publication),
            table: match self.table {
                Some(table) => TableName::parse(&table)?,
                None => default.table,
            },
            status_interval,
            heartbeat_interval: match self.heartbeat_interval_ms {
                // 0 turns heartbeats off.
                Some(0) => None,
                Some(ms) => Some(Duration::from_millis(ms)),
                None => default.heartbeat_interval,
            },
            snapshot: self.snapshot_mode.unwrap_or(default.snapshot),
            standby_poll_interval: millis(
                self.standby_poll_interval_ms,
                default.standby_poll_interval,
            ),
            takeover_after: match self.takeover_after_ms {
                // 0: a standby never ends another relay's server process.
                Some(0) => None,
                Some(ms) => Some(Duration::from_millis(ms)),
                // Unset, it keeps clear of a long status interval.
                None => default
                    .takeover_after
                    .map(|bound| bound.max(status_interval * 3)),
            },
            streaming: self.streaming.unwrap_or(default.streaming),
            stream_memory_bytes: self
                .stream_memory_bytes
                .unwrap_or(default.stream_memory_bytes),
            spill_dir: self.spill_dir.unwrap_or(default.spill_dir),
        })
    }
}

impl OutboxSection {
    fn resolve(self, default: OutboxConfig) -> Result<OutboxConfig, ConfigError> {
        Ok(OutboxConfig {
            topic_template: match self.topic_template {
                Some(template) => {
                    TopicTemplate::parse(&template).map_err(|e| ConfigError::Invalid {
                        option: "topic_template",
                        reason: e.0,
                    })?
                }
                None => default.topic_template,
            },
            // An empty prefix leaves message routing off.
            messages: match self.message_prefix.filter(|p| !p.is_empty()) {
                Some(prefix) => Some(MessageRouting {
                    prefix,
                    topics: self
                        .message_topics
                        .unwrap_or_default()
                        .into_iter()
                        .map(|t| t.trim().to_owned())
                        .filter(|t| !t.is_empty())
                        .collect(),
                }),
                None => default.messages,
            },
            payload_format: self.payload_format.unwrap_or(default.payload_format),
            dead_letter_topic: match self.dead_letter_topic {
                // Empty: no dead letters, stop on such a row instead.
                Some(topic) => Some(topic).filter(|t| !t.trim().is_empty()),
                None => default.dead_letter_topic,
            },
            columns: self.columns.resolve(default.columns),
        })
    }
}

impl ColumnsSection {
    fn resolve(self, default: Columns) -> Columns {
        let column = |name: Option<String>, default| name.map_or(default, Ident::Owned);
        Columns {
            id: column(self.id, default.id),
            aggregate_type: column(self.aggregate_type, default.aggregate_type),
            aggregate_id: column(self.aggregate_id, default.aggregate_id),
            event_type: column(self.event_type, default.event_type),
            payload: column(self.payload, default.payload),
            headers: column(self.headers, default.headers),
            tracing_span_context: column(self.tracing_span_context, default.tracing_span_context),
        }
    }
}

impl KafkaSection {
    fn resolve(self, default: KafkaConfig) -> Result<KafkaConfig, ConfigError> {
        // In layer order: a later value for a key replaces an earlier one.
        let mut options = BTreeMap::new();
        for option in self.options {
            let Some(value) = option.value else {
                return Err(ConfigError::Invalid {
                    option: "kafka-option",
                    reason: format!("{:?} is not KEY=VALUE", option.key),
                });
            };
            options.insert(option.key, value);
        }
        Ok(KafkaConfig {
            brokers: self.brokers.unwrap_or(default.brokers),
            options,
            max_in_flight: self.max_in_flight.unwrap_or(default.max_in_flight),
            create_topics: self.create_topics.unwrap_or(default.create_topics),
            topic_partitions: self.topic_partitions.unwrap_or(default.topic_partitions),
            topic_replication_factor: self
                .topic_replication_factor
                .unwrap_or(default.topic_replication_factor),
        })
    }
}

impl NatsSection {
    fn resolve(self, default: NatsConfig) -> NatsConfig {
        NatsConfig {
            url: self.url.unwrap_or(default.url),
            credentials_file: self.credentials_file.or(default.credentials_file),
            ca_file: self.ca_file.or(default.ca_file),
            stream: self.stream.unwrap_or(default.stream),
            subjects: self
                .subjects
                .map(|subjects| {
                    subjects
                        .into_iter()
                        .map(|s| s.trim().to_owned())
                        .filter(|s| !s.is_empty())
                        .collect()
                })
                .unwrap_or(default.subjects),
            create_stream: self.create_stream.unwrap_or(default.create_stream),
            storage: self.storage.unwrap_or(default.storage),
            replicas: self.replicas.unwrap_or(default.replicas),
            duplicate_window: millis(self.duplicate_window_ms, default.duplicate_window),
            ack_timeout: millis(self.ack_timeout_ms, default.ack_timeout),
        }
    }
}

impl RabbitmqSection {
    fn resolve(self, default: RabbitmqConfig) -> RabbitmqConfig {
        RabbitmqConfig {
            url: self.url.unwrap_or(default.url),
            ca_file: self.ca_file.or(default.ca_file),
            exchange: self.exchange.unwrap_or(default.exchange),
            exchange_type: self.exchange_type.unwrap_or(default.exchange_type),
            declare_exchange: self.declare_exchange.unwrap_or(default.declare_exchange),
            routing_key: self.routing_key.unwrap_or(default.routing_key),
            max_message_bytes: self.max_message_bytes.unwrap_or(default.max_message_bytes),
        }
    }
}

impl RedisSection {
    fn resolve(self, default: RedisConfig) -> RedisConfig {
        RedisConfig {
            url: self.url.unwrap_or(default.url),
            ca_file: self.ca_file.or(default.ca_file),
            stream: self.stream.unwrap_or(default.stream),
            maxlen: self.maxlen.or(default.maxlen),
            wait_replicas: self.wait_replicas.unwrap_or(default.wait_replicas),
            response_timeout: millis(self.response_timeout_ms, default.response_timeout),
            max_record_bytes: self.max_record_bytes.unwrap_or(default.max_record_bytes),
        }
    }
}

impl HttpSection {
    fn resolve(self, default: HttpConfig) -> Result<HttpConfig, ConfigError> {
        Ok(HttpConfig {
            listen: match self.listen {
                // Empty: no endpoint.
                Some(listen) if listen.trim().is_empty() => None,
                Some(listen) => Some(listen.trim().parse().map_err(|_| ConfigError::Invalid {
                    option: "http_listen",
                    reason: format!("{listen:?} is not an address such as 0.0.0.0:9187"),
                })?),
                None => default.listen,
            },
            stall_timeout: millis(self.stall_timeout_ms, default.stall_timeout),
        })
    }
}

/// Milliseconds as a duration, or the default.
fn millis(ms: Option<u64>, default: Duration) -> Duration {
    ms.map_or(default, Duration::from_millis)
}

impl RelayConfig {
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
        if self.postgres.standby_poll_interval.is_zero() {
            return invalid("standby_poll_interval_ms", "must be above 0".to_owned());
        }
        if let Some(takeover) = self.postgres.takeover_after {
            // The holder reports at least every status interval; a bound closer
            // than twice that would end a healthy relay's session.
            if takeover < self.postgres.status_interval * 2 {
                return invalid(
                    "takeover_after_ms",
                    format!(
                        "{takeover:?} is less than twice the status interval ({:?}): a standby \
                         would take the slot from a healthy relay",
                        self.postgres.status_interval
                    ),
                );
            }
        }
        if self.postgres.stream_memory_bytes == 0 {
            return invalid("stream_memory_bytes", "must be above 0".to_owned());
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
        let sink = match self.sink {
            SinkKind::Kafka => self.kafka.validate(),
            SinkKind::Nats => self.nats.validate().and_then(|()| self.nats_routes()),
            SinkKind::Rabbitmq => self.rabbitmq.validate(),
            SinkKind::Redis => self.redis.validate(),
        };
        if let Err((option, reason)) = sink {
            return invalid(option, reason);
        }
        let names = self.outbox.columns.all();
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
}

impl RelayConfig {
    /// A stream the relay creates must take the dead letters: a dead letter whose
    /// subject it does not cover could not be delivered either.
    fn nats_routes(&self) -> Result<(), (&'static str, String)> {
        let Some(topic) = &self.outbox.dead_letter_topic else {
            return Ok(());
        };
        if self.nats.create_stream
            && !self
                .nats
                .subjects
                .iter()
                .any(|filter| crate::sink::nats::subject_matches(filter, topic))
        {
            return Err((
                "nats.subjects",
                format!(
                    "{:?} do not cover the dead-letter topic {topic:?}: add it, or a wildcard \
                     such as outbox.>",
                    self.nats.subjects
                ),
            ));
        }
        Ok(())
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
