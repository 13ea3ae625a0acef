//! A private PostgreSQL cluster for one test: for server settings (`wal_level`,
//! WAL retention) the cluster every other test shares must not have.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;

use crate::broker::free_port;
use crate::settings::{parse_settings_file, settings_file, ENV_UP_COMMAND};

/// How many ports a start tries before giving up (another process may take the
/// free port between choosing it and the server binding it).
const START_ATTEMPTS: usize = 3;

/// Seconds `pg_ctl` waits for the server to start or stop.
const PG_CTL_TIMEOUT_SECS: &str = "60";

/// The start of a private cluster's folder name in `/tmp`.
pub(crate) const DIR_PREFIX: &str = "outbox-pc-";

/// A throwaway cluster (`initdb` + `pg_ctl start`) in `/tmp/outbox-pc-<random>`,
/// listening on 127.0.0.1 with trust authentication for the superuser `postgres`.
/// Dropping it stops the server (`pg_ctl -m immediate stop`) and deletes the
/// directory.
#[derive(Debug)]
pub struct PrivateCluster {
    bin: PathBuf,
    dir: PathBuf,
    data: PathBuf,
    port: u16,
    as_postgres: bool,
    settings: Vec<(String, String)>,
}

impl PrivateCluster {
    /// Creates and starts a cluster with the server settings `settings` (passed as
    /// `-c name=value`, after one default for speed, `fsync=off`, which they may override).
    ///
    /// The binaries come from `$OUTBOX_PG_BIN`, else `OUTBOX_PG_BIN` in the settings
    /// file of `scripts/env up`, else the newest `/usr/lib/postgresql/*/bin`. As
    /// root, the cluster belongs to and runs as the `postgres` user.
    ///
    /// # Panics
    /// When no PostgreSQL binaries are found, or `initdb` or the server start fails
    /// (the message includes their output and the server log).
    pub fn start(settings: &[(&str, &str)]) -> PrivateCluster {
        crate::leftovers::sweep();
        let bin = pg_bin_dir();
        let as_postgres = running_as_root();
        let random = uuid::Uuid::new_v4().simple().to_string();
        let dir = PathBuf::from(format!("/tmp/{DIR_PREFIX}{}", &random[..16]));
        let mut cluster = PrivateCluster {
            bin,
            data: dir.join("data"),
            dir,
            port: 0,
            as_postgres,
            settings: settings
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
        };
        // From here on, a panic drops `cluster`, which stops and deletes it.
        cluster.create_dir();
        cluster.initdb();
        let mut failures = Vec::new();
        for _ in 0..START_ATTEMPTS {
            cluster.port = free_port();
            match cluster.try_start() {
                Ok(()) => return cluster,
                Err(failure) => {
                    let port_taken = failure.contains("could not bind")
                        || failure.contains("Address already in use");
                    failures.push(failure);
                    if !port_taken {
                        break;
                    }
                    // Stop whatever half-started before trying the next port.
                    cluster.stop();
                }
            }
        }
        panic!(
            "cannot start a private PostgreSQL cluster in {} with {}:\n{}",
            cluster.dir.display(),
            cluster.bin.display(),
            failures.join("\n---\n")
        );
    }

    /// Stops the cluster in `dir` if it runs and deletes the folder (a cluster whose
    /// owner died, see [`crate::leftovers`]).
    pub(crate) fn discard(dir: PathBuf) {
        drop(PrivateCluster {
            bin: pg_bin_dir(),
            data: dir.join("data"),
            dir,
            port: 0,
            as_postgres: running_as_root(),
            settings: Vec::new(),
        });
    }

    /// The folder holding the cluster's data and log.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The URL of database `database` for the superuser `postgres` (trust, no TLS).
    pub fn url(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }

    /// The postmaster's process id (from `postmaster.pid`), `None` when it is not
    /// running.
    pub fn postmaster_pid(&self) -> Option<u32> {
        std::fs::read_to_string(self.data.join("postmaster.pid"))
            .ok()?
            .lines()
            .next()?
            .trim()
            .parse()
            .ok()
    }

    /// The TCP port the server listens on (127.0.0.1).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The server log so far, for failure messages.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(self.log()).unwrap_or_default()
    }

    fn log(&self) -> PathBuf {
        self.dir.join("log")
    }

    fn create_dir(&self) {
        std::fs::create_dir(&self.dir)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", self.dir.display()));
        // Whose cluster this is: a sweep stops it if this process dies without
        // dropping it.
        let owner = self.dir.join(crate::leftovers::OWNER_FILE);
        std::fs::write(&owner, crate::leftovers::own_identity())
            .unwrap_or_else(|e| panic!("cannot write {}: {e}", owner.display()));
        if self.as_postgres {
            let out = run(Command::new("chown")
                .arg("postgres:postgres")
                .arg(&self.dir));
            assert!(
                out.status.success(),
                "cannot give {} to the postgres user: {}",
                self.dir.display(),
                describe(&out)
            );
        }
    }

    fn initdb(&self) {
        let out = run(self.pg_command("initdb").arg("-D").arg(&self.data).args([
            "-U",
            "postgres",
            "--auth=trust",
            "-E",
            "UTF8",
            "--locale=C",
            "--no-sync",
        ]));
        assert!(
            out.status.success(),
            "initdb of a private cluster in {} failed: {}",
            self.data.display(),
            describe(&out)
        );
    }

    /// Shuts the server down (`fast`: sessions are ended, a checkpoint is written;
    /// `immediate`: like a crash, recovery runs at the next start) and waits.
    ///
    /// # Panics
    /// When `pg_ctl stop` fails.
    pub fn shut_down(&self, immediate: bool) {
        let mode = if immediate { "immediate" } else { "fast" };
        let out = run(self.pg_command("pg_ctl").arg("-D").arg(&self.data).args([
            "-m",
            mode,
            "-w",
            "-t",
            PG_CTL_TIMEOUT_SECS,
            "stop",
        ]));
        assert!(
            out.status.success(),
            "pg_ctl stop -m {mode} failed: {}",
            describe(&out)
        );
    }

    /// Starts the server again after [`PrivateCluster::shut_down`], on the same port
    /// with the same settings.
    ///
    /// # Panics
    /// When the server does not start (the message includes its log).
    pub fn start_again(&self) {
        if let Err(failure) = self.try_start() {
            panic!("cannot start the private cluster again: {failure}");
        }
    }

    fn try_start(&self) -> Result<(), String> {
        let mut options = format!(
            "-p {} -c listen_addresses=127.0.0.1 -c unix_socket_directories={}",
            self.port,
            shell_quote(&self.dir.display().to_string())
        );
        let settings = self.settings.iter().map(|(k, v)| (k.as_str(), v.as_str()));
        for (name, value) in [("fsync", "off")].into_iter().chain(settings) {
            options.push_str(&format!(" -c {}", shell_quote(&format!("{name}={value}"))));
        }
        let log = self.log();
        let out = run(self
            .pg_command("pg_ctl")
            .arg("-D")
            .arg(&self.data)
            .args(["-w", "-t", PG_CTL_TIMEOUT_SECS, "-o", &options, "-l"])
            .arg(&log)
            .arg("start"));
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "pg_ctl start on port {} failed: {}\nserver log {}:\n{}",
                self.port,
                describe(&out),
                log.display(),
                self.log_text()
            ))
        }
    }

    /// Stops the server if it runs; errors are ignored (it may not have started).
    fn stop(&self) {
        if self.data.join("postmaster.pid").exists() {
            let _ = run(self.pg_command("pg_ctl").arg("-D").arg(&self.data).args([
                "-m",
                "immediate",
                "-w",
                "-t",
                PG_CTL_TIMEOUT_SECS,
                "stop",
            ]));
        }
    }

    /// `program` from the binary directory, as the `postgres` user when we are root.
    fn pg_command(&self, program: &str) -> Command {
        let program = self.bin.join(program);
        let mut command = if self.as_postgres {
            let mut command = Command::new("runuser");
            command.args(["-u", "postgres", "--"]).arg(program);
            command
        } else {
            Command::new(program)
        };
        // The test's working directory may be closed to the postgres user.
        command.current_dir(&self.dir).stdin(Stdio::null());
        command
    }
}

impl Drop for PrivateCluster {
    fn drop(&mut self) {
        if !self.dir.exists() {
            return;
        }
        self.stop();
        if std::thread::panicking() {
            eprintln!(
                "--- private cluster log {} ---\n{}",
                self.log().display(),
                self.log_text()
            );
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Runs `command` to its end, capturing its output.
fn run(command: &mut Command) -> Output {
    command
        .output()
        .unwrap_or_else(|e| panic!("cannot run {command:?}: {e}"))
}

fn describe(out: &Output) -> String {
    format!(
        "{}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout).trim(),
        String::from_utf8_lossy(&out.stderr).trim()
    )
}

/// `text` in single quotes for `sh` (`pg_ctl -o` goes through the shell).
fn shell_quote(text: &str) -> String {
    format!("'{}'", text.replace('\'', r"'\''"))
}

/// Whether this process runs as root (the server refuses to run as root).
fn running_as_root() -> bool {
    static ROOT: OnceLock<bool> = OnceLock::new();
    *ROOT.get_or_init(|| {
        Command::new("id")
            .arg("-u")
            .output()
            .map(|out| String::from_utf8_lossy(&out.stdout).trim() == "0")
            .unwrap_or(false)
    })
}

/// The directory with `initdb`, `pg_ctl` and the client programs: `$OUTBOX_PG_BIN`,
/// else `OUTBOX_PG_BIN` from the settings file, else the newest
/// `/usr/lib/postgresql/*/bin`.
///
/// # Panics
/// When none is found (the message says how to get one).
pub fn pg_bin_dir() -> PathBuf {
    let from_env = std::env::var("OUTBOX_PG_BIN")
        .ok()
        .filter(|v| !v.trim().is_empty());
    let from_file = || {
        let text = std::fs::read_to_string(settings_file()).ok()?;
        parse_settings_file(&text)
            .into_iter()
            .find(|(name, value)| name == "OUTBOX_PG_BIN" && !value.is_empty())
            .map(|(_, value)| value)
    };
    if let Some(dir) = from_env.or_else(from_file) {
        return PathBuf::from(dir);
    }
    newest_installed(Path::new("/usr/lib/postgresql")).unwrap_or_else(|| {
        panic!(
            "no PostgreSQL binaries: OUTBOX_PG_BIN is not set (in the environment or the \
             settings file {}) and /usr/lib/postgresql/*/bin has no initdb; install \
             PostgreSQL or start the local environment with `{ENV_UP_COMMAND}`",
            settings_file().display()
        )
    })
}

/// The `bin` directory of the highest major version under `root` that has `initdb`
/// and `pg_ctl`.
fn newest_installed(root: &Path) -> Option<PathBuf> {
    std::fs::read_dir(root)
        .ok()?
        .filter_map(Result::ok)
        .filter_map(|entry| {
            let name = entry.file_name();
            let major: u32 = name.to_str()?.split('.').next()?.parse().ok()?;
            let bin = entry.path().join("bin");
            (bin.join("initdb").is_file() && bin.join("pg_ctl").is_file()).then_some((major, bin))
        })
        .max_by_key(|(major, _)| *major)
        .map(|(_, bin)| bin)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quotes_for_the_shell() {
        assert_eq!(shell_quote("wal_level=logical"), "'wal_level=logical'");
        assert_eq!(shell_quote("a'b"), r"'a'\''b'");
    }

    #[tokio::test]
    async fn starts_with_the_given_settings_and_cleans_up() {
        let cluster = PrivateCluster::start(&[("wal_level", "replica"), ("work_mem", "7MB")]);
        let dir = cluster.dir.clone();
        let pool = sqlx::PgPool::connect(&cluster.url("postgres"))
            .await
            .expect("connect to the private cluster");
        let wal_level: String = sqlx::query_scalar("SHOW wal_level")
            .fetch_one(&pool)
            .await
            .expect("SHOW wal_level");
        assert_eq!(wal_level, "replica");
        let work_mem: String = sqlx::query_scalar("SHOW work_mem")
            .fetch_one(&pool)
            .await
            .expect("SHOW work_mem");
        assert_eq!(work_mem, "7MB");
        pool.close().await;
        drop(cluster);
        assert!(!dir.exists(), "{} was not deleted", dir.display());
    }

    #[test]
    fn a_failed_start_names_the_cause_and_leaves_nothing_behind() {
        let panic = std::panic::catch_unwind(|| {
            PrivateCluster::start(&[("no_such_setting_here", "1")]);
        })
        .expect_err("the server refuses an unknown setting");
        let message = panic.downcast_ref::<String>().cloned().unwrap_or_default();
        assert!(message.contains("no_such_setting_here"), "{message}");
        let dir = message
            .split_whitespace()
            .find(|word| word.starts_with("/tmp/outbox-pc-"))
            .unwrap_or_else(|| panic!("no directory in: {message}"));
        assert!(!Path::new(dir).exists(), "{dir} was left behind");
    }
}
