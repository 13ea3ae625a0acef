//! What must hold once every saga of a shop has ended, read from the four
//! databases: every saga terminal, each order's status matching its saga, stock
//! and credit conserved (what was taken equals what the approved orders hold), each
//! approved order charged once and every other charge refunded or declined, and
//! no command applied twice.

use std::collections::{BTreeMap, BTreeSet};

use anyhow::Context;
use sqlx::{PgPool, Row};
use uuid::Uuid;

/// Stock and credit at one moment (before the orders, after them).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Balances {
    /// Stock by goods id.
    pub stock: BTreeMap<Uuid, i64>,
    /// Available credit in cents by customer id.
    pub credit: BTreeMap<Uuid, i64>,
}

impl Balances {
    pub async fn read(customer: &PgPool, inventory: &PgPool) -> anyhow::Result<Balances> {
        let stock = sqlx::query("SELECT id, stock::bigint AS stock FROM goods")
            .fetch_all(inventory)
            .await
            .context("reading stock")?
            .iter()
            .map(|r| Ok((r.try_get("id")?, r.try_get("stock")?)))
            .collect::<Result<_, sqlx::Error>>()?;
        let credit = sqlx::query("SELECT id, (available_credit * 100)::bigint AS c FROM customers")
            .fetch_all(customer)
            .await
            .context("reading credit")?
            .iter()
            .map(|r| Ok((r.try_get("id")?, r.try_get("c")?)))
            .collect::<Result<_, sqlx::Error>>()?;
        Ok(Balances { stock, credit })
    }
}

/// One order as the order database has it.
#[derive(Debug, Clone)]
pub struct OrderRow {
    pub id: Uuid,
    pub customer_id: Uuid,
    pub goods_id: Uuid,
    pub quantity: i64,
    pub amount_cents: i64,
    pub status: String,
    pub reason: Option<String>,
    pub saga_status: Option<String>,
}

/// The four databases' pools.
#[derive(Debug, Clone)]
pub struct Ledger {
    pub order: PgPool,
    pub customer: PgPool,
    pub inventory: PgPool,
    pub payment: PgPool,
}

/// The outcome of the checks.
#[derive(Debug, Default)]
pub struct Report {
    pub orders: usize,
    pub approved: usize,
    pub rejected: usize,
    /// Sagas by status.
    pub sagas: BTreeMap<String, usize>,
    /// Commands and replies the participants' journals hold (each applied once).
    pub journal_rows: i64,
    /// Every broken invariant, in words.
    pub violations: Vec<String>,
}

impl Report {
    pub fn ok(&self) -> bool {
        self.violations.is_empty()
    }
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "orders: {} ({} approved, {} rejected); sagas: {:?}; journal rows: {}",
            self.orders, self.approved, self.rejected, self.sagas, self.journal_rows
        )?;
        if self.violations.is_empty() {
            writeln!(f, "invariants: all hold")
        } else {
            for v in &self.violations {
                writeln!(f, "VIOLATED: {v}")?;
            }
            Ok(())
        }
    }
}

impl Ledger {
    pub async fn orders(&self) -> anyhow::Result<Vec<OrderRow>> {
        let rows = sqlx::query(
            "SELECT o.id, o.customer_id, o.goods_id, o.quantity::bigint AS quantity, \
             (o.amount * 100)::bigint AS amount_cents, o.status, o.reason, s.status AS saga_status \
             FROM orders o LEFT JOIN saga_state s ON s.id = o.saga_id ORDER BY o.id",
        )
        .fetch_all(&self.order)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(OrderRow {
                    id: r.try_get("id")?,
                    customer_id: r.try_get("customer_id")?,
                    goods_id: r.try_get("goods_id")?,
                    quantity: r.try_get("quantity")?,
                    amount_cents: r.try_get("amount_cents")?,
                    status: r.try_get("status")?,
                    reason: r.try_get("reason")?,
                    saga_status: r.try_get("saga_status")?,
                })
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(Into::into)
    }

    /// Checks every invariant against the balances `before` the orders.
    pub async fn check(&self, before: &Balances) -> anyhow::Result<Report> {
        let mut report = Report::default();
        let after = Balances::read(&self.customer, &self.inventory).await?;
        let orders = self.orders().await?;
        report.orders = orders.len();
        let mut taken_stock: BTreeMap<Uuid, i64> = BTreeMap::new();
        let mut taken_credit: BTreeMap<Uuid, i64> = BTreeMap::new();
        let mut approved = BTreeSet::new();
        for o in &orders {
            let saga = o.saga_status.clone().unwrap_or_else(|| "MISSING".into());
            *report.sagas.entry(saga.clone()).or_default() += 1;
            match (o.status.as_str(), saga.as_str()) {
                ("APPROVED", "COMPLETED") => {
                    report.approved += 1;
                    approved.insert(o.id);
                    *taken_stock.entry(o.goods_id).or_default() += o.quantity;
                    *taken_credit.entry(o.customer_id).or_default() += o.amount_cents;
                }
                ("REJECTED", "ABORTED") => report.rejected += 1,
                (status, saga) => report.violations.push(format!(
                    "order {} is {status} but its saga is {saga} (reason {:?})",
                    o.id, o.reason
                )),
            }
        }
        for (goods, before_stock) in &before.stock {
            let now = after.stock.get(goods).copied().unwrap_or(0);
            let taken = taken_stock.get(goods).copied().unwrap_or(0);
            if before_stock - now != taken {
                report.violations.push(format!(
                    "goods {goods}: stock went from {before_stock} to {now}, but approved orders hold {taken}"
                ));
            }
        }
        for (customer, before_credit) in &before.credit {
            let now = after.credit.get(customer).copied().unwrap_or(0);
            let taken = taken_credit.get(customer).copied().unwrap_or(0);
            if before_credit - now != taken {
                report.violations.push(format!(
                    "customer {customer}: available credit went from {before_credit} to {now} cents, but approved orders hold {taken}"
                ));
            }
        }
        let held = |pool: &PgPool, sql: &'static str| {
            let pool = pool.clone();
            async move {
                sqlx::query_scalar::<_, Uuid>(sql)
                    .fetch_all(&pool)
                    .await
                    .map(|v| v.into_iter().collect::<BTreeSet<Uuid>>())
            }
        };
        let goods_held = held(
            &self.inventory,
            "SELECT order_id FROM goods_reservations WHERE status = 'RESERVED'",
        )
        .await?;
        let credit_held = held(
            &self.customer,
            "SELECT order_id FROM credit_reservations WHERE status = 'RESERVED'",
        )
        .await?;
        let charged = held(
            &self.payment,
            "SELECT order_id FROM payments WHERE status = 'CHARGED'",
        )
        .await?;
        for (what, set) in [
            ("goods reservations", &goods_held),
            ("credit reservations", &credit_held),
            ("charges", &charged),
        ] {
            if *set != approved {
                let extra: Vec<_> = set.difference(&approved).collect();
                let missing: Vec<_> = approved.difference(set).collect();
                report.violations.push(format!(
                    "{what} held do not match the approved orders: held without approval {extra:?}, approved without one {missing:?}"
                ));
            }
        }
        // Each command is applied once: two successful replies for one saga step
        // and reply type would mean a command was applied twice. Replies marked
        // `saga-replay` answer a duplicate again with the stored answer (the effect
        // did not run again), and a refusal applied nothing (a later attempt after
        // one runs again, by design), so neither is counted.
        for (name, pool) in [
            ("customer", &self.customer),
            ("inventory", &self.inventory),
            ("payment", &self.payment),
        ] {
            let twice: Vec<(Option<String>, Option<String>, String, i64)> = sqlx::query_as(
                "SELECT headers->>'saga-id', headers->>'saga-step', type, count(*) FROM outbox \
                 WHERE headers->>'saga-replay' IS DISTINCT FROM 'true' \
                 AND headers->>'outcome' = 'success' \
                 GROUP BY 1, 2, 3 HAVING count(*) > 1",
            )
            .fetch_all(pool)
            .await?;
            for (saga, step, kind, n) in twice {
                report.violations.push(format!(
                    "{name}: {n} replies {kind} for saga {saga:?} step {step:?}: a command was applied more than once"
                ));
            }
            let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM processed_messages")
                .fetch_one(pool)
                .await?;
            report.journal_rows += rows;
        }
        Ok(report)
    }
}
