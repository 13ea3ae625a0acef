//! The service as `start` runs it, on the real database and broker: its HTTP API,
//! `/health`, `/metrics`, and its consumer applying a command from the request topic.

use std::time::Duration;

use inventory_service::commands::RESERVE_GOODS;
use inventory_service::{Config, GADGET, WIDGET};
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
    let common = testing::common_args(db, "inventory");
    let topics = Topics::new(common.topic_prefix.clone());
    let running = inventory_service::start(Config::new(common)).await.unwrap();
    let base = format!("http://{}", running.addr());
    testing::wait_healthy(&base, DEADLINE).await;
    (running, base, topics)
}

#[tokio::test]
async fn the_api_shows_goods_and_answers_errors_in_json() {
    let db = TestDatabase::create().await;
    let (running, base, _) = start(&db).await;
    inventory_service::seed(db.pool()).await.unwrap();
    inventory_service::seed(db.pool()).await.unwrap();

    let (status, body) = get_json(&format!("{base}/goods/{WIDGET}")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        body,
        json!({ "id": "00000000-0000-0000-0000-00000000a001", "name": "widget", "stock": 100 })
    );
    let (status, body) = get_json(&format!("{base}/goods/{GADGET}")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body, json!({ "id": GADGET, "name": "gadget", "stock": 1 }));

    let (status, body) = get_json(&format!("{base}/goods/{}", Uuid::now_v7())).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(body["error"], "not_found");
    let (status, body) = get_json(&format!("{base}/goods/not-a-uuid")).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(body["error"], "bad_request");

    let metrics = metrics(&base).await;
    assert!(
        metrics.contains("service_up{service=\"inventory\"} 1"),
        "{metrics}"
    );
    running.stop().await.unwrap();
}

#[tokio::test]
async fn a_command_on_the_request_topic_is_applied_and_answered() {
    let db = TestDatabase::create().await;
    let (running, base, topics) = start(&db).await;
    inventory_service::seed(db.pool()).await.unwrap();

    let (saga, order) = (Uuid::now_v7(), Uuid::now_v7());
    let reply_to = topics.order_reply();
    let command = SagaCommand::new(saga, "reserve-goods", RESERVE_GOODS)
        .topic(&topics.inventory_request())
        .reply_to(&reply_to)
        .payload(json!({ "orderId": order, "goodsId": WIDGET, "quantity": 7 }));
    testing::send(&command.message()).await;
    let reply = testing::wait_for_reply(db.pool(), &reply_to, 2 * DEADLINE).await;
    assert_eq!(reply, "GoodsReserved");
    let (_, body) = get_json(&format!("{base}/goods/{WIDGET}")).await;
    assert_eq!(body["stock"], 93);
    let metrics = metrics(&base).await;
    assert!(
        metrics.contains("type=\"ReserveGoods\",result=\"ok\"} 1"),
        "{metrics}"
    );
    running.stop().await.unwrap();
}
