-- The transactional outbox. Column names follow Debezium's outbox event router, so
-- services can move between Debezium and outbox-relay without changes.
CREATE TABLE outbox (
    id            uuid PRIMARY KEY,                    -- event id: Kafka header "id", the consumers' dedup key
    aggregatetype text NOT NULL,                       -- routes the topic
    aggregateid   text NOT NULL,                       -- Kafka key (the saga id for saga messages)
    type          text NOT NULL,                       -- event type: Kafka header "type"
    payload       jsonb,                               -- Kafka value
    headers       jsonb,                               -- extra Kafka headers (traceparent, saga-id, ...)
    created_at    timestamptz NOT NULL DEFAULT now()
);

-- Pruning jobs delete old rows by age.
CREATE INDEX outbox_created_at ON outbox (created_at);
