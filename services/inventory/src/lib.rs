//! Inventory service: goods and stock reservations.
//!
//! It consumes the saga's `ReserveGoods` and `ReleaseGoods` commands from
//! `inventory.request` ([`commands`]), replies to `order.reply` through its outbox,
//! and answers `GET /goods/{id}` ([`api`]).

#![cfg_attr(not(test), deny(clippy::unwrap_used))]

use anyhow::Context as _;
use service_kit::participant::Participant;
use service_kit::{CommonArgs, Running, Topics};
use sqlx::migrate::Migrator;
use sqlx::PgPool;
use uuid::Uuid;

pub mod api;
pub mod commands;

pub use commands::CommandHandler;

/// The service's name: its label on metrics, its consumer group's stem.
pub const SERVICE: &str = "inventory";

/// Where the HTTP API listens unless `--listen` says otherwise.
pub const DEFAULT_LISTEN: &str = "0.0.0.0:8082";

/// Demo goods "widget", 100 in stock.
pub const WIDGET: Uuid = Uuid::from_u128(0xa001);

/// Demo goods "gadget", a single one in stock (the second order for it fails).
pub const GADGET: Uuid = Uuid::from_u128(0xa002);

/// This service's own tables (`sql/inventory`); the shared tables come from
/// [`saga_core::schema`].
pub static MIGRATIONS: Migrator = sqlx::migrate!("../../sql/inventory");

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
/// migrations and topics, then the consumer of `inventory.request`.
pub async fn start(config: Config) -> anyhow::Result<Running> {
    let participant = Participant {
        name: SERVICE,
        default_listen: DEFAULT_LISTEN,
        migrations: &MIGRATIONS,
        request_topic: Topics::inventory_request,
        handler: CommandHandler::new(),
        api: api::router,
    };
    service_kit::participant::start(config.common, participant).await
}

/// Writes the demo goods of services/README.md. Goods that exist already are left
/// as they are (their stock may have moved), so running it again changes nothing.
pub async fn seed(pool: &PgPool) -> anyhow::Result<()> {
    let mut inserted = 0;
    for (id, name, stock) in [(WIDGET, "widget", 100), (GADGET, "gadget", 1)] {
        let done = sqlx::query(
            "INSERT INTO goods (id, name, stock) VALUES ($1, $2, $3) ON CONFLICT (id) DO NOTHING",
        )
        .bind(id)
        .bind(name)
        .bind(stock)
        .execute(pool)
        .await
        .with_context(|| format!("cannot write the demo goods {name}"))?;
        inserted += done.rows_affected();
    }
    tracing::info!(inserted, existing = 2 - inserted, "demo goods seeded");
    Ok(())
}
