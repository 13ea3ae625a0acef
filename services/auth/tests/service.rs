//! The service as `start` runs it, on a real database: registering, signing in,
//! the JWKS the tokens verify against, the refusals, the seed, `/health` and
//! `/metrics`.

mod support;

use reqwest::StatusCode;
use serde_json::json;
use service_kit::auth::{Caller, Role};
use service_kit::demo::{ADA, BOB};
use service_kit::testing::{self, get_json};
use support::{post, register, sign_in, token, verifier};
use testkit::TestDatabase;
use uuid::Uuid;

#[tokio::test]
async fn a_customer_registers_signs_in_and_the_token_verifies_through_the_jwks() {
    let db = TestDatabase::create().await;
    let (running, base) = support::start(&db).await;
    let customer = Uuid::now_v7();

    let (status, user) = register(&base, " Cleo@Shop.Example ", "cleo-password", customer).await;
    assert_eq!(status, StatusCode::CREATED, "{user}");
    let user_id: Uuid = user["userId"].as_str().unwrap().parse().unwrap();
    assert_eq!(
        user,
        json!({
            "userId": user_id,
            "email": "Cleo@Shop.Example",
            "customerId": customer,
            "roles": ["customer"],
        })
    );

    // Any case of the address signs in.
    let body = json!({ "email": "cleo@shop.example", "password": "cleo-password" });
    let (status, headers, answer) = post(&format!("{base}/token"), None, &body).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(answer["tokenType"], "Bearer");
    assert_eq!(answer["expiresIn"], 900);
    assert_eq!(headers["cache-control"], "no-store");
    let token = answer["accessToken"].as_str().unwrap();

    let header = jsonwebtoken::decode_header(token).unwrap();
    assert_eq!(header.alg, jsonwebtoken::Algorithm::ES256);
    let response = reqwest::get(format!("{base}/.well-known/jwks.json"))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["cache-control"], "max-age=60");
    let jwks: serde_json::Value = response.json().await.unwrap();
    let keys = jwks["keys"].as_array().unwrap();
    assert_eq!(keys.len(), 1, "{jwks}");
    let key = &keys[0];
    assert_eq!(Some(key["kid"].as_str().unwrap()), header.kid.as_deref());
    for (field, value) in [
        ("kty", "EC"),
        ("crv", "P-256"),
        ("alg", "ES256"),
        ("use", "sig"),
    ] {
        assert_eq!(key[field], value, "{key}");
    }
    assert!(
        key.get("d").is_none(),
        "no private part is published: {key}"
    );

    let caller = verifier(&base).verify(token).await.unwrap();
    assert_eq!(
        caller,
        Caller {
            user_id,
            customer_id: Some(customer),
            roles: vec![Role::Customer],
            authenticated: true,
        }
    );

    let metrics = testing::metrics(&base).await;
    assert!(
        metrics.contains("service_up{service=\"auth\"} 1"),
        "{metrics}"
    );
    assert!(metrics.contains("auth_tokens_issued_total 1"), "{metrics}");
    running.stop().await.unwrap();
}

#[tokio::test]
async fn a_wrong_password_and_an_unknown_email_get_the_same_401() {
    let db = TestDatabase::create().await;
    let (running, base) = support::start(&db).await;
    let (status, _) = register(&base, "dora@shop.example", "dora-password", Uuid::now_v7()).await;
    assert_eq!(status, StatusCode::CREATED);

    let wrong = json!({ "email": "dora@shop.example", "password": "dora-passwore" });
    let unknown = json!({ "email": "nobody@shop.example", "password": "dora-password" });
    let (status, headers, wrong_body) = post(&format!("{base}/token"), None, &wrong).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(headers["www-authenticate"], "Bearer");
    assert_eq!(wrong_body["error"], "unauthorized");
    let (status, _, unknown_body) = post(&format!("{base}/token"), None, &unknown).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(
        unknown_body, wrong_body,
        "the answer does not tell which was wrong"
    );

    let metrics = testing::metrics(&base).await;
    assert!(
        metrics.contains("auth_sign_in_failures_total 2"),
        "{metrics}"
    );
    assert!(metrics.contains("auth_tokens_issued_total 0"), "{metrics}");
    running.stop().await.unwrap();
}

#[tokio::test]
async fn duplicate_emails_and_bad_registrations_are_refused() {
    let db = TestDatabase::create().await;
    let (running, base) = support::start(&db).await;
    let customer = Uuid::now_v7();
    let (status, _) = register(&base, "eve@shop.example", "eve-password", customer).await;
    assert_eq!(status, StatusCode::CREATED);

    let (status, body) =
        register(&base, "EVE@shop.example", "other-password", Uuid::now_v7()).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (StatusCode::CONFLICT, Some("conflict"))
    );
    let (status, body) = register(&base, "eve2@shop.example", "eve-password", customer).await;
    assert_eq!(
        status,
        StatusCode::CONFLICT,
        "one user per customer: {body}"
    );

    let (status, body) = register(&base, "fay@shop.example", "1234567", Uuid::now_v7()).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (StatusCode::UNPROCESSABLE_ENTITY, Some("invalid"))
    );
    for email in ["fay", "fay@shop", "fay@@shop.example", ""] {
        let (status, body) = register(&base, email, "fay-password", Uuid::now_v7()).await;
        assert_eq!(
            status,
            StatusCode::UNPROCESSABLE_ENTITY,
            "{email:?}: {body}"
        );
    }
    let missing = json!({ "email": "fay@shop.example", "password": "fay-password" });
    let (status, _, _) = post(&format!("{base}/users"), None, &missing).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);

    let count: i64 = sqlx::query_scalar("SELECT count(*) FROM users")
        .fetch_one(db.pool())
        .await
        .unwrap();
    assert_eq!(count, 1);
    let hash: String = sqlx::query_scalar("SELECT password_hash FROM users")
        .fetch_one(db.pool())
        .await
        .unwrap();
    assert!(hash.starts_with("$argon2id$"), "{hash}");
    running.stop().await.unwrap();
}

#[tokio::test]
async fn seed_writes_the_demo_users_once() {
    let db = TestDatabase::create().await;
    let (running, base) = support::start(&db).await;
    auth_service::seed(db.pool()).await.unwrap();
    let hashes = || async {
        sqlx::query_scalar::<_, String>("SELECT password_hash FROM users ORDER BY email")
            .fetch_all(db.pool())
            .await
            .unwrap()
    };
    let before = hashes().await;
    assert_eq!(before.len(), 3);
    auth_service::seed(db.pool()).await.unwrap();
    assert_eq!(hashes().await, before, "a second seed changes nothing");

    let verifier = verifier(&base);
    for (email, password, customer) in [
        ("ada@shop.example", "ada-demo-password", ADA),
        ("bob@shop.example", "bob-demo-password", BOB),
    ] {
        let caller = verifier
            .verify(&token(&base, email, password).await)
            .await
            .unwrap();
        assert_eq!(
            (caller.customer_id, caller.roles),
            (Some(customer), vec![Role::Customer])
        );
    }
    let operator = token(&base, "operator@shop.example", "operator-demo-password").await;
    let caller = verifier.verify(&operator).await.unwrap();
    assert_eq!(
        (caller.customer_id, caller.roles),
        (None, vec![Role::Operator])
    );
    assert_eq!(
        sign_in(&base, "ada@shop.example", "bob-demo-password")
            .await
            .0,
        StatusCode::UNAUTHORIZED
    );

    let (status, health) = get_json(&format!("{base}/health")).await;
    assert_eq!((status, &health["status"]), (StatusCode::OK, &json!("ok")));
    running.stop().await.unwrap();
}

#[tokio::test]
async fn operators_are_added_from_the_command_line_only() {
    use auth_service::cli::{run, Command, UserCommand};
    let db = TestDatabase::create().await;
    let config = auth_service::Config::new(db.url());
    let add = |email: &str, password: &str, roles: Vec<Role>, customer_id| {
        Command::User(UserCommand::Add {
            email: email.into(),
            password: password.into(),
            roles,
            customer_id,
        })
    };
    run(
        Some(add(
            "ops@shop.example",
            "ops-password",
            vec![Role::Operator],
            None,
        )),
        config.clone(),
    )
    .await
    .unwrap();
    // What the API would refuse, the command line refuses too.
    for refused in [
        add(
            "ops@shop.example",
            "ops-password",
            vec![Role::Operator],
            None,
        ),
        add("ops2@shop.example", "short", vec![Role::Operator], None),
        add(
            "ops3@shop.example",
            "ops-password",
            vec![Role::Customer],
            None,
        ),
    ] {
        assert!(
            run(Some(refused.clone()), config.clone()).await.is_err(),
            "{refused:?}"
        );
    }
    let roles: Vec<Vec<String>> = sqlx::query_scalar("SELECT roles FROM users")
        .fetch_all(db.pool())
        .await
        .unwrap();
    assert_eq!(roles, vec![vec!["operator".to_owned()]]);

    // The API makes customers, whatever the body says.
    let (running, base) = support::start(&db).await;
    let body = json!({
        "email": "mallory@shop.example", "password": "mallory-password",
        "customerId": Uuid::now_v7(), "roles": ["operator"],
    });
    let (status, _, user) = post(&format!("{base}/users"), None, &body).await;
    assert_eq!(
        (status, &user["roles"]),
        (StatusCode::CREATED, &json!(["customer"]))
    );
    let operator = token(&base, "ops@shop.example", "ops-password").await;
    let caller = verifier(&base).verify(&operator).await.unwrap();
    assert_eq!(caller.roles, vec![Role::Operator]);
    running.stop().await.unwrap();
}
