-- The keys that sign access tokens (ES256, P-256). The key without retired_at signs;
-- a retired key is still published in the JWKS until every token it signed has
-- expired. The private key is PKCS#8 DER; the public key the uncompressed point
-- (0x04 || x || y), so publishing never reads a private key.
CREATE TABLE signing_keys (
    kid         text        PRIMARY KEY,
    private_key bytea       NOT NULL,
    public_key  bytea       NOT NULL CHECK (length(public_key) = 65),
    created_at  timestamptz NOT NULL DEFAULT now(),
    retired_at  timestamptz,
    CHECK (retired_at IS NULL OR retired_at >= created_at)
);

-- At most one key signs.
CREATE UNIQUE INDEX signing_keys_one_current ON signing_keys ((true)) WHERE retired_at IS NULL;
