-- What each order's reserve-credit step actually took. The saga barrier knows that a
-- step ran, not whether it succeeded: a ReserveCredit answered with
-- CreditLimitExceeded still counts as a step that ran, so its compensation gets
-- through. The release therefore gives back only what a row here says was taken,
-- exactly once (RESERVED becomes RELEASED in the same transaction as the credit goes
-- back).
CREATE TABLE credit_reservations (
    order_id    uuid           PRIMARY KEY,
    customer_id uuid           NOT NULL REFERENCES customers,
    amount      numeric(12, 2) NOT NULL CHECK (amount > 0),
    status      text           NOT NULL CHECK (status IN ('RESERVED', 'RELEASED')),
    created_at  timestamptz    NOT NULL DEFAULT now(),
    updated_at  timestamptz    NOT NULL DEFAULT now()
);

CREATE INDEX credit_reservations_customer_id ON credit_reservations (customer_id);
