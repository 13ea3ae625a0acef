//! The command handler against a real database: each test calls it directly inside
//! a transaction, as the consumer does, and looks at the stock, the reservations and
//! the replies in the outbox.

use inventory_service::commands::{
    GOODS_NOT_FOUND, GOODS_RELEASED, GOODS_RESERVED, INSUFFICIENT_STOCK, RELEASE_GOODS,
    RESERVE_GOODS,
};
use inventory_service::{CommandHandler, GADGET, WIDGET};
use saga_core::consumer::{HandlerError, IncomingMessage};
use saga_core::outbox::Outbox;
use saga_core::testing::{assert_replay, outbox_rows, OutboxRow, SagaCommand};
use serde_json::{json, Value};
use testkit::TestDatabase;
use uuid::Uuid;

const REPLY_TO: &str = "shop.order.reply";
const STEP: &str = "reserve-goods";

struct Fixture {
    db: TestDatabase,
    handler: CommandHandler,
}

impl Fixture {
    async fn new() -> Fixture {
        let db = TestDatabase::create().await;
        inventory_service::migrate(db.pool()).await.unwrap();
        inventory_service::seed(db.pool()).await.unwrap();
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

    async fn stock(&self, id: Uuid) -> i32 {
        sqlx::query_scalar("SELECT stock FROM goods WHERE id = $1")
            .bind(id)
            .fetch_one(self.db.pool())
            .await
            .unwrap()
    }

    async fn reservation(&self, order: Uuid) -> Option<(Uuid, i32, String)> {
        sqlx::query_as(
            "SELECT goods_id, quantity, status FROM goods_reservations WHERE order_id = $1",
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
        .topic("shop.inventory.request")
        .reply_to(REPLY_TO)
        .compensation(compensation)
        .payload(payload)
        .message()
}

fn goods(order: Uuid, goods: Uuid, quantity: i32) -> Value {
    json!({ "orderId": order, "goodsId": goods, "quantity": quantity })
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
async fn a_reserve_takes_stock_once_and_replies_once() {
    let f = Fixture::new().await;
    let (saga, order) = (Uuid::now_v7(), Uuid::now_v7());
    let reserve = command(saga, RESERVE_GOODS, false, goods(order, WIDGET, 3));
    f.handle(&reserve).await.unwrap();
    assert_eq!(f.stock(WIDGET).await, 97);
    assert_eq!(
        f.reservation(order).await,
        Some((WIDGET, 3, "RESERVED".to_owned()))
    );
    let replies = f.replies().await;
    assert_eq!(replies.len(), 1, "{replies:?}");
    assert_reply(&replies[0], saga, GOODS_RESERVED, "success");
    assert_eq!(
        replies[0].payload,
        json!({ "goodsId": WIDGET, "quantity": 3, "stockLeft": 97 })
    );
    assert_eq!(
        replies[0].header("request-id"),
        reserve.header("request-id")
    );

    // The same command again (a redelivery under another message id, or a retried
    // attempt) changes nothing; each copy is answered again with the first answer.
    let mut again = command(saga, RESERVE_GOODS, false, goods(order, WIDGET, 3));
    again
        .headers
        .insert("request-id".to_owned(), Uuid::now_v7().to_string());
    f.handle(&again).await.unwrap();
    f.handle(&reserve).await.unwrap();
    assert_eq!(f.stock(WIDGET).await, 97);
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
    let other = Uuid::now_v7();
    f.handle(&command(
        other,
        RESERVE_GOODS,
        false,
        goods(Uuid::now_v7(), WIDGET, 10),
    ))
    .await
    .unwrap();
    f.handle(&command(
        saga,
        RESERVE_GOODS,
        false,
        goods(order, WIDGET, 4),
    ))
    .await
    .unwrap();
    assert_eq!(f.stock(WIDGET).await, 86);

    let release = command(saga, RELEASE_GOODS, true, goods(order, WIDGET, 4));
    f.handle(&release).await.unwrap();
    assert_eq!(f.stock(WIDGET).await, 90, "only this order's 4 go back");
    assert_eq!(
        f.reservation(order).await,
        Some((WIDGET, 4, "RELEASED".to_owned()))
    );
    let replies = f.replies().await;
    assert_eq!(replies.len(), 3, "{replies:?}");
    assert_reply(&replies[2], saga, GOODS_RELEASED, "success");
    assert_eq!(
        replies[2].payload,
        json!({ "orderId": order, "goodsId": WIDGET, "quantity": 4, "released": true })
    );

    // A second release (a duplicate) gives nothing back again and is answered as the first.
    f.handle(&release).await.unwrap();
    f.handle(&command(saga, RELEASE_GOODS, true, goods(order, WIDGET, 4)))
        .await
        .unwrap();
    assert_eq!(f.stock(WIDGET).await, 90);
    let replies = f.replies().await;
    assert_eq!(replies.len(), 5, "{replies:?}");
    for replay in &replies[3..] {
        assert_replay(replay, &replies[2]);
    }
}

#[tokio::test]
async fn unknown_goods_are_answered_with_goods_not_found_and_nothing_changes() {
    let f = Fixture::new().await;
    let (saga, order, missing) = (Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7());
    f.handle(&command(
        saga,
        RESERVE_GOODS,
        false,
        goods(order, missing, 1),
    ))
    .await
    .unwrap();
    assert_eq!(f.reservation(order).await, None);
    assert_eq!((f.stock(WIDGET).await, f.stock(GADGET).await), (100, 1));
    let replies = f.replies().await;
    assert_eq!(replies.len(), 1, "{replies:?}");
    assert_reply(&replies[0], saga, GOODS_NOT_FOUND, "failure");
    assert_eq!(replies[0].payload, json!({ "goodsId": missing }));

    // Its compensation gets through the barrier (the step ran) and finds nothing.
    f.handle(&command(
        saga,
        RELEASE_GOODS,
        true,
        goods(order, missing, 1),
    ))
    .await
    .unwrap();
    let replies = f.replies().await;
    assert_eq!(replies.len(), 2, "{replies:?}");
    assert_reply(&replies[1], saga, GOODS_RELEASED, "success");
    assert_eq!(replies[1].payload["released"], false);
}

#[tokio::test]
async fn insufficient_stock_changes_nothing_and_its_release_gives_nothing_back() {
    let f = Fixture::new().await;
    let (saga, order) = (Uuid::now_v7(), Uuid::now_v7());
    f.handle(&command(
        saga,
        RESERVE_GOODS,
        false,
        goods(order, GADGET, 2),
    ))
    .await
    .unwrap();
    assert_eq!(f.stock(GADGET).await, 1);
    assert_eq!(f.reservation(order).await, None);
    let replies = f.replies().await;
    assert_eq!(replies.len(), 1, "{replies:?}");
    assert_reply(&replies[0], saga, INSUFFICIENT_STOCK, "failure");
    assert_eq!(
        replies[0].payload,
        json!({ "goodsId": GADGET, "requested": 2, "available": 1 })
    );

    // Another order takes the last gadget; the failed order's release must not hand
    // out a gadget that was never taken for it.
    let (winner_saga, winner) = (Uuid::now_v7(), Uuid::now_v7());
    f.handle(&command(
        winner_saga,
        RESERVE_GOODS,
        false,
        goods(winner, GADGET, 1),
    ))
    .await
    .unwrap();
    assert_eq!(f.stock(GADGET).await, 0);
    f.handle(&command(saga, RELEASE_GOODS, true, goods(order, GADGET, 2)))
        .await
        .unwrap();
    assert_eq!(f.stock(GADGET).await, 0);
    let replies = f.replies().await;
    assert_eq!(replies.len(), 3, "{replies:?}");
    assert_reply(&replies[2], saga, GOODS_RELEASED, "success");
    assert_eq!(
        replies[2].payload,
        json!({ "orderId": order, "goodsId": GADGET, "quantity": 0, "released": false })
    );
}

#[tokio::test]
async fn a_release_before_its_reserve_is_skipped_and_the_late_reserve_does_nothing() {
    let f = Fixture::new().await;
    let (saga, order) = (Uuid::now_v7(), Uuid::now_v7());
    f.handle(&command(saga, RELEASE_GOODS, true, goods(order, WIDGET, 5)))
        .await
        .unwrap();
    assert_eq!(f.stock(WIDGET).await, 100);
    let replies = f.replies().await;
    assert_eq!(replies.len(), 1, "{replies:?}");
    assert_reply(&replies[0], saga, "ReleaseGoodsSkipped", "success");

    // The reserve arriving after its compensation (hanging) must not take stock that
    // nothing would ever give back.
    f.handle(&command(
        saga,
        RESERVE_GOODS,
        false,
        goods(order, WIDGET, 5),
    ))
    .await
    .unwrap();
    assert_eq!(f.stock(WIDGET).await, 100);
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
            "ShipGoods",
            false,
            goods(order, WIDGET, 1),
        ))
        .await,
    );
    assert!(unknown.contains("ShipGoods"), "{unknown}");
    let malformed = definite(
        f.handle(&command(
            Uuid::now_v7(),
            RESERVE_GOODS,
            false,
            json!({ "orderId": order, "goods": WIDGET }),
        ))
        .await,
    );
    assert!(malformed.contains(RESERVE_GOODS), "{malformed}");
    let zero = definite(
        f.handle(&command(
            Uuid::now_v7(),
            RESERVE_GOODS,
            false,
            goods(order, WIDGET, 0),
        ))
        .await,
    );
    assert!(zero.contains("quantity"), "{zero}");
    let not_compensation = definite(
        f.handle(&command(
            Uuid::now_v7(),
            RELEASE_GOODS,
            false,
            goods(order, WIDGET, 1),
        ))
        .await,
    );
    assert!(
        not_compensation.contains("compensation"),
        "{not_compensation}"
    );
    assert_eq!(f.stock(WIDGET).await, 100);
    assert!(f.replies().await.is_empty());
}
