//! Logging and OpenTelemetry tracing for the relay and the services.
//!
//! [`init`] installs the process's `tracing` subscriber: the log lines on stderr
//! exactly as before (filtered by the binary's log variable), and, only when
//! `OTEL_EXPORTER_OTLP_ENDPOINT` or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` is set, a
//! second layer that turns the spans meant for tracing into OpenTelemetry spans and
//! exports them over OTLP/HTTP. [`shutdown`] flushes what is still queued.
//!
//! Why tracing costs next to nothing when it is off, and never changes behaviour:
//! - Off, no OpenTelemetry layer exists; [`enabled`] is one relaxed atomic load,
//!   and the code that would make a span or a trace header checks it first.
//! - On, only spans that declare an `otel.kind` field (the ones made for tracing:
//!   HTTP requests, outbox writes, message handling) and events at INFO and above
//!   inside them reach the OpenTelemetry layer; the other spans (a consumer's run,
//!   a batch) stay log-only and do not open traces. The two layers' filters are
//!   asked afresh for every span they let through ([`filter`] says why).
//! - Spans are handed to a batching processor on its own thread, which exports
//!   them with a blocking HTTP client; nothing waits for the collector on a
//!   request's or a record's path. A collector that is down loses spans, never
//!   work: export errors are the SDK's own log lines.
//!
//! [`propagation`] reads and writes the W3C `traceparent`/`tracestate` pair in
//! message headers, which is how one order's trace crosses the outbox, the relays
//! and the broker.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::{Protocol, WithExportConfig as _};
use opentelemetry_sdk::trace::{SdkTracer, SdkTracerProvider};
use opentelemetry_sdk::Resource;
use tracing::Level;
use tracing_subscriber::filter::{filter_fn, EnvFilter};
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::Layer as _;

mod filter;
pub mod propagation;

use filter::Fresh;

pub use opentelemetry::KeyValue;
pub use propagation::{TraceHeaders, TRACEPARENT, TRACESTATE};

/// The variables that turn export on (the generic one gets `/v1/traces` appended).
pub const ENDPOINT_VARS: [&str; 2] = [
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    "OTEL_EXPORTER_OTLP_ENDPOINT",
];
/// `http/protobuf` (the default) or `http/json`.
pub const PROTOCOL_VAR: &str = "OTEL_EXPORTER_OTLP_PROTOCOL";
/// Every variable of the OpenTelemetry specification a binary using this crate
/// honours (docs/tracing.md); the SDK reads those not named above itself.
pub const ENVIRONMENT: [&str; 9] = [
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    "OTEL_EXPORTER_OTLP_PROTOCOL",
    "OTEL_EXPORTER_OTLP_HEADERS",
    "OTEL_EXPORTER_OTLP_TIMEOUT",
    "OTEL_SERVICE_NAME",
    "OTEL_RESOURCE_ATTRIBUTES",
    "OTEL_BSP_SCHEDULE_DELAY",
    "OTEL_BSP_MAX_QUEUE_SIZE",
];
/// The log filter when the binary's variable is unset: the exporter's own
/// lines only when something goes wrong.
pub const DEFAULT_LOG: &str = "info,opentelemetry=warn";
/// The field that marks a span as one to export.
pub const KIND_FIELD: &str = "otel.kind";

static ENABLED: AtomicBool = AtomicBool::new(false);
static PROVIDER: OnceLock<SdkTracerProvider> = OnceLock::new();
static TRACER: OnceLock<SdkTracer> = OnceLock::new();

/// The instrumentation scope of every span made here.
const SCOPE: &str = "outbox-relay";

/// The tracer for spans made with the OpenTelemetry API directly (the relay's
/// publish spans); `None` without export. Cheap: no lock, no allocation.
#[inline]
pub fn tracer() -> Option<&'static SdkTracer> {
    if enabled() {
        TRACER.get()
    } else {
        None
    }
}

/// Whether spans are exported: the code that makes spans or trace headers only
/// for tracing asks this first.
#[inline]
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// Installs the global subscriber: logs on stderr filtered by `log_var` (default
/// [`DEFAULT_LOG`]), and OTLP export of spans when an endpoint variable is set, under
/// `service.name` from `OTEL_SERVICE_NAME` (or `OTEL_RESOURCE_ATTRIBUTES`), else
/// `default_service_name`. Call once, first thing in `main`; a second call (or a
/// subscriber installed by someone else) leaves the first one in place.
pub fn init(default_service_name: &str, log_var: &str) {
    let log_filter =
        || EnvFilter::try_from_env(log_var).unwrap_or_else(|_| EnvFilter::new(DEFAULT_LOG));
    let provider = match endpoint_configured().then(|| provider(default_service_name)) {
        Some(Ok(provider)) => provider,
        problem => {
            // No export: the log layer alone, filtered for the whole subscriber.
            let _ = tracing_subscriber::registry()
                .with(log_filter())
                .with(logs())
                .try_init();
            if let Some(Err(problem)) = problem {
                tracing::warn!(error = %problem, "traces are not exported");
            }
            return;
        }
    };
    let traces = tracing_opentelemetry::layer()
        .with_tracer(provider.tracer(SCOPE))
        .with_filter(Fresh(filter_fn(exported)));
    let installed = tracing_subscriber::registry()
        .with(logs().with_filter(Fresh(log_filter())))
        .with(traces)
        .try_init()
        .is_ok();
    if installed {
        let _ = TRACER.set(provider.tracer(SCOPE));
        opentelemetry::global::set_tracer_provider(provider.clone());
        let _ = PROVIDER.set(provider);
        ENABLED.store(true, Ordering::Relaxed);
        tracing::info!(protocol = ?protocol(), "exporting traces over OTLP/HTTP");
    }
}

/// Exports what is still queued and stops the exporter (on the way out, after
/// the last span ended). Without export, nothing.
pub fn shutdown() {
    ENABLED.store(false, Ordering::Relaxed);
    if let Some(provider) = PROVIDER.get() {
        if let Err(error) = provider.shutdown() {
            tracing::warn!(%error, "the last spans may not have been exported");
        }
    }
}

/// Adds the event `name` with `attributes` to the current span's OpenTelemetry
/// span (not to the log). Without export, or outside an exported span, nothing.
pub fn event(
    name: impl Into<std::borrow::Cow<'static, str>>,
    attributes: Vec<opentelemetry::KeyValue>,
) {
    use tracing_opentelemetry::OpenTelemetrySpanExt as _;
    if enabled() {
        tracing::Span::current().add_event(name, attributes);
    }
}

/// The log lines: on stderr, coloured on a terminal.
fn logs<S>() -> impl tracing_subscriber::Layer<S>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
}

fn endpoint_configured() -> bool {
    ENDPOINT_VARS
        .iter()
        .any(|var| std::env::var_os(var).is_some_and(|v| !v.is_empty()))
}

/// The spans made for tracing, and the events inside them.
fn exported(metadata: &tracing::Metadata<'_>) -> bool {
    if metadata.is_span() {
        metadata.fields().field(KIND_FIELD).is_some()
    } else {
        *metadata.level() <= Level::INFO
    }
}

/// `OTEL_EXPORTER_OTLP_PROTOCOL`; the exporter itself reads only its compiled-in
/// default, so the variable is honoured here. gRPC is not built in.
fn protocol() -> Protocol {
    match std::env::var(PROTOCOL_VAR).as_deref().map(str::trim) {
        Ok("http/json") => Protocol::HttpJson,
        _ => Protocol::HttpBinary,
    }
}

fn provider(default_service_name: &str) -> Result<SdkTracerProvider, String> {
    if let Ok(other) = std::env::var(PROTOCOL_VAR) {
        if !matches!(other.trim(), "http/json" | "http/protobuf" | "") {
            return Err(format!(
                "{PROTOCOL_VAR}={other} is not supported (http/protobuf or http/json)"
            ));
        }
    }
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_protocol(protocol())
        .build()
        .map_err(|e| e.to_string())?;
    Ok(SdkTracerProvider::builder()
        .with_resource(resource(default_service_name))
        .with_batch_exporter(exporter)
        .build())
}

/// The SDK's resource (`OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`, the SDK's
/// own attributes), with `default_service_name` where neither names the service.
fn resource(default_service_name: &str) -> Resource {
    let detected = Resource::builder().build();
    let named = detected
        .get(&opentelemetry::Key::from_static_str("service.name"))
        .is_some_and(|name| !name.as_str().starts_with("unknown_service"));
    if named {
        detected
    } else {
        Resource::builder()
            .with_service_name(default_service_name.to_owned())
            .build()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[test]
    fn only_spans_made_for_tracing_and_events_from_info_up_are_exported() {
        // A filter that records the verdict for every callsite it is asked about.
        let seen = Arc::new(Mutex::new(Vec::new()));
        let record = Arc::clone(&seen);
        let subscriber = tracing_subscriber::registry().with(
            tracing_subscriber::layer::Identity::new().with_filter(filter_fn(move |m| {
                let what = if m.is_span() {
                    m.name().to_owned()
                } else {
                    format!("{} {}", m.target(), m.level())
                };
                record.lock().unwrap().push((what, exported(m)));
                false
            })),
        );
        tracing::subscriber::with_default(subscriber, || {
            let _traced = tracing::info_span!("traced-server", otel.kind = "server");
            let _logged = tracing::info_span!("logged-only");
            tracing::warn!(target: "verdicts", "a warning");
            tracing::info!(target: "verdicts", "an info event");
            tracing::debug!(target: "verdicts", "a debug event");
        });
        let seen = seen.lock().unwrap().clone();
        let verdict = |what: &str| seen.iter().find(|(w, _)| w == what).map(|(_, e)| *e);
        assert_eq!(verdict("traced-server"), Some(true), "{seen:?}");
        assert_eq!(verdict("logged-only"), Some(false), "{seen:?}");
        assert_eq!(verdict("verdicts WARN"), Some(true), "{seen:?}");
        assert_eq!(verdict("verdicts INFO"), Some(true), "{seen:?}");
        assert_eq!(verdict("verdicts DEBUG"), Some(false), "{seen:?}");
    }
}
