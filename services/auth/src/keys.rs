//! The keys that sign access tokens: creating the first, rotating, publishing the
//! public halves as a JWKS, and signing.
//!
//! Each key is an ECDSA P-256 key pair (ES256), generated with `ring` from the
//! system's random source, named by a `kid` that every token it signs carries in
//! its header. Exactly one key signs: the one without `retired_at` (a partial
//! unique index keeps it to one). Rotation retires it and creates the next in one
//! transaction, under an advisory lock, so two concurrent rotations (or two
//! instances starting on an empty table) cannot leave two signing keys or none.
//!
//! A retired key stays in the JWKS for [`grace`]: the token lifetime plus a
//! minute, measured from its retirement. Every token it signed was signed before
//! then and expires within the lifetime, so no valid token ever names a key the
//! JWKS has dropped, and during a rollover two keys are valid. Keys past their
//! grace are deleted at the next rotation, so private keys are not kept longer
//! than they are useful. The grace is computed from the *current* token lifetime:
//! after lowering `AUTH_TOKEN_TTL_S`, wait the old lifetime before rotating.
//!
//! The private keys sit in the auth database (PKCS#8 DER in `signing_keys`),
//! readable by whoever can read that database and its backups. That keeps the demo
//! self-contained; a production deployment would keep them in a KMS or HSM (sign
//! through its API, so the private key never leaves it) or at least encrypt them
//! with a key from a secret manager, and restrict the database's backups.

use base64::Engine as _;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use ring::rand::SystemRandom;
use ring::signature::{EcdsaKeyPair, KeyPair as _, ECDSA_P256_SHA256_FIXED_SIGNING};
use service_kit::auth::{Claims, Jwk, JwkSet};
use sqlx::PgPool;
use std::time::Duration;

/// Class and key of the advisory lock held while the signing key changes ("auth").
const KEYS_LOCK: i64 = 0x6175_7468;

/// How long after its retirement a key is still published: the token lifetime plus
/// a minute (the verifiers' clock skew and a JWKS cache).
pub fn grace(token_ttl: Duration) -> Duration {
    token_ttl + Duration::from_secs(60)
}

/// A new key pair: the PKCS#8 DER of the private key and the public key as an
/// uncompressed point (0x04 || x || y).
pub fn generate() -> anyhow::Result<(Vec<u8>, Vec<u8>)> {
    let random = SystemRandom::new();
    let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &random)
        .map_err(|_| anyhow::anyhow!("cannot generate a P-256 key"))?;
    let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &random)
        .map_err(|e| anyhow::anyhow!("the generated key does not parse: {e}"))?;
    Ok((pkcs8.as_ref().to_vec(), pair.public_key().as_ref().to_vec()))
}

/// The JWK of the public key `public` (an uncompressed P-256 point) named `kid`.
pub fn jwk(kid: &str, public: &[u8]) -> Option<Jwk> {
    if public.len() != 65 || public[0] != 4 {
        return None;
    }
    let b64 = |bytes: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
    Some(Jwk::es256(kid, &b64(&public[1..33]), &b64(&public[33..])))
}

/// A private key that signs tokens.
#[derive(Clone)]
pub struct SigningKey {
    pub kid: String,
    key: EncodingKey,
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SigningKey")
            .field("kid", &self.kid)
            .finish_non_exhaustive()
    }
}

impl SigningKey {
    /// The key `kid` with the private key `pkcs8` (DER).
    pub fn from_pkcs8(kid: &str, pkcs8: &[u8]) -> SigningKey {
        SigningKey {
            kid: kid.to_owned(),
            key: EncodingKey::from_ec_der(pkcs8),
        }
    }

    /// `claims` as a JWT signed with ES256, its header naming this key.
    pub fn sign(&self, claims: &Claims) -> Result<String, jsonwebtoken::errors::Error> {
        let mut header = Header::new(Algorithm::ES256);
        header.kid = Some(self.kid.clone());
        jsonwebtoken::encode(&header, claims, &self.key)
    }
}

async fn insert_new(tx: &mut sqlx::PgConnection) -> anyhow::Result<String> {
    let (private, public) = generate()?;
    let kid = uuid::Uuid::now_v7().simple().to_string();
    // The wall clock, not the transaction's start (`now()`): a transaction that
    // waited for the keys' lock started before the key it retires was made.
    sqlx::query(
        "INSERT INTO signing_keys (kid, private_key, public_key, created_at) \
         VALUES ($1, $2, $3, clock_timestamp())",
    )
    .bind(&kid)
    .bind(private)
    .bind(public)
    .execute(tx)
    .await?;
    Ok(kid)
}

/// Creates a signing key when there is none; returns its kid when it did.
pub async fn ensure(pool: &PgPool) -> anyhow::Result<Option<String>> {
    let mut tx = pool.begin().await?;
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(KEYS_LOCK)
        .execute(&mut *tx)
        .await?;
    let current: Option<String> =
        sqlx::query_scalar("SELECT kid FROM signing_keys WHERE retired_at IS NULL")
            .fetch_optional(&mut *tx)
            .await?;
    let created = match current {
        Some(_) => None,
        None => Some(insert_new(&mut tx).await?),
    };
    tx.commit().await?;
    if let Some(kid) = &created {
        tracing::info!(kid, "created the first signing key");
    }
    Ok(created)
}

/// What a rotation did.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Rotation {
    /// The new signing key.
    pub kid: String,
    /// The key it replaced, published until its grace ends.
    pub retired: Option<String>,
    /// Keys deleted because their grace had ended.
    pub deleted: Vec<String>,
}

/// Makes a new key the signing key; the old one stays published for its grace.
pub async fn rotate(pool: &PgPool, token_ttl: Duration) -> anyhow::Result<Rotation> {
    let mut tx = pool.begin().await?;
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(KEYS_LOCK)
        .execute(&mut *tx)
        .await?;
    let retired: Option<String> = sqlx::query_scalar(
        "UPDATE signing_keys SET retired_at = clock_timestamp() WHERE retired_at IS NULL \
         RETURNING kid",
    )
    .fetch_optional(&mut *tx)
    .await?;
    let deleted: Vec<String> = sqlx::query_scalar(
        "DELETE FROM signing_keys \
         WHERE retired_at <= now() - make_interval(secs => $1) RETURNING kid",
    )
    .bind(grace(token_ttl).as_secs_f64())
    .fetch_all(&mut *tx)
    .await?;
    let kid = insert_new(&mut tx).await?;
    tx.commit().await?;
    tracing::info!(kid, ?retired, ?deleted, "rotated the signing key");
    Ok(Rotation {
        kid,
        retired,
        deleted,
    })
}

/// The key that signs now.
pub async fn current(pool: &PgPool) -> Result<Option<SigningKey>, sqlx::Error> {
    let row: Option<(String, Vec<u8>)> =
        sqlx::query_as("SELECT kid, private_key FROM signing_keys WHERE retired_at IS NULL")
            .fetch_optional(pool)
            .await?;
    Ok(row.map(|(kid, pkcs8)| SigningKey::from_pkcs8(&kid, &pkcs8)))
}

/// The public keys that verify valid tokens: the signing key first, then the
/// retired ones still within their grace, newest first.
pub async fn published(pool: &PgPool, token_ttl: Duration) -> Result<JwkSet, sqlx::Error> {
    let rows: Vec<(String, Vec<u8>)> = sqlx::query_as(
        "SELECT kid, public_key FROM signing_keys \
         WHERE retired_at IS NULL OR retired_at > now() - make_interval(secs => $1) \
         ORDER BY retired_at IS NOT NULL, created_at DESC",
    )
    .bind(grace(token_ttl).as_secs_f64())
    .fetch_all(pool)
    .await?;
    let keys = rows
        .iter()
        .filter_map(|(kid, public)| {
            let jwk = jwk(kid, public);
            if jwk.is_none() {
                tracing::error!(kid, "a stored public key is not a P-256 point");
            }
            jwk
        })
        .collect();
    Ok(JwkSet { keys })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_generated_key_is_published_as_a_p256_jwk() {
        let (private, public) = generate().unwrap();
        assert_eq!(public.len(), 65);
        let jwk = jwk("k1", &public).unwrap();
        assert_eq!(jwk.kty, "EC");
        assert_eq!(jwk.crv.as_deref(), Some("P-256"));
        assert_eq!(jwk.x.as_ref().map(String::len), Some(43));
        assert_eq!(jwk.y.as_ref().map(String::len), Some(43));
        assert!(super::jwk("k", &public[1..]).is_none());
        // The private key signs what the public key verifies.
        let claims = Claims {
            iss: "i".into(),
            aud: "a".into(),
            sub: uuid::Uuid::nil().to_string(),
            iat: 0,
            exp: i64::MAX / 2,
            roles: vec![],
            customer_id: None,
        };
        let token = SigningKey::from_pkcs8("k1", &private)
            .sign(&claims)
            .unwrap();
        let key = jsonwebtoken::DecodingKey::from_ec_components(
            jwk.x.as_deref().unwrap(),
            jwk.y.as_deref().unwrap(),
        )
        .unwrap();
        let mut validation = jsonwebtoken::Validation::new(Algorithm::ES256);
        validation.set_audience(&["a"]);
        let decoded = jsonwebtoken::decode::<Claims>(&token, &key, &validation).unwrap();
        assert_eq!(decoded.claims, claims);
        assert_eq!(decoded.header.kid.as_deref(), Some("k1"));
    }

    #[test]
    fn the_grace_is_the_token_lifetime_and_a_minute() {
        assert_eq!(grace(Duration::from_secs(900)), Duration::from_secs(960));
    }
}
