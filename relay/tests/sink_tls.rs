//! The Redis and RabbitMQ sinks over TLS (`rediss://`, `amqps://`), trusting the
//! test CA of the local environment (`OUTBOX_PG_CA`, whose folder also holds the
//! server certificate for 127.0.0.1): with the CA file the rows arrive and `check`
//! passes; without it the server's certificate is not trusted and `check` fails.
//! Each test runs a private server with a plain and a TLS listener; the test reads
//! through the plain one.

mod support;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use support::sinks::{Backend, SinkCollector};
use support::{check_records, relay_subcommand, OutboxDb, Relay, RelaySettings, Row};

const NO_PROGRESS: Duration = Duration::from_secs(60);

/// The test CA and the folder with the server's certificate and key.
fn test_ca() -> (PathBuf, PathBuf) {
    let ca = PathBuf::from(testkit::setting("OUTBOX_PG_CA").unwrap_or_else(|| {
        panic!(
            "no OUTBOX_PG_CA in the environment or the settings file: start the local \
             environment with `{}` (it needs openssl)",
            testkit::ENV_UP_COMMAND
        )
    }));
    let folder = ca.parent().expect("the CA's folder").to_owned();
    (ca, folder)
}

/// A server process, killed when dropped.
struct Server(Child);

impl Drop for Server {
    /// Kills the process and, when it leads one, its process group.
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-KILL", "--", &format!("-{}", self.0.id())])
            .stderr(Stdio::null())
            .status();
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The outcome of `check` for the sink's line: (ok, the line).
fn check_line(settings: &RelaySettings, sink: &str) -> (bool, String) {
    let (_, out, err) = relay_subcommand(settings, "check");
    let line = out
        .lines()
        .find(|l| l.split_whitespace().nth(1) == Some(sink))
        .unwrap_or_else(|| panic!("no line for {sink}:\n{out}{err}"))
        .to_owned();
    (line.starts_with("ok"), line)
}

/// Rows written after the relay started arrive, every one once.
async fn rows_arrive(backend: Backend, plain_url: &str, settings: &RelaySettings, db: &OutboxDb) {
    let topics = [settings.topic("order")];
    let mut collector = SinkCollector::start_at(backend, Some(plain_url), settings, &topics).await;
    let relay = Relay::start(settings);
    db.wait_for_slot().await;
    let rows: Vec<Row> = (1..=20).map(|seq| Row::event(0, seq)).collect();
    db.write(&rows, false).await;
    collector
        .until(NO_PROGRESS, |r| r.len() >= rows.len())
        .await;
    collector.drain_for(Duration::from_secs(1)).await;
    check_records(settings, &rows, &collector.received, true);
    drop(relay);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_over_tls_trusts_the_configured_ca() {
    let (ca, folder) = test_ca();
    let (plain, tls) = (testkit::free_port(), testkit::free_port());
    let data = std::env::temp_dir().join(testkit::unique_name("redis-tls"));
    std::fs::create_dir_all(&data).unwrap();
    let server = Server(
        Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--port", &plain.to_string()])
            .args(["--tls-port", &tls.to_string()])
            .arg("--tls-cert-file")
            .arg(folder.join("server.crt"))
            .arg("--tls-key-file")
            .arg(folder.join("server.key"))
            .arg("--tls-ca-cert-file")
            .arg(&ca)
            .args([
                "--tls-auth-clients",
                "no",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .arg("--dir")
            .arg(&data)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start redis-server"),
    );
    let plain_url = format!("redis://127.0.0.1:{plain}");
    let client = redis::Client::open(plain_url.as_str()).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while client.get_multiplexed_async_connection().await.is_err() {
        assert!(Instant::now() < deadline, "redis-server did not start");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let db = OutboxDb::new().await;
    let untrusted = Backend::Redis.settings(&db).with(
        "OUTBOX_RELAY_REDIS_URL",
        format!("rediss://127.0.0.1:{tls}"),
    );
    let (ok, line) = check_line(&untrusted, "redis");
    assert!(
        !ok,
        "the server's certificate was trusted without its CA: {line}"
    );
    eprintln!("without the CA: {line}");
    let trusted = untrusted.with("OUTBOX_RELAY_REDIS_CA_FILE", ca.display());
    let (ok, line) = check_line(&trusted, "redis");
    assert!(ok, "{line}");

    rows_arrive(Backend::Redis, &plain_url, &trusted, &db).await;
    drop(server);
    let _ = std::fs::remove_dir_all(&data);
}

/// A private RabbitMQ node listening on `plain` and, with TLS, on `tls`; its files
/// in `base`. The node is the script's child: the whole process group is killed.
fn start_rabbitmq(
    ca: &std::path::Path,
    folder: &std::path::Path,
    base: &std::path::Path,
    plain: u16,
    tls: u16,
) -> Server {
    use std::os::unix::process::CommandExt;
    for dir in ["mnesia", "log"] {
        std::fs::create_dir_all(base.join(dir)).unwrap();
    }
    std::fs::write(base.join("enabled_plugins"), "[].\n").unwrap();
    std::fs::write(
        base.join("rabbitmq.conf"),
        format!(
            "loopback_users = none\n\
             listeners.tcp.default = 127.0.0.1:{plain}\n\
             listeners.ssl.default = 127.0.0.1:{tls}\n\
             ssl_options.cacertfile = {ca}\n\
             ssl_options.certfile = {cert}\n\
             ssl_options.keyfile = {key}\n\
             ssl_options.verify = verify_none\n\
             ssl_options.fail_if_no_peer_cert = false\n",
            ca = ca.display(),
            cert = folder.join("server.crt").display(),
            key = folder.join("server.key").display(),
        ),
    )
    .unwrap();
    let node = format!("{}@localhost", testkit::unique_name("outbox_tls"));
    let child = Command::new("/usr/lib/rabbitmq/bin/rabbitmq-server")
        .env("HOME", base)
        .env("RABBITMQ_NODENAME", node)
        .env("RABBITMQ_NODE_IP_ADDRESS", "127.0.0.1")
        .env("RABBITMQ_NODE_PORT", plain.to_string())
        .env("RABBITMQ_DIST_PORT", testkit::free_port().to_string())
        .env("RABBITMQ_CONFIG_FILE", base.join("rabbitmq"))
        .env("RABBITMQ_MNESIA_BASE", base.join("mnesia"))
        .env("RABBITMQ_LOG_BASE", base.join("log"))
        .env(
            "RABBITMQ_ENABLED_PLUGINS_FILE",
            base.join("enabled_plugins"),
        )
        .env("RABBITMQ_PID_FILE", base.join("node.pid"))
        .process_group(0)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run /usr/lib/rabbitmq/bin/rabbitmq-server ({e}): install Debian's \
                 rabbitmq-server"
            )
        });
    Server(child)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_over_tls_trusts_the_configured_ca() {
    let (ca, folder) = test_ca();
    let (plain, tls) = (testkit::free_port(), testkit::free_port());
    let base = std::env::temp_dir().join(testkit::unique_name("rabbitmq-tls"));
    let server = start_rabbitmq(&ca, &folder, &base, plain, tls);
    let plain_url = format!("amqp://guest:guest@127.0.0.1:{plain}/%2f");
    let deadline = Instant::now() + Duration::from_secs(90);
    while lapin::Connection::connect(&plain_url, lapin::ConnectionProperties::default())
        .await
        .is_err()
    {
        assert!(
            Instant::now() < deadline,
            "the RabbitMQ node did not start; its log is in {}",
            base.join("log").display()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }

    let db = OutboxDb::new().await;
    let untrusted = Backend::Rabbitmq.settings(&db).with(
        "OUTBOX_RELAY_RABBITMQ_URL",
        format!("amqps://guest:guest@127.0.0.1:{tls}/%2f"),
    );
    let (ok, line) = check_line(&untrusted, "rabbitmq");
    assert!(
        !ok,
        "the server's certificate was trusted without its CA: {line}"
    );
    eprintln!("without the CA: {line}");
    let trusted = untrusted.with("OUTBOX_RELAY_RABBITMQ_CA_FILE", ca.display());
    let (ok, line) = check_line(&trusted, "rabbitmq");
    assert!(ok, "{line}");

    rows_arrive(Backend::Rabbitmq, &plain_url, &trusted, &db).await;
    drop(server);
    let _ = std::fs::remove_dir_all(&base);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_over_tls_trusts_the_configured_ca() {
    let (ca, folder) = test_ca();
    let port = testkit::free_port();
    let data = std::env::temp_dir().join(testkit::unique_name("nats-tls"));
    let server = Server(
        Command::new("nats-server")
            .args(["-a", "127.0.0.1", "-p", &port.to_string(), "-js", "--tls"])
            .arg("--tlscert")
            .arg(folder.join("server.crt"))
            .arg("--tlskey")
            .arg(folder.join("server.key"))
            .arg("-sd")
            .arg(&data)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start nats-server"),
    );
    let url = format!("tls://127.0.0.1:{port}");
    let connect = || {
        async_nats::ConnectOptions::new()
            .add_root_certificates(ca.clone())
            .require_tls(true)
            .connect(url.clone())
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    let client = loop {
        match connect().await {
            Ok(client) => break client,
            Err(e) => assert!(Instant::now() < deadline, "nats-server did not start: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };

    let db = OutboxDb::new().await;
    let untrusted = Backend::Nats
        .settings(&db)
        .with("OUTBOX_RELAY_NATS_URL", &url);
    let (ok, line) = check_line(&untrusted, "nats");
    assert!(
        !ok,
        "the server's certificate was trusted without its CA: {line}"
    );
    eprintln!("without the CA: {line}");
    let trusted = untrusted.with("OUTBOX_RELAY_NATS_CA_FILE", ca.display());
    let (ok, line) = check_line(&trusted, "nats");
    assert!(ok, "{line}");

    let relay = Relay::start(&trusted);
    db.wait_for_slot().await;
    let rows: Vec<Row> = (1..=20).map(|seq| Row::event(0, seq)).collect();
    db.write(&rows, false).await;
    let context = async_nats::jetstream::new(client);
    let stream = support::sinks::stream_name(&trusted.topic_prefix);
    let deadline = Instant::now() + NO_PROGRESS;
    loop {
        let stored = match context.get_stream(&stream).await {
            Ok(mut stream) => stream.info().await.map_or(0, |i| i.state.messages),
            Err(_) => 0,
        };
        if stored >= rows.len() as u64 {
            assert_eq!(stored, rows.len() as u64);
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{stored} of {} rows in the stream:\n{}",
            rows.len(),
            relay.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(relay);
    drop(server);
    let _ = std::fs::remove_dir_all(&data);
}
