//! What every service binary does besides serving: `migrate` and `seed`, with a
//! database connection that reports why it failed.

use std::future::Future;

use anyhow::Context as _;
use futures::future::BoxFuture;
use sqlx::migrate::Migrator;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{Connection as _, PgConnection, PgPool};

use crate::runner::{termination_signal, Running};
use crate::CommonArgs;

/// A service binary's subcommands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::Subcommand)]
pub enum Command {
    /// Migrate, create the topics, consume commands and serve the API until SIGINT or
    /// SIGTERM (the default).
    Serve,
    /// Bring the database to the current schema and exit.
    Migrate,
    /// Migrate, write the demo data (running it again changes nothing) and exit.
    Seed,
}

/// Runs `command` (default `serve`): `start` serves until a termination signal;
/// `seed` gets a migrated database.
pub async fn run<S, SF, D, DF>(
    command: Option<Command>,
    service: &str,
    database_url: &str,
    migrations: &'static Migrator,
    start: S,
    seed: D,
) -> anyhow::Result<()>
where
    S: FnOnce() -> SF,
    SF: Future<Output = anyhow::Result<Running>>,
    D: FnOnce(PgPool) -> DF,
    DF: Future<Output = anyhow::Result<()>>,
{
    failpoints::init()?;
    match command.unwrap_or(Command::Serve) {
        Command::Serve => start().await?.run_until(termination_signal()).await,
        Command::Migrate => {
            let pool = connect(database_url).await?;
            migrate(&pool, service, migrations).await?;
            tracing::info!(service, "database is at the current schema");
            Ok(())
        }
        Command::Seed => {
            let pool = connect(database_url).await?;
            migrate(&pool, service, migrations).await?;
            seed(pool).await
        }
    }
}

/// The shared tables, then the service's own.
pub async fn migrate(
    pool: &PgPool,
    service: &str,
    migrations: &'static Migrator,
) -> anyhow::Result<()> {
    saga_core::schema::migrate(pool, migrations)
        .await
        .with_context(|| format!("cannot migrate the {service} database"))
}

/// A service's preparation: migrate its database, then create `topics` (the ones
/// it consumes, and the reply topic its relay publishes to: brokers that do not
/// create topics on first use would refuse those records).
pub fn prepare(
    pool: PgPool,
    common: CommonArgs,
    service: &'static str,
    migrations: &'static Migrator,
    topics: Vec<String>,
) -> impl Fn() -> BoxFuture<'static, anyhow::Result<()>> + Send + Sync + 'static {
    move || {
        let (pool, common, topics) = (pool.clone(), common.clone(), topics.clone());
        Box::pin(async move {
            migrate(&pool, service, migrations).await?;
            crate::topics::ensure(
                &common.brokers,
                &common.kafka_option_map(),
                &topics,
                common.topic_partitions,
            )
            .await
            .with_context(|| format!("cannot create the topics {}", topics.join(", ")))
        })
    }
}

/// Connects at once (a service's own pool connects lazily). One connection is made
/// on its own first: a pool retries failed connections until its timeout and then
/// reports only the timeout, not the refused connection or the wrong password.
pub async fn connect(url: &str) -> anyhow::Result<PgPool> {
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
