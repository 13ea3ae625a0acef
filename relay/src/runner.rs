//! The relay's life: connect, prepare, stream; on a transient failure reconnect and
//! resume from the slot; on shutdown drain and confirm.

use std::future::Future;
use std::time::Duration;

use std::sync::Arc;

use futures::future::{BoxFuture, Shared};
use futures::FutureExt;
use tokio::net::TcpListener;

use crate::config::{ConfigError, RelayConfig};
use crate::delivery::DeliveryError;
use crate::health::{Health, HealthThresholds};
use crate::heartbeat::Heartbeat;
use crate::metrics::Metrics;
use crate::replication::{ConnectConfig, ReplicationClient, ReplicationError, ReplicationStream};
use crate::resume;
use crate::setup::{self, SetupError, SlotState};
use crate::sink::any::{AnySink, SinkKind};
use crate::sink::kafka::KafkaSink;
use crate::sink::nats::NatsSink;
use crate::sink::rabbitmq::RabbitmqSink;
use crate::sink::redis::RedisSink;
use crate::sink::SinkError;
use crate::snapshot::SnapshotError;
use crate::standby::{self, StandbyError};
use crate::stream::{Session, StreamError};

/// SQLSTATE of "replication slot is active for PID ...".
const OBJECT_IN_USE: &str = "55006";
/// First delay before reconnecting; doubles up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(500);
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// Pause before starting again after a definite error (reported on `/health`).
pub const FAILED_RETRY: Duration = Duration::from_secs(60);

/// Why the relay stopped.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("invalid PostgreSQL URL")]
    Url(#[source] crate::replication::ConfigError),
    #[error("cannot connect to PostgreSQL")]
    Connect(#[source] ReplicationError),
    #[error(transparent)]
    Setup(#[from] SetupError),
    #[error(transparent)]
    Standby(#[from] StandbyError),
    #[error("cannot start streaming from slot {slot}")]
    Start {
        slot: String,
        #[source]
        source: ReplicationError,
    },
    #[error("cannot serve /metrics and /health on {address}")]
    Http {
        address: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Sink(#[from] SinkError),
    #[error("cannot publish the initial snapshot")]
    Snapshot(#[from] SnapshotError),
    #[error(transparent)]
    Stream(#[from] StreamError),
}

impl RelayError {
    /// Whether reconnecting may succeed.
    pub fn is_transient(&self) -> bool {
        match self {
            RelayError::Connect(e) | RelayError::Start { source: e, .. } => e.is_transient(),
            RelayError::Setup(e) => e.is_transient(),
            RelayError::Standby(e) => e.is_transient(),
            RelayError::Stream(e) => e.is_transient(),
            RelayError::Snapshot(e) => e.is_transient(),
            RelayError::Sink(e) => e.is_transient(),
            _ => false,
        }
    }

    /// The destination's fault, if this error is one: the relay reports it as
    /// `destination_failed` (not as a lost PostgreSQL connection) while it retries.
    pub fn sink_error(&self) -> Option<&SinkError> {
        match self {
            RelayError::Sink(e)
            | RelayError::Stream(StreamError::Delivery(DeliveryError::Sink(e)))
            | RelayError::Snapshot(SnapshotError::Delivery(DeliveryError::Sink(e))) => Some(e),
            _ => None,
        }
    }
}

/// Runs the relay until `shutdown` resolves (then drains, confirms and returns
/// `Ok`) or a definite error stops it. Transient failures of PostgreSQL are retried
/// with backoff, resuming from the slot. With the HTTP endpoint on, a definite error
/// is reported on `/health` (503, with the reason) and retried every
/// [`FAILED_RETRY`] instead of ending the process, so an operator can fix the cause
/// (a missing column, say) without a restart.
pub async fn run(
    config: RelayConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), RelayError> {
    config.validate()?;
    let connect = ConnectConfig::from_url(config.postgres.url.expose()).map_err(RelayError::Url)?;
    let shutdown = shutdown.boxed().shared();
    let metrics = Arc::new(Metrics::new());
    metrics.set_sink(config.sink.as_str());
    let health = Arc::new(Health::new(HealthThresholds {
        stream_stall: config.http.stall_timeout,
        broker_stall: config.http.stall_timeout,
    }));
    let server = match config.http.listen {
        Some(address) => {
            let listener = TcpListener::bind(address)
                .await
                .map_err(|source| RelayError::Http { address, source })?;
            let bound = listener.local_addr().unwrap_or(address);
            tracing::info!(address = %bound, "serving /metrics, /health and /ready");
            Some(tokio::spawn(crate::http::serve(
                listener,
                metrics.clone(),
                health.clone(),
                shutdown.clone(),
            )))
        }
        None => None,
    };
    let outcome = relay(
        &config,
        &connect,
        shutdown,
        &metrics,
        &health,
        server.is_some(),
    )
    .await;
    if let Some(server) = server {
        if outcome.is_err() {
            server.abort();
        }
        let _ = server.await;
    }
    outcome
}

async fn relay(
    config: &RelayConfig,
    connect: &ConnectConfig,
    shutdown: Shared<BoxFuture<'static, ()>>,
    metrics: &Arc<Metrics>,
    health: &Arc<Health>,
    report_failures: bool,
) -> Result<(), RelayError> {
    health.starting();
    let mut backoff = FIRST_BACKOFF;
    loop {
        let observe = (metrics.clone(), health.clone());
        // A new sink for every session: a client that failed (librdkafka's fatal
        // state, say) is never used again, and records of an ended session are
        // not delivered behind the new session's back.
        let attempt = match connect_sink(config).await {
            Ok(sink) => {
                session(
                    config,
                    connect,
                    sink,
                    shutdown.clone(),
                    &mut backoff,
                    observe,
                )
                .await
            }
            Err(error) => Err(error.into()),
        };
        let pause = match attempt {
            Ok(()) => return Ok(()),
            Err(error) if error.is_transient() => {
                let reason = error_chain(&error);
                if error.sink_error().is_some() {
                    tracing::error!(error = %reason, retry_in = ?backoff, "the destination failed; stopped reading, retrying with a new sink");
                    health.destination_failed(reason);
                } else {
                    tracing::warn!(error = %reason, retry_in = ?backoff, "PostgreSQL unavailable; reconnecting");
                    health.reconnecting(reason);
                }
                metrics.reconnected();
                let pause = backoff;
                backoff = (backoff * 2).min(MAX_BACKOFF);
                pause
            }
            Err(error) if report_failures => {
                let reason = error_chain(&error);
                tracing::error!(error = %reason, retry_in = ?FAILED_RETRY, "stopped; reporting unhealthy");
                health.failed(reason);
                FAILED_RETRY
            }
            Err(error) => return Err(error),
        };
        tokio::select! {
            () = tokio::time::sleep(pause) => {}
            () = shutdown.clone() => return Ok(()),
        }
    }
}

/// Builds the configured sink; the asynchronous ones connect first.
async fn connect_sink(config: &RelayConfig) -> Result<AnySink, SinkError> {
    let max_in_flight = config.kafka.max_in_flight;
    Ok(match config.sink {
        SinkKind::Kafka => AnySink::Kafka(KafkaSink::new(&config.kafka)?),
        SinkKind::Nats => AnySink::Nats(NatsSink::connect(&config.nats, max_in_flight).await?),
        SinkKind::Rabbitmq => AnySink::Rabbitmq(
            RabbitmqSink::connect(
                &config.rabbitmq,
                config.outbox.dead_letter_topic.as_deref(),
                max_in_flight,
            )
            .await?,
        ),
        SinkKind::Redis => AnySink::Redis(RedisSink::connect(&config.redis, max_in_flight).await?),
    })
}

async fn session(
    config: &RelayConfig,
    connect: &ConnectConfig,
    mut sink: AnySink,
    shutdown: Shared<BoxFuture<'static, ()>>,
    backoff: &mut Duration,
    observe: (Arc<Metrics>, Arc<Health>),
) -> Result<(), RelayError> {
    let mut client = ReplicationClient::connect(connect)
        .await
        .map_err(RelayError::Connect)?;
    let database = connect.dbname().to_owned();
    let prepared = setup::prepare(&mut client, config, &database).await?;
    let (mut slot, mut resume) = (prepared.slot, prepared.resume);
    let stream = loop {
        // A slot this session created is free; any other may have a holder.
        if !slot.created {
            match wait_for_slot(&mut client, config, &slot.name, &observe, shutdown.clone()).await?
            {
                Waited::Shutdown => {
                    client.close().await;
                    return Ok(());
                }
                Waited::Free { stood_by: false } => {}
                // The holder may have changed the slot (confirmed further, finished
                // a snapshot, stored a resume point): read it again.
                Waited::Free { stood_by: true } => {
                    let prepared = setup::prepare(&mut client, config, &database).await?;
                    (slot, resume) = (prepared.slot, prepared.resume);
                }
            }
        }
        if let Some(snapshot) = slot.snapshot.take() {
            // `client` created the slot and stays idle meanwhile: its exported
            // snapshot stays valid until START_REPLICATION.
            let (_, returned) = crate::snapshot::publish(
                config,
                connect,
                sink,
                &slot.name,
                &snapshot,
                observe.clone(),
            )
            .await?;
            sink = returned;
        }
        match start(client, config, &slot).await? {
            Some(stream) => break stream,
            // Another relay took the slot between the look and the start.
            None => {
                slot.created = false;
                client = ReplicationClient::connect(connect)
                    .await
                    .map_err(RelayError::Connect)?;
            }
        }
    };
    // A destination that keeps failing keeps its backoff across sessions.
    if observe.1.destination_fault().is_none() {
        *backoff = FIRST_BACKOFF;
    }
    observe.1.streaming();
    tracing::info!(slot = %slot.name, from = %slot.confirmed, publication = %config.postgres.publication, "streaming");
    let metrics = observe.0.clone();
    let spill_dir = config.postgres.spill_dir.join(&slot.name);
    if config.postgres.streaming {
        crate::stream::txbuffer::clear_stale(&spill_dir);
    }
    // Resume points, where the database lets the relay keep them.
    let (link, _writer) = resume::start(connect, config, &slot.name, resume);
    let session = Session::new(config, stream, sink, slot.confirmed, observe)
        .spill_to(spill_dir)
        .resume_from(resume.point, link)
        .run(shutdown);
    let drained = match config.postgres.heartbeat_interval {
        Some(interval) => {
            let heartbeat = Heartbeat::new(connect.clone(), slot.name.clone());
            let beats = heartbeat.run(interval, |beat| match beat {
                Ok(beat) => {
                    metrics.heartbeat_sent();
                    if let Some(lag) = beat.slot_lag_bytes {
                        metrics.set_slot_lag_bytes(lag);
                    }
                }
                Err(error) => tracing::warn!(error = %error_chain(&error), "heartbeat failed"),
            });
            // The heartbeat loop never ends by itself; the session decides.
            tokio::select! {
                drained = session => drained?,
                () = beats => return Ok(()),
            }
        }
        None => session.await?,
    };
    tracing::info!(confirmed = %drained.confirmed, abandoned = drained.abandoned, "stopped");
    Ok(())
}

/// How waiting for the slot ended.
enum Waited {
    /// The slot has no holder; `stood_by` when it had one at first.
    Free {
        stood_by: bool,
    },
    Shutdown,
}

/// Stands by while another process holds `slot`, looking at it every
/// `standby_poll_interval`, and ends a holder that sent no status update for
/// `takeover_after` (see [`crate::standby`]). Logs when the holder changes, not on
/// every look.
async fn wait_for_slot(
    client: &mut ReplicationClient,
    config: &RelayConfig,
    slot: &str,
    observe: &(Arc<Metrics>, Arc<Health>),
    shutdown: Shared<BoxFuture<'static, ()>>,
) -> Result<Waited, RelayError> {
    let (metrics, health) = observe;
    let poll = config.postgres.standby_poll_interval;
    let mut announced: Option<u32> = None;
    let mut blind_warned = false;
    let mut snapshot_wait = false;
    let mut silence = standby::Silence::default();
    loop {
        match standby::holder(client, slot).await? {
            Some(holder) => {
                if announced != Some(holder.pid) {
                    tracing::info!(slot, holder = %holder, poll_interval = ?poll, "standing by: another process holds the slot");
                    announced = Some(holder.pid);
                }
                health.standby(format!("slot {slot} is held by {holder}"));
                let silent = silence.observe(&holder, std::time::Instant::now());
                match config.postgres.takeover_after {
                    Some(bound) if holder.visible && silent >= bound => {
                        let ended = standby::end_silent_holder(client, slot, &holder).await?;
                        if ended {
                            tracing::warn!(slot, holder = %holder, silent = ?silent, "the slot's holder sent no status update within the takeover bound; ended its server process to take the slot over");
                            metrics.took_over();
                        }
                    }
                    Some(_) if !holder.visible && !blind_warned => {
                        tracing::warn!(slot, "cannot see when the slot's holder last sent a status update (this role lacks pg_read_all_stats): a hung holder is ended only by the server's wal_sender_timeout");
                        blind_warned = true;
                    }
                    _ => {}
                }
            }
            // A free slot whose initial snapshot another relay is publishing is
            // that relay's (see setup::SNAPSHOT_LOCK_CLASS); an unfinished one is
            // claimed here, and published by this session.
            None if setup::snapshot_pending(client, config, slot).await?
                && !setup::claim_snapshot(client, slot).await? =>
            {
                if !snapshot_wait {
                    tracing::info!(slot, poll_interval = ?poll, "standing by: another relay is publishing the slot's initial snapshot");
                    snapshot_wait = true;
                }
                health.standby(format!(
                    "another relay is publishing slot {slot}'s initial snapshot"
                ));
            }
            None => {
                let stood_by = announced.is_some() || snapshot_wait;
                if stood_by {
                    tracing::info!(slot, "the slot is free; taking it");
                }
                return Ok(Waited::Free { stood_by });
            }
        }
        tokio::select! {
            () = tokio::time::sleep(poll) => {}
            () = shutdown.clone() => return Ok(Waited::Shutdown),
        }
    }
}

/// START_REPLICATION from the slot's confirmed position; `None` when another
/// process holds the slot.
async fn start(
    client: ReplicationClient,
    config: &RelayConfig,
    slot: &SlotState,
) -> Result<Option<ReplicationStream>, RelayError> {
    // publication_names is a list of identifiers: quoted, any name survives.
    let publication = crate::sql::ident(&config.postgres.publication);
    let major = server_major(&client);
    // Protocol 2 streams transactions still in progress (PostgreSQL 14+); with 1
    // the server decodes a transaction whole before sending it.
    let streaming = config.postgres.streaming && major >= Some(14);
    let version = if streaming { "2" } else { "1" };
    let mut options: Vec<(&str, &str)> = vec![
        ("proto_version", version),
        ("publication_names", &publication),
    ];
    if streaming {
        options.push(("streaming", "on"));
    }
    if major >= Some(14) {
        options.push(("messages", "true"));
    }
    match client
        .start_logical_replication(&slot.name, slot.confirmed, &options)
        .await
    {
        Ok(stream) => Ok(Some(stream)),
        Err(e) if e.sqlstate() == Some(OBJECT_IN_USE) => {
            tracing::info!(slot = %slot.name, error = %e, "the slot was taken meanwhile");
            Ok(None)
        }
        Err(source) => Err(RelayError::Start {
            slot: slot.name.clone(),
            source,
        }),
    }
}

fn server_major(client: &ReplicationClient) -> Option<u32> {
    client
        .server_version()?
        .split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}

/// An error with its causes, `outer: inner: innermost`, for logs and exit messages.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
