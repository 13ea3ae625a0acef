//! The card vault: `POST /cards` exchanges a card number for a token, and the
//! `Charge` command names the card by that token.
//!
//! Why no card number is kept: the vault stores the token, the last four digits
//! and the number's HMAC-SHA-256 under the vault key — never the number. The
//! digest is unique, so the same card always gets the same token (two requests
//! for one order, a retry with the same Idempotency-Key, stay the same request);
//! without the key the digests cannot be checked against guesses. The key comes
//! from `PAYMENT_CARD_VAULT_KEY`, or else is made once and kept in the payment
//! database (`card_vault_key`), which suits the demo; a production deployment
//! keeps it in a secret store.
//!
//! A real payment service would hand the number to its card processor here and
//! keep the processor's reference; the shop's charge rules need only the last four
//! digits and the amount.

use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use ring::hmac;
use ring::rand::{SecureRandom, SystemRandom};
use serde::{Deserialize, Serialize};
use service_kit::auth::Caller;
use service_kit::cards::{CardNumber, CardToken};
use service_kit::{ApiError, ApiJson, ApiPath};
use sqlx::types::chrono::{DateTime, Utc};
use sqlx::{PgExecutor, PgPool};
use tokio::sync::OnceCell;

/// The shortest vault key accepted, in bytes.
pub const MIN_KEY_BYTES: usize = 32;

/// Tokens for card numbers; see the module documentation.
#[derive(Clone)]
pub struct CardVault {
    pool: PgPool,
    configured: Option<Arc<[u8]>>,
    key: Arc<OnceCell<hmac::Key>>,
}

impl std::fmt::Debug for CardVault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CardVault")
            .field(
                "key",
                &if self.configured.is_some() {
                    "configured"
                } else {
                    "kept in the database"
                },
            )
            .finish_non_exhaustive()
    }
}

/// A card's token and last four digits, as `POST /cards` answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Tokenised {
    pub card_token: String,
    pub card_last4: String,
    /// Whether this request made the token (`false`: the card had one already).
    #[serde(default)]
    pub created: bool,
}

impl CardVault {
    /// A vault on `pool` keyed with `key`, or with the key kept in the database
    /// when `None`.
    pub fn new(pool: PgPool, key: Option<Vec<u8>>) -> CardVault {
        CardVault {
            pool,
            configured: key.map(Arc::from),
            key: Arc::new(OnceCell::new()),
        }
    }

    async fn key(&self) -> Result<&hmac::Key, sqlx::Error> {
        self.key
            .get_or_try_init(|| async {
                let bytes = match &self.configured {
                    Some(bytes) => bytes.to_vec(),
                    None => stored_key(&self.pool).await?,
                };
                Ok(hmac::Key::new(hmac::HMAC_SHA256, &bytes))
            })
            .await
    }

    /// The card's token: the one it has, or a new one.
    pub async fn tokenise(&self, card: &CardNumber) -> Result<Tokenised, sqlx::Error> {
        let digest = hmac::sign(self.key().await?, card.digits().as_bytes());
        let token = CardToken::new(card.last4(), random()?);
        // A concurrent request for the same card may insert first; the unique
        // digest makes both answer with the one token.
        let inserted: Option<String> = sqlx::query_scalar(
            "INSERT INTO card_tokens (token, digest, last4) VALUES ($1, $2, $3) \
             ON CONFLICT (digest) DO NOTHING RETURNING token",
        )
        .bind(token.as_str())
        .bind(digest.as_ref())
        .bind(card.last4())
        .fetch_optional(&self.pool)
        .await?;
        let (card_token, created) = match inserted {
            Some(token) => (token, true),
            None => {
                let token = sqlx::query_scalar("SELECT token FROM card_tokens WHERE digest = $1")
                    .bind(digest.as_ref())
                    .fetch_one(&self.pool)
                    .await?;
                (token, false)
            }
        };
        Ok(Tokenised {
            card_token,
            card_last4: card.last4().to_owned(),
            created,
        })
    }
}

/// The last four digits of the card behind `token`, if the vault made it.
pub async fn last4_of<'e>(
    executor: impl PgExecutor<'e>,
    token: &str,
) -> Result<Option<String>, sqlx::Error> {
    sqlx::query_scalar("SELECT last4 FROM card_tokens WHERE token = $1")
        .bind(token)
        .fetch_optional(executor)
        .await
}

/// The key kept in the database, made by the first service to need one.
async fn stored_key(pool: &PgPool) -> Result<Vec<u8>, sqlx::Error> {
    let mut fresh = [0_u8; 32];
    SystemRandom::new()
        .fill(&mut fresh)
        .map_err(|_| sqlx::Error::Protocol("the system's random source failed".to_owned()))?;
    sqlx::query("INSERT INTO card_vault_key (key) VALUES ($1) ON CONFLICT DO NOTHING")
        .bind(&fresh[..])
        .execute(pool)
        .await?;
    sqlx::query_scalar("SELECT key FROM card_vault_key")
        .fetch_one(pool)
        .await
}

fn random() -> Result<[u8; 16], sqlx::Error> {
    let mut bytes = [0_u8; 16];
    SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| sqlx::Error::Protocol("the system's random source failed".to_owned()))?;
    Ok(bytes)
}

/// The body of `POST /cards`.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct TokeniseCard {
    card_number: String,
}

/// A token as `GET /cards/{token}` shows it.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct TokenInfo {
    card_token: String,
    card_last4: String,
    created_at: DateTime<Utc>,
}

/// `POST /cards` and `GET /cards/{token}`.
pub fn router(vault: CardVault) -> Router {
    Router::new()
        .route("/cards", post(tokenise))
        .route("/cards/{token}", get(token_info))
        .with_state(vault)
}

async fn tokenise(
    State(vault): State<CardVault>,
    // Anyone signed in (a customer at checkout, the order service on their
    // behalf) when authentication is on.
    _caller: Caller,
    ApiJson(request): ApiJson<TokeniseCard>,
) -> Result<(StatusCode, Json<Tokenised>), ApiError> {
    let card = CardNumber::parse(&request.card_number).map_err(ApiError::invalid)?;
    let tokenised = vault.tokenise(&card).await?;
    let status = if tokenised.created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(tokenised)))
}

async fn token_info(
    State(vault): State<CardVault>,
    _caller: Caller,
    ApiPath(token): ApiPath<String>,
) -> Result<Json<TokenInfo>, ApiError> {
    let row: Option<(String, DateTime<Utc>)> =
        sqlx::query_as("SELECT last4, created_at FROM card_tokens WHERE token = $1")
            .bind(&token)
            .fetch_optional(&vault.pool)
            .await?;
    let (card_last4, created_at) = row.ok_or_else(|| ApiError::not_found("no such card token"))?;
    Ok(Json(TokenInfo {
        card_token: token,
        card_last4,
        created_at,
    }))
}

/// The vault's HMAC key; its `Debug` does not show it.
#[derive(Clone, PartialEq, Eq)]
pub struct VaultKey(pub Vec<u8>);

impl std::fmt::Debug for VaultKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "VaultKey({} bytes)", self.0.len())
    }
}

impl std::str::FromStr for VaultKey {
    type Err = String;

    fn from_str(text: &str) -> Result<VaultKey, String> {
        parse_key(text).map(VaultKey)
    }
}

/// A vault key given as 64 or more hex digits (32 bytes or more).
pub fn parse_key(text: &str) -> Result<Vec<u8>, String> {
    let text = text.trim();
    let bytes: Option<Vec<u8>> = (text.len() % 2 == 0)
        .then(|| {
            (0..text.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
                .collect()
        })
        .flatten();
    match bytes {
        Some(bytes) if bytes.len() >= MIN_KEY_BYTES => Ok(bytes),
        _ => Err(format!(
            "the card vault key must be at least {} hex digits ({MIN_KEY_BYTES} bytes)",
            MIN_KEY_BYTES * 2
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vault_keys_are_long_hex() {
        let key = "00".repeat(31) + "ff";
        assert_eq!(parse_key(&key).map(|k| k.len()), Ok(32));
        assert_eq!(
            parse_key(&key).ok().and_then(|k| k.last().copied()),
            Some(0xff)
        );
        for bad in [
            String::new(),
            "abc".to_owned(),
            "0".repeat(62),
            "zz".repeat(32),
        ] {
            assert!(parse_key(&bad).is_err(), "{bad:?}");
        }
    }
}
