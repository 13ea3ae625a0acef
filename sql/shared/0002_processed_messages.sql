-- The consumers' journal: a message id is applied at most once per consumer, because
-- its row is inserted in the same transaction as the message's effects.
CREATE TABLE processed_messages (
    consumer     text        NOT NULL,
    message_id   uuid        NOT NULL,
    processed_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer, message_id)
);
