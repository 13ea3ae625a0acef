//! Versioned saga definitions against a real database: sagas in flight when the
//! orchestrator is restarted with a new version of their definition finish on
//! their own version's steps (the code keeps the old version) or move onto the new
//! one through its declared step map; a saga on a version the code cannot drive is
//! never driven, its replies are held (not lost), and it is listed with the reason.
//!
//! Commands go through a real participant (its barrier and outbox), whose effects
//! are kept as holds: an action adds one under the step name its command carried,
//! a compensation removes it. Time is a [`ManualClock`].

mod support;

use std::collections::{BTreeSet, HashSet};
use std::ops::Deref;
use std::time::Duration;

use saga_core::consumer::MessageHandler;
use saga_core::saga::{
    audit, cli, CommandEnvelope, CompensationRetry, Effect, Orchestrator, ParticipantReply,
    ReplyDisposition, SagaAdmin, SagaDefinition, StepMap, StuckReason, StuckRules,
};
use saga_core::status::SagaStatus;
use sqlx::PgConnection;
use support::{
    apply_reply, approve, command, create, credit_and_approve, goods_steps, handle_with, order,
    reject, start_saga, Order, SagaDb, Sent, STEP_TIMEOUT,
};
use uuid::Uuid;

/// Compensations are retried from 5 s, doubling up to 20 s, for 10 minutes.
const COMPENSATION_RETRY: CompensationRetry = CompensationRetry {
    first_backoff: Duration::from_secs(5),
    max_backoff: Duration::from_secs(20),
    give_up_after: Duration::from_secs(600),
};

/// Version 1: create → reserve (goods) → reserve-credit → approve. The goods step
/// times out after [`STEP_TIMEOUT`], the credit step never.
fn version1() -> SagaDefinition<Order> {
    let builder =
        SagaDefinition::<Order>::builder("test-order").compensation_retry(COMPENSATION_RETRY);
    credit_and_approve(goods_steps(builder, "reserve", "ReleaseGoods").with_timeout(STEP_TIMEOUT))
}

/// Version 2: `reserve` is renamed `reserve-goods` (and undone by another command,
/// `CancelReservation`), and `check-fraud` (with a timeout too) is added after it.
/// With `migrate`, it declares how sagas of version 1 move onto it.
fn version2(migrate: bool) -> SagaDefinition<Order> {
    let builder = SagaDefinition::<Order>::builder("test-order").version(2);
    let builder = if migrate {
        builder.migrate_from(
            1,
            StepMap::new()
                .rename("reserve", "reserve-goods")
                .added("check-fraud"),
        )
    } else {
        builder
    };
    let builder = goods_steps(
        builder.compensation_retry(COMPENSATION_RETRY),
        "reserve-goods",
        "CancelReservation",
    )
    .with_timeout(STEP_TIMEOUT)
    .step("check-fraud")
    .invoke_participant(|o: &Order| command("fraud.request", "CheckFraud", o))
    .with_timeout(STEP_TIMEOUT);
    credit_and_approve(builder)
}

/// The test's database and clock, with the participant's tables: its effects
/// (`holds`) and the commands it is to refuse once (`refusals`).
struct Fixture {
    base: SagaDb,
    /// Request ids of the commands the participant has handled.
    handled: HashSet<String>,
}

impl Deref for Fixture {
    type Target = SagaDb;

    fn deref(&self) -> &SagaDb {
        &self.base
    }
}

impl Fixture {
    async fn new() -> Fixture {
        let base = SagaDb::new(
            "CREATE TABLE holds (saga_id text, branch text, kind text); \
             CREATE TABLE refusals (saga_id text, kind text, reply text)",
        )
        .await;
        Fixture {
            base,
            handled: HashSet::new(),
        }
    }

    /// Starts a saga of `orchestrator` for a new order; its id and the order's.
    async fn start(&self, orchestrator: &Orchestrator<Order>) -> (Uuid, Uuid) {
        let order = order();
        let id = start_saga(self.pool(), orchestrator, order.clone()).await;
        (id, order.order_id)
    }

    /// The participant refuses `saga`'s next command `kind`, replying `reply`.
    async fn refuse(&self, saga: Uuid, kind: &str, reply: &str) {
        sqlx::query("INSERT INTO refusals (saga_id, kind, reply) VALUES ($1, $2, $3)")
            .bind(saga.to_string())
            .bind(kind)
            .bind(reply)
            .execute(self.pool())
            .await
            .unwrap();
    }

    /// The commands of saga `id` not handled yet.
    async fn pending(&self, id: Uuid) -> Vec<Sent> {
        self.commands()
            .await
            .into_iter()
            .filter(|c| c.saga_id == id.to_string() && !self.handled.contains(&c.request_id))
            .collect()
    }

    /// The participant handles `sent` (barrier, effect, reply in its outbox); its
    /// reply is handed to `orchestrator` as the reply consumer would.
    async fn deliver(
        &mut self,
        orchestrator: &Orchestrator<Order>,
        sent: &Sent,
    ) -> ReplyDisposition {
        self.handled.insert(sent.request_id.clone());
        handle_with(self, sent, effect).await;
        let reply = self.reply_to(sent).await;
        apply_reply(orchestrator, self.pool(), &reply).await
    }

    /// [`Fixture::deliver`]s the first pending command of saga `id`.
    async fn answer_next(
        &mut self,
        orchestrator: &Orchestrator<Order>,
        id: Uuid,
    ) -> ReplyDisposition {
        let sent = self.pending(id).await.remove(0);
        self.deliver(orchestrator, &sent).await
    }

    /// Delivers every pending command of `sagas`, and lets due deadlines pass
    /// (compensation retries: no command is left unanswered, so no step times
    /// out), until every saga ended.
    async fn run_to_the_end(&mut self, orchestrator: &Orchestrator<Order>, sagas: &[Uuid]) {
        for _ in 0..100 {
            let pending: Vec<Sent> = self
                .commands()
                .await
                .into_iter()
                .filter(|c| !self.handled.contains(&c.request_id))
                .collect();
            for sent in &pending {
                let disposition = self.deliver(orchestrator, sent).await;
                assert_eq!(disposition, ReplyDisposition::Applied, "{sent:?}");
            }
            if pending.is_empty() {
                let mut running = 0;
                for id in sagas {
                    running += usize::from(!self.status(orchestrator, *id).await.is_terminal());
                }
                if running == 0 {
                    return;
                }
                self.clock.advance(COMPENSATION_RETRY.max_backoff);
                let handled = orchestrator.sweep(self.pool(), 100).await.unwrap();
                assert!(handled > 0, "{running} sagas wait for nothing");
            }
        }
        panic!("the sagas did not end");
    }

    /// The participant's effects that were not undone for saga `id`, by the step
    /// name its commands carried.
    async fn holds(&self, id: Uuid) -> BTreeSet<String> {
        sqlx::query_scalar("SELECT branch FROM holds WHERE saga_id = $1")
            .bind(id.to_string())
            .fetch_all(self.pool())
            .await
            .unwrap()
            .into_iter()
            .collect()
    }
}

/// The participant's effect: refuses a command listed in `refusals` (once), else
/// holds for an action and releases the hold for a compensation.
fn effect<'c>(tx: &'c mut PgConnection, command: &'c CommandEnvelope) -> Effect<'c> {
    Box::pin(async move {
        let transient = saga_core::consumer::HandlerError::transient;
        let refusal: Option<String> = sqlx::query_scalar(
            "DELETE FROM refusals WHERE ctid = (SELECT ctid FROM refusals \
             WHERE saga_id = $1 AND kind = $2 LIMIT 1) RETURNING reply",
        )
        .bind(&command.saga_id)
        .bind(&command.command_type)
        .fetch_optional(&mut *tx)
        .await
        .map_err(transient)?;
        if let Some(reply) = refusal {
            return Ok(ParticipantReply::failure(
                reply,
                serde_json::json!({"available": 0}),
            ));
        }
        if command.compensation {
            let undone = sqlx::query("DELETE FROM holds WHERE saga_id = $1 AND branch = $2")
                .bind(&command.saga_id)
                .bind(&command.step)
                .execute(&mut *tx)
                .await
                .map_err(transient)?;
            assert_eq!(undone.rows_affected(), 1, "undid nothing: {command:?}");
        } else {
            sqlx::query("INSERT INTO holds (saga_id, branch, kind) VALUES ($1, $2, $3)")
                .bind(&command.saga_id)
                .bind(&command.step)
                .bind(&command.command_type)
                .execute(&mut *tx)
                .await
                .map_err(transient)?;
        }
        Ok(ParticipantReply::success(
            format!("{}Done", command.command_type),
            serde_json::json!({}),
        ))
    })
}

/// What a saga's commands were: type, step (as the participant saw it), whether a
/// compensation, attempt.
fn shape(commands: &[Sent], id: Uuid) -> Vec<(String, String, bool, String)> {
    commands
        .iter()
        .filter(|c| c.saga_id == id.to_string())
        .map(|c| {
            (
                c.kind.clone(),
                c.step.clone(),
                c.compensation,
                c.attempt.clone(),
            )
        })
        .collect()
}

fn cmd(kind: &str, step: &str, compensation: bool, attempt: u32) -> (String, String, bool, String) {
    (
        kind.to_owned(),
        step.to_owned(),
        compensation,
        attempt.to_string(),
    )
}

/// The sagas of version 1 in flight when the code is restarted.
struct InFlight {
    /// Waiting for the goods reply.
    waiting_goods: Vec<(Uuid, Uuid)>,
    /// Goods reserved, waiting for the credit reply.
    waiting_credit: Vec<(Uuid, Uuid)>,
    /// Credit refused, waiting for the goods' compensation reply.
    compensating: Vec<(Uuid, Uuid)>,
    /// Credit refused, the goods' compensation refused once: waiting for its retry.
    retrying: Vec<(Uuid, Uuid)>,
}

/// Fifty sagas started on version 1 and left mid-way in four places.
async fn fifty_on_version1(f: &mut Fixture) -> InFlight {
    let v1 = f.orchestrator(version1());
    let mut started = Vec::new();
    for _ in 0..50 {
        started.push(f.start(&v1).await);
    }
    let mut groups = started.chunks(25).map(<[_]>::to_vec);
    let (first, second) = (groups.next().unwrap(), groups.next().unwrap());
    let (waiting_goods, waiting_credit) = first.split_at(12);
    let (compensating, retrying) = second.split_at(13);
    for (id, _) in waiting_credit.iter().chain(compensating).chain(retrying) {
        assert_eq!(f.answer_next(&v1, *id).await, ReplyDisposition::Applied);
    }
    for (id, _) in compensating.iter().chain(retrying) {
        f.refuse(*id, "ReserveCredit", "CreditLimitExceeded").await;
        assert_eq!(f.answer_next(&v1, *id).await, ReplyDisposition::Applied);
    }
    for (id, _) in retrying {
        f.refuse(*id, "ReleaseGoods", "ReleaseGoodsRefused").await;
        assert_eq!(f.answer_next(&v1, *id).await, ReplyDisposition::Applied);
    }
    for (id, _) in &started {
        let running = f.status(&v1, *id).await;
        assert!(!running.is_terminal(), "{id} ended before the restart");
    }
    InFlight {
        waiting_goods: waiting_goods.to_vec(),
        waiting_credit: waiting_credit.to_vec(),
        compensating: compensating.to_vec(),
        retrying: retrying.to_vec(),
    }
}

/// The acceptance test, in both ways a new version can take over: 50
/// sagas started on version 1 (12 waiting for goods, 13 for credit, 13
/// compensating, 12 waiting to retry a compensation) and 10 started on version 2
/// after the restart all end as they should, each having sent exactly the commands
/// of the version it ran, every participant effect of an aborted saga undone, and
/// every trail rebuilding its saga.
async fn fifty_sagas_survive_a_new_version(migrate: bool) {
    let mut f = Fixture::new().await;
    let old = fifty_on_version1(&mut f).await;

    // The restart: the code now runs version 2, and keeps version 1 or migrates it.
    let v2 = if migrate {
        f.orchestrator(version2(true))
    } else {
        f.orchestrator(version2(false))
            .with_previous(version1())
            .expect("version 1 is older")
    };
    assert_eq!(v2.check_versions(f.pool()).await.unwrap(), 0);
    let mut new = Vec::new();
    for i in 0..10 {
        let (id, order) = f.start(&v2).await;
        if i >= 7 {
            f.refuse(id, "ReserveCredit", "CreditLimitExceeded").await;
        }
        new.push((id, order));
    }
    let all: Vec<Uuid> = [
        &old.waiting_goods,
        &old.waiting_credit,
        &old.compensating,
        &old.retrying,
        &new,
    ]
    .into_iter()
    .flatten()
    .map(|(id, _)| *id)
    .collect();
    assert_eq!(all.len(), 60);
    f.run_to_the_end(&v2, &all).await;

    let commands = f.commands().await;
    let goods = cmd("ReserveGoods", "reserve", false, 1);
    let credit = cmd("ReserveCredit", "reserve-credit", false, 1);
    let fraud = cmd("CheckFraud", "check-fraud", false, 1);
    let release = |attempt| cmd("ReleaseGoods", "reserve", true, attempt);
    let set =
        |names: &[&str]| -> BTreeSet<String> { names.iter().map(|n| (*n).to_owned()).collect() };
    // (sagas, end, order, commands, holds left, definition version at the end)
    let expected = [
        (
            &old.waiting_goods,
            SagaStatus::Completed,
            "APPROVED",
            if migrate {
                // Moved onto version 2 before the fraud check: it runs it.
                vec![goods.clone(), fraud.clone(), credit.clone()]
            } else {
                vec![goods.clone(), credit.clone()]
            },
            if migrate {
                set(&["reserve", "check-fraud", "reserve-credit"])
            } else {
                set(&["reserve", "reserve-credit"])
            },
        ),
        (
            &old.waiting_credit,
            SagaStatus::Completed,
            "APPROVED",
            // Past the fraud check's place when moved: skipped.
            vec![goods.clone(), credit.clone()],
            set(&["reserve", "reserve-credit"]),
        ),
        (
            &old.compensating,
            SagaStatus::Aborted,
            "REJECTED",
            vec![goods.clone(), credit.clone(), release(1)],
            set(&[]),
        ),
        (
            &old.retrying,
            SagaStatus::Aborted,
            "REJECTED",
            vec![
                goods.clone(),
                credit.clone(),
                release(1),
                if migrate {
                    // Version 2's compensation, under the name the participant
                    // knows the step by.
                    cmd("CancelReservation", "reserve", true, 2)
                } else {
                    release(2)
                },
            ],
            set(&[]),
        ),
    ];
    for (sagas, end, order_status, sent, holds) in &expected {
        for (id, order) in *sagas {
            assert_eq!(f.status(&v2, *id).await, *end, "{id}");
            assert_eq!(
                f.order_status(*order).await.as_deref(),
                Some(*order_status),
                "{id}"
            );
            assert_eq!(shape(&commands, *id), *sent, "{id}");
            assert_eq!(f.holds(*id).await, *holds, "{id}");
            let mut conn = f.db.connect().await;
            let version = v2.load(&mut conn, *id).await.unwrap().definition_version;
            assert_eq!(version, if migrate { 2 } else { 1 }, "{id}");
            let events = audit::events(&mut conn, *id).await.unwrap();
            let moves: Vec<_> = events
                .iter()
                .filter(|e| e.kind == "definition_migrated")
                .collect();
            assert_eq!(moves.len(), usize::from(migrate), "{id}: {moves:?}");
            if let Some(moved) = moves.first() {
                assert_eq!(
                    (&moved.detail["from"], &moved.detail["to"]),
                    (&serde_json::json!(1), &serde_json::json!(2))
                );
                assert_eq!(moved.detail["renamed"]["reserve"], "reserve-goods");
                assert!(
                    moved.changes.is_some(),
                    "the move is the transaction's first event"
                );
            }
        }
    }
    for (i, (id, order)) in new.iter().enumerate() {
        let v2_goods = cmd("ReserveGoods", "reserve-goods", false, 1);
        let refused = i >= 7;
        let mut sent = vec![v2_goods, fraud.clone(), credit.clone()];
        if refused {
            sent.push(cmd("CancelReservation", "reserve-goods", true, 1));
        }
        assert_eq!(shape(&commands, *id), sent, "{id}");
        let (end, order_status, holds) = if refused {
            (SagaStatus::Aborted, "REJECTED", set(&["check-fraud"]))
        } else {
            (
                SagaStatus::Completed,
                "APPROVED",
                set(&["reserve-goods", "check-fraud", "reserve-credit"]),
            )
        };
        assert_eq!(f.status(&v2, *id).await, end);
        assert_eq!(f.order_status(*order).await.as_deref(), Some(order_status));
        assert_eq!(f.holds(*id).await, holds);
        let mut conn = f.db.connect().await;
        assert_eq!(v2.load(&mut conn, *id).await.unwrap().definition_version, 2);
    }
    assert_eq!(v2.unknown_version_sagas(), []);
    assert_eq!(v2.skipped_sagas(), []);
    f.assert_trail_rebuilds().await;
}

#[tokio::test]
async fn fifty_sagas_in_flight_finish_on_version_1_when_version_2_keeps_it() {
    fifty_sagas_survive_a_new_version(false).await;
}

#[tokio::test]
async fn fifty_sagas_in_flight_move_onto_version_2_through_its_step_map() {
    fifty_sagas_survive_a_new_version(true).await;
}

/// A step renamed by a deploy while a saga waits on it: the reply to the command
/// sent under the old name is applied and the saga goes on under the new version.
/// Before definitions had versions the reply was stale (no step of that name) and
/// the sweeper skipped the saga for good ("unknown step reserve").
#[tokio::test]
async fn a_renamed_step_does_not_wedge_a_saga_waiting_on_it() {
    let mut f = Fixture::new().await;
    let v1 = f.orchestrator(version1());
    let (id, _) = f.start(&v1).await;
    let goods = f.pending(id).await.remove(0);
    assert_eq!(goods.step, "reserve");

    let v2 = f.orchestrator(version2(true));
    assert_eq!(f.deliver(&v2, &goods).await, ReplyDisposition::Applied);
    let mut conn = f.db.connect().await;
    let saga = v2.load(&mut conn, id).await.unwrap();
    assert_eq!(saga.definition_version, 2);
    assert_eq!(saga.current_step.as_deref(), Some("check-fraud"));
    assert_eq!(saga.status, SagaStatus::Started);
    // Its deadline is the new step's, and the sweeper handles it.
    f.clock.advance(STEP_TIMEOUT);
    assert_eq!(v2.sweep(f.pool(), 10).await.unwrap(), 1);
    assert_eq!(v2.skipped_sagas(), []);
    let saga = v2.load(&mut conn, id).await.unwrap();
    assert_eq!(saga.status, SagaStatus::Aborting);
    f.assert_trail_rebuilds().await;
}

/// A saga on a version the running code does not know (a rollback of the deploy
/// that started it) is not driven: its reply is held, not applied and not lost,
/// its deadline waits, and it is listed, also as stuck with the reason. Code that
/// knows the version again applies the held reply and the saga goes on.
#[tokio::test]
async fn a_saga_on_an_unknown_version_is_held_listed_and_resumed_by_code_that_knows_it() {
    let mut f = Fixture::new().await;
    let deployed = f
        .orchestrator(version2(false))
        .with_previous(version1())
        .unwrap();
    let (newer, _) = f.start(&deployed).await;
    let goods = f.pending(newer).await.remove(0);

    // The rollback: the code knows version 1 only.
    let rolled_back = f.orchestrator(version1());
    let (older, _) = f.start(&rolled_back).await;
    // This one's command never reaches its participant: it will time out.
    let lost = f.pending(older).await.remove(0);
    f.handled.insert(lost.request_id);
    let reason = "definition version 2 unknown (this code knows 1)";
    assert_eq!(rolled_back.check_versions(f.pool()).await.unwrap(), 1);
    assert_eq!(
        rolled_back.unknown_version_sagas(),
        [(newer, reason.to_owned())]
    );

    // The participant answers; the reply consumer's handler keeps the reply and
    // succeeds, so its journal row commits and the partition moves on.
    f.handled.insert(goods.request_id.clone());
    handle_with(&f, &goods, effect).await;
    let reply = f.reply_to(&goods).await;
    let mut tx = f.pool().begin().await.unwrap();
    let disposition = rolled_back.handle_reply(&mut tx, &reply).await.unwrap();
    assert_eq!(disposition, ReplyDisposition::Held);
    tx.rollback().await.unwrap();
    let mut tx = f.pool().begin().await.unwrap();
    MessageHandler::handle(&rolled_back, &mut tx, &reply)
        .await
        .expect("a held reply is handled");
    tx.commit().await.unwrap();
    let held: Vec<(Uuid, String)> =
        sqlx::query_as("SELECT message_id, reason FROM saga_held_replies WHERE saga_id = $1")
            .bind(newer)
            .fetch_all(f.pool())
            .await
            .unwrap();
    assert_eq!(held, [(reply.id, reason.to_owned())]);

    // Its deadline passes: the other saga times out, this one is left alone.
    f.clock.advance(STEP_TIMEOUT);
    assert_eq!(rolled_back.sweep(f.pool(), 10).await.unwrap(), 1);
    assert_eq!(f.status(&rolled_back, older).await, SagaStatus::Aborting);
    let mut conn = f.db.connect().await;
    let untouched = rolled_back.load(&mut conn, newer).await.unwrap();
    assert_eq!(
        (
            untouched.status,
            untouched.version,
            untouched.definition_version,
            untouched.current_step.as_deref()
        ),
        (SagaStatus::Started, 1, 2, Some("reserve-goods"))
    );
    assert_eq!(rolled_back.skipped_sagas(), []);
    let err = SagaAdmin::new(f.pool().clone())
        .abort(&rolled_back, newer, "stuck")
        .await
        .unwrap_err();
    assert!(err.to_string().contains(reason), "{err}");

    // Listed as stuck, with the reason, by the operator's view of this code.
    let admin = SagaAdmin::new(f.pool().clone());
    let rules = StuckRules::new().knowing(&rolled_back);
    let stuck = admin.stuck(&rules).await.unwrap();
    assert_eq!(stuck.len(), 1, "{stuck:?}");
    assert_eq!(stuck[0].saga.id, newer);
    assert_eq!(stuck[0].saga.definition_version, 2);
    assert_eq!(
        stuck[0].reason,
        StuckReason::UnknownVersion(reason.to_owned())
    );
    assert_eq!(stuck[0].reason.code(), "unknown_version");
    let list = cli::SagaCommand::List {
        stuck: Some(None),
        timeouts: None,
    };
    let text = cli::run(&admin, &rolled_back, list).await.unwrap();
    assert!(
        text.contains(&newer.to_string()) && text.contains(reason),
        "{text}"
    );

    // The code that knows version 2 is back: the held reply is applied first, so
    // the step counts as answered, not timed out.
    let redeployed = f
        .orchestrator(version2(false))
        .with_previous(version1())
        .unwrap();
    assert_eq!(redeployed.sweep(f.pool(), 10).await.unwrap(), 1);
    let resumed = redeployed.load(&mut conn, newer).await.unwrap();
    assert_eq!(resumed.current_step.as_deref(), Some("check-fraud"));
    assert_eq!(resumed.status, SagaStatus::Started);
    let left: i64 = sqlx::query_scalar("SELECT count(*) FROM saga_held_replies")
        .fetch_one(f.pool())
        .await
        .unwrap();
    assert_eq!(left, 0);
    assert_eq!(redeployed.unknown_version_sagas(), []);
    let events = audit::events(&mut conn, newer).await.unwrap();
    let kinds: Vec<&str> = events.iter().map(|e| e.kind.as_str()).collect();
    assert_eq!(
        kinds[4..7],
        ["reply_held", "reply_received", "step_succeeded"],
        "{kinds:?}"
    );
    assert_eq!(events[5].detail["applied"], true);
    assert!(events[5].detail["held_at"].is_string(), "{:?}", events[5]);
    f.run_to_the_end(&redeployed, &[newer, older]).await;
    assert_eq!(f.status(&redeployed, newer).await, SagaStatus::Completed);
    f.assert_trail_rebuilds().await;
}

/// A migration that does not fit an instance (its removed step ran and would never
/// be compensated) leaves the instance on its version, listed with why.
#[tokio::test]
async fn a_migration_that_would_lose_an_undo_leaves_the_saga_listed() {
    let mut f = Fixture::new().await;
    let v1 = f.orchestrator(version1());
    let (id, _) = f.start(&v1).await;
    assert_eq!(f.answer_next(&v1, id).await, ReplyDisposition::Applied);
    let without_goods = SagaDefinition::<Order>::builder("test-order")
        .version(2)
        .migrate_from(1, StepMap::new().removed("reserve"))
        .step("create")
        .invoke_local(create)
        .with_compensation(reject)
        .step("reserve-credit")
        .invoke_participant(|o: &Order| command("customer.request", "ReserveCredit", o))
        .step("approve")
        .invoke_local(approve)
        .build()
        .unwrap();
    let v2 = f.orchestrator(without_goods);
    assert_eq!(v2.check_versions(f.pool()).await.unwrap(), 1);
    let listed = v2.unknown_version_sagas();
    assert_eq!(listed.len(), 1);
    assert!(
        listed[0].1.starts_with(
            "definition version 1 cannot move onto version 2: step reserve, removed in version 2, \
             has run and would never be compensated"
        ),
        "{listed:?}"
    );
    assert_eq!(f.answer_next(&v2, id).await, ReplyDisposition::Held);
    let mut conn = f.db.connect().await;
    assert_eq!(v2.load(&mut conn, id).await.unwrap().definition_version, 1);
    f.assert_trail_rebuilds().await;
}

/// A running saga is stuck after N × its step's timeout without progress, or after
/// an absolute age when its step has none; the reason says which.
#[tokio::test]
async fn stuck_sagas_are_listed_with_their_step_timeout_or_age() {
    let mut f = Fixture::new().await;
    let v1 = f.orchestrator(version1());
    let (timed, _) = f.start(&v1).await;
    let (untimed, _) = f.start(&v1).await;
    f.answer_next(&v1, untimed).await; // now waiting for credit, which has no timeout
    sqlx::query("UPDATE saga_state SET updated_at = now() - interval '100 seconds'")
        .execute(f.pool())
        .await
        .unwrap();
    let admin = SagaAdmin::new(f.pool().clone());
    let rules = StuckRules::new().knowing(&v1);
    let stuck = admin.stuck(&rules).await.unwrap();
    // 100 s > 3 × 30 s; the credit step has no timeout and 100 s < 600 s.
    assert_eq!(stuck.len(), 1, "{stuck:?}");
    assert_eq!(stuck[0].saga.id, timed);
    let StuckReason::NoProgress { limit, wait, .. } = &stuck[0].reason else {
        panic!("{stuck:?}");
    };
    assert_eq!((*limit, *wait), (3 * STEP_TIMEOUT, Some(STEP_TIMEOUT)));
    assert!(
        stuck[0]
            .reason
            .to_string()
            .ends_with("(limit 1m 30s: 3 × the step's 30s wait)"),
        "{}",
        stuck[0].reason
    );
    assert_eq!(admin.stuck(&rules.clone().timeouts(4)).await.unwrap(), []);
    let by_age = rules.without_timeout(Duration::from_secs(60));
    let stuck = admin.stuck(&by_age).await.unwrap();
    let ids: BTreeSet<Uuid> = stuck.iter().map(|s| s.saga.id).collect();
    assert_eq!(ids, BTreeSet::from([timed, untimed]));
    let untimed_reason = stuck.iter().find(|s| s.saga.id == untimed).unwrap();
    assert!(
        untimed_reason
            .reason
            .to_string()
            .ends_with("(limit 1m: the step has no timeout)"),
        "{}",
        untimed_reason.reason
    );
    // The operator's command shows the reason.
    let list = cli::SagaCommand::List {
        stuck: Some(Some(60)),
        timeouts: None,
    };
    let text = cli::run(&admin, &v1, list).await.unwrap();
    assert_eq!(text.lines().count(), 3, "{text}");
    assert!(text.contains("the step has no timeout"), "{text}");
}
