//! Resume points: where inside a large transaction a restart picks up.
//!
//! A transaction is confirmed to the server only after its last record was
//! acknowledged, so a relay killed halfway through publishing a million-row
//! transaction would get all of it again. A resume point says how far it got:
//! (slot, commit LSN, *n*), every record of the transaction committing at that
//! LSN with an index below *n* was acknowledged (the tracker keeps the count,
//! [`crate::ack`]). It is kept in a small table of the source database, so the
//! next session — in this process or in a relay that took the slot over — finds it
//! ([`prepare`]) and skips those *n* records when the server sends that
//! transaction again.
//!
//! Why nothing is lost: a point only ever covers acknowledged records, and the
//! server sends a transaction's changes in the same order every time it decodes
//! it (WAL order; with streaming on or off alike, aborted subtransactions left
//! out either way), so the first *n* records the relay routes from it are the
//! same *n* each time. The point names its transaction by commit LSN, which no
//! other transaction shares, so a stale point matches nothing.
//!
//! Why a crash re-sends at most one window: the stream counts the records it
//! handed over beyond the *stored* point against `max_in_flight`
//! ([`crate::ack::AckTracker::unconfirmed`]) and stops reading at the window, as it
//! does for records not yet confirmed.
//!
//! The table is `UNLOGGED`: its updates write no WAL, so they cost the server
//! little, never reach a publication or the relay's own stream, and never hold
//! back the slot. An unlogged table is emptied when the server crashes (and is
//! empty on a promoted standby); the relay then re-sends more, never less. Points
//! are written by a task of their own on a separate connection ([`ResumeWriter`]),
//! at most every [`MIN_WRITE_GAP`], and only for transactions large against the
//! window (the stream decides when); the connection is closed after
//! [`IDLE_CLOSE`] without writes, so it does not hold a walsender slot for
//! nothing. When the table cannot be created for lack of privilege, the relay
//! warns once and works without: a crash then re-sends a large transaction whole,
//! as without this module.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::sync::watch;

use crate::config::RelayConfig;
use crate::replication::{ConnectConfig, ReplicationClient, ReplicationError};
use crate::routing::Position;
use crate::{sql, Lsn};

/// The table keeping resume points, in the outbox table's schema.
pub const RESUME_TABLE: &str = "outbox_relay_resume";
/// The least time between two writes of a resume point.
pub const MIN_WRITE_GAP: Duration = Duration::from_millis(10);
/// The writer's connection is closed after this long without a write.
pub const IDLE_CLOSE: Duration = Duration::from_secs(30);
/// The pause before retrying a failed write.
const RETRY: Duration = Duration::from_secs(1);
/// A write that takes longer fails (the session then stops counting on resume
/// points: its reading must not wait on a table someone locked).
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// SQLSTATE of "permission denied".
const INSUFFICIENT_PRIVILEGE: &str = "42501";

/// Whether the missing privilege was reported already (once per process).
static WARNED: AtomicBool = AtomicBool::new(false);

/// What a session starts from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ResumeStart {
    /// Whether resume points can be stored.
    pub available: bool,
    /// The slot's stored point, if any.
    pub point: Option<Position>,
}

/// The resume table, qualified with the outbox table's schema.
pub fn table(config: &RelayConfig) -> String {
    format!(
        "{}.{}",
        sql::ident(&config.postgres.table.schema),
        sql::ident(RESUME_TABLE)
    )
}

/// Creates the resume table when it is missing and reads the slot's point.
/// Lacking the privilege to create the table is not an error: resume points are
/// then off.
pub async fn prepare(
    client: &mut ReplicationClient,
    config: &RelayConfig,
    slot: &str,
) -> Result<ResumeStart, ReplicationError> {
    let table = table(config);
    let exists = format!(
        "SELECT 1 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
         WHERE n.nspname = {} AND c.relname = {}",
        sql::literal(&config.postgres.table.schema),
        sql::literal(RESUME_TABLE)
    );
    if client.simple_query(&exists).await?.is_empty() {
        let create = format!(
            "CREATE UNLOGGED TABLE IF NOT EXISTS {table} (slot_name text PRIMARY KEY, \
             commit_lsn pg_lsn NOT NULL, records bigint NOT NULL, \
             updated_at timestamptz NOT NULL DEFAULT now())"
        );
        match client.simple_query(&create).await {
            Ok(_) => tracing::info!(table = %table, "created the resume point table"),
            Err(e) if e.sqlstate() == Some(INSUFFICIENT_PRIVILEGE) => {
                if !WARNED.swap(true, Ordering::Relaxed) {
                    tracing::warn!(
                        table = %table,
                        error = %e,
                        "cannot create the resume point table (grant CREATE on its schema, or \
                         create it as sql/shared/0007_outbox_relay_resume.sql does); a relay \
                         killed while publishing a large transaction will send all of it again"
                    );
                }
                return Ok(ResumeStart::default());
            }
            Err(e) => return Err(e),
        }
    }
    let slot_literal = sql::literal(slot);
    let rows = client
        .simple_query(&format!(
            "SELECT commit_lsn::text, records::text FROM {table} WHERE slot_name = {slot_literal}"
        ))
        .await?;
    let point = rows.first().and_then(|row| {
        let commit_lsn: Lsn = row.first()?.as_deref()?.parse().ok()?;
        let index: u32 = row.get(1)?.as_deref()?.parse().ok()?;
        Some(Position { commit_lsn, index })
    });
    if let Some(point) = point {
        tracing::debug!(slot, point = %point, "stored resume point");
    }
    Ok(ResumeStart {
        available: true,
        point,
    })
}

/// What the writer reports to the session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stored {
    /// Whether the last write succeeded (false while writes fail).
    pub working: bool,
    /// The last point stored.
    pub point: Option<Position>,
}

/// The session's end of a resume writer: it asks for points to be stored and
/// learns which were.
#[derive(Debug)]
pub struct ResumeLink {
    want: watch::Sender<Option<Position>>,
    stored: watch::Receiver<Stored>,
}

/// The writer's end of a [`ResumeLink`].
#[derive(Debug)]
pub struct WriterEnd {
    pub want: watch::Receiver<Option<Position>>,
    pub stored: watch::Sender<Stored>,
}

impl ResumeLink {
    /// A link and the writer's end, starting from `start` (the point stored when
    /// the session began).
    pub fn new(start: Option<Position>) -> (ResumeLink, WriterEnd) {
        let (want_tx, want_rx) = watch::channel(None);
        let (stored_tx, stored_rx) = watch::channel(Stored {
            working: true,
            point: start,
        });
        (
            ResumeLink {
                want: want_tx,
                stored: stored_rx,
            },
            WriterEnd {
                want: want_rx,
                stored: stored_tx,
            },
        )
    }

    /// Asks for `point` to be stored (a later request replaces one not yet
    /// written).
    pub fn want(&self, point: Position) {
        self.want.send_replace(Some(point));
    }

    /// What is stored now.
    pub fn stored(&self) -> Stored {
        *self.stored.borrow()
    }

    /// Waits until what is stored changes; pending for ever once the writer is
    /// gone. Cancel-safe.
    pub async fn changed(&mut self) -> Stored {
        if self.stored.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
        *self.stored.borrow_and_update()
    }
}

/// A session's link to a writer of its slot's resume points on a task of its own
/// (stopped when the [`WriterTask`] is dropped); none when resume points are off.
pub fn start(
    connect: &ConnectConfig,
    config: &RelayConfig,
    slot: &str,
    resume: ResumeStart,
) -> (Option<ResumeLink>, Option<WriterTask>) {
    if !resume.available {
        return (None, None);
    }
    let (link, end) = ResumeLink::new(resume.point);
    let writer = ResumeWriter::new(connect.clone(), config, slot.to_owned());
    (Some(link), Some(WriterTask(tokio::spawn(writer.run(end)))))
}

/// A running [`ResumeWriter`]; dropping it stops the writer.
#[derive(Debug)]
pub struct WriterTask(tokio::task::JoinHandle<()>);

impl Drop for WriterTask {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Why a point was not stored.
#[derive(Debug, thiserror::Error)]
enum WriteError {
    #[error(transparent)]
    Server(#[from] ReplicationError),
    #[error("storing a resume point took more than {WRITE_TIMEOUT:?}")]
    TimedOut,
}

/// Writes the resume points a session asks for, on a connection of its own.
#[derive(Debug)]
pub struct ResumeWriter {
    connect: ConnectConfig,
    table: String,
    slot: String,
    client: Option<ReplicationClient>,
}

impl ResumeWriter {
    pub fn new(connect: ConnectConfig, config: &RelayConfig, slot: String) -> ResumeWriter {
        ResumeWriter {
            connect,
            table: table(config),
            slot,
            client: None,
        }
    }

    /// Stores one point, connecting when needed.
    async fn write(&mut self, point: Position) -> Result<(), WriteError> {
        let client = match &mut self.client {
            Some(client) => client,
            None => {
                let mut client = ReplicationClient::connect(&self.connect).await?;
                // A lost point means more duplicates after a crash, never a loss:
                // do not wait for the WAL flush (the table writes none anyway).
                client.simple_query("SET synchronous_commit = off").await?;
                self.client.insert(client)
            }
        };
        let sql = format!(
            "INSERT INTO {table} (slot_name, commit_lsn, records) VALUES ({slot}, {lsn}, {n}) \
             ON CONFLICT (slot_name) DO UPDATE SET commit_lsn = EXCLUDED.commit_lsn, \
             records = EXCLUDED.records, updated_at = now()",
            table = self.table,
            slot = sql::literal(&self.slot),
            lsn = sql::literal(&point.commit_lsn.to_string()),
            n = point.index,
        );
        client.simple_query(&sql).await?;
        Ok(())
    }

    /// Stores what the session asks for until it drops its [`ResumeLink`].
    pub async fn run(mut self, end: WriterEnd) {
        let WriterEnd { mut want, stored } = end;
        let mut failing = false;
        loop {
            let changed = tokio::time::timeout(IDLE_CLOSE, want.changed()).await;
            match changed {
                Ok(Ok(())) => {}
                Ok(Err(_)) => break,
                Err(_idle) => {
                    if let Some(client) = self.client.take() {
                        client.close().await;
                    }
                    continue;
                }
            }
            let Some(point) = *want.borrow_and_update() else {
                continue;
            };
            loop {
                let written = tokio::time::timeout(WRITE_TIMEOUT, self.write(point))
                    .await
                    .unwrap_or(Err(WriteError::TimedOut));
                match written {
                    Ok(()) => {
                        if failing {
                            tracing::info!("storing resume points works again");
                            failing = false;
                        }
                        stored.send_replace(Stored {
                            working: true,
                            point: Some(point),
                        });
                        break;
                    }
                    Err(error) => {
                        if !failing {
                            tracing::warn!(error = %error, "cannot store a resume point; retrying");
                            failing = true;
                        }
                        stored.send_modify(|s| s.working = false);
                        // Dropped, not closed: it may be stuck.
                        self.client = None;
                        tokio::time::sleep(RETRY).await;
                        match want.has_changed() {
                            Err(_) => return,
                            Ok(true) => break,
                            Ok(false) => {}
                        }
                    }
                }
            }
            tokio::time::sleep(MIN_WRITE_GAP).await;
        }
        if let Some(client) = self.client.take() {
            client.close().await;
        }
    }
}
