//! `payment-service`: serves the payments (the default), or brings its database
//! to the current schema, or writes the demo data.

use clap::Parser;
use payment_service::{Config, MIGRATIONS, SERVICE};

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
        || payment_service::start(cli.config),
        |pool| async move { payment_service::seed(&pool).await },
    )
    .await
}
