CREATE TABLE payments (
    order_id    uuid           PRIMARY KEY,
    amount      numeric(12, 2) NOT NULL CHECK (amount > 0),
    card_last4  text           NOT NULL,
    status      text           NOT NULL CHECK (status IN ('CHARGED', 'DECLINED', 'REFUNDED')),
    reason      text,
    created_at  timestamptz    NOT NULL DEFAULT now(),
    updated_at  timestamptz    NOT NULL DEFAULT now()
);
