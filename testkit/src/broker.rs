//! A private broker for one test: for faults (pause, restart) that must not touch
//! the broker every other test shares.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::settings::ENV_UP_COMMAND;

/// How long a private broker may take to listen.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// A `tansu broker` process on a free port, killed when dropped.
#[derive(Debug)]
pub struct PrivateBroker {
    child: Child,
    port: u16,
    storage: String,
    log: PathBuf,
}

impl PrivateBroker {
    /// Starts a broker with in-memory storage.
    ///
    /// # Panics
    /// When `tansu` is not installed (the message names the command that installs
    /// it) or does not listen in time.
    pub fn start() -> PrivateBroker {
        PrivateBroker::start_with_storage("memory://tansu/".to_owned())
    }

    /// Starts a broker storing into an SQLite file, so it survives a restart.
    pub fn start_durable(file: &std::path::Path) -> PrivateBroker {
        PrivateBroker::start_with_storage(format!("sqlite://{}", file.display()))
    }

    fn start_with_storage(storage: String) -> PrivateBroker {
        crate::leftovers::sweep();
        let port = free_port();
        let log = std::env::temp_dir().join(format!("tansu-{port}.log"));
        let child = spawn(port, &storage, &log);
        let broker = PrivateBroker {
            child,
            port,
            storage,
            log,
        };
        broker.wait_listening();
        broker
    }

    /// The `bootstrap.servers` value.
    pub fn bootstrap(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The process id, for signals.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Suspends the broker (SIGSTOP): connections stay open, nothing is answered.
    pub fn pause(&self) {
        signal(self.pid(), "STOP");
    }

    /// Resumes a paused broker (SIGCONT).
    pub fn resume(&self) {
        signal(self.pid(), "CONT");
    }

    /// Kills the broker and starts it again on the same port and storage.
    pub fn restart(&mut self) {
        self.stop();
        self.start_again();
    }

    /// Kills the broker (SIGKILL); [`PrivateBroker::start_again`] brings it back.
    pub fn stop(&mut self) {
        signal(self.pid(), "CONT");
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts a stopped broker again on the same port and storage.
    pub fn start_again(&mut self) {
        self.child = spawn(self.port, &self.storage, &self.log);
        self.wait_listening();
    }

    fn wait_listening(&self) {
        let deadline = Instant::now() + START_TIMEOUT;
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "tansu did not listen on {} within {START_TIMEOUT:?}; log: {}",
                self.port,
                self.log.display()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for PrivateBroker {
    fn drop(&mut self) {
        signal(self.pid(), "CONT");
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.log);
    }
}

fn spawn(port: u16, storage: &str, log: &std::path::Path) -> Child {
    let url = format!("tcp://127.0.0.1:{port}");
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap_or_else(|e| panic!("cannot open {}: {e}", log.display()));
    let err = out
        .try_clone()
        .unwrap_or_else(|e| panic!("cannot open {}: {e}", log.display()));
    Command::new(tansu_binary())
        .args([
            "broker",
            "--listener-url",
            &url,
            "--advertised-listener-url",
            &url,
        ])
        .args(["--storage-engine", storage])
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .inspect(|child| crate::leftovers::record(child.id()))
        .unwrap_or_else(|e| panic!("cannot start tansu ({e}); install it with `{ENV_UP_COMMAND}`"))
}

/// `tansu` from PATH, else from `~/.cargo/bin`.
fn tansu_binary() -> PathBuf {
    let on_path = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join("tansu"))
            .find(|p| p.is_file())
    });
    on_path.unwrap_or_else(|| {
        let home = std::env::var_os("HOME").unwrap_or_default();
        PathBuf::from(home).join(".cargo/bin/tansu")
    })
}

/// A TCP port nothing listens on right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or_else(|e| panic!("cannot find a free port: {e}"))
}

fn signal(pid: u32, name: &str) {
    let _ = Command::new("kill")
        .args([&format!("-{name}"), &pid.to_string()])
        .status();
}
