//! Runs a service: its HTTP server, its consumer and its background tasks, until
//! it is told to stop.
//!
//! A service must survive its dependencies going away: the database restarting,
//! the broker pausing. So nothing here ends the process when a dependency fails.
//! The preparation (migrations, topic creation) is retried until it succeeds, and
//! the API answers 503 until then; a task (the consumer, a sweeper) that fails is
//! restarted after a doubling backoff, and `/health` names what is wrong meanwhile.
//! A consumer restarted this way loses nothing: its offsets are committed only for
//! messages whose transaction committed, so it resumes where the journal left off.

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use axum::extract::{MatchedPath, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use futures::future::BoxFuture;
use saga_core::consumer::{Consumer, ConsumerConfig, ConsumerStats, MessageHandler};
use sqlx::PgPool;
use tokio::sync::watch;
use tokio::task::JoinSet;

use anyhow::Context as _;

use crate::http::{error_chain, ApiError};
use crate::instance::InstanceClaim;
use crate::metrics::{ServiceMetrics, CONTENT_TYPE};

/// The first delay before a failed task or preparation is tried again; it doubles.
pub const FIRST_BACKOFF: Duration = Duration::from_millis(500);
/// The longest delay between two tries.
pub const MAX_BACKOFF: Duration = Duration::from_secs(15);
/// A task that ran this long before failing starts again from the first backoff.
const HEALTHY_RUN: Duration = Duration::from_secs(60);

/// Resolves when the service is told to stop; cheap to clone.
#[derive(Debug, Clone)]
pub struct Shutdown(watch::Receiver<bool>);

impl Shutdown {
    /// Waits for the stop (at once if it was already given).
    pub async fn wait(mut self) {
        // An error means the sender is gone, which is a stop too.
        let _ = self.0.wait_for(|stop| *stop).await;
    }

    pub fn is_set(&self) -> bool {
        *self.0.borrow()
    }
}

type TaskFn = Arc<dyn Fn(Shutdown) -> BoxFuture<'static, anyhow::Result<()>> + Send + Sync>;

/// A restartable background task: each run gets the shutdown signal and should
/// return `Ok` once it fired; an error (or returning early) restarts it.
#[derive(Clone)]
pub struct Task {
    name: String,
    run: TaskFn,
}

impl std::fmt::Debug for Task {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Task").field("name", &self.name).finish()
    }
}

impl Task {
    pub fn new<F, Fut>(name: impl Into<String>, run: F) -> Task
    where
        F: Fn(Shutdown) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = anyhow::Result<()>> + Send + 'static,
    {
        Task {
            name: name.into(),
            run: Arc::new(move |shutdown| Box::pin(run(shutdown))),
        }
    }

    /// A consumer of `config` with `handler`, created anew for every run.
    /// Every run counts into `stats` (the service's `/metrics`).
    ///
    /// An instance id in `config` is claimed on `pool`'s database before each run
    /// (see [`crate::instance`]); while another process holds it, the run goes
    /// without.
    pub fn consumer<H: MessageHandler>(
        config: ConsumerConfig,
        pool: PgPool,
        handler: Arc<H>,
        stats: Arc<ConsumerStats>,
    ) -> Task {
        let claim = config.instance_id.as_ref().map(|name| {
            Arc::new(tokio::sync::Mutex::new(InstanceClaim::new(
                &config.group_id,
                name,
            )))
        });
        Task::new("consumer", move |shutdown: Shutdown| {
            let (mut config, pool, handler) = (config.clone(), pool.clone(), Arc::clone(&handler));
            let (stats, claim) = (Arc::clone(&stats), claim.clone());
            async move {
                if let Some(claim) = claim {
                    let mut claim = claim.lock_owned().await;
                    let held = claim.hold(&pool).await.with_context(|| {
                        format!("cannot claim the instance name {}", claim.name())
                    })?;
                    if !held {
                        config.instance_id = None;
                    }
                }
                let consumer = Consumer::new(config, pool, handler)?.with_stats(stats);
                consumer.run(shutdown.wait()).await?;
                Ok(())
            }
        })
    }
}

type Prepare = Arc<dyn Fn() -> BoxFuture<'static, anyhow::Result<()>> + Send + Sync>;
type ExtraMetrics = Arc<dyn Fn() -> BoxFuture<'static, String> + Send + Sync>;
type Warnings = Arc<dyn Fn() -> BTreeMap<String, String> + Send + Sync>;

/// What is wrong, by component; empty when healthy.
#[derive(Debug, Default)]
struct Health {
    ready: bool,
    problems: BTreeMap<String, String>,
}

#[derive(Clone)]
struct Shared {
    name: &'static str,
    pool: PgPool,
    health: Arc<Mutex<Health>>,
    metrics: Arc<ServiceMetrics>,
    extra_metrics: Option<ExtraMetrics>,
    warnings: Option<Warnings>,
}

fn lock(health: &Mutex<Health>) -> MutexGuard<'_, Health> {
    health
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Shared {
    fn problem(&self, what: &str, reason: Option<String>) {
        let mut health = lock(&self.health);
        match reason {
            Some(reason) => health.problems.insert(what.to_owned(), reason),
            None => health.problems.remove(what),
        };
    }
}

/// A service to start: its name, database, address, API, preparation and tasks.
pub struct Service {
    name: &'static str,
    pool: PgPool,
    listen: SocketAddr,
    api: Router,
    prepare: Option<Prepare>,
    tasks: Vec<Task>,
    metrics: Arc<ServiceMetrics>,
    extra_metrics: Option<ExtraMetrics>,
    warnings: Option<Warnings>,
}

impl std::fmt::Debug for Service {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Service")
            .field("name", &self.name)
            .field("listen", &self.listen)
            .field("tasks", &self.tasks)
            .finish_non_exhaustive()
    }
}

impl Service {
    pub fn new(
        name: &'static str,
        pool: PgPool,
        listen: SocketAddr,
        metrics: Arc<ServiceMetrics>,
    ) -> Service {
        Service {
            name,
            pool,
            listen,
            api: Router::new(),
            prepare: None,
            tasks: Vec::new(),
            metrics,
            extra_metrics: None,
            warnings: None,
        }
    }

    /// The service's own routes (beside `/health` and `/metrics`).
    pub fn api(mut self, api: Router) -> Service {
        self.api = api;
        self
    }

    /// Run before the API is served and the tasks start (migrations, topics);
    /// retried until it succeeds.
    pub fn prepare<F, Fut>(mut self, prepare: F) -> Service
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = anyhow::Result<()>> + Send + 'static,
    {
        self.prepare = Some(Arc::new(move || Box::pin(prepare())));
        self
    }

    pub fn task(mut self, task: Task) -> Service {
        self.tasks.push(task);
        self
    }

    /// More Prometheus text for `/metrics`, computed per scrape.
    pub fn extra_metrics<F, Fut>(mut self, render: F) -> Service
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = String> + Send + 'static,
    {
        self.extra_metrics = Some(Arc::new(move || Box::pin(render())));
        self
    }

    /// What needs an operator's eye but does not stop the service from working
    /// (e.g. one saga it cannot handle), by subject, computed per `/health` call:
    /// listed under `warnings`, the status stays `ok` (an orchestrator must not be
    /// taken out of service for one bad saga).
    pub fn health_warnings<F>(mut self, warnings: F) -> Service
    where
        F: Fn() -> BTreeMap<String, String> + Send + Sync + 'static,
    {
        self.warnings = Some(Arc::new(warnings));
        self
    }

    /// Binds the address and starts everything in the background.
    pub async fn start(self) -> anyhow::Result<Running> {
        let listener = tokio::net::TcpListener::bind(self.listen)
            .await
            .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", self.listen))?;
        let addr = listener.local_addr()?;
        let (stop, stopped) = watch::channel(false);
        let shutdown = Shutdown(stopped);
        let shared = Shared {
            name: self.name,
            pool: self.pool.clone(),
            health: Arc::new(Mutex::new(Health::default())),
            metrics: Arc::clone(&self.metrics),
            extra_metrics: self.extra_metrics.clone(),
            warnings: self.warnings.clone(),
        };
        tracing::info!(service = self.name, %addr, "serving HTTP");
        let join = tokio::spawn(supervise(self, listener, shared, shutdown));
        Ok(Running { addr, stop, join })
    }
}

/// A started service.
#[derive(Debug)]
pub struct Running {
    addr: SocketAddr,
    stop: watch::Sender<bool>,
    join: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Running {
    /// Where the HTTP server listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops: the HTTP server answers open requests, the consumer finishes the
    /// messages in flight and commits their offsets, the tasks return.
    pub async fn stop(self) -> anyhow::Result<()> {
        let _ = self.stop.send(true);
        self.join.await?
    }

    /// Runs until `signal` resolves, then stops, and exports the spans still
    /// queued (the process is about to end).
    pub async fn run_until(self, signal: impl Future<Output = ()>) -> anyhow::Result<()> {
        signal.await;
        tracing::info!("stopping");
        let stopped = self.stop().await;
        // The exporter's shutdown waits for its last export: off the runtime's threads.
        let _ = tokio::task::spawn_blocking(telemetry::shutdown).await;
        stopped
    }
}

/// Resolves on SIGINT or SIGTERM.
pub async fn termination_signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = match tokio::signal::unix::signal(
            tokio::signal::unix::SignalKind::terminate(),
        ) {
            Ok(term) => term,
            Err(e) => {
                tracing::warn!(error = %e, "cannot watch SIGTERM; only SIGINT stops the service");
                let _ = interrupt.await;
                return;
            }
        };
        tokio::select! {
            _ = interrupt => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = interrupt.await;
    }
}

async fn supervise(
    service: Service,
    listener: tokio::net::TcpListener,
    shared: Shared,
    shutdown: Shutdown,
) -> anyhow::Result<()> {
    let operations = Router::new()
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .with_state(shared.clone());
    let router = service
        .api
        .layer(axum::middleware::from_fn_with_state(shared.clone(), gate))
        .layer(axum::middleware::from_fn(crate::http::traced))
        .merge(operations)
        .fallback(crate::http::not_found)
        .layer(axum::middleware::from_fn_with_state(shared.clone(), count));
    let mut running = JoinSet::new();
    running.spawn({
        let shutdown = shutdown.clone();
        async move {
            axum::serve(listener, router)
                .with_graceful_shutdown(shutdown.wait())
                .await
                .map_err(|e| anyhow::anyhow!("HTTP server failed: {e}"))
        }
    });

    let prepared = match &service.prepare {
        Some(prepare) => {
            lock(&shared.health).problems.insert(
                "starting".into(),
                "preparing the database and topics".into(),
            );
            let prepared = retry("prepare", &shared, &shutdown, prepare.as_ref()).await;
            shared.problem("starting", None);
            prepared
        }
        None => true,
    };
    if prepared {
        lock(&shared.health).ready = true;
        for task in service.tasks {
            let (shared, shutdown) = (shared.clone(), shutdown.clone());
            running.spawn(async move {
                let run = &task.run;
                retry(&task.name, &shared, &shutdown, &|| run(shutdown.clone())).await;
                Ok(())
            });
        }
    }
    let mut failure = None;
    while let Some(joined) = running.join_next().await {
        match joined {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::error!(service = shared.name, error = %e, "stopping");
                failure.get_or_insert(e);
                // Only the HTTP server fails for good: nothing can reach the
                // service any more, so it stops.
                running.abort_all();
            }
            Err(e) if e.is_cancelled() => {}
            Err(e) => {
                failure.get_or_insert(anyhow::anyhow!("a task panicked: {e}"));
            }
        }
    }
    failure.map_or(Ok(()), Err)
}

/// Runs `attempt` until it succeeds (for a preparation) or until shutdown (for a
/// task, whose `Ok` before shutdown counts as a failure). Returns whether it ended
/// by success rather than by shutdown.
async fn retry(
    what: &str,
    shared: &Shared,
    shutdown: &Shutdown,
    attempt: &(dyn Fn() -> BoxFuture<'static, anyhow::Result<()>> + Send + Sync),
) -> bool {
    let is_prepare = what == "prepare";
    let mut backoff = FIRST_BACKOFF;
    loop {
        let started = Instant::now();
        let outcome = tokio::select! {
            outcome = attempt() => outcome,
            () = shutdown.clone().wait(), if is_prepare => return false,
        };
        if shutdown.is_set() {
            return !is_prepare;
        }
        let reason = match outcome {
            Ok(()) if is_prepare => {
                shared.problem(what, None);
                return true;
            }
            Ok(()) => "ended unexpectedly".to_owned(),
            Err(e) => error_chain(e.as_ref()),
        };
        if started.elapsed() >= HEALTHY_RUN {
            backoff = FIRST_BACKOFF;
        }
        tracing::warn!(service = shared.name, task = what, reason = %reason, retry_in = ?backoff, "failed; trying again");
        shared.problem(what, Some(reason));
        shared.metrics.task_restart(what);
        tokio::select! {
            () = tokio::time::sleep(backoff) => {}
            () = shutdown.clone().wait() => return !is_prepare,
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
        if !is_prepare {
            // The task runs again; it reports itself through the next failure.
            shared.problem(what, None);
        }
    }
}

/// Answers 503 on API routes until the preparation succeeded.
async fn gate(State(shared): State<Shared>, request: Request, next: Next) -> Response {
    if lock(&shared.health).ready {
        next.run(request).await
    } else {
        ApiError::unavailable("the service is starting").into_response()
    }
}

/// Counts responses by route template and status.
async fn count(State(shared): State<Shared>, request: Request, next: Next) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |p| p.as_str().to_owned());
    let response = next.run(request).await;
    shared
        .metrics
        .http_response(&route, response.status().as_u16());
    response
}

async fn health(State(shared): State<Shared>) -> Response {
    let database = tokio::time::timeout(
        Duration::from_secs(2),
        sqlx::query("SELECT 1").execute(&shared.pool),
    )
    .await;
    let database = match database {
        Ok(Ok(_)) => None,
        Ok(Err(e)) => Some(error_chain(&e)),
        Err(_) => Some("no answer within 2 s".to_owned()),
    };
    let mut problems = lock(&shared.health).problems.clone();
    if let Some(reason) = database {
        problems.insert("database".into(), reason);
    }
    let healthy = problems.is_empty();
    shared.metrics.set_healthy(healthy);
    let status = if healthy {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let warnings = shared.warnings.as_ref().map(|w| w()).unwrap_or_default();
    let body = serde_json::json!({
        "service": shared.name,
        "status": if healthy { "ok" } else { "unavailable" },
        "problems": problems,
        "warnings": warnings,
    });
    (
        status,
        [(header::CACHE_CONTROL, "no-store")],
        axum::Json(body),
    )
        .into_response()
}

async fn metrics(State(shared): State<Shared>) -> Response {
    let mut text = shared.metrics.render(shared.name);
    if let Some(extra) = &shared.extra_metrics {
        text.push_str(&extra().await);
    }
    ([(header::CONTENT_TYPE, CONTENT_TYPE)], text).into_response()
}
