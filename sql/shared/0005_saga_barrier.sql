-- The participants' sub-transaction barrier (DTM's technique, see saga_core::barrier):
-- one row per (saga, branch, operation) that reached a participant, inserted in the
-- same transaction as the operation's effect. The primary key is what makes a
-- duplicate delivery, a compensation without its action (null compensation) and an
-- action arriving after its compensation (hanging action) recognisable.
CREATE TABLE saga_barrier (
    saga_id    text        NOT NULL,
    branch     text        NOT NULL,                                   -- the saga step, e.g. 'reserve-credit'
    op         text        NOT NULL CHECK (op IN ('action', 'compensate')),
    reason     text        NOT NULL CHECK (reason IN ('action', 'compensate')), -- the operation that wrote the row
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (saga_id, branch, op)
);
