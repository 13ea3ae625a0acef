//! The customer service's part of the order saga: `ReserveCredit` sets part of a
//! customer's credit aside for an order, `ReleaseCredit` (its compensation) gives it
//! back.
//!
//! Each command is handled by [`saga_core::saga::participate`] inside the consumer's
//! transaction: the barrier row, the credit change, the reservation row and the reply
//! in the outbox commit together with the journal row, or none of them does. The
//! barrier turns a duplicate command into a no-op, a release whose reserve never ran
//! into a null compensation, and a reserve arriving after its release into nothing.
//!
//! What the barrier cannot tell is whether the reserve *succeeded*: a reserve that
//! replied `CreditLimitExceeded` ran too, so its release gets through. The release
//! therefore trusts only `credit_reservations`: it gives back the amount a
//! `RESERVED` row records, and marks that row `RELEASED` in the same transaction, so
//! credit is returned at most once and only when it was taken.
//!
//! The reserve locks the customer row (`FOR UPDATE`) before reading the available
//! credit, so two orders of one customer cannot both spend the same credit.
//! Amounts travel and are computed as integer cents; the `numeric(12, 2)` columns
//! are written as `cents / 100` and read as `amount * 100`, both exact.

use futures::future::BoxFuture;
use saga_core::consumer::{HandlerError, IncomingMessage, MessageHandler};
use saga_core::outbox::Outbox;
use saga_core::saga::{participate, read_command, unknown_command, ParticipantReply};
use serde::Deserialize;
use serde_json::json;
use service_kit::money::check_cents;
use sqlx::PgConnection;
use uuid::Uuid;

/// Command: set `amountCents` of `customerId`'s credit aside for `orderId`.
pub const RESERVE_CREDIT: &str = "ReserveCredit";
/// Compensation of [`RESERVE_CREDIT`]: give back what the order set aside.
pub const RELEASE_CREDIT: &str = "ReleaseCredit";
/// Success reply to [`RESERVE_CREDIT`].
pub const CREDIT_RESERVED: &str = "CreditReserved";
/// Failure reply: no customer with that id.
pub const CUSTOMER_NOT_FOUND: &str = "CustomerNotFound";
/// Failure reply: less credit available than requested.
pub const CREDIT_LIMIT_EXCEEDED: &str = "CreditLimitExceeded";
/// Success reply to [`RELEASE_CREDIT`] (`released` says whether credit went back).
pub const CREDIT_RELEASED: &str = "CreditReleased";

/// The payload of both commands (the release carries the reserve's payload).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CreditCommand {
    pub order_id: Uuid,
    pub customer_id: Uuid,
    pub amount_cents: i64,
}

/// Handles the customer service's saga commands; see the module documentation.
#[derive(Debug, Clone, Default)]
pub struct CommandHandler {
    outbox: Outbox,
}

impl CommandHandler {
    /// A handler replying through the shared `public.outbox` table.
    pub fn new() -> CommandHandler {
        CommandHandler {
            outbox: Outbox::new(),
        }
    }
}

impl MessageHandler for CommandHandler {
    fn handle<'a>(
        &'a self,
        tx: &'a mut PgConnection,
        message: &'a IncomingMessage,
    ) -> BoxFuture<'a, Result<(), HandlerError>> {
        Box::pin(async move {
            match message.message_type.as_deref() {
                Some(RESERVE_CREDIT) => {
                    let command = read(message, false)?;
                    participate(tx, &self.outbox, message, move |tx, _| {
                        Box::pin(reserve(tx, command))
                    })
                    .await
                }
                Some(RELEASE_CREDIT) => {
                    let command = read(message, true)?;
                    participate(tx, &self.outbox, message, move |tx, _| {
                        Box::pin(release(tx, command))
                    })
                    .await
                }
                _ => Err(unknown_command(
                    message,
                    "the customer service",
                    &[RESERVE_CREDIT, RELEASE_CREDIT],
                )),
            }
        })
    }
}

/// The payload of a credit command, checked before the barrier is entered (see
/// [`read_command`]) and for an amount a reservation can hold.
fn read(message: &IncomingMessage, compensation: bool) -> Result<CreditCommand, HandlerError> {
    let command: CreditCommand = read_command(message, compensation)?;
    check_cents(message, command.amount_cents)?;
    Ok(command)
}

async fn reserve(
    tx: &mut PgConnection,
    command: CreditCommand,
) -> Result<ParticipantReply, HandlerError> {
    let available: Option<i64> = sqlx::query_scalar(
        "SELECT (available_credit * 100)::bigint FROM customers WHERE id = $1 FOR UPDATE",
    )
    .bind(command.customer_id)
    .fetch_optional(&mut *tx)
    .await
    .map_err(HandlerError::transient)?;
    let Some(available) = available else {
        return Ok(ParticipantReply::failure(
            CUSTOMER_NOT_FOUND,
            json!({ "customerId": command.customer_id }),
        ));
    };
    let earlier: Option<Uuid> =
        sqlx::query_scalar("SELECT customer_id FROM credit_reservations WHERE order_id = $1")
            .bind(command.order_id)
            .fetch_optional(&mut *tx)
            .await
            .map_err(HandlerError::transient)?;
    if earlier.is_some() {
        // One saga per order: a second reservation for the same order comes from
        // another saga, and spending credit twice for one order would never be undone.
        return Err(HandlerError::definite(format!(
            "order {} already has a credit reservation from another saga",
            command.order_id
        )));
    }
    if available < command.amount_cents {
        return Ok(ParticipantReply::failure(
            CREDIT_LIMIT_EXCEEDED,
            json!({
                "customerId": command.customer_id,
                "requestedCents": command.amount_cents,
                "availableCents": available,
            }),
        ));
    }
    let available_left: i64 = sqlx::query_scalar(
        "UPDATE customers SET available_credit = available_credit - $2::bigint::numeric / 100 \
         WHERE id = $1 RETURNING (available_credit * 100)::bigint",
    )
    .bind(command.customer_id)
    .bind(command.amount_cents)
    .fetch_one(&mut *tx)
    .await
    .map_err(HandlerError::transient)?;
    sqlx::query(
        "INSERT INTO credit_reservations (order_id, customer_id, amount, status) \
         VALUES ($1, $2, $3::bigint::numeric / 100, 'RESERVED')",
    )
    .bind(command.order_id)
    .bind(command.customer_id)
    .bind(command.amount_cents)
    .execute(&mut *tx)
    .await
    .map_err(HandlerError::transient)?;
    tracing::info!(order_id = %command.order_id, customer_id = %command.customer_id, amount_cents = command.amount_cents, available_cents = available_left, "credit reserved");
    Ok(ParticipantReply::success(
        CREDIT_RESERVED,
        json!({
            "customerId": command.customer_id,
            "amountCents": command.amount_cents,
            "availableCents": available_left,
        }),
    ))
}

async fn release(
    tx: &mut PgConnection,
    command: CreditCommand,
) -> Result<ParticipantReply, HandlerError> {
    let reservation: Option<(Uuid, i64, String)> = sqlx::query_as(
        "SELECT customer_id, (amount * 100)::bigint, status FROM credit_reservations \
         WHERE order_id = $1 FOR UPDATE",
    )
    .bind(command.order_id)
    .fetch_optional(&mut *tx)
    .await
    .map_err(HandlerError::transient)?;
    let Some((customer_id, amount_cents, _)) =
        reservation.filter(|(_, _, status)| status == "RESERVED")
    else {
        // The reserve failed (or took nothing here): there is nothing to give back,
        // and the compensation is still a success.
        tracing::info!(order_id = %command.order_id, "no credit reserved for the order; nothing to release");
        return Ok(ParticipantReply::success(
            CREDIT_RELEASED,
            json!({
                "orderId": command.order_id,
                "customerId": command.customer_id,
                "amountCents": 0,
                "released": false,
            }),
        ));
    };
    let available: i64 = sqlx::query_scalar(
        "UPDATE customers SET available_credit = available_credit + $2::bigint::numeric / 100 \
         WHERE id = $1 RETURNING (available_credit * 100)::bigint",
    )
    .bind(customer_id)
    .bind(amount_cents)
    .fetch_one(&mut *tx)
    .await
    .map_err(HandlerError::transient)?;
    sqlx::query(
        "UPDATE credit_reservations SET status = 'RELEASED', updated_at = now() \
         WHERE order_id = $1",
    )
    .bind(command.order_id)
    .execute(&mut *tx)
    .await
    .map_err(HandlerError::transient)?;
    tracing::info!(order_id = %command.order_id, customer_id = %customer_id, amount_cents, available_cents = available, "credit released");
    Ok(ParticipantReply::success(
        CREDIT_RELEASED,
        json!({
            "orderId": command.order_id,
            "customerId": customer_id,
            "amountCents": amount_cents,
            "released": true,
        }),
    ))
}
