//! A small client of the shop's REST APIs.

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde::Serialize;
use serde_json::Value;
use uuid::Uuid;

/// The body of `POST /orders`.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct OrderRequest {
    pub customer_id: Uuid,
    pub goods_id: Uuid,
    pub quantity: i64,
    /// Decimal, at most two places.
    pub amount: f64,
    #[serde(flatten)]
    pub card: Card,
}

/// How an order names its card: by number (the order service has it tokenised)
/// or by a token of the payment service's vault.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum Card {
    CardNumber(String),
    CardToken(String),
}

impl Card {
    pub fn number(number: &str) -> Card {
        Card::CardNumber(number.to_owned())
    }
}

/// Tokens the vaults gave, by (payment service, card number): a client tokenises
/// a card once, as a shop's checkout page would, and keeps placing orders while
/// the payment service is down.
fn tokens() -> &'static Mutex<HashMap<(String, String), String>> {
    static TOKENS: OnceLock<Mutex<HashMap<(String, String), String>>> = OnceLock::new();
    TOKENS.get_or_init(Mutex::default)
}

/// Talks to one shop.
#[derive(Debug, Clone)]
pub struct ShopClient {
    http: reqwest::Client,
    pub order_url: String,
    pub customer_url: String,
    pub inventory_url: String,
    pub payment_url: String,
    /// The auth service, when the shop runs with authentication: orders are then
    /// placed signed in as their customer, and read or cancelled as the operator.
    pub auth_url: Option<String>,
}

/// Access tokens by (auth service, user).
fn access_tokens() -> &'static Mutex<HashMap<(String, String), String>> {
    static TOKENS: OnceLock<Mutex<HashMap<(String, String), String>>> = OnceLock::new();
    TOKENS.get_or_init(Mutex::default)
}

/// The demo operator's sign-in (`auth-service seed`).
pub const OPERATOR: (&str, &str) = ("operator@shop.example", "operator-demo-password");

/// The sign-in of the user acting for `customer`: the demo users for Ada and Bob,
/// a user of its own (registered on first use) for any other.
fn customer_user(customer: Uuid) -> (String, String) {
    if customer == customer_service::ADA {
        ("ada@shop.example".into(), "ada-demo-password".into())
    } else if customer == customer_service::BOB {
        ("bob@shop.example".into(), "bob-demo-password".into())
    } else {
        (
            format!("customer-{}@test.shop.example", customer.simple()),
            format!("password-{}", customer.simple()),
        )
    }
}

/// A status and a JSON body.
pub type Answer = (reqwest::StatusCode, Value);

async fn answer(response: reqwest::Response) -> anyhow::Result<Answer> {
    let status = response.status();
    let text = response.text().await?;
    let body = if text.is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&text).with_context(|| format!("{status}: not JSON: {text}"))?
    };
    Ok((status, body))
}

impl ShopClient {
    pub fn new(shop: &crate::Shop) -> ShopClient {
        ShopClient {
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(30))
                .build()
                .unwrap_or_default(),
            order_url: shop.order_url.clone(),
            customer_url: shop.customer_url.clone(),
            inventory_url: shop.inventory_url.clone(),
            payment_url: shop.payment_url.clone(),
            auth_url: shop.auth_url.clone(),
        }
    }

    /// `POST /token` at the auth service: the access token of `email`.
    pub async fn sign_in(&self, email: &str, password: &str) -> anyhow::Result<String> {
        let auth = self
            .auth_url
            .as_deref()
            .context("the shop runs without authentication")?;
        let key = (auth.to_owned(), email.to_owned());
        if let Some(token) = access_tokens()
            .lock()
            .ok()
            .and_then(|t| t.get(&key).cloned())
        {
            return Ok(token);
        }
        let (status, body) = answer(
            self.http
                .post(format!("{auth}/token"))
                .json(&serde_json::json!({ "email": email, "password": password }))
                .send()
                .await?,
        )
        .await?;
        if status != reqwest::StatusCode::OK {
            bail!("signing in as {email}: POST /token answered {status}: {body}");
        }
        let token = body["accessToken"]
            .as_str()
            .with_context(|| format!("POST /token answered no token: {body}"))?
            .to_owned();
        if let Ok(mut tokens) = access_tokens().lock() {
            tokens.insert(key, token.clone());
        }
        Ok(token)
    }

    /// The access token of the user acting for `customer`; a user is registered
    /// for a customer that has none.
    pub async fn customer_token(&self, customer: Uuid) -> anyhow::Result<String> {
        let (email, password) = customer_user(customer);
        if let Ok(token) = self.sign_in(&email, &password).await {
            return Ok(token);
        }
        let auth = self
            .auth_url
            .as_deref()
            .context("the shop runs without authentication")?;
        let (status, body) = answer(
            self.http
                .post(format!("{auth}/users"))
                .json(&serde_json::json!({
                    "email": email, "password": password, "customerId": customer,
                }))
                .send()
                .await?,
        )
        .await?;
        if !matches!(status.as_u16(), 201 | 409) {
            bail!("registering {email}: POST /users answered {status}: {body}");
        }
        self.sign_in(&email, &password).await
    }

    /// The operator's access token.
    pub async fn operator_token(&self) -> anyhow::Result<String> {
        self.sign_in(OPERATOR.0, OPERATOR.1).await
    }

    /// `request` with the operator's token when the shop runs with authentication.
    async fn as_operator(
        &self,
        request: reqwest::RequestBuilder,
    ) -> anyhow::Result<reqwest::RequestBuilder> {
        Ok(match self.auth_url {
            Some(_) => request.bearer_auth(self.operator_token().await?),
            None => request,
        })
    }

    /// `POST /orders` with `body` as it is (to send malformed requests too).
    pub async fn post_order_raw(
        &self,
        body: &str,
        content_type: &str,
        idempotency_key: Option<&str>,
    ) -> anyhow::Result<Answer> {
        let mut request = self
            .http
            .post(format!("{}/orders", self.order_url))
            .header("content-type", content_type)
            .body(body.to_owned());
        if let Some(key) = idempotency_key {
            request = request.header("idempotency-key", key);
        }
        if self.auth_url.is_some() {
            // Signed in as the order's customer when the body names one.
            let customer = serde_json::from_str::<Value>(body)
                .ok()
                .and_then(|b| b["customerId"].as_str().and_then(|c| c.parse().ok()));
            request = match customer {
                Some(customer) => request.bearer_auth(self.customer_token(customer).await?),
                None => self.as_operator(request).await?,
            };
        }
        answer(request.send().await?).await
    }

    /// The vault's token for the card `number` (`POST /cards` on the payment
    /// service), once per card and payment service.
    pub async fn card_token(&self, number: &str) -> anyhow::Result<String> {
        let key = (self.payment_url.clone(), number.to_owned());
        if let Some(token) = tokens().lock().ok().and_then(|t| t.get(&key).cloned()) {
            return Ok(token);
        }
        let request = self
            .http
            .post(format!("{}/cards", self.payment_url))
            .json(&serde_json::json!({ "cardNumber": number }));
        let (status, body) = answer(self.as_operator(request).await?.send().await?).await?;
        if !status.is_success() {
            bail!("POST /cards answered {status}: {body}");
        }
        let token = body["cardToken"]
            .as_str()
            .with_context(|| format!("POST /cards answered no token: {body}"))?
            .to_owned();
        if let Ok(mut tokens) = tokens().lock() {
            tokens.insert(key, token.clone());
        }
        Ok(token)
    }

    /// `POST /orders`; a card given by number is tokenised first
    /// ([`ShopClient::card_token`]), so that no order carries a card number.
    pub async fn place(
        &self,
        order: &OrderRequest,
        idempotency_key: Option<&str>,
    ) -> anyhow::Result<Answer> {
        let mut order = order.clone();
        if let Card::CardNumber(number) = &order.card {
            order.card = Card::CardToken(self.card_token(number).await?);
        }
        self.post_order_raw(
            &serde_json::to_string(&order)?,
            "application/json",
            idempotency_key,
        )
        .await
    }

    /// Places an order that must be accepted; returns its id.
    pub async fn place_accepted(&self, order: &OrderRequest) -> anyhow::Result<Uuid> {
        let (status, body) = self.place(order, None).await?;
        if status != reqwest::StatusCode::ACCEPTED {
            bail!("POST /orders answered {status}: {body}");
        }
        Ok(serde_json::from_value(body["orderId"].clone())?)
    }

    /// Cancels as the operator when the shop runs with authentication.
    pub async fn cancel(&self, order_id: Uuid) -> anyhow::Result<Answer> {
        let request = self
            .http
            .post(format!("{}/orders/{order_id}/cancel", self.order_url));
        answer(self.as_operator(request).await?.send().await?).await
    }

    /// `GET url`, as the operator when the shop runs with authentication.
    pub async fn get(&self, url: String) -> anyhow::Result<Answer> {
        answer(self.as_operator(self.http.get(url)).await?.send().await?).await
    }

    pub async fn order(&self, order_id: Uuid) -> anyhow::Result<Value> {
        let (status, body) = self
            .get(format!("{}/orders/{order_id}", self.order_url))
            .await?;
        if !status.is_success() {
            bail!("GET /orders/{order_id} answered {status}: {body}");
        }
        Ok(body)
    }

    pub async fn goods(&self, id: Uuid) -> anyhow::Result<Value> {
        Ok(self
            .get(format!("{}/goods/{id}", self.inventory_url))
            .await?
            .1)
    }

    pub async fn customer(&self, id: Uuid) -> anyhow::Result<Value> {
        Ok(self
            .get(format!("{}/customers/{id}", self.customer_url))
            .await?
            .1)
    }

    pub async fn payment(&self, order_id: Uuid) -> anyhow::Result<Answer> {
        self.get(format!("{}/payments/{order_id}", self.payment_url))
            .await
    }

    /// Polls the order until its saga has ended (COMPLETED, ABORTED or
    /// COMPENSATION_FAILED); returns the order.
    pub async fn wait_final(&self, order_id: Uuid, timeout: Duration) -> anyhow::Result<Value> {
        let started = Instant::now();
        loop {
            let order = self.order(order_id).await?;
            let saga = order["saga"]["status"].as_str().unwrap_or("");
            if matches!(saga, "COMPLETED" | "ABORTED" | "COMPENSATION_FAILED") {
                return Ok(order);
            }
            if started.elapsed() > timeout {
                bail!("order {order_id} not final after {timeout:?}: {order}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}
