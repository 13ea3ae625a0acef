//! `outbox-relay`: tails one PostgreSQL database's logical replication stream
//! (`pgoutput`) and relays committed outbox rows to Kafka, confirming the slot's
//! position only after the broker has acknowledged them.
//!
//! - [`replication`]: the replication-protocol client (no libpq).
//! - [`pgoutput`]: the decoder of pgoutput messages, pure.
//! - [`routing`]: outbox row to Kafka record, Debezium-compatible.
//! - [`kafka`]: the producer and topic creation.
//! - [`ack`]: which WAL position may be confirmed.
//! - [`pipeline`]: the replication loop tying them together.
//! - [`runner`]: connect, prepare, stream, reconnect; [`run`] is the entry point.

#![cfg_attr(not(test), deny(clippy::unwrap_used))]

pub mod ack;
pub mod admin;
pub mod config;
pub mod deadletter;
pub mod health;
pub mod heartbeat;
pub mod kafka;
pub mod lsn;
pub mod metrics;
pub mod pgoutput;
pub mod pipeline;
pub mod replication;
pub mod routing;
pub mod runner;
pub mod setup;
pub mod snapshot;

pub use config::RelayConfig;
pub use lsn::Lsn;
pub use runner::run;
