//! `outbox-relay init` and `outbox-relay check` against the real PostgreSQL and broker.

mod support;

use support::{relay_subcommand, Collector, OutboxDb, Received, Relay, RelaySettings, Row};
use testkit::{settings, TestDatabase};

fn line<'a>(report: &'a str, subject: &str) -> &'a str {
    report
        .lines()
        .find(|l| l.split_whitespace().nth(1) == Some(subject))
        .unwrap_or_else(|| panic!("no {subject} line in:\n{report}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_and_init_say_what_is_missing_and_rows_after_init_are_streamed() {
    let db = OutboxDb::new().await;
    let brokers = settings().kafka_brokers.clone();
    let settings = RelaySettings::new(&db, &brokers);

    // Before init: everything reachable, but no slot yet.
    let (code, report, _) = relay_subcommand(&settings, "check");
    assert_eq!(code, 1, "{report}");
    for subject in [
        "config",
        "postgres",
        "wal_level",
        "role",
        "table",
        "publication",
        "kafka",
    ] {
        assert!(line(&report, subject).starts_with("ok"), "{report}");
    }
    assert!(line(&report, "slot").contains("does not exist"), "{report}");

    let (code, out, err) = relay_subcommand(&settings, "init");
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("publication outbox_relay created"), "{out}");
    assert!(
        out.contains(&format!("slot {} created", db.slot())),
        "{out}"
    );
    // The table was empty when the slot was made: no snapshot is left to publish.
    assert!(out.contains("initial snapshot complete"), "{out}");
    let (code, out, err) = relay_subcommand(&settings, "init");
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("exists"), "init twice: {out}");

    let (code, report, _) = relay_subcommand(&settings, "check");
    assert_eq!(code, 0, "{report}");
    assert!(
        line(&report, "slot").contains("free (no relay streams from it)"),
        "{report}"
    );

    // The service writes before any relay runs: the slot holds the rows, and
    // only the slot (the table is not read again), so each arrives once.
    let early: Vec<Row> = (1..=3).map(|seq| Row::event(0, seq)).collect();
    db.write(&early, false).await;
    let _relay = Relay::start(&settings);
    db.wait_for_streaming().await;
    let marker = Row::event(0, 4);
    db.write(std::slice::from_ref(&marker), false).await;
    let collector =
        Collector::through(&brokers, &[settings.topic("order")], &marker.id.to_string()).await;
    let ids: Vec<&str> = collector.received.iter().map(Received::id).collect();
    let expected: Vec<String> = early
        .iter()
        .chain(std::iter::once(&marker))
        .map(|r| r.id.to_string())
        .collect();
    assert_eq!(ids, expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_names_a_missing_table_a_missing_column_and_an_unreachable_broker() {
    let db = TestDatabase::create().await;
    let closed = testkit::free_port();
    let settings = RelaySettings {
        postgres_url: db.url(),
        brokers: format!("127.0.0.1:{closed}"),
        topic_prefix: testkit::unique_name("relay"),
        extra: vec![(
            "OUTBOX_RELAY_CREATE_PUBLICATION".to_owned(),
            "false".to_owned(),
        )],
        args: Vec::new(),
    };
    let (code, report, _) = relay_subcommand(&settings, "check");
    assert_eq!(code, 1);
    assert!(
        line(&report, "table").contains("does not exist"),
        "{report}"
    );
    assert!(
        line(&report, "publication").contains("create_publication is off"),
        "{report}"
    );
    assert!(line(&report, "kafka").starts_with("FAIL"), "{report}");

    sqlx::query(
        "CREATE TABLE outbox (id uuid PRIMARY KEY, aggregatetype text, type text, payload jsonb)",
    )
    .execute(db.pool())
    .await
    .unwrap();
    let (_, report, _) = relay_subcommand(&settings, "check");
    let table = line(&report, "table");
    assert!(
        table.starts_with("FAIL") && table.contains("\"aggregateid\""),
        "{report}"
    );

    // A schema error stops init (and a start) before anything is created.
    let (code, _, err) = relay_subcommand(&settings, "init");
    assert_eq!(code, 1);
    assert!(err.contains("no column \"aggregateid\""), "{err}");
    let slots: i64 =
        sqlx::query_scalar("SELECT count(*) FROM pg_replication_slots WHERE database = $1")
            .bind(db.name())
            .fetch_one(db.pool())
            .await
            .unwrap();
    assert_eq!(slots, 0);
}
