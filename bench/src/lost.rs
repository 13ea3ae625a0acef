//! For each saga that ended by a step's timeout: how far its first command and the
//! reply to it got (handled by the participant, reply written, reply journalled by
//! the order service), so that a message the broker did not hand out is told apart
//! from one a service lost.

use shop::invariants::Ledger;
use sqlx::PgPool;
use uuid::Uuid;

/// One line per timed-out step.
pub(crate) async fn describe(ledger: &Ledger) -> anyhow::Result<Vec<String>> {
    let sent: Vec<(Uuid, String, Uuid, String, String)> = sqlx::query_as(
        "SELECT DISTINCT ON (s.id, st.key) s.id, st.key, (e.detail->>'message_id')::uuid, \
                e.detail->>'topic', e.detail->>'request_id' \
         FROM saga_state s, jsonb_each(s.step_status) st, saga_events e \
         WHERE st.value->>'timed_out' = 'true' AND e.saga_id = s.id AND e.step = st.key \
           AND e.kind = 'command_sent' \
         ORDER BY s.id, st.key, e.id",
    )
    .fetch_all(&ledger.order)
    .await?;
    let mut lines = Vec::with_capacity(sent.len());
    for (saga, step, command, topic, request) in sent {
        let participant = if topic.contains("customer") {
            &ledger.customer
        } else if topic.contains("inventory") {
            &ledger.inventory
        } else {
            &ledger.payment
        };
        let handled = journalled(participant, command).await?;
        let reply: Option<Uuid> = sqlx::query_scalar(
            "SELECT id FROM outbox WHERE headers->>'request-id' = $1 ORDER BY created_at LIMIT 1",
        )
        .bind(&request)
        .fetch_optional(participant)
        .await?;
        let received = match reply {
            Some(id) => journalled(&ledger.order, id).await?,
            None => false,
        };
        lines.push(format!(
            "saga {saga} step {step}: command handled by the participant: {}; reply written: {}{}; \
             reply journalled by the order service: {}",
            yes(handled),
            yes(reply.is_some()),
            reply.map(|id| format!(" (id {id})")).unwrap_or_default(),
            yes(received)
        ));
    }
    Ok(lines)
}

async fn journalled(pool: &PgPool, id: Uuid) -> anyhow::Result<bool> {
    Ok(
        sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM processed_messages WHERE message_id = $1)",
        )
        .bind(id)
        .fetch_one(pool)
        .await?,
    )
}

fn yes(b: bool) -> &'static str {
    if b {
        "yes"
    } else {
        "no"
    }
}
