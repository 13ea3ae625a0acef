//! The W3C trace context (`traceparent`, `tracestate`) in message headers.
//!
//! An order's trace crosses three kinds of hop, each with a header pair: the
//! outbox row's `headers` column (written with the state change, read by the
//! relay), the record on the broker (written by the relay, read by a consumer),
//! and the HTTP request. Each hop names the span that sent it as the parent of
//! the span that receives it, so the spans of one order form one tree.
//!
//! Reading never fails: a missing or malformed `traceparent` gives an empty
//! context, and the receiving span starts a trace of its own. Tracing is best
//! effort and must not refuse a message.

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator as _};
use opentelemetry::trace::{SpanContext, TraceContextExt as _};
use opentelemetry::Context;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

/// The header with the trace id, the parent span id and the sampling flag.
pub const TRACEPARENT: &str = "traceparent";
/// The header with vendor-specific trace state, carried along unchanged.
pub const TRACESTATE: &str = "tracestate";

/// The trace headers naming one span as the parent of what receives them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceHeaders {
    pub traceparent: String,
    /// Absent when the trace has no state.
    pub tracestate: Option<String>,
}

impl TraceHeaders {
    /// The headers naming `span` as the parent; `None` for an invalid context.
    pub fn of(span: &SpanContext) -> Option<TraceHeaders> {
        if !span.is_valid() {
            return None;
        }
        let mut carrier = Carrier::default();
        TraceContextPropagator::new().inject_context(
            &Context::new().with_remote_span_context(span.clone()),
            &mut carrier,
        );
        Some(TraceHeaders {
            traceparent: carrier.traceparent?,
            tracestate: carrier.tracestate.filter(|s| !s.is_empty()),
        })
    }

    /// The headers naming the span of `cx` as the parent; `None` without one.
    pub fn of_context(cx: &Context) -> Option<TraceHeaders> {
        TraceHeaders::of(cx.span().span_context())
    }

    /// The headers naming the OpenTelemetry span of `span` as the parent; `None`
    /// when tracing is off or `span` is not exported.
    pub fn of_span(span: &tracing::Span) -> Option<TraceHeaders> {
        if !crate::enabled() || span.is_disabled() {
            return None;
        }
        TraceHeaders::of_context(&span.context())
    }
}

/// The span named by `traceparent` (and `tracestate`), as a remote parent; an
/// empty context when there is none or it is malformed.
pub fn parent(traceparent: Option<&str>, tracestate: Option<&str>) -> Context {
    let Some(traceparent) = traceparent.filter(|t| is_valid_traceparent(t)) else {
        return Context::new();
    };
    let carrier = Carrier {
        traceparent: Some(traceparent.to_owned()),
        tracestate: tracestate.map(str::to_owned),
    };
    TraceContextPropagator::new().extract_with_context(&Context::new(), &carrier)
}

/// Whether `value` has the shape of a W3C trace context, version 00:
/// `00-<trace-id: 32 hex>-<parent-id: 16 hex>-<flags: 2 hex>`, 55 characters,
/// lowercase hex, with neither id all zeros (the specification calls those invalid).
pub fn is_valid_traceparent(value: &str) -> bool {
    fn lower_hex(s: &str) -> bool {
        s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    }
    fn not_zero(s: &str) -> bool {
        s.bytes().any(|b| b != b'0')
    }
    if value.len() != 55 {
        return false;
    }
    let mut parts = value.split('-');
    let (Some(version), Some(trace_id), Some(parent_id), Some(flags), None) = (
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
    ) else {
        return false;
    };
    version == "00"
        && trace_id.len() == 32
        && parent_id.len() == 16
        && flags.len() == 2
        && lower_hex(trace_id)
        && lower_hex(parent_id)
        && lower_hex(flags)
        && not_zero(trace_id)
        && not_zero(parent_id)
}

/// Makes `span` a child of the span named by the headers, when they name one.
/// Call before the span is first entered; without export, nothing happens.
pub fn set_parent(span: &tracing::Span, traceparent: Option<&str>, tracestate: Option<&str>) {
    if !crate::enabled() || span.is_disabled() {
        return;
    }
    let parent = parent(traceparent, tracestate);
    if parent.span().span_context().is_valid() {
        // Fails only when the span was entered already; it then keeps its parent.
        let _ = span.set_parent(parent);
    }
}

/// The two headers, as the propagator reads and writes them.
#[derive(Debug, Default)]
struct Carrier {
    traceparent: Option<String>,
    tracestate: Option<String>,
}

impl Injector for Carrier {
    fn set(&mut self, key: &str, value: String) {
        match key {
            TRACEPARENT => self.traceparent = Some(value),
            TRACESTATE => self.tracestate = Some(value),
            _ => {}
        }
    }
}

impl Extractor for Carrier {
    fn get(&self, key: &str) -> Option<&str> {
        match key {
            TRACEPARENT => self.traceparent.as_deref(),
            TRACESTATE => self.tracestate.as_deref(),
            _ => None,
        }
    }

    fn keys(&self) -> Vec<&str> {
        vec![TRACEPARENT, TRACESTATE]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn headers_round_trip_through_a_context() {
        let cx = parent(Some(PARENT), Some("vendor=a,other=b"));
        let span = cx.span().span_context().clone();
        assert!(span.is_valid() && span.is_remote() && span.is_sampled());
        assert_eq!(
            span.trace_id().to_string(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        assert_eq!(
            TraceHeaders::of(&span),
            Some(TraceHeaders {
                traceparent: PARENT.to_owned(),
                tracestate: Some("vendor=a,other=b".to_owned()),
            })
        );
        let without_state = parent(Some(PARENT), None);
        assert_eq!(
            TraceHeaders::of(without_state.span().span_context()).map(|h| h.tracestate),
            Some(None)
        );
    }

    #[test]
    fn malformed_or_missing_headers_give_no_parent() {
        for bad in [
            None,
            Some(""),
            Some("00-1-2-01"),
            Some("00-00000000000000000000000000000000-00f067aa0ba902b7-01"),
            Some("zz-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
        ] {
            let cx = parent(bad, Some("vendor=a"));
            assert!(!cx.span().span_context().is_valid(), "{bad:?}");
        }
        assert_eq!(TraceHeaders::of(&SpanContext::empty_context()), None);
    }
}
