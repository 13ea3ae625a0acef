CREATE TABLE orders (
    id          uuid        PRIMARY KEY,
    customer_id uuid        NOT NULL,
    goods_id    uuid        NOT NULL,
    quantity    int         NOT NULL CHECK (quantity > 0),
    amount      numeric(12, 2) NOT NULL CHECK (amount > 0),
    status      text        NOT NULL CHECK (status IN ('PENDING', 'APPROVED', 'REJECTED')),
    reason      text,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);
