//! The shared tables every service database holds, as sqlx migrations.
//!
//! A database has one `_sqlx_migrations` table, and sqlx refuses to run when that
//! table lists versions its migrator does not know. Two migrators (the shared tables
//! and the service's own) would therefore reject each other's history. A service
//! instead runs one migrator made by [`with_service_migrations`]: the shared
//! migrations (versions below [`SERVICE_VERSIONS_START`]) followed by its own.

use std::borrow::Cow;

use sqlx::migrate::{Migration, Migrator};

/// The shared migrations in `sql/shared`.
pub static SHARED: Migrator = sqlx::migrate!("../sql/shared");

/// Service migrations use versions from here on; shared ones stay below.
pub const SERVICE_VERSIONS_START: i64 = 1000;

/// Errors from combining migration sets.
#[derive(Debug, thiserror::Error)]
pub enum SchemaError {
    #[error(
        "service migration {version} ({description}) is numbered below {SERVICE_VERSIONS_START}, \
         the range reserved for the shared tables"
    )]
    ServiceVersionInSharedRange { version: i64, description: String },
}

/// One migrator with the shared tables and then `service`'s own migrations.
pub fn with_service_migrations(service: &Migrator) -> Result<Migrator, SchemaError> {
    if let Some(m) = service.iter().find(|m| m.version < SERVICE_VERSIONS_START) {
        return Err(SchemaError::ServiceVersionInSharedRange {
            version: m.version,
            description: m.description.to_string(),
        });
    }
    let migrations: Vec<Migration> = SHARED.iter().chain(service.iter()).cloned().collect();
    let mut combined = Migrator {
        migrations: Cow::Owned(migrations),
        ..Migrator::DEFAULT
    };
    combined.set_locking(true);
    Ok(combined)
}

/// Applies the shared tables and `service`'s migrations to the database behind `pool`.
pub async fn migrate(pool: &sqlx::PgPool, service: &Migrator) -> Result<(), MigrateError> {
    with_service_migrations(service)?.run(pool).await?;
    Ok(())
}

/// Migrations could not be applied.
#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    #[error(transparent)]
    Schema(#[from] SchemaError),
    #[error("applying migrations failed")]
    Apply(#[from] sqlx::migrate::MigrateError),
}
