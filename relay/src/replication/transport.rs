//! The byte stream under a replication connection: plain TCP, or TLS (rustls)
//! negotiated with an SSLRequest before the startup message.
//!
//! # TLS negotiation
//!
//! Unless `sslmode=disable`, the client sends an SSLRequest (Int32 8, Int32
//! 80877103) as the first bytes on the connection. The server answers with one
//! unencrypted byte: `S` (go ahead with the TLS handshake) or `N` (no TLS here).
//! After `N`, `prefer` and `allow` go on in plain text on the same connection and
//! `require`, `verify-ca` and `verify-full` give up. After `S`, the rustls client
//! handshake runs over the TCP stream, and the startup message follows inside TLS.
//!
//! Exactly one byte is read as the answer, straight from the socket and without a
//! buffer, so bytes a man in the middle might append after the `S` go to the TLS
//! layer (and fail the handshake) instead of being taken as server messages
//! (CVE-2021-23222).
//!
//! Nothing above this module sees which kind of stream it has, except through
//! [`Transport::is_tls`].

use std::fmt;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::BytesMut;
use postgres_protocol::message::frontend;
use rustls::ClientConfig;
use rustls_pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use super::config::{ConnectConfig, SslMode};
use super::error::ReplicationError;
use super::protocol::ProtocolError;
use super::tls::{self, TlsSetupError};

/// The server's answer to an SSLRequest when it will do TLS.
const TLS_ACCEPTED: u8 = b'S';
/// The server's answer to an SSLRequest when it will not.
const TLS_REFUSED: u8 = b'N';

/// An open connection to the server.
pub(crate) enum Transport {
    /// Unencrypted TCP.
    Tcp(TcpStream),
    /// TLS over TCP (boxed: the TLS state is large).
    Tls(Box<TlsStream<TcpStream>>),
}

impl fmt::Debug for Transport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Transport::Tcp(_) => f.write_str("Tcp"),
            Transport::Tls(stream) => {
                let (_, session) = stream.get_ref();
                f.debug_struct("Tls")
                    .field("version", &session.protocol_version())
                    .field(
                        "cipher_suite",
                        &session.negotiated_cipher_suite().map(|s| s.suite()),
                    )
                    .finish()
            }
        }
    }
}

impl Transport {
    /// Opens a TCP connection (trying every address the host resolves to in turn)
    /// and negotiates TLS as the configuration's [`SslMode`] says.
    ///
    /// Network failures are [`ReplicationError::Connect`] (transient); a server
    /// without TLS where TLS is required, an untrusted certificate, a failed
    /// handshake and unusable TLS settings are definite.
    pub(crate) async fn connect(config: &ConnectConfig) -> Result<Transport, ReplicationError> {
        let (host, port) = (config.host(), config.port());
        let mode = config.ssl_mode();
        let connect_error = |source| ReplicationError::Connect {
            host: host.to_owned(),
            port,
            source,
        };
        // Settings first: a bad file fails without a round trip to the server.
        let tls = match mode {
            SslMode::Disable => None,
            _ => Some(
                tls_settings(config).map_err(|source| ReplicationError::TlsSetup {
                    host: host.to_owned(),
                    port,
                    source: Box::new(source),
                })?,
            ),
        };
        let mut stream = TcpStream::connect((host, port))
            .await
            .map_err(connect_error)?;
        // Standby status updates are small and latency matters more than packing.
        stream.set_nodelay(true).map_err(connect_error)?;
        let Some((tls, server_name)) = tls else {
            return Ok(Transport::Tcp(stream));
        };

        match request_tls(&mut stream).await.map_err(connect_error)? {
            TLS_ACCEPTED => {}
            TLS_REFUSED if mode.requires_tls() => {
                return Err(ReplicationError::TlsRefused {
                    host: host.to_owned(),
                    port,
                    sslmode: mode,
                });
            }
            TLS_REFUSED => {
                tracing::debug!(
                    host,
                    port,
                    sslmode = %mode,
                    "server does not offer TLS; going on without it"
                );
                return Ok(Transport::Tcp(stream));
            }
            other => {
                return Err(ReplicationError::Protocol {
                    peer: format!("{host}:{port}"),
                    source: ProtocolError::Unexpected {
                        tag: char::from(other),
                        during: "negotiating TLS (answer to SSLRequest)",
                    },
                });
            }
        }

        let stream = TlsConnector::from(tls)
            .connect(server_name, stream)
            .await
            .map_err(|error| handshake_error(config, error))?;
        Ok(Transport::Tls(Box::new(stream)))
    }

    /// Whether the connection is encrypted.
    pub(crate) fn is_tls(&self) -> bool {
        matches!(self, Transport::Tls(_))
    }
}

/// The rustls configuration and the name to check the certificate against.
fn tls_settings(
    config: &ConnectConfig,
) -> Result<(Arc<ClientConfig>, ServerName<'static>), TlsSetupError> {
    Ok((
        tls::client_config(config)?,
        tls::server_name(config.host())?,
    ))
}

/// Sends an SSLRequest and reads the one-byte answer.
async fn request_tls(stream: &mut TcpStream) -> io::Result<u8> {
    let mut request = BytesMut::with_capacity(8);
    frontend::ssl_request(&mut request);
    stream.write_all(&request).await?;
    stream.flush().await?;
    let mut answer = [0u8; 1];
    stream.read_exact(&mut answer).await?;
    Ok(answer[0])
}

/// Sorts a failed handshake: rustls' verdicts are definite, network trouble is
/// transient.
fn handshake_error(config: &ConnectConfig, error: io::Error) -> ReplicationError {
    let host = config.host().to_owned();
    let port = config.port();
    let kind = error.kind();
    let source = match error
        .into_inner()
        .map(|inner| inner.downcast::<rustls::Error>())
    {
        Some(Ok(source)) => source,
        Some(Err(inner)) => {
            return ReplicationError::Connect {
                host,
                port,
                source: io::Error::new(kind, inner),
            }
        }
        None => {
            return ReplicationError::Connect {
                host,
                port,
                source: kind.into(),
            }
        }
    };
    match *source {
        rustls::Error::InvalidCertificate(_) => ReplicationError::UntrustedCertificate {
            host,
            port,
            sslmode: config.ssl_mode(),
            source,
        },
        _ => ReplicationError::TlsHandshake { host, port, source },
    }
}

impl AsyncRead for Transport {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Transport::Tcp(stream) => Pin::new(stream).poll_read(cx, buf),
            Transport::Tls(stream) => Pin::new(stream.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Transport {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Transport::Tcp(stream) => Pin::new(stream).poll_write(cx, buf),
            Transport::Tls(stream) => Pin::new(stream.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Transport::Tcp(stream) => Pin::new(stream).poll_flush(cx),
            Transport::Tls(stream) => Pin::new(stream.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Transport::Tcp(stream) => Pin::new(stream).poll_shutdown(cx),
            // Sends close_notify, then shuts the TCP stream down.
            Transport::Tls(stream) => Pin::new(stream.as_mut()).poll_shutdown(cx),
        }
    }
}
