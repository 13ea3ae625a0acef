-- The answer a participant gave to the operation of a barrier row (see
-- saga_core::barrier): written in the transaction that ran the operation, so a
-- duplicate of the command (the orchestrator resends a step under a new request id
-- after a timeout) is answered again with the same reply under its own request id.
-- NULL on rows written before this migration (their duplicates stay unanswered) and
-- on the action row a null compensation writes (a late action is never answered).
ALTER TABLE saga_barrier
    ADD COLUMN reply_outcome text CHECK (reply_outcome IN ('success', 'failure')), -- the reply's outcome header
    ADD COLUMN reply_type    text,                                                 -- the reply's type, e.g. 'CreditReserved'
    ADD COLUMN reply_payload jsonb,
    ADD CONSTRAINT saga_barrier_answer_complete CHECK (
        (reply_outcome IS NULL) = (reply_type IS NULL)
        AND (reply_type IS NULL) = (reply_payload IS NULL)
    );
