//! What the pages show, read from `saga_state` and `saga_events`.

use std::collections::BTreeMap;

use chrono::{DateTime, Duration, Utc};
use saga_core::saga::audit::{self, SagaEvent};
use serde::Deserialize;
use serde_json::{Map, Value};
use sqlx::{PgPool, Row};
use uuid::Uuid;

/// Sagas listed at most on one page.
pub(crate) const MAX_LISTED: i64 = 500;
/// Sagas listed unless the filter says otherwise.
const DEFAULT_LISTED: i64 = 100;
/// How many minutes the throughput covers.
pub(crate) const THROUGHPUT_MINUTES: i64 = 15;

/// The list's filters, from the page's query string.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct Filter {
    /// One status (`STARTED`, `ABORTING`, …); empty: all.
    #[serde(default)]
    pub status: String,
    /// One saga type; empty: all.
    #[serde(default, rename = "type")]
    pub saga_type: String,
    /// Only sagas started at least this many minutes ago; empty: any age.
    #[serde(default)]
    pub older_than: String,
    /// `on`: only running sagas that look stuck.
    #[serde(default)]
    pub stuck: String,
    /// How many to list.
    #[serde(default)]
    pub limit: Option<i64>,
}

impl Filter {
    fn older_than_minutes(&self) -> Option<i64> {
        self.older_than
            .trim()
            .parse::<i64>()
            .ok()
            .filter(|m| *m >= 0)
    }

    pub(crate) fn stuck_only(&self) -> bool {
        self.stuck == "on"
    }

    pub(crate) fn limit(&self) -> i64 {
        self.limit.unwrap_or(DEFAULT_LISTED).clamp(1, MAX_LISTED)
    }
}

/// One saga as the list shows it.
#[derive(Debug, Clone, PartialEq)]
pub struct SagaRow {
    pub id: Uuid,
    pub saga_type: String,
    pub status: String,
    pub current_step: Option<String>,
    pub version: i32,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub deadline: Option<DateTime<Utc>>,
}

impl SagaRow {
    fn of(row: &sqlx::postgres::PgRow) -> Result<SagaRow, sqlx::Error> {
        Ok(SagaRow {
            id: row.try_get("id")?,
            saga_type: row.try_get("saga_type")?,
            status: row.try_get("status")?,
            current_step: row.try_get("current_step")?,
            version: row.try_get("version")?,
            created_at: row.try_get("created_at")?,
            updated_at: row.try_get("updated_at")?,
            deadline: row.try_get("deadline")?,
        })
    }
}

/// Sagas that ended in one minute.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct Minute {
    pub start: DateTime<Utc>,
    pub completed: i64,
    pub aborted: i64,
    pub failed: i64,
}

/// What the list page shows.
#[derive(Debug, Clone)]
pub(crate) struct Overview {
    pub now: DateTime<Utc>,
    /// Sagas per status, every status.
    pub counts: Vec<(String, i64)>,
    pub types: Vec<String>,
    /// The last [`THROUGHPUT_MINUTES`] minutes, oldest first.
    pub throughput: Vec<Minute>,
    /// The sagas the filter selects, most recently changed first.
    pub sagas: Vec<SagaRow>,
    /// Stuck sagas and why (by the console's rules), by id.
    pub stuck: BTreeMap<Uuid, String>,
    /// Whether more sagas matched than are listed.
    pub more: bool,
}

/// Every status a saga can have, in the order of a saga's life.
pub(crate) const STATUSES: [&str; 6] = [
    "STARTED",
    "SUSPENDED",
    "ABORTING",
    "COMPLETED",
    "ABORTED",
    "COMPENSATION_FAILED",
];

pub(crate) async fn overview(
    pool: &PgPool,
    filter: &Filter,
    stuck: BTreeMap<Uuid, String>,
) -> Result<Overview, sqlx::Error> {
    let now: DateTime<Utc> = sqlx::query_scalar("SELECT now()").fetch_one(pool).await?;
    let counted: Vec<(String, i64)> =
        sqlx::query_as("SELECT status, count(*) FROM saga_state GROUP BY status")
            .fetch_all(pool)
            .await?;
    let counts = STATUSES
        .iter()
        .map(|status| {
            let n = counted
                .iter()
                .find(|(s, _)| s == status)
                .map_or(0, |(_, n)| *n);
            ((*status).to_owned(), n)
        })
        .collect();
    let types: Vec<String> =
        sqlx::query_scalar("SELECT DISTINCT saga_type FROM saga_state ORDER BY 1")
            .fetch_all(pool)
            .await?;
    let throughput = throughput(pool, now).await?;

    let limit = filter.limit();
    let stuck_ids: Vec<Uuid> = stuck.keys().copied().collect();
    let rows = sqlx::query(
        "SELECT id, saga_type, status, current_step, version, created_at, updated_at, deadline \
         FROM saga_state \
         WHERE ($1 = '' OR status = $1) AND ($2 = '' OR saga_type = $2) \
           AND ($3::bigint IS NULL OR created_at <= $4 - make_interval(mins => $3::int)) \
           AND (NOT $5 OR id = ANY($6)) \
         ORDER BY updated_at DESC, id LIMIT $7",
    )
    .bind(filter.status.trim())
    .bind(filter.saga_type.trim())
    .bind(filter.older_than_minutes())
    .bind(now)
    .bind(filter.stuck_only())
    .bind(&stuck_ids)
    .bind(limit + 1)
    .fetch_all(pool)
    .await?;
    let mut sagas = rows
        .iter()
        .map(SagaRow::of)
        .collect::<Result<Vec<_>, _>>()?;
    let more = sagas.len() > usize::try_from(limit).unwrap_or(usize::MAX);
    sagas.truncate(usize::try_from(limit).unwrap_or(usize::MAX));
    Ok(Overview {
        now,
        counts,
        types,
        throughput,
        sagas,
        stuck,
        more,
    })
}

/// Sagas that ended per minute over the last [`THROUGHPUT_MINUTES`], from the
/// audit trail's status changes.
async fn throughput(pool: &PgPool, now: DateTime<Utc>) -> Result<Vec<Minute>, sqlx::Error> {
    let first = minute_of(now) - Duration::minutes(THROUGHPUT_MINUTES - 1);
    let rows: Vec<(DateTime<Utc>, String, i64)> = sqlx::query_as(
        "SELECT date_trunc('minute', at), detail->>'to', count(*) FROM saga_events \
         WHERE kind = 'status_changed' AND at >= $1 \
           AND detail->>'to' IN ('COMPLETED', 'ABORTED', 'COMPENSATION_FAILED') \
         GROUP BY 1, 2",
    )
    .bind(first)
    .fetch_all(pool)
    .await?;
    let mut minutes: Vec<Minute> = (0..THROUGHPUT_MINUTES)
        .map(|i| Minute {
            start: first + Duration::minutes(i),
            ..Minute::default()
        })
        .collect();
    for (at, to, n) in rows {
        if let Some(minute) = minutes.iter_mut().find(|m| m.start == at) {
            match to.as_str() {
                "COMPLETED" => minute.completed += n,
                "ABORTED" => minute.aborted += n,
                _ => minute.failed += n,
            }
        }
    }
    Ok(minutes)
}

fn minute_of(at: DateTime<Utc>) -> DateTime<Utc> {
    use chrono::{DurationRound as _, TimeDelta};
    at.duration_trunc(TimeDelta::minutes(1)).unwrap_or(at)
}

/// One saga with its trail.
#[derive(Debug, Clone)]
pub(crate) struct SagaDetail {
    pub now: DateTime<Utc>,
    pub row: SagaRow,
    pub payload: Value,
    pub steps: Map<String, Value>,
    pub events: Vec<SagaEvent>,
    /// Why the saga is stuck, if it is.
    pub stuck: Option<String>,
}

pub(crate) async fn saga(pool: &PgPool, id: Uuid) -> Result<Option<SagaDetail>, sqlx::Error> {
    let mut conn = pool.acquire().await?;
    let now: DateTime<Utc> = sqlx::query_scalar("SELECT now()")
        .fetch_one(&mut *conn)
        .await?;
    let Some(row) = sqlx::query(
        "SELECT id, saga_type, status, current_step, version, created_at, updated_at, deadline, \
         payload, step_status FROM saga_state WHERE id = $1",
    )
    .bind(id)
    .fetch_optional(&mut *conn)
    .await?
    else {
        return Ok(None);
    };
    let steps = match row.try_get::<Value, _>("step_status")? {
        Value::Object(steps) => steps,
        _ => Map::new(),
    };
    Ok(Some(SagaDetail {
        now,
        row: SagaRow::of(&row)?,
        payload: row.try_get("payload")?,
        steps,
        events: audit::events(&mut conn, id).await?,
        stuck: None,
    }))
}
