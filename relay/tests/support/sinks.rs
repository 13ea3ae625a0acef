//! The four destinations of the relay, for the delivery suite every sink passes:
//! how a test's relay is pointed at one ([`Backend::settings`]) and a reader of what
//! arrived there ([`SinkCollector`]) that turns each record into a [`Received`].
//!
//! Every test gets its own names: Kafka topics, a JetStream stream (in memory), a
//! RabbitMQ exchange and Redis stream keys, all made from the settings' unique
//! topic prefix, and removed again when the collector is dropped.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use futures::StreamExt;
use lapin::options::{
    BasicConsumeOptions, ExchangeDeclareOptions, ExchangeDeleteOptions, QueueBindOptions,
    QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Connection, ConnectionProperties, ExchangeKind};
use serde_json::Value;
use testkit::{service_url, settings};

use super::{Collector, OutboxDb, Received, RelaySettings};

/// What a sink promises beyond the fields every sink carries: JetStream's message
/// id, RabbitMQ's persistent delivery and message id, both the outbox id.
pub fn check_sink_properties(backend: Backend, received: &[Received]) {
    let (name, expected) = match backend {
        Backend::Nats => ("Nats-Msg-Id", None),
        Backend::Rabbitmq => ("amqp-message-id", Some("2")),
        Backend::Kafka | Backend::Redis => return,
    };
    for record in received {
        assert_eq!(
            record.headers.get(name).map(String::as_str),
            Some(record.id()),
            "{name} of {record:?}"
        );
        if let Some(mode) = expected {
            assert_eq!(
                record.headers.get("amqp-delivery-mode").map(String::as_str),
                Some(mode),
                "not persistent: {record:?}"
            );
        }
    }
}

/// One of the relay's sinks, at the server the tests share.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Kafka,
    Nats,
    Rabbitmq,
    Redis,
}

impl Backend {
    pub fn name(self) -> &'static str {
        match self {
            Backend::Kafka => "kafka",
            Backend::Nats => "nats",
            Backend::Rabbitmq => "rabbitmq",
            Backend::Redis => "redis",
        }
    }

    /// `host:port` of the shared server (for a proxy in front of it); not for Kafka,
    /// whose brokers advertise their own address.
    pub fn server_address(self) -> String {
        let url = match self {
            Backend::Kafka => panic!("Kafka clients follow the advertised address"),
            Backend::Nats => service_url("NATS_URL"),
            Backend::Rabbitmq => service_url("RABBITMQ_URL"),
            Backend::Redis => service_url("REDIS_URL"),
        };
        authority(&url).1.to_owned()
    }

    /// A relay writing to this backend's shared server, dead letters to
    /// `<prefix>.dlq`.
    pub fn settings(self, db: &OutboxDb) -> RelaySettings {
        self.settings_at(db, None)
    }

    /// [`Backend::settings`], reaching the server through `address` (a proxy).
    pub fn settings_via(self, db: &OutboxDb, address: &str) -> RelaySettings {
        self.settings_at(db, Some(address))
    }

    fn settings_at(self, db: &OutboxDb, address: Option<&str>) -> RelaySettings {
        let brokers = settings().kafka_brokers.clone();
        let base = RelaySettings::new(db, &brokers);
        let prefix = base.topic_prefix.clone();
        let url = |name: &str| {
            let url = service_url(name);
            match address {
                Some(address) => with_address(&url, address),
                None => url,
            }
        };
        let base = base.with("OUTBOX_RELAY_DEAD_LETTER_TOPIC", format!("{prefix}.dlq"));
        match self {
            Backend::Kafka => base,
            Backend::Nats => base
                .with("OUTBOX_RELAY_SINK", "nats")
                .with("OUTBOX_RELAY_NATS_URL", url("NATS_URL"))
                .with("OUTBOX_RELAY_NATS_STREAM", stream_name(&prefix))
                .with("OUTBOX_RELAY_NATS_SUBJECTS", format!("{prefix}.>"))
                .with("OUTBOX_RELAY_NATS_STORAGE", "memory"),
            Backend::Rabbitmq => base
                .with("OUTBOX_RELAY_SINK", "rabbitmq")
                .with("OUTBOX_RELAY_RABBITMQ_URL", url("RABBITMQ_URL"))
                .with("OUTBOX_RELAY_RABBITMQ_EXCHANGE", &prefix),
            Backend::Redis => base
                .with("OUTBOX_RELAY_SINK", "redis")
                .with("OUTBOX_RELAY_REDIS_URL", url("REDIS_URL")),
        }
    }
}

/// The JetStream stream of a test: its topic prefix, in capitals.
pub fn stream_name(prefix: &str) -> String {
    prefix.to_uppercase()
}

/// (`scheme://user@`, `host:port`, the rest) of a URL.
fn authority(url: &str) -> (&str, &str, &str) {
    let start = url.find("://").map_or(0, |i| i + 3);
    let end = url[start..].find('/').map_or(url.len(), |i| start + i);
    let host_start = url[start..end].rfind('@').map_or(start, |i| start + i + 1);
    (&url[..host_start], &url[host_start..end], &url[end..])
}

/// `url` with its host and port replaced by `address`.
fn with_address(url: &str, address: &str) -> String {
    let (head, _, tail) = authority(url);
    format!("{head}{address}{tail}")
}

/// What arrived at a backend for the given topics, read from the beginning.
pub struct SinkCollector {
    reader: Reader,
    pub received: Vec<Received>,
}

// One reader per test: its size does not matter.
#[allow(clippy::large_enum_variant)]
enum Reader {
    /// Subscribes at the first read, when the relay has created the topics.
    Kafka {
        brokers: String,
        topics: Vec<String>,
        collector: Option<Collector>,
    },
    Nats {
        context: async_nats::jetstream::Context,
        stream: String,
        next: u64,
    },
    Rabbitmq {
        _connection: Connection,
        channel: lapin::Channel,
        consumer: lapin::Consumer,
        exchange: String,
        dead_letters: String,
        offset: i64,
    },
    Redis {
        connection: redis::aio::MultiplexedConnection,
        prefix: String,
        keys: Vec<String>,
        last: Vec<String>,
        offsets: BTreeMap<String, i64>,
    },
}

impl SinkCollector {
    /// Starts reading `topics` (topics, subjects, routing keys or stream keys; with
    /// the dead-letter topic when the test reads dead letters). Call it before the
    /// relay publishes: a RabbitMQ exchange delivers only to queues bound by then.
    pub async fn start(
        backend: Backend,
        relay: &RelaySettings,
        topics: &[String],
    ) -> SinkCollector {
        SinkCollector::start_at(backend, None, relay, topics).await
    }

    /// [`SinkCollector::start`] on the server at `url` instead of the shared one
    /// (not for Kafka, read at the relay's brokers).
    pub async fn start_at(
        backend: Backend,
        url: Option<&str>,
        relay: &RelaySettings,
        topics: &[String],
    ) -> SinkCollector {
        let url = |name: &str| url.map_or_else(|| service_url(name), str::to_owned);
        let prefix = &relay.topic_prefix;
        let reader = match backend {
            Backend::Kafka => Reader::Kafka {
                brokers: relay.brokers.clone(),
                topics: topics.to_vec(),
                collector: None,
            },
            Backend::Nats => {
                let client = async_nats::connect(url("NATS_URL"))
                    .await
                    .expect("connect to NATS");
                Reader::Nats {
                    context: async_nats::jetstream::new(client),
                    stream: stream_name(prefix),
                    next: 1,
                }
            }
            Backend::Rabbitmq => {
                let connection =
                    Connection::connect(&url("RABBITMQ_URL"), ConnectionProperties::default())
                        .await
                        .expect("connect to RabbitMQ");
                let channel = connection.create_channel().await.expect("a channel");
                // The relay declares the same exchange; whoever comes first creates it.
                channel
                    .exchange_declare(
                        prefix.as_str().into(),
                        ExchangeKind::Topic,
                        ExchangeDeclareOptions {
                            durable: true,
                            ..ExchangeDeclareOptions::default()
                        },
                        FieldTable::default(),
                    )
                    .await
                    .expect("declare the exchange");
                let queue = channel
                    .queue_declare(
                        "".into(),
                        QueueDeclareOptions {
                            exclusive: true,
                            auto_delete: true,
                            ..QueueDeclareOptions::default()
                        },
                        FieldTable::default(),
                    )
                    .await
                    .expect("declare the test's queue");
                for topic in topics {
                    channel
                        .queue_bind(
                            queue.name().clone(),
                            prefix.as_str().into(),
                            topic.as_str().into(),
                            QueueBindOptions::default(),
                            FieldTable::default(),
                        )
                        .await
                        .expect("bind the test's queue");
                }
                let consumer = channel
                    .basic_consume(
                        queue.name().clone(),
                        "collector".into(),
                        BasicConsumeOptions {
                            no_ack: true,
                            ..BasicConsumeOptions::default()
                        },
                        FieldTable::default(),
                    )
                    .await
                    .expect("consume");
                Reader::Rabbitmq {
                    _connection: connection,
                    channel,
                    consumer,
                    exchange: prefix.clone(),
                    dead_letters: format!("{prefix}.dlq"),
                    offset: 0,
                }
            }
            Backend::Redis => {
                let client = redis::Client::open(url("REDIS_URL")).expect("a Redis URL");
                let connection = client
                    .get_multiplexed_async_connection()
                    .await
                    .expect("connect to Redis");
                Reader::Redis {
                    connection,
                    prefix: prefix.clone(),
                    keys: topics.to_vec(),
                    last: vec!["0".to_owned(); topics.len()],
                    offsets: BTreeMap::new(),
                }
            }
        };
        SinkCollector {
            reader,
            received: Vec::new(),
        }
    }

    /// Reads until `done(received)` holds, failing after `timeout` without a record.
    pub async fn until(&mut self, timeout: Duration, done: impl Fn(&[Received]) -> bool) {
        while !done(&self.received) {
            let batch = self.read(timeout).await;
            assert!(
                !batch.is_empty(),
                "no record for {timeout:?}; {} received so far",
                self.received.len()
            );
            self.received.extend(batch);
        }
    }

    /// Reads whatever arrives within `quiet`.
    pub async fn drain_for(&mut self, quiet: Duration) {
        let deadline = Instant::now() + quiet;
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            let batch = self.read(left).await;
            if batch.is_empty() {
                break;
            }
            self.received.extend(batch);
        }
    }

    /// What arrives within `wait` (empty when nothing does).
    async fn read(&mut self, wait: Duration) -> Vec<Received> {
        let deadline = Instant::now() + wait;
        match &mut self.reader {
            Reader::Kafka {
                brokers,
                topics,
                collector,
            } => {
                if collector.is_none() {
                    *collector = Some(Collector::new(brokers, topics, 3).await);
                }
                let collector = collector.as_mut().expect("subscribed");
                let left = deadline.saturating_duration_since(Instant::now());
                collector.next(left).await.into_iter().collect()
            }
            Reader::Nats {
                context,
                stream,
                next,
            } => loop {
                if let Ok(stream) = context.get_stream(stream.as_str()).await {
                    if let Ok(message) = stream.get_raw_message(*next).await {
                        *next += 1;
                        return vec![nats_received(&message)];
                    }
                }
                if Instant::now() >= deadline {
                    return Vec::new();
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            },
            Reader::Rabbitmq {
                consumer, offset, ..
            } => match tokio::time::timeout_at(deadline.into(), consumer.next()).await {
                Ok(Some(Ok(delivery))) => {
                    *offset += 1;
                    vec![rabbitmq_received(&delivery, *offset)]
                }
                Ok(Some(Err(e))) => panic!("RabbitMQ consumer error: {e}"),
                Ok(None) => panic!("the RabbitMQ consumer ended"),
                Err(_) => Vec::new(),
            },
            Reader::Redis {
                connection,
                keys,
                last,
                offsets,
                ..
            } => loop {
                let block = deadline
                    .saturating_duration_since(Instant::now())
                    .as_millis()
                    .clamp(1, 200) as u64;
                let reply: Option<redis::streams::StreamReadReply> = redis::cmd("XREAD")
                    .arg("COUNT")
                    .arg(1000)
                    .arg("BLOCK")
                    .arg(block)
                    .arg("STREAMS")
                    .arg(&*keys)
                    .arg(&*last)
                    .query_async(connection)
                    .await
                    .expect("XREAD");
                let mut batch = Vec::new();
                for stream in reply.map(|r| r.keys).unwrap_or_default() {
                    let index = keys
                        .iter()
                        .position(|k| *k == stream.key)
                        .expect("a key read");
                    for entry in stream.ids {
                        let offset = offsets.entry(stream.key.clone()).or_default();
                        *offset += 1;
                        last[index] = entry.id.clone();
                        batch.push(redis_received(&stream.key, *offset, &entry));
                    }
                }
                if !batch.is_empty() || Instant::now() >= deadline {
                    return batch;
                }
            },
        }
    }
}

impl Drop for SinkCollector {
    /// Removes the test's stream, exchange and dead-letter queue, or stream keys,
    /// over connections of its own on a runtime of its own: the test's runtime may
    /// be shutting down.
    fn drop(&mut self) {
        let cleanup = match &self.reader {
            Reader::Kafka { .. } => return,
            Reader::Nats { stream, .. } => {
                let stream = stream.clone();
                async move {
                    if let Ok(client) = async_nats::connect(service_url("NATS_URL")).await {
                        let _ = async_nats::jetstream::new(client)
                            .delete_stream(stream)
                            .await;
                    }
                }
                .boxed()
            }
            Reader::Rabbitmq {
                exchange,
                dead_letters,
                ..
            } => {
                let (exchange, queue) = (exchange.clone(), dead_letters.clone());
                async move {
                    let url = service_url("RABBITMQ_URL");
                    let Ok(connection) =
                        Connection::connect(&url, ConnectionProperties::default()).await
                    else {
                        return;
                    };
                    let Ok(channel) = connection.create_channel().await else {
                        return;
                    };
                    let _ = channel
                        .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
                        .await;
                    let _ = channel
                        .exchange_delete(exchange.as_str().into(), ExchangeDeleteOptions::default())
                        .await;
                    let _ = connection.close(0, "done".into()).await;
                }
                .boxed()
            }
            Reader::Redis { prefix, .. } => {
                let pattern = format!("{prefix}.*");
                async move {
                    let Ok(client) = redis::Client::open(service_url("REDIS_URL")) else {
                        return;
                    };
                    let Ok(mut connection) = client.get_multiplexed_async_connection().await else {
                        return;
                    };
                    let keys: Vec<String> = redis::cmd("KEYS")
                        .arg(&pattern)
                        .query_async(&mut connection)
                        .await
                        .unwrap_or_default();
                    if !keys.is_empty() {
                        let _ = redis::cmd("DEL")
                            .arg(&keys)
                            .query_async::<()>(&mut connection)
                            .await;
                    }
                }
                .boxed()
            }
        };
        let _ = std::thread::spawn(move || {
            if let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                runtime.block_on(async {
                    let _ = tokio::time::timeout(Duration::from_secs(5), cleanup).await;
                });
            }
        })
        .join();
    }
}

use futures::FutureExt as _;

fn json(body: &[u8]) -> Option<Value> {
    if body.is_empty() {
        return None;
    }
    Some(serde_json::from_slice(body).expect("the value is JSON"))
}

fn nats_received(message: &async_nats::jetstream::message::StreamMessage) -> Received {
    let mut headers = BTreeMap::new();
    let mut key = String::new();
    for (name, values) in message.headers.iter() {
        let value = values.first().map(ToString::to_string).unwrap_or_default();
        match name.as_ref() {
            "key" => key = value,
            other => {
                headers.insert(other.to_owned(), value);
            }
        }
    }
    Received {
        topic: message.subject.to_string(),
        partition: 0,
        offset: i64::try_from(message.sequence).expect("a sequence"),
        key,
        payload: json(&message.payload),
        headers,
    }
}

fn rabbitmq_received(delivery: &lapin::message::Delivery, offset: i64) -> Received {
    let mut headers = BTreeMap::new();
    let mut key = String::new();
    if let Some(table) = delivery.properties.headers() {
        for (name, value) in table.inner() {
            let text = match value {
                AMQPValue::LongString(s) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
                other => format!("{other:?}"),
            };
            if name.as_str() == "key" {
                key = text;
            } else {
                headers.insert(name.as_str().to_owned(), text);
            }
        }
    }
    // The message properties the sink sets, beside the headers.
    if let Some(mode) = delivery.properties.delivery_mode() {
        headers.insert("amqp-delivery-mode".to_owned(), mode.to_string());
    }
    if let Some(id) = delivery.properties.message_id() {
        headers.insert("amqp-message-id".to_owned(), id.as_str().to_owned());
    }
    Received {
        topic: delivery.routing_key.as_str().to_owned(),
        partition: 0,
        offset,
        key,
        payload: json(&delivery.data),
        headers,
    }
}

fn redis_received(stream: &str, offset: i64, entry: &redis::streams::StreamId) -> Received {
    let text = |field: &str| -> Option<Vec<u8>> {
        match entry.map.get(field)? {
            redis::Value::BulkString(bytes) => Some(bytes.clone()),
            redis::Value::SimpleString(s) => Some(s.clone().into_bytes()),
            other => panic!("field {field} is {other:?}"),
        }
    };
    let headers: BTreeMap<String, String> = text("headers")
        .map(|h| serde_json::from_slice(&h).expect("headers are a JSON object of strings"))
        .unwrap_or_default();
    Received {
        topic: stream.to_owned(),
        partition: 0,
        offset,
        key: String::from_utf8_lossy(&text("key").unwrap_or_default()).into_owned(),
        payload: text("value").and_then(|v| json(&v)),
        headers,
    }
}
