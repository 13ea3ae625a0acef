//! The service as `start` runs it, on the real database and broker: its HTTP API,
//! `/health`, `/metrics`, and its consumer applying a command from the request topic.

use std::time::{Duration, Instant};

use payment_service::commands::CHARGE;
use payment_service::Config;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use reqwest::StatusCode;
use serde_json::{json, Value};
use service_kit::{CommonArgs, Running, Topics};
use testkit::{settings, unique_name, TestDatabase};
use uuid::Uuid;

/// How long the service may take to migrate, create its topics and join its group.
const DEADLINE: Duration = Duration::from_secs(30);

/// Starts the service on `db` with topics and a consumer group nobody else uses,
/// and waits until `/health` says it is prepared.
async fn start(db: &TestDatabase) -> (Running, String, Topics) {
    let mut common = CommonArgs::new(db.url(), settings().kafka_brokers.clone());
    common.listen = Some("127.0.0.1:0".parse().unwrap());
    common.topic_prefix = format!("{}.", unique_name("payment"));
    common.group_id = Some(unique_name("payment"));
    common.topic_partitions = 1;
    let topics = Topics::new(common.topic_prefix.clone());
    let running = payment_service::start(Config::new(common)).await.unwrap();
    let base = format!("http://{}", running.addr());
    let started = Instant::now();
    loop {
        let health = reqwest::get(format!("{base}/health")).await.unwrap();
        if health.status() == StatusCode::OK {
            assert_eq!(health.json::<Value>().await.unwrap()["status"], "ok");
            break;
        }
        assert!(
            started.elapsed() < DEADLINE,
            "not healthy after {DEADLINE:?}: {}",
            health.text().await.unwrap()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    (running, base, topics)
}

async fn get(url: String) -> (StatusCode, Value) {
    let response = reqwest::get(url).await.unwrap();
    let status = response.status();
    (status, response.json().await.unwrap())
}

#[tokio::test]
async fn the_api_shows_payments_and_answers_errors_in_json() {
    let db = TestDatabase::create().await;
    let (running, base, _) = start(&db).await;
    payment_service::seed(db.pool()).await.unwrap();
    let (charged, declined) = (Uuid::now_v7(), Uuid::now_v7());
    sqlx::query(
        "INSERT INTO payments (order_id, amount, card_last4, status, reason) VALUES \
         ($1, 49.90, '1234', 'CHARGED', NULL), ($2, 10, '9999', 'DECLINED', 'card declined')",
    )
    .bind(charged)
    .bind(declined)
    .execute(db.pool())
    .await
    .unwrap();

    let (status, body) = get(format!("{base}/payments/{charged}")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        body,
        json!({
            "orderId": charged,
            "amount": 49.9,
            "cardLast4": "1234",
            "status": "CHARGED",
            "reason": null,
        })
    );
    let (status, body) = get(format!("{base}/payments/{declined}")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        body,
        json!({
            "orderId": declined,
            "amount": 10.0,
            "cardLast4": "9999",
            "status": "DECLINED",
            "reason": "card declined",
        })
    );

    let (status, body) = get(format!("{base}/payments/{}", Uuid::now_v7())).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(body["error"], "not_found");
    let (status, body) = get(format!("{base}/payments/0000")).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(body["error"], "bad_request");

    let metrics = reqwest::get(format!("{base}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("service_up{service=\"payment\"} 1"),
        "{metrics}"
    );
    running.stop().await.unwrap();
}

#[tokio::test]
async fn a_command_on_the_request_topic_is_applied_and_answered() {
    let db = TestDatabase::create().await;
    let (running, base, topics) = start(&db).await;
    payment_service::seed(db.pool()).await.unwrap();

    let (saga, order) = (Uuid::now_v7(), Uuid::now_v7());
    let (id, request_id, saga_text) = (
        Uuid::now_v7().to_string(),
        Uuid::now_v7().to_string(),
        saga.to_string(),
    );
    let reply_to = topics.order_reply();
    let headers = [
        ("id", id.as_str()),
        ("type", CHARGE),
        ("saga-id", saga_text.as_str()),
        ("saga-step", "payment"),
        ("request-id", request_id.as_str()),
        ("reply-to", reply_to.as_str()),
        ("compensation", "false"),
    ]
    .into_iter()
    .fold(OwnedHeaders::new(), |headers, (key, value)| {
        headers.insert(Header {
            key,
            value: Some(value),
        })
    });
    let payload = json!({
        "orderId": order,
        "customerId": Uuid::from_u128(0xc001),
        "amountCents": 1_999,
        "cardNumber": "4111111111111111",
    })
    .to_string();
    let producer: FutureProducer = testkit::producer_config().create().unwrap();
    let request = topics.payment_request();
    producer
        .send(
            FutureRecord::to(&request)
                .key(&saga_text)
                .payload(&payload)
                .headers(headers),
            Duration::from_secs(10),
        )
        .await
        .map_err(|(e, _)| e)
        .unwrap();

    let started = Instant::now();
    let reply: String = loop {
        let reply: Option<String> =
            sqlx::query_scalar("SELECT type FROM outbox WHERE aggregatetype = $1")
                .bind(&reply_to)
                .fetch_optional(db.pool())
                .await
                .unwrap();
        if let Some(reply) = reply {
            break reply;
        }
        assert!(
            started.elapsed() < 2 * DEADLINE,
            "the command was not applied"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(reply, "PaymentCharged");
    let (_, body) = get(format!("{base}/payments/{order}")).await;
    assert_eq!(body["status"], "CHARGED");
    assert_eq!(body["amount"], json!(19.99));
    let metrics = reqwest::get(format!("{base}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("type=\"Charge\",result=\"ok\"} 1"),
        "{metrics}"
    );
    running.stop().await.unwrap();
}
