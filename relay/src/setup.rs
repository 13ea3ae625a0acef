//! What must exist before the relay streams: `wal_level=logical`, the outbox table
//! with the configured columns, a publication that covers it, and the slot.

use crate::config::{quote_ident, RelayConfig};
use crate::replication::{ReplicationClient, ReplicationError, SnapshotMode};
use crate::Lsn;

/// The output plugin the relay decodes.
pub const PLUGIN: &str = "pgoutput";

/// The database is not ready for the relay, or asking it failed.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error(
        "the server runs with wal_level={0}; logical decoding needs wal_level=logical \
         (set it in postgresql.conf and restart the server)"
    )]
    WalLevel(String),
    #[error("the outbox table {0} does not exist in database {1}")]
    TableMissing(String, String),
    #[error(transparent)]
    Schema(#[from] crate::routing::SchemaError),
    #[error(
        "publication {0} does not exist; create it with CREATE PUBLICATION {0} FOR TABLE {1}, \
         or let the relay create it (create_publication = true)"
    )]
    PublicationMissing(String, String),
    #[error("publication {publication} does not publish the outbox table {table}")]
    PublicationLacksTable { publication: String, table: String },
    #[error(
        "slot {slot} exists but belongs to {found}; the relay needs a logical slot with \
         plugin pgoutput in database {database} (choose another slot name or drop it)"
    )]
    SlotMismatch {
        slot: String,
        found: String,
        database: String,
    },
    #[error(
        "slot {0} was invalidated (its WAL was removed, wal_status=lost); events after its last \
         confirmed position may be gone, so the relay does not recreate it by itself: drop the \
         slot, then run `outbox-relay init` and decide how to recover the missed rows"
    )]
    SlotInvalidated(String),
    #[error("unexpected answer to {query}: {answer}")]
    Unexpected { query: &'static str, answer: String },
    #[error("{doing} failed")]
    Server {
        doing: &'static str,
        #[source]
        source: ReplicationError,
    },
}

impl SetupError {
    /// Whether trying again later may succeed (the server was unreachable).
    pub fn is_transient(&self) -> bool {
        matches!(self, SetupError::Server { source, .. } if source.is_transient())
    }
}

/// The slot to stream from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotState {
    pub name: String,
    /// Its `confirmed_flush_lsn`: streaming resumes after it.
    pub confirmed: Lsn,
    /// Whether this call created it.
    pub created: bool,
}

/// Checks the server and the outbox table, creates the publication (when allowed and
/// missing) and the slot (when missing).
pub async fn prepare(
    client: &mut ReplicationClient,
    config: &RelayConfig,
    database: &str,
) -> Result<SlotState, SetupError> {
    check_wal_level(client).await?;
    check_table(client, config, database).await?;
    ensure_publication(client, config).await?;
    ensure_slot(client, config, database).await
}

async fn query(
    client: &mut ReplicationClient,
    doing: &'static str,
    sql: &str,
) -> Result<Vec<Vec<Option<String>>>, SetupError> {
    client
        .simple_query(sql)
        .await
        .map_err(|source| SetupError::Server { doing, source })
}

/// Quotes an SQL string literal (standard_conforming_strings is on since 9.1).
pub fn quote_literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

async fn check_wal_level(client: &mut ReplicationClient) -> Result<(), SetupError> {
    let rows = query(client, "reading wal_level", "SHOW wal_level").await?;
    let level = single(&rows, "SHOW wal_level")?;
    if level != "logical" {
        return Err(SetupError::WalLevel(level));
    }
    Ok(())
}

async fn check_table(
    client: &mut ReplicationClient,
    config: &RelayConfig,
    database: &str,
) -> Result<(), SetupError> {
    let table = &config.postgres.table;
    let sql = format!(
        "SELECT a.attname FROM pg_attribute a \
         JOIN pg_class c ON c.oid = a.attrelid JOIN pg_namespace n ON n.oid = c.relnamespace \
         WHERE n.nspname = {} AND c.relname = {} AND c.relkind IN ('r', 'p') \
         AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum",
        quote_literal(&table.schema),
        quote_literal(&table.name)
    );
    let rows = query(client, "reading the outbox table's columns", &sql).await?;
    let present: Vec<String> = rows
        .into_iter()
        .filter_map(|row| row.into_iter().next().flatten())
        .collect();
    if present.is_empty() {
        return Err(SetupError::TableMissing(
            table.to_string(),
            database.to_owned(),
        ));
    }
    let names: Vec<&str> = present.iter().map(String::as_str).collect();
    crate::routing::OutboxLayout::resolve(&config.outbox.columns, &table.to_string(), &names)?;
    Ok(())
}

async fn ensure_publication(
    client: &mut ReplicationClient,
    config: &RelayConfig,
) -> Result<(), SetupError> {
    let publication = &config.postgres.publication;
    let table = &config.postgres.table;
    let sql = format!(
        "SELECT p.puballtables, EXISTS (SELECT 1 FROM pg_publication_tables t \
         WHERE t.pubname = p.pubname AND t.schemaname = {} AND t.tablename = {}) \
         FROM pg_publication p WHERE p.pubname = {}",
        quote_literal(&table.schema),
        quote_literal(&table.name),
        quote_literal(publication)
    );
    let rows = query(client, "reading the publication", &sql).await?;
    match rows.first() {
        Some(row) => {
            let covers = row.get(1).cloned().flatten().as_deref() == Some("t");
            if !covers {
                return Err(SetupError::PublicationLacksTable {
                    publication: publication.clone(),
                    table: table.to_string(),
                });
            }
            Ok(())
        }
        None if config.postgres.create_publication => {
            let sql = format!(
                "CREATE PUBLICATION {} FOR TABLE {}",
                quote_ident(publication),
                table.quoted()
            );
            query(client, "creating the publication", &sql).await?;
            tracing::info!(publication = %publication, table = %table, "created publication");
            Ok(())
        }
        None => Err(SetupError::PublicationMissing(
            publication.clone(),
            table.to_string(),
        )),
    }
}

async fn ensure_slot(
    client: &mut ReplicationClient,
    config: &RelayConfig,
    database: &str,
) -> Result<SlotState, SetupError> {
    let slot = config.slot_name(database);
    let sql = format!(
        "SELECT plugin, database, slot_type, confirmed_flush_lsn, wal_status \
         FROM pg_replication_slots WHERE slot_name = {}",
        quote_literal(&slot)
    );
    let rows = query(client, "reading the slot", &sql).await?;
    let Some(row) = rows.first() else {
        let created = client
            .create_logical_slot(&slot, PLUGIN, SnapshotMode::NoExport, false)
            .await
            .map_err(|source| SetupError::Server {
                doing: "creating the slot",
                source,
            })?;
        tracing::info!(slot = %slot, consistent_point = %created.consistent_point, "created slot");
        return Ok(SlotState {
            name: slot,
            confirmed: created.consistent_point,
            created: true,
        });
    };
    let field = |i: usize| row.get(i).cloned().flatten().unwrap_or_default();
    let (plugin, slot_db, kind, confirmed, wal_status) =
        (field(0), field(1), field(2), field(3), field(4));
    if kind != "logical" || plugin != PLUGIN || slot_db != database {
        return Err(SetupError::SlotMismatch {
            slot,
            found: format!("a {kind} slot with plugin {plugin:?} in database {slot_db:?}"),
            database: database.to_owned(),
        });
    }
    if wal_status == "lost" {
        return Err(SetupError::SlotInvalidated(slot));
    }
    let confirmed = confirmed.parse().map_err(|_| SetupError::Unexpected {
        query: "confirmed_flush_lsn",
        answer: confirmed.clone(),
    })?;
    Ok(SlotState {
        name: slot,
        confirmed,
        created: false,
    })
}

fn single(rows: &[Vec<Option<String>>], query: &'static str) -> Result<String, SetupError> {
    rows.first()
        .and_then(|row| row.first())
        .cloned()
        .flatten()
        .ok_or_else(|| SetupError::Unexpected {
            query,
            answer: format!("{rows:?}"),
        })
}
