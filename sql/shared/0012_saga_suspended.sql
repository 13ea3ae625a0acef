-- A saga whose step failed can be suspended instead of compensated at once, when its
-- definition says so (saga_core::saga::Suspension): it waits, with the failed step
-- current, for an operator to restart that step or to abort it, and compensates by
-- itself when its `deadline` (the end of the suspension) passes. The sweeper finds
-- that deadline through the running sagas' index, which now covers it.
ALTER TABLE saga_state DROP CONSTRAINT saga_state_status_check;
ALTER TABLE saga_state ADD CONSTRAINT saga_state_status_check CHECK (status IN
    ('STARTED', 'ABORTING', 'ABORTED', 'COMPLETED', 'COMPENSATION_FAILED', 'SUSPENDED'));

DROP INDEX saga_state_running_deadline;
CREATE INDEX saga_state_running_deadline ON saga_state (deadline)
    WHERE status IN ('STARTED', 'ABORTING', 'SUSPENDED');
