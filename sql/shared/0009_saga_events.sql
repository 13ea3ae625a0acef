-- The audit trail of sagas: append-only, written in the transaction of each change.
-- `changes` holds what the transaction changed (on its first event only): `saga_state`
-- is the fold of a saga's changes in version order (see saga_core::saga::audit).
CREATE TABLE saga_events (
    id        bigserial   PRIMARY KEY,
    saga_id   uuid        NOT NULL,
    saga_type text        NOT NULL,
    -- The saga's version once the transaction that wrote the event committed.
    version   int         NOT NULL,
    at        timestamptz NOT NULL,
    kind      text        NOT NULL,
    step      text,
    detail    jsonb       NOT NULL DEFAULT '{}'::jsonb,
    changes   jsonb
);

CREATE INDEX saga_events_saga ON saga_events (saga_id, version, id);

-- Throughput over the last minutes (the console): sagas that ended, by time.
CREATE INDEX saga_events_ended ON saga_events (at) WHERE kind = 'status_changed';
