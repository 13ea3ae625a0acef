//! The saga console in a real browser (Debian's headless Chromium, driven through
//! its WebDriver): the list with its counts and filters, one saga's timeline, and
//! an abort clicked in the page that compensates the saga. Screenshots go to the
//! test artifacts (`testkit::browser::artifacts_dir`).

mod support;

use std::time::{Duration, Instant};

use customer_service::ADA;
use inventory_service::WIDGET;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use saga_core::saga::audit;
use shop::OrderRequest;
use testkit::browser::Browser;
use uuid::Uuid;

const GOOD_CARD: &str = "4111 1111 1111 1111";
const DECLINED_CARD: &str = "4000 0000 0000 9999";
const WAIT: Duration = Duration::from_secs(30);

fn order(card: &str) -> OrderRequest {
    OrderRequest {
        customer_id: ADA,
        goods_id: WIDGET,
        quantity: 1,
        amount: 12.5,
        card: shop::Card::number(card),
    }
}

async fn events_of(shop: &support::TestShop, id: Uuid) -> Vec<audit::SagaEvent> {
    let mut conn = shop.ledger.order.acquire().await.unwrap();
    audit::events(&mut conn, id).await.unwrap()
}

/// Waits until saga `id`'s current step is `step`.
async fn wait_for_step(client: &shop::ShopClient, id: Uuid, step: &str) {
    let started = Instant::now();
    loop {
        let order = client.order(id).await.expect("order readable");
        if order["saga"]["currentStep"] == step {
            return;
        }
        assert!(
            started.elapsed() < WAIT,
            "saga {id} never reached {step}: {order}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_console_lists_filters_draws_a_timeline_and_an_abort_clicked_compensates() {
    let mut shop = support::start(|c| c.step_timeout = Duration::from_secs(300), "", "").await;
    let client = shop.client.clone();
    // Sagas that ended: two approved, one rejected by the payment.
    let mut ended = Vec::new();
    for card in [GOOD_CARD, GOOD_CARD, DECLINED_CARD] {
        let id = client.place_accepted(&order(card)).await.expect("accepted");
        client.wait_final(id, WAIT).await.expect("final");
        ended.push(id);
    }
    // The payment service is down: the next saga waits at its payment step.
    shop.shop
        .stop_service("payment")
        .await
        .expect("payment stopped");
    let waiting = client
        .place_accepted(&order(GOOD_CARD))
        .await
        .expect("accepted");
    wait_for_step(&client, waiting, "payment").await;

    let console = format!("{}/console", client.order_url);
    let browser = Browser::start().await;

    // The list: every saga, the counts per status, the throughput chart.
    browser.goto(&console).await;
    assert!(browser.title().await.contains("Sagas"));
    assert_eq!(browser.count("tr.saga").await, 4);
    assert_eq!(browser.text(".card[data-status=''] .n").await, "4");
    assert_eq!(browser.text(".card[data-status='COMPLETED'] .n").await, "2");
    assert_eq!(browser.text(".card[data-status='ABORTED'] .n").await, "1");
    assert_eq!(browser.text(".card[data-status='STARTED'] .n").await, "1");
    assert!(browser.text("#ended").await.contains("3 in all"));
    browser.screenshot("console-list").await;

    // Filters: only the running saga, then only the ended ones.
    browser.select("select[name=status]", "STARTED").await;
    browser.click("form.filters button[type=submit]").await;
    browser
        .wait_for_text("#sagas", &waiting.to_string(), WAIT)
        .await;
    assert_eq!(browser.count("tr.saga").await, 1);
    browser.select("select[name=status]", "COMPLETED").await;
    browser.click("form.filters button[type=submit]").await;
    browser
        .wait_for("tr.saga[data-status='COMPLETED']", WAIT)
        .await;
    assert_eq!(browser.count("tr.saga").await, 2);
    assert_eq!(browser.count("tr.saga[data-status='STARTED']").await, 0);
    // None is stuck: the waiting saga's step allows 3 × 300 s.
    browser.goto(&format!("{console}?stuck=on")).await;
    browser.wait_for("#no-sagas", WAIT).await;
    // Started at least an hour ago: none.
    browser.goto(&format!("{console}?older_than=60")).await;
    browser.wait_for("#no-sagas", WAIT).await;

    // The relays: all four answer, healthy, active, nothing dead-lettered.
    browser.click("header a[href='/console/relays']").await;
    browser.wait_for("#relays", WAIT).await;
    assert_eq!(browser.count("tr.relay").await, 4);
    assert_eq!(browser.count("tr.relay[data-healthy='true']").await, 4);
    assert_eq!(
        browser.texts("#relays tbody td:first-child").await,
        [
            "relay-customer",
            "relay-inventory",
            "relay-payment",
            "relay-order"
        ]
    );
    browser.screenshot("console-relays").await;

    // A poison reply of the waiting saga (no id header): the order service's
    // consumer dead-letters it, and the page lists it with its reason and source.
    let reply_topic = service_kit::Topics::new(shop.shop.config.prefix.clone()).order_reply();
    let producer: FutureProducer = testkit::producer_config().create().unwrap();
    producer
        .send(
            FutureRecord::<str, str>::to(&reply_topic)
                .key("poison-1")
                .payload("not json")
                .headers(
                    OwnedHeaders::new()
                        .insert(Header {
                            key: "type",
                            value: Some("Nonsense"),
                        })
                        .insert(Header {
                            key: "saga-id",
                            value: Some(&waiting.to_string()),
                        }),
                ),
            Duration::from_secs(10),
        )
        .await
        .map_err(|(e, _)| e)
        .unwrap();
    let letters_page = format!("{console}/dead-letters");
    let letters = |n: usize| {
        let (browser, page) = (&browser, letters_page.clone());
        async move {
            let started = Instant::now();
            loop {
                browser.goto(&page).await;
                if browser.count("tr.letter").await == n {
                    return;
                }
                assert!(
                    started.elapsed() < WAIT,
                    "never {n} dead letters on the page"
                );
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        }
    };
    letters(1).await;
    let row = browser.text("tr.letter").await;
    assert!(
        row.contains("poison-1") && row.contains(&reply_topic),
        "{row}"
    );
    browser.screenshot("console-dead-letters").await;
    // Replayed to its source, it is dead-lettered again (it is still poison).
    browser
        .fill("form.replay input[name=operator]", "alice")
        .await;
    browser.click("form.replay button").await;
    let asked = browser.dialog_text().await.expect("a confirmation");
    assert!(asked.contains(&reply_topic), "{asked}");
    browser.accept_dialog().await;
    browser.wait_for("#done", WAIT).await;
    let done = browser.text("#done").await;
    assert!(done.contains(&format!("to {reply_topic}")), "{done}");
    assert!(
        done.contains(&format!("Recorded in the trail of saga {waiting}")),
        "{done}"
    );
    letters(2).await;

    // One saga: its timeline has a lane per step it reached and a mark per event.
    browser.goto(&console).await;
    browser
        .click(&format!("a[href='/console/sagas/{waiting}']"))
        .await;
    browser.wait_for("svg.timeline", WAIT).await;
    let events = events_of(&shop, waiting).await;
    assert_eq!(browser.count("svg.timeline a.mark").await, events.len());
    assert_eq!(browser.count("tr.event").await, events.len());
    let lanes = browser.texts("svg.timeline .lane-name").await;
    assert_eq!(
        lanes,
        [
            "saga",
            "create",
            "reserve-goods",
            "reserve-credit",
            "payment"
        ]
    );
    assert_eq!(browser.text("#status").await, "STARTED");

    // Send the payment command again from the page: a second attempt goes out.
    browser.fill("#resend input[name=operator]", "bob").await;
    browser.click("#resend button").await;
    let asked = browser.dialog_text().await.expect("a confirmation");
    assert!(asked.contains("new attempt"), "{asked}");
    browser.accept_dialog().await;
    browser.wait_for("#done", WAIT).await;
    assert!(browser.text("#done").await.contains("sent again"));
    let payments: Vec<serde_json::Value> = events_of(&shop, waiting)
        .await
        .into_iter()
        .filter(|e| e.kind == "command_sent" && e.step.as_deref() == Some("payment"))
        .map(|e| e.detail["attempt"].clone())
        .collect();
    assert_eq!(payments, [1, 2]);

    // Abort it from the page: a confirmation, then the saga compensates.
    browser.fill("#abort input[name=operator]", "alice").await;
    browser
        .fill("#abort input[name=reason]", "customer called")
        .await;
    browser.click("#abort button").await;
    let asked = browser.dialog_text().await.expect("a confirmation");
    assert!(asked.contains(&waiting.to_string()), "{asked}");
    browser.accept_dialog().await;
    browser.wait_for("#done", WAIT).await;
    // The payment step waited for a reply, so the payment may have been taken: it
    // is compensated first, and the saga waits for the payment service to answer.
    assert_eq!(browser.text("#status").await, "ABORTING");
    shop.shop
        .start_service_again("payment")
        .await
        .expect("payment back");
    let saga_page = format!("{console}/sagas/{waiting}");
    wait_for_status(&browser, &saga_page, "ABORTED", WAIT).await;
    // Payment, credit and goods were compensated, in that order.
    let compensated: Vec<String> = events_of(&shop, waiting)
        .await
        .into_iter()
        .filter(|e| e.kind == "compensation_done")
        .filter_map(|e| e.step)
        .collect();
    assert_eq!(
        compensated,
        ["payment", "reserve-credit", "reserve-goods", "create"]
    );
    assert!(
        browser
            .count("svg.timeline a.mark[data-kind='compensation_started']")
            .await
            >= 4
    );
    assert_eq!(
        browser
            .count("svg.timeline a.mark[data-kind='operator_action']")
            .await,
        3,
        "the dead letter replayed, the step sent again and the abort"
    );
    browser
        .run_script("document.querySelector('svg.timeline').previousElementSibling.previousElementSibling.scrollIntoView(); return null;")
        .await;
    browser.screenshot("console-saga-compensated").await;

    // The trail says who did it and why; the order is rejected, nothing is held.
    let events = events_of(&shop, waiting).await;
    let actions: Vec<_> = events
        .iter()
        .filter(|e| e.kind == "operator_action")
        .map(|e| (e.detail["action"].clone(), e.detail["actor"].clone()))
        .collect();
    assert_eq!(
        actions,
        [
            (
                serde_json::json!("dead_letter_replayed"),
                serde_json::json!("alice")
            ),
            (serde_json::json!("retry_step"), serde_json::json!("bob")),
            (serde_json::json!("abort"), serde_json::json!("alice")),
        ]
    );
    let replay = &events
        .iter()
        .find(|e| e.detail["action"] == "dead_letter_replayed")
        .expect("the replay is in the trail")
        .detail;
    assert_eq!(replay["to"]["topic"], reply_topic.as_str(), "{replay}");
    assert!(
        replay["from"]["topic"]
            .as_str()
            .is_some_and(|t| t.ends_with(".dlq")),
        "{replay}"
    );
    let action = events
        .iter()
        .rfind(|e| e.kind == "operator_action")
        .expect("the abort is in the trail");
    assert_eq!(action.detail["reason"], "customer called");
    let final_order = client.wait_final(waiting, WAIT).await.expect("final");
    assert_eq!(final_order["status"], "REJECTED", "{final_order}");
    let trail = audit::verify(&shop.ledger.order, None).await.unwrap();
    assert!(trail.ok() && trail.sagas == 4, "{trail}");
    shop.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_action_without_a_name_or_on_a_finished_saga_is_refused() {
    let shop = support::start(|_| {}, "", "").await;
    let client = shop.client.clone();
    let id = client
        .place_accepted(&order(GOOD_CARD))
        .await
        .expect("accepted");
    client.wait_final(id, WAIT).await.expect("final");
    let http = reqwest::Client::new();
    let abort = format!("{}/console/sagas/{id}/abort", client.order_url);
    let nameless = http
        .post(&abort)
        .form(&[("operator", " "), ("reason", "x")])
        .send()
        .await
        .unwrap();
    assert_eq!(nameless.status(), 422);
    assert!(nameless.text().await.unwrap().contains("Say who you are"));
    let finished = http
        .post(&abort)
        .form(&[("operator", "bob"), ("reason", "x")])
        .send()
        .await
        .unwrap();
    assert_eq!(finished.status(), 409);
    assert!(finished.text().await.unwrap().contains("is COMPLETED"));
    let unknown = http
        .get(format!(
            "{}/console/sagas/{}",
            client.order_url,
            Uuid::now_v7()
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(unknown.status(), 404);
    // Nothing was recorded for the refused actions.
    let events = events_of(&shop, id).await;
    assert!(events.iter().all(|e| e.kind != "operator_action"));
    shop.stop().await;
}

/// Polls saga `id`'s page until its status is `status`.
async fn wait_for_status(browser: &Browser, page: &str, status: &str, within: Duration) {
    let started = Instant::now();
    loop {
        browser.goto(page).await;
        if browser.text("#status").await == status {
            return;
        }
        assert!(
            started.elapsed() < within,
            "the saga never became {status} on {page}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// With timed-out steps suspended, a saga whose payment service is down waits on
/// its payment step for an operator. The service comes back; the restart clicked
/// in the page sends the payment again as a new attempt, which the payment
/// service's barrier answers with the charge it made for the first (delivered
/// late): the order is approved and charged once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_suspended_saga_restarted_from_the_page_completes_charged_once() {
    let mut shop = support::start(
        |c| {
            // Long enough for the first order while the consumers join their
            // groups; the payment step waits this long before it is suspended.
            c.step_timeout = Duration::from_secs(20);
            c.suspend_timeouts_for = Some(Duration::from_secs(3600));
        },
        "",
        "",
    )
    .await;
    let client = shop.client.clone();
    // Every consumer has its partitions: an order goes through.
    let first = client
        .place_accepted(&order(GOOD_CARD))
        .await
        .expect("accepted");
    let done = client.wait_final(first, WAIT).await.expect("final");
    assert_eq!(done["status"], "APPROVED", "{done}");

    shop.shop
        .stop_service("payment")
        .await
        .expect("payment stopped");
    let id = client
        .place_accepted(&order(GOOD_CARD))
        .await
        .expect("accepted");
    let console = format!("{}/console", client.order_url);
    let page = format!("{console}/sagas/{id}");
    let browser = Browser::start().await;
    wait_for_status(&browser, &page, "SUSPENDED", Duration::from_secs(60)).await;
    assert_eq!(
        browser
            .count("svg.timeline a.mark[data-kind='saga_suspended']")
            .await,
        1
    );
    let summary = browser.text("table.summary").await;
    assert!(summary.contains("compensates at"), "{summary}");
    // Nothing was compensated: the order waits.
    let pending = client.order(id).await.expect("order readable");
    assert_eq!(pending["status"], "PENDING", "{pending}");
    // The list shows it under its status.
    browser.goto(&format!("{console}?status=SUSPENDED")).await;
    assert_eq!(browser.count("tr.saga").await, 1);
    assert_eq!(browser.text(".card[data-status='SUSPENDED'] .n").await, "1");

    shop.shop
        .start_service_again("payment")
        .await
        .expect("payment back");
    browser.goto(&page).await;
    browser.screenshot("console-saga-suspended").await;
    browser.fill("#restart input[name=operator]", "carol").await;
    browser.click("#restart button").await;
    let asked = browser.dialog_text().await.expect("a confirmation");
    assert!(asked.contains("new attempt"), "{asked}");
    browser.accept_dialog().await;
    browser.wait_for("#done", WAIT).await;
    assert!(browser.text("#done").await.contains("restarted"));
    wait_for_status(&browser, &page, "COMPLETED", Duration::from_secs(60)).await;
    browser.screenshot("console-saga-restarted").await;

    let final_order = client.wait_final(id, WAIT).await.expect("final");
    assert_eq!(final_order["status"], "APPROVED", "{final_order}");
    // One payment, charged; the payment service's barrier ran the charge once.
    let payments: Vec<String> =
        sqlx::query_scalar("SELECT status FROM payments WHERE order_id = $1")
            .bind(id)
            .fetch_all(&shop.ledger.payment)
            .await
            .unwrap();
    assert_eq!(payments, ["CHARGED"]);
    let barrier: Vec<(String, i32, Option<String>)> = sqlx::query_as(
        "SELECT op, attempt, reply_outcome FROM saga_barrier WHERE saga_id = $1 AND branch = 'payment'",
    )
    .bind(id.to_string())
    .fetch_all(&shop.ledger.payment)
    .await
    .unwrap();
    assert_eq!(
        barrier,
        [("action".to_owned(), 1, Some("success".to_owned()))]
    );
    let events = events_of(&shop, id).await;
    let attempts: Vec<serde_json::Value> = events
        .iter()
        .filter(|e| e.kind == "command_sent" && e.step.as_deref() == Some("payment"))
        .map(|e| e.detail["attempt"].clone())
        .collect();
    assert_eq!(attempts, [1, 2]);
    // The payment that counted is the barrier's answer from the first charge.
    let applied: Vec<&audit::SagaEvent> = events
        .iter()
        .filter(|e| e.kind == "reply_received" && e.step.as_deref() == Some("payment"))
        .filter(|e| e.detail["applied"] == true)
        .collect();
    assert_eq!(applied.len(), 1, "{applied:?}");
    assert_eq!(applied[0].detail["replay"], true, "{applied:?}");
    let action = events
        .iter()
        .find(|e| e.kind == "operator_action")
        .expect("the restart is in the trail");
    assert_eq!(action.detail["action"], "restart_step");
    assert_eq!(action.detail["actor"], "carol");
    let trail = audit::verify(&shop.ledger.order, None).await.unwrap();
    assert!(trail.ok() && trail.sagas == 2, "{trail}");
    shop.stop().await;
}
