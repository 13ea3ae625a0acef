//! The inventory's HTTP API: `GET /goods/{id}`, for anyone signed in when
//! authentication is on.

use axum::extract::State;
use axum::routing::get;
use axum::{Json, Router};
use serde::Serialize;
use service_kit::auth::Caller;
use service_kit::{ApiError, ApiPath};
use sqlx::PgPool;
use uuid::Uuid;

/// Goods as the API shows them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, sqlx::FromRow)]
#[serde(rename_all = "camelCase")]
pub struct Goods {
    pub id: Uuid,
    pub name: String,
    pub stock: i32,
}

/// The service's routes, reading from `pool`.
pub fn router(pool: PgPool) -> Router {
    Router::new()
        .route("/goods/{id}", get(goods))
        .with_state(pool)
}

async fn goods(
    State(pool): State<PgPool>,
    // A valid token, whoever's: the extractor answers 401 without one.
    _caller: Caller,
    ApiPath(id): ApiPath<Uuid>,
) -> Result<Json<Goods>, ApiError> {
    sqlx::query_as("SELECT id, name, stock FROM goods WHERE id = $1")
        .bind(id)
        .fetch_optional(&pool)
        .await?
        .map(Json)
        .ok_or_else(|| ApiError::not_found(format!("no goods {id}")))
}
