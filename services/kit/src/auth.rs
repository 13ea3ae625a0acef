//! Who is calling: verifying the auth service's access tokens and the axum
//! extractor [`Caller`] that the services' handlers take.
//!
//! A token is a JWT signed with ES256 (ECDSA on P-256 with SHA-256) by the auth
//! service, whose public keys are published as a JWKS. [`JwksVerifier`] accepts a
//! token only when all of these hold, so a token it accepts was signed by a key the
//! auth service publishes, for this audience, and has not expired:
//!
//! - the header's `alg` is `ES256`; nothing else is ever looked at. `none`, the HMAC
//!   algorithms (the classic attack signs HS256 with the published public key as
//!   the secret) and RSA are refused before any key is chosen, and the keys are
//!   built as EC keys only, which the JWT library also refuses to use for another
//!   algorithm;
//! - the header names a `kid` that the JWKS publishes, and the signature verifies
//!   with that key (a token signed by any other key fails, whatever its `kid`);
//! - `exp` is in the future, give or take [`DEFAULT_LEEWAY_S`] of clock skew; `iss`
//!   and `aud` are the configured ones; `sub` is a user id.
//!
//! Keys are cached by `kid`. A token with an unknown `kid` (the auth service rotated
//! its key) makes the verifier fetch the JWKS again, but at most once per
//! [`DEFAULT_MIN_REFRESH`]: a flood of tokens with made-up kids costs the auth
//! service one request per interval, not one per token. The price is that a token
//! from a key created within that interval after such a fetch is refused until the
//! interval has passed. The cache is also refreshed when it is older than
//! [`DEFAULT_MAX_AGE`] (by one request while the others keep using the cached
//! keys), so a key the auth service stopped publishing stops being accepted.
//!
//! Handlers take a [`Caller`]; the router carries the verifier through
//! [`layer`]. A request without a valid token is answered 401 with
//! `WWW-Authenticate: Bearer` (and `error="invalid_token"` when a token was given);
//! [`Caller::require_operator`] and [`Caller::require_customer`] answer 403. With
//! authentication off (an empty `AUTH_JWKS_URL`) every request is let through as an
//! unauthenticated caller whose `require_*` checks pass: for local demos only, and
//! [`AuthArgs::authentication`] says so loudly in the log.
//!
//! The verifier is in `verifier.rs`, the extractor and its answers in `caller.rs`;
//! both are re-exported here.

use jsonwebtoken::DecodingKey;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

mod caller;
mod verifier;

pub use caller::{bearer, forbidden, unauthorized, Caller};
pub use verifier::{
    JwksVerifier, VerifyError, DEFAULT_LEEWAY_S, DEFAULT_MAX_AGE, DEFAULT_MIN_REFRESH,
};

/// A role in a token's `roles` claim.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// A shop customer, acting for the customer in the `customer_id` claim.
    Customer,
    /// Staff: may act on every customer's behalf and run operator actions.
    Operator,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Customer => "customer",
            Role::Operator => "operator",
        }
    }

    /// The role named `name`, if there is one.
    pub fn parse(name: &str) -> Option<Role> {
        match name {
            "customer" => Some(Role::Customer),
            "operator" => Some(Role::Operator),
            _ => None,
        }
    }
}

/// The claims of an access token, as the auth service writes them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    pub iss: String,
    pub aud: String,
    /// The user id.
    pub sub: String,
    pub iat: i64,
    pub exp: i64,
    #[serde(default)]
    pub roles: Vec<String>,
    /// The customer the user acts for (customers only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub customer_id: Option<Uuid>,
}

/// One public key of a JWKS (RFC 7517); only EC P-256 keys are used.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Jwk {
    pub kty: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub crv: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub x: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub y: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kid: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alg: Option<String>,
    #[serde(rename = "use", default, skip_serializing_if = "Option::is_none")]
    pub key_use: Option<String>,
}

impl Jwk {
    /// An ES256 signing key with coordinates `x` and `y` (32 bytes each, base64url).
    pub fn es256(kid: &str, x: &str, y: &str) -> Jwk {
        Jwk {
            kty: "EC".into(),
            crv: Some("P-256".into()),
            x: Some(x.into()),
            y: Some(y.into()),
            kid: Some(kid.into()),
            alg: Some("ES256".into()),
            key_use: Some("sig".into()),
        }
    }

    /// The key's id and verification key, when it is an ES256 signing key.
    fn es256_key(&self) -> Option<(String, DecodingKey)> {
        let usable = self.kty == "EC"
            && self.crv.as_deref() == Some("P-256")
            && self.alg.as_deref().is_none_or(|alg| alg == "ES256")
            && self
                .key_use
                .as_deref()
                .is_none_or(|key_use| key_use == "sig");
        let (kid, x, y) = (self.kid.as_ref()?, self.x.as_ref()?, self.y.as_ref()?);
        if !usable || !is_coordinate(x) || !is_coordinate(y) {
            return None;
        }
        let key = DecodingKey::from_ec_components(x, y).ok()?;
        Some((kid.clone(), key))
    }
}

/// 32 bytes in unpadded base64url: 43 characters of the URL-safe alphabet.
fn is_coordinate(text: &str) -> bool {
    text.len() == 43
        && text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// A JSON Web Key Set: `{"keys": [...]}`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct JwkSet {
    pub keys: Vec<Jwk>,
}

/// Whether requests are authenticated, and with what; carried to the handlers by
/// [`layer`].
#[derive(Debug, Clone)]
pub enum Authentication {
    /// Every request passes as an unauthenticated caller (local demos only).
    Off,
    /// Requests need a bearer token this verifier accepts.
    Jwks(JwksVerifier),
}

/// The layer that gives handlers their [`Caller`]:
/// `router.layer(service_kit::auth::layer(authentication))`.
pub fn layer(authentication: Authentication) -> axum::Extension<Authentication> {
    axum::Extension(authentication)
}

/// The authentication options a service flattens into its command line.
#[derive(Debug, Clone, clap::Args)]
pub struct AuthArgs {
    /// The auth service's JWKS (e.g. http://auth:8085/.well-known/jwks.json);
    /// empty: authentication is off and every request is let through.
    #[arg(long, env = "AUTH_JWKS_URL", value_name = "URL", default_value = "")]
    pub auth_jwks_url: String,

    /// The issuer (`iss`) tokens must name.
    #[arg(
        long,
        env = "AUTH_ISSUER",
        value_name = "NAME",
        default_value = "shop-auth"
    )]
    pub auth_issuer: String,

    /// The audience (`aud`) tokens must name.
    #[arg(
        long,
        env = "AUTH_AUDIENCE",
        value_name = "NAME",
        default_value = "shop"
    )]
    pub auth_audience: String,
}

impl AuthArgs {
    /// Authentication off (the command line's default).
    pub fn off() -> AuthArgs {
        AuthArgs {
            auth_jwks_url: String::new(),
            auth_issuer: "shop-auth".to_owned(),
            auth_audience: "shop".to_owned(),
        }
    }

    /// Tokens verified against the JWKS at `url`, with the default issuer and
    /// audience.
    pub fn jwks(url: impl Into<String>) -> AuthArgs {
        AuthArgs {
            auth_jwks_url: url.into(),
            ..AuthArgs::off()
        }
    }

    /// Authentication as configured; logs a warning when it is off.
    pub fn authentication(&self, service: &str) -> Authentication {
        let url = self.auth_jwks_url.trim();
        if url.is_empty() {
            tracing::warn!(
                service,
                "AUTHENTICATION IS OFF (no AUTH_JWKS_URL): every request is accepted \
                 without a token; never run like this outside a local demo"
            );
            return Authentication::Off;
        }
        tracing::info!(service, jwks = url, issuer = %self.auth_issuer, "tokens are verified");
        Authentication::Jwks(JwksVerifier::new(
            url,
            &self.auth_issuer,
            &self.auth_audience,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_es256_p256_keys_are_taken_from_a_jwks() {
        let x = "f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU";
        let y = "x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0";
        assert!(Jwk::es256("k1", x, y).es256_key().is_some());
        let mut no_alg = Jwk::es256("k1", x, y);
        no_alg.alg = None;
        assert!(no_alg.es256_key().is_some(), "alg is optional in a JWK");
        let mut other = Jwk::es256("k1", x, y);
        other.alg = Some("HS256".into());
        assert!(other.es256_key().is_none());
        let mut p384 = Jwk::es256("k1", x, y);
        p384.crv = Some("P-384".into());
        assert!(p384.es256_key().is_none());
        let mut encryption = Jwk::es256("k1", x, y);
        encryption.key_use = Some("enc".into());
        assert!(encryption.es256_key().is_none());
        assert!(Jwk::es256("k1", "short", y).es256_key().is_none());
        let mut no_kid = Jwk::es256("k1", x, y);
        no_kid.kid = None;
        assert!(no_kid.es256_key().is_none());
    }
}
