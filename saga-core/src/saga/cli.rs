//! The operator's command line, for a service to embed next to its orchestrator:
//! `<service> saga list --failed`, `list --stuck 600`, `retry <id>`, `abort <id>`,
//! `trail <id>` (what happened to one saga), `verify-trail` (every saga rebuilt from
//! its audit trail and compared with `saga_state`).

use std::time::Duration;

use clap::Subcommand;
use uuid::Uuid;

use crate::saga::audit::{self, SagaEvent};
use crate::saga::{Orchestrator, SagaAdmin, SagaData, SagaError, SagaSummary};

/// Saga operations for operators.
#[derive(Debug, Clone, Subcommand)]
pub enum SagaCommand {
    /// List sagas in COMPENSATION_FAILED (default) or stuck ones.
    List {
        /// List running sagas without progress for this many seconds instead.
        #[arg(long, value_name = "SECONDS")]
        stuck: Option<u64>,
    },
    /// Try the failed compensation of a COMPENSATION_FAILED saga again.
    Retry { id: Uuid },
    /// Abort a running saga: compensate every completed step.
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

/// Runs one operator command; returns what to print.
pub async fn run<D: SagaData + Clone>(
    admin: &SagaAdmin,
    orchestrator: &Orchestrator<D>,
    command: SagaCommand,
) -> Result<String, SagaError> {
    match command {
        SagaCommand::List { stuck } => {
            let sagas = match stuck {
                Some(seconds) => admin.stuck(Duration::from_secs(seconds)).await?,
                None => admin.failed().await?,
            };
            Ok(table(&sagas))
        }
        SagaCommand::Retry { id } => {
            admin.retry_compensation(orchestrator, id).await?;
            Ok(format!("saga {id}: compensation retried\n"))
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

/// Sagas as a table for a terminal.
pub fn table(sagas: &[SagaSummary]) -> String {
    if sagas.is_empty() {
        return "no sagas\n".to_owned();
    }
    let mut text = format!(
        "{:<36}  {:<20}  {:<20}  {:<16}  {}\n",
        "id", "type", "status", "step", "updated"
    );
    for s in sagas {
        text.push_str(&format!(
            "{:<36}  {:<20}  {:<20}  {:<16}  {}\n",
            s.id,
            s.saga_type,
            s.status,
            s.current_step.as_deref().unwrap_or("-"),
            s.updated_at.format("%Y-%m-%d %H:%M:%S")
        ));
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
