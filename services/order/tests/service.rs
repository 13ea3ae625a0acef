//! The order service as `start` runs it, on the real database and broker: a saga
//! it cannot handle is reported on `/health` and in `/metrics`, and does not take
//! the service out of service.

use std::time::{Duration, Instant};

use order_service::Config;
use reqwest::StatusCode;
use service_kit::testing::{self, get_json, metrics};
use testkit::TestDatabase;
use uuid::Uuid;

/// How long the service may take to migrate, create its topics and join its group.
const DEADLINE: Duration = Duration::from_secs(30);

#[tokio::test]
async fn a_saga_the_sweeper_cannot_handle_is_named_on_health_and_counted() {
    let db = TestDatabase::create().await;
    let mut config = Config::new(testing::common_args(&db, "order"));
    config.sweep_interval_ms = 100;
    let running = order_service::start(config).await.unwrap();
    let base = format!("http://{}", running.addr());
    testing::wait_healthy(&base, DEADLINE).await;

    // A saga whose state no longer fits the definition, with a passed deadline.
    let bad = Uuid::now_v7();
    sqlx::query(
        "INSERT INTO saga_state (id, saga_type, current_step, payload, status, deadline) \
         VALUES ($1, 'order-placement', 'reserve-goods', '\"not an order\"', 'STARTED', now() - interval '1 minute')",
    )
    .bind(bad)
    .execute(db.pool())
    .await
    .unwrap();

    let started = Instant::now();
    let body = loop {
        let (status, body) = get_json(&format!("{base}/health")).await;
        assert_eq!(status, StatusCode::OK, "one bad saga is no outage: {body}");
        if body["warnings"]["sweeper"].is_string() {
            break body;
        }
        assert!(
            started.elapsed() < DEADLINE,
            "no warning after {DEADLINE:?}: {body}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let warning = body["warnings"]["sweeper"].as_str().unwrap();
    assert!(
        warning.starts_with("1 saga(s) skipped") && warning.contains(&bad.to_string()),
        "{warning}"
    );
    assert_eq!(body["status"], "ok");
    let metrics = metrics(&base).await;
    assert!(
        metrics.contains("saga_skipped{saga=\"order-placement\"} 1"),
        "{metrics}"
    );
    running.stop().await.unwrap();
}
