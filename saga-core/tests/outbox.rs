//! The outbox writer against a real database: rows commit and roll back with the
//! caller's transaction, every column is written, and a row deleted in its own
//! transaction still reaches logical decoding.

use std::collections::BTreeMap;

use anyhow::{ensure, Context};
use saga_core::outbox::{Outbox, OutboxError, OutboxEvent};
use saga_core::schema;
use serde::Serialize;
use sqlx::migrate::Migrator;
use sqlx::PgPool;
use testkit::TestDatabase;
use uuid::Uuid;

const TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

async fn database() -> anyhow::Result<TestDatabase> {
    let db = TestDatabase::create().await;
    schema::migrate(db.pool(), &Migrator::DEFAULT).await?;
    Ok(db)
}

type Row = (
    Uuid,
    String,
    String,
    String,
    Option<serde_json::Value>,
    Option<serde_json::Value>,
);

async fn rows(pool: &PgPool) -> anyhow::Result<Vec<Row>> {
    Ok(sqlx::query_as(
        "SELECT id, aggregatetype, aggregateid, type, payload, headers FROM outbox ORDER BY id",
    )
    .fetch_all(pool)
    .await?)
}

#[derive(Serialize)]
struct CreditReserved {
    customer_id: i64,
    amount_cents: i64,
    note: Option<String>,
}

#[tokio::test]
async fn a_rolled_back_transaction_leaves_no_row() -> anyhow::Result<()> {
    let db = database().await?;
    let outbox = Outbox::new();
    let event = OutboxEvent::new("order", "saga-1", "OrderCreated", &serde_json::json!({}))?;

    let mut tx = db.pool().begin().await?;
    let id = outbox.publish(&mut tx, &event).await?;
    assert_eq!(id, event.id);
    let inside: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox")
        .fetch_one(&mut *tx)
        .await?;
    assert_eq!(inside, 1, "the row is visible inside its transaction");
    tx.rollback().await?;

    assert!(rows(db.pool()).await?.is_empty());
    Ok(())
}

#[tokio::test]
async fn a_committed_event_has_every_column() -> anyhow::Result<()> {
    let db = database().await?;
    let event = OutboxEvent::new(
        "customer.request",
        "saga-42",
        "ReserveCredit",
        &serde_json::json!({"customerId": 7, "amount": 10.5}),
    )?
    .header("saga-id", "saga-42")
    .header("saga-step", "reserve-credit")
    .traceparent(Some(TRACEPARENT));

    let mut tx = db.pool().begin().await?;
    Outbox::new().publish(&mut tx, &event).await?;
    tx.commit().await?;

    let rows = rows(db.pool()).await?;
    assert_eq!(
        rows,
        [(
            event.id,
            "customer.request".to_owned(),
            "saga-42".to_owned(),
            "ReserveCredit".to_owned(),
            Some(serde_json::json!({"customerId": 7, "amount": 10.5})),
            Some(serde_json::json!({
                "saga-id": "saga-42",
                "saga-step": "reserve-credit",
                "traceparent": TRACEPARENT,
            })),
        )]
    );
    let (headers_type, has_created_at): (String, bool) = sqlx::query_as(
        "SELECT jsonb_typeof(headers), created_at IS NOT NULL FROM outbox WHERE id = $1",
    )
    .bind(event.id)
    .fetch_one(db.pool())
    .await?;
    assert_eq!(headers_type, "object");
    assert!(has_created_at);
    Ok(())
}

#[tokio::test]
async fn an_event_without_headers_stores_null_headers() -> anyhow::Result<()> {
    let db = database().await?;
    let event = OutboxEvent::new("order", "1", "Created", &serde_json::json!([1, 2]))?;
    let mut tx = db.pool().begin().await?;
    Outbox::new().publish(&mut tx, &event).await?;
    tx.commit().await?;

    let headers_is_null: bool =
        sqlx::query_scalar("SELECT headers IS NULL FROM outbox WHERE id = $1")
            .bind(event.id)
            .fetch_one(db.pool())
            .await?;
    assert!(headers_is_null);
    Ok(())
}

#[tokio::test]
async fn a_struct_payload_is_serialised() -> anyhow::Result<()> {
    let db = database().await?;
    let payload = CreditReserved {
        customer_id: 7,
        amount_cents: 1050,
        note: None,
    };
    let event = OutboxEvent::new("order.reply", "saga-7", "CreditReserved", &payload)?;
    assert_eq!(
        event.payload,
        serde_json::json!({"customer_id": 7, "amount_cents": 1050, "note": null})
    );

    let mut tx = db.pool().begin().await?;
    Outbox::new().publish(&mut tx, &event).await?;
    tx.commit().await?;
    let stored: serde_json::Value = sqlx::query_scalar("SELECT payload FROM outbox")
        .fetch_one(db.pool())
        .await?;
    assert_eq!(stored, event.payload);
    Ok(())
}

#[test]
fn a_payload_that_is_not_json_is_a_definite_error() {
    // JSON object keys must be strings.
    let payload: BTreeMap<(u8, u8), u8> = BTreeMap::from([((1, 2), 3)]);
    let err = OutboxEvent::new("order", "1", "Created", &payload).unwrap_err();
    assert!(
        matches!(err, OutboxError::SerializePayload { .. }),
        "{err:?}"
    );
    assert!(!err.is_transient());
    assert!(std::error::Error::source(&err).is_some());
    assert_eq!(
        err.to_string(),
        "cannot serialise the payload of a Created event to JSON"
    );
}

#[tokio::test]
async fn ids_are_v7_and_increasing() -> anyhow::Result<()> {
    let db = database().await?;
    let outbox = Outbox::new();
    let mut tx = db.pool().begin().await?;
    let mut ids = Vec::new();
    for n in 0..200 {
        let event = OutboxEvent::new("order", n.to_string(), "Created", &n)?;
        ids.push(outbox.publish(&mut tx, &event).await?);
    }
    tx.commit().await?;

    for id in &ids {
        assert_eq!(id.get_version_num(), 7, "{id} is not a UUIDv7");
    }
    for pair in ids.windows(2) {
        assert!(pair[0] < pair[1], "{} is not below {}", pair[0], pair[1]);
    }
    // The database orders them the same way: uuid comparison is bytewise.
    let stored: Vec<Uuid> = sqlx::query_scalar("SELECT id FROM outbox ORDER BY id")
        .fetch_all(db.pool())
        .await?;
    assert_eq!(stored, ids);

    let chosen = Uuid::new_v4();
    let event = OutboxEvent::new("order", "1", "Created", &1)?.with_id(chosen);
    assert_eq!(event.id, chosen);
    Ok(())
}

#[test]
fn a_valid_traceparent_is_kept_and_an_invalid_one_dropped() -> anyhow::Result<()> {
    let base = || OutboxEvent::new("order", "1", "Created", &serde_json::json!({}));

    let kept = base()?.traceparent(Some(TRACEPARENT));
    assert_eq!(
        kept.headers.get("traceparent").map(String::as_str),
        Some(TRACEPARENT)
    );

    for invalid in [
        "",
        "00-1-2-01",
        "00-4BF92F3577B34DA6A3CE929D0E0E4736-00F067AA0BA902B7-01",
        "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-x1",
    ] {
        let dropped = base()?.traceparent(Some(invalid));
        assert!(dropped.headers.is_empty(), "{invalid:?} was kept");
    }
    assert!(base()?.traceparent(None).headers.is_empty());
    // An invalid value does not remove one set before.
    let still = base()?
        .traceparent(Some(TRACEPARENT))
        .traceparent(Some("bad"));
    assert_eq!(
        still.headers.get("traceparent").map(String::as_str),
        Some(TRACEPARENT)
    );
    Ok(())
}

#[tokio::test]
async fn a_configured_table_is_quoted() -> anyhow::Result<()> {
    let db = database().await?;
    sqlx::query(r#"CREATE SCHEMA "Events""#)
        .execute(db.pool())
        .await?;
    sqlx::query(r#"CREATE TABLE "Events"."out box" (LIKE public.outbox INCLUDING ALL)"#)
        .execute(db.pool())
        .await?;
    let outbox = Outbox::new().table("Events", "out box");
    let event = OutboxEvent::new("order", "1", "Created", &1)?;
    let mut tx = db.pool().begin().await?;
    outbox.publish(&mut tx, &event).await?;
    tx.commit().await?;

    let there: i64 = sqlx::query_scalar(r#"SELECT count(*) FROM "Events"."out box""#)
        .fetch_one(db.pool())
        .await?;
    assert_eq!(there, 1);
    assert!(rows(db.pool()).await?.is_empty());
    Ok(())
}

#[tokio::test]
async fn a_deleted_row_is_still_in_logical_decoding() -> anyhow::Result<()> {
    let db = database().await?;
    let publication = format!("{}_pub", db.name());
    let slot = format!("{}_slot", db.name());
    // Publication and slot exist before the event is written: rows committed earlier
    // are never in the slot's stream. No transaction of this test is open while the
    // slot is created (slot creation waits for every open transaction).
    sqlx::query(&format!(
        "CREATE PUBLICATION {publication} FOR TABLE outbox"
    ))
    .execute(db.pool())
    .await?;
    sqlx::query("SELECT pg_create_logical_replication_slot($1, 'pgoutput')")
        .bind(&slot)
        .execute(db.pool())
        .await?;

    let event = OutboxEvent::new("order", "saga-9", "OrderCreated", &serde_json::json!({}))?;
    let outbox = Outbox::new().delete_after_insert(true);
    let mut tx = db.pool().begin().await?;
    outbox.publish(&mut tx, &event).await?;
    tx.commit().await?;

    assert!(rows(db.pool()).await?.is_empty(), "the row was not deleted");

    let changes: Vec<Vec<u8>> = sqlx::query_scalar(
        "SELECT data FROM pg_logical_slot_get_binary_changes($1, NULL, NULL, \
         'proto_version', '1', 'publication_names', $2)",
    )
    .bind(&slot)
    .bind(&publication)
    .fetch_all(db.pool())
    .await?;
    let id_text = event.id.to_string();
    let mentions_id = |data: &[u8]| data.windows(id_text.len()).any(|w| w == id_text.as_bytes());
    let insert = changes
        .iter()
        .find(|data| data.first() == Some(&b'I'))
        .context("no Insert message was decoded")?;
    ensure!(
        mentions_id(insert),
        "the Insert does not carry the event id"
    );
    let delete = changes
        .iter()
        .find(|data| data.first() == Some(&b'D'))
        .context("no Delete message was decoded")?;
    ensure!(
        mentions_id(delete),
        "the Delete does not carry the event id"
    );
    let kinds: Vec<char> = changes
        .iter()
        .filter_map(|data| data.first().map(|&b| char::from(b)))
        .filter(|k| matches!(k, 'I' | 'D'))
        .collect();
    assert_eq!(kinds, ['I', 'D'], "insert then delete, once each");

    sqlx::query("SELECT pg_drop_replication_slot($1)")
        .bind(&slot)
        .execute(db.pool())
        .await?;
    Ok(())
}
