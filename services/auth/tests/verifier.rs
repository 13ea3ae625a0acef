//! `service_kit::auth` against the running auth service: what the verifier refuses
//! (each forged token is built the way an attacker would) and what the `Caller`
//! extractor answers.

mod support;

use std::time::Duration;

use auth_service::api::unix_now;
use auth_service::keys::{self, SigningKey};
use axum::extract::Path;
use axum::Router;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use reqwest::StatusCode;
use service_kit::auth::{Authentication, Caller, Claims, VerifyError};
use service_kit::demo::{ADA, BOB};
use support::{kid, token, verifier};
use testkit::TestDatabase;
use uuid::Uuid;

/// Claims as the service writes them for a customer of Ada's, valid for a minute.
fn claims() -> Claims {
    let now = unix_now();
    Claims {
        iss: "shop-auth".into(),
        aud: "shop".into(),
        sub: Uuid::now_v7().to_string(),
        iat: now,
        exp: now + 60,
        roles: vec!["customer".into()],
        customer_id: Some(ADA),
    }
}

fn b64(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

/// A token of `header` and `claims` with `signature` (base64url) as is.
fn forged(header: &serde_json::Value, claims: &Claims, signature: &str) -> String {
    let header = b64(header.to_string().as_bytes());
    let claims = b64(serde_json::to_string(claims).unwrap().as_bytes());
    format!("{header}.{claims}.{signature}")
}

#[tokio::test]
async fn the_verifier_refuses_forged_expired_and_misaddressed_tokens() {
    let db = TestDatabase::create().await;
    let (running, base) = support::start(&db).await;
    let key = keys::current(db.pool()).await.unwrap().unwrap();
    let public: Vec<u8> = sqlx::query_scalar("SELECT public_key FROM signing_keys")
        .fetch_one(db.pool())
        .await
        .unwrap();
    let verifier = verifier(&base);

    let valid = key.sign(&claims()).unwrap();
    let caller = verifier.verify(&valid).await.unwrap();
    assert_eq!(caller.customer_id, Some(ADA));

    // Expired beyond the leeway; within it, still accepted.
    let mut expired = claims();
    expired.exp = unix_now() - 120;
    assert_eq!(
        verifier.verify(&key.sign(&expired).unwrap()).await,
        Err(VerifyError::Expired)
    );
    let mut skewed = claims();
    skewed.exp = unix_now() - 5;
    verifier.verify(&key.sign(&skewed).unwrap()).await.unwrap();

    // Another audience, another issuer, no user id.
    let mut other = claims();
    other.aud = "elsewhere".into();
    assert_eq!(
        verifier.verify(&key.sign(&other).unwrap()).await,
        Err(VerifyError::Audience)
    );
    let mut other = claims();
    other.iss = "someone-else".into();
    assert_eq!(
        verifier.verify(&key.sign(&other).unwrap()).await,
        Err(VerifyError::Issuer)
    );
    let mut other = claims();
    other.sub = "admin".into();
    assert!(matches!(
        verifier.verify(&key.sign(&other).unwrap()).await,
        Err(VerifyError::Claims(_))
    ));

    // The payload changed after signing: an operator's roles, Bob's customer.
    let parts: Vec<&str> = valid.split('.').collect();
    let mut raised = claims();
    raised.roles = vec!["operator".into()];
    raised.customer_id = Some(BOB);
    let tampered = format!(
        "{}.{}.{}",
        parts[0],
        b64(serde_json::to_string(&raised).unwrap().as_bytes()),
        parts[2]
    );
    assert_eq!(
        verifier.verify(&tampered).await,
        Err(VerifyError::Signature)
    );

    // A P-256 key the JWKS does not have: under its own kid, and under the real one.
    let (foreign, _) = keys::generate().unwrap();
    let unknown = SigningKey::from_pkcs8("foreign", &foreign);
    assert_eq!(
        verifier.verify(&unknown.sign(&claims()).unwrap()).await,
        Err(VerifyError::UnknownKey("foreign".into()))
    );
    let impostor = SigningKey::from_pkcs8(&key.kid, &foreign);
    assert_eq!(
        verifier.verify(&impostor.sign(&claims()).unwrap()).await,
        Err(VerifyError::Signature)
    );

    // `alg: none` with no signature, and with the real token's signature.
    let none = serde_json::json!({ "alg": "none", "typ": "JWT", "kid": key.kid });
    for signature in ["", parts[2]] {
        assert_eq!(
            verifier.verify(&forged(&none, &claims(), signature)).await,
            Err(VerifyError::Algorithm("none".into()))
        );
    }

    // HS256 keyed with the public key: its point, and the JWKS text a client has.
    let jwks = reqwest::get(format!("{base}/.well-known/jwks.json"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let x = keys::jwk(&key.kid, &public).unwrap().x.unwrap();
    for secret in [public.as_slice(), jwks.as_bytes(), x.as_bytes()] {
        let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256);
        header.kid = Some(key.kid.clone());
        let hmac = jsonwebtoken::encode(
            &header,
            &claims(),
            &jsonwebtoken::EncodingKey::from_secret(secret),
        )
        .unwrap();
        assert_eq!(
            verifier.verify(&hmac).await,
            Err(VerifyError::Algorithm("HS256".into()))
        );
    }

    // RS256 naming the real key.
    let rs256 = serde_json::json!({ "alg": "RS256", "typ": "JWT", "kid": key.kid });
    assert_eq!(
        verifier.verify(&forged(&rs256, &claims(), parts[2])).await,
        Err(VerifyError::Algorithm("RS256".into()))
    );

    // One fetch for all of it: the unknown kid came within the refresh interval.
    assert_eq!(verifier.fetches(), 1);
    let metrics = service_kit::testing::metrics(&base).await;
    assert!(
        metrics.contains("route=\"/.well-known/jwks.json\",status=\"200\"} 2"),
        "the verifier's fetch and this test's: {metrics}"
    );
    running.stop().await.unwrap();
}

/// A route that lets only the customer in its path through.
fn orders(authentication: Option<Authentication>) -> Router {
    let router = Router::new().route(
        "/customers/{id}/orders",
        axum::routing::get(|caller: Caller, Path(id): Path<Uuid>| async move {
            caller.require_customer(id).map(|()| "ok")
        }),
    );
    match authentication {
        Some(authentication) => router.layer(service_kit::auth::layer(authentication)),
        None => router,
    }
}

/// Serves `router` on a port the system picks; its base URL.
async fn serve(router: Router) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, router).await });
    format!("http://{addr}")
}

async fn get(url: &str, token: Option<&str>) -> (StatusCode, Option<String>, serde_json::Value) {
    let mut request = reqwest::Client::new().get(url);
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let response = request.send().await.unwrap();
    let status = response.status();
    let challenge = response
        .headers()
        .get("www-authenticate")
        .map(|v| v.to_str().unwrap().to_owned());
    let text = response.text().await.unwrap();
    let body = serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text));
    (status, challenge, body)
}

#[tokio::test]
async fn the_caller_extractor_answers_401_and_403() {
    let db = TestDatabase::create().await;
    let (running, base) = support::start(&db).await;
    auth_service::seed(db.pool()).await.unwrap();
    let ada = token(&base, "ada@shop.example", "ada-demo-password").await;
    let verifier = verifier(&base).min_refresh_interval(Duration::ZERO);
    let app = serve(orders(Some(Authentication::Jwks(verifier)))).await;

    let (status, challenge, body) = get(&format!("{app}/customers/{ADA}/orders"), None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(challenge.as_deref(), Some("Bearer"));
    assert_eq!(body["error"], "unauthorized");
    assert!(body["message"].is_string());

    let mut expired = claims();
    expired.exp = unix_now() - 3600;
    let key = keys::current(db.pool()).await.unwrap().unwrap();
    for bad in [
        "garbage",
        &ada[..ada.len() - 4],
        &key.sign(&expired).unwrap(),
    ] {
        let (status, challenge, body) =
            get(&format!("{app}/customers/{ADA}/orders"), Some(bad)).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{bad}");
        assert_eq!(
            challenge.as_deref(),
            Some(r#"Bearer error="invalid_token""#)
        );
        assert_eq!(body["error"], "unauthorized");
    }

    let (status, _, body) = get(&format!("{app}/customers/{BOB}/orders"), Some(&ada)).await;
    assert_eq!(
        (status, &body["error"]),
        (StatusCode::FORBIDDEN, &serde_json::json!("forbidden"))
    );
    let (status, _, body) = get(&format!("{app}/customers/{ADA}/orders"), Some(&ada)).await;
    assert_eq!((status, body), (StatusCode::OK, serde_json::json!("ok")));
    assert_eq!(kid(&ada), key.kid);

    // Authentication off lets everyone through; a router without the layer nobody.
    let open = serve(orders(Some(Authentication::Off))).await;
    assert_eq!(
        get(&format!("{open}/customers/{BOB}/orders"), None).await.0,
        StatusCode::OK
    );
    let forgotten = serve(orders(None)).await;
    let (status, _, _) = get(&format!("{forgotten}/customers/{ADA}/orders"), Some(&ada)).await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
    running.stop().await.unwrap();
}

#[tokio::test]
async fn an_unreachable_auth_service_is_a_503_not_a_401() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let gone = listener.local_addr().unwrap();
    drop(listener);
    let verifier = service_kit::auth::JwksVerifier::new(
        &format!("http://{gone}/.well-known/jwks.json"),
        "shop-auth",
        "shop",
    );
    let (private, _) = keys::generate().unwrap();
    let token = SigningKey::from_pkcs8("k", &private)
        .sign(&claims())
        .unwrap();
    let app = serve(orders(Some(Authentication::Jwks(verifier)))).await;
    let (status, _, body) = get(&format!("{app}/customers/{ADA}/orders"), Some(&token)).await;
    assert_eq!(
        (status, &body["error"]),
        (
            StatusCode::SERVICE_UNAVAILABLE,
            &serde_json::json!("unavailable")
        )
    );
}
