//! An instance name is held by one process at a time: its claim is an advisory lock
//! on the service's database that ends with the claiming session.

use std::time::{Duration, Instant};

use service_kit::instance::InstanceClaim;
use testkit::TestDatabase;

#[tokio::test]
async fn a_name_is_claimed_once_per_group_until_its_session_ends() {
    let db = TestDatabase::create().await;
    let pool = db.pool();
    let mut first = InstanceClaim::new("order-service", "order-0");
    assert!(first.hold(pool).await.unwrap());
    // Held: holding again keeps it.
    assert!(first.hold(pool).await.unwrap());

    // A second process with the same name is refused; other names and groups are not.
    let mut second = InstanceClaim::new("order-service", "order-0");
    assert!(!second.hold(pool).await.unwrap());
    assert!(InstanceClaim::new("order-service", "order-1")
        .hold(pool)
        .await
        .unwrap());
    assert!(InstanceClaim::new("customer-service", "order-0")
        .hold(pool)
        .await
        .unwrap());

    // The first process ends (its connection closes with it): the name is free.
    drop(first);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !second.hold(pool).await.unwrap() {
        assert!(Instant::now() < deadline, "the name stayed claimed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
