//! From an outbox row to a Kafka record, the way Debezium's outbox event router does it.
//!
//! | record part | from |
//! |---|---|
//! | topic | the topic template, `{aggregatetype}` replaced by the row's aggregate type |
//! | key | `aggregateid` |
//! | value | `payload` (jsonb text as PostgreSQL renders it; NULL gives a record without value) |
//! | header `id` | `id` |
//! | header `type` | `type` |
//! | other headers | each entry of the `headers` jsonb object (strings as they are, other values as JSON) |
//! | headers `outbox-commit-lsn`, `outbox-index` | the position: the transaction's commit LSN and the row's index among the transaction's routed rows |
//!
//! A row that cannot become a record (a NULL where a value is needed, headers that
//! are not a JSON object) is a [`BadRow`]: definite, tied to that row. A table that
//! lacks a configured column is a [`SchemaError`]: no row of it can be routed.

use bytes::Bytes;

pub mod outbox;

use crate::Lsn;
use outbox::{Columns, Ident, OutboxConfig, PayloadFormat};

/// Header carrying the commit LSN of the row's transaction.
pub const HEADER_COMMIT_LSN: &str = "outbox-commit-lsn";
/// Header carrying the row's index among the routed rows of its transaction.
pub const HEADER_INDEX: &str = "outbox-index";
/// Header carrying the event id.
pub const HEADER_ID: &str = "id";
/// Header carrying the event type.
pub const HEADER_TYPE: &str = "type";

/// Where a row came from: its transaction's commit LSN and its index among the
/// routed rows of that transaction. Unique per event and stable across re-sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Position {
    pub commit_lsn: Lsn,
    pub index: u32,
}

impl std::fmt::Display for Position {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}#{}", self.commit_lsn, self.index)
    }
}

/// A Kafka record made from one outbox row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxRecord {
    pub topic: String,
    pub key: Bytes,
    pub payload: Option<Bytes>,
    /// In this order: `id`, `type`, the `headers` column's entries, the position.
    pub headers: Vec<(String, Bytes)>,
    pub id: String,
    pub position: Position,
}

impl OutboxRecord {
    /// Key, value and header bytes.
    pub fn size(&self) -> usize {
        self.key.len()
            + self.payload.as_ref().map_or(0, Bytes::len)
            + self
                .headers
                .iter()
                .map(|(k, v)| k.len() + v.len())
                .sum::<usize>()
    }
}

/// The outbox table lacks a configured column.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "the outbox table {table} has no column {column:?} (configured as the {role} column); \
     its columns are: {present}"
)]
pub struct SchemaError {
    pub table: String,
    pub column: String,
    pub role: &'static str,
    pub present: String,
}

/// One row that cannot become a record.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BadRow {
    #[error("column {column:?} ({role}) is NULL")]
    Null { column: String, role: &'static str },
    #[error("column {column:?} ({role}) is not valid UTF-8 text")]
    NotText { column: String, role: &'static str },
    #[error("column {column:?} ({role}) was not sent by the server (unchanged TOAST value)")]
    Unchanged { column: String, role: &'static str },
    #[error("the headers column {column:?} is not a JSON object: {reason}")]
    BadHeaders { column: String, reason: String },
    #[error("logical message: {reason}")]
    BadMessage { reason: String },
    #[error("the row has {got} columns, the relation announced {expected}")]
    ColumnCount { expected: usize, got: usize },
}

/// A column value as pgoutput sends it in text format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ColumnValue<'a> {
    Null,
    /// An unchanged TOAST value, not sent (cannot occur in an INSERT).
    Unchanged,
    Text(&'a [u8]),
}

/// Where the configured columns sit in the outbox relation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxLayout {
    id: (usize, String),
    aggregate_type: (usize, String),
    aggregate_id: (usize, String),
    event_type: (usize, String),
    payload: (usize, String),
    headers: Option<(usize, String)>,
    tracing_span_context: Option<usize>,
    /// Every column of the relation, in tuple order (for dead letters of bad rows).
    column_names: Vec<String>,
}

impl OutboxLayout {
    /// Finds the configured columns among the relation's column names. The headers
    /// column is optional; every other one is required.
    pub fn resolve(
        columns: &Columns,
        table: &str,
        relation_columns: &[&str],
    ) -> Result<OutboxLayout, SchemaError> {
        let find = |name: &str| relation_columns.iter().position(|c| *c == name);
        let require = |name: &str, role: &'static str| {
            find(name)
                .map(|i| (i, name.to_owned()))
                .ok_or_else(|| SchemaError {
                    table: table.to_owned(),
                    column: name.to_owned(),
                    role,
                    present: relation_columns.join(", "),
                })
        };
        Ok(OutboxLayout {
            id: require(columns.id.as_str(), "id")?,
            aggregate_type: require(columns.aggregate_type.as_str(), "aggregate type")?,
            aggregate_id: require(columns.aggregate_id.as_str(), "aggregate id")?,
            event_type: require(columns.event_type.as_str(), "event type")?,
            payload: require(columns.payload.as_str(), "payload")?,
            headers: find(columns.headers.as_str()).map(|i| (i, columns.headers.to_string())),
            tracing_span_context: find(columns.tracing_span_context.as_str()),
            column_names: relation_columns.iter().map(|c| (*c).to_owned()).collect(),
        })
    }

    /// The relation's column names, in tuple order.
    pub fn column_names(&self) -> &[String] {
        &self.column_names
    }

    /// The aggregate id of a row, when it is readable text: the key of its dead letter.
    pub fn aggregate_id<'v>(&self, values: &[ColumnValue<'v>]) -> Option<&'v str> {
        match values.get(self.aggregate_id.0) {
            Some(ColumnValue::Text(bytes)) => std::str::from_utf8(bytes).ok(),
            _ => None,
        }
    }

    /// Whether the table has the optional headers column.
    pub fn has_headers(&self) -> bool {
        self.headers.is_some()
    }

    /// Makes the record for one inserted row.
    pub fn route(
        &self,
        outbox: &OutboxConfig,
        values: &[ColumnValue<'_>],
        position: Position,
    ) -> Result<OutboxRecord, BadRow> {
        if values.len() != self.column_names.len() {
            return Err(BadRow::ColumnCount {
                expected: self.column_names.len(),
                got: values.len(),
            });
        }
        let text = |(index, column): &(usize, String), role: &'static str| match values
            .get(*index)
            .copied()
            .unwrap_or(ColumnValue::Null)
        {
            ColumnValue::Null => Err(BadRow::Null {
                column: column.clone(),
                role,
            }),
            ColumnValue::Unchanged => Err(BadRow::Unchanged {
                column: column.clone(),
                role,
            }),
            ColumnValue::Text(bytes) => {
                std::str::from_utf8(bytes)
                    .map(Some)
                    .map_err(|_| BadRow::NotText {
                        column: column.clone(),
                        role,
                    })
            }
        };
        let id = text(&self.id, "id")?.unwrap_or_default().to_owned();
        let aggregate_type = text(&self.aggregate_type, "aggregate type")?.unwrap_or_default();
        let key = text(&self.aggregate_id, "aggregate id")?.unwrap_or_default();
        let event_type = text(&self.event_type, "event type")?.unwrap_or_default();
        let payload = match text(&self.payload, "payload") {
            Ok(p) => p,
            Err(BadRow::Null { .. }) => None,
            Err(other) => return Err(other),
        };
        let mut extra = match &self.headers {
            Some(column) => match text(column, "headers") {
                Ok(Some(json)) => header_entries(&column.1, json)?,
                Err(BadRow::Null { .. }) | Ok(None) => Vec::new(),
                Err(other) => return Err(other),
            },
            None => Vec::new(),
        };
        if let Some(ColumnValue::Text(context)) = self
            .tracing_span_context
            .and_then(|i| values.get(i).copied())
        {
            add_span_context(&mut extra, &String::from_utf8_lossy(context));
        }
        Ok(assemble(
            outbox,
            outbox.topic_template.render(aggregate_type),
            Event {
                id,
                key,
                event_type,
                payload,
            },
            extra,
            position,
        ))
    }
}

/// The parts of an event, read from a row or a logical message.
struct Event<'a> {
    id: String,
    key: &'a str,
    event_type: &'a str,
    /// The payload's JSON text; `None` for a record without value.
    payload: Option<&'a str>,
}

/// The record for `event`: the payload in the configured format, and the headers
/// in their documented order (`id`, `type`, the extra entries, the position).
fn assemble(
    outbox: &OutboxConfig,
    topic: String,
    event: Event<'_>,
    extra: Vec<(String, Bytes)>,
    position: Position,
) -> OutboxRecord {
    let payload = event.payload.map(|p| match outbox.payload_format {
        PayloadFormat::Json => Bytes::copy_from_slice(p.as_bytes()),
        PayloadFormat::JsonString => Bytes::from(serde_json::Value::from(p).to_string()),
    });
    let mut headers = Vec::with_capacity(extra.len() + 4);
    headers.push((HEADER_ID.to_owned(), Bytes::from(event.id.clone())));
    headers.push((
        HEADER_TYPE.to_owned(),
        Bytes::copy_from_slice(event.event_type.as_bytes()),
    ));
    headers.extend(extra);
    headers.push((
        HEADER_COMMIT_LSN.to_owned(),
        Bytes::from(position.commit_lsn.to_string()),
    ));
    headers.push((
        HEADER_INDEX.to_owned(),
        Bytes::from(position.index.to_string()),
    ));
    OutboxRecord {
        topic,
        key: Bytes::copy_from_slice(event.key.as_bytes()),
        payload,
        headers,
        id: event.id,
        position,
    }
}

/// Makes the record for a logical message whose content is a JSON object keyed by
/// the outbox column names (a table-less outbox). The topic must be in the allow-list.
pub fn route_message(
    outbox: &OutboxConfig,
    allowed_topics: &[String],
    content: &[u8],
    position: Position,
) -> Result<OutboxRecord, BadRow> {
    let object: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(content)
        .map_err(|e| BadRow::BadMessage {
            reason: format!("the content is not a JSON object: {e}"),
        })?;
    let columns = &outbox.columns;
    let text = |column: &Ident, role: &'static str| -> Result<String, BadRow> {
        match object.get(column.as_str()) {
            Some(serde_json::Value::String(s)) => Ok(s.clone()),
            Some(serde_json::Value::Null) | None => Err(BadRow::Null {
                column: column.to_string(),
                role,
            }),
            Some(other) => Err(BadRow::BadMessage {
                reason: format!("{column:?} ({role}) is {}, not a string", json_kind(other)),
            }),
        }
    };
    let id = text(&columns.id, "id")?;
    let aggregate_type = text(&columns.aggregate_type, "aggregate type")?;
    let key = text(&columns.aggregate_id, "aggregate id")?;
    let event_type = text(&columns.event_type, "event type")?;
    let topic = outbox.topic_template.render(&aggregate_type);
    if !allowed_topics.contains(&topic) {
        return Err(BadRow::BadMessage {
            reason: format!("topic {topic} is not in the allow-list of logical messages"),
        });
    }
    let payload = match object.get(columns.payload.as_str()) {
        None | Some(serde_json::Value::Null) => None,
        Some(value) => Some(value.to_string()),
    };
    let mut extra = match object.get(columns.headers.as_str()) {
        None | Some(serde_json::Value::Null) => Vec::new(),
        Some(value) => header_entries(columns.headers.as_str(), &value.to_string())?,
    };
    if let Some(serde_json::Value::String(context)) =
        object.get(columns.tracing_span_context.as_str())
    {
        add_span_context(&mut extra, context);
    }
    Ok(assemble(
        outbox,
        topic,
        Event {
            id,
            key: &key,
            event_type: &event_type,
            payload: payload.as_deref(),
        },
        extra,
        position,
    ))
}

/// Adds the `traceparent` and `tracestate` of a Debezium-style span context
/// (`Properties` text: `key=value` or `key:value` lines, `#`/`!` comments,
/// backslash escapes; or a bare traceparent) to `headers`, unless they already
/// name a traceparent: the headers column is the more specific of the two. A
/// context without a traceparent adds nothing; it is never a reason to refuse a
/// row.
fn add_span_context(headers: &mut Vec<(String, Bytes)>, context: &str) {
    if headers.iter().any(|(k, _)| k == telemetry::TRACEPARENT) {
        return;
    }
    let context = context.trim();
    if !context.contains(['=', ':']) {
        if !context.is_empty() && !context.contains('\n') {
            headers.push((
                telemetry::TRACEPARENT.to_owned(),
                Bytes::from(context.to_owned()),
            ));
        }
        return;
    }
    let mut found = Vec::new();
    for line in context.lines().map(str::trim_start) {
        if line.is_empty() || line.starts_with(['#', '!']) {
            continue;
        }
        let Some(at) = line.find(['=', ':']) else {
            continue;
        };
        let key = unescape(line[..at].trim_end());
        let value = unescape(line[at + 1..].trim_start());
        if key == telemetry::TRACEPARENT || key == telemetry::TRACESTATE {
            found.push((key, Bytes::from(value)));
        }
    }
    if found.iter().any(|(k, _)| k == telemetry::TRACEPARENT) {
        headers.extend(found);
    }
}

/// A `Properties` key or value with its backslash escapes resolved.
fn unescape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('t') => out.push('\t'),
            Some('n') => out.push('\n'),
            Some('r') => out.push('\r'),
            Some(other) => out.push(other),
            None => {}
        }
    }
    out
}

/// The entries of a jsonb headers object, in the object's order.
fn header_entries(column: &str, json: &str) -> Result<Vec<(String, Bytes)>, BadRow> {
    let bad = |reason: String| BadRow::BadHeaders {
        column: column.to_owned(),
        reason,
    };
    let value: serde_json::Value = serde_json::from_str(json).map_err(|e| bad(e.to_string()))?;
    let serde_json::Value::Object(map) = value else {
        return Err(bad(format!("found {}", json_kind(&value))));
    };
    Ok(map
        .into_iter()
        .filter(|(_, v)| !v.is_null())
        .map(|(k, v)| {
            let bytes = match v {
                serde_json::Value::String(s) => Bytes::from(s),
                other => Bytes::from(other.to_string()),
            };
            (k, bytes)
        })
        .collect())
}

fn json_kind(value: &serde_json::Value) -> &'static str {
    match value {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::RelayConfig;
    use outbox::DEFAULT_COLUMNS;

    const TABLE: [&str; 7] = [
        "id",
        "aggregatetype",
        "aggregateid",
        "type",
        "payload",
        "headers",
        "created_at",
    ];

    fn layout() -> OutboxLayout {
        OutboxLayout::resolve(&DEFAULT_COLUMNS, "public.outbox", &TABLE).unwrap()
    }

    fn template() -> OutboxConfig {
        RelayConfig::new("postgres://h/db", "k:1").outbox
    }

    fn row<'a>(headers: ColumnValue<'a>, payload: ColumnValue<'a>) -> Vec<ColumnValue<'a>> {
        vec![
            ColumnValue::Text(b"0190a5c2-6c1e-7b8e-9d3f-1a2b3c4d5e6f"),
            ColumnValue::Text(b"order"),
            ColumnValue::Text(b"42"),
            ColumnValue::Text(b"OrderCreated"),
            payload,
            headers,
            ColumnValue::Text(b"2026-11-25 10:00:00+00"),
        ]
    }

    const POSITION: Position = Position {
        commit_lsn: Lsn::new(0x16_B374_D848),
        index: 3,
    };

    fn header<'r>(record: &'r OutboxRecord, name: &str) -> Option<&'r [u8]> {
        record
            .headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_ref())
    }

    #[test]
    fn routes_like_debeziums_outbox_event_router() {
        let values = row(
            ColumnValue::Text(br#"{"traceparent": "00-abc-def-01", "attempt": 2, "skip": null}"#),
            ColumnValue::Text(br#"{"total": 10.5}"#),
        );
        let record = layout().route(&template(), &values, POSITION).unwrap();
        assert_eq!(record.topic, "outbox.event.order");
        assert_eq!(record.key.as_ref(), b"42");
        assert_eq!(record.payload.as_deref(), Some(&br#"{"total": 10.5}"#[..]));
        assert_eq!(record.id, "0190a5c2-6c1e-7b8e-9d3f-1a2b3c4d5e6f");
        let names: Vec<&str> = record.headers.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(
            names,
            [
                "id",
                "type",
                "attempt",
                "traceparent",
                HEADER_COMMIT_LSN,
                HEADER_INDEX
            ]
        );
        assert_eq!(header(&record, "type"), Some(&b"OrderCreated"[..]));
        assert_eq!(header(&record, "traceparent"), Some(&b"00-abc-def-01"[..]));
        assert_eq!(header(&record, "attempt"), Some(&b"2"[..]));
        assert_eq!(
            header(&record, HEADER_COMMIT_LSN),
            Some(&b"16/B374D848"[..])
        );
        assert_eq!(header(&record, HEADER_INDEX), Some(&b"3"[..]));
    }

    #[test]
    fn debeziums_tracing_span_context_column_becomes_the_trace_headers() {
        let mut table = TABLE;
        table[6] = "tracingspancontext";
        let layout = OutboxLayout::resolve(&DEFAULT_COLUMNS, "public.outbox", &table).unwrap();
        let parent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
        let route = |headers: ColumnValue<'_>, context: &str| {
            let mut values = row(headers, ColumnValue::Text(b"{}"));
            values[6] = ColumnValue::Text(context.as_bytes());
            layout.route(&template(), &values, POSITION).unwrap()
        };
        // As Debezium writes it: java.util.Properties text, a comment line first.
        let properties =
            format!("#Tue Dec 01 10:00:00 UTC 2026\ntraceparent={parent}\ntracestate=a\\=1\n");
        let record = route(ColumnValue::Null, &properties);
        assert_eq!(header(&record, "traceparent"), Some(parent.as_bytes()));
        assert_eq!(header(&record, "tracestate"), Some(&b"a=1"[..]));
        // A bare traceparent.
        let record = route(ColumnValue::Null, parent);
        assert_eq!(header(&record, "traceparent"), Some(parent.as_bytes()));
        // The headers column names one already: it wins, and nothing is doubled.
        let record = route(
            ColumnValue::Text(br#"{"traceparent": "00-abc-def-01"}"#),
            &properties,
        );
        let parents: Vec<_> = record
            .headers
            .iter()
            .filter(|(k, _)| k == "traceparent")
            .collect();
        assert_eq!(parents.len(), 1);
        assert_eq!(header(&record, "traceparent"), Some(&b"00-abc-def-01"[..]));
        // Nothing usable: no header, and the row is still routed.
        let record = route(ColumnValue::Null, "#only a comment\nother=1\n");
        assert_eq!(header(&record, "traceparent"), None);
        assert_eq!(header(&record, "tracestate"), None);
    }

    #[test]
    fn the_debezium_payload_format_is_a_json_string() {
        let mut outbox = template();
        outbox.payload_format = PayloadFormat::JsonString;
        let values = row(ColumnValue::Null, ColumnValue::Text(br#"{"total": 10.5}"#));
        let record = layout().route(&outbox, &values, POSITION).unwrap();
        assert_eq!(
            record.payload.as_deref(),
            Some(&br#""{\"total\": 10.5}""#[..])
        );
    }

    #[test]
    fn logical_messages_route_like_rows_within_the_allow_list() {
        let outbox = template();
        let allowed = ["outbox.event.order".to_owned()];
        let content = br#"{"id": "e1", "aggregatetype": "order", "aggregateid": "42",
            "type": "Created", "payload": {"total": 1}, "headers": {"traceparent": "00-1-2-01"}}"#;
        let record = route_message(&outbox, &allowed, content, POSITION).unwrap();
        assert_eq!(record.topic, "outbox.event.order");
        assert_eq!(record.key.as_ref(), b"42");
        assert_eq!(record.payload.as_deref(), Some(&br#"{"total":1}"#[..]));
        assert_eq!(header(&record, "traceparent"), Some(&b"00-1-2-01"[..]));
        assert_eq!(header(&record, "type"), Some(&b"Created"[..]));

        let elsewhere =
            br#"{"id": "e2", "aggregatetype": "secret", "aggregateid": "1", "type": "T"}"#;
        let err = route_message(&outbox, &allowed, elsewhere, POSITION).unwrap_err();
        assert!(err.to_string().contains("allow-list"), "{err}");
        let err = route_message(&outbox, &allowed, b"[1]", POSITION).unwrap_err();
        assert!(err.to_string().contains("not a JSON object"), "{err}");
        let err = route_message(&outbox, &allowed, br#"{"id": 1}"#, POSITION).unwrap_err();
        assert!(err.to_string().contains("not a string"), "{err}");
    }

    #[test]
    fn null_payload_and_null_headers_are_allowed() {
        let values = row(ColumnValue::Null, ColumnValue::Null);
        let record = layout().route(&template(), &values, POSITION).unwrap();
        assert_eq!(record.payload, None);
        assert_eq!(record.headers.len(), 4);
    }

    #[test]
    fn a_table_without_headers_column_routes_without_extra_headers() {
        let layout = OutboxLayout::resolve(&DEFAULT_COLUMNS, "public.outbox", &TABLE[..5]).unwrap();
        assert!(!layout.has_headers());
        let values = &row(ColumnValue::Null, ColumnValue::Text(b"{}"))[..5];
        let record = layout.route(&template(), values, POSITION).unwrap();
        assert_eq!(record.headers.len(), 4);
    }

    #[test]
    fn a_missing_column_is_a_schema_error_naming_it() {
        let err = OutboxLayout::resolve(
            &DEFAULT_COLUMNS,
            "public.outbox",
            &["id", "aggregatetype", "type", "payload"],
        )
        .unwrap_err();
        assert_eq!(err.column, "aggregateid");
        let message = err.to_string();
        assert!(
            message.contains("public.outbox") && message.contains("aggregate id"),
            "{message}"
        );
    }

    #[test]
    fn bad_rows_say_what_is_wrong() {
        let layout = layout();
        let mut values = row(ColumnValue::Null, ColumnValue::Null);
        values[2] = ColumnValue::Null;
        assert_eq!(
            layout.route(&template(), &values, POSITION),
            Err(BadRow::Null {
                column: "aggregateid".to_owned(),
                role: "aggregate id"
            })
        );

        let values = row(ColumnValue::Text(b"[1, 2]"), ColumnValue::Null);
        let err = layout.route(&template(), &values, POSITION).unwrap_err();
        assert!(err.to_string().contains("an array"), "{err}");

        let mut values = row(ColumnValue::Null, ColumnValue::Null);
        values[1] = ColumnValue::Text(&[0xff, 0xfe]);
        assert!(matches!(
            layout.route(&template(), &values, POSITION),
            Err(BadRow::NotText { .. })
        ));

        let values = &row(ColumnValue::Null, ColumnValue::Null)[..3];
        assert!(matches!(
            layout.route(&template(), values, POSITION),
            Err(BadRow::ColumnCount {
                expected: 7,
                got: 3
            })
        ));
    }
}
