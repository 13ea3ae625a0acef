//! `outbox-relay`: tails one PostgreSQL database's logical replication stream
//! (`pgoutput`) and relays committed outbox rows to Kafka, NATS JetStream, RabbitMQ
//! or Redis Streams, confirming the slot's position only after the destination has
//! acknowledged them.
//!
//! - [`replication`]: the replication-protocol client (no libpq).
//! - [`pgoutput`]: the decoder of pgoutput messages, pure.
//! - [`routing`]: outbox row to record, Debezium-compatible.
//! - [`sink`]: where records go, and the delivery contract; [`sink::kafka`],
//!   [`sink::nats`], [`sink::rabbitmq`] and [`sink::redis`] are the destinations.
//! - [`delivery`]: the one bounded delivery loop, dead letters included.
//! - [`ack`]: which WAL position may be confirmed; [`resume`]: where inside a large
//!   transaction a restart picks up.
//! - [`stream`]: the replication loop tying them together.
//! - [`snapshot`]: the rows already in the table when a slot is created.
//! - [`standby`]: several relays on one slot: who holds it, taking it over.
//! - [`trace`]: the span of a traced record, handed on in its headers.
//! - [`runner`]: connect, prepare, stand by or stream, reconnect; [`run`] is the
//!   entry point.

#![cfg_attr(not(test), deny(clippy::unwrap_used))]

pub mod ack;
pub mod admin;
pub mod config;
pub mod deadletter;
pub mod delivery;
pub mod health;
pub mod heartbeat;
pub mod http;
pub mod lsn;
pub mod metrics;
pub mod pgoutput;
pub mod replication;
pub mod resume;
pub mod routing;
pub mod runner;
pub mod setup;
pub mod sink;
pub mod snapshot;
pub mod sql;
pub mod standby;
pub mod stream;
pub mod trace;

pub use config::RelayConfig;
pub use lsn::Lsn;
pub use runner::run;
