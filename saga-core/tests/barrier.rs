//! The participant barrier against a real database: duplicates, null compensations
//! and hanging actions are recognised, a rolled-back attempt leaves nothing behind,
//! and concurrent deliveries of one branch let exactly one through.

use std::time::Duration;

use anyhow::{bail, Context};
use saga_core::barrier::{self, BarrierOp, BarrierOutcome};
use saga_core::saga::ParticipantReply;
use saga_core::schema;
use sqlx::migrate::Migrator;
use sqlx::{Connection, PgPool};
use testkit::TestDatabase;
use tokio::task::JoinHandle;

const SAGA: &str = "0190f5a2-7c1e-7000-8000-000000000001";
const BRANCH: &str = "reserve-credit";

/// How long a test waits for a transaction to block on another's barrier row.
const BLOCK_TIMEOUT: Duration = Duration::from_secs(10);

async fn database() -> anyhow::Result<TestDatabase> {
    let db = TestDatabase::create().await;
    schema::migrate(db.pool(), &Migrator::DEFAULT).await?;
    Ok(db)
}

/// `enter` in a transaction of its own that commits.
async fn enter_committed(pool: &PgPool, op: BarrierOp) -> anyhow::Result<BarrierOutcome> {
    let mut tx = pool.begin().await?;
    let outcome = barrier::enter(&mut tx, SAGA, BRANCH, op).await?;
    tx.commit().await?;
    Ok(outcome)
}

async fn barrier_rows(pool: &PgPool) -> anyhow::Result<Vec<(String, String, String, String)>> {
    Ok(sqlx::query_as(
        "SELECT saga_id, branch, op, reason FROM saga_barrier ORDER BY saga_id, branch, op",
    )
    .fetch_all(pool)
    .await?)
}

fn row(op: &str, reason: &str) -> (String, String, String, String) {
    (SAGA.into(), BRANCH.into(), op.into(), reason.into())
}

/// Waits until some session of `db` waits for a lock (a barrier row held by another
/// transaction), or fails after [`BLOCK_TIMEOUT`].
async fn wait_until_blocked(db: &TestDatabase) -> anyhow::Result<()> {
    if !db.wait_for_a_lock_wait(BLOCK_TIMEOUT).await? {
        bail!("no transaction blocked on the barrier within {BLOCK_TIMEOUT:?}");
    }
    Ok(())
}

/// Starts a task that enters the barrier on a connection of its own (with `begin`
/// as the transaction's first statement) and commits.
async fn spawn_enter(
    db: &TestDatabase,
    begin: &'static str,
    op: BarrierOp,
) -> JoinHandle<anyhow::Result<BarrierOutcome>> {
    let mut conn = db.connect().await;
    tokio::spawn(async move {
        let mut tx = conn.begin_with(begin).await?;
        // Take the snapshot now, before the other transaction commits.
        sqlx::query("SELECT 1").execute(&mut *tx).await?;
        let outcome = barrier::enter(&mut tx, SAGA, BRANCH, op).await?;
        tx.commit().await?;
        Ok(outcome)
    })
}

#[tokio::test]
async fn an_action_delivered_twice_is_a_duplicate() -> anyhow::Result<()> {
    let db = database().await?;
    assert_eq!(
        enter_committed(db.pool(), BarrierOp::Action).await?,
        BarrierOutcome::Proceed
    );
    assert_eq!(
        enter_committed(db.pool(), BarrierOp::Action).await?,
        BarrierOutcome::Duplicate
    );
    assert_eq!(barrier_rows(db.pool()).await?, [row("action", "action")]);
    Ok(())
}

#[tokio::test]
async fn a_compensation_after_its_action_proceeds_once() -> anyhow::Result<()> {
    let db = database().await?;
    assert_eq!(
        enter_committed(db.pool(), BarrierOp::Action).await?,
        BarrierOutcome::Proceed
    );
    assert_eq!(
        enter_committed(db.pool(), BarrierOp::Compensate).await?,
        BarrierOutcome::Proceed
    );
    assert_eq!(
        enter_committed(db.pool(), BarrierOp::Compensate).await?,
        BarrierOutcome::Duplicate
    );
    // The action delivered again after its compensation is still only a duplicate:
    // it ran, and the compensation undid it.
    assert_eq!(
        enter_committed(db.pool(), BarrierOp::Action).await?,
        BarrierOutcome::Duplicate
    );
    assert_eq!(
        barrier_rows(db.pool()).await?,
        [row("action", "action"), row("compensate", "compensate")]
    );
    Ok(())
}

#[tokio::test]
async fn a_compensation_before_its_action_is_null_and_the_late_action_hangs() -> anyhow::Result<()>
{
    let db = database().await?;
    assert_eq!(
        enter_committed(db.pool(), BarrierOp::Compensate).await?,
        BarrierOutcome::NullCompensation
    );
    assert_eq!(
        enter_committed(db.pool(), BarrierOp::Compensate).await?,
        BarrierOutcome::Duplicate
    );
    assert_eq!(
        enter_committed(db.pool(), BarrierOp::Action).await?,
        BarrierOutcome::Hanging
    );
    assert_eq!(
        enter_committed(db.pool(), BarrierOp::Action).await?,
        BarrierOutcome::Hanging
    );
    assert_eq!(
        barrier_rows(db.pool()).await?,
        [row("action", "compensate"), row("compensate", "compensate")]
    );
    Ok(())
}

#[tokio::test]
async fn branches_and_sagas_are_independent() -> anyhow::Result<()> {
    let db = database().await?;
    let mut tx = db.pool().begin().await?;
    let outcomes = [
        barrier::enter(&mut tx, SAGA, "reserve-credit", BarrierOp::Action).await?,
        barrier::enter(&mut tx, SAGA, "reserve-goods", BarrierOp::Compensate).await?,
        barrier::enter(&mut tx, "other-saga", "reserve-credit", BarrierOp::Action).await?,
        barrier::enter(&mut tx, "other-saga", "reserve-goods", BarrierOp::Action).await?,
    ];
    tx.commit().await?;
    assert_eq!(
        outcomes,
        [
            BarrierOutcome::Proceed,
            BarrierOutcome::NullCompensation,
            BarrierOutcome::Proceed,
            BarrierOutcome::Proceed,
        ]
    );
    Ok(())
}

#[tokio::test]
async fn a_rolled_back_attempt_leaves_no_rows_and_the_retry_proceeds() -> anyhow::Result<()> {
    let db = database().await?;
    for op in [BarrierOp::Action, BarrierOp::Compensate] {
        let mut tx = db.pool().begin().await?;
        let first = barrier::enter(&mut tx, SAGA, BRANCH, op).await?;
        assert!(matches!(
            first,
            BarrierOutcome::Proceed | BarrierOutcome::NullCompensation
        ));
        // The business effect failed: the whole transaction rolls back.
        tx.rollback().await?;
        assert!(barrier_rows(db.pool()).await?.is_empty(), "{op} left rows");
    }
    assert_eq!(
        enter_committed(db.pool(), BarrierOp::Action).await?,
        BarrierOutcome::Proceed
    );
    Ok(())
}

#[tokio::test]
async fn a_concurrent_duplicate_waits_for_the_first_and_is_a_duplicate() -> anyhow::Result<()> {
    let db = database().await?;
    let mut first_conn = db.connect().await;
    let mut first = first_conn.begin().await?;
    assert_eq!(
        barrier::enter(&mut first, SAGA, BRANCH, BarrierOp::Action).await?,
        BarrierOutcome::Proceed
    );

    let second = spawn_enter(&db, "BEGIN", BarrierOp::Action).await;
    wait_until_blocked(&db).await?;
    assert!(
        !second.is_finished(),
        "the second did not wait for the first"
    );
    first.commit().await?;

    let outcome = tokio::time::timeout(BLOCK_TIMEOUT, second)
        .await
        .context("the second transaction stayed blocked after the first committed")???;
    assert_eq!(outcome, BarrierOutcome::Duplicate);
    assert_eq!(barrier_rows(db.pool()).await?, [row("action", "action")]);
    Ok(())
}

#[tokio::test]
async fn a_concurrent_duplicate_proceeds_when_the_first_rolls_back() -> anyhow::Result<()> {
    let db = database().await?;
    let mut first_conn = db.connect().await;
    let mut first = first_conn.begin().await?;
    assert_eq!(
        barrier::enter(&mut first, SAGA, BRANCH, BarrierOp::Action).await?,
        BarrierOutcome::Proceed
    );

    let second = spawn_enter(&db, "BEGIN", BarrierOp::Action).await;
    wait_until_blocked(&db).await?;
    first.rollback().await?;

    let outcome = tokio::time::timeout(BLOCK_TIMEOUT, second)
        .await
        .context("the second transaction stayed blocked after the first rolled back")???;
    assert_eq!(outcome, BarrierOutcome::Proceed);
    Ok(())
}

#[tokio::test]
async fn a_late_action_racing_its_null_compensation_hangs() -> anyhow::Result<()> {
    let db = database().await?;
    let mut first_conn = db.connect().await;
    let mut first = first_conn.begin().await?;
    assert_eq!(
        barrier::enter(&mut first, SAGA, BRANCH, BarrierOp::Compensate).await?,
        BarrierOutcome::NullCompensation
    );

    let action = spawn_enter(&db, "BEGIN", BarrierOp::Action).await;
    wait_until_blocked(&db).await?;
    first.commit().await?;

    let outcome = tokio::time::timeout(BLOCK_TIMEOUT, action)
        .await
        .context("the action stayed blocked after the compensation committed")???;
    assert_eq!(outcome, BarrierOutcome::Hanging);
    Ok(())
}

#[tokio::test]
async fn under_repeatable_read_a_concurrent_duplicate_is_a_serialization_failure(
) -> anyhow::Result<()> {
    let db = database().await?;
    let mut first_conn = db.connect().await;
    let mut first = first_conn.begin().await?;
    assert_eq!(
        barrier::enter(&mut first, SAGA, BRANCH, BarrierOp::Action).await?,
        BarrierOutcome::Proceed
    );

    let second = spawn_enter(
        &db,
        "BEGIN ISOLATION LEVEL REPEATABLE READ",
        BarrierOp::Action,
    )
    .await;
    wait_until_blocked(&db).await?;
    first.commit().await?;

    let result = tokio::time::timeout(BLOCK_TIMEOUT, second)
        .await
        .context("the second transaction stayed blocked after the first committed")??;
    let err = result.expect_err("a repeatable-read duplicate must not be decided on");
    let code = err
        .downcast_ref::<sqlx::Error>()
        .and_then(|e| e.as_database_error())
        .and_then(|e| e.code())
        .map(|c| c.into_owned());
    assert_eq!(code.as_deref(), Some("40001"), "{err:?}");
    Ok(())
}

#[tokio::test]
async fn deliveries_at_once_let_exactly_one_through() -> anyhow::Result<()> {
    const TASKS: usize = 6;
    let db = database().await?;
    let start = std::sync::Arc::new(tokio::sync::Barrier::new(TASKS));
    let mut tasks = Vec::new();
    for _ in 0..TASKS {
        let start = start.clone();
        let mut conn = db.connect().await;
        tasks.push(tokio::spawn(async move {
            let mut tx = conn.begin().await?;
            start.wait().await;
            let outcome = barrier::enter(&mut tx, SAGA, BRANCH, BarrierOp::Action).await?;
            tx.commit().await?;
            anyhow::Ok(outcome)
        }));
    }
    let mut outcomes = Vec::new();
    for task in tasks {
        outcomes.push(task.await??);
    }
    let proceeded = outcomes
        .iter()
        .filter(|o| **o == BarrierOutcome::Proceed)
        .count();
    assert_eq!(proceeded, 1, "{outcomes:?}");
    assert!(
        outcomes
            .iter()
            .all(|o| matches!(o, BarrierOutcome::Proceed | BarrierOutcome::Duplicate)),
        "{outcomes:?}"
    );
    Ok(())
}

#[tokio::test]
async fn an_action_and_its_compensation_at_once_agree() -> anyhow::Result<()> {
    const ROUNDS: usize = 20;
    let db = database().await?;
    for round in 0..ROUNDS {
        let saga = format!("saga-{round}");
        let start = std::sync::Arc::new(tokio::sync::Barrier::new(2));
        let mut tasks = Vec::new();
        for op in [BarrierOp::Action, BarrierOp::Compensate] {
            let start = start.clone();
            let mut conn = db.connect().await;
            let saga = saga.clone();
            tasks.push(tokio::spawn(async move {
                let mut tx = conn.begin().await?;
                start.wait().await;
                let outcome = barrier::enter(&mut tx, &saga, BRANCH, op).await?;
                tx.commit().await?;
                anyhow::Ok(outcome)
            }));
        }
        let mut outcomes = Vec::new();
        for task in tasks {
            outcomes.push(task.await??);
        }
        // Either the action ran and its compensation undoes it, or the compensation
        // was null and the action must never run.
        assert!(
            matches!(
                outcomes[..],
                [BarrierOutcome::Proceed, BarrierOutcome::Proceed]
                    | [BarrierOutcome::Hanging, BarrierOutcome::NullCompensation]
            ),
            "round {round}: action, compensation = {outcomes:?}"
        );
    }
    Ok(())
}

#[tokio::test]
async fn answers_are_kept_on_the_row_of_their_operation() -> anyhow::Result<()> {
    let db = database().await?;
    let reserved = ParticipantReply::success("CreditReserved", serde_json::json!({ "cents": 5 }));
    let mut tx = db.pool().begin().await?;
    // No row for the operation yet: there is nothing to keep the answer on.
    let missing = barrier::record_answer(&mut tx, SAGA, BRANCH, BarrierOp::Action, &reserved).await;
    assert!(
        matches!(missing, Err(sqlx::Error::RowNotFound)),
        "{missing:?}"
    );
    tx.rollback().await?;

    let mut tx = db.pool().begin().await?;
    assert_eq!(
        barrier::enter(&mut tx, SAGA, BRANCH, BarrierOp::Action).await?,
        BarrierOutcome::Proceed
    );
    barrier::record_answer(&mut tx, SAGA, BRANCH, BarrierOp::Action, &reserved).await?;
    tx.commit().await?;

    let skipped = ParticipantReply::success("ReleaseCreditSkipped", serde_json::Value::Null);
    let mut tx = db.pool().begin().await?;
    assert_eq!(
        barrier::enter(&mut tx, "other-saga", BRANCH, BarrierOp::Compensate).await?,
        BarrierOutcome::NullCompensation
    );
    barrier::record_answer(
        &mut tx,
        "other-saga",
        BRANCH,
        BarrierOp::Compensate,
        &skipped,
    )
    .await?;
    tx.commit().await?;

    let mut conn = db.connect().await;
    assert_eq!(
        barrier::recorded_answer(&mut conn, SAGA, BRANCH, BarrierOp::Action).await?,
        Some(reserved)
    );
    assert_eq!(
        barrier::recorded_answer(&mut conn, SAGA, BRANCH, BarrierOp::Compensate).await?,
        None
    );
    // A JSON null payload is an answer too, not a missing one.
    assert_eq!(
        barrier::recorded_answer(&mut conn, "other-saga", BRANCH, BarrierOp::Compensate).await?,
        Some(skipped)
    );
    // The action row of a null compensation holds no answer: a late action is
    // never answered.
    assert_eq!(
        barrier::recorded_answer(&mut conn, "other-saga", BRANCH, BarrierOp::Action).await?,
        None
    );
    Ok(())
}

/// `enter_attempt` in a transaction of its own that commits; a `Proceed` records
/// `answer` on the row as the participant does.
async fn attempt_committed(
    pool: &PgPool,
    op: BarrierOp,
    attempt: u32,
    answer: &ParticipantReply,
) -> anyhow::Result<BarrierOutcome> {
    let mut tx = pool.begin().await?;
    let outcome = barrier::enter_attempt(&mut tx, SAGA, BRANCH, op, attempt).await?;
    if outcome == BarrierOutcome::Proceed {
        barrier::record_answer(&mut tx, SAGA, BRANCH, op, answer).await?;
    }
    tx.commit().await?;
    Ok(outcome)
}

#[tokio::test]
async fn a_later_attempt_after_a_refusal_proceeds_and_one_success_ends_the_tries(
) -> anyhow::Result<()> {
    let db = database().await?;
    let refused = ParticipantReply::failure("CreditLimitExceeded", serde_json::json!({}));
    let reserved = ParticipantReply::success("CreditReserved", serde_json::json!({}));
    let attempt = |n, answer| attempt_committed(db.pool(), BarrierOp::Action, n, answer);
    assert_eq!(attempt(1, &refused).await?, BarrierOutcome::Proceed);
    // The same attempt again is a duplicate of the refusal.
    assert_eq!(attempt(1, &refused).await?, BarrierOutcome::Duplicate);
    // A retry is a new try, refused again, then a third one succeeds.
    assert_eq!(attempt(2, &refused).await?, BarrierOutcome::Proceed);
    assert_eq!(attempt(3, &reserved).await?, BarrierOutcome::Proceed);
    let mut conn = db.connect().await;
    assert_eq!(
        barrier::recorded_answer(&mut conn, SAGA, BRANCH, BarrierOp::Action).await?,
        Some(reserved.clone())
    );
    // After a success, every attempt is a duplicate: late ones and later ones.
    for n in [2, 3, 4] {
        assert_eq!(
            attempt(n, &reserved).await?,
            BarrierOutcome::Duplicate,
            "{n}"
        );
    }
    assert_eq!(barrier_rows(db.pool()).await?, [row("action", "action")]);

    // The compensation's attempts follow the same rule on their own row.
    let stuck = ParticipantReply::failure("ReleaseFailed", serde_json::json!({}));
    let released = ParticipantReply::success("CreditReleased", serde_json::json!({}));
    let compensate = |n, answer| attempt_committed(db.pool(), BarrierOp::Compensate, n, answer);
    assert_eq!(compensate(1, &stuck).await?, BarrierOutcome::Proceed);
    assert_eq!(compensate(1, &stuck).await?, BarrierOutcome::Duplicate);
    assert_eq!(compensate(2, &released).await?, BarrierOutcome::Proceed);
    assert_eq!(compensate(3, &released).await?, BarrierOutcome::Duplicate);
    // Undone, the action is no longer retried by a later attempt.
    assert_eq!(attempt(9, &reserved).await?, BarrierOutcome::Duplicate);
    Ok(())
}

#[tokio::test]
async fn a_retry_after_the_compensation_never_runs() -> anyhow::Result<()> {
    let db = database().await?;
    let refused = ParticipantReply::failure("CreditLimitExceeded", serde_json::json!({}));
    let released = ParticipantReply::success("CreditReleased", serde_json::json!({}));
    assert_eq!(
        attempt_committed(db.pool(), BarrierOp::Action, 1, &refused).await?,
        BarrierOutcome::Proceed
    );
    assert_eq!(
        attempt_committed(db.pool(), BarrierOp::Compensate, 1, &released).await?,
        BarrierOutcome::Proceed
    );
    assert_eq!(
        attempt_committed(db.pool(), BarrierOp::Action, 2, &refused).await?,
        BarrierOutcome::Duplicate
    );
    Ok(())
}

/// A retry of a refused action racing the step's compensation: whichever commits
/// first, an effect the retry applied is undone by the compensation, and a
/// compensation that came first keeps the retry from running at all.
#[tokio::test]
async fn a_retry_and_the_compensation_at_once_leave_nothing_applied() -> anyhow::Result<()> {
    const ROUNDS: usize = 20;
    let db = database().await?;
    sqlx::query("CREATE TABLE effects (saga_id text NOT NULL)")
        .execute(db.pool())
        .await?;
    let refused = ParticipantReply::failure("CreditLimitExceeded", serde_json::json!({}));
    let mut retry_ran = 0;
    for round in 0..ROUNDS {
        let saga = format!("saga-{round}");
        let mut tx = db.pool().begin().await?;
        assert_eq!(
            barrier::enter_attempt(&mut tx, &saga, BRANCH, BarrierOp::Action, 1).await?,
            BarrierOutcome::Proceed
        );
        barrier::record_answer(&mut tx, &saga, BRANCH, BarrierOp::Action, &refused).await?;
        tx.commit().await?;

        let start = std::sync::Arc::new(tokio::sync::Barrier::new(2));
        let mut tasks = Vec::new();
        for op in [BarrierOp::Action, BarrierOp::Compensate] {
            let start = start.clone();
            let mut conn = db.connect().await;
            let saga = saga.clone();
            tasks.push(tokio::spawn(async move {
                let mut tx = conn.begin().await?;
                start.wait().await;
                let outcome = barrier::enter_attempt(&mut tx, &saga, BRANCH, op, 2).await?;
                if outcome == BarrierOutcome::Proceed {
                    let effect = match op {
                        BarrierOp::Action => "INSERT INTO effects (saga_id) VALUES ($1)",
                        BarrierOp::Compensate => "DELETE FROM effects WHERE saga_id = $1",
                    };
                    sqlx::query(effect).bind(&saga).execute(&mut *tx).await?;
                }
                tx.commit().await?;
                anyhow::Ok(outcome)
            }));
        }
        let mut outcomes = Vec::new();
        for task in tasks {
            outcomes.push(task.await??);
        }
        if outcomes[0] == BarrierOutcome::Proceed {
            retry_ran += 1;
        }
        let left: i64 = sqlx::query_scalar("SELECT count(*) FROM effects WHERE saga_id = $1")
            .bind(&saga)
            .fetch_one(db.pool())
            .await?;
        assert_eq!(left, 0, "round {round}: {outcomes:?} left an effect");
        assert_eq!(
            outcomes[1],
            BarrierOutcome::Proceed,
            "round {round}: the compensation of an action that ran proceeds"
        );
    }
    println!("the retry ran first in {retry_ran} of {ROUNDS} rounds");
    Ok(())
}
