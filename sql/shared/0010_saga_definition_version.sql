-- Every saga instance is pinned to the version of its definition it started with:
-- an orchestrator drives it by that version's steps, or moves it onto a newer
-- version through an explicit step map (see saga_core::saga::versions). Sagas
-- started before versions existed ran the only definition there was: version 1.
ALTER TABLE saga_state
    ADD COLUMN definition_version int NOT NULL DEFAULT 1
        CONSTRAINT saga_state_definition_version_positive CHECK (definition_version > 0);

-- The orchestrator looks for running sagas on versions it does not run itself.
CREATE INDEX saga_state_running_version ON saga_state (saga_type, definition_version)
    WHERE status IN ('STARTED', 'ABORTING');
