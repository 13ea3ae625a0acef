//! The payment service's part of the order saga: `Charge` charges the order's card,
//! `Refund` (its compensation) pays a charge back.
//!
//! Each command is handled by [`saga_core::saga::participate`] inside the consumer's
//! transaction: the barrier row, the `payments` row and the reply in the outbox
//! commit together with the journal row, or none of them does. The barrier turns a
//! duplicate command into a no-op, a refund whose charge never ran into a null
//! compensation, and a charge arriving after its refund into nothing.
//!
//! What the barrier cannot tell is whether the charge *succeeded*: a declined charge
//! ran too, so its refund gets through. Every charge therefore writes its `payments`
//! row, declined or not, and the refund pays back only a row that is `CHARGED`,
//! turning it `REFUNDED` in the same transaction: money goes back at most once and
//! only when it was taken.
//!
//! A charge names the card by the token of the vault ([`crate::cards`]); a token the
//! vault did not make is declined. Sagas started before the vault carry the card
//! number itself: it is judged, never logged or stored (the row keeps the last
//! four digits).

use futures::future::BoxFuture;
use saga_core::consumer::{HandlerError, IncomingMessage, MessageHandler};
use saga_core::outbox::Outbox;
use saga_core::saga::{participate, read_command, unknown_command, ParticipantReply};
use serde::Deserialize;
use serde_json::json;
use service_kit::money::check_cents;
use service_kit::Amount;
use sqlx::PgConnection;
use uuid::Uuid;

/// Command: charge `amountCents` to the card `cardToken` for `orderId`.
pub const CHARGE: &str = "Charge";
/// Compensation of [`CHARGE`]: pay the order's charge back.
pub const REFUND: &str = "Refund";
/// Success reply to [`CHARGE`].
pub const PAYMENT_CHARGED: &str = "PaymentCharged";
/// Failure reply to [`CHARGE`], with the reason.
pub const PAYMENT_DECLINED: &str = "PaymentDeclined";
/// Success reply to [`REFUND`] (`refunded` says whether money went back).
pub const PAYMENT_REFUNDED: &str = "PaymentRefunded";

/// Cards whose number ends in these digits are declined (the demo's way to make a
/// payment fail).
pub const DECLINED_CARD_SUFFIX: &str = "9999";

/// The reason a card ending in [`DECLINED_CARD_SUFFIX`] is declined with.
pub const CARD_DECLINED: &str = "card declined";

/// The reason a charge to a token the vault did not make is declined with.
pub const UNKNOWN_CARD_TOKEN: &str = "unknown card token";

/// The payload of [`CHARGE`]: the card's token, or (from a saga started before the
/// vault) its number. Its `Debug` shows only the card's last four digits.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ChargeCommand {
    pub order_id: Uuid,
    pub customer_id: Uuid,
    pub amount_cents: i64,
    #[serde(default)]
    pub card_token: Option<String>,
    #[serde(default)]
    pub card_number: Option<String>,
}

impl std::fmt::Debug for ChargeCommand {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChargeCommand")
            .field("order_id", &self.order_id)
            .field("customer_id", &self.customer_id)
            .field("amount_cents", &self.amount_cents)
            .field("card_token", &self.card_token)
            .field(
                "card_last4",
                &self.card_number.as_deref().map(last4).unwrap_or_default(),
            )
            .finish()
    }
}

/// The payload of [`REFUND`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RefundCommand {
    pub order_id: Uuid,
}

/// Handles the payment service's saga commands; see the module documentation.
#[derive(Debug, Clone)]
pub struct CommandHandler {
    outbox: Outbox,
    charge_limit: Amount,
}

impl CommandHandler {
    /// A handler declining charges above `charge_limit`, replying through the shared
    /// `public.outbox` table.
    pub fn new(charge_limit: Amount) -> CommandHandler {
        CommandHandler {
            outbox: Outbox::new(),
            charge_limit,
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
                Some(CHARGE) => {
                    let command: ChargeCommand = read_command(message, false)?;
                    check_cents(message, command.amount_cents)?;
                    let limit = self.charge_limit;
                    participate(tx, &self.outbox, message, move |tx, _| {
                        Box::pin(charge(tx, command, limit))
                    })
                    .await
                }
                Some(REFUND) => {
                    let command: RefundCommand = read_command(message, true)?;
                    participate(tx, &self.outbox, message, move |tx, _| {
                        Box::pin(refund(tx, command))
                    })
                    .await
                }
                _ => Err(unknown_command(
                    message,
                    "the payment service",
                    &[CHARGE, REFUND],
                )),
            }
        })
    }
}

/// The last (up to) four digits of a card number, the only part that is kept.
fn last4(card_number: &str) -> String {
    let digits: Vec<char> = card_number.chars().filter(char::is_ascii_digit).collect();
    digits[digits.len().saturating_sub(4)..].iter().collect()
}

/// The card a charge names: its last four digits, or why it cannot be charged.
enum Card {
    Known { last4: String },
    Refused { last4: String, reason: String },
}

async fn card(tx: &mut PgConnection, command: &ChargeCommand) -> Result<Card, HandlerError> {
    match (&command.card_token, &command.card_number) {
        (Some(token), _) => {
            let known = crate::cards::last4_of(&mut *tx, token)
                .await
                .map_err(HandlerError::transient)?;
            Ok(match known {
                Some(last4) => Card::Known { last4 },
                None => Card::Refused {
                    last4: service_kit::cards::CardToken::parse(token)
                        .map(|t| t.last4().to_owned())
                        .unwrap_or_default(),
                    reason: UNKNOWN_CARD_TOKEN.to_owned(),
                },
            })
        }
        (None, Some(number)) => Ok(match service_kit::cards::CardNumber::parse(number) {
            Ok(card) => Card::Known {
                last4: card.last4().to_owned(),
            },
            Err(_) => Card::Refused {
                last4: last4(number),
                reason: "invalid card number".to_owned(),
            },
        }),
        (None, None) => Err(HandlerError::definite(format!(
            "the charge for order {} names no card (cardToken)",
            command.order_id
        ))),
    }
}

/// Whether a charge of `amount` to the card ending in `last4` is declined, and why.
fn decline_reason(last4: &str, amount: Amount, limit: Amount) -> Option<String> {
    if last4 == DECLINED_CARD_SUFFIX {
        return Some(CARD_DECLINED.to_owned());
    }
    if amount > limit {
        return Some(format!(
            "amount {amount} is above the charge limit of {limit}"
        ));
    }
    None
}

async fn charge(
    tx: &mut PgConnection,
    command: ChargeCommand,
    limit: Amount,
) -> Result<ParticipantReply, HandlerError> {
    let earlier: Option<String> =
        sqlx::query_scalar("SELECT status FROM payments WHERE order_id = $1 FOR UPDATE")
            .bind(command.order_id)
            .fetch_optional(&mut *tx)
            .await
            .map_err(HandlerError::transient)?;
    // Behind the barrier, the charge of one saga's step runs again only as a new
    // attempt after a refusal (a declined charge retried, or restarted by an
    // operator once the limit or the card was mended): it decides again on the
    // declined row. Any other earlier payment comes from another saga, and
    // charging one order twice would never be undone.
    let retrying = match earlier.as_deref() {
        None => false,
        Some("DECLINED") => true,
        Some(_) => {
            return Err(HandlerError::definite(format!(
                "order {} already has a payment from another saga",
                command.order_id
            )));
        }
    };
    let amount = Amount(command.amount_cents);
    let (last4, reason) = match card(tx, &command).await? {
        Card::Known { last4 } => {
            let reason = decline_reason(&last4, amount, limit);
            (last4, reason)
        }
        Card::Refused { last4, reason } => (last4, Some(reason)),
    };
    let status = if reason.is_some() {
        "DECLINED"
    } else {
        "CHARGED"
    };
    let record = if retrying {
        "UPDATE payments SET amount = $2::bigint::numeric / 100, card_last4 = $3, status = $4, \
         reason = $5, updated_at = now() WHERE order_id = $1 AND status = 'DECLINED'"
    } else {
        "INSERT INTO payments (order_id, amount, card_last4, status, reason) \
         VALUES ($1, $2::bigint::numeric / 100, $3, $4, $5)"
    };
    sqlx::query(record)
        .bind(command.order_id)
        .bind(command.amount_cents)
        .bind(last4)
        .bind(status)
        .bind(reason.as_deref())
        .execute(&mut *tx)
        .await
        .map_err(HandlerError::transient)?;
    Ok(match reason {
        Some(reason) => {
            tracing::info!(order_id = %command.order_id, customer_id = %command.customer_id, %amount, reason = %reason, "payment declined");
            ParticipantReply::failure(
                PAYMENT_DECLINED,
                json!({ "orderId": command.order_id, "reason": reason }),
            )
        }
        None => {
            tracing::info!(order_id = %command.order_id, customer_id = %command.customer_id, %amount, "payment charged");
            ParticipantReply::success(
                PAYMENT_CHARGED,
                json!({ "orderId": command.order_id, "amountCents": command.amount_cents }),
            )
        }
    })
}

async fn refund(
    tx: &mut PgConnection,
    command: RefundCommand,
) -> Result<ParticipantReply, HandlerError> {
    let payment: Option<(String, i64)> = sqlx::query_as(
        "SELECT status, (amount * 100)::bigint FROM payments WHERE order_id = $1 FOR UPDATE",
    )
    .bind(command.order_id)
    .fetch_optional(&mut *tx)
    .await
    .map_err(HandlerError::transient)?;
    let Some((_, amount_cents)) = payment.filter(|(status, _)| status == "CHARGED") else {
        // The charge was declined (or never made here): nothing was taken, and the
        // compensation is still a success.
        tracing::info!(order_id = %command.order_id, "no charge for the order; nothing to refund");
        return Ok(ParticipantReply::success(
            PAYMENT_REFUNDED,
            json!({ "orderId": command.order_id, "amountCents": 0, "refunded": false }),
        ));
    };
    sqlx::query("UPDATE payments SET status = 'REFUNDED', updated_at = now() WHERE order_id = $1")
        .bind(command.order_id)
        .execute(&mut *tx)
        .await
        .map_err(HandlerError::transient)?;
    tracing::info!(order_id = %command.order_id, amount = %Amount(amount_cents), "payment refunded");
    Ok(ParticipantReply::success(
        PAYMENT_REFUNDED,
        json!({ "orderId": command.order_id, "amountCents": amount_cents, "refunded": true }),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_last_four_digits_are_kept() {
        assert_eq!(last4("4111 1111 1111 1234"), "1234");
        assert_eq!(last4("12"), "12");
        assert_eq!(last4(""), "");
        let command = ChargeCommand {
            order_id: Uuid::nil(),
            customer_id: Uuid::nil(),
            amount_cents: 1,
            card_token: None,
            card_number: Some("4111111111111234".to_owned()),
        };
        let shown = format!("{command:?}");
        assert!(!shown.contains("4111"), "{shown}");
        assert!(shown.contains("1234"), "{shown}");
    }

    #[test]
    fn declines_follow_the_card_and_the_limit() {
        let limit = Amount(500_000);
        assert_eq!(decline_reason("1111", Amount(500_000), limit), None);
        assert_eq!(
            decline_reason("9999", Amount(1), limit).as_deref(),
            Some(CARD_DECLINED)
        );
        assert_eq!(
            decline_reason("1111", Amount(500_001), limit).as_deref(),
            Some("amount 5000.01 is above the charge limit of 5000.00")
        );
    }
}
