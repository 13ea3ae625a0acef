//! Sagas through the whole shop: the four services and their four relays as the
//! release binaries, on a private cluster and broker ([`shop::lab::Lab`]), each
//! saga the order-placement saga (create, reserve goods, reserve credit, charge,
//! approve: four transactions in the order database, one in each of the three
//! participants', six messages on the broker, each through a relay). Times are read from `saga_state` (`created_at` when
//! the order was accepted, `updated_at` when the saga ended: the server's clock).
//!
//! - **saturation**: orders placed by many concurrent clients as fast as the order
//!   service takes them; completed sagas per second from the first acceptance to
//!   the last end, beside the rate the orders were accepted at (the baseline:
//!   what starting a saga alone allows);
//! - **latency**: orders at a steady 100 per second; p50/p99 from acceptance to end;
//! - **in flight**: 1,000 orders accepted while the payment service is paused
//!   (SIGSTOP), so all 1,000 wait in flight at once; then it resumes and the lot
//!   drains. Peak memory of every relay and service throughout.
//!
//! Every run ends with the shop's invariant checks: all sagas completed, stock
//! and credit conserved.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use futures::StreamExt;
use shop::lab::{sagas_ended, Lab, LabSettings, GOOD_CARD};
use shop::{OrderRequest, Shop, ShopClient};
use testkit::process::{children, cpu_seconds, machine_cpu_seconds, memory_kib};

/// The services' consumers ask the broker to answer a fetch within 5 ms. tansu
/// 0.6 waits that long on every fetch even when records are there (Apache Kafka
/// answers as soon as `fetch.min.bytes` are), so with librdkafka's 500 ms each of
/// a saga's six messages would wait about a quarter of a second for the broker.
const FETCH_WAIT: &str = "fetch.wait.max.ms=5";

const SERVICES: [&str; 4] = [
    "order-service",
    "customer-service",
    "inventory-service",
    "payment-service",
];

/// Every step's timeout.
const STEP_TIMEOUT: Duration = Duration::from_secs(30);

/// Concurrent clients of the saturation run.
pub(crate) const CLIENTS: usize = 64;
/// The steady rate of the latency run, orders per second.
pub(crate) const LATENCY_RATE: f64 = 100.0;

#[derive(Debug, Clone, Default)]
pub(crate) struct Sagas {
    pub(crate) saturation_orders: usize,
    /// Orders accepted per second by the order service during the saturation run.
    pub(crate) accepted_per_s: f64,
    /// Sagas completed per second, first acceptance to last end.
    pub(crate) completed_per_s: f64,
    /// Outbox events per saga (commands and replies of the four databases).
    pub(crate) events_per_saga: f64,
    /// CPU milliseconds per saga during the saturation run, by who spent them
    /// (see [`cpu_by_part`]).
    pub(crate) cpu_ms_per_saga: BTreeMap<&'static str, f64>,
    /// Statements and commits per saga during the saturation run, by database.
    pub(crate) statements_per_saga: crate::statements::PerSaga,
    /// The statements that took the most server time in the saturation run.
    pub(crate) top_statements: Vec<crate::statements::Top>,
    pub(crate) latency_orders: usize,
    pub(crate) latency_p50_ms: f64,
    pub(crate) latency_p99_ms: f64,
    /// The participant steps' legs in the latency run.
    pub(crate) legs: Vec<crate::legs::Leg>,
    /// Each relay's latencies in the latency run.
    pub(crate) relay_ms: Vec<crate::legs::RelayLatency>,
    pub(crate) in_flight_orders: usize,
    /// Sagas running at once, at most (sampled).
    pub(crate) in_flight_peak: i64,
    /// From the payment service's return until every saga ended.
    pub(crate) in_flight_drain: Duration,
    /// Peak resident memory (KiB) by process over the whole run.
    pub(crate) peak_rss_kib: BTreeMap<String, u64>,
    /// Sagas that ended because a step timed out (their reply never came); left
    /// out of the rates and latencies, which count completed sagas.
    pub(crate) timed_out: usize,
    /// How far the first command of each timed-out step and its reply got.
    pub(crate) lost: Vec<String>,
}

impl Sagas {
    pub(crate) fn complete(&self) -> bool {
        [
            self.accepted_per_s,
            self.completed_per_s,
            self.events_per_saga,
            self.latency_p50_ms,
            self.latency_p99_ms,
        ]
        .iter()
        .all(|v| v.is_finite() && *v > 0.0)
            && self.legs.len() == 3
            && self.in_flight_peak > 0
            && !self.in_flight_drain.is_zero()
            && self.peak_rss_kib.values().all(|&v| v > 0)
            && self.statements_per_saga.len() == 4
    }
}

/// Sizes of the three runs.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Sizes {
    pub(crate) saturation: usize,
    pub(crate) latency_seconds: f64,
    pub(crate) in_flight: usize,
}

pub(crate) async fn run(bin_dir: &Path, log_root: &Path, sizes: Sizes) -> anyhow::Result<Sagas> {
    let settings = LabSettings {
        bin_dir: bin_dir.to_owned(),
        log_root: log_root.to_owned(),
        server_settings: crate::statements::SERVER_SETTINGS.to_vec(),
    };
    let mut lab = Lab::new(&settings, "bench-sagas", false).await?;
    let mut config = lab.shop_config();
    // Long enough for the in-flight part's pause; short enough that a saga whose
    // reply the broker never handed to the orchestrator (seen with tansu, see
    // BENCHMARKS.md) ends by its timeout within the run.
    config.step_timeout = STEP_TIMEOUT;
    for name in [
        "relay-order",
        "relay-customer",
        "relay-inventory",
        "relay-payment",
    ] {
        config = config.with_env(name, "OUTBOX_RELAY_LOG", "warn");
    }
    for name in SERVICES {
        config = config.with_env(name, "KAFKA_OPTIONS", FETCH_WAIT);
        // Experiments: more environment for every service, KEY=VALUE,...
        for pair in std::env::var("BENCH_SERVICE_ENV")
            .unwrap_or_default()
            .split(',')
        {
            if let Some((key, value)) = pair.split_once('=') {
                config = config.with_env(name, key, value);
            }
        }
    }
    let mut shop = lab.start(config).await?;
    let outcome = measure(&mut lab, &mut shop, sizes).await;
    shop.stop().await;
    let mut result = outcome?;
    let report = lab.ledger.check(&lab.before).await?;
    if !report.ok() {
        bail!(
            "the shop's invariants after the benchmark: {:?}",
            report.violations
        );
    }
    result.timed_out = usize::try_from(timed_out(&lab.ledger.order).await?)?;
    result.lost = crate::lost::describe(&lab.ledger).await?;
    let not_approved = report.orders - report.approved;
    if not_approved > result.timed_out {
        bail!(
            "{not_approved} of {} orders were not approved, {} of them after a step timed out",
            report.orders,
            result.timed_out
        );
    }
    Ok(result)
}

async fn measure(lab: &mut Lab, shop: &mut Shop, sizes: Sizes) -> anyhow::Result<Sagas> {
    let client = ShopClient::new(shop);
    let order = lab.ledger.order.clone();
    let mut result = Sagas::default();
    let mut memory = Memory::default();
    let bound = Duration::from_secs(600);

    // Warm-up: every topic, consumer and producer in use before the clock runs.
    place_all(&client, 20, 8).await?;
    wait_all_ended(&order, 20, bound).await?;

    // Saturation.
    eprintln!(
        "    saturation: {} orders from {CLIENTS} clients",
        sizes.saturation
    );
    crate::statements::prepare(&order).await?;
    crate::statements::reset(&order).await?;
    let mark = server_now(&order).await?;
    let statements_before = crate::statements::read(&order).await?;
    let cpu_before = cpu_by_part(shop, lab);
    let placing = Instant::now();
    place_all(&client, sizes.saturation, CLIENTS).await?;
    let placing_secs = placing.elapsed().as_secs_f64();
    memory.sample(shop);
    wait_all_ended(&order, 20 + sizes.saturation, bound).await?;
    let cpu_after = cpu_by_part(shop, lab);
    let statements_after = crate::statements::read(&order).await?;
    memory.sample(shop);
    result.statements_per_saga =
        crate::statements::per_saga(&statements_before, &statements_after, sizes.saturation);
    result.top_statements = crate::statements::top(&order, sizes.saturation, 12).await?;
    result.cpu_ms_per_saga = cpu_after
        .iter()
        .map(|(part, after)| {
            let before = cpu_before.get(part).copied().unwrap_or(0.0);
            (*part, (after - before) * 1e3 / sizes.saturation as f64)
        })
        .collect();
    let (count, span): (i64, f64) = sqlx::query_as(
        "SELECT count(*), extract(epoch FROM max(updated_at) - min(created_at))::float8 \
         FROM saga_state WHERE created_at >= $1::timestamptz AND status = 'COMPLETED'",
    )
    .bind(&mark)
    .fetch_one(&order)
    .await?;
    result.saturation_orders = sizes.saturation;
    result.accepted_per_s = sizes.saturation as f64 / placing_secs;
    result.completed_per_s = count as f64 / span;
    result.events_per_saga = outbox_rows(lab).await? as f64 / (20 + sizes.saturation) as f64;

    // Latency at a steady rate.
    let latency_orders = (LATENCY_RATE * sizes.latency_seconds).round() as usize;
    eprintln!("    latency: {latency_orders} orders at {LATENCY_RATE}/s");
    let mark = server_now(&order).await?;
    let relays_before = crate::legs::relay_histograms(shop).await;
    let load = shop::lab::place_in_background(
        &client,
        plain_orders(latency_orders),
        LATENCY_RATE,
        Duration::from_secs(30),
    );
    while !load.is_finished() {
        memory.sample(shop);
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    load.await.context("the load")??;
    let done = 20 + sizes.saturation + latency_orders;
    wait_all_ended(&order, done, bound).await?;
    let latencies: Vec<f64> = sqlx::query_scalar(
        "SELECT extract(epoch FROM updated_at - created_at)::float8 FROM saga_state \
         WHERE created_at >= $1::timestamptz AND status = 'COMPLETED'",
    )
    .bind(&mark)
    .fetch_all(&order)
    .await?;
    result.latency_orders = latency_orders;
    (result.latency_p50_ms, result.latency_p99_ms) = crate::latency::p50_p99_ms(latencies);
    result.legs = crate::legs::measure(&lab.ledger, &mark).await?;
    let relays_after = crate::legs::relay_histograms(shop).await;
    result.relay_ms = crate::legs::relay_latencies(&relays_before, &relays_after);

    // 1,000 in flight: the payment service paused while they are accepted.
    eprintln!(
        "    in flight: {} orders while the payment service is paused",
        sizes.in_flight
    );
    shop.signal("payment-service", "STOP")?;
    let placed = place_all(&client, sizes.in_flight, CLIENTS).await;
    // Let the last commands reach the payment topic, then count who waits.
    let waiting = wait_in_flight(&order, sizes.in_flight).await;
    memory.sample(shop);
    shop.signal("payment-service", "CONT")?;
    placed?;
    let peak = waiting?;
    let resumed = Instant::now();
    let resumed_at = server_now(&order).await?;
    let total = done + sizes.in_flight;
    let ended = loop {
        memory.sample(shop);
        if sagas_ended(&order, total, Duration::ZERO).await? {
            break true;
        }
        if resumed.elapsed() > bound {
            break false;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    if !ended {
        bail!(
            "{} sagas in flight did not end within {bound:?}",
            sizes.in_flight
        );
    }
    // Until the last of them completed (a saga ended by its timeout would add the
    // timeout to the drain).
    let drain: f64 = sqlx::query_scalar(
        "SELECT extract(epoch FROM max(updated_at) - $1::timestamptz)::float8 \
         FROM saga_state WHERE status = 'COMPLETED'",
    )
    .bind(&resumed_at)
    .fetch_one(&order)
    .await?;
    result.in_flight_orders = sizes.in_flight;
    result.in_flight_peak = peak;
    result.in_flight_drain = Duration::from_secs_f64(drain.max(0.001));
    memory.sample(shop);
    result.peak_rss_kib = memory.peak;
    Ok(result)
}

/// The demo's customer Ada buying one widget for 1.00, `count` times.
fn plain_orders(count: usize) -> Vec<(shop::lab::OrderKind, OrderRequest)> {
    (0..count)
        .map(|_| {
            (
                shop::lab::OrderKind::Plain,
                OrderRequest {
                    customer_id: customer_service::ADA,
                    goods_id: inventory_service::WIDGET,
                    quantity: 1,
                    amount: 1.0,
                    card: shop::Card::number(GOOD_CARD),
                },
            )
        })
        .collect()
}

/// Places `count` plain orders from `clients` concurrent clients.
async fn place_all(client: &ShopClient, count: usize, clients: usize) -> anyhow::Result<()> {
    let mut placing = futures::stream::iter(plain_orders(count))
        .map(|(_, request)| async move { client.place_accepted(&request).await })
        .buffer_unordered(clients);
    while let Some(placed) = placing.next().await {
        placed?;
    }
    Ok(())
}

async fn wait_all_ended(order: &sqlx::PgPool, count: usize, bound: Duration) -> anyhow::Result<()> {
    if !sagas_ended(order, count, bound).await? {
        bail!("fewer than {count} sagas ended within {bound:?}");
    }
    Ok(())
}

/// Sagas with a step that timed out.
async fn timed_out(order: &sqlx::PgPool) -> anyhow::Result<i64> {
    Ok(sqlx::query_scalar(
        "SELECT count(DISTINCT s.id) FROM saga_state s, jsonb_each(s.step_status) st \
         WHERE st.value->>'timed_out' = 'true'",
    )
    .fetch_one(order)
    .await?)
}

/// Waits (30 s at most) until `count` sagas are running at once; the most seen.
async fn wait_in_flight(order: &sqlx::PgPool, count: usize) -> anyhow::Result<i64> {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut peak = 0;
    loop {
        let running: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM saga_state WHERE status IN ('STARTED', 'ABORTING')",
        )
        .fetch_one(order)
        .await?;
        peak = peak.max(running);
        if peak >= i64::try_from(count)? || Instant::now() > deadline {
            return Ok(peak);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// CPU seconds used so far by the services, the relays, the broker, PostgreSQL's
/// walsenders and its other processes, and by the whole machine less those
/// (`rest`: the benchmark's clients, the system). A process that ended within
/// the window (a backend whose connection closed) takes its time out of its part
/// and into `rest`.
fn cpu_by_part(shop: &mut Shop, lab: &Lab) -> BTreeMap<&'static str, f64> {
    let mut parts = BTreeMap::new();
    for name in shop.process_names() {
        let part = if name.starts_with("relay-") {
            "relays"
        } else {
            "services"
        };
        if let Ok(Some(pid)) = shop.pid(&name) {
            *parts.entry(part).or_insert(0.0) += cpu_seconds(pid).unwrap_or(0.0);
        }
    }
    parts.insert("broker", cpu_seconds(lab.broker.pid()).unwrap_or(0.0));
    if let Some(postmaster) = lab.cluster.postmaster_pid() {
        for (pid, command) in children(postmaster) {
            let part = if command.contains("walsender") {
                "walsenders"
            } else {
                "postgres"
            };
            *parts.entry(part).or_insert(0.0) += cpu_seconds(pid).unwrap_or(0.0);
        }
    }
    let ours: f64 = parts.values().sum();
    parts.insert("rest", machine_cpu_seconds().unwrap_or(0.0) - ours);
    parts
}

async fn server_now(pool: &sqlx::PgPool) -> anyhow::Result<String> {
    Ok(sqlx::query_scalar("SELECT clock_timestamp()::text")
        .fetch_one(pool)
        .await?)
}

async fn outbox_rows(lab: &Lab) -> anyhow::Result<usize> {
    Ok(lab.written_events().await?.len())
}

/// Peak resident memory of the shop's processes.
#[derive(Debug, Default)]
struct Memory {
    peak: BTreeMap<String, u64>,
}

impl Memory {
    fn sample(&mut self, shop: &mut Shop) {
        for name in shop.process_names() {
            if let Ok(Some(pid)) = shop.pid(&name) {
                if let Some((_, hwm)) = memory_kib(pid) {
                    let peak = self.peak.entry(name).or_default();
                    *peak = (*peak).max(hwm);
                }
            }
        }
    }
}
