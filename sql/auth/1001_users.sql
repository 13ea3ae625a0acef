-- The shop's users. An email is unique whatever its case (the index on lower(email));
-- a customer user acts for exactly one customer, and a customer has at most one user.
CREATE TABLE users (
    id            uuid        PRIMARY KEY,
    email         text        NOT NULL CHECK (email = btrim(email) AND email <> ''),
    -- argon2id, PHC string format ($argon2id$v=19$m=...,t=...,p=...$salt$hash).
    password_hash text        NOT NULL CHECK (password_hash LIKE '$argon2id$%'),
    customer_id   uuid,
    roles         text[]      NOT NULL
                  CHECK (cardinality(roles) > 0 AND roles <@ ARRAY['customer', 'operator']::text[]),
    created_at    timestamptz NOT NULL DEFAULT now(),
    CHECK (NOT ('customer' = ANY (roles)) OR customer_id IS NOT NULL)
);

CREATE UNIQUE INDEX users_email_key ON users (lower(email));
CREATE UNIQUE INDEX users_customer_id_key ON users (customer_id) WHERE customer_id IS NOT NULL;
