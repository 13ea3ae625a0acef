//! Suspended sagas: a failed step that the definition suspends waits for an
//! operator, who restarts it (a new attempt, through the participant's real
//! barrier) or aborts the saga; a suspension nobody acts on ends in the
//! compensation the failure would have started at once.
//!
//! Time is the fixture's [`ManualClock`](saga_core::testing::ManualClock): a
//! timeout or the end of a suspension passes when the test moves the clock, and
//! just before it the sweeper must leave the saga alone.

mod support;

use std::time::Duration;

use saga_core::consumer::HandlerError;
use saga_core::saga::{
    audit, cli, CommandEnvelope, Effect, Orchestrator, ParticipantReply, ReplyDisposition,
    SagaAdmin, SagaDefinition, SuspendOn,
};
use saga_core::status::SagaStatus;
use sqlx::PgConnection;
use support::{
    apply_reply, credit_and_approve, goods_saga, handle_with, order, replies_in_outbox, start_saga,
    Order, SagaDb, Sent, STEP_TIMEOUT,
};
use uuid::Uuid;

/// How long the tests' suspended sagas wait for an operator.
const HOLD: Duration = Duration::from_secs(3600);

/// The goods step (with a timeout) and the credit step, suspending the failures
/// `on` covers.
fn definition(on: SuspendOn) -> SagaDefinition<Order> {
    let builder = SagaDefinition::<Order>::builder("test-order").suspend_failed(on, HOLD);
    credit_and_approve(goods_saga(builder).with_timeout(STEP_TIMEOUT))
}

struct Fixture {
    db: SagaDb,
    orchestrator: Orchestrator<Order>,
}

impl Fixture {
    async fn new(on: SuspendOn) -> Fixture {
        let db = SagaDb::new(
            "CREATE TABLE reservations (saga_id text, note text); CREATE TABLE refusals (kind text)",
        )
        .await;
        let orchestrator = db.orchestrator(definition(on));
        Fixture { db, orchestrator }
    }

    async fn start(&self) -> (Uuid, Order) {
        let order = order();
        let id = start_saga(self.db.pool(), &self.orchestrator, order.clone()).await;
        (id, order)
    }

    async fn last(&self) -> Sent {
        self.db.commands().await.pop().expect("a command was sent")
    }

    async fn status(&self, id: Uuid) -> SagaStatus {
        self.db.status(&self.orchestrator, id).await
    }

    /// The participant handles `sent` behind its barrier (refusing a command
    /// listed in `refusals`, once); its reply is handed to the orchestrator.
    async fn round_trip(&self, sent: &Sent) -> ReplyDisposition {
        handle_with(&self.db, sent, participant).await;
        let reply = self.reply_to(sent).await;
        apply_reply(&self.orchestrator, self.db.pool(), &reply).await
    }

    async fn reply_to(&self, sent: &Sent) -> saga_core::consumer::IncomingMessage {
        replies_in_outbox(self.db.pool())
            .await
            .into_iter()
            .rev()
            .find(|r| r.headers.get("request-id") == Some(&sent.request_id))
            .expect("the participant answered")
    }

    async fn refuse_next(&self, kind: &str) {
        sqlx::query("INSERT INTO refusals (kind) VALUES ($1)")
            .bind(kind)
            .execute(self.db.pool())
            .await
            .unwrap();
    }

    /// The effects the participant applied, in order.
    async fn effects(&self) -> Vec<String> {
        sqlx::query_scalar("SELECT note FROM reservations ORDER BY ctid")
            .fetch_all(self.db.pool())
            .await
            .unwrap()
    }

    /// Moves the clock `wait` on and sweeps; just before, the sweep handles none.
    async fn sweep_after(&self, wait: Duration) -> usize {
        let just_before = Duration::from_millis(1);
        self.db.clock.advance(wait - just_before);
        let early = self.orchestrator.sweep(self.db.pool(), 100).await.unwrap();
        assert_eq!(early, 0, "a deadline passed before its time");
        self.db.clock.advance(just_before);
        self.orchestrator.sweep(self.db.pool(), 100).await.unwrap()
    }

    async fn kinds_of(&self, id: Uuid) -> Vec<String> {
        let mut conn = self.db.db.connect().await;
        let events = audit::events(&mut conn, id).await.unwrap();
        events.into_iter().map(|e| e.kind).collect()
    }
}

/// The participant's effect: a command listed in `refusals` is refused (and taken
/// off the list), any other is recorded in `reservations`.
fn participant<'c>(tx: &'c mut PgConnection, command: &'c CommandEnvelope) -> Effect<'c> {
    Box::pin(async move {
        let refused = sqlx::query("DELETE FROM refusals WHERE kind = $1")
            .bind(&command.command_type)
            .execute(&mut *tx)
            .await
            .map_err(HandlerError::transient)?
            .rows_affected()
            > 0;
        if refused {
            let kind = format!("{}Refused", command.command_type);
            return Ok(ParticipantReply::failure(kind, serde_json::json!({})));
        }
        sqlx::query("INSERT INTO reservations (saga_id, note) VALUES ($1, $2)")
            .bind(&command.saga_id)
            .bind(&command.command_type)
            .execute(&mut *tx)
            .await
            .map_err(HandlerError::transient)?;
        let kind = format!("{}Done", command.command_type);
        Ok(ParticipantReply::success(kind, serde_json::json!({})))
    })
}

/// The goods step times out: the saga is suspended on it, nothing is
/// compensated. The command arrives late and runs; the operator restarts the
/// step, whose new attempt the barrier answers with that first run's answer: the
/// saga completes, the goods reserved once.
#[tokio::test]
async fn a_timed_out_step_is_suspended_and_a_restart_completes_the_saga_without_running_it_twice() {
    let f = Fixture::new(SuspendOn::Timeouts).await;
    let (id, order) = f.start().await;
    let first = f.last().await;
    assert_eq!(f.sweep_after(STEP_TIMEOUT).await, 1);
    assert_eq!(f.status(id).await, SagaStatus::Suspended);
    assert_eq!(f.db.commands().await.len(), 1, "nothing is compensated yet");
    assert_eq!(
        f.db.order_status(order.order_id).await.as_deref(),
        Some("PENDING")
    );
    let admin = SagaAdmin::new(f.db.pool().clone()).acting_as("dana");
    let waiting = admin.waiting_for_operator().await.unwrap();
    assert_eq!(
        waiting
            .iter()
            .map(|s| (s.id, s.status.as_str(), s.current_step.as_deref()))
            .collect::<Vec<_>>(),
        [(id, "SUSPENDED", Some("reserve-goods"))]
    );

    // The command was only slow: it runs now, and its answer is stale.
    assert_eq!(f.round_trip(&first).await, ReplyDisposition::Stale);
    assert_eq!(f.status(id).await, SagaStatus::Suspended);

    let said = cli::run(
        &admin,
        &f.orchestrator,
        cli::SagaCommand::RestartStep { id },
    )
    .await
    .unwrap();
    assert!(said.contains("started again"), "{said}");
    let again = f.last().await;
    assert_eq!(
        (
            again.kind.as_str(),
            again.step.as_str(),
            again.attempt.as_str()
        ),
        ("ReserveGoods", "reserve-goods", "2")
    );
    assert_eq!(f.status(id).await, SagaStatus::Started);
    assert_eq!(f.round_trip(&again).await, ReplyDisposition::Applied);
    let replay = f.reply_to(&again).await;
    assert_eq!(
        replay.headers.get("saga-replay").map(String::as_str),
        Some("true")
    );
    let credit = f.last().await;
    assert_eq!(credit.kind, "ReserveCredit");
    assert_eq!(f.round_trip(&credit).await, ReplyDisposition::Applied);
    assert_eq!(f.status(id).await, SagaStatus::Completed);
    assert_eq!(f.effects().await, ["ReserveGoods", "ReserveCredit"]);

    let kinds = f.kinds_of(id).await;
    assert!(kinds.contains(&"saga_suspended".to_owned()), "{kinds:?}");
    let mut conn = f.db.db.connect().await;
    let events = audit::events(&mut conn, id).await.unwrap();
    let action = events.iter().find(|e| e.kind == "operator_action").unwrap();
    assert_eq!(action.detail["action"], "restart_step");
    assert_eq!(action.detail["actor"], "dana");
    assert_eq!(action.step.as_deref(), Some("reserve-goods"));
    f.db.assert_trail_rebuilds().await;
}

/// Suspending every failure: the participant refuses, the saga waits; once the
/// cause is mended, the restarted step is a new attempt the barrier lets run.
#[tokio::test]
async fn a_refused_step_suspended_runs_again_when_restarted() {
    let f = Fixture::new(SuspendOn::AnyFailure).await;
    let (id, order) = f.start().await;
    f.refuse_next("ReserveGoods").await;
    let first = f.last().await;
    assert_eq!(f.round_trip(&first).await, ReplyDisposition::Applied);
    assert_eq!(f.status(id).await, SagaStatus::Suspended);
    assert!(f.effects().await.is_empty());

    let admin = SagaAdmin::new(f.db.pool().clone());
    admin.restart_step(&f.orchestrator, id).await.unwrap();
    let again = f.last().await;
    assert_eq!(
        (again.kind.as_str(), again.attempt.as_str()),
        ("ReserveGoods", "2")
    );
    assert_eq!(f.round_trip(&again).await, ReplyDisposition::Applied);
    assert_eq!(f.reply_to(&again).await.headers["outcome"], "success");
    assert_eq!(
        f.round_trip(&f.last().await).await,
        ReplyDisposition::Applied
    );
    assert_eq!(f.status(id).await, SagaStatus::Completed);
    assert_eq!(f.effects().await, ["ReserveGoods", "ReserveCredit"]);
    assert_eq!(
        f.db.order_status(order.order_id).await.as_deref(),
        Some("APPROVED")
    );
    // Redelivered, the refused attempt stays a duplicate: nothing runs twice.
    handle_with(&f.db, &first, participant).await;
    assert_eq!(f.effects().await, ["ReserveGoods", "ReserveCredit"]);
    f.db.assert_trail_rebuilds().await;
}

/// Suspending timeouts only: a refusal compensates at once, as without a
/// suspension, and there is nothing to restart.
#[tokio::test]
async fn suspending_timeouts_only_a_refusal_compensates_at_once() {
    let f = Fixture::new(SuspendOn::Timeouts).await;
    let (id, order) = f.start().await;
    f.refuse_next("ReserveGoods").await;
    assert_eq!(
        f.round_trip(&f.last().await).await,
        ReplyDisposition::Applied
    );
    assert_eq!(f.status(id).await, SagaStatus::Aborted);
    assert_eq!(
        f.db.order_status(order.order_id).await.as_deref(),
        Some("REJECTED")
    );
    let admin = SagaAdmin::new(f.db.pool().clone());
    let refused = admin.restart_step(&f.orchestrator, id).await.unwrap_err();
    assert!(
        refused
            .to_string()
            .contains("is ABORTED, this needs a SUSPENDED saga"),
        "{refused}"
    );
    f.db.assert_trail_rebuilds().await;
}

/// Nobody acts: when the suspension ends the saga compensates, the timed-out step
/// too (its participant may have run it), and the order is rejected. The late
/// command then finds its step undone and does not run.
#[tokio::test]
async fn a_suspension_that_ends_compensates_the_saga_and_its_timed_out_step() {
    let f = Fixture::new(SuspendOn::Timeouts).await;
    let (id, order) = f.start().await;
    let first = f.last().await;
    assert_eq!(f.sweep_after(STEP_TIMEOUT).await, 1);
    assert_eq!(f.status(id).await, SagaStatus::Suspended);
    assert_eq!(f.sweep_after(HOLD).await, 1);
    assert_eq!(f.status(id).await, SagaStatus::Aborting);
    let release = f.last().await;
    assert_eq!(
        (release.kind.as_str(), release.compensation),
        ("ReleaseGoods", true)
    );
    assert_eq!(f.round_trip(&release).await, ReplyDisposition::Applied);
    assert_eq!(f.status(id).await, SagaStatus::Aborted);
    assert_eq!(
        f.db.order_status(order.order_id).await.as_deref(),
        Some("REJECTED")
    );
    // The action after its compensation: a hanging action, not run.
    handle_with(&f.db, &first, participant).await;
    assert!(f.effects().await.is_empty(), "{:?}", f.effects().await);
    let kinds = f.kinds_of(id).await;
    let passed = kinds.iter().filter(|k| *k == "deadline_passed").count();
    assert_eq!(
        passed, 2,
        "the step's timeout, then the suspension's end: {kinds:?}"
    );
    f.db.assert_trail_rebuilds().await;
}

/// An operator aborts a suspended saga: it compensates now, not when the
/// suspension ends; the failed step's timeout stands (it is undone too).
#[tokio::test]
async fn an_operator_aborts_a_suspended_saga_and_it_compensates_now() {
    let f = Fixture::new(SuspendOn::Timeouts).await;
    let (id, order) = f.start().await;
    assert_eq!(f.sweep_after(STEP_TIMEOUT).await, 1);
    let admin = SagaAdmin::new(f.db.pool().clone()).acting_as("erin");
    admin
        .abort(&f.orchestrator, id, "customer called")
        .await
        .unwrap();
    assert_eq!(f.status(id).await, SagaStatus::Aborting);
    let release = f.last().await;
    assert_eq!(release.kind, "ReleaseGoods");
    assert_eq!(f.round_trip(&release).await, ReplyDisposition::Applied);
    assert_eq!(f.status(id).await, SagaStatus::Aborted);
    assert_eq!(
        f.db.order_status(order.order_id).await.as_deref(),
        Some("REJECTED")
    );
    // Its suspension's end finds nothing to do.
    assert_eq!(f.orchestrator.sweep(f.db.pool(), 100).await.unwrap(), 0);
    f.db.clock.advance(HOLD);
    assert_eq!(f.orchestrator.sweep(f.db.pool(), 100).await.unwrap(), 0);
    f.db.assert_trail_rebuilds().await;
}
