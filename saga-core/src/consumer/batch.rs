//! Several messages of different lanes in one transaction: one `BEGIN`, one journal
//! statement for all of them, the handlers one after the other, one `COMMIT`.
//!
//! Under load a poll hands the consumer many messages at once, and most of a small
//! message's cost is the transaction around it (the begin, the journal insert, the
//! commit and its WAL record, and downstream the relay's and the walsender's work
//! per transaction). A batch pays that once.
//!
//! # Why each message's effects still happen once
//!
//! The batch is the one-message transaction with more rows in it:
//!
//! - `INSERT INTO processed_messages … SELECT … FROM unnest(ids) ON CONFLICT DO
//!   NOTHING RETURNING message_id` journals every message of the batch in one
//!   statement; the ids it returns are the messages seen for the first time. Only
//!   their handlers run, on the same transaction, so each handler's writes commit
//!   exactly with its message's journal row. An id not returned was journalled by
//!   an earlier transaction: a redelivery, skipped as one. Two transactions
//!   inserting the same id meet on the primary key exactly as single messages do.
//! - A batch holds messages of *different* lanes only (each the first waiting
//!   message of its lane), so the per-key order is the one-message path's.
//! - Nothing in a batch can fail on its own. Any error — a handler's, a panic, a
//!   failed statement, a refused commit, a fault injected by a scenario — rolls the
//!   whole transaction back, and every message of the batch then runs alone
//!   through [`process`], with that path's retries, outage handling and dead
//!   letters. No handler's write survives the rollback, so a message whose
//!   handler had already run in the batch runs again as on any transient retry
//!   (handlers are written for that). A `COMMIT` whose outcome is unknown (the
//!   connection broke while committing) is safe in the same way: if it did
//!   commit, the single runs find their journal rows and skip.
//! - The offsets follow the messages: each message of the batch reports its own
//!   outcome to the run loop, which stores offsets as for single messages.
//!
//! A message whose id appears twice in one batch (a producer reusing ids across
//! keys) runs alone after the batch, where the journal skips the second copy.

use std::collections::HashSet;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::Ordering;

use futures::FutureExt;
use tracing::Instrument as _;
use uuid::Uuid;

use super::handling::{process, rollback, Job, Outcome, Shared};
use super::message::IncomingMessage;
use super::MessageHandler;

/// The journal insert of a batch; the ids returned are the messages new to it.
const JOURNAL_INSERT_MANY: &str = "INSERT INTO processed_messages (consumer, message_id) \
     SELECT $1, id FROM unnest($2::uuid[]) AS batch(id) \
     ON CONFLICT DO NOTHING RETURNING message_id";

/// Handles `jobs` (each the head of a different lane) to their ends: together in
/// one transaction when there are several, each alone when that fails. Returns the
/// jobs with their outcomes, in the order given.
pub(super) async fn process_all<H: MessageHandler>(
    shared: &Shared<H>,
    jobs: Vec<Job>,
) -> Vec<(Job, Outcome)> {
    let mut together = Vec::with_capacity(jobs.len());
    let mut alone = Vec::new();
    let mut ids = HashSet::with_capacity(jobs.len());
    for job in jobs {
        // A poison message is dead-lettered by the single path; a repeated id is
        // skipped by it once the batch committed.
        match job.raw.parse() {
            Ok(message) if ids.insert(message.id) => together.push((job, message)),
            _ => alone.push(job),
        }
    }
    let mut done = Vec::with_capacity(together.len() + alone.len());
    if together.len() == 1 {
        alone.insert(0, together.pop().map(|(job, _)| job).expect("one job"));
    } else if !together.is_empty() {
        let messages: Vec<&IncomingMessage> = together.iter().map(|(_, m)| m).collect();
        match apply(shared, &messages).await {
            Ok(new) => {
                let (mut applied, mut skipped) = (0, 0);
                for (job, message) in together {
                    if new.contains(&message.id) {
                        applied += 1;
                    } else {
                        skipped += 1;
                    }
                    done.push((job, Outcome::Done));
                }
                shared.stats.applied.fetch_add(applied, Ordering::Relaxed);
                shared
                    .stats
                    .duplicates
                    .fetch_add(skipped, Ordering::Relaxed);
                tracing::debug!(applied, skipped, "batch committed");
            }
            Err(reason) => {
                tracing::debug!(
                    messages = together.len(),
                    reason = %reason,
                    "batch rolled back, its messages run one by one"
                );
                // Each message's attempt in the batch was rolled back and is tried
                // again (alone).
                let rolled_back = u64::try_from(together.len()).unwrap_or(u64::MAX);
                shared
                    .stats
                    .retried
                    .fetch_add(rolled_back, Ordering::Relaxed);
                let singles: Vec<Job> = together.into_iter().map(|(job, _)| job).collect();
                alone.splice(0..0, singles);
            }
        }
    }
    for job in alone {
        let outcome = process(shared, &job).await;
        done.push((job, outcome));
    }
    done
}

/// One transaction for all `messages`; returns the ids that were new to the
/// journal (their handlers ran and committed), or why the batch was rolled back.
async fn apply<H: MessageHandler>(
    shared: &Shared<H>,
    messages: &[&IncomingMessage],
) -> Result<HashSet<Uuid>, String> {
    let mut tx = shared.pool.begin().await.map_err(|e| e.to_string())?;
    let ids: Vec<Uuid> = messages.iter().map(|m| m.id).collect();
    let new: HashSet<Uuid> = sqlx::query_scalar(JOURNAL_INSERT_MANY)
        .bind(&shared.consumer)
        .bind(&ids)
        .fetch_all(&mut *tx)
        .await
        .map_err(|e| e.to_string())?
        .into_iter()
        .collect();
    for message in messages.iter().filter(|m| new.contains(&m.id)) {
        // Fault point (scenarios): a slow handler, holding its transaction open.
        let _ = failpoints::hit("consumer.before-handler").await;
        let span = super::trace::handling(&shared.consumer, message);
        let handled = AssertUnwindSafe(shared.handler.handle(&mut tx, message))
            .catch_unwind()
            .instrument(span.clone())
            .await;
        let failed = match handled {
            Ok(Ok(())) => continue,
            Ok(Err(err)) => {
                super::trace::failed(&span, &err);
                format!("message {}: {err}", message.id)
            }
            Err(_) => format!("message {}: the handler panicked", message.id),
        };
        rollback(tx).await;
        return Err(failed);
    }
    if let Err(injected) = failpoints::hit("consumer.before-commit").await {
        rollback(tx).await;
        return Err(injected.to_string());
    }
    tx.commit().await.map_err(|e| e.to_string())?;
    // Fault point (scenarios): a crash after the commit, before the offsets are
    // stored; the redeliveries after the restart must be skipped by the journal.
    let _ = failpoints::hit("consumer.after-commit").await;
    Ok(new)
}
