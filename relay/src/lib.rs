//! `outbox-relay`: tails one PostgreSQL database's logical replication stream
//! (`pgoutput`) and relays committed outbox rows to Kafka, confirming the slot's
//! position only after the broker has acknowledged them.

pub mod lsn;

pub use lsn::Lsn;
