//! The options every service has, as flags and environment variables.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use saga_core::consumer::ConsumerConfig;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::PgPool;

/// Options shared by the four services (flattened into each binary's command line).
///
/// Its `Debug` hides secrets: the password in `database_url` and the values of
/// `kafka_options` (`sasl.password`, ...).
#[derive(Clone, clap::Args)]
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

    /// Messages of different keys the consumer handles in one transaction, at most,
    /// when a poll brings several; 1: a transaction per message.
    #[arg(long, env = "CONSUMER_BATCH_MAX", value_name = "N",
          default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..))]
    pub consumer_batch_max: u32,

    /// Connections in the database pool, at most.
    #[arg(long, env = "DATABASE_MAX_CONNECTIONS", value_name = "N", default_value_t = 10,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub max_connections: u32,

    /// This process's name in its consumer group, the same across its restarts and
    /// unlike any other live process's (in Kubernetes, the pod's name); a restarted
    /// process takes its predecessor's partitions at once. Empty: none
    /// [default: the hostname].
    #[arg(long, env = "INSTANCE_NAME", value_name = "NAME", value_parser = parse_instance_name)]
    pub instance_name: Option<String>,

    /// Who may call the API: the auth service's keys (`AUTH_JWKS_URL`, ...).
    #[command(flatten)]
    pub auth: crate::auth::AuthArgs,
}

impl std::fmt::Debug for CommonArgs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CommonArgs")
            .field("database_url", &without_password(&self.database_url))
            .field("brokers", &self.brokers)
            .field("listen", &self.listen)
            .field("topic_prefix", &self.topic_prefix)
            .field("topic_partitions", &self.topic_partitions)
            .field("group_id", &self.group_id)
            .field("consumer_batch_max", &self.consumer_batch_max)
            .field(
                "kafka_options",
                &self
                    .kafka_options
                    .iter()
                    .map(|(key, _)| format!("{key}=***"))
                    .collect::<Vec<_>>(),
            )
            .field("max_connections", &self.max_connections)
            .field("instance_name", &self.instance_name)
            .field("auth", &self.auth)
            .finish()
    }
}

/// `url` with its passwords replaced by `***`: the one in the user info
/// (`postgres://user:***@host/db`) and the values of query parameters whose name
/// ends in `password` (`password`, `sslpassword`). Text that is not a URL is hidden
/// whole, since where a password would be in it is unknown.
fn without_password(url: &str) -> String {
    const HIDDEN: &str = "***";
    let Some(scheme_end) = url.find("://").map(|i| i + 3) else {
        return HIDDEN.to_owned();
    };
    let (scheme, rest) = url.split_at(scheme_end);
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, rest) = rest.split_at(authority_end);
    let authority = match authority.rsplit_once('@') {
        Some((user_info, host)) => match user_info.split_once(':') {
            Some((user, _password)) => format!("{user}:{HIDDEN}@{host}"),
            None => authority.to_owned(),
        },
        None => authority.to_owned(),
    };
    let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
    if query.is_empty() {
        return format!("{scheme}{authority}{rest}");
    }
    let (query, fragment) = match query.split_once('#') {
        Some((query, fragment)) => (query, format!("#{fragment}")),
        None => (query, String::new()),
    };
    let query = query
        .split('&')
        .map(|pair| match pair.split_once('=') {
            Some((name, _value)) if name.to_ascii_lowercase().ends_with("password") => {
                format!("{name}={HIDDEN}")
            }
            _ => pair.to_owned(),
        })
        .collect::<Vec<_>>()
        .join("&");
    format!("{scheme}{authority}{path}?{query}{fragment}")
}

fn parse_instance_name(text: &str) -> Result<String, String> {
    let name = text.trim();
    if name.is_empty() || crate::instance::is_valid(name) {
        Ok(name.to_owned())
    } else {
        Err(format!(
            "{name:?} is not 1 to 249 letters, digits, '.', '_' or '-' (empty: no instance name)"
        ))
    }
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
            consumer_batch_max: 32,
            max_connections: 10,
            instance_name: None,
            auth: crate::auth::AuthArgs::off(),
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

    /// The instance name: the one given (`None` when it is empty), or the hostname.
    pub fn instance_name(&self) -> Option<String> {
        match &self.instance_name {
            Some(name) if name.is_empty() => None,
            Some(name) => Some(name.clone()),
            None => crate::instance::hostname(),
        }
    }

    /// A consumer configuration for `service` reading `topics`, with the instance
    /// name as its instance id ([`crate::Task::consumer`] claims it before use).
    pub fn consumer_config(&self, service: &str, topics: &[String]) -> ConsumerConfig {
        let mut config = ConsumerConfig::new(&self.brokers, self.group(service), topics);
        config.options = self.kafka_option_map();
        config.instance_id = self.instance_name();
        config.batch_max = usize::try_from(self.consumer_batch_max).unwrap_or(usize::MAX);
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

/// Logs to stderr, filtered by `RUST_LOG` (default `info`), and exports traces
/// over OTLP/HTTP when `OTEL_EXPORTER_OTLP_ENDPOINT` (or
/// `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) is set, as `OTEL_SERVICE_NAME` or else
/// the binary's name (`order-service`, ...). See `docs/tracing.md`.
pub fn init_logging() {
    let binary = std::env::args_os()
        .next()
        .and_then(|program| {
            std::path::Path::new(&program)
                .file_name()
                .map(|name| name.to_string_lossy().into_owned())
        })
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| "shop-service".to_owned());
    telemetry::init(&binary, "RUST_LOG");
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
        if !set_outside("CONSUMER_BATCH_MAX") {
            assert_eq!(
                cli.common.consumer_config("customer", &[]).batch_max,
                saga_core::consumer::DEFAULT_BATCH_MAX
            );
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
    fn the_instance_name_is_given_empty_or_the_hostname() {
        let parse = |args: &[&str]| {
            let mut all = vec!["svc", "--database-url", "postgres://x/y"];
            all.extend_from_slice(args);
            Cli::try_parse_from(all).map(|cli| cli.common)
        };
        let given = parse(&["--instance-name", "order-0"]).expect("valid");
        assert_eq!(given.instance_name().as_deref(), Some("order-0"));
        assert_eq!(
            given.consumer_config("order", &[]).instance_id.as_deref(),
            Some("order-0")
        );
        let none = parse(&["--instance-name", ""]).expect("valid");
        assert_eq!(none.instance_name(), None);
        assert_eq!(none.consumer_config("order", &[]).instance_id, None);
        assert!(parse(&["--instance-name", "order 0"]).is_err());
        if !set_outside("INSTANCE_NAME") {
            let default = parse(&[]).expect("valid");
            assert_eq!(default.instance_name, None);
            assert_eq!(default.instance_name(), crate::instance::hostname());
        }
    }

    #[test]
    fn debug_hides_the_database_password_and_kafka_option_values() {
        let mut common = CommonArgs::new("postgres://u:hunter2@h/db", "b:9092");
        common.kafka_options = vec![("sasl.password".into(), "swordfish".into())];
        let debug = format!("{common:?}");
        assert!(!debug.contains("hunter2"), "{debug}");
        assert!(!debug.contains("swordfish"), "{debug}");
        // What is not secret still shows.
        assert!(debug.contains("postgres://u:***@h/db"), "{debug}");
        assert!(debug.contains("sasl.password=***"), "{debug}");
        assert!(debug.contains("b:9092"), "{debug}");
        // Alternate form and the services' configurations, which embed CommonArgs.
        assert!(!format!("{common:#?}").contains("hunter2"));
        let cli = Cli { common };
        assert!(!format!("{cli:?}").contains("hunter2"));
    }

    #[test]
    fn passwords_are_cut_out_of_database_urls() {
        for (url, shown) in [
            ("postgres://u:hunter2@h/db", "postgres://u:***@h/db"),
            (
                "postgresql://u:hun@ter2@h:5432/db?sslmode=require",
                "postgresql://u:***@h:5432/db?sslmode=require",
            ),
            (
                "postgres://u@h/db?password=hunter2&sslmode=disable",
                "postgres://u@h/db?password=***&sslmode=disable",
            ),
            (
                "postgres://h?sslpassword=hunter2#x",
                "postgres://h?sslpassword=***#x",
            ),
            ("postgres://u:hunter2@h", "postgres://u:***@h"),
            ("postgres://u@h/db", "postgres://u@h/db"),
            ("host=h password=hunter2", "***"),
        ] {
            assert_eq!(without_password(url), shown, "{url}");
        }
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
