//! The HTTP server for `/metrics`, `/health` and `/ready`.

use std::future::Future;
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};

use crate::health::Health;
use crate::metrics::{self, Metrics};

#[derive(Clone, Debug)]
struct Shared {
    metrics: Arc<Metrics>,
    health: Arc<Health>,
}

/// Serves on `listener` until `shutdown` completes and the open requests are
/// answered:
///
/// - `GET /metrics`: 200, Prometheus text format 0.0.4
///   (`text/plain; version=0.0.4`), from [`Metrics::render`].
/// - `GET /health` (liveness): the [`Health::report`] as JSON, with 200 when
///   healthy and 503 when not.
/// - `GET /ready` (readiness): the same report, with 200 when ready and 503 when
///   not (see [`crate::health`] for why the two differ).
/// - Any other path: 404; another method on these paths: 405.
pub async fn serve(
    listener: tokio::net::TcpListener,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(addr = %addr, "serving /metrics, /health and /ready");
    }
    let router = Router::new()
        .route("/metrics", get(get_metrics))
        .route("/health", get(get_health))
        .route("/ready", get(get_ready))
        .with_state(Shared { metrics, health });
    axum::serve(listener, router)
        .with_graceful_shutdown(shutdown)
        .await
}

async fn get_metrics(State(shared): State<Shared>) -> Response {
    (
        [(header::CONTENT_TYPE, metrics::CONTENT_TYPE)],
        shared.metrics.render(&shared.health),
    )
        .into_response()
}

async fn get_health(State(shared): State<Shared>) -> Response {
    let report = shared.health.report();
    let ok = report.healthy;
    answer(ok, report)
}

async fn get_ready(State(shared): State<Shared>) -> Response {
    let report = shared.health.report();
    let ok = report.ready;
    answer(ok, report)
}

fn answer(ok: bool, report: crate::health::HealthReport) -> Response {
    let status = if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, [(header::CACHE_CONTROL, "no-store")], Json(report)).into_response()
}
