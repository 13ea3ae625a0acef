//! The saga console: a web page an operator opens to see and steer sagas.
//!
//! - `/console`: every saga with filters (status, type, age, stuck), the count per
//!   status and how many sagas ended per minute over the last minutes;
//! - `/console/relays`: the relays' health and lag, from their `/health` and
//!   `/metrics`;
//! - `/console/sagas/{id}`: one saga's timeline as a picture (a lane per step:
//!   commands, replies, timeouts, compensations, retries, operator actions), each
//!   event's ids and headers on demand, its data and steps, and the actions that
//!   fit its status (abort, send the awaited step's command again, retry a failed
//!   compensation), each behind a confirmation.
//!
//! # Why it is served by the orchestrating service
//!
//! The console is a router ([`router`]) the orchestrating service mounts beside its
//! API, rather than a binary of its own: an operator action moves the saga on
//! (compensations are sent, local steps run), which needs the saga's definition,
//! code that only the orchestrating service has. Mounted there, an action goes
//! through the same [`Orchestrator`] and version check as every reply and timeout,
//! and is recorded in the saga's audit trail with the operator's name.
//!
//! Everything it shows is read from `saga_state` and `saga_events` (the audit
//! trail, `saga_core::saga::audit`) in the service's database: the console keeps no
//! state of its own, so any number of instances can serve it.
//!
//! Pages are plain server-rendered HTML with inline CSS and SVG, and the little
//! script there is only asks for confirmations: nothing to build, nothing loaded
//! from elsewhere.

mod dead_letters;
mod html;
mod pages;
mod query;
mod relays;
mod timeline;

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::{Form, Path, Query, State};
use axum::http::StatusCode;
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::Router;
use futures::future::BoxFuture;
use saga_core::saga::{Orchestrator, SagaAdmin, SagaData, SagaError, StuckRules};
use serde::Deserialize;
use sqlx::PgPool;
use uuid::Uuid;

pub use dead_letters::DeadLetters;
pub use query::{Filter, SagaRow};
pub use relays::Relay;

/// Where the console is mounted.
pub const BASE: &str = "/console";

/// The actions an operator takes on sagas of one type: implemented by every
/// [`Orchestrator`], which knows the saga's definition.
pub trait SagaActions: Send + Sync + 'static {
    /// The saga type this orchestrator runs.
    fn saga_type(&self) -> &str;
    /// Aborts a running or suspended saga: its current step fails, completed
    /// steps are compensated.
    fn abort<'a>(
        &'a self,
        admin: &'a SagaAdmin,
        id: Uuid,
        reason: &'a str,
    ) -> BoxFuture<'a, Result<(), SagaError>>;
    /// Tries the failed compensation of a `COMPENSATION_FAILED` saga again.
    fn retry_compensation<'a>(
        &'a self,
        admin: &'a SagaAdmin,
        id: Uuid,
    ) -> BoxFuture<'a, Result<(), SagaError>>;
    /// Sends the command of the step a running saga waits on again.
    fn retry_step<'a>(
        &'a self,
        admin: &'a SagaAdmin,
        id: Uuid,
    ) -> BoxFuture<'a, Result<(), SagaError>>;
    /// Restarts the failed step of a `SUSPENDED` saga; it runs on from there.
    fn restart_step<'a>(
        &'a self,
        admin: &'a SagaAdmin,
        id: Uuid,
    ) -> BoxFuture<'a, Result<(), SagaError>>;
}

impl<D: SagaData + Clone> SagaActions for Orchestrator<D> {
    fn saga_type(&self) -> &str {
        self.definition().name()
    }

    fn abort<'a>(
        &'a self,
        admin: &'a SagaAdmin,
        id: Uuid,
        reason: &'a str,
    ) -> BoxFuture<'a, Result<(), SagaError>> {
        Box::pin(admin.abort(self, id, reason))
    }

    fn retry_compensation<'a>(
        &'a self,
        admin: &'a SagaAdmin,
        id: Uuid,
    ) -> BoxFuture<'a, Result<(), SagaError>> {
        Box::pin(admin.retry_compensation(self, id))
    }

    fn retry_step<'a>(
        &'a self,
        admin: &'a SagaAdmin,
        id: Uuid,
    ) -> BoxFuture<'a, Result<(), SagaError>> {
        Box::pin(admin.retry_step(self, id))
    }

    fn restart_step<'a>(
        &'a self,
        admin: &'a SagaAdmin,
        id: Uuid,
    ) -> BoxFuture<'a, Result<(), SagaError>> {
        Box::pin(admin.restart_step(self, id))
    }
}

/// What the console works on: the database of the sagas, and the orchestrators
/// that act on them, by saga type.
#[derive(Clone)]
pub struct Console {
    pool: PgPool,
    title: String,
    orchestrators: BTreeMap<String, Arc<dyn SagaActions>>,
    relays: Vec<Relay>,
    dead_letters: Option<DeadLetters>,
    stuck_rules: StuckRules,
}

impl std::fmt::Debug for Console {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Console")
            .field("title", &self.title)
            .field("saga_types", &self.orchestrators.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

impl Console {
    /// A console of the sagas in `pool`'s database, titled `title` (the service's
    /// name).
    pub fn new(pool: PgPool, title: impl Into<String>) -> Console {
        Console {
            pool,
            title: title.into(),
            orchestrators: BTreeMap::new(),
            relays: Vec::new(),
            dead_letters: None,
            stuck_rules: StuckRules::new(),
        }
    }

    /// Names sagas stuck by `rules` (give it the orchestrators' definitions with
    /// [`StuckRules::knowing`], so that limits follow each step's timeout).
    #[must_use]
    pub fn with_stuck_rules(mut self, rules: StuckRules) -> Console {
        self.stuck_rules = rules;
        self
    }

    /// The stuck sagas and why, by id.
    async fn stuck(&self) -> Result<BTreeMap<Uuid, String>, SagaError> {
        let stuck = SagaAdmin::new(self.pool.clone())
            .stuck(&self.stuck_rules)
            .await?;
        Ok(stuck
            .into_iter()
            .map(|s| (s.saga.id, s.reason.to_string()))
            .collect())
    }

    /// Shows the dead letters of `dead_letters`' topics, and replays them.
    #[must_use]
    pub fn with_dead_letters(mut self, dead_letters: DeadLetters) -> Console {
        self.dead_letters = Some(dead_letters);
        self
    }

    /// Shows `relays`' health and lag on the relays page.
    #[must_use]
    pub fn with_relays(mut self, relays: impl IntoIterator<Item = Relay>) -> Console {
        self.relays.extend(relays);
        self
    }

    /// Lets operators act on sagas of `orchestrator`'s type.
    #[must_use]
    pub fn acting_through(mut self, orchestrator: Arc<dyn SagaActions>) -> Console {
        self.orchestrators
            .insert(orchestrator.saga_type().to_owned(), orchestrator);
        self
    }
}

/// The page asking an operator to sign in, for a service that puts the console
/// behind authentication; `message` says why it is shown again (a wrong password).
pub fn sign_in_page(service: &str, message: Option<&str>, email: &str) -> String {
    pages::sign_in(service, message, email)
}

/// The console's routes, under [`BASE`].
pub fn router(console: Console) -> Router {
    Router::new()
        .route(BASE, get(list))
        .route(&format!("{BASE}/sagas/{{id}}"), get(detail))
        .route(&format!("{BASE}/sagas/{{id}}/abort"), post(abort))
        .route(&format!("{BASE}/sagas/{{id}}/retry"), post(retry))
        .route(&format!("{BASE}/sagas/{{id}}/resend"), post(resend))
        .route(&format!("{BASE}/sagas/{{id}}/restart"), post(restart))
        .route(&format!("{BASE}/relays"), get(relays_page))
        .route(&format!("{BASE}/dead-letters"), get(letters_page))
        .route(&format!("{BASE}/dead-letters/replay"), post(replay))
        .with_state(Arc::new(console))
}

async fn list(State(console): State<Arc<Console>>, Query(filter): Query<Filter>) -> Response {
    let stuck = match console.stuck().await {
        Ok(stuck) => stuck,
        Err(e) => return failure(&console.title, &e.to_string()),
    };
    match query::overview(&console.pool, &filter, stuck).await {
        Ok(overview) => Html(pages::list(&console.title, &filter, &overview)).into_response(),
        Err(e) => failure(&console.title, &e.to_string()),
    }
}

async fn relays_page(State(console): State<Arc<Console>>) -> Html<String> {
    Html(relays::page_of(&console.title, &console.relays).await)
}

async fn letters_page(
    State(console): State<Arc<Console>>,
    Query(done): Query<Done>,
) -> Html<String> {
    Html(render_letters(&console, done.done.as_deref(), None).await)
}

async fn render_letters(console: &Console, done: Option<&str>, error: Option<&str>) -> String {
    let (topics, letters) = match &console.dead_letters {
        Some(dl) => (dl.topics().to_vec(), dl.read().await),
        None => (Vec::new(), Ok(Vec::new())),
    };
    pages::dead_letters(&console.title, &topics, &letters, done, error)
}

/// A replay's form.
#[derive(Debug, Deserialize)]
struct ReplayForm {
    operator: String,
    topic: String,
    partition: i32,
    offset: i64,
}

async fn replay(State(console): State<Arc<Console>>, Form(form): Form<ReplayForm>) -> Response {
    let operator = form.operator.trim();
    let refuse = |status: StatusCode, why: String| {
        let console = Arc::clone(&console);
        async move {
            (
                status,
                Html(render_letters(&console, None, Some(&why)).await),
            )
                .into_response()
        }
    };
    if operator.is_empty() {
        return refuse(
            StatusCode::UNPROCESSABLE_ENTITY,
            "Say who you are: the replay is logged with your name.".to_owned(),
        )
        .await;
    }
    let Some(dead_letters) = &console.dead_letters else {
        return StatusCode::NOT_FOUND.into_response();
    };
    match dead_letters
        .replay(&form.topic, form.partition, form.offset)
        .await
    {
        Ok(replayed) => {
            let target = &replayed.target;
            tracing::info!(operator, topic = %form.topic, partition = form.partition, offset = form.offset, %target, "dead letter replayed from the console");
            let mut done = format!(
                "Replayed {}/{}/{} to {target} (partition {}, offset {}).",
                form.topic, form.partition, form.offset, replayed.partition, replayed.offset
            );
            if let Some(saga) = replayed.saga_id {
                // The saga's trail says that its message came back, and who sent it.
                let action = serde_json::json!({
                    "action": "dead_letter_replayed",
                    "from": {"topic": form.topic, "partition": form.partition, "offset": form.offset},
                    "to": {"topic": target, "partition": replayed.partition, "offset": replayed.offset},
                    "message_id": replayed.message_id,
                });
                let admin = SagaAdmin::new(console.pool.clone()).acting_as(operator);
                match admin.record_action(saga, action).await {
                    Ok(true) => done.push_str(&format!(" Recorded in the trail of saga {saga}.")),
                    Ok(false) => {}
                    Err(e) => {
                        tracing::warn!(saga_id = %saga, error = %e, "the replay could not be recorded in the saga's trail");
                    }
                }
            }
            Redirect::to(&format!(
                "{BASE}/dead-letters?done={}",
                html::url_value(&done)
            ))
            .into_response()
        }
        Err(why) => refuse(StatusCode::CONFLICT, why).await,
    }
}

/// What a saga page was asked to say after an action.
#[derive(Debug, Default, Deserialize)]
struct Done {
    done: Option<String>,
}

async fn detail(
    State(console): State<Arc<Console>>,
    Path(id): Path<Uuid>,
    Query(done): Query<Done>,
) -> Response {
    match query::saga(&console.pool, id).await {
        Ok(Some(mut saga)) => {
            saga.stuck = console.stuck().await.ok().and_then(|mut s| s.remove(&id));
            let actions = console.orchestrators.contains_key(&saga.row.saga_type);
            let page = pages::saga(&console.title, &saga, actions, done.done.as_deref(), None);
            Html(page).into_response()
        }
        Ok(None) => (
            StatusCode::NOT_FOUND,
            Html(pages::message(
                &console.title,
                "No such saga",
                &format!("There is no saga {id}."),
            )),
        )
            .into_response(),
        Err(e) => failure(&console.title, &e.to_string()),
    }
}

/// An operator action's form.
#[derive(Debug, Deserialize)]
struct ActionForm {
    /// Who acts: recorded in the audit trail.
    operator: String,
    #[serde(default)]
    reason: String,
}

async fn abort(
    State(console): State<Arc<Console>>,
    Path(id): Path<Uuid>,
    Form(form): Form<ActionForm>,
) -> Response {
    let reason = form.reason.trim().to_owned();
    act(
        &console,
        id,
        &form.operator,
        "aborted",
        move |actions, admin| {
            Box::pin(async move {
                let reason = if reason.is_empty() {
                    "aborted from the console".to_owned()
                } else {
                    reason
                };
                actions.abort(admin, id, &reason).await
            })
        },
    )
    .await
}

/// An operator action that needs nothing but the saga: which, and what the saga
/// was then (for the page that follows).
#[derive(Debug, Clone, Copy)]
enum SimpleAction {
    RetryCompensation,
    RetryStep,
    RestartStep,
}

impl SimpleAction {
    fn done(self) -> &'static str {
        match self {
            SimpleAction::RetryCompensation => "retried",
            SimpleAction::RetryStep => "sent again",
            SimpleAction::RestartStep => "restarted from its failed step",
        }
    }
}

async fn retry(state: State<Arc<Console>>, id: Path<Uuid>, form: Form<ActionForm>) -> Response {
    simple(state, id, form, SimpleAction::RetryCompensation).await
}

async fn resend(state: State<Arc<Console>>, id: Path<Uuid>, form: Form<ActionForm>) -> Response {
    simple(state, id, form, SimpleAction::RetryStep).await
}

async fn restart(state: State<Arc<Console>>, id: Path<Uuid>, form: Form<ActionForm>) -> Response {
    simple(state, id, form, SimpleAction::RestartStep).await
}

async fn simple(
    State(console): State<Arc<Console>>,
    Path(id): Path<Uuid>,
    Form(form): Form<ActionForm>,
    action: SimpleAction,
) -> Response {
    act(
        &console,
        id,
        &form.operator,
        action.done(),
        move |actions, admin| match action {
            SimpleAction::RetryCompensation => actions.retry_compensation(admin, id),
            SimpleAction::RetryStep => actions.retry_step(admin, id),
            SimpleAction::RestartStep => actions.restart_step(admin, id),
        },
    )
    .await
}

/// Runs an operator action on saga `id` as `operator`; back to the saga's page.
async fn act<F>(console: &Console, id: Uuid, operator: &str, done: &str, action: F) -> Response
where
    F: for<'a> FnOnce(
        &'a Arc<dyn SagaActions>,
        &'a SagaAdmin,
    ) -> BoxFuture<'a, Result<(), SagaError>>,
{
    let operator = operator.trim();
    let saga = match query::saga(&console.pool, id).await {
        Ok(Some(saga)) => saga,
        Ok(None) => return StatusCode::NOT_FOUND.into_response(),
        Err(e) => return failure(&console.title, &e.to_string()),
    };
    let refuse = |status: StatusCode, why: &str| {
        let page = pages::saga(&console.title, &saga, true, None, Some(why));
        (status, Html(page)).into_response()
    };
    if operator.is_empty() {
        return refuse(
            StatusCode::UNPROCESSABLE_ENTITY,
            "Say who you are: the action is recorded with your name.",
        );
    }
    let Some(actions) = console.orchestrators.get(&saga.row.saga_type) else {
        return refuse(
            StatusCode::CONFLICT,
            "This service does not run sagas of this type.",
        );
    };
    let admin = SagaAdmin::new(console.pool.clone()).acting_as(operator);
    match action(actions, &admin).await {
        Ok(()) => {
            tracing::info!(saga_id = %id, operator, action = done, "operator action from the console");
            let done = html::url_value(done);
            Redirect::to(&format!("{BASE}/sagas/{id}?done={done}")).into_response()
        }
        Err(e @ (SagaError::Invalid { .. } | SagaError::Conflict(_))) => {
            refuse(StatusCode::CONFLICT, &e.to_string())
        }
        Err(e) => refuse(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
    }
}

fn failure(title: &str, error: &str) -> Response {
    tracing::warn!(error, "console page failed");
    (
        StatusCode::INTERNAL_SERVER_ERROR,
        Html(pages::message(
            title,
            "The console cannot read the sagas",
            error,
        )),
    )
        .into_response()
}
