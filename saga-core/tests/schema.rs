//! The shared migrations create what the design promises, and a service's migrations
//! live beside them in one history.

use saga_core::schema::{self, SchemaError};
use saga_core::status::SagaStatus;
use sqlx::migrate::Migrator;
use testkit::TestDatabase;

static NO_SERVICE: Migrator = Migrator::DEFAULT;

#[tokio::test]
async fn shared_tables_are_created_once() {
    let db = TestDatabase::create().await;
    schema::migrate(db.pool(), &NO_SERVICE).await.unwrap();
    // Applying again is a no-op, as on every service restart.
    schema::migrate(db.pool(), &NO_SERVICE).await.unwrap();

    let columns: Vec<(String, String)> = sqlx::query_as(
        "SELECT table_name::text, column_name::text FROM information_schema.columns \
         WHERE table_schema = 'public' AND table_name IN ('outbox', 'processed_messages', 'saga_state') \
         ORDER BY table_name, ordinal_position",
    )
    .fetch_all(db.pool())
    .await
    .unwrap();
    let of = |table: &str| -> Vec<&str> {
        columns
            .iter()
            .filter(|(t, _)| t == table)
            .map(|(_, c)| c.as_str())
            .collect()
    };
    assert_eq!(
        of("outbox"),
        [
            "id",
            "aggregatetype",
            "aggregateid",
            "type",
            "payload",
            "headers",
            "created_at"
        ]
    );
    assert_eq!(
        of("processed_messages"),
        ["consumer", "message_id", "processed_at"]
    );
    assert_eq!(
        of("saga_state"),
        [
            "id",
            "saga_type",
            "current_step",
            "payload",
            "status",
            "step_status",
            "version",
            "created_at",
            "updated_at",
            "deadline",
            "definition_version",
            "traceparent",
            "tracestate"
        ]
    );
}

/// Sagas stored before definitions had versions ran the only definition there
/// was: they read as version 1, and no saga is on version 0 or below.
#[tokio::test]
async fn every_saga_has_a_positive_definition_version() {
    let db = TestDatabase::create().await;
    schema::migrate(db.pool(), &NO_SERVICE).await.unwrap();
    let version: i32 = sqlx::query_scalar(
        "INSERT INTO saga_state (id, saga_type, payload, status) \
         VALUES (gen_random_uuid(), 'test', '{}', 'STARTED') RETURNING definition_version",
    )
    .fetch_one(db.pool())
    .await
    .unwrap();
    assert_eq!(version, 1);
    let zero = sqlx::query(
        "INSERT INTO saga_state (id, saga_type, payload, status, definition_version) \
         VALUES (gen_random_uuid(), 'test', '{}', 'STARTED', 0)",
    )
    .execute(db.pool())
    .await;
    assert!(zero.is_err(), "a saga on version 0 was stored");
}

#[tokio::test]
async fn saga_status_texts_match_the_table_constraint() {
    let db = TestDatabase::create().await;
    schema::migrate(db.pool(), &NO_SERVICE).await.unwrap();
    let insert = "INSERT INTO saga_state (id, saga_type, payload, status) \
                  VALUES (gen_random_uuid(), 'test', '{}', $1)";
    for status in SagaStatus::ALL {
        sqlx::query(insert)
            .bind(status.as_str())
            .execute(db.pool())
            .await
            .unwrap_or_else(|e| panic!("{status} rejected: {e}"));
    }
    let rejected = sqlx::query(insert)
        .bind("SUCCEEDED")
        .execute(db.pool())
        .await;
    assert!(rejected.is_err(), "a status outside the enum was stored");
}

#[tokio::test]
async fn the_journal_keeps_one_row_per_consumer_and_message() {
    let db = TestDatabase::create().await;
    schema::migrate(db.pool(), &NO_SERVICE).await.unwrap();
    let id = uuid_like(7);
    let insert = "INSERT INTO processed_messages (consumer, message_id) VALUES ($1, $2::uuid) \
                  ON CONFLICT DO NOTHING";
    let mut applied = Vec::new();
    for consumer in ["customer", "customer", "payment"] {
        let result = sqlx::query(insert)
            .bind(consumer)
            .bind(&id)
            .execute(db.pool())
            .await
            .unwrap();
        applied.push(result.rows_affected());
    }
    assert_eq!(applied, [1, 0, 1]);
}

#[test]
fn service_migrations_must_not_use_the_shared_range() {
    let err = schema::with_service_migrations(&schema::SHARED).unwrap_err();
    assert!(matches!(
        err,
        SchemaError::ServiceVersionInSharedRange { version: 1, .. }
    ));
}

fn uuid_like(n: u8) -> String {
    format!("00000000-0000-7000-8000-0000000000{n:02x}")
}
