//! The `order-placement` saga: create the order (local) → reserve goods
//! (inventory) → reserve credit (customer) → charge (payment) → approve (local).
//!
//! Why an order ends in exactly one of APPROVED and REJECTED:
//! - The order row is written by the first local step, in the transaction that
//!   stores the saga, so neither exists without the other.
//! - APPROVED is written only by the last step, and only while no cancellation was
//!   requested: the step's `UPDATE ... WHERE NOT cancel_requested` and the
//!   cancellation's `UPDATE ... WHERE status = 'PENDING'` lock the same row, so one
//!   of them sees the other's result.
//! - REJECTED is written only by the compensation of the first step, which runs
//!   last, after every later completed step was undone (goods released, credit
//!   released, the charge refunded).

use std::time::Duration;

use futures::future::BoxFuture;
use saga_core::saga::{Command, CompensationRetry, Reply, SagaDefinition, StepFailed, Suspension};
use serde::{Deserialize, Serialize};
use service_kit::Topics;
use sqlx::PgConnection;
use uuid::Uuid;

/// The saga type's name.
pub const SAGA_TYPE: &str = "order-placement";

/// The version of [`definition`]. Every saga is pinned to the version it started
/// with: a change of the steps (one added, renamed, removed or moved) needs a new
/// version, and either the old definition kept beside it
/// (`Orchestrator::with_previous`) or a `migrate_from` step map on the new one, so
/// that the sagas in flight during the deploy finish correctly.
pub const DEFINITION_VERSION: u32 = 1;

/// The reason recorded when the customer cancelled before the approval.
pub const CANCELLED: &str = "cancelled by the customer";

/// The saga's data (stored in `saga_state.payload`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OrderPlacement {
    pub order_id: Uuid,
    pub customer_id: Uuid,
    pub goods_id: Uuid,
    pub quantity: i32,
    pub amount_cents: i64,
    /// The card, as a token of the payment service's vault.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub card_token: Option<String>,
    #[serde(default)]
    pub card_last4: String,
    /// Sagas started before the card vault carry the number itself; it is passed
    /// on to the payment service as it was, which keeps only the last four digits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub card_number: Option<String>,
    /// Why the order is rejected, once a step said so.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rejection: Option<String>,
}

impl OrderPlacement {
    fn last4(&self) -> &str {
        match &self.card_number {
            Some(number) if self.card_last4.is_empty() => &number[number.len().saturating_sub(4)..],
            _ => &self.card_last4,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct GoodsNotFound {
    goods_id: Uuid,
}
impl Reply for GoodsNotFound {
    const TYPE: &'static str = "GoodsNotFound";
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct InsufficientStock {
    requested: i64,
    available: i64,
}
impl Reply for InsufficientStock {
    const TYPE: &'static str = "InsufficientStock";
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct CustomerNotFound {
    customer_id: Uuid,
}
impl Reply for CustomerNotFound {
    const TYPE: &'static str = "CustomerNotFound";
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct CreditLimitExceeded {
    requested_cents: i64,
    available_cents: i64,
}
impl Reply for CreditLimitExceeded {
    const TYPE: &'static str = "CreditLimitExceeded";
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct PaymentDeclined {
    reason: String,
}
impl Reply for PaymentDeclined {
    const TYPE: &'static str = "PaymentDeclined";
}

fn money(cents: i64) -> String {
    service_kit::Amount(cents).to_string()
}

fn command(topic: String, kind: &str, payload: serde_json::Value) -> Command {
    Command {
        topic,
        command_type: kind.to_owned(),
        payload,
    }
}

fn goods(topics: &Topics, kind: &str, o: &OrderPlacement) -> Command {
    command(
        topics.inventory_request(),
        kind,
        serde_json::json!({ "orderId": o.order_id, "goodsId": o.goods_id, "quantity": o.quantity }),
    )
}

fn credit(topics: &Topics, kind: &str, o: &OrderPlacement) -> Command {
    command(
        topics.customer_request(),
        kind,
        serde_json::json!({ "orderId": o.order_id, "customerId": o.customer_id, "amountCents": o.amount_cents }),
    )
}

fn charge(topics: &Topics, o: &OrderPlacement) -> Command {
    let mut payload = serde_json::json!({
        "orderId": o.order_id, "customerId": o.customer_id, "amountCents": o.amount_cents,
    });
    match (&o.card_token, &o.card_number) {
        (Some(token), _) => payload["cardToken"] = token.as_str().into(),
        (None, Some(number)) => payload["cardNumber"] = number.as_str().into(),
        (None, None) => {}
    }
    command(topics.payment_request(), "Charge", payload)
}

fn refund(topics: &Topics, o: &OrderPlacement) -> Command {
    command(
        topics.payment_request(),
        "Refund",
        serde_json::json!({ "orderId": o.order_id }),
    )
}

fn step_failed(error: sqlx::Error) -> StepFailed {
    StepFailed::new(format!("database error: {error}"))
}

/// Writes the order row, PENDING, linked to its saga.
fn create_order<'a>(
    o: &'a mut OrderPlacement,
    tx: &'a mut PgConnection,
) -> BoxFuture<'a, Result<(), StepFailed>> {
    Box::pin(async move {
        sqlx::query(
            "INSERT INTO orders (id, customer_id, goods_id, quantity, amount, status, card_last4, saga_id) \
             VALUES ($1, $2, $3, $4, $5::bigint::numeric / 100, 'PENDING', $6, $1)",
        )
        .bind(o.order_id)
        .bind(o.customer_id)
        .bind(o.goods_id)
        .bind(o.quantity)
        .bind(o.amount_cents)
        .bind(o.last4().to_owned())
        .execute(&mut *tx)
        .await
        .map_err(step_failed)?;
        Ok(())
    })
}

/// The compensation of the first step: the order is REJECTED with the reason a
/// step gave.
fn reject_order<'a>(
    o: &'a mut OrderPlacement,
    tx: &'a mut PgConnection,
) -> BoxFuture<'a, Result<(), StepFailed>> {
    Box::pin(async move {
        let reason = o
            .rejection
            .clone()
            .unwrap_or_else(|| "a step failed or timed out; see the saga's steps".to_owned());
        sqlx::query(
            "UPDATE orders SET status = 'REJECTED', reason = $2, updated_at = now() \
             WHERE id = $1 AND status = 'PENDING'",
        )
        .bind(o.order_id)
        .bind(reason)
        .execute(&mut *tx)
        .await
        .map_err(step_failed)?;
        Ok(())
    })
}

/// The last step: APPROVED, unless the customer cancelled meanwhile.
fn approve_order<'a>(
    o: &'a mut OrderPlacement,
    tx: &'a mut PgConnection,
) -> BoxFuture<'a, Result<(), StepFailed>> {
    Box::pin(async move {
        let approved = sqlx::query(
            "UPDATE orders SET status = 'APPROVED', updated_at = now() \
             WHERE id = $1 AND status = 'PENDING' AND NOT cancel_requested",
        )
        .bind(o.order_id)
        .execute(&mut *tx)
        .await
        .map_err(step_failed)?;
        if approved.rows_affected() == 1 {
            Ok(())
        } else {
            o.rejection = Some(CANCELLED.to_owned());
            Err(StepFailed::new(CANCELLED))
        }
    })
}

/// The saga's definition; commands go to the topics of `topics`, and every
/// participant step fails (and is compensated) when its reply takes longer than
/// `step_timeout`; a failing compensation is retried as `compensation_retry` says;
/// a failure `suspension` covers waits for an operator first.
pub fn definition(
    topics: &Topics,
    step_timeout: Duration,
    compensation_retry: CompensationRetry,
    suspension: Option<Suspension>,
) -> Result<SagaDefinition<OrderPlacement>, saga_core::saga::DefinitionError> {
    let (t1, t2, t3, t4, t5, t6) = (
        topics.clone(),
        topics.clone(),
        topics.clone(),
        topics.clone(),
        topics.clone(),
        topics.clone(),
    );
    let mut builder = SagaDefinition::<OrderPlacement>::builder(SAGA_TYPE)
        .version(DEFINITION_VERSION)
        .compensation_retry(compensation_retry);
    if let Some(s) = suspension {
        builder = builder.suspend_failed(s.on, s.hold);
    }
    builder
        .step("create")
        .invoke_local(create_order)
        .with_compensation(reject_order)
        .step("reserve-goods")
        .invoke_participant(move |o: &OrderPlacement| goods(&t1, "ReserveGoods", o))
        .on_reply::<GoodsNotFound>(|o, r| {
            o.rejection = Some(format!("goods {} not found", r.goods_id));
        })
        .on_reply::<InsufficientStock>(|o, r| {
            o.rejection = Some(format!(
                "insufficient stock: {} requested, {} available",
                r.requested, r.available
            ));
        })
        .with_participant_compensation(move |o: &OrderPlacement| goods(&t2, "ReleaseGoods", o))
        .with_timeout(step_timeout)
        .step("reserve-credit")
        .invoke_participant(move |o: &OrderPlacement| credit(&t3, "ReserveCredit", o))
        .on_reply::<CustomerNotFound>(|o, r| {
            o.rejection = Some(format!("customer {} not found", r.customer_id));
        })
        .on_reply::<CreditLimitExceeded>(|o, r| {
            o.rejection = Some(format!(
                "credit limit exceeded: {} requested, {} available",
                money(r.requested_cents),
                money(r.available_cents)
            ));
        })
        .with_participant_compensation(move |o: &OrderPlacement| credit(&t4, "ReleaseCredit", o))
        .with_timeout(step_timeout)
        .step("payment")
        .invoke_participant(move |o: &OrderPlacement| charge(&t5, o))
        .on_reply::<PaymentDeclined>(|o, r| {
            o.rejection = Some(format!("payment declined: {}", r.reason));
        })
        .with_participant_compensation(move |o: &OrderPlacement| refund(&t6, o))
        .with_timeout(step_timeout)
        .step("approve")
        .invoke_local(approve_order)
        .build()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_in_order_with_prefixed_topics() {
        let topics = Topics::new("p.");
        let definition = definition(
            &topics,
            Duration::from_secs(5),
            CompensationRetry::default(),
            None,
        )
        .expect("a valid saga");
        assert_eq!(definition.version(), DEFINITION_VERSION);
        let names: Vec<&str> = definition.steps().iter().map(|s| s.name()).collect();
        assert_eq!(
            names,
            [
                "create",
                "reserve-goods",
                "reserve-credit",
                "payment",
                "approve"
            ]
        );
        let o = OrderPlacement {
            order_id: Uuid::nil(),
            customer_id: Uuid::nil(),
            goods_id: Uuid::nil(),
            quantity: 2,
            amount_cents: 1999,
            card_token: Some("card_1111_0123456789abcdef0123456789abcdef".into()),
            card_last4: "1111".into(),
            card_number: None,
            rejection: None,
        };
        assert_eq!(o.last4(), "1111");
        let c = charge(&topics, &o);
        assert_eq!(c.topic, "p.payment.request");
        assert_eq!(c.payload["amountCents"], 1999);
        assert_eq!(
            c.payload["cardToken"],
            o.card_token.as_deref().unwrap_or("")
        );
        assert!(c.payload.get("cardNumber").is_none(), "{}", c.payload);
        let stored = serde_json::to_value(&o).expect("serialisable");
        assert!(stored.get("cardNumber").is_none(), "{stored}");

        // A saga stored before the vault: its number goes on as it came.
        let legacy: OrderPlacement = serde_json::from_value(serde_json::json!({
            "orderId": Uuid::nil(), "customerId": Uuid::nil(), "goodsId": Uuid::nil(),
            "quantity": 1, "amountCents": 5, "cardNumber": "4000000000009999",
        }))
        .expect("an older saga's state");
        assert_eq!(legacy.last4(), "9999");
        assert_eq!(
            charge(&topics, &legacy).payload["cardNumber"],
            "4000000000009999"
        );
        assert_eq!(
            goods(&topics, "ReleaseGoods", &o).topic,
            "p.inventory.request"
        );
        assert_eq!(
            credit(&topics, "ReserveCredit", &o).topic,
            "p.customer.request"
        );
    }
}
