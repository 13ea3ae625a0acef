-- The card vault. A card number is exchanged for a token at the payment service's
-- `POST /cards`; only the token and the last four digits travel on (orders, saga
-- state, commands, topics). The number itself is never stored: `digest` is its
-- HMAC-SHA-256 under the vault key, so the same card always gets the same token
-- (an order retried with its Idempotency-Key stays the same request) while the
-- table alone does not give the number back.
CREATE TABLE card_tokens (
    token       text        PRIMARY KEY,
    digest      bytea       NOT NULL UNIQUE,
    last4       text        NOT NULL CHECK (last4 ~ '^[0-9]{4}$'),
    created_at  timestamptz NOT NULL DEFAULT now()
);

-- The vault key when none is configured (`PAYMENT_CARD_VAULT_KEY`): made once, kept
-- here. A production deployment keeps the key in a secret store instead, so that a
-- copy of this database is not enough to test guesses against the digests.
CREATE TABLE card_vault_key (
    only_one    boolean     PRIMARY KEY DEFAULT true CHECK (only_one),
    key         bytea       NOT NULL CHECK (length(key) >= 32),
    created_at  timestamptz NOT NULL DEFAULT now()
);
