//! Order service: the `order-placement` saga's orchestrator, with a REST API.
//!
//! `POST /orders` writes the order, the saga's state and the first command in one
//! transaction; the order database's relay carries the command to the inventory
//! service, and the replies come back on `order.reply`, where this service's
//! consumer applies each one once (journal) to the saga ([`placement`]).

#![cfg_attr(not(test), deny(clippy::unwrap_used))]

pub mod api;
mod card;
pub mod console_gate;
pub mod known;
pub mod placement;

use std::sync::Arc;
use std::time::Duration;

use saga_core::outbox::Outbox;
use saga_core::saga::{
    CompensationRetry, Orchestrator, SagaAdmin, StuckRules, SuspendOn, Suspension,
};
use service_kit::{CommonArgs, Counted, Running, Service, ServiceMetrics, Task, Topics};
use sqlx::migrate::Migrator;

pub use api::{PlaceOrder, References};
pub use placement::{OrderPlacement, SAGA_TYPE};
/// A relay the saga console shows ([`Config::console_relays`]).
pub use saga_console::Relay as ConsoleRelay;

/// The service's name (metrics label, default consumer group `order-service`).
pub const SERVICE: &str = "order";
/// Where the API listens unless told otherwise.
pub const DEFAULT_LISTEN: &str = "0.0.0.0:8080";

/// This service's own tables (`sql/order`); the shared tables come from
/// [`saga_core::schema`].
pub static MIGRATIONS: Migrator = sqlx::migrate!("../../sql/order");

/// Brings the service database to the current schema: shared tables, then this
/// service's.
pub async fn migrate(pool: &sqlx::PgPool) -> Result<(), saga_core::schema::MigrateError> {
    saga_core::schema::migrate(pool, &MIGRATIONS).await
}

/// The order service's options.
#[derive(Debug, Clone, clap::Args)]
pub struct Config {
    #[command(flatten)]
    pub common: CommonArgs,

    /// The customer service, asked whether a customer exists before an order is
    /// accepted; empty: do not ask (the saga still rejects unknown customers).
    #[arg(
        long,
        env = "CUSTOMER_SERVICE_URL",
        value_name = "URL",
        default_value = "http://localhost:8081"
    )]
    pub customer_url: String,

    /// The inventory service, asked whether goods exist; empty: do not ask.
    #[arg(
        long,
        env = "INVENTORY_SERVICE_URL",
        value_name = "URL",
        default_value = "http://localhost:8082"
    )]
    pub inventory_url: String,

    /// The payment service, whose card vault (`POST /cards`) exchanges a
    /// `cardNumber` for a token before the order is written; empty: orders must
    /// come with a `cardToken`.
    #[arg(
        long,
        env = "PAYMENT_SERVICE_URL",
        value_name = "URL",
        default_value = "http://localhost:8083"
    )]
    pub payment_url: String,

    /// Milliseconds a participant has to reply before its step fails and is
    /// compensated.
    #[arg(long, env = "SAGA_STEP_TIMEOUT_MS", value_name = "MS", default_value_t = 30_000,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub step_timeout_ms: u64,

    /// Seconds a failing compensation is retried (after 1 s, doubling up to a
    /// minute between tries) before its saga is COMPENSATION_FAILED for an
    /// operator; long enough to outlast a participant's outage.
    #[arg(long, env = "SAGA_COMPENSATION_GIVE_UP_S", value_name = "SECONDS", default_value_t = 86_400,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub compensation_give_up_s: u64,

    /// Which failed sagas are suspended for an operator instead of compensated at
    /// once: `off`, `timeouts` (a step not answered in time, after its retries),
    /// or `failures` (every failure, refusals too). A suspended saga waits on its
    /// failed step for `SAGA_SUSPEND_FOR_S`, for an operator to restart the step
    /// or abort it, and then compensates by itself.
    #[arg(long, env = "SAGA_SUSPEND_ON", value_name = "WHEN", value_enum, default_value_t = SuspendWhen::Off)]
    pub suspend_on: SuspendWhen,

    /// Seconds a suspended saga waits for an operator before it compensates.
    #[arg(long, env = "SAGA_SUSPEND_FOR_S", value_name = "SECONDS", default_value_t = 3_600,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub suspend_for_s: u64,

    /// Milliseconds between two looks for passed step deadlines.
    #[arg(long, env = "SAGA_SWEEP_INTERVAL_MS", value_name = "MS", default_value_t = 500,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub sweep_interval_ms: u64,

    /// Relays whose health and lag the saga console shows (`/console/relays`), as
    /// NAME=URL of their HTTP endpoint, comma-separated.
    #[arg(long = "console-relay", env = "CONSOLE_RELAYS", value_name = "NAME=URL",
          value_delimiter = ',', value_parser = saga_console::Relay::parse)]
    pub console_relays: Vec<saga_console::Relay>,

    /// Dead-letter topics the saga console shows and replays from, comma-separated
    /// [default: this service's consumer's, and the relay's `outbox.dlq`].
    #[arg(
        long = "console-dead-letter-topic",
        env = "CONSOLE_DEAD_LETTER_TOPICS",
        value_name = "TOPIC",
        value_delimiter = ','
    )]
    pub console_dead_letter_topics: Vec<String>,

    /// How many times its step's timeout a running saga may go without progress
    /// before it counts as stuck (metric `saga_stuck`, `saga list --stuck`).
    #[arg(long, env = "SAGA_STUCK_TIMEOUTS", value_name = "N", default_value_t = 3,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub stuck_timeouts: u32,

    /// Seconds a running saga whose step has no timeout may go without progress
    /// before it counts as stuck.
    #[arg(long, env = "SAGA_STUCK_AFTER_S", value_name = "SECONDS", default_value_t = 600,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub stuck_after_s: u64,
}

/// Which failed sagas are suspended (`SAGA_SUSPEND_ON`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SuspendWhen {
    /// None: a failed saga compensates at once.
    Off,
    /// A participant step not answered in time, after its retries.
    Timeouts,
    /// Every failure of a step, refusals too.
    Failures,
}

impl SuspendWhen {
    fn on(self) -> Option<SuspendOn> {
        match self {
            SuspendWhen::Off => None,
            SuspendWhen::Timeouts => Some(SuspendOn::Timeouts),
            SuspendWhen::Failures => Some(SuspendOn::AnyFailure),
        }
    }
}

impl Config {
    /// The defaults, for `common`.
    pub fn new(common: CommonArgs) -> Config {
        Config {
            common,
            customer_url: "http://localhost:8081".into(),
            inventory_url: "http://localhost:8082".into(),
            payment_url: "http://localhost:8083".into(),
            step_timeout_ms: 30_000,
            compensation_give_up_s: 86_400,
            suspend_on: SuspendWhen::Off,
            suspend_for_s: 3_600,
            sweep_interval_ms: 500,
            console_relays: Vec::new(),
            console_dead_letter_topics: Vec::new(),
            stuck_timeouts: saga_core::saga::DEFAULT_STUCK_TIMEOUTS,
            stuck_after_s: saga_core::saga::DEFAULT_STUCK_AFTER.as_secs(),
        }
    }

    /// When a saga counts as stuck (before the definitions are known).
    pub fn stuck_rules(&self) -> StuckRules {
        StuckRules::new()
            .timeouts(self.stuck_timeouts)
            .without_timeout(Duration::from_secs(self.stuck_after_s))
    }

    fn references(&self) -> References {
        let url = |u: &str| Some(u.trim().to_owned()).filter(|u| !u.is_empty());
        References {
            customer_url: url(&self.customer_url),
            inventory_url: url(&self.inventory_url),
            payment_url: url(&self.payment_url),
        }
    }

    /// The dead-letter topics the console reads: as configured, or this service's
    /// consumer's and the relay's default.
    fn console_dead_letter_topics(&self) -> Vec<String> {
        let configured: Vec<String> = self
            .console_dead_letter_topics
            .iter()
            .map(|t| t.trim().to_owned())
            .filter(|t| !t.is_empty())
            .collect();
        if !configured.is_empty() {
            return configured;
        }
        let own = self.common.consumer_config(SERVICE, &[]).dead_letter_topic;
        vec![own, "outbox.dlq".to_owned()]
    }

    fn topics(&self) -> Topics {
        Topics::new(&self.common.topic_prefix)
    }

    /// The orchestrator this configuration runs: it starts sagas on
    /// [`placement::DEFINITION_VERSION`]. When the definition changes, keep the old
    /// one here with `.with_previous(...)`, or give the new one a `migrate_from`.
    pub fn orchestrator(&self) -> anyhow::Result<Orchestrator<OrderPlacement>> {
        let topics = self.topics();
        let retry = CompensationRetry {
            give_up_after: Duration::from_secs(self.compensation_give_up_s),
            ..CompensationRetry::default()
        };
        let suspension = self.suspend_on.on().map(|on| Suspension {
            on,
            hold: Duration::from_secs(self.suspend_for_s),
        });
        let step_timeout = Duration::from_millis(self.step_timeout_ms);
        let definition = placement::definition(&topics, step_timeout, retry, suspension)?;
        Ok(Orchestrator::new(
            definition,
            Outbox::new(),
            topics.order_reply(),
        ))
    }
}

/// Starts the service: migrations and topics, the API, the reply consumer and the
/// deadline sweeper.
pub async fn start(config: Config) -> anyhow::Result<Running> {
    let common = &config.common;
    let pool = common.pool()?;
    let metrics = ServiceMetrics::new();
    let topics = config.topics();
    let orchestrator = Arc::new(config.orchestrator()?);
    let listen = common.listen_or(DEFAULT_LISTEN)?;
    let state = api::AppState {
        pool: pool.clone(),
        orchestrator: Arc::clone(&orchestrator),
        references: config.references(),
        http: reqwest::Client::new(),
        known: Arc::new(known::Known::new()),
    };
    let prepare = service_kit::cli::prepare(
        pool.clone(),
        common.clone(),
        SERVICE,
        &MIGRATIONS,
        topics.all().to_vec(),
    );
    let consumer = Task::consumer(
        common.consumer_config(SERVICE, &[topics.order_reply()]),
        pool.clone(),
        Arc::new(Counted::new(
            Arc::clone(&orchestrator),
            Arc::clone(&metrics),
        )),
        Arc::clone(&metrics.consumer),
    );
    let sweeper = {
        let (pool, orchestrator) = (pool.clone(), Arc::clone(&orchestrator));
        let interval = Duration::from_millis(config.sweep_interval_ms);
        Task::new("sweeper", move |shutdown: service_kit::Shutdown| {
            let (pool, orchestrator) = (pool.clone(), Arc::clone(&orchestrator));
            async move {
                orchestrator
                    .run_sweeper(&pool, interval, shutdown.wait())
                    .await;
                Ok(())
            }
        })
    };
    let admin = SagaAdmin::new(pool.clone());
    let stuck_rules = config.stuck_rules().knowing(&orchestrator);
    let counted = Arc::clone(&orchestrator);
    let watched = Arc::clone(&orchestrator);
    let authentication = config.common.auth.authentication(SERVICE);
    let gate = console_gate::Gate {
        authentication: authentication.clone(),
        token_url: console_gate::token_url(&config.common.auth.auth_jwks_url),
        http: reqwest::Client::new(),
        service: "order-service".to_owned(),
    };
    // The saga console beside the API: its actions go through this orchestrator.
    let console = saga_console::Console::new(pool.clone(), "order-service")
        .acting_through(Arc::clone(&orchestrator) as Arc<dyn saga_console::SagaActions>)
        .with_relays(config.console_relays.clone())
        .with_stuck_rules(config.stuck_rules().knowing(&orchestrator))
        .with_dead_letters(saga_console::DeadLetters::new(
            &common.brokers,
            common.kafka_option_map(),
            config.console_dead_letter_topics(),
        ));
    Service::new(SERVICE, pool, listen, metrics)
        .api(
            api::router(state)
                .merge(console_gate::protect(saga_console::router(console), gate))
                .layer(service_kit::auth::layer(authentication)),
        )
        .prepare(prepare)
        .task(consumer)
        .task(sweeper)
        .health_warnings(move || {
            let mut warnings = skipped_warning(&watched.skipped_sagas());
            warnings.extend(version_warning(
                &watched.unknown_version_sagas(),
                watched.unknown_version_count(),
            ));
            warnings
        })
        .extra_metrics(move || {
            let admin = admin.clone();
            let rules = stuck_rules.clone();
            let conflicts = counted.version_conflicts();
            let skipped = counted.skipped_sagas().len();
            let unknown = counted.unknown_version_count();
            async move {
                let mut text = admin.prometheus().await.unwrap_or_else(|e| {
                    tracing::warn!(error = %e, "saga metrics unavailable");
                    String::new()
                });
                text.push_str(&format!(
                    "# HELP saga_version_conflicts_total Saga saves that lost to a concurrent change of the same saga (retried, or left to the next sweep).\n\
                     # TYPE saga_version_conflicts_total counter\n\
                     saga_version_conflicts_total{{saga=\"{saga}\"}} {conflicts}\n\
                     # HELP saga_skipped Sagas whose passed deadline the sweeper cannot handle (their state does not fit the definition), left for an operator.\n\
                     # TYPE saga_skipped gauge\n\
                     saga_skipped{{saga=\"{saga}\"}} {skipped}\n\
                     # HELP saga_unknown_version Running sagas on a definition version this code cannot drive (neither kept nor migratable): their replies are held, their deadlines wait.\n\
                     # TYPE saga_unknown_version gauge\n\
                     saga_unknown_version{{saga=\"{saga}\"}} {unknown}\n",
                    saga = placement::SAGA_TYPE
                ));
                match admin.stuck(&rules).await {
                    Ok(stuck) => text.push_str(&stuck_metric(&stuck)),
                    Err(e) => tracing::warn!(error = %e, "stuck saga metrics unavailable"),
                }
                text
            }
        })
        .start()
        .await
}

/// `saga_stuck{saga_type, reason}`: stuck sagas by why (`no_progress`,
/// `unknown_version`); both reasons of the order saga are always present.
fn stuck_metric(stuck: &[saga_core::saga::StuckSaga]) -> String {
    let mut counts: std::collections::BTreeMap<(String, &str), usize> =
        ["no_progress", "unknown_version"]
            .into_iter()
            .map(|reason| ((placement::SAGA_TYPE.to_owned(), reason), 0))
            .collect();
    for s in stuck {
        *counts
            .entry((s.saga.saga_type.clone(), s.reason.code()))
            .or_default() += 1;
    }
    let mut text = String::from(
        "# HELP saga_stuck Running sagas without progress for several times their step's timeout (or an absolute age), or on a definition version this code cannot drive.\n\
         # TYPE saga_stuck gauge\n",
    );
    for ((saga_type, reason), n) in counts {
        text.push_str(&format!(
            "saga_stuck{{saga_type=\"{}\",reason=\"{reason}\"}} {n}\n",
            saga_type.replace('\\', "\\\\").replace('"', "\\\"")
        ));
    }
    text
}

/// The `/health` warning for sagas on definition versions this code cannot drive:
/// how many, the first few with their reasons, and what to do.
fn version_warning(
    unknown: &[(uuid::Uuid, String)],
    count: usize,
) -> std::collections::BTreeMap<String, String> {
    const SHOWN: usize = 3;
    let mut warnings = std::collections::BTreeMap::new();
    if unknown.is_empty() {
        return warnings;
    }
    let shown: Vec<String> = unknown
        .iter()
        .take(SHOWN)
        .map(|(id, reason)| format!("{id}: {reason}"))
        .collect();
    let more = count.saturating_sub(SHOWN);
    warnings.insert(
        "versions".to_owned(),
        format!(
            "{count} running saga(s) on a definition version this code cannot drive ({}{}); their \
             replies are held and their deadlines wait until code that knows the version runs \
             (keep the old definition with `with_previous`, or declare a `migrate_from`); \
             list with `order-service saga list --stuck`",
            shown.join("; "),
            if more > 0 {
                format!("; {more} more")
            } else {
                String::new()
            }
        ),
    );
    warnings
}

/// The `/health` warning for sagas the sweeper skipped: how many, the first few
/// with their reasons, and where to look.
fn skipped_warning(skipped: &[(uuid::Uuid, String)]) -> std::collections::BTreeMap<String, String> {
    const SHOWN: usize = 3;
    let mut warnings = std::collections::BTreeMap::new();
    if skipped.is_empty() {
        return warnings;
    }
    let shown: Vec<String> = skipped
        .iter()
        .take(SHOWN)
        .map(|(id, reason)| format!("{id}: {reason}"))
        .collect();
    let more = skipped.len().saturating_sub(SHOWN);
    warnings.insert(
        "sweeper".to_owned(),
        format!(
            "{} saga(s) skipped, their state does not fit the definition ({}{}); the others go on; \
             inspect with `order-service saga list --stuck 0`, abort with `order-service saga abort ID`",
            skipped.len(),
            shown.join("; "),
            if more > 0 { format!("; {more} more") } else { String::new() }
        ),
    );
    warnings
}
