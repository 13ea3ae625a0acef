//! Starting and stopping a whole shop: four services, each with its own database,
//! and one `outbox-relay` per database, either inside this process (tests) or as
//! the real binaries (the demo).
//!
//! Start order: a service first (its preparation migrates its database, creating
//! the `outbox` table, and creates the topics), then its relay (whose first start
//! creates the publication and slot and publishes any rows already in the table).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use outbox_relay::config::{RelayConfig, TopicTemplate};
use service_kit::{Amount, CommonArgs, Running};
use tokio::process::{Child, Command};
use tokio::sync::watch;

/// The four services' database URLs.
#[derive(Debug, Clone)]
pub struct ServiceDatabases {
    pub order: String,
    pub customer: String,
    pub inventory: String,
    pub payment: String,
}

impl ServiceDatabases {
    fn of(&self, service: &str) -> &str {
        match service {
            "order" => &self.order,
            "customer" => &self.customer,
            "inventory" => &self.inventory,
            _ => &self.payment,
        }
    }
}

/// How the services and relays run.
#[derive(Debug, Clone)]
pub enum Mode {
    /// As tasks of this process (the binaries' library entry points).
    InProcess,
    /// As the built binaries found in `bin_dir`, logging into `log_dir`.
    Processes { bin_dir: PathBuf, log_dir: PathBuf },
}

/// What to start.
#[derive(Debug, Clone)]
pub struct ShopConfig {
    pub databases: ServiceDatabases,
    pub brokers: String,
    /// Put before every topic and consumer group name, so shops can share a broker.
    pub prefix: String,
    pub mode: Mode,
    pub step_timeout: Duration,
    /// Sagas whose step times out are suspended for an operator this long
    /// (`SAGA_SUSPEND_ON=timeouts`); `None`: they compensate at once (the default).
    pub suspend_timeouts_for: Option<Duration>,
    /// The payment service's charge limit; `None`: its default.
    pub charge_limit: Option<Amount>,
    /// How long a service or relay may take to report itself healthy.
    pub start_timeout: Duration,
    /// Extra environment of one process (`Mode::Processes` only), by component name
    /// (`order-service`, `order-service-2`, `relay-order`, ...): fault points, knobs.
    pub env: BTreeMap<String, Vec<(String, String)>>,
    /// Order-service instances (`Mode::Processes` only): more than one share the
    /// consumer group of the replies and the sweeping of deadlines.
    pub order_instances: usize,
    /// The auth service's database: when set, the auth service starts first (its
    /// demo users seeded) and the order service verifies tokens against its JWKS;
    /// `None`: authentication is off.
    pub auth_database: Option<String>,
}

impl ShopConfig {
    pub fn new(
        databases: ServiceDatabases,
        brokers: impl Into<String>,
        prefix: impl Into<String>,
    ) -> ShopConfig {
        ShopConfig {
            databases,
            brokers: brokers.into(),
            prefix: prefix.into(),
            mode: Mode::InProcess,
            step_timeout: Duration::from_secs(30),
            suspend_timeouts_for: None,
            charge_limit: None,
            start_timeout: Duration::from_secs(60),
            env: BTreeMap::new(),
            order_instances: 1,
            auth_database: None,
        }
    }

    /// Adds `key=value` to the environment of component `name`.
    pub fn with_env(mut self, name: &str, key: &str, value: impl Into<String>) -> ShopConfig {
        self.env
            .entry(name.to_owned())
            .or_default()
            .push((key.to_owned(), value.into()));
        self
    }
}

/// The services, in the order they start.
pub const SERVICES: [&str; 4] = ["customer", "inventory", "payment", "order"];

enum Component {
    Service(&'static str, Running),
    Relay(
        &'static str,
        watch::Sender<bool>,
        tokio::task::JoinHandle<anyhow::Result<()>>,
    ),
    Process(Box<Process>),
}

/// A component running as its own process, with what it takes to start it again.
#[derive(Debug)]
struct Process {
    name: String,
    program: PathBuf,
    args: Vec<String>,
    env: Vec<(String, String)>,
    log: PathBuf,
    health: String,
    child: Option<Child>,
    /// How often it was started.
    starts: u32,
}

impl Process {
    fn spawn(&mut self) -> anyhow::Result<()> {
        let mut command = Command::new(&self.program);
        command.args(&self.args);
        for (key, value) in &self.env {
            command.env(key, value);
        }
        self.child = Some(spawn_logged(command, &self.log, self.starts > 0)?);
        self.starts += 1;
        Ok(())
    }

    fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(Child::id)
    }
}

impl std::fmt::Debug for Component {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Component::Service(name, _) => write!(f, "service {name}"),
            Component::Relay(name, _, _) => write!(f, "relay {name}"),
            Component::Process(p) => write!(f, "process {} ({:?})", p.name, p.pid()),
        }
    }
}

/// A running shop.
#[derive(Debug)]
pub struct Shop {
    pub config: ShopConfig,
    /// Base URLs (`http://127.0.0.1:port`) by service.
    pub order_url: String,
    pub customer_url: String,
    pub inventory_url: String,
    pub payment_url: String,
    /// The auth service, when the shop runs with authentication.
    pub auth_url: Option<String>,
    /// The port of each relay's HTTP endpoint (`/health`, `/metrics`), by service;
    /// chosen before anything starts, so the order service's console knows them.
    relay_ports: BTreeMap<&'static str, u16>,
    components: Vec<Component>,
}

impl Shop {
    /// Starts the services (each healthy before the next) and then the relays.
    /// `progress` hears what is happening.
    pub async fn start(
        config: ShopConfig,
        progress: &mut (dyn FnMut(&str) + Send),
    ) -> anyhow::Result<Shop> {
        let mut shop = Shop {
            config: config.clone(),
            order_url: String::new(),
            customer_url: String::new(),
            inventory_url: String::new(),
            payment_url: String::new(),
            auth_url: None,
            relay_ports: SERVICES
                .iter()
                .map(|s| (*s, testkit::free_port()))
                .collect(),
            components: Vec::new(),
        };
        match shop.start_all(progress).await {
            Ok(()) => Ok(shop),
            Err(e) => {
                shop.stop().await;
                Err(e)
            }
        }
    }

    async fn start_all(&mut self, progress: &mut (dyn FnMut(&str) + Send)) -> anyhow::Result<()> {
        let http = reqwest::Client::new();
        if let Some(database) = self.config.auth_database.clone() {
            progress("starting auth-service");
            let url = self.start_auth(&database).await?;
            wait_healthy(&http, &format!("{url}/health"), self.config.start_timeout)
                .await
                .context("auth-service did not become healthy")?;
            let pool = sqlx::PgPool::connect(&database)
                .await
                .context("the auth database")?;
            auth_service::seed(&pool).await?;
            pool.close().await;
            self.auth_url = Some(url);
        }
        for service in SERVICES {
            progress(&format!("starting {service}-service"));
            let url = self.start_service(service).await?;
            wait_healthy(&http, &format!("{url}/health"), self.config.start_timeout)
                .await
                .with_context(|| format!("{service}-service did not become healthy"))?;
            match service {
                "order" => self.order_url = url,
                "customer" => self.customer_url = url,
                "inventory" => self.inventory_url = url,
                _ => self.payment_url = url,
            }
        }
        for service in SERVICES {
            progress(&format!("starting the relay of the {service} database"));
            self.start_relay(service, &http).await?;
        }
        Ok(())
    }

    /// The port of the relay of `service`'s database.
    /// The HTTP address (`/health`, `/metrics`) of `service`'s relay.
    pub fn relay_url(&self, service: &str) -> String {
        format!("http://127.0.0.1:{}", self.relay_port(service))
    }

    fn relay_port(&self, service: &str) -> u16 {
        self.relay_ports.get(service).copied().unwrap_or(0)
    }

    /// The relays' dead-letter topic: the shop's own.
    fn relay_dead_letter_topic(&self) -> String {
        format!("{}outbox.dlq", self.config.prefix)
    }

    /// Every dead-letter topic of the shop: its consumers' and its relays'.
    fn dead_letter_topics(&self) -> Vec<String> {
        let mut topics: Vec<String> = SERVICES
            .iter()
            .map(|s| format!("{}{s}-service.dlq", self.config.prefix))
            .collect();
        topics.push(self.relay_dead_letter_topic());
        topics
    }

    /// The relays as the order service's console is told of them.
    fn console_relays(&self) -> Vec<order_service::ConsoleRelay> {
        SERVICES
            .iter()
            .map(|s| order_service::ConsoleRelay {
                name: format!("relay-{s}"),
                url: self.relay_url(s),
            })
            .collect()
    }

    fn common(&self, service: &str, listen: std::net::SocketAddr) -> CommonArgs {
        let mut common = CommonArgs::new(self.config.databases.of(service), &self.config.brokers);
        common.listen = Some(listen);
        common.topic_prefix = self.config.prefix.clone();
        if let Some(jwks) = self.jwks_url() {
            common.auth = service_kit::AuthArgs::jwks(jwks);
        }
        common
    }

    async fn start_service(&mut self, service: &'static str) -> anyhow::Result<String> {
        match self.config.mode.clone() {
            Mode::InProcess => {
                let common = self.common(service, ([127, 0, 0, 1], 0).into());
                let running = match service {
                    "customer" => {
                        customer_service::start(customer_service::Config::new(common)).await?
                    }
                    "inventory" => {
                        inventory_service::start(inventory_service::Config::new(common)).await?
                    }
                    "payment" => {
                        let mut config = payment_service::Config::new(common);
                        if let Some(limit) = self.config.charge_limit {
                            config.charge_limit = limit;
                        }
                        payment_service::start(config).await?
                    }
                    _ => {
                        let mut config = order_service::Config::new(common);
                        config.customer_url = self.customer_url.clone();
                        config.inventory_url = self.inventory_url.clone();
                        config.payment_url = self.payment_url.clone();
                        config.step_timeout_ms = millis(self.config.step_timeout);
                        if let Some(hold) = self.config.suspend_timeouts_for {
                            config.suspend_on = order_service::SuspendWhen::Timeouts;
                            config.suspend_for_s = hold.as_secs().max(1);
                        }
                        config.console_relays = self.console_relays();
                        config.console_dead_letter_topics = self.dead_letter_topics();
                        order_service::start(config).await?
                    }
                };
                let url = format!("http://{}", running.addr());
                self.components.push(Component::Service(service, running));
                Ok(url)
            }
            Mode::Processes { bin_dir, log_dir } => {
                let mut first = String::new();
                let instances = if service == "order" {
                    self.config.order_instances.max(1)
                } else {
                    1
                };
                for instance in 1..=instances {
                    let port = testkit::free_port();
                    let name = if instance == 1 {
                        format!("{service}-service")
                    } else {
                        format!("{service}-service-{instance}")
                    };
                    let mut env = vec![
                        (
                            "DATABASE_URL".to_owned(),
                            self.config.databases.of(service).to_owned(),
                        ),
                        ("KAFKA_BROKERS".to_owned(), self.config.brokers.clone()),
                        ("HTTP_LISTEN".to_owned(), format!("127.0.0.1:{port}")),
                        ("TOPIC_PREFIX".to_owned(), self.config.prefix.clone()),
                        (
                            "AUTH_JWKS_URL".to_owned(),
                            self.jwks_url().unwrap_or_default(),
                        ),
                        // Each process is a pod: its name stays across its
                        // restarts and differs between instances, as the pod's
                        // name does in `deploy/kubernetes`.
                        ("INSTANCE_NAME".to_owned(), name.clone()),
                    ];
                    match service {
                        "order" => env.extend([
                            ("CUSTOMER_SERVICE_URL".to_owned(), self.customer_url.clone()),
                            (
                                "INVENTORY_SERVICE_URL".to_owned(),
                                self.inventory_url.clone(),
                            ),
                            ("PAYMENT_SERVICE_URL".to_owned(), self.payment_url.clone()),
                            (
                                "SAGA_STEP_TIMEOUT_MS".to_owned(),
                                millis(self.config.step_timeout).to_string(),
                            ),
                            (
                                "CONSOLE_DEAD_LETTER_TOPICS".to_owned(),
                                self.dead_letter_topics().join(","),
                            ),
                            (
                                "CONSOLE_RELAYS".to_owned(),
                                self.console_relays()
                                    .iter()
                                    .map(|r| format!("{}={}", r.name, r.url))
                                    .collect::<Vec<_>>()
                                    .join(","),
                            ),
                        ]),
                        "payment" => {
                            if let Some(limit) = self.config.charge_limit {
                                env.push(("PAYMENT_CHARGE_LIMIT".to_owned(), limit.to_string()));
                            }
                        }
                        _ => {}
                    }
                    if let (Some(hold), "order") = (self.config.suspend_timeouts_for, service) {
                        env.push(("SAGA_SUSPEND_ON".to_owned(), "timeouts".to_owned()));
                        env.push((
                            "SAGA_SUSPEND_FOR_S".to_owned(),
                            hold.as_secs().max(1).to_string(),
                        ));
                    }
                    let url = format!("http://127.0.0.1:{port}");
                    self.spawn_process(
                        &name,
                        bin_dir.join(format!("{service}-service")),
                        vec!["serve".to_owned()],
                        env,
                        &log_dir,
                        format!("{url}/health"),
                    )?;
                    if instance == 1 {
                        first = url;
                    } else {
                        let http = reqwest::Client::new();
                        wait_healthy(&http, &format!("{url}/health"), self.config.start_timeout)
                            .await
                            .with_context(|| format!("{name} did not become healthy"))?;
                    }
                }
                Ok(first)
            }
        }
    }

    /// The auth service's JWKS, when it runs.
    fn jwks_url(&self) -> Option<String> {
        self.auth_url
            .as_ref()
            .map(|url| format!("{url}/.well-known/jwks.json"))
    }

    /// Starts the auth service on `database`; its base URL.
    async fn start_auth(&mut self, database: &str) -> anyhow::Result<String> {
        match self.config.mode.clone() {
            Mode::InProcess => {
                let mut config = auth_service::Config::new(database);
                config.listen = Some(([127, 0, 0, 1], 0).into());
                let running = auth_service::start(config).await?;
                let url = format!("http://{}", running.addr());
                self.components.push(Component::Service("auth", running));
                Ok(url)
            }
            Mode::Processes { bin_dir, log_dir } => {
                let port = testkit::free_port();
                let url = format!("http://127.0.0.1:{port}");
                let env = vec![
                    ("DATABASE_URL".to_owned(), database.to_owned()),
                    ("HTTP_LISTEN".to_owned(), format!("127.0.0.1:{port}")),
                ];
                self.spawn_process(
                    "auth-service",
                    bin_dir.join("auth-service"),
                    vec!["serve".to_owned()],
                    env,
                    &log_dir,
                    format!("{url}/health"),
                )?;
                Ok(url)
            }
        }
    }

    /// Starts a process and records how to start it again.
    fn spawn_process(
        &mut self,
        name: &str,
        program: PathBuf,
        args: Vec<String>,
        mut env: Vec<(String, String)>,
        log_dir: &std::path::Path,
        health: String,
    ) -> anyhow::Result<()> {
        if let Some(extra) = self.config.env.get(name) {
            env.extend(extra.iter().cloned());
        }
        let mut process = Process {
            name: name.to_owned(),
            program,
            args,
            env,
            log: log_dir.join(format!("{name}.log")),
            health,
            child: None,
            starts: 0,
        };
        process.spawn()?;
        self.components.push(Component::Process(Box::new(process)));
        Ok(())
    }

    async fn start_relay(
        &mut self,
        service: &'static str,
        http: &reqwest::Client,
    ) -> anyhow::Result<()> {
        let url = self.config.databases.of(service).to_owned();
        match self.config.mode.clone() {
            Mode::InProcess => {
                let mut config = RelayConfig::new(url, &self.config.brokers);
                config.outbox.topic_template = TopicTemplate::parse("{aggregatetype}")?;
                config.http.listen = Some(([127, 0, 0, 1], self.relay_port(service)).into());
                config.outbox.dead_letter_topic = Some(self.relay_dead_letter_topic());
                config.kafka.topic_partitions = 3;
                config.postgres.status_interval = Duration::from_millis(500);
                let (stop, mut stopped) = watch::channel(false);
                let join = tokio::spawn(async move {
                    let shutdown = async move {
                        let _ = stopped.wait_for(|s| *s).await;
                    };
                    outbox_relay::runner::run(config, shutdown)
                        .await
                        .map_err(|e| {
                            anyhow::anyhow!(
                                "relay of {service}: {}",
                                outbox_relay::runner::error_chain(&e)
                            )
                        })
                });
                self.components.push(Component::Relay(service, stop, join));
                Ok(())
            }
            Mode::Processes { bin_dir, log_dir } => {
                let port = self.relay_port(service);
                let env = [
                    ("OUTBOX_RELAY_POSTGRES_URL", url.as_str()),
                    ("OUTBOX_RELAY_KAFKA_BROKERS", &self.config.brokers),
                    ("OUTBOX_RELAY_TOPIC_TEMPLATE", "{aggregatetype}"),
                    ("OUTBOX_RELAY_TOPIC_PARTITIONS", "3"),
                    ("OUTBOX_RELAY_HTTP_LISTEN", &format!("127.0.0.1:{port}")),
                    (
                        "OUTBOX_RELAY_DEAD_LETTER_TOPIC",
                        &self.relay_dead_letter_topic(),
                    ),
                    // Its name in traces (when they are exported), unlike the other relays'.
                    ("OTEL_SERVICE_NAME", &format!("{service}-relay")),
                ]
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .to_vec();
                let health = format!("http://127.0.0.1:{port}/health");
                self.spawn_process(
                    &format!("relay-{service}"),
                    bin_dir.join("outbox-relay"),
                    Vec::new(),
                    env,
                    &log_dir,
                    health.clone(),
                )?;
                wait_healthy(http, &health, self.config.start_timeout)
                    .await
                    .with_context(|| {
                        format!("the relay of the {service} database did not become healthy")
                    })?;
                Ok(())
            }
        }
    }

    /// Stops everything, relays first (so nothing is left half-sent), then the
    /// services in reverse start order. Errors are logged, not returned: stopping
    /// goes on.
    pub async fn stop(&mut self) {
        let mut components = std::mem::take(&mut self.components);
        components.sort_by_key(|c| match c {
            Component::Relay(..) => 0,
            Component::Process(p) if p.name.starts_with("relay-") => 0,
            _ => 1,
        });
        for component in components {
            match component {
                Component::Service(name, running) => {
                    if let Err(e) = running.stop().await {
                        tracing::warn!(service = name, error = %e, "service stopped with an error");
                    }
                }
                Component::Relay(name, stop, join) => {
                    let _ = stop.send(true);
                    match join.await {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) => {
                            tracing::warn!(relay = name, error = %e, "relay stopped with an error")
                        }
                        Err(e) => tracing::warn!(relay = name, error = %e, "relay task failed"),
                    }
                }
                Component::Process(mut p) => {
                    if let Some(mut child) = p.child.take() {
                        terminate(&p.name, &mut child).await;
                    }
                }
            }
        }
    }
}

/// Controlling single processes (`Mode::Processes`): the faults of the scenarios.
impl Shop {
    /// Stops the in-process service `service` (`payment`, …; `Mode::InProcess`)
    /// for the rest of the shop's life: its commands wait on the broker, as when
    /// a participant is down.
    pub async fn stop_service(&mut self, service: &str) -> anyhow::Result<()> {
        let at = self
            .components
            .iter()
            .position(|c| matches!(c, Component::Service(name, _) if *name == service))
            .with_context(|| format!("no in-process service named {service}"))?;
        if let Component::Service(_, running) = self.components.remove(at) {
            running.stop().await?;
        }
        Ok(())
    }

    /// Starts the in-process service `service` stopped by [`Shop::stop_service`]
    /// again (on a new port) and waits until it is healthy.
    pub async fn start_service_again(&mut self, service: &'static str) -> anyhow::Result<()> {
        let url = self.start_service(service).await?;
        wait_healthy(
            &reqwest::Client::new(),
            &format!("{url}/health"),
            self.config.start_timeout,
        )
        .await?;
        match service {
            "order" => self.order_url = url,
            "customer" => self.customer_url = url,
            "inventory" => self.inventory_url = url,
            _ => self.payment_url = url,
        }
        Ok(())
    }

    fn process(&mut self, name: &str) -> anyhow::Result<&mut Process> {
        self.components
            .iter_mut()
            .find_map(|c| match c {
                Component::Process(p) if p.name == name => Some(&mut **p),
                _ => None,
            })
            .with_context(|| format!("no process named {name}"))
    }

    /// The names of the processes, in start order.
    pub fn process_names(&self) -> Vec<String> {
        self.components
            .iter()
            .filter_map(|c| match c {
                Component::Process(p) => Some(p.name.clone()),
                _ => None,
            })
            .collect()
    }

    /// The process id of `name` while it runs.
    pub fn pid(&mut self, name: &str) -> anyhow::Result<Option<u32>> {
        Ok(self.process(name)?.pid())
    }

    /// Sends `signal` (`KILL`, `STOP`, `CONT`, `TERM`) to `name`.
    pub fn signal(&mut self, name: &str, signal: &str) -> anyhow::Result<()> {
        let pid = self
            .process(name)?
            .pid()
            .with_context(|| format!("{name} is not running"))?;
        let status = std::process::Command::new("kill")
            .args([format!("-{signal}"), pid.to_string()])
            .status()?;
        if !status.success() {
            bail!("kill -{signal} {pid} ({name}) failed: {status}");
        }
        Ok(())
    }

    /// SIGKILLs `name` and waits until it is gone.
    pub async fn kill(&mut self, name: &str) -> anyhow::Result<()> {
        let process = self.process(name)?;
        if let Some(mut child) = process.child.take() {
            child.kill().await?;
        }
        Ok(())
    }

    /// Stops `name` gracefully (SIGTERM, SIGKILL after 20 s).
    pub async fn stop_process(&mut self, name: &str) -> anyhow::Result<()> {
        let process = self.process(name)?;
        if let Some(mut child) = process.child.take() {
            terminate(name, &mut child).await;
        }
        Ok(())
    }

    /// Waits until `name` exits on its own (a fault point killed it); its status.
    pub async fn wait_exit(
        &mut self,
        name: &str,
        timeout: Duration,
    ) -> anyhow::Result<std::process::ExitStatus> {
        let process = self.process(name)?;
        let child = process
            .child
            .as_mut()
            .with_context(|| format!("{name} is not running"))?;
        let status = tokio::time::timeout(timeout, child.wait())
            .await
            .with_context(|| format!("{name} still runs after {timeout:?}"))??;
        process.child = None;
        Ok(status)
    }

    /// Starts `name` again as it was started first (same port, same environment,
    /// minus the keys in `drop_env`, e.g. a fault point that already fired), and
    /// waits until it is healthy.
    pub async fn restart(&mut self, name: &str, drop_env: &[&str]) -> anyhow::Result<()> {
        let timeout = self.config.start_timeout;
        let process = self.process(name)?;
        if process.child.is_some() {
            bail!("{name} is still running");
        }
        process.env.retain(|(k, _)| !drop_env.contains(&k.as_str()));
        process.spawn()?;
        let health = process.health.clone();
        wait_healthy(&reqwest::Client::new(), &health, timeout)
            .await
            .with_context(|| format!("{name} did not become healthy after its restart"))
    }

    /// The `/health` URL of `name`, whose origin also serves `/metrics`.
    pub fn health_url(&mut self, name: &str) -> anyhow::Result<String> {
        Ok(self.process(name)?.health.clone())
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Starts `command` with its output in `log`: a new file, or, when `again` (the
/// same process started again after it was stopped or killed), after its
/// predecessor's last words instead of over them.
fn spawn_logged(mut command: Command, log: &std::path::Path, again: bool) -> anyhow::Result<Child> {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .append(again)
        .truncate(!again)
        .open(log)
        .with_context(|| format!("cannot open {}", log.display()))?;
    let program = command.as_std().get_program().to_owned();
    command
        .stdin(Stdio::null())
        .stdout(file.try_clone()?)
        .stderr(file)
        .kill_on_drop(true);
    let child = command
        .spawn()
        .with_context(|| format!("cannot start {}", PathBuf::from(program).display()))?;
    if let Some(pid) = child.id() {
        testkit::leftovers::record(pid);
    }
    Ok(child)
}

/// SIGTERM, then SIGKILL after 20 s.
async fn terminate(name: &str, child: &mut Child) {
    if let Some(pid) = child.id() {
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status();
    }
    match tokio::time::timeout(Duration::from_secs(20), child.wait()).await {
        Ok(Ok(status)) if status.success() => {}
        Ok(Ok(status)) => tracing::warn!(process = name, %status, "stopped with a failure status"),
        Ok(Err(e)) => tracing::warn!(process = name, error = %e, "cannot wait for it"),
        Err(_) => {
            tracing::warn!(process = name, "did not stop within 20 s; killing it");
            let _ = child.kill().await;
        }
    }
}

/// Polls `url` until it answers 200.
pub async fn wait_healthy(
    http: &reqwest::Client,
    url: &str,
    timeout: Duration,
) -> anyhow::Result<()> {
    let started = Instant::now();
    loop {
        let last = match http.get(url).timeout(Duration::from_secs(2)).send().await {
            Ok(r) if r.status().is_success() => return Ok(()),
            Ok(r) => format!("{} {}", r.status(), r.text().await.unwrap_or_default()),
            Err(e) => e.to_string(),
        };
        if started.elapsed() > timeout {
            bail!("{url} not healthy after {timeout:?}: {last}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
