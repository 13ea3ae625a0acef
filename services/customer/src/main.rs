//! `customer-service`: serves the customers (the default), or brings its database
//! to the current schema, or writes the demo data.

use clap::Parser;
use customer_service::{Config, MIGRATIONS, SERVICE};

#[derive(Debug, Parser)]
#[command(
    name = "customer-service",
    version,
    about = "Customer service: credit limits and credit reservations"
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
        || customer_service::start(cli.config),
        |pool| async move { customer_service::seed(&pool).await },
    )
    .await
}
