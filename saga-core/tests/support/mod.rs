//! Shared pieces of the saga tests (`saga.rs`, `versions.rs`): the order saga's
//! data, local steps, commands and the steps its definitions share; a database
//! with the saga schema and a [`ManualClock`] for every orchestrator of a test
//! ([`SagaDb`], which each test's fixture derefs to); and the participant's side:
//! the messages in the outbox, a command handled behind its barrier, its replies
//! handed to an orchestrator.

#![allow(dead_code, unreachable_pub)]

use std::collections::BTreeMap;
use std::time::Duration;

use futures::future::BoxFuture;
use saga_core::consumer::IncomingMessage;
use saga_core::outbox::Outbox;
use saga_core::saga::{
    audit, participate, Command, CommandEnvelope, Effect, Orchestrator, Reply, ReplyDisposition,
    SagaBuilder, SagaDefinition, StepFailed,
};
use saga_core::schema;
use saga_core::status::SagaStatus;
use saga_core::testing::ManualClock;
use serde::{Deserialize, Serialize};
use sqlx::migrate::Migrator;
use sqlx::{PgConnection, PgPool};
use testkit::TestDatabase;
use uuid::Uuid;

static NO_SERVICE: Migrator = Migrator::DEFAULT;

/// The orchestrator's reply topic.
pub const REPLY_TOPIC: &str = "order.reply";

/// The timeout of the steps that have one. Long, to show that nothing waits for it:
/// the tests move their clock instead.
pub const STEP_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct Order {
    pub order_id: Uuid,
    pub amount: i64,
    /// The customer cancels: the `approve` step fails.
    pub cancel: bool,
    pub rejection: Option<String>,
}

/// A new order of 100.
pub fn order() -> Order {
    Order {
        order_id: Uuid::now_v7(),
        amount: 100,
        ..Order::default()
    }
}

#[derive(Debug, Deserialize)]
pub struct CreditLimitExceeded {
    pub available: i64,
}

impl Reply for CreditLimitExceeded {
    const TYPE: &'static str = "CreditLimitExceeded";
}

pub fn create<'a>(
    order: &'a mut Order,
    tx: &'a mut PgConnection,
) -> BoxFuture<'a, Result<(), StepFailed>> {
    Box::pin(async move {
        sqlx::query("INSERT INTO orders (id, status) VALUES ($1, 'PENDING')")
            .bind(order.order_id)
            .execute(&mut *tx)
            .await
            .map_err(|e| StepFailed::new(e.to_string()))?;
        Ok(())
    })
}

fn set_status<'a>(
    order: &'a Order,
    tx: &'a mut PgConnection,
    status: &'static str,
) -> BoxFuture<'a, Result<(), StepFailed>> {
    Box::pin(async move {
        sqlx::query("UPDATE orders SET status = $2 WHERE id = $1")
            .bind(order.order_id)
            .bind(status)
            .execute(&mut *tx)
            .await
            .map_err(|e| StepFailed::new(e.to_string()))?;
        Ok(())
    })
}

pub fn reject<'a>(
    order: &'a mut Order,
    tx: &'a mut PgConnection,
) -> BoxFuture<'a, Result<(), StepFailed>> {
    set_status(order, tx, "REJECTED")
}

/// Fails when the customer cancelled ([`Order::cancel`]).
pub fn approve<'a>(
    order: &'a mut Order,
    tx: &'a mut PgConnection,
) -> BoxFuture<'a, Result<(), StepFailed>> {
    Box::pin(async move {
        // Written before the check: a failing step's writes must be rolled back.
        set_status(order, tx, "APPROVED").await?;
        if order.cancel {
            return Err(StepFailed::new("the customer cancelled"));
        }
        Ok(())
    })
}

pub fn command(topic: &str, kind: &str, order: &Order) -> Command {
    Command::new(
        topic,
        kind,
        &serde_json::json!({ "orderId": order.order_id, "amount": order.amount }),
    )
    .expect("a JSON payload")
}

/// `builder` with the local step `create` and the participant step `step`, which
/// reserves the goods and is undone by the command `undo`, both compensable; the
/// caller sets the latter's timeout and retries.
pub fn goods_steps(
    builder: SagaBuilder<Order>,
    step: &str,
    undo: &'static str,
) -> SagaBuilder<Order> {
    builder
        .step("create")
        .invoke_local(create)
        .with_compensation(reject)
        .step(step)
        .invoke_participant(|o: &Order| command("inventory.request", "ReserveGoods", o))
        .with_participant_compensation(move |o: &Order| command("inventory.request", undo, o))
}

/// [`goods_steps`] with the step `reserve-goods`, undone by `ReleaseGoods`.
pub fn goods_saga(builder: SagaBuilder<Order>) -> SagaBuilder<Order> {
    goods_steps(builder, "reserve-goods", "ReleaseGoods")
}

/// The definition of `builder` ended by the participant step `reserve-credit`
/// (compensable; a `CreditLimitExceeded` refusal is noted in the order) and the
/// local step `approve`.
pub fn credit_and_approve(builder: SagaBuilder<Order>) -> SagaDefinition<Order> {
    builder
        .step("reserve-credit")
        .invoke_participant(|o: &Order| command("customer.request", "ReserveCredit", o))
        .on_reply::<CreditLimitExceeded>(|o, r| {
            o.rejection = Some(format!("credit limit exceeded, {} available", r.available));
        })
        .with_participant_compensation(|o: &Order| command("customer.request", "ReleaseCredit", o))
        .step("approve")
        .invoke_local(approve)
        .build()
        .expect("a valid definition")
}

/// A message as it sits in the outbox: a command, or a participant's reply.
#[derive(Debug, Clone)]
pub struct Sent {
    pub kind: String,
    /// Where it goes (the outbox's `aggregatetype`).
    pub topic: String,
    pub saga_id: String,
    pub step: String,
    pub request_id: String,
    pub compensation: bool,
    /// The command's attempt number, as the orchestrator wrote it (empty on a
    /// reply).
    pub attempt: String,
}

/// A test database with the saga schema and the `orders` table the local steps
/// write, and the clock of every orchestrator of the test.
pub struct SagaDb {
    pub db: TestDatabase,
    /// The clock of every orchestrator of the test.
    pub clock: ManualClock,
}

impl SagaDb {
    /// A new database, with the tables `more_tables` creates too.
    pub async fn new(more_tables: &str) -> SagaDb {
        let db = TestDatabase::create().await;
        schema::migrate(db.pool(), &NO_SERVICE).await.unwrap();
        sqlx::raw_sql("CREATE TABLE orders (id uuid PRIMARY KEY, status text NOT NULL)")
            .execute(db.pool())
            .await
            .unwrap();
        if !more_tables.is_empty() {
            sqlx::raw_sql(more_tables).execute(db.pool()).await.unwrap();
        }
        SagaDb {
            db,
            clock: ManualClock::new(),
        }
    }

    pub fn pool(&self) -> &PgPool {
        self.db.pool()
    }

    /// An orchestrator of `definition` on the test's clock.
    pub fn orchestrator(&self, definition: SagaDefinition<Order>) -> Orchestrator<Order> {
        Orchestrator::new(definition, Outbox::new(), REPLY_TOPIC).with_clock(self.clock.clone())
    }

    /// Every saga of the test, rebuilt from its audit trail, is its row of
    /// `saga_state`.
    pub async fn assert_trail_rebuilds(&self) {
        let check = audit::verify(self.pool(), None).await.unwrap();
        assert!(check.sagas > 0 && check.ok(), "{check}");
    }

    /// Where saga `id` of `orchestrator` stands.
    pub async fn status(&self, orchestrator: &Orchestrator<Order>, id: Uuid) -> SagaStatus {
        let mut conn = self.db.connect().await;
        orchestrator.load(&mut conn, id).await.unwrap().status
    }

    pub async fn order_status(&self, order: Uuid) -> Option<String> {
        sqlx::query_scalar("SELECT status FROM orders WHERE id = $1")
            .bind(order)
            .fetch_optional(self.pool())
            .await
            .unwrap()
    }

    /// Every message in the outbox (commands and replies), in the order they were
    /// written.
    pub async fn sent(&self) -> Vec<Sent> {
        self.outbox(None).await
    }

    /// Every command in the outbox (not the replies), in the order they were
    /// written.
    pub async fn commands(&self) -> Vec<Sent> {
        self.outbox(Some(REPLY_TOPIC)).await
    }

    /// The messages in the outbox, in order, but those to `except`.
    async fn outbox(&self, except: Option<&str>) -> Vec<Sent> {
        let rows: Vec<(String, String, serde_json::Value)> = sqlx::query_as(
            "SELECT type, aggregatetype, headers FROM outbox \
             WHERE aggregatetype IS DISTINCT FROM $1 ORDER BY id",
        )
        .bind(except)
        .fetch_all(self.pool())
        .await
        .unwrap();
        rows.into_iter()
            .map(|(kind, topic, headers)| Sent {
                kind,
                topic,
                saga_id: headers["saga-id"].as_str().unwrap().to_owned(),
                step: headers["saga-step"].as_str().unwrap().to_owned(),
                request_id: headers["request-id"].as_str().unwrap().to_owned(),
                compensation: headers["compensation"] == "true",
                attempt: headers["saga-attempt"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
            })
            .collect()
    }

    /// The participant's (latest) reply to `sent`, as the reply consumer receives it.
    pub async fn reply_to(&self, sent: &Sent) -> IncomingMessage {
        replies_in_outbox(self.pool())
            .await
            .into_iter()
            .rev()
            .find(|r| r.headers.get("request-id") == Some(&sent.request_id))
            .expect("the participant answered")
    }
}

/// Starts a saga of `orchestrator` for `order` in a transaction of its own.
pub async fn start_saga(pool: &PgPool, orchestrator: &Orchestrator<Order>, order: Order) -> Uuid {
    let id = Uuid::now_v7();
    let mut tx = pool.begin().await.unwrap();
    orchestrator.start(&mut tx, id, order).await.unwrap();
    tx.commit().await.unwrap();
    id
}

/// A command as the participant receives it, from a command row of the outbox,
/// as a command of type `kind`.
pub fn command_message(sent: &Sent, kind: &str) -> IncomingMessage {
    let mut headers = BTreeMap::new();
    headers.insert("saga-id".to_owned(), sent.saga_id.clone());
    headers.insert("saga-step".to_owned(), sent.step.clone());
    headers.insert("request-id".to_owned(), sent.request_id.clone());
    headers.insert("reply-to".to_owned(), REPLY_TOPIC.to_owned());
    headers.insert("compensation".to_owned(), sent.compensation.to_string());
    headers.insert("saga-attempt".to_owned(), sent.attempt.clone());
    IncomingMessage {
        topic: sent.topic.clone(),
        partition: 0,
        offset: 0,
        key: Some(sent.saga_id.clone()),
        id: Uuid::now_v7(),
        message_type: Some(kind.to_owned()),
        headers,
        payload: Some(serde_json::json!({ "quantity": 2 })),
    }
}

/// Handles `sent` as the participant with `effect` behind its barrier, in a
/// transaction of its own.
pub async fn handle_with<F>(f: &SagaDb, sent: &Sent, effect: F)
where
    F: for<'c> FnOnce(&'c mut PgConnection, &'c CommandEnvelope) -> Effect<'c>,
{
    let mut tx = f.pool().begin().await.unwrap();
    participate(
        &mut tx,
        &Outbox::new(),
        &command_message(sent, &sent.kind),
        effect,
    )
    .await
    .unwrap();
    tx.commit().await.unwrap();
}

/// The participant's replies in the outbox, in order, as the orchestrator receives
/// them.
pub async fn replies_in_outbox(pool: &PgPool) -> Vec<IncomingMessage> {
    let rows: Vec<(Uuid, String, serde_json::Value, serde_json::Value)> = sqlx::query_as(
        "SELECT id, type, payload, headers FROM outbox WHERE aggregatetype = $1 ORDER BY id",
    )
    .bind(REPLY_TOPIC)
    .fetch_all(pool)
    .await
    .unwrap();
    rows.into_iter()
        .map(|(id, kind, payload, headers)| {
            let headers: BTreeMap<String, String> = serde_json::from_value(headers).unwrap();
            IncomingMessage {
                topic: REPLY_TOPIC.to_owned(),
                partition: 0,
                offset: 0,
                key: headers.get("saga-id").cloned(),
                id,
                message_type: Some(kind),
                headers,
                payload: Some(payload),
            }
        })
        .collect()
}

/// Applies `reply` with `orchestrator` in a transaction of its own.
pub async fn apply_reply(
    orchestrator: &Orchestrator<Order>,
    pool: &PgPool,
    reply: &IncomingMessage,
) -> ReplyDisposition {
    let mut tx = pool.begin().await.unwrap();
    let disposition = orchestrator.handle_reply(&mut tx, reply).await.unwrap();
    tx.commit().await.unwrap();
    disposition
}
