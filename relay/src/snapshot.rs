//! The initial snapshot: rows already in the outbox table when the slot was created
//! are published before streaming starts (like Debezium's `snapshot.mode=initial`).
//!
//! Why nothing is lost or skipped:
//! - A new slot exports a snapshot taken exactly at its consistent point. The table
//!   is read in that snapshot while the slot's creating connection stays idle, so
//!   every row committed before the consistent point is read here and every one
//!   committed after it comes through the stream: no gap, no overlap.
//! - The snapshot is recorded in `outbox_relay_snapshots` before the slot exists and
//!   marked complete only after the broker acknowledged every record. Streaming (and
//!   so any confirmation) starts only after that. A start that finds the record
//!   incomplete (a crash mid-snapshot) publishes the table again, read as it is now:
//!   rows committed after the slot's creation may then arrive twice — at least once,
//!   as everywhere in the relay — but none is missed.

use std::sync::Arc;

use crate::config::RelayConfig;
use crate::deadletter;
use crate::delivery::{Delivery, DeliveryError};
use crate::health::Health;
use crate::metrics::Metrics;
use crate::replication::{ConnectConfig, ReplicationClient, ReplicationError};
use crate::routing::{BadRow, ColumnValue, OutboxLayout, Position};
use crate::setup::{self, PendingSnapshot, SetupError};
use crate::sink::Sink;
use crate::sql;

/// Rows fetched from the cursor at a time.
const FETCH: usize = 1_000;

/// The initial snapshot could not be published.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("cannot connect to PostgreSQL for the snapshot")]
    Connect(#[source] ReplicationError),
    #[error(transparent)]
    Setup(#[from] SetupError),
    #[error("outbox row at {position} of the snapshot cannot be routed (and no dead-letter topic is configured)")]
    BadRow {
        position: Position,
        #[source]
        source: BadRow,
    },
    #[error(transparent)]
    Delivery(#[from] DeliveryError),
}

impl SnapshotError {
    /// Whether trying again later may succeed.
    pub fn is_transient(&self) -> bool {
        match self {
            SnapshotError::Connect(e) => e.is_transient(),
            SnapshotError::Setup(e) => e.is_transient(),
            SnapshotError::Delivery(e) => e.is_transient(),
            SnapshotError::BadRow { .. } => false,
        }
    }
}

/// Publishes the outbox table's rows for `slot` and records the snapshot complete.
/// Returns the number of rows published (dead letters included).
pub async fn publish<S: Sink>(
    config: &RelayConfig,
    connect: &ConnectConfig,
    sink: S,
    slot: &str,
    snapshot: &PendingSnapshot,
    observe: (Arc<Metrics>, Arc<Health>),
) -> Result<(u64, S), SnapshotError> {
    let mut client = ReplicationClient::connect(connect)
        .await
        .map_err(SnapshotError::Connect)?;
    setup::snapshot_position(&mut client, config, slot, snapshot.position).await?;
    let columns = setup::check_table(&mut client, config, connect.dbname())
        .await?
        .columns;
    let cols = &config.outbox.columns;
    let mut selected: Vec<&str> = vec![
        cols.id.as_str(),
        cols.aggregate_type.as_str(),
        cols.aggregate_id.as_str(),
        cols.event_type.as_str(),
        cols.payload.as_str(),
    ];
    if columns.iter().any(|c| c == cols.headers.as_str()) {
        selected.push(cols.headers.as_str());
    }
    let layout = OutboxLayout::resolve(cols, &config.postgres.table.to_string(), &selected)
        .map_err(SetupError::from)?;
    let select_list: Vec<String> = selected
        .iter()
        .map(|c| {
            let c = sql::ident(c);
            format!("{c}::text AS {c}")
        })
        .collect();
    // Insertion order, as far as the table tells it: order per key holds for the
    // snapshot as it does for the stream.
    let order = if columns.iter().any(|c| c == "created_at") {
        "ORDER BY created_at, ctid"
    } else {
        "ORDER BY ctid"
    };

    let sql = |doing: &'static str, sql: String| (doing, sql);
    let mut statements = vec![sql(
        "beginning the snapshot transaction",
        "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY".to_owned(),
    )];
    if let Some(name) = &snapshot.exported {
        statements.push(sql(
            "importing the slot's snapshot",
            format!("SET TRANSACTION SNAPSHOT {}", sql::literal(name)),
        ));
    }
    statements.push(sql(
        "opening the snapshot cursor",
        format!(
            "DECLARE outbox_relay_snapshot NO SCROLL CURSOR FOR SELECT {} FROM {} {order}",
            select_list.join(", "),
            config.postgres.table.quoted()
        ),
    ));
    for (doing, statement) in statements {
        client
            .simple_query(&statement)
            .await
            .map_err(|source| SetupError::Server { doing, source })?;
    }

    let (metrics, health) = observe;
    let mut delivery: Delivery<S, ()> = Delivery::new(
        sink,
        config.kafka.max_in_flight,
        config.outbox.dead_letter_topic.clone(),
        metrics,
        health,
    );
    let names: Vec<String> = selected.iter().map(|c| (*c).to_owned()).collect();
    let mut published: u64 = 0;
    loop {
        let rows = client
            .simple_query(&format!("FETCH {FETCH} FROM outbox_relay_snapshot"))
            .await
            .map_err(|source| SetupError::Server {
                doing: "reading the outbox table",
                source,
            })?;
        if rows.is_empty() {
            break;
        }
        for row in &rows {
            let values: Vec<ColumnValue<'_>> = row
                .iter()
                .map(|v| {
                    v.as_deref()
                        .map_or(ColumnValue::Null, |t| ColumnValue::Text(t.as_bytes()))
                })
                .collect();
            let position = Position {
                commit_lsn: snapshot.position,
                index: u32::try_from(published).unwrap_or(u32::MAX),
            };
            let (record, letter) = deadletter::or_letter(
                layout.route(&config.outbox, &values, position),
                config.outbox.dead_letter_topic.as_deref(),
                &names,
                &values,
                layout.aggregate_id(&values),
                position,
                delivery.letter_budget(),
            )
            .map_err(|source| SnapshotError::BadRow { position, source })?;
            delivery.push_when_room((), record, letter).await?;
            published += 1;
        }
    }
    client
        .simple_query("COMMIT")
        .await
        .map_err(|source| SetupError::Server {
            doing: "ending the snapshot transaction",
            source,
        })?;
    while !delivery.is_empty() {
        delivery.next().await?;
    }
    setup::complete_snapshot(&mut client, config, slot, published).await?;
    client.close().await;
    tracing::info!(slot, rows = published, position = %snapshot.position, "published the initial snapshot");
    Ok((published, delivery.into_sink()))
}

/// For a slot just created by another connection (which must stay idle until this
/// returns): whether the outbox table was empty in the slot's exported snapshot,
/// and if so, records the initial snapshot complete with nothing to publish.
///
/// `outbox-relay init` runs this, so that a relay started later does not publish
/// the table as it is then (which would send every row written in between twice:
/// once read from the table, once from the stream). When the table held rows, the
/// snapshot stays pending and the first start publishes them, at least once.
pub async fn complete_if_empty(
    config: &RelayConfig,
    connect: &ConnectConfig,
    slot: &str,
    snapshot: &PendingSnapshot,
) -> Result<bool, SnapshotError> {
    let Some(exported) = &snapshot.exported else {
        return Ok(false);
    };
    let mut client = ReplicationClient::connect(connect)
        .await
        .map_err(SnapshotError::Connect)?;
    let statements = [
        (
            "beginning the snapshot transaction",
            "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY".to_owned(),
        ),
        (
            "importing the slot's snapshot",
            format!("SET TRANSACTION SNAPSHOT {}", sql::literal(exported)),
        ),
        (
            "looking for rows in the outbox table",
            format!(
                "SELECT EXISTS (SELECT 1 FROM {})::text",
                config.postgres.table.quoted()
            ),
        ),
        ("ending the snapshot transaction", "COMMIT".to_owned()),
    ];
    let mut any_rows = true;
    for (doing, statement) in statements {
        let rows = client
            .simple_query(&statement)
            .await
            .map_err(|source| SetupError::Server { doing, source })?;
        if let Some(answer) = rows.first().and_then(|row| row.first()).cloned().flatten() {
            any_rows = answer == "true";
        }
    }
    if !any_rows {
        setup::snapshot_position(&mut client, config, slot, snapshot.position).await?;
        setup::complete_snapshot(&mut client, config, slot, 0).await?;
    }
    client.close().await;
    Ok(!any_rows)
}
