//! The users table: registering a user and finding one by email.
//!
//! The database keeps the rules that must hold however a user is written (the API,
//! the CLI, the seed): an email is unique whatever its case (a unique index on
//! `lower(email)`, so two concurrent registrations of one address cannot both
//! succeed), a customer user has a customer id, and a customer has at most one
//! user. What the API refuses before that (a bad email, a short password) is
//! checked here too, so the CLI cannot write what the API would refuse.

use service_kit::auth::Role;
use sqlx::PgPool;
use uuid::Uuid;

use crate::passwords;

/// A user as stored, without the password hash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    pub id: Uuid,
    pub email: String,
    pub customer_id: Option<Uuid>,
    pub roles: Vec<Role>,
}

/// A user to register.
#[derive(Debug, Clone)]
pub struct NewUser {
    pub email: String,
    pub password: String,
    pub customer_id: Option<Uuid>,
    pub roles: Vec<Role>,
}

/// Why a user was not registered.
#[derive(Debug, thiserror::Error)]
pub enum CreateError {
    /// A value is not acceptable (422).
    #[error("{0}")]
    Invalid(String),
    /// The email, or the customer, has a user already (409).
    #[error("{0}")]
    Exists(String),
    #[error(transparent)]
    Database(#[from] sqlx::Error),
    #[error(transparent)]
    Hashing(#[from] anyhow::Error),
}

fn role_names(roles: &[Role]) -> Vec<String> {
    roles.iter().map(|role| role.as_str().to_owned()).collect()
}

fn roles_from(names: &[String]) -> Vec<Role> {
    names.iter().filter_map(|name| Role::parse(name)).collect()
}

/// Registers `user`: checks it, hashes its password, inserts it.
pub async fn create(pool: &PgPool, user: NewUser) -> Result<User, CreateError> {
    let email = passwords::check_email(&user.email).map_err(CreateError::Invalid)?;
    passwords::check_password(&user.password).map_err(CreateError::Invalid)?;
    let mut roles = user.roles;
    roles.sort_unstable();
    roles.dedup();
    if roles.is_empty() {
        return Err(CreateError::Invalid("a user needs a role".into()));
    }
    if roles.contains(&Role::Customer) && user.customer_id.is_none() {
        return Err(CreateError::Invalid(
            "a customer user needs a customer id".into(),
        ));
    }
    let hash = passwords::hash(user.password).await?;
    let id = Uuid::now_v7();
    let inserted = sqlx::query(
        "INSERT INTO users (id, email, password_hash, customer_id, roles) \
         VALUES ($1, $2, $3, $4, $5)",
    )
    .bind(id)
    .bind(&email)
    .bind(&hash)
    .bind(user.customer_id)
    .bind(role_names(&roles))
    .execute(pool)
    .await;
    match inserted {
        Ok(_) => Ok(User {
            id,
            email,
            customer_id: user.customer_id,
            roles,
        }),
        Err(sqlx::Error::Database(e)) if e.constraint() == Some("users_email_key") => Err(
            CreateError::Exists(format!("a user with the email {email} exists")),
        ),
        Err(sqlx::Error::Database(e)) if e.constraint() == Some("users_customer_id_key") => {
            Err(CreateError::Exists(format!(
                "the customer {} has a user already",
                user.customer_id.unwrap_or_default()
            )))
        }
        Err(e) => Err(e.into()),
    }
}

#[derive(sqlx::FromRow)]
struct UserRow {
    id: Uuid,
    email: String,
    customer_id: Option<Uuid>,
    roles: Vec<String>,
    password_hash: String,
}

/// The user with `email` (whatever its case) and their password hash.
pub async fn find_by_email(
    pool: &PgPool,
    email: &str,
) -> Result<Option<(User, String)>, sqlx::Error> {
    let row: Option<UserRow> = sqlx::query_as(
        "SELECT id, email, customer_id, roles, password_hash FROM users \
         WHERE lower(email) = lower($1)",
    )
    .bind(email.trim())
    .fetch_optional(pool)
    .await?;
    Ok(row.map(|row| {
        let user = User {
            id: row.id,
            email: row.email,
            customer_id: row.customer_id,
            roles: roles_from(&row.roles),
        };
        (user, row.password_hash)
    }))
}
