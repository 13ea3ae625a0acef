CREATE TABLE customers (
    id               uuid           PRIMARY KEY,
    name             text           NOT NULL,
    credit_limit     numeric(12, 2) NOT NULL CHECK (credit_limit >= 0),
    available_credit numeric(12, 2) NOT NULL CHECK (available_credit >= 0),
    CHECK (available_credit <= credit_limit)
);
