//! The NATS JetStream sink: each record is published to the subject its topic
//! names, into one stream, and is acknowledged when JetStream stored it.
//!
//! | JetStream says | the contract says |
//! |---|---|
//! | publish acknowledgement (also for a duplicate it dropped) | [`Event::Acked`](super::Event::Acked): the stream has the record (on every replica the stream has) |
//! | the record is larger than the server's `max_payload` | refused, too large |
//! | a subject that is not valid, or not one of the stream's subjects | refused, bad route (checked before publishing) |
//! | no acknowledgement within `ack_timeout`, a lost connection, any API error | [`SinkError`]: the relay starts over from what it confirmed |
//!
//! **Duplicates.** The outbox id travels as `Nats-Msg-Id`. A relay that starts
//! over re-sends what it had not confirmed; JetStream drops each id it stored
//! within the stream's duplicate window, so the stream holds every record once as
//! long as the outage is shorter than the window.
//!
//! The record's key travels as the `key` header, its other headers as NATS headers.

use std::str::FromStr as _;
use std::time::Duration;

use async_nats::header::HeaderMap;
use async_nats::jetstream::context::PublishErrorKind;
use async_nats::jetstream::message::PublishMessage;
use async_nats::jetstream::{self, stream};
use bytes::Bytes;
use futures::FutureExt;

use super::worker::{Acks, Failure, Job, Piped, Publisher};
use super::{Handed, Refusal, RefusalKind, Sink, SinkError, Ticket};
use crate::replication::Secret;
use crate::routing::OutboxRecord;

/// The sink's name in logs and metrics.
const NAME: &str = "nats";

/// The stream the relay publishes into, unless configured otherwise.
pub const DEFAULT_STREAM: &str = "OUTBOX";
/// Subjects of a stream the relay creates: the default topics and dead letters.
pub const DEFAULT_SUBJECTS: &str = "outbox.>";
/// JetStream's own default: how long a message id is remembered.
pub const DEFAULT_DUPLICATE_WINDOW_MS: u64 = 120_000;
/// Bytes of a message's header section besides the names and values (the
/// version line, separators, the `key` and `Nats-Msg-Id` names), at most for
/// the headers an outbox record has.
const HEADER_FRAMING: usize = 64;
/// How long a publish acknowledgement may take before the relay starts over.
pub const DEFAULT_ACK_TIMEOUT_MS: u64 = 30_000;

/// Where the NATS sink writes to.
#[derive(Debug, Clone)]
pub struct NatsConfig {
    /// Server URLs, comma-separated; may hold a user and password.
    pub url: Secret,
    /// A `.creds` file (JWT and NKey seed), for servers that use decentralised auth.
    pub credentials_file: Option<std::path::PathBuf>,
    /// PEM file of certificate authorities to trust; with it the connection must
    /// be TLS.
    pub ca_file: Option<std::path::PathBuf>,
    pub stream: String,
    /// Subjects of the stream when the relay creates it.
    pub subjects: Vec<String>,
    /// Create the stream when it is missing.
    pub create_stream: bool,
    /// `file` (default) or `memory`, for a created stream.
    pub storage: NatsStorage,
    /// Replicas of a created stream.
    pub replicas: usize,
    pub duplicate_window: Duration,
    pub ack_timeout: Duration,
}

/// Where a created stream keeps its messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum NatsStorage {
    #[default]
    File,
    Memory,
}

impl Default for NatsConfig {
    fn default() -> NatsConfig {
        NatsConfig {
            url: Secret::new("nats://127.0.0.1:4222"),
            credentials_file: None,
            ca_file: None,
            stream: DEFAULT_STREAM.to_owned(),
            subjects: vec![DEFAULT_SUBJECTS.to_owned()],
            create_stream: true,
            storage: NatsStorage::File,
            replicas: 1,
            duplicate_window: Duration::from_millis(DEFAULT_DUPLICATE_WINDOW_MS),
            ack_timeout: Duration::from_millis(DEFAULT_ACK_TIMEOUT_MS),
        }
    }
}

impl NatsConfig {
    /// Checks what types alone do not rule out; `Err((option, reason))`.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        if self.stream.is_empty()
            || self
                .stream
                .chars()
                .any(|c| c.is_whitespace() || matches!(c, '.' | '*' | '>' | '/' | '\\'))
        {
            return Err((
                "nats.stream",
                format!(
                    "{:?} is not a stream name (no spaces, '.', '*', '>', '/' or '\\')",
                    self.stream
                ),
            ));
        }
        if self.subjects.is_empty() {
            return Err(("nats.subjects", "the list is empty".to_owned()));
        }
        for subject in &self.subjects {
            check_subject(subject, true).map_err(|e| ("nats.subjects", e))?;
        }
        if self.replicas == 0 {
            return Err(("nats.replicas", "must be 1 or more".to_owned()));
        }
        if self.ack_timeout.is_zero() {
            return Err(("nats.ack_timeout_ms", "must be above 0".to_owned()));
        }
        Ok(())
    }
}

/// Whether `subject` is a NATS subject: tokens of printable characters without
/// whitespace, separated by `.`; wildcards (`*` a token, `>` the last token) only
/// where `wildcards` (a stream's subject filter).
pub fn check_subject(subject: &str, wildcards: bool) -> Result<(), String> {
    if subject.is_empty() {
        return Err("the subject is empty".to_owned());
    }
    let tokens: Vec<&str> = subject.split('.').collect();
    for (i, token) in tokens.iter().enumerate() {
        if token.is_empty() {
            return Err(format!("subject {subject:?} has an empty token"));
        }
        if let Some(c) = token.chars().find(|c| c.is_whitespace() || c.is_control()) {
            return Err(format!("subject {subject:?} contains {c:?}"));
        }
        let wildcard = *token == "*" || (*token == ">" && i == tokens.len() - 1);
        if token.contains(['*', '>']) && !(wildcards && wildcard) {
            return Err(format!(
                "subject {subject:?} contains a wildcard; records are published to plain subjects"
            ));
        }
    }
    Ok(())
}

/// Whether the subject filter `filter` (with `*` and `>`) matches `subject`.
pub fn subject_matches(filter: &str, subject: &str) -> bool {
    let mut subject = subject.split('.');
    for token in filter.split('.') {
        match (token, subject.next()) {
            (">", Some(_)) => return true,
            ("*", Some(_)) => {}
            (token, Some(s)) if token == s => {}
            _ => return false,
        }
    }
    subject.next().is_none()
}

/// The client's options for `config`'s TLS: `ca_file` trusted, and TLS required,
/// when given.
fn tls_options(config: &NatsConfig) -> async_nats::ConnectOptions {
    let options = async_nats::ConnectOptions::new();
    match &config.ca_file {
        Some(file) => options
            .add_root_certificates(file.clone())
            .require_tls(true),
        None => options,
    }
}

/// What `outbox-relay check` reports of the server, without changing anything.
pub async fn probe(config: &NatsConfig) -> Result<String, String> {
    let client = tls_options(config)
        .connect(config.url.expose())
        .await
        .map_err(|e| format!("cannot connect: {}", super::describe(&e)))?;
    let info = client.server_info();
    if !info.jetstream {
        return Err(format!(
            "server {} {} has JetStream off (start it with -js)",
            info.server_name, info.version
        ));
    }
    let context = jetstream::new(client);
    match context.get_stream(&config.stream).await {
        Ok(stream) => {
            let info = stream.cached_info();
            Ok(format!(
                "stream {}: {} message(s), subjects {:?}, duplicate window {:?}",
                config.stream,
                info.state.messages,
                info.config.subjects,
                info.config.duplicate_window
            ))
        }
        Err(e) if config.create_stream => Ok(format!(
            "stream {} not found ({e}); the relay creates it with subjects {:?}",
            config.stream, config.subjects
        )),
        Err(e) => Err(format!(
            "stream {}: {e} (and nats.create_stream is off)",
            config.stream
        )),
    }
}

/// Publishes into one JetStream stream.
#[derive(Debug)]
pub struct NatsSink {
    piped: Piped,
    stream: String,
    subjects: Vec<String>,
    max_payload: usize,
}

impl NatsSink {
    /// Connects, and finds (or creates) the stream.
    pub async fn connect(config: &NatsConfig, max_in_flight: usize) -> Result<NatsSink, SinkError> {
        let unavailable = |what: &str| {
            let what = what.to_owned();
            move |e: Box<dyn std::error::Error + Send + Sync>| {
                SinkError::unavailable(NAME, what).with_source(ErrorText(e.to_string()))
            }
        };
        let mut options = tls_options(config).name("outbox-relay");
        if let Some(file) = &config.credentials_file {
            options = options.credentials_file(file).await.map_err(|e| {
                SinkError::fatal(NAME, format!("cannot read {}", file.display())).with_source(e)
            })?;
        }
        let client = options
            .connect(config.url.expose())
            .await
            .map_err(|e| unavailable("cannot connect to the server")(Box::new(e)))?;
        let max_payload = client.server_info().max_payload;
        let context = jetstream::ContextBuilder::new()
            .timeout(config.ack_timeout)
            .max_ack_inflight(max_in_flight.max(1))
            .backpressure_on_inflight(true)
            .build(client);
        let stream = if config.create_stream {
            context
                .get_or_create_stream(stream::Config {
                    name: config.stream.clone(),
                    subjects: config.subjects.clone(),
                    storage: match config.storage {
                        NatsStorage::File => stream::StorageType::File,
                        NatsStorage::Memory => stream::StorageType::Memory,
                    },
                    num_replicas: config.replicas,
                    duplicate_window: config.duplicate_window,
                    ..Default::default()
                })
                .await
                .map_err(|e| {
                    unavailable(&format!("cannot find or create stream {}", config.stream))(
                        Box::new(e),
                    )
                })?
        } else {
            context.get_stream(&config.stream).await.map_err(|e| {
                unavailable(&format!("cannot find stream {}", config.stream))(Box::new(e))
            })?
        };
        let info = &stream.cached_info().config;
        tracing::info!(
            stream = %info.name,
            subjects = ?info.subjects,
            duplicate_window = ?info.duplicate_window,
            max_payload,
            "publishing to NATS JetStream"
        );
        let subjects = info.subjects.clone();
        let publisher = JetStream { context };
        Ok(NatsSink {
            piped: Piped::start(NAME, publisher, max_in_flight),
            stream: config.stream.clone(),
            subjects,
            max_payload,
        })
    }
}

impl Sink for NatsSink {
    fn name(&self) -> &'static str {
        NAME
    }

    fn check_name(&self, name: &str) -> Result<(), String> {
        check_subject(name, false)?;
        if !self.subjects.iter().any(|f| subject_matches(f, name)) {
            return Err(format!(
                "subject {name:?} is not one of stream {}'s subjects {:?}",
                self.stream, self.subjects
            ));
        }
        Ok(())
    }

    fn max_record_bytes(&self) -> usize {
        self.max_payload
    }

    fn send(&mut self, ticket: Ticket, record: &OutboxRecord) -> Result<Handed, SinkError> {
        // Headers travel in the same frame as the payload, with their framing.
        self.piped.send_within(
            ticket,
            record,
            self.max_payload.saturating_sub(HEADER_FRAMING),
            "the server's max_payload less the header framing",
        )
    }

    fn poll_next(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<super::Event, SinkError>> {
        self.piped.poll_next(cx)
    }
}

/// The publishing half, driven by the sink's task.
struct JetStream {
    context: jetstream::Context,
}

impl Publisher for JetStream {
    async fn publish(&mut self, batch: Vec<Job>) -> Result<Vec<Acks>, SinkError> {
        let mut acks = Vec::with_capacity(batch.len());
        for (ticket, record) in batch {
            let payload = record.payload.clone().unwrap_or_default();
            let message = match message(&record) {
                Ok(headers) => PublishMessage::build()
                    .payload(payload)
                    .headers(headers)
                    .message_id(&record.id),
                Err(refusal) => {
                    acks.push(refused(ticket, refusal, record.payload));
                    continue;
                }
            };
            match self.context.send_publish(record.topic.clone(), message).await {
                Ok(ack) => acks.push(
                    async move {
                        let outcome = match ack.await {
                            Ok(ack) => {
                                if ack.duplicate {
                                    tracing::debug!(subject = %record.topic, id = %record.id, "JetStream dropped a duplicate");
                                }
                                Ok(())
                            }
                            Err(e) => Err(Failure::Destination(
                                SinkError::unavailable(
                                    NAME,
                                    format!("publishing to {} was not acknowledged", record.topic),
                                )
                                .with_source(e),
                            )),
                        };
                        vec![(ticket, outcome)]
                    }
                    .boxed(),
                ),
                Err(e) if e.kind() == PublishErrorKind::MaxPayloadExceeded => {
                    let refusal = Refusal::new(RefusalKind::TooLarge, e.to_string());
                    acks.push(refused(ticket, refusal, record.payload));
                }
                Err(e) => {
                    return Err(SinkError::unavailable(NAME, "cannot publish").with_source(e));
                }
            }
        }
        Ok(acks)
    }
}

/// The NATS headers of `record`: its key and its headers.
fn message(record: &OutboxRecord) -> Result<HeaderMap, Refusal> {
    let mut headers = HeaderMap::new();
    let text = |what: &str, value: &Bytes| {
        let text = std::str::from_utf8(value)
            .map_err(|_| Refusal::new(RefusalKind::Invalid, format!("{what} is not UTF-8 text")))?;
        async_nats::HeaderValue::from_str(text).map_err(|e| {
            Refusal::new(
                RefusalKind::Invalid,
                format!("{what} cannot be a NATS header value: {e}"),
            )
        })
    };
    headers.insert("key", text("the key", &record.key)?);
    for (name, value) in &record.headers {
        let name_ok = !name.is_empty() && name.chars().all(|c| c.is_ascii_graphic() && c != ':');
        if !name_ok {
            return Err(Refusal::new(
                RefusalKind::Invalid,
                format!("header {name:?} cannot be a NATS header name"),
            ));
        }
        headers.insert(name.as_str(), text(&format!("header {name}"), value)?);
    }
    Ok(headers)
}

fn refused(ticket: Ticket, refusal: Refusal, value: Option<Bytes>) -> Acks {
    futures::future::ready(vec![(ticket, Err(Failure::Record(refusal, value)))]).boxed()
}

/// An error of the client, kept as text.
#[derive(Debug)]
struct ErrorText(String);

impl std::fmt::Display for ErrorText {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ErrorText {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects_and_filters() {
        for good in ["outbox.event.order", "a", "a-b_c.D9"] {
            assert_eq!(check_subject(good, false), Ok(()), "{good}");
        }
        for bad in ["", "a..b", ".a", "a.", "a b", "a.*", "a.>", "a\tb"] {
            assert!(check_subject(bad, false).is_err(), "{bad:?} accepted");
        }
        assert_eq!(check_subject("outbox.>", true), Ok(()));
        assert_eq!(check_subject("outbox.*.x", true), Ok(()));
        assert!(check_subject("outbox.>.x", true).is_err());
        assert!(check_subject("outbox.a*", true).is_err());

        assert!(subject_matches("outbox.>", "outbox.event.order"));
        assert!(subject_matches("outbox.>", "outbox.dlq"));
        assert!(!subject_matches("outbox.>", "outbox"));
        assert!(subject_matches("outbox.*.order", "outbox.event.order"));
        assert!(!subject_matches("outbox.*", "outbox.event.order"));
        assert!(subject_matches("a.b", "a.b"));
        assert!(!subject_matches("a.b", "a.b.c"));
        assert!(!subject_matches("other.>", "outbox.dlq"));
    }
}
