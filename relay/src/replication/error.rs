//! Errors of the replication client, and whether retrying can help.

use std::io;
use std::time::Duration;

use super::config::SslMode;
use super::protocol::ProtocolError;
pub use super::server_error::ServerError;
use super::tls::TlsSetupError;

/// A replication connection could not do what was asked.
///
/// [`is_transient`](ReplicationError::is_transient) tells whether reconnecting and
/// trying again can help.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReplicationError {
    /// The TCP connection could not be opened, or broke during TLS negotiation.
    #[error("cannot connect to PostgreSQL at {host}:{port}")]
    Connect {
        /// Host as configured.
        host: String,
        /// Port as configured.
        port: u16,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The TLS settings cannot be used (a missing or unreadable certificate file,
    /// `verify-*` without a root certificate, a host name TLS cannot check).
    #[error("cannot set up TLS for PostgreSQL at {host}:{port}")]
    TlsSetup {
        /// Host as configured.
        host: String,
        /// Port as configured.
        port: u16,
        /// What is wrong with the settings (boxed: it is large and rare).
        #[source]
        source: Box<TlsSetupError>,
    },
    /// The server answered the SSLRequest with `N` and the `sslmode` requires TLS.
    #[error(
        "PostgreSQL at {host}:{port} does not accept TLS connections, and sslmode={sslmode} \
         requires TLS (turn ssl on in the server's configuration, or use sslmode=prefer)"
    )]
    TlsRefused {
        /// Host as configured.
        host: String,
        /// Port as configured.
        port: u16,
        /// The configured mode.
        sslmode: SslMode,
    },
    /// The server's certificate did not pass the check `sslmode` asks for (unknown
    /// issuer, expired, not valid for the host name, ...).
    #[error(
        "the TLS certificate of PostgreSQL at {host}:{port} was not trusted (sslmode={sslmode})"
    )]
    UntrustedCertificate {
        /// Host as configured.
        host: String,
        /// Port as configured.
        port: u16,
        /// The configured mode.
        sslmode: SslMode,
        /// rustls' verdict (boxed: it is large and rare).
        #[source]
        source: Box<rustls::Error>,
    },
    /// The TLS handshake failed for another reason than the certificate (no common
    /// protocol version or cipher suite, an alert from the server, for example
    /// when it refuses the client certificate).
    #[error("the TLS handshake with PostgreSQL at {host}:{port} failed")]
    TlsHandshake {
        /// Host as configured.
        host: String,
        /// Port as configured.
        port: u16,
        /// rustls' error (boxed: it is large and rare).
        #[source]
        source: Box<rustls::Error>,
    },
    /// TCP connect, startup and authentication together took longer than allowed.
    #[error("connecting to PostgreSQL at {host}:{port} timed out after {timeout:?}")]
    ConnectTimeout {
        /// Host as configured.
        host: String,
        /// Port as configured.
        port: u16,
        /// The configured connect timeout.
        timeout: Duration,
    },
    /// The server rejected the credentials (SQLSTATE class 28).
    #[error("authentication of user {user:?} was rejected by PostgreSQL at {host}:{port}")]
    AuthenticationFailed {
        /// The role that tried to log in.
        user: String,
        /// Host as configured.
        host: String,
        /// Port as configured.
        port: u16,
        /// The server's error.
        #[source]
        source: ServerError,
    },
    /// The client cannot authenticate the way the server asks, or the server's
    /// SCRAM proof did not verify.
    #[error("cannot authenticate user {user:?} at {host}:{port}: {reason}")]
    Authentication {
        /// The role that tried to log in.
        user: String,
        /// Host as configured.
        host: String,
        /// Port as configured.
        port: u16,
        /// What went wrong.
        reason: String,
        /// The underlying failure, where there is one.
        #[source]
        source: Option<io::Error>,
    },
    /// The server answered a command with an ErrorResponse.
    #[error("{operation} failed on PostgreSQL at {peer}")]
    Server {
        /// What the client asked for.
        operation: String,
        /// `host:port` of the server.
        peer: String,
        /// The server's error.
        #[source]
        source: ServerError,
    },
    /// Reading from or writing to the connection failed.
    #[error("{action} PostgreSQL at {peer} failed")]
    Io {
        /// `reading from` or `writing to`.
        action: &'static str,
        /// `host:port` of the server.
        peer: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The server closed the connection.
    #[error("connection to PostgreSQL at {peer} was closed while {during}")]
    ConnectionClosed {
        /// `host:port` of the server.
        peer: String,
        /// What the client was doing.
        during: &'static str,
    },
    /// The server sent something the protocol does not allow here.
    #[error("protocol violation by PostgreSQL at {peer}")]
    Protocol {
        /// `host:port` of the server.
        peer: String,
        /// What was wrong.
        #[source]
        source: ProtocolError,
    },
    /// An argument cannot be sent to the server (for example a NUL byte in a name).
    #[error("invalid {what}: {reason}")]
    InvalidArgument {
        /// Which argument.
        what: &'static str,
        /// What is wrong with it.
        reason: String,
    },
}

impl ReplicationError {
    /// Whether reconnecting and trying again can help.
    ///
    /// I/O errors (also during the TLS handshake), a closed connection, timeouts and
    /// the transient server errors of [`ServerError::is_transient`] are transient.
    /// Authentication failures, errors about the slot (missing: 42704; active
    /// elsewhere: 55006), missing privileges (42501), protocol violations, invalid
    /// arguments, unusable TLS settings, a server without TLS where TLS is
    /// required, an untrusted certificate and a TLS handshake rustls rejected are
    /// not.
    pub fn is_transient(&self) -> bool {
        match self {
            ReplicationError::Connect { .. }
            | ReplicationError::ConnectTimeout { .. }
            | ReplicationError::Io { .. }
            | ReplicationError::ConnectionClosed { .. } => true,
            ReplicationError::Server { source, .. } => source.is_transient(),
            ReplicationError::AuthenticationFailed { .. }
            | ReplicationError::Authentication { .. }
            | ReplicationError::Protocol { .. }
            | ReplicationError::InvalidArgument { .. }
            | ReplicationError::TlsSetup { .. }
            | ReplicationError::TlsRefused { .. }
            | ReplicationError::UntrustedCertificate { .. }
            | ReplicationError::TlsHandshake { .. } => false,
        }
    }

    /// The SQLSTATE code when the server reported the error.
    pub fn sqlstate(&self) -> Option<&str> {
        self.server_error().map(ServerError::code)
    }

    /// The server's error, when the server reported one.
    pub fn server_error(&self) -> Option<&ServerError> {
        match self {
            ReplicationError::AuthenticationFailed { source, .. }
            | ReplicationError::Server { source, .. } => Some(source),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server(code: &str) -> ServerError {
        ServerError::new(
            "ERROR".to_owned(),
            code.to_owned(),
            "something".to_owned(),
            None,
            None,
        )
    }

    fn failed(code: &str) -> ReplicationError {
        ReplicationError::Server {
            operation: "START_REPLICATION".to_owned(),
            peer: "127.0.0.1:5432".to_owned(),
            source: server(code),
        }
    }

    #[test]
    fn classifies_server_errors() {
        for code in [
            "08006", "08P01", "08001", "53300", "57P01", "57P02", "57P03",
        ] {
            assert!(failed(code).is_transient(), "{code} should be transient");
        }
        for code in [
            "28P01", "28000", "42704", "55006", "42501", "3D000", "22012", "XX000",
        ] {
            assert!(!failed(code).is_transient(), "{code} should be definite");
        }
        assert_eq!(failed("55006").sqlstate(), Some("55006"));
    }

    #[test]
    fn classifies_client_side_errors() {
        let io = || io::Error::new(io::ErrorKind::ConnectionReset, "reset");
        let peer = "h:1".to_owned();
        assert!(ReplicationError::Connect {
            host: "h".into(),
            port: 1,
            source: io()
        }
        .is_transient());
        assert!(ReplicationError::ConnectTimeout {
            host: "h".into(),
            port: 1,
            timeout: Duration::from_secs(1)
        }
        .is_transient());
        assert!(ReplicationError::Io {
            action: "reading from",
            peer: peer.clone(),
            source: io()
        }
        .is_transient());
        assert!(ReplicationError::ConnectionClosed {
            peer: peer.clone(),
            during: "streaming"
        }
        .is_transient());
        let protocol = ReplicationError::Protocol {
            peer,
            source: ProtocolError::UnknownCopyData { kind: 'q' },
        };
        assert!(!protocol.is_transient());
        assert_eq!(protocol.sqlstate(), None);
        let auth = ReplicationError::AuthenticationFailed {
            user: "relay".into(),
            host: "h".into(),
            port: 1,
            source: server("28P01"),
        };
        assert!(!auth.is_transient());
        assert_eq!(auth.sqlstate(), Some("28P01"));
        assert!(auth.to_string().contains("\"relay\""), "{auth}");
    }

    #[test]
    fn tls_failures_are_definite() {
        let refused = ReplicationError::TlsRefused {
            host: "h".into(),
            port: 1,
            sslmode: SslMode::VerifyFull,
        };
        assert!(!refused.is_transient());
        assert!(
            refused
                .to_string()
                .contains("sslmode=verify-full requires TLS"),
            "{refused}"
        );
        let untrusted = ReplicationError::UntrustedCertificate {
            host: "h".into(),
            port: 1,
            sslmode: SslMode::VerifyCa,
            source: Box::new(rustls::Error::InvalidCertificate(
                rustls::CertificateError::UnknownIssuer,
            )),
        };
        assert!(!untrusted.is_transient());
        assert_eq!(
            untrusted.to_string(),
            "the TLS certificate of PostgreSQL at h:1 was not trusted (sslmode=verify-ca)"
        );
        let setup = ReplicationError::TlsSetup {
            host: "h".into(),
            port: 1,
            source: Box::new(TlsSetupError::MissingRootCert {
                sslmode: SslMode::VerifyFull,
            }),
        };
        assert!(!setup.is_transient());
        let handshake = ReplicationError::TlsHandshake {
            host: "h".into(),
            port: 1,
            source: Box::new(rustls::Error::HandshakeNotComplete),
        };
        assert!(!handshake.is_transient());
    }

    #[test]
    fn displays_detail_and_hint_only_when_present() {
        assert_eq!(server("42704").to_string(), "ERROR 42704: something");
        let full = ServerError::new(
            "FATAL".into(),
            "57P01".into(),
            "terminating".into(),
            Some("d".into()),
            Some("h".into()),
        );
        assert_eq!(
            full.to_string(),
            "FATAL 57P01: terminating; detail: d; hint: h"
        );
    }
}
