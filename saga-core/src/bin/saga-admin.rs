//! `saga-admin`: what operators look at without the service's saga definitions —
//! sagas that wait for an operator (failed to compensate, or suspended on a failed
//! step), sagas that are stuck, and counts per status. Retrying a compensation,
//! restarting a step and aborting a saga need the definition (the commands to
//! send), so they are subcommands of the orchestrating service
//! (`saga_core::saga::cli`).

#![allow(clippy::print_stdout)]

use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use saga_core::saga::{SagaAdmin, StuckRules};

/// Lists failed and stuck sagas of a service database.
#[derive(Parser)]
#[command(name = "saga-admin", version)]
struct Cli {
    /// The service database (the one holding saga_state).
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    database_url: String,
    #[command(subcommand)]
    command: Command,
}

/// Hides the database URL: it may hold a password.
impl std::fmt::Debug for Cli {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cli")
            .field("database_url", &"***")
            .field("command", &self.command)
            .finish()
    }
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Sagas that wait for an operator: COMPENSATION_FAILED, and SUSPENDED on a
    /// failed step (they compensate by themselves when the suspension ends).
    Failed,
    /// Running sagas without progress for SECONDS (default 600), with the reason.
    /// Without the service's definitions, step timeouts and definition versions
    /// are not known here: `<service> saga list --stuck` knows them.
    Stuck {
        #[arg(default_value_t = 600)]
        seconds: u64,
    },
    /// How many sagas there are per type and status.
    Counts,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let pool = match sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .acquire_timeout(Duration::from_secs(10))
        .connect(&cli.database_url)
        .await
    {
        Ok(pool) => pool,
        Err(e) => {
            eprintln!("saga-admin: cannot connect to the database: {e}");
            return ExitCode::FAILURE;
        }
    };
    let admin = SagaAdmin::new(pool);
    let output = match cli.command {
        Command::Failed => admin.waiting_for_operator().await.map(|s| listing(&s)),
        Command::Stuck { seconds } => {
            let rules = StuckRules::new().without_timeout(Duration::from_secs(seconds));
            admin
                .stuck(&rules)
                .await
                .map(|s| saga_core::saga::cli::stuck_table(&s))
        }
        Command::Counts => admin.counts().await.map(|counts| {
            counts
                .into_iter()
                .map(|(saga_type, status, n)| format!("{saga_type:<24} {status:<20} {n}\n"))
                .collect()
        }),
    };
    match output {
        Ok(text) => {
            print!("{text}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            let mut text = e.to_string();
            let mut source = std::error::Error::source(&e);
            while let Some(cause) = source {
                text.push_str(&format!(": {cause}"));
                source = cause.source();
            }
            eprintln!("saga-admin: {text}");
            ExitCode::FAILURE
        }
    }
}

fn listing(sagas: &[saga_core::saga::SagaSummary]) -> String {
    saga_core::saga::cli::table(sagas)
}
