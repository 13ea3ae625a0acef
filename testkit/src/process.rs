//! Looking at the processes a benchmark or scenario starts: where the workspace's
//! binaries are, how much memory and CPU time a process used, and what its
//! `/metrics` say.

use std::path::{Path, PathBuf};

/// The folder of the running executable, where cargo put the workspace's other
/// binaries.
pub fn own_bin_dir() -> std::io::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    exe.parent()
        .map(Path::to_path_buf)
        .ok_or_else(|| std::io::Error::other(format!("{} has no parent folder", exe.display())))
}

/// Resident and peak resident memory (`VmRSS`, `VmHWM`) of process `pid`, in KiB;
/// `None` when it is gone.
pub fn memory_kib(pid: u32) -> Option<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
    };
    Some((field("VmRSS:")?, field("VmHWM:")?))
}

/// CPU time (user + system) process `pid` has used so far, in seconds; `None` when
/// it is gone. Resolution: one clock tick (10 ms on Linux).
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    let fields = stat_fields(pid)?;
    // utime and stime are fields 14 and 15 of the whole line, 12 and 13 here.
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    Some(ticks as f64 / clock_ticks_per_second())
}

/// The fields of `/proc/<pid>/stat` after the command name (field 3 of the line
/// comes first); `None` when the process is gone. The command name may hold
/// spaces and parentheses, so the line is split after its last `)`.
pub(crate) fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = stat.get(stat.rfind(')')? + 2..)?;
    Some(rest.split_whitespace().map(str::to_owned).collect())
}

/// The children of process `parent` (from `/proc`), each with its command line
/// (arguments joined by spaces; a PostgreSQL backend shows its role there, e.g.
/// `postgres: walsender ...`).
pub fn children(parent: u32) -> Vec<(u32, String)> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|pid| {
            // Field 4 of the line, the parent, is the second after the command name.
            let ppid: u32 = stat_fields(pid)?.get(1)?.parse().ok()?;
            if ppid != parent {
                return None;
            }
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
            let text = String::from_utf8_lossy(&cmdline)
                .split('\0')
                .filter(|a| !a.is_empty())
                .collect::<Vec<_>>()
                .join(" ");
            Some((pid, text))
        })
        .collect()
}

/// CPU time (user + system) the whole machine has used so far, in seconds, summed
/// over its CPUs (`/proc/stat`).
pub fn machine_cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    // user nice system idle iowait irq softirq steal ...: everything but idle and iowait.
    let ticks: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|v| v.parse().unwrap_or(0))
        .collect();
    let busy: u64 = ticks
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != 3 && *i != 4)
        .map(|(_, v)| v)
        .sum();
    Some(busy as f64 / clock_ticks_per_second())
}

/// `sysconf(_SC_CLK_TCK)`, asked of `getconf` once (100 where it cannot tell).
fn clock_ticks_per_second() -> f64 {
    static TICKS: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|t| t.trim().parse().ok())
            .unwrap_or(100.0)
    })
}

/// The value of metric `name` in Prometheus text, summed over its label sets
/// (0 when absent).
pub fn metric_sum(text: &str, name: &str) -> u64 {
    text.lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .map(|v| v as u64)
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_a_metric_over_its_labels_and_ignores_longer_names() {
        let text = "# HELP x_total a counter\n\
                    x_total{a=\"1\"} 3\n\
                    x_total{a=\"2\"} 4\n\
                    x_total_other 100\n\
                    x 7\n";
        assert_eq!(metric_sum(text, "x_total"), 7);
        assert_eq!(metric_sum(text, "x"), 7);
        assert_eq!(metric_sum(text, "missing"), 0);
    }

    #[test]
    fn counts_its_own_cpu_time() {
        let before = cpu_seconds(std::process::id()).expect("own /proc stat");
        let started = std::time::Instant::now();
        let mut x = 0u64;
        while started.elapsed() < std::time::Duration::from_millis(300) {
            x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(7));
        }
        let after = cpu_seconds(std::process::id()).expect("own /proc stat");
        assert!(after - before >= 0.1, "{before} -> {after}");
        assert!(cpu_seconds(u32::MAX).is_none());
        let machine = machine_cpu_seconds().expect("/proc/stat");
        assert!(
            machine >= after,
            "the machine {machine} s, this process {after} s"
        );
    }

    #[test]
    fn finds_its_children() {
        let mut child = std::process::Command::new("sleep")
            .arg("5")
            .spawn()
            .expect("sleep runs");
        // Right after the spawn the child's command line can still read empty
        // (the exec is under way), so look again for a while.
        let started = std::time::Instant::now();
        let (seen, found) = loop {
            let found = children(std::process::id());
            let seen = found
                .iter()
                .any(|(pid, cmd)| *pid == child.id() && cmd == "sleep 5");
            if seen || started.elapsed() > std::time::Duration::from_secs(3) {
                break (seen, found);
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        };
        let _ = child.kill();
        let _ = child.wait();
        assert!(seen, "{found:?}");
    }

    #[test]
    fn reads_its_own_memory() {
        let (rss, peak) = memory_kib(std::process::id()).expect("own /proc status");
        assert!(rss > 0 && peak >= rss, "rss {rss} peak {peak}");
    }
}
