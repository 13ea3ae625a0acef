//! The workspace as the deployment files' checks see it: its packages, the binaries
//! they build, and what those binaries' sources read (environment variables, flags)
//! and serve (HTTP routes), found in the sources at test time so that a renamed option
//! or route shows up in the checks.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};

pub fn repo_root() -> PathBuf {
    testkit::crate_dir(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("e2e/ sits in the workspace root")
        .to_path_buf()
}

pub fn read(path: &Path) -> String {
    fs::read_to_string(path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

pub struct Package {
    pub name: String,
    pub dir: PathBuf,
    /// Binaries the manifest declares or the layout implies, with the file that is
    /// (or must be) their `main`.
    pub bins: BTreeMap<String, PathBuf>,
    /// Workspace-or-not dependency names of `[dependencies]`.
    pub deps: BTreeSet<String>,
}

impl Package {
    pub fn builds(&self, binary: &str) -> bool {
        self.bins.get(binary).is_some_and(|main| main.is_file())
    }
}

pub struct Workspace {
    pub packages: Vec<Package>,
}

impl Workspace {
    pub fn load(root: &Path) -> Workspace {
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

    pub fn package(&self, name: &str) -> Option<&Package> {
        self.packages.iter().find(|p| p.name == name)
    }

    /// The package that builds `binary`, else the one named after it (whose
    /// `src/main.rs` may not be written yet).
    pub fn package_of_binary(&self, binary: &str) -> Option<&Package> {
        self.packages
            .iter()
            .find(|p| p.builds(binary))
            .or_else(|| self.package(binary))
    }

    /// Source directories whose code runs in `package`'s binary: its own and those
    /// of the workspace packages it depends on, transitively.
    pub fn source_dirs(&self, package: &Package) -> Vec<PathBuf> {
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
pub fn workspace_members(manifest: &str) -> Vec<String> {
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

pub fn strip_toml_comment(line: &str) -> &str {
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
pub fn parse_package(dir: &Path, manifest: &str) -> Package {
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
pub fn env_vars_read(dirs: &[PathBuf]) -> BTreeMap<String, Option<String>> {
    let mut vars = BTreeMap::new();
    for dir in dirs {
        for (name, default) in &scan(dir).env {
            let entry = vars.entry(name.clone()).or_insert(None);
            if default.is_some() {
                entry.clone_from(default);
            }
        }
    }
    vars
}

/// Flags the Rust sources under `dirs` declare with clap: `--name` for each
/// `#[arg(long = "name")]`, and for a bare `#[arg(long)]` the field's name in kebab
/// case; `-c` for each `short = 'c'`.
pub fn flags_read(dirs: &[PathBuf]) -> BTreeSet<String> {
    dirs.iter()
        .flat_map(|dir| scan(dir).flags.clone())
        .collect()
}

/// HTTP paths the Rust sources under `dirs` route: each `.route("/path", ...)`.
pub fn routes_served(dirs: &[PathBuf]) -> BTreeSet<String> {
    dirs.iter()
        .flat_map(|dir| scan(dir).routes.clone())
        .collect()
}

/// What the Rust sources under one folder read and serve.
#[derive(Default)]
struct Scan {
    env: BTreeMap<String, Option<String>>,
    flags: BTreeSet<String>,
    routes: BTreeSet<String>,
}

/// The scan of `dir`, made once per test process: the checks look at the same
/// sources for every container.
fn scan(dir: &Path) -> Arc<Scan> {
    static SCANNED: OnceLock<Mutex<BTreeMap<PathBuf, Arc<Scan>>>> = OnceLock::new();
    let mut scanned = SCANNED
        .get_or_init(Mutex::default)
        .lock()
        .unwrap_or_else(PoisonError::into_inner);
    let found = scanned.entry(dir.to_path_buf()).or_insert_with(|| {
        let mut scan = Scan::default();
        for file in rust_files(dir) {
            let text = read(&file);
            scan_env(&text, &mut scan.env);
            scan.flags.extend(clap_flags(&text));
            scan.routes.extend(routes(&text));
        }
        Arc::new(scan)
    });
    Arc::clone(found)
}

fn scan_env(text: &str, vars: &mut BTreeMap<String, Option<String>>) {
    for pattern in ["env = \"", "from_env(\"", "env::var(\"", "env::var_os(\""] {
        for (at, _) in text.match_indices(pattern) {
            let rest = &text[at + pattern.len()..];
            let Some(end) = rest.find('"') else {
                continue;
            };
            let default = if pattern == "env = \"" {
                clap_default(text, at)
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
    // The log filter's variable a binary hands the telemetry crate:
    // `telemetry::init("outbox-relay", "OUTBOX_RELAY_LOG")`.
    for (at, _) in text.match_indices("telemetry::init(") {
        let call = &text[at..];
        let call = &call[..call.find(')').unwrap_or(call.len())];
        if let Some((_, rest)) = call.split_once(", \"") {
            if let Some(end) = rest.find('"') {
                vars.entry(rest[..end].to_owned()).or_insert(None);
            }
        }
    }
    // The OpenTelemetry variables the telemetry crate names (`telemetry::ENVIRONMENT`):
    // the SDK reads most of them itself.
    for (at, _) in text.match_indices("\"OTEL_") {
        let rest = &text[at + 1..];
        if let Some(end) = rest.find('"') {
            vars.entry(rest[..end].to_owned()).or_insert(None);
        }
    }
}

/// The `default_value = "..."` of the `#[arg(...)]` attribute around `at`.
pub fn clap_default(text: &str, at: usize) -> Option<String> {
    let start = text[..at].rfind("#[")?;
    let end = at + text[at..].find(")]")?;
    let attribute = &text[start..end];
    let pattern = "default_value = \"";
    let value = &attribute[attribute.find(pattern)? + pattern.len()..];
    Some(value[..value.find('"')?].to_owned())
}

/// The flags the `#[arg(...)]` attributes of one source file declare.
pub fn clap_flags(text: &str) -> BTreeSet<String> {
    let mut flags = BTreeSet::new();
    for (start, _) in text.match_indices("#[arg(") {
        let line_start = text[..start].rfind('\n').map_or(0, |i| i + 1);
        if text[line_start..start].contains("//") {
            // In a comment: `#[arg(long, env)]` in a doc.
            continue;
        }
        let Some(len) = text[start..].find(")]") else {
            continue;
        };
        let attribute = &text[start + "#[arg(".len()..start + len];
        for part in attribute.split(',') {
            let part = part.trim();
            if let Some(short) = part.strip_prefix("short = '") {
                flags.insert(format!("-{}", short.trim_end_matches('\'')));
            } else if let Some(long) = part.strip_prefix("long = \"") {
                flags.insert(format!("--{}", long.trim_end_matches('"')));
            } else if part == "long" {
                if let Some(field) = next_field(&text[start + len..]) {
                    flags.insert(format!("--{}", field.replace('_', "-")));
                }
            }
        }
    }
    flags
}

/// The name of the first struct field in `text`: `pub name: Type` or `name: Type`
/// on a line that is no attribute or comment.
fn next_field(text: &str) -> Option<&str> {
    text.lines().skip(1).map(str::trim).find_map(|line| {
        if line.starts_with("#[") || line.starts_with("//") || line.is_empty() {
            return None;
        }
        let line = line.strip_prefix("pub ").unwrap_or(line);
        let (name, _) = line.split_once(':')?;
        let name = name.trim();
        name.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_')
            .then_some(name)
    })
}

/// The paths of the `.route("/path", ...)` calls of one source file.
fn routes(text: &str) -> impl Iterator<Item = String> + '_ {
    text.match_indices(".route(\"").filter_map(|(at, _)| {
        let rest = &text[at + ".route(\"".len()..];
        Some(rest[..rest.find('"')?].to_owned())
    })
}

pub fn rust_files(dir: &Path) -> Vec<PathBuf> {
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
