//! Where the test environment is, and whether it is up.

use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::OnceLock;
use std::time::Duration;

use sqlx::postgres::PgConnectOptions;

/// The command that brings the local environment up; every "not up" message names it.
pub const ENV_UP_COMMAND: &str = "scripts/env up";

/// How long a reachability probe waits before calling a service down.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// Connection settings of the PostgreSQL cluster and the Kafka-protocol broker.
#[derive(Debug, Clone)]
pub struct Settings {
    /// A URL of a role that may create databases and replication slots.
    pub database_url: String,
    /// The `bootstrap.servers` list.
    pub kafka_brokers: String,
    /// Where the values came from, for messages.
    pub source: String,
}

/// The settings could not be found or the services they name do not answer.
#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    #[error(
        "no test environment configured: neither DATABASE_URL and KAFKA_BROKERS are set nor \
         does {file} exist; start the local environment with `{ENV_UP_COMMAND}`",
        file = .file.display()
    )]
    NotConfigured { file: PathBuf },
    #[error("cannot read the settings file {file}", file = .file.display())]
    Unreadable {
        file: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{name} is missing: set it, or start the local environment with `{ENV_UP_COMMAND}` (looked in {source_desc})")]
    Missing {
        name: &'static str,
        source_desc: String,
    },
    #[error("DATABASE_URL from {source_desc} is not a PostgreSQL URL")]
    BadDatabaseUrl {
        source_desc: String,
        #[source]
        source: sqlx::Error,
    },
    #[error(
        "{what} at {address} (from {source_desc}) is not reachable: {reason}; start the local \
         environment with `{ENV_UP_COMMAND}`, or point DATABASE_URL and KAFKA_BROKERS at running servers"
    )]
    Unreachable {
        what: &'static str,
        address: String,
        source_desc: String,
        reason: String,
    },
}

impl Settings {
    /// Reads the settings (environment first, then the settings file) without
    /// contacting anything.
    pub fn load() -> Result<Settings, SettingsError> {
        let from_env = |name: &str| std::env::var(name).ok().filter(|v| !v.trim().is_empty());
        let env_db = from_env("DATABASE_URL");
        let env_kafka = from_env("KAFKA_BROKERS");
        let file = settings_file();

        let (file_values, file_read) = match (&env_db, &env_kafka) {
            (Some(_), Some(_)) => (Vec::new(), false),
            _ => match std::fs::read_to_string(&file) {
                Ok(text) => (parse_settings_file(&text), true),
                Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
                    return Err(SettingsError::NotConfigured { file });
                }
                Err(source) => return Err(SettingsError::Unreadable { file, source }),
            },
        };
        let from_file = |name: &str| {
            file_values
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.clone())
        };
        let source = match (env_db.is_some(), env_kafka.is_some(), file_read) {
            (true, true, _) => "the environment".to_owned(),
            (false, false, _) => file.display().to_string(),
            _ => format!("the environment and {}", file.display()),
        };
        let missing = |name| SettingsError::Missing {
            name,
            source_desc: source.clone(),
        };
        let database_url = env_db
            .or_else(|| from_file("DATABASE_URL"))
            .ok_or_else(|| missing("DATABASE_URL"))?;
        let kafka_brokers = env_kafka
            .or_else(|| from_file("KAFKA_BROKERS"))
            .ok_or_else(|| missing("KAFKA_BROKERS"))?;
        Ok(Settings {
            database_url,
            kafka_brokers,
            source,
        })
    }

    /// Checks that the database and the first broker accept TCP connections.
    pub fn check_reachable(&self) -> Result<(), SettingsError> {
        let options = PgConnectOptions::from_str(&self.database_url).map_err(|source| {
            SettingsError::BadDatabaseUrl {
                source_desc: self.source.clone(),
                source,
            }
        })?;
        let pg = format!("{}:{}", options.get_host(), options.get_port());
        probe("PostgreSQL", &pg, &self.source)?;
        let broker = self
            .kafka_brokers
            .split(',')
            .next()
            .unwrap_or_default()
            .trim();
        let broker = broker.strip_prefix("PLAINTEXT://").unwrap_or(broker);
        probe("the Kafka broker", broker, &self.source)
    }
}

/// The settings of this test process, loaded and probed once.
///
/// # Panics
/// When the environment is not configured or not reachable, with a message that
/// names the command which starts it. Tests cannot do anything useful without it.
pub fn settings() -> &'static Settings {
    static SETTINGS: OnceLock<Result<Settings, String>> = OnceLock::new();
    let loaded = SETTINGS.get_or_init(|| {
        let settings = Settings::load().map_err(|e| e.to_string())?;
        settings.check_reachable().map_err(|e| e.to_string())?;
        Ok(settings)
    });
    match loaded {
        Ok(settings) => settings,
        Err(message) => panic!("{message}"),
    }
}

/// The setting `name` (e.g. `OUTBOX_PG_CA`): the environment variable of that name
/// when set and not empty, else its line in the settings file; `None` when neither
/// has it (or the file cannot be read).
pub fn setting(name: &str) -> Option<String> {
    if let Some(value) = std::env::var(name).ok().filter(|v| !v.trim().is_empty()) {
        return Some(value);
    }
    let text = std::fs::read_to_string(settings_file()).ok()?;
    parse_settings_file(&text)
        .into_iter()
        .find(|(key, _)| key == name)
        .map(|(_, value)| value)
}

/// The URL of one of the other brokers (`NATS_URL`, `RABBITMQ_URL`, `REDIS_URL`),
/// from the environment or the settings file.
///
/// # Panics
/// When neither has it, naming the command that writes it.
pub fn service_url(name: &str) -> String {
    setting(name).unwrap_or_else(|| {
        panic!(
            "{name} is set neither in the environment nor in {}: start the local environment \
             with `{ENV_UP_COMMAND}`",
            settings_file().display()
        )
    })
}

/// The folder of the crate whose test runs: `CARGO_MANIFEST_DIR` as cargo sets it
/// for the run, else `compiled_in` (pass `env!("CARGO_MANIFEST_DIR")`). The
/// compiled-in folder may be another checkout's: with checkouts sharing a target
/// folder, cargo keeps a test binary built from another checkout whose sources are
/// not newer.
pub fn crate_dir(compiled_in: &str) -> PathBuf {
    std::env::var_os("CARGO_MANIFEST_DIR")
        .filter(|dir| !dir.is_empty())
        .map_or_else(|| PathBuf::from(compiled_in), PathBuf::from)
}

/// The settings file: `OUTBOX_SETTINGS_FILE`, else `.local/env` of the checkout the
/// program runs in (tests run in their crate's folder, the scripts at the root),
/// else of the checkout it was built from. The running checkout comes first because
/// checkouts may share one target folder, and cargo then keeps a binary built from
/// another checkout whose sources are not newer.
pub(crate) fn settings_file() -> PathBuf {
    if let Some(file) = std::env::var_os("OUTBOX_SETTINGS_FILE").filter(|v| !v.is_empty()) {
        return PathBuf::from(file);
    }
    if let Some(file) = std::env::current_dir()
        .ok()
        .and_then(|cwd| checkout_settings(&cwd))
    {
        return file;
    }
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap_or(Path::new("."))
        .join(".local")
        .join("env")
}

/// `.local/env` of the checkout `dir` lies in, when it exists.
fn checkout_settings(dir: &Path) -> Option<PathBuf> {
    checkouts(dir)
        .map(|d| d.join(".local").join("env"))
        .find(|file| file.is_file())
}

/// The checkout `dir` lies in (the nearest folder with `scripts/env` and
/// `Cargo.toml`); else the one this crate was built from, which may be another
/// checkout's (see [`crate_dir`]).
pub(crate) fn checkout_root(dir: &Path) -> PathBuf {
    checkouts(dir).next().map_or_else(
        || {
            let built_in = Path::new(env!("CARGO_MANIFEST_DIR"));
            built_in.parent().unwrap_or(built_in).to_path_buf()
        },
        Path::to_path_buf,
    )
}

/// The folders holding `dir` that look like a checkout, nearest first.
fn checkouts(dir: &Path) -> impl Iterator<Item = &Path> {
    dir.ancestors()
        .filter(|d| d.join("scripts").join("env").is_file() && d.join("Cargo.toml").is_file())
}

/// Parses `export NAME=value` lines (quotes around the value optional); ignores
/// comments and anything else.
pub(crate) fn parse_settings_file(text: &str) -> Vec<(String, String)> {
    text.lines()
        .filter_map(|line| {
            let line = line.trim();
            let line = line.strip_prefix("export ").unwrap_or(line);
            if line.starts_with('#') {
                return None;
            }
            let (name, value) = line.split_once('=')?;
            let value = value.trim();
            let value = value
                .strip_prefix('\'')
                .and_then(|v| v.strip_suffix('\''))
                .or_else(|| value.strip_prefix('"').and_then(|v| v.strip_suffix('"')))
                .unwrap_or(value);
            Some((name.trim().to_owned(), value.to_owned()))
        })
        .collect()
}

fn probe(what: &'static str, address: &str, source: &str) -> Result<(), SettingsError> {
    let unreachable = |reason: String| SettingsError::Unreachable {
        what,
        address: address.to_owned(),
        source_desc: source.to_owned(),
        reason,
    };
    let addrs: Vec<SocketAddr> = address
        .to_socket_addrs()
        .map_err(|e| unreachable(e.to_string()))?
        .collect();
    let mut last = String::from("the address resolves to nothing");
    for addr in addrs {
        match TcpStream::connect_timeout(&addr, PROBE_TIMEOUT) {
            Ok(_) => return Ok(()),
            Err(e) => last = e.to_string(),
        }
    }
    Err(unreachable(last))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_settings_of_the_checkout_a_folder_lies_in_are_found() {
        let root = std::env::temp_dir().join(crate::unique_name("checkout"));
        let deep = root.join("relay").join("tests");
        std::fs::create_dir_all(&deep).unwrap();
        std::fs::create_dir_all(root.join("scripts")).unwrap();
        std::fs::write(root.join("Cargo.toml"), "").unwrap();
        std::fs::write(root.join("scripts").join("env"), "").unwrap();
        // A checkout whose environment was never brought up has no settings.
        assert_eq!(checkout_settings(&deep), None);
        std::fs::create_dir_all(root.join(".local")).unwrap();
        std::fs::write(root.join(".local").join("env"), "").unwrap();
        let found = checkout_settings(&deep);
        // A `.local/env` of a folder that is no checkout does not count.
        let stray = std::env::temp_dir().join(crate::unique_name("stray"));
        std::fs::create_dir_all(stray.join(".local")).unwrap();
        std::fs::write(stray.join(".local").join("env"), "").unwrap();
        let not_found = checkout_settings(&stray);
        let _ = std::fs::remove_dir_all(&root);
        let _ = std::fs::remove_dir_all(&stray);
        assert_eq!(found, Some(root.join(".local").join("env")));
        assert_eq!(not_found, None);
    }

    #[test]
    fn parses_export_lines() {
        let text = "# written by scripts/env\nexport DATABASE_URL='postgres://a:b@127.0.0.1:1/x'\n\
                    export KAFKA_BROKERS=127.0.0.1:2\nGARBAGE\nexport QUOTED=\"v\"\n\
                    export OUTBOX_PG_CA='/tmp/a b/ca.crt'\n";
        let values = parse_settings_file(text);
        assert_eq!(
            values,
            vec![
                (
                    "DATABASE_URL".to_owned(),
                    "postgres://a:b@127.0.0.1:1/x".to_owned()
                ),
                ("KAFKA_BROKERS".to_owned(), "127.0.0.1:2".to_owned()),
                ("QUOTED".to_owned(), "v".to_owned()),
                ("OUTBOX_PG_CA".to_owned(), "/tmp/a b/ca.crt".to_owned()),
            ]
        );
    }

    #[test]
    fn a_closed_port_is_reported_with_the_command_to_run() {
        // Bind and drop a listener to find a port that nothing listens on.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("bind an ephemeral port");
        let settings = Settings {
            database_url: format!("postgres://u:p@127.0.0.1:{port}/db"),
            kafka_brokers: "127.0.0.1:1".to_owned(),
            source: "a test".to_owned(),
        };
        let message = settings
            .check_reachable()
            .expect_err("nothing listens there")
            .to_string();
        assert!(message.contains("PostgreSQL"), "{message}");
        assert!(message.contains(&format!("127.0.0.1:{port}")), "{message}");
        assert!(message.contains(ENV_UP_COMMAND), "{message}");
    }
}
