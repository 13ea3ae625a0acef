//! The service's counters, rendered as Prometheus text on `/metrics`.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use futures::future::BoxFuture;
use saga_core::consumer::{ConsumerStats, HandlerError, IncomingMessage, MessageHandler};

/// The Prometheus text format's content type.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Counters every service keeps.
#[derive(Debug, Default)]
pub struct ServiceMetrics {
    /// HTTP responses by route template and status.
    http: Mutex<BTreeMap<(String, u16), u64>>,
    /// Handler calls by message type and result.
    handler: Mutex<BTreeMap<(String, &'static str), u64>>,
    /// Restarts of background tasks by task name.
    restarts: Mutex<BTreeMap<String, u64>>,
    /// What became of the consumed messages (across consumer restarts).
    pub consumer: Arc<ConsumerStats>,
    healthy: AtomicU64,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A counter map stays consistent even if a holder panicked.
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl ServiceMetrics {
    pub fn new() -> Arc<ServiceMetrics> {
        Arc::new(ServiceMetrics::default())
    }

    pub fn http_response(&self, route: &str, status: u16) {
        *lock(&self.http)
            .entry((route.to_owned(), status))
            .or_default() += 1;
    }

    pub fn handler_call(&self, message_type: &str, result: &'static str) {
        *lock(&self.handler)
            .entry((message_type.to_owned(), result))
            .or_default() += 1;
    }

    pub fn task_restart(&self, task: &str) {
        *lock(&self.restarts).entry(task.to_owned()).or_default() += 1;
    }

    pub(crate) fn set_healthy(&self, healthy: bool) {
        self.healthy.store(u64::from(healthy), Ordering::Relaxed);
    }

    /// Handler calls of `message_type` that ended with `result` (`ok`, `transient`,
    /// `definite`).
    pub fn handler_calls(&self, message_type: &str, result: &'static str) -> u64 {
        lock(&self.handler)
            .get(&(message_type.to_owned(), result))
            .copied()
            .unwrap_or(0)
    }

    /// The counters in Prometheus text format, `service` as a label on each.
    pub fn render(&self, service: &str) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "# HELP service_up 1 while the service reports itself healthy."
        );
        let _ = writeln!(out, "# TYPE service_up gauge");
        let _ = writeln!(
            out,
            "service_up{{service=\"{service}\"}} {}",
            self.healthy.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP service_http_responses_total HTTP responses by route and status."
        );
        let _ = writeln!(out, "# TYPE service_http_responses_total counter");
        for ((route, status), n) in lock(&self.http).iter() {
            let _ = writeln!(
                out,
                "service_http_responses_total{{service=\"{service}\",route=\"{}\",status=\"{status}\"}} {n}",
                escape(route)
            );
        }
        let _ = writeln!(
            out,
            "# HELP service_handler_calls_total Message handler calls by message type and result (a call that returned ok is rolled back if its commit fails)."
        );
        let _ = writeln!(out, "# TYPE service_handler_calls_total counter");
        for ((message_type, result), n) in lock(&self.handler).iter() {
            let _ = writeln!(
                out,
                "service_handler_calls_total{{service=\"{service}\",type=\"{}\",result=\"{result}\"}} {n}",
                escape(message_type)
            );
        }
        let _ = writeln!(
            out,
            "# HELP service_consumer_messages_total Consumed messages by what became of them: applied (committed), duplicate (found in the journal, skipped), retried (an attempt rolled back to be tried again), dead_lettered."
        );
        let _ = writeln!(out, "# TYPE service_consumer_messages_total counter");
        for (result, n) in [
            ("applied", self.consumer.applied()),
            ("duplicate", self.consumer.duplicates()),
            ("retried", self.consumer.retried()),
            ("dead_lettered", self.consumer.dead_lettered()),
        ] {
            let _ = writeln!(
                out,
                "service_consumer_messages_total{{service=\"{service}\",result=\"{result}\"}} {n}"
            );
        }
        let _ = writeln!(
            out,
            "# HELP service_consumer_rejoins_total Times the consumer, without partitions although its group owed it some, left its group and joined it again."
        );
        let _ = writeln!(out, "# TYPE service_consumer_rejoins_total counter");
        let _ = writeln!(
            out,
            "service_consumer_rejoins_total{{service=\"{service}\"}} {}",
            self.consumer.rejoins()
        );
        let _ = writeln!(
            out,
            "# HELP service_task_restarts_total Restarts of a background task after it failed."
        );
        let _ = writeln!(out, "# TYPE service_task_restarts_total counter");
        for (task, n) in lock(&self.restarts).iter() {
            let _ = writeln!(
                out,
                "service_task_restarts_total{{service=\"{service}\",task=\"{}\"}} {n}",
                escape(task)
            );
        }
        out
    }
}

/// Escapes a Prometheus label value.
pub fn escape(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// A [`MessageHandler`] that counts the calls of the handler it wraps.
#[derive(Debug)]
pub struct Counted<H> {
    inner: Arc<H>,
    metrics: Arc<ServiceMetrics>,
}

impl<H> Counted<H> {
    pub fn new(inner: Arc<H>, metrics: Arc<ServiceMetrics>) -> Counted<H> {
        Counted { inner, metrics }
    }
}

impl<H: MessageHandler> MessageHandler for Counted<H> {
    fn handle<'a>(
        &'a self,
        tx: &'a mut sqlx::PgConnection,
        message: &'a IncomingMessage,
    ) -> BoxFuture<'a, Result<(), HandlerError>> {
        Box::pin(async move {
            let result = self.inner.handle(tx, message).await;
            let label = match &result {
                Ok(()) => "ok",
                Err(HandlerError::Transient(_)) => "transient",
                Err(HandlerError::Definite(_)) => "definite",
            };
            self.metrics
                .handler_call(message.message_type.as_deref().unwrap_or(""), label);
            result
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_every_family_with_help_and_type() {
        let metrics = ServiceMetrics::new();
        metrics.http_response("/orders", 202);
        metrics.handler_call("Reserve\"Goods", "ok");
        metrics.task_restart("consumer");
        metrics.set_healthy(true);
        let text = metrics.render("inventory");
        assert!(text.contains("service_up{service=\"inventory\"} 1"));
        assert!(text.contains(
            "service_http_responses_total{service=\"inventory\",route=\"/orders\",status=\"202\"} 1"
        ));
        assert!(text.contains("type=\"Reserve\\\"Goods\",result=\"ok\"} 1"));
        assert!(
            text.contains("service_task_restarts_total{service=\"inventory\",task=\"consumer\"} 1")
        );
        assert!(text.contains("service_consumer_rejoins_total{service=\"inventory\"} 0"));
        for family in [
            "service_up",
            "service_http_responses_total",
            "service_handler_calls_total",
            "service_consumer_rejoins_total",
            "service_task_restarts_total",
        ] {
            assert!(text.contains(&format!("# HELP {family} ")), "{family}");
            assert!(text.contains(&format!("# TYPE {family} ")), "{family}");
        }
    }
}
