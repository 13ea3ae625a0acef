//! Starting a participant of the order saga (the customer, inventory and payment
//! services): one consumer of its request topic, replies through its outbox to the
//! order service's reply topic, and its read-only HTTP API.

use std::sync::Arc;

use anyhow::Context as _;
use axum::Router;
use saga_core::consumer::MessageHandler;
use sqlx::migrate::Migrator;
use sqlx::PgPool;

use crate::{CommonArgs, Counted, Running, Service, ServiceMetrics, Task, Topics};

/// What sets one participant apart from another.
#[derive(Debug)]
pub struct Participant<H, A> {
    /// The service's name: its label on metrics, its consumer group's stem.
    pub name: &'static str,
    /// Where the HTTP API listens unless `--listen` says otherwise.
    pub default_listen: &'static str,
    /// The service's own tables (the shared ones are migrated before them).
    pub migrations: &'static Migrator,
    /// The topic its commands arrive on.
    pub request_topic: fn(&Topics) -> String,
    /// The command handler.
    pub handler: H,
    /// The HTTP API on the service's pool.
    pub api: A,
}

/// Starts the participant in the background: the API at once (503 until prepared),
/// then migrations and topics (its request topic and the reply topic), then the
/// consumer of its request topic.
pub async fn start<H, A>(
    common: CommonArgs,
    participant: Participant<H, A>,
) -> anyhow::Result<Running>
where
    H: MessageHandler,
    A: FnOnce(PgPool) -> Router,
{
    let pool = common
        .pool()
        .context("the database URL (--database-url, DATABASE_URL) is not valid")?;
    let listen = common
        .listen_or(participant.default_listen)
        .context("the default listen address is not an address")?;
    let topics = Topics::new(common.topic_prefix.clone());
    let request = (participant.request_topic)(&topics);
    let metrics = ServiceMetrics::new();
    let authentication = common.auth.authentication(participant.name);
    let handler = Counted::new(Arc::new(participant.handler), Arc::clone(&metrics));
    let consumer = Task::consumer(
        common.consumer_config(participant.name, std::slice::from_ref(&request)),
        pool.clone(),
        Arc::new(handler),
        Arc::clone(&metrics.consumer),
    );
    let prepare = crate::cli::prepare(
        pool.clone(),
        common,
        participant.name,
        participant.migrations,
        vec![request, topics.order_reply()],
    );
    Service::new(participant.name, pool.clone(), listen, metrics)
        .api((participant.api)(pool).layer(crate::auth::layer(authentication)))
        .prepare(prepare)
        .task(consumer)
        .start()
        .await
}
