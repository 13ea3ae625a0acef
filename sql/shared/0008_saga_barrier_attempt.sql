-- Attempts at the barrier (see saga_core::barrier): the orchestrator numbers each
-- command it sends for a step's action, and each for its compensation (header
-- `saga-attempt`). A repeat of one attempt stays a duplicate; a later attempt after a
-- refusal (the stored answer is a failure) is a new try that the participant runs
-- again. `undone` is set on the action row when the step's compensation enters the
-- barrier: from then on no attempt of the action may run (a hanging action).
-- Rows written before this migration count as attempt 1.
ALTER TABLE saga_barrier
    ADD COLUMN attempt integer NOT NULL DEFAULT 1 CHECK (attempt >= 1),
    ADD COLUMN undone  boolean NOT NULL DEFAULT false;
