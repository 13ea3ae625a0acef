//! What a run leaves behind when it dies without cleaning up (SIGKILL, an OOM
//! kill, a closed terminal): the brokers, services and relays it started keep
//! running, re-parented to init, and the private clusters it started keep running
//! too (`pg_ctl` puts the server in a session of its own).
//!
//! So every process started through this crate's helpers is recorded under
//! `/tmp/outbox-leftovers/<owner>/<process>` (each named by pid and start time, so a
//! reused pid is never mistaken for it), and every private cluster's and browser's
//! folder holds an `owner` file. [`sweep`] stops what an owner that is no longer
//! alive left: a recorded process that still runs is killed, a cluster is stopped
//! and deleted, a browser's folder deleted.
//! Nothing of a live owner is touched, so runs and tests in parallel are safe.
//! A browser's chromedriver and Chromium are recorded too. Clusters, brokers and
//! browsers sweep when they start (so the scenario runner and the benchmark, whose
//! every part starts a cluster, sweep before anything else); the demo, which starts
//! none, sweeps first thing. All three stop what they started on SIGINT and SIGTERM
//! ([`interrupted`]).

use std::path::{Path, PathBuf};

/// Where the records live: one folder per owner process.
const RECORDS: &str = "/tmp/outbox-leftovers";

/// The name of the owner file in a private cluster's folder.
pub(crate) const OWNER_FILE: &str = "owner";

/// A process as `pid-starttime`: the start time (clock ticks after boot, field 22
/// of `/proc/<pid>/stat`) tells a process from a later one given the same pid.
fn identity(pid: u32) -> Option<String> {
    Some(format!("{pid}-{}", start_time(pid)?))
}

fn start_time(pid: u32) -> Option<u64> {
    start_time_of(&crate::process::stat_fields(pid)?)
}

fn start_time_of(stat_fields: &[String]) -> Option<u64> {
    // Field 22 of the line is the 20th after the command name.
    stat_fields.get(19)?.parse().ok()
}

/// The `/proc/<pid>/stat` fields of `pid` while it runs: `None` when it is gone or
/// a zombie (exited, not yet reaped).
fn running(pid: u32) -> Option<Vec<String>> {
    crate::process::stat_fields(pid).filter(|fields| fields.first().is_some_and(|s| s != "Z"))
}

/// This process's identity, as written in records and owner files.
pub(crate) fn own_identity() -> String {
    identity(std::process::id()).unwrap_or_else(|| format!("{}-0", std::process::id()))
}

/// Whether the process named `identity` (`pid-starttime`) still runs.
fn alive(identity: &str) -> bool {
    let Some((pid, start)) = identity.split_once('-') else {
        return false;
    };
    let (Ok(pid), Ok(start)) = (pid.parse::<u32>(), start.parse::<u64>()) else {
        return false;
    };
    running(pid).and_then(|fields| start_time_of(&fields)) == Some(start)
}

/// Records process `pid`, just started by this process, so that a [`sweep`] after
/// this process's death stops it. Best effort: a record that cannot be written is
/// reported on stderr and the run goes on.
pub fn record(pid: u32) {
    let Some(child) = identity(pid) else {
        return; // already gone
    };
    let dir = Path::new(RECORDS).join(own_identity());
    let written = std::fs::create_dir_all(&dir).and_then(|()| std::fs::write(dir.join(child), b""));
    if let Err(e) = written {
        eprintln!(
            "testkit: cannot record process {pid} in {}: {e}",
            dir.display()
        );
    }
}

/// What a [`sweep`] stopped.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Swept {
    /// Recorded processes that were still running.
    pub processes: usize,
    /// Private clusters, stopped and deleted.
    pub clusters: usize,
}

impl Swept {
    /// Whether nothing was left.
    pub fn is_empty(&self) -> bool {
        *self == Swept::default()
    }
}

impl std::fmt::Display for Swept {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "stopped {} process{} and {} private cluster{} left running by a run that was killed",
            self.processes,
            if self.processes == 1 { "" } else { "es" },
            self.clusters,
            if self.clusters == 1 { "" } else { "s" }
        )
    }
}

/// Stops what runs that died without cleaning up left behind (see the module
/// documentation), and says so on stderr when there was something.
pub fn sweep() -> Swept {
    let mut swept = Swept::default();
    for owner in entries(Path::new(RECORDS)) {
        let Some(name) = file_name(&owner) else {
            continue;
        };
        if alive(&name) {
            continue;
        }
        for record in entries(&owner) {
            let Some(child) = file_name(&record) else {
                continue;
            };
            if alive(&child) {
                if let Some((pid, _)) = child.split_once('-') {
                    // A paused broker or service must run to die of anything but KILL;
                    // KILL needs no cooperation.
                    let _ = std::process::Command::new("kill")
                        .args(["-KILL", pid])
                        .status();
                    swept.processes += 1;
                }
            }
        }
        let _ = std::fs::remove_dir_all(&owner);
    }
    for dir in entries(Path::new("/tmp")) {
        let name = file_name(&dir).unwrap_or_default();
        let is_cluster = name.starts_with(crate::cluster::DIR_PREFIX);
        if !is_cluster && !name.starts_with(crate::browser::DIR_PREFIX) {
            continue;
        }
        // A folder without an owner file is still being created (or predates them).
        let Ok(owner) = std::fs::read_to_string(dir.join(OWNER_FILE)) else {
            continue;
        };
        if alive(owner.trim()) {
            continue;
        }
        if is_cluster {
            crate::cluster::PrivateCluster::discard(dir);
            swept.clusters += 1;
        } else {
            // A browser's profile (its processes are records of their own, just
            // killed). Its helpers may still write for a moment: the owner file goes
            // last, so a folder not yet emptied is swept again next time.
            let emptied = entries(&dir)
                .iter()
                .filter(|entry| !entry.ends_with(OWNER_FILE))
                .all(|entry| {
                    std::fs::remove_dir_all(entry)
                        .or_else(|_| std::fs::remove_file(entry))
                        .is_ok()
                });
            if emptied {
                let _ = std::fs::remove_file(dir.join(OWNER_FILE));
                let _ = std::fs::remove_dir(&dir);
            }
        }
    }
    if !swept.is_empty() {
        eprintln!("testkit: {swept}");
    }
    swept
}

/// Resolves at the first SIGINT or SIGTERM with the signal's name. A runner races
/// its work against this, so that an interrupted run drops (and so stops) what it
/// started instead of dying with it left running.
pub async fn interrupted() -> &'static str {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut int), Ok(mut term)) = (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) else {
        // Without handlers the default action ends the process; nothing to wait for.
        return std::future::pending().await;
    };
    tokio::select! {
        _ = int.recv() => "SIGINT",
        _ = term.recv() => "SIGTERM",
    }
}

fn entries(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .map(|entries| entries.filter_map(|e| Some(e.ok()?.path())).collect())
        .unwrap_or_default()
}

fn file_name(path: &Path) -> Option<String> {
    path.file_name()?.to_str().map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::BufRead;
    use std::process::{Command, Stdio};
    use std::time::{Duration, Instant};

    /// The role of the owner killed by the test below: starts a recorded `sleep` and a
    /// private cluster, says their pid and folder, and waits to be killed.
    #[test]
    #[ignore = "run by leftovers_of_a_killed_owner_are_swept_and_a_live_owners_are_not"]
    fn owner_role() {
        if std::env::var_os("OUTBOX_LEFTOVERS_OWNER").is_none() {
            return;
        }
        let mut child = Command::new("sleep")
            .arg("600")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("sleep");
        record(child.id());
        let cluster = crate::PrivateCluster::start(&[]);
        println!("ready {} {}", child.id(), cluster.dir().display());
        std::thread::sleep(Duration::from_secs(120));
        // Not reached when the test kills this process, as it should.
        let _ = child.kill();
        let _ = child.wait();
    }

    fn running(pid: u32) -> bool {
        super::running(pid).is_some()
    }

    #[test]
    fn leftovers_of_a_killed_owner_are_swept_and_a_live_owners_are_not() {
        // A child of this (live) process, recorded: no sweep may touch it.
        let mut ours = Command::new("sleep")
            .arg("600")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("sleep");
        record(ours.id());

        let mut owner = Command::new(std::env::current_exe().expect("test binary"))
            .args([
                "--exact",
                "leftovers::tests::owner_role",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env("OUTBOX_LEFTOVERS_OWNER", "1")
            .stdout(Stdio::piped())
            .spawn()
            .expect("owner");
        let mut lines = std::io::BufReader::new(owner.stdout.take().expect("stdout")).lines();
        let ready = loop {
            let line = lines
                .next()
                .expect("the owner ended before it was ready")
                .expect("owner output");
            // libtest prints "test <name> ... " before the test's own output.
            if let Some((_, rest)) = line.split_once("ready ") {
                break rest.to_owned();
            }
        };
        let (pid, dir) = ready.split_once(' ').expect("pid and folder");
        let (left_pid, cluster_dir) = (pid.parse::<u32>().expect("pid"), PathBuf::from(dir));
        let postmaster: u32 = std::fs::read_to_string(cluster_dir.join("data/postmaster.pid"))
            .expect("postmaster.pid")
            .lines()
            .next()
            .and_then(|l| l.trim().parse().ok())
            .expect("postmaster pid");

        owner.kill().expect("SIGKILL the owner");
        owner.wait().expect("reap the owner");
        assert!(running(left_pid), "the owner's child died with it");
        assert!(running(postmaster), "the owner's cluster died with it");

        // (A test starting a cluster in parallel may sweep them first; either way
        // they must be gone.)
        sweep();
        let deadline = Instant::now() + Duration::from_secs(10);
        while (running(left_pid) || running(postmaster)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        assert!(!running(left_pid), "the killed owner's child still runs");
        assert!(
            !running(postmaster),
            "the killed owner's cluster still runs"
        );
        assert!(!cluster_dir.exists(), "{} is left", cluster_dir.display());

        assert!(running(ours.id()), "a sweep killed a live owner's child");
        let _ = ours.kill();
        let _ = ours.wait();
    }
}
