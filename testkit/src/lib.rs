//! Test support for the workspace: every integration test talks to a real PostgreSQL
//! with logical replication and a real Kafka-protocol broker.
//!
//! Where they are comes from, in this order:
//! 1. the environment variables `DATABASE_URL` and `KAFKA_BROKERS`;
//! 2. the settings file written by `scripts/env up` (`.local/env` at the workspace
//!    root, or the file named by `OUTBOX_SETTINGS_FILE`).
//!
//! The ambient libpq variables (`PGHOST`, `PGPORT`, ...) are never read: they usually
//! point at a cluster with `wal_level=replica`.
//!
//! Each test takes a [`TestDatabase`] (a fresh database with a random name, dropped
//! together with its replication slots when the value goes out of scope) and topics
//! named by [`unique_name`], so tests run in parallel without seeing each other.
//!
//! The relay's other sinks are tested against NATS, RabbitMQ and Redis at the
//! addresses [`service_url`] reads (`NATS_URL`, `RABBITMQ_URL`, `REDIS_URL`, from
//! the environment or the settings file).
//!
//! Tests of web pages drive a headless Chromium through [`browser::Browser`]; it
//! needs no settings, only the browser packages `scripts/env up` installs.

#![cfg_attr(not(test), deny(clippy::unwrap_used))]

mod broker;
pub mod browser;
mod cluster;
mod database;
mod kafka;
pub mod leftovers;
pub mod process;
mod proxy;
mod settings;

pub use broker::{free_port, PrivateBroker};
pub use cluster::{pg_bin_dir, PrivateCluster};
pub use database::TestDatabase;
pub use kafka::{
    consumer_config, consumer_config_on, create_topic, create_topic_on, producer_config,
    producer_config_on, wait_for_topic, wait_for_topic_on,
};
pub use proxy::PausableProxy;
pub use settings::{
    crate_dir, service_url, setting, settings, Settings, SettingsError, ENV_UP_COMMAND,
};

/// A name nobody else uses: `prefix` followed by `_` and 16 random hex digits.
///
/// Valid as a PostgreSQL identifier (when `prefix` is), a replication slot name and
/// a Kafka topic name.
pub fn unique_name(prefix: &str) -> String {
    let random = uuid::Uuid::new_v4().simple().to_string();
    format!("{prefix}_{}", &random[..16])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unique_names_differ_and_are_valid_identifiers() {
        let a = unique_name("t");
        let b = unique_name("t");
        assert_ne!(a, b);
        for name in [&a, &b] {
            assert!(name.starts_with("t_"));
            assert_eq!(name.len(), 18);
            assert!(name
                .bytes()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'_'));
        }
    }
}
