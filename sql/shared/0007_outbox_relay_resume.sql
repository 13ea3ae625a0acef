-- outbox-relay's resume points: for its slot, how many records of the
-- transaction committing at commit_lsn the broker acknowledged from its start,
-- so that a relay killed halfway through publishing a large transaction skips
-- them when the server sends it again. UNLOGGED: its updates write no WAL (and
-- never reach a publication); a server crash empties it, which only means more
-- duplicates. The relay creates it when missing and allowed to (IF NOT EXISTS: a
-- relay may have been first).
CREATE UNLOGGED TABLE IF NOT EXISTS outbox_relay_resume (
    slot_name  text PRIMARY KEY,
    commit_lsn pg_lsn NOT NULL,
    records    bigint NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now()
);
