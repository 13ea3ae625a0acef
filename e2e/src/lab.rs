//! The failure-scenario laboratory: one scenario's private PostgreSQL cluster and
//! broker, the shop running on them as the real binaries, a load of orders, and
//! the measurements every scenario ends with.
//!
//! Each scenario gets a cluster and a broker of its own (not the shared local
//! environment): it pauses, kills and restarts them, which nothing else may feel.
//!
//! What a scenario proves is read from the outside, never from the code under test:
//! - **events written vs delivered**: the ids of every outbox row of the four
//!   databases against the `id` headers read back from the topics (every event must
//!   arrive; a copy beyond the first is a *duplicate delivered*);
//! - **applied twice**: a participant that answered one saga step twice (the
//!   answers are outbox rows; a replayed answer is marked and not counted), or
//!   reservations and charges held that no approved order explains;
//! - **sagas terminal vs stuck**: every saga COMPLETED or ABORTED within the bound;
//! - **stock and credit conserved**: what left the stock and the credit equals
//!   what the approved orders hold ([`crate::invariants`]).

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use customer_service::{ADA, BOB};
use inventory_service::{GADGET, WIDGET};
use rdkafka::consumer::{BaseConsumer, Consumer as _, StreamConsumer};
use rdkafka::message::{Headers as _, Message as _};
use rdkafka::{Offset, TopicPartitionList};
use service_kit::Topics;
use sqlx::postgres::PgPoolOptions;
use sqlx::PgPool;
use testkit::{PrivateBroker, PrivateCluster};
use tokio::sync::watch;
use uuid::Uuid;

use crate::{
    Balances, Card, Ledger, Mode, OrderRequest, ServiceDatabases, Shop, ShopClient, ShopConfig,
};

/// A card the payment service accepts, and one it declines.
pub const GOOD_CARD: &str = "4111 1111 1111 1111";
pub const DECLINED_CARD: &str = "4000 0000 0000 9999";

/// Where the scenarios find the binaries and write their logs.
#[derive(Debug, Clone)]
pub struct LabSettings {
    pub bin_dir: PathBuf,
    pub log_root: PathBuf,
    /// More server settings for the lab's PostgreSQL cluster (`-c name=value`).
    pub server_settings: Vec<(&'static str, &'static str)>,
}

/// One scenario's world.
#[derive(Debug)]
pub struct Lab {
    pub name: String,
    pub cluster: PrivateCluster,
    pub broker: PrivateBroker,
    pub databases: ServiceDatabases,
    pub ledger: Ledger,
    /// Stock and credit before any order.
    pub before: Balances,
    pub prefix: String,
    pub log_dir: PathBuf,
    bin_dir: PathBuf,
    /// What the scenario observed on its way (printed with the report).
    pub facts: Vec<String>,
    /// The scenario's own expectations: what it claims, and whether it held.
    pub checks: Vec<(String, bool)>,
    started: Instant,
}

/// What a scenario run measured.
#[derive(Debug, Clone, Default)]
pub struct Measurement {
    pub events_written: usize,
    pub events_delivered: usize,
    /// Copies of an event on the topics beyond its first.
    pub duplicates_delivered: usize,
    /// Messages the services' consumers found in their journal and skipped
    /// (counted by the processes running at the end).
    pub redeliveries_skipped: u64,
    pub applied_twice: usize,
    pub orders: usize,
    pub sagas_terminal: usize,
    pub sagas_stuck: usize,
    pub conserved: bool,
    pub violations: Vec<String>,
    pub facts: Vec<String>,
    pub elapsed: Duration,
    /// When a violation was found: what the processes said ([`crate::post_mortem`]).
    pub diagnosis: Vec<String>,
}

/// How many violations a report lists.
const SHOWN_VIOLATIONS: usize = 12;

impl Measurement {
    pub fn ok(&self) -> bool {
        self.violations.is_empty()
    }
}

impl std::fmt::Display for Measurement {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for fact in &self.facts {
            writeln!(f, "    {fact}")?;
        }
        writeln!(
            f,
            "    events written {} / delivered {}; duplicates delivered {} (copies on the topics) + {} (redeliveries skipped by the journals) / applied twice {}",
            self.events_written,
            self.events_delivered,
            self.duplicates_delivered,
            self.redeliveries_skipped,
            self.applied_twice
        )?;
        writeln!(
            f,
            "    sagas {} terminal / {} stuck (of {} orders); stock and credit {}",
            self.sagas_terminal,
            self.sagas_stuck,
            self.orders,
            if self.conserved {
                "conserved"
            } else {
                "NOT conserved"
            }
        )?;
        // Hundreds of orders can break the same rule: the first ones tell.
        for v in self.violations.iter().take(SHOWN_VIOLATIONS) {
            writeln!(f, "    VIOLATED: {v}")?;
        }
        if self.violations.len() > SHOWN_VIOLATIONS {
            writeln!(
                f,
                "    VIOLATED: … and {} more",
                self.violations.len() - SHOWN_VIOLATIONS
            )?;
        }
        Ok(())
    }
}

impl Lab {
    /// Starts a private cluster (logical WAL) and a broker (SQLite storage when
    /// `durable`, so it survives a restart), creates the four databases and
    /// migrates and seeds them with the services' own `seed` command, then gives
    /// Ada and the widgets room for a long run.
    pub async fn new(settings: &LabSettings, name: &str, durable: bool) -> anyhow::Result<Lab> {
        let log_dir = settings.log_root.join(name);
        if log_dir.exists() {
            std::fs::remove_dir_all(&log_dir)
                .with_context(|| format!("cannot clear {}", log_dir.display()))?;
        }
        std::fs::create_dir_all(&log_dir)
            .with_context(|| format!("cannot create {}", log_dir.display()))?;
        let mut server_settings = vec![
            ("wal_level", "logical"),
            ("max_replication_slots", "16"),
            ("max_wal_senders", "16"),
            ("max_connections", "200"),
        ];
        server_settings.extend(settings.server_settings.iter().copied());
        let cluster = tokio::task::spawn_blocking(move || PrivateCluster::start(&server_settings))
            .await
            .context("starting a private PostgreSQL cluster")?;
        let broker_file = log_dir.join("broker.db");
        let broker = tokio::task::spawn_blocking(move || {
            if durable {
                PrivateBroker::start_durable(&broker_file)
            } else {
                PrivateBroker::start()
            }
        })
        .await
        .context("starting a private broker")?;
        let admin = pool(&cluster.url("postgres"), 1).await?;
        for service in ["order", "customer", "inventory", "payment"] {
            sqlx::query(&format!("CREATE DATABASE {service}_db"))
                .execute(&admin)
                .await?;
        }
        admin.close().await;
        let databases = ServiceDatabases {
            order: cluster.url("order_db"),
            customer: cluster.url("customer_db"),
            inventory: cluster.url("inventory_db"),
            payment: cluster.url("payment_db"),
        };
        for (service, url) in [
            ("customer", &databases.customer),
            ("inventory", &databases.inventory),
            ("payment", &databases.payment),
            ("order", &databases.order),
        ] {
            let out =
                tokio::process::Command::new(settings.bin_dir.join(format!("{service}-service")))
                    .arg("seed")
                    .env("DATABASE_URL", url)
                    .env("RUST_LOG", "warn")
                    .output()
                    .await
                    .with_context(|| format!("running {service}-service seed"))?;
            if !out.status.success() {
                bail!(
                    "{service}-service seed failed: {}\n{}",
                    out.status,
                    String::from_utf8_lossy(&out.stderr)
                );
            }
        }
        let ledger = Ledger {
            order: pool(&databases.order, 4).await?,
            customer: pool(&databases.customer, 4).await?,
            inventory: pool(&databases.inventory, 4).await?,
            payment: pool(&databases.payment, 4).await?,
        };
        // Room for hundreds of approvals; Bob keeps 50.00, the gadget stays single.
        sqlx::query(
            "UPDATE customers SET credit_limit = 1000000, available_credit = 1000000 WHERE id = $1",
        )
        .bind(ADA)
        .execute(&ledger.customer)
        .await?;
        sqlx::query("UPDATE goods SET stock = 100000 WHERE id = $1")
            .bind(WIDGET)
            .execute(&ledger.inventory)
            .await?;
        let before = Balances::read(&ledger.customer, &ledger.inventory).await?;
        Ok(Lab {
            name: name.to_owned(),
            cluster,
            broker,
            databases,
            ledger,
            before,
            prefix: format!("{name}."),
            log_dir,
            bin_dir: settings.bin_dir.clone(),
            facts: Vec::new(),
            checks: Vec::new(),
            started: Instant::now(),
        })
    }

    /// The shop's configuration on this lab: the binaries as processes, logs in
    /// the lab's folder, a 30 s step timeout.
    pub fn shop_config(&self) -> ShopConfig {
        let mut config = ShopConfig::new(
            self.databases.clone(),
            self.broker.bootstrap(),
            self.prefix.clone(),
        );
        config.mode = Mode::Processes {
            bin_dir: self.bin_dir.clone(),
            log_dir: self.log_dir.clone(),
        };
        config
    }

    /// Starts the shop.
    pub async fn start(&mut self, config: ShopConfig) -> anyhow::Result<Shop> {
        let shop = Shop::start(config, &mut |step| tracing::info!("{step}")).await?;
        // The lab's cards are tokenised while every service is up, as a checkout
        // page would before the order, so orders keep coming while the payment
        // service is down.
        let client = ShopClient::new(&shop);
        for card in [GOOD_CARD, DECLINED_CARD] {
            client
                .card_token(card)
                .await
                .context("tokenising the lab's cards")?;
        }
        Ok(shop)
    }

    /// Records something the scenario observed.
    pub fn note(&mut self, fact: impl Into<String>) {
        let fact = fact.into();
        tracing::info!("{fact}");
        self.facts.push(fact);
    }

    /// Records one of the scenario's own claims and whether it held.
    pub fn expect(&mut self, claim: impl Into<String>, holds: bool) {
        self.checks.push((claim.into(), holds));
    }

    /// Waits until every saga has ended (at most `bound`) and every written event
    /// has been read back from the topics, then measures. The shop keeps running
    /// (the caller stops it).
    pub async fn measure(
        &mut self,
        shop: &mut Shop,
        bound: Duration,
    ) -> anyhow::Result<Measurement> {
        let deadline = Instant::now() + bound;
        let mut m = Measurement::default();
        // Stuck sagas are reported below, so running out of time is no error here.
        sagas_ended(&self.ledger.order, 0, bound).await?;
        let written = self.written_events().await?;
        m.events_written = written.len();
        let remaining = deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_secs(20));
        let (delivered, copies) = read_back(
            &self.broker.bootstrap(),
            &Topics::new(self.prefix.clone()).all(),
            &written,
            remaining,
        )
        .await?;
        m.events_delivered = written.intersection(&delivered).count();
        m.duplicates_delivered = copies;
        let lost = written.len() - m.events_delivered;
        if lost > 0 {
            m.violations.push(format!(
                "{lost} events written to an outbox never reached their topic"
            ));
        }
        // Duplicates still travelling reach their consumers now; give them a moment
        // to be skipped (or, if something is wrong, applied) before checking.
        tokio::time::sleep(Duration::from_secs(2)).await;
        for name in shop.process_names() {
            if name.starts_with("relay-") {
                continue;
            }
            match consumer_counts(shop, &name).await {
                Ok(counts) => {
                    m.redeliveries_skipped += counts.duplicate;
                    if counts.dead_lettered > 0 {
                        m.violations.push(format!(
                            "{name} dead-lettered {} messages",
                            counts.dead_lettered
                        ));
                    }
                }
                Err(e) => m
                    .violations
                    .push(format!("cannot read the counters of {name}: {e:#}")),
            }
        }
        let report = self.ledger.check(&self.before).await?;
        m.orders = report.orders;
        for (status, n) in &report.sagas {
            match status.as_str() {
                "COMPLETED" | "ABORTED" => m.sagas_terminal += n,
                _ => m.sagas_stuck += n,
            }
        }
        if m.sagas_stuck > 0 {
            m.violations.push(format!(
                "{} sagas did not end within {bound:?}: {:?}",
                m.sagas_stuck, report.sagas
            ));
        }
        m.applied_twice = report
            .violations
            .iter()
            .filter(|v| v.contains("more than once") || v.contains("held without approval"))
            .count();
        m.conserved = !report
            .violations
            .iter()
            .any(|v| v.contains("stock went") || v.contains("credit went"));
        m.violations.extend(report.violations.iter().cloned());
        for (claim, holds) in &self.checks {
            if !holds {
                m.violations
                    .push(format!("the scenario's claim failed: {claim}"));
            }
        }
        m.facts = self.facts.clone();
        m.facts.push(format!(
            "orders {} approved / {} rejected; journal rows {}",
            report.approved, report.rejected, report.journal_rows
        ));
        m.elapsed = self.started.elapsed();
        Ok(m)
    }

    /// The ids of every outbox row of the four databases.
    pub async fn written_events(&self) -> anyhow::Result<BTreeSet<Uuid>> {
        let mut ids = BTreeSet::new();
        for pool in [
            &self.ledger.order,
            &self.ledger.customer,
            &self.ledger.inventory,
            &self.ledger.payment,
        ] {
            let rows: Vec<Uuid> = sqlx::query_scalar("SELECT id FROM outbox")
                .fetch_all(pool)
                .await?;
            ids.extend(rows);
        }
        Ok(ids)
    }

    /// Orders in the order database.
    pub async fn order_count(&self) -> anyhow::Result<i64> {
        Ok(sqlx::query_scalar("SELECT count(*) FROM orders")
            .fetch_one(&self.ledger.order)
            .await?)
    }

    /// The confirmed position of the relay slot of `database` (the relay's own slot).
    pub async fn confirmed_lsn(&self, database: &str) -> anyhow::Result<Option<String>> {
        let pool = match database {
            "order" => &self.ledger.order,
            "customer" => &self.ledger.customer,
            "inventory" => &self.ledger.inventory,
            _ => &self.ledger.payment,
        };
        Ok(sqlx::query_scalar(
            "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE database = current_database() AND slot_type = 'logical' LIMIT 1",
        )
        .fetch_optional(pool)
        .await?
        .flatten())
    }
}

/// Counters of one service's consumer, read from its `/metrics`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ConsumerCounts {
    pub applied: u64,
    pub duplicate: u64,
    pub retried: u64,
    pub dead_lettered: u64,
}

/// Reads `service_consumer_messages_total` from the process `name` of `shop`.
pub async fn consumer_counts(shop: &mut Shop, name: &str) -> anyhow::Result<ConsumerCounts> {
    let text = metrics_text(shop, name).await?;
    let mut counts = ConsumerCounts::default();
    for line in text
        .lines()
        .filter(|l| l.starts_with("service_consumer_messages_total{"))
    {
        let value = line
            .rsplit(' ')
            .next()
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0);
        let slot = if line.contains("result=\"applied\"") {
            &mut counts.applied
        } else if line.contains("result=\"duplicate\"") {
            &mut counts.duplicate
        } else if line.contains("result=\"retried\"") {
            &mut counts.retried
        } else {
            &mut counts.dead_lettered
        };
        *slot = value;
    }
    Ok(counts)
}

/// The `/metrics` text of process `name`.
pub async fn metrics_text(shop: &mut Shop, name: &str) -> anyhow::Result<String> {
    let url = shop.health_url(name)?.replace("/health", "/metrics");
    let response = reqwest::Client::new()
        .get(&url)
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .with_context(|| format!("GET {url}"))?;
    Ok(response.text().await?)
}

/// Reads every record of `topics` from the beginning until each id of `expected`
/// was seen (then a quiet second more for late copies) or `timeout` passed.
/// Returns the distinct `id` headers seen and how many records repeated one.
pub async fn read_back(
    brokers: &str,
    topics: &[String],
    expected: &BTreeSet<Uuid>,
    timeout: Duration,
) -> anyhow::Result<(BTreeSet<Uuid>, usize)> {
    let group = format!("scenario-reader-{}", Uuid::new_v4().simple());
    let consumer: StreamConsumer = testkit::consumer_config_on(Some(brokers), &group)
        .create()
        .context("creating the reader")?;
    let metadata = consumer
        .fetch_metadata(None, Duration::from_secs(10))
        .context("reading the broker's metadata")?;
    let mut assignment = TopicPartitionList::new();
    for topic in metadata.topics() {
        if topics.iter().any(|t| t == topic.name()) {
            for partition in topic.partitions() {
                assignment.add_partition_offset(topic.name(), partition.id(), Offset::Beginning)?;
            }
        }
    }
    consumer.assign(&assignment)?;
    let deadline = Instant::now() + timeout;
    let mut seen = BTreeSet::new();
    let mut copies = 0;
    let mut complete_at: Option<Instant> = None;
    loop {
        let now = Instant::now();
        if now > deadline || complete_at.is_some_and(|t| now > t + Duration::from_secs(1)) {
            break;
        }
        match tokio::time::timeout(Duration::from_millis(500), consumer.recv()).await {
            Ok(Ok(message)) => {
                let id = message.headers().and_then(|headers| {
                    headers
                        .iter()
                        .find(|h| h.key == "id")
                        .and_then(|h| h.value)
                        .and_then(|v| std::str::from_utf8(v).ok())
                        .and_then(|v| v.parse::<Uuid>().ok())
                });
                if let Some(id) = id {
                    if !seen.insert(id) {
                        copies += 1;
                    }
                }
            }
            Ok(Err(e)) => tracing::debug!(error = %e, "reader"),
            Err(_) => {}
        }
        if complete_at.is_none() && expected.is_subset(&seen) {
            complete_at = Some(Instant::now());
        }
    }
    Ok((seen, copies))
}

/// Messages of `topic` that consumer group `group` has not committed past: per
/// partition, the high watermark minus the group's committed offset (minus the
/// low watermark where the group has committed none). Asks the broker without
/// joining the group.
pub async fn backlog(brokers: &str, group: &str, topic: &str) -> anyhow::Result<i64> {
    let consumer: BaseConsumer = testkit::consumer_config_on(Some(brokers), group)
        .create()
        .context("creating the offset reader")?;
    let topic = topic.to_owned();
    tokio::task::spawn_blocking(move || {
        let timeout = Duration::from_secs(5);
        let metadata = consumer.fetch_metadata(Some(&topic), timeout)?;
        let mut partitions = TopicPartitionList::new();
        for t in metadata.topics() {
            for partition in t.partitions() {
                partitions.add_partition(&topic, partition.id());
            }
        }
        let committed = consumer.committed_offsets(partitions, timeout)?;
        let mut waiting = 0;
        for element in committed.elements() {
            let (low, high) = consumer.fetch_watermarks(&topic, element.partition(), timeout)?;
            let from = match element.offset() {
                Offset::Offset(offset) => offset,
                _ => low,
            };
            waiting += (high - from).max(0);
        }
        Ok(waiting)
    })
    .await
    .context("the offset reader")?
}

/// What kind of order a load places, and what it will likely become.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OrderKind {
    /// Ada buys widgets: approved.
    Plain,
    /// The card is declined: goods and credit are given back.
    Declined,
    /// Bob spends beyond his 50.00: refused by the customer service.
    OverCredit,
    /// Gadgets, of which there is one: mostly refused for stock.
    Scarce,
}

/// A deterministic mix (seeded): 70 % plain, 10 % each of the others.
pub fn order_mix(count: usize, seed: u64) -> Vec<(OrderKind, OrderRequest)> {
    let mut state = seed | 1;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    (0..count)
        .map(|_| {
            let kind = match next() % 10 {
                0 => OrderKind::Declined,
                1 => OrderKind::OverCredit,
                2 => OrderKind::Scarce,
                _ => OrderKind::Plain,
            };
            let quantity = 1 + (next() % 3) as i64;
            let cents = 500 + (next() % 6_000) as i64;
            let (customer, goods, card, cents) = match kind {
                OrderKind::Plain => (ADA, WIDGET, GOOD_CARD, cents),
                OrderKind::Declined => (ADA, WIDGET, DECLINED_CARD, cents),
                OrderKind::OverCredit => (BOB, WIDGET, GOOD_CARD, 6_000 + cents),
                OrderKind::Scarce => (ADA, GADGET, GOOD_CARD, cents),
            };
            (
                kind,
                OrderRequest {
                    customer_id: customer,
                    goods_id: goods,
                    quantity,
                    amount: cents as f64 / 100.0,
                    card: Card::number(card),
                },
            )
        })
        .collect()
}

/// Places `orders` at `rate` per second in the background, each with an
/// Idempotency-Key and retried (for up to `patience`) while the order service
/// cannot take it, as a careful client would; resolves to the accepted ids.
pub fn place_in_background(
    client: &ShopClient,
    orders: Vec<(OrderKind, OrderRequest)>,
    rate: f64,
    patience: Duration,
) -> tokio::task::JoinHandle<anyhow::Result<Vec<Uuid>>> {
    let (_never, running) = watch::channel(false);
    spawn_load(client, orders, rate, patience, running)
}

/// Orders placed in the background until [`Load::stop`]: a load that lasts as
/// long as the faults of a scenario take, however long that is.
#[derive(Debug)]
pub struct Load {
    stop: watch::Sender<bool>,
    placing: tokio::task::JoinHandle<anyhow::Result<Vec<Uuid>>>,
}

impl Load {
    /// Places no further order; resolves to the accepted ids once every order
    /// under way has been accepted (or refused: an error).
    pub async fn stop(self) -> anyhow::Result<Vec<Uuid>> {
        let _ = self.stop.send(true);
        self.placing.await.context("the load task")?
    }
}

/// Like [`place_in_background`], but places the orders only until stopped
/// (`orders` should be more than `rate` places while the scenario runs).
pub fn place_until_stopped(
    client: &ShopClient,
    orders: Vec<(OrderKind, OrderRequest)>,
    rate: f64,
    patience: Duration,
) -> Load {
    let (stop, stopped) = watch::channel(false);
    Load {
        stop,
        placing: spawn_load(client, orders, rate, patience, stopped),
    }
}

fn spawn_load(
    client: &ShopClient,
    orders: Vec<(OrderKind, OrderRequest)>,
    rate: f64,
    patience: Duration,
    stopped: watch::Receiver<bool>,
) -> tokio::task::JoinHandle<anyhow::Result<Vec<Uuid>>> {
    let client = Arc::new(client.clone());
    tokio::spawn(async move {
        let gap = Duration::from_secs_f64(1.0 / rate.max(0.001));
        let mut placing = tokio::task::JoinSet::new();
        let mut tick = tokio::time::interval(gap);
        for (_, request) in orders {
            tick.tick().await;
            if *stopped.borrow() {
                break;
            }
            let client = Arc::clone(&client);
            placing.spawn(async move { place_patiently(&client, &request, patience).await });
        }
        let mut ids = Vec::new();
        while let Some(joined) = placing.join_next().await {
            ids.push(joined??);
        }
        Ok(ids)
    })
}

/// Places one order, retrying with the same Idempotency-Key until accepted.
pub async fn place_patiently(
    client: &ShopClient,
    request: &OrderRequest,
    patience: Duration,
) -> anyhow::Result<Uuid> {
    let key = Uuid::new_v4().to_string();
    let started = Instant::now();
    loop {
        let last = match client.place(request, Some(&key)).await {
            Ok((status, body)) if status.is_success() => {
                return Ok(serde_json::from_value(body["orderId"].clone())?);
            }
            Ok((status, body)) if status.is_client_error() => {
                bail!("POST /orders refused the order: {status} {body}")
            }
            Ok((status, body)) => format!("{status} {body}"),
            Err(e) => format!("{e:#}"),
        };
        if started.elapsed() > patience {
            bail!("POST /orders did not accept an order within {patience:?}: {last}");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Waits (at most `bound`) until at least `count` sagas have ended and none is
/// still running; whether that happened.
pub async fn sagas_ended(order: &PgPool, count: usize, bound: Duration) -> anyhow::Result<bool> {
    let count = i64::try_from(count).unwrap_or(i64::MAX);
    wait_until(bound, || {
        let order = order.clone();
        async move {
            let (ended, running): (i64, i64) = sqlx::query_as(
                "SELECT count(*) FILTER (WHERE status IN ('COMPLETED', 'ABORTED', 'COMPENSATION_FAILED')), \
                 count(*) FILTER (WHERE status NOT IN ('COMPLETED', 'ABORTED', 'COMPENSATION_FAILED')) \
                 FROM saga_state",
            )
            .fetch_one(&order)
            .await?;
            Ok(ended >= count && running == 0)
        }
    })
    .await
}

/// Sagas by status, from the order database.
pub async fn saga_counts(order: &PgPool) -> anyhow::Result<BTreeMap<String, i64>> {
    let rows: Vec<(String, i64)> =
        sqlx::query_as("SELECT status, count(*) FROM saga_state GROUP BY status")
            .fetch_all(order)
            .await?;
    Ok(rows.into_iter().collect())
}

/// Waits until `condition` holds (polled every 100 ms) or `timeout` passes;
/// whether it held.
pub async fn wait_until<F, Fut>(timeout: Duration, mut condition: F) -> anyhow::Result<bool>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<bool>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if condition().await? {
            return Ok(true);
        }
        if Instant::now() > deadline {
            return Ok(false);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn pool(url: &str, connections: u32) -> anyhow::Result<PgPool> {
    PgPoolOptions::new()
        .max_connections(connections)
        .acquire_timeout(Duration::from_secs(10))
        .connect(url)
        .await
        .with_context(|| format!("connecting to {url}"))
}
