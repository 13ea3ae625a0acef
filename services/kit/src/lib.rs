//! What the shop's services share: their configuration ([`config`]), card numbers
//! and the vault's tokens for them ([`cards`]), the HTTP
//! surface with JSON errors, `/health` and `/metrics` ([`http`], [`metrics`]), the
//! consumer's instance name and its claim ([`instance`]), topic names and creation
//! ([`topics`]), money as integer cents ([`money`]), the start of a participant of
//! the order saga ([`participant`]), and the runner that keeps a service's
//! consumer, background tasks and HTTP server going until it is told to stop
//! ([`runner`]). Who is calling: the auth service's access tokens verified and the
//! caller handed to handlers ([`auth`]); the demo data's shared ids ([`demo`]).

#![cfg_attr(not(test), deny(clippy::unwrap_used))]

pub mod auth;
pub mod cards;
pub mod cli;
pub mod config;
pub mod demo;
pub mod http;
pub mod instance;
pub mod metrics;
pub mod money;
pub mod participant;
pub mod runner;
#[cfg(feature = "testing")]
pub mod testing;
pub mod topics;

pub use auth::{AuthArgs, Caller, JwksVerifier};
pub use config::{init_logging, CommonArgs};
pub use http::{ApiError, ApiJson, ApiPath, ApiQuery};
pub use metrics::{Counted, ServiceMetrics};
pub use money::Amount;
pub use runner::{Running, Service, Shutdown, Task};
pub use topics::Topics;
