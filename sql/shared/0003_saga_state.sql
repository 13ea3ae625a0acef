-- One row per saga instance, updated under an optimistic lock on `version`.
CREATE TABLE saga_state (
    id           uuid        PRIMARY KEY,
    saga_type    text        NOT NULL,
    current_step text,
    payload      jsonb       NOT NULL,
    status       text        NOT NULL CHECK (status IN
                     ('STARTED', 'ABORTING', 'ABORTED', 'COMPLETED', 'COMPENSATION_FAILED')),
    step_status  jsonb       NOT NULL DEFAULT '{}'::jsonb,
    version      int         NOT NULL DEFAULT 0,
    created_at   timestamptz NOT NULL DEFAULT now(),
    updated_at   timestamptz NOT NULL DEFAULT now(),
    deadline     timestamptz
);

-- The timeout sweeper and operators look for running sagas by deadline.
CREATE INDEX saga_state_running_deadline ON saga_state (deadline)
    WHERE status IN ('STARTED', 'ABORTING');
