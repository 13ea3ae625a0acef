//! Which definition drives a saga instance: the versions an orchestrator knows.
//!
//! An orchestrator runs one current definition and, optionally, older versions of
//! it the code still has ([`Orchestrator::with_previous`]). Every instance is
//! pinned to the version it started with (`saga_state.definition_version`), and:
//!
//! 1. an instance of a version the orchestrator has is driven by that version's
//!    definition: its step names, commands, reply handlers, timeouts and
//!    compensations, whatever the current version says;
//! 2. otherwise, an instance of a version some known definition declares a
//!    migration from ([`SagaBuilder::migrate_from`]) is moved onto that definition
//!    (the highest such version) through the declared [`StepMap`], in the
//!    transaction of its next change and recorded in its audit trail
//!    (`definition_migrated`, with the versions and the renames), and then driven
//!    by it;
//! 3. otherwise (or when the map does not fit the instance, see [`StepMap`]) the
//!    instance is not driven at all: its replies are held, its deadlines wait, and
//!    it is listed ([`Orchestrator::unknown_version_sagas`], the stuck listing of
//!    [`SagaAdmin`]) with the reason, e.g. "definition version 1 unknown (this
//!    code knows 2, 3)".
//!
//! Why this keeps an instance from being mis-driven: the engine resolves an
//! instance's definition from its stored version on every load that may change it,
//! never from the current definition alone, and a step name is only ever looked
//! up in the definition of the instance's version. Moving to another version
//! happens only through a map a developer wrote, which must place every step the
//! instance ran. A version nobody declared is never guessed at.
//!
//! Why a reply for an instance the code cannot drive is held, not dead-lettered or
//! retried: the reply is a fact about a participant's work (goods reserved, a card
//! charged) and the saga needs it once code that knows the version runs again
//! (a rollback is undone, the old definition is put back, or a migration is
//! written). Retrying would hold the reply partition (or end in the dead-letter
//! topic after a few tries anyway); a dead letter depends on the topic's
//! retention and on someone replaying it after the deploy. So the consumer stores
//! the reply in `saga_held_replies`, in the transaction of its journal row, and
//! records `reply_held` in the saga's trail; the partition moves on. The sweeper of
//! an orchestrator that can drive the saga applies its held replies in the order
//! they came, before it looks at the saga's deadline, and deletes them in the same
//! transaction. Until then the saga is listed, counted and shown on the service's
//! health, so an operator knows what the deploy left behind.
//!
//! [`Orchestrator::with_previous`]: crate::saga::Orchestrator::with_previous
//! [`Orchestrator::unknown_version_sagas`]: crate::saga::Orchestrator::unknown_version_sagas
//! [`SagaBuilder::migrate_from`]: crate::saga::SagaBuilder::migrate_from
//! [`SagaAdmin`]: crate::saga::SagaAdmin

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use crate::saga::definition::{
    Action, DefinitionError, SagaDefinition, DEFAULT_COMPENSATION_TIMEOUT,
};
use crate::saga::state::StepState;
use crate::saga::step_map::{Migration, StepMap};
use crate::status::SagaStatus;

/// A definition's versions as an orchestrator holds them: the current one and
/// the older ones it keeps.
pub(crate) struct Versions<D> {
    current: u32,
    definitions: BTreeMap<u32, Arc<SagaDefinition<D>>>,
    outlines: Outlines,
}

impl<D> Versions<D> {
    pub(crate) fn new(current: SagaDefinition<D>) -> Versions<D> {
        let mut outlines = Outlines::new(&current.name);
        outlines.add(Outline::of(&current));
        let version = current.version;
        Versions {
            current: version,
            definitions: BTreeMap::from([(version, Arc::new(current))]),
            outlines,
        }
    }

    /// Keeps `previous`, an older version of the same saga, to finish the instances
    /// started on it.
    pub(crate) fn keep(&mut self, previous: SagaDefinition<D>) -> Result<(), DefinitionError> {
        let name = &self.current().name;
        if previous.name != *name {
            return Err(DefinitionError::OtherSaga {
                saga: previous.name,
                version: previous.version,
                other: name.clone(),
            });
        }
        if previous.version >= self.current || self.definitions.contains_key(&previous.version) {
            return Err(DefinitionError::NotPrevious {
                saga: previous.name,
                version: previous.version,
                known: self.outlines.known(),
            });
        }
        self.outlines.add(Outline::of(&previous));
        self.definitions
            .insert(previous.version, Arc::new(previous));
        Ok(())
    }

    pub(crate) fn current(&self) -> &SagaDefinition<D> {
        &self.definitions[&self.current]
    }

    /// The definition of `version`, if this code has it.
    pub(crate) fn get(&self, version: u32) -> Option<&SagaDefinition<D>> {
        self.definitions.get(&version).map(|d| &**d)
    }

    pub(crate) fn outlines(&self) -> &Outlines {
        &self.outlines
    }
}

/// What the version logic needs of one definition: no actions, no data type.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Outline {
    pub(crate) version: u32,
    pub(crate) steps: Vec<StepOutline>,
    pub(crate) migrations: BTreeMap<u32, StepMap>,
}

/// One step of an [`Outline`].
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct StepOutline {
    pub(crate) name: String,
    /// How long the saga may wait on the step going forward (its timeout), if
    /// that is bounded.
    pub(crate) forward_wait: Option<Duration>,
    /// How long the saga may wait on the step's compensation between two moves
    /// (its reply's timeout or the longest backoff before a retry), if bounded.
    pub(crate) backward_wait: Option<Duration>,
}

impl Outline {
    pub(crate) fn of<D>(definition: &SagaDefinition<D>) -> Outline {
        let backoff = definition.compensation_retry.max_backoff;
        let steps = definition
            .steps
            .iter()
            .map(|step| StepOutline {
                name: step.name.clone(),
                forward_wait: step.timeout.filter(|_| step.is_participant()),
                backward_wait: match &step.compensation {
                    None => None,
                    Some(Action::Local(_)) => Some(backoff),
                    Some(Action::Participant(_)) => Some(
                        step.timeout
                            .unwrap_or(DEFAULT_COMPENSATION_TIMEOUT)
                            .max(backoff),
                    ),
                },
            })
            .collect();
        Outline {
            version: definition.version,
            steps,
            migrations: definition.migrations.clone(),
        }
    }

    fn names(&self) -> Vec<&str> {
        self.steps.iter().map(|s| s.name.as_str()).collect()
    }

    pub(crate) fn step(&self, name: &str) -> Option<&StepOutline> {
        self.steps.iter().find(|s| s.name == name)
    }
}

/// The outlines of the versions of one saga type an orchestrator knows.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Outlines {
    saga: String,
    by_version: BTreeMap<u32, Outline>,
}

/// How an instance of some version is to be driven.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Plan {
    /// By the definition of its own version.
    Run,
    /// Moved onto a newer version first.
    Migrate(Migration),
    /// Not at all: why, for the operator.
    Unknown(String),
}

impl Outlines {
    pub(crate) fn new(saga: &str) -> Outlines {
        Outlines {
            saga: saga.to_owned(),
            by_version: BTreeMap::new(),
        }
    }

    pub(crate) fn add(&mut self, outline: Outline) {
        self.by_version.insert(outline.version, outline);
    }

    /// The saga type.
    pub(crate) fn saga(&self) -> &str {
        &self.saga
    }

    /// The versions whose definitions this code has, oldest first.
    pub(crate) fn known(&self) -> Vec<u32> {
        self.by_version.keys().copied().collect()
    }

    /// The versions this code can drive: its own and those it can move onto one
    /// of its own, oldest first.
    pub(crate) fn drivable(&self) -> Vec<u32> {
        let mut versions = self.known();
        for outline in self.by_version.values() {
            versions.extend(outline.migrations.keys());
        }
        versions.sort_unstable();
        versions.dedup();
        versions
    }

    pub(crate) fn get(&self, version: u32) -> Option<&Outline> {
        self.by_version.get(&version)
    }

    /// Whether instances of `version` are driven by the definition of their own
    /// version.
    pub(crate) fn is_known(&self, version: u32) -> bool {
        self.by_version.contains_key(&version)
    }

    /// The newest known version that declares a migration from `version`.
    fn migration_from(&self, version: u32) -> Option<(&Outline, &StepMap)> {
        self.by_version
            .values()
            .rev()
            .find_map(|o| o.migrations.get(&version).map(|map| (o, map)))
    }

    /// How an instance of `version` in `status`, at `current_step`, with `steps`,
    /// is driven.
    pub(crate) fn plan(
        &self,
        version: u32,
        status: SagaStatus,
        current_step: Option<&str>,
        steps: &BTreeMap<String, StepState>,
    ) -> Plan {
        if self.is_known(version) {
            return Plan::Run;
        }
        let Some((target, map)) = self.migration_from(version) else {
            return Plan::Unknown(self.unknown(version));
        };
        match map.apply(
            version,
            target.version,
            &target.names(),
            status,
            current_step,
            steps,
        ) {
            Ok(migration) => Plan::Migrate(migration),
            Err(why) => Plan::Unknown(format!(
                "definition version {version} cannot move onto version {}: {why} (this code knows {})",
                target.version,
                self.known_list()
            )),
        }
    }

    /// Why instances of `version` are not driven, when no migration applies.
    pub(crate) fn unknown(&self, version: u32) -> String {
        format!(
            "definition version {version} unknown (this code knows {})",
            self.known_list()
        )
    }

    fn known_list(&self) -> String {
        let known: Vec<String> = self.by_version.keys().map(u32::to_string).collect();
        known.join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::saga::definition::{Command, CompensationRetry};
    use crate::status::StepStatus;

    fn command(_: &()) -> Command {
        Command {
            topic: "t".into(),
            command_type: "C".into(),
            payload: serde_json::json!({}),
        }
    }

    fn definition(version: u32, steps: &[&str]) -> SagaDefinition<()> {
        let mut builder = SagaDefinition::<()>::builder("order").version(version);
        for step in steps {
            builder = builder
                .step(*step)
                .invoke_participant(command)
                .with_participant_compensation(command)
                .with_timeout(Duration::from_secs(10));
        }
        builder.build().unwrap()
    }

    fn waiting_on(step: &str) -> BTreeMap<String, StepState> {
        let mut state = StepState::default();
        state.set(StepStatus::Started);
        BTreeMap::from([(step.to_owned(), state)])
    }

    #[test]
    fn an_instance_runs_on_its_own_version_when_the_code_keeps_it() {
        let mut versions = Versions::new(definition(3, &["a", "b"]));
        versions.keep(definition(1, &["x"])).unwrap();
        let outlines = versions.outlines();
        assert_eq!(outlines.known(), [1, 3]);
        assert_eq!(
            outlines.plan(1, SagaStatus::Started, Some("x"), &waiting_on("x")),
            Plan::Run
        );
        assert_eq!(versions.get(1).unwrap().steps()[0].name(), "x");
        assert_eq!(versions.current().version(), 3);
        assert_eq!(
            outlines.plan(2, SagaStatus::Started, Some("x"), &waiting_on("x")),
            Plan::Unknown("definition version 2 unknown (this code knows 1, 3)".into())
        );
    }

    #[test]
    fn a_kept_version_wins_over_a_migration_and_the_newest_migration_wins() {
        let map = || StepMap::new().rename("x", "a");
        let v3 = SagaDefinition::<()>::builder("order")
            .version(3)
            .migrate_from(1, map())
            .step("a")
            .invoke_participant(command)
            .build()
            .unwrap();
        let v2 = SagaDefinition::<()>::builder("order")
            .version(2)
            .migrate_from(1, map())
            .step("a")
            .invoke_participant(command)
            .build()
            .unwrap();
        let mut versions = Versions::new(v3);
        versions.keep(v2).unwrap();
        assert_eq!(versions.outlines().drivable(), [1, 2, 3]);
        let Plan::Migrate(moved) =
            versions
                .outlines()
                .plan(1, SagaStatus::Started, Some("x"), &waiting_on("x"))
        else {
            panic!("version 1 migrates");
        };
        assert_eq!((moved.from, moved.to), (1, 3));
        assert_eq!(moved.current_step.as_deref(), Some("a"));

        versions.keep(definition(1, &["x"])).unwrap();
        assert_eq!(
            versions
                .outlines()
                .plan(1, SagaStatus::Started, Some("x"), &waiting_on("x")),
            Plan::Run
        );
    }

    #[test]
    fn a_migration_that_does_not_fit_the_instance_leaves_it_unknown() {
        let v2 = SagaDefinition::<()>::builder("order")
            .version(2)
            .migrate_from(1, StepMap::new().removed("x"))
            .step("a")
            .invoke_participant(command)
            .build()
            .unwrap();
        let versions = Versions::new(v2);
        let Plan::Unknown(why) =
            versions
                .outlines()
                .plan(1, SagaStatus::Started, Some("x"), &waiting_on("x"))
        else {
            panic!("the current step cannot be removed");
        };
        assert!(
            why.starts_with("definition version 1 cannot move onto version 2: step x")
                && why.ends_with("(this code knows 2)"),
            "{why}"
        );
    }

    #[test]
    fn only_older_versions_of_the_same_saga_are_kept() {
        let mut versions = Versions::new(definition(2, &["a"]));
        assert!(matches!(
            versions.keep(definition(2, &["a"])),
            Err(DefinitionError::NotPrevious { .. })
        ));
        assert!(matches!(
            versions.keep(definition(3, &["a"])),
            Err(DefinitionError::NotPrevious { .. })
        ));
        let other = SagaDefinition::<()>::builder("refund")
            .step("a")
            .invoke_participant(command)
            .build()
            .unwrap();
        assert!(matches!(
            versions.keep(other),
            Err(DefinitionError::OtherSaga { .. })
        ));
    }

    #[test]
    fn definitions_check_their_version_and_migrations() {
        let build = |version: u32, from: u32, map: StepMap| {
            SagaDefinition::<()>::builder("order")
                .version(version)
                .migrate_from(from, map)
                .step("a")
                .invoke_participant(command)
                .build()
        };
        assert_eq!(definition(1, &["a"]).version(), 1);
        assert_eq!(
            SagaDefinition::<()>::builder("order")
                .step("a")
                .invoke_local(|_, _| Box::pin(async { Ok(()) }))
                .build()
                .unwrap()
                .version(),
            1,
            "version 1 unless declared"
        );
        assert!(matches!(
            build(0, 1, StepMap::new()),
            Err(DefinitionError::Version { .. })
        ));
        assert!(matches!(
            build(u32::MAX, 1, StepMap::new()),
            Err(DefinitionError::Version { .. })
        ));
        for (from, map) in [
            (2, StepMap::new()),
            (3, StepMap::new()),
            (1, StepMap::new().rename("x", "y")),
        ] {
            let err = build(2, from, map).unwrap_err();
            assert!(matches!(err, DefinitionError::Migration { .. }), "{err}");
        }
        let twice = SagaDefinition::<()>::builder("order")
            .version(3)
            .migrate_from(1, StepMap::new())
            .migrate_from(1, StepMap::new())
            .step("a")
            .invoke_participant(command)
            .build()
            .unwrap_err();
        assert!(twice.to_string().contains("declared twice"), "{twice}");
    }

    #[test]
    fn outlines_know_how_long_a_step_may_wait() {
        let retry = CompensationRetry {
            max_backoff: Duration::from_secs(60),
            ..CompensationRetry::default()
        };
        let definition = SagaDefinition::<()>::builder("order")
            .compensation_retry(retry)
            .step("local")
            .invoke_local(|_, _| Box::pin(async { Ok(()) }))
            .with_compensation(|_, _| Box::pin(async { Ok(()) }))
            .step("untimed")
            .invoke_participant(command)
            .step("timed")
            .invoke_participant(command)
            .with_participant_compensation(command)
            .with_timeout(Duration::from_secs(90))
            .build()
            .unwrap();
        let outline = Outline::of(&definition);
        let waits: Vec<_> = outline
            .steps
            .iter()
            .map(|s| (s.name.as_str(), s.forward_wait, s.backward_wait))
            .collect();
        let secs = |s| Some(Duration::from_secs(s));
        assert_eq!(
            waits,
            [
                ("local", None, secs(60)),
                ("untimed", None, None),
                ("timed", secs(90), secs(90)),
            ]
        );
    }
}
