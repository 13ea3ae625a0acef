//! Which client a pass-through librdkafka option is for.
//!
//! The consumer's pass-through options (`KAFKA_OPTIONS` in the services) configure
//! several librdkafka clients: the consumer, the dead-letter producer, and admin
//! clients that create topics (producers underneath). librdkafka
//! warns at every start about a consumer property given to a producer, and the
//! other way round, and then ignores it; so each client gets the options of its own
//! kind and those of both, never the other kind's. The lists are the properties
//! marked `C` and `P` in the `CONFIGURATION.md` of the librdkafka this crate links
//! (2.12); an option in neither list goes to every client.

use rdkafka::ClientConfig;

/// Properties only a consumer reads.
const CONSUMER_ONLY: &[&str] = &[
    "group.id",
    "group.instance.id",
    "partition.assignment.strategy",
    "session.timeout.ms",
    "heartbeat.interval.ms",
    "group.protocol.type",
    "group.protocol",
    "group.remote.assignor",
    "coordinator.query.interval.ms",
    "max.poll.interval.ms",
    "enable.auto.commit",
    "auto.commit.interval.ms",
    "enable.auto.offset.store",
    "queued.min.messages",
    "queued.max.messages.kbytes",
    "fetch.wait.max.ms",
    "fetch.queue.backoff.ms",
    "fetch.message.max.bytes",
    "max.partition.fetch.bytes",
    "fetch.max.bytes",
    "fetch.min.bytes",
    "fetch.error.backoff.ms",
    "offset.store.method",
    "isolation.level",
    "consume_cb",
    "rebalance_cb",
    "offset_commit_cb",
    "enable.partition.eof",
    "check.crcs",
    "auto.commit.enable",
    "auto.offset.reset",
    "offset.store.path",
    "offset.store.sync.interval.ms",
    "consume.callback.max.messages",
];

/// Properties only a producer reads.
const PRODUCER_ONLY: &[&str] = &[
    "transactional.id",
    "transaction.timeout.ms",
    "enable.idempotence",
    "enable.gapless.guarantee",
    "queue.buffering.max.messages",
    "queue.buffering.max.kbytes",
    "queue.buffering.max.ms",
    "linger.ms",
    "message.send.max.retries",
    "retries",
    "queue.buffering.backpressure.threshold",
    "compression.codec",
    "compression.type",
    "batch.num.messages",
    "batch.size",
    "delivery.report.only.error",
    "dr_cb",
    "dr_msg_cb",
    "sticky.partitioning.linger.ms",
    "request.required.acks",
    "acks",
    "request.timeout.ms",
    "message.timeout.ms",
    "delivery.timeout.ms",
    "queuing.strategy",
    "produce.offset.report",
    "partitioner",
    "partitioner_cb",
    "msg_order_cmp",
    "compression.level",
];

/// The kind of librdkafka client an option is given to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Consumer,
    /// A producer, or the admin client (a producer underneath).
    Producer,
}

/// Sets on `client` every option of `options` that a client of `kind` reads.
pub fn set_options<'a>(
    client: &mut ClientConfig,
    kind: Kind,
    options: impl IntoIterator<Item = (&'a String, &'a String)>,
) {
    let other = match kind {
        Kind::Consumer => PRODUCER_ONLY,
        Kind::Producer => CONSUMER_ONLY,
    };
    for (key, value) in options {
        if !other.contains(&key.as_str()) {
            client.set(key, value);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn options() -> BTreeMap<String, String> {
        [
            ("session.timeout.ms", "6000"),
            ("group.instance.id", "order-1"),
            ("linger.ms", "5"),
            ("security.protocol", "ssl"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
    }

    #[test]
    fn each_client_gets_its_own_kind_and_the_common_options() {
        let options = options();
        let mut consumer = ClientConfig::new();
        set_options(&mut consumer, Kind::Consumer, &options);
        assert_eq!(consumer.get("session.timeout.ms"), Some("6000"));
        assert_eq!(consumer.get("group.instance.id"), Some("order-1"));
        assert_eq!(consumer.get("security.protocol"), Some("ssl"));
        assert_eq!(consumer.get("linger.ms"), None);

        let mut producer = ClientConfig::new();
        set_options(&mut producer, Kind::Producer, &options);
        assert_eq!(producer.get("linger.ms"), Some("5"));
        assert_eq!(producer.get("security.protocol"), Some("ssl"));
        assert_eq!(producer.get("session.timeout.ms"), None);
        assert_eq!(producer.get("group.instance.id"), None);
    }

    #[test]
    fn no_property_is_of_both_kinds() {
        for key in CONSUMER_ONLY {
            assert!(!PRODUCER_ONLY.contains(key), "{key}");
        }
    }
}
