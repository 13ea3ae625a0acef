//! The card an order is paid with, as a token of the payment service's vault.
//!
//! The order service never keeps a card number. `POST /orders` takes either a
//! `cardToken` the client got from the payment service's `POST /cards`, or a
//! `cardNumber`, which is exchanged there for its token before anything is
//! written: the order row, the saga's state, the `Charge` command and the
//! Idempotency-Key's fingerprint all hold the token and the last four digits
//! only. The vault gives one card one token, so a retried request stays the same
//! request. A client that tokenises first keeps placing orders while the payment
//! service is down; one that sends the number needs the vault to answer.

use std::time::Duration;

use axum::http::StatusCode;
use serde::Deserialize;
use service_kit::cards::{CardNumber, CardToken};
use service_kit::ApiError;

use crate::api::AppState;

/// How long the vault has to answer.
const VAULT_TIMEOUT: Duration = Duration::from_secs(5);

/// The card as `POST /orders` names it: exactly one of the two.
pub(crate) fn named(number: Option<&str>, token: Option<&str>) -> Result<Named, ApiError> {
    match (number, token) {
        (Some(number), None) => CardNumber::parse(number)
            .map(Named::Number)
            .map_err(ApiError::invalid),
        (None, Some(token)) => CardToken::parse(token).map(Named::Token).map_err(|_| {
            ApiError::invalid("cardToken is not a token of the payment service's POST /cards")
        }),
        (Some(_), Some(_)) => Err(ApiError::invalid("send cardNumber or cardToken, not both")),
        (None, None) => Err(ApiError::invalid(
            "an order needs cardToken (from the payment service's POST /cards) or cardNumber",
        )),
    }
}

/// A card named by the client.
#[derive(Debug)]
pub(crate) enum Named {
    Number(CardNumber),
    Token(CardToken),
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Tokenised {
    card_token: String,
}

#[derive(Deserialize)]
struct Refusal {
    message: String,
}

/// The token for `card`: as given, or the vault's for the number.
pub(crate) async fn token(
    state: &AppState,
    card: Named,
    authorization: Option<&axum::http::HeaderValue>,
) -> Result<CardToken, ApiError> {
    let number = match card {
        Named::Token(token) => return Ok(token),
        Named::Number(number) => number,
    };
    let Some(base) = state.references.payment_url.as_deref() else {
        return Err(ApiError::invalid(
            "this order service takes cardToken only (from the payment service's POST /cards)",
        ));
    };
    let url = format!("{}/cards", base.trim_end_matches('/'));
    let unavailable = |detail: String| {
        tracing::warn!(%url, %detail, "the card vault did not tokenise the card");
        ApiError::unavailable(
            "the payment service's card vault cannot be reached; try again, or send a cardToken",
        )
    };
    let response = crate::api::onward(state.http.post(&url), authorization)
        .timeout(VAULT_TIMEOUT)
        .json(&serde_json::json!({ "cardNumber": number.digits() }))
        .send()
        .await
        .map_err(|e| unavailable(e.to_string()))?;
    let status = response.status();
    if status == StatusCode::UNPROCESSABLE_ENTITY {
        let refusal: Refusal = response
            .json()
            .await
            .map_err(|e| unavailable(e.to_string()))?;
        return Err(ApiError::invalid(refusal.message));
    }
    if !status.is_success() {
        return Err(unavailable(format!("status {status}")));
    }
    let tokenised: Tokenised = response
        .json()
        .await
        .map_err(|e| unavailable(e.to_string()))?;
    CardToken::parse(&tokenised.card_token).map_err(unavailable)
}
