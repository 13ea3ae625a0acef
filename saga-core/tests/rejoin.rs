//! A member killed without leaving its group (SIGKILL, as when a pod is restarted)
//! and started again a moment later, while the group still counts its predecessor:
//! with an instance id it takes its predecessor's place at once; without one, the
//! membership watchdog rejoins when the broker does not give it partitions.
//!
//! Each member is this test binary started again as a process (the `member` test
//! below, which does nothing unless [`MEMBER_ENV`] is set), so killing it sends
//! nothing to the broker: no LeaveGroup, no last commit.

use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use saga_core::consumer::{
    Consumer, ConsumerConfig, ConsumerStats, HandlerError, IncomingMessage, MessageHandler,
    RebalanceEvent,
};
use sqlx::{PgConnection, PgPool};
use testkit::TestDatabase;
use uuid::Uuid;

static NO_SERVICE: sqlx::migrate::Migrator = sqlx::migrate::Migrator::DEFAULT;

/// Set in a member process: what it consumes, as `url|group|topic|instance`.
const MEMBER_ENV: &str = "SAGA_CORE_REJOIN_MEMBER";

/// How long any awaited condition may take before the test gives up.
const DEADLINE: Duration = Duration::from_secs(90);

/// The goal for a restart under the same instance name.
const WITH_INSTANCE: Duration = Duration::from_secs(10);

/// The bound for a restart without one (the watchdog waits 12 s, then rejoins).
const WITHOUT_INSTANCE: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------------------------
// The member process

/// Writes one `effects` row per message, naming the process that applied it.
struct Recorder;

impl MessageHandler for Recorder {
    fn handle<'a>(
        &'a self,
        tx: &'a mut PgConnection,
        message: &'a IncomingMessage,
    ) -> BoxFuture<'a, Result<(), HandlerError>> {
        Box::pin(async move {
            sqlx::query("INSERT INTO effects (message_id, pid) VALUES ($1, $2)")
                .bind(message.id)
                .bind(i64::from(std::process::id()))
                .execute(&mut *tx)
                .await?;
            Ok(())
        })
    }
}

/// The member: consumes until it is killed, and keeps its row in `members` current
/// (when it was first assigned a partition, how often it rejoined).
#[tokio::test]
#[ignore = "a member process, started by the other tests of this file"]
async fn member() {
    let Ok(spec) = std::env::var(MEMBER_ENV) else {
        return;
    };
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .try_init();
    let [url, group, topic, instance]: [&str; 4] = spec
        .split('|')
        .collect::<Vec<_>>()
        .try_into()
        .expect("url|group|topic|instance");
    let pool = PgPool::connect(url).await.unwrap();
    let started = Instant::now();
    let pid = i64::from(std::process::id());
    sqlx::query("INSERT INTO members (pid, instance) VALUES ($1, $2)")
        .bind(pid)
        .bind(instance)
        .execute(&pool)
        .await
        .unwrap();

    let mut config = ConsumerConfig::new(&testkit::settings().kafka_brokers, group, [topic]);
    if !instance.is_empty() {
        config.instance_id = Some(instance.to_owned());
    }
    let stats = Arc::new(ConsumerStats::default());
    let assigned_ms = Arc::new(AtomicU64::new(u64::MAX));
    let consumer = Consumer::new(config, pool.clone(), Arc::new(Recorder))
        .unwrap()
        .with_stats(Arc::clone(&stats))
        .with_rebalance_observer({
            let assigned_ms = Arc::clone(&assigned_ms);
            move |event| {
                if let RebalanceEvent::Assigned { .. } = event {
                    let ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
                    assigned_ms.fetch_min(ms, Ordering::SeqCst);
                }
            }
        });
    let report = async {
        loop {
            let assigned = assigned_ms.load(Ordering::SeqCst);
            sqlx::query("UPDATE members SET assigned_ms = $2, rejoins = $3 WHERE pid = $1")
                .bind(pid)
                .bind((assigned != u64::MAX).then(|| i64::try_from(assigned).unwrap()))
                .bind(i64::try_from(stats.rejoins()).unwrap())
                .execute(&pool)
                .await
                .unwrap();
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    tokio::select! {
        result = consumer.run(std::future::pending()) => panic!("the member stopped: {result:?}"),
        () = report => {}
    }
}

/// A member process; killed (SIGKILL) when dropped.
struct Member {
    child: Child,
    spawned: Instant,
}

impl Member {
    fn spawn(db: &TestDatabase, group: &str, topic: &str, instance: &str) -> Member {
        let exe = std::env::current_exe().unwrap();
        let child = Command::new(exe)
            .args(["--exact", "member", "--ignored", "--nocapture"])
            .env(
                MEMBER_ENV,
                format!("{}|{group}|{topic}|{instance}", db.url()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        Member {
            child,
            spawned: Instant::now(),
        }
    }

    fn pid(&self) -> i64 {
        i64::from(self.child.id())
    }

    /// SIGKILL: the process ends without a word to the broker.
    fn kill(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
}

impl Drop for Member {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------------------------
// Environment

async fn setup(partitions: i32) -> (TestDatabase, String, String) {
    let db = TestDatabase::create().await;
    saga_core::schema::migrate(db.pool(), &NO_SERVICE)
        .await
        .unwrap();
    for table in [
        "CREATE TABLE effects (message_id uuid NOT NULL, pid bigint NOT NULL)",
        "CREATE TABLE members (
             pid         bigint PRIMARY KEY,
             instance    text   NOT NULL,
             assigned_ms bigint,          -- first partition assigned, after the start
             rejoins     bigint NOT NULL DEFAULT 0
         )",
    ] {
        sqlx::query(table).execute(db.pool()).await.unwrap();
    }
    let topic = testkit::unique_name("rejoin");
    testkit::create_topic(&topic, partitions).await;
    (db, topic, testkit::unique_name("group"))
}

/// Produces one message to each partition of `topic`; returns their ids.
async fn produce(topic: &str, partitions: i32) -> Vec<Uuid> {
    let producer: FutureProducer = testkit::producer_config().create().unwrap();
    let mut ids = Vec::new();
    for partition in 0..partitions {
        let id = Uuid::now_v7();
        let id_text = id.to_string();
        let headers = OwnedHeaders::new()
            .insert(Header {
                key: "id",
                value: Some(id_text.as_str()),
            })
            .insert(Header {
                key: "type",
                value: Some("ping"),
            });
        producer
            .send(
                FutureRecord::<str, str>::to(topic)
                    .partition(partition)
                    .key(&id_text)
                    .payload("{}")
                    .headers(headers),
                Duration::from_secs(10),
            )
            .await
            .map_err(|(e, _)| e)
            .unwrap();
        ids.push(id);
    }
    ids
}

/// Waits until `pid` applied every message of `ids`; how long that took since `since`,
/// or `None` after [`DEADLINE`].
async fn applied_by(pool: &PgPool, pid: i64, ids: &[Uuid], since: Instant) -> Option<Duration> {
    loop {
        let applied: i64 = sqlx::query_scalar(
            "SELECT count(DISTINCT message_id) FROM effects WHERE pid = $1 AND message_id = ANY($2)",
        )
        .bind(pid)
        .bind(ids)
        .fetch_one(pool)
        .await
        .unwrap();
        if applied == i64::try_from(ids.len()).unwrap() {
            return Some(since.elapsed());
        }
        if since.elapsed() > DEADLINE {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// What the restarted member did.
#[derive(Debug)]
struct Restart {
    /// From its start until it had applied a message produced to every partition
    /// right after it started.
    consuming_after: Option<Duration>,
    /// From its start until its first partition was assigned.
    assigned_after: Option<Duration>,
    /// Its watchdog's rejoins.
    rejoins: i64,
}

/// A member consumes every partition; it is killed, and after `restart_delay` a
/// new member with the same `instance` (empty: none) starts.
async fn kill_and_restart(instance: &str, restart_delay: Duration, partitions: i32) -> Restart {
    let (db, topic, group) = setup(partitions).await;
    let first = Member::spawn(&db, &group, &topic, instance);
    let ids = produce(&topic, partitions).await;
    let warm = applied_by(db.pool(), first.pid(), &ids, first.spawned).await;
    let warm = warm.expect("the first member consumes");
    eprintln!("first member consuming after {warm:.1?}");
    first.kill();

    // The pod's restart delay.
    tokio::time::sleep(restart_delay).await;
    let second = Member::spawn(&db, &group, &topic, instance);
    let ids = produce(&topic, partitions).await;
    let consuming_after = applied_by(db.pool(), second.pid(), &ids, second.spawned).await;
    let (assigned_ms, rejoins): (Option<i64>, i64) =
        sqlx::query_as("SELECT assigned_ms, rejoins FROM members WHERE pid = $1")
            .bind(second.pid())
            .fetch_one(db.pool())
            .await
            .unwrap();
    drop(second);
    let restart = Restart {
        consuming_after,
        assigned_after: assigned_ms.map(|ms| Duration::from_millis(u64::try_from(ms).unwrap())),
        rejoins,
    };
    eprintln!(
        "instance {instance:?}, restarted after {restart_delay:?}, {partitions} partitions: {restart:?}"
    );
    restart
}

// ---------------------------------------------------------------------------------
// Tests

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_restarted_after_1_s_under_its_instance_name_consumes_within_10_s() {
    let restart = kill_and_restart("member-1", Duration::from_secs(1), 1).await;
    let after = restart.consuming_after.expect("consuming again");
    assert!(after <= WITH_INSTANCE, "consuming again after {after:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_restarted_after_3_s_under_its_instance_name_consumes_within_10_s() {
    let restart = kill_and_restart("member-1", Duration::from_secs(3), 1).await;
    let after = restart.consuming_after.expect("consuming again");
    assert!(after <= WITH_INSTANCE, "consuming again after {after:?}");
}

/// The kubelet restarts a crashed container after 10 s once it backs off: the
/// member's session must outlast that and the takeover, or the membership it just
/// took over expires before its first heartbeat.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_restarted_after_10_s_under_its_instance_name_consumes_within_10_s() {
    let restart = kill_and_restart("member-1", Duration::from_secs(10), 1).await;
    let after = restart.consuming_after.expect("consuming again");
    assert!(after <= WITH_INSTANCE, "consuming again after {after:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_restarted_without_an_instance_name_is_brought_back_by_its_watchdog() {
    let restart = kill_and_restart("", Duration::from_secs(3), 3).await;
    let after = restart.consuming_after.expect("consuming again");
    assert!(after <= WITHOUT_INSTANCE, "consuming again after {after:?}");
    // A broker that rebalances on its own before the watchdog's wait is over
    // (Apache Kafka, once the predecessor's session expired) needs no rejoin.
    let assigned = restart.assigned_after.expect("assigned");
    if assigned > Duration::from_secs(12) {
        assert!(restart.rejoins >= 1, "{restart:?}");
    }
}
