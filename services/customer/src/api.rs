//! The customer service's HTTP API: `GET /customers/{id}`, for the customer
//! themselves or an operator when authentication is on.

use axum::extract::State;
use axum::routing::get;
use axum::{Json, Router};
use serde::Serialize;
use service_kit::auth::Caller;
use service_kit::{Amount, ApiError, ApiPath};
use sqlx::PgPool;
use uuid::Uuid;

/// A customer as the API shows them; amounts as decimal numbers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Customer {
    pub id: Uuid,
    pub name: String,
    pub credit_limit: Amount,
    pub available_credit: Amount,
}

/// The service's routes, reading from `pool`.
pub fn router(pool: PgPool) -> Router {
    Router::new()
        .route("/customers/{id}", get(customer))
        .with_state(pool)
}

async fn customer(
    State(pool): State<PgPool>,
    caller: Caller,
    ApiPath(id): ApiPath<Uuid>,
) -> Result<Json<Customer>, ApiError> {
    caller.require_customer_or_operator(id)?;
    let row: Option<(String, i64, i64)> = sqlx::query_as(
        "SELECT name, (credit_limit * 100)::bigint, (available_credit * 100)::bigint \
         FROM customers WHERE id = $1",
    )
    .bind(id)
    .fetch_optional(&pool)
    .await?;
    let (name, limit, available) =
        row.ok_or_else(|| ApiError::not_found(format!("no customer {id}")))?;
    Ok(Json(Customer {
        id,
        name,
        credit_limit: Amount(limit),
        available_credit: Amount(available),
    }))
}
