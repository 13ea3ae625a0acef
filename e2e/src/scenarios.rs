//! The failure scenarios: each starts the shop on a private cluster and broker
//! ([`crate::lab`]), places a load of mixed orders, injects one fault, and ends with
//! the measurements every scenario shares plus the claims of its own (that the
//! fault really happened: a scenario that injected nothing proves nothing).

use std::time::{Duration, Instant};

use anyhow::Context;
use futures::future::BoxFuture;

use crate::lab::{
    consumer_counts, metrics_text, order_mix, place_in_background, sagas_ended, Lab, LabSettings,
    Measurement, OrderKind,
};
use crate::{Shop, ShopClient, ShopConfig};
use testkit::process::{memory_kib, metric_sum};

mod restarts;
mod sagas;

/// One scenario: its name on the command line, what it does, what it proves.
#[derive(Debug, Clone, Copy)]
pub struct Scenario {
    pub name: &'static str,
    pub fault: &'static str,
    pub promise: &'static str,
    /// Why the scenario is left out of `run all` for now (it still runs by name);
    /// `None` for every scenario whose promise holds.
    pub pending: Option<&'static str>,
    run: fn(LabSettings) -> BoxFuture<'static, anyhow::Result<Measurement>>,
}

impl Scenario {
    /// Runs the scenario once on a fresh lab.
    pub async fn run(&self, settings: &LabSettings) -> anyhow::Result<Measurement> {
        (self.run)(settings.clone()).await
    }
}

/// Every scenario, in the order `run all` runs them.
pub fn all() -> Vec<Scenario> {
    vec![
        Scenario {
            name: "handler-error",
            fault: "the consumer of every service fails after its handler did its work, before the commit (4 times each)",
            promise: "the transaction rolls back, the message is handled again, the saga continues; nothing is applied twice",
            run: |s| Box::pin(handler_error(s)),
            pending: None,
        },
        Scenario {
            name: "relay-crash",
            fault: "the order database's relay is SIGKILLed after the broker acknowledged a record, before the slot position was confirmed",
            promise: "after the restart the unconfirmed records are delivered again; the consumers' journal drops the duplicates",
            run: |s| Box::pin(relay_crash(s)),
            pending: None,
        },
        Scenario {
            name: "broker-pause",
            fault: "the broker (memory storage) is paused with SIGSTOP for 30 s under load, then resumed",
            promise: "the relay stops reading at its in-flight bound, its memory stays flat, everything is delivered after the broker returns",
            run: |s| Box::pin(broker_pause(s)),
            pending: None,
        },
        Scenario {
            name: "broker-restart",
            fault: "the broker (SQLite storage) is killed under load and started again 5 s later",
            promise: "relays and consumers reconnect; every event is delivered, every saga ends",
            run: |s| Box::pin(broker_restart(s)),
            pending: None,
        },
        Scenario {
            name: "consumer-crash",
            fault: "the inventory service is SIGKILLed right after a message's database commit, before its offset is committed",
            promise: "after the restart the message is delivered again and skipped through the journal",
            run: |s| Box::pin(consumer_crash(s)),
            pending: None,
        },
        Scenario {
            name: "reply-races-timeout",
            fault: "replies arrive around their step's 1 s timeout (the inventory service takes 0.5-1.5 s for its first 80 messages), two orchestrator instances share the replies, one leaves and comes back",
            promise: "each step has one outcome (late replies are ignored, version conflicts retried), timed-out steps are compensated, nothing is applied twice",
            run: |s| Box::pin(sagas::reply_races_timeout(s)),
            pending: None,
        },
        Scenario {
            name: "participant-down",
            fault: "the payment service is killed for 15 s under load (steps time out after 120 s)",
            promise: "its sagas wait and complete after it restarts; none times out",
            run: |s| Box::pin(sagas::participant_down(s)),
            pending: None,
        },
        Scenario {
            name: "postgres-restart",
            fault: "PostgreSQL is shut down for 5 s under load and started again",
            promise: "the relays and the services reconnect and resume; clients retrying with an Idempotency-Key get their orders placed once",
            run: |s| Box::pin(postgres_restart(s)),
            pending: None,
        },
        Scenario {
            name: "compensation-retry",
            fault: "payments are declined, then the customer service (the target of the credit compensations) is down for 2 minutes while orders keep coming; steps and compensations time out after 6 s",
            promise: "compensations are retried (capped backoff) for longer than the outage: afterwards every saga is COMPLETED or ABORTED, none COMPENSATION_FAILED; each credit is released once, the retries answered from the customer service's store",
            run: |s| Box::pin(sagas::compensation_retry(s)),
            pending: None,
        },
        Scenario {
            name: "service-restart",
            fault: "under load, the payment service and then the order service are SIGKILLed and started again 1 s later, then 3 s later (default consumer settings)",
            promise: "each restarted service is consuming again within 10 s of its restart; every saga ends, nothing is applied twice, stock and credit are conserved",
            run: |s| Box::pin(restarts::service_restart(s)),
            pending: None,
        },
        Scenario {
            name: "restart-storm",
            fault: "under load, each of the eight processes (four services, four relays) in turn is SIGKILLed and started again 1-3 s later (seeded), twice over: 16 kills",
            promise: "every killed process comes back healthy; every event is delivered, every saga ends, nothing is applied twice, stock and credit are conserved",
            run: |s| Box::pin(restarts::restart_storm(s)),
            pending: None,
        },
    ]
}

/// Finds a scenario by name.
pub fn find(name: &str) -> Option<Scenario> {
    all().into_iter().find(|s| s.name == name)
}

/// Starts the shop, runs `body`, measures, and stops the shop whatever happened.
async fn with_shop<F>(
    lab: &mut Lab,
    config: ShopConfig,
    bound: Duration,
    body: F,
) -> anyhow::Result<Measurement>
where
    F: for<'a> FnOnce(&'a mut Lab, &'a mut Shop) -> BoxFuture<'a, anyhow::Result<()>>,
{
    let mut shop = lab.start(config).await?;
    let outcome = async {
        body(lab, &mut shop).await?;
        lab.measure(&mut shop, bound).await
    }
    .await;
    let failed = !outcome.as_ref().is_ok_and(Measurement::ok);
    let mut diagnosis = if failed {
        crate::post_mortem::relays(&mut shop).await
    } else {
        Vec::new()
    };
    shop.stop().await;
    if !failed {
        return outcome;
    }
    diagnosis.extend(crate::post_mortem::log_tails(&lab.log_dir));
    match outcome {
        Ok(mut m) => {
            m.diagnosis = diagnosis;
            Ok(m)
        }
        Err(e) => Err(anyhow::anyhow!(
            "{e:#}\n    what the processes said:\n      {}",
            diagnosis.join("\n      ")
        )),
    }
}

fn seed() -> u64 {
    std::env::var("SCENARIO_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(1)
        })
}

fn mix(lab: &mut Lab, count: usize) -> Vec<(OrderKind, crate::OrderRequest)> {
    let seed = seed();
    lab.note(format!(
        "{count} orders, mix seed {seed} (SCENARIO_SEED replays it)"
    ));
    order_mix(count, seed)
}

const PATIENCE: Duration = Duration::from_secs(90);
const BOUND: Duration = Duration::from_secs(120);

async fn placed(
    handle: tokio::task::JoinHandle<anyhow::Result<Vec<uuid::Uuid>>>,
) -> anyhow::Result<Vec<uuid::Uuid>> {
    handle.await.context("the load task")?
}

/// The process names of the four services (their first instances).
fn service_processes() -> impl Iterator<Item = String> {
    crate::harness::SERVICES
        .into_iter()
        .map(|service| format!("{service}-service"))
}

async fn handler_error(settings: LabSettings) -> anyhow::Result<Measurement> {
    let mut lab = Lab::new(&settings, "handler-error", false).await?;
    let mut config = lab.shop_config();
    for name in service_processes() {
        config = config.with_env(&name, failpoints::ENV, "consumer.before-commit=error*4");
    }
    with_shop(&mut lab, config, BOUND, |lab, shop| {
        Box::pin(async move {
            let orders = mix(lab, 60);
            let ids = placed(place_in_background(
                &ShopClient::new(shop),
                orders,
                30.0,
                PATIENCE,
            ))
            .await?;
            let order_count = ids.len();
            wait_terminal(lab, order_count).await?;
            for name in service_processes() {
                let name = name.as_str();
                let counts = consumer_counts(shop, name).await?;
                lab.note(format!(
                    "{name}: {} applied, {} attempts rolled back and retried, {} dead-lettered",
                    counts.applied, counts.retried, counts.dead_lettered
                ));
                lab.expect(
                    format!("{name} rolled back and retried the 4 failed attempts"),
                    counts.retried >= 4,
                );
                lab.expect(
                    format!("{name} dead-lettered nothing"),
                    counts.dead_lettered == 0,
                );
            }
            Ok(())
        })
    })
    .await
}

async fn relay_crash(settings: LabSettings) -> anyhow::Result<Measurement> {
    let mut lab = Lab::new(&settings, "relay-crash", false).await?;
    let config =
        lab.shop_config()
            .with_env("relay-order", failpoints::ENV, "relay.after-ack=kill@150");
    with_shop(&mut lab, config, BOUND, |lab, shop| {
        Box::pin(async move {
            let orders = mix(lab, 100);
            let load = place_in_background(&ShopClient::new(shop), orders, 30.0, PATIENCE);
            let status = shop
                .wait_exit("relay-order", Duration::from_secs(60))
                .await
                .context("the relay was to kill itself at its 150th acknowledgement")?;
            let confirmed = lab.confirmed_lsn("order").await?;
            lab.note(format!(
                "relay-order died at its 150th acknowledgement ({status}); slot confirmed up to {}",
                confirmed.as_deref().unwrap_or("nothing")
            ));
            tokio::time::sleep(Duration::from_secs(2)).await;
            shop.restart("relay-order", &[failpoints::ENV]).await?;
            let ids = placed(load).await?;
            wait_terminal(lab, ids.len()).await?;
            let mut duplicates = 0;
            for name in ["customer-service", "inventory-service", "payment-service"] {
                let counts = consumer_counts(shop, name).await?;
                duplicates += counts.duplicate;
                lab.note(format!(
                    "{name}: {} applied, {} duplicates skipped by the journal",
                    counts.applied, counts.duplicate
                ));
            }
            lab.expect(
                "the participants received commands again and skipped them",
                duplicates > 0,
            );
            Ok(())
        })
    })
    .await
    .map(|m| {
        let mut m = m;
        if m.duplicates_delivered == 0 {
            m.violations
                .push("the scenario's claim failed: no duplicate was delivered".into());
        }
        m
    })
}

async fn broker_pause(settings: LabSettings) -> anyhow::Result<Measurement> {
    let mut lab = Lab::new(&settings, "broker-pause", false).await?;
    let max_in_flight = 500;
    // With the defaults: the 30 s pause stays within the services' 45 s sessions
    // (they run with instance names), so no consumer loses its membership.
    let config = lab.shop_config().with_env(
        "relay-order",
        "OUTBOX_RELAY_MAX_IN_FLIGHT",
        max_in_flight.to_string(),
    );
    let pause = Duration::from_secs(30);
    with_shop(&mut lab, config, BOUND + pause, |lab, shop| {
        Box::pin(async move {
            let orders = mix(lab, 600);
            let load = place_in_background(&ShopClient::new(shop), orders, 40.0, PATIENCE);
            tokio::time::sleep(Duration::from_secs(3)).await;
            let pid = shop
                .pid("relay-order")?
                .context("relay-order is not running")?;
            let (rss_before, _) = memory_kib(pid).unwrap_or_default();
            lab.broker.pause();
            let paused_at = Instant::now();
            let mut samples = Vec::new();
            let mut in_flight_max = 0u64;
            while paused_at.elapsed() < pause {
                tokio::time::sleep(Duration::from_secs(1)).await;
                if let Some((rss, _)) = memory_kib(pid) {
                    samples.push(rss);
                }
                if let Ok(text) = metrics_text(shop, "relay-order").await {
                    in_flight_max = in_flight_max.max(metric_sum(&text, "outbox_relay_records_in_flight"));
                }
            }
            let backlog_during = lab.order_count().await?;
            lab.broker.resume();
            let half = samples.len() / 2;
            let first_peak = samples[..half].iter().copied().max().unwrap_or(0);
            let second_peak = samples[half..].iter().copied().max().unwrap_or(0);
            let peak = first_peak.max(second_peak);
            lab.note(format!(
                "broker paused {pause:?} with {backlog_during} orders placed by its end; relay-order RSS {} KiB before, peak {} KiB in the first half of the pause, {} KiB in the second; records in flight at most {in_flight_max} (bound {max_in_flight})",
                rss_before, first_peak, second_peak
            ));
            lab.expect(
                format!("the relay stopped reading at its bound ({in_flight_max} ≤ {max_in_flight} records in flight)"),
                in_flight_max <= max_in_flight,
            );
            lab.expect(
                "the relay's memory stayed flat during the pause (second-half peak within 10 % + 2 MiB of the first half's)",
                second_peak <= first_peak + first_peak / 10 + 2048,
            );
            lab.expect("the relay's RSS stayed below 64 MiB", peak < 64 * 1024);
            let ids = placed(load).await?;
            wait_terminal(lab, ids.len()).await?;
            Ok(())
        })
    })
    .await
}

async fn broker_restart(settings: LabSettings) -> anyhow::Result<Measurement> {
    let mut lab = Lab::new(&settings, "broker-restart", true).await?;
    let config = lab.shop_config();
    with_shop(&mut lab, config, BOUND, |lab, shop| {
        Box::pin(async move {
            let orders = mix(lab, 200);
            let load = place_in_background(&ShopClient::new(shop), orders, 25.0, PATIENCE);
            tokio::time::sleep(Duration::from_secs(3)).await;
            let before = lab.order_count().await?;
            lab.broker.stop();
            tokio::time::sleep(Duration::from_secs(5)).await;
            lab.broker.start_again();
            lab.note(format!(
                "broker killed after {before} orders, started again 5 s later on its SQLite storage"
            ));
            let ids = placed(load).await?;
            wait_terminal(lab, ids.len()).await?;
            Ok(())
        })
    })
    .await
}

async fn consumer_crash(settings: LabSettings) -> anyhow::Result<Measurement> {
    let mut lab = Lab::new(&settings, "consumer-crash", false).await?;
    let config = lab.shop_config().with_env(
        "inventory-service",
        failpoints::ENV,
        "consumer.after-commit=kill@30",
    );
    with_shop(&mut lab, config, BOUND, |lab, shop| {
        Box::pin(async move {
            let orders = mix(lab, 100);
            let load = place_in_background(&ShopClient::new(shop), orders, 30.0, PATIENCE);
            let status = shop
                .wait_exit("inventory-service", Duration::from_secs(60))
                .await
                .context("the inventory service was to kill itself after its 30th commit")?;
            lab.note(format!(
                "inventory-service died right after its 30th commit ({status})"
            ));
            shop.restart("inventory-service", &[failpoints::ENV])
                .await?;
            let ids = placed(load).await?;
            wait_terminal(lab, ids.len()).await?;
            let counts = consumer_counts(shop, "inventory-service").await?;
            lab.note(format!(
                "restarted inventory-service: {} applied, {} redeliveries skipped by the journal",
                counts.applied, counts.duplicate
            ));
            lab.expect(
                "the message committed before the crash came again and was skipped",
                counts.duplicate >= 1,
            );
            Ok(())
        })
    })
    .await
}

async fn postgres_restart(settings: LabSettings) -> anyhow::Result<Measurement> {
    let mut lab = Lab::new(&settings, "postgres-restart", false).await?;
    let config = lab.shop_config();
    with_shop(&mut lab, config, BOUND, |lab, shop| {
        Box::pin(async move {
            let orders = mix(lab, 300);
            let load = place_in_background(&ShopClient::new(shop), orders, 20.0, PATIENCE);
            tokio::time::sleep(Duration::from_secs(4)).await;
            let before = lab.order_count().await?;
            tokio::task::block_in_place(|| lab.cluster.shut_down(false));
            tokio::time::sleep(Duration::from_secs(5)).await;
            tokio::task::block_in_place(|| lab.cluster.start_again());
            lab.note(format!(
                "PostgreSQL shut down (fast) after {before} orders and started again 5 s later"
            ));
            let ids = placed(load).await?;
            lab.note(format!("{} orders accepted in all", ids.len()));
            wait_terminal(lab, ids.len()).await?;
            let mut reconnects = 0;
            for relay in [
                "relay-order",
                "relay-customer",
                "relay-inventory",
                "relay-payment",
            ] {
                reconnects += metric_sum(
                    &metrics_text(shop, relay).await?,
                    "outbox_relay_reconnects_total",
                );
            }
            lab.note(format!("the four relays reconnected {reconnects} times"));
            lab.expect("the relays reconnected", reconnects >= 4);
            lab.expect(
                "every accepted order exists once",
                lab.order_count().await? == i64::try_from(ids.len()).unwrap_or(-1),
            );
            Ok(())
        })
    })
    .await
}

/// Waits until every one of `count` orders' sagas ended (bounded by [`BOUND`]);
/// the measurement reports any that did not.
async fn wait_terminal(lab: &Lab, count: usize) -> anyhow::Result<()> {
    sagas_ended(&lab.ledger.order, count, BOUND).await?;
    Ok(())
}

/// Steps that failed by timing out (their participant may have run them).
async fn timed_out_steps(lab: &Lab) -> anyhow::Result<i64> {
    Ok(sqlx::query_scalar(
        "SELECT count(*) FROM saga_state s, jsonb_each(s.step_status) st \
         WHERE st.value->>'timed_out' = 'true'",
    )
    .fetch_one(&lab.ledger.order)
    .await?)
}
