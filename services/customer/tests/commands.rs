//! The command handler against a real database: each test calls it directly inside
//! a transaction, as the consumer does, and looks at the credit, the reservations and
//! the replies in the outbox.

use customer_service::commands::{
    CREDIT_LIMIT_EXCEEDED, CREDIT_RELEASED, CREDIT_RESERVED, CUSTOMER_NOT_FOUND, RELEASE_CREDIT,
    RESERVE_CREDIT,
};
use customer_service::{CommandHandler, ADA, BOB};
use saga_core::consumer::{HandlerError, IncomingMessage};
use saga_core::outbox::Outbox;
use saga_core::testing::{assert_replay, outbox_rows, OutboxRow, SagaCommand};
use serde_json::{json, Value};
use testkit::TestDatabase;
use uuid::Uuid;

const REPLY_TO: &str = "shop.order.reply";
const STEP: &str = "reserve-credit";

struct Fixture {
    db: TestDatabase,
    handler: CommandHandler,
}

impl Fixture {
    async fn new() -> Fixture {
        let db = TestDatabase::create().await;
        customer_service::migrate(db.pool()).await.unwrap();
        customer_service::seed(db.pool()).await.unwrap();
        Fixture {
            db,
            handler: CommandHandler::new(),
        }
    }

    /// Handles `message` in a transaction of its own, committed when the handler
    /// succeeds, as the consumer does.
    async fn handle(&self, message: &IncomingMessage) -> Result<(), HandlerError> {
        saga_core::testing::handle(self.db.pool(), &self.handler, message).await
    }

    /// The customer's available credit, in cents.
    async fn available(&self, id: Uuid) -> i64 {
        sqlx::query_scalar("SELECT (available_credit * 100)::bigint FROM customers WHERE id = $1")
            .bind(id)
            .fetch_one(self.db.pool())
            .await
            .unwrap()
    }

    async fn reservation(&self, order: Uuid) -> Option<(Uuid, i64, String)> {
        sqlx::query_as(
            "SELECT customer_id, (amount * 100)::bigint, status FROM credit_reservations \
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
        .topic("shop.customer.request")
        .reply_to(REPLY_TO)
        .compensation(compensation)
        .payload(payload)
        .message()
}

fn credit(order: Uuid, customer: Uuid, amount_cents: i64) -> Value {
    json!({ "orderId": order, "customerId": customer, "amountCents": amount_cents })
}

fn assert_reply(reply: &OutboxRow, saga: Uuid, kind: &str, outcome: &str) {
    assert_eq!(reply.aggregatetype, REPLY_TO);
    assert_eq!(reply.aggregateid, saga.to_string());
    assert_eq!(reply.kind, kind, "{reply:?}");
    assert_eq!(reply.header("outcome"), Some(outcome), "{reply:?}");
    assert_eq!(reply.header("saga-id"), Some(saga.to_string().as_str()));
    assert_eq!(reply.header("saga-step"), Some(STEP));
}

#[tokio::test]
async fn a_reserve_takes_credit_once_and_replies_once() {
    let f = Fixture::new().await;
    let (saga, order) = (Uuid::now_v7(), Uuid::now_v7());
    let reserve = command(saga, RESERVE_CREDIT, false, credit(order, ADA, 12_345));
    f.handle(&reserve).await.unwrap();
    assert_eq!(f.available(ADA).await, 100_000 - 12_345);
    assert_eq!(
        f.reservation(order).await,
        Some((ADA, 12_345, "RESERVED".to_owned()))
    );
    let replies = f.replies().await;
    assert_eq!(replies.len(), 1, "{replies:?}");
    assert_reply(&replies[0], saga, CREDIT_RESERVED, "success");
    assert_eq!(
        replies[0].payload,
        json!({ "customerId": ADA, "amountCents": 12_345, "availableCents": 87_655 })
    );
    assert_eq!(
        replies[0].header("request-id"),
        reserve.header("request-id")
    );

    // The same command again (a redelivery under another message id, or a retried
    // attempt) changes nothing; each copy is answered again with the first answer.
    let mut again = command(saga, RESERVE_CREDIT, false, credit(order, ADA, 12_345));
    again
        .headers
        .insert("request-id".to_owned(), Uuid::now_v7().to_string());
    f.handle(&again).await.unwrap();
    f.handle(&reserve).await.unwrap();
    assert_eq!(f.available(ADA).await, 87_655);
    let replies = f.replies().await;
    assert_eq!(replies.len(), 3, "{replies:?}");
    for replay in &replies[1..] {
        assert_replay(replay, &replies[0]);
    }
}

#[tokio::test]
async fn a_release_after_a_reserve_gives_back_exactly_what_was_taken() {
    let f = Fixture::new().await;
    let (saga, order) = (Uuid::now_v7(), Uuid::now_v7());
    f.handle(&command(
        Uuid::now_v7(),
        RESERVE_CREDIT,
        false,
        credit(Uuid::now_v7(), ADA, 1_001),
    ))
    .await
    .unwrap();
    f.handle(&command(
        saga,
        RESERVE_CREDIT,
        false,
        credit(order, ADA, 4_999),
    ))
    .await
    .unwrap();
    assert_eq!(f.available(ADA).await, 100_000 - 1_001 - 4_999);

    let release = command(saga, RELEASE_CREDIT, true, credit(order, ADA, 4_999));
    f.handle(&release).await.unwrap();
    assert_eq!(
        f.available(ADA).await,
        100_000 - 1_001,
        "only this order's credit goes back"
    );
    assert_eq!(
        f.reservation(order).await,
        Some((ADA, 4_999, "RELEASED".to_owned()))
    );
    let replies = f.replies().await;
    assert_eq!(replies.len(), 3, "{replies:?}");
    assert_reply(&replies[2], saga, CREDIT_RELEASED, "success");
    assert_eq!(
        replies[2].payload,
        json!({ "orderId": order, "customerId": ADA, "amountCents": 4_999, "released": true })
    );

    // A second release (a duplicate) gives nothing back again and is answered as the first.
    f.handle(&release).await.unwrap();
    f.handle(&command(
        saga,
        RELEASE_CREDIT,
        true,
        credit(order, ADA, 4_999),
    ))
    .await
    .unwrap();
    assert_eq!(f.available(ADA).await, 100_000 - 1_001);
    let replies = f.replies().await;
    assert_eq!(replies.len(), 5, "{replies:?}");
    for replay in &replies[3..] {
        assert_replay(replay, &replies[2]);
    }
}

#[tokio::test]
async fn an_unknown_customer_is_answered_with_customer_not_found_and_nothing_changes() {
    let f = Fixture::new().await;
    let (saga, order, missing) = (Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7());
    f.handle(&command(
        saga,
        RESERVE_CREDIT,
        false,
        credit(order, missing, 100),
    ))
    .await
    .unwrap();
    assert_eq!(f.reservation(order).await, None);
    assert_eq!(
        (f.available(ADA).await, f.available(BOB).await),
        (100_000, 5_000)
    );
    let replies = f.replies().await;
    assert_eq!(replies.len(), 1, "{replies:?}");
    assert_reply(&replies[0], saga, CUSTOMER_NOT_FOUND, "failure");
    assert_eq!(replies[0].payload, json!({ "customerId": missing }));

    // Its compensation gets through the barrier (the step ran) and finds nothing.
    f.handle(&command(
        saga,
        RELEASE_CREDIT,
        true,
        credit(order, missing, 100),
    ))
    .await
    .unwrap();
    let replies = f.replies().await;
    assert_eq!(replies.len(), 2, "{replies:?}");
    assert_reply(&replies[1], saga, CREDIT_RELEASED, "success");
    assert_eq!(replies[1].payload["released"], false);
}

#[tokio::test]
async fn a_reserve_above_the_available_credit_changes_nothing_and_its_release_gives_nothing_back() {
    let f = Fixture::new().await;
    let (saga, order) = (Uuid::now_v7(), Uuid::now_v7());
    f.handle(&command(
        saga,
        RESERVE_CREDIT,
        false,
        credit(order, BOB, 5_001),
    ))
    .await
    .unwrap();
    assert_eq!(f.available(BOB).await, 5_000);
    assert_eq!(f.reservation(order).await, None);
    let replies = f.replies().await;
    assert_eq!(replies.len(), 1, "{replies:?}");
    assert_reply(&replies[0], saga, CREDIT_LIMIT_EXCEEDED, "failure");
    assert_eq!(
        replies[0].payload,
        json!({ "customerId": BOB, "requestedCents": 5_001, "availableCents": 5_000 })
    );

    // Another order spends Bob's credit; the failed order's release must not hand
    // out credit that was never set aside for it.
    f.handle(&command(
        Uuid::now_v7(),
        RESERVE_CREDIT,
        false,
        credit(Uuid::now_v7(), BOB, 5_000),
    ))
    .await
    .unwrap();
    assert_eq!(f.available(BOB).await, 0);
    f.handle(&command(
        saga,
        RELEASE_CREDIT,
        true,
        credit(order, BOB, 5_001),
    ))
    .await
    .unwrap();
    assert_eq!(f.available(BOB).await, 0);
    let replies = f.replies().await;
    assert_eq!(replies.len(), 3, "{replies:?}");
    assert_reply(&replies[2], saga, CREDIT_RELEASED, "success");
    assert_eq!(
        replies[2].payload,
        json!({ "orderId": order, "customerId": BOB, "amountCents": 0, "released": false })
    );
}

#[tokio::test]
async fn a_release_before_its_reserve_is_skipped_and_the_late_reserve_does_nothing() {
    let f = Fixture::new().await;
    let (saga, order) = (Uuid::now_v7(), Uuid::now_v7());
    f.handle(&command(
        saga,
        RELEASE_CREDIT,
        true,
        credit(order, ADA, 700),
    ))
    .await
    .unwrap();
    assert_eq!(f.available(ADA).await, 100_000);
    let replies = f.replies().await;
    assert_eq!(replies.len(), 1, "{replies:?}");
    assert_reply(&replies[0], saga, "ReleaseCreditSkipped", "success");

    // The reserve arriving after its compensation (hanging) must not take credit that
    // nothing would ever give back.
    f.handle(&command(
        saga,
        RESERVE_CREDIT,
        false,
        credit(order, ADA, 700),
    ))
    .await
    .unwrap();
    assert_eq!(f.available(ADA).await, 100_000);
    assert_eq!(f.reservation(order).await, None);
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
        f.handle(&command(
            Uuid::now_v7(),
            "RaiseLimit",
            false,
            credit(order, ADA, 1),
        ))
        .await,
    );
    assert!(unknown.contains("RaiseLimit"), "{unknown}");
    let malformed = definite(
        f.handle(&command(
            Uuid::now_v7(),
            RESERVE_CREDIT,
            false,
            json!({ "orderId": order, "customerId": ADA, "amount": 10.5 }),
        ))
        .await,
    );
    assert!(malformed.contains(RESERVE_CREDIT), "{malformed}");
    for cents in [0, -5, i64::MAX] {
        let bad = definite(
            f.handle(&command(
                Uuid::now_v7(),
                RESERVE_CREDIT,
                false,
                credit(order, ADA, cents),
            ))
            .await,
        );
        assert!(bad.contains("amountCents"), "{bad}");
    }
    let not_compensation = definite(
        f.handle(&command(
            Uuid::now_v7(),
            RELEASE_CREDIT,
            false,
            credit(order, ADA, 1),
        ))
        .await,
    );
    assert!(
        not_compensation.contains("compensation"),
        "{not_compensation}"
    );
    assert_eq!(f.available(ADA).await, 100_000);
    assert!(f.replies().await.is_empty());
}
