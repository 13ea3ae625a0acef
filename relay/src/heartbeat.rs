//! Heartbeats: a transactional `pg_logical_emit_message` every interval.
//!
//! A slot only moves when the relay confirms a position the server sent it. On a
//! database where nothing is written, or only tables outside the publication change
//! (pgoutput skips empty transactions), the server may send nothing for a long time
//! while WAL from other databases of the cluster piles up behind the slot. A
//! heartbeat is a tiny transaction in the relay's own database: it comes back through
//! the stream as Begin, Message, Commit, the relay confirms its end like any other
//! transaction, and the slot moves (DESIGN contract 6). That it comes back also
//! proves the stream is alive, which the health check uses.
//!
//! The same connection reads the slot's lag in bytes (`pg_current_wal_lsn()` minus
//! `confirmed_flush_lsn`) for the metrics.

use std::time::Duration;

use crate::replication::{ConnectConfig, ReplicationClient, ReplicationError};
use crate::sql;

/// Prefix of the relay's heartbeat messages; never routed.
pub const HEARTBEAT_PREFIX: &str = "outbox-relay-heartbeat";

/// What one heartbeat round observed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Beat {
    /// WAL bytes between the server's current position and the slot's confirmed one.
    pub slot_lag_bytes: Option<u64>,
}

/// A connection that emits heartbeats for `slot`.
#[derive(Debug)]
pub struct Heartbeat {
    connect: ConnectConfig,
    slot: String,
    client: Option<ReplicationClient>,
}

impl Heartbeat {
    pub fn new(connect: ConnectConfig, slot: String) -> Heartbeat {
        Heartbeat {
            connect,
            slot,
            client: None,
        }
    }

    /// Emits one heartbeat and reads the slot's lag, connecting when needed. A failed
    /// round drops the connection; the next round connects again.
    pub async fn beat(&mut self) -> Result<Beat, ReplicationError> {
        let result = self.try_beat().await;
        if result.is_err() {
            if let Some(client) = self.client.take() {
                client.close().await;
            }
        }
        result
    }

    async fn try_beat(&mut self) -> Result<Beat, ReplicationError> {
        if self.client.is_none() {
            self.client = Some(ReplicationClient::connect(&self.connect).await?);
        }
        let Some(client) = self.client.as_mut() else {
            return Ok(Beat {
                slot_lag_bytes: None,
            });
        };
        client
            .simple_query(&format!(
                "SELECT pg_logical_emit_message(true, {}, {})",
                sql::literal(HEARTBEAT_PREFIX),
                sql::literal(&self.slot)
            ))
            .await?;
        let rows = client
            .simple_query(&format!(
                "SELECT (pg_current_wal_lsn() - confirmed_flush_lsn)::bigint \
                 FROM pg_replication_slots WHERE slot_name = {}",
                sql::literal(&self.slot)
            ))
            .await?;
        let slot_lag_bytes = rows
            .first()
            .and_then(|row| row.first())
            .and_then(|v| v.as_deref())
            .and_then(|v| v.parse::<i64>().ok())
            .map(|v| u64::try_from(v).unwrap_or(0));
        Ok(Beat { slot_lag_bytes })
    }

    /// Beats every `interval` until the future is dropped, reporting each round.
    pub async fn run(
        mut self,
        interval: Duration,
        mut report: impl FnMut(Result<Beat, ReplicationError>),
    ) {
        let mut timer = tokio::time::interval(interval);
        timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            timer.tick().await;
            report(self.beat().await);
        }
    }
}
