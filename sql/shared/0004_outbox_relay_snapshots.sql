-- outbox-relay's record of initial snapshots: a row is written before the relay
-- creates its slot and completed when every row that was already in the outbox
-- table has been acknowledged by the broker. A row without completed_at after a
-- crash tells the next start to publish the table again (at least once).
CREATE TABLE outbox_relay_snapshots (
    slot_name        text PRIMARY KEY,
    consistent_point pg_lsn,
    rows_published   bigint,
    started_at       timestamptz NOT NULL DEFAULT now(),
    completed_at     timestamptz
);
