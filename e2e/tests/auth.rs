//! Sign-in end to end: the shop with its auth service, and the order API answering
//! only callers with a valid token, each on their own orders.

mod support;

use base64::Engine as _;
use customer_service::{ADA, BOB};
use inventory_service::WIDGET;
use reqwest::{RequestBuilder, StatusCode};
use serde_json::{json, Value};
use service_kit::auth::Claims;
use testkit::TestDatabase;
use uuid::Uuid;

const GOOD_CARD: &str = "4111 1111 1111 1111";

async fn send(request: RequestBuilder) -> (StatusCode, Value, Option<String>) {
    let response = request.send().await.expect("the order service answers");
    let status = response.status();
    let challenge = response
        .headers()
        .get("www-authenticate")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let body = response.json().await.unwrap_or(Value::Null);
    (status, body, challenge)
}

fn claims_of(token: &str) -> Claims {
    let payload = token.split('.').nth(1).expect("a JWT");
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .expect("base64url");
    serde_json::from_slice(&bytes).expect("claims")
}

fn b64(value: &Value) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(value.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_order_api_answers_only_signed_in_callers_on_their_own_orders() {
    let auth_db = TestDatabase::create().await;
    let auth_url = auth_db.url();
    let shop = support::start(|config| config.auth_database = Some(auth_url), "", "").await;
    let client = &shop.client;
    let http = reqwest::Client::new();
    let orders = format!("{}/orders", client.order_url);
    let order = json!({
        "customerId": ADA, "goodsId": WIDGET, "quantity": 1, "amount": 10.0,
        "cardToken": client.card_token(GOOD_CARD).await.expect("a card token"),
    });
    let ada = client.customer_token(ADA).await.expect("Ada signs in");
    let bob = client.customer_token(BOB).await.expect("Bob signs in");
    let operator = client
        .operator_token()
        .await
        .expect("the operator signs in");

    // No token, a token that is not one, and forged tokens: 401 with a challenge.
    let (status, body, challenge) = send(http.post(&orders).json(&order)).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    assert!(challenge.is_some_and(|c| c.starts_with("Bearer")));
    let claims = claims_of(&ada);
    let alg_none = format!(
        "{}.{}.",
        b64(&json!({ "alg": "none", "typ": "JWT" })),
        b64(&serde_json::to_value(&claims).expect("claims"))
    );
    let (pkcs8, _) = auth_service::keys::generate().expect("a key");
    let current: String =
        sqlx::query_scalar("SELECT kid FROM signing_keys WHERE retired_at IS NULL")
            .fetch_one(auth_db.pool())
            .await
            .expect("the signing key");
    let foreign = auth_service::keys::SigningKey::from_pkcs8(&current, &pkcs8)
        .sign(&claims)
        .expect("signed");
    let stored: Vec<u8> = sqlx::query_scalar("SELECT private_key FROM signing_keys WHERE kid = $1")
        .bind(&current)
        .fetch_one(auth_db.pool())
        .await
        .expect("the signing key");
    let expired = auth_service::keys::SigningKey::from_pkcs8(&current, &stored)
        .sign(&Claims {
            iat: claims.iat - 7_200,
            exp: claims.iat - 3_600,
            ..claims.clone()
        })
        .expect("signed");
    for (what, token) in [
        ("not a token", "garbage".to_owned()),
        ("alg none", alg_none),
        ("a key not in the JWKS", foreign),
        ("expired", expired),
    ] {
        let (status, body, challenge) =
            send(http.post(&orders).bearer_auth(&token).json(&order)).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{what}: {body}");
        assert!(
            challenge.is_some_and(|c| c.contains("invalid_token")),
            "{what}"
        );
    }

    // A customer orders only as themselves; an operator places no orders.
    let (status, body, _) = send(http.post(&orders).bearer_auth(&bob).json(&order)).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "Bob ordering as Ada: {body}");
    let (status, body, _) = send(http.post(&orders).bearer_auth(&operator).json(&order)).await;
    assert_eq!(
        status,
        StatusCode::FORBIDDEN,
        "the operator ordering: {body}"
    );
    let (status, body, _) = send(http.post(&orders).bearer_auth(&ada).json(&order)).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    let id: Uuid = serde_json::from_value(body["orderId"].clone()).expect("an order id");
    // By number: the order service has the card tokenised with Ada's own token.
    let by_number = json!({
        "customerId": ADA, "goodsId": WIDGET, "quantity": 1, "amount": 10.0,
        "cardNumber": GOOD_CARD,
    });
    let (status, body, _) = send(http.post(&orders).bearer_auth(&ada).json(&by_number)).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");

    // The other services' APIs answer signed-in callers only, each on their own.
    let customer = |who: Uuid| format!("{}/customers/{who}", client.customer_url);
    let goods = format!("{}/goods/{WIDGET}", client.inventory_url);
    let payment = format!("{}/payments/{id}", client.payment_url);
    let cards = format!("{}/cards", client.payment_url);
    for (what, request) in [
        ("a customer", http.get(customer(ADA))),
        ("goods", http.get(&goods)),
        ("a payment", http.get(&payment)),
        (
            "a card",
            http.post(&cards).json(&json!({ "cardNumber": GOOD_CARD })),
        ),
    ] {
        let (status, body, _) = send(request).await;
        assert_eq!(
            status,
            StatusCode::UNAUTHORIZED,
            "{what} without a token: {body}"
        );
    }
    let (status, body, _) = send(http.get(customer(BOB)).bearer_auth(&ada)).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "Ada reading Bob: {body}");
    let (status, body, _) = send(http.get(customer(ADA)).bearer_auth(&ada)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, body, _) = send(http.get(&goods).bearer_auth(&bob)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, body, _) = send(http.get(&payment).bearer_auth(&ada)).await;
    assert_eq!(
        status,
        StatusCode::FORBIDDEN,
        "payments are the operators': {body}"
    );
    let (status, body, _) = send(http.get(&payment).bearer_auth(&operator)).await;
    assert!(
        matches!(status, StatusCode::OK | StatusCode::NOT_FOUND),
        "{status} {body}"
    );

    // Only Ada and the operator see or cancel it.
    let one = format!("{orders}/{id}");
    let (status, _, _) = send(http.get(&one)).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, body, _) = send(http.get(&one).bearer_auth(&bob)).await;
    assert_eq!(
        status,
        StatusCode::FORBIDDEN,
        "Bob reading Ada's order: {body}"
    );
    let (status, body, _) = send(http.post(format!("{one}/cancel")).bearer_auth(&bob)).await;
    assert_eq!(
        status,
        StatusCode::FORBIDDEN,
        "Bob cancelling Ada's order: {body}"
    );
    for token in [&ada, &operator] {
        let (status, body, _) = send(http.get(&one).bearer_auth(token)).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(body["customerId"], json!(ADA));
    }
    let listed = |body: &Value| {
        body["orders"]
            .as_array()
            .map(|o| o.iter().any(|o| o["orderId"] == json!(id)))
            .unwrap_or(false)
    };
    let (status, body, _) = send(http.get(&orders).bearer_auth(&bob)).await;
    assert_eq!(status, StatusCode::OK);
    assert!(!listed(&body), "Bob's list shows Ada's order: {body}");
    for token in [&ada, &operator] {
        let (status, body, _) = send(http.get(&orders).bearer_auth(token)).await;
        assert_eq!(status, StatusCode::OK);
        assert!(listed(&body), "{body}");
    }
    let (status, body, _) = send(http.post(format!("{one}/cancel")).bearer_auth(&ada)).await;
    assert!(
        matches!(status, StatusCode::ACCEPTED | StatusCode::CONFLICT),
        "Ada cancelling her order: {status} {body}"
    );
    shop.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_saga_console_is_for_signed_in_operators() {
    let auth_db = TestDatabase::create().await;
    let auth_url = auth_db.url();
    let shop = support::start(|config| config.auth_database = Some(auth_url), "", "").await;
    let client = &shop.client;
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("a client");
    let console = format!("{}/console", client.order_url);
    let location = |response: &reqwest::Response| {
        response
            .headers()
            .get("location")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };

    let anonymous = http.get(&console).send().await.expect("answered");
    assert!(
        anonymous.status().is_redirection(),
        "{}",
        anonymous.status()
    );
    assert_eq!(location(&anonymous).as_deref(), Some("/console/sign-in"));
    let form = http
        .get(format!("{console}/sign-in"))
        .send()
        .await
        .expect("answered");
    assert_eq!(form.status(), StatusCode::OK);
    assert!(form
        .text()
        .await
        .expect("a page")
        .contains("type=\"password\""));

    let sign_in = |email: &'static str, password: &'static str| {
        http.post(format!("{console}/sign-in"))
            .form(&[("email", email), ("password", password)])
            .send()
    };
    let wrong = sign_in("operator@shop.example", "not-the-password")
        .await
        .expect("answered");
    assert_eq!(wrong.status(), StatusCode::UNAUTHORIZED);
    let customer = sign_in("ada@shop.example", "ada-demo-password")
        .await
        .expect("answered");
    assert_eq!(
        customer.status(),
        StatusCode::FORBIDDEN,
        "a customer is no operator"
    );
    let operator = sign_in("operator@shop.example", "operator-demo-password")
        .await
        .expect("answered");
    assert!(operator.status().is_redirection(), "{}", operator.status());
    assert_eq!(location(&operator).as_deref(), Some("/console"));
    let cookie = operator
        .headers()
        .get("set-cookie")
        .and_then(|v| v.to_str().ok())
        .expect("a session cookie")
        .to_owned();
    assert!(
        cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"),
        "{cookie}"
    );
    let session = cookie.split(';').next().expect("name=value").to_owned();

    let page = http
        .get(&console)
        .header("cookie", &session)
        .send()
        .await
        .expect("answered");
    assert_eq!(page.status(), StatusCode::OK);
    assert!(page.text().await.expect("a page").contains("saga console"));
    let forged = http
        .get(&console)
        .header("cookie", format!("{}x", session))
        .send()
        .await
        .expect("answered");
    assert!(
        forged.status().is_redirection(),
        "a forged cookie: {}",
        forged.status()
    );

    // An action with a customer's bearer token: refused; with the operator's: it runs.
    let ada = client.customer_token(ADA).await.expect("Ada signs in");
    let abort = format!("{console}/sagas/{}/abort", Uuid::now_v7());
    let refused = http
        .post(&abort)
        .bearer_auth(&ada)
        .form(&[("reason", "test")])
        .send()
        .await
        .expect("answered");
    assert_eq!(refused.status(), StatusCode::FORBIDDEN);
    let operator = client
        .operator_token()
        .await
        .expect("the operator signs in");
    let allowed = http
        .post(&abort)
        .bearer_auth(&operator)
        .form(&[("reason", "test")])
        .send()
        .await
        .expect("answered");
    assert_ne!(allowed.status(), StatusCode::FORBIDDEN);
    assert_ne!(allowed.status(), StatusCode::UNAUTHORIZED);
    shop.stop().await;
}
