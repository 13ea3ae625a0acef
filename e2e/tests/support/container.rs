//! What a container runs, checked against the Dockerfile and the workspace: shared by
//! the checks of docker-compose.yml (`tests/compose.rs`) and of the Kubernetes
//! manifests (`tests/kubernetes.rs`). Each deployment file is read into
//! [`Container`]s; each check returns what is wrong, one line per problem, naming
//! the container.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use clap::parser::ValueSource;
use clap::{Args as _, FromArgMatches as _};
use outbox_relay::config::{Args, RelayConfig};

use super::dockerfile::{basename, Dockerfile, BIN_DIR};
use super::workspace::{env_vars_read, flags_read, read, repo_root, routes_served, Workspace};

/// The subcommands every service binary has (services/README.md).
pub const SERVICE_SUBCOMMANDS: [&str; 3] = ["serve", "migrate", "seed"];
/// The relay's subcommands (relay/src/main.rs); without one it runs.
pub const RELAY_SUBCOMMANDS: [&str; 3] = ["run", "init", "check"];
/// The relay's package and binary.
pub const RELAY_BINARY: &str = "outbox-relay";
/// Where the service crates live; their shared options are in `services/kit`.
pub const SERVICES_DIR: &str = "services";
pub const SERVICE_KIT_SRC: &str = "services/kit/src";

/// Everything a deployment file is checked against.
pub struct Repo {
    pub root: PathBuf,
    pub workspace: Workspace,
    /// Dockerfiles by path, parsed as containers refer to them.
    pub dockerfiles: BTreeMap<PathBuf, Option<Dockerfile>>,
}

impl Repo {
    pub fn load() -> Repo {
        let root = repo_root();
        let workspace = Workspace::load(&root);
        let mut dockerfiles = BTreeMap::new();
        let default = root.join("Dockerfile");
        dockerfiles.insert(default.clone(), Some(Dockerfile::parse(&read(&default))));
        Repo {
            root,
            workspace,
            dockerfiles,
        }
    }

    pub fn dockerfile(&mut self, path: &Path) -> Option<&Dockerfile> {
        self.dockerfiles
            .entry(path.to_path_buf())
            .or_insert_with(|| fs::read_to_string(path).ok().map(|t| Dockerfile::parse(&t)))
            .as_ref()
    }

    pub fn relative(&self, path: &Path) -> String {
        path.strip_prefix(&self.root)
            .unwrap_or(path)
            .display()
            .to_string()
    }

    /// Source directories whose code runs in `program`: its package's and those of
    /// the workspace packages it depends on, and for a service the kit's.
    pub fn source_dirs(&self, program: &str, role: Role) -> Vec<PathBuf> {
        let Some(package) = self.workspace.package_of_binary(program) else {
            return Vec::new();
        };
        let mut dirs = self.workspace.source_dirs(package);
        if role == Role::Service {
            // The options all services share are the kit's.
            let kit = self.root.join(SERVICE_KIT_SRC);
            if !dirs.contains(&kit) {
                dirs.push(kit);
            }
        }
        dirs
    }

    fn shown(&self, dirs: &[PathBuf]) -> String {
        dirs.iter()
            .map(|d| self.relative(d))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// A shop service binary (a package under services/).
    Service,
    /// outbox-relay.
    Relay,
    /// Anything else: a pulled image, or a program these checks do not know.
    Other,
}

/// What a container runs, as far as its deployment file and the Dockerfile tell.
pub struct Container {
    /// How problems name it: "service `order`", "deployment `order`, container `relay`".
    pub who: String,
    /// The Dockerfile and stage its image is built from; `None` for an image built
    /// elsewhere.
    pub build: Option<(PathBuf, usize)>,
    /// The argv: ENTRYPOINT and CMD of the image as the file overrides them.
    pub argv: Vec<String>,
    /// Its environment; a value the file does not give (passed through from the host,
    /// or from a Secret that is not there) is `None`.
    pub env: BTreeMap<String, Option<String>>,
    pub role: Role,
}

impl Container {
    pub fn new(
        who: String,
        build: Option<(PathBuf, usize)>,
        argv: Vec<String>,
        env: BTreeMap<String, Option<String>>,
        repo: &Repo,
    ) -> Container {
        let role = match argv.first().map(|p| basename(p)) {
            Some(RELAY_BINARY) => Role::Relay,
            Some(program) => match repo.workspace.package_of_binary(program) {
                Some(p) if p.dir.starts_with(repo.root.join(SERVICES_DIR)) => Role::Service,
                _ => Role::Other,
            },
            None => Role::Other,
        };
        Container {
            who,
            build,
            argv,
            env,
            role,
        }
    }

    pub fn program(&self) -> Option<&str> {
        self.argv.first().map(|p| basename(p))
    }

    pub fn subcommand(&self) -> Option<&str> {
        self.argv
            .get(1)
            .map(String::as_str)
            .filter(|a| !a.starts_with('-'))
    }

    /// The arguments after the program and its subcommand.
    pub fn options(&self) -> &[String] {
        let skip = if self.subcommand().is_some() { 2 } else { 1 };
        self.argv.get(skip..).unwrap_or_default()
    }

    /// A long-running server rather than a one-shot job.
    pub fn serves(&self) -> bool {
        match self.role {
            Role::Service => matches!(self.subcommand(), None | Some("serve")),
            Role::Relay => matches!(self.subcommand(), None | Some("run")),
            Role::Other => false,
        }
    }

    pub fn env(&self, name: &str) -> Option<String> {
        self.env.get(name).cloned().flatten()
    }

    /// The variable that holds its database URL.
    pub fn database_variable(&self) -> &'static str {
        match self.role {
            Role::Relay => "OUTBOX_RELAY_POSTGRES_URL",
            _ => "DATABASE_URL",
        }
    }

    pub fn database_url(&self) -> Option<String> {
        match self.role {
            Role::Other => None,
            _ => self.env(self.database_variable()),
        }
    }
}

/// A YAML scalar as text.
pub fn scalar(value: &serde_yaml::Value) -> Option<String> {
    match value {
        serde_yaml::Value::String(s) => Some(s.clone()),
        serde_yaml::Value::Number(n) => Some(n.to_string()),
        serde_yaml::Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

/// A default that, inside a container, names the container itself.
pub fn is_loopback(value: &str) -> bool {
    ["localhost", "127.0.0.1", "[::1]"]
        .iter()
        .any(|host| value.contains(host))
}

/// `postgres://user:password@host:port/database?...` → (host, database).
pub fn parse_database_url(url: &str) -> Option<(String, String)> {
    let rest = url.split_once("://")?.1;
    let (authority, path) = rest.split_once('/')?;
    let host_port = authority.rsplit('@').next()?;
    let host = host_port.split(':').next()?.to_owned();
    let database = path.split('?').next()?.to_owned();
    Some((host, database))
}

pub fn quoted_list(names: &[&str]) -> String {
    names
        .iter()
        .map(|n| format!("`{n}`"))
        .collect::<Vec<_>>()
        .join(", ")
}

// ---------------------------------------------------------------------------------
// The checks of one container

/// The program is installed by the image's stage and built by the Dockerfile's
/// cargo; a subcommand is one the binary has.
pub fn check_image(container: &Container, repo: &Repo) -> Vec<String> {
    let mut problems = Vec::new();
    let Some((path, stage)) = &container.build else {
        return problems;
    };
    let who = &container.who;
    let file = repo.dockerfiles[path]
        .as_ref()
        .expect("a container with a build has a parsed Dockerfile");
    let stage_name = file.stages[*stage].name.as_deref().unwrap_or("(last)");
    let Some(program) = container.program() else {
        problems.push(format!(
            "{who}: has no command, and stage `{stage_name}` has no ENTRYPOINT or CMD"
        ));
        return problems;
    };
    let installed = file.binaries(*stage);
    if !installed.contains(program) {
        problems.push(format!(
            "{who}: runs `{program}`, which stage `{stage_name}` does not install in {BIN_DIR} \
             (it installs: {})",
            installed.iter().cloned().collect::<Vec<_>>().join(", ")
        ));
    } else if !file.cargo_bins.contains(program) {
        problems.push(format!(
            "{who}: runs `{program}`, which stage `{stage_name}` installs but no `cargo build \
             --bin {program}` in {} builds",
            repo.relative(path)
        ));
    }
    let subcommand = container.subcommand();
    match container.role {
        Role::Service => {
            if !subcommand.is_some_and(|s| SERVICE_SUBCOMMANDS.contains(&s)) {
                problems.push(format!(
                    "{who}: `{program}` needs a subcommand, one of {}; the command gives {:?}",
                    SERVICE_SUBCOMMANDS.join(", "),
                    subcommand.unwrap_or_default()
                ));
            }
        }
        Role::Relay => {
            if let Some(s) = subcommand.filter(|s| !RELAY_SUBCOMMANDS.contains(s)) {
                problems.push(format!(
                    "{who}: `{program}` has no subcommand `{s}` (it has {})",
                    RELAY_SUBCOMMANDS.join(", ")
                ));
            }
        }
        Role::Other => {}
    }
    problems
}

/// The program of a built container is a binary of a workspace package: a `[[bin]]`
/// or the package's `src/main.rs`, present in the tree.
pub fn check_binary(container: &Container, repo: &Repo) -> Vec<String> {
    let (Some(_), Some(program)) = (&container.build, container.program()) else {
        return Vec::new();
    };
    let who = &container.who;
    match repo.workspace.package_of_binary(program) {
        Some(p) if p.builds(program) => Vec::new(),
        Some(p) => vec![format!(
            "{who}: runs `{program}`, but package `{}` ({}) does not build it yet: {} does not \
             exist",
            p.name,
            repo.relative(&p.dir),
            repo.relative(&p.bins[program])
        )],
        None => vec![format!(
            "{who}: runs `{program}`, which no workspace package builds (no [[bin]] or package \
             of that name)"
        )],
    }
}

/// Binaries that parse a configuration of their own rather than the kit's
/// `CommonArgs`: the kit's variables (`KAFKA_BROKERS`, ...) are in their source
/// closure but never read, so their localhost defaults do not apply.
const OWN_CONFIGURATION: [&str; 1] = ["auth-service"];

/// Every environment variable set on a built container is one its binary reads, and
/// where it serves, every one it reads with a default at localhost is set.
pub fn check_environment(container: &Container, repo: &Repo) -> Vec<String> {
    let mut problems = Vec::new();
    let (Some(_), Some(program)) = (&container.build, container.program()) else {
        return problems;
    };
    if repo.workspace.package_of_binary(program).is_none() {
        return problems;
    }
    let who = &container.who;
    let dirs = repo.source_dirs(program, container.role);
    let read_by_binary = env_vars_read(&dirs);
    for name in container.env.keys() {
        if !read_by_binary.contains_key(name) {
            problems.push(format!(
                "{who}: environment variable `{name}` is not read by `{program}`: no `env = \
                 \"{name}\"` (nor an env::var or log filter reading it) in {}",
                repo.shown(&dirs)
            ));
        }
    }
    // What the binary would otherwise reach at localhost is, in a container, not
    // there: kafka, postgres and the other services have names of their own. A
    // one-shot job (`migrate`, `seed`) talks to its database only.
    if !container.serves() || OWN_CONFIGURATION.contains(&program) {
        return problems;
    }
    for (name, default) in &read_by_binary {
        if let Some(default) = default.as_deref().filter(|d| is_loopback(d)) {
            if !container.env.contains_key(name) {
                problems.push(format!(
                    "{who}: `{program}` reads `{name}`, whose default {default} is the \
                     container itself; set it to the address of a service of the file"
                ));
            }
        }
    }
    problems
}

/// The relay's flags, as its command line declares them.
pub fn relay_flags() -> BTreeSet<String> {
    let command = Args::augment_args(clap::Command::new(RELAY_BINARY));
    let mut flags: BTreeSet<String> = ["--help", "-h", "--version", "-V"]
        .map(str::to_owned)
        .into();
    for arg in command.get_arguments() {
        flags.extend(arg.get_long().map(|l| format!("--{l}")));
        flags.extend(arg.get_short().map(|s| format!("-{s}")));
    }
    flags
}

/// Every flag a built container passes is one its binary has: the relay's from its
/// command line itself, a service's from the clap attributes of its sources.
pub fn check_flags(container: &Container, repo: &Repo) -> Vec<String> {
    let (Some(_), Some(program)) = (&container.build, container.program()) else {
        return Vec::new();
    };
    let known = match container.role {
        Role::Relay => relay_flags(),
        Role::Service => flags_read(&repo.source_dirs(program, container.role)),
        Role::Other => return Vec::new(),
    };
    let mut problems = Vec::new();
    for option in container.options() {
        if option == "--" {
            break;
        }
        if !option.starts_with('-') {
            continue;
        }
        let flag = option.split('=').next().unwrap_or(option);
        if !known.contains(flag) {
            problems.push(format!(
                "{}: `{program}` has no flag `{flag}` (it has {})",
                container.who,
                known.iter().cloned().collect::<Vec<_>>().join(", ")
            ));
        }
    }
    problems
}

/// HTTP paths a container's program serves.
pub fn routes_of(container: &Container, repo: &Repo) -> BTreeSet<String> {
    match container.program() {
        Some(program) => routes_served(&repo.source_dirs(program, container.role)),
        None => BTreeSet::new(),
    }
}

// ---------------------------------------------------------------------------------
// The relay's configuration, resolved by the relay itself

/// The configuration the relay of `container` runs with: its flags, its environment
/// and its `--config` file, resolved and validated by the relay's own code
/// ([`RelayConfig::from_args`]). `files` holds the files the deployment mounts into
/// the container, by path. The test process's own environment plays no part.
pub fn relay_config(
    container: &Container,
    files: &BTreeMap<String, String>,
) -> Result<RelayConfig, String> {
    let with_env = Args::augment_args(clap::Command::new(RELAY_BINARY).no_binary_name(true));
    // The container's environment becomes flags: the command that parses them reads
    // no environment, so the test process's cannot leak in.
    let command = || {
        with_env
            .clone()
            .mut_args(|arg| arg.env(Option::<&'static str>::None))
    };
    let options = container.options().to_vec();
    let given = command()
        .try_get_matches_from(&options)
        .map_err(|e| e.to_string())?;
    let mut argv = options.clone();
    for arg in with_env.get_arguments() {
        let (Some(env), Some(long)) = (arg.get_env(), arg.get_long()) else {
            continue;
        };
        let Some(value) = env.to_str().and_then(|name| container.env(name)) else {
            continue;
        };
        if given.value_source(arg.get_id().as_str()) != Some(ValueSource::CommandLine) {
            argv.push(format!("--{long}={value}"));
        }
    }
    let matches = command()
        .try_get_matches_from(&argv)
        .map_err(|e| e.to_string())?;
    let mut args = Args::from_arg_matches(&matches).map_err(|e| e.to_string())?;
    // The file the container would read is written where the relay can read it
    // here, and named as the container names it in messages.
    let mut copied = None;
    if let Some(path) = &args.config {
        let shown = path.display().to_string();
        let Some(text) = files.get(&shown) else {
            return Err(format!(
                "reads its configuration from {shown}, which no mounted file provides"
            ));
        };
        let copy = scratch_file("relay.toml");
        fs::write(&copy, text).map_err(|e| format!("cannot write {}: {e}", copy.display()))?;
        args.config = Some(copy.clone());
        copied = Some((copy, shown));
    }
    let config = RelayConfig::from_args(&args).map_err(|e| {
        let message = outbox_relay::runner::error_chain(&e);
        match &copied {
            Some((copy, shown)) => message.replace(&copy.display().to_string(), shown),
            None => message,
        }
    });
    if let Some((copy, _)) = copied {
        let _ = fs::remove_file(copy);
    }
    config
}

/// A new file name in a folder of this process.
fn scratch_file(name: &str) -> PathBuf {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let dir = std::env::temp_dir().join(format!("outbox-e2e-{}", std::process::id()));
    fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
    dir.join(format!("{}-{name}", NEXT.fetch_add(1, Ordering::Relaxed)))
}

/// What relays on one database must agree on to share the work: relays configured
/// alike take the same slot, so one streams and the others stand by; relays that
/// differ take different slots (each publishing everything) or route differently
/// depending on which one streams.
pub fn relay_identity(config: &RelayConfig, database: &str) -> Identity {
    let postgres = &config.postgres;
    [
        ("slot", config.slot_name(database)),
        ("publication", postgres.publication.clone()),
        ("table", postgres.table.to_string()),
        ("snapshot mode", format!("{:?}", postgres.snapshot)),
        ("outbox routing", format!("{:?}", config.outbox)),
        ("kafka brokers", config.kafka.brokers.clone()),
    ]
    .into()
}

/// What relays of one database must agree on, by name.
pub type Identity = BTreeMap<&'static str, String>;

/// A relay, the database it streams and its configuration.
pub struct StreamingRelay {
    /// How problems name it.
    pub who: String,
    /// Host and database name.
    pub database: (String, String),
    pub config: RelayConfig,
}

/// Relays streaming one database to one kind of sink are configured alike, so that
/// they share its slot. A relay publishing the same outbox to another kind of sink
/// (NATS beside Kafka, say) is a publication of its own, with a slot of its own.
pub fn check_relays_alike(relays: &[StreamingRelay]) -> Vec<String> {
    /// Host, database and sink.
    type Publication<'a> = (&'a str, &'a str, &'a str);
    let mut by_database: BTreeMap<Publication<'_>, Vec<(&str, Identity)>> = BTreeMap::new();
    for relay in relays {
        let (host, database) = (&relay.database.0, &relay.database.1);
        by_database
            .entry((host, database, relay.config.sink.as_str()))
            .or_default()
            .push((&relay.who, relay_identity(&relay.config, database)));
    }
    let mut problems = Vec::new();
    for ((host, database, _), group) in by_database {
        let Some(((first, expected), rest)) = group.split_first() else {
            continue;
        };
        for (who, identity) in rest {
            for (what, value) in identity {
                if expected.get(what) != Some(value) {
                    problems.push(format!(
                        "{who} and {first} stream database `{database}` on `{host}` but differ \
                         in {what}: {value:?} against {:?}; relays of one database are \
                         configured alike (one streams, the others stand by)",
                        expected.get(what).cloned().unwrap_or_default()
                    ));
                }
            }
        }
    }
    problems
}

// ---------------------------------------------------------------------------------
// Checks that cannot fail are no checks: break a copy, expect the problem named

/// Applies `mutate` to a copy of `document` and expects `check` to report a problem
/// containing every part of `expect`, which it does not report for the unbroken one.
pub fn expect_problem<D: Clone, C>(
    context: &mut C,
    document: &D,
    check: impl Fn(&D, &mut C) -> Vec<String>,
    mutate: impl FnOnce(&mut D),
    expect: &[&str],
) {
    let matches = |problems: &[String]| {
        problems
            .iter()
            .any(|p| expect.iter().all(|part| p.contains(part)))
    };
    let before = check(document, context);
    assert!(
        !matches(&before),
        "the unbroken file already has a problem with {expect:?}: {before:#?}"
    );
    let mut broken = document.clone();
    mutate(&mut broken);
    let after = check(&broken, context);
    assert!(
        matches(&after),
        "no problem with {expect:?} reported for the broken file: {after:#?}"
    );
}
