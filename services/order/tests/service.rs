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

/// A running saga on a definition version this code does not know (left by a
/// newer deploy that was rolled back) is named on `/health`, counted in
/// `/metrics` as unknown and as stuck, and not touched by the sweeper.
#[tokio::test]
async fn a_saga_on_an_unknown_definition_version_is_named_on_health_and_counted() {
    let db = TestDatabase::create().await;
    order_service::migrate(db.pool()).await.unwrap();
    let newer = Uuid::now_v7();
    sqlx::query(
        "INSERT INTO saga_state (id, saga_type, current_step, payload, status, deadline, definition_version) \
         VALUES ($1, 'order-placement', 'reserve-goods', '{}', 'STARTED', now() - interval '1 minute', 7)",
    )
    .bind(newer)
    .execute(db.pool())
    .await
    .unwrap();
    let mut config = Config::new(testing::common_args(&db, "order"));
    config.sweep_interval_ms = 100;
    let running = order_service::start(config).await.unwrap();
    let base = format!("http://{}", running.addr());
    testing::wait_healthy(&base, DEADLINE).await;

    let started = Instant::now();
    let body = loop {
        let (status, body) = get_json(&format!("{base}/health")).await;
        assert_eq!(status, StatusCode::OK, "one old saga is no outage: {body}");
        if body["warnings"]["versions"].is_string() {
            break body;
        }
        assert!(
            started.elapsed() < DEADLINE,
            "no warning after {DEADLINE:?}: {body}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let warning = body["warnings"]["versions"].as_str().unwrap();
    assert!(
        warning.starts_with("1 running saga(s) on a definition version this code cannot drive")
            && warning.contains(&format!(
                "{newer}: definition version 7 unknown (this code knows 1)"
            )),
        "{warning}"
    );
    // Not driven, so not skipped either: the sweeper leaves it alone.
    assert!(body["warnings"]["sweeper"].is_null(), "{body}");
    let metrics = metrics(&base).await;
    for line in [
        "saga_unknown_version{saga=\"order-placement\"} 1",
        "saga_stuck{saga_type=\"order-placement\",reason=\"unknown_version\"} 1",
        "saga_stuck{saga_type=\"order-placement\",reason=\"no_progress\"} 0",
    ] {
        assert!(metrics.contains(line), "{line} in {metrics}");
    }
    let (version, status): (i32, String) =
        sqlx::query_as("SELECT version, status FROM saga_state WHERE id = $1")
            .bind(newer)
            .fetch_one(db.pool())
            .await
            .unwrap();
    assert_eq!((version, status.as_str()), (0, "STARTED"));
    running.stop().await.unwrap();
}
