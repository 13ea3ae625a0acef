//! Auth service: the shop's users, their passwords, and the access tokens the
//! other services accept.
//!
//! A customer registers (`POST /users`) and signs in (`POST /token`) for a JWT
//! signed with ES256 that names them (`sub`), their roles and their customer; the
//! services verify it against the public keys this service publishes at
//! `/.well-known/jwks.json` (`service_kit::auth`). Operators are created from the
//! command line only ([`cli`]). See [`api`] for the routes, [`keys`] for signing
//! keys and their rotation, [`passwords`] for hashing, [`users`] for the table.
//!
//! Unlike the saga's services it has no consumer and no outbox: it needs only its
//! own PostgreSQL database (migrations in `sql/auth`, without the shared tables).

#![cfg_attr(not(test), deny(clippy::unwrap_used))]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use service_kit::auth::Role;
use service_kit::{CommonArgs, Running, Service, ServiceMetrics};
use sqlx::migrate::Migrator;
use sqlx::PgPool;

pub mod api;
pub mod cli;
pub mod keys;
pub mod passwords;
pub mod users;

/// The service's name: its label on metrics.
pub const SERVICE: &str = "auth";

/// Where the HTTP API listens unless `--listen` says otherwise.
pub const DEFAULT_LISTEN: &str = "0.0.0.0:8085";

/// This service's tables (`sql/auth`).
pub static MIGRATIONS: Migrator = sqlx::migrate!("../../sql/auth");

/// The demo users `seed` writes: email, password, customer, roles.
pub const DEMO_USERS: [(&str, &str, Option<uuid::Uuid>, Role); 3] = [
    (
        "ada@shop.example",
        "ada-demo-password",
        Some(service_kit::demo::ADA),
        Role::Customer,
    ),
    (
        "bob@shop.example",
        "bob-demo-password",
        Some(service_kit::demo::BOB),
        Role::Customer,
    ),
    (
        "operator@shop.example",
        "operator-demo-password",
        None,
        Role::Operator,
    ),
];

/// Brings the database to the current schema.
pub async fn migrate(pool: &PgPool) -> Result<(), sqlx::migrate::MigrateError> {
    MIGRATIONS.run(pool).await
}

/// The service's configuration.
///
/// Its `Debug` leaves out the database URL, which may hold a password.
#[derive(Clone, clap::Args)]
pub struct Config {
    /// PostgreSQL URL of the auth database.
    #[arg(long, env = "DATABASE_URL", value_name = "URL", hide_env_values = true)]
    pub database_url: String,

    /// Address of the HTTP API, /health and /metrics [default: 0.0.0.0:8085].
    #[arg(long, env = "HTTP_LISTEN", value_name = "ADDR")]
    pub listen: Option<SocketAddr>,

    /// Connections in the database pool, at most.
    #[arg(long, env = "DATABASE_MAX_CONNECTIONS", value_name = "N", default_value_t = 10,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub max_connections: u32,

    /// The issuer (`iss`) of the tokens.
    #[arg(
        long,
        env = "AUTH_ISSUER",
        value_name = "NAME",
        default_value = "shop-auth"
    )]
    pub issuer: String,

    /// The audience (`aud`) of the tokens.
    #[arg(
        long,
        env = "AUTH_AUDIENCE",
        value_name = "NAME",
        default_value = "shop"
    )]
    pub audience: String,

    /// How long a token is valid, in seconds.
    #[arg(long = "token-ttl-s", env = "AUTH_TOKEN_TTL_S", value_name = "SECONDS",
          default_value_t = 900, value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub token_ttl_s: u64,
}

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Config")
            .field("listen", &self.listen)
            .field("max_connections", &self.max_connections)
            .field("issuer", &self.issuer)
            .field("audience", &self.audience)
            .field("token_ttl_s", &self.token_ttl_s)
            .finish_non_exhaustive()
    }
}

/// What goes into a token besides the user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenSettings {
    pub issuer: String,
    pub audience: String,
    pub ttl: Duration,
}

impl Config {
    /// `database_url` with every other option at its default.
    pub fn new(database_url: impl Into<String>) -> Config {
        Config {
            database_url: database_url.into(),
            listen: None,
            max_connections: 10,
            issuer: "shop-auth".into(),
            audience: "shop".into(),
            token_ttl_s: 900,
        }
    }

    pub fn token_settings(&self) -> TokenSettings {
        TokenSettings {
            issuer: self.issuer.clone(),
            audience: self.audience.clone(),
            ttl: Duration::from_secs(self.token_ttl_s),
        }
    }

    /// The shared options this service uses (database and address; no broker).
    fn common(&self) -> CommonArgs {
        let mut common = CommonArgs::new(self.database_url.clone(), String::new());
        common.listen = self.listen;
        common.max_connections = self.max_connections;
        common
    }
}

/// Starts the service in the background: the API at once (503 until prepared), then
/// migrations and the first signing key when there is none.
pub async fn start(config: Config) -> anyhow::Result<Running> {
    let common = config.common();
    let pool = common
        .pool()
        .context("the database URL (--database-url, DATABASE_URL) is not valid")?;
    let listen = common
        .listen_or(DEFAULT_LISTEN)
        .context("the default listen address is not an address")?;
    let metrics = Arc::new(api::AuthMetrics::default());
    let prepare = {
        let pool = pool.clone();
        move || {
            let pool = pool.clone();
            async move {
                migrate(&pool)
                    .await
                    .context("cannot migrate the auth database")?;
                keys::ensure(&pool).await?;
                passwords::warm_up().await
            }
        }
    };
    let render = {
        let metrics = Arc::clone(&metrics);
        move || {
            let text = metrics.render();
            async move { text }
        }
    };
    Service::new(SERVICE, pool.clone(), listen, ServiceMetrics::new())
        .api(api::router(pool, config.token_settings(), metrics))
        .prepare(prepare)
        .extra_metrics(render)
        .start()
        .await
}

/// Writes the demo users of services/README.md (Ada and Bob, linked to the demo
/// customers, and an operator). Users that exist are left as they are, so running
/// it again changes nothing.
pub async fn seed(pool: &PgPool) -> anyhow::Result<()> {
    let mut inserted = 0;
    for (email, password, customer_id, role) in DEMO_USERS {
        if users::find_by_email(pool, email).await?.is_some() {
            continue;
        }
        let user = users::NewUser {
            email: email.into(),
            password: password.into(),
            customer_id,
            roles: vec![role],
        };
        match users::create(pool, user).await {
            Ok(_) => inserted += 1,
            // Written meanwhile by a concurrent seed.
            Err(users::CreateError::Exists(_)) => {}
            Err(e) => return Err(e).with_context(|| format!("cannot write the demo user {email}")),
        }
    }
    tracing::info!(
        inserted,
        existing = DEMO_USERS.len() - inserted,
        "demo users seeded"
    );
    Ok(())
}
