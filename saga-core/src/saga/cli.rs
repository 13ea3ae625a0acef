//! The operator's command line, for a service to embed next to its orchestrator:
//! `<service> saga list` (sagas waiting for an operator), `list --stuck [SECONDS]
//! [--timeouts N]` (stuck ones, with the reason), `retry <id>`, `retry-step <id>`,
//! `restart-step <id>`, `abort <id>`,
//! `trail <id>` (what happened to one saga), `verify-trail` (every saga rebuilt from
//! its audit trail and compared with `saga_state`).

use std::time::Duration;

use clap::Subcommand;
use uuid::Uuid;

use crate::saga::audit::{self, SagaEvent};
use crate::saga::{
    Orchestrator, SagaAdmin, SagaData, SagaError, SagaSummary, StuckRules, StuckSaga,
};

/// Saga operations for operators.
#[derive(Debug, Clone, Subcommand)]
pub enum SagaCommand {
    /// List sagas that wait for an operator (COMPENSATION_FAILED, SUSPENDED), or
    /// stuck ones, with the reason.
    List {
        /// List stuck sagas instead: running ones without progress for N times
        /// their step's timeout (see --timeouts), or for SECONDS when the step has
        /// none (default 600), and running ones on a definition version this code
        /// cannot drive.
        #[arg(long, value_name = "SECONDS", num_args = 0..=1)]
        stuck: Option<Option<u64>>,
        /// With --stuck: how many of its step's timeouts a saga may go without
        /// progress (default 3).
        #[arg(long, value_name = "N", requires = "stuck",
              value_parser = clap::value_parser!(u32).range(1..))]
        timeouts: Option<u32>,
    },
    /// Try the failed compensation of a COMPENSATION_FAILED saga again.
    Retry { id: Uuid },
    /// Send the command of the step a running saga waits on again (a new attempt),
    /// without waiting for its timeout.
    RetryStep { id: Uuid },
    /// Restart the failed step of a SUSPENDED saga (after mending what made it
    /// fail): its command is sent again as a new attempt, and the saga runs on.
    RestartStep { id: Uuid },
    /// Abort a running or suspended saga: compensate every completed step.
    Abort {
        id: Uuid,
        /// Recorded as the reason of the failed step.
        #[arg(long, default_value = "aborted by an operator")]
        reason: String,
    },
    /// Print the number of sagas per type and status.
    Counts,
    /// Print what happened to a saga: its audit trail, oldest first.
    Trail { id: Uuid },
    /// Rebuild every saga from its audit trail and compare with saga_state; fails
    /// when any differs.
    VerifyTrail,
}

/// Runs one operator command; returns what to print. A stuck listing starts from
/// the default [`StuckRules`].
pub async fn run<D: SagaData + Clone>(
    admin: &SagaAdmin,
    orchestrator: &Orchestrator<D>,
    command: SagaCommand,
) -> Result<String, SagaError> {
    run_with(admin, orchestrator, &StuckRules::default(), command).await
}

/// Runs one operator command; a stuck listing starts from `rules` (the service's
/// own), which the command's options override, and knows `orchestrator`'s
/// definitions.
pub async fn run_with<D: SagaData + Clone>(
    admin: &SagaAdmin,
    orchestrator: &Orchestrator<D>,
    rules: &StuckRules,
    command: SagaCommand,
) -> Result<String, SagaError> {
    match command {
        SagaCommand::List {
            stuck: Some(seconds),
            timeouts,
        } => {
            let mut rules = rules.clone().knowing(orchestrator);
            if let Some(seconds) = seconds {
                rules = rules.without_timeout(Duration::from_secs(seconds));
            }
            if let Some(timeouts) = timeouts {
                rules = rules.timeouts(timeouts);
            }
            Ok(stuck_table(&admin.stuck(&rules).await?))
        }
        SagaCommand::List { stuck: None, .. } => Ok(table(&admin.waiting_for_operator().await?)),
        SagaCommand::Retry { id } => {
            admin.retry_compensation(orchestrator, id).await?;
            Ok(format!("saga {id}: compensation retried\n"))
        }
        SagaCommand::RetryStep { id } => {
            admin.retry_step(orchestrator, id).await?;
            Ok(format!("saga {id}: the step's command was sent again\n"))
        }
        SagaCommand::RestartStep { id } => {
            admin.restart_step(orchestrator, id).await?;
            Ok(format!(
                "saga {id}: the failed step was started again; the saga runs on\n"
            ))
        }
        SagaCommand::Abort { id, reason } => {
            admin.abort(orchestrator, id, &reason).await?;
            Ok(format!(
                "saga {id}: aborting, completed steps are compensated\n"
            ))
        }
        SagaCommand::Trail { id } => {
            let mut conn = admin.pool().acquire().await?;
            let events = audit::events(&mut conn, id).await?;
            if events.is_empty() {
                return Err(SagaError::NotFound(id));
            }
            Ok(trail(&events))
        }
        SagaCommand::VerifyTrail => {
            let check = audit::verify(admin.pool(), Some(&orchestrator.definition().name)).await?;
            if check.ok() {
                Ok(check.to_string())
            } else {
                Err(SagaError::Trail(check.to_string()))
            }
        }
        SagaCommand::Counts => Ok(admin
            .counts()
            .await?
            .into_iter()
            .map(|(saga_type, status, n)| format!("{saga_type:<24} {status:<20} {n}\n"))
            .collect()),
    }
}

/// Sagas as a table for a terminal (`def`: the definition version).
pub fn table(sagas: &[SagaSummary]) -> String {
    let rows: Vec<(&SagaSummary, Option<String>)> = sagas.iter().map(|s| (s, None)).collect();
    rows_table(&rows)
}

/// Stuck sagas as a table for a terminal, each with why it is stuck.
pub fn stuck_table(sagas: &[StuckSaga]) -> String {
    let rows: Vec<(&SagaSummary, Option<String>)> = sagas
        .iter()
        .map(|s| (&s.saga, Some(s.reason.to_string())))
        .collect();
    rows_table(&rows)
}

fn rows_table(rows: &[(&SagaSummary, Option<String>)]) -> String {
    if rows.is_empty() {
        return "no sagas\n".to_owned();
    }
    let reasons = rows.iter().any(|(_, reason)| reason.is_some());
    let mut text = format!(
        "{:<36}  {:<20}  {:>3}  {:<20}  {:<16}  {:<19}{}\n",
        "id",
        "type",
        "def",
        "status",
        "step",
        "updated",
        if reasons { "  reason" } else { "" }
    );
    for (s, reason) in rows {
        let line = format!(
            "{:<36}  {:<20}  {:>3}  {:<20}  {:<16}  {:<19}{}",
            s.id,
            s.saga_type,
            s.definition_version,
            s.status,
            s.current_step.as_deref().unwrap_or("-"),
            s.updated_at.format("%Y-%m-%d %H:%M:%S"),
            reason
                .as_ref()
                .map(|r| format!("  {r}"))
                .unwrap_or_default()
        );
        text.push_str(line.trim_end());
        text.push('\n');
    }
    text
}

/// A saga's events as lines for a terminal: time, version, kind, step, detail.
pub fn trail(events: &[SagaEvent]) -> String {
    let mut text = String::new();
    for e in events {
        text.push_str(&format!(
            "{}  v{:<3} {:<21} {:<16} {}\n",
            e.at.format("%Y-%m-%d %H:%M:%S%.3f"),
            e.version,
            e.kind,
            e.step.as_deref().unwrap_or("-"),
            e.detail
        ));
    }
    text
}
