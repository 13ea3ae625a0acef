//! The shop end to end: starts the four services and one relay per service
//! database against the local environment ([`harness`]), talks to their APIs
//! ([`client`]), and checks what must hold once every saga has ended
//! ([`invariants`]). The demo and the end-to-end tests are built on it.

#![cfg_attr(not(test), deny(clippy::unwrap_used))]

pub mod client;
pub mod exposure;
pub mod harness;
pub mod invariants;
pub mod lab;
pub mod post_mortem;
pub mod scenarios;

pub use client::{Card, OrderRequest, ShopClient};
pub use harness::{Mode, ServiceDatabases, Shop, ShopConfig};
pub use invariants::{Balances, Ledger, Report};

/// Sends the logs of the shop's command-line programs (the demo, the scenarios,
/// the benchmarks) to standard error: warnings and worse, unless `RUST_LOG` says
/// otherwise. sqlx's slow-statement warnings are left out: these programs run
/// long statements on purpose (a paced load, a backlog written at once).
pub fn log_to_stderr() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,sqlx::query=error")),
        )
        .with_writer(std::io::stderr)
        .init();
}
