//! The inventory's part of the order saga: `ReserveGoods` takes stock for an order,
//! `ReleaseGoods` (its compensation) gives it back.
//!
//! Each command is handled by [`saga_core::saga::participate`] inside the consumer's
//! transaction: the barrier row, the stock change, the reservation row and the reply
//! in the outbox commit together with the journal row, or none of them does. The
//! barrier turns a duplicate command into a no-op, a release whose reserve never ran
//! into a null compensation, and a reserve arriving after its release into nothing.
//!
//! What the barrier cannot tell is whether the reserve *succeeded*: a reserve that
//! replied `InsufficientStock` ran too, so its release gets through. The release
//! therefore trusts only `goods_reservations`: it gives back the quantity a
//! `RESERVED` row records, and marks that row `RELEASED` in the same transaction, so
//! stock is returned at most once and only when it was taken.
//!
//! Both effects lock the goods row (`FOR UPDATE`) before reading the stock, so two
//! orders for the same goods cannot both see the last item.

use futures::future::BoxFuture;
use saga_core::consumer::{HandlerError, IncomingMessage, MessageHandler};
use saga_core::outbox::Outbox;
use saga_core::saga::{participate, read_command, unknown_command, ParticipantReply};
use serde::Deserialize;
use serde_json::json;
use sqlx::PgConnection;
use uuid::Uuid;

/// Command: take `quantity` of `goodsId` for `orderId`.
pub const RESERVE_GOODS: &str = "ReserveGoods";
/// Compensation of [`RESERVE_GOODS`]: give back what the order took.
pub const RELEASE_GOODS: &str = "ReleaseGoods";
/// Success reply to [`RESERVE_GOODS`].
pub const GOODS_RESERVED: &str = "GoodsReserved";
/// Failure reply: no goods with that id.
pub const GOODS_NOT_FOUND: &str = "GoodsNotFound";
/// Failure reply: less stock than requested.
pub const INSUFFICIENT_STOCK: &str = "InsufficientStock";
/// Success reply to [`RELEASE_GOODS`] (`released` says whether stock went back).
pub const GOODS_RELEASED: &str = "GoodsReleased";

/// The payload of both commands (the release carries the reserve's payload).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GoodsCommand {
    pub order_id: Uuid,
    pub goods_id: Uuid,
    pub quantity: i32,
}

/// Handles the inventory's saga commands; see the module documentation.
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
                Some(RESERVE_GOODS) => {
                    let command = read(message, false)?;
                    participate(tx, &self.outbox, message, move |tx, _| {
                        Box::pin(reserve(tx, command))
                    })
                    .await
                }
                Some(RELEASE_GOODS) => {
                    let command = read(message, true)?;
                    participate(tx, &self.outbox, message, move |tx, _| {
                        Box::pin(release(tx, command))
                    })
                    .await
                }
                _ => Err(unknown_command(
                    message,
                    "the inventory service",
                    &[RESERVE_GOODS, RELEASE_GOODS],
                )),
            }
        })
    }
}

/// The payload of a goods command, checked before the barrier is entered (see
/// [`read_command`]) and for a positive quantity.
fn read(message: &IncomingMessage, compensation: bool) -> Result<GoodsCommand, HandlerError> {
    let command: GoodsCommand = read_command(message, compensation)?;
    if command.quantity <= 0 {
        return Err(HandlerError::definite(format!(
            "{}: quantity must be positive, not {}",
            message.message_type.as_deref().unwrap_or_default(),
            command.quantity
        )));
    }
    Ok(command)
}

async fn reserve(
    tx: &mut PgConnection,
    command: GoodsCommand,
) -> Result<ParticipantReply, HandlerError> {
    let stock: Option<i32> = sqlx::query_scalar("SELECT stock FROM goods WHERE id = $1 FOR UPDATE")
        .bind(command.goods_id)
        .fetch_optional(&mut *tx)
        .await
        .map_err(HandlerError::transient)?;
    let Some(stock) = stock else {
        return Ok(ParticipantReply::failure(
            GOODS_NOT_FOUND,
            json!({ "goodsId": command.goods_id }),
        ));
    };
    let earlier: Option<Uuid> =
        sqlx::query_scalar("SELECT goods_id FROM goods_reservations WHERE order_id = $1")
            .bind(command.order_id)
            .fetch_optional(&mut *tx)
            .await
            .map_err(HandlerError::transient)?;
    if earlier.is_some() {
        // One saga per order: a second reservation for the same order comes from
        // another saga, and taking stock twice for one order would never be undone.
        return Err(HandlerError::definite(format!(
            "order {} already has a goods reservation from another saga",
            command.order_id
        )));
    }
    if stock < command.quantity {
        return Ok(ParticipantReply::failure(
            INSUFFICIENT_STOCK,
            json!({
                "goodsId": command.goods_id,
                "requested": command.quantity,
                "available": stock,
            }),
        ));
    }
    let stock_left: i32 =
        sqlx::query_scalar("UPDATE goods SET stock = stock - $2 WHERE id = $1 RETURNING stock")
            .bind(command.goods_id)
            .bind(command.quantity)
            .fetch_one(&mut *tx)
            .await
            .map_err(HandlerError::transient)?;
    sqlx::query(
        "INSERT INTO goods_reservations (order_id, goods_id, quantity, status) \
         VALUES ($1, $2, $3, 'RESERVED')",
    )
    .bind(command.order_id)
    .bind(command.goods_id)
    .bind(command.quantity)
    .execute(&mut *tx)
    .await
    .map_err(HandlerError::transient)?;
    tracing::info!(order_id = %command.order_id, goods_id = %command.goods_id, quantity = command.quantity, stock_left, "goods reserved");
    Ok(ParticipantReply::success(
        GOODS_RESERVED,
        json!({
            "goodsId": command.goods_id,
            "quantity": command.quantity,
            "stockLeft": stock_left,
        }),
    ))
}

async fn release(
    tx: &mut PgConnection,
    command: GoodsCommand,
) -> Result<ParticipantReply, HandlerError> {
    let reservation: Option<(Uuid, i32, String)> = sqlx::query_as(
        "SELECT goods_id, quantity, status FROM goods_reservations \
         WHERE order_id = $1 FOR UPDATE",
    )
    .bind(command.order_id)
    .fetch_optional(&mut *tx)
    .await
    .map_err(HandlerError::transient)?;
    let Some((goods_id, quantity, _)) = reservation.filter(|(_, _, status)| status == "RESERVED")
    else {
        // The reserve failed (or took nothing here): there is nothing to give back,
        // and the compensation is still a success.
        tracing::info!(order_id = %command.order_id, "no goods reserved for the order; nothing to release");
        return Ok(ParticipantReply::success(
            GOODS_RELEASED,
            json!({
                "orderId": command.order_id,
                "goodsId": command.goods_id,
                "quantity": 0,
                "released": false,
            }),
        ));
    };
    let stock: i32 =
        sqlx::query_scalar("UPDATE goods SET stock = stock + $2 WHERE id = $1 RETURNING stock")
            .bind(goods_id)
            .bind(quantity)
            .fetch_one(&mut *tx)
            .await
            .map_err(HandlerError::transient)?;
    sqlx::query(
        "UPDATE goods_reservations SET status = 'RELEASED', updated_at = now() \
         WHERE order_id = $1",
    )
    .bind(command.order_id)
    .execute(&mut *tx)
    .await
    .map_err(HandlerError::transient)?;
    tracing::info!(order_id = %command.order_id, goods_id = %goods_id, quantity, stock, "goods released");
    Ok(ParticipantReply::success(
        GOODS_RELEASED,
        json!({
            "orderId": command.order_id,
            "goodsId": goods_id,
            "quantity": quantity,
            "released": true,
        }),
    ))
}
