//! `order-service`: the shop's order API and the `order-placement` saga's
//! orchestrator.

// The `saga` operator commands print their tables on stdout.
#![allow(clippy::print_stdout)]

use clap::{Parser, Subcommand};
use order_service::Config;
use saga_core::saga::{cli, SagaAdmin};
use service_kit::runner::termination_signal;

/// The order service: places orders through the order-placement saga
/// (goods → credit → payment → approve, compensated on failure or cancellation).
/// Logging is configured with RUST_LOG.
#[derive(Debug, Parser)]
#[command(name = "order-service", version)]
struct Cli {
    #[command(flatten)]
    config: Config,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve the API and run the saga (the default).
    Serve,
    /// Bring the database to the current schema and exit.
    Migrate,
    /// Write demo data (the order service has none) and exit.
    Seed,
    /// Operate sagas: list failed or stuck ones, retry a compensation, abort.
    #[command(subcommand)]
    Saga(cli::SagaCommand),
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    service_kit::init_logging();
    let cli = Cli::parse();
    match cli.command.unwrap_or(Command::Serve) {
        Command::Serve => {
            order_service::start(cli.config)
                .await?
                .run_until(termination_signal())
                .await
        }
        Command::Migrate => {
            let pool = cli.config.common.pool()?;
            order_service::migrate(&pool).await?;
            tracing::info!("order database migrated");
            Ok(())
        }
        Command::Seed => {
            tracing::info!("the order service has no demo data; orders are placed through its API");
            Ok(())
        }
        Command::Saga(command) => {
            let pool = cli.config.common.pool()?;
            let orchestrator = cli.config.orchestrator()?;
            // Operator actions are recorded in the saga's trail as the user's.
            let actor = ["SAGA_ACTOR", "USER", "LOGNAME"]
                .into_iter()
                .find_map(|name| std::env::var(name).ok().filter(|v| !v.is_empty()))
                .unwrap_or_else(|| saga_core::saga::DEFAULT_ACTOR.to_owned());
            let admin = SagaAdmin::new(pool).acting_as(actor);
            let rules = cli.config.stuck_rules();
            let text = cli::run_with(&admin, &orchestrator, &rules, command).await?;
            print!("{text}");
            Ok(())
        }
    }
}
