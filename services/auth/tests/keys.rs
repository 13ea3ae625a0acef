//! Signing keys on a real database: rotation over HTTP and from the command line,
//! the rollover during which two keys are valid, the end of a retired key's grace,
//! and concurrent rotations.

mod support;

use std::time::Duration;

use auth_service::cli::{run, Command, KeysCommand};
use auth_service::keys;
use reqwest::StatusCode;
use serde_json::json;
use service_kit::auth::VerifyError;
use support::{kid, post, published_kids, token, verifier};
use testkit::TestDatabase;

const TTL: Duration = Duration::from_secs(900);

#[tokio::test]
async fn rotation_keeps_old_tokens_valid_until_their_key_s_grace_ends() {
    let db = TestDatabase::create().await;
    let (running, base) = support::start(&db).await;
    auth_service::seed(db.pool()).await.unwrap();
    let operator = token(&base, "operator@shop.example", "operator-demo-password").await;
    let old_token = token(&base, "ada@shop.example", "ada-demo-password").await;
    let old_kid = kid(&old_token);
    assert_eq!(published_kids(&base).await, vec![old_kid.clone()]);
    // Fetches the JWKS as it is before the rotation.
    let verifier = verifier(&base).min_refresh_interval(Duration::ZERO);
    verifier.verify(&old_token).await.unwrap();
    // One that fetches again whenever it is asked, its cache being always stale.
    let stale = support::verifier(&base)
        .min_refresh_interval(Duration::ZERO)
        .max_key_age(Duration::ZERO);
    stale.verify(&old_token).await.unwrap();

    let rotate = format!("{base}/keys/rotate");
    let (status, headers, body) = post(&rotate, None, &json!({})).await;
    assert_eq!(
        (status, &body["error"]),
        (StatusCode::UNAUTHORIZED, &json!("unauthorized"))
    );
    assert_eq!(headers["www-authenticate"], "Bearer");
    let (status, _, body) = post(&rotate, Some(&old_token), &json!({})).await;
    assert_eq!(
        (status, &body["error"]),
        (StatusCode::FORBIDDEN, &json!("forbidden"))
    );
    let (status, headers, _) = post(&rotate, Some("not.a.token"), &json!({})).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(
        headers["www-authenticate"],
        r#"Bearer error="invalid_token""#
    );
    assert_eq!(
        published_kids(&base).await,
        vec![old_kid.clone()],
        "nothing rotated yet"
    );

    let (status, _, rotation) = post(&rotate, Some(&operator), &json!({})).await;
    assert_eq!(status, StatusCode::OK, "{rotation}");
    assert_eq!(rotation["retired"], json!(old_kid));
    let new_kid = rotation["kid"].as_str().unwrap().to_owned();
    assert_ne!(new_kid, old_kid);

    // The rollover: both keys published, the new one first; both tokens valid.
    assert_eq!(
        published_kids(&base).await,
        vec![new_kid.clone(), old_kid.clone()]
    );
    let new_token = token(&base, "ada@shop.example", "ada-demo-password").await;
    assert_eq!(kid(&new_token), new_kid);
    let fetches = verifier.fetches();
    verifier.verify(&new_token).await.unwrap();
    assert_eq!(
        verifier.fetches(),
        fetches + 1,
        "the unknown kid fetched the JWKS"
    );
    verifier.verify(&old_token).await.unwrap();

    // The old key's grace ends: retired longer ago than the token lifetime and a minute.
    sqlx::query(
        "UPDATE signing_keys SET created_at = now() - interval '3 hours', \
         retired_at = now() - interval '961 seconds' WHERE kid = $1",
    )
    .bind(&old_kid)
    .execute(db.pool())
    .await
    .unwrap();
    assert_eq!(published_kids(&base).await, vec![new_kid.clone()]);
    assert_eq!(
        stale.verify(&old_token).await,
        Err(VerifyError::UnknownKey(old_kid.clone()))
    );
    support::verifier(&base).verify(&new_token).await.unwrap();

    // Rotating from the command line deletes the key past its grace.
    run(
        Some(Command::Keys(KeysCommand::Rotate)),
        auth_service::Config::new(db.url()),
    )
    .await
    .unwrap();
    let kids: Vec<String> = sqlx::query_scalar("SELECT kid FROM signing_keys ORDER BY created_at")
        .fetch_all(db.pool())
        .await
        .unwrap();
    assert_eq!(kids.len(), 2, "{kids:?}");
    assert_eq!(kids[0], new_kid);
    assert!(!kids.contains(&old_kid));
    let published = published_kids(&base).await;
    assert_eq!(published, vec![kids[1].clone(), new_kid.clone()]);
    running.stop().await.unwrap();
}

#[tokio::test]
async fn concurrent_rotations_and_starts_leave_exactly_one_signing_key() {
    let db = TestDatabase::create().await;
    auth_service::migrate(db.pool()).await.unwrap();
    let ensured = futures_join(4, || keys::ensure(db.pool())).await;
    assert_eq!(
        ensured.iter().filter(|created| created.is_some()).count(),
        1
    );

    let rotations = futures_join(4, || keys::rotate(db.pool(), TTL)).await;
    let (total, current): (i64, i64) = sqlx::query_as(
        "SELECT count(*), count(*) FILTER (WHERE retired_at IS NULL) FROM signing_keys",
    )
    .fetch_one(db.pool())
    .await
    .unwrap();
    assert_eq!((total, current), (5, 1));
    // Each rotation retired the key the one before it made.
    let mut retired: Vec<String> = rotations.iter().filter_map(|r| r.retired.clone()).collect();
    retired.sort();
    retired.dedup();
    assert_eq!(retired.len(), 4);
    let published = keys::published(db.pool(), TTL).await.unwrap();
    assert_eq!(published.keys.len(), 5, "all retired within their grace");
}

/// Runs `n` calls of `f` at once (their statements interleave on the pool's
/// connections, which is what the advisory lock must serialise) and unwraps them.
async fn futures_join<T, F, Fut>(n: usize, f: F) -> Vec<T>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<T>>,
{
    futures::future::join_all((0..n).map(|_| f()))
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect()
}
