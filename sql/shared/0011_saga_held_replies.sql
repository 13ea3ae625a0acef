-- Replies for sagas on a definition version the running code cannot drive (it
-- neither keeps that version nor has a migration from it). The reply consumer
-- keeps each one here, in the transaction of its journal row, instead of applying
-- it or dropping it; an orchestrator that knows the version applies them in `seq`
-- order and deletes them in one transaction (see saga_core::saga::versions).
CREATE TABLE saga_held_replies (
    seq        bigserial   PRIMARY KEY,
    saga_id    uuid        NOT NULL,
    message_id uuid        NOT NULL,
    held_at    timestamptz NOT NULL,
    -- Why it was held, as the orchestrator said it (the version it did not know).
    reason     text        NOT NULL,
    -- The reply as received: topic, partition, offset, key, id, type, headers, payload.
    message    jsonb       NOT NULL,
    UNIQUE (saga_id, message_id)
);
