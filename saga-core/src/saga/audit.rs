//! The audit trail: what happened to each saga, as rows of `saga_events`
//! (`sql/shared/0009_saga_events.sql`).
//!
//! Every transaction that touches a saga writes its events: first the cause (the
//! saga started, a reply came, a deadline passed, an operator acted), then what
//! followed from it in order (steps started, succeeded, failed, timed out;
//! commands sent with their message and request ids; compensations started, done,
//! failed and retried; the saga's status changing). A reply that no step waits for
//! is recorded too, as stale; one held because the running code cannot drive the
//! saga's definition version is recorded as held, and again as received when it is
//! applied. A saga moved onto a newer definition version records the move first.
//!
//! # Why `saga_state` can be rebuilt from the trail
//!
//! - The events are written by the orchestrator in the transaction that stores the
//!   change, after the update of `saga_state` passed its version check: they commit
//!   with the change or not at all, and a transaction that lost a version race
//!   leaves no event behind.
//! - The cause carries `changes`: what the transaction changed, compared with the
//!   state it loaded: `status`, `current_step` and `deadline` when they changed,
//!   `payload` (the saga's data) when it changed, `definition_version` when it
//!   changed, and under `steps` the whole state of every step that changed. The
//!   first event of a saga carries the whole state, its type and its definition
//!   version (a trail written before versions existed has none: version 1). A
//!   migration onto a newer definition renames steps: `steps` then carries the
//!   renamed steps' states under their new names, and `removed_steps` the names
//!   that are gone.
//! - A saga's transactions are serialised by its version, and every event records
//!   the version its transaction produced. So folding the `changes` of a saga's
//!   events in version order replays its transitions, and the result is its row in
//!   `saga_state`; [`verify`] checks exactly that for every saga.
//!
//! Events are never updated or deleted by the toolkit; pruning old sagas' events is
//! the operator's choice (they are not needed for running sagas to go on).

use std::collections::BTreeMap;

use chrono::{DateTime, SubsecRound as _, Utc};
use serde::Serialize;
use serde_json::{json, Map, Value};
use sqlx::{PgConnection, PgPool, Row};
use uuid::Uuid;

/// What an event records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    /// The saga was started (cause).
    SagaStarted,
    /// A participant's reply was received, applied or stale (cause).
    ReplyReceived,
    /// A deadline passed: a reply did not come in time, or a compensation retry
    /// became due (cause).
    DeadlinePassed,
    /// An operator moved the saga by hand (cause; `detail.actor`, `detail.action`).
    OperatorAction,
    /// A step's action began (`detail.attempt`; above 1 for a retry).
    StepStarted,
    /// A command was written to the outbox (`detail`: message id, type, topic,
    /// request id, attempt, whether a compensation, headers).
    CommandSent,
    StepSucceeded,
    /// A step failed (`detail.reason`, `detail.timed_out`, `detail.retrying` when
    /// it is sent again).
    StepFailed,
    /// A step's compensation began, or was tried again (`detail.attempt`).
    CompensationStarted,
    CompensationDone,
    /// A compensation attempt failed (`detail.reason`; `detail.retry_at`, or
    /// `detail.gave_up`).
    CompensationFailed,
    /// The saga's status changed (`detail.from`, `detail.to`).
    StatusChanged,
    /// The saga was moved onto a newer definition version through a declared
    /// migration (cause, first of its transaction; `detail.from`, `detail.to`,
    /// `detail.renamed`, `detail.removed`, `detail.skipped`).
    DefinitionMigrated,
    /// A reply for a saga on a definition version the running code cannot drive was
    /// kept in `saga_held_replies` (cause; `detail.reason`, the message's ids).
    ReplyHeld,
    /// A failed step suspended the saga for an operator (`detail.until`: when it
    /// compensates unless the step is restarted).
    SagaSuspended,
}

impl EventKind {
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::SagaStarted => "saga_started",
            EventKind::ReplyReceived => "reply_received",
            EventKind::DeadlinePassed => "deadline_passed",
            EventKind::OperatorAction => "operator_action",
            EventKind::StepStarted => "step_started",
            EventKind::CommandSent => "command_sent",
            EventKind::StepSucceeded => "step_succeeded",
            EventKind::StepFailed => "step_failed",
            EventKind::CompensationStarted => "compensation_started",
            EventKind::CompensationDone => "compensation_done",
            EventKind::CompensationFailed => "compensation_failed",
            EventKind::StatusChanged => "status_changed",
            EventKind::DefinitionMigrated => "definition_migrated",
            EventKind::ReplyHeld => "reply_held",
            EventKind::SagaSuspended => "saga_suspended",
        }
    }
}

/// An event of a transition not yet written.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct PendingEvent {
    pub(crate) kind: EventKind,
    pub(crate) step: Option<String>,
    pub(crate) detail: Value,
}

impl PendingEvent {
    pub(crate) fn new(kind: EventKind, step: Option<&str>, detail: Value) -> PendingEvent {
        PendingEvent {
            kind,
            step: step.map(str::to_owned),
            detail,
        }
    }
}

/// A saga's stored state as the trail records it: what [`changes`] compares.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Snapshot {
    pub(crate) status: String,
    pub(crate) definition_version: u32,
    pub(crate) current_step: Option<String>,
    pub(crate) deadline: Option<DateTime<Utc>>,
    pub(crate) payload: Value,
    pub(crate) steps: Map<String, Value>,
}

/// What changed from `before` (`None`: the saga is new, everything is recorded) to
/// `after`; `None` when nothing did.
pub(crate) fn changes(
    saga_type: &str,
    before: Option<&Snapshot>,
    after: &Snapshot,
) -> Option<Value> {
    let mut changed = Map::new();
    if before.is_none() {
        changed.insert("saga_type".into(), json!(saga_type));
    }
    if before.map(|b| &b.status) != Some(&after.status) {
        changed.insert("status".into(), json!(after.status));
    }
    if before.map(|b| b.definition_version) != Some(after.definition_version) {
        changed.insert("definition_version".into(), json!(after.definition_version));
    }
    if before.map(|b| &b.current_step) != Some(&after.current_step) {
        changed.insert("current_step".into(), json!(after.current_step));
    }
    let deadline = after.deadline.map(to_micros);
    if before.map(|b| b.deadline.map(to_micros)) != Some(deadline) {
        changed.insert("deadline".into(), json!(deadline));
    }
    if before.map(|b| &b.payload) != Some(&after.payload) {
        changed.insert("payload".into(), after.payload.clone());
    }
    let steps: Map<String, Value> = after
        .steps
        .iter()
        .filter(|(name, state)| before.and_then(|b| b.steps.get(*name)) != Some(*state))
        .map(|(name, state)| (name.clone(), state.clone()))
        .collect();
    if !steps.is_empty() {
        changed.insert("steps".into(), Value::Object(steps));
    }
    // Steps a migration renamed or removed: gone under their old names.
    let removed: Vec<&String> = before
        .map(|b| {
            b.steps
                .keys()
                .filter(|name| !after.steps.contains_key(*name))
                .collect()
        })
        .unwrap_or_default();
    if !removed.is_empty() {
        changed.insert("removed_steps".into(), json!(removed));
    }
    (!changed.is_empty()).then_some(Value::Object(changed))
}

/// PostgreSQL keeps microseconds: the trail records what `saga_state` can hold.
fn to_micros(at: DateTime<Utc>) -> DateTime<Utc> {
    at.trunc_subsecs(6)
}

/// Writes the events of one transaction of saga `saga_id` (version `version` once
/// it commits), `changes` on the first.
pub(crate) async fn write(
    tx: &mut PgConnection,
    saga_id: Uuid,
    saga_type: &str,
    version: i32,
    at: DateTime<Utc>,
    events: &[PendingEvent],
    changes: Option<Value>,
) -> Result<(), sqlx::Error> {
    if events.is_empty() {
        return Ok(());
    }
    let rows = EventRows::of(events, changes);
    // One statement; `ORDER BY n` gives the rows their ids in the events' order.
    sqlx::query(
        "INSERT INTO saga_events (saga_id, saga_type, version, at, kind, step, detail, changes) \
         SELECT $1, $2, $3, $4, kind, step, detail, changes \
         FROM UNNEST($5::text[], $6::text[], $7::jsonb[], $8::jsonb[]) \
              WITH ORDINALITY AS e(kind, step, detail, changes, n) ORDER BY n",
    )
    .bind(saga_id)
    .bind(saga_type)
    .bind(version)
    .bind(at)
    .bind(&rows.kinds)
    .bind(&rows.steps)
    .bind(&rows.details)
    .bind(&rows.changes)
    .execute(&mut *tx)
    .await?;
    Ok(())
}

/// The events of one transaction as the arrays a statement unnests into rows,
/// `changes` on the first.
pub(crate) struct EventRows<'a> {
    pub(crate) kinds: Vec<&'a str>,
    pub(crate) steps: Vec<Option<&'a str>>,
    pub(crate) details: Vec<&'a Value>,
    pub(crate) changes: Vec<Option<Value>>,
}

impl EventRows<'_> {
    pub(crate) fn of(events: &[PendingEvent], changes: Option<Value>) -> EventRows<'_> {
        let mut all_changes: Vec<Option<Value>> = vec![None; events.len()];
        if let Some(first) = all_changes.first_mut() {
            *first = changes;
        }
        EventRows {
            kinds: events.iter().map(|e| e.kind.as_str()).collect(),
            steps: events.iter().map(|e| e.step.as_deref()).collect(),
            details: events.iter().map(|e| &e.detail).collect(),
            changes: all_changes,
        }
    }
}

/// One event as stored.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SagaEvent {
    pub id: i64,
    pub saga_id: Uuid,
    pub saga_type: String,
    pub version: i32,
    pub at: DateTime<Utc>,
    pub kind: String,
    pub step: Option<String>,
    pub detail: Value,
    pub changes: Option<Value>,
}

/// The events of saga `saga_id`, in the order they happened.
pub async fn events(conn: &mut PgConnection, saga_id: Uuid) -> Result<Vec<SagaEvent>, sqlx::Error> {
    let rows = sqlx::query(
        "SELECT id, saga_id, saga_type, version, at, kind, step, detail, changes \
         FROM saga_events WHERE saga_id = $1 ORDER BY version, id",
    )
    .bind(saga_id)
    .fetch_all(&mut *conn)
    .await?;
    rows.iter().map(event_of).collect()
}

fn event_of(row: &sqlx::postgres::PgRow) -> Result<SagaEvent, sqlx::Error> {
    Ok(SagaEvent {
        id: row.try_get("id")?,
        saga_id: row.try_get("saga_id")?,
        saga_type: row.try_get("saga_type")?,
        version: row.try_get("version")?,
        at: row.try_get("at")?,
        kind: row.try_get("kind")?,
        step: row.try_get("step")?,
        detail: row.try_get("detail")?,
        changes: row.try_get("changes")?,
    })
}

/// A saga's row of `saga_state`, as rebuilt from its trail or read from the table.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct SagaRow {
    pub saga_type: String,
    pub definition_version: i32,
    pub status: String,
    pub current_step: Option<String>,
    pub deadline: Option<DateTime<Utc>>,
    pub payload: Value,
    pub step_status: Map<String, Value>,
    pub version: i32,
}

/// Folds a saga's events (in [`events`]' order) into its `saga_state` row; `None`
/// when they do not begin with the saga's start.
pub fn rebuild(events: &[SagaEvent]) -> Option<SagaRow> {
    let mut row: Option<SagaRow> = None;
    for event in events {
        let Some(Value::Object(changes)) = &event.changes else {
            continue;
        };
        let row = match &mut row {
            Some(row) => row,
            // Sagas started before definitions had versions ran version 1.
            None if changes.contains_key("saga_type") => row.insert(SagaRow {
                definition_version: 1,
                ..SagaRow::default()
            }),
            None => return None,
        };
        for (key, value) in changes {
            match key.as_str() {
                "saga_type" => row.saga_type = value.as_str().unwrap_or_default().to_owned(),
                "status" => row.status = value.as_str().unwrap_or_default().to_owned(),
                "definition_version" => {
                    let version = value.as_i64().and_then(|v| i32::try_from(v).ok());
                    row.definition_version = version.unwrap_or_default();
                }
                "current_step" => row.current_step = value.as_str().map(str::to_owned),
                "deadline" => row.deadline = serde_json::from_value(value.clone()).ok().flatten(),
                "payload" => row.payload = value.clone(),
                "steps" => {
                    if let Value::Object(steps) = value {
                        for (name, state) in steps {
                            row.step_status.insert(name.clone(), state.clone());
                        }
                    }
                }
                "removed_steps" => {
                    for name in value.as_array().into_iter().flatten() {
                        row.step_status.remove(name.as_str().unwrap_or_default());
                    }
                }
                _ => {}
            }
        }
        row.version = event.version;
    }
    row
}

/// The result of comparing every saga with its rebuilt trail.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct TrailCheck {
    /// Sagas in `saga_state`.
    pub sagas: usize,
    /// Events read.
    pub events: usize,
    /// Sagas whose rebuilt row differs from `saga_state` (or that have no trail),
    /// with what differs.
    pub differing: Vec<(Uuid, String)>,
}

impl TrailCheck {
    pub fn ok(&self) -> bool {
        self.differing.is_empty()
    }
}

impl std::fmt::Display for TrailCheck {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "{} saga{} rebuilt from {} events: {} match saga_state, {} differ",
            self.sagas,
            if self.sagas == 1 { "" } else { "s" },
            self.events,
            self.sagas - self.differing.len(),
            self.differing.len()
        )?;
        for (id, what) in &self.differing {
            writeln!(f, "  {id}: {what}")?;
        }
        Ok(())
    }
}

/// Rebuilds every saga in `saga_state` (of `saga_type`, or all) from its trail and
/// compares the result with the stored row.
pub async fn verify(pool: &PgPool, saga_type: Option<&str>) -> Result<TrailCheck, sqlx::Error> {
    let stored = sqlx::query(
        "SELECT id, saga_type, definition_version, status, current_step, deadline, payload, \
         step_status, version FROM saga_state WHERE $1::text IS NULL OR saga_type = $1 ORDER BY id",
    )
    .bind(saga_type)
    .fetch_all(pool)
    .await?;
    let rows = sqlx::query(
        "SELECT id, saga_id, saga_type, version, at, kind, step, detail, changes \
         FROM saga_events WHERE $1::text IS NULL OR saga_type = $1 ORDER BY saga_id, version, id",
    )
    .bind(saga_type)
    .fetch_all(pool)
    .await?;
    let mut trails: BTreeMap<Uuid, Vec<SagaEvent>> = BTreeMap::new();
    for row in &rows {
        let event = event_of(row)?;
        trails.entry(event.saga_id).or_default().push(event);
    }
    let mut check = TrailCheck {
        sagas: stored.len(),
        events: rows.len(),
        differing: Vec::new(),
    };
    for row in &stored {
        let id: Uuid = row.try_get("id")?;
        let saga = SagaRow {
            saga_type: row.try_get("saga_type")?,
            definition_version: row.try_get("definition_version")?,
            status: row.try_get("status")?,
            current_step: row.try_get("current_step")?,
            deadline: row.try_get("deadline")?,
            payload: row.try_get("payload")?,
            step_status: match row.try_get::<Value, _>("step_status")? {
                Value::Object(steps) => steps,
                _ => Map::new(),
            },
            version: row.try_get("version")?,
        };
        let rebuilt = trails.get(&id).and_then(|events| rebuild(events));
        if let Some(what) = difference(&saga, rebuilt.as_ref()) {
            check.differing.push((id, what));
        }
    }
    Ok(check)
}

/// What differs between the stored row and the rebuilt one, in words.
fn difference(stored: &SagaRow, rebuilt: Option<&SagaRow>) -> Option<String> {
    let Some(rebuilt) = rebuilt else {
        return Some("no trail".to_owned());
    };
    let differs: Vec<&str> = [
        ("saga_type", stored.saga_type != rebuilt.saga_type),
        (
            "definition_version",
            stored.definition_version != rebuilt.definition_version,
        ),
        ("status", stored.status != rebuilt.status),
        ("current_step", stored.current_step != rebuilt.current_step),
        ("deadline", stored.deadline != rebuilt.deadline),
        ("payload", stored.payload != rebuilt.payload),
        ("step_status", stored.step_status != rebuilt.step_status),
        ("version", stored.version != rebuilt.version),
    ]
    .into_iter()
    .filter_map(|(name, differs)| differs.then_some(name))
    .collect();
    (!differs.is_empty()).then(|| {
        format!(
            "{} differ (stored {} v{}, rebuilt {} v{})",
            differs.join(", "),
            stored.status,
            stored.version,
            rebuilt.status,
            rebuilt.version
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snapshot(status: &str, steps: Value) -> Snapshot {
        Snapshot {
            status: status.into(),
            definition_version: 1,
            current_step: Some("credit".into()),
            deadline: None,
            payload: json!({"amount": 10}),
            steps: match steps {
                Value::Object(m) => m,
                _ => Map::new(),
            },
        }
    }

    fn event(version: i32, changes: Option<Value>) -> SagaEvent {
        SagaEvent {
            id: i64::from(version),
            saga_id: Uuid::nil(),
            saga_type: "order".into(),
            version,
            at: Utc::now(),
            kind: "x".into(),
            step: None,
            detail: json!({}),
            changes,
        }
    }

    #[test]
    fn a_new_saga_records_everything_and_a_change_only_what_changed() {
        let first = snapshot("STARTED", json!({"credit": {"status": "STARTED"}}));
        let all = changes("order", None, &first).unwrap();
        assert_eq!(all["saga_type"], "order");
        assert_eq!(all["definition_version"], 1);
        assert_eq!(all["status"], "STARTED");
        assert_eq!(all["current_step"], "credit");
        assert_eq!(all["deadline"], Value::Null);
        assert_eq!(all["payload"], json!({"amount": 10}));
        assert_eq!(all["steps"], json!({"credit": {"status": "STARTED"}}));

        let mut next = first.clone();
        next.steps
            .insert("credit".into(), json!({"status": "SUCCEEDED"}));
        next.steps
            .insert("stock".into(), json!({"status": "STARTED"}));
        next.current_step = Some("stock".into());
        let some = changes("order", Some(&first), &next).unwrap();
        assert_eq!(
            some,
            json!({
                "current_step": "stock",
                "steps": {"credit": {"status": "SUCCEEDED"}, "stock": {"status": "STARTED"}}
            })
        );
        assert_eq!(changes("order", Some(&next), &next), None);
    }

    #[test]
    fn deadlines_are_recorded_to_the_microsecond() {
        let before = snapshot("STARTED", json!({}));
        let mut after = before.clone();
        let at = DateTime::parse_from_rfc3339("2026-12-06T10:00:00.123456789Z")
            .unwrap()
            .with_timezone(&Utc);
        after.deadline = Some(at);
        let changed = changes("order", Some(&before), &after).unwrap();
        assert_eq!(changed["deadline"], json!("2026-12-06T10:00:00.123456Z"));
        // The same deadline to the microsecond is no change.
        let mut again = after.clone();
        again.deadline = Some(to_micros(at));
        assert_eq!(changes("order", Some(&after), &again), None);
    }

    #[test]
    fn folding_the_changes_in_order_gives_the_last_state() {
        let first = snapshot("STARTED", json!({"credit": {"status": "STARTED"}}));
        let mut second = first.clone();
        second.status = "ABORTING".into();
        second
            .steps
            .insert("credit".into(), json!({"status": "FAILED", "reason": "no"}));
        second.deadline = Some(Utc::now());
        let mut third = second.clone();
        third.status = "ABORTED".into();
        third.current_step = None;
        third.deadline = None;
        let events = vec![
            event(1, changes("order", None, &first)),
            event(1, None), // a stale reply
            event(2, changes("order", Some(&first), &second)),
            event(3, changes("order", Some(&second), &third)),
        ];
        let row = rebuild(&events).unwrap();
        assert_eq!(row.saga_type, "order");
        assert_eq!(row.status, "ABORTED");
        assert_eq!(row.current_step, None);
        assert_eq!(row.deadline, None);
        assert_eq!(row.version, 3);
        assert_eq!(
            Value::Object(row.step_status),
            json!({"credit": {"status": "FAILED", "reason": "no"}})
        );
        // A trail that does not start with the saga's start cannot be folded.
        assert_eq!(rebuild(&events[2..]), None);
    }

    #[test]
    fn a_migration_renames_steps_and_bumps_the_definition_version() {
        let first = snapshot("STARTED", json!({"reserve": {"status": "STARTED"}}));
        let mut moved = first.clone();
        moved.definition_version = 2;
        moved.current_step = Some("reserve-goods".into());
        let state = moved.steps.remove("reserve").unwrap();
        moved.steps.insert("reserve-goods".into(), state);
        let changed = changes("order", Some(&first), &moved).unwrap();
        assert_eq!(
            changed,
            json!({
                "definition_version": 2,
                "current_step": "reserve-goods",
                "steps": {"reserve-goods": {"status": "STARTED"}},
                "removed_steps": ["reserve"],
            })
        );
        let mut old_start = changes("order", None, &first).unwrap();
        // A saga started before versions existed: its first event names none.
        old_start
            .as_object_mut()
            .unwrap()
            .remove("definition_version");
        let events = vec![event(1, Some(old_start)), event(2, Some(changed))];
        let row = rebuild(&events).unwrap();
        assert_eq!(row.definition_version, 2);
        assert_eq!(row.current_step.as_deref(), Some("reserve-goods"));
        assert_eq!(
            Value::Object(row.step_status),
            json!({"reserve-goods": {"status": "STARTED"}})
        );
        assert_eq!(rebuild(&events[..1]).unwrap().definition_version, 1);
    }
}
