//! The options every service has, as flags and environment variables.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use saga_core::consumer::ConsumerConfig;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::PgPool;

/// Options shared by the four services (flattened into each binary's command line).
#[derive(Debug, Clone, clap::Args)]
pub struct CommonArgs {
    /// PostgreSQL URL of the service's own database.
    #[arg(long, env = "DATABASE_URL", value_name = "URL", hide_env_values = true)]
    pub database_url: String,

    /// Kafka bootstrap servers.
    #[arg(
        long,
        env = "KAFKA_BROKERS",
        value_name = "LIST",
        default_value = "localhost:9092"
    )]
    pub brokers: String,

    /// Address of the HTTP API, /health and /metrics [default: the service's own port].
    #[arg(long, env = "HTTP_LISTEN", value_name = "ADDR")]
    pub listen: Option<SocketAddr>,

    /// Put before every topic name (e.g. `test1.`), so several shops can share a broker.
    #[arg(long, env = "TOPIC_PREFIX", value_name = "PREFIX", default_value = "")]
    pub topic_prefix: String,

    /// Partitions of the topics the service creates.
    #[arg(long, env = "TOPIC_PARTITIONS", value_name = "N", default_value_t = 3,
          value_parser = clap::value_parser!(i32).range(1..))]
    pub topic_partitions: i32,

    /// Consumer group (also the journal's consumer name) [default: <topic prefix><service>-service].
    #[arg(long, env = "CONSUMER_GROUP", value_name = "GROUP")]
    pub group_id: Option<String>,

    /// librdkafka option for every Kafka client (TLS, SASL, ...); repeatable.
    #[arg(long = "kafka-option", env = "KAFKA_OPTIONS", value_name = "KEY=VALUE",
          value_delimiter = ',', value_parser = parse_option)]
    pub kafka_options: Vec<(String, String)>,

    /// Connections in the database pool, at most.
    #[arg(long, env = "DATABASE_MAX_CONNECTIONS", value_name = "N", default_value_t = 10,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub max_connections: u32,
}

fn parse_option(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((key, value)) if !key.trim().is_empty() => {
            Ok((key.trim().to_owned(), value.trim().to_owned()))
        }
        _ => Err(format!("{text:?} is not KEY=VALUE")),
    }
}

impl CommonArgs {
    /// Options for a service reaching `database_url` and `brokers`, every other
    /// option at its default.
    pub fn new(database_url: impl Into<String>, brokers: impl Into<String>) -> CommonArgs {
        CommonArgs {
            database_url: database_url.into(),
            brokers: brokers.into(),
            listen: None,
            topic_prefix: String::new(),
            topic_partitions: 3,
            group_id: None,
            kafka_options: Vec::new(),
            max_connections: 10,
        }
    }

    /// The consumer group of `service` (`order`, `customer`, ...): the one given,
    /// or `<topic prefix><service>-service`, so that shops sharing a broker under
    /// different prefixes keep their groups (and dead-letter topics,
    /// `<group>.dlq`) apart.
    pub fn group(&self, service: &str) -> String {
        self.group_id
            .clone()
            .unwrap_or_else(|| format!("{}{service}-service", self.topic_prefix))
    }

    /// The address to listen on: the one given, or the service's `default`.
    pub fn listen_or(&self, default: &str) -> Result<SocketAddr, std::net::AddrParseError> {
        self.listen.map_or_else(|| default.parse(), Ok)
    }

    /// The librdkafka options given.
    pub fn kafka_option_map(&self) -> BTreeMap<String, String> {
        self.kafka_options.iter().cloned().collect()
    }

    /// A consumer configuration for `service` reading `topics`.
    pub fn consumer_config(&self, service: &str, topics: &[String]) -> ConsumerConfig {
        let mut config = ConsumerConfig::new(&self.brokers, self.group(service), topics);
        config.options = self.kafka_option_map();
        config
    }

    /// A pool on the service's database. Connections are made lazily, so a service
    /// starts while its database is still coming up and reports it on `/health`.
    pub fn pool(&self) -> Result<PgPool, sqlx::Error> {
        let options: PgConnectOptions = self.database_url.parse()?;
        // The migrator's "already exists, skipping" notices are not news.
        let options = options.options([("client_min_messages", "warning")]);
        Ok(PgPoolOptions::new()
            .max_connections(self.max_connections)
            .acquire_timeout(Duration::from_secs(5))
            .connect_lazy_with(options))
    }
}

/// Logs to stderr, filtered by `RUST_LOG` (default `info`).
pub fn init_logging() {
    use tracing_subscriber::EnvFilter;
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        common: CommonArgs,
    }

    /// Whether the environment sets `name`: clap then reads it instead of a default
    /// (a shell that ran `eval "$(scripts/env print)"` sets `DATABASE_URL` and
    /// `KAFKA_BROKERS`), so a check of that default does not apply.
    fn set_outside(name: &str) -> bool {
        std::env::var_os(name).is_some()
    }

    #[test]
    fn defaults_and_options() {
        let cli = Cli::try_parse_from([
            "svc",
            "--database-url",
            "postgres://x/y",
            "--kafka-option",
            "security.protocol=ssl,client.id = a=b",
        ])
        .expect("valid arguments");
        if !set_outside("KAFKA_BROKERS") {
            assert_eq!(cli.common.brokers, "localhost:9092");
        }
        if !set_outside("TOPIC_PARTITIONS") {
            assert_eq!(cli.common.topic_partitions, 3);
        }
        let mut common = cli.common.clone();
        common.group_id = None;
        common.topic_prefix = String::new();
        assert_eq!(common.group("customer"), "customer-service");
        let consumer = common.consumer_config("customer", &["customer.request".into()]);
        assert_eq!(consumer.dead_letter_topic, "customer-service.dlq");
        let mut prefixed = common.clone();
        prefixed.topic_prefix = "t1.".into();
        assert_eq!(
            prefixed.consumer_config("customer", &[]).dead_letter_topic,
            "t1.customer-service.dlq",
            "the default group carries the prefix, and the dead letters with it"
        );
        let options = common.kafka_option_map();
        assert_eq!(options["security.protocol"], "ssl");
        assert_eq!(options["client.id"], "a=b");
    }

    #[test]
    fn bad_options_are_refused() {
        let mut refused = vec![
            vec!["svc", "--database-url", "u", "--kafka-option", "novalue"],
            vec!["svc", "--database-url", "u", "--topic-partitions", "0"],
        ];
        if !set_outside("DATABASE_URL") {
            refused.push(vec!["svc"]); // no database URL
        }
        for args in refused {
            assert!(
                Cli::try_parse_from(args.clone()).is_err(),
                "{args:?} was accepted"
            );
        }
    }
}
