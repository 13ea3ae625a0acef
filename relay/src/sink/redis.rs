//! The Redis Streams sink: each record is `XADD`ed to the stream its topic names
//! (through a template), in pipelines on one connection; the reply (the entry's
//! id) is the acknowledgement.
//!
//! | Redis says | the contract says |
//! |---|---|
//! | the new entry's id (and, with `wait_replicas`, `WAIT` reached that many replicas) | [`Event::Acked`](super::Event::Acked) |
//! | `WRONGTYPE` (the key holds something other than a stream) | refused, bad route |
//! | larger than `max_record_bytes` | refused, too large (checked before sending) |
//! | any other error, a lost connection, no reply within `response_timeout`, fewer replicas than `wait_replicas` | [`SinkError`]: the relay starts over from what it confirmed |
//!
//! An entry has the fields `key`, `value` (absent for a null payload) and
//! `headers` (a JSON object), as Debezium Server's Redis sink writes them in its
//! extended format.
//!
//! **Durable** means what the server makes of an acknowledged write: with
//! `appendonly yes` and `appendfsync always` an entry survives a crash of Redis;
//! with `everysec` (Redis's default for the append-only file) up to a second of
//! entries may be lost; without persistence, everything on a restart. With
//! replicas, `wait_replicas` makes the relay wait until that many replicas have
//! each entry before it confirms the WAL behind it.
//!
//! **Order**: one connection; a pipeline is sent whole and the next only after its
//! replies, so entries of a key are stored in commit order.

use std::time::Duration;

use futures::FutureExt;
use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, Value};

use super::worker::{Acks, Failure, Job, Piped, Publisher};
use super::{Handed, Refusal, RefusalKind, Sink, SinkError, Ticket};
use crate::replication::Secret;
use crate::routing::OutboxRecord;

/// The sink's name in logs and metrics.
const NAME: &str = "redis";

/// The stream: the record's topic.
pub const DEFAULT_STREAM: &str = "{topic}";
/// The largest record the relay sends: well below Redis's 512 MB bulk string.
pub const DEFAULT_MAX_RECORD_BYTES: usize = 64 * 1024 * 1024;
/// How long a reply may take before the relay starts over.
pub const DEFAULT_RESPONSE_TIMEOUT_MS: u64 = 30_000;
/// How long `WAIT` waits for replicas, in milliseconds.
const WAIT_TIMEOUT_MS: u64 = 10_000;
const TOPIC: &str = "{topic}";

/// Where the Redis sink writes to.
#[derive(Debug, Clone)]
pub struct RedisConfig {
    /// `redis://[user:password@]host:port[/db]`, or `rediss://` for TLS.
    pub url: Secret,
    /// PEM file of the certificate authorities to trust for `rediss://` instead of
    /// the system's.
    pub ca_file: Option<std::path::PathBuf>,
    /// The stream key; `{topic}` is replaced by the record's topic.
    pub stream: String,
    /// Trim each stream to about this many entries (`MAXLEN ~`); `None`: never.
    pub maxlen: Option<u64>,
    /// Replicas that must have an entry before it counts as acknowledged.
    pub wait_replicas: u32,
    pub response_timeout: Duration,
    pub max_record_bytes: usize,
}

impl Default for RedisConfig {
    fn default() -> RedisConfig {
        RedisConfig {
            url: Secret::new("redis://127.0.0.1:6379"),
            ca_file: None,
            stream: DEFAULT_STREAM.to_owned(),
            maxlen: None,
            wait_replicas: 0,
            response_timeout: Duration::from_millis(DEFAULT_RESPONSE_TIMEOUT_MS),
            max_record_bytes: DEFAULT_MAX_RECORD_BYTES,
        }
    }
}

impl RedisConfig {
    /// Checks what types alone do not rule out; `Err((option, reason))`.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        if self.stream.is_empty() {
            return Err(("redis.stream", "the template is empty".to_owned()));
        }
        if self.maxlen == Some(0) {
            return Err((
                "redis.maxlen",
                "0 would trim every entry; leave it unset to keep them all".to_owned(),
            ));
        }
        if self.response_timeout.is_zero() {
            return Err(("redis.response_timeout_ms", "must be above 0".to_owned()));
        }
        if self.max_record_bytes == 0 {
            return Err(("redis.max_record_bytes", "must be above 0".to_owned()));
        }
        Ok(())
    }

    fn stream_for(&self, topic: &str) -> String {
        self.stream.replace(TOPIC, topic)
    }
}

/// The client for `config`'s URL, trusting `ca_file` for `rediss://` when given.
fn client(config: &RedisConfig) -> Result<redis::Client, SinkError> {
    let refused = |e| SinkError::fatal(NAME, "redis.url is not a Redis URL").with_source(e);
    let Some(path) = &config.ca_file else {
        return redis::Client::open(config.url.expose()).map_err(refused);
    };
    let pem = std::fs::read(path).map_err(|e| {
        SinkError::fatal(
            NAME,
            format!("cannot read redis.ca_file {}", path.display()),
        )
        .with_source(e)
    })?;
    let certificates = redis::TlsCertificates {
        client_tls: None,
        root_cert: Some(pem),
    };
    redis::Client::build_with_tls(config.url.expose(), certificates)
        .map_err(|e| SinkError::fatal(NAME, "redis.ca_file needs a rediss:// URL").with_source(e))
}

/// What `outbox-relay check` reports of the server, without changing anything:
/// that it answers, and whether it persists what it acknowledges.
pub async fn probe(config: &RedisConfig) -> Result<String, String> {
    let client = client(config).map_err(|e| super::describe(&e))?;
    let mut connection = client
        .get_multiplexed_async_connection()
        .await
        .map_err(|e| format!("cannot connect: {e}"))?;
    let info: String = redis::cmd("INFO")
        .arg("persistence")
        .query_async(&mut connection)
        .await
        .map_err(|e| format!("INFO persistence: {e}"))?;
    let aof = info
        .lines()
        .find_map(|l| l.strip_prefix("aof_enabled:"))
        .map(str::trim);
    Ok(match aof {
        Some("1") => "answers; append-only file on".to_owned(),
        _ => "answers; append-only file OFF: acknowledged entries are lost if the server \
              restarts (set appendonly yes)"
            .to_owned(),
    })
}

/// Appends to Redis streams.
#[derive(Debug)]
pub struct RedisSink {
    piped: Piped,
    max_record_bytes: usize,
}

impl RedisSink {
    /// Connects (and checks the connection with `PING`).
    pub async fn connect(
        config: &RedisConfig,
        max_in_flight: usize,
    ) -> Result<RedisSink, SinkError> {
        let failed = |what: &'static str| {
            move |e: redis::RedisError| SinkError::unavailable(NAME, what).with_source(e)
        };
        let client = client(config)?;
        let settings = AsyncConnectionConfig::new()
            .set_response_timeout(Some(config.response_timeout))
            .set_connection_timeout(Some(Duration::from_secs(10)));
        let mut connection = client
            .get_multiplexed_async_connection_with_config(&settings)
            .await
            .map_err(failed("cannot connect to the server"))?;
        redis::cmd("PING")
            .query_async::<()>(&mut connection)
            .await
            .map_err(failed("the server does not answer PING"))?;
        tracing::info!(stream = %config.stream, maxlen = ?config.maxlen, wait_replicas = config.wait_replicas, "publishing to Redis streams");
        let publisher = Streams {
            connection,
            config: config.clone(),
        };
        Ok(RedisSink {
            piped: Piped::start(NAME, publisher, max_in_flight),
            max_record_bytes: config.max_record_bytes,
        })
    }
}

impl Sink for RedisSink {
    fn name(&self) -> &'static str {
        NAME
    }

    fn check_name(&self, name: &str) -> Result<(), String> {
        if name.is_empty() {
            return Err("the stream name is empty".to_owned());
        }
        Ok(())
    }

    fn max_record_bytes(&self) -> usize {
        self.max_record_bytes
    }

    fn send(&mut self, ticket: Ticket, record: &OutboxRecord) -> Result<Handed, SinkError> {
        self.piped
            .send_within(ticket, record, self.max_record_bytes, "max_record_bytes")
    }

    fn poll_next(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<super::Event, SinkError>> {
        self.piped.poll_next(cx)
    }
}

/// The publishing half, driven by the sink's task.
struct Streams {
    connection: MultiplexedConnection,
    config: RedisConfig,
}

/// The `headers` field: the record's headers as a JSON object of strings.
fn headers_json(record: &OutboxRecord) -> String {
    let map: serde_json::Map<String, serde_json::Value> = record
        .headers
        .iter()
        .map(|(name, value)| {
            (
                name.clone(),
                serde_json::Value::String(String::from_utf8_lossy(value).into_owned()),
            )
        })
        .collect();
    serde_json::Value::Object(map).to_string()
}

impl Publisher for Streams {
    async fn publish(&mut self, batch: Vec<Job>) -> Result<Vec<Acks>, SinkError> {
        let mut pipe = redis::pipe();
        pipe.ignore_errors();
        for (_, record) in &batch {
            let stream = self.config.stream_for(&record.topic);
            let command = pipe.cmd("XADD").arg(&stream);
            if let Some(maxlen) = self.config.maxlen {
                command.arg("MAXLEN").arg("~").arg(maxlen);
            }
            command.arg("*").arg("key").arg(record.key.as_ref());
            if let Some(value) = &record.payload {
                command.arg("value").arg(value.as_ref());
            }
            command.arg("headers").arg(headers_json(record));
        }
        let waits = self.config.wait_replicas > 0;
        if waits {
            pipe.cmd("WAIT")
                .arg(self.config.wait_replicas)
                .arg(WAIT_TIMEOUT_MS);
        }
        let replies: Vec<redis::RedisResult<Value>> =
            pipe.query_async(&mut self.connection).await.map_err(|e| {
                SinkError::unavailable(NAME, "a pipeline of XADD failed").with_source(e)
            })?;
        if replies.len() != batch.len() + usize::from(waits) {
            return Err(SinkError::unavailable(
                NAME,
                format!(
                    "{} replies to {} commands",
                    replies.len(),
                    batch.len() + usize::from(waits)
                ),
            ));
        }
        if waits {
            let reached = match replies.last() {
                Some(Ok(Value::Int(n))) => *n,
                _ => -1,
            };
            if reached < i64::from(self.config.wait_replicas) {
                return Err(SinkError::unavailable(
                    NAME,
                    format!(
                        "WAIT: {reached} replicas have the entries, {} are required",
                        self.config.wait_replicas
                    ),
                ));
            }
        }
        let mut outcomes = Vec::with_capacity(batch.len());
        for ((ticket, record), reply) in batch.into_iter().zip(replies) {
            let outcome = match reply {
                Ok(_) => Ok(()),
                Err(e) if e.code() == Some("WRONGTYPE") => Err(Failure::Record(
                    Refusal::new(
                        RefusalKind::BadRoute,
                        format!(
                            "key {:?} holds a value that is not a stream: {e}",
                            self.config.stream_for(&record.topic)
                        ),
                    ),
                    record.payload,
                )),
                Err(e) => {
                    return Err(
                        SinkError::unavailable(NAME, "the server refused XADD").with_source(e)
                    )
                }
            };
            outcomes.push((ticket, outcome));
        }
        Ok(vec![futures::future::ready(outcomes).boxed()])
    }
}
