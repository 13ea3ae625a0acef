//! Stuck sagas: running ones that made no progress for much longer than their
//! step lets them wait, and running ones on a definition version the running code
//! cannot drive. Each comes with its reason.
//!
//! A running saga waits on one step at a time: for its reply (up to the step's
//! timeout), or for its compensation's reply or next retry (up to the step's
//! compensation timeout or the longest backoff). A healthy saga therefore moves
//! within one such wait; [`StuckRules::timeouts`] of them without any change of
//! its row (`updated_at`) means nothing is moving it: no sweeper runs, the
//! sweeper skips it, or its replies go somewhere else. A step without a bound
//! (no timeout) gets an absolute age instead ([`StuckRules::without_timeout`]), as
//! does every saga whose definition these rules do not know.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use sqlx::postgres::PgRow;
use sqlx::types::chrono;
use sqlx::Row;
use uuid::Uuid;

use super::{summary_of, SagaAdmin, SagaSummary};
use crate::saga::engine::{Orchestrator, SagaError};
use crate::saga::versions::{Outlines, Plan};
use crate::saga::SagaData;
use crate::status::SagaStatus;

/// How many of its step's waits a running saga may go without progress before it
/// counts as stuck.
pub const DEFAULT_STUCK_TIMEOUTS: u32 = 3;
/// How long a running saga whose step has no timeout (or whose definition is not
/// known) may go without progress before it counts as stuck.
pub const DEFAULT_STUCK_AFTER: Duration = Duration::from_secs(600);

/// When a running saga counts as stuck.
#[derive(Debug, Clone, PartialEq)]
pub struct StuckRules {
    timeouts: u32,
    without_timeout: Duration,
    /// The definitions known, by saga type.
    sagas: BTreeMap<String, Outlines>,
}

impl Default for StuckRules {
    fn default() -> Self {
        StuckRules {
            timeouts: DEFAULT_STUCK_TIMEOUTS,
            without_timeout: DEFAULT_STUCK_AFTER,
            sagas: BTreeMap::new(),
        }
    }
}

impl StuckRules {
    /// [`DEFAULT_STUCK_TIMEOUTS`] waits, [`DEFAULT_STUCK_AFTER`] without a timeout,
    /// no definitions known.
    pub fn new() -> StuckRules {
        StuckRules::default()
    }

    /// A saga is stuck after `timeouts` times its current step's wait without
    /// progress (at least 1).
    #[must_use]
    pub fn timeouts(mut self, timeouts: u32) -> StuckRules {
        self.timeouts = timeouts.max(1);
        self
    }

    /// A saga whose step has no timeout, or whose definition these rules do not
    /// know, is stuck after `age` without progress.
    #[must_use]
    pub fn without_timeout(mut self, age: Duration) -> StuckRules {
        self.without_timeout = age;
        self
    }

    /// Knows the definitions of `orchestrator`: its steps' timeouts, and which
    /// versions it can drive (a running saga on another version is stuck).
    #[must_use]
    pub fn knowing<D: SagaData + Clone>(self, orchestrator: &Orchestrator<D>) -> StuckRules {
        self.knowing_outlines(orchestrator.outlines().clone())
    }

    fn knowing_outlines(mut self, outlines: Outlines) -> StuckRules {
        self.sagas.insert(outlines.saga().to_owned(), outlines);
        self
    }

    /// How long saga `saga_type` of `version`, in `status` at `step`, may go
    /// without progress, and the step's wait it was computed from.
    fn limit(
        &self,
        saga_type: &str,
        version: u32,
        status: SagaStatus,
        step: Option<&str>,
    ) -> (Duration, Option<Duration>) {
        let outline = self.sagas.get(saga_type).and_then(|o| o.get(version));
        let step = outline.zip(step).and_then(|(o, s)| o.step(s));
        let wait = step.and_then(|s| match status {
            SagaStatus::Started => s.forward_wait,
            _ => s.backward_wait,
        });
        match wait {
            Some(wait) => (wait.saturating_mul(self.timeouts), Some(wait)),
            None => (self.without_timeout, None),
        }
    }

    /// The shortest limit any saga may have: no saga idle for less is stuck.
    fn shortest(&self) -> Duration {
        let waits = self
            .sagas
            .values()
            .flat_map(|o| o.known().into_iter().filter_map(|v| o.get(v)).cloned())
            .flat_map(|o| o.steps)
            .flat_map(|s| [s.forward_wait, s.backward_wait])
            .flatten()
            .map(|w| w.saturating_mul(self.timeouts));
        waits.fold(self.without_timeout, Duration::min)
    }
}

/// Why a saga counts as stuck.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StuckReason {
    /// Its row did not change for `idle`, longer than its `limit`: `timeouts` ×
    /// its step's `wait`, or the absolute age when the step has no wait.
    NoProgress {
        idle: Duration,
        limit: Duration,
        wait: Option<Duration>,
        timeouts: u32,
    },
    /// It is on a definition version the code these rules know cannot drive.
    UnknownVersion(String),
}

impl StuckReason {
    /// A short code, for metric labels: `no_progress` or `unknown_version`.
    pub fn code(&self) -> &'static str {
        match self {
            StuckReason::NoProgress { .. } => "no_progress",
            StuckReason::UnknownVersion(_) => "unknown_version",
        }
    }
}

impl fmt::Display for StuckReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StuckReason::NoProgress {
                idle,
                limit,
                wait: Some(wait),
                timeouts,
            } => write!(
                f,
                "no progress for {} (limit {}: {timeouts} × the step's {} wait)",
                human(*idle),
                human(*limit),
                human(*wait)
            ),
            StuckReason::NoProgress {
                idle,
                limit,
                wait: None,
                ..
            } => write!(
                f,
                "no progress for {} (limit {}: the step has no timeout)",
                human(*idle),
                human(*limit)
            ),
            StuckReason::UnknownVersion(reason) => f.write_str(reason),
        }
    }
}

/// A stuck saga and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StuckSaga {
    pub saga: SagaSummary,
    pub reason: StuckReason,
}

impl SagaAdmin {
    /// Running sagas (`STARTED`, `ABORTING`) that are stuck by `rules`, with the
    /// reason, longest without progress first: on a definition version the known
    /// code cannot drive (a `SUSPENDED` one too: it could not be restarted), or
    /// without progress past their limit. A `SUSPENDED` saga on a known version
    /// is not stuck: it waits for an operator by design, and moves on by itself
    /// when its suspension ends.
    pub async fn stuck(&self, rules: &StuckRules) -> Result<Vec<StuckSaga>, SagaError> {
        let mut stuck: BTreeMap<Uuid, StuckSaga> = BTreeMap::new();
        for outlines in rules.sagas.values() {
            let known: Vec<i32> = outlines
                .known()
                .into_iter()
                .map(|v| i32::try_from(v).unwrap_or(i32::MAX))
                .collect();
            let rows = sqlx::query(&format!(
                "{COLUMNS} WHERE saga_type = $1 AND status IN ('STARTED', 'SUSPENDED', 'ABORTING') \
                 AND NOT (definition_version = ANY($2))"
            ))
            .bind(outlines.saga())
            .bind(&known)
            .fetch_all(self.pool())
            .await?;
            for row in &rows {
                if let Plan::Unknown(reason) = crate::saga::engine::plan_of(outlines, row)? {
                    let saga = summary_of(row)?;
                    let reason = StuckReason::UnknownVersion(reason);
                    stuck.insert(saga.id, StuckSaga { saga, reason });
                }
            }
        }
        let rows = sqlx::query(&format!(
            "{COLUMNS} WHERE status IN ('STARTED', 'ABORTING') AND updated_at < now() - $1"
        ))
        .bind(rules.shortest())
        .fetch_all(self.pool())
        .await?;
        for row in &rows {
            let saga = summary_of(row)?;
            if stuck.contains_key(&saga.id) {
                continue;
            }
            let now: chrono::DateTime<chrono::Utc> = row.try_get("now")?;
            let idle = (now - saga.updated_at).to_std().unwrap_or_default();
            let status = status_of(row)?;
            let (limit, wait) = rules.limit(
                &saga.saga_type,
                saga.definition_version,
                status,
                saga.current_step.as_deref(),
            );
            if idle > limit {
                let reason = StuckReason::NoProgress {
                    idle,
                    limit,
                    wait,
                    timeouts: rules.timeouts,
                };
                stuck.insert(saga.id, StuckSaga { saga, reason });
            }
        }
        let mut stuck: Vec<StuckSaga> = stuck.into_values().collect();
        stuck.sort_by_key(|s| (s.saga.updated_at, s.saga.id));
        Ok(stuck)
    }
}

/// What the stuck listing reads of a saga.
const COLUMNS: &str =
    "SELECT id, saga_type, definition_version, status, current_step, step_status, \
                       updated_at, deadline, now() AS now FROM saga_state";

fn status_of(row: &PgRow) -> Result<SagaStatus, SagaError> {
    let id: Uuid = row.try_get("id")?;
    let status: String = row.try_get("status")?;
    status
        .parse()
        .map_err(|e: crate::status::UnknownStatus| SagaError::Invalid {
            id,
            reason: e.to_string(),
        })
}

/// A duration for people: `1h 2m 3s`, `90ms`.
fn human(d: Duration) -> String {
    if d < Duration::from_secs(1) {
        return format!("{}ms", d.as_millis());
    }
    let s = d.as_secs();
    let parts = [(s / 3600, "h"), (s / 60 % 60, "m"), (s % 60, "s")];
    let text: Vec<String> = parts
        .iter()
        .filter(|(n, _)| *n > 0)
        .map(|(n, unit)| format!("{n}{unit}"))
        .collect();
    text.join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_read_well() {
        let slow = StuckReason::NoProgress {
            idle: Duration::from_secs(3723),
            limit: Duration::from_secs(90),
            wait: Some(Duration::from_secs(30)),
            timeouts: 3,
        };
        assert_eq!(
            slow.to_string(),
            "no progress for 1h 2m 3s (limit 1m 30s: 3 × the step's 30s wait)"
        );
        assert_eq!(slow.code(), "no_progress");
        let untimed = StuckReason::NoProgress {
            idle: Duration::from_secs(700),
            limit: Duration::from_secs(600),
            wait: None,
            timeouts: 3,
        };
        assert_eq!(
            untimed.to_string(),
            "no progress for 11m 40s (limit 10m: the step has no timeout)"
        );
        assert_eq!(human(Duration::from_millis(250)), "250ms");
    }

    #[test]
    fn limits_follow_the_step_and_the_direction() {
        let rules = StuckRules::new()
            .timeouts(0)
            .without_timeout(Duration::from_secs(7));
        assert_eq!(rules.timeouts, 1, "at least one wait");
        // No definitions known: the absolute age, for every saga.
        assert_eq!(
            rules.limit("order", 1, SagaStatus::Started, Some("a")),
            (Duration::from_secs(7), None)
        );
        assert_eq!(rules.shortest(), Duration::from_secs(7));

        let command = |_: &()| crate::saga::Command {
            topic: "t".into(),
            command_type: "C".into(),
            payload: serde_json::json!({}),
        };
        let definition = crate::saga::SagaDefinition::<()>::builder("order")
            .version(2)
            .step("a")
            .invoke_participant(command)
            .with_participant_compensation(command)
            .with_timeout(Duration::from_secs(40))
            .step("b")
            .invoke_participant(command)
            .build()
            .unwrap();
        let mut outlines = Outlines::new("order");
        outlines.add(crate::saga::versions::Outline::of(&definition));
        let rules = StuckRules::new()
            .without_timeout(Duration::from_secs(900))
            .knowing_outlines(outlines);
        let secs = Duration::from_secs;
        // Forward: 3 × the step's timeout; backward: 3 × the longest of the
        // compensation's timeout and its backoff (60 s by default).
        assert_eq!(
            rules.limit("order", 2, SagaStatus::Started, Some("a")),
            (secs(120), Some(secs(40)))
        );
        assert_eq!(
            rules.limit("order", 2, SagaStatus::Aborting, Some("a")),
            (secs(180), Some(secs(60)))
        );
        // No timeout, another version, another saga: the absolute age.
        for (saga, version, step) in [("order", 2, "b"), ("order", 1, "a"), ("refund", 2, "a")] {
            assert_eq!(
                rules.limit(saga, version, SagaStatus::Started, Some(step)),
                (secs(900), None)
            );
        }
        assert_eq!(rules.shortest(), secs(120));
    }
}
