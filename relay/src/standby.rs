//! Several relays, one slot: who holds it, waiting for it, taking it over.
//!
//! A slot has one reader. Relays configured alike for one database (the sidecars of
//! a replicated service) elect themselves by taking the slot: `START_REPLICATION`
//! succeeds for one of them, and the others stand by. A standby looks at the slot
//! every `standby_poll_interval` with one query on its replication connection and
//! starts streaming as soon as the slot has no holder:
//!
//! - the holder was **killed**: its TCP connection closes, its server process sees
//!   the end of the connection and exits at once, releasing the slot; the next look
//!   finds it free (takeover within a poll interval and a connection).
//! - the holder was **stopped** (a rolling deploy): it drains, confirms and ends its
//!   stream; the same.
//! - the holder **hangs** (a paused process, a frozen node): its server process lives
//!   on and keeps the slot until `wal_sender_timeout`. `pg_stat_replication.reply_time`
//!   changes with every status update the holder sends; a healthy relay sends one at
//!   least every `status_interval` (validated to be under half the bound), whether
//!   it reads or waits for its sink. A standby that has seen the same `reply_time`
//!   for `takeover_after`, on its own monotonic clock, ends that server process with
//!   `pg_terminate_backend` (allowed for the same role, or with `pg_signal_backend`)
//!   and takes the slot. `reply_time` is the holder's clock, so it is compared with
//!   itself only, never with another clock: skew between machines changes nothing.
//!   The query ends the process only if it still holds the slot with that same
//!   `reply_time`, so a holder that woke up in between is left alone.
//!
//! Why nothing is lost: a relay that takes the slot starts from the slot's confirmed
//! position, read just before `START_REPLICATION`, and everything after it is sent
//! again by the server; the previous holder confirmed only what its broker had
//! acknowledged. Why duplicates stay bounded: what the previous holder delivered
//! without confirming is at most its in-flight window (see [`crate::stream`]), and a
//! hung holder that wakes up after losing its connection delivers at most the
//! records it had already handed to its sink.
//!
//! Seeing `reply_time` needs the privileges of `pg_read_all_stats` (or superuser);
//! without them the standby cannot tell a hung holder from a busy one, says so once,
//! and waits for the server's `wal_sender_timeout` to end the holder's process.

use std::fmt;
use std::time::{Duration, Instant};

use crate::replication::{ReplicationClient, ReplicationError};
use crate::sql;

/// The process holding a slot, as `pg_replication_slots` and `pg_stat_replication`
/// show it.
#[derive(Debug, Clone, PartialEq)]
pub struct Holder {
    /// Its server process.
    pub pid: u32,
    /// The client's `application_name`, when visible.
    pub application_name: Option<String>,
    /// The client's address, when visible (`None` also for a Unix socket).
    pub client_addr: Option<String>,
    /// Its last status update's timestamp (the holder's clock, as text); `None`
    /// before the first one.
    pub reply_time: Option<String>,
    /// Whether this role may see the holder's details (`pg_read_all_stats`).
    pub visible: bool,
    /// The server's clock minus `reply_time` (or minus its start, before the first
    /// update), for reports; `None` when not visible.
    pub silent_for: Option<Duration>,
}

impl fmt::Display for Holder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "server process {}", self.pid)?;
        match (&self.application_name, &self.client_addr) {
            (Some(name), Some(addr)) if !name.is_empty() => write!(f, " ({name} from {addr})")?,
            (Some(name), None) if !name.is_empty() => write!(f, " ({name})")?,
            (_, Some(addr)) => write!(f, " (from {addr})")?,
            _ => {}
        }
        if let Some(silent) = self.silent_for {
            write!(f, ", last status update {} s ago", silent.as_secs())?;
        }
        Ok(())
    }
}

/// Reading the slot or ending its holder failed.
#[derive(Debug, thiserror::Error)]
pub enum StandbyError {
    #[error("cannot read who holds slot {slot}")]
    Query {
        slot: String,
        #[source]
        source: ReplicationError,
    },
    #[error("slot {0} does not exist (dropped while this relay stood by?)")]
    Missing(String),
    #[error("unexpected answer about slot {slot}: {answer}")]
    Unexpected { slot: String, answer: String },
}

impl StandbyError {
    /// Whether trying again may succeed.
    pub fn is_transient(&self) -> bool {
        match self {
            StandbyError::Query { source, .. } => source.is_transient(),
            StandbyError::Missing(_) | StandbyError::Unexpected { .. } => false,
        }
    }
}

/// Who streams from `slot`; `None` when it is free.
pub async fn holder(
    client: &mut ReplicationClient,
    slot: &str,
) -> Result<Option<Holder>, StandbyError> {
    // reply_time is PostgreSQL 12+; backend_start covers a holder that has not
    // replied yet. Both are NULL for a role without pg_read_all_stats.
    let query = format!(
        "SELECT s.active_pid, r.application_name, \
                host(r.client_addr), \
                extract(epoch FROM now() - coalesce(r.reply_time, r.backend_start)), \
                r.reply_time, r.state \
         FROM pg_replication_slots s \
         LEFT JOIN pg_stat_replication r ON r.pid = s.active_pid \
         WHERE s.slot_name = {}",
        sql::literal(slot)
    );
    let rows = run(client, slot, &query).await?;
    let row = rows
        .first()
        .ok_or_else(|| StandbyError::Missing(slot.to_owned()))?;
    parse_holder(slot, row)
}

fn parse_holder(slot: &str, row: &[Option<String>]) -> Result<Option<Holder>, StandbyError> {
    let field = |i: usize| row.get(i).cloned().flatten();
    let unexpected = |answer: String| StandbyError::Unexpected {
        slot: slot.to_owned(),
        answer,
    };
    let holder = match field(0) {
        None => None,
        Some(pid) => Some(Holder {
            pid: pid
                .parse()
                .map_err(|_| unexpected(format!("active_pid {pid:?}")))?,
            application_name: field(1),
            client_addr: field(2),
            reply_time: field(4),
            visible: field(5).is_some(),
            silent_for: match field(3) {
                None => None,
                Some(secs) => {
                    let secs: f64 = secs
                        .parse()
                        .map_err(|_| unexpected(format!("seconds since reply {secs:?}")))?;
                    // A clock step may make it negative.
                    Some(Duration::from_secs_f64(secs.max(0.0)))
                }
            },
        }),
    };
    Ok(holder)
}

/// Ends `holder`'s server process if it still holds `slot` and its last status
/// update is still the one in `holder`. Returns whether it did.
pub async fn end_silent_holder(
    client: &mut ReplicationClient,
    slot: &str,
    holder: &Holder,
) -> Result<bool, StandbyError> {
    let same_reply = match &holder.reply_time {
        Some(time) => format!("r.reply_time = {}::timestamptz", sql::literal(time)),
        None => "r.reply_time IS NULL".to_owned(),
    };
    let query = format!(
        "SELECT pg_terminate_backend(r.pid) \
         FROM pg_replication_slots s JOIN pg_stat_replication r ON r.pid = s.active_pid \
         WHERE s.slot_name = {} AND r.pid = {} AND {same_reply}",
        sql::literal(slot),
        holder.pid
    );
    let rows = run(client, slot, &query).await?;
    Ok(rows
        .first()
        .and_then(|row| row.first().cloned().flatten())
        .is_some_and(|ended| ended == "t"))
}

async fn run(
    client: &mut ReplicationClient,
    slot: &str,
    query: &str,
) -> Result<Vec<Vec<Option<String>>>, StandbyError> {
    client
        .simple_query(query)
        .await
        .map_err(|source| StandbyError::Query {
            slot: slot.to_owned(),
            source,
        })
}

/// How long a holder has been silent, on the standby's own clock: since its
/// `reply_time` was first seen as it is now.
#[derive(Debug, Default)]
pub struct Silence {
    seen: Option<(u32, Option<String>, Instant)>,
}

impl Silence {
    /// `holder` as seen now; how long it has looked like this.
    pub fn observe(&mut self, holder: &Holder, now: Instant) -> Duration {
        match &self.seen {
            Some((pid, reply, since)) if *pid == holder.pid && *reply == holder.reply_time => {
                now.saturating_duration_since(*since)
            }
            _ => {
                self.seen = Some((holder.pid, holder.reply_time.clone(), now));
                Duration::ZERO
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(values: &[Option<&str>]) -> Vec<Option<String>> {
        values.iter().map(|v| v.map(str::to_owned)).collect()
    }

    #[test]
    fn a_free_slot_has_no_holder() {
        let holder = parse_holder("s", &row(&[None, None, None, None, None, None])).unwrap();
        assert_eq!(holder, None);
    }

    #[test]
    fn a_held_slot_names_its_holder() {
        let holder = parse_holder(
            "s",
            &row(&[
                Some("4242"),
                Some("outbox-relay"),
                Some("10.0.0.7"),
                Some("12.5"),
                Some("2026-12-06 08:00:00+00"),
                Some("streaming"),
            ]),
        )
        .unwrap()
        .unwrap();
        assert_eq!(holder.pid, 4242);
        assert_eq!(holder.silent_for, Some(Duration::from_millis(12_500)));
        assert_eq!(
            holder.to_string(),
            "server process 4242 (outbox-relay from 10.0.0.7), last status update 12 s ago"
        );
    }

    #[test]
    fn a_holder_without_visible_details_is_still_a_holder() {
        let holder = parse_holder("s", &row(&[Some("7"), None, None, None, None, None]))
            .unwrap()
            .unwrap();
        assert_eq!(holder.silent_for, None);
        assert!(!holder.visible);
        assert_eq!(holder.to_string(), "server process 7");
    }

    #[test]
    fn garbage_is_refused() {
        let bad_pid = row(&[Some("x"), None, None, None, None, None]);
        assert!(parse_holder("s", &bad_pid).is_err());
        let bad_seconds = row(&[Some("7"), None, None, Some("soon"), None, None]);
        assert!(parse_holder("s", &bad_seconds).is_err());
    }

    fn seen(pid: u32, reply: Option<&str>) -> Holder {
        Holder {
            pid,
            application_name: None,
            client_addr: None,
            reply_time: reply.map(str::to_owned),
            visible: true,
            silent_for: None,
        }
    }

    #[test]
    fn silence_counts_from_the_first_sight_of_a_reply_and_restarts_with_a_new_one() {
        let start = Instant::now();
        let at = |ms| start + Duration::from_millis(ms);
        let mut silence = Silence::default();
        // (holder, its last reply, when seen, silence expected)
        let sightings = [
            (7, Some("t1"), 0, 0),
            (7, Some("t1"), 2_500, 2_500),
            // A new status update: silent no longer.
            (7, Some("t2"), 3_000, 0),
            (7, Some("t2"), 4_000, 1_000),
            // Another holder starts its own count.
            (8, Some("t2"), 9_000, 0),
            (8, None, 9_500, 0),
            (8, None, 10_000, 500),
        ];
        for (pid, reply, when, expected) in sightings {
            assert_eq!(
                silence.observe(&seen(pid, reply), at(when)),
                Duration::from_millis(expected),
                "holder {pid} with {reply:?} at {when} ms"
            );
        }
    }
}
