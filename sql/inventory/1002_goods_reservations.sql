-- What each order's reserve-goods step actually took. The saga barrier knows that a
-- step ran, not whether it succeeded: a ReserveGoods answered with InsufficientStock
-- still counts as a step that ran, so its compensation gets through. The release
-- therefore gives back only what a row here says was taken, exactly once (RESERVED
-- becomes RELEASED in the same transaction as the stock goes back).
CREATE TABLE goods_reservations (
    order_id   uuid        PRIMARY KEY,
    goods_id   uuid        NOT NULL REFERENCES goods,
    quantity   int         NOT NULL CHECK (quantity > 0),
    status     text        NOT NULL CHECK (status IN ('RESERVED', 'RELEASED')),
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX goods_reservations_goods_id ON goods_reservations (goods_id);
