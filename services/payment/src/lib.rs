//! Payment service: charges and refunds.
//!
//! It consumes the saga's `Charge` and `Refund` commands from `payment.request`
//! ([`commands`]), replies to `order.reply` through its outbox, keeps the card
//! vault that turns card numbers into tokens (`POST /cards`, [`cards`]), and
//! answers `GET /payments/{orderId}` ([`api`]).

#![cfg_attr(not(test), deny(clippy::unwrap_used))]

use service_kit::participant::Participant;
use service_kit::{Amount, CommonArgs, Running, Topics};
use sqlx::migrate::Migrator;
use sqlx::PgPool;

pub mod api;
pub mod cards;
pub mod commands;

pub use commands::CommandHandler;

/// The service's name: its label on metrics, its consumer group's stem.
pub const SERVICE: &str = "payment";

/// Where the HTTP API listens unless `--listen` says otherwise.
pub const DEFAULT_LISTEN: &str = "0.0.0.0:8083";

/// The largest charge accepted unless `--charge-limit` says otherwise: 5000.00.
pub const DEFAULT_CHARGE_LIMIT: Amount = Amount(500_000);

/// This service's own tables (`sql/payment`); the shared tables come from
/// [`saga_core::schema`].
pub static MIGRATIONS: Migrator = sqlx::migrate!("../../sql/payment");

/// Brings the service database to the current schema: shared tables, then this
/// service's.
pub async fn migrate(pool: &sqlx::PgPool) -> Result<(), saga_core::schema::MigrateError> {
    saga_core::schema::migrate(pool, &MIGRATIONS).await
}

/// The service's configuration: the options every service has and the charge limit.
#[derive(Debug, Clone, clap::Args)]
pub struct Config {
    #[command(flatten)]
    pub common: CommonArgs,

    /// Charges above this amount are declined.
    #[arg(long, env = "PAYMENT_CHARGE_LIMIT", value_name = "AMOUNT",
          default_value = "5000.00", value_parser = parse_limit)]
    pub charge_limit: Amount,

    /// The card vault's HMAC key, 64 or more hex digits; unset: a key made once
    /// and kept in the payment database (fine for a demo, not for production).
    #[arg(
        long,
        env = "PAYMENT_CARD_VAULT_KEY",
        value_name = "HEX",
        hide_env_values = true
    )]
    pub card_vault_key: Option<cards::VaultKey>,
}

impl Config {
    /// `common` with the default charge limit.
    pub fn new(common: CommonArgs) -> Config {
        Config {
            common,
            charge_limit: DEFAULT_CHARGE_LIMIT,
            card_vault_key: None,
        }
    }
}

/// A decimal amount with at most two places, not negative.
fn parse_limit(text: &str) -> Result<Amount, String> {
    let limit = Amount::parse(text)?;
    if limit.cents() < 0 {
        return Err(format!("a charge limit cannot be negative ({limit})"));
    }
    Ok(limit)
}

/// Starts the service in the background: the API at once (503 until prepared), then
/// migrations and topics, then the consumer of `payment.request`.
pub async fn start(config: Config) -> anyhow::Result<Running> {
    let participant = Participant {
        name: SERVICE,
        default_listen: DEFAULT_LISTEN,
        migrations: &MIGRATIONS,
        request_topic: Topics::payment_request,
        handler: CommandHandler::new(config.charge_limit),
        api: move |pool: PgPool| {
            let key = config.card_vault_key.map(|key| key.0);
            api::router(pool.clone()).merge(cards::router(cards::CardVault::new(pool, key)))
        },
    };
    service_kit::participant::start(config.common, participant).await
}

/// The demo data has no payments (they are made by orders); this only says so, so
/// every service answers `seed` alike.
pub async fn seed(_pool: &PgPool) -> anyhow::Result<()> {
    tracing::info!("the payment service has no demo data; nothing to seed");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        config: Config,
    }

    #[test]
    fn the_charge_limit_defaults_to_5000_and_takes_two_decimal_places() {
        let cli = Cli::try_parse_from(["payment-service", "--database-url", "postgres://x/y"])
            .expect("valid arguments");
        assert_eq!(cli.config.charge_limit, DEFAULT_CHARGE_LIMIT);
        assert_eq!(Config::new(cli.config.common).charge_limit, Amount(500_000));
        let cli = Cli::try_parse_from([
            "payment-service",
            "--database-url",
            "postgres://x/y",
            "--charge-limit",
            "12.5",
        ])
        .expect("valid arguments");
        assert_eq!(cli.config.charge_limit, Amount(1_250));
        for bad in ["-1", "1.001", "lots"] {
            let args = [
                "payment-service",
                "--database-url",
                "u",
                "--charge-limit",
                bad,
            ];
            assert!(Cli::try_parse_from(args).is_err(), "{bad:?} was accepted");
        }
    }
}
