//! How instances of an older version of a saga definition move onto a newer one:
//! an explicit map of step names, declared on the newer definition
//! ([`SagaBuilder::migrate_from`](crate::saga::SagaBuilder::migrate_from)).
//!
//! Why a moved instance is driven as if it had run the new version:
//! - Every step the instance has a state for must have a place in the new version:
//!   the same name, a declared rename, or a declared removal. A removed step that
//!   ran (or may have run) and is not undone would never be compensated, and a
//!   removed step that is current would never be answered: the map refuses both,
//!   so such an instance stays on its version (listed for an operator) instead of
//!   losing an undo.
//! - A saga running forward is past every step before its current one. A step the
//!   new version puts there must have succeeded (under its old or its new name) or
//!   be declared [`added`](StepMap::added): then it is marked skipped, and neither
//!   runs nor is compensated. Anything else means the map does not describe the
//!   change, and the map refuses to guess.
//! - Steps after the current one run as the new version says, whether they are new
//!   or not; compensations walk the new version's steps backwards over the states
//!   the instance carries, under their new names.
//! - A participant knows a step by the name its commands carried (`saga-step`, its
//!   barrier's branch). A renamed step that had sent a command keeps that name as
//!   its branch ([`StepState::branch`]) for every later command (a retry, its
//!   compensation): the participant's barrier then matches the compensation with
//!   the action it undoes, instead of taking it for a compensation of a step that
//!   never ran (which would undo nothing).
//! - The map is applied to the stored state only (step names, current step, the
//!   version), in the transaction of the instance's next change, and recorded in
//!   its audit trail: nothing is sent, nothing is undone by the move itself.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::json;

use crate::saga::state::StepState;
use crate::status::SagaStatus;

/// The steps of an older definition version, mapped onto the version that
/// declares the map: renamed, added and removed steps. A step not named keeps its
/// name (and must exist in the newer version if an instance ran it).
///
/// ```
/// use saga_core::saga::StepMap;
/// let map = StepMap::new().rename("reserve", "reserve-goods").added("check-fraud");
/// # let _ = map;
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StepMap {
    /// Old name → new name.
    renamed: BTreeMap<String, String>,
    /// Steps new in the newer version.
    added: BTreeSet<String>,
    /// Steps of the older version the newer one no longer has.
    removed: BTreeSet<String>,
    /// A contradiction found while building the map, reported when the
    /// definition is built.
    error: Option<String>,
}

/// The stored state of an instance moved onto a newer version, and what the move
/// did (for the audit trail).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Migration {
    pub(crate) from: u32,
    pub(crate) to: u32,
    pub(crate) current_step: Option<String>,
    pub(crate) steps: BTreeMap<String, StepState>,
    /// The renames that applied to this instance, old → new.
    pub(crate) renamed: BTreeMap<String, String>,
    /// Steps whose (inert) states were dropped.
    pub(crate) removed: Vec<String>,
    /// Added steps the saga had gone past: marked skipped.
    pub(crate) skipped: Vec<String>,
}

impl Migration {
    /// The `definition_migrated` event's detail.
    pub(crate) fn detail(&self) -> serde_json::Value {
        json!({
            "from": self.from,
            "to": self.to,
            "renamed": self.renamed,
            "removed": self.removed,
            "skipped": self.skipped,
        })
    }
}

impl StepMap {
    /// A map that keeps every step's name.
    pub fn new() -> StepMap {
        StepMap::default()
    }

    /// Step `from` of the older version is step `to` of the newer one.
    #[must_use]
    pub fn rename(mut self, from: impl Into<String>, to: impl Into<String>) -> StepMap {
        let (from, to) = (from.into(), to.into());
        if self.renamed.values().any(|t| *t == to) {
            self.fail(format!("two steps are renamed to {to}"));
        }
        if let Some(earlier) = self.renamed.insert(from.clone(), to) {
            self.fail(format!("step {from} is renamed twice (also to {earlier})"));
        }
        self
    }

    /// Step `step` is new in the newer version. An instance already past its place
    /// skips it; one that has not reached it yet runs it.
    #[must_use]
    pub fn added(mut self, step: impl Into<String>) -> StepMap {
        self.added.insert(step.into());
        self
    }

    /// Step `step` of the older version is gone. An instance that ran it (and has
    /// not undone it) cannot move: it would never be compensated.
    #[must_use]
    pub fn removed(mut self, step: impl Into<String>) -> StepMap {
        self.removed.insert(step.into());
        self
    }

    fn fail(&mut self, error: String) {
        self.error.get_or_insert(error);
    }

    /// Checks the map against the steps of the version that declares it.
    pub(crate) fn check(&self, target: &[&str]) -> Result<(), String> {
        if let Some(error) = &self.error {
            return Err(error.clone());
        }
        let has = |name: &str| target.contains(&name);
        for (from, to) in &self.renamed {
            if !has(to) {
                return Err(format!(
                    "step {from} is renamed to {to}, which is not a step"
                ));
            }
            if self.removed.contains(from) {
                return Err(format!("step {from} is both renamed and removed"));
            }
            if self.added.contains(to) {
                return Err(format!("step {to} is both a rename's target and added"));
            }
        }
        if let Some(step) = self.added.iter().find(|s| !has(s)) {
            return Err(format!("added step {step} is not a step"));
        }
        if let Some(step) = self.removed.iter().find(|s| has(s)) {
            return Err(format!("removed step {step} is still a step"));
        }
        Ok(())
    }

    /// Moves an instance of version `from` (its `status`, `current_step` and step
    /// states) onto version `to`, whose steps are `target` in order; why not, when
    /// the map does not describe the instance.
    pub(crate) fn apply(
        &self,
        from: u32,
        to: u32,
        target: &[&str],
        status: SagaStatus,
        current_step: Option<&str>,
        steps: &BTreeMap<String, StepState>,
    ) -> Result<Migration, String> {
        let mut migration = Migration {
            from,
            to,
            current_step: None,
            steps: BTreeMap::new(),
            renamed: BTreeMap::new(),
            removed: Vec::new(),
            skipped: Vec::new(),
        };
        for (name, state) in steps {
            let Some(new) = self.new_name(name, to, target)? else {
                // A failed compensation may be retried by an operator: it still undoes.
                let undoes = !matches!(status, SagaStatus::Completed | SagaStatus::Aborted);
                if state.needs_undoing() && undoes {
                    return Err(format!(
                        "step {name}, removed in version {to}, has run and would never be compensated"
                    ));
                }
                if current_step == Some(name.as_str()) {
                    return Err(format!(
                        "step {name}, removed in version {to}, is the current step"
                    ));
                }
                migration.removed.push(name.clone());
                continue;
            };
            let mut state = state.clone();
            if new != *name {
                migration.renamed.insert(name.clone(), new.clone());
                // Participants keep knowing the step by the name they saw.
                let branch = state.branch.take().unwrap_or_else(|| name.clone());
                state.branch = (branch != new).then_some(branch);
            }
            if migration.steps.insert(new.clone(), state).is_some() {
                return Err(format!("two steps would be named {new}"));
            }
        }
        if let Some(current) = current_step {
            let Some(new) = self.new_name(current, to, target)? else {
                return Err(format!(
                    "step {current}, removed in version {to}, is the current step"
                ));
            };
            migration.current_step = Some(new);
        }
        // A saga going forward (or suspended on its failed step, which may go
        // forward again) is past every step before its current one.
        let forward = matches!(status, SagaStatus::Started | SagaStatus::Suspended);
        if let (true, Some(current)) = (forward, &migration.current_step) {
            let position = target.iter().position(|s| s == current).unwrap_or(0);
            for step in &target[..position] {
                let state = migration.steps.get(*step);
                if state.is_some_and(StepState::is_passed) {
                    continue;
                }
                if state.is_none() && self.added.contains(*step) {
                    let state = migration.steps.entry((*step).to_owned()).or_default();
                    state.skipped = true;
                    state.reason = Some(format!(
                        "added in version {to} after the saga had gone past its place"
                    ));
                    migration.skipped.push((*step).to_owned());
                    continue;
                }
                return Err(format!(
                    "step {step} comes before the current step {current} in version {to}, but the \
                     saga never ran it and the migration does not declare it added"
                ));
            }
        }
        Ok(migration)
    }

    /// A step's name in version `to`; `None` when the map removes it.
    fn new_name(&self, name: &str, to: u32, target: &[&str]) -> Result<Option<String>, String> {
        if let Some(new) = self.renamed.get(name) {
            return Ok(Some(new.clone()));
        }
        if self.removed.contains(name) {
            return Ok(None);
        }
        if target.contains(&name) {
            return Ok(Some(name.to_owned()));
        }
        Err(format!(
            "step {name} is not in version {to}, and the migration neither renames nor removes it"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::status::StepStatus;

    const V2: &[&str] = &[
        "create",
        "reserve-goods",
        "check-fraud",
        "reserve-credit",
        "approve",
    ];

    fn state(status: StepStatus) -> StepState {
        let mut state = StepState::default();
        state.set(status);
        state
    }

    fn steps(list: &[(&str, StepStatus)]) -> BTreeMap<String, StepState> {
        list.iter()
            .map(|(name, status)| ((*name).to_owned(), state(*status)))
            .collect()
    }

    fn map() -> StepMap {
        StepMap::new()
            .rename("reserve", "reserve-goods")
            .added("check-fraud")
    }

    #[test]
    fn a_map_is_checked_against_the_steps_of_its_version() {
        assert_eq!(map().check(V2), Ok(()));
        let unknown = StepMap::new().rename("reserve", "reserve-stock");
        assert!(unknown.check(V2).unwrap_err().contains("reserve-stock"));
        let twice = StepMap::new()
            .rename("a", "reserve-goods")
            .rename("b", "reserve-goods");
        assert!(twice.check(V2).unwrap_err().contains("two steps"));
        let renamed_twice = StepMap::new()
            .rename("a", "reserve-goods")
            .rename("a", "approve");
        assert!(renamed_twice.check(V2).unwrap_err().contains("twice"));
        assert!(StepMap::new().added("x").check(V2).is_err());
        assert!(StepMap::new().removed("approve").check(V2).is_err());
        let both = StepMap::new().rename("a", "approve").removed("a");
        assert!(both.check(V2).is_err());
    }

    #[test]
    fn a_waiting_saga_is_renamed_and_runs_the_added_step_later() {
        let mut waiting = steps(&[
            ("create", StepStatus::Succeeded),
            ("reserve", StepStatus::Started),
        ]);
        let request = uuid::Uuid::now_v7();
        waiting.get_mut("reserve").unwrap().request_id = Some(request);
        let moved = map()
            .apply(1, 2, V2, SagaStatus::Started, Some("reserve"), &waiting)
            .unwrap();
        assert_eq!(moved.current_step.as_deref(), Some("reserve-goods"));
        assert_eq!(moved.steps["reserve-goods"].request_id, Some(request));
        // Its participant knows it by the name its command carried.
        assert_eq!(
            moved.steps["reserve-goods"].branch.as_deref(),
            Some("reserve")
        );
        assert_eq!(moved.steps["create"].branch, None);
        // Renamed again, it keeps the first name; renamed back, it needs none.
        let again = StepMap::new().rename("reserve-goods", "goods");
        let twice = again
            .apply(
                2,
                3,
                &["create", "goods"],
                SagaStatus::Started,
                Some("reserve-goods"),
                &moved.steps,
            )
            .unwrap();
        assert_eq!(twice.steps["goods"].branch.as_deref(), Some("reserve"));
        let back = StepMap::new().rename("goods", "reserve");
        let back = back
            .apply(
                3,
                4,
                &["create", "reserve"],
                SagaStatus::Started,
                Some("goods"),
                &twice.steps,
            )
            .unwrap();
        assert_eq!(back.steps["reserve"].branch, None);
        assert!(!moved.steps.contains_key("reserve"));
        // check-fraud comes after the current step: it runs when the saga gets there.
        assert!(!moved.steps.contains_key("check-fraud"));
        assert_eq!(moved.skipped, Vec::<String>::new());
        assert_eq!(moved.renamed["reserve"], "reserve-goods");
        assert_eq!(moved.detail()["renamed"]["reserve"], "reserve-goods");
    }

    #[test]
    fn an_added_step_behind_the_saga_is_skipped() {
        let past = steps(&[
            ("create", StepStatus::Succeeded),
            ("reserve", StepStatus::Succeeded),
            ("reserve-credit", StepStatus::Started),
        ]);
        let moved = map()
            .apply(1, 2, V2, SagaStatus::Started, Some("reserve-credit"), &past)
            .unwrap();
        let fraud = &moved.steps["check-fraud"];
        assert!(fraud.skipped && fraud.status.is_none() && fraud.is_passed());
        assert!(!fraud.needs_undoing());
        assert_eq!(moved.skipped, ["check-fraud"]);
        // Without the declaration the map does not explain the step: no guess.
        let silent = StepMap::new().rename("reserve", "reserve-goods");
        let err = silent
            .apply(1, 2, V2, SagaStatus::Started, Some("reserve-credit"), &past)
            .unwrap_err();
        assert!(
            err.contains("check-fraud") && err.contains("added"),
            "{err}"
        );
    }

    #[test]
    fn a_compensating_saga_keeps_what_it_must_undo_under_the_new_names() {
        let aborting = steps(&[
            ("create", StepStatus::Succeeded),
            ("reserve", StepStatus::Compensating),
            ("reserve-credit", StepStatus::Failed),
        ]);
        let moved = map()
            .apply(1, 2, V2, SagaStatus::Aborting, Some("reserve"), &aborting)
            .unwrap();
        assert_eq!(moved.current_step.as_deref(), Some("reserve-goods"));
        assert!(moved.steps["reserve-goods"].is(StepStatus::Compensating));
        // Nothing is skipped going backwards: the added step never ran, so it has
        // nothing to undo.
        assert!(!moved.steps.contains_key("check-fraud"));
    }

    #[test]
    fn a_removed_step_that_ran_or_is_current_cannot_move() {
        let target: &[&str] = &["create", "reserve-credit", "approve"];
        let gone = StepMap::new().removed("reserve");
        let ran = steps(&[
            ("create", StepStatus::Succeeded),
            ("reserve", StepStatus::Succeeded),
            ("reserve-credit", StepStatus::Started),
        ]);
        let err = gone
            .apply(
                1,
                2,
                target,
                SagaStatus::Started,
                Some("reserve-credit"),
                &ran,
            )
            .unwrap_err();
        assert!(err.contains("never be compensated"), "{err}");
        let current = steps(&[
            ("create", StepStatus::Succeeded),
            ("reserve", StepStatus::Started),
        ]);
        let err = gone
            .apply(1, 2, target, SagaStatus::Started, Some("reserve"), &current)
            .unwrap_err();
        assert!(err.contains("current step"), "{err}");
        // A removed step that was undone already is dropped.
        let undone = steps(&[
            ("create", StepStatus::Compensating),
            ("reserve", StepStatus::Compensated),
            ("reserve-credit", StepStatus::Failed),
        ]);
        let moved = gone
            .apply(1, 2, target, SagaStatus::Aborting, Some("create"), &undone)
            .unwrap();
        assert_eq!(moved.removed, ["reserve"]);
        assert!(!moved.steps.contains_key("reserve"));
    }

    #[test]
    fn a_step_the_map_does_not_place_is_refused() {
        let other = steps(&[
            ("create", StepStatus::Succeeded),
            ("ship", StepStatus::Started),
        ]);
        let err = map()
            .apply(1, 2, V2, SagaStatus::Started, Some("ship"), &other)
            .unwrap_err();
        assert!(err.contains("step ship is not in version 2"), "{err}");
    }
}
