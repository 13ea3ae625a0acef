-- The order's link to its saga, the customer's cancellation request (the approve
-- step refuses a cancelled order), and the Idempotency-Key of the POST that
-- created it (a retried POST finds its first order).
ALTER TABLE orders
    ADD COLUMN saga_id          uuid,
    ADD COLUMN card_last4       text,
    ADD COLUMN cancel_requested boolean NOT NULL DEFAULT false;

CREATE UNIQUE INDEX orders_saga_id ON orders (saga_id);

CREATE TABLE order_idempotency_keys (
    key         text        PRIMARY KEY,
    order_id    uuid        NOT NULL,
    fingerprint text        NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);
