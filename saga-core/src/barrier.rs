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
//! reply_payload, attempt, undone)` with primary key `(saga_id, branch, op)`
//! (migrations `sql/shared/0005_saga_barrier.sql`, `0006_saga_barrier_answer.sql`,
//! `0008_saga_barrier_attempt.sql`). `branch` names the saga step at this participant
//! (e.g. `reserve-credit`). `op` is the operation the row stands for, `reason` the
//! operation that wrote it. `attempt` is the orchestrator's number of the command the
//! row now stands for (header [`crate::saga::HEADER_ATTEMPT`]; 1 when absent).
//! `undone` is set on the action row once the step's compensation entered. The
//! `reply_*` columns hold the answer the participant gave to that operation
//! ([`record_answer`]); they are NULL on rows written before migration 0006 and on
//! the action row a null compensation writes (a late action is never answered).
//!
//! # The rules
//!
//! **Action**, attempt `n`: `INSERT (saga, branch, 'action', reason 'action', n) ON
//! CONFLICT DO NOTHING`. One row inserted → [`BarrierOutcome::Proceed`]. No row
//! inserted → the action row exists. If it stands for an earlier attempt that was
//! refused (its stored answer is a failure), was written by the action itself and
//! is not `undone`, this attempt takes the row over (`attempt = n`, answer cleared)
//! → [`BarrierOutcome::Proceed`]: a retry is a new try. Otherwise, if the row's
//! reason is `compensate`, the compensation came first (and ran, or was recorded as a
//! null compensation) → [`BarrierOutcome::Hanging`], the late action must not run;
//! otherwise the action ran before, with success or in this very attempt →
//! [`BarrierOutcome::Duplicate`].
//!
//! **Compensate**, attempt `m`: first claim the action row: insert it with reason
//! `compensate`, or mark the existing one `undone` (an upsert, which returns the
//! row's reason). If the action row was inserted (or an earlier compensation
//! inserted it), the action never ran. Then `INSERT (saga, branch, 'compensate',
//! reason 'compensate', m) ON CONFLICT DO NOTHING`: one row and the action never ran
//! → [`BarrierOutcome::NullCompensation`] (nothing to undo; and the action row now in
//! place makes a late action [`BarrierOutcome::Hanging`]); one row and the action ran
//! → [`BarrierOutcome::Proceed`] (undo the action's effect). No row: a later attempt
//! after a refused compensation takes the row over as above →
//! [`BarrierOutcome::Proceed`]; anything else → [`BarrierOutcome::Duplicate`].
//!
//! # Attempts
//!
//! The orchestrator sends a step's command again in two cases, and the participant
//! must tell them apart:
//!
//! - **The reply did not come in time** (a timeout). The first command may have run:
//!   running it again could apply the effect twice. The barrier answers a repeat of
//!   an action or compensation that succeeded with the stored answer, whatever its
//!   attempt number.
//! - **The participant refused** (a failure reply: credit limit exceeded, a
//!   compensation that could not be applied yet) and the definition retries
//!   (`with_retries`, compensation retries, an operator's `retry-compensation`). A
//!   refusal committed nothing but its barrier row and answer, so running the
//!   effect again is safe, and is the point: the world may have changed. A higher
//!   attempt number than the row's makes it a new try; the same number (a
//!   redelivery of one command) stays a duplicate.
//!
//! Why a new try is still exactly once: only a row whose stored answer is a
//! failure is taken over, so at most one attempt ever succeeds; the take-over is an
//! `UPDATE` of the row, so two copies of one attempt serialise on its row lock and
//! the second finds `attempt = n` (a duplicate), answered with what the first
//! committed; an older attempt arriving late finds a higher `attempt` and is a
//! duplicate too.
//!
//! Why a new try of an action never runs after its compensation: the compensation
//! writes `undone` on the action row (a row update, not just a look). If the
//! compensation commits first, the action's take-over `UPDATE` re-checks its
//! condition on the row's new version (READ COMMITTED), finds `undone` and does
//! nothing; the action then counts as a duplicate of its refused attempt, and the
//! orchestrator, no longer waiting for it, ignores the answer. If the action's
//! take-over comes first, the compensation's upsert waits for it; when the action
//! commits, the compensation's later statements see its effect and undo it.
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
//! - **Order of the two compensate statements.** The action row is claimed first,
//!   so a compensation and an action for the same branch always meet on that row,
//!   and the compensate row only ever exists beside an action row.
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

const INSERT: &str = "INSERT INTO saga_barrier (saga_id, branch, op, reason, attempt) \
                      VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING";

/// The compensation's claim on the action row: inserts it (reason `compensate`: the
/// action never ran) or marks the existing one `undone`, and returns the row's
/// reason either way. Updating the row (rather than `DO NOTHING`) takes its row
/// lock and writes a new version, which is what makes a later attempt of the action
/// ([`RETRY`]) see the compensation even when the two race.
const CLAIM_ACTION: &str =
    "INSERT INTO saga_barrier (saga_id, branch, op, reason, attempt, undone) \
                            VALUES ($1, $2, 'action', 'compensate', 1, true) \
                            ON CONFLICT (saga_id, branch, op) DO UPDATE SET undone = true \
                            RETURNING reason";

/// A later attempt after a refusal takes the row over: the row now stands for this
/// attempt, and its answer is written again by [`record_answer`]. Only a refusal
/// (stored answer `failure`) is tried again: a success ran the effect, which must
/// not run twice; a row without an answer (older than answers) stays a duplicate;
/// an action row whose compensation entered (`undone`) never runs again.
const RETRY: &str = "UPDATE saga_barrier \
                     SET attempt = $4, reply_outcome = NULL, reply_type = NULL, reply_payload = NULL \
                     WHERE saga_id = $1 AND branch = $2 AND op = $3 AND attempt < $4 \
                     AND reply_outcome = 'failure' AND reason = op AND NOT undone";

const RECORD_ANSWER: &str = "UPDATE saga_barrier \
                             SET reply_outcome = $4, reply_type = $5, reply_payload = $6 \
                             WHERE saga_id = $1 AND branch = $2 AND op = $3";

/// [`RECORD_ANSWER`] as the CTE `answered`, which returns the row it updated: the
/// participant's reply is inserted from it in the same statement
/// ([`answer_arguments`] binds it).
pub(crate) const RECORD_ANSWER_CTE: &str = "WITH answered AS (UPDATE saga_barrier \
     SET reply_outcome = $4, reply_type = $5, reply_payload = $6 \
     WHERE saga_id = $1 AND branch = $2 AND op = $3 RETURNING 1)";

/// The parameters of [`RECORD_ANSWER_CTE`].
pub(crate) fn answer_arguments(
    saga_id: &str,
    branch: &str,
    op: BarrierOp,
    answer: &ParticipantReply,
) -> Result<sqlx::postgres::PgArguments, sqlx::Error> {
    use sqlx::Arguments as _;
    let mut args = sqlx::postgres::PgArguments::default();
    let encode = sqlx::Error::Encode;
    args.add(saga_id).map_err(encode)?;
    args.add(branch).map_err(encode)?;
    args.add(op.as_str()).map_err(encode)?;
    args.add(answer.outcome.as_str()).map_err(encode)?;
    args.add(&answer.reply_type).map_err(encode)?;
    args.add(&answer.payload).map_err(encode)?;
    Ok(args)
}

const RECORDED_ANSWER: &str = "SELECT reply_outcome, reply_type, reply_payload FROM saga_barrier \
                               WHERE saga_id = $1 AND branch = $2 AND op = $3";

const ACTION_REASON: &str = "SELECT reason FROM saga_barrier \
                             WHERE saga_id = $1 AND branch = $2 AND op = 'action'";

/// [`enter_attempt`] for the first attempt: what a command without an attempt
/// number (sent by an orchestrator that did not number them) is taken to be.
pub async fn enter(
    conn: &mut sqlx::PgConnection,
    saga_id: &str,
    branch: &str,
    op: BarrierOp,
) -> Result<BarrierOutcome, sqlx::Error> {
    enter_attempt(conn, saga_id, branch, op, 1).await
}

/// Call first inside the participant's transaction; run the business effect only on
/// [`BarrierOutcome::Proceed`]. `attempt` is the orchestrator's number of this
/// command among the commands it sent for `op` of the step (1 for the first).
///
/// The row written here commits or rolls back with the caller's transaction (see the
/// module documentation). An error aborts that transaction; a serialization failure
/// or lost connection is transient and the whole transaction may be retried.
pub async fn enter_attempt(
    conn: &mut sqlx::PgConnection,
    saga_id: &str,
    branch: &str,
    op: BarrierOp,
    attempt: u32,
) -> Result<BarrierOutcome, sqlx::Error> {
    let attempt = i32::try_from(attempt.max(1)).unwrap_or(i32::MAX);
    let outcome = match op {
        BarrierOp::Action => {
            // A first delivery, or a new try after a refusal.
            if insert(conn, saga_id, branch, op, op, attempt).await?
                || retry(conn, saga_id, branch, op, attempt).await?
            {
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
            let action_reason: String = sqlx::query_scalar(CLAIM_ACTION)
                .bind(saga_id)
                .bind(branch)
                .fetch_one(&mut *conn)
                .await?;
            let action_ran = action_reason == BarrierOp::Action.as_str();
            if insert(conn, saga_id, branch, op, op, attempt).await? {
                if action_ran {
                    BarrierOutcome::Proceed
                } else {
                    BarrierOutcome::NullCompensation
                }
            } else if action_ran && retry(conn, saga_id, branch, op, attempt).await? {
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
        attempt,
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
    attempt: i32,
) -> Result<bool, sqlx::Error> {
    let done = sqlx::query(INSERT)
        .bind(saga_id)
        .bind(branch)
        .bind(op.as_str())
        .bind(reason.as_str())
        .bind(attempt)
        .execute(&mut *conn)
        .await?;
    Ok(done.rows_affected() == 1)
}

/// Whether `attempt` takes the existing `op` row over as a new try ([`RETRY`]).
async fn retry(
    conn: &mut sqlx::PgConnection,
    saga_id: &str,
    branch: &str,
    op: BarrierOp,
    attempt: i32,
) -> Result<bool, sqlx::Error> {
    let done = sqlx::query(RETRY)
        .bind(saga_id)
        .bind(branch)
        .bind(op.as_str())
        .bind(attempt)
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
