//! The replication-protocol client: one PostgreSQL connection in
//! `replication=database` mode, spoken directly on `postgres-protocol` and tokio
//! (no libpq, no tokio-postgres).
//!
//! # Protocol flow
//!
//! 1. **Startup.** [`ReplicationClient::connect`] opens TCP and, unless
//!    `sslmode=disable`, sends an SSLRequest: on `S` it runs a TLS handshake
//!    (rustls) and goes on inside TLS, on `N` it goes on in plain text (`prefer`,
//!    `allow`) or gives up (`require`, `verify-ca`, `verify-full`); see
//!    [`SslMode`]. Then it sends a StartupMessage with `user`, `database`,
//!    `replication=database`, `application_name` and `client_encoding=UTF8`.
//! 2. **Authentication.** The server asks for nothing (trust), a cleartext
//!    password, an MD5 hash of it (salted), or SASL with `SCRAM-SHA-256` (three
//!    round trips; channel binding is not implemented, so `-PLUS` is never used,
//!    over TLS neither). After AuthenticationOk it reports ParameterStatus values
//!    (`server_version`, ...) and BackendKeyData, then ReadyForQuery. TCP connect,
//!    TLS handshake, startup and authentication share one deadline, the connect
//!    timeout.
//! 3. **Commands.** In this mode the connection takes replication commands and
//!    plain SQL through the simple query protocol: `IDENTIFY_SYSTEM`
//!    ([`ReplicationClient::identify_system`]), `CREATE_REPLICATION_SLOT`
//!    ([`ReplicationClient::create_logical_slot`]), any SQL
//!    ([`ReplicationClient::simple_query`]).
//! 4. **Streaming.** `START_REPLICATION SLOT s LOGICAL X/Y (options)`
//!    ([`ReplicationClient::start_logical_replication`]) answers with a
//!    CopyBothResponse (`W`, a message `postgres-protocol` 0.6 does not parse, so
//!    this module frames backend messages itself). From then on the server sends
//!    CopyData messages holding XLogData (`w`: one output-plugin message) or a
//!    primary keepalive (`k`), and the client sends CopyData holding standby status
//!    updates (`r`), whose `flush` position becomes the slot's
//!    `confirmed_flush_lsn` ([`ReplicationStream::send_status`]). The client must
//!    answer keepalives that request a reply, and report at least every
//!    `wal_sender_timeout` (60 s by default), or the server drops it.
//! 5. **End.** [`ReplicationStream::finish`] sends CopyDone and reads until
//!    ReadyForQuery, then sends Terminate. PostgreSQL 15 first sends whatever it
//!    has already decoded (the rest of a transaction, a keepalive), then CopyDone,
//!    two CommandCompletes (`COPY 0`, `START_REPLICATION`) and ReadyForQuery. A
//!    server-side end shows as `Ok(None)` from [`ReplicationStream::next`].
//!
//! NoticeResponse, ParameterStatus and NotificationResponse may arrive at any
//! point; they are logged (notices, at debug level) or recorded and skipped.
//!
//! # Cancel safety
//!
//! [`ReplicationStream::next`] can be a branch of `tokio::select!` and be dropped
//! at any time without losing bytes: the stream keeps its read buffer
//! (`BytesMut`), its only await is `read_buf` into that buffer (which reads
//! nothing when cancelled), and a message is cut off the buffer synchronously,
//! only on the path that returns it. Writes go through a buffer too, so a cancelled
//! [`ReplicationStream::send_status`] never leaves half a message on the wire: the
//! rest is sent before the next message. On a [`ReplicationClient`], a command
//! whose future was dropped leaves its result unread; the next command first reads
//! and discards it.
//!
//! # Errors
//!
//! [`ReplicationError::is_transient`] tells a caller whether to reconnect and try
//! again (network trouble, server shutdown, too many connections) or to give up
//! (bad credentials, missing slot, missing privilege, protocol violation). A slot
//! held by another process (SQLSTATE 55006) is reported as definite: the caller
//! retries it for a bounded time itself. TLS problems other than network trouble
//! (unusable settings, a server without TLS where TLS is required, an untrusted
//! certificate) are definite too.

mod config;
mod connection;
mod error;
pub mod protocol;
mod server_error;
mod tls;
mod transport;

use std::time::SystemTime;

use fallible_iterator::FallibleIterator;
use postgres_protocol::authentication::md5_hash;
use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256, SCRAM_SHA_256};
use postgres_protocol::message::{backend, frontend};

pub use config::{
    ConfigError, ConnectConfig, Secret, SslMode, DEFAULT_APPLICATION_NAME, DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_HOST, DEFAULT_PORT,
};
pub use error::{ReplicationError, ServerError};
pub use protocol::{ProtocolError, ReplicationMessage, StandbyStatus};
pub use tls::TlsSetupError;

use crate::Lsn;
use connection::Connection;
use protocol::{
    quote_identifier, quote_literal, ProtocolError as PE, COPY_BOTH_RESPONSE_TAG, COPY_DATA_TAG,
    COPY_DONE_TAG, ERROR_RESPONSE_TAG, READY_FOR_QUERY_TAG,
};
use transport::Transport;

/// Tag of an Authentication* message.
const AUTHENTICATION_TAG: u8 = b'R';
/// Tag of BackendKeyData.
const BACKEND_KEY_DATA_TAG: u8 = b'K';
/// Tag of RowDescription.
const ROW_DESCRIPTION_TAG: u8 = b'T';
/// Tag of DataRow.
const DATA_ROW_TAG: u8 = b'D';
/// Tag of CommandComplete.
const COMMAND_COMPLETE_TAG: u8 = b'C';
/// Tag of EmptyQueryResponse.
const EMPTY_QUERY_TAG: u8 = b'I';
/// Tag of CopyInResponse.
const COPY_IN_RESPONSE_TAG: u8 = b'G';
/// Tag of CopyOutResponse.
const COPY_OUT_RESPONSE_TAG: u8 = b'H';

/// How the server had the client authenticate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum AuthMethod {
    /// The server asked for nothing (`trust`, or a method outside the protocol).
    Trust,
    /// The password in clear text (`password`).
    Cleartext,
    /// A salted MD5 hash of password and user name (`md5`).
    Md5,
    /// SASL with SCRAM-SHA-256, without channel binding (`scram-sha-256`), over TLS
    /// too.
    ScramSha256,
}

/// The answer to `IDENTIFY_SYSTEM`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SystemIdentity {
    /// The cluster's system identifier (a decimal number, kept as text).
    pub systemid: String,
    /// The current timeline.
    pub timeline: u32,
    /// The current WAL flush position.
    pub xlogpos: Lsn,
    /// The database connected to (`None` for a physical replication connection).
    pub dbname: Option<String>,
}

/// What to do with the snapshot a new logical slot is consistent with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SnapshotMode {
    /// Export it (`EXPORT_SNAPSHOT`): other sessions may import it with
    /// `SET TRANSACTION SNAPSHOT` until this connection runs its next command.
    Export,
    /// Do not export it (`NOEXPORT_SNAPSHOT`).
    NoExport,
    /// Make it the snapshot of the current transaction of this connection
    /// (`USE_SNAPSHOT`); needs a `BEGIN ISOLATION LEVEL REPEATABLE READ` first.
    Use,
}

impl SnapshotMode {
    fn keyword(self) -> &'static str {
        match self {
            SnapshotMode::Export => "EXPORT_SNAPSHOT",
            SnapshotMode::NoExport => "NOEXPORT_SNAPSHOT",
            SnapshotMode::Use => "USE_SNAPSHOT",
        }
    }
}

/// The answer to `CREATE_REPLICATION_SLOT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreatedSlot {
    /// The slot's name.
    pub slot_name: String,
    /// The first WAL position whose transactions the slot will decode.
    pub consistent_point: Lsn,
    /// The exported snapshot's name ([`SnapshotMode::Export`] only).
    pub snapshot_name: Option<String>,
    /// The output plugin.
    pub output_plugin: String,
}

/// Rows of a simple query, with the column names of the last row description.
#[derive(Debug, Default)]
struct QueryResult {
    columns: Vec<String>,
    rows: Vec<Vec<Option<String>>>,
}

impl QueryResult {
    /// The single row a replication command returns.
    fn single_row(&self, command: &'static str) -> Result<&[Option<String>], PE> {
        match self.rows.as_slice() {
            [row] => Ok(row),
            rows => Err(PE::UnexpectedResult {
                command,
                reason: format!("expected one row, got {}", rows.len()),
            }),
        }
    }

    /// The value of column `name` in `row`, `None` for NULL.
    fn get<'a>(
        &self,
        row: &'a [Option<String>],
        command: &'static str,
        name: &str,
    ) -> Result<Option<&'a str>, PE> {
        let index =
            self.columns
                .iter()
                .position(|c| c == name)
                .ok_or_else(|| PE::UnexpectedResult {
                    command,
                    reason: format!("no column {name:?} in {:?}", self.columns),
                })?;
        Ok(row.get(index).and_then(|v| v.as_deref()))
    }

    /// The non-NULL value of column `name` in `row`.
    fn require<'a>(
        &self,
        row: &'a [Option<String>],
        command: &'static str,
        name: &str,
    ) -> Result<&'a str, PE> {
        self.get(row, command, name)?
            .ok_or_else(|| PE::UnexpectedResult {
                command,
                reason: format!("column {name:?} is NULL"),
            })
    }
}

/// One connection in `replication=database` mode, between commands.
#[derive(Debug)]
pub struct ReplicationClient {
    conn: Connection,
    auth_method: AuthMethod,
    /// ReadyForQuery messages still owed for commands whose futures were dropped.
    abandoned_results: usize,
}

impl ReplicationClient {
    /// Connects and logs in; TCP connect, TLS negotiation, startup and
    /// authentication together must finish within the configured connect timeout.
    ///
    /// Uses TLS as [`ConnectConfig::ssl_mode`] says. Supports trust, cleartext
    /// password, MD5 and SCRAM-SHA-256 authentication.
    pub async fn connect(config: &ConnectConfig) -> Result<ReplicationClient, ReplicationError> {
        let timeout = config.connect_timeout();
        match tokio::time::timeout(timeout, Self::connect_unbounded(config)).await {
            Ok(result) => result,
            Err(_elapsed) => Err(ReplicationError::ConnectTimeout {
                host: config.host().to_owned(),
                port: config.port(),
                timeout,
            }),
        }
    }

    async fn connect_unbounded(
        config: &ConnectConfig,
    ) -> Result<ReplicationClient, ReplicationError> {
        for (what, value) in [
            ("user name", config.user()),
            ("database name", config.dbname()),
            ("application name", config.application_name()),
        ] {
            check_no_nul(what, value)?;
        }
        let transport = Transport::connect(config).await?;
        let mut conn = Connection::new(transport, format!("{}:{}", config.host(), config.port()));
        frontend::startup_message(
            [
                ("user", config.user()),
                ("database", config.dbname()),
                ("replication", "database"),
                ("application_name", config.application_name()),
                ("client_encoding", "UTF8"),
            ],
            conn.write_buf(),
        )
        .map_err(|e| invalid_argument("startup parameter", e))?;
        conn.flush().await?;

        let auth_method = authenticate(&mut conn, config).await?;
        loop {
            let frame = conn.next_frame("starting up").await?;
            match frame.tag() {
                BACKEND_KEY_DATA_TAG => {}
                READY_FOR_QUERY_TAG => break,
                ERROR_RESPONSE_TAG => {
                    let error = conn.error_fields(&frame)?;
                    return Err(conn.server_error(
                        format!(
                            "starting a session for user {:?} on database {:?}",
                            config.user(),
                            config.dbname()
                        ),
                        error,
                    ));
                }
                tag => return Err(conn.unexpected(tag, "starting up")),
            }
        }
        tracing::debug!(
            peer = conn.peer(),
            user = config.user(),
            database = config.dbname(),
            server_version = conn.parameter("server_version").unwrap_or("unknown"),
            auth = ?auth_method,
            tls = conn.is_tls(),
            "replication connection ready"
        );
        Ok(ReplicationClient {
            conn,
            auth_method,
            abandoned_results: 0,
        })
    }

    /// The server's version as it reported it (`server_version`, e.g. `15.8 (Debian
    /// 15.8-1)`).
    pub fn server_version(&self) -> Option<&str> {
        self.conn.parameter("server_version")
    }

    /// A run-time parameter the server reported (ParameterStatus), such as
    /// `server_encoding` or `integer_datetimes`.
    pub fn parameter(&self, name: &str) -> Option<&str> {
        self.conn.parameter(name)
    }

    /// How the server had this client authenticate.
    pub fn auth_method(&self) -> AuthMethod {
        self.auth_method
    }

    /// Whether the connection is encrypted with TLS.
    pub fn is_tls(&self) -> bool {
        self.conn.is_tls()
    }

    /// Runs `IDENTIFY_SYSTEM`.
    pub async fn identify_system(&mut self) -> Result<SystemIdentity, ReplicationError> {
        const COMMAND: &str = "IDENTIFY_SYSTEM";
        let result = self.query(COMMAND.to_owned(), COMMAND).await?;
        let parse = || -> Result<SystemIdentity, PE> {
            let row = result.single_row(COMMAND)?;
            let timeline = result.require(row, COMMAND, "timeline")?;
            let xlogpos = result.require(row, COMMAND, "xlogpos")?;
            Ok(SystemIdentity {
                systemid: result.require(row, COMMAND, "systemid")?.to_owned(),
                timeline: timeline.parse().map_err(|_| PE::UnexpectedResult {
                    command: COMMAND,
                    reason: format!("timeline {timeline:?} is not a number"),
                })?,
                xlogpos: parse_lsn(COMMAND, xlogpos)?,
                dbname: result.get(row, COMMAND, "dbname")?.map(str::to_owned),
            })
        };
        parse().map_err(|e| self.conn.protocol_error(e))
    }

    /// Runs `sql` (SQL or a replication command) with the simple query protocol and
    /// returns the rows of all its statements as text; `None` is NULL.
    ///
    /// `COPY ... TO STDOUT` output is skipped, `COPY ... FROM STDIN` is refused, and
    /// `START_REPLICATION` is ended at once with an error: use
    /// [`start_logical_replication`](Self::start_logical_replication).
    pub async fn simple_query(
        &mut self,
        sql: &str,
    ) -> Result<Vec<Vec<Option<String>>>, ReplicationError> {
        Ok(self.query("query".to_owned(), sql).await?.rows)
    }

    /// Creates a logical replication slot with the PostgreSQL 10+ syntax
    /// `CREATE_REPLICATION_SLOT name [TEMPORARY] LOGICAL plugin
    /// EXPORT_SNAPSHOT|NOEXPORT_SNAPSHOT|USE_SNAPSHOT`.
    ///
    /// The server waits until every transaction running in the cluster has ended
    /// before the slot is consistent. A temporary slot disappears when this
    /// connection ends.
    pub async fn create_logical_slot(
        &mut self,
        slot: &str,
        plugin: &str,
        snapshot: SnapshotMode,
        temporary: bool,
    ) -> Result<CreatedSlot, ReplicationError> {
        const COMMAND: &str = "CREATE_REPLICATION_SLOT";
        check_no_nul("slot name", slot)?;
        check_no_nul("output plugin", plugin)?;
        let sql = format!(
            "CREATE_REPLICATION_SLOT {}{} LOGICAL {} {}",
            quote_identifier(slot),
            if temporary { " TEMPORARY" } else { "" },
            quote_identifier(plugin),
            snapshot.keyword()
        );
        let result = self
            .query(format!("creating replication slot {slot:?}"), &sql)
            .await?;
        let parse = || -> Result<CreatedSlot, PE> {
            let row = result.single_row(COMMAND)?;
            Ok(CreatedSlot {
                slot_name: result.require(row, COMMAND, "slot_name")?.to_owned(),
                consistent_point: parse_lsn(
                    COMMAND,
                    result.require(row, COMMAND, "consistent_point")?,
                )?,
                snapshot_name: result
                    .get(row, COMMAND, "snapshot_name")?
                    .map(str::to_owned),
                output_plugin: result.require(row, COMMAND, "output_plugin")?.to_owned(),
            })
        };
        parse().map_err(|e| self.conn.protocol_error(e))
    }

    /// Starts streaming changes of logical slot `slot` from `start` with
    /// `START_REPLICATION SLOT "slot" LOGICAL X/Y ("name" 'value', ...)`.
    ///
    /// The server sends every transaction that commits after the slot's
    /// `confirmed_flush_lsn` (or after `start`, if that is later). Option names are
    /// quoted as identifiers and values as literals, so any text passes unchanged to
    /// the output plugin (for pgoutput: `proto_version`, `publication_names`, ...).
    ///
    /// On failure the connection is closed: a slot active in another process
    /// (SQLSTATE 55006) is retried on a new connection.
    pub async fn start_logical_replication(
        mut self,
        slot: &str,
        start: Lsn,
        options: &[(&str, &str)],
    ) -> Result<ReplicationStream, ReplicationError> {
        check_no_nul("slot name", slot)?;
        let mut sql = format!(
            "START_REPLICATION SLOT {} LOGICAL {start}",
            quote_identifier(slot)
        );
        if !options.is_empty() {
            let mut list = Vec::with_capacity(options.len());
            for (name, value) in options {
                check_no_nul("replication option name", name)?;
                check_no_nul("replication option value", value)?;
                list.push(format!(
                    "{} {}",
                    quote_identifier(name),
                    quote_literal(value)
                ));
            }
            sql.push_str(" (");
            sql.push_str(&list.join(", "));
            sql.push(')');
        }
        self.discard_abandoned_results().await?;
        self.send_query(&sql).await?;

        let during = "starting replication";
        let frame = self.conn.next_frame(during).await?;
        match frame.tag() {
            COPY_BOTH_RESPONSE_TAG => {
                protocol::parse_copy_both_response(frame.body())
                    .map_err(|e| self.conn.protocol_error(e))?;
                tracing::debug!(peer = self.conn.peer(), slot, %start, "replication started");
                Ok(ReplicationStream {
                    conn: self.conn,
                    slot: slot.to_owned(),
                    server_done: false,
                })
            }
            ERROR_RESPONSE_TAG => {
                let error = self.conn.error_fields(&frame)?;
                let error = self
                    .conn
                    .server_error(format!("starting replication from slot {slot:?}"), error);
                // Leave the connection tidy before closing it; failures here change
                // nothing about the answer.
                let _ = self.wait_ready(during).await;
                self.conn.terminate().await;
                Err(error)
            }
            tag => Err(self.conn.unexpected(tag, during)),
        }
    }

    /// Ends the session politely (Terminate).
    pub async fn close(self) {
        self.conn.terminate().await;
    }

    /// Sends `sql` and collects its result; an ErrorResponse becomes
    /// [`ReplicationError::Server`] for `operation`, after the server is ready again.
    async fn query(
        &mut self,
        operation: String,
        sql: &str,
    ) -> Result<QueryResult, ReplicationError> {
        self.discard_abandoned_results().await?;
        self.send_query(sql).await?;
        let during = "waiting for a query result";
        let mut result = QueryResult::default();
        let mut error = None;
        let mut refused_copy_both = false;
        loop {
            let frame = self.conn.next_frame(during).await?;
            match frame.tag() {
                ROW_DESCRIPTION_TAG => match self.conn.parse_known(frame)? {
                    backend::Message::RowDescription(body) => {
                        result.columns = body
                            .fields()
                            .map(|field| Ok(field.name().to_owned()))
                            .collect()
                            .map_err(|e| self.malformed("row description", &e))?;
                    }
                    _ => return Err(self.conn.unexpected(ROW_DESCRIPTION_TAG, during)),
                },
                DATA_ROW_TAG => match self.conn.parse_known(frame)? {
                    backend::Message::DataRow(body) => {
                        let buffer = body.buffer();
                        let row = body
                            .ranges()
                            .map(|range| {
                                range
                                    .map(|r| {
                                        let bytes = buffer.get(r).ok_or_else(|| {
                                            std::io::Error::other("column range out of bounds")
                                        })?;
                                        String::from_utf8(bytes.to_vec()).map_err(|_| {
                                            std::io::Error::other("column value is not UTF-8")
                                        })
                                    })
                                    .transpose()
                            })
                            .collect()
                            .map_err(|e| self.malformed("data row", &e))?;
                        result.rows.push(row);
                    }
                    _ => return Err(self.conn.unexpected(DATA_ROW_TAG, during)),
                },
                COMMAND_COMPLETE_TAG | EMPTY_QUERY_TAG => {}
                // COPY TO STDOUT: its data is skipped.
                COPY_OUT_RESPONSE_TAG | COPY_DATA_TAG | COPY_DONE_TAG => {}
                COPY_IN_RESPONSE_TAG => {
                    frontend::copy_fail(
                        "the replication client does not send COPY data",
                        self.conn.write_buf(),
                    )
                    .map_err(|e| invalid_argument("copy fail message", e))?;
                    self.conn.flush().await?;
                }
                COPY_BOTH_RESPONSE_TAG => {
                    // START_REPLICATION through simple_query: end the copy at once and
                    // report it once the server is ready again.
                    frontend::copy_done(self.conn.write_buf());
                    self.conn.flush().await?;
                    refused_copy_both = true;
                }
                ERROR_RESPONSE_TAG => {
                    let fields = self.conn.error_fields(&frame)?;
                    error.get_or_insert(fields);
                }
                READY_FOR_QUERY_TAG => {
                    self.abandoned_results = self.abandoned_results.saturating_sub(1);
                    break;
                }
                tag => return Err(self.conn.unexpected(tag, during)),
            }
        }
        if let Some(error) = error {
            return Err(self.conn.server_error(operation, error));
        }
        if refused_copy_both {
            return Err(ReplicationError::InvalidArgument {
                what: "query",
                reason: "it started streaming; use start_logical_replication".to_owned(),
            });
        }
        Ok(result)
    }

    /// Queues and sends a Query message; the server owes one more ReadyForQuery,
    /// counted until it arrives so a dropped command's result can be skipped.
    async fn send_query(&mut self, sql: &str) -> Result<(), ReplicationError> {
        check_no_nul("query", sql)?;
        frontend::query(sql, self.conn.write_buf()).map_err(|e| invalid_argument("query", e))?;
        self.abandoned_results += 1;
        self.conn.flush().await
    }

    /// Reads and discards results of commands whose futures were dropped.
    async fn discard_abandoned_results(&mut self) -> Result<(), ReplicationError> {
        while self.abandoned_results > 0 {
            self.wait_ready("discarding the result of an abandoned command")
                .await?;
        }
        Ok(())
    }

    /// Skips messages up to and including the next ReadyForQuery.
    async fn wait_ready(&mut self, during: &'static str) -> Result<(), ReplicationError> {
        loop {
            let frame = self.conn.next_frame(during).await?;
            match frame.tag() {
                READY_FOR_QUERY_TAG => {
                    self.abandoned_results = self.abandoned_results.saturating_sub(1);
                    return Ok(());
                }
                COPY_IN_RESPONSE_TAG => {
                    frontend::copy_fail("abandoned", self.conn.write_buf())
                        .map_err(|e| invalid_argument("copy fail message", e))?;
                    self.conn.flush().await?;
                }
                COPY_BOTH_RESPONSE_TAG => {
                    frontend::copy_done(self.conn.write_buf());
                    self.conn.flush().await?;
                }
                _ => {}
            }
        }
    }

    fn malformed(&self, what: &'static str, error: &std::io::Error) -> ReplicationError {
        self.conn.protocol_error(PE::Malformed {
            what,
            reason: error.to_string(),
        })
    }
}

/// Runs the authentication exchange after the StartupMessage, up to
/// AuthenticationOk.
async fn authenticate(
    conn: &mut Connection,
    config: &ConnectConfig,
) -> Result<AuthMethod, ReplicationError> {
    let during = "authenticating";
    let auth_error =
        |reason: String, source: Option<std::io::Error>| ReplicationError::Authentication {
            user: config.user().to_owned(),
            host: config.host().to_owned(),
            port: config.port(),
            reason,
            source,
        };
    let password = || {
        config.password().map(Secret::expose).ok_or_else(|| {
            auth_error(
                "the server asks for a password and the connection URL has none".to_owned(),
                None,
            )
        })
    };
    let mut method = AuthMethod::Trust;
    let mut scram: Option<ScramSha256> = None;
    let mut scram_verified = false;
    loop {
        let frame = conn.next_frame(during).await?;
        match frame.tag() {
            AUTHENTICATION_TAG => {}
            ERROR_RESPONSE_TAG => {
                let error = conn.error_fields(&frame)?;
                return Err(if error.code().starts_with("28") {
                    ReplicationError::AuthenticationFailed {
                        user: config.user().to_owned(),
                        host: config.host().to_owned(),
                        port: config.port(),
                        source: error,
                    }
                } else {
                    conn.server_error(
                        format!(
                            "logging in as user {:?} to database {:?}",
                            config.user(),
                            config.dbname()
                        ),
                        error,
                    )
                });
            }
            tag => return Err(conn.unexpected(tag, during)),
        }
        match conn.parse_known(frame)? {
            backend::Message::AuthenticationOk => {
                // A server that skips SASLFinal never proved it knows the password.
                if scram.is_some() && !scram_verified {
                    return Err(auth_error(
                        "the server ended SCRAM authentication without proving its identity"
                            .to_owned(),
                        None,
                    ));
                }
                return Ok(method);
            }
            backend::Message::AuthenticationCleartextPassword => {
                method = AuthMethod::Cleartext;
                frontend::password_message(password()?.as_bytes(), conn.write_buf())
                    .map_err(|e| invalid_argument("password", e))?;
            }
            backend::Message::AuthenticationMd5Password(body) => {
                method = AuthMethod::Md5;
                let hash = md5_hash(
                    config.user().as_bytes(),
                    password()?.as_bytes(),
                    body.salt(),
                );
                frontend::password_message(hash.as_bytes(), conn.write_buf())
                    .map_err(|e| invalid_argument("password", e))?;
            }
            backend::Message::AuthenticationSasl(body) => {
                let mechanisms: Vec<String> = body
                    .mechanisms()
                    .map(|m| Ok(m.to_owned()))
                    .collect()
                    .map_err(|e| {
                        conn.protocol_error(PE::Malformed {
                            what: "SASL mechanism list",
                            reason: e.to_string(),
                        })
                    })?;
                if !mechanisms.iter().any(|m| m == SCRAM_SHA_256) {
                    return Err(auth_error(
                        format!(
                            "the server offers the SASL mechanisms {mechanisms:?}, and only \
                             {SCRAM_SHA_256} is supported (channel binding is not implemented)"
                        ),
                        None,
                    ));
                }
                method = AuthMethod::ScramSha256;
                // No channel binding, over TLS neither: the client says it does not
                // support it ('n'), which servers offering -PLUS accept.
                let exchange =
                    ScramSha256::new(password()?.as_bytes(), ChannelBinding::unsupported());
                frontend::sasl_initial_response(
                    SCRAM_SHA_256,
                    exchange.message(),
                    conn.write_buf(),
                )
                .map_err(|e| invalid_argument("SASL response", e))?;
                scram = Some(exchange);
            }
            backend::Message::AuthenticationSaslContinue(body) => {
                let Some(exchange) = scram.as_mut() else {
                    return Err(conn.unexpected(AUTHENTICATION_TAG, "authenticating without SASL"));
                };
                exchange.update(body.data()).map_err(|e| {
                    auth_error(
                        "the server's SCRAM challenge is invalid".to_owned(),
                        Some(e),
                    )
                })?;
                frontend::sasl_response(exchange.message(), conn.write_buf())
                    .map_err(|e| invalid_argument("SASL response", e))?;
            }
            backend::Message::AuthenticationSaslFinal(body) => {
                let Some(exchange) = scram.as_mut() else {
                    return Err(conn.unexpected(AUTHENTICATION_TAG, "authenticating without SASL"));
                };
                exchange.finish(body.data()).map_err(|e| {
                    auth_error(
                        "the server's SCRAM signature does not verify (is it the server the \
                         URL names?)"
                            .to_owned(),
                        Some(e),
                    )
                })?;
                scram_verified = true;
                continue;
            }
            other => {
                let name = match other {
                    backend::Message::AuthenticationKerberosV5 => "Kerberos V5",
                    backend::Message::AuthenticationScmCredential => "SCM credential",
                    backend::Message::AuthenticationGss
                    | backend::Message::AuthenticationGssContinue(_) => "GSSAPI",
                    backend::Message::AuthenticationSspi => "SSPI",
                    _ => "an unknown",
                };
                return Err(auth_error(
                    format!("the server asks for {name} authentication, which is not supported"),
                    None,
                ));
            }
        }
        conn.flush().await?;
    }
}

/// A logical replication stream in copy-both mode.
///
/// Read with [`next`](Self::next) (cancel-safe), report progress with
/// [`send_status`](Self::send_status), end with [`finish`](Self::finish).
#[derive(Debug)]
pub struct ReplicationStream {
    conn: Connection,
    slot: String,
    /// The server ended the copy (CopyDone or an error): nothing more will come.
    server_done: bool,
}

impl ReplicationStream {
    /// The next XLogData or keepalive; `Ok(None)` once the server has ended the
    /// stream (CopyDone).
    ///
    /// Cancel-safe: use it in `tokio::select!` and drop it mid-read freely; bytes
    /// already received stay in the stream's buffer for the next call.
    pub async fn next(&mut self) -> Result<Option<ReplicationMessage>, ReplicationError> {
        if self.server_done {
            return Ok(None);
        }
        let during = "streaming";
        let frame = self.conn.next_frame(during).await?;
        match frame.tag() {
            COPY_DATA_TAG => protocol::parse_copy_data(frame.into_body())
                .map(Some)
                .map_err(|e| self.conn.protocol_error(e)),
            // A walsender that shuts down (the server stops) ends the stream with
            // CommandComplete ("COPY 0") and no CopyDone; either way nothing more
            // comes, and the caller reconnects once the server is back.
            COPY_DONE_TAG | COMMAND_COMPLETE_TAG => {
                self.server_done = true;
                Ok(None)
            }
            ERROR_RESPONSE_TAG => {
                self.server_done = true;
                let error = self.conn.error_fields(&frame)?;
                Err(self
                    .conn
                    .server_error(format!("streaming from slot {:?}", self.slot), error))
            }
            tag => Err(self.conn.unexpected(tag, during)),
        }
    }

    /// Sends a standby status update (`r`) stamped with the current time.
    ///
    /// `status.flush` is what the server keeps as the slot's
    /// `confirmed_flush_lsn`. A cancelled call may or may not have sent the update,
    /// but never leaves a partial message: the rest goes out first on the next call.
    pub async fn send_status(&mut self, status: StandbyStatus) -> Result<(), ReplicationError> {
        let clock = protocol::pg_micros_from_system_time(SystemTime::now());
        protocol::encode_standby_status(&status, clock, self.conn.write_buf());
        self.conn.flush().await
    }

    /// The slot this stream reads.
    pub fn slot(&self) -> &str {
        &self.slot
    }

    /// Ends the stream: sends CopyDone, skips what the server still sends until it
    /// ends the copy and is ready for a command, then terminates the connection.
    ///
    /// Messages not yet read are dropped (the slot sends them again from its
    /// confirmed position next time). Bound it with a timeout if the server may be
    /// unresponsive.
    pub async fn finish(mut self) -> Result<(), ReplicationError> {
        frontend::copy_done(self.conn.write_buf());
        self.conn.flush().await?;
        let during = "ending replication";
        let mut error = None;
        loop {
            let frame = self.conn.next_frame(during).await?;
            match frame.tag() {
                COPY_DATA_TAG => {}
                COPY_DONE_TAG => self.server_done = true,
                // Physical replication may send a result set after the copy.
                COMMAND_COMPLETE_TAG | ROW_DESCRIPTION_TAG | DATA_ROW_TAG => {}
                ERROR_RESPONSE_TAG => {
                    let fields = self.conn.error_fields(&frame)?;
                    error.get_or_insert(fields);
                }
                READY_FOR_QUERY_TAG => break,
                tag => return Err(self.conn.unexpected(tag, during)),
            }
        }
        let operation = format!("ending replication from slot {:?}", self.slot);
        let error = error.map(|e| self.conn.server_error(operation, e));
        self.conn.terminate().await;
        error.map_or(Ok(()), Err)
    }
}

fn parse_lsn(command: &'static str, text: &str) -> Result<Lsn, PE> {
    text.parse().map_err(|_| PE::UnexpectedResult {
        command,
        reason: format!("{text:?} is not an LSN"),
    })
}

fn check_no_nul(what: &'static str, value: &str) -> Result<(), ReplicationError> {
    if value.contains('\0') {
        return Err(ReplicationError::InvalidArgument {
            what,
            reason: "it contains a NUL byte".to_owned(),
        });
    }
    Ok(())
}

fn invalid_argument(what: &'static str, error: std::io::Error) -> ReplicationError {
    ReplicationError::InvalidArgument {
        what,
        reason: error.to_string(),
    }
}
