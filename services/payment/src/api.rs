//! The payment service's HTTP API: `GET /payments/{orderId}`, for operators when
//! authentication is on (a payment row does not name its customer; customers see
//! their order's state through the order service).

use axum::extract::State;
use axum::routing::get;
use axum::{Json, Router};
use serde::Serialize;
use service_kit::auth::Caller;
use service_kit::{Amount, ApiError, ApiPath};
use sqlx::PgPool;
use uuid::Uuid;

/// An order's payment as the API shows it; `reason` says why it was declined.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Payment {
    pub order_id: Uuid,
    pub amount: Amount,
    pub card_last4: String,
    /// `CHARGED`, `DECLINED` or `REFUNDED`.
    pub status: String,
    pub reason: Option<String>,
}

/// The service's routes, reading from `pool`.
pub fn router(pool: PgPool) -> Router {
    Router::new()
        .route("/payments/{order_id}", get(payment))
        .with_state(pool)
}

async fn payment(
    State(pool): State<PgPool>,
    caller: Caller,
    ApiPath(order_id): ApiPath<Uuid>,
) -> Result<Json<Payment>, ApiError> {
    caller.require_operator()?;
    let row: Option<(i64, String, String, Option<String>)> = sqlx::query_as(
        "SELECT (amount * 100)::bigint, card_last4, status, reason \
         FROM payments WHERE order_id = $1",
    )
    .bind(order_id)
    .fetch_optional(&pool)
    .await?;
    let (amount, card_last4, status, reason) =
        row.ok_or_else(|| ApiError::not_found(format!("no payment for order {order_id}")))?;
    Ok(Json(Payment {
        order_id,
        amount: Amount(amount),
        card_last4,
        status,
        reason,
    }))
}
