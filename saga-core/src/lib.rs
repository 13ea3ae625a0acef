//! `saga-core`: the library services are written with.
//!
//! - [`barrier`]: the participant's barrier that turns duplicate deliveries, null
//!   compensations and hanging actions into no-ops.
//! - [`outbox`]: the outbox writer, inserting events in the caller's transaction.
//! - [`schema`]: the shared tables (`outbox`, `processed_messages`, `saga_state`, `saga_barrier`, `outbox_relay_snapshots`) as
//!   migrations a service embeds beside its own.
//! - [`status`]: the lifecycle states a saga and its steps go through.

#![cfg_attr(not(test), deny(clippy::unwrap_used))]

pub mod barrier;
pub mod outbox;
pub mod schema;
pub mod status;
