//! The replication client against the real PostgreSQL of `scripts/env`: every
//! authentication method, slot creation, streaming pgoutput, standby status updates,
//! keepalives, a busy slot and a clean end.

use std::task::Poll;
use std::time::Duration;

use bytes::Bytes;
use outbox_relay::replication::{
    AuthMethod, ConnectConfig, ReplicationClient, ReplicationError, ReplicationMessage,
    ReplicationStream, SnapshotMode, StandbyStatus,
};
use outbox_relay::Lsn;
use testkit::TestDatabase;
use tokio::time::{timeout_at, Instant};

/// How long a test waits for the server to do something it should do promptly.
const DEADLINE: Duration = Duration::from_secs(20);

/// `db.url()` with its user and password replaced.
fn url_as(db: &TestDatabase, user: &str, password: Option<&str>) -> String {
    let url = db.url();
    let (scheme, rest) = url.split_once("://").expect("a URL has a scheme");
    let (_, host_and_path) = rest.rsplit_once('@').expect("the test URL has user info");
    match password {
        Some(password) => format!("{scheme}://{user}:{password}@{host_and_path}"),
        None => format!("{scheme}://{user}@{host_and_path}"),
    }
}

async fn connect(url: &str) -> Result<ReplicationClient, ReplicationError> {
    ReplicationClient::connect(&ConnectConfig::from_url(url).unwrap()).await
}

async fn connect_db(db: &TestDatabase) -> ReplicationClient {
    connect(&db.url()).await.unwrap()
}

/// A table `items`, a publication for it whose name needs quoting, and a slot.
struct Fixture {
    slot: String,
    publication: String,
}

impl Fixture {
    async fn create(db: &TestDatabase) -> Fixture {
        let pool = db.pool();
        sqlx::query("CREATE TABLE items (id int PRIMARY KEY, note text)")
            .execute(pool)
            .await
            .unwrap();
        // A quote of each kind in the name: START_REPLICATION must quote the option
        // value as a literal, and the value itself is a quoted identifier list.
        let publication = format!("{}_pub'\"q", db.name());
        sqlx::query(&format!(
            "CREATE PUBLICATION \"{}\" FOR TABLE items",
            publication.replace('"', "\"\"")
        ))
        .execute(pool)
        .await
        .unwrap();
        let slot = format!("{}_slot", db.name());
        let mut client = connect_db(db).await;
        let created = client
            .create_logical_slot(&slot, "pgoutput", SnapshotMode::NoExport, false)
            .await
            .unwrap();
        assert_eq!(created.slot_name, slot);
        assert_eq!(created.output_plugin, "pgoutput");
        assert_eq!(created.snapshot_name, None);
        assert!(!created.consistent_point.is_zero());
        client.close().await;
        Fixture { slot, publication }
    }

    async fn start(&self, db: &TestDatabase) -> Result<ReplicationStream, ReplicationError> {
        let names = format!("\"{}\"", self.publication.replace('"', "\"\""));
        connect_db(db)
            .await
            .start_logical_replication(
                &self.slot,
                Lsn::ZERO,
                &[("proto_version", "1"), ("publication_names", &names)],
            )
            .await
    }
}

/// What came out of the stream while waiting for some commits.
#[derive(Debug, Default)]
struct Received {
    /// (wal_start, pgoutput message) of every XLogData.
    xlog: Vec<(Lsn, Bytes)>,
    keepalives: usize,
}

impl Received {
    fn count(&self, tag: u8) -> usize {
        self.xlog
            .iter()
            .filter(|(_, data)| data.first() == Some(&tag))
            .count()
    }

    /// `end_lsn` of the last pgoutput Commit.
    fn last_commit_end(&self) -> Lsn {
        let (_, commit) = self
            .xlog
            .iter()
            .rev()
            .find(|(_, data)| data.first() == Some(&b'C'))
            .expect("a commit was received");
        commit_end_lsn(commit)
    }
}

/// `end_lsn` of a pgoutput Commit: tag, flags, commit_lsn, end_lsn, timestamp.
fn commit_end_lsn(commit: &[u8]) -> Lsn {
    assert_eq!(
        commit.len(),
        1 + 1 + 8 + 8 + 8,
        "commit message: {commit:?}"
    );
    Lsn::new(u64::from_be_bytes(commit[10..18].try_into().unwrap()))
}

/// Reads until `commits` pgoutput Commit messages arrived.
async fn read_commits(stream: &mut ReplicationStream, commits: usize) -> Received {
    let deadline = Instant::now() + DEADLINE;
    let mut received = Received::default();
    while received.count(b'C') < commits {
        let message = timeout_at(deadline, stream.next())
            .await
            .unwrap_or_else(|_| panic!("no {commits} commits within {DEADLINE:?}: {received:?}"))
            .unwrap()
            .expect("the server does not end the stream");
        match message {
            ReplicationMessage::XLogData {
                wal_start, data, ..
            } => received.xlog.push((wal_start, data)),
            ReplicationMessage::Keepalive { .. } => received.keepalives += 1,
            other => panic!("unexpected message {other:?}"),
        }
    }
    received
}

/// Polls `sql` (one text column, bound to `$1`) until it returns `expected`.
async fn wait_for_value(db: &TestDatabase, sql: &str, bind: &str, expected: Option<&str>) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let value: Option<Option<String>> = sqlx::query_scalar(sql)
            .bind(bind)
            .fetch_optional(db.pool())
            .await
            .unwrap();
        let value = value.flatten();
        if value.as_deref() == expected {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{sql} still returns {value:?}, expected {expected:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn every_auth_method_connects_and_identifies_the_database() {
    let db = TestDatabase::create().await;
    let cases = [
        ("outbox (scram-sha-256)", db.url(), AuthMethod::ScramSha256),
        (
            "relay_trust",
            url_as(&db, "relay_trust", None),
            AuthMethod::Trust,
        ),
        (
            "relay_md5",
            url_as(&db, "relay_md5", Some("relay_md5")),
            AuthMethod::Md5,
        ),
        (
            "relay_cleartext",
            url_as(&db, "relay_cleartext", Some("relay_cleartext")),
            AuthMethod::Cleartext,
        ),
    ];
    for (who, url, method) in cases {
        let mut client = connect(&url)
            .await
            .unwrap_or_else(|e| panic!("{who} cannot connect: {e:?}"));
        assert_eq!(client.auth_method(), method, "{who}");
        let version = client
            .server_version()
            .expect("the server reports its version");
        assert!(
            version.starts_with(|c: char| c.is_ascii_digit()),
            "{who}: {version}"
        );
        let identity = client.identify_system().await.unwrap();
        assert_eq!(identity.dbname.as_deref(), Some(db.name()), "{who}");
        assert!(!identity.xlogpos.is_zero(), "{who}: {identity:?}");
        assert!(identity.timeline >= 1, "{who}: {identity:?}");
        assert!(
            !identity.systemid.is_empty() && identity.systemid.bytes().all(|b| b.is_ascii_digit()),
            "{who}: {identity:?}"
        );
        client.close().await;
    }
}

#[tokio::test]
async fn a_wrong_password_is_a_definite_error_naming_the_user() {
    let db = TestDatabase::create().await;
    for user in ["relay_md5", "relay_cleartext", "outbox"] {
        let err = connect(&url_as(&db, user, Some("not-the-password")))
            .await
            .expect_err("a wrong password is refused");
        assert!(
            matches!(err, ReplicationError::AuthenticationFailed { .. }),
            "{user}: {err:?}"
        );
        assert!(!err.is_transient(), "{user}: {err:?}");
        assert_eq!(err.sqlstate(), Some("28P01"), "{user}: {err:?}");
        let message = err.to_string();
        assert!(message.contains(user), "{message}");
        assert!(message.contains("127.0.0.1"), "{message}");
    }

    // No password at all, where the server asks for one: the client says so.
    let err = connect(&url_as(&db, "relay_md5", None)).await.unwrap_err();
    assert!(
        matches!(err, ReplicationError::Authentication { .. }),
        "{err:?}"
    );
    assert!(!err.is_transient());
    assert!(err.to_string().contains("relay_md5"), "{err}");
}

#[tokio::test]
async fn unreachable_servers_are_transient_errors() {
    // A port nobody listens on: bind one, then free it.
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let err = connect(&format!("postgres://relay@127.0.0.1:{port}/x"))
        .await
        .expect_err("nothing listens there");
    assert!(matches!(err, ReplicationError::Connect { .. }), "{err:?}");
    assert!(err.is_transient(), "{err:?}");
    assert!(err.to_string().contains(&port.to_string()), "{err}");

    // A server that accepts TCP but never answers: the connect timeout covers startup.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = silent.local_addr().unwrap().port();
    let started = Instant::now();
    let err = connect(&format!(
        "postgres://relay@127.0.0.1:{port}/x?connect_timeout=1"
    ))
    .await
    .expect_err("the server never answers");
    assert!(
        matches!(err, ReplicationError::ConnectTimeout { .. }),
        "{err:?}"
    );
    assert!(err.is_transient());
    assert!(started.elapsed() < Duration::from_secs(5));
    drop(silent);
}

#[tokio::test]
async fn simple_queries_return_text_rows_and_server_errors() {
    let db = TestDatabase::create().await;
    let mut client = connect_db(&db).await;
    let rows = client
        .simple_query("SELECT current_database(), 42, NULL::text UNION ALL SELECT 'x', 7, 'y'")
        .await
        .unwrap();
    assert_eq!(
        rows,
        vec![
            vec![Some(db.name().to_owned()), Some("42".into()), None],
            vec![Some("x".into()), Some("7".into()), Some("y".into())],
        ]
    );
    assert_eq!(client.simple_query("").await.unwrap(), Vec::<Vec<_>>::new());

    let err = client.simple_query("SELECT 1/0").await.unwrap_err();
    assert_eq!(err.sqlstate(), Some("22012"), "{err:?}");
    assert!(!err.is_transient());
    let server = err.server_error().unwrap();
    assert_eq!(server.severity(), "ERROR");
    assert!(server.message().contains("division by zero"), "{server}");

    // The connection is ready again after an error.
    client.identify_system().await.unwrap();

    // A missing slot is a definite error.
    let err = client
        .start_logical_replication("no_such_slot", Lsn::ZERO, &[])
        .await
        .unwrap_err();
    assert_eq!(err.sqlstate(), Some("42704"), "{err:?}");
    assert!(!err.is_transient());
}

#[tokio::test]
async fn temporary_slots_export_snapshots_and_vanish_with_the_connection() {
    let db = TestDatabase::create().await;
    let slot = format!("{}_tmp", db.name());
    let mut client = connect_db(&db).await;
    let created = client
        .create_logical_slot(&slot, "pgoutput", SnapshotMode::Export, true)
        .await
        .unwrap();
    let snapshot = created
        .snapshot_name
        .expect("an exported snapshot has a name");
    assert!(!snapshot.is_empty());

    // The exported snapshot can be imported while the slot's connection is idle.
    let mut tx = db.pool().begin().await.unwrap();
    sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        .execute(&mut *tx)
        .await
        .unwrap();
    sqlx::query(&format!("SET TRANSACTION SNAPSHOT '{snapshot}'"))
        .execute(&mut *tx)
        .await
        .unwrap();
    tx.rollback().await.unwrap();

    let temporary: bool =
        sqlx::query_scalar("SELECT temporary FROM pg_replication_slots WHERE slot_name = $1")
            .bind(&slot)
            .fetch_one(db.pool())
            .await
            .unwrap();
    assert!(temporary);
    client.close().await;
    wait_for_value(
        &db,
        "SELECT slot_name::text FROM pg_replication_slots WHERE slot_name = $1",
        &slot,
        None,
    )
    .await;
}

#[tokio::test]
async fn streams_the_inserts_of_two_transactions() {
    let db = TestDatabase::create().await;
    let fixture = Fixture::create(&db).await;
    let mut stream = fixture.start(&db).await.unwrap();
    assert_eq!(stream.slot(), fixture.slot);

    let pool = db.pool();
    let mut tx = pool.begin().await.unwrap();
    for id in 1..=3 {
        sqlx::query("INSERT INTO items VALUES ($1, 'first')")
            .bind(id)
            .execute(&mut *tx)
            .await
            .unwrap();
    }
    tx.commit().await.unwrap();
    sqlx::query("INSERT INTO items VALUES (4, 'second'), (5, 'second')")
        .execute(pool)
        .await
        .unwrap();

    let received = read_commits(&mut stream, 2).await;
    assert_eq!(received.count(b'B'), 2, "{received:?}");
    assert_eq!(received.count(b'I'), 5, "{received:?}");
    assert_eq!(
        received.count(b'R'),
        1,
        "one Relation before the first insert"
    );
    let tags: Vec<u8> = received.xlog.iter().map(|(_, data)| data[0]).collect();
    assert_eq!(tags, b"BRIIICBIIC".to_vec(), "{received:?}");
    // pgoutput's Relation messages are not tied to a WAL record: the server sends
    // them with wal_start 0/0. Every other message's wal_start never decreases.
    for (start, data) in &received.xlog {
        assert_eq!(start.is_zero(), data[0] == b'R', "{received:?}");
    }
    // A Commit's wal_start is its end_lsn (the end of the commit record), a
    // Begin's the LSN of the transaction's first change.
    for (i, (start, data)) in received.xlog.iter().enumerate() {
        match data[0] {
            b'C' => assert_eq!(*start, commit_end_lsn(data), "{received:?}"),
            b'B' => {
                let first_change = received.xlog[i + 1..]
                    .iter()
                    .find(|(_, data)| data[0] == b'I')
                    .unwrap();
                assert_eq!(*start, first_change.0, "{received:?}");
            }
            _ => {}
        }
    }
    let starts: Vec<Lsn> = received
        .xlog
        .iter()
        .map(|(start, _)| *start)
        .filter(|start| !start.is_zero())
        .collect();
    assert!(
        starts.windows(2).all(|pair| pair[0] <= pair[1]),
        "wal_start goes backwards: {starts:?}"
    );
    // The row data arrives intact: the last insert carries 'second'.
    let (_, last_insert) = received
        .xlog
        .iter()
        .rev()
        .find(|(_, data)| data[0] == b'I')
        .unwrap();
    assert!(last_insert.windows(6).any(|w| w == b"second"));

    stream.finish().await.unwrap();
}

#[tokio::test]
async fn a_standby_status_update_moves_confirmed_flush_lsn() {
    let db = TestDatabase::create().await;
    let fixture = Fixture::create(&db).await;
    let mut stream = fixture.start(&db).await.unwrap();
    sqlx::query("INSERT INTO items VALUES (1, 'a')")
        .execute(db.pool())
        .await
        .unwrap();
    let received = read_commits(&mut stream, 1).await;
    let end = received.last_commit_end();

    stream
        .send_status(StandbyStatus::confirmed(end))
        .await
        .unwrap();
    wait_for_value(
        &db,
        "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1",
        &fixture.slot,
        Some(&end.to_string()),
    )
    .await;
    stream.finish().await.unwrap();

    // Restarting from the slot does not send the confirmed transaction again.
    let mut stream = fixture.start(&db).await.unwrap();
    sqlx::query("INSERT INTO items VALUES (2, 'b')")
        .execute(db.pool())
        .await
        .unwrap();
    let received = read_commits(&mut stream, 1).await;
    assert_eq!(received.count(b'I'), 1, "{received:?}");
    assert!(received.last_commit_end() > end);
    stream.finish().await.unwrap();
}

#[tokio::test]
async fn the_server_answers_a_reply_request_with_a_keepalive() {
    let db = TestDatabase::create().await;
    let fixture = Fixture::create(&db).await;
    let mut stream = fixture.start(&db).await.unwrap();

    // A new stream starts with one or two unrequested keepalives.
    let first = timeout_at(Instant::now() + DEADLINE, stream.next())
        .await
        .expect("the server pings a new stream")
        .unwrap()
        .unwrap();
    let ReplicationMessage::Keepalive { wal_end, .. } = first else {
        panic!("expected a keepalive first, got {first:?}");
    };
    // The walsender also pings on its own whenever it has read WAL past the write
    // position the client reported (and WAL moves all the time while other tests
    // run). Reporting a write position beyond any WAL silences that, so the only
    // reason for a keepalive sent after this update is the reply request: the next
    // idle ping is wal_sender_timeout / 2 (30 s) away. The flush position, which the
    // slot keeps, stays truthful.
    let requested_at = pg_now();
    stream
        .send_status(StandbyStatus {
            write: Lsn::new(u64::MAX),
            flush: wal_end,
            apply: wal_end,
            reply_requested: true,
        })
        .await
        .unwrap();
    // Server and client share this machine's clock: the answer is stamped later
    // than the request, the unrequested keepalives earlier.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let message = timeout_at(deadline, stream.next())
            .await
            .expect("the server answers a reply request at once")
            .unwrap()
            .unwrap();
        // The answer may itself ask for a reply (the walsender's own ping timer can
        // coincide); what matters is that it comes, stamped after the request.
        let ReplicationMessage::Keepalive {
            wal_end: answered,
            server_time_micros,
            ..
        } = message
        else {
            panic!("expected a keepalive, got {message:?}");
        };
        if server_time_micros < requested_at {
            continue;
        }
        assert!(answered >= wal_end);
        assert!(server_time_micros - requested_at < 5_000_000);
        break;
    }
    stream.finish().await.unwrap();
}

/// This machine's clock in PostgreSQL's terms (microseconds since 2000-01-01).
fn pg_now() -> i64 {
    outbox_relay::replication::protocol::pg_micros_from_system_time(std::time::SystemTime::now())
}

#[tokio::test]
async fn a_second_stream_on_an_active_slot_is_refused_with_55006() {
    let db = TestDatabase::create().await;
    let fixture = Fixture::create(&db).await;
    let first = fixture.start(&db).await.unwrap();

    let err = fixture
        .start(&db)
        .await
        .expect_err("the slot is active in the first stream");
    assert_eq!(err.sqlstate(), Some("55006"), "{err:?}");
    assert!(!err.is_transient(), "{err:?}");
    let server = err.server_error().unwrap();
    assert!(server.message().contains(&fixture.slot), "{server}");
    assert!(server.to_string().starts_with("ERROR 55006: "), "{server}");

    first.finish().await.unwrap();
}

#[tokio::test]
async fn finish_ends_the_stream_and_releases_the_slot() {
    let db = TestDatabase::create().await;
    let fixture = Fixture::create(&db).await;
    let mut stream = fixture.start(&db).await.unwrap();
    // Leave unread data behind: finish skips it.
    sqlx::query("INSERT INTO items SELECT g, 'x' FROM generate_series(1, 100) g")
        .execute(db.pool())
        .await
        .unwrap();
    let active: bool =
        sqlx::query_scalar("SELECT active FROM pg_replication_slots WHERE slot_name = $1")
            .bind(&fixture.slot)
            .fetch_one(db.pool())
            .await
            .unwrap();
    assert!(active);
    let _ = timeout_at(Instant::now() + DEADLINE, stream.next())
        .await
        .unwrap()
        .unwrap();

    timeout_at(Instant::now() + DEADLINE, stream.finish())
        .await
        .expect("finish completes")
        .unwrap();
    wait_for_value(
        &db,
        "SELECT active::text FROM pg_replication_slots WHERE slot_name = $1",
        &fixture.slot,
        Some("false"),
    )
    .await;
    // Released for good: a new stream can take it at once.
    fixture.start(&db).await.unwrap().finish().await.unwrap();
}

#[tokio::test]
async fn next_loses_nothing_when_cancelled_mid_message() {
    let db = TestDatabase::create().await;
    let fixture = Fixture::create(&db).await;
    let mut stream = fixture.start(&db).await.unwrap();
    // Rows far larger than a socket read, so messages arrive in pieces.
    let rows = 8;
    let size = 300_000;
    // Written while the stream is being read, so that reads find messages half
    // arrived.
    let pool = db.pool().clone();
    let writer = tokio::spawn(async move {
        sqlx::query(
            "INSERT INTO items SELECT g, repeat(chr(96 + g), $1) FROM generate_series(1, $2) g",
        )
        .bind(size)
        .bind(rows)
        .execute(&pool)
        .await
    });

    let deadline = Instant::now() + DEADLINE;
    let mut cancelled = 0usize;
    let mut inserts = Vec::new();
    while inserts.len() < rows as usize {
        assert!(
            Instant::now() < deadline,
            "inserts so far: {}",
            inserts.len()
        );
        // Poll `next()` exactly once and drop it if it would wait: whenever a message
        // is only partly there, the future is dropped with it half read.
        let poll = {
            let next = stream.next();
            futures::pin_mut!(next);
            futures::poll!(next)
        };
        match poll {
            Poll::Pending => {
                cancelled += 1;
                tokio::task::yield_now().await;
            }
            Poll::Ready(message) => {
                if let Some(ReplicationMessage::XLogData { data, .. }) = message.unwrap() {
                    if data[0] == b'I' {
                        inserts.push(data);
                    }
                }
            }
        }
    }
    for (i, data) in inserts.iter().enumerate() {
        let letter = b'a' + i as u8;
        let run = data.iter().filter(|&&b| b == letter).count();
        assert!(
            run >= size as usize,
            "insert {i} lost bytes: {run} of {size}"
        );
    }
    writer.await.unwrap().unwrap();
    assert!(cancelled > 0, "next() was never cancelled");
    eprintln!("next() was cancelled {cancelled} times");
    stream.finish().await.unwrap();
}
