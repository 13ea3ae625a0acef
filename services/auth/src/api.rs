//! The auth service's HTTP API: registering customers, signing in, the JWKS and
//! key rotation.
//!
//! - `POST /users` `{email, password, customerId}` → 201 `{userId, email,
//!   customerId, roles}`; 409 when the email (in any case) or the customer has a
//!   user; 422 for a bad email or a password under eight characters.
//! - `POST /token` `{email, password}` → 200 `{accessToken, tokenType: "Bearer",
//!   expiresIn}`; 401 with one message for an unknown email and a wrong password,
//!   and the same work for both (see [`crate::passwords`]).
//! - `GET /.well-known/jwks.json` → the published keys, `Cache-Control:
//!   max-age=60` (a minute of the grace a retired key keeps, see [`crate::keys`]).
//! - `POST /keys/rotate` (an operator's token) → 200 `{kid, retired, deleted}`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use service_kit::auth::{Authentication, Caller, Claims, JwksVerifier, Role};
use service_kit::{ApiError, ApiJson};
use sqlx::PgPool;
use uuid::Uuid;

use crate::users::{self, CreateError, NewUser, User};
use crate::{keys, passwords, TokenSettings};

/// The auth service's own counters, beside the ones every service has.
#[derive(Debug, Default)]
pub struct AuthMetrics {
    tokens_issued: AtomicU64,
    sign_in_failures: AtomicU64,
}

impl AuthMetrics {
    /// Prometheus text of the counters.
    pub fn render(&self) -> String {
        format!(
            "# HELP auth_tokens_issued_total Access tokens issued.\n\
             # TYPE auth_tokens_issued_total counter\n\
             auth_tokens_issued_total {}\n\
             # HELP auth_sign_in_failures_total Sign-ins refused (unknown email or wrong password).\n\
             # TYPE auth_sign_in_failures_total counter\n\
             auth_sign_in_failures_total {}\n",
            self.tokens_issued.load(Ordering::Relaxed),
            self.sign_in_failures.load(Ordering::Relaxed),
        )
    }
}

#[derive(Debug, Clone)]
struct AppState {
    pool: PgPool,
    settings: TokenSettings,
    metrics: Arc<AuthMetrics>,
}

/// The service's routes on `pool`. The operator's token for `/keys/rotate` is
/// verified against the service's own published keys, read from its database.
pub fn router(pool: PgPool, settings: TokenSettings, metrics: Arc<AuthMetrics>) -> Router {
    let verifier = {
        let (pool, ttl) = (pool.clone(), settings.ttl);
        JwksVerifier::with_source(
            move || {
                let pool = pool.clone();
                async move { keys::published(&pool, ttl).await.map_err(|e| e.to_string()) }
            },
            &settings.issuer,
            &settings.audience,
        )
        .min_refresh_interval(Duration::from_secs(1))
    };
    Router::new()
        .route("/users", post(register))
        .route("/token", post(token))
        .route("/.well-known/jwks.json", get(jwks))
        .route("/keys/rotate", post(rotate))
        .layer(service_kit::auth::layer(Authentication::Jwks(verifier)))
        .with_state(AppState {
            pool,
            settings,
            metrics,
        })
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Registration {
    email: String,
    password: String,
    customer_id: Uuid,
}

/// A user as the API shows them.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct UserBody {
    user_id: Uuid,
    email: String,
    customer_id: Option<Uuid>,
    roles: Vec<Role>,
}

impl From<User> for UserBody {
    fn from(user: User) -> UserBody {
        UserBody {
            user_id: user.id,
            email: user.email,
            customer_id: user.customer_id,
            roles: user.roles,
        }
    }
}

async fn register(
    State(state): State<AppState>,
    ApiJson(body): ApiJson<Registration>,
) -> Result<(StatusCode, Json<UserBody>), ApiError> {
    let user = NewUser {
        email: body.email,
        password: body.password,
        customer_id: Some(body.customer_id),
        roles: vec![Role::Customer],
    };
    match users::create(&state.pool, user).await {
        Ok(user) => Ok((StatusCode::CREATED, Json(user.into()))),
        Err(CreateError::Invalid(message)) => Err(ApiError::invalid(message)),
        Err(CreateError::Exists(message)) => Err(ApiError::conflict(message)),
        Err(CreateError::Database(e)) => Err(e.into()),
        Err(CreateError::Hashing(e)) => Err(ApiError::internal(e.as_ref())),
    }
}

#[derive(Debug, Deserialize)]
struct SignIn {
    email: String,
    password: String,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct TokenBody {
    access_token: String,
    token_type: &'static str,
    expires_in: u64,
}

/// The one answer to an unknown email and a wrong password.
fn refused() -> Response {
    service_kit::auth::unauthorized("the email or the password is wrong", false)
}

async fn token(
    State(state): State<AppState>,
    ApiJson(body): ApiJson<SignIn>,
) -> Result<Response, ApiError> {
    let found = users::find_by_email(&state.pool, &body.email).await?;
    let (user, hash) = match found {
        Some((user, hash)) => (Some(user), Some(hash)),
        None => (None, None),
    };
    let matches = passwords::verify(body.password, hash)
        .await
        .map_err(|e| ApiError::internal(e.as_ref()))?;
    let Some(user) = user.filter(|_| matches) else {
        state
            .metrics
            .sign_in_failures
            .fetch_add(1, Ordering::Relaxed);
        return Ok(refused());
    };
    let key = keys::current(&state.pool)
        .await?
        .ok_or_else(|| ApiError::unavailable("no signing key yet; try again"))?;
    let claims = state.settings.claims(&user, unix_now());
    let token = key.sign(&claims).map_err(|e| ApiError::internal(&e))?;
    state.metrics.tokens_issued.fetch_add(1, Ordering::Relaxed);
    let body = TokenBody {
        access_token: token,
        token_type: "Bearer",
        expires_in: state.settings.ttl.as_secs(),
    };
    Ok(([(header::CACHE_CONTROL, "no-store")], Json(body)).into_response())
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

impl TokenSettings {
    /// The claims of a token for `user` issued at `now` (Unix seconds).
    pub fn claims(&self, user: &User, now: i64) -> Claims {
        let is_customer = user.roles.contains(&Role::Customer);
        Claims {
            iss: self.issuer.clone(),
            aud: self.audience.clone(),
            sub: user.id.to_string(),
            iat: now,
            exp: now.saturating_add(i64::try_from(self.ttl.as_secs()).unwrap_or(i64::MAX)),
            roles: user.roles.iter().map(|r| r.as_str().to_owned()).collect(),
            customer_id: user.customer_id.filter(|_| is_customer),
        }
    }
}

async fn jwks(State(state): State<AppState>) -> Result<Response, ApiError> {
    let set = keys::published(&state.pool, state.settings.ttl).await?;
    Ok(([(header::CACHE_CONTROL, "max-age=60")], Json(set)).into_response())
}

async fn rotate(
    State(state): State<AppState>,
    caller: Caller,
) -> Result<Json<keys::Rotation>, ApiError> {
    caller.require_operator()?;
    let rotation = keys::rotate(&state.pool, state.settings.ttl)
        .await
        .map_err(|e| ApiError::internal(e.as_ref()))?;
    tracing::info!(operator = %caller.user_id, kid = rotation.kid, "signing key rotated");
    Ok(Json(rotation))
}
