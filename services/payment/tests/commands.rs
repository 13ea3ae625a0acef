//! The command handler against a real database: each test calls it directly inside
//! a transaction, as the consumer does, and looks at the payments and the replies in
//! the outbox.

use payment_service::cards::CardVault;
use payment_service::commands::{
    CARD_DECLINED, CHARGE, PAYMENT_CHARGED, PAYMENT_DECLINED, PAYMENT_REFUNDED, REFUND,
    UNKNOWN_CARD_TOKEN,
};
use payment_service::{CommandHandler, DEFAULT_CHARGE_LIMIT};
use saga_core::consumer::{HandlerError, IncomingMessage};
use saga_core::outbox::Outbox;
use saga_core::testing::{assert_replay, outbox_rows, OutboxRow, SagaCommand};
use serde_json::{json, Value};
use service_kit::cards::CardNumber;
use service_kit::Amount;
use testkit::TestDatabase;
use uuid::Uuid;

const REPLY_TO: &str = "shop.order.reply";
const STEP: &str = "payment";

struct Fixture {
    db: TestDatabase,
    handler: CommandHandler,
    vault: CardVault,
    /// The token of [`CARD`].
    card: String,
}

impl Fixture {
    async fn new() -> Fixture {
        Fixture::with_limit(DEFAULT_CHARGE_LIMIT).await
    }

    async fn with_limit(limit: Amount) -> Fixture {
        let db = TestDatabase::create().await;
        payment_service::migrate(db.pool()).await.unwrap();
        payment_service::seed(db.pool()).await.unwrap();
        let vault = CardVault::new(db.pool().clone(), None);
        let card = token(&vault, CARD).await;
        Fixture {
            db,
            handler: CommandHandler::new(limit),
            vault,
            card,
        }
    }

    /// Handles `message` in a transaction of its own, committed when the handler
    /// succeeds, as the consumer does.
    async fn handle(&self, message: &IncomingMessage) -> Result<(), HandlerError> {
        saga_core::testing::handle(self.db.pool(), &self.handler, message).await
    }

    /// The order's payment: amount in cents, last digits, status, reason.
    async fn payment(&self, order: Uuid) -> Option<(i64, String, String, Option<String>)> {
        sqlx::query_as(
            "SELECT (amount * 100)::bigint, card_last4, status, reason FROM payments \
             WHERE order_id = $1",
        )
        .bind(order)
        .fetch_optional(self.db.pool())
        .await
        .unwrap()
    }

    async fn replies(&self) -> Vec<OutboxRow> {
        outbox_rows(self.db.pool(), &Outbox::new()).await.unwrap()
    }
}

/// A saga command as the consumer hands it over.
fn command(saga: Uuid, kind: &str, compensation: bool, payload: Value) -> IncomingMessage {
    SagaCommand::new(saga, STEP, kind)
        .topic("shop.payment.request")
        .reply_to(REPLY_TO)
        .compensation(compensation)
        .payload(payload)
        .message()
}

async fn token(vault: &CardVault, card: &str) -> String {
    let card = CardNumber::parse(card).unwrap();
    vault.tokenise(&card).await.unwrap().card_token
}

/// A charge naming the card by its token.
fn charge(order: Uuid, amount_cents: i64, card_token: &str) -> Value {
    json!({
        "orderId": order,
        "customerId": Uuid::from_u128(0xc001),
        "amountCents": amount_cents,
        "cardToken": card_token,
    })
}

/// A declined payment as [`Fixture::payment`] reads it.
fn declined(
    cents: i64,
    last4: &str,
    reason: &str,
) -> Option<(i64, String, String, Option<String>)> {
    Some((
        cents,
        last4.to_owned(),
        "DECLINED".to_owned(),
        Some(reason.to_owned()),
    ))
}

fn refund(order: Uuid) -> Value {
    json!({ "orderId": order })
}

const CARD: &str = "4111 1111 1111 1234";

fn assert_reply(reply: &OutboxRow, saga: Uuid, kind: &str, outcome: &str) {
    assert_eq!(reply.aggregatetype, REPLY_TO);
    assert_eq!(reply.aggregateid, saga.to_string());
    assert_eq!(reply.kind, kind, "{reply:?}");
    assert_eq!(reply.header("outcome"), Some(outcome), "{reply:?}");
    assert_eq!(reply.header("saga-id"), Some(saga.to_string().as_str()));
    assert_eq!(reply.header("saga-step"), Some(STEP));
}

#[tokio::test]
async fn a_charge_is_recorded_once_and_replied_once() {
    let f = Fixture::new().await;
    let (saga, order) = (Uuid::now_v7(), Uuid::now_v7());
    let command_message = command(saga, CHARGE, false, charge(order, 4_990, &f.card));
    f.handle(&command_message).await.unwrap();
    assert_eq!(
        f.payment(order).await,
        Some((4_990, "1234".to_owned(), "CHARGED".to_owned(), None))
    );
    let replies = f.replies().await;
    assert_eq!(replies.len(), 1, "{replies:?}");
    assert_reply(&replies[0], saga, PAYMENT_CHARGED, "success");
    assert_eq!(
        replies[0].payload,
        json!({ "orderId": order, "amountCents": 4_990 })
    );
    assert_eq!(
        replies[0].header("request-id"),
        command_message.header("request-id")
    );

    // The same command again (a redelivery under another message id, or a retried
    // attempt) charges nothing more; each copy is answered again with the first answer.
    let mut again = command(saga, CHARGE, false, charge(order, 4_990, &f.card));
    again
        .headers
        .insert("request-id".to_owned(), Uuid::now_v7().to_string());
    f.handle(&again).await.unwrap();
    f.handle(&command_message).await.unwrap();
    let payments: i64 = sqlx::query_scalar("SELECT count(*) FROM payments")
        .fetch_one(f.db.pool())
        .await
        .unwrap();
    assert_eq!(payments, 1);
    let replies = f.replies().await;
    assert_eq!(replies.len(), 3, "{replies:?}");
    for replay in &replies[1..] {
        assert_replay(replay, &replies[0]);
    }
}

#[tokio::test]
async fn a_refund_after_a_charge_pays_it_back_once() {
    let f = Fixture::new().await;
    let (saga, order) = (Uuid::now_v7(), Uuid::now_v7());
    let other = Uuid::now_v7();
    f.handle(&command(
        Uuid::now_v7(),
        CHARGE,
        false,
        charge(other, 100, &f.card),
    ))
    .await
    .unwrap();
    f.handle(&command(saga, CHARGE, false, charge(order, 2_500, &f.card)))
        .await
        .unwrap();

    let refund_message = command(saga, REFUND, true, refund(order));
    f.handle(&refund_message).await.unwrap();
    assert_eq!(
        f.payment(order).await,
        Some((2_500, "1234".to_owned(), "REFUNDED".to_owned(), None))
    );
    assert_eq!(
        f.payment(other).await.map(|p| p.2),
        Some("CHARGED".to_owned()),
        "only this order's charge is refunded"
    );
    let replies = f.replies().await;
    assert_eq!(replies.len(), 3, "{replies:?}");
    assert_reply(&replies[2], saga, PAYMENT_REFUNDED, "success");
    assert_eq!(
        replies[2].payload,
        json!({ "orderId": order, "amountCents": 2_500, "refunded": true })
    );

    // A second refund (a duplicate) pays nothing back again and is answered as the first.
    f.handle(&refund_message).await.unwrap();
    f.handle(&command(saga, REFUND, true, refund(order)))
        .await
        .unwrap();
    let replies = f.replies().await;
    assert_eq!(replies.len(), 5, "{replies:?}");
    for replay in &replies[3..] {
        assert_replay(replay, &replies[2]);
    }
}

#[tokio::test]
async fn a_declined_card_is_recorded_and_its_refund_pays_nothing_back() {
    let f = Fixture::new().await;
    let (saga, order) = (Uuid::now_v7(), Uuid::now_v7());
    f.handle(&command(
        saga,
        CHARGE,
        false,
        charge(order, 1_000, &token(&f.vault, "4000-0000-0000-9999").await),
    ))
    .await
    .unwrap();
    assert_eq!(
        f.payment(order).await,
        declined(1_000, "9999", CARD_DECLINED)
    );
    let replies = f.replies().await;
    assert_eq!(replies.len(), 1, "{replies:?}");
    assert_reply(&replies[0], saga, PAYMENT_DECLINED, "failure");
    assert_eq!(
        replies[0].payload,
        json!({ "orderId": order, "reason": CARD_DECLINED })
    );

    // The refund gets through the barrier (the step ran) and finds nothing charged.
    f.handle(&command(saga, REFUND, true, refund(order)))
        .await
        .unwrap();
    assert_eq!(
        f.payment(order).await.map(|p| p.2),
        Some("DECLINED".to_owned())
    );
    let replies = f.replies().await;
    assert_eq!(replies.len(), 2, "{replies:?}");
    assert_reply(&replies[1], saga, PAYMENT_REFUNDED, "success");
    assert_eq!(
        replies[1].payload,
        json!({ "orderId": order, "amountCents": 0, "refunded": false })
    );
}

#[tokio::test]
async fn a_charge_above_the_limit_is_declined_naming_the_limit() {
    let f = Fixture::with_limit(Amount(10_000)).await;
    let (saga, order) = (Uuid::now_v7(), Uuid::now_v7());
    f.handle(&command(
        saga,
        CHARGE,
        false,
        charge(order, 10_001, &f.card),
    ))
    .await
    .unwrap();
    let reason = "amount 100.01 is above the charge limit of 100.00";
    assert_eq!(f.payment(order).await, declined(10_001, "1234", reason));
    let replies = f.replies().await;
    assert_eq!(replies.len(), 1, "{replies:?}");
    assert_reply(&replies[0], saga, PAYMENT_DECLINED, "failure");
    assert_eq!(
        replies[0].payload,
        json!({ "orderId": order, "reason": reason })
    );

    // The limit itself is allowed.
    let (saga, order) = (Uuid::now_v7(), Uuid::now_v7());
    f.handle(&command(
        saga,
        CHARGE,
        false,
        charge(order, 10_000, &f.card),
    ))
    .await
    .unwrap();
    assert_eq!(
        f.payment(order).await.map(|p| p.2),
        Some("CHARGED".to_owned())
    );
}

#[tokio::test]
async fn a_refund_before_its_charge_is_skipped_and_the_late_charge_does_nothing() {
    let f = Fixture::new().await;
    let (saga, order) = (Uuid::now_v7(), Uuid::now_v7());
    f.handle(&command(saga, REFUND, true, refund(order)))
        .await
        .unwrap();
    let replies = f.replies().await;
    assert_eq!(replies.len(), 1, "{replies:?}");
    assert_reply(&replies[0], saga, "RefundSkipped", "success");

    // The charge arriving after its compensation (hanging) must not take money that
    // nothing would ever pay back.
    f.handle(&command(saga, CHARGE, false, charge(order, 700, &f.card)))
        .await
        .unwrap();
    assert_eq!(f.payment(order).await, None);
    assert_eq!(f.replies().await.len(), 1);
}

#[tokio::test]
async fn commands_that_can_never_apply_are_definite_failures() {
    let f = Fixture::new().await;
    let order = Uuid::now_v7();
    let definite = |result: Result<(), HandlerError>| match result {
        Err(HandlerError::Definite(reason)) => reason,
        other => panic!("expected a definite failure, got {other:?}"),
    };
    let unknown = definite(
        f.handle(&command(Uuid::now_v7(), "Chargeback", false, refund(order)))
            .await,
    );
    assert!(unknown.contains("Chargeback"), "{unknown}");
    let malformed = definite(
        f.handle(&command(
            Uuid::now_v7(),
            CHARGE,
            false,
            json!({ "orderId": order, "amountCents": 100 }),
        ))
        .await,
    );
    assert!(malformed.contains(CHARGE), "{malformed}");
    let malformed_refund = definite(
        f.handle(&command(
            Uuid::now_v7(),
            REFUND,
            true,
            json!({ "order": order }),
        ))
        .await,
    );
    assert!(malformed_refund.contains(REFUND), "{malformed_refund}");
    for cents in [0, -5, i64::MAX] {
        let bad = definite(
            f.handle(&command(
                Uuid::now_v7(),
                CHARGE,
                false,
                charge(order, cents, &f.card),
            ))
            .await,
        );
        assert!(bad.contains("amountCents"), "{bad}");
    }
    let not_compensation = definite(
        f.handle(&command(Uuid::now_v7(), REFUND, false, refund(order)))
            .await,
    );
    assert!(
        not_compensation.contains("compensation"),
        "{not_compensation}"
    );
    assert_eq!(f.payment(order).await, None);
    assert!(f.replies().await.is_empty());
}

/// A declined charge tried again as a new attempt (the definition's retry, or an
/// operator restarting the step after raising the limit) decides again on the
/// same payment: charged now, replied once per attempt, and a redelivery of
/// either attempt charges nothing more.
#[tokio::test]
async fn a_declined_charge_tried_again_as_a_new_attempt_is_charged_once() {
    let low = Fixture::with_limit(Amount(10_000)).await;
    let (saga, order) = (Uuid::now_v7(), Uuid::now_v7());
    let card = low.card.clone();
    let attempt = |n: u32| {
        SagaCommand::new(saga, STEP, CHARGE)
            .topic("shop.payment.request")
            .reply_to(REPLY_TO)
            .attempt(n)
            .payload(charge(order, 20_000, &card))
            .message()
    };
    low.handle(&attempt(1)).await.unwrap();
    assert_eq!(
        low.payment(order).await.map(|p| p.2),
        Some("DECLINED".to_owned())
    );
    // The limit was raised: the same database, a handler with the new limit.
    let raised = Fixture {
        handler: CommandHandler::new(Amount(50_000)),
        ..low
    };
    raised.handle(&attempt(2)).await.unwrap();
    assert_eq!(
        raised.payment(order).await,
        Some((20_000, "1234".to_owned(), "CHARGED".to_owned(), None))
    );
    let replies = raised.replies().await;
    assert_eq!(replies.len(), 2, "{replies:?}");
    assert_reply(&replies[0], saga, PAYMENT_DECLINED, "failure");
    assert_reply(&replies[1], saga, PAYMENT_CHARGED, "success");
    // Both attempts delivered again: answered from the barrier, nothing charged.
    raised.handle(&attempt(1)).await.unwrap();
    raised.handle(&attempt(2)).await.unwrap();
    let replies = raised.replies().await;
    assert_eq!(replies.len(), 4, "{replies:?}");
    for replay in &replies[2..] {
        assert_replay(replay, &replies[1]);
    }
    assert_eq!(
        raised.payment(order).await.map(|p| p.2),
        Some("CHARGED".to_owned())
    );
}

#[tokio::test]
async fn the_vault_gives_one_token_per_card_and_keeps_no_number() {
    let f = Fixture::new().await;
    let same = CardNumber::parse("4111-1111-1111-1234").unwrap();
    let again = f.vault.tokenise(&same).await.unwrap();
    assert_eq!(again.card_token, f.card, "the same card, the same token");
    assert!(!again.created);
    assert_eq!(again.card_last4, "1234");
    let other = token(&f.vault, "5500 0000 0000 1234").await;
    assert_ne!(other, f.card, "another card with the same last digits");
    assert!(f.card.starts_with("card_1234_"), "{}", f.card);

    let tables: String = sqlx::query_scalar("SELECT string_agg(t::text, ' ') FROM card_tokens t")
        .fetch_one(f.db.pool())
        .await
        .unwrap();
    assert!(tables.contains(&f.card), "{tables}");
    for number in ["4111111111111234", "5500000000001234"] {
        assert!(!tables.contains(number), "{number} is kept: {tables}");
    }

    // Another vault key: the digest differs, so the card gets a token of its own.
    let keyed = CardVault::new(f.db.pool().clone(), Some(vec![7; 32]));
    let keyed = token(&keyed, CARD).await;
    assert_ne!(keyed, f.card);
}

#[tokio::test]
async fn a_token_the_vault_did_not_make_is_declined() {
    let f = Fixture::new().await;
    let (saga, order) = (Uuid::now_v7(), Uuid::now_v7());
    let forged = "card_4321_00000000000000000000000000000000";
    f.handle(&command(saga, CHARGE, false, charge(order, 1_000, forged)))
        .await
        .unwrap();
    assert_eq!(
        f.payment(order).await,
        declined(1_000, "4321", UNKNOWN_CARD_TOKEN)
    );
    let replies = f.replies().await;
    assert_reply(&replies[0], saga, PAYMENT_DECLINED, "failure");
}

#[tokio::test]
async fn a_charge_from_a_saga_started_before_the_vault_keeps_only_the_last_digits() {
    let f = Fixture::new().await;
    let (saga, order) = (Uuid::now_v7(), Uuid::now_v7());
    let legacy = json!({
        "orderId": order,
        "customerId": Uuid::from_u128(0xc001),
        "amountCents": 1_500,
        "cardNumber": "4000 0000 0000 9999",
    });
    f.handle(&command(saga, CHARGE, false, legacy))
        .await
        .unwrap();
    assert_eq!(
        f.payment(order).await,
        declined(1_500, "9999", CARD_DECLINED)
    );
    let (saga, order) = (Uuid::now_v7(), Uuid::now_v7());
    let legacy = json!({
        "orderId": order,
        "customerId": Uuid::from_u128(0xc001),
        "amountCents": 1_500,
        "cardNumber": "4111 1111 1111 1111",
    });
    f.handle(&command(saga, CHARGE, false, legacy))
        .await
        .unwrap();
    assert_eq!(
        f.payment(order).await.map(|p| p.2),
        Some("CHARGED".to_owned())
    );
}
