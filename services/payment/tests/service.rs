//! The service as `start` runs it, on the real database and broker: its HTTP API,
//! `/health`, `/metrics`, and its consumer applying a command from the request topic.

use std::time::Duration;

use payment_service::commands::CHARGE;
use payment_service::Config;
use reqwest::StatusCode;
use saga_core::testing::SagaCommand;
use serde_json::json;
use service_kit::testing::{self, get_json, metrics};
use service_kit::{Running, Topics};
use testkit::TestDatabase;
use uuid::Uuid;

/// How long the service may take to migrate, create its topics and join its group.
const DEADLINE: Duration = Duration::from_secs(30);

/// Starts the service on `db` with topics and a consumer group nobody else uses,
/// and waits until `/health` says it is prepared.
async fn start(db: &TestDatabase) -> (Running, String, Topics) {
    let common = testing::common_args(db, "payment");
    let topics = Topics::new(common.topic_prefix.clone());
    let running = payment_service::start(Config::new(common)).await.unwrap();
    let base = format!("http://{}", running.addr());
    testing::wait_healthy(&base, DEADLINE).await;
    (running, base, topics)
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

    let (status, body) = get_json(&format!("{base}/payments/{charged}")).await;
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
    let (status, body) = get_json(&format!("{base}/payments/{declined}")).await;
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

    let (status, body) = get_json(&format!("{base}/payments/{}", Uuid::now_v7())).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(body["error"], "not_found");
    let (status, body) = get_json(&format!("{base}/payments/0000")).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(body["error"], "bad_request");

    let metrics = metrics(&base).await;
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
    let reply_to = topics.order_reply();
    let command = SagaCommand::new(saga, "payment", CHARGE)
        .topic(&topics.payment_request())
        .reply_to(&reply_to)
        .payload(json!({
            "orderId": order,
            "customerId": Uuid::from_u128(0xc001),
            "amountCents": 1_999,
            "cardNumber": "4111111111111111",
        }));
    testing::send(&command.message()).await;
    let reply = testing::wait_for_reply(db.pool(), &reply_to, 2 * DEADLINE).await;
    assert_eq!(reply, "PaymentCharged");
    let (_, body) = get_json(&format!("{base}/payments/{order}")).await;
    assert_eq!(body["status"], "CHARGED");
    assert_eq!(body["amount"], json!(19.99));
    let metrics = metrics(&base).await;
    assert!(
        metrics.contains("type=\"Charge\",result=\"ok\"} 1"),
        "{metrics}"
    );
    running.stop().await.unwrap();
}

#[tokio::test]
async fn the_vault_tokenises_cards_over_http() {
    let db = TestDatabase::create().await;
    let (running, base, _) = start(&db).await;
    let http = reqwest::Client::new();
    let tokenise = |card: &'static str| {
        http.post(format!("{base}/cards"))
            .json(&json!({ "cardNumber": card }))
            .send()
    };
    let first = tokenise("4111 1111 1111 1111").await.unwrap();
    assert_eq!(first.status(), StatusCode::CREATED);
    let first: serde_json::Value = first.json().await.unwrap();
    assert_eq!(first["cardLast4"], "1111");
    let token = first["cardToken"].as_str().unwrap().to_owned();
    assert!(token.starts_with("card_1111_"), "{token}");

    let again = tokenise("4111-1111-1111-1111").await.unwrap();
    assert_eq!(again.status(), StatusCode::OK, "the card had a token");
    let again: serde_json::Value = again.json().await.unwrap();
    assert_eq!(again["cardToken"], token.as_str());

    let bad = tokenise("4111").await.unwrap();
    assert_eq!(bad.status(), StatusCode::UNPROCESSABLE_ENTITY);
    let bad: serde_json::Value = bad.json().await.unwrap();
    assert_eq!(bad["error"], "invalid");

    let (status, body) = get_json(&format!("{base}/cards/{token}")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["cardLast4"], "1111");
    let (status, _) = get_json(&format!("{base}/cards/card_1111_{}", "0".repeat(32))).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    running.stop().await.unwrap();
}
