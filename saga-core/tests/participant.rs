//! `participate` against a real database: the effect runs once per step and
//! operation, and a duplicate (the orchestrator's resend under a new request id) is
//! answered again with the answer given the first time, marked as a replay.

use std::time::Duration;

use anyhow::{bail, Context};
use saga_core::barrier::{self, BarrierOp};
use saga_core::consumer::{HandlerError, IncomingMessage};
use saga_core::outbox::Outbox;
use saga_core::saga::{participate, CommandEnvelope, Effect, ParticipantReply};
use saga_core::schema;
use saga_core::testing::{assert_replay, outbox_rows, OutboxRow, SagaCommand};
use serde_json::json;
use sqlx::migrate::Migrator;
use sqlx::{Connection, PgConnection, PgPool};
use testkit::TestDatabase;
use uuid::Uuid;

const STEP: &str = "reserve-goods";
const REPLY_TO: &str = "order.reply";

/// How long a test waits for a transaction to block on another's barrier row.
const BLOCK_TIMEOUT: Duration = Duration::from_secs(10);

async fn database() -> anyhow::Result<TestDatabase> {
    let db = TestDatabase::create().await;
    schema::migrate(db.pool(), &Migrator::DEFAULT).await?;
    sqlx::query("CREATE TABLE effects (saga_id text NOT NULL, command text NOT NULL)")
        .execute(db.pool())
        .await?;
    Ok(db)
}

/// A saga command as the consumer hands it over: a fresh message id, and the
/// request id of the attempt it belongs to.
fn command(saga: &str, kind: &str, compensation: bool, request_id: Uuid) -> IncomingMessage {
    SagaCommand::new(saga, STEP, kind)
        .topic("inventory.request")
        .reply_to(REPLY_TO)
        .compensation(compensation)
        .request_id(request_id)
        .payload(json!({ "quantity": 2 }))
        .message()
}

/// The business effect: records that it ran, and answers by command type.
fn effect<'c>(tx: &'c mut PgConnection, command: &'c CommandEnvelope) -> Effect<'c> {
    Box::pin(async move {
        sqlx::query("INSERT INTO effects (saga_id, command) VALUES ($1, $2)")
            .bind(&command.saga_id)
            .bind(&command.command_type)
            .execute(&mut *tx)
            .await?;
        match command.command_type.as_str() {
            "ReserveGoods" => Ok(ParticipantReply::success(
                "GoodsReserved",
                json!({ "reserved": 2, "left": 8 }),
            )),
            "ReserveTooMuch" => Ok(ParticipantReply::failure(
                "GoodsShort",
                json!({ "available": 1 }),
            )),
            "ReleaseGoods" => Ok(ParticipantReply::success(
                "GoodsReleased",
                json!({ "released": 2 }),
            )),
            other => Err(HandlerError::transient(format!(
                "{other}: the warehouse is unreachable"
            ))),
        }
    })
}

/// Handles `message` with [`participate`] in a transaction of its own that commits
/// when it succeeds.
async fn handle(pool: &PgPool, message: &IncomingMessage) -> anyhow::Result<()> {
    let mut tx = pool.begin().await?;
    participate(&mut tx, &Outbox::new(), message, effect).await?;
    tx.commit().await?;
    Ok(())
}

/// How often the effect ran for `saga`.
async fn effects(pool: &PgPool, saga: &str) -> anyhow::Result<Vec<String>> {
    Ok(
        sqlx::query_scalar("SELECT command FROM effects WHERE saga_id = $1 ORDER BY command")
            .bind(saga)
            .fetch_all(pool)
            .await?,
    )
}

/// The request id a reply answers.
fn request_id(reply: &OutboxRow) -> &str {
    reply.header("request-id").unwrap_or_default()
}

/// The replies to `saga`, oldest first; every one must go to the reply topic.
async fn replies(pool: &PgPool, saga: &str) -> anyhow::Result<Vec<OutboxRow>> {
    let rows = outbox_rows(pool, &Outbox::new()).await?;
    let replies: Vec<OutboxRow> = rows.into_iter().filter(|r| r.aggregateid == saga).collect();
    if let Some(stray) = replies.iter().find(|r| r.aggregatetype != REPLY_TO) {
        bail!("a reply went to {}", stray.aggregatetype);
    }
    Ok(replies)
}

/// Asserts that `replay` answers `request` with exactly the answer of `first`.
#[track_caller]
fn assert_replayed(first: &OutboxRow, replay: &OutboxRow, request: Uuid) {
    assert_replay(replay, first);
    assert_eq!(request_id(replay), request.to_string());
    assert_ne!(request_id(replay), request_id(first));
}

#[tokio::test]
async fn an_applied_command_resent_under_a_new_request_id_is_answered_again_once_applied(
) -> anyhow::Result<()> {
    let db = database().await?;
    let saga = Uuid::now_v7().to_string();
    let (first, second, third) = (Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7());
    handle(db.pool(), &command(&saga, "ReserveGoods", false, first)).await?;
    // The orchestrator timed the step out and sent it again, twice.
    handle(db.pool(), &command(&saga, "ReserveGoods", false, second)).await?;
    handle(db.pool(), &command(&saga, "ReserveGoods", false, third)).await?;

    assert_eq!(effects(db.pool(), &saga).await?, ["ReserveGoods"]);
    let replies = replies(db.pool(), &saga).await?;
    assert_eq!(replies.len(), 3, "{replies:?}");
    assert_eq!(request_id(&replies[0]), first.to_string());
    let first_answer = &replies[0];
    assert_eq!(
        (
            first_answer.kind.as_str(),
            &first_answer.payload,
            ["outcome", "saga-id", "saga-step"].map(|h| first_answer.header(h)),
        ),
        (
            "GoodsReserved",
            &json!({ "reserved": 2, "left": 8 }),
            [Some("success"), Some(saga.as_str()), Some(STEP)],
        )
    );
    assert_replayed(&replies[0], &replies[1], second);
    assert_replayed(&replies[0], &replies[2], third);
    Ok(())
}

/// A refusal delivered again (the same attempt under a new request id: the
/// orchestrator's reply did not come in time) is answered with the refusal and
/// does not run again.
#[tokio::test]
async fn a_refusal_resent_is_refused_again() -> anyhow::Result<()> {
    let db = database().await?;
    let saga = Uuid::now_v7().to_string();
    let (first, second) = (Uuid::now_v7(), Uuid::now_v7());
    handle(db.pool(), &command(&saga, "ReserveTooMuch", false, first)).await?;
    handle(db.pool(), &command(&saga, "ReserveTooMuch", false, second)).await?;

    assert_eq!(effects(db.pool(), &saga).await?, ["ReserveTooMuch"]);
    let replies = replies(db.pool(), &saga).await?;
    assert_eq!(replies.len(), 2, "{replies:?}");
    assert_eq!(replies[0].kind, "GoodsShort");
    assert_eq!(replies[0].header("outcome"), Some("failure"));
    assert_replayed(&replies[0], &replies[1], second);
    Ok(())
}

/// A retry after a refusal (the orchestrator's next attempt) runs the effect again
/// and is answered first hand; duplicates of either attempt are replays.
#[tokio::test]
async fn a_retry_after_a_refusal_runs_again() -> anyhow::Result<()> {
    let db = database().await?;
    let saga = Uuid::now_v7().to_string();
    let attempt = |n: u32, request: Uuid| {
        SagaCommand::new(&saga, STEP, "ReserveTooMuch")
            .topic("inventory.request")
            .reply_to(REPLY_TO)
            .request_id(request)
            .attempt(n)
            .message()
    };
    let (first, second, late) = (Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7());
    handle(db.pool(), &attempt(1, first)).await?;
    handle(db.pool(), &attempt(2, second)).await?;
    assert_eq!(
        effects(db.pool(), &saga).await?,
        ["ReserveTooMuch", "ReserveTooMuch"],
        "the retry did not run"
    );
    handle(db.pool(), &attempt(2, Uuid::now_v7())).await?;
    handle(db.pool(), &attempt(1, late)).await?;
    assert_eq!(effects(db.pool(), &saga).await?.len(), 2);
    let replies = replies(db.pool(), &saga).await?;
    assert_eq!(replies.len(), 4, "{replies:?}");
    assert_eq!(request_id(&replies[1]), second.to_string());
    assert_eq!(
        replies[1].header("saga-replay"),
        None,
        "answered first hand"
    );
    assert_eq!(replies[2].header("saga-replay"), Some("true"));
    assert_replayed(&replies[1], &replies[3], late);
    Ok(())
}

#[tokio::test]
async fn a_compensation_resent_is_answered_again_and_undoes_once() -> anyhow::Result<()> {
    let db = database().await?;
    let saga = Uuid::now_v7().to_string();
    let (action, first, second) = (Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7());
    handle(db.pool(), &command(&saga, "ReserveGoods", false, action)).await?;
    handle(db.pool(), &command(&saga, "ReleaseGoods", true, first)).await?;
    // The compensation's reply was late; the orchestrator retried it.
    handle(db.pool(), &command(&saga, "ReleaseGoods", true, second)).await?;

    assert_eq!(
        effects(db.pool(), &saga).await?,
        ["ReleaseGoods", "ReserveGoods"]
    );
    let replies = replies(db.pool(), &saga).await?;
    assert_eq!(replies.len(), 3, "{replies:?}");
    assert_eq!(replies[1].kind, "GoodsReleased");
    assert_eq!(request_id(&replies[1]), first.to_string());
    assert_eq!(replies[1].header("outcome"), Some("success"));
    assert_replayed(&replies[1], &replies[2], second);
    Ok(())
}

#[tokio::test]
async fn a_null_compensation_resent_is_skipped_again_and_the_late_action_stays_silent(
) -> anyhow::Result<()> {
    let db = database().await?;
    let saga = Uuid::now_v7().to_string();
    let (first, second, late) = (Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7());
    handle(db.pool(), &command(&saga, "ReleaseGoods", true, first)).await?;
    handle(db.pool(), &command(&saga, "ReleaseGoods", true, second)).await?;
    // The action arriving after its compensation (hanging) is neither run nor
    // answered: the orchestrator no longer waits for it.
    handle(db.pool(), &command(&saga, "ReserveGoods", false, late)).await?;

    assert!(effects(db.pool(), &saga).await?.is_empty());
    let replies = replies(db.pool(), &saga).await?;
    assert_eq!(replies.len(), 2, "{replies:?}");
    assert_eq!(replies[0].kind, "ReleaseGoodsSkipped");
    assert_eq!(replies[0].payload, json!({ "nullCompensation": true }));
    assert_eq!(replies[0].header("outcome"), Some("success"));
    assert_replayed(&replies[0], &replies[1], second);
    Ok(())
}

#[tokio::test]
async fn a_duplicate_of_a_row_without_an_answer_is_not_answered() -> anyhow::Result<()> {
    let db = database().await?;
    let saga = Uuid::now_v7().to_string();
    // A barrier row as it was written before the answers were kept.
    let mut tx = db.pool().begin().await?;
    let _ = barrier::enter(&mut tx, &saga, STEP, BarrierOp::Action).await?;
    tx.commit().await?;

    handle(
        db.pool(),
        &command(&saga, "ReserveGoods", false, Uuid::now_v7()),
    )
    .await?;
    assert!(effects(db.pool(), &saga).await?.is_empty());
    assert!(replies(db.pool(), &saga).await?.is_empty());
    Ok(())
}

#[tokio::test]
async fn a_failed_attempt_stores_no_answer_and_its_retry_answers_first_hand() -> anyhow::Result<()>
{
    let db = database().await?;
    let saga = Uuid::now_v7().to_string();
    let failed = command(&saga, "ReserveUnreachable", false, Uuid::now_v7());
    let mut tx = db.pool().begin().await?;
    let result = participate(&mut tx, &Outbox::new(), &failed, effect).await;
    assert!(
        matches!(result, Err(HandlerError::Transient(_))),
        "{result:?}"
    );
    tx.rollback().await?;
    let mut conn = db.pool().acquire().await?;
    assert_eq!(
        barrier::recorded_answer(&mut conn, &saga, STEP, BarrierOp::Action).await?,
        None
    );
    drop(conn);

    let retry = Uuid::now_v7();
    handle(db.pool(), &command(&saga, "ReserveGoods", false, retry)).await?;
    let replies = replies(db.pool(), &saga).await?;
    assert_eq!(replies.len(), 1, "{replies:?}");
    assert_eq!(request_id(&replies[0]), retry.to_string());
    assert_eq!(replies[0].header("saga-replay"), None);
    Ok(())
}

/// Waits until some session of `db` waits for a lock, or fails after
/// [`BLOCK_TIMEOUT`].
async fn wait_until_blocked(db: &TestDatabase) -> anyhow::Result<()> {
    if !db.wait_for_a_lock_wait(BLOCK_TIMEOUT).await? {
        bail!("no transaction blocked on the barrier within {BLOCK_TIMEOUT:?}");
    }
    Ok(())
}

#[tokio::test]
async fn a_resend_racing_the_first_copy_answers_with_what_the_first_committed() -> anyhow::Result<()>
{
    let db = database().await?;
    let saga = Uuid::now_v7().to_string();
    let (first, second) = (Uuid::now_v7(), Uuid::now_v7());
    let mut first_conn = db.connect().await;
    let mut first_tx = first_conn.begin().await?;
    participate(
        &mut first_tx,
        &Outbox::new(),
        &command(&saga, "ReserveGoods", false, first),
        effect,
    )
    .await?;

    let resend = {
        let mut conn = db.connect().await;
        let message = command(&saga, "ReserveGoods", false, second);
        tokio::spawn(async move {
            let mut tx = conn.begin().await?;
            participate(&mut tx, &Outbox::new(), &message, effect).await?;
            tx.commit().await?;
            anyhow::Ok(())
        })
    };
    wait_until_blocked(&db).await?;
    assert!(
        !resend.is_finished(),
        "the resend did not wait for the first"
    );
    first_tx.commit().await?;
    tokio::time::timeout(BLOCK_TIMEOUT, resend)
        .await
        .context("the resend stayed blocked after the first committed")???;

    assert_eq!(effects(db.pool(), &saga).await?, ["ReserveGoods"]);
    let replies = replies(db.pool(), &saga).await?;
    assert_eq!(replies.len(), 2, "{replies:?}");
    assert_replayed(&replies[0], &replies[1], second);
    Ok(())
}
