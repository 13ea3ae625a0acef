//! Where a saga's time goes, step by step: each participant step's command leg
//! (from the orchestrator writing the command to the participant's transaction
//! beginning: the order service's relay, the broker, the participant's consumer)
//! and its reply leg (from there to the orchestrator applying the reply: the
//! participant's transaction, its relay, the broker, the order service's consumer
//! and its transaction up to the reply's event).
//!
//! The command's and the reply's times come from the saga's audit trail (the
//! order service's clock, when its transaction wrote the events); the
//! participant's from its journal (`processed_messages.processed_at`, the start of
//! its transaction, the database server's clock). Everything runs on one machine,
//! so the clocks are one.

use std::collections::HashMap;

use outbox_relay::metrics::{COMMIT_TO_ACK, COMMIT_TO_SEND};
use shop::invariants::Ledger;
use shop::Shop;
use uuid::Uuid;

use crate::latency::{p50_p99_ms, Buckets};

/// The relays, by the service they serve.
const RELAYS: [&str; 4] = ["order", "customer", "inventory", "payment"];

/// Each relay's commit -> handed to the producer and commit -> broker ack
/// histograms now.
pub(crate) async fn relay_histograms(shop: &Shop) -> Vec<(&'static str, Buckets, Buckets)> {
    let http = reqwest::Client::new();
    let mut all = Vec::new();
    for relay in RELAYS {
        let url = format!("{}/metrics", shop.relay_url(relay));
        let text = match http.get(&url).send().await {
            Ok(answer) => answer.text().await.unwrap_or_default(),
            Err(_) => String::new(),
        };
        let send = Buckets::parse(&text, COMMIT_TO_SEND);
        all.push((relay, send, Buckets::parse(&text, COMMIT_TO_ACK)));
    }
    all
}

/// One relay's p50 (ms) between two readings: commit -> handed to the producer,
/// commit -> broker ack; and the latter's p99.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct RelayLatency {
    pub(crate) relay: &'static str,
    pub(crate) send_p50: f64,
    pub(crate) ack_p50: f64,
    pub(crate) ack_p99: f64,
}

/// Each relay's latencies between `before` and `after`.
pub(crate) fn relay_latencies(
    before: &[(&'static str, Buckets, Buckets)],
    after: &[(&'static str, Buckets, Buckets)],
) -> Vec<RelayLatency> {
    after
        .iter()
        .map(|(relay, send, ack)| {
            let (send_before, ack_before) = before
                .iter()
                .find(|(r, _, _)| r == relay)
                .map(|(_, s, a)| (s.clone(), a.clone()))
                .unwrap_or_default();
            let ack = ack.minus(&ack_before);
            RelayLatency {
                relay,
                send_p50: send.minus(&send_before).quantile(0.5) * 1e3,
                ack_p50: ack.quantile(0.5) * 1e3,
                ack_p99: ack.quantile(0.99) * 1e3,
            }
        })
        .collect()
}

/// One participant step's legs, p50 and p99 in milliseconds.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Leg {
    pub(crate) step: String,
    pub(crate) count: usize,
    /// Command written → participant's transaction began.
    pub(crate) command_ms: (f64, f64),
    /// Participant's transaction began → reply applied by the orchestrator.
    pub(crate) reply_ms: (f64, f64),
}

/// The legs of every forward command sent since `since` (a server time stamp)
/// whose reply was applied, by step, in the saga's order.
pub(crate) async fn measure(ledger: &Ledger, since: &str) -> anyhow::Result<Vec<Leg>> {
    let sent: Vec<(String, String, f64, f64)> = sqlx::query_as(
        "SELECT c.step, c.detail->>'message_id', extract(epoch FROM c.at)::float8, \
                extract(epoch FROM r.at)::float8 \
         FROM saga_events c JOIN saga_events r ON r.saga_id = c.saga_id \
              AND r.kind = 'reply_received' AND r.detail->>'applied' = 'true' \
              AND r.detail->>'request_id' = c.detail->>'request_id' \
         WHERE c.kind = 'command_sent' AND c.detail->>'compensation' = 'false' \
               AND c.at >= $1::timestamptz \
         ORDER BY c.id",
    )
    .bind(since)
    .fetch_all(&ledger.order)
    .await?;
    let mut began: HashMap<Uuid, f64> = HashMap::new();
    for pool in [&ledger.customer, &ledger.inventory, &ledger.payment] {
        let rows: Vec<(Uuid, f64)> = sqlx::query_as(
            "SELECT message_id, extract(epoch FROM processed_at)::float8 \
             FROM processed_messages WHERE processed_at >= $1::timestamptz",
        )
        .bind(since)
        .fetch_all(pool)
        .await?;
        began.extend(rows);
    }
    let mut steps: Vec<String> = Vec::new();
    let mut legs: HashMap<String, (Vec<f64>, Vec<f64>)> = HashMap::new();
    for (step, message, sent_at, applied_at) in sent {
        let Some(at) = message.parse().ok().and_then(|id: Uuid| began.get(&id)) else {
            continue;
        };
        if !legs.contains_key(&step) {
            steps.push(step.clone());
        }
        let (command, reply) = legs.entry(step).or_default();
        command.push(at - sent_at);
        reply.push(applied_at - at);
    }
    Ok(steps
        .into_iter()
        .filter_map(|step| {
            let (command, reply) = legs.remove(&step)?;
            Some(Leg {
                count: command.len(),
                command_ms: p50_p99_ms(command),
                reply_ms: p50_p99_ms(reply),
                step,
            })
        })
        .collect())
}
