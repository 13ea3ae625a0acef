//! `scenarios`: replays failure scenarios against the real services, relays,
//! PostgreSQL and broker, and checks after each that nothing was lost, nothing
//! applied twice, every saga ended and stock and credit are conserved.
//!
//! ```text
//! scenarios list
//! scenarios run all [--rounds N]
//! scenarios run NAME [NAME...] [--rounds N]
//! ```
//!
//! Exits 1 when any scenario broke an invariant or could not run, 2 on bad usage.

#![allow(clippy::print_stdout)] // the report is the program's output

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use shop::lab::{LabSettings, Measurement};
use shop::scenarios::{self, Scenario};
use testkit::process::own_bin_dir;

#[derive(Debug, Parser)]
#[command(
    name = "scenarios",
    about = "Failure-scenario replays with invariant checks"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Lists the scenarios with the fault each injects and the promise it proves.
    List,
    /// Runs `all` scenarios or the named ones.
    Run {
        /// `all`, or scenario names.
        #[arg(required = true, value_name = "NAME")]
        names: Vec<String>,
        /// Runs each scenario this many times (the soak form), each on a fresh
        /// cluster and broker.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
        rounds: u32,
        /// Where the logs of the services, relays and broker go (a folder per scenario).
        #[arg(long, default_value = ".local/scenarios")]
        logs: PathBuf,
        /// Where the relay and service binaries are (default: beside this one).
        #[arg(long, value_name = "DIR")]
        bin_dir: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    shop::log_to_stderr();
    match cli.command {
        Command::List => {
            for (n, s) in scenarios::all().iter().enumerate() {
                println!(
                    "{:>2}. {}\n    fault:   {}\n    promise: {}\n",
                    n + 1,
                    s.name,
                    s.fault,
                    s.promise
                );
                if let Some(why) = s.pending {
                    println!("    not in `run all` yet: {why}\n");
                }
            }
            ExitCode::SUCCESS
        }
        Command::Run {
            names,
            rounds,
            logs,
            bin_dir,
        } => {
            let chosen = if names.iter().any(|n| n == "all") {
                let (pending, chosen): (Vec<_>, Vec<_>) = scenarios::all()
                    .into_iter()
                    .partition(|s| s.pending.is_some());
                for s in pending {
                    eprintln!(
                        "scenarios: {} is not part of `run all` yet ({}); run it by name",
                        s.name,
                        s.pending.unwrap_or_default()
                    );
                }
                chosen
            } else {
                let mut chosen = Vec::new();
                for name in &names {
                    match scenarios::find(name) {
                        Some(s) => chosen.push(s),
                        None => {
                            let known: Vec<_> = scenarios::all().iter().map(|s| s.name).collect();
                            eprintln!(
                                "scenarios: no scenario named {name:?}; known: all, {}",
                                known.join(", ")
                            );
                            return ExitCode::from(2);
                        }
                    }
                }
                chosen
            };
            let bin_dir =
                match bin_dir.map_or_else(|| own_bin_dir().map_err(anyhow::Error::from), Ok) {
                    Ok(dir) => dir,
                    Err(e) => {
                        eprintln!("scenarios: {e:#}");
                        return ExitCode::from(2);
                    }
                };
            for binary in [
                "outbox-relay",
                "order-service",
                "customer-service",
                "inventory-service",
                "payment-service",
            ] {
                if !bin_dir.join(binary).is_file() {
                    eprintln!(
                        "scenarios: {binary} is not in {}; build it first (scripts/scenarios does)",
                        bin_dir.display()
                    );
                    return ExitCode::from(2);
                }
            }
            let settings = LabSettings {
                bin_dir,
                log_root: logs,
                server_settings: Vec::new(),
            };
            let runtime = match tokio::runtime::Builder::new_multi_thread()
                .worker_threads(4)
                .enable_all()
                .build()
            {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("scenarios: cannot start the runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            let (rows, interrupted) = runtime.block_on(run(&chosen, rounds, &settings));
            summary(&rows, &settings, interrupted);
            if interrupted.is_some() {
                ExitCode::from(130)
            } else if rows
                .iter()
                .all(|r| r.outcome.as_ref().is_ok_and(Measurement::ok))
            {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

struct Row {
    scenario: Scenario,
    round: u32,
    outcome: anyhow::Result<Measurement>,
    took: Duration,
}

/// Runs the scenarios until done or a SIGINT/SIGTERM (then the one under way is
/// dropped, which stops its processes, cluster and broker); the rows and the signal.
async fn run(
    chosen: &[Scenario],
    rounds: u32,
    settings: &LabSettings,
) -> (Vec<Row>, Option<&'static str>) {
    let mut rows = Vec::new();
    for round in 1..=rounds {
        for scenario in chosen {
            let title = if rounds > 1 {
                format!("{} (round {round} of {rounds})", scenario.name)
            } else {
                scenario.name.to_owned()
            };
            println!(
                "\n=== {title}\n    fault:   {}\n    promise: {}",
                scenario.fault, scenario.promise
            );
            let started = Instant::now();
            let outcome = tokio::select! {
                outcome = scenario.run(settings) => outcome,
                signal = testkit::leftovers::interrupted() => return (rows, Some(signal)),
            };
            let took = started.elapsed();
            match &outcome {
                Ok(m) => {
                    print!("{m}");
                    println!(
                        "    {} in {:.1} s",
                        if m.ok() { "PASSED" } else { "FAILED" },
                        took.as_secs_f64()
                    );
                }
                Err(e) => println!(
                    "    COULD NOT RUN: {e:#}\n    logs: {}",
                    settings.log_root.join(scenario.name).display()
                ),
            }
            rows.push(Row {
                scenario: *scenario,
                round,
                outcome,
                took,
            });
        }
    }
    (rows, None)
}

fn summary(rows: &[Row], settings: &LabSettings, interrupted: Option<&str>) {
    // Right above the table, so that the end of a CI log explains its failures.
    for row in rows {
        if let Ok(m) = &row.outcome {
            if !m.ok() {
                println!(
                    "\n=== {} (round {}) FAILED: what the processes said",
                    row.scenario.name, row.round
                );
                for v in m.violations.iter().take(3) {
                    println!("    VIOLATED: {v}");
                }
                for line in &m.diagnosis {
                    println!("    {line}");
                }
            }
        }
    }
    println!("\n=== summary (copies: duplicate records on the topics; skipped: redeliveries the consumers' journals skipped; twice: commands applied twice)");
    println!(
        "{:<22} {:>5} {:>8} {:>9} {:>6} {:>7} {:>7} {:>8} {:>5} {:>9} {:>7}  result",
        "scenario",
        "round",
        "written",
        "delivered",
        "copies",
        "skipped",
        "twice",
        "terminal",
        "stuck",
        "conserved",
        "seconds"
    );
    for row in rows {
        match &row.outcome {
            Ok(m) => println!(
                "{:<22} {:>5} {:>8} {:>9} {:>6} {:>7} {:>7} {:>8} {:>5} {:>9} {:>7.1}  {}",
                row.scenario.name,
                row.round,
                m.events_written,
                m.events_delivered,
                m.duplicates_delivered,
                m.redeliveries_skipped,
                m.applied_twice,
                m.sagas_terminal,
                m.sagas_stuck,
                if m.conserved { "yes" } else { "NO" },
                row.took.as_secs_f64(),
                if m.ok() { "passed" } else { "FAILED" }
            ),
            Err(_) => println!(
                "{:<22} {:>5} {:>8} {:>9} {:>6} {:>7} {:>7} {:>8} {:>5} {:>9} {:>7.1}  COULD NOT RUN",
                row.scenario.name,
                row.round,
                "-",
                "-",
                "-",
                "-",
                "-",
                "-",
                "-",
                "-",
                row.took.as_secs_f64()
            ),
        }
    }
    let failed = rows
        .iter()
        .filter(|r| !r.outcome.as_ref().is_ok_and(Measurement::ok))
        .count();
    if let Some(signal) = interrupted {
        println!(
            "interrupted by {signal} after {} runs ({failed} failed): the scenario under way was stopped, with everything it had started",
            rows.len()
        );
    } else if failed == 0 {
        println!("all {} runs passed", rows.len());
    } else {
        println!(
            "{failed} of {} runs FAILED (logs under {})",
            rows.len(),
            settings.log_root.display()
        );
    }
}
