//! Sagas against slow and absent participants: replies racing their step's
//! timeout, a participant down for longer than a moment, a compensation whose
//! target is down.

use std::time::Duration;

use saga_core::status::StepStatus;

use super::{mix, placed, timed_out_steps, wait_terminal, with_shop, BOUND, PATIENCE};
use crate::lab::{
    consumer_counts, metrics_text, order_mix, place_in_background, place_until_stopped, wait_until,
    Lab, LabSettings, Measurement, OrderKind,
};
use crate::ShopClient;
use testkit::process::metric_sum;

pub(super) async fn reply_races_timeout(settings: LabSettings) -> anyhow::Result<Measurement> {
    let mut lab = Lab::new(&settings, "reply-races-timeout", false).await?;
    let mut config = lab.shop_config().with_env(
        "inventory-service",
        failpoints::ENV,
        "consumer.before-handler=sleep(500-1500)*80",
    );
    config.step_timeout = Duration::from_secs(1);
    config.order_instances = 2;
    with_shop(&mut lab, config, BOUND, |lab, shop| {
        Box::pin(async move {
            let orders = mix(lab, 60);
            let load = place_in_background(&ShopClient::new(shop), orders, 5.0, PATIENCE);
            tokio::time::sleep(Duration::from_secs(3)).await;
            shop.stop_process("order-service-2").await?;
            lab.note("order-service-2 left the group (SIGTERM) mid-load; its partitions moved to order-service");
            tokio::time::sleep(Duration::from_secs(2)).await;
            shop.restart("order-service-2", &[]).await?;
            lab.note("order-service-2 came back and took partitions again");
            let ids = placed(load).await?;
            wait_terminal(lab, ids.len()).await?;
            let mut conflicts = 0;
            let mut retried = 0;
            for name in ["order-service", "order-service-2"] {
                conflicts += metric_sum(
                    &metrics_text(shop, name).await?,
                    "saga_version_conflicts_total",
                );
                retried += consumer_counts(shop, name).await?.retried;
            }
            let timed_out = timed_out_steps(lab).await?;
            lab.note(format!(
                "{timed_out} steps timed out while their replies were on the way; {conflicts} saga saves lost to a concurrent change (replies against sweepers, instance against instance) and were retried; {retried} reply transactions retried in all (counted since each instance's last start)"
            ));
            lab.expect("some steps timed out (the race was provoked)", timed_out > 0);
            Ok(())
        })
    })
    .await
}

pub(super) async fn participant_down(settings: LabSettings) -> anyhow::Result<Measurement> {
    let mut lab = Lab::new(&settings, "participant-down", false).await?;
    let mut config = lab.shop_config();
    config.step_timeout = Duration::from_secs(120);
    let down = Duration::from_secs(15);
    with_shop(&mut lab, config, BOUND + down, |lab, shop| {
        Box::pin(async move {
            let orders = mix(lab, 150);
            let load = place_in_background(&ShopClient::new(shop), orders, 10.0, PATIENCE);
            tokio::time::sleep(Duration::from_secs(3)).await;
            shop.kill("payment-service").await?;
            tokio::time::sleep(down).await;
            let waiting: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM saga_state WHERE status = 'STARTED' AND current_step = 'payment'",
            )
            .fetch_one(&lab.ledger.order)
            .await?;
            lab.note(format!(
                "payment-service killed for {down:?}; {waiting} sagas were waiting at the payment step when it came back"
            ));
            lab.expect("sagas were waiting for the payment service", waiting > 0);
            shop.restart("payment-service", &[]).await?;
            let ids = placed(load).await?;
            wait_terminal(lab, ids.len()).await?;
            let timed_out = timed_out_steps(lab).await?;
            lab.expect("no step timed out", timed_out == 0);
            Ok(())
        })
    })
    .await
}

pub(super) async fn compensation_retry(settings: LabSettings) -> anyhow::Result<Measurement> {
    let mut lab = Lab::new(&settings, "compensation-retry", false).await?;
    let mut config = lab.shop_config().with_env(
        "payment-service",
        failpoints::ENV,
        "consumer.before-handler=sleep(3000)*40",
    );
    config.step_timeout = Duration::from_secs(6);
    // The customer service is down for longer than a static member's 45 s session.
    // The local broker (tansu 0.6) can then leave its group without a leader for
    // good when the process comes back under its name (the member it takes over
    // has expired by the time its first heartbeat arrives), so here it runs
    // without an instance name. Apache Kafka lets it join as a new member.
    config = config.with_env("customer-service", "INSTANCE_NAME", "");
    with_shop(&mut lab, config, BOUND, |lab, shop| {
        Box::pin(async move {
            let mut orders = mix(lab, 20);
            for (kind, request) in &mut orders {
                *kind = OrderKind::Declined;
                request.customer_id = customer_service::ADA;
                request.goods_id = inventory_service::WIDGET;
                request.card = crate::Card::number(crate::lab::DECLINED_CARD);
            }
            let count = orders.len();
            let declined = placed(place_in_background(
                &ShopClient::new(shop),
                orders,
                50.0,
                PATIENCE,
            ))
            .await?;
            // Every saga has its credit reserved; the (slowed) payment has not
            // declined yet, so the credit compensations find the customer service down.
            let order = lab.ledger.order.clone();
            let reached = wait_until(Duration::from_secs(30), || {
                let order = order.clone();
                async move {
                    let n: i64 = sqlx::query_scalar(
                        "SELECT count(*) FROM saga_state \
                         WHERE step_status->'reserve-credit'->>'status' IS NOT NULL \
                         AND step_status->'reserve-credit'->>'status' <> $1",
                    )
                    .bind(StepStatus::Started.as_str())
                    .fetch_one(&order)
                    .await?;
                    Ok(n == i64::try_from(count).unwrap_or(0))
                }
            })
            .await?;
            lab.expect("every saga had its credit reserved before the customer service went down", reached);
            shop.kill("customer-service").await?;
            // Orders keep coming during the outage: their credit steps time out and
            // are compensated against the absent customer service too.
            let seed = super::seed();
            lab.note(format!(
                "orders placed at {OUTAGE_LOAD}/s while the customer service is down, mix seed {seed}"
            ));
            let load = place_until_stopped(
                &ShopClient::new(shop),
                order_mix(2_000, seed),
                OUTAGE_LOAD,
                PATIENCE,
            );
            tokio::time::sleep(OUTAGE).await;
            let during = load.stop().await?;
            let (retried, failed): (i64, i64) = sqlx::query_as(
                "SELECT count(*) FILTER (WHERE (st.value->>'attempts')::int >= 2 \
                                           AND st.value->>'status' = $1), \
                        count(DISTINCT s.id) FILTER (WHERE s.status = 'COMPENSATION_FAILED') \
                 FROM saga_state s, jsonb_each(s.step_status) st WHERE st.key = 'reserve-credit'",
            )
            .bind(StepStatus::Compensating.as_str())
            .fetch_one(&lab.ledger.order)
            .await?;
            lab.note(format!(
                "customer-service down for {OUTAGE:?}, {} orders placed meanwhile; {retried} credit compensations were being tried again at its end",
                during.len()
            ));
            lab.expect("compensations were retried while their target was down", retried > 0);
            lab.expect(
                "no saga gave up its compensation during the outage",
                failed == 0,
            );
            shop.restart("customer-service", &[]).await?;
            wait_terminal(lab, declined.len() + during.len()).await?;
            let counts = crate::lab::saga_counts(&lab.ledger.order).await?;
            lab.note(format!("sagas by status after the outage: {counts:?}"));
            lab.expect(
                "every saga ended COMPLETED or ABORTED, none COMPENSATION_FAILED",
                counts
                    .keys()
                    .all(|status| status == "COMPLETED" || status == "ABORTED"),
            );
            let (aborted, compensated): (i64, i64) = sqlx::query_as(&format!(
                "SELECT count(DISTINCT s.id) FILTER (WHERE s.status = 'ABORTED'), \
                        count(*) FILTER (WHERE st.key IN ('reserve-goods', 'reserve-credit') \
                                           AND st.value->>'status' = '{}') \
                 FROM saga_state s, jsonb_each(s.step_status) st WHERE s.id = ANY($1)",
                StepStatus::Compensated.as_str()
            ))
            .bind(&declined)
            .fetch_one(&lab.ledger.order)
            .await?;
            lab.note(format!(
                "the {count} declined payments: {aborted} sagas ABORTED, {compensated} goods and credit reservations compensated"
            ));
            lab.expect(
                "every declined payment ended ABORTED with goods and credit compensated",
                aborted == i64::try_from(count).unwrap_or(-1)
                    && compensated == 2 * i64::try_from(count).unwrap_or(-1),
            );
            // A release tried again only because its answer did not come (the
            // service was down) is a duplicate once one try ran: executed once per
            // saga, the other tries answered from the store.
            let (executed, replayed, sagas): (i64, i64, i64) = sqlx::query_as(
                "SELECT count(*) FILTER (WHERE headers->>'saga-replay' IS DISTINCT FROM 'true'), \
                 count(*) FILTER (WHERE headers->>'saga-replay' = 'true'), \
                 count(DISTINCT headers->>'saga-id') FROM outbox WHERE type = $1",
            )
            .bind(customer_service::commands::CREDIT_RELEASED)
            .fetch_one(&lab.ledger.customer)
            .await?;
            lab.note(format!(
                "the customer service answered {} credit releases for {sagas} sagas: {executed} executed, {replayed} answered again from the store",
                executed + replayed
            ));
            lab.expect(
                "each saga's credit was released once, the retries answered from the store",
                executed == sagas && replayed > 0,
            );
            Ok(())
        })
    })
    .await
}

/// How long the customer service is down in `compensation-retry`: longer than
/// the five tries a compensation used to get.
const OUTAGE: Duration = Duration::from_secs(120);
/// Orders per second placed during that outage.
const OUTAGE_LOAD: f64 = 2.0;
