//! A fresh PostgreSQL database per test.

use std::str::FromStr;
use std::sync::OnceLock;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, Connection, PgConnection, PgPool};

use crate::settings::{settings, ENV_UP_COMMAND};

/// How long a test waits for a connection before it fails.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// How long cleanup keeps trying to drop a slot that a walsender still holds.
const SLOT_RELEASE_TIMEOUT: Duration = Duration::from_secs(10);

/// A database created for one test and dropped, with its replication slots, when
/// the value is dropped (or earlier with [`TestDatabase::drop_database`]).
///
/// Pools are bound to the tokio runtime that made them, and every `#[tokio::test]`
/// has its own runtime, so each test makes its own `TestDatabase` and pool.
#[derive(Debug)]
pub struct TestDatabase {
    name: String,
    options: PgConnectOptions,
    admin: PgConnectOptions,
    pool: PgPool,
    dropped: bool,
}

impl TestDatabase {
    /// Creates a database with a random name owned by the configured role.
    ///
    /// # Panics
    /// When the environment is not up (the message names the command to start it),
    /// or when the cluster cannot do logical replication.
    pub async fn create() -> TestDatabase {
        let settings = settings();
        let admin = PgConnectOptions::from_str(&settings.database_url)
            .expect("DATABASE_URL was validated when the settings were loaded")
            .disable_statement_logging();
        let mut conn = connect(&admin).await;
        check_logical_once(&mut conn).await;

        let name = crate::unique_name("t");
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&mut conn)
            .await
            .unwrap_or_else(|e| panic!("CREATE DATABASE {name} failed: {e}"));
        let _ = conn.close().await;

        let options = admin.clone().database(&name);
        let pool = PgPoolOptions::new()
            .max_connections(8)
            .acquire_timeout(CONNECT_TIMEOUT)
            .connect_with(options.clone())
            .await
            .unwrap_or_else(|e| panic!("cannot connect to the test database {name}: {e}"));
        TestDatabase {
            name,
            options,
            admin,
            pool,
            dropped: false,
        }
    }

    /// The database name (also usable as a prefix for its slot and publication names).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// A pool of connections to this database.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Connection options for this database (host, port, role and password included).
    pub fn connect_options(&self) -> &PgConnectOptions {
        &self.options
    }

    /// A `postgres://` URL of this database, for components configured by URL.
    pub fn url(&self) -> String {
        with_database(&settings().database_url, &self.name)
    }

    /// A new single connection to this database.
    pub async fn connect(&self) -> PgConnection {
        connect(&self.options).await
    }

    /// Waits until a session of this database waits for a lock (a row another
    /// transaction holds); `false` when none did within `within`.
    pub async fn wait_for_a_lock_wait(&self, within: Duration) -> Result<bool, sqlx::Error> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let waiting: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM pg_stat_activity \
                 WHERE datname = $1 AND wait_event_type = 'Lock'",
            )
            .bind(&self.name)
            .fetch_one(&self.pool)
            .await?;
            if waiting > 0 {
                return Ok(true);
            }
            if tokio::time::Instant::now() > deadline {
                return Ok(false);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Drops the database now: terminates its sessions, drops its replication slots
    /// (a database with logical slots cannot be dropped), then the database.
    pub async fn drop_database(mut self) -> Result<(), sqlx::Error> {
        self.dropped = true;
        self.pool.close().await;
        drop_database(&self.admin, &self.name).await
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        if self.dropped {
            return;
        }
        // Drop runs inside the test's runtime, which cannot be blocked on; a thread
        // with a runtime of its own does the cleanup while this one waits.
        let admin = self.admin.clone();
        let name = self.name.clone();
        let outcome = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            runtime
                .block_on(drop_database(&admin, &name))
                .map_err(std::io::Error::other)
        })
        .join();
        match outcome {
            Ok(Ok(())) => {}
            Ok(Err(e)) => eprintln!("testkit: could not drop test database {}: {e}", self.name),
            Err(_) => eprintln!("testkit: cleanup of test database {} panicked", self.name),
        }
    }
}

/// `url` with its database (the path) replaced by `database`; the query is kept.
fn with_database(url: &str, database: &str) -> String {
    let authority_start = url.find("://").map_or(0, |i| i + 3);
    let rest = &url[authority_start..];
    let path_start = rest.find(['/', '?']).unwrap_or(rest.len());
    let query = rest[path_start..]
        .find('?')
        .map_or("", |i| &rest[path_start + i..]);
    format!("{}/{database}{query}", &url[..authority_start + path_start])
}

async fn connect(options: &PgConnectOptions) -> PgConnection {
    match tokio::time::timeout(CONNECT_TIMEOUT, PgConnection::connect_with(options)).await {
        Ok(Ok(conn)) => conn,
        Ok(Err(e)) => panic!(
            "cannot connect to PostgreSQL at {}:{}: {e}; is the environment up? (`{ENV_UP_COMMAND}`)",
            options.get_host(),
            options.get_port()
        ),
        Err(_) => panic!(
            "connecting to PostgreSQL at {}:{} timed out; is the environment up? (`{ENV_UP_COMMAND}`)",
            options.get_host(),
            options.get_port()
        ),
    }
}

/// Fails fast, once per process, when the configured cluster cannot decode WAL.
async fn check_logical_once(conn: &mut PgConnection) {
    static CHECKED: OnceLock<()> = OnceLock::new();
    if CHECKED.get().is_some() {
        return;
    }
    let wal_level: String = sqlx::query_scalar("SHOW wal_level")
        .fetch_one(&mut *conn)
        .await
        .unwrap_or_else(|e| panic!("SHOW wal_level failed: {e}"));
    assert_eq!(
        wal_level, "logical",
        "the configured PostgreSQL runs with wal_level={wal_level}; the tests need a cluster \
         with wal_level=logical, such as the one `{ENV_UP_COMMAND}` starts"
    );
    let _ = CHECKED.set(());
}

async fn drop_database(admin: &PgConnectOptions, name: &str) -> Result<(), sqlx::Error> {
    let mut conn = PgConnection::connect_with(admin).await?;
    // A walsender may still hold a slot of this database (a relay under test that was
    // not stopped): end it, then drop the slots once they are released.
    sqlx::query(
        "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots \
         WHERE database = $1 AND active_pid IS NOT NULL",
    )
    .bind(name)
    .execute(&mut conn)
    .await?;
    let deadline = tokio::time::Instant::now() + SLOT_RELEASE_TIMEOUT;
    loop {
        let left: Vec<(String, bool)> = sqlx::query_as(
            "SELECT slot_name::text, active FROM pg_replication_slots WHERE database = $1",
        )
        .bind(name)
        .fetch_all(&mut conn)
        .await?;
        if left.is_empty() {
            break;
        }
        for (slot, active) in &left {
            if !active {
                // The slot may vanish between the query and the drop (a temporary
                // slot); the next round sees what is left.
                let _ = sqlx::query("SELECT pg_drop_replication_slot($1)")
                    .bind(slot)
                    .execute(&mut conn)
                    .await;
            }
        }
        if tokio::time::Instant::now() > deadline {
            return Err(sqlx::Error::Protocol(format!(
                "replication slots of {name} still active after {SLOT_RELEASE_TIMEOUT:?}: {left:?}"
            )));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        .execute(&mut conn)
        .await?;
    let _ = conn.close().await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::with_database;

    #[test]
    fn replaces_the_database_of_a_url() {
        assert_eq!(
            with_database("postgres://u:p@h:1/outbox", "t_1"),
            "postgres://u:p@h:1/t_1"
        );
        assert_eq!(
            with_database("postgres://u:p@h:1/outbox?sslmode=disable", "t_1"),
            "postgres://u:p@h:1/t_1?sslmode=disable"
        );
        assert_eq!(with_database("postgres://h", "t_1"), "postgres://h/t_1");
        assert_eq!(
            with_database("postgres://h?x=1", "t_1"),
            "postgres://h/t_1?x=1"
        );
    }
}
