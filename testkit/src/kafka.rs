//! Topics and client settings for the test broker.

use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::ClientConfig;

use crate::settings::settings;

/// How long topic creation may take before a test fails.
const TOPIC_TIMEOUT: Duration = Duration::from_secs(30);

/// A client configuration for `brokers`, or the test broker when `None`.
fn base_config(brokers: Option<&str>) -> ClientConfig {
    let mut config = ClientConfig::new();
    let brokers = brokers.unwrap_or_else(|| &settings().kafka_brokers);
    config.set("bootstrap.servers", brokers);
    config
}

/// A producer configuration that keeps the project's delivery contract: idempotent,
/// acknowledged by all in-sync replicas, Java-compatible key partitioning.
pub fn producer_config() -> ClientConfig {
    producer_config_on(None)
}

/// [`producer_config`] for the brokers `brokers` (e.g. a [`crate::PrivateBroker`]).
pub fn producer_config_on(brokers: Option<&str>) -> ClientConfig {
    let mut config = base_config(brokers);
    config
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("partitioner", "murmur2_random")
        .set("linger.ms", "5");
    config
}

/// A consumer configuration for `group`: reads from the beginning, commits only
/// when told to.
pub fn consumer_config(group: &str) -> ClientConfig {
    consumer_config_on(None, group)
}

/// [`consumer_config`] for the brokers `brokers` (e.g. a [`crate::PrivateBroker`]).
pub fn consumer_config_on(brokers: Option<&str>, group: &str) -> ClientConfig {
    let mut config = base_config(brokers);
    config
        .set("group.id", group)
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false");
    config
}

/// Creates `topic` with `partitions` partitions (replication factor 1) and waits until
/// the broker's metadata shows all of them.
///
/// # Panics
/// When the broker refuses or the topic does not appear in time.
pub async fn create_topic(topic: &str, partitions: i32) {
    create_topic_on(None, topic, partitions).await;
}

/// [`create_topic`] on the brokers `brokers`.
pub async fn create_topic_on(brokers: Option<&str>, topic: &str, partitions: i32) {
    let admin: AdminClient<DefaultClientContext> = base_config(brokers)
        .create()
        .expect("admin client configuration is valid");
    let new_topic = NewTopic::new(topic, partitions, TopicReplication::Fixed(1));
    let options = AdminOptions::new().operation_timeout(Some(TOPIC_TIMEOUT));
    let results = admin
        .create_topics([&new_topic], &options)
        .await
        .unwrap_or_else(|e| panic!("creating topic {topic} failed: {e}"));
    for result in results {
        if let Err((name, code)) = result {
            panic!("the broker refused to create topic {name}: {code}");
        }
    }
    wait_for_topic_on(brokers, topic, partitions).await;
}

/// Waits until the broker's metadata lists `topic` with `partitions` partitions.
///
/// # Panics
/// When that does not happen within the topic timeout.
pub async fn wait_for_topic(topic: &str, partitions: i32) {
    wait_for_topic_on(None, topic, partitions).await;
}

/// [`wait_for_topic`] on the brokers `brokers`.
pub async fn wait_for_topic_on(brokers: Option<&str>, topic: &str, partitions: i32) {
    let topic = topic.to_owned();
    let config = base_config(brokers);
    tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer = config
            .create()
            .expect("metadata client configuration is valid");
        let deadline = std::time::Instant::now() + TOPIC_TIMEOUT;
        loop {
            let seen = consumer
                .fetch_metadata(Some(&topic), Duration::from_secs(5))
                .ok()
                .and_then(|m| {
                    m.topics()
                        .iter()
                        .find(|t| t.name() == topic && t.error().is_none())
                        .map(|t| t.partitions().len())
                });
            if seen == Some(usize::try_from(partitions).unwrap_or(0)) {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "topic {topic} did not show {partitions} partitions within {TOPIC_TIMEOUT:?} (saw {seen:?})"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    })
    .await
    .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()));
}
