//! What the auth service's tests share: the service started on a test database, and
//! its API called as JSON.

#![allow(dead_code, unreachable_pub)]

use std::time::Duration;

use auth_service::Config;
use reqwest::StatusCode;
use serde_json::{json, Value};
use service_kit::auth::JwksVerifier;
use service_kit::testing;
use service_kit::Running;
use testkit::TestDatabase;
use uuid::Uuid;

/// How long the service may take to migrate and create its first key.
pub const DEADLINE: Duration = Duration::from_secs(30);

/// Starts the service on `db` on a port the system picks and waits until it is
/// prepared; returns it and its base URL.
pub async fn start(db: &TestDatabase) -> (Running, String) {
    start_with(Config::new(db.url())).await
}

pub async fn start_with(mut config: Config) -> (Running, String) {
    config.listen = Some(std::net::SocketAddr::from(([127, 0, 0, 1], 0)));
    let running = auth_service::start(config).await.unwrap();
    let base = format!("http://{}", running.addr());
    testing::wait_healthy(&base, DEADLINE).await;
    (running, base)
}

/// POSTs `body` as JSON with an optional bearer token: status, headers, body.
pub async fn post(
    url: &str,
    token: Option<&str>,
    body: &Value,
) -> (StatusCode, reqwest::header::HeaderMap, Value) {
    let mut request = reqwest::Client::new().post(url).json(body);
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let response = request.send().await.expect("the service answers");
    let (status, headers) = (response.status(), response.headers().clone());
    (status, headers, response.json().await.expect("a JSON body"))
}

/// Registers a customer; returns the answer's status and body.
pub async fn register(
    base: &str,
    email: &str,
    password: &str,
    customer: Uuid,
) -> (StatusCode, Value) {
    let body = json!({ "email": email, "password": password, "customerId": customer });
    let (status, _, body) = post(&format!("{base}/users"), None, &body).await;
    (status, body)
}

/// Signs in; the status and body.
pub async fn sign_in(base: &str, email: &str, password: &str) -> (StatusCode, Value) {
    let body = json!({ "email": email, "password": password });
    let (status, _, body) = post(&format!("{base}/token"), None, &body).await;
    (status, body)
}

/// Signs in and returns the access token.
pub async fn token(base: &str, email: &str, password: &str) -> String {
    let (status, body) = sign_in(base, email, password).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body["accessToken"].as_str().expect("a token").to_owned()
}

/// A verifier of the service at `base` with the default issuer and audience.
pub fn verifier(base: &str) -> JwksVerifier {
    JwksVerifier::new(
        &format!("{base}/.well-known/jwks.json"),
        "shop-auth",
        "shop",
    )
}

/// The kid in a token's header.
pub fn kid(token: &str) -> String {
    jsonwebtoken::decode_header(token)
        .expect("a JWT")
        .kid
        .expect("a kid")
}

/// The kids the JWKS publishes, in its order.
pub async fn published_kids(base: &str) -> Vec<String> {
    let (status, body) = testing::get_json(&format!("{base}/.well-known/jwks.json")).await;
    assert_eq!(status, StatusCode::OK);
    body["keys"]
        .as_array()
        .expect("keys")
        .iter()
        .map(|key| key["kid"].as_str().expect("a kid").to_owned())
        .collect()
}
