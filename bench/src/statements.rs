//! Statements and commits per saga in each of the shop's databases, counted by
//! `pg_stat_statements` (loaded in the bench's cluster, utility statements such
//! as `BEGIN` and `COMMIT` included): how many round trips a saga costs the
//! database, which the CPU per saga follows.

use std::collections::BTreeMap;

use sqlx::PgPool;

/// The cluster settings that count statements.
pub(crate) const SERVER_SETTINGS: [(&str, &str); 2] = [
    ("shared_preload_libraries", "pg_stat_statements"),
    ("pg_stat_statements.track_utility", "on"),
];

/// The shop's databases.
const DATABASES: [&str; 4] = ["order_db", "customer_db", "inventory_db", "payment_db"];

/// Statements and commits so far, by database.
#[derive(Debug, Clone, Default)]
pub(crate) struct Counts(BTreeMap<String, (i64, i64)>);

/// One statement's share of a saga: database, calls and server time per saga.
#[derive(Debug, Clone)]
pub(crate) struct Top {
    pub(crate) database: String,
    pub(crate) calls: f64,
    pub(crate) ms: f64,
    pub(crate) query: String,
}

/// Statements and commits per saga, by database (`order` for `order_db`).
pub(crate) type PerSaga = BTreeMap<String, (f64, f64)>;

/// Makes the counts readable (from `pool`'s database; the view covers them all).
pub(crate) async fn prepare(pool: &PgPool) -> anyhow::Result<()> {
    sqlx::query("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        .execute(pool)
        .await?;
    Ok(())
}

pub(crate) async fn read(pool: &PgPool) -> anyhow::Result<Counts> {
    let rows: Vec<(String, i64, i64)> = sqlx::query_as(
        "SELECT d.datname, sum(s.calls)::bigint, \
                coalesce(sum(s.calls) FILTER (WHERE s.query IN ('COMMIT', 'END')), 0)::bigint \
         FROM pg_stat_statements s JOIN pg_database d ON d.oid = s.dbid \
         WHERE d.datname = ANY($1) GROUP BY d.datname",
    )
    .bind(&DATABASES[..])
    .fetch_all(pool)
    .await?;
    Ok(Counts(
        rows.into_iter()
            .map(|(name, statements, commits)| (name, (statements, commits)))
            .collect(),
    ))
}

/// The statements that took the most server time since the counters were reset
/// ([`reset`]), per saga: where the database's part of a saga goes.
pub(crate) async fn top(pool: &PgPool, sagas: usize, n: i64) -> anyhow::Result<Vec<Top>> {
    let rows: Vec<(String, i64, f64, String)> = sqlx::query_as(
        "SELECT d.datname, s.calls, s.total_exec_time, \
                regexp_replace(s.query, '\\s+', ' ', 'g') \
         FROM pg_stat_statements s JOIN pg_database d ON d.oid = s.dbid \
         WHERE d.datname = ANY($1) ORDER BY s.total_exec_time DESC LIMIT $2",
    )
    .bind(&DATABASES[..])
    .bind(n)
    .fetch_all(pool)
    .await?;
    let per = sagas as f64;
    Ok(rows
        .into_iter()
        .map(|(database, calls, ms, query)| Top {
            database: database.trim_end_matches("_db").to_owned(),
            calls: calls as f64 / per,
            ms: ms / per,
            query: query.chars().take(110).collect(),
        })
        .collect())
}

/// Sets the statement counters to zero.
pub(crate) async fn reset(pool: &PgPool) -> anyhow::Result<()> {
    sqlx::query("SELECT pg_stat_statements_reset()")
        .execute(pool)
        .await?;
    Ok(())
}

/// What `sagas` sagas cost between `before` and `after`.
pub(crate) fn per_saga(before: &Counts, after: &Counts, sagas: usize) -> PerSaga {
    after
        .0
        .iter()
        .map(|(name, &(statements, commits))| {
            let (s0, c0) = before.0.get(name).copied().unwrap_or_default();
            let short = name.trim_end_matches("_db").to_owned();
            let n = sagas as f64;
            (
                short,
                ((statements - s0) as f64 / n, (commits - c0) as f64 / n),
            )
        })
        .collect()
}

/// `order 21.0 (4.0 commits), ...` and the totals.
pub(crate) fn describe(per_saga: &PerSaga) -> String {
    let parts: Vec<String> = per_saga
        .iter()
        .map(|(db, (statements, commits))| format!("{db} {statements:.1} ({commits:.1} commits)"))
        .collect();
    let statements: f64 = per_saga.values().map(|v| v.0).sum();
    let commits: f64 = per_saga.values().map(|v| v.1).sum();
    format!(
        "{} (total {statements:.1} statements, {commits:.1} commits)",
        parts.join(", ")
    )
}
