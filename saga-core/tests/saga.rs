//! The orchestrator against a real database: commands go to the outbox, replies are
//! fed in as a participant would send them.
//!
//! Time is a [`ManualClock`]: a deadline passes when a test moves the clock past it,
//! and every test that does also checks that the sweeper left the saga alone just
//! before. Races between two transactions wait until the second one is blocked on
//! the first's row lock, as PostgreSQL reports it.

mod support;

use std::collections::BTreeMap;
use std::ops::Deref;
use std::time::Duration;

use saga_core::consumer::IncomingMessage;
use saga_core::outbox::Outbox;
use saga_core::saga::{audit, cli, Clock};
use saga_core::saga::{
    CompensationRetry, Orchestrator, ReplyDisposition, SagaAdmin, SagaDefinition, SagaError,
    StuckRules,
};
use saga_core::status::SagaStatus;
use sqlx::types::chrono;
use sqlx::PgConnection;
use support::{
    apply_reply, command, command_message, create, credit_and_approve, goods_saga, handle_with,
    order, reject, replies_in_outbox, start_saga, Order, SagaDb, Sent, STEP_TIMEOUT,
};
use uuid::Uuid;

/// The first backoff before a failed compensation is tried again.
const COMPENSATION_BACKOFF: Duration = Duration::from_secs(5);

/// How the tests' compensations are retried: from 5 s, doubling up to 20 s, for a
/// minute.
const COMPENSATION_RETRY: CompensationRetry = CompensationRetry {
    first_backoff: COMPENSATION_BACKOFF,
    max_backoff: Duration::from_secs(20),
    give_up_after: Duration::from_secs(60),
};

/// How far before a deadline the tests check that it has not passed yet.
const JUST_BEFORE: Duration = Duration::from_millis(1);

/// How long a transaction may take to block on another's row lock.
const BLOCK_TIMEOUT: Duration = Duration::from_secs(10);

fn definition(timeout: Option<Duration>) -> SagaDefinition<Order> {
    let builder = goods_saga(
        SagaDefinition::<Order>::builder("test-order").compensation_retry(COMPENSATION_RETRY),
    );
    credit_and_approve(match timeout {
        Some(t) => builder.with_timeout(t),
        None => builder,
    })
}

/// The test's database and clock, and an orchestrator of [`definition`].
struct Fixture {
    base: SagaDb,
    orchestrator: Orchestrator<Order>,
}

impl Deref for Fixture {
    type Target = SagaDb;

    fn deref(&self) -> &SagaDb {
        &self.base
    }
}

impl Fixture {
    async fn new(timeout: Option<Duration>) -> Fixture {
        let base = SagaDb::new("").await;
        let orchestrator = base.orchestrator(definition(timeout));
        Fixture { base, orchestrator }
    }

    /// Moves the clock to a deadline set `wait` ago (by the clock) and sweeps with
    /// `orchestrator`; returns how many sagas it handled. Just before the deadline
    /// the sweep must handle none.
    async fn sweep_after(&self, orchestrator: &Orchestrator<Order>, wait: Duration) -> usize {
        self.clock.advance(wait - JUST_BEFORE);
        assert_eq!(
            orchestrator.sweep(self.pool(), 100).await.unwrap(),
            0,
            "a deadline passed before its time"
        );
        self.clock.advance(JUST_BEFORE);
        orchestrator.sweep(self.pool(), 100).await.unwrap()
    }

    /// Waits until a transaction of the test is blocked on a row lock another one
    /// holds (the second of two racing transactions, on the saga's row).
    async fn wait_until_blocked(&self) {
        assert!(
            self.db.wait_for_a_lock_wait(BLOCK_TIMEOUT).await.unwrap(),
            "no transaction blocked on the saga's row within {BLOCK_TIMEOUT:?}"
        );
    }

    async fn start(&self, order: Order) -> Uuid {
        start_saga(self.pool(), &self.orchestrator, order).await
    }

    async fn kinds(&self) -> Vec<String> {
        self.sent().await.into_iter().map(|s| s.kind).collect()
    }

    async fn last(&self) -> Sent {
        self.sent().await.pop().expect("a command was sent")
    }

    /// Applies a participant's reply to `to` in its own transaction.
    async fn reply(
        &self,
        to: &Sent,
        success: bool,
        kind: &str,
        payload: serde_json::Value,
    ) -> Result<ReplyDisposition, SagaError> {
        let mut tx = self.pool().begin().await.unwrap();
        let result = self
            .orchestrator
            .handle_reply(&mut tx, &reply_message(to, success, kind, payload))
            .await;
        match &result {
            Ok(_) => tx.commit().await.unwrap(),
            Err(_) => tx.rollback().await.unwrap(),
        }
        result
    }

    async fn ok(&self, to: &Sent) {
        let kind = format!("{}Done", to.kind);
        assert_eq!(
            self.reply(to, true, &kind, serde_json::json!({}))
                .await
                .unwrap(),
            ReplyDisposition::Applied
        );
    }

    /// Where saga `id` of the fixture's orchestrator stands.
    async fn status(&self, id: Uuid) -> SagaStatus {
        self.base.status(&self.orchestrator, id).await
    }

    /// Where saga `id` of `orchestrator` (another definition than the fixture's)
    /// stands, and the status of its order.
    async fn outcome(
        &self,
        orchestrator: &Orchestrator<Order>,
        id: Uuid,
        order: &Order,
    ) -> (SagaStatus, Option<String>) {
        let saga = self.base.status(orchestrator, id).await;
        (saga, self.order_status(order.order_id).await)
    }
}

fn reply_message(
    to: &Sent,
    success: bool,
    kind: &str,
    payload: serde_json::Value,
) -> IncomingMessage {
    let mut headers = BTreeMap::new();
    headers.insert("saga-id".to_owned(), to.saga_id.clone());
    headers.insert("saga-step".to_owned(), to.step.clone());
    headers.insert("request-id".to_owned(), to.request_id.clone());
    headers.insert(
        "outcome".to_owned(),
        if success { "success" } else { "failure" }.to_owned(),
    );
    headers.insert("type".to_owned(), kind.to_owned());
    let id = Uuid::now_v7();
    headers.insert("id".to_owned(), id.to_string());
    IncomingMessage {
        topic: support::REPLY_TOPIC.to_owned(),
        partition: 0,
        offset: 0,
        key: Some(to.saga_id.clone()),
        id,
        message_type: Some(kind.to_owned()),
        headers,
        payload: Some(payload),
    }
}

#[tokio::test]
async fn the_success_path_runs_every_step_in_order() {
    let f = Fixture::new(None).await;
    let order = order();
    let id = f.start(order.clone()).await;
    assert_eq!(
        f.order_status(order.order_id).await.as_deref(),
        Some("PENDING")
    );
    let goods = f.last().await;
    assert_eq!(
        (goods.kind.as_str(), goods.step.as_str(), goods.compensation),
        ("ReserveGoods", "reserve-goods", false)
    );
    assert_eq!(goods.saga_id, id.to_string());
    f.ok(&goods).await;
    let credit = f.last().await;
    assert_eq!(credit.kind, "ReserveCredit");
    f.ok(&credit).await;
    assert_eq!(f.status(id).await, SagaStatus::Completed);
    assert_eq!(
        f.order_status(order.order_id).await.as_deref(),
        Some("APPROVED")
    );
    assert_eq!(f.kinds().await, ["ReserveGoods", "ReserveCredit"]);
    f.assert_trail_rebuilds().await;
}

/// The commands a transaction of the test wrote to the outbox and deleted again,
/// counted by the server for that transaction.
async fn outbox_writes(tx: &mut PgConnection) -> (i64, i64) {
    sqlx::query_as(
        "SELECT n_tup_ins, n_tup_del FROM pg_stat_xact_user_tables WHERE relname = 'outbox'",
    )
    .fetch_one(&mut *tx)
    .await
    .unwrap()
}

#[tokio::test]
async fn an_outbox_that_deletes_its_rows_gets_each_command_written_and_deleted() {
    let f = Fixture::new(None).await;
    let deleting = Orchestrator::new(
        definition(None),
        Outbox::new().delete_after_insert(true),
        support::REPLY_TOPIC,
    )
    .with_clock(f.clock.clone());
    let mut tx = f.pool().begin().await.unwrap();
    let id = Uuid::now_v7();
    deleting.start(&mut tx, id, order()).await.unwrap();
    // The first command went in with the saga's row, and out again.
    assert_eq!(outbox_writes(&mut tx).await, (1, 1));
    tx.commit().await.unwrap();
    assert!(f.sent().await.is_empty(), "a command row was left behind");
    assert_eq!(f.status(id).await, SagaStatus::Started);
    f.assert_trail_rebuilds().await;
}

#[tokio::test]
async fn a_failed_participant_step_compensates_exactly_the_earlier_steps_in_reverse() {
    let f = Fixture::new(None).await;
    let order = order();
    let id = f.start(order.clone()).await;
    f.ok(&f.last().await).await;
    let credit = f.last().await;
    let disposition = f
        .reply(
            &credit,
            false,
            "CreditLimitExceeded",
            serde_json::json!({ "available": 40 }),
        )
        .await
        .unwrap();
    assert_eq!(disposition, ReplyDisposition::Applied);
    // The credit step did nothing: only the goods are released, then the order rejected.
    let release = f.last().await;
    assert_eq!(
        (release.kind.as_str(), release.compensation),
        ("ReleaseGoods", true)
    );
    assert_eq!(f.status(id).await, SagaStatus::Aborting);
    f.ok(&release).await;
    assert_eq!(f.status(id).await, SagaStatus::Aborted);
    assert_eq!(
        f.order_status(order.order_id).await.as_deref(),
        Some("REJECTED")
    );
    assert_eq!(
        f.kinds().await,
        ["ReserveGoods", "ReserveCredit", "ReleaseGoods"]
    );
    let mut conn = f.db.connect().await;
    let instance = f.orchestrator.load(&mut conn, id).await.unwrap();
    assert_eq!(
        instance.data.rejection.as_deref(),
        Some("credit limit exceeded, 40 available")
    );
    f.assert_trail_rebuilds().await;
}

#[tokio::test]
async fn a_failure_at_the_first_participant_compensates_only_the_local_step() {
    let f = Fixture::new(None).await;
    let order = order();
    let id = f.start(order.clone()).await;
    let goods = f.last().await;
    f.reply(&goods, false, "GoodsNotFound", serde_json::json!({}))
        .await
        .unwrap();
    assert_eq!(f.status(id).await, SagaStatus::Aborted);
    assert_eq!(f.kinds().await, ["ReserveGoods"]);
    assert_eq!(
        f.order_status(order.order_id).await.as_deref(),
        Some("REJECTED")
    );
}

#[tokio::test]
async fn a_failing_last_local_step_compensates_everything_before_it_in_reverse() {
    let f = Fixture::new(None).await;
    let order = Order {
        cancel: true,
        ..order()
    };
    let id = f.start(order.clone()).await;
    f.ok(&f.last().await).await;
    f.ok(&f.last().await).await;
    // approve failed: its write (APPROVED) was rolled back; credit is released first.
    assert_eq!(
        f.order_status(order.order_id).await.as_deref(),
        Some("PENDING")
    );
    let credit = f.last().await;
    assert_eq!(credit.kind, "ReleaseCredit");
    f.ok(&credit).await;
    let goods = f.last().await;
    assert_eq!(goods.kind, "ReleaseGoods");
    f.ok(&goods).await;
    assert_eq!(f.status(id).await, SagaStatus::Aborted);
    assert_eq!(
        f.order_status(order.order_id).await.as_deref(),
        Some("REJECTED")
    );
    assert_eq!(
        f.kinds().await,
        [
            "ReserveGoods",
            "ReserveCredit",
            "ReleaseCredit",
            "ReleaseGoods"
        ]
    );
    f.assert_trail_rebuilds().await;
}

#[tokio::test]
async fn duplicate_and_stale_replies_change_nothing() {
    let f = Fixture::new(None).await;
    let id = f.start(order()).await;
    let goods = f.last().await;
    f.ok(&goods).await;
    // The same reply again, and a reply for a request that was never sent.
    assert_eq!(
        f.reply(&goods, true, "ReserveGoodsDone", serde_json::json!({}))
            .await
            .unwrap(),
        ReplyDisposition::Stale
    );
    let credit = f.last().await;
    let forged = Sent {
        request_id: Uuid::now_v7().to_string(),
        ..credit.clone()
    };
    assert_eq!(
        f.reply(
            &forged,
            false,
            "CreditLimitExceeded",
            serde_json::json!({"available": 0})
        )
        .await
        .unwrap(),
        ReplyDisposition::Stale
    );
    assert_eq!(f.status(id).await, SagaStatus::Started);
    assert_eq!(f.kinds().await, ["ReserveGoods", "ReserveCredit"]);
    f.assert_trail_rebuilds().await;
}

#[tokio::test]
async fn a_timed_out_step_fails_is_compensated_itself_and_its_late_reply_is_stale() {
    let f = Fixture::new(Some(STEP_TIMEOUT)).await;
    let order = order();
    let id = f.start(order.clone()).await;
    let goods = f.last().await;
    assert_eq!(f.sweep_after(&f.orchestrator, STEP_TIMEOUT).await, 1);
    // The participant may have reserved the goods: they are released.
    let release = f.last().await;
    assert_eq!(
        (release.kind.as_str(), release.step.as_str()),
        ("ReleaseGoods", "reserve-goods")
    );
    assert_eq!(
        f.reply(&goods, true, "ReserveGoodsDone", serde_json::json!({}))
            .await
            .unwrap(),
        ReplyDisposition::Stale
    );
    f.ok(&release).await;
    assert_eq!(f.status(id).await, SagaStatus::Aborted);
    assert_eq!(
        f.order_status(order.order_id).await.as_deref(),
        Some("REJECTED")
    );
    f.assert_trail_rebuilds().await;
}

#[tokio::test]
async fn two_orchestrators_applying_one_reply_resolve_through_the_version() {
    let f = Fixture::new(None).await;
    let id = f.start(order()).await;
    let goods = f.last().await;
    let message = reply_message(&goods, true, "ReserveGoodsDone", serde_json::json!({}));

    let mut first = f.pool().begin().await.unwrap();
    let applied = f
        .orchestrator
        .handle_reply(&mut first, &message)
        .await
        .unwrap();
    assert_eq!(applied, ReplyDisposition::Applied);
    // The second loads the old version now and blocks on the row until the first commits.
    let second = {
        let pool = f.pool().clone();
        let orchestrator = f.orchestrator(definition(None));
        let message = message.clone();
        tokio::spawn(async move {
            let mut tx = pool.begin().await.unwrap();
            let result = orchestrator.handle_reply(&mut tx, &message).await;
            drop(tx);
            (result, orchestrator.version_conflicts())
        })
    };
    // Blocked on the row, the second has loaded the old version (loading takes no
    // lock; only its version-checked update waits).
    f.wait_until_blocked().await;
    first.commit().await.unwrap();
    let (lost, conflicts) = second.await.unwrap();
    assert!(
        matches!(lost, Err(SagaError::Conflict(c)) if c == id),
        "{lost:?}"
    );
    assert_eq!(conflicts, 1, "the lost save is counted");
    assert_eq!(f.orchestrator.version_conflicts(), 0);
    // Retried after the conflict, the reply is stale: one outcome, one next command.
    assert_eq!(
        f.reply(&goods, true, "ReserveGoodsDone", serde_json::json!({}))
            .await
            .unwrap(),
        ReplyDisposition::Stale
    );
    assert_eq!(f.kinds().await, ["ReserveGoods", "ReserveCredit"]);
    f.assert_trail_rebuilds().await;
}

/// A refused compensation is tried again, after a backoff doubling up to its cap,
/// until the retries' time is up; only then is the saga `COMPENSATION_FAILED`. An
/// operator's retry is a new attempt with the retries' full time again.
#[tokio::test]
async fn a_compensation_that_keeps_failing_ends_in_compensation_failed_until_an_operator_retries() {
    let f = Fixture::new(None).await;
    let id = f.start(order()).await;
    f.ok(&f.last().await).await;
    f.reply(
        &f.last().await,
        false,
        "CreditLimitExceeded",
        serde_json::json!({"available": 0}),
    )
    .await
    .unwrap();
    let admin = SagaAdmin::new(f.pool().clone());
    let f = &f;
    let refuse = |sent: Sent| async move {
        f.reply(&sent, false, "ReleaseFailed", serde_json::json!({}))
            .await
            .unwrap()
    };
    // Refused at 0 s, then (after 5, 10, 20 and 20 s of backoff) at 5, 15, 35 and
    // 55 s: still within the minute, so it is tried again 20 s later, at 75 s.
    let mut attempts = vec![f.last().await];
    for backoff in [5, 10, 20, 20, 20] {
        assert_eq!(
            refuse(attempts.last().unwrap().clone()).await,
            ReplyDisposition::Applied
        );
        assert_eq!(f.status(id).await, SagaStatus::Aborting);
        assert!(admin.failed().await.unwrap().is_empty());
        assert_eq!(
            f.sweep_after(&f.orchestrator, Duration::from_secs(backoff))
                .await,
            1
        );
        attempts.push(f.last().await);
    }
    assert_eq!(
        attempts
            .iter()
            .map(|s| (s.kind.as_str(), s.compensation, s.attempt.as_str()))
            .collect::<Vec<_>>(),
        [
            ("ReleaseGoods", true, "1"),
            ("ReleaseGoods", true, "2"),
            ("ReleaseGoods", true, "3"),
            ("ReleaseGoods", true, "4"),
            ("ReleaseGoods", true, "5"),
            ("ReleaseGoods", true, "6"),
        ],
        "each try is a new attempt"
    );
    let mut requests: Vec<&str> = attempts.iter().map(|s| s.request_id.as_str()).collect();
    requests.dedup();
    assert_eq!(requests.len(), attempts.len(), "each try is a new request");
    // Refused 75 s after the compensation began: past the minute, for good.
    refuse(attempts.last().unwrap().clone()).await;
    assert_eq!(f.status(id).await, SagaStatus::CompensationFailed);
    let failed = admin.failed().await.unwrap();
    assert_eq!(failed.iter().map(|s| s.id).collect::<Vec<_>>(), [id]);
    f.clock.advance(Duration::from_secs(3600));
    assert_eq!(f.orchestrator.sweep(f.pool(), 100).await.unwrap(), 0);

    // The operator's retry is attempt 7, and a refusal of it is retried again
    // (the minute starts anew) rather than failing for good at once.
    admin.retry_compensation(&f.orchestrator, id).await.unwrap();
    let seventh = f.last().await;
    assert_eq!(
        (seventh.kind.as_str(), seventh.attempt.as_str()),
        ("ReleaseGoods", "7")
    );
    refuse(seventh).await;
    assert_eq!(f.status(id).await, SagaStatus::Aborting);
    assert_eq!(
        f.sweep_after(&f.orchestrator, Duration::from_secs(20))
            .await,
        1
    );
    let eighth = f.last().await;
    assert_eq!(eighth.attempt, "8");
    f.ok(&eighth).await;
    assert_eq!(f.status(id).await, SagaStatus::Aborted);
    assert!(admin.failed().await.unwrap().is_empty());
    f.assert_trail_rebuilds().await;
}

/// With the default retries, a compensation outlasts an outage of its participant
/// of hours: it is sent again and again (no reply within its step's timeout, then
/// a backoff that stops growing at a minute), and when the participant is back and
/// works through its backlog the saga is `ABORTED`, not `COMPENSATION_FAILED`.
#[tokio::test]
async fn a_compensation_outlasts_an_outage_of_its_participant() {
    let f = Fixture::new(None).await;
    participant_tables(&f).await;
    let defaults = goods_saga(SagaDefinition::<Order>::builder("test-order"))
        .with_timeout(STEP_TIMEOUT)
        .build()
        .unwrap();
    assert_eq!(defaults.compensation_retry(), CompensationRetry::default());
    let orchestrator = f.orchestrator(defaults);
    let order = order();
    let id = start_saga(f.pool(), &orchestrator, order.clone()).await;
    // The participant runs the step, then goes down before its reply is sent: the
    // step times out and its compensation is sent to a participant that is down.
    participant_handles(&f, &f.last().await).await;
    sqlx::query("DELETE FROM outbox WHERE aggregatetype = 'order.reply'")
        .execute(f.pool())
        .await
        .unwrap();
    assert_eq!(f.sweep_after(&orchestrator, STEP_TIMEOUT).await, 1);

    let outage = Duration::from_secs(2 * 3600);
    let mut down_for = STEP_TIMEOUT;
    let mut sweeps = 0;
    while down_for < outage {
        // No reply: each try times out after the step's timeout; the sweeper then
        // schedules the next one after the backoff, and sends it when it is due.
        f.clock.advance(STEP_TIMEOUT);
        assert_eq!(orchestrator.sweep(f.pool(), 100).await.unwrap(), 1);
        let (status, _) = f.outcome(&orchestrator, id, &order).await;
        assert_eq!(status, SagaStatus::Aborting, "after {down_for:?} down");
        let deadline: chrono::DateTime<chrono::Utc> =
            sqlx::query_scalar("SELECT deadline FROM saga_state WHERE id = $1")
                .bind(id)
                .fetch_one(f.pool())
                .await
                .unwrap();
        let backoff = (deadline - f.clock.now()).to_std().unwrap();
        assert!(
            backoff <= saga_core::saga::DEFAULT_COMPENSATION_MAX_BACKOFF,
            "backoff {backoff:?}"
        );
        f.clock.advance(backoff);
        assert_eq!(orchestrator.sweep(f.pool(), 100).await.unwrap(), 1);
        down_for += STEP_TIMEOUT + backoff;
        sweeps += 1;
    }
    let sent = commands_in_outbox(&f).await;
    let releases: Vec<&Sent> = sent.iter().filter(|s| s.compensation).collect();
    assert_eq!(releases.len(), sweeps + 1, "one command per try");
    assert!(sweeps > 60, "{sweeps} tries in {outage:?}");

    // Back, the participant works through its backlog: the first release runs, the
    // others are duplicates answered again; the last try's answer ends the saga.
    for release in &releases {
        participant_handles(&f, release).await;
    }
    assert_eq!(effects_of(&f).await, ["ReleaseGoods", "ReserveGoods"]);
    let mut applied = 0;
    for reply in replies_in_outbox(f.pool()).await {
        if apply_reply(&orchestrator, f.pool(), &reply).await == ReplyDisposition::Applied {
            applied += 1;
        }
    }
    assert_eq!(applied, 1);
    assert_eq!(
        f.outcome(&orchestrator, id, &order).await,
        (SagaStatus::Aborted, Some("REJECTED".to_owned()))
    );
    f.assert_trail_rebuilds().await;
}

#[tokio::test]
async fn an_operator_aborts_a_stuck_saga_and_the_waiting_step_is_compensated() {
    let f = Fixture::new(None).await;
    let order = order();
    let id = f.start(order.clone()).await;
    let admin = SagaAdmin::new(f.pool().clone());
    let an_hour = StuckRules::new().without_timeout(Duration::from_secs(3600));
    assert_eq!(admin.stuck(&an_hour).await.unwrap(), []);
    admin
        .abort(&f.orchestrator, id, "no reply from inventory")
        .await
        .unwrap();
    let release = f.last().await;
    assert_eq!(release.kind, "ReleaseGoods");
    f.ok(&release).await;
    assert_eq!(f.status(id).await, SagaStatus::Aborted);
    assert_eq!(
        f.order_status(order.order_id).await.as_deref(),
        Some("REJECTED")
    );
    let counts = admin.counts().await.unwrap();
    assert_eq!(counts, [("test-order".to_owned(), "ABORTED".to_owned(), 1)]);
    f.assert_trail_rebuilds().await;
}

#[test]
fn definitions_are_checked() {
    let duplicate = SagaDefinition::<Order>::builder("x")
        .step("a")
        .invoke_local(create)
        .step("a")
        .invoke_local(create)
        .build();
    assert!(duplicate.is_err());
    let timeout_on_local = SagaDefinition::<Order>::builder("x")
        .step("a")
        .invoke_local(create)
        .with_timeout(Duration::from_secs(1))
        .build();
    assert!(timeout_on_local
        .unwrap_err()
        .to_string()
        .contains("participant steps only"));
    assert!(SagaDefinition::<Order>::builder("x").build().is_err());
}

#[tokio::test]
async fn a_reply_racing_its_timeout_has_one_outcome() {
    let f = Fixture::new(Some(STEP_TIMEOUT)).await;
    let id = f.start(order()).await;
    let goods = f.last().await;
    // The sweeper's transaction times the step out; the reply loads the same version
    // meanwhile and waits for the row.
    let mut sweeper = f.pool().begin().await.unwrap();
    f.clock.advance(STEP_TIMEOUT - JUST_BEFORE);
    assert!(
        !f.orchestrator
            .handle_deadline(&mut sweeper, id)
            .await
            .unwrap(),
        "the step timed out before its deadline"
    );
    f.clock.advance(JUST_BEFORE);
    assert!(f
        .orchestrator
        .handle_deadline(&mut sweeper, id)
        .await
        .unwrap());
    let racing = {
        let pool = f.pool().clone();
        let orchestrator = f.orchestrator(definition(Some(STEP_TIMEOUT)));
        let message = reply_message(&goods, true, "ReserveGoodsDone", serde_json::json!({}));
        tokio::spawn(async move {
            let mut tx = pool.begin().await.unwrap();
            orchestrator.handle_reply(&mut tx, &message).await
        })
    };
    f.wait_until_blocked().await;
    sweeper.commit().await.unwrap();
    assert!(matches!(racing.await.unwrap(), Err(SagaError::Conflict(_))));
    // Retried, the reply is stale: the timeout won, the step is being compensated.
    assert_eq!(
        f.reply(&goods, true, "ReserveGoodsDone", serde_json::json!({}))
            .await
            .unwrap(),
        ReplyDisposition::Stale
    );
    assert_eq!(f.status(id).await, SagaStatus::Aborting);
    assert_eq!(f.kinds().await, ["ReserveGoods", "ReleaseGoods"]);
    f.assert_trail_rebuilds().await;
}

fn reserve<'c>(
    tx: &'c mut PgConnection,
    command: &'c saga_core::saga::CommandEnvelope,
) -> saga_core::saga::Effect<'c> {
    Box::pin(async move {
        sqlx::query("INSERT INTO reservations (saga_id, note) VALUES ($1, $2)")
            .bind(&command.saga_id)
            .bind(&command.command_type)
            .execute(&mut *tx)
            .await
            .map_err(saga_core::consumer::HandlerError::transient)?;
        Ok(saga_core::saga::ParticipantReply::success(
            "GoodsReserved",
            serde_json::json!({}),
        ))
    })
}

#[tokio::test]
async fn a_participant_applies_a_command_once_and_replies_through_its_outbox() {
    let f = Fixture::new(None).await;
    participant_tables(&f).await;
    let outbox = Outbox::new();
    let id = f.start(order()).await;
    let goods = f.last().await;
    let command = command_message(&goods, "ReserveGoods");
    for _ in 0..2 {
        let mut tx = f.pool().begin().await.unwrap();
        saga_core::saga::participate(&mut tx, &outbox, &command, reserve)
            .await
            .unwrap();
        tx.commit().await.unwrap();
    }
    let effects: i64 = sqlx::query_scalar("SELECT count(*) FROM reservations")
        .fetch_one(f.pool())
        .await
        .unwrap();
    assert_eq!(effects, 1, "the duplicate command had an effect");
    let replies: Vec<(String, String, serde_json::Value)> = sqlx::query_as(
        "SELECT aggregatetype, type, headers FROM outbox WHERE aggregatetype = 'order.reply' \
         ORDER BY id",
    )
    .fetch_all(f.pool())
    .await
    .unwrap();
    // The duplicate is answered again with the same answer, marked as a replay.
    assert_eq!(replies.len(), 2, "{replies:?}");
    let (_, kind, headers) = &replies[0];
    assert_eq!(kind, "GoodsReserved");
    assert_eq!(headers["outcome"], "success");
    assert_eq!(headers["request-id"], goods.request_id.as_str());
    assert_eq!(headers["saga-id"], id.to_string().as_str());
    assert_eq!(headers.get("saga-replay"), None);
    let (_, kind, headers) = &replies[1];
    assert_eq!(kind, "GoodsReserved");
    assert_eq!(headers["saga-replay"], "true");

    // A compensation for a step that never ran here is a null compensation, and the
    // step arriving after it (hanging) is not run.
    let other = Sent {
        step: "reserve-credit".to_owned(),
        request_id: Uuid::now_v7().to_string(),
        compensation: true,
        ..goods.clone()
    };
    let mut tx = f.pool().begin().await.unwrap();
    saga_core::saga::participate(
        &mut tx,
        &outbox,
        &command_message(&other, "ReleaseCredit"),
        reserve,
    )
    .await
    .unwrap();
    let late = Sent {
        compensation: false,
        ..other
    };
    saga_core::saga::participate(
        &mut tx,
        &outbox,
        &command_message(&late, "ReserveCredit"),
        reserve,
    )
    .await
    .unwrap();
    tx.commit().await.unwrap();
    let effects: i64 = sqlx::query_scalar("SELECT count(*) FROM reservations")
        .fetch_one(f.pool())
        .await
        .unwrap();
    assert_eq!(
        effects, 1,
        "a null compensation or a hanging step had an effect"
    );
    let null: Vec<(String, serde_json::Value)> = sqlx::query_as(
        "SELECT type, headers FROM outbox WHERE aggregatetype = 'order.reply' AND headers->>'saga-step' = 'reserve-credit'",
    )
    .fetch_all(f.pool())
    .await
    .unwrap();
    assert_eq!(null.len(), 1, "{null:?}");
    assert_eq!(null[0].0, "ReleaseCreditSkipped");
    assert_eq!(null[0].1["outcome"], "success");
}

#[tokio::test]
async fn saga_admin_lists_counts_and_failed_sagas() {
    let f = Fixture::new(None).await;
    let id = f.start(order()).await;
    let run = |args: &[&str]| {
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_saga-admin"))
            .arg("--database-url")
            .arg(f.db.url())
            .args(args)
            .output()
            .expect("run saga-admin");
        assert!(output.status.success(), "{output:?}");
        String::from_utf8(output.stdout).unwrap()
    };
    let counts = run(&["counts"]);
    assert!(
        counts.contains("test-order")
            && counts.contains("STARTED")
            && counts.trim_end().ends_with('1'),
        "{counts}"
    );
    assert_eq!(run(&["failed"]), "no sagas\n");
    let stuck = run(&["stuck", "0"]);
    assert!(
        stuck.contains(&id.to_string()) && stuck.contains("reserve-goods"),
        "{stuck}"
    );
}

#[tokio::test]
async fn a_step_with_retries_is_sent_again_before_it_fails() {
    let f = Fixture::new(None).await;
    let retrying = SagaDefinition::<Order>::builder("test-order")
        .step("create")
        .invoke_local(create)
        .with_compensation(reject)
        .step("reserve-goods")
        .invoke_participant(|o: &Order| command("inventory.request", "ReserveGoods", o))
        .with_retries(1)
        .build()
        .unwrap();
    let orchestrator = f.orchestrator(retrying);
    let order = order();
    let id = start_saga(f.pool(), &orchestrator, order.clone()).await;

    let apply = |to: Sent| {
        let orchestrator = &orchestrator;
        let pool = f.pool().clone();
        async move {
            let mut tx = pool.begin().await.unwrap();
            let message = reply_message(&to, false, "GoodsBusy", serde_json::json!({}));
            let disposition = orchestrator.handle_reply(&mut tx, &message).await.unwrap();
            tx.commit().await.unwrap();
            disposition
        }
    };
    let first = f.last().await;
    assert_eq!(apply(first.clone()).await, ReplyDisposition::Applied);
    let second = f.last().await;
    assert_eq!(second.kind, "ReserveGoods");
    assert_ne!(
        second.request_id, first.request_id,
        "a retry is a new request"
    );
    assert_eq!(
        f.outcome(&orchestrator, id, &order).await,
        (SagaStatus::Started, Some("PENDING".to_owned()))
    );
    assert_eq!(apply(second).await, ReplyDisposition::Applied);
    assert_eq!(f.kinds().await, ["ReserveGoods", "ReserveGoods"]);
    assert_eq!(
        f.outcome(&orchestrator, id, &order).await,
        (SagaStatus::Aborted, Some("REJECTED".to_owned()))
    );
    f.assert_trail_rebuilds().await;
}

/// The participant's effect for the tests where it refuses: a command whose type
/// is listed in `refusals` is refused (and taken off the list: the next try finds
/// the world changed), any other is applied like [`reserve`].
fn reserve_unless_refused<'c>(
    tx: &'c mut PgConnection,
    command: &'c saga_core::saga::CommandEnvelope,
) -> saga_core::saga::Effect<'c> {
    Box::pin(async move {
        let refused = sqlx::query("DELETE FROM refusals WHERE kind = $1")
            .bind(&command.command_type)
            .execute(&mut *tx)
            .await
            .map_err(saga_core::consumer::HandlerError::transient)?
            .rows_affected()
            > 0;
        if refused {
            return Ok(saga_core::saga::ParticipantReply::failure(
                format!("{}Refused", command.command_type),
                serde_json::json!({}),
            ));
        }
        reserve(tx, command).await
    })
}

/// Runs `sent` through the participant's barrier with [`reserve_unless_refused`]
/// and hands its (latest) reply to `orchestrator`.
async fn round_trip(
    f: &Fixture,
    orchestrator: &Orchestrator<Order>,
    sent: &Sent,
) -> IncomingMessage {
    handle_with(f, sent, reserve_unless_refused).await;
    let reply = replies_in_outbox(f.pool())
        .await
        .pop()
        .expect("the participant answered");
    assert_eq!(
        reply.headers["request-id"], sent.request_id,
        "the answer is to this command"
    );
    assert_eq!(
        apply_reply(orchestrator, f.pool(), &reply).await,
        ReplyDisposition::Applied
    );
    reply
}

async fn refuse_next(f: &Fixture, kind: &str) {
    sqlx::query("INSERT INTO refusals (kind) VALUES ($1)")
        .bind(kind)
        .execute(f.pool())
        .await
        .unwrap();
}

/// A step the participant refused is sent again by `with_retries` as a new
/// attempt, which the participant's barrier lets run: the retry succeeds once the
/// participant's world changed. Redeliveries of either attempt run nothing.
#[tokio::test]
async fn a_refused_step_retried_runs_again_at_the_participant() {
    let f = Fixture::new(None).await;
    participant_tables(&f).await;
    let retrying = goods_saga(SagaDefinition::<Order>::builder("test-order"))
        .with_retries(1)
        .build()
        .unwrap();
    let orchestrator = f.orchestrator(retrying);
    let order = order();
    let id = start_saga(f.pool(), &orchestrator, order.clone()).await;

    refuse_next(&f, "ReserveGoods").await;
    let first = f.last().await;
    let refusal = round_trip(&f, &orchestrator, &first).await;
    assert_eq!(refusal.headers["outcome"], "failure");
    let second = f.last().await;
    assert_eq!(
        (second.kind.as_str(), second.attempt.as_str()),
        ("ReserveGoods", "2")
    );
    let answer = round_trip(&f, &orchestrator, &second).await;
    assert_eq!(answer.headers["outcome"], "success");
    assert_eq!(effects_of(&f).await, ["ReserveGoods"]);
    assert_eq!(
        f.outcome(&orchestrator, id, &order).await,
        (SagaStatus::Completed, Some("PENDING".to_owned()))
    );

    // Both attempts delivered again: duplicates, nothing runs twice.
    participant_handles(&f, &first).await;
    participant_handles(&f, &second).await;
    assert_eq!(effects_of(&f).await, ["ReserveGoods"]);
    let replies = replies_in_outbox(f.pool()).await;
    let replays: Vec<(&str, &str)> = replies[2..]
        .iter()
        .map(|r| {
            (
                r.headers["outcome"].as_str(),
                r.headers["saga-replay"].as_str(),
            )
        })
        .collect();
    // The row keeps the answer of the attempt that succeeded; the late copy of the
    // refused attempt gets it too, under its own (stale) request id.
    assert_eq!(replays, [("success", "true"), ("success", "true")]);
    for reply in &replies[2..] {
        assert_eq!(
            apply_reply(&orchestrator, f.pool(), reply).await,
            ReplyDisposition::Stale
        );
    }
    f.assert_trail_rebuilds().await;
}

/// A compensation the participant refused is tried again after its backoff as a
/// new attempt, which runs: the saga is `ABORTED` with the step undone once.
#[tokio::test]
async fn a_refused_compensation_retried_runs_again_at_the_participant() {
    let f = Fixture::new(None).await;
    participant_tables(&f).await;
    let id = f.start(order()).await;
    let goods = f.last().await;
    round_trip(&f, &f.orchestrator, &goods).await;
    refuse_next(&f, "ReserveCredit").await;
    refuse_next(&f, "ReleaseGoods").await;
    round_trip(&f, &f.orchestrator, &f.last().await).await;
    let release = f.last().await;
    assert_eq!(
        (release.kind.as_str(), release.attempt.as_str()),
        ("ReleaseGoods", "1")
    );
    round_trip(&f, &f.orchestrator, &release).await;
    assert_eq!(f.status(id).await, SagaStatus::Aborting);
    assert_eq!(
        f.sweep_after(&f.orchestrator, COMPENSATION_BACKOFF).await,
        1
    );
    let again = f.last().await;
    assert_eq!(
        (again.kind.as_str(), again.attempt.as_str()),
        ("ReleaseGoods", "2")
    );
    let answer = round_trip(&f, &f.orchestrator, &again).await;
    assert_eq!(answer.headers["outcome"], "success");
    assert_eq!(f.status(id).await, SagaStatus::Aborted);
    assert_eq!(effects_of(&f).await, ["ReleaseGoods", "ReserveGoods"]);
    f.assert_trail_rebuilds().await;
}

/// The participant's tables: the effects it applied (`reservations`) and the
/// command types it is to refuse once (`refusals`).
async fn participant_tables(f: &Fixture) {
    sqlx::raw_sql(
        "CREATE TABLE reservations (saga_id text, note text); CREATE TABLE refusals (kind text)",
    )
    .execute(f.pool())
    .await
    .unwrap();
}

/// The commands in the outbox, in order (not the participant's replies: `reserve`
/// answers `GoodsReserved`).
async fn commands_in_outbox(f: &Fixture) -> Vec<Sent> {
    f.sent()
        .await
        .into_iter()
        .filter(|s| !s.kind.starts_with("Goods"))
        .collect()
}

/// Handles `sent` as the participant, with its barrier, in a transaction of its own.
async fn participant_handles(f: &Fixture, sent: &Sent) {
    handle_with(f, sent, reserve).await;
}

async fn effects_of(f: &Fixture) -> Vec<String> {
    sqlx::query_scalar("SELECT note FROM reservations ORDER BY note")
        .fetch_all(f.pool())
        .await
        .unwrap()
}

#[tokio::test]
async fn a_step_resent_after_a_timeout_completes_when_the_participant_answers_the_duplicate() {
    let f = Fixture::new(None).await;
    participant_tables(&f).await;
    let retrying = goods_saga(SagaDefinition::<Order>::builder("test-order"))
        .with_timeout(STEP_TIMEOUT)
        .with_retries(1)
        .build()
        .unwrap();
    let orchestrator = f.orchestrator(retrying);
    let order = order();
    let id = start_saga(f.pool(), &orchestrator, order.clone()).await;

    // The participant applies the command, but its reply is slower than the timeout.
    let first = f.last().await;
    participant_handles(&f, &first).await;
    assert_eq!(f.sweep_after(&orchestrator, STEP_TIMEOUT).await, 1);
    let commands = commands_in_outbox(&f).await;
    assert_eq!(commands.len(), 2, "{commands:?}");
    let second = commands[1].clone();
    assert_eq!(second.kind, "ReserveGoods");
    assert_ne!(second.request_id, first.request_id);

    // The resend is a duplicate at the participant: answered again, not applied again.
    participant_handles(&f, &second).await;
    assert_eq!(effects_of(&f).await, ["ReserveGoods"]);
    let replies = replies_in_outbox(f.pool()).await;
    assert_eq!(replies.len(), 2, "the resend was not answered");
    assert_eq!(
        apply_reply(&orchestrator, f.pool(), &replies[0]).await,
        ReplyDisposition::Stale,
        "the first attempt's reply came too late"
    );
    assert_eq!(
        apply_reply(&orchestrator, f.pool(), &replies[1]).await,
        ReplyDisposition::Applied
    );
    assert_eq!(
        f.outcome(&orchestrator, id, &order).await,
        (SagaStatus::Completed, Some("PENDING".to_owned()))
    );
    f.assert_trail_rebuilds().await;
}

#[tokio::test]
async fn a_compensation_resent_after_its_timeout_is_answered_and_the_saga_aborts() {
    let f = Fixture::new(None).await;
    participant_tables(&f).await;
    let compensating = goods_saga(
        SagaDefinition::<Order>::builder("test-order").compensation_retry(COMPENSATION_RETRY),
    )
    .with_timeout(STEP_TIMEOUT)
    .build()
    .unwrap();
    let orchestrator = f.orchestrator(compensating);
    let order = order();
    let id = start_saga(f.pool(), &orchestrator, order.clone()).await;

    // The step is applied and times out; its compensation is applied and times out.
    participant_handles(&f, &f.last().await).await;
    assert_eq!(f.sweep_after(&orchestrator, STEP_TIMEOUT).await, 1);
    let release = f.last().await;
    assert_eq!(
        (release.kind.as_str(), release.compensation),
        ("ReleaseGoods", true)
    );
    participant_handles(&f, &release).await;
    // A compensation's timeout is its step's.
    assert_eq!(f.sweep_after(&orchestrator, STEP_TIMEOUT).await, 1);
    // After the backoff the compensation is sent again, under a new request id.
    assert_eq!(f.sweep_after(&orchestrator, COMPENSATION_BACKOFF).await, 1);
    let resent = f.last().await;
    assert_eq!(
        (resent.kind.as_str(), resent.compensation),
        ("ReleaseGoods", true)
    );
    assert_ne!(resent.request_id, release.request_id);

    participant_handles(&f, &resent).await;
    assert_eq!(effects_of(&f).await, ["ReleaseGoods", "ReserveGoods"]);
    let replies = replies_in_outbox(f.pool()).await;
    assert_eq!(replies.len(), 3, "the resent compensation was not answered");
    let mut dispositions = Vec::new();
    for reply in &replies {
        dispositions.push(apply_reply(&orchestrator, f.pool(), reply).await);
    }
    assert_eq!(
        dispositions,
        [
            ReplyDisposition::Stale,
            ReplyDisposition::Stale,
            ReplyDisposition::Applied
        ]
    );
    assert_eq!(
        f.outcome(&orchestrator, id, &order).await,
        (SagaStatus::Aborted, Some("REJECTED".to_owned()))
    );
    f.assert_trail_rebuilds().await;
}

/// A saga that cannot be read any more (its data no longer fits the definition: a
/// bad deploy, a hand edit) never stops the sweep: every other saga whose deadline
/// passed is handled, and the bad one is skipped and reported, however early its
/// deadline.
#[tokio::test]
async fn a_saga_that_cannot_be_read_is_skipped_and_the_sweep_goes_on() {
    let fixture = Fixture::new(Some(STEP_TIMEOUT)).await;
    let bad = fixture.start(order()).await;
    fixture.clock.advance(Duration::from_secs(1));
    let good = fixture.start(order()).await;
    sqlx::query("UPDATE saga_state SET payload = '\"not an order\"' WHERE id = $1")
        .bind(bad)
        .execute(fixture.pool())
        .await
        .unwrap();

    fixture.clock.advance(STEP_TIMEOUT);
    let handled = fixture
        .orchestrator
        .sweep(fixture.pool(), 100)
        .await
        .expect("one bad saga does not fail the sweep");
    assert_eq!(handled, 1, "the good saga's timeout was handled");
    assert_eq!(fixture.status(good).await, SagaStatus::Aborting);
    let skipped = fixture.orchestrator.skipped_sagas();
    assert_eq!(skipped.len(), 1, "{skipped:?}");
    assert_eq!(skipped[0].0, bad);

    // Skipped, it no longer takes a place among the sweep's first `limit` sagas:
    // its deadline is still the oldest, so a sweep of one that picked it again would
    // handle nothing.
    fixture.start(order()).await;
    fixture.clock.advance(STEP_TIMEOUT);
    assert_eq!(
        fixture.orchestrator.sweep(fixture.pool(), 1).await.unwrap(),
        1
    );
}

#[tokio::test]
async fn the_trail_tells_what_happened_to_a_saga_in_order() {
    let f = Fixture::new(None).await;
    let id = f.start(order()).await;
    let goods = f.last().await;
    f.ok(&goods).await;
    // The goods reply again (a redelivery the journal missed): stale.
    let again = f
        .reply(&goods, true, "ReserveGoodsDone", serde_json::json!({}))
        .await
        .unwrap();
    assert_eq!(again, ReplyDisposition::Stale);
    f.clock.advance(Duration::from_secs(1));
    let credit = f.last().await;
    let refused = serde_json::json!({"available": 5});
    f.reply(&credit, false, "CreditLimitExceeded", refused)
        .await
        .unwrap();
    let release_goods = f.last().await;
    f.ok(&release_goods).await;
    assert_eq!(f.status(id).await, SagaStatus::Aborted);

    let mut conn = f.db.connect().await;
    let events = audit::events(&mut conn, id).await.unwrap();
    let seen: Vec<(i32, &str, &str)> = events
        .iter()
        .map(|e| (e.version, e.kind.as_str(), e.step.as_deref().unwrap_or("-")))
        .collect();
    assert_eq!(
        seen,
        [
            (1, "saga_started", "-"),
            (1, "step_succeeded", "create"),
            (1, "step_started", "reserve-goods"),
            (1, "command_sent", "reserve-goods"),
            (2, "reply_received", "reserve-goods"),
            (2, "step_succeeded", "reserve-goods"),
            (2, "step_started", "reserve-credit"),
            (2, "command_sent", "reserve-credit"),
            (2, "reply_received", "reserve-goods"),
            (3, "reply_received", "reserve-credit"),
            (3, "step_failed", "reserve-credit"),
            (3, "compensation_started", "reserve-goods"),
            (3, "command_sent", "reserve-goods"),
            (3, "status_changed", "-"),
            (4, "reply_received", "reserve-goods"),
            (4, "compensation_done", "reserve-goods"),
            (4, "compensation_started", "create"),
            (4, "compensation_done", "create"),
            (4, "status_changed", "-"),
        ]
    );
    // What each says.
    assert_eq!(events[8].detail["applied"], false, "{:?}", events[8]);
    assert_eq!(events[4].detail["applied"], true);
    assert_eq!(events[4].detail["outcome"], "success");
    assert_eq!(events[9].detail["outcome"], "failure");
    assert_eq!(events[10].detail["reason"], "CreditLimitExceeded");
    assert_eq!(events[10].detail["timed_out"], false);
    assert_eq!(events[12].detail["compensation"], true);
    assert_eq!(events[12].detail["type"], "ReleaseGoods");
    assert_eq!(
        (&events[13].detail["from"], &events[13].detail["to"]),
        (
            &serde_json::json!("STARTED"),
            &serde_json::json!("ABORTING")
        )
    );
    assert_eq!(events[18].detail["to"], "ABORTED");
    // Every command sent is a row of the outbox, by id and request id.
    let outbox: Vec<(Uuid, serde_json::Value)> =
        sqlx::query_as("SELECT id, headers FROM outbox ORDER BY id")
            .fetch_all(f.pool())
            .await
            .unwrap();
    let sent: Vec<(String, String)> = events
        .iter()
        .filter(|e| e.kind == "command_sent")
        .map(|e| {
            (
                e.detail["message_id"].as_str().unwrap().to_owned(),
                e.detail["request_id"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let rows: Vec<(String, String)> = outbox
        .iter()
        .map(|(id, headers)| {
            (
                id.to_string(),
                headers["request-id"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(sent, rows);
    // The changes sit on the first event of each transaction, and nowhere else;
    // the stale reply changed nothing.
    for (i, e) in events.iter().enumerate() {
        let first = i == 0 || events[i - 1].version != e.version;
        assert_eq!(e.changes.is_some(), first && i != 8, "{i}: {e:?}");
    }
    // The events' times come from the orchestrator's clock.
    assert_eq!(events[9].at, events[13].at);
    assert_eq!(
        (events[9].at - events[8].at).to_std().unwrap(),
        Duration::from_secs(1)
    );
    f.assert_trail_rebuilds().await;
}

#[tokio::test]
async fn an_operator_action_is_recorded_with_who_took_it() {
    let f = Fixture::new(None).await;
    let id = f.start(order()).await;
    SagaAdmin::new(f.pool().clone())
        .acting_as("alice")
        .abort(&f.orchestrator, id, "customer called")
        .await
        .unwrap();
    let mut conn = f.db.connect().await;
    let events = audit::events(&mut conn, id).await.unwrap();
    let action = events
        .iter()
        .find(|e| e.kind == "operator_action")
        .expect("the abort is in the trail");
    assert_eq!(action.detail["actor"], "alice");
    assert_eq!(action.detail["action"], "abort");
    assert_eq!(action.detail["reason"], "customer called");
    assert_eq!(action.step.as_deref(), Some("reserve-goods"));
    assert!(action.changes.is_some());
    f.assert_trail_rebuilds().await;

    // The operator's commands: one saga's trail, and every saga rebuilt.
    let admin = SagaAdmin::new(f.pool().clone());
    let text = cli::run(&admin, &f.orchestrator, cli::SagaCommand::Trail { id })
        .await
        .unwrap();
    assert!(
        text.contains("operator_action") && text.contains("alice"),
        "{text}"
    );
    assert_eq!(text.lines().count(), events.len(), "{text}");
    let text = cli::run(&admin, &f.orchestrator, cli::SagaCommand::VerifyTrail)
        .await
        .unwrap();
    assert!(text.starts_with("1 saga rebuilt from"), "{text}");
    assert!(text.contains("1 match saga_state, 0 differ"), "{text}");
    // A row changed behind the orchestrator's back no longer matches its trail.
    sqlx::query("UPDATE saga_state SET status = 'COMPLETED' WHERE id = $1")
        .bind(id)
        .execute(f.pool())
        .await
        .unwrap();
    let err = cli::run(&admin, &f.orchestrator, cli::SagaCommand::VerifyTrail)
        .await
        .unwrap_err();
    assert!(matches!(err, SagaError::Trail(_)), "{err}");
    assert!(
        err.to_string().contains(&format!("{id}: status differ")),
        "{err}"
    );
}

#[tokio::test]
async fn an_operator_sends_the_awaited_step_again_as_a_new_attempt() {
    let f = Fixture::new(None).await;
    let id = f.start(order()).await;
    let first = f.last().await;
    let admin = SagaAdmin::new(f.pool().clone()).acting_as("carol");
    admin.retry_step(&f.orchestrator, id).await.unwrap();
    let second = f.last().await;
    assert_eq!(
        (
            second.kind.as_str(),
            second.step.as_str(),
            second.attempt.as_str()
        ),
        ("ReserveGoods", "reserve-goods", "2")
    );
    assert_ne!(second.request_id, first.request_id);
    assert_eq!(f.status(id).await, SagaStatus::Started);
    // The reply to the first attempt is stale now; the second one's moves on.
    let late = f
        .reply(&first, true, "ReserveGoodsDone", serde_json::json!({}))
        .await
        .unwrap();
    assert_eq!(late, ReplyDisposition::Stale);
    f.ok(&second).await;
    let credit = f.last().await;
    assert_eq!(credit.kind, "ReserveCredit");
    f.ok(&credit).await;
    assert_eq!(f.status(id).await, SagaStatus::Completed);
    // A saga that waits for nothing cannot have a step sent again.
    let refused = admin.retry_step(&f.orchestrator, id).await.unwrap_err();
    assert!(refused.to_string().contains("is COMPLETED"), "{refused}");

    let mut conn = f.db.connect().await;
    let events = audit::events(&mut conn, id).await.unwrap();
    let actions: Vec<_> = events
        .iter()
        .filter(|e| e.kind == "operator_action")
        .collect();
    assert_eq!(actions.len(), 1, "a refused action leaves nothing");
    assert_eq!(actions[0].detail["action"], "retry_step");
    assert_eq!(actions[0].detail["actor"], "carol");
    assert_eq!(actions[0].step.as_deref(), Some("reserve-goods"));
    f.assert_trail_rebuilds().await;
}

#[tokio::test]
async fn a_step_not_waiting_for_a_participant_is_not_sent_again() {
    let f = Fixture::new(None).await;
    let id = f.start(order()).await;
    let goods = f.last().await;
    // The goods step is refused: the saga compensates (ABORTING, waiting on
    // nothing forward).
    f.reply(&goods, false, "InsufficientStock", serde_json::json!({}))
        .await
        .unwrap();
    let admin = SagaAdmin::new(f.pool().clone());
    let refused = admin.retry_step(&f.orchestrator, id).await.unwrap_err();
    assert!(matches!(refused, SagaError::Invalid { .. }), "{refused}");
    assert_eq!(f.kinds().await, ["ReserveGoods"]);
    f.assert_trail_rebuilds().await;
}
