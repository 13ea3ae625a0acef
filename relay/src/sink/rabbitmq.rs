//! The RabbitMQ sink: each record is published, persistent and `mandatory`, to an
//! exchange with a routing key (both from templates), on one channel in confirm
//! mode; the broker's confirm is the acknowledgement.
//!
//! | RabbitMQ says | the contract says |
//! |---|---|
//! | `basic.ack` | [`Event::Acked`](super::Event::Acked): every queue the record was routed to has it (on disk, for a durable queue) |
//! | `basic.return` then `basic.ack` (no queue is bound for the routing key) | refused, bad route: dead-lettered with the broker's reason |
//! | larger than `max_message_bytes`; a name AMQP cannot carry | refused (checked before publishing) |
//! | `basic.nack`, a closed channel or connection, an exchange that cannot be declared | [`SinkError`]: the relay starts over from what it confirmed |
//!
//! **Order per key**: one channel, one publishing task; RabbitMQ keeps a channel's
//! order in each queue. The outbox id is the AMQP `message_id`, the record's key
//! the `key` header, its other headers AMQP headers (long strings).
//!
//! The dead-letter topic gets a durable queue of its own name, bound to its
//! routing key, so that a dead letter is never itself unroutable.

use std::collections::HashSet;

use futures::FutureExt;
use lapin::options::{
    BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions,
    QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{
    BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, ExchangeKind,
};

use super::worker::{Acks, Failure, Job, Piped, Publisher};
use super::{Handed, Refusal, RefusalKind, Sink, SinkError, Ticket};
use crate::replication::Secret;
use crate::routing::OutboxRecord;

/// The sink's name in logs and metrics.
const NAME: &str = "rabbitmq";

/// The exchange records go to, unless configured otherwise.
pub const DEFAULT_EXCHANGE: &str = "outbox";
/// The routing key: the record's topic.
pub const DEFAULT_ROUTING_KEY: &str = "{topic}";
/// RabbitMQ's own default `max_message_size` (128 MiB).
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 128 * 1024 * 1024;
/// The placeholder of the templates.
const TOPIC: &str = "{topic}";
/// The longest exchange name or routing key AMQP 0-9-1 carries.
const MAX_SHORT_STRING: usize = 255;

/// Where the RabbitMQ sink writes to.
#[derive(Debug, Clone)]
pub struct RabbitmqConfig {
    /// `amqp://user:password@host:port/vhost`, or `amqps://` for TLS.
    pub url: Secret,
    /// PEM file of the certificate authorities to trust for `amqps://` instead of
    /// the system's.
    pub ca_file: Option<std::path::PathBuf>,
    /// The exchange; `{topic}` is replaced by the record's topic.
    pub exchange: String,
    /// `topic`, `direct`, `fanout` or `headers`, for a declared exchange.
    pub exchange_type: String,
    /// Declare the exchange (durable) when it is missing.
    pub declare_exchange: bool,
    /// The routing key; `{topic}` is replaced by the record's topic.
    pub routing_key: String,
    pub max_message_bytes: usize,
}

impl Default for RabbitmqConfig {
    fn default() -> RabbitmqConfig {
        RabbitmqConfig {
            url: Secret::new("amqp://guest:guest@127.0.0.1:5672/%2f"),
            ca_file: None,
            exchange: DEFAULT_EXCHANGE.to_owned(),
            exchange_type: "topic".to_owned(),
            declare_exchange: true,
            routing_key: DEFAULT_ROUTING_KEY.to_owned(),
            max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
        }
    }
}

impl RabbitmqConfig {
    /// Checks what types alone do not rule out; `Err((option, reason))`.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        if !matches!(
            self.exchange_type.as_str(),
            "topic" | "direct" | "fanout" | "headers"
        ) {
            return Err((
                "rabbitmq.exchange_type",
                format!(
                    "{:?} is not topic, direct, fanout or headers",
                    self.exchange_type
                ),
            ));
        }
        if self.exchange.replace(TOPIC, "x").is_empty() {
            return Err((
                "rabbitmq.exchange",
                "records cannot be published to the default exchange by the relay: name one"
                    .to_owned(),
            ));
        }
        if self.max_message_bytes == 0 {
            return Err(("rabbitmq.max_message_bytes", "must be above 0".to_owned()));
        }
        Ok(())
    }

    fn exchange_for(&self, topic: &str) -> String {
        self.exchange.replace(TOPIC, topic)
    }

    fn routing_key_for(&self, topic: &str) -> String {
        self.routing_key.replace(TOPIC, topic)
    }
}

/// Whether RabbitMQ accepts `name` as an exchange name.
fn check_exchange(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > MAX_SHORT_STRING {
        return Err(format!("exchange {name:?} must be 1 to 255 bytes"));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':')))
    {
        return Err(format!(
            "exchange {name:?} contains {c:?}; exchange names are made of letters, digits, \
             '-', '_', '.' and ':'"
        ));
    }
    Ok(())
}

/// Connects to `config`'s URL, trusting `ca_file` for `amqps://` when given.
async fn connect(
    config: &RabbitmqConfig,
    properties: ConnectionProperties,
) -> Result<Connection, SinkError> {
    let cert_chain = match &config.ca_file {
        Some(path) => Some(std::fs::read_to_string(path).map_err(|e| {
            SinkError::fatal(
                NAME,
                format!("cannot read rabbitmq.ca_file {}", path.display()),
            )
            .with_source(e)
        })?),
        None => None,
    };
    let tls = lapin::tcp::OwnedTLSConfig {
        identity: None,
        cert_chain,
    };
    let runtime = lapin::runtime::default_runtime()
        .map_err(|e| SinkError::fatal(NAME, "no runtime for the AMQP client").with_source(e))?;
    Connection::connect_with_config(config.url.expose(), properties, tls, runtime)
        .await
        .map_err(|e| SinkError::unavailable(NAME, "cannot connect to the broker").with_source(e))
}

/// What `outbox-relay check` reports of the broker, without changing anything.
pub async fn probe(config: &RabbitmqConfig) -> Result<String, String> {
    let connection = connect(config, ConnectionProperties::default())
        .await
        .map_err(|e| super::describe(&e))?;
    let channel = connection
        .create_channel()
        .await
        .map_err(|e| format!("cannot open a channel: {e}"))?;
    if config.exchange.contains(TOPIC) {
        return Ok(format!(
            "connected; exchanges follow the template {:?}",
            config.exchange
        ));
    }
    let passive = ExchangeDeclareOptions {
        passive: true,
        ..ExchangeDeclareOptions::default()
    };
    match channel
        .exchange_declare(
            config.exchange.as_str().into(),
            ExchangeKind::Topic,
            passive,
            FieldTable::default(),
        )
        .await
    {
        Ok(()) => Ok(format!("exchange {} exists", config.exchange)),
        Err(e) if config.declare_exchange => Ok(format!(
            "exchange {} not found ({e}); the relay declares it ({})",
            config.exchange, config.exchange_type
        )),
        Err(e) => Err(format!(
            "exchange {}: {e} (and rabbitmq.declare_exchange is off)",
            config.exchange
        )),
    }
}

/// Publishes to RabbitMQ with publisher confirms.
#[derive(Debug)]
pub struct RabbitmqSink {
    piped: Piped,
    config: RabbitmqConfig,
}

impl RabbitmqSink {
    /// Connects, opens a confirm channel, and declares the exchange and the
    /// dead-letter queue.
    pub async fn connect(
        config: &RabbitmqConfig,
        dead_letter_topic: Option<&str>,
        max_in_flight: usize,
    ) -> Result<RabbitmqSink, SinkError> {
        let failed =
            |what: String| move |e: lapin::Error| SinkError::unavailable(NAME, what).with_source(e);
        let connection = connect(
            config,
            ConnectionProperties::default().with_connection_name("outbox-relay".into()),
        )
        .await?;
        let channel = connection
            .create_channel()
            .await
            .map_err(failed("cannot open a channel".to_owned()))?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(failed("cannot turn publisher confirms on".to_owned()))?;
        let mut publisher = Amqp {
            _connection: connection,
            channel,
            config: config.clone(),
            declared: HashSet::new(),
        };
        if let Some(topic) = dead_letter_topic {
            let exchange = config.exchange_for(topic);
            publisher.declare(&exchange).await?;
            let queue = config.routing_key_for(topic);
            publisher
                .channel
                .queue_declare(
                    queue.as_str().into(),
                    QueueDeclareOptions {
                        durable: true,
                        ..QueueDeclareOptions::default()
                    },
                    FieldTable::default(),
                )
                .await
                .map_err(failed(format!(
                    "cannot declare the dead-letter queue {queue}"
                )))?;
            publisher
                .channel
                .queue_bind(
                    queue.as_str().into(),
                    exchange.as_str().into(),
                    queue.as_str().into(),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await
                .map_err(failed(format!("cannot bind the dead-letter queue {queue}")))?;
        }
        tracing::info!(exchange = %config.exchange, routing_key = %config.routing_key, "publishing to RabbitMQ");
        Ok(RabbitmqSink {
            piped: Piped::start(NAME, publisher, max_in_flight),
            config: config.clone(),
        })
    }
}

impl Sink for RabbitmqSink {
    fn name(&self) -> &'static str {
        NAME
    }

    fn check_name(&self, name: &str) -> Result<(), String> {
        check_exchange(&self.config.exchange_for(name))?;
        let key = self.config.routing_key_for(name);
        if key.len() > MAX_SHORT_STRING {
            return Err(format!(
                "routing key {key:?} is {} bytes; AMQP allows 255",
                key.len()
            ));
        }
        Ok(())
    }

    fn max_record_bytes(&self) -> usize {
        self.config.max_message_bytes
    }

    fn send(&mut self, ticket: Ticket, record: &OutboxRecord) -> Result<Handed, SinkError> {
        // AMQP carries header names as short strings.
        if let Some((name, _)) = record
            .headers
            .iter()
            .find(|(name, _)| name.len() > MAX_SHORT_STRING)
        {
            return Ok(Handed::Refused(Refusal::new(
                RefusalKind::Invalid,
                format!(
                    "header name {}... is {} bytes; AMQP allows 255",
                    name.chars().take(32).collect::<String>(),
                    name.len()
                ),
            )));
        }
        self.piped.send_within(
            ticket,
            record,
            self.config.max_message_bytes,
            "max_message_bytes",
        )
    }

    fn poll_next(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<super::Event, SinkError>> {
        self.piped.poll_next(cx)
    }
}

/// The publishing half, driven by the sink's task.
struct Amqp {
    /// Kept open for as long as the channel is used.
    _connection: Connection,
    channel: Channel,
    config: RabbitmqConfig,
    declared: HashSet<String>,
}

impl Amqp {
    async fn declare(&mut self, exchange: &str) -> Result<(), SinkError> {
        if !self.config.declare_exchange || self.declared.contains(exchange) {
            return Ok(());
        }
        let kind = match self.config.exchange_type.as_str() {
            "direct" => ExchangeKind::Direct,
            "fanout" => ExchangeKind::Fanout,
            "headers" => ExchangeKind::Headers,
            _ => ExchangeKind::Topic,
        };
        self.channel
            .exchange_declare(
                exchange.into(),
                kind,
                ExchangeDeclareOptions {
                    durable: true,
                    ..ExchangeDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .map_err(|e| {
                SinkError::unavailable(NAME, format!("cannot declare exchange {exchange}"))
                    .with_source(e)
            })?;
        tracing::info!(%exchange, "declared exchange");
        self.declared.insert(exchange.to_owned());
        Ok(())
    }
}

impl Publisher for Amqp {
    async fn publish(&mut self, batch: Vec<Job>) -> Result<Vec<Acks>, SinkError> {
        let mut acks = Vec::with_capacity(batch.len());
        for (ticket, record) in batch {
            let exchange = self.config.exchange_for(&record.topic);
            let routing_key = self.config.routing_key_for(&record.topic);
            self.declare(&exchange).await?;
            let mut headers = FieldTable::default();
            headers.insert(
                ShortString::from("key"),
                AMQPValue::LongString(LongString::from(record.key.to_vec())),
            );
            for (name, value) in &record.headers {
                headers.insert(
                    ShortString::from(name.as_str()),
                    AMQPValue::LongString(LongString::from(value.to_vec())),
                );
            }
            let properties = BasicProperties::default()
                .with_delivery_mode(2)
                .with_message_id(ShortString::from(record.id.as_str()))
                .with_content_type(ShortString::from("application/json"))
                .with_headers(headers);
            let payload = record.payload.clone().unwrap_or_default();
            let confirm = self
                .channel
                .basic_publish(
                    exchange.as_str().into(),
                    routing_key.as_str().into(),
                    BasicPublishOptions {
                        mandatory: true,
                        immediate: false,
                    },
                    &payload,
                    properties,
                )
                .await
                .map_err(|e| SinkError::unavailable(NAME, "cannot publish").with_source(e))?;
            acks.push(
                async move {
                    let outcome = match confirm.await {
                        Ok(Confirmation::Ack(None)) => Ok(()),
                        Ok(Confirmation::Ack(Some(returned))) => Err(Failure::Record(
                            Refusal::new(
                                RefusalKind::BadRoute,
                                format!(
                                    "returned by the broker ({} {}): no queue is bound to \
                                     routing key {routing_key:?} on exchange {exchange:?}",
                                    returned.reply_code, returned.reply_text
                                ),
                            ),
                            record.payload,
                        )),
                        Ok(Confirmation::Nack(_)) => {
                            Err(Failure::Destination(SinkError::unavailable(
                                NAME,
                                format!(
                                    "the broker refused to take a record for {exchange} (nack)"
                                ),
                            )))
                        }
                        Ok(Confirmation::NotRequested) => Err(Failure::Destination(
                            SinkError::unavailable(NAME, "the channel is not in confirm mode"),
                        )),
                        Err(e) => Err(Failure::Destination(
                            SinkError::unavailable(NAME, "a publish was not confirmed")
                                .with_source(e),
                        )),
                    };
                    vec![(ticket, outcome)]
                }
                .boxed(),
            );
        }
        Ok(acks)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exchange_names_and_templates() {
        assert_eq!(check_exchange("outbox"), Ok(()));
        assert_eq!(check_exchange("outbox.event:a-b_c"), Ok(()));
        for bad in ["", "a b", "café", "a/b"] {
            assert!(check_exchange(bad).is_err(), "{bad:?}");
        }
        assert!(check_exchange(&"x".repeat(256)).is_err());
        let config = RabbitmqConfig {
            exchange: "ex.{topic}".to_owned(),
            routing_key: "rk.{topic}".to_owned(),
            ..RabbitmqConfig::default()
        };
        assert_eq!(config.exchange_for("order"), "ex.order");
        assert_eq!(config.routing_key_for("order"), "rk.order");
        assert!(RabbitmqConfig {
            exchange_type: "nope".to_owned(),
            ..RabbitmqConfig::default()
        }
        .validate()
        .is_err());
    }
}
