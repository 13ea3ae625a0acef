//! Named fault points, armed by the `OUTBOX_FAILPOINTS` environment variable.
//!
//! The failure-scenario replays (`scripts/scenarios`) must put a fault at an exact
//! place of a running binary: between a consumer's database commit and its offset
//! commit, between the broker's acknowledgement and the relay's confirmation of the
//! slot position. No signal sent from outside can hit such a window reliably, so the
//! code names the window and the scenario arms it:
//!
//! ```text
//! OUTBOX_FAILPOINTS='consumer.after-commit=kill@25;consumer.before-handler=sleep(50-400)'
//! ```
//!
//! Each entry is `point=action`, entries separated by `;`. Actions:
//!
//! - `kill@N`: the process kills itself with SIGKILL at the point's N-th hit (no
//!   destructor, no flush, no offset commit: what a crash or an OOM kill leaves);
//! - `error` or `error*N`: the point reports an injected error on every hit, or on
//!   its first N hits; the code treats it like the real failure at that place;
//! - `sleep(MS)` or `sleep(MIN-MAX)`: the point waits that long (a uniformly drawn
//!   duration for a range), on every hit; `*N` limits it to the first N hits.
//!
//! The points: `consumer.before-handler`, `consumer.before-commit` and
//! `consumer.after-commit` (saga-core's consumer), `relay.after-ack` (between the
//! broker's acknowledgement and the slot's confirmation) and `relay.kafka-fatal`
//! (an `error` there puts the relay's producer in librdkafka's fatal state).
//!
//! Unarmed (the variable unset, the normal case), a point costs one load of an
//! initialised `OnceLock` and a lookup in an empty list. [`init`] parses the
//! variable and refuses a malformed one with a message; binaries call it first, so
//! a typo in a scenario fails at start instead of silently injecting nothing.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

/// The environment variable that arms fault points.
pub const ENV: &str = "OUTBOX_FAILPOINTS";

/// A malformed `OUTBOX_FAILPOINTS`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{ENV}: {entry:?}: {reason} (expected point=kill@N, point=error[*N] or point=sleep(MS|MIN-MAX)[*N], separated by ';')")]
pub struct SpecError {
    pub entry: String,
    pub reason: String,
}

/// What an armed point does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// SIGKILL at the N-th hit.
    Kill { at: u64 },
    /// An injected error, on the first `times` hits (`None`: every hit).
    Error { times: Option<u64> },
    /// A pause between `min` and `max`, on the first `times` hits.
    Sleep {
        min: Duration,
        max: Duration,
        times: Option<u64>,
    },
}

/// The error an armed `error` point reports.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("injected fault at {point}")]
pub struct Injected {
    pub point: &'static str,
}

#[derive(Debug)]
struct Armed {
    action: Action,
    hits: AtomicU64,
}

type Points = HashMap<String, Armed>;

static POINTS: OnceLock<Result<Points, SpecError>> = OnceLock::new();

fn points() -> &'static Result<Points, SpecError> {
    POINTS.get_or_init(|| {
        let spec = std::env::var(ENV).unwrap_or_default();
        parse(&spec).map(|list| {
            list.into_iter()
                .map(|(name, action)| {
                    (
                        name,
                        Armed {
                            action,
                            hits: AtomicU64::new(0),
                        },
                    )
                })
                .collect()
        })
    })
}

/// Parses `OUTBOX_FAILPOINTS` and reports what is armed; an error names the
/// malformed entry.
pub fn init() -> Result<Vec<(String, Action)>, SpecError> {
    match points() {
        Ok(points) => {
            let mut armed: Vec<_> = points
                .iter()
                .map(|(name, a)| (name.clone(), a.action.clone()))
                .collect();
            armed.sort_by(|a, b| a.0.cmp(&b.0));
            for (name, action) in &armed {
                tracing::warn!(point = %name, action = ?action, "fault point armed");
            }
            Ok(armed)
        }
        Err(e) => Err(e.clone()),
    }
}

/// Parses a specification (`point=action;...`).
pub fn parse(spec: &str) -> Result<Vec<(String, Action)>, SpecError> {
    let mut out: Vec<(String, Action)> = Vec::new();
    for entry in spec.split(';').map(str::trim).filter(|e| !e.is_empty()) {
        let fail = |reason: &str| SpecError {
            entry: entry.to_owned(),
            reason: reason.to_owned(),
        };
        let (name, action) = entry
            .split_once('=')
            .ok_or_else(|| fail("no '=' between the point and its action"))?;
        let name = name.trim();
        if name.is_empty() {
            return Err(fail("the point has no name"));
        }
        if out.iter().any(|(n, _)| n == name) {
            return Err(fail("the point is armed twice"));
        }
        let action = parse_action(action.trim()).map_err(|reason| fail(&reason))?;
        out.push((name.to_owned(), action));
    }
    Ok(out)
}

fn parse_action(text: &str) -> Result<Action, String> {
    let count = |s: &str| -> Result<u64, String> {
        match s.trim().parse::<u64>() {
            Ok(n) if n > 0 => Ok(n),
            _ => Err(format!("{s:?} is not a positive count")),
        }
    };
    let (body, times) = match text.rsplit_once('*') {
        Some((body, n)) => (body.trim(), Some(count(n)?)),
        None => (text, None),
    };
    if let Some(n) = body.strip_prefix("kill@") {
        if times.is_some() {
            return Err("kill takes no '*N'".into());
        }
        return Ok(Action::Kill { at: count(n)? });
    }
    if body == "error" {
        return Ok(Action::Error { times });
    }
    if let Some(arg) = body
        .strip_prefix("sleep(")
        .and_then(|s| s.strip_suffix(')'))
    {
        let millis = |s: &str| {
            s.trim()
                .parse::<u64>()
                .map(Duration::from_millis)
                .map_err(|_| format!("{s:?} is not a number of milliseconds"))
        };
        let (min, max) = match arg.split_once('-') {
            Some((a, b)) => (millis(a)?, millis(b)?),
            None => (millis(arg)?, millis(arg)?),
        };
        if min > max {
            return Err("the range's minimum exceeds its maximum".into());
        }
        return Ok(Action::Sleep { min, max, times });
    }
    Err(format!("unknown action {body:?}"))
}

/// Passes fault point `point`: kills the process, waits, or returns an injected
/// error when the point is armed so; returns `Ok` otherwise.
pub async fn hit(point: &'static str) -> Result<(), Injected> {
    match fire(point) {
        Some(Fired::Sleep(d)) => {
            tokio::time::sleep(d).await;
            Ok(())
        }
        Some(Fired::Error) => Err(Injected { point }),
        None => Ok(()),
    }
}

/// Like [`hit`], for code that cannot wait: a `sleep` action blocks the thread.
pub fn hit_blocking(point: &'static str) -> Result<(), Injected> {
    match fire(point) {
        Some(Fired::Sleep(d)) => {
            std::thread::sleep(d);
            Ok(())
        }
        Some(Fired::Error) => Err(Injected { point }),
        None => Ok(()),
    }
}

enum Fired {
    Sleep(Duration),
    Error,
}

fn fire(point: &'static str) -> Option<Fired> {
    let armed = points().as_ref().ok()?.get(point)?;
    let hit = armed.hits.fetch_add(1, Ordering::Relaxed) + 1;
    let within = |times: Option<u64>| times.is_none_or(|n| hit <= n);
    match armed.action {
        Action::Kill { at } if hit == at => kill_self(point, hit),
        Action::Kill { .. } => None,
        Action::Error { times } => within(times).then_some(Fired::Error),
        Action::Sleep { min, max, times } => within(times).then(|| {
            let span = u64::try_from((max - min).as_millis()).unwrap_or(u64::MAX);
            let extra = if span == 0 { 0 } else { draw(hit) % (span + 1) };
            Fired::Sleep(min + Duration::from_millis(extra))
        }),
    }
}

/// SIGKILL to this process. `kill(1)` rather than a system call: the workspace
/// has no unsafe code. The signal arrives while `kill` runs or right after; the
/// thread sleeps meanwhile so the point is never passed.
fn kill_self(point: &'static str, hit: u64) -> ! {
    tracing::error!(point, hit, "fault point: killing this process (SIGKILL)");
    let pid = std::process::id().to_string();
    let _ = std::process::Command::new("kill")
        .args(["-KILL", &pid])
        .status();
    loop {
        std::thread::sleep(Duration::from_secs(1));
    }
}

/// A cheap, well-spread number for the sleep ranges (splitmix64 of the hit count
/// and the clock): the ranges only need to vary, not to be unpredictable.
fn draw(hit: u64) -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::from(d.subsec_nanos()))
        .unwrap_or(0);
    let mut z = hit.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ nanos;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_action() {
        let list = parse(" a=kill@3; b=error ;c=error*2;d=sleep(50);e=sleep(10-20)*4; ").unwrap();
        assert_eq!(
            list,
            vec![
                ("a".into(), Action::Kill { at: 3 }),
                ("b".into(), Action::Error { times: None }),
                ("c".into(), Action::Error { times: Some(2) }),
                (
                    "d".into(),
                    Action::Sleep {
                        min: Duration::from_millis(50),
                        max: Duration::from_millis(50),
                        times: None
                    }
                ),
                (
                    "e".into(),
                    Action::Sleep {
                        min: Duration::from_millis(10),
                        max: Duration::from_millis(20),
                        times: Some(4)
                    }
                ),
            ]
        );
        assert_eq!(parse("").unwrap(), vec![]);
    }

    #[test]
    fn refuses_malformed_entries_naming_them() {
        for (spec, reason) in [
            ("a", "no '='"),
            ("=error", "no name"),
            ("a=kill@0", "positive count"),
            ("a=kill@x", "positive count"),
            ("a=kill@2*3", "no '*N'"),
            ("a=error*0", "positive count"),
            ("a=sleep(20-10)", "minimum exceeds"),
            ("a=sleep(x)", "milliseconds"),
            ("a=explode", "unknown action"),
            ("a=error;a=kill@1", "armed twice"),
        ] {
            let err = parse(spec).unwrap_err();
            assert!(err.reason.contains(reason), "{spec}: {err}");
            assert!(err.to_string().contains(ENV), "{err}");
        }
    }

    #[test]
    fn an_unarmed_point_passes() {
        // OUTBOX_FAILPOINTS is not set for unit tests.
        assert_eq!(hit_blocking("nowhere"), Ok(()));
    }
}
