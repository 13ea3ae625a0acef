//! `auth-service`: serves sign-in and the JWKS (the default), or brings its
//! database to the current schema, writes the demo users, adds a user or rotates
//! the signing key.

use auth_service::cli::Command;
use auth_service::Config;
use clap::Parser;

#[derive(Debug, Parser)]
#[command(
    name = "auth-service",
    version,
    about = "Auth service: users, passwords and the shop's access tokens"
)]
struct Cli {
    #[command(flatten)]
    config: Config,

    #[command(subcommand)]
    command: Option<Command>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    service_kit::init_logging();
    let cli = Cli::parse();
    auth_service::cli::run(cli.command, cli.config).await
}
