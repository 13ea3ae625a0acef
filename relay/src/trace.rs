//! The relay's span for one record: it continues the trace of the outbox row and
//! hands it on in the record's headers, as Debezium's outbox router does with its
//! tracing column.
//!
//! ```text
//!   row headers: traceparent = <service's outbox write span>
//!        │ parent
//!        ▼
//!   span "publish <topic>" (producer) ── from push to the sink's ack or dead letter
//!        │ its own context replaces traceparent/tracestate in the record's headers
//!        ▼
//!   consumer span (parent = this span)
//! ```
//!
//! Why this costs the relay's hot path nothing when unused: with export off
//! ([`telemetry::tracer`] is `None`, one atomic load) or a record without
//! `traceparent` (a scan of its few headers), nothing is allocated and the record is
//! not touched; the headers are forwarded as they came. Only a traced record pays
//! for its span (a few small allocations), and the span ends when the record is
//! settled, on the relay's own task: no lock, no system call. The batching
//! exporter runs on its own thread.
//!
//! A `traceparent` that is not a valid W3C trace context is forwarded unchanged
//! and gets no span: tracing never refuses a record.

use bytes::Bytes;
use opentelemetry::trace::{Span as _, SpanKind, Status, TraceContextExt as _, Tracer as _};
use opentelemetry::KeyValue;
use telemetry::{TraceHeaders, TRACEPARENT, TRACESTATE};

use crate::routing::OutboxRecord;
use crate::sink::Refusal;

/// The span of a record in flight; it ends when dropped (the record settled).
/// Boxed: a record in flight without a span carries one null pointer, not the
/// span's few hundred bytes.
pub struct PublishSpan(Box<opentelemetry_sdk::trace::Span>);

impl std::fmt::Debug for PublishSpan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("PublishSpan")
            .field(&self.0.span_context().span_id())
            .finish()
    }
}

impl PublishSpan {
    /// When export is on and `record` carries a valid `traceparent`: starts the
    /// span of its publication to `sink` as the child of that context, and puts
    /// the span's own context into the record's `traceparent`/`tracestate`.
    pub fn start(record: &mut OutboxRecord, sink: &'static str) -> Option<PublishSpan> {
        PublishSpan::start_with(telemetry::tracer()?, record, sink)
    }

    fn start_with(
        tracer: &opentelemetry_sdk::trace::SdkTracer,
        record: &mut OutboxRecord,
        sink: &'static str,
    ) -> Option<PublishSpan> {
        let parent = {
            let traceparent = header(record, TRACEPARENT)?;
            telemetry::propagation::parent(Some(traceparent), header(record, TRACESTATE))
        };
        if !parent.span().span_context().is_valid() {
            return None;
        }
        let span = tracer
            .span_builder(format!("publish {}", record.topic))
            .with_kind(SpanKind::Producer)
            .with_attributes([
                KeyValue::new("messaging.system", sink),
                KeyValue::new("messaging.operation.type", "send"),
                KeyValue::new("messaging.destination.name", record.topic.clone()),
                KeyValue::new("messaging.message.id", record.id.clone()),
                KeyValue::new("outbox.position", record.position.to_string()),
            ])
            .start_with_context(tracer, &parent);
        let own = TraceHeaders::of(span.span_context())?;
        replace_trace_headers(record, own);
        Some(PublishSpan(Box::new(span)))
    }

    /// The destination refused the record; a dead letter takes its place.
    pub fn refused(&mut self, refusal: &Refusal) {
        self.0.add_event(
            "refused",
            vec![
                KeyValue::new("outbox.refusal", refusal.kind.as_str()),
                KeyValue::new("outbox.refusal.detail", refusal.detail.clone()),
            ],
        );
        self.0
            .set_status(Status::error(format!("refused: {}", refusal.kind.as_str())));
    }
}

/// The value of header `name` as text, when present and UTF-8.
fn header<'r>(record: &'r OutboxRecord, name: &str) -> Option<&'r str> {
    record
        .headers
        .iter()
        .find(|(key, _)| key == name)
        .and_then(|(_, value)| std::str::from_utf8(value).ok())
}

/// Puts `trace` into the record's `traceparent` (and `tracestate`) headers, in
/// place, keeping the headers' order; a `tracestate` the record lacked is added.
pub(crate) fn replace_trace_headers(record: &mut OutboxRecord, trace: TraceHeaders) {
    let mut state = trace.tracestate.map(Bytes::from);
    let mut parent = Some(Bytes::from(trace.traceparent));
    for (key, value) in &mut record.headers {
        if key == TRACEPARENT {
            if let Some(new) = parent.take() {
                *value = new;
            }
        } else if key == TRACESTATE {
            if let Some(new) = state.take() {
                *value = new;
            }
        }
    }
    if let Some(state) = state {
        record.headers.push((TRACESTATE.to_owned(), state));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routing::Position;
    use crate::Lsn;

    fn record(headers: &[(&str, &str)]) -> OutboxRecord {
        OutboxRecord {
            topic: "order.reply".to_owned(),
            key: Bytes::from_static(b"k"),
            payload: None,
            headers: headers
                .iter()
                .map(|(k, v)| ((*k).to_owned(), Bytes::copy_from_slice(v.as_bytes())))
                .collect(),
            id: "1".to_owned(),
            position: Position {
                commit_lsn: Lsn::new(1),
                index: 0,
            },
        }
    }

    const OWN: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-1111111111111111-01";

    #[test]
    fn the_relay_span_replaces_the_rows_context_in_place() {
        let mut r = record(&[
            ("id", "1"),
            (
                "traceparent",
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            ),
            ("tracestate", "a=1"),
            ("saga-id", "s"),
        ]);
        replace_trace_headers(
            &mut r,
            TraceHeaders {
                traceparent: OWN.to_owned(),
                tracestate: Some("a=2".to_owned()),
            },
        );
        let names: Vec<&str> = r.headers.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(names, ["id", "traceparent", "tracestate", "saga-id"]);
        assert_eq!(header(&r, "traceparent"), Some(OWN));
        assert_eq!(header(&r, "tracestate"), Some("a=2"));
    }

    #[test]
    fn a_tracestate_the_row_lacked_is_added_and_none_is_not_invented() {
        let mut r = record(&[("traceparent", "x")]);
        replace_trace_headers(
            &mut r,
            TraceHeaders {
                traceparent: OWN.to_owned(),
                tracestate: Some("v=1".to_owned()),
            },
        );
        assert_eq!(header(&r, "tracestate"), Some("v=1"));
        let mut r = record(&[("traceparent", "x")]);
        replace_trace_headers(
            &mut r,
            TraceHeaders {
                traceparent: OWN.to_owned(),
                tracestate: None,
            },
        );
        assert_eq!(r.headers.len(), 1);
        assert_eq!(header(&r, "traceparent"), Some(OWN));
    }

    #[test]
    fn the_span_is_the_rows_context_child_and_the_records_new_parent() {
        use opentelemetry::trace::TracerProvider as _;
        let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder().build();
        let tracer = provider.tracer("test");
        let row = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let mut r = record(&[("id", "1"), ("traceparent", row), ("tracestate", "a=1")]);
        let span = PublishSpan::start_with(&tracer, &mut r, "kafka").expect("a span");
        let data = span.0.exported_data().expect("recorded");
        assert_eq!(data.name, "publish order.reply");
        assert_eq!(data.span_kind, SpanKind::Producer);
        assert_eq!(
            data.span_context.trace_id().to_string(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        assert_eq!(data.parent_span_id.to_string(), "00f067aa0ba902b7");
        let own = format!(
            "00-4bf92f3577b34da6a3ce929d0e0e4736-{}-01",
            data.span_context.span_id()
        );
        assert_eq!(header(&r, "traceparent"), Some(own.as_str()));
        assert_eq!(header(&r, "tracestate"), Some("a=1"));

        // No context, or a malformed one: no span, the record as it was.
        for headers in [vec![("id", "1")], vec![("traceparent", "00-1-2-01")]] {
            let mut r = record(&headers);
            let before = r.clone();
            assert!(PublishSpan::start_with(&tracer, &mut r, "kafka").is_none());
            assert_eq!(r, before);
        }
    }

    #[test]
    fn a_record_without_a_span_carries_a_pointer_at_most() {
        assert_eq!(
            std::mem::size_of::<Option<PublishSpan>>(),
            std::mem::size_of::<usize>()
        );
    }

    #[test]
    fn without_export_a_record_is_not_touched() {
        let mut r = record(&[(
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        )]);
        let before = r.clone();
        assert!(PublishSpan::start(&mut r, "memory").is_none());
        assert_eq!(r, before);
    }
}
