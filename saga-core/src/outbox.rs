//! The outbox writer: a service records an event by inserting a row into its outbox
//! table in the same local transaction as the state change the event describes.
//!
//! Why this keeps DESIGN's "no loss" promise on the writing side: [`Outbox::publish`]
//! runs on the caller's connection, inside the caller's transaction, and never
//! commits or rolls back itself. The event row therefore commits exactly when the
//! business change commits, and disappears with it on rollback; the relay only ever
//! sees committed rows (logical decoding streams committed transactions), so a
//! message is published if and only if its effect happened.
//!
//! With [`Outbox::delete_after_insert`] the row is deleted again by a second
//! statement of the same transaction. The INSERT is still written to the WAL and
//! decoded by the relay's slot, so the event is still relayed, while the table stays
//! empty and needs no pruning job. The DELETE cannot be folded into the INSERT with a
//! data-modifying CTE: the statements of one query share a snapshot, so the DELETE
//! would not see the row it is meant to remove.
//!
//! With tracing on ([`telemetry::enabled`]), every write is an `outbox write` span,
//! a child of the span the caller is in (an HTTP request, a message's handling),
//! and each event written without a `traceparent` of its own gets one naming that
//! span (plus `tracestate` when the trace has state): the relay continues the
//! trace from there. The headers go into the row with the event, in the same
//! statement, so they are exactly as durable as the event.
//!
//! Event ids are UUIDv7 by default: time-ordered (increasing within a process, as
//! `uuid`'s v7 generator keeps a counter), which keeps the outbox's primary key index
//! append-mostly, and unique, which is what the consumers' journal deduplicates on.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt;

use serde::Serialize;
use sqlx::types::Json;
use telemetry::{TraceHeaders, TRACESTATE};
use tracing::Instrument as _;
use uuid::Uuid;

/// The header under which [`OutboxEvent::traceparent`] stores a W3C trace context.
pub const TRACEPARENT_HEADER: &str = "traceparent";

/// One event to be written to the outbox (a row of the shared `outbox` table).
#[derive(Debug, Clone, PartialEq)]
pub struct OutboxEvent {
    /// Event id (column `id`): Kafka header `id` and the consumers' deduplication key.
    pub id: Uuid,
    /// Column `aggregatetype`: routes the topic.
    pub aggregate_type: String,
    /// Column `aggregateid`: the Kafka key (the saga id for saga messages).
    pub aggregate_id: String,
    /// Column `type`: Kafka header `type`.
    pub event_type: String,
    /// Column `payload`: the Kafka value.
    pub payload: serde_json::Value,
    /// Column `headers`: extra Kafka headers; stored as a JSON object, NULL when empty.
    pub headers: BTreeMap<String, String>,
}

impl OutboxEvent {
    /// An event with a new UUIDv7 id, `payload` serialised to JSON and no headers.
    pub fn new(
        aggregate_type: impl Into<String>,
        aggregate_id: impl Into<String>,
        event_type: impl Into<String>,
        payload: &impl Serialize,
    ) -> Result<OutboxEvent, OutboxError> {
        let event_type = event_type.into();
        let payload =
            serde_json::to_value(payload).map_err(|source| OutboxError::SerializePayload {
                event_type: event_type.clone(),
                source,
            })?;
        Ok(OutboxEvent {
            id: Uuid::now_v7(),
            aggregate_type: aggregate_type.into(),
            aggregate_id: aggregate_id.into(),
            event_type,
            payload,
            headers: BTreeMap::new(),
        })
    }

    /// Replaces the generated id, e.g. with one derived from the command being answered.
    pub fn with_id(mut self, id: Uuid) -> Self {
        self.id = id;
        self
    }

    /// Sets header `name` to `value`, replacing an earlier value of the same name.
    pub fn header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.insert(name.into(), value.into());
        self
    }

    /// Carries the W3C `traceparent` when there is one.
    ///
    /// A value that is not a version-00 trace context
    /// (`00-<32 hex>-<16 hex>-<2 hex>`, lowercase, ids not all zero) is dropped with a
    /// debug log: tracing is best effort and must never fail the business transaction.
    pub fn traceparent(self, traceparent: Option<&str>) -> Self {
        match traceparent {
            None => self,
            Some(value) if is_valid_traceparent(value) => self.header(TRACEPARENT_HEADER, value),
            Some(value) => {
                tracing::debug!(
                    event_id = %self.id,
                    len = value.len(),
                    "dropping an invalid traceparent"
                );
                self
            }
        }
    }
}

/// Whether `value` has the shape of a W3C trace context, version 00:
/// `00-<trace-id: 32 hex>-<parent-id: 16 hex>-<flags: 2 hex>`, 55 characters,
/// lowercase hex, with neither id all zeros (the specification calls those invalid).
pub fn is_valid_traceparent(value: &str) -> bool {
    telemetry::propagation::is_valid_traceparent(value)
}

/// The span of one outbox write and the trace headers naming it: a disabled span
/// and no headers when tracing is off.
#[derive(Debug)]
pub(crate) struct WriteSpan {
    pub(crate) span: tracing::Span,
    trace: Option<TraceHeaders>,
}

impl WriteSpan {
    /// The span of writing `events` into `table`.
    fn new(table: &str, events: &[OutboxEvent]) -> WriteSpan {
        if !telemetry::enabled() || events.is_empty() {
            return WriteSpan {
                span: tracing::Span::none(),
                trace: None,
            };
        }
        let one = match events {
            [one] => Some(one),
            _ => None,
        };
        let span = tracing::info_span!(
            "outbox write",
            otel.kind = "producer",
            "outbox.table" = table,
            "messaging.operation.type" = "create",
            "messaging.batch.message_count" = events.len(),
            "messaging.message.id" = one.map(|e| tracing::field::display(e.id)),
            "message.type" = one.map(|e| e.event_type.as_str()),
            "outbox.aggregate_type" = one.map(|e| e.aggregate_type.as_str()),
        );
        let trace = TraceHeaders::of_span(&span);
        WriteSpan { span, trace }
    }

    /// The headers `event` is written with: its own, plus `traceparent` (and
    /// `tracestate`) naming this span unless it carries a `traceparent` already.
    fn headers<'e>(&self, event: &'e OutboxEvent) -> Cow<'e, BTreeMap<String, String>> {
        match &self.trace {
            Some(trace) if !event.headers.contains_key(TRACEPARENT_HEADER) => {
                let mut headers = event.headers.clone();
                headers.insert(TRACEPARENT_HEADER.to_owned(), trace.traceparent.clone());
                if let Some(state) = &trace.tracestate {
                    headers.insert(TRACESTATE.to_owned(), state.clone());
                }
                Cow::Owned(headers)
            }
            _ => Cow::Borrowed(&event.headers),
        }
    }
}

/// Events as the six arrays [`Outbox::insert_from`] unnests, and the span their
/// statement runs in.
#[derive(Debug)]
pub(crate) struct OutboxRows {
    pub(crate) ids: Vec<Uuid>,
    pub(crate) aggregate_types: Vec<String>,
    pub(crate) aggregate_ids: Vec<String>,
    pub(crate) types: Vec<String>,
    pub(crate) payloads: Vec<serde_json::Value>,
    pub(crate) headers: Vec<Option<serde_json::Value>>,
    /// Instrument the statement that writes the rows with it.
    pub(crate) span: tracing::Span,
}

/// Writes events into an outbox table with the shared table's columns.
#[derive(Clone, Debug)]
pub struct Outbox {
    /// The table as written in SQL: quoted schema and name.
    table: String,
    delete_after_insert: bool,
    insert_sql: String,
    delete_sql: String,
}

impl Default for Outbox {
    fn default() -> Self {
        Outbox::new()
    }
}

impl Outbox {
    /// A writer for `public.outbox` that leaves rows in the table.
    pub fn new() -> Outbox {
        Outbox::build(quoted_table("public", "outbox"), false)
    }

    /// Writes to `schema.name` instead (both are quoted, so any identifier works).
    pub fn table(self, schema: &str, name: &str) -> Self {
        Outbox::build(quoted_table(schema, name), self.delete_after_insert)
    }

    /// Deletes each row again in the same transaction right after inserting it.
    pub fn delete_after_insert(self, yes: bool) -> Self {
        Outbox::build(self.table, yes)
    }

    /// `events` as the arrays of [`Outbox::insert_from`], each with its trace
    /// headers, and the span of the statement that writes them.
    pub(crate) fn rows(&self, events: &[OutboxEvent]) -> OutboxRows {
        let write = WriteSpan::new(&self.table, events);
        let mut rows = OutboxRows {
            ids: Vec::with_capacity(events.len()),
            aggregate_types: Vec::with_capacity(events.len()),
            aggregate_ids: Vec::with_capacity(events.len()),
            types: Vec::with_capacity(events.len()),
            payloads: Vec::with_capacity(events.len()),
            headers: Vec::with_capacity(events.len()),
            span: tracing::Span::none(),
        };
        for event in events {
            rows.ids.push(event.id);
            rows.aggregate_types.push(event.aggregate_type.clone());
            rows.aggregate_ids.push(event.aggregate_id.clone());
            rows.types.push(event.event_type.clone());
            rows.payloads.push(event.payload.clone());
            let headers = write.headers(event);
            rows.headers
                .push((!headers.is_empty()).then(|| serde_json::json!(headers)));
        }
        rows.span = write.span;
        rows
    }

    /// The table written to, as it appears in SQL (quoted schema and name).
    pub fn table_name(&self) -> &str {
        &self.table
    }

    fn build(table: String, delete_after_insert: bool) -> Outbox {
        let insert_sql = format!(
            "INSERT INTO {table} (id, aggregatetype, aggregateid, type, payload, headers) \
             VALUES ($1, $2, $3, $4, $5, $6)"
        );
        let delete_sql = format!("DELETE FROM {table} WHERE id = $1");
        Outbox {
            table,
            delete_after_insert,
            insert_sql,
            delete_sql,
        }
    }

    /// An `INSERT` of `rows` into the outbox, one row per row of `guard` and event
    /// (`guard` returns one row or none), from the six arrays bound at `$first`
    /// onwards ([`OutboxRows`]), in the events' order. For a data-modifying CTE:
    /// events written with the change they belong to, in one statement.
    pub(crate) fn insert_from(&self, guard: &str, first: usize) -> String {
        let table = &self.table;
        let p = |i: usize| first + i;
        format!(
            "INSERT INTO {table} (id, aggregatetype, aggregateid, type, payload, headers) \
             SELECT e.id, e.aggregatetype, e.aggregateid, e.type, e.payload, e.headers \
             FROM {guard}, UNNEST(${}::uuid[], ${}::text[], ${}::text[], ${}::text[], \
                                  ${}::jsonb[], ${}::jsonb[]) \
             WITH ORDINALITY AS e(id, aggregatetype, aggregateid, type, payload, headers, n) \
             ORDER BY e.n",
            p(0),
            p(1),
            p(2),
            p(3),
            p(4),
            p(5)
        )
    }

    /// After events were written by [`Outbox::insert_from`]: deletes them again
    /// when the outbox is configured to ([`Outbox::delete_after_insert`]).
    pub(crate) async fn inserted(
        &self,
        tx: &mut sqlx::PgConnection,
        ids: &[Uuid],
    ) -> Result<(), OutboxError> {
        if self.delete_after_insert {
            for id in ids {
                self.delete(tx, *id).await?;
            }
        }
        Ok(())
    }

    /// [`Outbox::publish`] as the end of one statement that begins with the
    /// data-modifying CTE `with` (its parameters `$1`..`$n` in `args`): the event
    /// is inserted `FROM guard`, so it is written only if `guard` returns a row.
    /// Returns whether it was. One round trip instead of two when a change and
    /// its event go together (a participant's stored answer and its reply).
    pub(crate) async fn publish_after(
        &self,
        tx: &mut sqlx::PgConnection,
        event: &OutboxEvent,
        with: &str,
        guard: &str,
        args: sqlx::postgres::PgArguments,
    ) -> Result<bool, OutboxError> {
        use sqlx::Arguments as _;
        let n = args.len();
        let table = &self.table;
        let sql = format!(
            "{with} INSERT INTO {table} (id, aggregatetype, aggregateid, type, payload, headers) \
             SELECT ${}, ${}, ${}, ${}, ${}, ${} FROM {guard}",
            n + 1,
            n + 2,
            n + 3,
            n + 4,
            n + 5,
            n + 6
        );
        self.insert(tx, event, sqlx::query_with(&sql, args)).await
    }

    /// Inserts the event in the caller's transaction (and deletes it again in the same
    /// transaction when configured: the INSERT stays in the WAL, the relay still sees it).
    ///
    /// `tx` should be inside a transaction (`&mut *tx` of a `sqlx::Transaction`); on a
    /// connection in autocommit mode the row is committed on its own. Returns the
    /// event id. On error the caller's transaction is aborted and must be rolled back.
    pub async fn publish(
        &self,
        tx: &mut sqlx::PgConnection,
        event: &OutboxEvent,
    ) -> Result<Uuid, OutboxError> {
        self.insert(tx, event, sqlx::query(&self.insert_sql))
            .await?;
        tracing::trace!(
            event_id = %event.id,
            aggregate_type = %event.aggregate_type,
            event_type = %event.event_type,
            "outbox event written"
        );
        Ok(event.id)
    }

    /// Runs `query` (an insert whose last six parameters are the event's columns)
    /// with the event bound, and the DELETE when configured; whether a row was
    /// inserted.
    async fn insert<'q>(
        &self,
        tx: &mut sqlx::PgConnection,
        event: &'q OutboxEvent,
        query: sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments>,
    ) -> Result<bool, OutboxError> {
        let write = WriteSpan::new(&self.table, std::slice::from_ref(event));
        let query = query
            .bind(event.id)
            .bind(&event.aggregate_type)
            .bind(&event.aggregate_id)
            .bind(&event.event_type)
            .bind(Json(&event.payload));
        let query = match write.headers(event) {
            Cow::Borrowed(headers) => query.bind((!headers.is_empty()).then_some(Json(headers))),
            Cow::Owned(headers) => query.bind(Some(Json(headers))),
        };
        async {
            let inserted = query
                .execute(&mut *tx)
                .await
                .map_err(|source| OutboxError::Insert {
                    table: self.table.clone(),
                    event_id: event.id,
                    source,
                })?
                .rows_affected()
                == 1;
            if inserted && self.delete_after_insert {
                self.delete(tx, event.id).await?;
            }
            Ok(inserted)
        }
        .instrument(write.span)
        .await
    }

    /// The DELETE of [`Outbox::delete_after_insert`].
    async fn delete(&self, tx: &mut sqlx::PgConnection, id: Uuid) -> Result<(), OutboxError> {
        sqlx::query(&self.delete_sql)
            .bind(id)
            .execute(&mut *tx)
            .await
            .map_err(|source| OutboxError::Delete {
                table: self.table.clone(),
                event_id: id,
                source,
            })?;
        Ok(())
    }
}

/// `"schema"."name"`, each identifier quoted with embedded quotes doubled.
fn quoted_table(schema: &str, name: &str) -> String {
    format!("{}.{}", QuotedIdent(schema), QuotedIdent(name))
}

struct QuotedIdent<'a>(&'a str);

impl fmt::Display for QuotedIdent<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "\"{}\"", self.0.replace('"', "\"\""))
    }
}

/// An event could not be built or written.
#[derive(Debug, thiserror::Error)]
pub enum OutboxError {
    /// The payload cannot be represented as JSON: definite, retrying gives the same.
    #[error("cannot serialise the payload of a {event_type} event to JSON")]
    SerializePayload {
        event_type: String,
        #[source]
        source: serde_json::Error,
    },
    /// The INSERT failed; the caller's transaction is aborted.
    #[error("cannot insert outbox event {event_id} into {table}")]
    Insert {
        table: String,
        event_id: Uuid,
        #[source]
        source: sqlx::Error,
    },
    /// The DELETE after the INSERT failed; the caller's transaction is aborted.
    #[error("cannot delete outbox event {event_id} from {table} after inserting it")]
    Delete {
        table: String,
        event_id: Uuid,
        #[source]
        source: sqlx::Error,
    },
}

impl OutboxError {
    /// Whether running the whole transaction again may succeed (a database error
    /// such as a lost connection or a serialization failure), as opposed to a
    /// definite error tied to this event (a payload that is not JSON).
    ///
    /// A database error caused by the event itself (a duplicate id, a missing
    /// table) also counts as transient here: only the caller can tell those apart.
    pub fn is_transient(&self) -> bool {
        match self {
            OutboxError::SerializePayload { .. } => false,
            OutboxError::Insert { .. } | OutboxError::Delete { .. } => true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const VALID: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn traceparent_shape() {
        assert_eq!(VALID.len(), 55);
        assert!(is_valid_traceparent(VALID));
        for bad in [
            "",
            "00-1-2-01",
            // uppercase hex
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            // other version
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            // all-zero ids
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            // wrong separators and part lengths with the right total length
            "00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e47360-0f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0g",
        ] {
            assert!(!is_valid_traceparent(bad), "{bad:?} accepted");
        }
    }

    #[test]
    fn the_write_span_goes_into_the_headers_unless_the_event_has_its_own() {
        let write = WriteSpan {
            span: tracing::Span::none(),
            trace: Some(TraceHeaders {
                traceparent: VALID.to_owned(),
                tracestate: Some("v=1".to_owned()),
            }),
        };
        let event = OutboxEvent::new("order", "1", "OrderCreated", &serde_json::json!({}))
            .unwrap()
            .header("saga-id", "s");
        let headers = write.headers(&event);
        assert_eq!(headers.get("traceparent").map(String::as_str), Some(VALID));
        assert_eq!(headers.get("tracestate").map(String::as_str), Some("v=1"));
        assert_eq!(headers.get("saga-id").map(String::as_str), Some("s"));
        // What the relay reads back names the same span.
        let parent = telemetry::propagation::parent(
            headers.get("traceparent").map(String::as_str),
            headers.get("tracestate").map(String::as_str),
        );
        assert_eq!(TraceHeaders::of_context(&parent), write.trace.clone());

        let own = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
        let chosen = event.clone().traceparent(Some(own));
        assert_eq!(
            write
                .headers(&chosen)
                .get("traceparent")
                .map(String::as_str),
            Some(own)
        );
        assert!(matches!(write.headers(&chosen), Cow::Borrowed(_)));
        let off = WriteSpan {
            span: tracing::Span::none(),
            trace: None,
        };
        assert!(matches!(off.headers(&event), Cow::Borrowed(_)));
    }

    #[test]
    fn table_identifiers_are_quoted() {
        let outbox = Outbox::new().table("my schema", "out\"box");
        assert_eq!(outbox.table_name(), r#""my schema"."out""box""#);
        assert_eq!(Outbox::new().table_name(), r#""public"."outbox""#);
    }
}
