//! A TCP proxy in front of a shared server that a test can pause: while paused it
//! keeps every connection open and forwards nothing either way, as a broker
//! stopped with SIGSTOP would look to its clients, without stopping the server
//! other tests use.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// A proxy listening on a free local port, forwarding to `target`; stops when
/// dropped.
#[derive(Debug)]
pub struct PausableProxy {
    address: SocketAddr,
    paused: Arc<watch::Sender<bool>>,
    accept: JoinHandle<()>,
}

impl PausableProxy {
    /// Starts forwarding connections to `target` (`host:port`).
    ///
    /// # Panics
    /// When no local port can be bound.
    pub async fn start(target: &str) -> PausableProxy {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind a port for the proxy");
        let address = listener.local_addr().expect("the proxy's address");
        let (paused, _) = watch::channel(false);
        let paused = Arc::new(paused);
        let target = target.to_owned();
        let shared = paused.clone();
        let accept = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = TcpStream::connect(&target).await else {
                    continue;
                };
                let _ = client.set_nodelay(true);
                let _ = server.set_nodelay(true);
                let (client_read, client_write) = client.into_split();
                let (server_read, server_write) = server.into_split();
                tokio::spawn(forward(client_read, server_write, shared.subscribe()));
                tokio::spawn(forward(server_read, client_write, shared.subscribe()));
            }
        });
        PausableProxy {
            address,
            paused,
            accept,
        }
    }

    /// `127.0.0.1:port`, for the client.
    pub fn address(&self) -> String {
        self.address.to_string()
    }

    /// Stops forwarding; connections stay open.
    pub fn pause(&self) {
        self.paused.send_replace(true);
    }

    /// Forwards again, what waited first.
    pub fn resume(&self) {
        self.paused.send_replace(false);
    }
}

impl Drop for PausableProxy {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

/// Copies `from` to `to`, holding each chunk while paused; ends with either side.
async fn forward(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut paused: watch::Receiver<bool>,
) {
    let mut buffer = vec![0u8; 64 * 1024];
    loop {
        if paused.wait_for(|p| !*p).await.is_err() {
            return;
        }
        let n = match from.read(&mut buffer).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if paused.wait_for(|p| !*p).await.is_err() {
            return;
        }
        if to.write_all(&buffer[..n]).await.is_err() {
            return;
        }
    }
}
