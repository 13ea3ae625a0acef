//! [`Caller`], the axum extractor of who is calling, and the 401 and 403 answers
//! (see the [`crate::auth`] module): 401 with a `WWW-Authenticate: Bearer`
//! challenge when there is no valid token, 403 from the `require_*` checks, 503
//! when the keys cannot be fetched (the token may be fine), and 500 when the router
//! lacks [`super::layer`] (so a forgotten layer refuses instead of letting through).

use axum::http::request::Parts;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use uuid::Uuid;

use super::{Authentication, Role, VerifyError};
use crate::http::ApiError;

/// The caller of a request: the user a valid access token names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub user_id: Uuid,
    /// The customer the user acts for (customers only).
    pub customer_id: Option<Uuid>,
    pub roles: Vec<Role>,
    /// `false` only with authentication off: the `require_*` checks then pass.
    pub authenticated: bool,
}

impl Caller {
    /// The caller with authentication off: no user, no roles, nothing refused.
    pub fn unauthenticated() -> Caller {
        Caller {
            user_id: Uuid::nil(),
            customer_id: None,
            roles: Vec::new(),
            authenticated: false,
        }
    }

    pub fn has_role(&self, role: Role) -> bool {
        self.roles.contains(&role)
    }

    /// 403 unless the caller is an operator.
    pub fn require_operator(&self) -> Result<(), ApiError> {
        if !self.authenticated || self.has_role(Role::Operator) {
            Ok(())
        } else {
            Err(forbidden("this needs an operator"))
        }
    }

    /// 403 unless the caller is the customer `customer_id`.
    pub fn require_customer(&self, customer_id: Uuid) -> Result<(), ApiError> {
        if !self.authenticated
            || (self.has_role(Role::Customer) && self.customer_id == Some(customer_id))
        {
            Ok(())
        } else {
            Err(forbidden(format!("not allowed for customer {customer_id}")))
        }
    }

    /// 403 unless the caller is the customer `customer_id` or an operator.
    pub fn require_customer_or_operator(&self, customer_id: Uuid) -> Result<(), ApiError> {
        self.require_operator()
            .or_else(|_| self.require_customer(customer_id))
    }
}

/// 403 `forbidden`: the caller is known but may not do this.
pub fn forbidden(message: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::FORBIDDEN, "forbidden", message)
}

/// 401 `unauthorized` with the challenge RFC 6750 asks for; `token_given` adds
/// `error="invalid_token"`.
pub fn unauthorized(message: &str, token_given: bool) -> Response {
    let challenge = if token_given {
        r#"Bearer error="invalid_token""#
    } else {
        "Bearer"
    };
    let mut response =
        ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", message).into_response();
    response.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static(challenge),
    );
    response
}

/// The token of an `Authorization: Bearer <token>` header; `Ok(None)` without the
/// header, an error for one of another form.
pub fn bearer(headers: &axum::http::HeaderMap) -> Result<Option<&str>, &'static str> {
    let Some(value) = headers.get(header::AUTHORIZATION) else {
        return Ok(None);
    };
    let value = value
        .to_str()
        .map_err(|_| "the Authorization header is not text")?;
    match value.split_once(' ') {
        Some((scheme, token))
            if scheme.eq_ignore_ascii_case("bearer") && !token.trim().is_empty() =>
        {
            Ok(Some(token.trim()))
        }
        _ => Err("the Authorization header is not `Bearer <token>`"),
    }
}

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for Caller {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Caller, Response> {
        let Some(authentication) = parts.extensions.get::<Authentication>().cloned() else {
            // Fail closed: a router without the layer refuses rather than lets through.
            tracing::error!("a handler takes a Caller but the router has no auth::layer");
            return Err(ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "authentication is not configured; see the service log",
            )
            .into_response());
        };
        let verifier = match authentication {
            Authentication::Off => return Ok(Caller::unauthenticated()),
            Authentication::Jwks(verifier) => verifier,
        };
        let token = match bearer(&parts.headers) {
            Ok(Some(token)) => token,
            Ok(None) => return Err(unauthorized("a bearer token is required", false)),
            Err(message) => return Err(unauthorized(message, true)),
        };
        match verifier.verify(token).await {
            Ok(caller) => Ok(caller),
            Err(VerifyError::KeysUnavailable(reason)) => {
                tracing::warn!(%reason, "cannot verify a token");
                Err(ApiError::unavailable(
                    "the token cannot be verified now (the auth service's keys are unavailable); try again",
                )
                .into_response())
            }
            Err(e) => Err(unauthorized(&e.to_string(), true)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::Request;

    fn parts(authorization: Option<&str>) -> Parts {
        let mut request = Request::builder().uri("/");
        if let Some(value) = authorization {
            request = request.header(header::AUTHORIZATION, value);
        }
        request.body(()).unwrap().into_parts().0
    }

    #[test]
    fn the_bearer_token_is_read_from_the_authorization_header() {
        assert_eq!(bearer(&parts(None).headers), Ok(None));
        assert_eq!(bearer(&parts(Some("Bearer abc")).headers), Ok(Some("abc")));
        assert_eq!(
            bearer(&parts(Some("bearer  abc ")).headers),
            Ok(Some("abc"))
        );
        assert!(bearer(&parts(Some("Basic dXNlcjpwdw==")).headers).is_err());
        assert!(bearer(&parts(Some("Bearer ")).headers).is_err());
        assert!(bearer(&parts(Some("Bearer")).headers).is_err());
    }

    fn caller(roles: &[Role], customer: Option<Uuid>) -> Caller {
        Caller {
            user_id: Uuid::now_v7(),
            customer_id: customer,
            roles: roles.to_vec(),
            authenticated: true,
        }
    }

    #[test]
    fn require_checks_roles_and_the_customer() {
        let (ada, bob) = (crate::demo::ADA, crate::demo::BOB);
        let customer = caller(&[Role::Customer], Some(ada));
        assert_eq!(customer.require_customer(ada), Ok(()));
        let refused = customer.require_customer(bob).unwrap_err();
        assert_eq!(
            (refused.status, refused.code),
            (StatusCode::FORBIDDEN, "forbidden")
        );
        assert_eq!(
            customer.require_operator().unwrap_err().status,
            StatusCode::FORBIDDEN
        );
        assert!(customer.require_customer_or_operator(bob).is_err());

        let operator = caller(&[Role::Operator], None);
        assert_eq!(operator.require_operator(), Ok(()));
        assert!(operator.require_customer(ada).is_err());
        assert_eq!(operator.require_customer_or_operator(ada), Ok(()));

        // A customer id without the customer role is no customer.
        assert!(caller(&[], Some(ada)).require_customer(ada).is_err());
        assert_eq!(Caller::unauthenticated().require_operator(), Ok(()));
        assert_eq!(Caller::unauthenticated().require_customer(bob), Ok(()));
    }
}
