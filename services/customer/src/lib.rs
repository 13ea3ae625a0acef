//! Customer service: credit limits and credit reservations.

#![cfg_attr(not(test), deny(clippy::unwrap_used))]

use sqlx::migrate::Migrator;

/// This service's own tables (`sql/customer`); the shared tables come from
/// [`saga_core::schema`].
pub static MIGRATIONS: Migrator = sqlx::migrate!("../../sql/customer");

/// Brings the service database to the current schema: shared tables, then this
/// service's.
pub async fn migrate(pool: &sqlx::PgPool) -> Result<(), saga_core::schema::MigrateError> {
    saga_core::schema::migrate(pool, &MIGRATIONS).await
}
