//! Loading a saga to drive it: by the definition of its version, moved onto a
//! newer one through a declared migration, or not at all (its replies are held
//! and it is listed). Why this is safe is in [`crate::saga::versions`].

use std::collections::BTreeMap;
use std::sync::PoisonError;
use std::time::Duration;

use serde_json::json;
use sqlx::types::chrono;
use sqlx::{PgConnection, PgPool, Row};
use uuid::Uuid;

use super::{Orchestrator, SagaError, SagaInstance};
use crate::consumer::IncomingMessage;
use crate::saga::audit::{self, EventKind, PendingEvent, Snapshot};
use crate::saga::definition::{SagaData, SagaDefinition};
use crate::saga::state::StepState;
use crate::saga::versions::Plan;
use crate::status::SagaStatus;

/// How often the sweeper looks for running sagas on definition versions this code
/// cannot drive (they are also noted whenever one of their replies is held).
pub const VERSION_CHECK_INTERVAL: Duration = Duration::from_secs(60);

/// At most this many sagas on unknown versions are named (all are counted).
const UNKNOWN_LISTED: usize = 100;

/// The running sagas on definition versions this code cannot drive, as last seen.
#[derive(Debug, Default)]
pub(super) struct UnknownSagas {
    /// By saga: why it is not driven.
    listed: BTreeMap<Uuid, String>,
    /// How many there were at the last check (more than are listed, maybe).
    counted: usize,
    /// When the sweeper looks again.
    next_check: Option<chrono::DateTime<chrono::Utc>>,
}

impl<D: SagaData + Clone> Orchestrator<D> {
    /// Loads an instance of this saga type, of whatever definition version (for
    /// reading; [`Orchestrator::handle_reply`] and the others resolve its version
    /// before they change it).
    pub async fn load(
        &self,
        conn: &mut PgConnection,
        id: Uuid,
    ) -> Result<SagaInstance<D>, SagaError> {
        let row = sqlx::query(
            "SELECT status, current_step, payload, step_status, version, deadline, definition_version \
             FROM saga_state WHERE id = $1 AND saga_type = $2",
        )
        .bind(id)
        .bind(&self.definition().name)
        .fetch_optional(&mut *conn)
        .await?
        .ok_or(SagaError::NotFound(id))?;
        let status: String = row.try_get("status")?;
        let status: SagaStatus =
            status
                .parse()
                .map_err(|e: crate::status::UnknownStatus| SagaError::Invalid {
                    id,
                    reason: e.to_string(),
                })?;
        let payload: serde_json::Value = row.try_get("payload")?;
        let steps: serde_json::Value = row.try_get("step_status")?;
        let current_step: Option<String> = row.try_get("current_step")?;
        let deadline = row.try_get("deadline")?;
        let definition_version = from_column(row.try_get("definition_version")?);
        let data = serde_json::from_value(payload.clone()).map_err(|e| SagaError::State(id, e))?;
        let step_states =
            serde_json::from_value(steps.clone()).map_err(|e| SagaError::State(id, e))?;
        let loaded = Snapshot {
            status: status.as_str().to_owned(),
            definition_version,
            current_step: current_step.clone(),
            deadline,
            payload,
            steps: match steps {
                serde_json::Value::Object(steps) => steps,
                _ => serde_json::Map::new(),
            },
        };
        Ok(SagaInstance {
            id,
            status,
            current_step,
            data,
            steps: step_states,
            version: row.try_get("version")?,
            definition_version,
            deadline,
            trail: Vec::new(),
            loaded: Some(loaded),
            outgoing: Vec::new(),
        })
    }

    /// Loads an instance to change it (for the operator's actions): moved onto a
    /// newer definition version if its own is gone and a migration applies; an
    /// error if this code cannot drive it.
    pub(crate) async fn load_to_drive(
        &self,
        conn: &mut PgConnection,
        id: Uuid,
    ) -> Result<SagaInstance<D>, SagaError> {
        let mut instance = self.load(conn, id).await?;
        if let Err(reason) = self.drive(&mut instance) {
            return Err(SagaError::UnknownVersion {
                id,
                version: instance.definition_version,
                reason,
            });
        }
        Ok(instance)
    }

    /// The versions this orchestrator knows, without their actions.
    pub(crate) fn outlines(&self) -> &crate::saga::versions::Outlines {
        self.versions.outlines()
    }

    /// The definition the instance runs on (its version's).
    pub(super) fn definition_of(
        &self,
        instance: &SagaInstance<D>,
    ) -> Result<&SagaDefinition<D>, SagaError> {
        let version = instance.definition_version;
        self.versions
            .get(version)
            .ok_or_else(|| SagaError::UnknownVersion {
                id: instance.id,
                version,
                reason: self.versions.outlines().unknown(version),
            })
    }

    /// Resolves the definition a loaded instance is driven by: its own version's,
    /// or a newer one it is moved onto now (renamed steps, the version, a
    /// `definition_migrated` event: stored with the transaction's change); why not,
    /// when this code cannot drive it (it is then listed).
    pub(super) fn drive(
        &self,
        instance: &mut SagaInstance<D>,
    ) -> Result<&SagaDefinition<D>, String> {
        let plan = self.versions.outlines().plan(
            instance.definition_version,
            instance.status,
            instance.current_step.as_deref(),
            &instance.steps,
        );
        let definition = match plan {
            Plan::Run => self.definition_of(instance).map_err(|e| e.to_string())?,
            Plan::Migrate(migration) => {
                let definition = self
                    .versions
                    .get(migration.to)
                    .ok_or_else(|| self.versions.outlines().unknown(migration.to))?;
                tracing::info!(saga_id = %instance.id, from = migration.from, to = migration.to, "saga moved onto a newer definition version");
                // The move is the first thing the transaction records: the code
                // changed under the saga before anything else happened to it.
                instance.trail.insert(
                    0,
                    PendingEvent::new(EventKind::DefinitionMigrated, None, migration.detail()),
                );
                instance.definition_version = migration.to;
                instance.current_step = migration.current_step;
                instance.steps = migration.steps;
                definition
            }
            Plan::Unknown(reason) => {
                self.note_unknown(instance.id, &reason);
                return Err(reason);
            }
        };
        self.lock_unknown().listed.remove(&instance.id);
        Ok(definition)
    }

    /// Keeps a reply for a saga this code cannot drive, in the caller's
    /// transaction (the consumer's, with its journal row), and records it in the
    /// saga's trail.
    pub(super) async fn hold(
        &self,
        tx: &mut PgConnection,
        instance: &SagaInstance<D>,
        message: &IncomingMessage,
        step: &str,
        reason: &str,
    ) -> Result<(), SagaError> {
        let now = self.clock.now();
        let stored = json!({
            "topic": message.topic,
            "partition": message.partition,
            "offset": message.offset,
            "key": message.key,
            "id": message.id,
            "type": message.message_type,
            "headers": message.headers,
            "payload": message.payload,
        });
        sqlx::query(
            "INSERT INTO saga_held_replies (saga_id, message_id, held_at, reason, message) \
             VALUES ($1, $2, $3, $4, $5) ON CONFLICT (saga_id, message_id) DO NOTHING",
        )
        .bind(instance.id)
        .bind(message.id)
        .bind(now)
        .bind(reason)
        .bind(&stored)
        .execute(&mut *tx)
        .await?;
        let detail = json!({
            "message_id": message.id,
            "type": message.message_type,
            "request_id": message.header(crate::saga::HEADER_REQUEST_ID),
            "topic": message.topic,
            "definition_version": instance.definition_version,
            "reason": reason,
        });
        let event = PendingEvent::new(EventKind::ReplyHeld, Some(step), detail);
        let saga_type = &self.definition().name;
        audit::write(
            tx,
            instance.id,
            saga_type,
            instance.version,
            now,
            &[event],
            None,
        )
        .await?;
        tracing::warn!(saga_id = %instance.id, message_id = %message.id, reason, "reply held: this code cannot drive the saga's definition version");
        Ok(())
    }

    /// Applies the held replies of up to `limit` sagas this code can drive now,
    /// each saga in its own transaction (its replies in the order they came, then
    /// deleted); returns how many replies were applied or found stale.
    pub(super) async fn release_held(
        &self,
        pool: &PgPool,
        limit: i64,
        excluded: &[Uuid],
    ) -> Result<usize, SagaError> {
        let drivable = self.drivable_column();
        let sagas: Vec<Uuid> = sqlx::query_scalar(
            // From the held replies (few, usually none) to their sagas.
            "SELECT DISTINCT h.saga_id FROM saga_held_replies h JOIN saga_state s ON s.id = h.saga_id \
             WHERE s.saga_type = $1 AND s.definition_version = ANY($2) AND NOT (s.id = ANY($3)) \
             LIMIT $4",
        )
        .bind(&self.definition().name)
        .bind(&drivable)
        .bind(excluded)
        .bind(limit)
        .fetch_all(pool)
        .await?;
        let mut released = 0;
        for id in sagas {
            let mut tx = pool.begin().await?;
            let rows = sqlx::query(
                "DELETE FROM saga_held_replies WHERE saga_id = $1 RETURNING seq, held_at, message",
            )
            .bind(id)
            .fetch_all(&mut *tx)
            .await?;
            let mut held: Vec<(i64, chrono::DateTime<chrono::Utc>, IncomingMessage)> = Vec::new();
            for row in &rows {
                let message =
                    held_message(row.try_get("message")?).map_err(|e| SagaError::State(id, e))?;
                held.push((row.try_get("seq")?, row.try_get("held_at")?, message));
            }
            held.sort_by_key(|(seq, _, _)| *seq);
            let mut outcome = Ok(());
            for (_, at, message) in &held {
                match self.apply_reply(&mut tx, message, Some(*at)).await {
                    // The saga still cannot be driven (its migration does not fit
                    // it): the replies stay held, the saga stays listed.
                    Ok(super::ReplyDisposition::Held) => {
                        outcome = Err(None);
                        break;
                    }
                    Ok(_) => {}
                    Err(e) => {
                        outcome = Err(Some(e));
                        break;
                    }
                }
            }
            match outcome {
                Ok(()) => {
                    tx.commit().await?;
                    released += held.len();
                    tracing::info!(saga_id = %id, replies = held.len(), "held replies applied");
                }
                Err(None) | Err(Some(SagaError::Conflict(_))) => tx.rollback().await?,
                Err(Some(e)) if e.is_transient() => return Err(e),
                Err(Some(e)) => {
                    tx.rollback().await?;
                    self.skip(id, e.to_string());
                }
            }
        }
        Ok(released)
    }

    /// Looks for running sagas of this type on definition versions this code
    /// cannot drive, and lists them ([`Orchestrator::unknown_version_sagas`]);
    /// returns how many there are. The sweeper does this every
    /// [`VERSION_CHECK_INTERVAL`].
    pub async fn check_versions(&self, pool: &PgPool) -> Result<usize, SagaError> {
        let known: Vec<i32> = self
            .known_versions()
            .into_iter()
            .map(super::to_column)
            .collect();
        let rows = sqlx::query(
            "SELECT id, status, current_step, step_status, definition_version FROM saga_state \
             WHERE saga_type = $1 AND status IN ('STARTED', 'SUSPENDED', 'ABORTING') \
             AND NOT (definition_version = ANY($2)) ORDER BY updated_at",
        )
        .bind(&self.definition().name)
        .bind(&known)
        .fetch_all(pool)
        .await?;
        let mut listed = BTreeMap::new();
        let mut counted = 0;
        for row in &rows {
            let id: Uuid = row.try_get("id")?;
            let plan = plan_of(self.versions.outlines(), row)?;
            if let Plan::Unknown(reason) = plan {
                counted += 1;
                if listed.len() < UNKNOWN_LISTED {
                    listed.insert(id, reason);
                }
            }
        }
        let mut unknown = self.lock_unknown();
        unknown.listed = listed;
        unknown.counted = counted;
        unknown.next_check = Some(self.clock.now() + VERSION_CHECK_INTERVAL);
        Ok(counted)
    }

    /// Whether the sweeper should call [`Orchestrator::check_versions`] now.
    pub(super) fn version_check_due(&self) -> bool {
        self.lock_unknown()
            .next_check
            .is_none_or(|at| at <= self.clock.now())
    }

    /// Running sagas on definition versions this code cannot drive (neither kept
    /// nor migratable onto a kept one), with the reason, e.g. "definition version 1
    /// unknown (this code knows 2, 3)". Their replies are held and their deadlines
    /// wait until code that knows the version runs. As seen by the last check
    /// ([`Orchestrator::check_versions`]) and the replies held since; at most 100
    /// are named, [`Orchestrator::unknown_version_count`] counts them all.
    pub fn unknown_version_sagas(&self) -> Vec<(Uuid, String)> {
        let unknown = self.lock_unknown();
        unknown
            .listed
            .iter()
            .map(|(id, reason)| (*id, reason.clone()))
            .collect()
    }

    /// How many running sagas are on definition versions this code cannot drive.
    pub fn unknown_version_count(&self) -> usize {
        let unknown = self.lock_unknown();
        unknown.counted.max(unknown.listed.len())
    }

    /// The versions whose sagas this code drives (its own and those it migrates
    /// from), as stored.
    pub(super) fn drivable_column(&self) -> Vec<i32> {
        let outlines = self.versions.outlines();
        outlines
            .drivable()
            .into_iter()
            .map(super::to_column)
            .collect()
    }

    fn note_unknown(&self, id: Uuid, reason: &str) {
        let mut unknown = self.lock_unknown();
        let room = unknown.listed.len() < UNKNOWN_LISTED || unknown.listed.contains_key(&id);
        if room && unknown.listed.insert(id, reason.to_owned()).is_none() {
            unknown.counted += 1;
        }
    }

    fn lock_unknown(&self) -> std::sync::MutexGuard<'_, UnknownSagas> {
        self.unknown.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// How a running saga read by [`Orchestrator::check_versions`] (or the stuck
/// listing) would be driven. A row whose state cannot be read is not driven
/// either: one bad saga must not stop the check (and the sweep) for the others.
pub(crate) fn plan_of(
    outlines: &crate::saga::versions::Outlines,
    row: &sqlx::postgres::PgRow,
) -> Result<Plan, SagaError> {
    let status: String = row.try_get("status")?;
    let current: Option<String> = row.try_get("current_step")?;
    let steps: serde_json::Value = row.try_get("step_status")?;
    let version = from_column(row.try_get("definition_version")?);
    let status: SagaStatus = match status.parse() {
        Ok(status) => status,
        Err(e) => return Ok(Plan::Unknown(unreadable(version, &e))),
    };
    let steps: BTreeMap<String, StepState> = match serde_json::from_value(steps) {
        Ok(steps) => steps,
        Err(e) => return Ok(Plan::Unknown(unreadable(version, &e))),
    };
    Ok(outlines.plan(version, status, current.as_deref(), &steps))
}

fn unreadable(version: u32, error: &dyn std::fmt::Display) -> String {
    format!("definition version {version}: the saga's state cannot be read ({error})")
}

/// A stored `definition_version` (positive, by the table's CHECK).
pub(crate) fn from_column(version: i32) -> u32 {
    u32::try_from(version).unwrap_or(0)
}

/// A held reply as it was received.
fn held_message(stored: serde_json::Value) -> Result<IncomingMessage, serde_json::Error> {
    #[derive(serde::Deserialize)]
    struct Held {
        topic: String,
        partition: i32,
        offset: i64,
        key: Option<String>,
        id: Uuid,
        #[serde(rename = "type")]
        message_type: Option<String>,
        headers: BTreeMap<String, String>,
        payload: Option<serde_json::Value>,
    }
    let held: Held = serde_json::from_value(stored)?;
    Ok(IncomingMessage {
        topic: held.topic,
        partition: held.partition,
        offset: held.offset,
        key: held.key,
        id: held.id,
        message_type: held.message_type,
        headers: held.headers,
        payload: held.payload,
    })
}
