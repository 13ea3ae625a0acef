//! Test support for the shop's services (feature `testing`): a service's
//! configuration on a test database with topics and a consumer group nobody else
//! uses, waiting for it to be prepared, its HTTP API read as JSON, and a saga
//! command sent through the broker and its reply awaited in the outbox.

use std::time::{Duration, Instant};

use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use reqwest::StatusCode;
use saga_core::consumer::IncomingMessage;
use serde_json::Value;
use sqlx::PgPool;
use testkit::{settings, unique_name, TestDatabase};

use crate::CommonArgs;

/// The options every service has, for a test of service `name`: the test
/// database, the local broker, a port the system picks, a topic prefix and a
/// consumer group of its own, one partition per topic.
pub fn common_args(db: &TestDatabase, name: &str) -> CommonArgs {
    let mut common = CommonArgs::new(db.url(), settings().kafka_brokers.clone());
    common.listen = Some(std::net::SocketAddr::from(([127, 0, 0, 1], 0)));
    common.topic_prefix = format!("{}.", unique_name(name));
    common.group_id = Some(unique_name(name));
    common.topic_partitions = 1;
    common
}

/// Waits until `/health` of the service at `base` answers 200 with status `ok`;
/// panics with the last answer after `within`.
pub async fn wait_healthy(base: &str, within: Duration) {
    let started = Instant::now();
    loop {
        let (status, body) = get_json(&format!("{base}/health")).await;
        if status == StatusCode::OK {
            assert_eq!(body["status"], "ok", "{body}");
            return;
        }
        assert!(
            started.elapsed() < within,
            "not healthy after {within:?}: {body}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// GETs `url`: the status and the body as JSON.
pub async fn get_json(url: &str) -> (StatusCode, Value) {
    let response = reqwest::get(url).await.expect("the service answers");
    let status = response.status();
    (status, response.json().await.expect("a JSON body"))
}

/// The service's `/metrics` text.
pub async fn metrics(base: &str) -> String {
    reqwest::get(format!("{base}/metrics"))
        .await
        .expect("the service answers")
        .text()
        .await
        .expect("a text body")
}

/// Sends `message` (from [`saga_core::testing::SagaCommand`]) to its topic through
/// the local broker: its key, headers and payload.
pub async fn send(message: &IncomingMessage) {
    let producer: FutureProducer = testkit::producer_config().create().expect("a producer");
    let headers = message
        .headers
        .iter()
        .fold(OwnedHeaders::new(), |headers, (key, value)| {
            headers.insert(Header {
                key,
                value: Some(value),
            })
        });
    let payload = message.payload.as_ref().map(Value::to_string);
    let mut record = FutureRecord::to(&message.topic).headers(headers);
    if let Some(key) = &message.key {
        record = record.key(key);
    }
    if let Some(payload) = &payload {
        record = record.payload(payload);
    }
    producer
        .send(record, Duration::from_secs(10))
        .await
        .map_err(|(e, _)| e)
        .expect("the broker takes the record");
}

/// Waits for the first outbox row to topic `reply_to` and returns its type;
/// panics after `within`.
pub async fn wait_for_reply(pool: &PgPool, reply_to: &str, within: Duration) -> String {
    let mut replies = wait_for_replies(pool, reply_to, 1, within).await;
    replies.swap_remove(0).0
}

/// Waits until topic `reply_to` has at least `count` outbox rows and returns the
/// first `count` of them, oldest first, as (type, headers); panics after `within`.
pub async fn wait_for_replies(
    pool: &PgPool,
    reply_to: &str,
    count: usize,
    within: Duration,
) -> Vec<(String, Value)> {
    let started = Instant::now();
    loop {
        let mut replies: Vec<(String, Value)> =
            sqlx::query_as("SELECT type, headers FROM outbox WHERE aggregatetype = $1 ORDER BY id")
                .bind(reply_to)
                .fetch_all(pool)
                .await
                .expect("the outbox reads");
        if replies.len() >= count {
            replies.truncate(count);
            return replies;
        }
        assert!(
            started.elapsed() < within,
            "{} of {count} replies to {reply_to} after {within:?}",
            replies.len()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
