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
        }
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
        answer(request.send().await?).await
    }

    /// The vault's token for the card `number` (`POST /cards` on the payment
    /// service), once per card and payment service.
    pub async fn card_token(&self, number: &str) -> anyhow::Result<String> {
        let key = (self.payment_url.clone(), number.to_owned());
        if let Some(token) = tokens().lock().ok().and_then(|t| t.get(&key).cloned()) {
            return Ok(token);
        }
        let (status, body) = answer(
            self.http
                .post(format!("{}/cards", self.payment_url))
                .json(&serde_json::json!({ "cardNumber": number }))
                .send()
                .await?,
        )
        .await?;
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

    pub async fn cancel(&self, order_id: Uuid) -> anyhow::Result<Answer> {
        answer(
            self.http
                .post(format!("{}/orders/{order_id}/cancel", self.order_url))
                .send()
                .await?,
        )
        .await
    }

    pub async fn get(&self, url: String) -> anyhow::Result<Answer> {
        answer(self.http.get(url).send().await?).await
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
