//! docker-compose.yml, read against the Dockerfile and the workspace.
//!
//! Nothing here starts a container: the file is parsed and every name in it that
//! something else must agree with is looked up where it is defined. A build target
//! must be a stage of the Dockerfile; a command's program must be installed by that
//! stage and be a binary of a workspace package; an environment variable must be
//! one the binary reads (its clap `env = "..."` attributes and the logging filters,
//! found in the sources at test time, so a renamed flag shows up here), and one it
//! reads with a default at localhost, which in a container is the container itself,
//! must be set; a `depends_on` must name a service, and wait for health only where
//! there is a healthcheck; a relay must stream the database of the service it waits
//! for, a database that docker/postgres-init.sql creates; mounted files must exist;
//! host ports must not collide, and a healthcheck must probe the port its server
//! listens on. Each check is its own test and names the service and what is wrong
//! with it. Relays on one database are configured alike (one streams, the others
//! stand by): their configuration is resolved by the relay's own code and compared.
//! The last tests break a copy of the file in memory and expect the checks to say so.
//!
//! What these checks share with those of the Kubernetes manifests is in
//! `support/`: the workspace, the Dockerfile and what a container runs.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::ops::Deref;
use std::path::Path;

use serde_yaml::{Mapping, Value};
use support::container::{
    check_binary, check_environment as check_environment_of, check_flags, check_image,
    check_relays_alike, parse_database_url, quoted_list, relay_config, relay_flags, scalar,
    Container, Repo, Role, StreamingRelay,
};
use support::dockerfile::Dockerfile;
use support::workspace::{clap_default, flags_read, read, repo_root};

fn load_compose(root: &Path) -> Value {
    let path = root.join("docker-compose.yml");
    let mut value: Value = serde_yaml::from_str(&read(&path))
        .unwrap_or_else(|e| panic!("docker-compose.yml is not valid YAML: {e}"));
    resolve_merges(&mut value);
    value
}

/// Applies YAML merge keys (`<<: *anchor`, `<<: [*a, *b]`) the way Compose does:
/// keys of the mapping win over merged ones, earlier merged mappings over later ones,
/// and a merged mapping's own merge keys are applied first.
fn resolve_merges(value: &mut Value) {
    match value {
        Value::Mapping(mapping) => {
            if let Some(mut merged) = mapping.remove("<<") {
                resolve_merges(&mut merged);
                let sources = match merged {
                    Value::Sequence(items) => items,
                    other => vec![other],
                };
                for source in sources {
                    if let Value::Mapping(source) = source {
                        for (key, item) in source {
                            mapping.entry(key).or_insert(item);
                        }
                    }
                }
            }
            for item in mapping.values_mut() {
                resolve_merges(item);
            }
        }
        Value::Sequence(items) => items.iter_mut().for_each(resolve_merges),
        _ => {}
    }
}

/// `CREATE DATABASE name` / `CREATE DATABASE "name"` statements, names as the server
/// stores them (unquoted names fold to lower case).
fn created_databases(sql: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in sql.lines() {
        let line = line.split("--").next().unwrap_or_default();
        let words: Vec<&str> = line.split_whitespace().collect();
        for window in words.windows(3) {
            if window[0].eq_ignore_ascii_case("create")
                && window[1].eq_ignore_ascii_case("database")
            {
                let name = window[2].trim_end_matches(';');
                names.insert(match name.strip_prefix('"') {
                    Some(quoted) => quoted.trim_end_matches('"').to_owned(),
                    None => name.to_lowercase(),
                });
            }
        }
    }
    names
}

// ---------------------------------------------------------------------------------
// docker-compose.yml, service by service

/// A compose service: its definition, and the container it runs.
struct Resolved<'a> {
    name: String,
    def: &'a Value,
    container: Container,
}

impl Deref for Resolved<'_> {
    type Target = Container;

    fn deref(&self) -> &Container {
        &self.container
    }
}

impl Resolved<'_> {
    fn http_listen(&self) -> Option<String> {
        match self.role {
            Role::Service => self.env("HTTP_LISTEN"),
            Role::Relay => Some(
                self.env("OUTBOX_RELAY_HTTP_LISTEN")
                    .unwrap_or_else(|| outbox_relay::config::DEFAULT_HTTP_LISTEN.to_owned()),
            ),
            Role::Other => None,
        }
    }
}

/// A command or entrypoint: a list, or a string Compose splits on whitespace.
fn words(value: &Value) -> Option<Vec<String>> {
    match value {
        Value::Sequence(items) => Some(items.iter().filter_map(scalar).collect()),
        Value::String(s) => Some(s.split_whitespace().map(str::to_owned).collect()),
        _ => None,
    }
}

/// `environment:` as a mapping or as `NAME=value` items; a name without a value
/// (passed through from the host) maps to `None`.
fn environment(def: &Value) -> BTreeMap<String, Option<String>> {
    match def.get("environment") {
        Some(Value::Mapping(map)) => map
            .iter()
            .filter_map(|(k, v)| Some((scalar(k)?, scalar(v))))
            .collect(),
        Some(Value::Sequence(items)) => items
            .iter()
            .filter_map(scalar)
            .map(|item| match item.split_once('=') {
                Some((k, v)) => (k.to_owned(), Some(v.to_owned())),
                None => (item, None),
            })
            .collect(),
        _ => BTreeMap::new(),
    }
}

/// `depends_on:` as `(service, condition)`; the list form means `service_started`.
fn depends_on(def: &Value) -> Vec<(String, String)> {
    match def.get("depends_on") {
        Some(Value::Sequence(items)) => items
            .iter()
            .filter_map(scalar)
            .map(|s| (s, "service_started".to_owned()))
            .collect(),
        Some(Value::Mapping(map)) => map
            .iter()
            .filter_map(|(k, v)| {
                let condition = v
                    .get("condition")
                    .and_then(scalar)
                    .unwrap_or_else(|| "service_started".to_owned());
                Some((scalar(k)?, condition))
            })
            .collect(),
        _ => Vec::new(),
    }
}

fn has_healthcheck(def: &Value) -> bool {
    let Some(check) = def.get("healthcheck") else {
        return false;
    };
    let disabled = check.get("disable").and_then(Value::as_bool) == Some(true);
    let test = check.get("test").and_then(words).unwrap_or_default();
    !disabled && !test.is_empty() && test[0] != "NONE"
}

fn services(compose: &Value) -> Vec<(String, &Value)> {
    compose
        .get("services")
        .and_then(Value::as_mapping)
        .map(|m: &Mapping| {
            m.iter()
                .filter_map(|(k, v)| Some((scalar(k)?, v)))
                .collect()
        })
        .unwrap_or_default()
}

/// Resolves every service. Problems that make a service's image unknowable (no such
/// Dockerfile or stage) are returned; the other checks skip such a service.
fn resolve<'a>(compose: &'a Value, repo: &mut Repo) -> (Vec<Resolved<'a>>, Vec<String>) {
    let mut resolved = Vec::new();
    let mut problems = Vec::new();
    for (name, def) in services(compose) {
        let mut build = None;
        let mut argv = Vec::new();
        if let Some(spec) = def.get("build") {
            let (context, dockerfile, target) = match spec {
                Value::String(context) => (context.clone(), None, None),
                _ => (
                    spec.get("context")
                        .and_then(scalar)
                        .unwrap_or_else(|| ".".to_owned()),
                    spec.get("dockerfile").and_then(scalar),
                    spec.get("target").and_then(scalar),
                ),
            };
            let context = repo.root.join(context);
            if !context.is_dir() {
                problems.push(format!(
                    "service `{name}`: build context {} is not a directory",
                    repo.relative(&context)
                ));
                continue;
            }
            let path = context.join(dockerfile.as_deref().unwrap_or("Dockerfile"));
            let shown = repo.relative(&path);
            let Some(file) = repo.dockerfile(&path) else {
                problems.push(format!("service `{name}`: there is no Dockerfile {shown}"));
                continue;
            };
            let Some(stage) = file.stage(target.as_deref()) else {
                problems.push(format!(
                    "service `{name}`: build target `{}` is no stage of {shown} \
                     (`FROM ... AS <target>`; its stages: {})",
                    target.as_deref().unwrap_or_default(),
                    file.stage_names().join(", ")
                ));
                continue;
            };
            let entrypoint = def.get("entrypoint").and_then(words);
            let command = def.get("command").and_then(words);
            argv = file.argv(stage, entrypoint, command);
            build = Some((path, stage));
        }
        let who = format!("service `{name}`");
        let container = Container::new(who, build, argv, environment(def), repo);
        resolved.push(Resolved {
            name,
            def,
            container,
        });
    }
    (resolved, problems)
}

// ---------------------------------------------------------------------------------
// The checks: each returns what is wrong, one line per problem

/// Build targets exist; the program each built service runs is installed by its
/// stage and built by the Dockerfile's cargo; subcommands are ones the binary has.
fn check_images(compose: &Value, repo: &mut Repo) -> Vec<String> {
    let (resolved, mut problems) = resolve(compose, repo);
    let mut images: BTreeMap<String, (String, Option<&Value>)> = BTreeMap::new();
    for service in &resolved {
        // Services that share an image tag must build the same thing, or the last
        // build overwrites the image the others run.
        if let Some(image) = service.def.get("image").and_then(scalar) {
            let build = service.def.get("build");
            match images.get(&image) {
                Some((other, other_build)) if build.is_some() && *other_build != build => {
                    problems.push(format!(
                        "service `{}`: image `{image}` is also built by `{other}`, differently",
                        service.name
                    ));
                }
                _ => {
                    images.insert(image, (service.name.clone(), build));
                }
            }
        }
        problems.extend(check_image(service, repo));
    }
    problems
}

/// The program of every built service is a binary of a workspace package: a
/// `[[bin]]` or the package's `src/main.rs`, present in the tree.
fn check_binaries(compose: &Value, repo: &mut Repo) -> Vec<String> {
    let (resolved, _) = resolve(compose, repo);
    resolved
        .iter()
        .flat_map(|s| check_binary(s, repo))
        .collect()
}

/// Every environment variable set on a built service is one its binary reads, and
/// every one it reads with a default at localhost is set; every flag it passes is one
/// its binary has.
fn check_environment(compose: &Value, repo: &mut Repo) -> Vec<String> {
    let (resolved, _) = resolve(compose, repo);
    resolved
        .iter()
        .flat_map(|s| [check_environment_of(s, repo), check_flags(s, repo)].concat())
        .collect()
}

/// Every relay's configuration is one the relay accepts, and relays that stream one
/// database are configured alike, so that they share its slot: one streams, the
/// others stand by.
fn check_relays(compose: &Value, repo: &mut Repo) -> Vec<String> {
    let (resolved, _) = resolve(compose, repo);
    let mut problems = Vec::new();
    let mut relays = Vec::new();
    for relay in resolved
        .iter()
        .filter(|s| s.role == Role::Relay && s.serves())
    {
        match relay_config(relay, &BTreeMap::new()) {
            Ok(config) => {
                if let Some(database) = parse_database_url(config.postgres.url.expose()) {
                    relays.push(StreamingRelay {
                        who: relay.who.clone(),
                        database,
                        config,
                    });
                }
            }
            Err(e) => problems.push(format!(
                "{}: the relay refuses its configuration: {e}",
                relay.who
            )),
        }
    }
    problems.extend(check_relays_alike(&relays));
    problems
}

/// Every `depends_on` names a service of the file, and waits for health only where
/// there is a healthcheck.
fn check_dependencies(compose: &Value, _repo: &mut Repo) -> Vec<String> {
    let all: BTreeMap<String, &Value> = services(compose).into_iter().collect();
    let mut problems = Vec::new();
    for (name, def) in &all {
        for (target, condition) in depends_on(def) {
            let Some(target_def) = all.get(&target) else {
                problems.push(format!(
                    "service `{name}`: depends on `{target}`, which is not a service of the file"
                ));
                continue;
            };
            match condition.as_str() {
                "service_healthy" if !has_healthcheck(target_def) => problems.push(format!(
                    "service `{name}`: waits for `{target}` to be healthy (condition: \
                     service_healthy), but `{target}` has no healthcheck"
                )),
                "service_healthy" | "service_started" | "service_completed_successfully" => {}
                other => problems.push(format!(
                    "service `{name}`: depends on `{target}` with unknown condition `{other}`"
                )),
            }
        }
    }
    problems
}

/// The databases docker/postgres-init.sql creates.
fn postgres_databases(repo: &Repo) -> BTreeSet<String> {
    created_databases(&read(&repo.root.join("docker/postgres-init.sql")))
}

/// Each service has a database of its own (shared only by replicas of the service:
/// the same program), created by docker/postgres-init.sql, on a server it waits
/// for; beside each serving service is exactly one relay, which streams that same
/// database and starts after the service is healthy.
/// Programs that write no events, so no relay streams their database.
const WITHOUT_OUTBOX: [&str; 1] = ["auth-service"];

fn check_databases(compose: &Value, repo: &mut Repo) -> Vec<String> {
    let databases = postgres_databases(repo);
    let (resolved, _) = resolve(compose, repo);
    let by_name: BTreeMap<&str, &Resolved> =
        resolved.iter().map(|s| (s.name.as_str(), s)).collect();
    let mut problems = Vec::new();
    // database → the serving services (replicas) on it, with their programs
    let mut owners: BTreeMap<String, Vec<(&str, &str)>> = BTreeMap::new();
    // (serving service, sink) → the relays beside it publishing to that kind of sink
    let mut sidecars: BTreeMap<(&str, &str), Vec<&str>> = BTreeMap::new();
    for service in &resolved {
        if service.role == Role::Other {
            continue;
        }
        let variable = service.database_variable();
        let Some(url) = service.database_url() else {
            problems.push(format!("service `{}`: sets no {variable}", service.name));
            continue;
        };
        let Some((host, database)) = parse_database_url(&url) else {
            problems.push(format!(
                "service `{}`: {variable} {url:?} is not postgres://user:password@host:port/database",
                service.name
            ));
            continue;
        };
        if !databases.contains(&database) {
            problems.push(format!(
                "service `{}`: {variable} names database `{database}`, which \
                 docker/postgres-init.sql does not create (it creates: {})",
                service.name,
                databases.iter().cloned().collect::<Vec<_>>().join(", ")
            ));
        }
        let deps = depends_on(service.def);
        if !deps
            .iter()
            .any(|(t, c)| *t == host && c == "service_healthy")
        {
            problems.push(format!(
                "service `{}`: connects to `{host}` but does not wait for it to be healthy",
                service.name
            ));
        }
        if !service.serves() {
            continue;
        }
        match service.role {
            Role::Service => owners
                .entry(database)
                .or_default()
                .push((&service.name, service.program().unwrap_or_default())),
            Role::Relay => {
                // The service it sits beside: the serving service it waits for.
                let beside: Vec<&Resolved> = deps
                    .iter()
                    .filter_map(|(t, _)| by_name.get(t.as_str()).copied())
                    .filter(|s| s.role == Role::Service && s.serves())
                    .collect();
                match beside.as_slice() {
                    [owner] => {
                        // A relay per replica and sink: NATS beside Kafka is a
                        // publication of its own, not a second streaming relay.
                        let sink = relay_config(service, &BTreeMap::new())
                            .map_or("kafka", |config| config.sink.as_str());
                        sidecars
                            .entry((owner.name.as_str(), sink))
                            .or_default()
                            .push(&service.name);
                        let owner_db = owner
                            .database_url()
                            .and_then(|u| parse_database_url(&u))
                            .map(|(_, db)| db);
                        if owner_db.as_deref() != Some(database.as_str()) {
                            problems.push(format!(
                                "service `{}`: streams database `{database}`, but the service \
                                 it waits for, `{}`, uses `{}`",
                                service.name,
                                owner.name,
                                owner_db.unwrap_or_default()
                            ));
                        }
                        if !deps
                            .iter()
                            .any(|(t, c)| *t == owner.name && c == "service_healthy")
                        {
                            problems.push(format!(
                                "service `{}`: must wait for `{}` to be healthy (it migrates \
                                 the outbox table the relay's first start needs)",
                                service.name, owner.name
                            ));
                        }
                    }
                    [] => problems.push(format!(
                        "service `{}`: waits for no service, so it may start before the \
                         outbox table of `{database}` exists",
                        service.name
                    )),
                    many => {
                        problems.push(format!(
                        "service `{}`: waits for several services ({}); a relay sits beside one",
                        service.name,
                        many.iter().map(|s| s.name.as_str()).collect::<Vec<_>>().join(", ")
                    ))
                    }
                }
            }
            Role::Other => {}
        }
    }
    for (database, services) in &owners {
        let programs: BTreeSet<&str> = services.iter().map(|(_, program)| *program).collect();
        if programs.len() > 1 {
            let names: Vec<&str> = services.iter().map(|(name, _)| *name).collect();
            problems.push(format!(
                "services {} share database `{database}`; each service owns its own (only \
                 replicas of one service, running the same program, share it)",
                quoted_list(&names)
            ));
        }
        for (name, program) in services {
            if WITHOUT_OUTBOX.contains(program) {
                continue;
            }
            let beside: Vec<(&str, &Vec<&str>)> = sidecars
                .iter()
                .filter(|((owner, _), _)| owner == name)
                .map(|((_, sink), relays)| (*sink, relays))
                .collect();
            if beside.is_empty() {
                problems.push(format!(
                    "service `{name}`: no relay sits beside it (waits for it) to stream its \
                     database `{database}`"
                ));
            }
            for (sink, relays) in beside {
                if relays.len() > 1 {
                    problems.push(format!(
                        "service `{name}`: relays {} all sit beside it, publishing to {sink}; \
                         one relay per replica and sink",
                        quoted_list(relays)
                    ));
                }
            }
        }
    }
    problems
}

/// Bind mounts and env files exist; named volumes are declared.
fn check_mounts(compose: &Value, repo: &mut Repo) -> Vec<String> {
    let declared: BTreeSet<String> = compose
        .get("volumes")
        .and_then(Value::as_mapping)
        .map(|m| m.keys().filter_map(scalar).collect())
        .unwrap_or_default();
    let mut problems = Vec::new();
    for (name, def) in services(compose) {
        let mounts = def
            .get("volumes")
            .and_then(Value::as_sequence)
            .cloned()
            .unwrap_or_default();
        for mount in &mounts {
            let (kind, source) = match mount {
                Value::String(short) => {
                    let source = short.split(':').next().unwrap_or_default().to_owned();
                    let bind = source.starts_with(['.', '/', '~']);
                    (if bind { "bind" } else { "volume" }, source)
                }
                _ => (
                    mount
                        .get("type")
                        .and_then(Value::as_str)
                        .unwrap_or("volume"),
                    mount.get("source").and_then(scalar).unwrap_or_default(),
                ),
            };
            match kind {
                "bind" => {
                    let path = repo.root.join(&source);
                    if !path.exists() {
                        problems.push(format!(
                            "service `{name}`: mounts {source}, which does not exist in the repository"
                        ));
                    }
                }
                "volume" if !source.is_empty() && !declared.contains(&source) => {
                    problems.push(format!(
                        "service `{name}`: mounts volume `{source}`, which the top-level \
                         `volumes:` does not declare"
                    ));
                }
                _ => {}
            }
        }
        let env_files = match def.get("env_file") {
            Some(value) => words(value).unwrap_or_default(),
            None => Vec::new(),
        };
        for file in env_files {
            if !repo.root.join(&file).is_file() {
                problems.push(format!(
                    "service `{name}`: env_file {file} does not exist in the repository"
                ));
            }
        }
    }
    problems
}

/// `[ip:]host:container[/proto]` or the long form → (host port, container port);
/// no host port when only the container's is given.
fn parse_port(port: &Value) -> Option<(Option<u16>, u16)> {
    match port {
        Value::Mapping(_) => {
            let target = port.get("target").and_then(scalar)?.parse().ok()?;
            let published = port
                .get("published")
                .and_then(scalar)
                .and_then(|p| p.parse().ok());
            Some((published, target))
        }
        _ => {
            let text = scalar(port)?;
            let text = text.split('/').next()?;
            let parts: Vec<&str> = text.rsplitn(3, ':').collect();
            let container = parts.first()?.parse().ok()?;
            let host = parts.get(1).and_then(|h| h.parse().ok());
            Some((host, container))
        }
    }
}

/// Host ports are distinct; a server's healthcheck probes the port it listens on,
/// which is the one published.
fn check_ports(compose: &Value, repo: &mut Repo) -> Vec<String> {
    let (resolved, _) = resolve(compose, repo);
    let mut problems = Vec::new();
    let mut taken: BTreeMap<u16, String> = BTreeMap::new();
    for (name, def) in services(compose) {
        for port in def
            .get("ports")
            .and_then(Value::as_sequence)
            .into_iter()
            .flatten()
        {
            match parse_port(port) {
                Some((Some(host), _)) => {
                    if let Some(other) = taken.insert(host, name.clone()) {
                        problems.push(format!(
                            "service `{name}`: publishes host port {host}, which `{other}` \
                             publishes too"
                        ));
                    }
                }
                Some((None, _)) => {}
                None => problems.push(format!(
                    "service `{name}`: cannot read port mapping {port:?}"
                )),
            }
        }
    }
    for service in resolved.iter().filter(|s| s.serves()) {
        let Some(listen) = service.http_listen() else {
            continue;
        };
        let Some(port) = listen
            .rsplit(':')
            .next()
            .and_then(|p| p.parse::<u16>().ok())
        else {
            problems.push(format!(
                "service `{}`: cannot read the port of its HTTP address {listen:?}",
                service.name
            ));
            continue;
        };
        let test = service
            .def
            .get("healthcheck")
            .and_then(|h| h.get("test"))
            .and_then(words)
            .unwrap_or_default()
            .join(" ");
        if !test.contains(&format!(":{port}/health")) {
            problems.push(format!(
                "service `{}`: listens on {listen} but its healthcheck ({test:?}) does not \
                 probe :{port}/health",
                service.name
            ));
        }
        let published: Vec<u16> = service
            .def
            .get("ports")
            .and_then(Value::as_sequence)
            .into_iter()
            .flatten()
            .filter_map(parse_port)
            .map(|(_, container)| container)
            .collect();
        if !published.is_empty() && !published.contains(&port) {
            problems.push(format!(
                "service `{}`: listens on port {port} but publishes container ports {published:?}",
                service.name
            ));
        }
    }
    problems
}

// ---------------------------------------------------------------------------------
// The tests

type Check = fn(&Value, &mut Repo) -> Vec<String>;

fn assert_clean(check: Check, what: &str) {
    let mut repo = Repo::load();
    let compose = load_compose(&repo.root);
    let problems = check(&compose, &mut repo);
    assert!(
        problems.is_empty(),
        "docker-compose.yml: {what}:\n  {}",
        problems.join("\n  ")
    );
}

#[test]
fn build_targets_commands_and_subcommands_match_the_dockerfile() {
    assert_clean(check_images, "images and commands");
}

#[test]
fn every_command_runs_a_binary_of_the_workspace() {
    assert_clean(check_binaries, "binaries");
}

#[test]
fn every_environment_variable_is_read_by_its_binary() {
    assert_clean(check_environment, "environment");
}

#[test]
fn dependencies_name_services_and_wait_only_for_healthchecks() {
    assert_clean(check_dependencies, "depends_on");
}

#[test]
fn each_service_and_its_relay_share_a_database_of_its_own() {
    assert_clean(check_databases, "databases");
}

#[test]
fn relays_accept_their_configuration_and_those_of_one_database_share_its_slot() {
    assert_clean(check_relays, "relays");
}

#[test]
fn mounted_files_exist_and_volumes_are_declared() {
    assert_clean(check_mounts, "mounts");
}

#[test]
fn host_ports_are_distinct_and_healthchecks_probe_the_listening_port() {
    assert_clean(check_ports, "ports");
}

/// The file is what the checks expect to read: otherwise they could pass by
/// finding nothing to check.
#[test]
fn the_file_has_the_shop() {
    let mut repo = Repo::load();
    let compose = load_compose(&repo.root);
    let (resolved, _) = resolve(&compose, &mut repo);
    // What `docker compose up` starts: services of no profile.
    let servers = |role| {
        resolved
            .iter()
            .filter(|s| s.role == role && s.serves() && s.def.get("profiles").is_none())
            .count()
    };
    let programs: BTreeSet<&str> = resolved
        .iter()
        .filter(|s| s.role == Role::Service && s.serves())
        .filter_map(|s| s.program())
        .collect();
    assert_eq!(
        programs.len(),
        5,
        "four services and the auth service serve: {programs:?}"
    );
    assert_eq!(servers(Role::Service), 6, "one of them twice");
    assert_eq!(
        servers(Role::Relay),
        5,
        "a relay beside each but the auth service"
    );
    let seeds = resolved
        .iter()
        .filter(|s| s.role == Role::Service && s.subcommand() == Some("seed"))
        .count();
    assert!(seeds > 0, "demo data is seeded");
    assert_eq!(
        postgres_databases(&repo),
        ["order", "customer", "payment", "inventory", "auth"]
            .map(str::to_owned)
            .into(),
        "docker/postgres-init.sql creates a database per service"
    );
}

// ---------------------------------------------------------------------------------
// The checks catch what they are for: break a copy, expect the problem named

fn service_mut<'a>(compose: &'a mut Value, name: &str) -> &'a mut Mapping {
    compose["services"][name]
        .as_mapping_mut()
        .unwrap_or_else(|| panic!("docker-compose.yml has a service `{name}`"))
}

/// Applies `mutate` to a copy of the file and expects `check` to report a problem
/// containing every part of `expect` that the unbroken file does not have.
fn expect_problem(check: Check, mutate: impl FnOnce(&mut Value), expect: &[&str]) {
    let mut repo = Repo::load();
    let compose = load_compose(&repo.root);
    support::container::expect_problem(&mut repo, &compose, check, mutate, expect);
}

#[test]
fn an_unknown_environment_variable_is_reported() {
    expect_problem(
        check_environment,
        |c| {
            service_mut(c, "order")["environment"]
                .as_mapping_mut()
                .expect("order has an environment")
                .insert("DATABSE_URL".into(), "postgres://x/y".into());
        },
        &["`order`", "`DATABSE_URL`", "order-service"],
    );
    // A service variable on a relay is no relay variable.
    expect_problem(
        check_environment,
        |c| {
            service_mut(c, "relay-customer")["environment"]
                .as_mapping_mut()
                .expect("relay-customer has an environment")
                .insert("KAFKA_BROKERS".into(), "kafka:9092".into());
        },
        &["`relay-customer`", "`KAFKA_BROKERS`", "outbox-relay"],
    );
    // Left unset, the brokers default to localhost: the container itself.
    expect_problem(
        check_environment,
        |c| {
            service_mut(c, "customer")["environment"]
                .as_mapping_mut()
                .expect("customer has an environment")
                .remove("KAFKA_BROKERS");
        },
        &["`customer`", "`KAFKA_BROKERS`", "localhost:9092"],
    );
}

#[test]
fn a_missing_dependency_is_reported() {
    expect_problem(
        check_dependencies,
        |c| {
            service_mut(c, "relay-order")["depends_on"]
                .as_mapping_mut()
                .expect("relay-order depends on services")
                .insert(
                    "order-db".into(),
                    serde_yaml::from_str("{condition: service_healthy}").unwrap(),
                );
        },
        &["`relay-order`", "`order-db`", "not a service"],
    );
}

#[test]
fn waiting_for_health_without_a_healthcheck_is_reported() {
    expect_problem(
        check_dependencies,
        |c| {
            service_mut(c, "order").remove("healthcheck");
        },
        &["`relay-order`", "`order`", "no healthcheck"],
    );
}

#[test]
fn an_unknown_build_target_binary_or_subcommand_is_reported() {
    expect_problem(
        check_images,
        |c| {
            service_mut(c, "payment")["build"]["target"] = "server".into();
        },
        &["`payment`", "`server`", "no stage"],
    );
    expect_problem(
        check_images,
        |c| {
            service_mut(c, "relay-payment")["build"]["target"] = "relay".into();
            service_mut(c, "relay-payment").insert(
                "command".into(),
                serde_yaml::from_str("[payment-service, serve]").unwrap(),
            );
            service_mut(c, "relay-payment").insert(
                "entrypoint".into(),
                serde_yaml::from_str("[payment-service]").unwrap(),
            );
        },
        &["`relay-payment`", "`payment-service`", "does not install"],
    );
    expect_problem(
        check_images,
        |c| {
            service_mut(c, "inventory")["command"] =
                serde_yaml::from_str("[inventory-service, start]").unwrap();
        },
        &["`inventory`", "serve, migrate, seed", "start"],
    );
    expect_problem(
        check_binaries,
        |c| {
            service_mut(c, "customer")["command"] =
                serde_yaml::from_str("[shop-service, serve]").unwrap();
        },
        &["`customer`", "`shop-service`", "no workspace package"],
    );
}

#[test]
fn a_relay_on_another_database_than_its_service_is_reported() {
    expect_problem(
        check_databases,
        |c| {
            service_mut(c, "relay-inventory")["environment"]["OUTBOX_RELAY_POSTGRES_URL"] =
                "postgres://outbox:outbox@postgres:5432/payment".into();
        },
        &["`relay-inventory`", "`payment`", "`inventory`"],
    );
    expect_problem(
        check_databases,
        |c| {
            service_mut(c, "customer")["environment"]["DATABASE_URL"] =
                "postgres://outbox:outbox@postgres:5432/customers".into();
        },
        &["`customer`", "`customers`", "postgres-init.sql"],
    );
    expect_problem(
        check_databases,
        |c| {
            service_mut(c, "payment")["environment"]["DATABASE_URL"] =
                "postgres://outbox:outbox@postgres:5432/order".into();
        },
        &["`order`", "`payment`", "share database"],
    );
}

#[test]
fn an_unknown_flag_is_reported() {
    expect_problem(
        check_environment,
        |c| {
            service_mut(c, "relay-order").insert(
                "command".into(),
                serde_yaml::from_str("[run, --configuration, /etc/relay.toml]").unwrap(),
            );
        },
        &["`relay-order`", "no flag `--configuration`", "--config"],
    );
    expect_problem(
        check_environment,
        |c| {
            service_mut(c, "payment")["command"] =
                serde_yaml::from_str("[payment-service, serve, --charge-limt=10]").unwrap();
        },
        &["`payment`", "no flag `--charge-limt`", "--charge-limit"],
    );
}

#[test]
fn relays_of_one_database_configured_apart_or_refused_are_reported() {
    // Another slot: both relays would stream, each publishing every row.
    expect_problem(
        check_relays,
        |c| {
            service_mut(c, "relay-inventory-2")["environment"]
                .as_mapping_mut()
                .expect("relay-inventory-2 has an environment")
                .insert("OUTBOX_RELAY_SLOT".into(), "inventory_2".into());
        },
        &[
            "`relay-inventory-2`",
            "`relay-inventory`",
            "slot",
            "inventory_2",
        ],
    );
    // Another topic template: what is published would depend on who streams.
    expect_problem(
        check_relays,
        |c| {
            service_mut(c, "relay-inventory")["environment"]["OUTBOX_RELAY_TOPIC_TEMPLATE"] =
                "shop.{aggregatetype}".into();
        },
        &["`relay-inventory`", "outbox routing", "shop."],
    );
    // A value the relay refuses at start.
    expect_problem(
        check_relays,
        |c| {
            service_mut(c, "relay-payment")["environment"]
                .as_mapping_mut()
                .expect("relay-payment has an environment")
                .insert(
                    "OUTBOX_RELAY_STANDBY_POLL_INTERVAL_MS".into(),
                    "soon".into(),
                );
        },
        &["`relay-payment`", "refuses its configuration", "soon"],
    );
    // A replica without a relay of its own.
    expect_problem(
        check_databases,
        |c| {
            service_mut(c, "relay-inventory-2")["depends_on"]
                .as_mapping_mut()
                .expect("relay-inventory-2 depends on services")
                .remove("inventory-2");
            service_mut(c, "relay-inventory-2")["depends_on"]
                .as_mapping_mut()
                .expect("relay-inventory-2 depends on services")
                .insert(
                    "inventory".into(),
                    serde_yaml::from_str("{condition: service_healthy}").unwrap(),
                );
        },
        &["`inventory-2`", "no relay sits beside it"],
    );
}

#[test]
fn a_missing_mounted_file_and_a_port_clash_are_reported() {
    expect_problem(
        check_mounts,
        |c| {
            service_mut(c, "postgres")["volumes"][0] =
                "./docker/init.sql:/docker-entrypoint-initdb.d/10-databases.sql:ro".into();
        },
        &["`postgres`", "./docker/init.sql", "does not exist"],
    );
    expect_problem(
        check_ports,
        |c| {
            service_mut(c, "relay-order")["ports"][0] = "8080:9187".into();
        },
        &["8080", "`order`", "`relay-order`"],
    );
    // The second replica on the first one's host port.
    expect_problem(
        check_ports,
        |c| {
            service_mut(c, "inventory-2")["ports"][0] = "8082:8082".into();
        },
        &["8082", "`inventory`", "`inventory-2`"],
    );
    expect_problem(
        check_ports,
        |c| {
            service_mut(c, "payment")["environment"]["HTTP_LISTEN"] = "0.0.0.0:9000".into();
        },
        &["`payment`", "0.0.0.0:9000", "healthcheck"],
    );
}

#[test]
fn the_parsers_read_what_the_files_may_say() {
    let file = Dockerfile::parse(
        "# syntax=docker/dockerfile:1\nFROM rust AS build\nRUN cargo build \\\n    --bin a --bin=b\n\
         FROM debian AS base\nCOPY --from=build /out/a \\\n  /out/b /usr/local/bin/\n\
         FROM base AS one\nCOPY --from=build /out/c /usr/local/bin/c\nENTRYPOINT [\"c\"]\n\
         FROM base\nCMD a serve\n",
    );
    assert_eq!(file.stage_names(), ["build", "base", "one"]);
    assert_eq!(file.cargo_bins, ["a", "b"].map(str::to_owned).into());
    let one = file.stage(Some("one")).unwrap();
    assert_eq!(
        file.binaries(one),
        ["a", "b", "c"].map(str::to_owned).into()
    );
    assert_eq!(file.entrypoint(one), ["c"]);
    assert!(file.cmd(one).is_empty());
    let last = file.stage(None).unwrap();
    assert_eq!(file.cmd(last), ["/bin/sh", "-c", "a serve"]);

    let source = "#[arg(long, env = \"A_URL\", value_name = \"URL\",\n      \
                  default_value = \"http://localhost:1\")]\n    a: String,\n\
                  #[arg(long, env = \"B\")]\n    b: Option<String>,\n";
    let at = |name: &str| source.find(name).unwrap();
    assert_eq!(
        clap_default(source, at("env = \"A_URL")).as_deref(),
        Some("http://localhost:1")
    );
    assert_eq!(clap_default(source, at("env = \"B")), None);

    assert_eq!(
        created_databases("CREATE DATABASE \"Order\" OWNER x;\ncreate database Shop; -- x"),
        ["Order", "shop"].map(str::to_owned).into()
    );
    assert_eq!(
        parse_database_url("postgres://u:p@db:5432/orders?sslmode=disable"),
        Some(("db".to_owned(), "orders".to_owned()))
    );
    for (port, expect) in [
        ("8080:80", (Some(8080), 80)),
        ("127.0.0.1:9000:9187/tcp", (Some(9000), 9187)),
        ("9187", (None, 9187)),
    ] {
        assert_eq!(parse_port(&port.into()), Some(expect), "{port}");
    }

    // The flag scanner, against the relay's command line itself.
    let mut scanned = flags_read(&[repo_root().join("relay/src")]);
    scanned.extend(["--help", "-h", "--version", "-V"].map(str::to_owned));
    assert_eq!(
        scanned,
        relay_flags(),
        "flags scanned in relay/src against clap's"
    );

    let mut merged: Value =
        serde_yaml::from_str("a: &a {x: 1, y: 1}\nb: &b {<<: *a, y: 2}\nc: {<<: [*b], z: 3}\n")
            .unwrap();
    resolve_merges(&mut merged);
    assert_eq!(
        merged["c"],
        serde_yaml::from_str::<Value>("{x: 1, y: 2, z: 3}").unwrap()
    );
}
