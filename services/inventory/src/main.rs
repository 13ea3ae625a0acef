//! `inventory-service`: serves the inventory (the default), or brings its database
//! to the current schema, or writes the demo data.

use clap::Parser;
use inventory_service::{Config, MIGRATIONS, SERVICE};

#[derive(Debug, Parser)]
#[command(
    name = "inventory-service",
    version,
    about = "Inventory service: goods and stock reservations"
)]
struct Cli {
    #[command(flatten)]
    config: Config,

    #[command(subcommand)]
    command: Option<service_kit::cli::Command>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    service_kit::init_logging();
    let cli = Cli::parse();
    let database_url = cli.config.common.database_url.clone();
    service_kit::cli::run(
        cli.command,
        SERVICE,
        &database_url,
        &MIGRATIONS,
        || inventory_service::start(cli.config),
        |pool| async move { inventory_service::seed(&pool).await },
    )
    .await
}
