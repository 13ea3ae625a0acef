//! Per-layer filters that stay correct when other code asks `tracing::enabled!`.
//!
//! With export on, the log layer and the OpenTelemetry layer filter differently,
//! so each gets its own (per-layer) filter. `tracing-subscriber` 0.3 hands a
//! per-layer filter's verdict from `enabled()` to the span's creation through a
//! thread-local, and skips `enabled()` for callsites whose interest is cached as
//! *always*. Code that calls `tracing::enabled!` without creating anything (sqlx
//! does after every query) leaves a stale verdict behind, and the next span of
//! an *always* callsite on that thread is silently dropped from the layer
//! (tokio-rs/tracing#2519): an order's HTTP span or a message's span would never
//! be exported. [`Fresh`] reports *sometimes* wherever its filter would report
//! *always*, so `enabled()` runs, and writes a fresh verdict, before every span
//! and event it lets through. Callsites it rejects stay *never*: disabled
//! callsites cost nothing more than before.

use tracing::subscriber::Interest;
use tracing::{span, Event, Metadata};
use tracing_subscriber::filter::LevelFilter;
use tracing_subscriber::layer::{Context, Filter};

/// `F`, with its verdict asked again on every use of a callsite it enables.
#[derive(Debug)]
pub(crate) struct Fresh<F>(pub(crate) F);

impl<S, F: Filter<S>> Filter<S> for Fresh<F> {
    fn enabled(&self, meta: &Metadata<'_>, cx: &Context<'_, S>) -> bool {
        self.0.enabled(meta, cx)
    }

    fn callsite_enabled(&self, meta: &'static Metadata<'static>) -> Interest {
        let interest = self.0.callsite_enabled(meta);
        if interest.is_always() {
            Interest::sometimes()
        } else {
            interest
        }
    }

    fn event_enabled(&self, event: &Event<'_>, cx: &Context<'_, S>) -> bool {
        self.0.event_enabled(event, cx)
    }

    fn max_level_hint(&self) -> Option<LevelFilter> {
        self.0.max_level_hint()
    }

    fn on_new_span(&self, attrs: &span::Attributes<'_>, id: &span::Id, ctx: Context<'_, S>) {
        self.0.on_new_span(attrs, id, ctx);
    }

    fn on_record(&self, id: &span::Id, values: &span::Record<'_>, ctx: Context<'_, S>) {
        self.0.on_record(id, values, ctx);
    }

    fn on_enter(&self, id: &span::Id, ctx: Context<'_, S>) {
        self.0.on_enter(id, ctx);
    }

    fn on_exit(&self, id: &span::Id, ctx: Context<'_, S>) {
        self.0.on_exit(id, ctx);
    }

    fn on_close(&self, id: span::Id, ctx: Context<'_, S>) {
        self.0.on_close(id, ctx);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};
    use tracing_subscriber::filter::{filter_fn, EnvFilter};
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::Layer;

    /// Records the names of the spans it is told of.
    struct Spans(Arc<Mutex<Vec<String>>>);

    impl<S: tracing::Subscriber> Layer<S> for Spans {
        fn on_new_span(&self, attrs: &span::Attributes<'_>, _: &span::Id, _: Context<'_, S>) {
            self.0
                .lock()
                .unwrap()
                .push(attrs.metadata().name().to_owned());
        }
    }

    #[test]
    fn a_stale_verdict_left_by_enabled_does_not_drop_the_next_span() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let subscriber = tracing_subscriber::registry()
            .with(Spans(Arc::new(Mutex::default())).with_filter(Fresh(EnvFilter::new("debug"))))
            .with(Spans(Arc::clone(&seen)).with_filter(Fresh(filter_fn(|m| {
                m.is_span() || *m.level() <= tracing::Level::INFO
            }))));
        tracing::subscriber::with_default(subscriber, || {
            for _ in 0..3 {
                // As sqlx does after a query: asks, logs nothing. The second
                // layer's filter says no to it.
                let _ = tracing::enabled!(tracing::Level::DEBUG);
                let _span = tracing::info_span!("traced");
            }
        });
        assert_eq!(*seen.lock().unwrap(), ["traced", "traced", "traced"]);
    }
}
