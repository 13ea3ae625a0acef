//! The shop's demo: starts the auth service, the four services and their four
//! relays as the real binaries on fresh databases, seeds them with the services'
//! own `seed` command, signs in as the demo customers and the operator, places one
//! order for each outcome the saga knows (each as its customer), prints what became of each
//! and of the stock and credit, and stops everything it started. Exits non-zero
//! when an outcome is not the expected one.

#![allow(clippy::print_stdout)]

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context};
use customer_service::{ADA, BOB};
use inventory_service::{GADGET, WIDGET};
use shop::{Balances, Ledger, Mode, OrderRequest, ServiceDatabases, Shop, ShopClient, ShopConfig};
use sqlx::postgres::PgPoolOptions;
use sqlx::PgPool;

const GOOD_CARD: &str = "4111 1111 1111 1111";
const DECLINED_CARD: &str = "4000 0000 0000 9999";

struct Case {
    title: &'static str,
    request: OrderRequest,
    cancel: bool,
    status: &'static str,
    reason: &'static str,
    payment: Option<&'static str>,
}

fn cases() -> Vec<Case> {
    let order = |customer, goods, quantity, amount, card: &str| OrderRequest {
        customer_id: customer,
        goods_id: goods,
        quantity,
        amount,
        card: shop::Card::number(card),
    };
    vec![
        Case {
            title: "Ada buys 2 widgets for 40.00",
            request: order(ADA, WIDGET, 2, 40.0, GOOD_CARD),
            cancel: false,
            status: "APPROVED",
            reason: "",
            payment: Some("CHARGED"),
        },
        Case {
            title: "Ada wants 5 gadgets; 1 is in stock",
            request: order(ADA, GADGET, 5, 100.0, GOOD_CARD),
            cancel: false,
            status: "REJECTED",
            reason: "insufficient stock",
            payment: None,
        },
        Case {
            title: "Bob spends 80.00 with 50.00 of credit",
            request: order(BOB, WIDGET, 1, 80.0, GOOD_CARD),
            cancel: false,
            status: "REJECTED",
            reason: "credit limit exceeded",
            payment: None,
        },
        Case {
            title: "Ada pays 30.00 with a card that is declined",
            request: order(ADA, WIDGET, 1, 30.0, DECLINED_CARD),
            cancel: false,
            status: "REJECTED",
            reason: "payment declined",
            payment: Some("DECLINED"),
        },
        Case {
            title: "Ada buys a widget for 25.00, then cancels",
            request: order(ADA, WIDGET, 1, 25.0, GOOD_CARD),
            cancel: true,
            status: "REJECTED",
            reason: order_service::placement::CANCELLED,
            payment: Some("REFUNDED"),
        },
    ]
}

#[tokio::main]
async fn main() -> ExitCode {
    shop::log_to_stderr();
    let outcome = tokio::select! {
        outcome = run() => outcome,
        signal = testkit::leftovers::interrupted() => {
            println!("\n==> {signal}: stopping what the demo started");
            return ExitCode::from(130);
        }
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            println!("\nDEMO FAILED: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn say(text: &str) {
    println!("==> {text}");
}

async fn run() -> anyhow::Result<()> {
    testkit::leftovers::sweep();
    let settings = testkit::Settings::load().context("the local environment")?;
    let bin_dir = testkit::process::own_bin_dir().context("the demo's own directory")?;
    let log_dir = PathBuf::from(".local/demo");
    std::fs::create_dir_all(&log_dir)?;
    say("creating the databases of the auth service and the four services");
    let auth = fresh_database(&settings.database_url, "demo_auth").await?;
    for command in ["migrate", "seed"] {
        let status = std::process::Command::new(bin_dir.join("auth-service"))
            .arg(command)
            .env("DATABASE_URL", &auth)
            .env("RUST_LOG", "warn")
            .status()
            .with_context(|| format!("running auth-service {command}"))?;
        if !status.success() {
            bail!("auth-service {command} failed: {status}");
        }
    }
    let databases = ServiceDatabases {
        order: fresh_database(&settings.database_url, "demo_order").await?,
        customer: fresh_database(&settings.database_url, "demo_customer").await?,
        inventory: fresh_database(&settings.database_url, "demo_inventory").await?,
        payment: fresh_database(&settings.database_url, "demo_payment").await?,
    };
    for service in ["customer", "inventory", "payment", "order"] {
        let url = match service {
            "customer" => &databases.customer,
            "inventory" => &databases.inventory,
            "payment" => &databases.payment,
            _ => &databases.order,
        };
        for command in ["migrate", "seed"] {
            let status = std::process::Command::new(bin_dir.join(format!("{service}-service")))
                .arg(command)
                .env("DATABASE_URL", url)
                .env("RUST_LOG", "warn")
                .status()
                .with_context(|| format!("running {service}-service {command}"))?;
            if !status.success() {
                bail!("{service}-service {command} failed: {status}");
            }
        }
    }
    say("seeded: customers Ada (credit 1000.00) and Bob (50.00); 100 widgets, 1 gadget;");
    say("        users ada@shop.example, bob@shop.example and operator@shop.example");

    // A fresh prefix: topics and consumer groups of earlier runs are not read.
    let prefix = format!(
        "demo{}.",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_secs()
    );
    let mut config = ShopConfig::new(databases.clone(), &settings.kafka_brokers, prefix);
    config.mode = Mode::Processes {
        bin_dir,
        log_dir: log_dir.clone(),
    };
    config.auth_database = Some(auth);
    let mut shop = Shop::start(config, &mut |step| say(step)).await?;
    say(&format!("logs in {}", log_dir.display()));
    say(&format!(
        "the saga console: {}/console (while the demo runs)",
        shop.order_url
    ));
    let outcome = place_orders(&shop, &databases, &log_dir).await;
    say("stopping the services and relays");
    shop.stop().await;
    outcome
}

async fn place_orders(
    shop: &Shop,
    databases: &ServiceDatabases,
    log_dir: &std::path::Path,
) -> anyhow::Result<()> {
    let client = ShopClient::new(shop);
    let ledger = Ledger {
        order: pool(&databases.order).await?,
        customer: pool(&databases.customer).await?,
        inventory: pool(&databases.inventory).await?,
        payment: pool(&databases.payment).await?,
    };
    let before = Balances::read(&ledger.customer, &ledger.inventory).await?;
    sign_in(&client).await?;
    print_balances("before", &client).await?;

    let cases = cases();
    let mut placed = Vec::new();
    for case in &cases {
        let id = client.place_accepted(&case.request).await?;
        if case.cancel {
            let (status, body) = client.cancel(id).await?;
            if status != reqwest::StatusCode::ACCEPTED {
                bail!("cancelling {id} answered {status}: {body}");
            }
        }
        say(&format!("placed {id}: {}", case.title));
        placed.push(id);
    }
    say("waiting for every saga to end");
    let mut failures = Vec::new();
    println!();
    for (case, id) in cases.iter().zip(&placed) {
        let order = client.wait_final(*id, Duration::from_secs(120)).await?;
        let status = order["status"].as_str().unwrap_or("?");
        let reason = order["reason"].as_str().unwrap_or("");
        let steps: Vec<String> = order["saga"]["steps"]
            .as_array()
            .map(|s| {
                s.iter()
                    .map(|s| {
                        format!(
                            "{} {}",
                            s["name"].as_str().unwrap_or("?"),
                            s["status"].as_str().unwrap_or("-")
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        let (code, payment) = client.payment(*id).await?;
        let payment_status = if code.is_success() {
            payment["status"].as_str().unwrap_or("?").to_owned()
        } else {
            "none".into()
        };
        println!(
            "{}\n    order {id}: {status}{}",
            case.title,
            if reason.is_empty() {
                String::new()
            } else {
                format!(" ({reason})")
            }
        );
        println!(
            "    saga {}: {}",
            order["saga"]["status"].as_str().unwrap_or("?"),
            steps.join(", ")
        );
        println!("    payment: {payment_status}");
        let expected_payment = case.payment.unwrap_or("none");
        if status != case.status
            || !reason.starts_with(case.reason)
            || payment_status != expected_payment
        {
            failures.push(format!(
                "{}: expected {} ({}) with payment {expected_payment}, got {status} ({reason}) with payment {payment_status}",
                case.title, case.status, case.reason
            ));
        }
    }
    println!();
    print_balances("after", &client).await?;
    let report = ledger.check(&before).await?;
    print!("{report}");
    let after = Balances::read(&ledger.customer, &ledger.inventory).await?;
    // Only the first order holds anything: 2 widgets and 40.00 of Ada's credit.
    let expect = |what: &str, got: Option<&i64>, want: Option<i64>| {
        (got.copied() != want).then(|| format!("{what}: expected {want:?}, got {got:?}"))
    };
    failures.extend(expect(
        "widget stock",
        after.stock.get(&WIDGET),
        before.stock.get(&WIDGET).map(|s| s - 2),
    ));
    failures.extend(expect(
        "gadget stock",
        after.stock.get(&GADGET),
        before.stock.get(&GADGET).copied(),
    ));
    failures.extend(expect(
        "Ada's credit (cents)",
        after.credit.get(&ADA),
        before.credit.get(&ADA).map(|c| c - 4_000),
    ));
    failures.extend(expect(
        "Bob's credit (cents)",
        after.credit.get(&BOB),
        before.credit.get(&BOB).copied(),
    ));
    failures.extend(report.violations.iter().cloned());

    // The cancelled order's saga undid payment, credit and goods: its timeline.
    if let Some((_, id)) = cases.iter().zip(&placed).find(|(case, _)| case.cancel) {
        let page = format!("{}/console/sagas/{id}", client.order_url);
        let shot =
            timeline_screenshot(&page, &log_dir.join("console-compensated-saga.png")).await?;
        say(&format!(
            "the timeline of the cancelled order's saga: {page}, screenshot in {}",
            shot.display()
        ));
    }
    if failures.is_empty() {
        say("every outcome as expected");
        Ok(())
    } else {
        bail!("unexpected outcomes:\n  {}", failures.join("\n  "))
    }
}

/// Shows that the order API wants a token, then signs in as Ada, Bob and the
/// operator (the client places each order as its customer, and reads and
/// cancels as the operator).
async fn sign_in(client: &ShopClient) -> anyhow::Result<()> {
    let anonymous = reqwest::Client::new()
        .get(format!("{}/orders", client.order_url))
        .send()
        .await?
        .status();
    if anonymous != reqwest::StatusCode::UNAUTHORIZED {
        bail!("GET /orders without a token answered {anonymous}, not 401");
    }
    say("GET /orders without a token: 401 Unauthorized");
    client.customer_token(ADA).await?;
    client.customer_token(BOB).await?;
    client.operator_token().await?;
    say("signed in (POST /token at the auth service) as Ada, Bob and the operator");
    Ok(())
}

/// Opens a saga's console page in headless Chromium and saves its timeline at `to`.
async fn timeline_screenshot(page: &str, to: &std::path::Path) -> anyhow::Result<PathBuf> {
    let browser = testkit::browser::Browser::start().await;
    // The console is for operators: sign in through its form first.
    let (base, _) = page.split_once("/console").context("a console page")?;
    browser.goto(&format!("{base}/console/sign-in")).await;
    browser
        .wait_for("form.sign-in", Duration::from_secs(30))
        .await;
    browser
        .run_script(&format!(
            "document.querySelector('input[name=email]').value = '{}'; \
             document.querySelector('input[name=password]').value = '{}'; \
             document.querySelector('form.sign-in').submit(); return null;",
            shop::client::OPERATOR.0,
            shop::client::OPERATOR.1
        ))
        .await;
    browser
        .wait_for("form.filters", Duration::from_secs(30))
        .await;
    browser.goto(page).await;
    browser
        .wait_for("svg.timeline", Duration::from_secs(30))
        .await;
    browser
        .run_script(
            "document.querySelector('svg.timeline').previousElementSibling\
             .previousElementSibling.scrollIntoView(); return null;",
        )
        .await;
    let shot = browser.screenshot("demo-console-timeline").await;
    std::fs::copy(&shot, to).with_context(|| format!("copying {}", shot.display()))?;
    Ok(to.to_owned())
}

async fn print_balances(when: &str, client: &ShopClient) -> anyhow::Result<()> {
    let mut line = Vec::new();
    for (name, id) in [("widgets", WIDGET), ("gadgets", GADGET)] {
        line.push(format!("{name} {}", client.goods(id).await?["stock"]));
    }
    for (name, id) in [("Ada", ADA), ("Bob", BOB)] {
        let credit = client.customer(id).await?["availableCredit"]
            .as_f64()
            .unwrap_or(f64::NAN);
        line.push(format!("{name} {credit:.2}"));
    }
    say(&format!(
        "stock and credit {when}: {} (credit available)",
        line.join(", ")
    ));
    Ok(())
}

async fn pool(url: &str) -> anyhow::Result<PgPool> {
    Ok(PgPoolOptions::new().max_connections(2).connect(url).await?)
}

/// Drops `name` (and its replication slots) if it exists and creates it anew;
/// returns its URL.
async fn fresh_database(admin_url: &str, name: &str) -> anyhow::Result<String> {
    let admin = pool(admin_url).await?;
    sqlx::query(
        "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots WHERE database = $1 AND active_pid IS NOT NULL",
    )
    .bind(name)
    .execute(&admin)
    .await?;
    for _ in 0..50 {
        let dropped = sqlx::query(
            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE database = $1 AND NOT active",
        )
        .bind(name)
        .execute(&admin)
        .await;
        let left: i64 =
            sqlx::query_scalar("SELECT count(*) FROM pg_replication_slots WHERE database = $1")
                .bind(name)
                .fetch_one(&admin)
                .await?;
        if dropped.is_ok() && left == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        .execute(&admin)
        .await?;
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(&admin)
        .await?;
    admin.close().await;
    let mut url = url::Url::parse(admin_url)?;
    url.set_path(&format!("/{name}"));
    Ok(url.to_string())
}
