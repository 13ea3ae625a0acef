//! Storing an instance: its `saga_state` row, the transition's audit events and
//! the commands it sends, in one statement. Beside loading the row, a transition
//! costs the database one round trip.
//!
//! Why "a command is sent exactly when the state that expects its reply is
//! stored" still holds: the commands are inserted by the statement that writes
//! the row, `FROM` the row it wrote. When the version check fails, no row comes
//! back, nothing else is written, and the caller's transaction fails with
//! [`SagaError::Conflict`]. The events and the commands keep the order they were
//! recorded in (`WITH ORDINALITY … ORDER BY`), which gives their ids that order. An
//! outbox that deletes its rows again gets its `DELETE`s right after.

use sqlx::types::chrono;
use sqlx::PgConnection;

use super::{to_column, Orchestrator, SagaError, SagaInstance};
use tracing::Instrument as _;

use crate::outbox::OutboxRows;
use crate::saga::audit::{self, EventKind, EventRows, PendingEvent, Snapshot};
use crate::saga::definition::SagaData;
use crate::status::SagaStatus;

impl<D: SagaData + Clone> Orchestrator<D> {
    /// Inserts a new instance (version 1) with its events and commands.
    pub(super) async fn insert_new(
        &self,
        tx: &mut PgConnection,
        instance: &mut SagaInstance<D>,
    ) -> Result<(), SagaError> {
        let (after, events, changes, sent) = self.transition(instance)?;
        let rows = EventRows::of(&events, changes);
        let sql = format!(
            "WITH created AS ( \
                 INSERT INTO saga_state (id, saga_type, current_step, payload, status, step_status, \
                                         version, deadline, definition_version, traceparent, tracestate) \
                 VALUES ($1, $2, $3, $4, $5, $6, 1, $7, $8, $9, $10) RETURNING id), \
             events AS ( \
                 INSERT INTO saga_events (saga_id, saga_type, version, at, kind, step, detail, changes) \
                 SELECT c.id, $2, 1, $11, e.kind, e.step, e.detail, e.changes \
                 FROM created AS c, \
                      UNNEST($12::text[], $13::text[], $14::jsonb[], $15::jsonb[]) \
                      WITH ORDINALITY AS e(kind, step, detail, changes, n) ORDER BY e.n), \
             sent AS ({}) \
             SELECT count(*) FROM created",
            self.outbox.insert_from("created", 16)
        );
        // The span the saga starts in (the order request): what the saga later does
        // by itself is traced under it (see `Orchestrator::handle_deadline`).
        let trace = telemetry::TraceHeaders::of_span(&tracing::Span::current());
        let query = sqlx::query_scalar::<_, i64>(&sql)
            .bind(instance.id)
            .bind(&self.definition().name)
            .bind(&instance.current_step)
            .bind(&after.payload)
            .bind(instance.status.as_str())
            .bind(sqlx::types::Json(&after.steps))
            .bind(instance.deadline)
            .bind(to_column(instance.definition_version))
            .bind(trace.as_ref().map(|t| t.traceparent.as_str()))
            .bind(trace.as_ref().and_then(|t| t.tracestate.as_deref()));
        bind_tail(query, self.clock.now(), &rows, &sent)
            .fetch_one(&mut *tx)
            .instrument(sent.span.clone())
            .await?;
        self.outbox.inserted(tx, &sent.ids).await?;
        instance.loaded = Some(after);
        Ok(())
    }

    /// Stores the instance if nobody changed it since it was loaded, with its
    /// events and commands.
    pub(super) async fn save(
        &self,
        tx: &mut PgConnection,
        instance: &mut SagaInstance<D>,
    ) -> Result<(), SagaError> {
        let (after, events, changes, sent) = self.transition(instance)?;
        let rows = EventRows::of(&events, changes);
        // `clock_timestamp()`: a consumer may handle several messages in one
        // transaction, whose `now()` is its start.
        let sql = format!(
            "WITH updated AS ( \
                 UPDATE saga_state SET current_step = $3, payload = $4, status = $5, step_status = $6, \
                 deadline = $7, definition_version = $8, version = version + 1, \
                 updated_at = clock_timestamp() \
                 WHERE id = $1 AND version = $2 RETURNING version), \
             events AS ( \
                 INSERT INTO saga_events (saga_id, saga_type, version, at, kind, step, detail, changes) \
                 SELECT $1, $9, u.version, $10, e.kind, e.step, e.detail, e.changes \
                 FROM updated AS u, \
                      UNNEST($11::text[], $12::text[], $13::jsonb[], $14::jsonb[]) \
                      WITH ORDINALITY AS e(kind, step, detail, changes, n) ORDER BY e.n), \
             sent AS ({}) \
             SELECT count(*) FROM updated",
            self.outbox.insert_from("updated", 15)
        );
        let query = sqlx::query_scalar::<_, i64>(&sql)
            .bind(instance.id)
            .bind(instance.version)
            .bind(&instance.current_step)
            .bind(&after.payload)
            .bind(instance.status.as_str())
            .bind(sqlx::types::Json(&after.steps))
            .bind(instance.deadline)
            .bind(to_column(instance.definition_version))
            .bind(&self.definition().name);
        let updated = bind_tail(query, self.clock.now(), &rows, &sent)
            .fetch_one(&mut *tx)
            .instrument(sent.span.clone())
            .await?;
        if updated == 0 {
            self.conflicts
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            return Err(SagaError::Conflict(instance.id));
        }
        self.outbox.inserted(tx, &sent.ids).await?;
        instance.loaded = Some(after);
        instance.version += 1;
        Ok(())
    }

    /// Writes the transition's events (the audit trail) of an instance whose row
    /// is unchanged (at `version`): with what it changed on the first, and the
    /// saga's change of status last.
    pub(super) async fn write_trail(
        &self,
        tx: &mut PgConnection,
        instance: &mut SagaInstance<D>,
        version: i32,
        after: Snapshot,
    ) -> Result<(), SagaError> {
        // Commands come only with a transition that stores the row (`save`); any
        // queued here are written all the same, never dropped.
        for command in std::mem::take(&mut instance.outgoing) {
            self.outbox.publish(tx, &command).await?;
        }
        let (events, changes) = self.take_trail(instance, &after);
        audit::write(
            tx,
            instance.id,
            &self.definition().name,
            version,
            self.clock.now(),
            &events,
            changes,
        )
        .await?;
        instance.loaded = Some(after);
        Ok(())
    }

    /// What storing the instance writes: its state, the transition's events (with
    /// the changed fields) and its commands, taken from the instance.
    #[allow(clippy::type_complexity)]
    fn transition(
        &self,
        instance: &mut SagaInstance<D>,
    ) -> Result<
        (
            Snapshot,
            Vec<PendingEvent>,
            Option<serde_json::Value>,
            OutboxRows,
        ),
        SagaError,
    > {
        let after = self.snapshot(instance)?;
        let (events, changes) = self.take_trail(instance, &after);
        let sent = self.outbox.rows(&std::mem::take(&mut instance.outgoing));
        Ok((after, events, changes, sent))
    }

    /// The events of this transaction, with the status change and the changed
    /// fields since the instance was loaded; the instance's trail is emptied.
    fn take_trail(
        &self,
        instance: &mut SagaInstance<D>,
        after: &Snapshot,
    ) -> (Vec<PendingEvent>, Option<serde_json::Value>) {
        let before = instance.loaded.as_ref();
        let from = before.map_or(SagaStatus::Started.as_str(), |b| b.status.as_str());
        if from != after.status {
            let detail = serde_json::json!({"from": from, "to": after.status});
            instance.record(EventKind::StatusChanged, None, detail);
        }
        let changes = audit::changes(&self.definition().name, instance.loaded.as_ref(), after);
        if instance.trail.is_empty() && changes.is_some() {
            // Every path records its cause first; a change without one is still kept.
            instance.record(EventKind::StatusChanged, None, serde_json::json!({}));
        }
        (std::mem::take(&mut instance.trail), changes)
    }
}

type CountQuery<'q> =
    sqlx::query::QueryScalar<'q, sqlx::Postgres, i64, sqlx::postgres::PgArguments>;

/// Binds what both statements end with: the events' time, the events and the
/// commands.
fn bind_tail<'q>(
    query: CountQuery<'q>,
    at: chrono::DateTime<chrono::Utc>,
    rows: &'q EventRows<'q>,
    sent: &'q OutboxRows,
) -> CountQuery<'q> {
    query
        .bind(at)
        .bind(&rows.kinds)
        .bind(&rows.steps)
        .bind(&rows.details)
        .bind(&rows.changes)
        .bind(&sent.ids)
        .bind(&sent.aggregate_types)
        .bind(&sent.aggregate_ids)
        .bind(&sent.types)
        .bind(&sent.payloads)
        .bind(&sent.headers)
}
