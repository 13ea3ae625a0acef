//! One framed connection: a transport plus the read and write buffers that make
//! reading and writing cancel-safe.
//!
//! Reads go into `read_buf` with `read_buf` (cancel-safe in tokio: a cancelled read
//! has read nothing), and whole messages are cut off it synchronously. A future
//! dropped at its await point therefore leaves every byte received in the buffer
//! for the next call. Writes are appended to `write_buf` first and drained from it;
//! a cancelled flush leaves the unsent rest there, and the next flush sends it
//! before anything new, so the server never sees a torn message.

use std::collections::HashMap;
use std::fmt;
use std::io;

use bytes::{Buf, BytesMut};
use postgres_protocol::message::backend;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::error::{ReplicationError, ServerError};
use super::protocol::{self, Frame, ProtocolError, NOTICE_RESPONSE_TAG, PARAMETER_STATUS_TAG};
use super::transport::Transport;

/// How much buffer space a read asks for at least.
const READ_CHUNK: usize = 64 * 1024;
/// Tag of a NotificationResponse (LISTEN/NOTIFY), which may arrive at any time.
const NOTIFICATION_RESPONSE_TAG: u8 = b'A';

pub(crate) struct Connection {
    transport: Transport,
    read_buf: BytesMut,
    write_buf: BytesMut,
    peer: String,
    parameters: HashMap<String, String>,
}

impl fmt::Debug for Connection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The buffers may hold row data or a password message: show only sizes.
        f.debug_struct("Connection")
            .field("peer", &self.peer)
            .field("transport", &self.transport)
            .field("buffered_in", &self.read_buf.len())
            .field("buffered_out", &self.write_buf.len())
            .finish_non_exhaustive()
    }
}

impl Connection {
    pub(crate) fn new(transport: Transport, peer: String) -> Connection {
        Connection {
            transport,
            read_buf: BytesMut::with_capacity(READ_CHUNK),
            write_buf: BytesMut::new(),
            peer,
            parameters: HashMap::new(),
        }
    }

    /// `host:port` of the server, for messages.
    pub(crate) fn peer(&self) -> &str {
        &self.peer
    }

    /// Whether the connection is encrypted with TLS.
    pub(crate) fn is_tls(&self) -> bool {
        self.transport.is_tls()
    }

    /// A parameter the server reported with ParameterStatus.
    pub(crate) fn parameter(&self, name: &str) -> Option<&str> {
        self.parameters.get(name).map(String::as_str)
    }

    /// Where outgoing messages are appended; [`Connection::flush`] sends them.
    pub(crate) fn write_buf(&mut self) -> &mut BytesMut {
        &mut self.write_buf
    }

    pub(crate) fn protocol_error(&self, source: ProtocolError) -> ReplicationError {
        ReplicationError::Protocol {
            peer: self.peer.clone(),
            source,
        }
    }

    pub(crate) fn unexpected(&self, tag: u8, during: &'static str) -> ReplicationError {
        self.protocol_error(ProtocolError::Unexpected {
            tag: char::from(tag),
            during,
        })
    }

    pub(crate) fn server_error(&self, operation: String, source: ServerError) -> ReplicationError {
        ReplicationError::Server {
            operation,
            peer: self.peer.clone(),
            source,
        }
    }

    /// Decodes an ErrorResponse body.
    pub(crate) fn error_fields(&self, frame: &Frame) -> Result<ServerError, ReplicationError> {
        protocol::parse_error_fields(frame.body()).map_err(|e| self.protocol_error(e))
    }

    /// Decodes a message `postgres-protocol` knows (everything but CopyBothResponse).
    pub(crate) fn parse_known(&self, frame: Frame) -> Result<backend::Message, ReplicationError> {
        let tag = frame.tag();
        let mut raw = frame.into_raw();
        match backend::Message::parse(&mut raw) {
            Ok(Some(message)) => Ok(message),
            Ok(None) => Err(self.protocol_error(ProtocolError::Malformed {
                what: "backend message",
                reason: format!("message {:?} is incomplete", char::from(tag)),
            })),
            Err(e) => Err(self.protocol_error(ProtocolError::Malformed {
                what: "backend message",
                reason: format!("message {:?}: {e}", char::from(tag)),
            })),
        }
    }

    /// Sends everything in the write buffer. Cancel-safe: what was not written
    /// stays in the buffer and goes out first on the next flush.
    pub(crate) async fn flush(&mut self) -> Result<(), ReplicationError> {
        while self.write_buf.has_remaining() {
            let written = self
                .transport
                .write_buf(&mut self.write_buf)
                .await
                .map_err(|source| self.io_error("writing to", source))?;
            if written == 0 {
                return Err(self.io_error("writing to", io::ErrorKind::WriteZero.into()));
            }
        }
        self.transport
            .flush()
            .await
            .map_err(|source| self.io_error("writing to", source))
    }

    /// The next message that is not a notice, a parameter status or a
    /// notification (those are handled here). Cancel-safe.
    pub(crate) async fn next_frame(
        &mut self,
        during: &'static str,
    ) -> Result<Frame, ReplicationError> {
        loop {
            let frame = self.read_frame(during).await?;
            match frame.tag() {
                NOTICE_RESPONSE_TAG => match protocol::parse_error_fields(frame.body()) {
                    Ok(notice) => tracing::debug!(
                        peer = %self.peer,
                        severity = notice.severity(),
                        code = notice.code(),
                        message = notice.message(),
                        "server notice"
                    ),
                    Err(e) => return Err(self.protocol_error(e)),
                },
                PARAMETER_STATUS_TAG => match self.parse_known(frame)? {
                    backend::Message::ParameterStatus(body) => {
                        let (Ok(name), Ok(value)) = (body.name(), body.value()) else {
                            return Err(self.protocol_error(ProtocolError::Malformed {
                                what: "parameter status",
                                reason: "name or value is not UTF-8".to_owned(),
                            }));
                        };
                        self.parameters.insert(name.to_owned(), value.to_owned());
                    }
                    _ => return Err(self.unexpected(PARAMETER_STATUS_TAG, during)),
                },
                NOTIFICATION_RESPONSE_TAG => {}
                _ => return Ok(frame),
            }
        }
    }

    /// The next complete message. Cancel-safe: the only await is a read into the
    /// connection's buffer, and a message is cut off the buffer only when it is
    /// returned.
    async fn read_frame(&mut self, during: &'static str) -> Result<Frame, ReplicationError> {
        loop {
            if let Some(frame) =
                protocol::split_frame(&mut self.read_buf).map_err(|e| self.protocol_error(e))?
            {
                return Ok(frame);
            }
            let missing =
                protocol::missing_bytes(&self.read_buf).map_err(|e| self.protocol_error(e))?;
            self.read_buf.reserve(missing.max(READ_CHUNK));
            let read = self
                .transport
                .read_buf(&mut self.read_buf)
                .await
                .map_err(|source| self.io_error("reading from", source))?;
            if read == 0 {
                return Err(ReplicationError::ConnectionClosed {
                    peer: self.peer.clone(),
                    during,
                });
            }
        }
    }

    /// Sends Terminate and closes the write side, ignoring failures: the
    /// connection is being abandoned either way.
    pub(crate) async fn terminate(mut self) {
        postgres_protocol::message::frontend::terminate(&mut self.write_buf);
        if self.flush().await.is_ok() {
            let _ = self.transport.shutdown().await;
        }
    }

    fn io_error(&self, action: &'static str, source: io::Error) -> ReplicationError {
        ReplicationError::Io {
            action,
            peer: self.peer.clone(),
            source,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::task::Poll;

    use tokio::io::AsyncWriteExt;
    use tokio::net::{TcpListener, TcpStream};

    use super::*;

    /// A connection to a local socket whose other end the test writes raw bytes to.
    async fn pair() -> (Connection, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let client = TcpStream::connect(addr).await.unwrap();
        let (server, _) = listener.accept().await.unwrap();
        (
            Connection::new(Transport::Tcp(client), addr.to_string()),
            server,
        )
    }

    /// Polls `next_frame` once and drops it, like a losing `select!` branch.
    async fn poll_once(conn: &mut Connection) -> Poll<Result<Frame, ReplicationError>> {
        let next = conn.next_frame("testing");
        futures::pin_mut!(next);
        futures::poll!(next)
    }

    /// Polls `next_frame` until it is ready, dropping it after every pending poll.
    async fn next_with_cancellations(conn: &mut Connection) -> (Frame, usize) {
        let mut cancelled = 0;
        loop {
            match poll_once(conn).await {
                Poll::Ready(frame) => return (frame.unwrap(), cancelled),
                Poll::Pending => {
                    cancelled += 1;
                    tokio::time::sleep(std::time::Duration::from_millis(1)).await;
                }
            }
        }
    }

    #[tokio::test]
    async fn a_frame_survives_reads_cancelled_between_its_pieces() {
        let (mut conn, mut server) = pair().await;
        let body: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        let mut wire = Vec::new();
        wire.push(b'd');
        wire.extend(((body.len() + 4) as i32).to_be_bytes());
        wire.extend(&body);
        // A notice in between is skipped, and a second frame follows at once.
        wire.extend(Frame::new(b'N', b"SNOTICE\0C00000\0Mhello\0\0").into_raw());
        wire.extend(Frame::new(b'c', b"").into_raw());

        // Nothing there yet: a cancelled poll must not consume anything later.
        assert!(poll_once(&mut conn).await.is_pending());
        // Deliver in pieces that cut the header and the body, polling (and dropping)
        // the read after each piece.
        let cuts = [1, 3, 5, 1000, 65_536, 150_000, wire.len()];
        let mut sent = 0;
        for cut in cuts {
            server.write_all(&wire[sent..cut]).await.unwrap();
            server.flush().await.unwrap();
            sent = cut;
            if cut < 5 + body.len() {
                // Let the bytes arrive, then give the read one chance.
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
                assert!(
                    poll_once(&mut conn).await.is_pending(),
                    "frame done after {cut} bytes"
                );
            }
        }
        let (frame, _) = next_with_cancellations(&mut conn).await;
        assert_eq!(frame.tag(), b'd');
        assert_eq!(frame.body(), &body[..]);
        let (frame, _) = next_with_cancellations(&mut conn).await;
        assert_eq!(frame.tag(), b'c');
    }

    #[tokio::test]
    async fn a_stream_ended_by_command_complete_ends_without_error() {
        // What a walsender sends when the server shuts down: CommandComplete
        // ("COPY 0") without CopyDone.
        for end in [Frame::new(b'C', b"COPY 0\0"), Frame::new(b'c', b"")] {
            let (conn, mut server) = pair().await;
            let mut stream = super::super::ReplicationStream {
                conn,
                slot: "s".to_owned(),
                server_done: false,
            };
            server.write_all(&end.into_raw()).await.unwrap();
            assert!(matches!(stream.next().await, Ok(None)));
            // And stays ended.
            assert!(matches!(stream.next().await, Ok(None)));
        }
    }

    #[tokio::test]
    async fn parameter_status_is_recorded_and_skipped() {
        let (mut conn, mut server) = pair().await;
        let mut wire = Vec::new();
        wire.extend(Frame::new(b'S', b"server_version\x0015.8\0").into_raw());
        wire.extend(Frame::new(b'Z', b"I").into_raw());
        server.write_all(&wire).await.unwrap();
        let frame = conn.next_frame("testing").await.unwrap();
        assert_eq!(frame.tag(), b'Z');
        assert_eq!(conn.parameter("server_version"), Some("15.8"));
    }

    #[tokio::test]
    async fn a_truncated_stream_is_a_closed_connection() {
        let (mut conn, mut server) = pair().await;
        server.write_all(&[b'd', 0, 0, 0, 10, 1, 2]).await.unwrap();
        drop(server);
        let err = conn.next_frame("testing").await.unwrap_err();
        assert!(
            matches!(err, ReplicationError::ConnectionClosed { .. }),
            "{err:?}"
        );
        assert!(err.is_transient());
    }

    #[tokio::test]
    async fn an_absurd_length_is_a_protocol_violation() {
        let (mut conn, mut server) = pair().await;
        server
            .write_all(&[b'd', 0x7f, 0xff, 0xff, 0xff])
            .await
            .unwrap();
        let err = conn.next_frame("testing").await.unwrap_err();
        assert!(matches!(err, ReplicationError::Protocol { .. }), "{err:?}");
        assert!(!err.is_transient());
    }
}
