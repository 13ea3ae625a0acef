//! Dead letters: what the consumers (`<group>.dlq`) and the relay (`outbox.dlq`)
//! gave up on, with their reasons, and replaying one to the topic it came from.
//!
//! A replayed letter is the original record again (key, value and headers, less
//! the `dlq-*` headers the dead-lettering added), produced to its source topic
//! (`dlq-source-topic` of a consumer's letter, `dlq-original-topic` of the
//! relay's). Replaying twice is harmless: the record keeps its `id` header, and
//! the consumers' journals apply a message id once.
//!
//! The topics are read from their beginning with a consumer of no group (nothing
//! is committed), since some brokers cannot start a fetch in the middle of a
//! record batch; a dead-letter topic is small by nature, and the page shows the
//! newest [`SHOWN_PER_TOPIC`] of each.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer as _};
use rdkafka::message::{BorrowedMessage, Header, Headers as _, Message as _, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

/// Letters shown per topic, the newest.
pub(crate) const SHOWN_PER_TOPIC: usize = 200;
/// How long reading the topics may take.
const READ_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a replayed record may take to be acknowledged.
const PRODUCE_TIMEOUT: Duration = Duration::from_secs(10);

/// Where dead letters are read from, and how to reach the brokers.
#[derive(Debug, Clone)]
pub struct DeadLetters {
    brokers: String,
    options: BTreeMap<String, String>,
    topics: Vec<String>,
}

impl DeadLetters {
    /// The dead-letter `topics` on `brokers`, with librdkafka `options` (TLS, SASL).
    pub fn new(
        brokers: impl Into<String>,
        options: BTreeMap<String, String>,
        topics: Vec<String>,
    ) -> DeadLetters {
        DeadLetters {
            brokers: brokers.into(),
            options,
            topics,
        }
    }

    pub(crate) fn topics(&self) -> &[String] {
        &self.topics
    }

    fn client(&self) -> ClientConfig {
        let mut config = ClientConfig::new();
        for (key, value) in &self.options {
            config.set(key, value);
        }
        config.set("bootstrap.servers", &self.brokers);
        config
    }

    fn reader(&self) -> Result<BaseConsumer, String> {
        self.client()
            .set("group.id", "saga-console")
            .set("enable.auto.commit", "false")
            .set("enable.partition.eof", "true")
            .set("auto.offset.reset", "earliest")
            // Some brokers hold a fetch this long even when data waits.
            .set("fetch.wait.max.ms", "50")
            .create()
            .map_err(|e| format!("cannot create a Kafka consumer: {e}"))
    }

    /// The newest letters of every topic, newest first within a topic.
    pub(crate) async fn read(&self) -> Result<Vec<Letter>, String> {
        let this = self.clone();
        tokio::task::spawn_blocking(move || this.read_blocking())
            .await
            .map_err(|e| e.to_string())?
    }

    fn read_blocking(&self) -> Result<Vec<Letter>, String> {
        let consumer = self.reader()?;
        let mut all = Vec::new();
        for topic in &self.topics {
            let mut letters = Vec::new();
            scan(&consumer, topic, None, |m| {
                letters.push(Letter::of(m));
                false
            })?;
            letters.sort_by(|a, b| b.offset.cmp(&a.offset).then(a.partition.cmp(&b.partition)));
            letters.truncate(SHOWN_PER_TOPIC);
            all.extend(letters);
        }
        Ok(all)
    }

    /// Produces the letter at `topic`/`partition`/`offset` to its source topic;
    /// where it went.
    pub(crate) async fn replay(
        &self,
        topic: &str,
        partition: i32,
        offset: i64,
    ) -> Result<Replayed, String> {
        if !self.topics.iter().any(|t| t == topic) {
            return Err(format!(
                "{topic} is not a dead-letter topic of this console"
            ));
        }
        let this = self.clone();
        let source = topic.to_owned();
        let found = tokio::task::spawn_blocking(move || {
            let consumer = this.reader()?;
            let mut found = None;
            scan(&consumer, &source, Some(partition), |m| {
                if m.offset() == offset {
                    found = Some(Original::of(m));
                    return true;
                }
                false
            })?;
            Ok::<_, String>(found)
        })
        .await
        .map_err(|e| e.to_string())??;
        let original = found.ok_or_else(|| {
            format!("no dead letter at {topic} partition {partition} offset {offset}")
        })?;
        let target = original.target.clone().ok_or_else(|| {
            "the letter does not say which topic it came from (no dlq-source-topic or \
             dlq-original-topic header)"
                .to_owned()
        })?;
        let producer: FutureProducer = self
            .client()
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("partitioner", "murmur2_random")
            .create()
            .map_err(|e| format!("cannot create a Kafka producer: {e}"))?;
        let mut headers = OwnedHeaders::new();
        for (key, value) in &original.headers {
            headers = headers.insert(Header {
                key,
                value: value.as_deref(),
            });
        }
        let mut record = FutureRecord::<[u8], [u8]>::to(&target).headers(headers);
        if let Some(key) = &original.key {
            record = record.key(key);
        }
        if let Some(payload) = &original.payload {
            record = record.payload(payload);
        }
        let delivered = producer
            .send(record, PRODUCE_TIMEOUT)
            .await
            .map_err(|(e, _)| format!("the broker refused the replay to {target}: {e}"))?;
        Ok(Replayed {
            saga_id: original.header("saga-id").and_then(|v| v.parse().ok()),
            message_id: original.header("id").map(str::to_owned),
            target,
            partition: delivered.partition,
            offset: delivered.offset,
        })
    }
}

/// Where a replayed letter went, and whose it was.
#[derive(Debug, Clone)]
pub(crate) struct Replayed {
    pub(crate) target: String,
    pub(crate) partition: i32,
    pub(crate) offset: i64,
    /// The saga the record belongs to (its `saga-id` header), if any.
    pub(crate) saga_id: Option<uuid::Uuid>,
    /// The record's `id` header.
    pub(crate) message_id: Option<String>,
}

/// Reads `topic` (one partition, or all) from the beginning to its end, handing
/// each message to `each` until it says stop.
fn scan(
    consumer: &BaseConsumer,
    topic: &str,
    only: Option<i32>,
    mut each: impl FnMut(&BorrowedMessage<'_>) -> bool,
) -> Result<(), String> {
    let metadata = consumer
        .fetch_metadata(Some(topic), READ_TIMEOUT)
        .map_err(|e| format!("cannot read the metadata of {topic}: {e}"))?;
    let partitions: Vec<i32> = metadata
        .topics()
        .iter()
        .filter(|t| t.name() == topic && t.error().is_none())
        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
        .filter(|p| only.is_none_or(|only| only == *p))
        .collect();
    if partitions.is_empty() {
        return Ok(()); // no such topic yet: nothing was dead-lettered
    }
    let mut list = TopicPartitionList::new();
    for p in &partitions {
        list.add_partition_offset(topic, *p, Offset::Beginning)
            .map_err(|e| e.to_string())?;
    }
    consumer.assign(&list).map_err(|e| e.to_string())?;
    let mut open = partitions.len();
    let deadline = Instant::now() + READ_TIMEOUT;
    while open > 0 {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(format!("reading {topic} took longer than {READ_TIMEOUT:?}"));
        }
        match consumer.poll(left.min(Duration::from_millis(200))) {
            Some(Ok(m)) if each(&m) => break,
            None | Some(Ok(_)) => {}
            Some(Err(rdkafka::error::KafkaError::PartitionEOF(_))) => open -= 1,
            Some(Err(e)) => return Err(format!("reading {topic}: {e}")),
        }
    }
    consumer.unassign().map_err(|e| e.to_string())?;
    Ok(())
}

/// One dead letter as the page shows it.
#[derive(Debug, Clone)]
pub(crate) struct Letter {
    pub(crate) topic: String,
    pub(crate) partition: i32,
    pub(crate) offset: i64,
    pub(crate) timestamp: Option<i64>,
    pub(crate) key: Option<String>,
    pub(crate) headers: Vec<(String, String)>,
    pub(crate) payload: String,
}

impl Letter {
    fn of(m: &BorrowedMessage<'_>) -> Letter {
        Letter {
            topic: m.topic().to_owned(),
            partition: m.partition(),
            offset: m.offset(),
            timestamp: m.timestamp().to_millis(),
            key: m.key().map(|k| String::from_utf8_lossy(k).into_owned()),
            headers: m
                .headers()
                .map(|h| {
                    h.iter()
                        .map(|h| {
                            let value = h.value.map(String::from_utf8_lossy).unwrap_or_default();
                            (h.key.to_owned(), value.into_owned())
                        })
                        .collect()
                })
                .unwrap_or_default(),
            payload: m
                .payload()
                .map(|p| String::from_utf8_lossy(p).into_owned())
                .unwrap_or_default(),
        }
    }

    pub(crate) fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .rev()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// Where a replay sends it.
    pub(crate) fn source(&self) -> Option<&str> {
        self.header("dlq-source-topic")
            .or_else(|| self.header("dlq-original-topic"))
    }
}

/// The record a letter holds, as it was before it was dead-lettered.
struct Original {
    key: Option<Vec<u8>>,
    payload: Option<Vec<u8>>,
    headers: Vec<(String, Option<Vec<u8>>)>,
    target: Option<String>,
}

impl Original {
    /// A header's value as text.
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .and_then(|(_, v)| v.as_deref())
            .and_then(|v| std::str::from_utf8(v).ok())
    }

    fn of(m: &BorrowedMessage<'_>) -> Original {
        let mut headers = Vec::new();
        let mut target = None;
        if let Some(h) = m.headers() {
            for h in h.iter() {
                match h.key {
                    "dlq-source-topic" | "dlq-original-topic" => {
                        let value = h.value.map(|v| String::from_utf8_lossy(v).into_owned());
                        if target.is_none() || h.key == "dlq-source-topic" {
                            target = value;
                        }
                    }
                    key if key.starts_with("dlq-") => {}
                    key => headers.push((key.to_owned(), h.value.map(<[u8]>::to_vec))),
                }
            }
        }
        Original {
            key: m.key().map(<[u8]>::to_vec),
            payload: m.payload().map(<[u8]>::to_vec),
            headers,
            target,
        }
    }
}
