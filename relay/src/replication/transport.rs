//! The byte stream under a replication connection.
//!
//! Plain TCP today. TLS (rustls) will be one more variant here, negotiated after an
//! SSLRequest in [`Transport::connect`]; nothing above this module sees the
//! difference, so the public API stays as it is.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// An open connection to the server.
#[derive(Debug)]
pub(crate) enum Transport {
    /// Unencrypted TCP.
    Tcp(TcpStream),
}

impl Transport {
    /// Opens a TCP connection, trying every address `host` resolves to in turn.
    pub(crate) async fn connect(host: &str, port: u16) -> io::Result<Transport> {
        let stream = TcpStream::connect((host, port)).await?;
        // Standby status updates are small and latency matters more than packing.
        stream.set_nodelay(true)?;
        Ok(Transport::Tcp(stream))
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
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Transport::Tcp(stream) => Pin::new(stream).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Transport::Tcp(stream) => Pin::new(stream).poll_shutdown(cx),
        }
    }
}
