//! [`JwksVerifier`]: an access token checked against the auth service's JWKS,
//! ES256 only, with the keys cached by `kid` and fetched again at most once per
//! interval (see the [`crate::auth`] module for what it accepts and why).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use uuid::Uuid;

use super::{Caller, Claims, Jwk, JwkSet, Role};

/// Clock skew tolerated on `exp`, in seconds.
pub const DEFAULT_LEEWAY_S: u64 = 30;
/// The shortest time between two fetches of the JWKS.
pub const DEFAULT_MIN_REFRESH: Duration = Duration::from_secs(5);
/// Cached keys older than this are fetched again.
pub const DEFAULT_MAX_AGE: Duration = Duration::from_secs(300);
/// How long a JWKS fetch may take.
const FETCH_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a token was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    #[error("the token is not a JWT")]
    Malformed,
    #[error("the token's algorithm {0} is not accepted (only ES256)")]
    Algorithm(String),
    #[error("the token names no key (kid)")]
    NoKeyId,
    #[error("the token's key {0:?} is not published by the auth service")]
    UnknownKey(String),
    #[error("the token has expired")]
    Expired,
    #[error("the token's signature does not verify")]
    Signature,
    #[error("the token is not for this audience")]
    Audience,
    #[error("the token is not from the expected issuer")]
    Issuer,
    #[error("the token's claims are not valid: {0}")]
    Claims(String),
    /// The keys could not be fetched: the token may be fine, so this is no 401.
    #[error("the auth service's keys cannot be fetched: {0}")]
    KeysUnavailable(String),
}

type FetchFn = Arc<dyn Fn() -> BoxFuture<'static, Result<JwkSet, String>> + Send + Sync>;

#[derive(Default)]
struct Cache {
    keys: HashMap<String, Arc<DecodingKey>>,
    fetched_at: Option<Instant>,
}

struct Inner {
    fetch: FetchFn,
    source: String,
    validation: Validation,
    min_refresh: Duration,
    max_age: Duration,
    cache: RwLock<Cache>,
    /// Held while fetching; the time of the last attempt, successful or not.
    last_attempt: tokio::sync::Mutex<Option<Instant>>,
    fetches: AtomicU64,
}

/// Verifies access tokens against the auth service's JWKS; cheap to clone (the
/// clones share the cache).
#[derive(Clone)]
pub struct JwksVerifier {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for JwksVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwksVerifier")
            .field("source", &self.inner.source)
            .field("issuer", &self.inner.validation.iss)
            .field("audience", &self.inner.validation.aud)
            .finish_non_exhaustive()
    }
}

impl JwksVerifier {
    /// A verifier of tokens from `issuer` for `audience`, with the keys at
    /// `jwks_url` (plain HTTP).
    pub fn new(jwks_url: &str, issuer: &str, audience: &str) -> JwksVerifier {
        let client = reqwest::Client::builder()
            .timeout(FETCH_TIMEOUT)
            .build()
            .unwrap_or_else(|_| reqwest::Client::new());
        let url = jwks_url.to_owned();
        let fetch: FetchFn = Arc::new(move || {
            let (client, url) = (client.clone(), url.clone());
            Box::pin(async move {
                let response = client.get(&url).send().await.map_err(|e| e.to_string())?;
                if !response.status().is_success() {
                    return Err(format!("{url} answered {}", response.status()));
                }
                response
                    .json::<JwkSet>()
                    .await
                    .map_err(|e| format!("{url} sent no JWKS: {e}"))
            })
        });
        JwksVerifier::build(fetch, jwks_url.to_owned(), issuer, audience)
    }

    /// A verifier whose keys come from `fetch` (the auth service reads its own
    /// from its database).
    pub fn with_source<F, Fut>(fetch: F, issuer: &str, audience: &str) -> JwksVerifier
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = Result<JwkSet, String>> + Send + 'static,
    {
        let fetch: FetchFn = Arc::new(move || Box::pin(fetch()));
        JwksVerifier::build(fetch, "custom source".into(), issuer, audience)
    }

    fn build(fetch: FetchFn, source: String, issuer: &str, audience: &str) -> JwksVerifier {
        let mut validation = Validation::new(Algorithm::ES256);
        validation.algorithms = vec![Algorithm::ES256];
        validation.leeway = DEFAULT_LEEWAY_S;
        validation.validate_exp = true;
        validation.set_issuer(&[issuer]);
        validation.set_audience(&[audience]);
        validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        JwksVerifier {
            inner: Arc::new(Inner {
                fetch,
                source,
                validation,
                min_refresh: DEFAULT_MIN_REFRESH,
                max_age: DEFAULT_MAX_AGE,
                cache: RwLock::new(Cache::default()),
                last_attempt: tokio::sync::Mutex::new(None),
                fetches: AtomicU64::new(0),
            }),
        }
    }

    fn configure(self, change: impl FnOnce(&mut Inner)) -> JwksVerifier {
        // Called before the verifier is shared; a shared one is rebuilt.
        let mut inner = match Arc::try_unwrap(self.inner) {
            Ok(inner) => inner,
            Err(shared) => Inner {
                fetch: Arc::clone(&shared.fetch),
                source: shared.source.clone(),
                validation: shared.validation.clone(),
                min_refresh: shared.min_refresh,
                max_age: shared.max_age,
                cache: RwLock::new(Cache::default()),
                last_attempt: tokio::sync::Mutex::new(None),
                fetches: AtomicU64::new(0),
            },
        };
        change(&mut inner);
        JwksVerifier {
            inner: Arc::new(inner),
        }
    }

    /// The shortest time between two fetches of the JWKS.
    pub fn min_refresh_interval(self, interval: Duration) -> JwksVerifier {
        self.configure(|inner| inner.min_refresh = interval)
    }

    /// Cached keys older than `age` are fetched again.
    pub fn max_key_age(self, age: Duration) -> JwksVerifier {
        self.configure(|inner| inner.max_age = age)
    }

    /// Clock skew tolerated on `exp`, in seconds.
    pub fn leeway(self, seconds: u64) -> JwksVerifier {
        self.configure(|inner| inner.validation.leeway = seconds)
    }

    /// How many times the JWKS was fetched (successfully or not).
    pub fn fetches(&self) -> u64 {
        self.inner.fetches.load(Ordering::Relaxed)
    }

    /// The caller a valid `token` stands for.
    pub async fn verify(&self, token: &str) -> Result<Caller, VerifyError> {
        let header = jsonwebtoken::decode_header(token).map_err(|_| {
            // An algorithm the library does not know, such as `none`, or no JWT.
            match token_alg(token) {
                Some(alg) if alg != "ES256" => VerifyError::Algorithm(alg),
                _ => VerifyError::Malformed,
            }
        })?;
        if header.alg != Algorithm::ES256 {
            return Err(VerifyError::Algorithm(format!("{:?}", header.alg)));
        }
        let kid = header.kid.ok_or(VerifyError::NoKeyId)?;
        let key = self.key(&kid).await?;
        let data = jsonwebtoken::decode::<Claims>(token, &key, &self.inner.validation)
            .map_err(|e| refusal(e.kind()))?;
        let claims = data.claims;
        let user_id = Uuid::parse_str(&claims.sub)
            .map_err(|_| VerifyError::Claims("sub is not a user id".into()))?;
        let mut roles: Vec<Role> = claims.roles.iter().filter_map(|r| Role::parse(r)).collect();
        roles.sort_unstable();
        roles.dedup();
        Ok(Caller {
            user_id,
            customer_id: claims.customer_id,
            roles,
            authenticated: true,
        })
    }

    /// The key `kid`, from the cache or a fetch of the JWKS.
    async fn key(&self, kid: &str) -> Result<Arc<DecodingKey>, VerifyError> {
        let (cached, stale) = {
            let cache = read(&self.inner.cache);
            let stale = cache
                .fetched_at
                .is_none_or(|at| at.elapsed() >= self.inner.max_age);
            (cache.keys.get(kid).cloned(), stale)
        };
        if let Some(key) = cached {
            if !stale {
                return Ok(key);
            }
            // One request refreshes the stale cache; the others use it as it is.
            let Ok(mut last) = self.inner.last_attempt.try_lock() else {
                return Ok(key);
            };
            if last.is_some_and(|at| at.elapsed() < self.inner.min_refresh) {
                return Ok(key);
            }
            if let Err(e) = self.refresh(&mut last).await {
                tracing::warn!(error = %e, "cannot refresh the JWKS; using the cached keys");
                return Ok(key);
            }
            return read(&self.inner.cache)
                .keys
                .get(kid)
                .cloned()
                .ok_or_else(|| VerifyError::UnknownKey(kid.to_owned()));
        }
        let mut last = self.inner.last_attempt.lock().await;
        // Another request may have fetched the keys while this one waited.
        if let Some(key) = read(&self.inner.cache).keys.get(kid) {
            return Ok(Arc::clone(key));
        }
        if last.is_some_and(|at| at.elapsed() < self.inner.min_refresh) {
            return Err(VerifyError::UnknownKey(kid.to_owned()));
        }
        self.refresh(&mut last).await?;
        read(&self.inner.cache)
            .keys
            .get(kid)
            .cloned()
            .ok_or_else(|| VerifyError::UnknownKey(kid.to_owned()))
    }

    /// Fetches the JWKS and replaces the cache with its ES256 keys.
    async fn refresh(&self, last: &mut Option<Instant>) -> Result<(), VerifyError> {
        *last = Some(Instant::now());
        self.inner.fetches.fetch_add(1, Ordering::Relaxed);
        let set = (self.inner.fetch)()
            .await
            .map_err(VerifyError::KeysUnavailable)?;
        let keys: HashMap<String, Arc<DecodingKey>> = set
            .keys
            .iter()
            .filter_map(Jwk::es256_key)
            .map(|(kid, key)| (kid, Arc::new(key)))
            .collect();
        tracing::debug!(keys = keys.len(), "JWKS fetched");
        let mut cache = self
            .inner
            .cache
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        cache.keys = keys;
        cache.fetched_at = Some(Instant::now());
        Ok(())
    }
}

fn read(cache: &RwLock<Cache>) -> std::sync::RwLockReadGuard<'_, Cache> {
    cache
        .read()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The `alg` a token's header names, read without the JWT library (which cannot
/// represent `none`).
fn token_alg(token: &str) -> Option<String> {
    use base64::Engine as _;
    let header = token.split('.').next()?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(header)
        .ok()?;
    let value: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    value.get("alg")?.as_str().map(str::to_owned)
}

fn refusal(kind: &ErrorKind) -> VerifyError {
    match kind {
        ErrorKind::ExpiredSignature => VerifyError::Expired,
        ErrorKind::InvalidSignature | ErrorKind::InvalidEcdsaKey => VerifyError::Signature,
        ErrorKind::InvalidAudience => VerifyError::Audience,
        ErrorKind::InvalidIssuer => VerifyError::Issuer,
        ErrorKind::InvalidAlgorithm | ErrorKind::InvalidAlgorithmName => {
            VerifyError::Algorithm("other than ES256".into())
        }
        ErrorKind::MissingRequiredClaim(claim) => VerifyError::Claims(format!("{claim} missing")),
        ErrorKind::InvalidToken | ErrorKind::Base64(_) | ErrorKind::Utf8(_) => {
            VerifyError::Malformed
        }
        other => VerifyError::Claims(format!("{other:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A verifier whose source counts its calls and never has keys.
    fn empty_source(min_refresh: Duration) -> JwksVerifier {
        JwksVerifier::with_source(|| async { Ok(JwkSet::default()) }, "iss", "aud")
            .min_refresh_interval(min_refresh)
    }

    fn unsigned(header: &str) -> String {
        use base64::Engine as _;
        let b64 = |text: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(text);
        format!(
            "{}.{}.",
            b64(header),
            b64(r#"{"sub":"x","exp":9999999999}"#)
        )
    }

    #[tokio::test]
    async fn alg_none_and_other_algorithms_are_refused_before_any_fetch() {
        let verifier = empty_source(Duration::ZERO);
        for (header, alg) in [
            (r#"{"alg":"none","kid":"k"}"#, "none"),
            (r#"{"alg":"HS256","kid":"k"}"#, "HS256"),
            (r#"{"alg":"RS256","kid":"k"}"#, "RS256"),
        ] {
            match verifier.verify(&unsigned(header)).await {
                Err(VerifyError::Algorithm(named)) => assert_eq!(named, alg),
                other => panic!("{header}: {other:?}"),
            }
        }
        assert_eq!(
            verifier.verify("not a token").await,
            Err(VerifyError::Malformed)
        );
        assert_eq!(
            verifier.verify(&unsigned(r#"{"alg":"ES256"}"#)).await,
            Err(VerifyError::NoKeyId)
        );
        assert_eq!(verifier.fetches(), 0);
    }

    #[tokio::test]
    async fn unknown_kids_fetch_the_jwks_at_most_once_per_interval() {
        let verifier = empty_source(Duration::from_secs(3600));
        for kid in ["a", "b", "c"] {
            let token = unsigned(&format!(r#"{{"alg":"ES256","kid":"{kid}"}}"#));
            assert_eq!(
                verifier.verify(&token).await,
                Err(VerifyError::UnknownKey(kid.into()))
            );
        }
        assert_eq!(verifier.fetches(), 1);
        let eager = empty_source(Duration::ZERO);
        for kid in ["a", "b"] {
            let token = unsigned(&format!(r#"{{"alg":"ES256","kid":"{kid}"}}"#));
            assert!(eager.verify(&token).await.is_err());
        }
        assert_eq!(
            eager.fetches(),
            2,
            "without an interval every unknown kid fetches"
        );
    }

    #[tokio::test]
    async fn an_unreachable_jwks_is_no_verdict_on_the_token() {
        let verifier = JwksVerifier::with_source(|| async { Err("down".to_owned()) }, "i", "a");
        let token = unsigned(r#"{"alg":"ES256","kid":"k"}"#);
        assert_eq!(
            verifier.verify(&token).await,
            Err(VerifyError::KeysUnavailable("down".into()))
        );
    }
}
