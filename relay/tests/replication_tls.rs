//! TLS on the replication connection against the real PostgreSQL of `scripts/env`
//! (which serves a certificate for `localhost` and `127.0.0.1`, signed by the CA in
//! `OUTBOX_PG_CA`): every `sslmode`, certificate checks that pass and fail, a
//! replication stream inside TLS, and a fake server that refuses TLS.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use outbox_relay::replication::{
    ConnectConfig, ReplicationClient, ReplicationError, ReplicationMessage, SnapshotMode, SslMode,
};
use outbox_relay::Lsn;
use testkit::TestDatabase;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::{timeout, timeout_at, Instant};

/// How long a test waits for the server to do something it should do promptly.
const DEADLINE: Duration = Duration::from_secs(20);

/// The SSLRequest: length 8, then the code 1234 5679.
const SSL_REQUEST: [u8; 8] = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];

/// The CA that signed the test server's certificate: `OUTBOX_PG_CA` from the
/// environment, else from the settings file `scripts/env up` writes.
fn pg_ca() -> PathBuf {
    testkit::setting("OUTBOX_PG_CA")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            panic!(
                "no OUTBOX_PG_CA in the environment or the settings file: start the local \
                 environment with `{}` (it needs openssl for the cluster's certificate)",
                testkit::ENV_UP_COMMAND
            )
        })
}

/// `db.url()` with its host (and port, if given) replaced and `params` added.
fn url_at(db: &TestDatabase, host: &str, port: Option<u16>, params: &str) -> String {
    let url = db.url();
    let (scheme, rest) = url.split_once("://").expect("a URL has a scheme");
    let (userinfo, rest) = rest.rsplit_once('@').expect("the test URL has user info");
    let (hostport, path) = rest.split_once('/').expect("the test URL names a database");
    let (_, url_port) = hostport.rsplit_once(':').expect("the test URL has a port");
    let port = port.map_or_else(|| url_port.to_owned(), |p| p.to_string());
    let separator = if path.contains('?') { '&' } else { '?' };
    format!("{scheme}://{userinfo}@{host}:{port}/{path}{separator}{params}")
}

/// The server's port, from `db.url()`.
fn pg_port(db: &TestDatabase) -> u16 {
    ConnectConfig::from_url(&db.url()).unwrap().port()
}

/// `sslrootcert=<path>`, percent-encoded enough for the URL parser.
fn root_cert_param(path: &Path) -> String {
    let text = path.to_str().expect("the CA path is UTF-8");
    format!(
        "sslrootcert={}",
        text.replace('%', "%25")
            .replace('&', "%26")
            .replace(' ', "%20")
    )
}

async fn connect(url: &str) -> Result<ReplicationClient, ReplicationError> {
    let config = ConnectConfig::from_url(url).unwrap();
    ReplicationClient::connect(&config).await
}

/// What `pg_stat_ssl` says about the session: `t` over TLS, `f` in plain text.
async fn session_ssl(client: &mut ReplicationClient) -> String {
    let rows = client
        .simple_query("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
        .await
        .unwrap();
    assert_eq!(rows.len(), 1, "{rows:?}");
    rows[0][0].clone().expect("ssl is never NULL")
}

/// The error and all its sources, joined, for checking what a message says.
fn chain(error: &(dyn std::error::Error + 'static)) -> String {
    outbox_relay::runner::error_chain(error)
}

/// A directory removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> TempDir {
        let path = std::env::temp_dir().join(testkit::unique_name("relay_tls"));
        std::fs::create_dir_all(&path).unwrap();
        TempDir(path)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Runs `openssl` with `args` in `dir`.
fn openssl(dir: &TempDir, args: &[&str]) {
    let output = Command::new("openssl")
        .args(args)
        .current_dir(&dir.0)
        .output()
        .expect("openssl runs (it is needed for this test)");
    assert!(
        output.status.success(),
        "openssl {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// A self-signed CA certificate (`name.crt`, key `name.key`) that signed nothing
/// the server has.
fn make_ca(dir: &TempDir, name: &str) -> PathBuf {
    let (crt, key) = (format!("{name}.crt"), format!("{name}.key"));
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            &key,
            "-out",
            &crt,
            "-days",
            "2",
            "-subj",
            &format!("/CN={name}"),
        ],
    );
    dir.path(&crt)
}

/// Forwards connections from a listener on `127.0.0.2` to the server, so that the
/// server is reached under an address its certificate does not name.
async fn forward_from_127_0_0_2(target: u16) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.2:0")
        .await
        .expect("binding 127.0.0.2 (all of 127.0.0.0/8 is loopback on Linux)");
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut client, _)) = listener.accept().await {
            tokio::spawn(async move {
                if let Ok(mut server) = TcpStream::connect(("127.0.0.1", target)).await {
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                }
            });
        }
    });
    addr
}

#[tokio::test]
async fn require_encrypts_and_carries_a_replication_stream() {
    let db = TestDatabase::create().await;
    sqlx::query("CREATE TABLE items (id int PRIMARY KEY, note text)")
        .execute(db.pool())
        .await
        .unwrap();
    sqlx::query("CREATE PUBLICATION items_pub FOR TABLE items")
        .execute(db.pool())
        .await
        .unwrap();

    let mut client = connect(&url_at(&db, "127.0.0.1", None, "sslmode=require"))
        .await
        .unwrap();
    assert!(client.is_tls());
    assert_eq!(session_ssl(&mut client).await, "t");
    let identity = client.identify_system().await.unwrap();
    assert_eq!(identity.dbname.as_deref(), Some(db.name()));
    assert!(!identity.xlogpos.is_zero());

    let slot = format!("{}_slot", db.name());
    client
        .create_logical_slot(&slot, "pgoutput", SnapshotMode::NoExport, false)
        .await
        .unwrap();
    let mut stream = client
        .start_logical_replication(
            &slot,
            Lsn::ZERO,
            &[("proto_version", "1"), ("publication_names", "items_pub")],
        )
        .await
        .unwrap();
    sqlx::query("INSERT INTO items VALUES (1, 'over tls')")
        .execute(db.pool())
        .await
        .unwrap();

    let deadline = Instant::now() + DEADLINE;
    let insert = loop {
        let message = timeout_at(deadline, stream.next())
            .await
            .expect("the insert arrives in time")
            .unwrap()
            .expect("the server does not end the stream");
        if let ReplicationMessage::XLogData { data, .. } = message {
            if data.first() == Some(&b'I') {
                break data;
            }
        }
    };
    let needle = b"over tls";
    assert!(
        insert.windows(needle.len()).any(|w| w == needle),
        "insert message: {insert:?}"
    );
    timeout(DEADLINE, stream.finish()).await.unwrap().unwrap();
}

#[tokio::test]
async fn verify_full_trusts_the_server_by_address_and_by_name() {
    let db = TestDatabase::create().await;
    let ca = root_cert_param(&pg_ca());
    for host in ["127.0.0.1", "localhost"] {
        let url = url_at(&db, host, None, &format!("sslmode=verify-full&{ca}"));
        let mut client = connect(&url)
            .await
            .unwrap_or_else(|e| panic!("verify-full to {host}: {}", chain(&e)));
        assert!(client.is_tls(), "{host}");
        assert_eq!(session_ssl(&mut client).await, "t", "{host}");
        client.identify_system().await.unwrap();
        client.close().await;
    }
}

#[tokio::test]
async fn a_certificate_from_another_ca_is_not_trusted() {
    let db = TestDatabase::create().await;
    let dir = TempDir::new();
    let wrong_ca = root_cert_param(&make_ca(&dir, "wrong-ca"));
    // require with a root certificate checks the chain too, as in libpq.
    for mode in ["verify-full", "verify-ca", "require"] {
        let url = url_at(
            &db,
            "127.0.0.1",
            None,
            &format!("sslmode={mode}&{wrong_ca}"),
        );
        let err = connect(&url).await.unwrap_err();
        assert!(
            matches!(err, ReplicationError::UntrustedCertificate { .. }),
            "{mode}: {err:?}"
        );
        assert!(!err.is_transient(), "{mode}: {err:?}");
        let message = err.to_string();
        assert!(message.contains("was not trusted"), "{mode}: {message}");
        assert!(
            message.contains(&format!("sslmode={mode}")),
            "{mode}: {message}"
        );
        assert!(chain(&err).contains("UnknownIssuer"), "{}", chain(&err));
    }
}

#[tokio::test]
async fn verify_ca_ignores_the_host_name_that_verify_full_checks() {
    let db = TestDatabase::create().await;
    let ca = root_cert_param(&pg_ca());
    // 127.0.0.2 forwards to the server, whose certificate names only localhost and
    // 127.0.0.1.
    let proxy = forward_from_127_0_0_2(pg_port(&db)).await;
    let host = proxy.ip().to_string();
    let port = Some(proxy.port());

    let url = url_at(&db, &host, port, &format!("sslmode=verify-full&{ca}"));
    let err = connect(&url).await.unwrap_err();
    assert!(
        matches!(
            err,
            ReplicationError::UntrustedCertificate {
                sslmode: SslMode::VerifyFull,
                ..
            }
        ),
        "{err:?}"
    );
    assert!(!err.is_transient());
    let text = chain(&err);
    assert!(text.contains("not trusted"), "{text}");
    assert!(text.contains("not valid for name"), "{text}");

    let url = url_at(&db, &host, port, &format!("sslmode=verify-ca&{ca}"));
    let mut client = connect(&url)
        .await
        .unwrap_or_else(|e| panic!("verify-ca through 127.0.0.2: {}", chain(&e)));
    assert!(client.is_tls());
    assert_eq!(session_ssl(&mut client).await, "t");
    client.close().await;
}

#[tokio::test]
async fn disable_is_plain_and_prefer_uses_tls_when_offered() {
    let db = TestDatabase::create().await;
    let cases = [
        ("sslmode=disable", false),
        ("sslmode=allow", true),
        ("sslmode=prefer", true),
        // prefer is the default.
        ("application_name=tls-default", true),
    ];
    for (params, tls) in cases {
        let mut client = connect(&url_at(&db, "127.0.0.1", None, params))
            .await
            .unwrap_or_else(|e| panic!("{params}: {}", chain(&e)));
        assert_eq!(client.is_tls(), tls, "{params}");
        let expected = if tls { "t" } else { "f" };
        assert_eq!(session_ssl(&mut client).await, expected, "{params}");
        client.close().await;
    }
}

#[tokio::test]
async fn a_client_certificate_is_loaded_and_a_mismatched_key_refused() {
    let db = TestDatabase::create().await;
    let dir = TempDir::new();
    make_ca(&dir, "client");
    make_ca(&dir, "other");
    let params = |cert: &str, key: &str| {
        format!(
            "sslmode=require&sslcert={}&sslkey={}",
            dir.path(cert).display(),
            dir.path(key).display()
        )
    };
    // The test server asks for no client certificate, so this one is loaded and
    // offered to nobody: the connection works as without it.
    let url = url_at(&db, "127.0.0.1", None, &params("client.crt", "client.key"));
    let mut client = connect(&url)
        .await
        .unwrap_or_else(|e| panic!("{}", chain(&e)));
    assert_eq!(session_ssl(&mut client).await, "t");
    client.close().await;

    let url = url_at(&db, "127.0.0.1", None, &params("client.crt", "other.key"));
    let err = connect(&url).await.unwrap_err();
    assert!(matches!(err, ReplicationError::TlsSetup { .. }), "{err:?}");
    assert!(!err.is_transient());
    assert!(
        chain(&err).contains("client certificate"),
        "{}",
        chain(&err)
    );
}

#[tokio::test]
async fn unusable_tls_settings_fail_before_connecting() {
    // Nothing listens on port 1; the settings are checked first.
    let config = ConnectConfig::from_url(
        "postgres://u@127.0.0.1:1/d?sslmode=verify-full&sslrootcert=/nonexistent/ca.crt",
    )
    .unwrap();
    let err = ReplicationClient::connect(&config).await.unwrap_err();
    assert!(matches!(err, ReplicationError::TlsSetup { .. }), "{err:?}");
    assert!(!err.is_transient());
    let text = chain(&err);
    assert!(text.contains("/nonexistent/ca.crt"), "{text}");

    let config = ConnectConfig::new("127.0.0.1", "u", "d")
        .with_port(1)
        .with_ssl_mode(SslMode::VerifyCa);
    let err = ReplicationClient::connect(&config).await.unwrap_err();
    assert!(chain(&err).contains("sslrootcert"), "{}", chain(&err));
}

/// A fake server: answers every SSLRequest with `answer`, then reports the next
/// bytes the client sends (up to 4 KiB) through the channel and hangs up.
async fn fake_server(answer: u8) -> (u16, tokio::sync::mpsc::UnboundedReceiver<Vec<u8>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut first = [0u8; 8];
                if socket.read_exact(&mut first).await.is_err() {
                    return;
                }
                if first != SSL_REQUEST {
                    // No SSLRequest (sslmode=disable): report the whole message that
                    // came instead (read to its end, so closing does not reset).
                    let len = u32::from_be_bytes([first[0], first[1], first[2], first[3]]);
                    let mut message = first.to_vec();
                    message.resize((len as usize).clamp(8, 4096), 0);
                    if socket.read_exact(&mut message[8..]).await.is_ok() {
                        let _ = tx.send(message);
                    }
                    return;
                }
                socket.write_all(&[answer]).await.unwrap();
                let mut next = vec![0u8; 4096];
                let read = timeout(DEADLINE, socket.read(&mut next))
                    .await
                    .unwrap_or(Ok(0))
                    .unwrap_or(0);
                next.truncate(read);
                let _ = tx.send(next);
                // Dropping the socket ends the connection.
            });
        }
    });
    (port, rx)
}

#[tokio::test]
async fn a_server_without_tls_fails_require_and_lets_prefer_go_on_in_plain_text() {
    let (port, mut sent) = fake_server(b'N').await;
    let url = |params: &str| format!("postgres://relay:pw@127.0.0.1:{port}/orders?{params}");

    for mode in ["require", "verify-ca", "verify-full"] {
        let ca = root_cert_param(Path::new("/nonexistent-is-never-read-with-n.crt"));
        let params = match mode {
            "require" => "sslmode=require".to_owned(),
            _ => format!("sslmode={mode}&{ca}"),
        };
        let err = connect(&url(&params)).await.unwrap_err();
        if mode == "require" {
            assert!(
                matches!(err, ReplicationError::TlsRefused { .. }),
                "{mode}: {err:?}"
            );
            assert!(!err.is_transient());
            let message = err.to_string();
            assert!(
                message.contains("does not accept TLS connections"),
                "{message}"
            );
            assert!(
                message.contains("sslmode=require requires TLS"),
                "{message}"
            );
            // After 'N' the client sent nothing more: the connection was closed.
            let after = timeout(DEADLINE, sent.recv()).await.unwrap().unwrap();
            assert!(after.is_empty(), "sent after N: {after:?}");
        } else {
            // The root certificate file is read before connecting.
            assert!(
                matches!(err, ReplicationError::TlsSetup { .. }),
                "{mode}: {err:?}"
            );
        }
    }

    for params in ["sslmode=prefer", "sslmode=allow", "connect_timeout=5"] {
        let err = connect(&url(params)).await.unwrap_err();
        // The fake server hangs up after the startup message.
        assert!(
            matches!(err, ReplicationError::ConnectionClosed { .. }),
            "{params}: {err:?}"
        );
        let startup = timeout(DEADLINE, sent.recv()).await.unwrap().unwrap();
        assert_startup_message(&startup, params);
    }

    // disable sends no SSLRequest: the startup message comes first.
    let err = connect(&url("sslmode=disable")).await.unwrap_err();
    assert!(
        matches!(err, ReplicationError::ConnectionClosed { .. }),
        "{err:?}"
    );
    let first = timeout(DEADLINE, sent.recv()).await.unwrap().unwrap();
    assert_startup_message(&first, "sslmode=disable");
}

/// `bytes` is a StartupMessage for user `relay` on database `orders` in
/// replication mode.
fn assert_startup_message(bytes: &[u8], context: &str) {
    assert!(bytes.len() > 8, "{context}: {bytes:?}");
    let len = u32::from_be_bytes(bytes[0..4].try_into().unwrap()) as usize;
    assert_eq!(len, bytes.len(), "{context}: one whole message: {bytes:?}");
    assert_eq!(&bytes[4..8], &[0, 3, 0, 0], "{context}: protocol 3.0");
    let params: Vec<&[u8]> = bytes[8..].split(|b| *b == 0).collect();
    let pair = |name: &[u8], value: &[u8]| params.windows(2).any(|w| w[0] == name && w[1] == value);
    assert!(pair(b"user", b"relay"), "{context}: {params:?}");
    assert!(pair(b"database", b"orders"), "{context}: {params:?}");
    assert!(pair(b"replication", b"database"), "{context}: {params:?}");
}

#[tokio::test]
async fn the_client_hello_names_dns_hosts_only_and_offers_postgresql_alpn() {
    let (port, mut sent) = fake_server(b'S').await;
    for (host, sni) in [("localhost", true), ("127.0.0.1", false)] {
        let err = connect(&format!(
            "postgres://relay@{host}:{port}/orders?sslmode=require"
        ))
        .await
        .unwrap_err();
        // The fake server hangs up in the middle of the handshake: network trouble.
        assert!(
            matches!(err, ReplicationError::Connect { .. }),
            "{host}: {err:?}"
        );
        assert!(err.is_transient(), "{host}: {err:?}");
        let hello = timeout(DEADLINE, sent.recv()).await.unwrap().unwrap();
        assert_eq!(hello.first(), Some(&0x16), "{host}: a TLS handshake record");
        let contains = |needle: &[u8]| hello.windows(needle.len()).any(|w| w == needle);
        assert_eq!(
            contains(host.as_bytes()),
            sni,
            "{host}: server name in {hello:?}"
        );
        assert!(contains(b"postgresql"), "{host}: ALPN in {hello:?}");
    }
}

#[tokio::test]
async fn a_strange_answer_to_the_ssl_request_is_a_protocol_violation() {
    let (port, _sent) = fake_server(b'E').await;
    let err = connect(&format!(
        "postgres://relay@127.0.0.1:{port}/orders?sslmode=prefer"
    ))
    .await
    .unwrap_err();
    assert!(matches!(err, ReplicationError::Protocol { .. }), "{err:?}");
    assert!(!err.is_transient());
    assert!(chain(&err).contains("SSLRequest"), "{}", chain(&err));
}
