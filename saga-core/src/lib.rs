//! `saga-core`: the library services are written with.
//!
//! - [`outbox`]: the outbox writer, inserting events in the caller's transaction.
//! - [`consumer`]: a Kafka consumer that applies each message's effects once, in one
//!   transaction with its journal row, and dead-letters what it cannot handle.
//! - [`saga`]: orchestrated sagas — a definition DSL, the orchestrator, participant
//!   helpers and the operator's view. Each saga instance is pinned to the version of
//!   its definition it started with ([`saga::versions`]).
//! - [`barrier`]: the participant's barrier that turns duplicate deliveries, null
//!   compensations and hanging actions into no-ops.
//! - [`schema`]: the shared tables (`outbox`, `processed_messages`, `saga_state`,
//!   `saga_events`, `saga_held_replies`, `saga_barrier`, `outbox_relay_snapshots`,
//!   `outbox_relay_resume`) as migrations a service embeds beside its own.
//! - [`status`]: the lifecycle states a saga and its steps go through.
//! - [`testing`]: a participant's handler tested against a real database without a
//!   broker: commands as the consumer hands them over, the replies in the outbox.
//!
//! # Example: an order saga, a participant, and running both
//!
//! The orchestrator (the order service) defines the saga, starts it in the same
//! transaction as its own order row, and consumes replies; the participant (the
//! customer service) consumes commands and replies through its outbox. The relay
//! (`outbox-relay`, one per database, topic template `{aggregatetype}`) carries the
//! outbox rows to Kafka.
//!
//! ```no_run
//! use std::sync::Arc;
//! use std::time::Duration;
//!
//! use futures::future::BoxFuture;
//! use saga_core::consumer::{Consumer, ConsumerConfig, HandlerError, IncomingMessage, MessageHandler};
//! use saga_core::outbox::Outbox;
//! use saga_core::saga::{
//!     participate, Command, CommandEnvelope, Effect, Orchestrator, ParticipantReply, Reply,
//!     SagaDefinition, StepFailed,
//! };
//! use serde::{Deserialize, Serialize};
//! use sqlx::{PgConnection, PgPool};
//! use uuid::Uuid;
//!
//! #[derive(Clone, Serialize, Deserialize)]
//! struct OrderPlacement { order_id: Uuid, customer_id: Uuid, amount: i64, rejection: Option<String> }
//!
//! #[derive(Deserialize)]
//! struct CreditLimitExceeded { available: i64 }
//! impl Reply for CreditLimitExceeded { const TYPE: &'static str = "CreditLimitExceeded"; }
//!
//! fn reject<'a>(o: &'a mut OrderPlacement, tx: &'a mut PgConnection) -> BoxFuture<'a, Result<(), StepFailed>> {
//!     Box::pin(async move {
//!         sqlx::query("UPDATE orders SET status = 'REJECTED' WHERE id = $1")
//!             .bind(o.order_id).execute(&mut *tx).await
//!             .map_err(|e| StepFailed::new(e.to_string()))?;
//!         Ok(())
//!     })
//! }
//!
//! fn approve<'a>(o: &'a mut OrderPlacement, tx: &'a mut PgConnection) -> BoxFuture<'a, Result<(), StepFailed>> {
//!     Box::pin(async move {
//!         let updated = sqlx::query("UPDATE orders SET status = 'APPROVED' WHERE id = $1 AND NOT cancelled")
//!             .bind(o.order_id).execute(&mut *tx).await
//!             .map_err(|e| StepFailed::new(e.to_string()))?;
//!         if updated.rows_affected() == 0 {
//!             return Err(StepFailed::new("the customer cancelled the order"));
//!         }
//!         Ok(())
//!     })
//! }
//!
//! fn credit(kind: &str, o: &OrderPlacement) -> Command {
//!     Command::new("customer.request", kind, &serde_json::json!({
//!         "customerId": o.customer_id, "amount": o.amount,
//!     })).expect("a JSON payload")
//! }
//!
//! fn definition() -> SagaDefinition<OrderPlacement> {
//!     SagaDefinition::<OrderPlacement>::builder("order-placement")
//!         // The order row is written by the caller in the starting transaction.
//!         .step("create").invoke_local(|_, _| Box::pin(async { Ok(()) })).with_compensation(reject)
//!         .step("reserve-credit").invoke_participant(|o: &OrderPlacement| credit("ReserveCredit", o))
//!             .on_reply::<CreditLimitExceeded>(|o, r| {
//!                 o.rejection = Some(format!("credit limit exceeded ({} available)", r.available));
//!             })
//!             .with_participant_compensation(|o: &OrderPlacement| credit("ReleaseCredit", o))
//!             .with_timeout(Duration::from_secs(30))
//!         .step("approve").invoke_local(approve)
//!         .build()
//!         .expect("a valid saga")
//! }
//!
//! /// The customer service's command handler: barrier, effect and reply in one transaction.
//! struct Customers { outbox: Outbox }
//!
//! fn reserve_credit<'c>(tx: &'c mut PgConnection, command: &'c CommandEnvelope) -> Effect<'c> {
//!     Box::pin(async move {
//!         let reserved = sqlx::query(
//!             "UPDATE customers SET available_credit = available_credit - 10 \
//!              WHERE id = (SELECT id FROM customers LIMIT 1) AND available_credit >= 10")
//!             .execute(&mut *tx).await.map_err(HandlerError::transient)?;
//!         Ok(if reserved.rows_affected() == 1 {
//!             ParticipantReply::success("CreditReserved", serde_json::json!({}))
//!         } else {
//!             ParticipantReply::failure("CreditLimitExceeded", serde_json::json!({ "available": 0 }))
//!         })
//!     })
//! }
//!
//! impl MessageHandler for Customers {
//!     fn handle<'a>(&'a self, tx: &'a mut PgConnection, message: &'a IncomingMessage)
//!         -> BoxFuture<'a, Result<(), HandlerError>> {
//!         Box::pin(participate(tx, &self.outbox, message, reserve_credit))
//!     }
//! }
//!
//! # async fn run(order_db: PgPool, customer_db: PgPool, brokers: &str) -> anyhow::Result<()> {
//! // The order service: start a saga with the order row, then consume replies and sweep deadlines.
//! let orchestrator = Arc::new(Orchestrator::new(definition(), Outbox::new(), "order.reply"));
//! let order = OrderPlacement { order_id: Uuid::now_v7(), customer_id: Uuid::now_v7(), amount: 10, rejection: None };
//! let mut tx = order_db.begin().await?;
//! sqlx::query("INSERT INTO orders (id, status, cancelled) VALUES ($1, 'PENDING', false)")
//!     .bind(order.order_id).execute(&mut *tx).await?;
//! orchestrator.start(&mut tx, Uuid::now_v7(), order).await?;
//! tx.commit().await?;
//!
//! let replies = Consumer::new(
//!     ConsumerConfig::new(brokers, "order-service", ["order.reply"]),
//!     order_db.clone(),
//!     orchestrator.clone(),
//! )?;
//! let sweeper = orchestrator.clone();
//! let (stop, stopped) = tokio::sync::watch::channel(false);
//! let shutdown = |mut rx: tokio::sync::watch::Receiver<bool>| async move { let _ = rx.changed().await; };
//! tokio::spawn({ let db = order_db.clone(); let rx = stopped.clone();
//!     async move { sweeper.run_sweeper(&db, Duration::from_secs(1), shutdown(rx)).await } });
//! tokio::spawn(replies.run(shutdown(stopped.clone())));
//!
//! // The customer service: consume commands.
//! let commands = Consumer::new(
//!     ConsumerConfig::new(brokers, "customer-service", ["customer.request"]),
//!     customer_db,
//!     Arc::new(Customers { outbox: Outbox::new() }),
//! )?;
//! tokio::spawn(commands.run(shutdown(stopped)));
//! # let _ = stop.send(true);
//! # Ok(())
//! # }
//! ```

#![cfg_attr(not(test), deny(clippy::unwrap_used))]

pub mod barrier;
pub mod consumer;
pub mod outbox;
pub mod saga;
pub mod schema;
pub mod status;
pub mod testing;
