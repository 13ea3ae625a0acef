//! Support for the end-to-end tests: a shop on fresh databases and fresh topics for
//! one test (here), and what the checks of the deployment files share: the workspace
//! (`workspace`), the Dockerfile (`dockerfile`) and what a container runs
//! (`container`).

#![allow(dead_code, unreachable_pub)]

pub mod container;
pub mod dockerfile;
pub mod workspace;

use std::time::Duration;

use shop::{Balances, Ledger, ServiceDatabases, Shop, ShopClient, ShopConfig};
use testkit::TestDatabase;

pub struct TestShop {
    pub shop: Shop,
    pub client: ShopClient,
    pub ledger: Ledger,
    // Dropped (and their databases with them) after the shop stopped.
    _databases: Vec<TestDatabase>,
}

/// Starts a shop in this process on four new databases, seeds the demo data and
/// `extra_sql` (run on the customer and inventory databases), and waits until it
/// serves.
pub async fn start(
    configure: impl FnOnce(&mut ShopConfig),
    extra_customers: &str,
    extra_goods: &str,
) -> TestShop {
    let (order, customer, inventory, payment) = (
        TestDatabase::create().await,
        TestDatabase::create().await,
        TestDatabase::create().await,
        TestDatabase::create().await,
    );
    let databases = ServiceDatabases {
        order: order.url(),
        customer: customer.url(),
        inventory: inventory.url(),
        payment: payment.url(),
    };
    let settings = testkit::settings();
    let prefix = format!("{}.", testkit::unique_name("shop"));
    let mut config = ShopConfig::new(databases, &settings.kafka_brokers, prefix);
    config.step_timeout = Duration::from_secs(60);
    configure(&mut config);
    let shop = Shop::start(config, &mut |step| eprintln!("shop: {step}"))
        .await
        .expect("the shop starts");
    customer_service::seed(customer.pool())
        .await
        .expect("customers seeded");
    inventory_service::seed(inventory.pool())
        .await
        .expect("goods seeded");
    if !extra_customers.is_empty() {
        sqlx::raw_sql(extra_customers)
            .execute(customer.pool())
            .await
            .expect("extra customers");
    }
    if !extra_goods.is_empty() {
        sqlx::raw_sql(extra_goods)
            .execute(inventory.pool())
            .await
            .expect("extra goods");
    }
    let ledger = Ledger {
        order: order.pool().clone(),
        customer: customer.pool().clone(),
        inventory: inventory.pool().clone(),
        payment: payment.pool().clone(),
    };
    let client = ShopClient::new(&shop);
    TestShop {
        shop,
        client,
        ledger,
        _databases: vec![order, customer, inventory, payment],
    }
}

impl TestShop {
    pub async fn balances(&self) -> Balances {
        Balances::read(&self.ledger.customer, &self.ledger.inventory)
            .await
            .expect("balances")
    }

    pub async fn stop(mut self) {
        self.shop.stop().await;
    }
}
