//! Dead letters: what the relay cannot deliver as it is goes to a dead-letter topic
//! (`outbox.dlq` by default) with the reason and the source position, and the stream
//! goes on. A dead letter counts as its source row's record: the transaction is
//! confirmed only after the dead letter is acknowledged, so nothing disappears
//! without a trace (DESIGN contract 5).
//!
//! The value is a JSON object that says what happened and holds what could be kept:
//!
//! ```json
//! {"reason": "column \"aggregateid\" (aggregate id) is NULL", "reason_code": "bad_row",
//!  "position": "0/16B3748#2", "row": {"id": "…", "aggregateid": null, …}}
//! {"reason": "…MessageSizeTooLarge…", "reason_code": "too_large", "position": "…",
//!  "original_topic": "outbox.event.order", "key": "42", "headers": {…}, "payload_bytes": 2097164}
//! ```
//!
//! A refused record's payload is left out (it is what the broker refused); its size is
//! given and the row can be found in the service's database by its `id`.

use bytes::Bytes;
use serde_json::{Map, Value};

use crate::routing::{BadRow, ColumnValue, OutboxRecord, Position, HEADER_ID, HEADER_TYPE};

/// The default dead-letter topic.
pub const DEFAULT_DEAD_LETTER_TOPIC: &str = "outbox.dlq";
/// Header: why the record was dead-lettered, in words.
pub const HEADER_REASON: &str = "dlq-reason";
/// Header: why, as a code (`bad_row`, `too_large`, `undeliverable`).
pub const HEADER_REASON_CODE: &str = "dlq-reason-code";
/// Header: the commit LSN of the source row's transaction.
pub const HEADER_SOURCE_LSN: &str = "dlq-source-lsn";
/// Header: the source row's index among the routed rows of its transaction.
pub const HEADER_SOURCE_INDEX: &str = "dlq-source-index";
/// Header: the topic the record was meant for, when known.
pub const HEADER_ORIGINAL_TOPIC: &str = "dlq-original-topic";

/// Why a record became a dead letter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reason {
    /// The row could not be made into a record.
    BadRow,
    /// The record is larger than the producer or the broker accepts.
    TooLarge,
    /// The broker refused the record for another definite reason.
    Undeliverable,
}

impl Reason {
    /// The code used in headers and metrics.
    pub const fn code(self) -> &'static str {
        match self {
            Reason::BadRow => "bad_row",
            Reason::TooLarge => "too_large",
            Reason::Undeliverable => "undeliverable",
        }
    }
}

/// What is kept of a record in flight, enough to dead-letter it if the broker
/// refuses it.
#[derive(Debug, Clone)]
pub struct RecordSummary {
    pub topic: String,
    pub key: Bytes,
    pub headers: Vec<(String, Bytes)>,
    pub payload_bytes: usize,
    pub id: String,
    pub position: Position,
    /// Why the record is itself a dead letter, if it is one (a dead letter is never
    /// dead-lettered again).
    pub letter: Option<Reason>,
    /// Key, value and header bytes.
    pub bytes: usize,
    /// When the source transaction committed.
    pub commit_time: Option<std::time::SystemTime>,
}

impl RecordSummary {
    /// The summary of a record handed to the producer (which copied it): takes
    /// its parts, dropping only the payload, so keeping it costs no copy.
    pub fn of(
        record: OutboxRecord,
        letter: Option<Reason>,
        commit_time: Option<std::time::SystemTime>,
    ) -> RecordSummary {
        let payload_bytes = record.payload.as_ref().map_or(0, Bytes::len);
        let header_bytes: usize = record.headers.iter().map(|(k, v)| k.len() + v.len()).sum();
        RecordSummary {
            bytes: record.key.len() + payload_bytes + header_bytes,
            topic: record.topic,
            key: record.key,
            headers: record.headers,
            payload_bytes,
            id: record.id,
            position: record.position,
            letter,
            commit_time,
        }
    }
}

/// The dead letter of a row that could not be routed: its columns as JSON.
pub fn bad_row(
    dlq_topic: &str,
    columns: &[String],
    values: &[ColumnValue<'_>],
    key: Option<&str>,
    position: Position,
    error: &BadRow,
) -> OutboxRecord {
    let mut row = Map::new();
    for (i, value) in values.iter().enumerate() {
        let name = columns
            .get(i)
            .cloned()
            .unwrap_or_else(|| format!("column{i}"));
        let json = match value {
            ColumnValue::Null => Value::Null,
            ColumnValue::Unchanged => Value::String("<unchanged toast>".to_owned()),
            ColumnValue::Text(bytes) => Value::String(String::from_utf8_lossy(bytes).into_owned()),
        };
        row.insert(name, json);
    }
    let id = row
        .get("id")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned();
    let mut body = envelope(Reason::BadRow, &error.to_string(), position);
    body.insert("row".to_owned(), Value::Object(row));
    letter(
        dlq_topic,
        Reason::BadRow,
        &error.to_string(),
        key.unwrap_or_default(),
        Vec::new(),
        None,
        body,
        id,
        position,
    )
}

/// The dead letter of a record the producer or broker refused for good.
pub fn refused(
    dlq_topic: &str,
    record: &RecordSummary,
    reason: Reason,
    error: &str,
) -> OutboxRecord {
    let mut body = envelope(reason, error, record.position);
    body.insert(
        "original_topic".to_owned(),
        Value::String(record.topic.clone()),
    );
    body.insert(
        "key".to_owned(),
        Value::String(String::from_utf8_lossy(&record.key).into_owned()),
    );
    let headers: Map<String, Value> = record
        .headers
        .iter()
        .map(|(k, v)| {
            (
                k.clone(),
                Value::String(String::from_utf8_lossy(v).into_owned()),
            )
        })
        .collect();
    body.insert("headers".to_owned(), Value::Object(headers));
    body.insert(
        "payload_bytes".to_owned(),
        Value::from(record.payload_bytes),
    );
    let kept: Vec<(String, Bytes)> = record
        .headers
        .iter()
        .filter(|(k, _)| k == HEADER_ID || k == HEADER_TYPE)
        .cloned()
        .collect();
    letter(
        dlq_topic,
        reason,
        error,
        &String::from_utf8_lossy(&record.key),
        kept,
        Some(&record.topic),
        body,
        record.id.clone(),
        record.position,
    )
}

/// The dead letter replacing a record the producer or broker refused, or `None`
/// when the record must stop the relay instead: no dead-letter topic, an error that
/// is not definite, or a record that is itself a dead letter.
pub fn replacement(
    dlq: Option<&str>,
    summary: &RecordSummary,
    error: &rdkafka::error::KafkaError,
) -> Option<(Reason, OutboxRecord)> {
    let dlq = dlq?;
    if summary.letter.is_some() || !crate::kafka::is_definite(error) {
        return None;
    }
    let reason = if crate::kafka::is_too_large(error) {
        Reason::TooLarge
    } else {
        Reason::Undeliverable
    };
    tracing::warn!(position = %summary.position, topic = %summary.topic, %error, dlq, "dead-lettering a refused record");
    Some((reason, refused(dlq, summary, reason, &error.to_string())))
}

fn envelope(reason: Reason, text: &str, position: Position) -> Map<String, Value> {
    let mut body = Map::new();
    body.insert("reason".to_owned(), Value::String(text.to_owned()));
    body.insert(
        "reason_code".to_owned(),
        Value::String(reason.code().to_owned()),
    );
    body.insert("position".to_owned(), Value::String(position.to_string()));
    body
}

#[allow(clippy::too_many_arguments)]
fn letter(
    dlq_topic: &str,
    reason: Reason,
    text: &str,
    key: &str,
    mut headers: Vec<(String, Bytes)>,
    original_topic: Option<&str>,
    body: Map<String, Value>,
    id: String,
    position: Position,
) -> OutboxRecord {
    headers.push((HEADER_REASON.to_owned(), Bytes::from(text.to_owned())));
    headers.push((
        HEADER_REASON_CODE.to_owned(),
        Bytes::from_static(reason.code().as_bytes()),
    ));
    headers.push((
        HEADER_SOURCE_LSN.to_owned(),
        Bytes::from(position.commit_lsn.to_string()),
    ));
    headers.push((
        HEADER_SOURCE_INDEX.to_owned(),
        Bytes::from(position.index.to_string()),
    ));
    if let Some(topic) = original_topic {
        headers.push((
            HEADER_ORIGINAL_TOPIC.to_owned(),
            Bytes::from(topic.to_owned()),
        ));
    }
    OutboxRecord {
        topic: dlq_topic.to_owned(),
        key: Bytes::from(key.to_owned()),
        payload: Some(Bytes::from(Value::Object(body).to_string())),
        headers,
        id,
        position,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Lsn;

    const POSITION: Position = Position {
        commit_lsn: Lsn::new(0x1_0000_00A0),
        index: 2,
    };

    fn header<'r>(record: &'r OutboxRecord, name: &str) -> Option<&'r str> {
        record
            .headers
            .iter()
            .find(|(k, _)| k == name)
            .and_then(|(_, v)| std::str::from_utf8(v).ok())
    }

    #[test]
    fn a_bad_row_keeps_its_columns_reason_and_position() {
        let columns = ["id", "aggregateid", "payload"].map(str::to_owned);
        let values = [
            ColumnValue::Text(b"0190a5c2-6c1e-7b8e-9d3f-1a2b3c4d5e6f"),
            ColumnValue::Null,
            ColumnValue::Text(br#"{"a": 1}"#),
        ];
        let error = BadRow::Null {
            column: "aggregateid".to_owned(),
            role: "aggregate id",
        };
        let letter = bad_row("outbox.dlq", &columns, &values, None, POSITION, &error);
        assert_eq!(letter.topic, "outbox.dlq");
        assert_eq!(letter.position, POSITION);
        assert_eq!(header(&letter, HEADER_REASON_CODE), Some("bad_row"));
        assert_eq!(header(&letter, HEADER_SOURCE_LSN), Some("1/A0"));
        assert_eq!(header(&letter, HEADER_SOURCE_INDEX), Some("2"));
        assert!(header(&letter, HEADER_REASON).is_some_and(|r| r.contains("is NULL")));
        let body: Value = serde_json::from_slice(letter.payload.as_deref().unwrap()).unwrap();
        assert_eq!(body["row"]["aggregateid"], Value::Null);
        assert_eq!(body["row"]["payload"], r#"{"a": 1}"#);
        assert_eq!(body["position"], "1/A0#2");
        assert_eq!(letter.id, "0190a5c2-6c1e-7b8e-9d3f-1a2b3c4d5e6f");
    }

    #[test]
    fn a_refused_record_keeps_everything_but_its_payload() {
        let record = OutboxRecord {
            topic: "outbox.event.order".to_owned(),
            key: Bytes::from_static(b"42"),
            payload: Some(Bytes::from(vec![b'x'; 5000])),
            headers: vec![
                (HEADER_ID.to_owned(), Bytes::from_static(b"e1")),
                (HEADER_TYPE.to_owned(), Bytes::from_static(b"Created")),
                ("traceparent".to_owned(), Bytes::from_static(b"00-1-2-01")),
            ],
            id: "e1".to_owned(),
            position: POSITION,
        };
        let summary = RecordSummary::of(record, None, None);
        let letter = refused("dlq", &summary, Reason::TooLarge, "too large");
        assert_eq!(letter.key.as_ref(), b"42");
        assert_eq!(header(&letter, HEADER_ID), Some("e1"));
        assert_eq!(header(&letter, HEADER_TYPE), Some("Created"));
        assert_eq!(
            header(&letter, HEADER_ORIGINAL_TOPIC),
            Some("outbox.event.order")
        );
        assert_eq!(header(&letter, HEADER_REASON_CODE), Some("too_large"));
        let payload = letter.payload.as_deref().unwrap();
        assert!(payload.len() < 1000, "the refused payload was copied");
        let body: Value = serde_json::from_slice(payload).unwrap();
        assert_eq!(body["payload_bytes"], 5000);
        assert_eq!(body["headers"]["traceparent"], "00-1-2-01");
    }
}
