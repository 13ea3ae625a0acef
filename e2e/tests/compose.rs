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
//! with it. The last tests break a copy of the file in memory and expect the checks
//! to say so.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

use serde_yaml::{Mapping, Value};

/// The subcommands every service binary has (services/README.md).
const SERVICE_SUBCOMMANDS: [&str; 3] = ["serve", "migrate", "seed"];
/// The relay's subcommands (relay/src/main.rs); without one it runs.
const RELAY_SUBCOMMANDS: [&str; 3] = ["run", "init", "check"];
/// The relay's package and binary.
const RELAY_BINARY: &str = "outbox-relay";
/// Where the images install the binaries (and so where a command finds them).
const BIN_DIR: &str = "/usr/local/bin";
/// Where the service crates live; their shared options are in `services/kit`.
const SERVICES_DIR: &str = "services";
const SERVICE_KIT_SRC: &str = "services/kit/src";

// ---------------------------------------------------------------------------------
// The repository

fn repo_root() -> PathBuf {
    testkit::crate_dir(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("e2e/ sits in the workspace root")
        .to_path_buf()
}

fn read(path: &Path) -> String {
    fs::read_to_string(path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

/// Everything the compose file is checked against.
struct Repo {
    root: PathBuf,
    workspace: Workspace,
    /// Databases docker/postgres-init.sql creates.
    databases: BTreeSet<String>,
    /// Dockerfiles by path, parsed as services refer to them.
    dockerfiles: BTreeMap<PathBuf, Option<Dockerfile>>,
}

impl Repo {
    fn load() -> Repo {
        let root = repo_root();
        let workspace = Workspace::load(&root);
        let databases = created_databases(&read(&root.join("docker/postgres-init.sql")));
        let mut dockerfiles = BTreeMap::new();
        let default = root.join("Dockerfile");
        dockerfiles.insert(default.clone(), Some(Dockerfile::parse(&read(&default))));
        Repo {
            root,
            workspace,
            databases,
            dockerfiles,
        }
    }

    fn dockerfile(&mut self, path: &Path) -> Option<&Dockerfile> {
        self.dockerfiles
            .entry(path.to_path_buf())
            .or_insert_with(|| fs::read_to_string(path).ok().map(|t| Dockerfile::parse(&t)))
            .as_ref()
    }

    fn relative(&self, path: &Path) -> String {
        path.strip_prefix(&self.root)
            .unwrap_or(path)
            .display()
            .to_string()
    }
}

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
// The workspace: packages, their binaries and their workspace dependencies

struct Package {
    name: String,
    dir: PathBuf,
    /// Binaries the manifest declares or the layout implies, with the file that is
    /// (or must be) their `main`.
    bins: BTreeMap<String, PathBuf>,
    /// Workspace-or-not dependency names of `[dependencies]`.
    deps: BTreeSet<String>,
}

impl Package {
    fn builds(&self, binary: &str) -> bool {
        self.bins.get(binary).is_some_and(|main| main.is_file())
    }
}

struct Workspace {
    packages: Vec<Package>,
}

impl Workspace {
    fn load(root: &Path) -> Workspace {
        let manifest = read(&root.join("Cargo.toml"));
        let packages = workspace_members(&manifest)
            .into_iter()
            .map(|member| {
                let dir = root.join(&member);
                parse_package(&dir, &read(&dir.join("Cargo.toml")))
            })
            .collect();
        Workspace { packages }
    }

    fn package(&self, name: &str) -> Option<&Package> {
        self.packages.iter().find(|p| p.name == name)
    }

    /// The package that builds `binary`, else the one named after it (whose
    /// `src/main.rs` may not be written yet).
    fn package_of_binary(&self, binary: &str) -> Option<&Package> {
        self.packages
            .iter()
            .find(|p| p.builds(binary))
            .or_else(|| self.package(binary))
    }

    /// Source directories whose code runs in `package`'s binary: its own and those
    /// of the workspace packages it depends on, transitively.
    fn source_dirs(&self, package: &Package) -> Vec<PathBuf> {
        let mut seen = BTreeSet::new();
        let mut stack = vec![package];
        let mut dirs = Vec::new();
        while let Some(p) = stack.pop() {
            if !seen.insert(p.name.clone()) {
                continue;
            }
            dirs.push(p.dir.join("src"));
            stack.extend(p.deps.iter().filter_map(|d| self.package(d)));
        }
        dirs
    }
}

/// The quoted entries of `members = [...]` in the root manifest.
fn workspace_members(manifest: &str) -> Vec<String> {
    let start = manifest
        .find("members")
        .expect("the root Cargo.toml lists workspace members");
    let rest = &manifest[start..];
    let open = rest.find('[').expect("members = [");
    let close = rest.find(']').expect("members = [...]");
    rest[open + 1..close]
        .split(',')
        .map(|s| strip_toml_comment(s).trim().trim_matches('"').to_owned())
        .filter(|s| !s.is_empty())
        .collect()
}

fn strip_toml_comment(line: &str) -> &str {
    let mut quoted = false;
    for (i, c) in line.char_indices() {
        match c {
            '"' => quoted = !quoted,
            '#' if !quoted => return &line[..i],
            _ => {}
        }
    }
    line
}

/// The little of a package manifest this test needs: the name, `[[bin]]` targets,
/// and dependency names. Line-based: the workspace's manifests keep one key a line.
fn parse_package(dir: &Path, manifest: &str) -> Package {
    let mut name = None;
    // (name, path) of each [[bin]]
    let mut declared: Vec<(Option<String>, Option<String>)> = Vec::new();
    let mut deps = BTreeSet::new();
    let mut section = String::new();
    for line in manifest.lines() {
        let line = strip_toml_comment(line).trim();
        if let Some(header) = line.strip_prefix("[[") {
            section = header.trim_end_matches("]]").trim().to_owned();
            if section == "bin" {
                declared.push((None, None));
            }
            continue;
        }
        if let Some(header) = line.strip_prefix('[') {
            section = header.trim_end_matches(']').trim().to_owned();
            // `[dependencies.foo]`
            if let Some(dep) = section.strip_prefix("dependencies.") {
                deps.insert(dep.trim_matches('"').to_owned());
            }
            continue;
        }
        let Some((key, value)) = line.split_once('=') else {
            continue;
        };
        let key = key.trim();
        let value = value.trim().trim_matches('"').to_owned();
        match section.as_str() {
            "package" if key == "name" => name = Some(value),
            "bin" => {
                if let Some(bin) = declared.last_mut() {
                    match key {
                        "name" => bin.0 = Some(value),
                        "path" => bin.1 = Some(value),
                        _ => {}
                    }
                }
            }
            s if s == "dependencies"
                || (s.starts_with("target.") && s.ends_with(".dependencies")) =>
            {
                // `foo = ...`, `foo.workspace = true`
                let dep = key
                    .split('.')
                    .next()
                    .unwrap_or(key)
                    .trim()
                    .trim_matches('"');
                deps.insert(dep.to_owned());
            }
            _ => {}
        }
    }
    let name = name.unwrap_or_else(|| panic!("{}/Cargo.toml has no package name", dir.display()));

    let src = dir.join("src");
    let mut bins = BTreeMap::new();
    // Cargo's automatic targets: src/main.rs is the binary named after the package,
    // src/bin/x.rs and src/bin/x/main.rs the binary x.
    bins.insert(name.clone(), src.join("main.rs"));
    if let Ok(entries) = fs::read_dir(src.join("bin")) {
        for entry in entries.flatten() {
            let path = entry.path();
            if path.extension().is_some_and(|e| e == "rs") {
                if let Some(stem) = path.file_stem() {
                    bins.insert(stem.to_string_lossy().into_owned(), path.clone());
                }
            } else if path.join("main.rs").is_file() {
                bins.insert(
                    entry.file_name().to_string_lossy().into_owned(),
                    path.join("main.rs"),
                );
            }
        }
    }
    for (bin, path) in declared {
        let bin = bin.unwrap_or_else(|| name.clone());
        let main = match path {
            Some(path) => dir.join(path),
            None if bin == name => src.join("main.rs"),
            None => src.join("bin").join(format!("{bin}.rs")),
        };
        bins.insert(bin, main);
    }
    Package {
        name,
        dir: dir.to_path_buf(),
        bins,
        deps,
    }
}

/// Environment variables the Rust sources under `dirs` read, with the default of
/// those that have one: clap's `env = "NAME"` (and the `default_value` beside it in
/// the same attribute), `EnvFilter::try_from_env("NAME")`, `std::env::var("NAME")`,
/// and `RUST_LOG` where a filter is built from the default variable.
fn env_vars_read(dirs: &[PathBuf]) -> BTreeMap<String, Option<String>> {
    let mut vars = BTreeMap::new();
    for dir in dirs {
        for file in rust_files(dir) {
            let text = read(&file);
            for pattern in ["env = \"", "from_env(\"", "env::var(\"", "env::var_os(\""] {
                for (at, _) in text.match_indices(pattern) {
                    let rest = &text[at + pattern.len()..];
                    let Some(end) = rest.find('"') else {
                        continue;
                    };
                    let default = if pattern == "env = \"" {
                        clap_default(&text, at)
                    } else {
                        None
                    };
                    let entry = vars.entry(rest[..end].to_owned()).or_insert(None);
                    if default.is_some() {
                        *entry = default;
                    }
                }
            }
            if text.contains("from_default_env()") {
                vars.entry("RUST_LOG".to_owned()).or_insert(None);
            }
        }
    }
    vars
}

/// The `default_value = "..."` of the `#[arg(...)]` attribute around `at`.
fn clap_default(text: &str, at: usize) -> Option<String> {
    let start = text[..at].rfind("#[")?;
    let end = at + text[at..].find(")]")?;
    let attribute = &text[start..end];
    let pattern = "default_value = \"";
    let value = &attribute[attribute.find(pattern)? + pattern.len()..];
    Some(value[..value.find('"')?].to_owned())
}

/// A default that, inside a container, names the container itself.
fn is_loopback(value: &str) -> bool {
    ["localhost", "127.0.0.1", "[::1]"]
        .iter()
        .any(|host| value.contains(host))
}

fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                files.push(path);
            }
        }
    }
    files
}

// ---------------------------------------------------------------------------------
// The Dockerfile: stages, the binaries each installs, ENTRYPOINT and CMD

struct Stage {
    name: Option<String>,
    /// The stage this one is built `FROM`, when it is one of the file's.
    parent: Option<usize>,
    /// Files copied into /usr/local/bin by this stage itself.
    installs: BTreeSet<String>,
    entrypoint: Option<Vec<String>>,
    cmd: Option<Vec<String>>,
}

struct Dockerfile {
    stages: Vec<Stage>,
    /// Binaries some `cargo build ... --bin NAME` builds.
    cargo_bins: BTreeSet<String>,
}

impl Dockerfile {
    fn parse(text: &str) -> Dockerfile {
        let mut stages: Vec<Stage> = Vec::new();
        let mut cargo_bins = BTreeSet::new();
        for instruction in logical_lines(text) {
            let (keyword, rest) = instruction
                .split_once(char::is_whitespace)
                .unwrap_or((instruction.as_str(), ""));
            let rest = rest.trim();
            let words: Vec<&str> = rest.split_whitespace().collect();
            match keyword.to_ascii_uppercase().as_str() {
                "FROM" => {
                    let args: Vec<&str> = words
                        .iter()
                        .copied()
                        .filter(|w| !w.starts_with("--"))
                        .collect();
                    let base = args.first().copied().unwrap_or_default();
                    let name = match args.as_slice() {
                        [_, as_, name, ..] if as_.eq_ignore_ascii_case("as") => {
                            Some((*name).to_owned())
                        }
                        _ => None,
                    };
                    let parent = stages.iter().position(|s| s.name.as_deref() == Some(base));
                    stages.push(Stage {
                        name,
                        parent,
                        installs: BTreeSet::new(),
                        entrypoint: None,
                        cmd: None,
                    });
                }
                "COPY" | "ADD" => {
                    let paths: Vec<&str> = words
                        .iter()
                        .copied()
                        .filter(|w| !w.starts_with("--"))
                        .collect();
                    if let (Some((dest, sources)), Some(stage)) =
                        (paths.split_last(), stages.last_mut())
                    {
                        if dest.trim_end_matches('/') == BIN_DIR {
                            // Into the directory: the files keep their names.
                            stage
                                .installs
                                .extend(sources.iter().map(|s| basename(s).to_owned()));
                        } else if let Some(file) = dest.strip_prefix(&format!("{BIN_DIR}/")) {
                            stage.installs.insert(file.to_owned());
                        }
                    }
                }
                "ENTRYPOINT" => {
                    if let Some(stage) = stages.last_mut() {
                        stage.entrypoint = Some(exec_form(rest));
                        // As in Docker: a new ENTRYPOINT drops an inherited CMD.
                        stage.cmd.get_or_insert_with(Vec::new);
                    }
                }
                "CMD" => {
                    if let Some(stage) = stages.last_mut() {
                        stage.cmd = Some(exec_form(rest));
                    }
                }
                "RUN" => {
                    for (i, word) in words.iter().enumerate() {
                        if *word == "--bin" {
                            if let Some(bin) = words.get(i + 1) {
                                cargo_bins.insert((*bin).to_owned());
                            }
                        } else if let Some(bin) = word.strip_prefix("--bin=") {
                            cargo_bins.insert(bin.to_owned());
                        }
                    }
                }
                _ => {}
            }
        }
        Dockerfile { stages, cargo_bins }
    }

    /// The stage a build with `target` makes: the named one, or the last without.
    fn stage(&self, target: Option<&str>) -> Option<usize> {
        match target {
            Some(target) => self
                .stages
                .iter()
                .position(|s| s.name.as_deref() == Some(target)),
            None => self.stages.len().checked_sub(1),
        }
    }

    fn stage_names(&self) -> Vec<&str> {
        self.stages
            .iter()
            .filter_map(|s| s.name.as_deref())
            .collect()
    }

    /// What is in /usr/local/bin of the image `stage` makes.
    fn binaries(&self, stage: usize) -> BTreeSet<String> {
        let mut all = BTreeSet::new();
        let mut at = Some(stage);
        while let Some(i) = at {
            all.extend(self.stages[i].installs.iter().cloned());
            at = self.stages[i].parent;
        }
        all
    }

    fn inherited<T>(&self, stage: usize, get: impl Fn(&Stage) -> Option<&T>) -> Option<&T> {
        let mut at = Some(stage);
        while let Some(i) = at {
            if let Some(found) = get(&self.stages[i]) {
                return Some(found);
            }
            at = self.stages[i].parent;
        }
        None
    }

    fn entrypoint(&self, stage: usize) -> Vec<String> {
        self.inherited(stage, |s| s.entrypoint.as_ref())
            .cloned()
            .unwrap_or_default()
    }

    fn cmd(&self, stage: usize) -> Vec<String> {
        self.inherited(stage, |s| s.cmd.as_ref())
            .cloned()
            .unwrap_or_default()
    }
}

/// Instructions with their continuation lines joined, comments dropped.
fn logical_lines(text: &str) -> Vec<String> {
    let mut lines = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let trimmed = line.trim();
        if trimmed.starts_with('#') || (trimmed.is_empty() && !current.is_empty()) {
            continue;
        }
        match trimmed.strip_suffix('\\') {
            Some(part) => {
                current.push_str(part);
                current.push(' ');
            }
            None => {
                current.push_str(trimmed);
                if !current.trim().is_empty() {
                    lines.push(current.trim().to_owned());
                }
                current.clear();
            }
        }
    }
    lines
}

/// `["a", "b"]` as it is; the shell form runs under `/bin/sh -c`.
fn exec_form(text: &str) -> Vec<String> {
    if text.starts_with('[') {
        if let Ok(words) = serde_yaml::from_str::<Vec<String>>(text) {
            return words;
        }
    }
    vec!["/bin/sh".to_owned(), "-c".to_owned(), text.to_owned()]
}

fn basename(path: &str) -> &str {
    path.trim_end_matches('/')
        .rsplit('/')
        .next()
        .unwrap_or(path)
}

// ---------------------------------------------------------------------------------
// docker-compose.yml, service by service

/// What a compose service runs, as far as the file and the Dockerfile tell.
struct Resolved<'a> {
    name: String,
    def: &'a Value,
    /// The Dockerfile and stage it is built from; `None` for a pulled image.
    build: Option<(PathBuf, usize)>,
    /// The container's argv: ENTRYPOINT and CMD of the image as the file overrides them.
    argv: Vec<String>,
    role: Role,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    /// A shop service binary (a package under services/).
    Service,
    /// outbox-relay.
    Relay,
    /// Anything else: a pulled image, or a program this test does not know.
    Other,
}

impl Resolved<'_> {
    fn program(&self) -> Option<&str> {
        self.argv.first().map(|p| basename(p))
    }

    fn subcommand(&self) -> Option<&str> {
        self.argv
            .get(1)
            .map(String::as_str)
            .filter(|a| !a.starts_with('-'))
    }

    /// A long-running server rather than a one-shot job.
    fn serves(&self) -> bool {
        match self.role {
            Role::Service => matches!(self.subcommand(), None | Some("serve")),
            Role::Relay => matches!(self.subcommand(), None | Some("run")),
            Role::Other => false,
        }
    }

    fn env(&self, name: &str) -> Option<String> {
        environment(self.def).get(name).cloned().flatten()
    }

    fn database_url(&self) -> Option<String> {
        match self.role {
            Role::Service => self.env("DATABASE_URL"),
            Role::Relay => self.env("OUTBOX_RELAY_POSTGRES_URL"),
            Role::Other => None,
        }
    }

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

fn scalar(value: &Value) -> Option<String> {
    match value {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
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
            argv = match entrypoint {
                // An entrypoint in the file drops the image's CMD too.
                Some(entrypoint) => [entrypoint, command.unwrap_or_default()].concat(),
                None => [
                    file.entrypoint(stage),
                    command.unwrap_or_else(|| file.cmd(stage)),
                ]
                .concat(),
            };
            build = Some((path, stage));
        }
        let program = argv.first().map(|p| basename(p).to_owned());
        let role = match program.as_deref() {
            Some(RELAY_BINARY) => Role::Relay,
            Some(program) => match repo.workspace.package_of_binary(program) {
                Some(p) if p.dir.starts_with(repo.root.join(SERVICES_DIR)) => Role::Service,
                _ => Role::Other,
            },
            None => Role::Other,
        };
        resolved.push(Resolved {
            name,
            def,
            build,
            argv,
            role,
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
        let Some((path, stage)) = &service.build else {
            continue;
        };
        let file = repo.dockerfiles[path]
            .as_ref()
            .expect("resolved services have a parsed Dockerfile");
        let stage_name = file.stages[*stage].name.as_deref().unwrap_or("(last)");
        let Some(program) = service.program() else {
            problems.push(format!(
                "service `{}`: has no command, and stage `{stage_name}` has no ENTRYPOINT or CMD",
                service.name
            ));
            continue;
        };
        let installed = file.binaries(*stage);
        if !installed.contains(program) {
            problems.push(format!(
                "service `{}`: runs `{program}`, which stage `{stage_name}` does not install in \
                 {BIN_DIR} (it installs: {})",
                service.name,
                installed.iter().cloned().collect::<Vec<_>>().join(", ")
            ));
        } else if !file.cargo_bins.contains(program) {
            problems.push(format!(
                "service `{}`: runs `{program}`, which stage `{stage_name}` installs but no \
                 `cargo build --bin {program}` in {} builds",
                service.name,
                repo.relative(path)
            ));
        }
        let subcommand = service.subcommand();
        match service.role {
            Role::Service => {
                if !subcommand.is_some_and(|s| SERVICE_SUBCOMMANDS.contains(&s)) {
                    problems.push(format!(
                        "service `{}`: `{program}` needs a subcommand, one of {}; the command \
                         gives {:?}",
                        service.name,
                        SERVICE_SUBCOMMANDS.join(", "),
                        subcommand.unwrap_or_default()
                    ));
                }
            }
            Role::Relay => {
                if let Some(s) = subcommand.filter(|s| !RELAY_SUBCOMMANDS.contains(s)) {
                    problems.push(format!(
                        "service `{}`: `{program}` has no subcommand `{s}` (it has {})",
                        service.name,
                        RELAY_SUBCOMMANDS.join(", ")
                    ));
                }
            }
            Role::Other => {}
        }
    }
    problems
}

/// The program of every built service is a binary of a workspace package: a
/// `[[bin]]` or the package's `src/main.rs`, present in the tree.
fn check_binaries(compose: &Value, repo: &mut Repo) -> Vec<String> {
    let (resolved, _) = resolve(compose, repo);
    let mut problems = Vec::new();
    for service in resolved.iter().filter(|s| s.build.is_some()) {
        let Some(program) = service.program() else {
            continue;
        };
        match repo.workspace.package_of_binary(program) {
            Some(p) if p.builds(program) => {}
            Some(p) => problems.push(format!(
                "service `{}`: runs `{program}`, but package `{}` ({}) does not build it yet: \
                 {} does not exist",
                service.name,
                p.name,
                repo.relative(&p.dir),
                repo.relative(&p.bins[program])
            )),
            None => problems.push(format!(
                "service `{}`: runs `{program}`, which no workspace package builds \
                 (no [[bin]] or package of that name)",
                service.name
            )),
        }
    }
    problems
}

/// Every environment variable set on a built service is one its binary reads, and
/// every one it reads with a default at localhost is set.
fn check_environment(compose: &Value, repo: &mut Repo) -> Vec<String> {
    let (resolved, _) = resolve(compose, repo);
    let mut problems = Vec::new();
    for service in resolved.iter().filter(|s| s.build.is_some()) {
        let Some(program) = service.program() else {
            continue;
        };
        let Some(package) = repo.workspace.package_of_binary(program) else {
            continue;
        };
        let mut dirs = repo.workspace.source_dirs(package);
        if service.role == Role::Service {
            // The options all services share are the kit's.
            let kit = repo.root.join(SERVICE_KIT_SRC);
            if !dirs.contains(&kit) {
                dirs.push(kit);
            }
        }
        let read_by_binary = env_vars_read(&dirs);
        let set = environment(service.def);
        for name in set.keys() {
            if !read_by_binary.contains_key(name) {
                problems.push(format!(
                    "service `{}`: environment variable `{name}` is not read by `{program}`: \
                     no `env = \"{name}\"` (nor an env::var or log filter reading it) in {}",
                    service.name,
                    dirs.iter()
                        .map(|d| repo.relative(d))
                        .collect::<Vec<_>>()
                        .join(", ")
                ));
            }
        }
        // What the binary would otherwise reach at localhost is, in a container, not
        // there: kafka, postgres and the other services have names of their own.
        for (name, default) in &read_by_binary {
            if let Some(default) = default.as_deref().filter(|d| is_loopback(d)) {
                if !set.contains_key(name) {
                    problems.push(format!(
                        "service `{}`: `{program}` reads `{name}`, whose default {default} is \
                         the container itself; set it to the address of a service of the file",
                        service.name
                    ));
                }
            }
        }
    }
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

/// `postgres://user:password@host:port/database?...` → (host, database).
fn parse_database_url(url: &str) -> Option<(String, String)> {
    let rest = url.split_once("://")?.1;
    let (authority, path) = rest.split_once('/')?;
    let host_port = authority.rsplit('@').next()?;
    let host = host_port.split(':').next()?.to_owned();
    let database = path.split('?').next()?.to_owned();
    Some((host, database))
}

/// Each service has a database of its own, created by docker/postgres-init.sql, on
/// a server it waits for; each serving service has exactly one relay, which streams
/// that same database and starts after the service is healthy.
fn check_databases(compose: &Value, repo: &mut Repo) -> Vec<String> {
    let (resolved, _) = resolve(compose, repo);
    let by_name: BTreeMap<&str, &Resolved> =
        resolved.iter().map(|s| (s.name.as_str(), s)).collect();
    let mut problems = Vec::new();
    // database → the serving service and the relays on it
    let mut owners: BTreeMap<String, Vec<&str>> = BTreeMap::new();
    let mut relays: BTreeMap<String, Vec<&str>> = BTreeMap::new();
    for service in &resolved {
        if service.role == Role::Other {
            continue;
        }
        let variable = match service.role {
            Role::Relay => "OUTBOX_RELAY_POSTGRES_URL",
            _ => "DATABASE_URL",
        };
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
        if !repo.databases.contains(&database) {
            problems.push(format!(
                "service `{}`: {variable} names database `{database}`, which \
                 docker/postgres-init.sql does not create (it creates: {})",
                service.name,
                repo.databases
                    .iter()
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(", ")
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
            Role::Service => owners.entry(database).or_default().push(&service.name),
            Role::Relay => {
                relays
                    .entry(database.clone())
                    .or_default()
                    .push(&service.name);
                // The service it sits beside: the serving service it waits for.
                let beside: Vec<&Resolved> = deps
                    .iter()
                    .filter_map(|(t, _)| by_name.get(t.as_str()).copied())
                    .filter(|s| s.role == Role::Service && s.serves())
                    .collect();
                match beside.as_slice() {
                    [owner] => {
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
    for (database, names) in &owners {
        if names.len() > 1 {
            problems.push(format!(
                "services {} share database `{database}`; each service owns its own",
                quoted_list(names)
            ));
        }
        match relays.get(database).map(Vec::as_slice) {
            None | Some([]) => problems.push(format!(
                "service `{}`: no relay streams its database `{database}`",
                names[0]
            )),
            Some([_]) => {}
            // Two relays on one database with the default slot name fight over it.
            Some(many) => problems.push(format!(
                "relays {} all stream database `{database}`; one relay per database",
                quoted_list(many)
            )),
        }
    }
    problems
}

fn quoted_list(names: &[&str]) -> String {
    names
        .iter()
        .map(|n| format!("`{n}`"))
        .collect::<Vec<_>>()
        .join(", ")
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
    let servers = |role| {
        resolved
            .iter()
            .filter(|s| s.role == role && s.serves())
            .count()
    };
    assert_eq!(servers(Role::Service), 4, "four services serve");
    assert_eq!(servers(Role::Relay), 4, "one relay per service database");
    let seeds = resolved
        .iter()
        .filter(|s| s.role == Role::Service && s.subcommand() == Some("seed"))
        .count();
    assert!(seeds > 0, "demo data is seeded");
    assert_eq!(
        repo.databases,
        ["order", "customer", "payment", "inventory"]
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
    let matches = |problems: &[String]| {
        problems
            .iter()
            .any(|p| expect.iter().all(|part| p.contains(part)))
    };
    let before = check(&compose, &mut repo);
    assert!(
        !matches(&before),
        "the unbroken file already has a problem with {expect:?}: {before:#?}"
    );
    let mut broken = compose.clone();
    mutate(&mut broken);
    let after = check(&broken, &mut repo);
    assert!(
        matches(&after),
        "no problem with {expect:?} reported for the broken file: {after:#?}"
    );
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

    let mut merged: Value =
        serde_yaml::from_str("a: &a {x: 1, y: 1}\nb: &b {<<: *a, y: 2}\nc: {<<: [*b], z: 3}\n")
            .unwrap();
    resolve_merges(&mut merged);
    assert_eq!(
        merged["c"],
        serde_yaml::from_str::<Value>("{x: 1, y: 2, z: 3}").unwrap()
    );
}
