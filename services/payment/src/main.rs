//! `payment-service`: serves the payments (the default), or brings its database
//! to the current schema, or writes the demo data.

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use payment_service::{Config, SERVICE};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{Connection as _, PgConnection, PgPool};

#[derive(Debug, Parser)]
#[command(
    name = "payment-service",
    version,
    about = "Payment service: charges and refunds"
)]
struct Cli {
    #[command(flatten)]
    config: Config,

    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Clone, Copy, Subcommand)]
enum Command {
    /// Migrate, create the topics, consume commands and serve the API until SIGINT or
    /// SIGTERM (the default).
    Serve,
    /// Bring the database to the current schema and exit.
    Migrate,
    /// Migrate and exit: the payment service has no demo data, the subcommand is
    /// there so every service's `seed` can be run alike.
    Seed,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    service_kit::init_logging();
    let cli = Cli::parse();
    match cli.command.unwrap_or(Command::Serve) {
        Command::Serve => {
            payment_service::start(cli.config)
                .await?
                .run_until(service_kit::runner::termination_signal())
                .await
        }
        Command::Migrate => {
            let pool = connect(&cli.config.common.database_url).await?;
            migrate(&pool).await?;
            tracing::info!(service = SERVICE, "database is at the current schema");
            Ok(())
        }
        Command::Seed => {
            let pool = connect(&cli.config.common.database_url).await?;
            migrate(&pool).await?;
            payment_service::seed(&pool).await
        }
    }
}

async fn migrate(pool: &PgPool) -> anyhow::Result<()> {
    payment_service::migrate(pool)
        .await
        .context("cannot migrate the payment database")
}

/// Connects at once (the service's own pool connects lazily). One connection is made
/// on its own first: a pool retries failed connections until its timeout and then
/// reports only the timeout, not the refused connection or the wrong password.
async fn connect(url: &str) -> anyhow::Result<PgPool> {
    let options: PgConnectOptions = url
        .parse()
        .context("the database URL (--database-url, DATABASE_URL) is not valid")?;
    // The migrator's `CREATE TABLE IF NOT EXISTS` notices say nothing an operator needs.
    let options = options.options([("client_min_messages", "warning")]);
    let target = format!("{}:{}", options.get_host(), options.get_port());
    let probe = PgConnection::connect_with(&options)
        .await
        .with_context(|| format!("cannot connect to PostgreSQL at {target}"))?;
    // Closing is a courtesy to the server; the pool below is what is used.
    let _ = probe.close().await;
    PgPoolOptions::new()
        .max_connections(2)
        .connect_with(options)
        .await
        .with_context(|| format!("cannot connect to PostgreSQL at {target}"))
}
