//! What a failed scenario run prints besides its violations, so that a failure
//! seen only in CI output (where `.local/scenarios` is gone with the machine) can
//! be explained: each relay's own account (`/health`, its counters) taken while
//! the shop still runs, and the last warnings and errors of every process's log.

use std::path::Path;

use crate::harness::Shop;
use crate::lab::metrics_text;

/// The relays' counters worth reading when events went missing.
const RELAY_METRICS: [&str; 7] = [
    "outbox_relay_role",
    "outbox_relay_events_routed_total",
    "outbox_relay_events_dead_lettered_total",
    "outbox_relay_records_in_flight",
    "outbox_relay_reconnects_total",
    "outbox_relay_takeovers_total",
    "outbox_relay_confirmed_lsn",
];

/// Warnings and errors kept per process log.
const LOG_LINES: usize = 4;
/// Longer lines are cut there.
const LINE_CHARS: usize = 400;

/// Each relay's `/health` answer and counters, while the shop runs.
pub async fn relays(shop: &mut Shop) -> Vec<String> {
    let mut lines = Vec::new();
    for name in shop.process_names() {
        if !name.starts_with("relay-") {
            continue;
        }
        let health = match shop.health_url(&name) {
            Ok(url) => match reqwest::Client::new()
                .get(&url)
                .timeout(std::time::Duration::from_secs(5))
                .send()
                .await
            {
                Ok(r) => format!("{} {}", r.status(), r.text().await.unwrap_or_default()),
                Err(e) => format!("no answer: {e}"),
            },
            Err(e) => format!("{e:#}"),
        };
        lines.push(format!("{name} /health: {}", cut(health.trim())));
        match metrics_text(shop, &name).await {
            Ok(text) => {
                let counters: Vec<&str> = text
                    .lines()
                    .filter(|l| RELAY_METRICS.iter().any(|m| l.starts_with(m)))
                    .collect();
                lines.push(format!("{name} metrics: {}", counters.join("; ")));
            }
            Err(e) => lines.push(format!("{name} metrics: {e:#}")),
        }
    }
    lines
}

/// The last warnings and errors of every process log in `dir` (sqlx's slow
/// statements left out: the loads run them on purpose).
pub fn log_tails(dir: &Path) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut logs: Vec<_> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "log"))
        .collect();
    logs.sort();
    let mut lines = Vec::new();
    for log in logs {
        let Ok(text) = std::fs::read_to_string(&log) else {
            continue;
        };
        let name = log
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        let notable: Vec<&str> = text
            .lines()
            .filter(|l| {
                (l.contains(" WARN ") || l.contains(" ERROR ")) && !l.contains("slow statement")
            })
            .collect();
        if notable.is_empty() {
            continue;
        }
        let skipped = notable.len().saturating_sub(LOG_LINES);
        lines.push(format!(
            "{name}: {} warnings and errors{}",
            notable.len(),
            if skipped > 0 {
                format!(", the last {LOG_LINES}")
            } else {
                String::new()
            }
        ));
        lines.extend(notable[skipped..].iter().map(|l| format!("  {}", cut(l))));
    }
    lines
}

fn cut(line: &str) -> String {
    match line.char_indices().nth(LINE_CHARS) {
        Some((at, _)) => format!("{}…", &line[..at]),
        None => line.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_tails_keep_the_last_warnings_and_errors_of_each_log() {
        let dir = std::env::temp_dir().join(testkit::unique_name("post-mortem"));
        std::fs::create_dir_all(&dir).unwrap();
        let mut text = String::new();
        for i in 0..12 {
            text.push_str(&format!("2026-01-01T00:00:00Z  WARN relay: trouble {i}\n"));
            text.push_str("2026-01-01T00:00:00Z  INFO relay: fine\n");
        }
        text.push_str("2026-01-01T00:00:00Z  WARN sqlx::query: slow statement: x\n");
        std::fs::write(dir.join("relay-order.log"), text).unwrap();
        std::fs::write(dir.join("quiet.log"), "2026  INFO all well\n").unwrap();
        std::fs::write(dir.join("notes.txt"), " ERROR not a log\n").unwrap();
        let lines = log_tails(&dir);
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(lines[0], "relay-order: 12 warnings and errors, the last 4");
        assert_eq!(lines.len(), 5, "{lines:?}");
        assert!(lines[1].ends_with("trouble 8"), "{lines:?}");
        assert!(lines[4].ends_with("trouble 11"), "{lines:?}");
    }

    #[test]
    fn long_lines_are_cut() {
        let long = "x".repeat(LINE_CHARS + 5);
        assert_eq!(cut(&long).chars().count(), LINE_CHARS + 1);
        assert_eq!(cut("short"), "short");
    }
}
