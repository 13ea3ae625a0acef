//! `saga-core`: the library services are written with.
//!
//! - [`schema`]: the shared tables (`outbox`, `processed_messages`, `saga_state`) as
//!   migrations a service embeds beside its own.
//! - [`status`]: the lifecycle states a saga and its steps go through.

#![cfg_attr(not(test), deny(clippy::unwrap_used))]

pub mod schema;
pub mod status;
