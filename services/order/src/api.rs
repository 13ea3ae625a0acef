//! The REST API: place, cancel, read and list orders.
//!
//! Who may do what ([`service_kit::auth`], on when `AUTH_JWKS_URL` is set): a
//! customer places orders only as themselves, and reads, lists and cancels only
//! their own; an operator reads, lists and cancels any order but places none.
//! Another customer's order is a 403, not a 404: the id was not guessed, and the
//! answer says no more than that it is not the caller's.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use saga_core::saga::Orchestrator;
use serde::{Deserialize, Serialize};
use service_kit::auth::Caller;
use service_kit::cards::CardToken;
use service_kit::{Amount, ApiError, ApiJson, ApiPath, ApiQuery};
use sqlx::types::chrono::{DateTime, Utc};
use sqlx::{PgPool, Row};
use uuid::Uuid;

use crate::placement::OrderPlacement;

/// The longest accepted `Idempotency-Key`.
pub const MAX_IDEMPOTENCY_KEY: usize = 255;
/// Orders per page of `GET /orders` when no limit is given, and the most allowed.
pub const DEFAULT_PAGE: i64 = 50;
pub const MAX_PAGE: i64 = 500;

/// Where the order service checks that a customer or goods exist before it accepts
/// an order.
#[derive(Debug, Clone, Default)]
pub struct References {
    pub customer_url: Option<String>,
    pub inventory_url: Option<String>,
    /// The payment service, whose card vault turns a `cardNumber` into a token.
    pub payment_url: Option<String>,
}

#[derive(Clone)]
pub(crate) struct AppState {
    pub(crate) pool: PgPool,
    pub(crate) orchestrator: Arc<Orchestrator<OrderPlacement>>,
    pub(crate) references: References,
    pub(crate) http: reqwest::Client,
    /// Customers and goods known to exist, for a while.
    pub(crate) known: Arc<crate::known::Known>,
}

pub(crate) fn router(state: AppState) -> Router {
    Router::new()
        .route("/orders", post(place_order).get(list_orders))
        .route("/orders/{id}", get(get_order))
        .route("/orders/{id}/cancel", post(cancel_order))
        .with_state(state)
}

/// The body of `POST /orders`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PlaceOrder {
    pub customer_id: Uuid,
    pub goods_id: Uuid,
    pub quantity: i64,
    pub amount: Amount,
    /// The card as a token of the payment service's vault (`POST /cards`)...
    #[serde(default)]
    pub card_token: Option<String>,
    /// ...or its number, exchanged there for a token and never kept.
    #[serde(default)]
    pub card_number: Option<String>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct Placed {
    order_id: Uuid,
    saga_id: Uuid,
    status: String,
}

impl PlaceOrder {
    fn validate(&self) -> Result<(i32, crate::card::Named), ApiError> {
        let quantity = i32::try_from(self.quantity)
            .ok()
            .filter(|q| *q > 0)
            .ok_or_else(|| ApiError::invalid("quantity must be a positive whole number"))?;
        if self.amount.cents() <= 0 {
            return Err(ApiError::invalid("amount must be positive"));
        }
        let card = crate::card::named(self.card_number.as_deref(), self.card_token.as_deref())?;
        Ok((quantity, card))
    }

    /// What makes two requests the same request, for the Idempotency-Key: the
    /// card by its token (one card has one token), never by its number.
    fn fingerprint(&self, card: &CardToken) -> String {
        format!(
            "{}|{}|{}|{}|{}",
            self.customer_id,
            self.goods_id,
            self.quantity,
            self.amount.cents(),
            card
        )
    }
}

async fn place_order(
    State(state): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    ApiJson(request): ApiJson<PlaceOrder>,
) -> Result<Response, ApiError> {
    caller.require_customer(request.customer_id)?;
    let (quantity, card) = request.validate()?;
    let key = idempotency_key(&headers)?;
    // The calls to the other services are made with the caller's own token.
    let authorization = headers.get(header::AUTHORIZATION);
    let card = crate::card::token(&state, card, authorization).await?;
    let fingerprint = request.fingerprint(&card);
    if let Some(key) = &key {
        if let Some(existing) = replay(&state.pool, key, &fingerprint).await? {
            return Ok(existing);
        }
    }
    let customer = check_exists(
        &state,
        state.references.customer_url.as_deref(),
        ("customers", request.customer_id, "customer"),
        authorization,
    );
    let goods = check_exists(
        &state,
        state.references.inventory_url.as_deref(),
        ("goods", request.goods_id, "goods"),
        authorization,
    );
    let (customer, goods) = tokio::join!(customer, goods);
    customer?;
    goods?;

    let order_id = Uuid::now_v7();
    let mut tx = state.pool.begin().await?;
    if let Some(key) = &key {
        let claimed = sqlx::query(
            "INSERT INTO order_idempotency_keys (key, order_id, fingerprint) VALUES ($1, $2, $3) \
             ON CONFLICT (key) DO NOTHING",
        )
        .bind(key)
        .bind(order_id)
        .bind(&fingerprint)
        .execute(&mut *tx)
        .await?;
        if claimed.rows_affected() == 0 {
            // A concurrent request with this key committed first.
            tx.rollback().await?;
            return replay(&state.pool, key, &fingerprint)
                .await?
                .ok_or_else(|| {
                    ApiError::unavailable("the idempotency key is being used; try again")
                });
        }
    }
    let data = OrderPlacement {
        order_id,
        customer_id: request.customer_id,
        goods_id: request.goods_id,
        quantity,
        amount_cents: request.amount.cents(),
        card_token: Some(card.as_str().to_owned()),
        card_last4: card.last4().to_owned(),
        card_number: None,
        rejection: None,
    };
    let instance = state
        .orchestrator
        .start(&mut tx, order_id, data)
        .await
        .map_err(|e| ApiError::internal(&e))?;
    if instance.status != saga_core::status::SagaStatus::Started {
        // The first local step failed; nothing is kept.
        tx.rollback().await?;
        let reason = instance
            .steps
            .get("create")
            .and_then(|s| s.reason.clone())
            .unwrap_or_default();
        return Err(ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            format!("the order could not be created: {reason}"),
        ));
    }
    tx.commit().await?;
    tracing::info!(%order_id, "order placed");
    Ok(placed(StatusCode::ACCEPTED, order_id, "PENDING"))
}

fn placed(status: StatusCode, order_id: Uuid, order_status: &str) -> Response {
    (
        status,
        [(header::LOCATION, format!("/orders/{order_id}"))],
        Json(Placed {
            order_id,
            saga_id: order_id,
            status: order_status.to_owned(),
        }),
    )
        .into_response()
}

fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let Some(value) = headers.get("idempotency-key") else {
        return Ok(None);
    };
    let key = value
        .to_str()
        .map_err(|_| ApiError::bad_request("Idempotency-Key must be visible ASCII"))?
        .trim();
    if key.is_empty() || key.len() > MAX_IDEMPOTENCY_KEY {
        return Err(ApiError::bad_request(format!(
            "Idempotency-Key must have 1 to {MAX_IDEMPOTENCY_KEY} characters"
        )));
    }
    Ok(Some(key.to_owned()))
}

/// The order an earlier request with `key` created (200), a 422 when that request
/// was a different one, or `None` when the key is new.
async fn replay(pool: &PgPool, key: &str, fingerprint: &str) -> Result<Option<Response>, ApiError> {
    let row = sqlx::query(
        "SELECT k.order_id, k.fingerprint, o.status FROM order_idempotency_keys k \
         JOIN orders o ON o.id = k.order_id WHERE k.key = $1",
    )
    .bind(key)
    .fetch_optional(pool)
    .await?;
    let Some(row) = row else {
        return Ok(None);
    };
    let stored: String = row.try_get("fingerprint")?;
    if stored != fingerprint {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "idempotency_key_reused",
            "this Idempotency-Key was used for a different order",
        ));
    }
    let status: String = row.try_get("status")?;
    Ok(Some(placed(
        StatusCode::OK,
        row.try_get("order_id")?,
        &status,
    )))
}

/// `request` to another service on the caller's behalf: with the caller's own
/// `Authorization` header, and continuing the request's trace.
pub(crate) fn onward(
    request: reqwest::RequestBuilder,
    authorization: Option<&axum::http::HeaderValue>,
) -> reqwest::RequestBuilder {
    let request = service_kit::http::with_trace(request);
    match authorization {
        Some(authorization) => request.header(header::AUTHORIZATION, authorization.clone()),
        None => request,
    }
}

/// Asks the owning service whether `id` exists, unless it said so within the
/// last minute ([`crate::known`]). A 404 refuses the order; a service that does
/// not answer does not: the saga's own reply (`GoodsNotFound`,
/// `CustomerNotFound`) rejects it later, and orders keep being accepted while a
/// participant is down.
async fn check_exists(
    state: &AppState,
    base: Option<&str>,
    (path, id, what): (&'static str, Uuid, &str),
    authorization: Option<&axum::http::HeaderValue>,
) -> Result<(), ApiError> {
    let Some(base) = base else {
        return Ok(());
    };
    if state.known.exists(path, id, std::time::Instant::now()) {
        return Ok(());
    }
    let url = format!("{}/{path}/{id}", base.trim_end_matches('/'));
    match onward(state.http.get(&url), authorization)
        .timeout(Duration::from_secs(2))
        .send()
        .await
    {
        Ok(response) if response.status() == StatusCode::NOT_FOUND => Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "unknown_reference",
            format!("{what} {id} does not exist"),
        )),
        Ok(response) if response.status().is_success() => {
            state.known.remember(path, id, std::time::Instant::now());
            Ok(())
        }
        Ok(response) => {
            tracing::warn!(%url, status = %response.status(), "reference check failed; the saga will check");
            Ok(())
        }
        Err(e) => {
            tracing::warn!(%url, error = %e, "reference check failed; the saga will check");
            Ok(())
        }
    }
}

/// 404 when the order does not exist, 403 when it is not the caller's.
async fn check_owner(state: &AppState, caller: &Caller, id: Uuid) -> Result<(), ApiError> {
    if !caller.authenticated {
        return Ok(());
    }
    let owner: Option<Uuid> = sqlx::query_scalar("SELECT customer_id FROM orders WHERE id = $1")
        .bind(id)
        .fetch_optional(&state.pool)
        .await?;
    let owner = owner.ok_or_else(|| ApiError::not_found(format!("order {id} does not exist")))?;
    caller.require_customer_or_operator(owner)
}

async fn cancel_order(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<Uuid>,
) -> Result<Response, ApiError> {
    check_owner(&state, &caller, id).await?;
    let cancelled = sqlx::query(
        "UPDATE orders SET cancel_requested = true, updated_at = now() \
         WHERE id = $1 AND status = 'PENDING' RETURNING id",
    )
    .bind(id)
    .fetch_optional(&state.pool)
    .await?;
    if cancelled.is_some() {
        tracing::info!(order_id = %id, "cancellation requested");
        return Ok((
            StatusCode::ACCEPTED,
            Json(
                serde_json::json!({ "orderId": id, "status": "PENDING", "cancelRequested": true }),
            ),
        )
            .into_response());
    }
    let status: Option<String> = sqlx::query_scalar("SELECT status FROM orders WHERE id = $1")
        .bind(id)
        .fetch_optional(&state.pool)
        .await?;
    match status {
        Some(status) => Err(ApiError::conflict(format!(
            "order {id} is {status}; only a PENDING order can be cancelled"
        ))),
        None => Err(ApiError::not_found(format!("order {id} does not exist"))),
    }
}

/// One step of an order's saga, as `GET /orders/{id}` shows it.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct StepView {
    name: String,
    /// `null` until the step starts.
    status: Option<String>,
    attempts: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<String>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    timed_out: bool,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct SagaView {
    id: Uuid,
    status: String,
    /// The version of the saga's definition it runs on.
    definition_version: u32,
    current_step: Option<String>,
    steps: Vec<StepView>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct OrderView {
    order_id: Uuid,
    customer_id: Uuid,
    goods_id: Uuid,
    quantity: i32,
    amount: Amount,
    card_last4: Option<String>,
    status: String,
    reason: Option<String>,
    cancel_requested: bool,
    /// RFC 3339.
    created_at: String,
    updated_at: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    saga: Option<SagaView>,
}

const ORDER_COLUMNS: &str =
    "id, customer_id, goods_id, quantity, (amount * 100)::bigint AS amount_cents, \
     card_last4, status, reason, cancel_requested, created_at, updated_at, saga_id";

fn rfc3339(at: DateTime<Utc>) -> String {
    at.format("%Y-%m-%dT%H:%M:%S%.3fZ").to_string()
}

fn order_view(row: &sqlx::postgres::PgRow) -> Result<OrderView, sqlx::Error> {
    Ok(OrderView {
        order_id: row.try_get("id")?,
        customer_id: row.try_get("customer_id")?,
        goods_id: row.try_get("goods_id")?,
        quantity: row.try_get("quantity")?,
        amount: Amount(row.try_get("amount_cents")?),
        card_last4: row.try_get("card_last4")?,
        status: row.try_get("status")?,
        reason: row.try_get("reason")?,
        cancel_requested: row.try_get("cancel_requested")?,
        created_at: rfc3339(row.try_get("created_at")?),
        updated_at: rfc3339(row.try_get("updated_at")?),
        saga: None,
    })
}

async fn get_order(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<Uuid>,
) -> Result<Json<OrderView>, ApiError> {
    check_owner(&state, &caller, id).await?;
    // The order and its saga from one snapshot: the saga's last transaction writes
    // both (APPROVED or REJECTED with COMPLETED or ABORTED), and two reads at two
    // moments could show a PENDING order beside an ended saga.
    let mut tx = state.pool.begin().await?;
    sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        .execute(&mut *tx)
        .await?;
    let row = sqlx::query(&format!("SELECT {ORDER_COLUMNS} FROM orders WHERE id = $1"))
        .bind(id)
        .fetch_optional(&mut *tx)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("order {id} does not exist")))?;
    let mut view = order_view(&row)?;
    if let Some(saga_id) = row.try_get::<Option<Uuid>, _>("saga_id")? {
        match state.orchestrator.load(&mut tx, saga_id).await {
            Ok(instance) => {
                // The steps of the saga's own definition version, in order; those
                // it has a state for when this code does not know the version.
                let names: Vec<String> = match state
                    .orchestrator
                    .definition_version(instance.definition_version)
                {
                    Some(definition) => definition
                        .steps()
                        .iter()
                        .map(|s| s.name().to_owned())
                        .collect(),
                    None => instance.steps.keys().cloned().collect(),
                };
                let steps = names
                    .into_iter()
                    .map(|name| {
                        let s = instance.steps.get(&name).cloned().unwrap_or_default();
                        StepView {
                            name,
                            status: s.status,
                            attempts: s.attempts,
                            reason: s.reason,
                            timed_out: s.timed_out,
                        }
                    })
                    .collect();
                view.saga = Some(SagaView {
                    id: saga_id,
                    status: instance.status.as_str().to_owned(),
                    definition_version: instance.definition_version,
                    current_step: instance.current_step,
                    steps,
                });
            }
            Err(saga_core::saga::SagaError::NotFound(_)) => {}
            Err(e) => return Err(ApiError::internal(&e)),
        }
    }
    tx.commit().await?;
    Ok(Json(view))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Page {
    limit: Option<i64>,
    /// The last order id of the previous page.
    after: Option<Uuid>,
    status: Option<String>,
}

async fn list_orders(
    State(state): State<AppState>,
    caller: Caller,
    ApiQuery(page): ApiQuery<Page>,
) -> Result<Json<serde_json::Value>, ApiError> {
    // A customer's list holds their own orders; an operator's, everyone's.
    let only = if !caller.authenticated || caller.require_operator().is_ok() {
        None
    } else {
        Some(caller.customer_id.ok_or_else(|| {
            service_kit::auth::forbidden("only customers and operators list orders")
        })?)
    };
    let limit = page.limit.unwrap_or(DEFAULT_PAGE);
    if !(1..=MAX_PAGE).contains(&limit) {
        return Err(ApiError::bad_request(format!(
            "limit must be between 1 and {MAX_PAGE}"
        )));
    }
    if let Some(status) = &page.status {
        if !["PENDING", "APPROVED", "REJECTED"].contains(&status.as_str()) {
            return Err(ApiError::bad_request(
                "status must be PENDING, APPROVED or REJECTED",
            ));
        }
    }
    // Order ids are UUID v7, so their order is the order of creation.
    let rows = sqlx::query(&format!(
        "SELECT {ORDER_COLUMNS} FROM orders \
         WHERE ($1::uuid IS NULL OR id < $1) AND ($2::text IS NULL OR status = $2) \
           AND ($4::uuid IS NULL OR customer_id = $4) \
         ORDER BY id DESC LIMIT $3"
    ))
    .bind(page.after)
    .bind(&page.status)
    .bind(limit + 1)
    .bind(only)
    .fetch_all(&state.pool)
    .await?;
    let more = rows.len() as i64 > limit;
    let orders = rows
        .iter()
        .take(limit as usize)
        .map(order_view)
        .collect::<Result<Vec<_>, _>>()?;
    let next = if more {
        orders.last().map(|o| o.order_id)
    } else {
        None
    };
    Ok(Json(serde_json::json!({ "orders": orders, "next": next })))
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOKEN: &str = "card_1111_0123456789abcdef0123456789abcdef";

    #[test]
    fn an_order_names_its_card_by_number_or_token_not_both() {
        let order = |number: Option<&str>, token: Option<&str>| PlaceOrder {
            customer_id: Uuid::nil(),
            goods_id: Uuid::nil(),
            quantity: 1,
            amount: Amount(100),
            card_number: number.map(str::to_owned),
            card_token: token.map(str::to_owned),
        };
        assert!(order(None, Some(TOKEN)).validate().is_ok());
        assert!(order(Some("4111 1111 1111 1111"), None).validate().is_ok());
        for (number, token) in [
            (None, None),
            (Some("4111 1111 1111 1111"), Some(TOKEN)),
            (Some("4111"), None),
            (None, Some("4111111111111111")),
        ] {
            let error = order(number, token).validate().expect_err("refused");
            assert_eq!(
                error.status,
                StatusCode::UNPROCESSABLE_ENTITY,
                "{number:?} {token:?}"
            );
        }
        let token = CardToken::parse(TOKEN).expect("a token");
        let fingerprint = order(None, Some(TOKEN)).fingerprint(&token);
        assert!(fingerprint.ends_with(TOKEN), "{fingerprint}");
    }

    #[test]
    fn order_validation() {
        let order = |quantity, cents| PlaceOrder {
            customer_id: Uuid::nil(),
            goods_id: Uuid::nil(),
            quantity,
            amount: Amount(cents),
            card_number: None,
            card_token: Some(TOKEN.to_owned()),
        };
        assert!(order(1, 1).validate().is_ok());
        for (q, c) in [
            (0, 100),
            (-1, 100),
            (1, 0),
            (1, -5),
            (i64::from(i32::MAX) + 1, 100),
        ] {
            let error = order(q, c).validate().expect_err("refused");
            assert_eq!(error.status, StatusCode::UNPROCESSABLE_ENTITY);
        }
    }
}
