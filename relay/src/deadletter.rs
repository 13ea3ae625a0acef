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
//! {"reason": "too large: …", "reason_code": "too_large", "position": "…",
//!  "original_topic": "outbox.event.order", "key": "42", "headers": {…},
//!  "payload": {"bytes": 2097164, "sha256": "9f…"}}
//! {"reason": "…", "reason_code": "bad_route", "position": "…",
//!  "original_topic": "outbox.event.order placed", "key": "42", "headers": {…},
//!  "payload": "{\"total\": 10}"}
//! ```
//!
//! **A dead letter always fits.** It is built within a budget below the sink's
//! largest record: a value that would not fit (a large payload, a large column of
//! a bad row, a long key or header) is replaced by its size and SHA-256 digest, so
//! the row can still be found and checked in the service's database. The payload of
//! a record refused as too large is never kept (it is what did not fit); for every
//! other reason it is kept whenever it fits. Should the destination still refuse a
//! letter for its size, [`shrink`] makes the smallest letter: reason, position, ids,
//! digests.
//!
//! Dead letters take the sink-neutral [`Refusal`] of [`crate::sink`]: the sinks
//! decide what is a record's fault; this module only writes it down.

use bytes::Bytes;
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use crate::routing::{BadRow, ColumnValue, OutboxRecord, Position, HEADER_ID, HEADER_TYPE};
use crate::sink::{Refusal, RefusalKind};

pub use crate::config::DEFAULT_DEAD_LETTER_TOPIC;
/// Header: why the record was dead-lettered, in words.
pub const HEADER_REASON: &str = "dlq-reason";
/// Header: why, as a code (`bad_row`, `bad_route`, `too_large`, `undeliverable`).
pub const HEADER_REASON_CODE: &str = "dlq-reason-code";
/// Header: the commit LSN of the source row's transaction.
pub const HEADER_SOURCE_LSN: &str = "dlq-source-lsn";
/// Header: the source row's index among the routed rows of its transaction.
pub const HEADER_SOURCE_INDEX: &str = "dlq-source-index";
/// Header: the topic the record was meant for, when known.
pub const HEADER_ORIGINAL_TOPIC: &str = "dlq-original-topic";

/// Bytes of a key, a header value or a reason kept as they are; longer ones are
/// replaced by their size and digest.
const SMALL_VALUE: usize = 1024;

/// Why a record became a dead letter. The discriminant indexes [`Reason::ALL`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reason {
    /// The row could not be made into a record.
    BadRow = 0,
    /// The record's topic is not a name the destination can have.
    BadRoute = 1,
    /// The record is larger than the destination accepts.
    TooLarge = 2,
    /// The destination refused the record for another reason of its own.
    Undeliverable = 3,
}

impl Reason {
    /// Every reason, for metrics.
    pub const ALL: [Reason; 4] = [
        Reason::BadRow,
        Reason::BadRoute,
        Reason::TooLarge,
        Reason::Undeliverable,
    ];

    /// The code used in headers and metrics.
    pub const fn code(self) -> &'static str {
        match self {
            Reason::BadRow => "bad_row",
            Reason::BadRoute => "bad_route",
            Reason::TooLarge => "too_large",
            Reason::Undeliverable => "undeliverable",
        }
    }

    /// The reason of a refusal.
    pub const fn of(kind: RefusalKind) -> Reason {
        match kind {
            RefusalKind::TooLarge => Reason::TooLarge,
            RefusalKind::BadRoute => Reason::BadRoute,
            RefusalKind::Invalid => Reason::Undeliverable,
        }
    }
}

/// How large a dead letter may be for a sink taking records up to
/// `max_record_bytes`.
pub fn budget(max_record_bytes: usize) -> usize {
    max_record_bytes / 4 * 3
}

/// The size and SHA-256 digest of a value too large to keep.
fn digest(bytes: &[u8]) -> Value {
    let hash = Sha256::digest(bytes);
    let hex: String = hash.iter().map(|b| format!("{b:02x}")).collect();
    let mut object = Map::new();
    object.insert("bytes".to_owned(), Value::from(bytes.len()));
    object.insert("sha256".to_owned(), Value::String(hex));
    Value::Object(object)
}

/// `bytes` as a JSON string when at most `limit` bytes long, else its digest.
fn kept(bytes: &[u8], limit: usize) -> Value {
    if bytes.len() <= limit {
        Value::String(String::from_utf8_lossy(bytes).into_owned())
    } else {
        digest(bytes)
    }
}

/// `text` cut to [`SMALL_VALUE`] bytes (at a character boundary), for headers.
fn short(text: &str) -> String {
    if text.len() <= SMALL_VALUE {
        return text.to_owned();
    }
    let mut end = SMALL_VALUE;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end])
}

/// The dead letter of a row that could not be routed: its columns as JSON, the
/// largest replaced by their digests until the letter fits `budget`.
pub fn bad_row(
    dlq_topic: &str,
    columns: &[String],
    values: &[ColumnValue<'_>],
    key: Option<&str>,
    position: Position,
    error: &BadRow,
    budget: usize,
) -> OutboxRecord {
    let name = |i: usize| {
        columns
            .get(i)
            .cloned()
            .unwrap_or_else(|| format!("column{i}"))
    };
    let mut row = Map::new();
    let mut id = String::new();
    for (i, value) in values.iter().enumerate() {
        let json = match value {
            ColumnValue::Null => Value::Null,
            ColumnValue::Unchanged => Value::String("<unchanged toast>".to_owned()),
            ColumnValue::Text(bytes) => {
                if name(i) == "id" {
                    id = String::from_utf8_lossy(bytes).into_owned();
                }
                Value::String(String::from_utf8_lossy(bytes).into_owned())
            }
        };
        row.insert(name(i), json);
    }
    let reason = error.to_string();
    let build = |row: &Map<String, Value>| {
        let mut body = envelope(Reason::BadRow, &reason, position);
        body.insert("row".to_owned(), Value::Object(row.clone()));
        letter(
            dlq_topic,
            Reason::BadRow,
            &reason,
            key.unwrap_or_default(),
            Vec::new(),
            None,
            body,
            id.clone(),
            position,
        )
    };
    // Largest columns first, until the letter fits.
    let mut by_size: Vec<usize> = (0..values.len()).collect();
    by_size.sort_by_key(|&i| match values[i] {
        ColumnValue::Text(bytes) => std::cmp::Reverse(bytes.len()),
        _ => std::cmp::Reverse(0),
    });
    let mut letter = build(&row);
    for i in by_size {
        if letter.size() <= budget {
            break;
        }
        if let ColumnValue::Text(bytes) = values[i] {
            row.insert(name(i), digest(bytes));
            letter = build(&row);
        }
    }
    letter
}

/// The record of a routed row; or, when it could not be routed and a dead-letter
/// topic is configured, its dead letter (`Err` when none is).
#[allow(clippy::too_many_arguments)]
pub fn or_letter(
    routed: Result<OutboxRecord, BadRow>,
    dlq_topic: Option<&str>,
    columns: &[String],
    values: &[ColumnValue<'_>],
    key: Option<&str>,
    position: Position,
    budget: usize,
) -> Result<(OutboxRecord, Option<Reason>), BadRow> {
    match (routed, dlq_topic) {
        (Ok(record), _) => Ok((record, None)),
        (Err(error), Some(dlq)) => {
            tracing::warn!(%position, %error, topic = %dlq, "dead-lettering a row that cannot be routed");
            let letter = bad_row(dlq, columns, values, key, position, &error, budget);
            Ok((letter, Some(Reason::BadRow)))
        }
        (Err(error), None) => Err(error),
    }
}

/// The dead letter of a record the destination refused for good. The payload is
/// kept unless it was the reason (too large) or would not fit `budget`.
pub fn refused(
    dlq_topic: &str,
    record: &OutboxRecord,
    refusal: &Refusal,
    budget: usize,
) -> OutboxRecord {
    let reason = Reason::of(refusal.kind);
    let text = refusal.to_string();
    let mut body = envelope(reason, &text, record.position);
    body.insert(
        "original_topic".to_owned(),
        kept(record.topic.as_bytes(), SMALL_VALUE),
    );
    body.insert("key".to_owned(), kept(&record.key, SMALL_VALUE));
    let headers: Map<String, Value> = record
        .headers
        .iter()
        .map(|(k, v)| (short(k), kept(v, SMALL_VALUE)))
        .collect();
    body.insert("headers".to_owned(), Value::Object(headers));
    let build = |payload: Value| {
        let mut body = body.clone();
        body.insert("payload".to_owned(), payload);
        letter(
            dlq_topic,
            reason,
            &text,
            &key_text(&record.key),
            kept_headers(record),
            Some(&record.topic),
            body,
            record.id.clone(),
            record.position,
        )
    };
    match &record.payload {
        None => build(Value::Null),
        Some(p) if reason != Reason::TooLarge && p.len() <= budget => {
            let kept = build(Value::String(String::from_utf8_lossy(p).into_owned()));
            if kept.size() <= budget {
                kept
            } else {
                build(digest(p))
            }
        }
        Some(p) => build(digest(p)),
    }
}

/// The smallest letter for a letter the destination refused as too large: the
/// reason, position and ids, every value replaced by its digest.
pub fn shrink(letter_record: &OutboxRecord, refusal: &Refusal) -> OutboxRecord {
    let header = |name: &str| {
        letter_record
            .headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
    };
    let reason = match header(HEADER_REASON_CODE).as_deref() {
        Some("bad_row") => Reason::BadRow,
        Some("bad_route") => Reason::BadRoute,
        Some("undeliverable") => Reason::Undeliverable,
        _ => Reason::TooLarge,
    };
    let text = short(&format!(
        "{}; the dead letter itself was refused ({refusal}), so only digests are kept",
        header(HEADER_REASON).unwrap_or_default()
    ));
    let mut body = envelope(reason, &text, letter_record.position);
    body.insert("id".to_owned(), kept(letter_record.id.as_bytes(), 256));
    body.insert("key".to_owned(), digest(&letter_record.key));
    body.insert(
        "letter".to_owned(),
        digest(letter_record.payload.as_deref().unwrap_or_default()),
    );
    let original = header(HEADER_ORIGINAL_TOPIC).map(|t| short(&t));
    letter(
        &letter_record.topic,
        reason,
        &text,
        "",
        kept_headers(letter_record),
        original.as_deref(),
        body,
        letter_record.id.clone(),
        letter_record.position,
    )
}

/// The `id` and `type` headers of a record, when short.
fn kept_headers(record: &OutboxRecord) -> Vec<(String, Bytes)> {
    record
        .headers
        .iter()
        .filter(|(k, v)| (k == HEADER_ID || k == HEADER_TYPE) && v.len() <= SMALL_VALUE)
        .cloned()
        .collect()
}

/// A key as the letter's key: itself when short, else its digest's text.
fn key_text(key: &[u8]) -> String {
    match kept(key, SMALL_VALUE) {
        Value::String(s) => s,
        other => other.to_string(),
    }
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
    headers.push((HEADER_REASON.to_owned(), Bytes::from(short(text))));
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
        headers.push((HEADER_ORIGINAL_TOPIC.to_owned(), Bytes::from(short(topic))));
    }
    OutboxRecord {
        topic: dlq_topic.to_owned(),
        key: Bytes::from(key_text(key.as_bytes())),
        payload: Some(Bytes::from(Value::Object(body).to_string())),
        headers,
        id: short(&id),
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
    const BUDGET: usize = 750_000;

    fn header<'r>(record: &'r OutboxRecord, name: &str) -> Option<&'r str> {
        record
            .headers
            .iter()
            .find(|(k, _)| k == name)
            .and_then(|(_, v)| std::str::from_utf8(v).ok())
    }

    fn body(letter: &OutboxRecord) -> Value {
        serde_json::from_slice(letter.payload.as_deref().unwrap()).unwrap()
    }

    fn record(payload: Vec<u8>) -> OutboxRecord {
        OutboxRecord {
            topic: "outbox.event.order".to_owned(),
            key: Bytes::from_static(b"42"),
            payload: Some(Bytes::from(payload)),
            headers: vec![
                (HEADER_ID.to_owned(), Bytes::from_static(b"e1")),
                (HEADER_TYPE.to_owned(), Bytes::from_static(b"Created")),
                ("traceparent".to_owned(), Bytes::from_static(b"00-1-2-01")),
            ],
            id: "e1".to_owned(),
            position: POSITION,
        }
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
        let letter = bad_row(
            "outbox.dlq",
            &columns,
            &values,
            None,
            POSITION,
            &error,
            BUDGET,
        );
        assert_eq!(letter.topic, "outbox.dlq");
        assert_eq!(letter.position, POSITION);
        assert_eq!(header(&letter, HEADER_REASON_CODE), Some("bad_row"));
        assert_eq!(header(&letter, HEADER_SOURCE_LSN), Some("1/A0"));
        assert_eq!(header(&letter, HEADER_SOURCE_INDEX), Some("2"));
        assert!(header(&letter, HEADER_REASON).is_some_and(|r| r.contains("is NULL")));
        let body = body(&letter);
        assert_eq!(body["row"]["aggregateid"], Value::Null);
        assert_eq!(body["row"]["payload"], r#"{"a": 1}"#);
        assert_eq!(body["position"], "1/A0#2");
        assert_eq!(letter.id, "0190a5c2-6c1e-7b8e-9d3f-1a2b3c4d5e6f");
    }

    #[test]
    fn a_bad_row_with_a_large_column_fits_its_budget_with_the_columns_digest() {
        let columns = ["id", "aggregateid", "payload"].map(str::to_owned);
        let large = vec![b'x'; 2 * 1024 * 1024];
        let values = [
            ColumnValue::Text(b"e7"),
            ColumnValue::Null,
            ColumnValue::Text(&large),
        ];
        let error = BadRow::Null {
            column: "aggregateid".to_owned(),
            role: "aggregate id",
        };
        let letter = bad_row("dlq", &columns, &values, None, POSITION, &error, BUDGET);
        assert!(letter.size() <= BUDGET, "{}", letter.size());
        let body = body(&letter);
        assert_eq!(body["row"]["id"], "e7", "the small columns are kept");
        assert_eq!(body["row"]["payload"]["bytes"], 2 * 1024 * 1024);
        assert_eq!(
            body["row"]["payload"]["sha256"].as_str().map(str::len),
            Some(64)
        );
    }

    #[test]
    fn a_refused_record_keeps_its_payload_unless_size_is_the_reason() {
        let routed = refused(
            "dlq",
            &record(b"{\"total\": 10}".to_vec()),
            &Refusal::new(RefusalKind::BadRoute, "no such name"),
            BUDGET,
        );
        assert_eq!(header(&routed, HEADER_REASON_CODE), Some("bad_route"));
        assert_eq!(body(&routed)["payload"], "{\"total\": 10}");

        let large = refused(
            "dlq",
            &record(vec![b'x'; 5000]),
            &Refusal::new(RefusalKind::TooLarge, "too large"),
            BUDGET,
        );
        assert_eq!(large.key.as_ref(), b"42");
        assert_eq!(header(&large, HEADER_ID), Some("e1"));
        assert_eq!(header(&large, HEADER_TYPE), Some("Created"));
        assert_eq!(
            header(&large, HEADER_ORIGINAL_TOPIC),
            Some("outbox.event.order")
        );
        assert_eq!(header(&large, HEADER_REASON_CODE), Some("too_large"));
        let payload = large.payload.as_deref().unwrap();
        assert!(payload.len() < 1000, "the refused payload was copied");
        let body = body(&large);
        assert_eq!(body["payload"]["bytes"], 5000);
        assert_eq!(body["headers"]["traceparent"], "00-1-2-01");
    }

    #[test]
    fn a_refused_letter_shrinks_to_digests() {
        let mut big = record(vec![b'y'; 300_000]);
        big.key = Bytes::from(vec![b'k'; 100_000]);
        let letter = refused(
            "dlq",
            &big,
            &Refusal::new(RefusalKind::Invalid, "nope"),
            BUDGET,
        );
        assert!(letter.size() <= BUDGET);
        let small = shrink(&letter, &Refusal::new(RefusalKind::TooLarge, "over 1000"));
        assert!(small.size() < 2_000, "{}", small.size());
        assert_eq!(small.topic, "dlq");
        assert_eq!(small.id, "e1");
        assert_eq!(header(&small, HEADER_REASON_CODE), Some("undeliverable"));
        assert_eq!(
            header(&small, HEADER_ORIGINAL_TOPIC),
            Some("outbox.event.order")
        );
    }
}
