//! The relay in one screen: a fresh database with an outbox table, the relay running
//! in-process, three transactions that change "orders" and write outbox rows, and a
//! consumer printing what arrived in Kafka. Run by `scripts/demo` against the local
//! environment (`scripts/env up`).

#![allow(clippy::print_stdout)]

use std::time::Duration;

use anyhow::{bail, Context};
use futures::StreamExt;
use outbox_relay::RelayConfig;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::Headers;
use rdkafka::Message;
use testkit::{consumer_config, settings, unique_name, wait_for_topic, TestDatabase};

const OUTBOX_DDL: &str = include_str!("../../sql/shared/0001_outbox.sql");

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let db = TestDatabase::create().await;
    sqlx::raw_sql(OUTBOX_DDL).execute(db.pool()).await?;
    sqlx::query("CREATE TABLE orders (id int PRIMARY KEY, customer text, total numeric)")
        .execute(db.pool())
        .await?;
    println!("database {} with tables orders and outbox", db.name());

    let prefix = unique_name("demo");
    let mut config = RelayConfig::new(db.url(), settings().kafka_brokers.clone());
    config.outbox.topic_template =
        outbox_relay::config::TopicTemplate::parse(&format!("{prefix}.{{aggregatetype}}"))?;
    config.kafka.topic_partitions = 3;
    config.kafka.topic_replication_factor = 1;
    config.postgres.status_interval = Duration::from_millis(500);
    config.http.listen = None;
    let slot = config.slot_name(db.name());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let relay = tokio::spawn(outbox_relay::run(config, async {
        let _ = stopped.await;
    }));
    wait_for_slot(&db, &slot).await?;
    println!("relay streaming from slot {slot}");

    // Each transaction changes the service's table and writes its event: both or neither.
    for (id, customer, total) in [
        (1, "ada", "30.00"),
        (2, "grace", "12.50"),
        (3, "ada", "99.90"),
    ] {
        let mut tx = db.pool().begin().await?;
        sqlx::query("INSERT INTO orders VALUES ($1, $2, $3::numeric)")
            .bind(id)
            .bind(customer)
            .bind(total)
            .execute(&mut *tx)
            .await?;
        sqlx::query(
            "INSERT INTO outbox (id, aggregatetype, aggregateid, type, payload, headers) \
             VALUES (gen_random_uuid(), 'order', $1, 'OrderCreated', \
                     jsonb_build_object('orderId', $2::int, 'customer', $3::text, 'total', $4::numeric), \
                     '{\"traceparent\": \"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01\"}')",
        )
        .bind(id.to_string())
        .bind(id)
        .bind(customer)
        .bind(total)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        println!("committed order {id} and its OrderCreated event");
    }

    let topic = format!("{prefix}.order");
    wait_for_topic(&topic, 3).await;
    let consumer: StreamConsumer = consumer_config(&unique_name("demo_group")).create()?;
    consumer.subscribe(&[&topic])?;
    let mut stream = consumer.stream();
    println!("\nrecords in {topic}:");
    for _ in 0..3 {
        let message = tokio::time::timeout(Duration::from_secs(60), stream.next())
            .await
            .context("no record within 60 s")?
            .context("the consumer stopped")??;
        let header = |name: &str| {
            message
                .headers()
                .and_then(|h| h.iter().find(|x| x.key == name))
                .and_then(|h| h.value)
                .map(|v| String::from_utf8_lossy(v).into_owned())
                .unwrap_or_default()
        };
        println!(
            "  partition {} offset {}  key {}  type {}  position {}#{}\n    payload {}",
            message.partition(),
            message.offset(),
            String::from_utf8_lossy(message.key().unwrap_or_default()),
            header("type"),
            header("outbox-commit-lsn"),
            header("outbox-index"),
            String::from_utf8_lossy(message.payload().unwrap_or_default())
        );
    }
    drop(stream);

    // A graceful stop drains, confirms the slot and ends the stream.
    let _ = stop.send(());
    relay.await??;
    let confirmed: Option<String> = sqlx::query_scalar(
        "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1",
    )
    .bind(&slot)
    .fetch_optional(db.pool())
    .await?
    .flatten();
    match confirmed {
        Some(lsn) => println!("\nrelay stopped; slot {slot} confirmed up to {lsn}"),
        None => bail!("slot {slot} is gone"),
    }
    db.drop_database().await?;
    Ok(())
}

async fn wait_for_slot(db: &TestDatabase, slot: &str) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let active: Option<bool> =
            sqlx::query_scalar("SELECT active FROM pg_replication_slots WHERE slot_name = $1")
                .bind(slot)
                .fetch_optional(db.pool())
                .await?;
        if active == Some(true) {
            return Ok(());
        }
        if tokio::time::Instant::now() > deadline {
            bail!("the relay did not start streaming from {slot} within 60 s");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
