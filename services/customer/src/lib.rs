//! Customer service: credit limits and credit reservations.
//!
//! It consumes the saga's `ReserveCredit` and `ReleaseCredit` commands from
//! `customer.request` ([`commands`]), replies to `order.reply` through its outbox,
//! and answers `GET /customers/{id}` ([`api`]).

#![cfg_attr(not(test), deny(clippy::unwrap_used))]

use anyhow::Context as _;
use service_kit::participant::Participant;
use service_kit::{Amount, CommonArgs, Running, Topics};
use sqlx::migrate::Migrator;
use sqlx::PgPool;

pub mod api;
pub mod commands;

pub use commands::CommandHandler;

/// The service's name: its label on metrics, its consumer group's stem.
pub const SERVICE: &str = "customer";

/// Where the HTTP API listens unless `--listen` says otherwise.
pub const DEFAULT_LISTEN: &str = "0.0.0.0:8081";

/// The demo customers Ada (credit limit 1000.00) and Bob (50.00); their ids are
/// shared with the auth service's demo users through [`service_kit::demo`].
pub use service_kit::demo::{ADA, BOB};

/// This service's own tables (`sql/customer`); the shared tables come from
/// [`saga_core::schema`].
pub static MIGRATIONS: Migrator = sqlx::migrate!("../../sql/customer");

/// Brings the service database to the current schema: shared tables, then this
/// service's.
pub async fn migrate(pool: &sqlx::PgPool) -> Result<(), saga_core::schema::MigrateError> {
    saga_core::schema::migrate(pool, &MIGRATIONS).await
}

/// The service's configuration: only the options every service has.
#[derive(Debug, Clone, clap::Args)]
pub struct Config {
    #[command(flatten)]
    pub common: CommonArgs,
}

impl Config {
    pub fn new(common: CommonArgs) -> Config {
        Config { common }
    }
}

/// Starts the service in the background: the API at once (503 until prepared), then
/// migrations and topics, then the consumer of `customer.request`.
pub async fn start(config: Config) -> anyhow::Result<Running> {
    let participant = Participant {
        name: SERVICE,
        default_listen: DEFAULT_LISTEN,
        migrations: &MIGRATIONS,
        request_topic: Topics::customer_request,
        handler: CommandHandler::new(),
        api: api::router,
    };
    service_kit::participant::start(config.common, participant).await
}

/// Writes the demo customers of services/README.md, with all their credit available.
/// Customers that exist already are left as they are (their credit may be reserved),
/// so running it again changes nothing.
pub async fn seed(pool: &PgPool) -> anyhow::Result<()> {
    let mut inserted = 0;
    for (id, name, limit) in [(ADA, "Ada", Amount(100_000)), (BOB, "Bob", Amount(5_000))] {
        let done = sqlx::query(
            "INSERT INTO customers (id, name, credit_limit, available_credit) \
             VALUES ($1, $2, $3::bigint::numeric / 100, $3::bigint::numeric / 100) \
             ON CONFLICT (id) DO NOTHING",
        )
        .bind(id)
        .bind(name)
        .bind(limit.cents())
        .execute(pool)
        .await
        .with_context(|| format!("cannot write the demo customer {name}"))?;
        inserted += done.rows_affected();
    }
    tracing::info!(inserted, existing = 2 - inserted, "demo customers seeded");
    Ok(())
}
