//! `/metrics`, `/health` and `/ready` over real HTTP/1.1 on a loopback socket,
//! spoken by hand through a `TcpStream` so that the test sees exactly the bytes a
//! scraper or a Kubernetes probe would.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, ensure, Context as _};
use outbox_relay::deadletter::Reason;
use outbox_relay::health::{Health, HealthThresholds, ManualClock};
use outbox_relay::metrics::{self, Metrics};
use outbox_relay::Lsn;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

const DEADLINE: Duration = Duration::from_secs(10);

/// A server on `127.0.0.1:0`, stopped through its shutdown future.
struct Server {
    addr: SocketAddr,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<std::io::Result<()>>,
}

impl Server {
    async fn start(health: Health) -> anyhow::Result<Server> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let metrics = Arc::new(Metrics::new());
        let health = Arc::new(health);
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(outbox_relay::http::serve(
            listener,
            Arc::clone(&metrics),
            Arc::clone(&health),
            async move {
                let _ = stopped.await;
            },
        ));
        Ok(Server {
            addr,
            metrics,
            health,
            stop: Some(stop),
            task,
        })
    }

    /// Sends the shutdown signal and waits, with a deadline, for `serve` to return.
    async fn shut_down(mut self) -> anyhow::Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        tokio::time::timeout(DEADLINE, &mut self.task)
            .await
            .context("serve did not return after shutdown")?
            .context("serve panicked")?
            .context("serve failed")?;
        Ok(())
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[derive(Debug)]
struct Response {
    status: u16,
    headers: HashMap<String, String>,
    body: String,
}

impl Response {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(String::as_str)
    }

    fn json(&self) -> anyhow::Result<serde_json::Value> {
        serde_json::from_str(&self.body).with_context(|| format!("body is not JSON: {}", self.body))
    }
}

/// One `GET` over a fresh connection with `Connection: close`, read to the end.
async fn request(addr: SocketAddr, method: &str, path: &str) -> anyhow::Result<Response> {
    tokio::time::timeout(DEADLINE, async {
        let mut stream = TcpStream::connect(addr).await?;
        let request =
            format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await?;
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw).await?;
        parse_response(&raw)
    })
    .await
    .with_context(|| format!("no answer to {method} {path} within {DEADLINE:?}"))?
}

async fn get(addr: SocketAddr, path: &str) -> anyhow::Result<Response> {
    request(addr, "GET", path).await
}

fn parse_response(raw: &[u8]) -> anyhow::Result<Response> {
    let text = std::str::from_utf8(raw).context("response is not UTF-8")?;
    let (head, body) = text
        .split_once("\r\n\r\n")
        .context("response has no end of headers")?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().context("empty response")?;
    let mut parts = status_line.splitn(3, ' ');
    ensure!(
        parts.next() == Some("HTTP/1.1"),
        "bad status line {status_line:?}"
    );
    let status = parts
        .next()
        .context("no status code")?
        .parse()
        .with_context(|| format!("bad status line {status_line:?}"))?;
    let mut headers = HashMap::new();
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            bail!("bad header line {line:?}");
        };
        headers.insert(name.trim().to_ascii_lowercase(), value.trim().to_owned());
    }
    if let Some(length) = headers.get("content-length") {
        let length: usize = length.parse().context("bad content-length")?;
        ensure!(
            length == body.len(),
            "content-length {length} but {} bytes of body",
            body.len()
        );
    }
    Ok(Response {
        status,
        headers,
        body: body.to_owned(),
    })
}

fn sample<'a>(body: &'a str, series: &str) -> Option<&'a str> {
    body.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
}

#[tokio::test]
async fn metrics_are_served_as_prometheus_text() -> anyhow::Result<()> {
    let server = Server::start(Health::new(HealthThresholds::default())).await?;
    server.health.streaming();
    server.metrics.events_routed(42);
    server.metrics.bytes_routed(4096);
    server.metrics.dead_lettered(Reason::TooLarge);
    server.metrics.set_confirmed_lsn(Lsn::new(u64::MAX));

    let response = get(server.addr, "/metrics").await?;
    assert_eq!(response.status, 200, "{response:?}");
    let content_type = response.header("content-type").unwrap_or_default();
    assert!(
        content_type.starts_with("text/plain; version=0.0.4"),
        "{content_type}"
    );
    assert_eq!(content_type, metrics::CONTENT_TYPE);
    let body = &response.body;
    assert_eq!(sample(body, metrics::EVENTS_ROUTED), Some("42"), "{body}");
    assert_eq!(sample(body, metrics::BYTES_ROUTED), Some("4096"), "{body}");
    assert_eq!(
        sample(
            body,
            &format!("{}{{reason=\"too_large\"}}", metrics::EVENTS_DEAD_LETTERED)
        ),
        Some("1"),
        "{body}"
    );
    assert_eq!(
        sample(
            body,
            &format!("{}{{reason=\"bad_row\"}}", metrics::EVENTS_DEAD_LETTERED)
        ),
        Some("0"),
        "{body}"
    );
    assert_eq!(
        sample(body, metrics::CONFIRMED_LSN),
        Some("18446744073709551615"),
        "{body}"
    );
    assert_eq!(sample(body, metrics::UP), Some("1"), "{body}");
    assert!(
        body.contains(&format!("# TYPE {} counter\n", metrics::EVENTS_ROUTED)),
        "{body}"
    );
    server.shut_down().await
}

#[tokio::test]
async fn health_is_200_with_the_report_while_streaming() -> anyhow::Result<()> {
    let server = Server::start(Health::new(HealthThresholds::default())).await?;
    server.health.starting();
    server.health.streaming();
    server.health.records_in_flight(7);

    let response = get(server.addr, "/health").await?;
    assert_eq!(response.status, 200, "{response:?}");
    assert_eq!(response.header("content-type"), Some("application/json"));
    let json = response.json()?;
    assert_eq!(json["healthy"], true, "{json}");
    assert_eq!(json["status"], "streaming", "{json}");
    assert!(json["reason"].is_null(), "{json}");
    assert_eq!(json["in_flight"], 7, "{json}");
    assert_eq!(json["reading_paused"], false, "{json}");
    assert!(json["seconds_since_stream_progress"].is_u64(), "{json}");
    assert!(json["seconds_since_broker_progress"].is_u64(), "{json}");
    server.shut_down().await
}

#[tokio::test]
async fn health_is_503_while_starting() -> anyhow::Result<()> {
    let server = Server::start(Health::new(HealthThresholds::default())).await?;
    server.health.starting();
    let response = get(server.addr, "/health").await?;
    assert_eq!(response.status, 503, "{response:?}");
    let json = response.json()?;
    assert_eq!(json["healthy"], false, "{json}");
    assert_eq!(json["status"], "starting", "{json}");
    server.shut_down().await
}

#[tokio::test]
async fn health_is_503_with_the_reason_after_a_definite_failure() -> anyhow::Result<()> {
    let server = Server::start(Health::new(HealthThresholds::default())).await?;
    server.health.streaming();
    server
        .health
        .failed("the outbox table lacks column aggregateid".to_owned());

    let response = get(server.addr, "/health").await?;
    assert_eq!(response.status, 503, "{response:?}");
    assert_eq!(response.header("content-type"), Some("application/json"));
    let json = response.json()?;
    assert_eq!(json["healthy"], false, "{json}");
    assert_eq!(json["status"], "failed", "{json}");
    assert_eq!(
        json["reason"], "the outbox table lacks column aggregateid",
        "{json}"
    );
    let metrics = get(server.addr, "/metrics").await?;
    assert_eq!(sample(&metrics.body, metrics::UP), Some("0"), "{metrics:?}");

    server.health.streaming();
    let response = get(server.addr, "/health").await?;
    assert_eq!(response.status, 200, "{response:?}");
    server.shut_down().await
}

#[tokio::test]
async fn health_is_503_when_the_stream_stalls() -> anyhow::Result<()> {
    let clock = ManualClock::new();
    let thresholds = HealthThresholds::default();
    let server = Server::start(Health::with_clock(thresholds, Arc::new(clock.clone()))).await?;
    server.health.streaming();
    assert_eq!(get(server.addr, "/health").await?.status, 200);

    clock.advance(thresholds.stream_stall);
    let response = get(server.addr, "/health").await?;
    assert_eq!(response.status, 503, "{response:?}");
    let json = response.json()?;
    assert_eq!(json["status"], "stalled", "{json}");
    assert_eq!(
        json["seconds_since_stream_progress"],
        thresholds.stream_stall.as_secs(),
        "{json}"
    );

    server.health.stream_progress();
    assert_eq!(get(server.addr, "/health").await?.status, 200);
    server.shut_down().await
}

#[tokio::test]
async fn ready_is_200_for_a_standby_and_through_transient_trouble_503_before_a_role_and_on_failure(
) -> anyhow::Result<()> {
    let clock = ManualClock::new();
    let thresholds = HealthThresholds::default();
    let server = Server::start(Health::with_clock(thresholds, Arc::new(clock.clone()))).await?;
    server.health.starting();
    let response = get(server.addr, "/ready").await?;
    assert_eq!(response.status, 503, "{response:?}");
    assert_eq!(response.json()?["ready"], false);

    server
        .health
        .standby("slot s is held by server process 7".to_owned());
    for path in ["/health", "/ready"] {
        let response = get(server.addr, path).await?;
        assert_eq!(response.status, 200, "{path}: {response:?}");
        let json = response.json()?;
        assert_eq!(json["status"], "standby", "{json}");
        assert_eq!(json["role"], "standby", "{json}");
        assert_eq!(
            json["reason"], "slot s is held by server process 7",
            "{json}"
        );
    }

    // Active, and the broker stops answering: not healthy, still ready.
    server.health.streaming();
    server.health.records_in_flight(3);
    clock.advance(thresholds.broker_stall);
    assert_eq!(get(server.addr, "/health").await?.status, 503);
    let response = get(server.addr, "/ready").await?;
    assert_eq!(response.status, 200, "{response:?}");
    assert_eq!(response.json()?["role"], "active");

    server.health.failed("slot dropped".to_owned());
    assert_eq!(get(server.addr, "/ready").await?.status, 503);
    server.shut_down().await
}

#[tokio::test]
async fn other_paths_are_404_and_other_methods_405() -> anyhow::Result<()> {
    let server = Server::start(Health::new(HealthThresholds::default())).await?;
    for path in ["/", "/metric", "/health/x", "/ready/x"] {
        let response = get(server.addr, path).await?;
        assert_eq!(response.status, 404, "{path}: {response:?}");
    }
    let response = request(server.addr, "POST", "/metrics").await?;
    assert_eq!(response.status, 405, "{response:?}");
    server.shut_down().await
}

#[tokio::test]
async fn the_shutdown_future_ends_the_server() -> anyhow::Result<()> {
    let server = Server::start(Health::new(HealthThresholds::default())).await?;
    let addr = server.addr;
    // A kept-alive idle connection must not hold the server open.
    let mut idle = TcpStream::connect(addr).await?;
    idle.write_all(format!("GET /health HTTP/1.1\r\nHost: {addr}\r\n\r\n").as_bytes())
        .await?;
    let mut first = [0u8; 12];
    tokio::time::timeout(DEADLINE, idle.read_exact(&mut first))
        .await
        .context("no answer on the kept-alive connection")??;
    assert_eq!(&first, b"HTTP/1.1 503");

    server.shut_down().await?;
    let refused = TcpStream::connect(addr).await;
    assert!(refused.is_err(), "still accepting after shutdown");
    Ok(())
}
