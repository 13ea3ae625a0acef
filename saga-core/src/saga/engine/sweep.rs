//! The timeout sweeper: finds the sagas whose deadline passed and handles each in
//! its own transaction; one it cannot handle is skipped, never a stop for the rest.
//! It also applies the held replies of sagas this code can drive (before their
//! deadlines: the reply may have come in time) and, now and then, looks for sagas
//! on definition versions it cannot drive, which it leaves alone.
//!
//! A deadline is handled in a span under the one the saga started in (stored
//! with it), so a timed-out order's compensation is part of the order's trace.

use std::sync::PoisonError;
use std::time::Duration;

use sqlx::PgPool;
use tracing::Instrument as _;
use uuid::Uuid;

use super::{Orchestrator, SagaError, Skipped, SKIPPED_RETRY};
use crate::saga::SagaData;

impl<D: SagaData + Clone> Orchestrator<D> {
    /// Sagas whose passed deadline the sweep could not handle (their state cannot
    /// be read or moved by this definition), with the reason, oldest first. They
    /// are left as they are for an operator, and tried again every
    /// [`SKIPPED_RETRY`].
    pub fn skipped_sagas(&self) -> Vec<(Uuid, String)> {
        let skipped = self.skipped.lock().unwrap_or_else(PoisonError::into_inner);
        let mut list: Vec<(Uuid, String)> = skipped
            .iter()
            .map(|(id, s)| (*id, s.reason.clone()))
            .collect();
        list.sort();
        list
    }

    /// Handles every saga of this type whose deadline passed by the orchestrator's
    /// clock, each in its own transaction; a saga changed concurrently is left for
    /// the next sweep. A saga whose state this definition cannot handle is skipped,
    /// logged and listed by [`Orchestrator::skipped_sagas`] for [`SKIPPED_RETRY`],
    /// so that it never holds up the others; a database error ends the sweep.
    ///
    /// Before the deadlines, the replies held for sagas this code can drive are
    /// applied (up to `limit` sagas); a saga with held replies waits for them
    /// before its deadline counts. Sagas on versions this code cannot drive are
    /// left alone and listed ([`Orchestrator::unknown_version_sagas`], refreshed
    /// every [`VERSION_CHECK_INTERVAL`](super::VERSION_CHECK_INTERVAL)). Returns
    /// how many deadlines and held replies were handled.
    pub async fn sweep(&self, pool: &PgPool, limit: i64) -> Result<usize, SagaError> {
        let now = self.clock.now();
        if self.version_check_due() {
            self.check_versions(pool).await?;
        }
        let mut passed: Vec<Uuid> = {
            let mut skipped = self.skipped.lock().unwrap_or_else(PoisonError::into_inner);
            // Skipped sagas come back after a while: an operator may have mended them.
            skipped.retain(|_, s| s.retry_at > now);
            skipped.keys().copied().collect()
        };
        let mut handled = self.release_held(pool, limit, &passed).await?;
        passed.extend(self.unknown_version_sagas().into_iter().map(|(id, _)| id));
        let due: Vec<(Uuid, Option<String>, Option<String>)> = sqlx::query_as(
            "SELECT id, traceparent, tracestate FROM saga_state s WHERE saga_type = $1 AND status IN ('STARTED', 'SUSPENDED', 'ABORTING') \
             AND deadline <= $3 AND NOT (id = ANY($4)) AND definition_version = ANY($5) \
             AND NOT EXISTS (SELECT 1 FROM saga_held_replies h WHERE h.saga_id = s.id) \
             ORDER BY deadline LIMIT $2",
        )
        .bind(&self.definition().name)
        .bind(limit)
        .bind(now)
        .bind(&passed)
        .bind(self.drivable_column())
        .fetch_all(pool)
        .await?;
        for (id, traceparent, tracestate) in due {
            let span = self.deadline_span(id, traceparent.as_deref(), tracestate.as_deref());
            let mut tx = pool.begin().await?;
            match self.handle_deadline(&mut tx, id).instrument(span).await {
                Ok(changed) => {
                    tx.commit().await?;
                    handled += usize::from(changed);
                }
                Err(SagaError::Conflict(_)) => tx.rollback().await?,
                // The database's trouble, not the saga's: the next sweep tries again.
                Err(e) if e.is_transient() => return Err(e),
                // Listed (by `drive`) for an operator, and left alone.
                Err(SagaError::UnknownVersion { .. }) => tx.rollback().await?,
                // This saga's own trouble (its state does not fit the definition):
                // one bad saga must not hold up the timeouts and compensation
                // retries of every other, so it is left for an operator and the
                // sweep goes on.
                Err(e) => {
                    tx.rollback().await?;
                    self.skip(id, e.to_string());
                }
            }
        }
        Ok(handled)
    }

    /// The span handling saga `id`'s passed deadline: a child of the span the saga
    /// started in (its stored trace context), so that the commands the sweeper
    /// sends (a step sent again, a compensation) continue the order's trace
    /// instead of starting one of their own. Disabled when tracing is off.
    fn deadline_span(
        &self,
        id: Uuid,
        traceparent: Option<&str>,
        tracestate: Option<&str>,
    ) -> tracing::Span {
        if !telemetry::enabled() {
            return tracing::Span::none();
        }
        let span = tracing::info_span!(
            parent: None,
            "saga deadline",
            otel.kind = "internal",
            "saga.type" = %self.definition().name,
            "saga.id" = %id,
        );
        telemetry::propagation::set_parent(&span, traceparent, tracestate);
        span
    }

    /// Leaves saga `id`, which this code cannot handle for `reason`, out of the
    /// sweeps for [`SKIPPED_RETRY`], and lists it.
    pub(super) fn skip(&self, id: Uuid, reason: String) {
        tracing::error!(saga = %self.definition().name, saga_id = %id, error = %reason, retry_in = ?SKIPPED_RETRY, "cannot handle the saga's passed deadline or held replies; skipped it");
        let retry_at = self.clock.now() + SKIPPED_RETRY;
        self.skipped
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(id, Skipped { reason, retry_at });
    }

    /// Sweeps for passed deadlines every `interval` until `shutdown` resolves.
    pub async fn run_sweeper(
        &self,
        pool: &PgPool,
        interval: Duration,
        shutdown: impl std::future::Future<Output = ()>,
    ) {
        tokio::pin!(shutdown);
        let mut timer = tokio::time::interval(interval);
        timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = &mut shutdown => return,
                _ = timer.tick() => {
                    match self.sweep(pool, 100).await {
                        Ok(0) => {}
                        Ok(n) => tracing::debug!(saga = %self.definition().name, handled = n, "deadlines handled"),
                        Err(e) => tracing::warn!(saga = %self.definition().name, error = %e, "sweeping deadlines failed"),
                    }
                }
            }
        }
    }
}
