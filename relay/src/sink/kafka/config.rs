//! The Kafka sink's configuration and the librdkafka settings the delivery
//! contract rests on.

use std::collections::BTreeMap;
use std::fmt;

use rdkafka::ClientConfig;

/// Records sent to the broker and not yet acknowledged, at most. Enough for
/// 100 k events/s at 20 ms per acknowledgement; a larger window bought no
/// throughput against a local broker and cost memory (BENCHMARKS.md).
pub const DEFAULT_MAX_IN_FLIGHT: usize = 2_000;
/// Partitions of a topic the relay creates.
pub const DEFAULT_TOPIC_PARTITIONS: i32 = 1;
/// Replication factor of a topic the relay creates; -1 takes the broker's default.
pub const DEFAULT_TOPIC_REPLICATION_FACTOR: i32 = -1;
/// Bytes the producer may buffer, at most, unless configured otherwise.
pub const DEFAULT_QUEUE_KBYTES: u32 = 32 * 1024;
/// librdkafka's default `message.max.bytes`: the largest record it sends.
pub const DEFAULT_MESSAGE_MAX_BYTES: usize = 1_000_000;

/// librdkafka options the relay sets itself because its guarantees rest on them.
pub const PROTECTED_KAFKA_OPTIONS: &[&str] = &[
    "bootstrap.servers",
    "enable.idempotence",
    "acks",
    "request.required.acks",
    "message.timeout.ms",
    "delivery.timeout.ms",
    "partitioner",
    "max.in.flight.requests.per.connection",
    "max.in.flight",
];

/// Where the relay writes to.
#[derive(Clone)]
pub struct KafkaConfig {
    pub brokers: String,
    /// librdkafka options passed through; values may be secrets (`sasl.password`,
    /// `ssl.key.password`), so Debug prints only the keys.
    pub options: BTreeMap<String, String>,
    pub max_in_flight: usize,
    pub create_topics: bool,
    pub topic_partitions: i32,
    pub topic_replication_factor: i32,
}

impl Default for KafkaConfig {
    fn default() -> KafkaConfig {
        KafkaConfig {
            brokers: String::new(),
            options: BTreeMap::new(),
            max_in_flight: DEFAULT_MAX_IN_FLIGHT,
            create_topics: true,
            topic_partitions: DEFAULT_TOPIC_PARTITIONS,
            topic_replication_factor: DEFAULT_TOPIC_REPLICATION_FACTOR,
        }
    }
}

impl fmt::Debug for KafkaConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KafkaConfig")
            .field("brokers", &self.brokers)
            .field("options", &self.options.keys().collect::<Vec<_>>())
            .field("max_in_flight", &self.max_in_flight)
            .field("create_topics", &self.create_topics)
            .field("topic_partitions", &self.topic_partitions)
            .field("topic_replication_factor", &self.topic_replication_factor)
            .finish()
    }
}

impl KafkaConfig {
    /// Checks what types alone do not rule out; `Err((option, reason))`.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        if self.brokers.trim().is_empty() {
            return Err(("kafka.brokers", "the list is empty".to_owned()));
        }
        if self.max_in_flight == 0 {
            return Err(("max_in_flight", "must be above 0".to_owned()));
        }
        if self.topic_partitions < 1 {
            return Err(("topic_partitions", "must be 1 or more".to_owned()));
        }
        if self.topic_replication_factor == 0 || self.topic_replication_factor < -1 {
            return Err((
                "topic_replication_factor",
                "must be 1 or more, or -1 for the broker's default".to_owned(),
            ));
        }
        if let Some(key) = self
            .options
            .keys()
            .find(|k| PROTECTED_KAFKA_OPTIONS.contains(&k.as_str()))
        {
            return Err((
                "kafka option",
                format!(
                    "{key} is set by the relay because its delivery guarantees rest on it \
                     (set the brokers with kafka.brokers)"
                ),
            ));
        }
        for key in ["message.max.bytes", "queue.buffering.max.kbytes"] {
            if let Some(value) = self.options.get(key) {
                if value.parse::<usize>().is_err() {
                    return Err(("kafka option", format!("{key}={value} is not a number")));
                }
            }
        }
        // A record larger than the producer queue could never be queued: it would
        // wait for room for ever instead of being refused.
        let queue_bytes = self.queue_kbytes() * 1024;
        if self.message_max_bytes() > queue_bytes {
            return Err((
                "kafka option",
                format!(
                    "message.max.bytes ({}) is larger than the producer queue \
                     (queue.buffering.max.kbytes = {} KiB): raise the queue or lower the record limit",
                    self.message_max_bytes(),
                    self.queue_kbytes()
                ),
            ));
        }
        Ok(())
    }

    /// The producer queue's size in KiB (`queue.buffering.max.kbytes`).
    pub fn queue_kbytes(&self) -> usize {
        self.options
            .get("queue.buffering.max.kbytes")
            .and_then(|v| v.parse().ok())
            .unwrap_or(DEFAULT_QUEUE_KBYTES as usize)
    }

    /// The largest record the producer sends (`message.max.bytes`).
    pub fn message_max_bytes(&self) -> usize {
        self.options
            .get("message.max.bytes")
            .and_then(|v| v.parse().ok())
            .unwrap_or(DEFAULT_MESSAGE_MAX_BYTES)
    }
}

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
    // Wait a millisecond for more records before sending a batch. librdkafka's 5 ms
    // added 5 ms to every record at low and middle rates, and every hop of a saga
    // pays it; 0 sends every record in a request of its own until the requests in
    // flight back up, which halved the throughput of one-row transactions and put
    // the p99 at 5 k events/s near 90 ms. 1 ms kept the throughput of 5 ms and
    // took the p99 at 5 k events/s from 9.6 to 4.3 ms (BENCHMARKS.md).
    options.insert("linger.ms", "1".to_owned());
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delivery_options_cannot_be_overridden() {
        let mut config = KafkaConfig {
            brokers: "k:1".to_owned(),
            ..KafkaConfig::default()
        };
        config
            .options
            .insert("linger.ms".to_owned(), "50".to_owned());
        // Validation rejects these; the producer config must still keep the contract.
        config.options.insert("acks".to_owned(), "1".to_owned());
        config
            .options
            .insert("message.timeout.ms".to_owned(), "1000".to_owned());
        assert!(config.validate().is_err());
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
    fn debug_prints_option_keys_not_values() {
        let mut config = KafkaConfig::default();
        config
            .options
            .insert("sasl.password".to_owned(), "hunter2".to_owned());
        let printed = format!("{config:?}");
        assert!(printed.contains("sasl.password"), "{printed}");
        assert!(!printed.contains("hunter2"), "{printed}");
    }

    #[test]
    fn a_record_limit_above_the_producer_queue_is_refused() {
        let mut config = KafkaConfig {
            brokers: "k:1".to_owned(),
            ..KafkaConfig::default()
        };
        assert_eq!(config.validate(), Ok(()));
        config
            .options
            .insert("message.max.bytes".to_owned(), "64000000".to_owned());
        let (option, reason) = config.validate().unwrap_err();
        assert_eq!(option, "kafka option");
        assert!(reason.contains("queue.buffering.max.kbytes"), "{reason}");
        config
            .options
            .insert("queue.buffering.max.kbytes".to_owned(), "65536".to_owned());
        assert_eq!(config.validate(), Ok(()));
    }

    #[test]
    fn message_max_bytes_comes_from_the_options() {
        let mut config = KafkaConfig::default();
        assert_eq!(config.message_max_bytes(), DEFAULT_MESSAGE_MAX_BYTES);
        config
            .options
            .insert("message.max.bytes".to_owned(), "20000".to_owned());
        assert_eq!(config.message_max_bytes(), 20_000);
    }
}
