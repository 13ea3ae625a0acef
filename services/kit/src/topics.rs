//! The shop's topic names, and creating the topics a service consumes (brokers that
//! do not create topics on first use need it).

use std::collections::BTreeMap;
use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::error::KafkaError;
use rdkafka::types::RDKafkaErrorCode;

/// Topic names, with an optional prefix put before each.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Topics {
    prefix: String,
}

impl Topics {
    pub fn new(prefix: impl Into<String>) -> Topics {
        Topics {
            prefix: prefix.into(),
        }
    }

    fn name(&self, base: &str) -> String {
        format!("{}{base}", self.prefix)
    }

    /// Commands to the inventory service.
    pub fn inventory_request(&self) -> String {
        self.name("inventory.request")
    }

    /// Commands to the customer service.
    pub fn customer_request(&self) -> String {
        self.name("customer.request")
    }

    /// Commands to the payment service.
    pub fn payment_request(&self) -> String {
        self.name("payment.request")
    }

    /// Every participant's replies to the order service.
    pub fn order_reply(&self) -> String {
        self.name("order.reply")
    }

    /// All four.
    pub fn all(&self) -> [String; 4] {
        [
            self.inventory_request(),
            self.customer_request(),
            self.payment_request(),
            self.order_reply(),
        ]
    }
}

/// Creates each of `topics` that does not exist, with `partitions` partitions and
/// the broker's default replication factor.
pub async fn ensure(
    brokers: &str,
    options: &BTreeMap<String, String>,
    topics: &[String],
    partitions: i32,
) -> Result<(), KafkaError> {
    let mut config = ClientConfig::new();
    // An admin client is a producer underneath: consumer-only options would only
    // make it warn.
    saga_core::consumer::scope::set_options(
        &mut config,
        saga_core::consumer::scope::Kind::Producer,
        options,
    );
    config.set("bootstrap.servers", brokers);
    let admin: AdminClient<DefaultClientContext> = config.create()?;
    let new_topics: Vec<NewTopic<'_>> = topics
        .iter()
        .map(|t| NewTopic::new(t, partitions, TopicReplication::Fixed(-1)))
        .collect();
    let admin_options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    for result in admin.create_topics(&new_topics, &admin_options).await? {
        match result {
            Ok(topic) => tracing::info!(topic, partitions, "created topic"),
            Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, code)) => {
                tracing::error!(topic, %code, "cannot create topic");
                return Err(KafkaError::AdminOp(code));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixed_names() {
        let topics = Topics::new("t1.");
        assert_eq!(topics.order_reply(), "t1.order.reply");
        assert_eq!(
            Topics::default().all(),
            [
                "inventory.request",
                "customer.request",
                "payment.request",
                "order.reply"
            ]
        );
    }
}
