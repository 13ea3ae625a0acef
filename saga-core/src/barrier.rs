//! The participant's sub-transaction barrier (the technique of DTM's "branch
//! barrier"): one call, first thing in the transaction that handles a saga command,
//! tells the participant whether to run the command's effect.
//!
//! Messages arrive at least once and in no guaranteed order across a saga's
//! retries, and a step that timed out is compensated although its action may still
//! arrive (DESIGN, "Saga messages"). Three anomalies follow, and the barrier turns
//! each into a no-op:
//!
//! - **duplicate**: the same action or compensation arrives twice;
//! - **null compensation**: the compensation arrives and the action never ran (there
//!   is nothing to undo);
//! - **hanging action**: the action arrives after its compensation (running it now
//!   would leave an effect that nothing will ever undo).
//!
//! # The table
//!
//! `saga_barrier (saga_id, branch, op, reason, created_at, reply_outcome, reply_type,
//! reply_payload)` with primary key `(saga_id, branch, op)` (migrations
//! `sql/shared/0005_saga_barrier.sql` and `0006_saga_barrier_answer.sql`). `branch`
//! names the saga step at this participant (e.g. `reserve-credit`), not one attempt:
//! a retried attempt of the same step is a duplicate. `op` is the operation the row
//! stands for, `reason` the operation that wrote it. The `reply_*` columns hold the
//! answer the participant gave to that operation ([`record_answer`]); they are NULL
//! on rows written before migration 0006 and on the action row a null compensation
//! writes (a late action is never answered).
//!
//! # The rules
//!
//! **Action**: `INSERT (saga, branch, 'action', reason 'action') ON CONFLICT DO
//! NOTHING`. One row inserted → [`BarrierOutcome::Proceed`]. No row inserted → the
//! action row exists: if its reason is `compensate`, the compensation came first
//! (and ran, or was recorded as a null compensation) → [`BarrierOutcome::Hanging`],
//! the late action must not run; otherwise the action ran before →
//! [`BarrierOutcome::Duplicate`].
//!
//! **Compensate**: first `INSERT (saga, branch, 'action', reason 'compensate') ON
//! CONFLICT DO NOTHING`. If that inserted, the action never ran: the compensate row
//! is recorded too and the outcome is [`BarrierOutcome::NullCompensation`] (nothing
//! to undo; and the action row now in place makes a late action
//! [`BarrierOutcome::Hanging`]). Otherwise `INSERT (saga, branch, 'compensate',
//! reason 'compensate') ON CONFLICT DO NOTHING`: one row → [`BarrierOutcome::Proceed`]
//! (undo the action's effect), no row → [`BarrierOutcome::Duplicate`].
//!
//! # Why it holds
//!
//! - **Atomic with the effect.** [`enter`] runs on the caller's connection inside the
//!   caller's transaction and never commits. The barrier row commits exactly when
//!   the effect (and the reply in the outbox, and the journal row) commits; a
//!   transaction that rolls back leaves no row, so a redelivery proceeds as if the
//!   first attempt never happened. The caller must therefore run [`enter`] and the
//!   effect in one transaction, and commit them together; calling it on a
//!   connection in autocommit mode records the row without the effect and defeats
//!   the barrier.
//! - **Races.** Two transactions handling the same `(saga, branch, op)` at once
//!   collide on the primary key: the second INSERT waits until the first
//!   transaction ends. If the first commits, the second inserts nothing and gets
//!   `Duplicate` (or `Hanging`); if the first rolls back, the second inserts and
//!   proceeds. An action racing its compensation collides on the action row in the
//!   same way, so exactly one of them decides whether the action happened. The
//!   serialisation is the unique index's, so it holds at every isolation level.
//! - **Reading the winner's row.** After an INSERT that inserted nothing, the
//!   action's `reason` is read by a *separate* statement. Under READ COMMITTED each
//!   statement takes a new snapshot, so it sees the row the INSERT waited for; a
//!   SELECT in the same statement as the INSERT (a CTE) would share the INSERT's
//!   older snapshot and miss it. Under REPEATABLE READ or SERIALIZABLE, PostgreSQL
//!   does not let `ON CONFLICT DO NOTHING` skip a row the snapshot cannot see: the
//!   INSERT fails with a serialization failure (SQLSTATE 40001), which the caller
//!   retries like any other.
//! - **Order of the two compensate inserts.** The action row is claimed first, so a
//!   compensation and an action for the same branch always meet on that row, and
//!   the compensate row only ever exists beside an action row.
//!
//! # Answering a duplicate
//!
//! The orchestrator sends a step's command again under a new `request-id` when its
//! reply did not come in time (a forward retry, a compensation retry), and applies
//! only the reply that carries the request id it currently waits for. If the first
//! copy was applied, its reply carries the old request id and is ignored as stale;
//! a duplicate left unanswered would make the step time out again and again. So the
//! participant keeps its answer on the barrier row ([`record_answer`]) and answers a
//! duplicate again with it ([`recorded_answer`]), under the duplicate's request id
//! ([`crate::saga::participate`] does both).
//!
//! - **Stored atomically with the effect.** The answer is written into the row that
//!   [`enter`] inserted, in the same transaction as the effect and the reply, so a
//!   committed row that [`enter`] reports as a duplicate holds exactly the answer
//!   that was sent with the effect; a rolled-back attempt leaves neither. A
//!   duplicate that waited for the first transaction reads the answer by a separate
//!   statement, which (as above) sees what the first committed.
//! - **Replaying is harmless.** Answering again runs no effect, and the orchestrator
//!   applies only the reply matching the request id stored for the step: a replay
//!   for an attempt it no longer waits for is stale, as is the first reply once the
//!   step was resent. Exactly one answer per attempt is applied.
//!
//! Barrier rows must outlive every message of their saga that can still arrive;
//! prune them only well after the saga has ended.
//!
//! A business refusal that the participant commits together with its barrier row
//! (e.g. "credit limit exceeded", replied through the outbox) counts as an action
//! that ran: a later compensation proceeds and must find nothing to undo.

use std::fmt;

use crate::saga::{Outcome, ParticipantReply};

/// The operation a saga message asks of a participant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BarrierOp {
    /// The step's forward action.
    Action,
    /// The step's compensation.
    Compensate,
}

impl BarrierOp {
    /// The stored text (`saga_barrier.op` and `saga_barrier.reason`).
    pub const fn as_str(self) -> &'static str {
        match self {
            BarrierOp::Action => "action",
            BarrierOp::Compensate => "compensate",
        }
    }
}

impl fmt::Display for BarrierOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What the participant does with the message, decided by [`enter`].
#[must_use]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BarrierOutcome {
    /// First delivery: run the effect in this transaction.
    Proceed,
    /// Already handled (committed earlier): skip the effect; answer again with the
    /// answer stored then ([`recorded_answer`]).
    Duplicate,
    /// A compensation whose action never ran: nothing to undo; reply as compensated.
    NullCompensation,
    /// An action arriving after its compensation: it must not run.
    Hanging,
}

impl BarrierOutcome {
    /// Whether the business effect should run.
    pub fn proceeds(self) -> bool {
        self == BarrierOutcome::Proceed
    }
}

const INSERT: &str = "INSERT INTO saga_barrier (saga_id, branch, op, reason) \
                      VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING";

const RECORD_ANSWER: &str = "UPDATE saga_barrier \
                             SET reply_outcome = $4, reply_type = $5, reply_payload = $6 \
                             WHERE saga_id = $1 AND branch = $2 AND op = $3";

const RECORDED_ANSWER: &str = "SELECT reply_outcome, reply_type, reply_payload FROM saga_barrier \
                               WHERE saga_id = $1 AND branch = $2 AND op = $3";

const ACTION_REASON: &str = "SELECT reason FROM saga_barrier \
                             WHERE saga_id = $1 AND branch = $2 AND op = 'action'";

/// Call first inside the participant's transaction; run the business effect only on
/// [`BarrierOutcome::Proceed`].
///
/// The row written here commits or rolls back with the caller's transaction (see the
/// module documentation). An error aborts that transaction; a serialization failure
/// or lost connection is transient and the whole transaction may be retried.
pub async fn enter(
    conn: &mut sqlx::PgConnection,
    saga_id: &str,
    branch: &str,
    op: BarrierOp,
) -> Result<BarrierOutcome, sqlx::Error> {
    let outcome = match op {
        BarrierOp::Action => {
            if insert(conn, saga_id, branch, BarrierOp::Action, BarrierOp::Action).await? {
                BarrierOutcome::Proceed
            } else {
                // A separate statement: under READ COMMITTED it sees the row the
                // INSERT found (possibly committed while the INSERT waited).
                let reason: String = sqlx::query_scalar(ACTION_REASON)
                    .bind(saga_id)
                    .bind(branch)
                    .fetch_one(&mut *conn)
                    .await?;
                if reason == BarrierOp::Compensate.as_str() {
                    BarrierOutcome::Hanging
                } else {
                    BarrierOutcome::Duplicate
                }
            }
        }
        BarrierOp::Compensate => {
            let action_never_ran = insert(
                conn,
                saga_id,
                branch,
                BarrierOp::Action,
                BarrierOp::Compensate,
            )
            .await?;
            let compensate_recorded = insert(
                conn,
                saga_id,
                branch,
                BarrierOp::Compensate,
                BarrierOp::Compensate,
            )
            .await?;
            if action_never_ran {
                BarrierOutcome::NullCompensation
            } else if compensate_recorded {
                BarrierOutcome::Proceed
            } else {
                BarrierOutcome::Duplicate
            }
        }
    };
    tracing::debug!(
        saga_id = %saga_id,
        branch = %branch,
        op = %op,
        outcome = ?outcome,
        "barrier entered"
    );
    Ok(outcome)
}

/// Inserts the `(saga_id, branch, op)` row with `reason`; whether a row was inserted.
async fn insert(
    conn: &mut sqlx::PgConnection,
    saga_id: &str,
    branch: &str,
    op: BarrierOp,
    reason: BarrierOp,
) -> Result<bool, sqlx::Error> {
    let done = sqlx::query(INSERT)
        .bind(saga_id)
        .bind(branch)
        .bind(op.as_str())
        .bind(reason.as_str())
        .execute(&mut *conn)
        .await?;
    Ok(done.rows_affected() == 1)
}

/// Stores `answer` as the participant's answer to `op` of `(saga_id, branch)`, on the
/// row [`enter`] wrote earlier in this transaction (for a
/// [`BarrierOutcome::NullCompensation`], the compensate row). It commits or rolls
/// back with the effect and the reply, like the row itself.
///
/// Fails with [`sqlx::Error::RowNotFound`] when there is no such row (the caller did
/// not enter the barrier for `op` first).
pub async fn record_answer(
    conn: &mut sqlx::PgConnection,
    saga_id: &str,
    branch: &str,
    op: BarrierOp,
    answer: &ParticipantReply,
) -> Result<(), sqlx::Error> {
    let done = sqlx::query(RECORD_ANSWER)
        .bind(saga_id)
        .bind(branch)
        .bind(op.as_str())
        .bind(answer.outcome.as_str())
        .bind(&answer.reply_type)
        .bind(&answer.payload)
        .execute(&mut *conn)
        .await?;
    if done.rows_affected() == 0 {
        return Err(sqlx::Error::RowNotFound);
    }
    Ok(())
}

/// The answer stored for `op` of `(saga_id, branch)` by [`record_answer`]; `None`
/// when there is no row, or the row holds no answer (it was written before
/// migration 0006, or it is the action row of a null compensation).
///
/// Call it after [`enter`] returned [`BarrierOutcome::Duplicate`], in the same
/// transaction: as a separate statement it sees the answer committed with the row.
pub async fn recorded_answer(
    conn: &mut sqlx::PgConnection,
    saga_id: &str,
    branch: &str,
    op: BarrierOp,
) -> Result<Option<ParticipantReply>, sqlx::Error> {
    let row: Option<(Option<String>, Option<String>, Option<serde_json::Value>)> =
        sqlx::query_as(RECORDED_ANSWER)
            .bind(saga_id)
            .bind(branch)
            .bind(op.as_str())
            .fetch_optional(&mut *conn)
            .await?;
    let Some((Some(outcome), Some(reply_type), Some(payload))) = row else {
        return Ok(None);
    };
    let outcome = Outcome::from_header(&outcome).ok_or_else(|| {
        sqlx::Error::Decode(
            format!("saga_barrier.reply_outcome {outcome:?} is neither success nor failure").into(),
        )
    })?;
    Ok(Some(ParticipantReply {
        outcome,
        reply_type,
        payload,
    }))
}
