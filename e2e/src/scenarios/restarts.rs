//! Restarts within seconds: a process SIGKILLed and started again before the
//! broker's group coordinator could notice it had gone. The restarted service
//! must get its partitions back at once (its member keeps its instance name across
//! restarts), not after the dead member's session expired; with the documented
//! defaults, nothing tuned for the scenario.

use std::os::unix::process::ExitStatusExt as _;
use std::time::{Duration, Instant};

use service_kit::Topics;
use testkit::process::memory_kib;

use super::{seed, timed_out_steps, wait_terminal, with_shop, BOUND, PATIENCE};
use crate::lab::{backlog, consumer_counts, order_mix, place_until_stopped, Lab, LabSettings};
use crate::lab::{Load, Measurement};
use crate::{Shop, ShopClient};

/// How soon after its restart a service must be consuming again: its member takes
/// its instance name's membership over (6-7 s on the local broker, which holds a
/// static member's join and sync for 3 s each).
const RESUME_WITHIN: Duration = Duration::from_secs(10);
/// How long a restarted service is watched at most (to tell how late it was).
const RESUME_WATCH: Duration = Duration::from_secs(60);
/// Orders per second while the processes are killed and restarted.
const RATE: f64 = 8.0;
/// The signal `kill -KILL` sends.
const SIGKILL: i32 = 9;

/// One process SIGKILLed and started again.
#[derive(Debug)]
struct Bounce {
    /// Its process id when it was killed.
    pid: Option<u32>,
    /// It was running when the signal went out and died of the signal.
    killed: bool,
    /// How it ended, in words.
    ended: String,
    restarted_at: Instant,
    /// How long after its restart it reported itself healthy, or why it did not.
    healthy: Result<Duration, String>,
}

/// SIGKILLs `name`, waits `down`, starts it again and waits until it is healthy.
async fn bounce(shop: &mut Shop, name: &str, down: Duration) -> anyhow::Result<Bounce> {
    let pid = shop.pid(name)?;
    // A zombie (a process that already ended, not yet reaped) has no memory.
    let running = pid.is_some_and(|pid| memory_kib(pid).is_some());
    if running {
        shop.signal(name, "KILL")?;
    }
    let status = match pid {
        Some(_) => Some(shop.wait_exit(name, Duration::from_secs(10)).await?),
        None => None,
    };
    let killed = running && status.is_some_and(|s| s.signal() == Some(SIGKILL));
    let ended = match status {
        Some(status) if running => status.to_string(),
        Some(status) => format!("had already ended ({status})"),
        None => "was not running".to_owned(),
    };
    tokio::time::sleep(down).await;
    let restarted_at = Instant::now();
    let healthy = match shop.restart(name, &[]).await {
        Ok(()) => Ok(restarted_at.elapsed()),
        Err(e) => Err(format!("{e:#}")),
    };
    Ok(Bounce {
        pid,
        killed,
        ended,
        restarted_at,
        healthy,
    })
}

/// The consumer group of service process `name` and the topic it consumes.
fn input_of(lab: &Lab, name: &str) -> Option<(String, String)> {
    let topics = Topics::new(lab.prefix.clone());
    let topic = match name {
        "order-service" => topics.order_reply(),
        "customer-service" => topics.customer_request(),
        "inventory-service" => topics.inventory_request(),
        "payment-service" => topics.payment_request(),
        _ => return None,
    };
    Some((format!("{}{name}", lab.prefix), topic))
}

/// How a restarted service's consumer came back.
#[derive(Debug, Clone, Copy, Default)]
struct Resumed {
    /// How long after the restart its consumer first applied or skipped a message.
    after: Option<Duration>,
    /// Messages waiting for its group [`RESUME_WITHIN`] after the restart, if it
    /// had handled none by then (`None`: not asked, or the broker did not say).
    waiting: Option<i64>,
}

impl Resumed {
    /// Consuming within [`RESUME_WITHIN`], or idle then with nothing waiting for
    /// it (a consumer with nothing to consume is not late).
    fn in_time(&self) -> bool {
        self.after.is_some_and(|after| after <= RESUME_WITHIN) || self.waiting == Some(0)
    }
}

impl std::fmt::Display for Resumed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (self.after, self.waiting) {
            (Some(after), _) => write!(
                f,
                "consuming {:.1} s after its restart",
                after.as_secs_f64()
            )?,
            (None, _) => write!(f, "not consuming yet")?,
        }
        match self.waiting {
            Some(0) => write!(
                f,
                " (nothing waited for it {} s after its restart)",
                RESUME_WITHIN.as_secs()
            ),
            Some(n) => write!(
                f,
                " ({n} messages waited for it {} s after its restart)",
                RESUME_WITHIN.as_secs()
            ),
            None => Ok(()),
        }
    }
}

/// Watches the consumer of the restarted service `name` until `until`: when it
/// first handled a message (its counters start at zero with the process) and, if
/// it had handled none [`RESUME_WITHIN`] after `since`, how many were waiting.
async fn resumed(
    lab: &Lab,
    shop: &mut Shop,
    name: &str,
    since: Instant,
    until: Instant,
) -> Resumed {
    let mut seen = Resumed::default();
    let input = input_of(lab, name);
    loop {
        if let Ok(counts) = consumer_counts(shop, name).await {
            if counts.applied + counts.duplicate + counts.dead_lettered > 0 {
                seen.after = Some(since.elapsed());
                return seen;
            }
        }
        if seen.waiting.is_none() && since.elapsed() >= RESUME_WITHIN {
            if let Some((group, topic)) = &input {
                match backlog(&lab.broker.bootstrap(), group, topic).await {
                    Ok(n) => seen.waiting = Some(n),
                    Err(e) => {
                        tracing::warn!(%group, error = %format!("{e:#}"), "cannot read the group's backlog")
                    }
                }
            }
        }
        if Instant::now() >= until {
            return seen;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A load that outlasts the restarts: more orders than the scenario can place
/// at [`RATE`], placed until stopped.
fn endless_load(lab: &mut Lab, shop: &Shop) -> Load {
    let seed = seed();
    lab.note(format!(
        "orders placed at {RATE}/s until the restarts are over, mix seed {seed} (SCENARIO_SEED replays it)"
    ));
    let orders = order_mix(3_000, seed);
    place_until_stopped(&ShopClient::new(shop), orders, RATE, PATIENCE)
}

pub(super) async fn service_restart(settings: LabSettings) -> anyhow::Result<Measurement> {
    let mut lab = Lab::new(&settings, "service-restart", false).await?;
    let config = lab.shop_config();
    with_shop(&mut lab, config, BOUND, |lab, shop| {
        Box::pin(async move {
            let load = endless_load(lab, shop);
            tokio::time::sleep(Duration::from_secs(5)).await;
            for (name, down) in [
                ("payment-service", 1),
                ("payment-service", 3),
                ("order-service", 1),
                ("order-service", 3),
            ] {
                let down = Duration::from_secs(down);
                let orders_before = lab.order_count().await?;
                let b = bounce(shop, name, down).await?;
                let watch_until = b.restarted_at + RESUME_WATCH;
                let r = if b.healthy.is_ok() {
                    resumed(lab, shop, name, b.restarted_at, watch_until).await
                } else {
                    Resumed::default()
                };
                let orders_after = lab.order_count().await?;
                lab.note(format!(
                    "{name} (pid {}) SIGKILLed: {}; started again {down:?} later: {}; {r}; {} orders placed meanwhile",
                    b.pid.map_or("-".to_owned(), |p| p.to_string()),
                    b.ended,
                    match &b.healthy {
                        Ok(after) => format!("healthy after {:.1} s", after.as_secs_f64()),
                        Err(e) => format!("NOT healthy: {e}"),
                    },
                    orders_after - orders_before
                ));
                let what = format!("{name} (down {} s)", down.as_secs());
                lab.expect(format!("{what} was running and died of the SIGKILL"), b.killed);
                lab.expect(format!("{what} came back healthy"), b.healthy.is_ok());
                lab.expect(
                    format!(
                        "{what} was consuming again within {} s of its restart",
                        RESUME_WITHIN.as_secs()
                    ),
                    r.in_time(),
                );
                // The load flows on a moment before the next kill.
                tokio::time::sleep(Duration::from_secs(3)).await;
            }
            settle(lab, load).await
        })
    })
    .await
}

/// Stops the load and waits until every accepted order's saga ended.
async fn settle(lab: &mut Lab, load: Load) -> anyhow::Result<()> {
    let ids = load.stop().await?;
    lab.note(format!("{} orders accepted in all", ids.len()));
    wait_terminal(lab, ids.len()).await?;
    let timed_out = timed_out_steps(lab).await?;
    lab.note(format!("{timed_out} steps timed out (step timeout 30 s)"));
    Ok(())
}

/// How often the storm goes through the eight processes.
const STORM_ROUNDS: usize = 2;
/// How long the load runs between one restart and the next kill.
const STORM_GAP: Duration = Duration::from_secs(3);

pub(super) async fn restart_storm(settings: LabSettings) -> anyhow::Result<Measurement> {
    let mut lab = Lab::new(&settings, "restart-storm", false).await?;
    let config = lab.shop_config();
    with_shop(&mut lab, config, BOUND, |lab, shop| {
        Box::pin(async move {
            let load = endless_load(lab, shop);
            let mut next = xorshift(seed());
            let names = shop.process_names();
            lab.expect(
                format!("the shop ran eight processes, four services and four relays ({names:?})"),
                names.len() == 8,
            );
            let total = STORM_ROUNDS * names.len();
            tokio::time::sleep(Duration::from_secs(5)).await;
            let mut kill = 0;
            for _ in 0..STORM_ROUNDS {
                for name in &names {
                    kill += 1;
                    let down = Duration::from_millis(1_000 + next() % 2_001);
                    let b = bounce(shop, name, down).await?;
                    let came_back = match &b.healthy {
                        Ok(after) => format!("healthy {:.1} s after its restart", after.as_secs_f64()),
                        Err(e) => format!("NOT healthy: {e}"),
                    };
                    let consuming = if b.healthy.is_ok() && input_of(lab, name).is_some() {
                        let r = resumed(lab, shop, name, b.restarted_at, Instant::now() + STORM_GAP).await;
                        match r.after {
                            Some(after) => format!("; consuming {:.1} s after its restart", after.as_secs_f64()),
                            None => format!("; not consuming yet {} s later", STORM_GAP.as_secs()),
                        }
                    } else {
                        tokio::time::sleep(STORM_GAP).await;
                        String::new()
                    };
                    lab.note(format!(
                        "kill {kill}/{total}: {name} (pid {}) SIGKILLed: {}; started again {:.1} s later, {came_back}{consuming}",
                        b.pid.map_or("-".to_owned(), |p| p.to_string()),
                        b.ended,
                        down.as_secs_f64()
                    ));
                    lab.expect(
                        format!("kill {kill}/{total}: {name} was running and died of the SIGKILL"),
                        b.killed,
                    );
                    lab.expect(
                        format!("kill {kill}/{total}: {name} came back healthy"),
                        b.healthy.is_ok(),
                    );
                }
            }
            settle(lab, load).await
        })
    })
    .await
}

/// A seeded xorshift generator: the storm's pauses replay with the load's seed.
fn xorshift(seed: u64) -> impl FnMut() -> u64 {
    // Not the load's sequence: the pauses vary independently of the mix.
    let mut state = seed.rotate_left(32) | 1;
    move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    }
}
