//! The span of one message's handling, continuing the trace of the record.
//!
//! The relay that published the record put its own span into the record's
//! `traceparent` header; the handling span is that span's child, and whatever the
//! handler writes to the outbox (a participant's reply, the orchestrator's next
//! command) is written inside it, so the next record carries the same trace on.
//! Without export ([`telemetry::enabled`]) no span is made.

use tracing::field::Empty;
use tracing::Span;

use super::message::IncomingMessage;
use super::HandlerError;

/// A span for handling `message` in consumer group `group`; a disabled span when
/// tracing is off.
pub(super) fn handling(group: &str, message: &IncomingMessage) -> Span {
    if !telemetry::enabled() {
        return Span::none();
    }
    let span = tracing::info_span!(
        "process",
        otel.kind = "consumer",
        otel.name = %format_args!("process {}", message.topic),
        otel.status_code = Empty,
        otel.status_description = Empty,
        "messaging.system" = "kafka",
        "messaging.operation.type" = "process",
        "messaging.destination.name" = %message.topic,
        "messaging.destination.partition.id" = %message.partition,
        "messaging.kafka.offset" = message.offset,
        "messaging.consumer.group.name" = group,
        "messaging.message.id" = %message.id,
        "messaging.kafka.message.key" = message.key.as_deref().unwrap_or(""),
        "message.type" = message.message_type.as_deref().unwrap_or(""),
    );
    telemetry::propagation::set_parent(
        &span,
        message.header(telemetry::TRACEPARENT),
        message.header(telemetry::TRACESTATE),
    );
    span
}

/// Marks `span` failed by `error` (the transaction is rolled back).
pub(super) fn failed(span: &Span, error: &HandlerError) {
    if !span.is_disabled() {
        span.record("otel.status_code", "ERROR");
        span.record("otel.status_description", tracing::field::display(error));
    }
}
