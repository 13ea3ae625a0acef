//! The order saga end to end: the four services and their relays against the real
//! PostgreSQL and broker.

mod support;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use customer_service::{ADA, BOB};
use inventory_service::{GADGET, WIDGET};
use reqwest::StatusCode;
use service_kit::Amount;
use shop::OrderRequest;
use uuid::Uuid;

const GOOD_CARD: &str = "4111 1111 1111 1111";
const DECLINED_CARD: &str = "4000 0000 0000 9999";

/// Customers and goods beyond the demo data, so that orders compete for them.
const CUSTOMERS: &str = "INSERT INTO customers (id, name, credit_limit, available_credit) \
    SELECT ('00000000-0000-0000-0000-0000000e' || lpad(n::text, 4, '0'))::uuid, 'customer ' || n, 600, 600 \
    FROM generate_series(1, 8) n";
const GOODS: &str = "INSERT INTO goods (id, name, stock) \
    SELECT ('00000000-0000-0000-0000-0000000f' || lpad(n::text, 4, '0'))::uuid, 'item ' || n, 60 \
    FROM generate_series(1, 6) n";

fn extra_customer(n: u64) -> Uuid {
    Uuid::parse_str(&format!("00000000-0000-0000-0000-0000000e{n:04}")).expect("uuid")
}

fn extra_goods(n: u64) -> Uuid {
    Uuid::parse_str(&format!("00000000-0000-0000-0000-0000000f{n:04}")).expect("uuid")
}

/// A small deterministic generator (the seed is printed, so a failure replays).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Plain,
    DeclinedCard,
    OverChargeLimit,
    Cancelled,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_hundred_concurrent_orders_end_consistent() {
    let shop = support::start(
        |config| config.charge_limit = Some(Amount(30_000)),
        CUSTOMERS,
        GOODS,
    )
    .await;
    let before = shop.balances().await;
    let seed = std::env::var("OUTBOX_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| u64::from(std::process::id()) | 1);
    eprintln!("seed {seed} (set OUTBOX_TEST_SEED to replay)");
    let mut rng = Rng(seed);
    let count = 200;
    let mut orders = Vec::new();
    for _ in 0..count {
        let kind = match rng.below(20) {
            0 | 1 => Kind::DeclinedCard,
            2 => Kind::OverChargeLimit,
            3 | 4 => Kind::Cancelled,
            _ => Kind::Plain,
        };
        let customer = match rng.below(10) {
            0 => ADA,
            1 => BOB,
            n => extra_customer(n - 1),
        };
        let goods = match rng.below(8) {
            0 => WIDGET,
            1 => GADGET,
            n => extra_goods(n - 1),
        };
        let cents = if kind == Kind::OverChargeLimit {
            30_001 + rng.below(5_000) as i64
        } else {
            500 + rng.below(12_000) as i64
        };
        let request = OrderRequest {
            customer_id: customer,
            goods_id: goods,
            quantity: 1 + rng.below(4) as i64,
            amount: cents as f64 / 100.0,
            card: shop::Card::number(if kind == Kind::DeclinedCard {
                DECLINED_CARD
            } else {
                GOOD_CARD
            }),
        };
        orders.push((kind, request));
    }

    let started = Instant::now();
    let client = Arc::new(shop.client.clone());
    let placing = orders.into_iter().map(|(kind, request)| {
        let client = Arc::clone(&client);
        tokio::spawn(async move {
            let id = client
                .place_accepted(&request)
                .await
                .expect("order accepted");
            let cancel = if kind == Kind::Cancelled {
                Some(client.cancel(id).await.expect("cancel answered").0)
            } else {
                None
            };
            (id, kind, request, cancel)
        })
    });
    let placed: Vec<_> = futures::future::try_join_all(placing)
        .await
        .expect("placing");
    eprintln!("{count} orders placed in {:?}", started.elapsed());

    // Every saga ends within the bound.
    let bound = Duration::from_secs(180);
    let mut outcomes: BTreeMap<&'static str, usize> = BTreeMap::new();
    for (id, kind, request, cancel) in &placed {
        let remaining = bound.saturating_sub(started.elapsed());
        let order = client
            .wait_final(*id, remaining)
            .await
            .expect("saga ends in time");
        let status = order["status"].as_str().unwrap_or_default().to_owned();
        let reason = order["reason"].as_str().unwrap_or_default().to_owned();
        let saga = order["saga"]["status"].as_str().unwrap_or_default();
        assert!(
            matches!(
                (status.as_str(), saga),
                ("APPROVED", "COMPLETED") | ("REJECTED", "ABORTED")
            ),
            "order {id} ({kind:?}) ended {status}/{saga}: {order}"
        );
        match kind {
            Kind::DeclinedCard | Kind::OverChargeLimit
                if status == "REJECTED" && reason.starts_with("payment declined") =>
            {
                let (code, payment) = client.payment(*id).await.expect("payment");
                assert_eq!(code, StatusCode::OK);
                assert_eq!(payment["status"], "DECLINED", "{payment}");
            }
            Kind::DeclinedCard | Kind::OverChargeLimit => {
                // Stock or credit ran out first; the card was never charged.
                assert_eq!(status, "REJECTED", "order {id} ({kind:?}): {order}");
                assert_eq!(
                    client.payment(*id).await.expect("payment").0,
                    StatusCode::NOT_FOUND
                );
            }
            Kind::Cancelled if *cancel == Some(StatusCode::ACCEPTED) => {
                assert_eq!(
                    status, "REJECTED",
                    "a cancelled order {id} was approved: {order}"
                );
                if reason == shop_cancelled() {
                    let (_, payment) = client.payment(*id).await.expect("payment");
                    assert_eq!(payment["status"], "REFUNDED", "{payment}");
                }
            }
            Kind::Cancelled => {
                assert_eq!(*cancel, Some(StatusCode::CONFLICT), "order {id}");
            }
            Kind::Plain => {}
        }
        if status == "APPROVED" {
            let (_, payment) = client.payment(*id).await.expect("payment");
            assert_eq!(payment["status"], "CHARGED", "{payment}");
            assert_eq!(
                payment["amount"].as_f64(),
                Some(request.amount),
                "{payment}"
            );
        }
        let label = match (status.as_str(), reason.split(':').next().unwrap_or("")) {
            ("APPROVED", _) => "approved",
            (_, "insufficient stock") => "rejected: stock",
            (_, "credit limit exceeded") => "rejected: credit",
            (_, "payment declined") => "rejected: payment",
            (_, r) if r == shop_cancelled() => "rejected: cancelled",
            _ => "rejected: other",
        };
        *outcomes.entry(label).or_default() += 1;
    }
    eprintln!(
        "all sagas ended after {:?}: {outcomes:?}",
        started.elapsed()
    );
    for label in [
        "approved",
        "rejected: stock",
        "rejected: credit",
        "rejected: payment",
        "rejected: cancelled",
    ] {
        assert!(
            outcomes.get(label).copied().unwrap_or(0) > 0,
            "no order was {label}: {outcomes:?}"
        );
    }
    assert_eq!(outcomes.get("rejected: other"), None, "{outcomes:?}");

    let report = shop
        .ledger
        .check(&before)
        .await
        .expect("invariants readable");
    eprintln!("{report}");
    assert!(report.ok(), "{report}");
    assert_eq!(report.orders, count);

    // Every saga, rebuilt from its audit trail, is its row of saga_state.
    let trail = saga_core::saga::audit::verify(&shop.ledger.order, None)
        .await
        .expect("trail readable");
    eprintln!("{trail}");
    assert!(trail.ok(), "{trail}");
    assert_eq!(trail.sagas, count);

    no_card_number_is_kept(&shop, &client).await;
    shop.stop().await;
}

/// No full card number in any table of the four databases or on any topic after
/// the run, where the cards' tokens are found (so the search sees what is kept).
async fn no_card_number_is_kept(shop: &support::TestShop, client: &shop::ShopClient) {
    use shop::exposure::{card_forms, tables_holding, topics_holding};
    let numbers: Vec<String> = [GOOD_CARD, DECLINED_CARD]
        .iter()
        .flat_map(|card| card_forms(card))
        .collect();
    let mut tokens = Vec::new();
    for card in [GOOD_CARD, DECLINED_CARD] {
        tokens.push(client.card_token(card).await.expect("the card's token"));
    }
    let ledger = &shop.ledger;
    for (name, pool) in [
        ("order", &ledger.order),
        ("customer", &ledger.customer),
        ("inventory", &ledger.inventory),
        ("payment", &ledger.payment),
    ] {
        let found = tables_holding(pool, &numbers).await.expect("tables read");
        assert!(
            found.is_empty(),
            "card numbers in the {name} database: {found:?}"
        );
    }
    let kept = tables_holding(&ledger.order, &tokens)
        .await
        .expect("tables read");
    assert!(
        kept.iter().any(|t| t.starts_with("public.saga_state:")),
        "the order database holds no card token: the search is blind ({kept:?})"
    );
    let config = &shop.shop.config;
    let search = topics_holding(
        &config.brokers,
        &config.prefix,
        &["outbox.dlq"],
        &numbers,
        Duration::from_secs(60),
    )
    .expect("topics read");
    eprintln!(
        "searched {} records on {} topics for card numbers",
        search.records,
        search.topics.len()
    );
    assert!(
        search.found.is_empty(),
        "card numbers on the topics: {:?}",
        search.found
    );
    let seen = topics_holding(
        &config.brokers,
        &config.prefix,
        &[],
        &tokens,
        Duration::from_secs(60),
    )
    .expect("topics read");
    assert!(
        seen.found.iter().any(|f| f.contains("payment.request")),
        "no card token on the payment topic: the search is blind ({:?})",
        seen.topics
    );
}

fn shop_cancelled() -> &'static str {
    order_service::placement::CANCELLED
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_are_refused_and_write_nothing() {
    let shop = support::start(|_| {}, "", "").await;
    let client = &shop.client;
    let good = serde_json::json!({
        "customerId": ADA, "goodsId": WIDGET, "quantity": 1, "amount": 10.5, "cardNumber": GOOD_CARD,
    });
    let with = |field: &str, value: serde_json::Value| {
        let mut body = good.clone();
        body[field] = value;
        body.to_string()
    };
    let without = |field: &str| {
        let mut body = good.clone();
        body.as_object_mut().expect("object").remove(field);
        body.to_string()
    };
    let cases: Vec<(&str, String, &str, StatusCode)> = vec![
        (
            "malformed JSON",
            "{\"customerId\": ".into(),
            "application/json",
            StatusCode::BAD_REQUEST,
        ),
        (
            "not JSON",
            good.to_string(),
            "text/plain",
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
        ),
        (
            "missing quantity",
            without("quantity"),
            "application/json",
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            "missing cardNumber",
            without("cardNumber"),
            "application/json",
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            "zero quantity",
            with("quantity", 0.into()),
            "application/json",
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            "negative quantity",
            with("quantity", (-2).into()),
            "application/json",
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            "zero amount",
            with("amount", 0.into()),
            "application/json",
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            "negative amount",
            with("amount", (-1.5).into()),
            "application/json",
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            "three decimals",
            with("amount", serde_json::json!(1.005)),
            "application/json",
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            "bad card",
            with("cardNumber", "12ab".into()),
            "application/json",
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            "malformed id",
            with("customerId", "nope".into()),
            "application/json",
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            "unknown customer",
            with("customerId", Uuid::now_v7().to_string().into()),
            "application/json",
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            "unknown goods",
            with("goodsId", Uuid::now_v7().to_string().into()),
            "application/json",
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            "unknown field",
            with("coupon", "FREE".into()),
            "application/json",
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
    ];
    for (what, body, content_type, expected) in cases {
        let (status, answer) = client
            .post_order_raw(&body, content_type, None)
            .await
            .expect("answered");
        assert_eq!(status, expected, "{what}: {answer}");
        assert!(
            answer["error"].is_string() && answer["message"].is_string(),
            "{what}: {answer}"
        );
    }
    let (status, answer) = client
        .get(format!("{}/orders/not-a-uuid", client.order_url))
        .await
        .expect("answered");
    assert_eq!(status, StatusCode::BAD_REQUEST, "{answer}");
    let (status, _) = client
        .get(format!("{}/orders/{}", client.order_url, Uuid::now_v7()))
        .await
        .expect("answered");
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, answer) = client
        .get(format!("{}/orders?limit=0", client.order_url))
        .await
        .expect("answered");
    assert_eq!(status, StatusCode::BAD_REQUEST, "{answer}");

    for table in ["orders", "saga_state", "outbox", "order_idempotency_keys"] {
        let n: i64 = sqlx::query_scalar(&format!("SELECT count(*) FROM {table}"))
            .fetch_one(&shop.ledger.order)
            .await
            .expect("count");
        assert_eq!(n, 0, "{table} has rows after refused requests");
    }

    // The Idempotency-Key: the same request twice is one order; another request
    // with the key is refused.
    let (first, placed) = client
        .post_order_raw(&good.to_string(), "application/json", Some("k-1"))
        .await
        .expect("placed");
    assert_eq!(first, StatusCode::ACCEPTED, "{placed}");
    let (again, replayed) = client
        .post_order_raw(&good.to_string(), "application/json", Some("k-1"))
        .await
        .expect("placed");
    assert_eq!(again, StatusCode::OK, "{replayed}");
    assert_eq!(placed["orderId"], replayed["orderId"]);
    let (other, refused) = client
        .post_order_raw(&with("quantity", 2.into()), "application/json", Some("k-1"))
        .await
        .expect("answered");
    assert_eq!(other, StatusCode::UNPROCESSABLE_ENTITY, "{refused}");
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM orders")
        .fetch_one(&shop.ledger.order)
        .await
        .expect("count");
    assert_eq!(n, 1);
    let id: Uuid = serde_json::from_value(placed["orderId"].clone()).expect("id");
    let order = client
        .wait_final(id, Duration::from_secs(60))
        .await
        .expect("final");
    assert_eq!(order["status"], "APPROVED", "{order}");
    let steps: Vec<_> = order["saga"]["steps"]
        .as_array()
        .expect("steps")
        .iter()
        .map(|s| (s["name"].clone(), s["status"].clone()))
        .collect();
    assert_eq!(steps.len(), 5, "{order}");
    assert!(steps.iter().all(|(_, s)| s == "SUCCEEDED"), "{order}");
    let (status, _) = client.cancel(id).await.expect("answered");
    assert_eq!(
        status,
        StatusCode::CONFLICT,
        "an approved order cannot be cancelled"
    );
    let (_, page) = client
        .get(format!("{}/orders?limit=10", client.order_url))
        .await
        .expect("list");
    assert_eq!(page["orders"].as_array().map(Vec::len), Some(1), "{page}");
    shop.stop().await;
}
