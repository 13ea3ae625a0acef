//! The saga console behind sign-in: with authentication on, every console page and
//! action needs an operator.
//!
//! A browser cannot send a bearer token with a link or a form, so the console also
//! takes the token from a cookie: `GET /console/sign-in` shows a form, its `POST`
//! signs in at the auth service (`POST /token`, next to the JWKS) and keeps the
//! access token in the `shop_console` cookie — `HttpOnly` (no script reads it),
//! `SameSite=Strict` (another site's form cannot post a console action with it),
//! scoped to `/console` and as long-lived as the token. Every request is verified
//! again like a bearer token, so an expired or forged cookie sends the browser back
//! to the form, and a customer's token gets a 403. Tools may send
//! `Authorization: Bearer` instead. With authentication off the console is open,
//! as before.

use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Form, Router};
use serde::Deserialize;
use service_kit::auth::{Authentication, Role, VerifyError};

/// The cookie holding the console's access token.
pub const COOKIE: &str = "shop_console";

/// What the gate needs: the verifier, and where to sign in.
#[derive(Debug, Clone)]
pub(crate) struct Gate {
    pub(crate) authentication: Authentication,
    /// The auth service's `POST /token`, derived from the JWKS URL.
    pub(crate) token_url: Option<String>,
    pub(crate) http: reqwest::Client,
    pub(crate) service: String,
}

/// The auth service's `POST /token` next to its JWKS
/// (`…/.well-known/jwks.json` → `…/token`).
pub(crate) fn token_url(jwks_url: &str) -> Option<String> {
    jwks_url
        .trim()
        .strip_suffix("/.well-known/jwks.json")
        .map(|base| format!("{base}/token"))
}

/// `console` behind the gate, and the sign-in routes beside it.
pub(crate) fn protect(console: Router, gate: Gate) -> Router {
    let base = saga_console::BASE;
    let sign_in = Router::new()
        .route(&format!("{base}/sign-in"), get(form).post(sign_in))
        .route(&format!("{base}/sign-out"), post(sign_out))
        .with_state(gate.clone());
    console
        .route_layer(axum::middleware::from_fn_with_state(gate, require_operator))
        .merge(sign_in)
}

fn token_of(headers: &HeaderMap) -> Option<String> {
    let bearer = service_kit::auth::bearer(headers).ok().flatten();
    bearer.map(str::to_owned).or_else(|| {
        headers
            .get_all(header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(';'))
            .filter_map(|pair| pair.trim().split_once('='))
            .find(|(name, _)| *name == COOKIE)
            .map(|(_, value)| value.to_owned())
    })
}

fn to_sign_in() -> Response {
    Redirect::to(&format!("{}/sign-in", saga_console::BASE)).into_response()
}

async fn require_operator(State(gate): State<Gate>, request: Request, next: Next) -> Response {
    let Authentication::Jwks(verifier) = &gate.authentication else {
        return next.run(request).await;
    };
    let Some(token) = token_of(request.headers()) else {
        return to_sign_in();
    };
    match verifier.verify(&token).await {
        Ok(caller) if caller.has_role(Role::Operator) => next.run(request).await,
        Ok(_) => page(
            &gate,
            StatusCode::FORBIDDEN,
            "This account is not an operator's; sign in as an operator.",
            "",
        ),
        Err(VerifyError::KeysUnavailable(detail)) => {
            tracing::warn!(%detail, "the console cannot verify its sign-ins");
            page(
                &gate,
                StatusCode::SERVICE_UNAVAILABLE,
                "The auth service cannot be reached to check the sign-in; try again.",
                "",
            )
        }
        Err(_) => to_sign_in(),
    }
}

fn page(gate: &Gate, status: StatusCode, message: &str, email: &str) -> Response {
    let message = Some(message).filter(|m| !m.is_empty());
    (
        status,
        Html(saga_console::sign_in_page(&gate.service, message, email)),
    )
        .into_response()
}

async fn form(State(gate): State<Gate>) -> Response {
    page(&gate, StatusCode::OK, "", "")
}

#[derive(Deserialize)]
struct SignIn {
    email: String,
    password: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Token {
    access_token: String,
    expires_in: u64,
}

async fn sign_in(State(gate): State<Gate>, Form(form): Form<SignIn>) -> Response {
    let (Authentication::Jwks(verifier), Some(url)) = (&gate.authentication, &gate.token_url)
    else {
        return Redirect::to(saga_console::BASE).into_response();
    };
    let answer = gate
        .http
        .post(url)
        .timeout(Duration::from_secs(10))
        .json(&serde_json::json!({ "email": form.email, "password": form.password }))
        .send()
        .await;
    let token: Token = match answer {
        Ok(response) if response.status() == StatusCode::OK => match response.json().await {
            Ok(token) => token,
            Err(e) => return unavailable(&gate, &e.to_string(), &form.email),
        },
        Ok(response) if response.status() == StatusCode::UNAUTHORIZED => {
            return page(
                &gate,
                StatusCode::UNAUTHORIZED,
                "Wrong email or password.",
                &form.email,
            )
        }
        Ok(response) => return unavailable(&gate, response.status().as_str(), &form.email),
        Err(e) => return unavailable(&gate, &e.to_string(), &form.email),
    };
    match verifier.verify(&token.access_token).await {
        Ok(caller) if caller.has_role(Role::Operator) => {}
        Ok(_) => {
            return page(
                &gate,
                StatusCode::FORBIDDEN,
                "This account is not an operator's.",
                &form.email,
            )
        }
        Err(e) => return unavailable(&gate, &e.to_string(), &form.email),
    }
    let cookie = format!(
        "{COOKIE}={}; Path={}; HttpOnly; SameSite=Strict; Max-Age={}",
        token.access_token,
        saga_console::BASE,
        token.expires_in
    );
    tracing::info!(email = %form.email, "an operator signed in to the console");
    with_cookie(Redirect::to(saga_console::BASE).into_response(), &cookie)
}

fn unavailable(gate: &Gate, detail: &str, email: &str) -> Response {
    tracing::warn!(%detail, "signing in to the console failed");
    page(
        gate,
        StatusCode::SERVICE_UNAVAILABLE,
        "The auth service did not answer as expected; try again.",
        email,
    )
}

/// `response` setting `cookie`.
fn with_cookie(mut response: Response, cookie: &str) -> Response {
    if let Ok(value) = HeaderValue::from_str(cookie) {
        response.headers_mut().insert(header::SET_COOKIE, value);
    }
    response
}

async fn sign_out() -> Response {
    let expired = format!(
        "{COOKIE}=; Path={}; HttpOnly; SameSite=Strict; Max-Age=0",
        saga_console::BASE
    );
    with_cookie(to_sign_in(), &expired)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_token_comes_from_the_bearer_header_or_the_cookie() {
        let mut headers = HeaderMap::new();
        assert_eq!(token_of(&headers), None);
        headers.insert(
            header::COOKIE,
            HeaderValue::from_static("a=1; shop_console=tok; b=2"),
        );
        assert_eq!(token_of(&headers).as_deref(), Some("tok"));
        headers.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer other"),
        );
        assert_eq!(token_of(&headers).as_deref(), Some("other"));
    }

    #[test]
    fn sign_in_is_next_to_the_jwks() {
        assert_eq!(
            token_url("http://auth:8085/.well-known/jwks.json").as_deref(),
            Some("http://auth:8085/token")
        );
        assert_eq!(token_url("http://auth:8085/keys"), None);
    }
}
