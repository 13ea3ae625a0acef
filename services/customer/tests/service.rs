//! The service as `start` runs it, on the real database and broker: its HTTP API,
//! `/health`, `/metrics`, and its consumer applying a command from the request topic.

use std::time::Duration;

use customer_service::commands::RESERVE_CREDIT;
use customer_service::{Config, ADA, BOB};
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
    let common = testing::common_args(db, "customer");
    let topics = Topics::new(common.topic_prefix.clone());
    let running = customer_service::start(Config::new(common)).await.unwrap();
    let base = format!("http://{}", running.addr());
    testing::wait_healthy(&base, DEADLINE).await;
    (running, base, topics)
}

#[tokio::test]
async fn the_api_shows_customers_and_answers_errors_in_json() {
    let db = TestDatabase::create().await;
    let (running, base, _) = start(&db).await;
    customer_service::seed(db.pool()).await.unwrap();
    customer_service::seed(db.pool()).await.unwrap();

    let (status, body) = get_json(&format!("{base}/customers/{ADA}")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        body,
        json!({
            "id": "00000000-0000-0000-0000-00000000c001",
            "name": "Ada",
            "creditLimit": 1000.0,
            "availableCredit": 1000.0,
        })
    );
    sqlx::query("UPDATE customers SET available_credit = 12.34 WHERE id = $1")
        .bind(BOB)
        .execute(db.pool())
        .await
        .unwrap();
    let (status, body) = get_json(&format!("{base}/customers/{BOB}")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        body,
        json!({ "id": BOB, "name": "Bob", "creditLimit": 50.0, "availableCredit": 12.34 })
    );

    let (status, body) = get_json(&format!("{base}/customers/{}", Uuid::now_v7())).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(body["error"], "not_found");
    let (status, body) = get_json(&format!("{base}/customers/42")).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(body["error"], "bad_request");

    let metrics = metrics(&base).await;
    assert!(
        metrics.contains("service_up{service=\"customer\"} 1"),
        "{metrics}"
    );
    running.stop().await.unwrap();
}

#[tokio::test]
async fn a_command_on_the_request_topic_is_applied_and_answered() {
    let db = TestDatabase::create().await;
    let (running, base, topics) = start(&db).await;
    customer_service::seed(db.pool()).await.unwrap();

    let (saga, order) = (Uuid::now_v7(), Uuid::now_v7());
    let reply_to = topics.order_reply();
    let command = SagaCommand::new(saga, "reserve-credit", RESERVE_CREDIT)
        .topic(&topics.customer_request())
        .reply_to(&reply_to)
        .payload(json!({ "orderId": order, "customerId": ADA, "amountCents": 2_500 }));
    testing::send(&command.message()).await;
    let reply = testing::wait_for_reply(db.pool(), &reply_to, 2 * DEADLINE).await;
    assert_eq!(reply, "CreditReserved");
    let (_, body) = get_json(&format!("{base}/customers/{ADA}")).await;
    assert_eq!(body["availableCredit"], json!(975.0));
    let metrics = metrics(&base).await;
    assert!(
        metrics.contains("type=\"ReserveCredit\",result=\"ok\"} 1"),
        "{metrics}"
    );
    running.stop().await.unwrap();
}

/// A retry after a refusal, through the broker and the service's barrier: the
/// orchestrator's second attempt runs again and reserves the credit that the
/// first was refused (the customer's limit was raised in between); a redelivery
/// of the first attempt changes nothing.
#[tokio::test]
async fn a_refused_command_retried_as_a_new_attempt_runs_again() {
    let db = TestDatabase::create().await;
    let (running, base, topics) = start(&db).await;
    customer_service::seed(db.pool()).await.unwrap();

    let (saga, order) = (Uuid::now_v7(), Uuid::now_v7());
    let reply_to = topics.order_reply();
    let attempt = |n: u32| {
        SagaCommand::new(saga, "reserve-credit", RESERVE_CREDIT)
            .topic(&topics.customer_request())
            .reply_to(&reply_to)
            .attempt(n)
            .payload(json!({ "orderId": order, "customerId": BOB, "amountCents": 6_000 }))
    };
    let first = attempt(1);
    testing::send(&first.message()).await;
    let replies = testing::wait_for_replies(db.pool(), &reply_to, 1, 2 * DEADLINE).await;
    assert_eq!(replies[0].0, "CreditLimitExceeded");

    sqlx::query("UPDATE customers SET credit_limit = 100, available_credit = 100 WHERE id = $1")
        .bind(BOB)
        .execute(db.pool())
        .await
        .unwrap();
    testing::send(&attempt(2).message()).await;
    let replies = testing::wait_for_replies(db.pool(), &reply_to, 2, 2 * DEADLINE).await;
    assert_eq!(replies[1].0, "CreditReserved", "{replies:?}");
    assert_eq!(replies[1].1.get("saga-replay"), None, "answered first hand");
    let (_, body) = get_json(&format!("{base}/customers/{BOB}")).await;
    assert_eq!(body["availableCredit"], json!(40.0));

    // The first attempt delivered again (a new record of it) is a duplicate.
    testing::send(&first.message()).await;
    let replies = testing::wait_for_replies(db.pool(), &reply_to, 3, 2 * DEADLINE).await;
    assert_eq!(replies[2].1["saga-replay"], "true", "{replies:?}");
    let (_, body) = get_json(&format!("{base}/customers/{BOB}")).await;
    assert_eq!(body["availableCredit"], json!(40.0));
    running.stop().await.unwrap();
}
