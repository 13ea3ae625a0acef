use testkit::TestDatabase;

#[tokio::test]
async fn migrations_create_shared_and_own_tables() {
    let db = TestDatabase::create().await;
    payment_service::migrate(db.pool()).await.unwrap();
    payment_service::migrate(db.pool()).await.unwrap();
    let tables: Vec<String> = sqlx::query_scalar(
        "SELECT table_name::text FROM information_schema.tables \
         WHERE table_schema = 'public' AND table_name <> '_sqlx_migrations' ORDER BY 1",
    )
    .fetch_all(db.pool())
    .await
    .unwrap();
    let mut expected = vec![
        "payments",
        "card_tokens",
        "card_vault_key",
        "outbox",
        "outbox_relay_snapshots",
        "outbox_relay_resume",
        "processed_messages",
        "saga_barrier",
        "saga_events",
        "saga_held_replies",
        "saga_state",
    ];
    expected.sort_unstable();
    assert_eq!(tables, expected);
}
