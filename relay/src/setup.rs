//! What must exist before the relay streams: `wal_level=logical`, the outbox table
//! with the configured columns, a publication that covers it, and the slot (and,
//! where the relay may create it, the table of resume points).
//!
//! Each part is first *inspected* (read-only, used by `outbox-relay check`), then
//! created when missing and allowed (`outbox-relay init` and every start).

use crate::config::{InitialSnapshot, RelayConfig};
use crate::replication::{ReplicationClient, ReplicationError, SnapshotMode};
use crate::resume::{self, ResumeStart};
use crate::sql;
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
        "the outbox table {table} is partitioned and publication {publication} publishes its \
         partitions under their own names, which the relay would not recognise (every event \
         would be skipped): ALTER PUBLICATION {publication} SET (publish_via_partition_root = true)"
    )]
    PublicationNotViaRoot { publication: String, table: String },
    #[error(
        "slot {slot} exists but is {found}; the relay needs a logical slot with plugin \
         pgoutput in database {database} (choose another slot name or drop it)"
    )]
    SlotMismatch {
        slot: String,
        found: String,
        database: String,
    },
    #[error(
        "slot {0} was invalidated (its WAL was removed, wal_status=lost); events after its last \
         confirmed position may be gone, so the relay does not recreate it by itself: drop the \
         slot, run `outbox-relay init`, and recover the missed rows from the outbox table"
    )]
    SlotInvalidated(String),
    #[error(
        "cannot create the snapshot record table {0}: grant CREATE on its schema, create it \
         (sql/shared/0004_outbox_relay_snapshots.sql), or set snapshot_mode = \"never\""
    )]
    SnapshotTable(String, #[source] ReplicationError),
    #[error("slot {0} is being created by another process (another relay on the same slot?)")]
    SlotCreating(String),
    #[error("another process was {doing} at the same moment (another relay starting?)")]
    Raced {
        doing: &'static str,
        #[source]
        source: ReplicationError,
    },
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
        match self {
            SetupError::Server { source, .. } => source.is_transient(),
            SetupError::SlotCreating(_) | SetupError::Raced { .. } => true,
            _ => false,
        }
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
    /// An initial snapshot that must be published before streaming.
    pub snapshot: Option<PendingSnapshot>,
}

/// An initial snapshot not yet completed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingSnapshot {
    /// The snapshot the slot exported when this call created it: valid while the
    /// creating connection stays idle, and exactly consistent with the slot. `None`
    /// after a restart: the table is then read as it is now (rows committed since
    /// the slot's creation may be published twice, never missed).
    pub exported: Option<String>,
    /// The slot's consistent point, the position of snapshot records.
    pub position: Lsn,
}

/// The table recording initial snapshots, in the outbox table's schema.
pub const SNAPSHOT_TABLE: &str = "outbox_relay_snapshots";

/// What the database holds of the publication.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PublicationState {
    /// It exists and publishes the outbox table (a partitioned one through its root).
    Covers,
    /// It exists, but publishes the partitioned outbox table's partitions under their
    /// own names (`publish_via_partition_root` is off).
    NotViaRoot,
    /// It exists without the outbox table.
    LacksTable,
    Missing,
}

/// What the database holds of the slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SlotInspection {
    Missing,
    Ready {
        confirmed: Lsn,
        /// The process streaming from it now, if any.
        active_pid: Option<u32>,
        /// `pg_replication_slots.wal_status` (`reserved`, `extended`, `unreserved`).
        wal_status: String,
    },
    Invalidated,
    Mismatch {
        found: String,
    },
    /// Another process is creating it (listed, without a confirmed position yet).
    Creating {
        active_pid: Option<u32>,
    },
}

/// What `prepare` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Prepared {
    pub slot: SlotState,
    pub created_publication: bool,
    /// The resume point table (created when missing and allowed) and the slot's
    /// point ([`crate::resume`]).
    pub resume: ResumeStart,
}

/// Checks the server and the outbox table, creates the publication (when allowed and
/// missing), the slot (when missing) and the resume point table (when missing and
/// allowed).
pub async fn prepare(
    client: &mut ReplicationClient,
    config: &RelayConfig,
    database: &str,
) -> Result<Prepared, SetupError> {
    check_wal_level(client).await?;
    let table = check_table(client, config, database).await?;
    let created_publication = ensure_publication(client, config, &table).await?;
    // Before the slot: a slot created now exports a snapshot that any later
    // command on this connection would end.
    let mut resume = resume::prepare(client, config, &config.slot_name(database))
        .await
        .map_err(|source| {
            raced(SetupError::Server {
                doing: "preparing the resume point table",
                source,
            })
        })?;
    let slot = ensure_slot(client, config, database).await?;
    if slot.created {
        // A point of an earlier slot of that name names a commit before this
        // slot's start: it would match nothing, but it is no point of this slot.
        resume.point = None;
    }
    Ok(Prepared {
        slot,
        created_publication,
        resume,
    })
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

/// Relays configured alike start together (the sidecars of a replicated service):
/// creating what is missing, one of them loses the race with "already exists"
/// (`duplicate_object`, or `unique_violation` from the catalog for
/// `CREATE TABLE IF NOT EXISTS`). That is transient: the next attempt finds it.
fn raced(error: SetupError) -> SetupError {
    match error {
        SetupError::Server { doing, source }
            if matches!(source.sqlstate(), Some("42710" | "23505")) =>
        {
            SetupError::Raced { doing, source }
        }
        other => other,
    }
}

/// The server's `wal_level` must be `logical`.
pub async fn check_wal_level(client: &mut ReplicationClient) -> Result<(), SetupError> {
    let rows = query(client, "reading wal_level", "SHOW wal_level").await?;
    let level = single(&rows, "SHOW wal_level")?;
    if level != "logical" {
        return Err(SetupError::WalLevel(level));
    }
    Ok(())
}

/// What the relay needs to know of the outbox table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxTable {
    /// Its columns, in order.
    pub columns: Vec<String>,
    /// Whether it is a partitioned table (`PARTITION BY`): its rows live in its
    /// partitions, and the publication must publish them under its name.
    pub partitioned: bool,
}

/// The outbox table must exist with every configured column.
pub async fn check_table(
    client: &mut ReplicationClient,
    config: &RelayConfig,
    database: &str,
) -> Result<OutboxTable, SetupError> {
    let table = &config.postgres.table;
    let sql = format!(
        "SELECT a.attname, c.relkind::text FROM pg_attribute a \
         JOIN pg_class c ON c.oid = a.attrelid JOIN pg_namespace n ON n.oid = c.relnamespace \
         WHERE n.nspname = {} AND c.relname = {} AND c.relkind IN ('r', 'p') \
         AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum",
        sql::literal(&table.schema),
        sql::literal(&table.name)
    );
    let rows = query(client, "reading the outbox table's columns", &sql).await?;
    let partitioned = rows
        .first()
        .and_then(|row| row.get(1).cloned().flatten())
        .is_some_and(|kind| kind == "p");
    let columns: Vec<String> = rows
        .into_iter()
        .filter_map(|row| row.into_iter().next().flatten())
        .collect();
    if columns.is_empty() {
        return Err(SetupError::TableMissing(
            table.to_string(),
            database.to_owned(),
        ));
    }
    let names: Vec<&str> = columns.iter().map(String::as_str).collect();
    crate::routing::OutboxLayout::resolve(&config.outbox.columns, &table.to_string(), &names)?;
    Ok(OutboxTable {
        columns,
        partitioned,
    })
}

/// Whether the publication exists and covers the outbox table, through its root
/// when the table is partitioned.
///
/// A publication of a partitioned table without `publish_via_partition_root`
/// sends each change under the name of the partition that holds the row, and
/// `pg_publication_tables` lists the partitions instead of the table.
pub async fn inspect_publication(
    client: &mut ReplicationClient,
    config: &RelayConfig,
    table: &OutboxTable,
) -> Result<PublicationState, SetupError> {
    let outbox = &config.postgres.table;
    let sql = format!(
        "SELECT p.pubviaroot::text, EXISTS (SELECT 1 FROM pg_publication_tables t \
         WHERE t.pubname = p.pubname AND t.schemaname = {} AND t.tablename = {})::text \
         FROM pg_publication p WHERE p.pubname = {}",
        sql::literal(&outbox.schema),
        sql::literal(&outbox.name),
        sql::literal(&config.postgres.publication)
    );
    let rows = query(client, "reading the publication", &sql).await?;
    let Some(row) = rows.first() else {
        return Ok(PublicationState::Missing);
    };
    let field = |i: usize| row.get(i).cloned().flatten().unwrap_or_default();
    let (via_root, lists_table) = (field(0) == "true", field(1) == "true");
    Ok(match (table.partitioned, via_root, lists_table) {
        (true, false, _) => PublicationState::NotViaRoot,
        (_, _, true) => PublicationState::Covers,
        (_, _, false) => PublicationState::LacksTable,
    })
}

/// Makes sure the publication exists and covers the outbox table; returns whether
/// it was created.
async fn ensure_publication(
    client: &mut ReplicationClient,
    config: &RelayConfig,
    outbox: &OutboxTable,
) -> Result<bool, SetupError> {
    let publication = &config.postgres.publication;
    let table = &config.postgres.table;
    match inspect_publication(client, config, outbox).await? {
        PublicationState::Covers => Ok(false),
        PublicationState::LacksTable => Err(SetupError::PublicationLacksTable {
            publication: publication.clone(),
            table: table.to_string(),
        }),
        PublicationState::NotViaRoot => Err(SetupError::PublicationNotViaRoot {
            publication: publication.clone(),
            table: table.to_string(),
        }),
        PublicationState::Missing if config.postgres.create_publication => {
            // A partitioned table's changes are published under its own name (and a
            // partition attached later is covered as well).
            let options = if outbox.partitioned {
                " WITH (publish_via_partition_root = true)"
            } else {
                ""
            };
            let sql = format!(
                "CREATE PUBLICATION {} FOR TABLE {}{options}",
                sql::ident(publication),
                table.quoted()
            );
            query(client, "creating the publication", &sql)
                .await
                .map_err(raced)?;
            tracing::info!(publication = %publication, table = %table, "created publication");
            Ok(true)
        }
        PublicationState::Missing => Err(SetupError::PublicationMissing(
            publication.clone(),
            table.to_string(),
        )),
    }
}

/// The slot's state, read-only.
pub async fn inspect_slot(
    client: &mut ReplicationClient,
    slot: &str,
    database: &str,
) -> Result<SlotInspection, SetupError> {
    let sql = format!(
        "SELECT plugin, database, slot_type, confirmed_flush_lsn, wal_status, active_pid \
         FROM pg_replication_slots WHERE slot_name = {}",
        sql::literal(slot)
    );
    let rows = query(client, "reading the slot", &sql).await?;
    let Some(row) = rows.first() else {
        return Ok(SlotInspection::Missing);
    };
    let field = |i: usize| row.get(i).cloned().flatten().unwrap_or_default();
    let (plugin, slot_db, kind, confirmed, wal_status, pid) =
        (field(0), field(1), field(2), field(3), field(4), field(5));
    if kind != "logical" || plugin != PLUGIN || slot_db != database {
        return Ok(SlotInspection::Mismatch {
            found: format!("a {kind} slot with plugin {plugin:?} in database {slot_db:?}"),
        });
    }
    if wal_status == "lost" {
        return Ok(SlotInspection::Invalidated);
    }
    if confirmed.is_empty() {
        return Ok(SlotInspection::Creating {
            active_pid: pid.parse().ok(),
        });
    }
    let confirmed = confirmed.parse().map_err(|_| SetupError::Unexpected {
        query: "confirmed_flush_lsn",
        answer: confirmed.clone(),
    })?;
    Ok(SlotInspection::Ready {
        confirmed,
        active_pid: pid.parse().ok(),
        wal_status,
    })
}

async fn ensure_slot(
    client: &mut ReplicationClient,
    config: &RelayConfig,
    database: &str,
) -> Result<SlotState, SetupError> {
    let slot = config.slot_name(database);
    let snapshots = config.postgres.snapshot == InitialSnapshot::Initial;
    match inspect_slot(client, &slot, database).await? {
        SlotInspection::Ready { confirmed, .. } => {
            // A snapshot begun before a crash is published again.
            let snapshot = if snapshots {
                pending_snapshot(client, config, &slot)
                    .await?
                    .map(|position| PendingSnapshot {
                        exported: None,
                        position: position.unwrap_or(confirmed),
                    })
            } else {
                None
            };
            Ok(SlotState {
                name: slot,
                confirmed,
                created: false,
                snapshot,
            })
        }
        SlotInspection::Invalidated => Err(SetupError::SlotInvalidated(slot)),
        SlotInspection::Creating { .. } => Err(SetupError::SlotCreating(slot)),
        SlotInspection::Mismatch { found } => Err(SetupError::SlotMismatch {
            slot,
            found,
            database: database.to_owned(),
        }),
        SlotInspection::Missing => {
            // The snapshot is recorded as begun before the slot exists: a crash
            // between the two must not leave a slot whose snapshot never happened.
            if snapshots {
                // Held until this connection ends: relays starting beside this one
                // stand by instead of streaming while the snapshot is published.
                if !claim_snapshot(client, &slot).await? {
                    return Err(SetupError::SlotCreating(slot));
                }
                begin_snapshot(client, config, &slot).await?;
            }
            let mode = if snapshots {
                SnapshotMode::Export
            } else {
                SnapshotMode::NoExport
            };
            let created = client
                .create_logical_slot(&slot, PLUGIN, mode, false)
                .await
                .map_err(|source| {
                    raced(SetupError::Server {
                        doing: "creating the slot",
                        source,
                    })
                })?;
            tracing::info!(slot = %slot, consistent_point = %created.consistent_point, "created slot");
            let snapshot = snapshots.then(|| PendingSnapshot {
                exported: created.snapshot_name.clone(),
                position: created.consistent_point,
            });
            Ok(SlotState {
                name: slot,
                confirmed: created.consistent_point,
                created: true,
                snapshot,
            })
        }
    }
}

/// The snapshot table, qualified with the outbox table's schema.
pub fn snapshot_table(config: &RelayConfig) -> String {
    format!(
        "{}.{}",
        sql::ident(&config.postgres.table.schema),
        sql::ident(SNAPSHOT_TABLE)
    )
}

/// Records that the slot's initial snapshot has begun (creating the record table
/// when the schema lacks it).
async fn begin_snapshot(
    client: &mut ReplicationClient,
    config: &RelayConfig,
    slot: &str,
) -> Result<(), SetupError> {
    let table = snapshot_table(config);
    let create = format!(
        "CREATE TABLE IF NOT EXISTS {table} (slot_name text PRIMARY KEY, consistent_point pg_lsn, \
         rows_published bigint, started_at timestamptz NOT NULL DEFAULT now(), completed_at timestamptz)"
    );
    query(client, "creating the snapshot record table", &create)
        .await
        .map_err(raced)
        .map_err(|e| match e {
            SetupError::Server { source, .. } if source.sqlstate() == Some("42501") => {
                SetupError::SnapshotTable(table.clone(), source)
            }
            other => other,
        })?;
    let record = format!(
        "INSERT INTO {table} (slot_name) VALUES ({}) ON CONFLICT (slot_name) DO UPDATE \
         SET consistent_point = NULL, rows_published = NULL, started_at = now(), completed_at = NULL",
        sql::literal(slot)
    );
    query(client, "recording the initial snapshot", &record).await?;
    Ok(())
}

/// Class of the session-level advisory lock (the key is the slot name's hash) that
/// a relay holds on its setup connection from taking up a slot's initial snapshot
/// (creating the slot, or finding its snapshot unfinished) until that connection
/// ends. The slot itself is free while the snapshot is read, so without the lock a
/// relay standing by beside the publishing one would start streaming, and a key's
/// snapshot row and a newer change of it could be published by two relays at once.
/// A publisher that dies releases the lock with its connection; the next relay
/// takes the unfinished snapshot up.
pub const SNAPSHOT_LOCK_CLASS: i32 = 0x6f62_7278;

/// Takes `slot`'s snapshot lock ([`SNAPSHOT_LOCK_CLASS`]) unless another session
/// holds it; whether it did.
pub async fn claim_snapshot(
    client: &mut ReplicationClient,
    slot: &str,
) -> Result<bool, SetupError> {
    let sql = format!(
        "SELECT pg_try_advisory_lock({SNAPSHOT_LOCK_CLASS}, hashtext({}))",
        sql::literal(slot)
    );
    let rows = query(client, "claiming the initial snapshot", &sql).await?;
    Ok(single(&rows, "pg_try_advisory_lock")? == "t")
}

/// Whether `slot`'s initial snapshot is configured and not yet complete.
pub async fn snapshot_pending(
    client: &mut ReplicationClient,
    config: &RelayConfig,
    slot: &str,
) -> Result<bool, SetupError> {
    Ok(config.postgres.snapshot == InitialSnapshot::Initial
        && pending_snapshot(client, config, slot).await?.is_some())
}

/// `Some(position)` when the slot has a snapshot record without completion
/// (`position` is `None` when the slot's creation was not recorded).
async fn pending_snapshot(
    client: &mut ReplicationClient,
    config: &RelayConfig,
    slot: &str,
) -> Result<Option<Option<Lsn>>, SetupError> {
    let table = &config.postgres.table;
    let exists = format!(
        "SELECT 1 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
         WHERE n.nspname = {} AND c.relname = {}",
        sql::literal(&table.schema),
        sql::literal(SNAPSHOT_TABLE)
    );
    if query(client, "looking for the snapshot record table", &exists)
        .await?
        .is_empty()
    {
        return Ok(None);
    }
    let sql = format!(
        "SELECT consistent_point::text FROM {} WHERE slot_name = {} AND completed_at IS NULL",
        snapshot_table(config),
        sql::literal(slot)
    );
    let rows = query(client, "reading the snapshot record", &sql).await?;
    Ok(rows.first().map(|row| {
        row.first()
            .cloned()
            .flatten()
            .and_then(|lsn| lsn.parse().ok())
    }))
}

/// Records the consistent point of a snapshot that began, once the slot exists.
pub async fn snapshot_position(
    client: &mut ReplicationClient,
    config: &RelayConfig,
    slot: &str,
    position: Lsn,
) -> Result<(), SetupError> {
    let sql = format!(
        "UPDATE {} SET consistent_point = {} WHERE slot_name = {}",
        snapshot_table(config),
        sql::literal(&position.to_string()),
        sql::literal(slot)
    );
    query(client, "recording the snapshot position", &sql).await?;
    Ok(())
}

/// Records that the slot's initial snapshot was published completely.
pub async fn complete_snapshot(
    client: &mut ReplicationClient,
    config: &RelayConfig,
    slot: &str,
    rows: u64,
) -> Result<(), SetupError> {
    let sql = format!(
        "UPDATE {} SET completed_at = now(), rows_published = {rows} WHERE slot_name = {}",
        snapshot_table(config),
        sql::literal(slot)
    );
    query(client, "recording the completed snapshot", &sql).await?;
    Ok(())
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
