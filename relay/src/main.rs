//! `outbox-relay`: the sidecar binary.

// A command-line tool: `init` and `check` print their reports on stdout.
#![allow(clippy::print_stdout)]

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use outbox_relay::config::{Args, RelayConfig};
use outbox_relay::runner::{error_chain, run};

/// Relays committed outbox rows from PostgreSQL logical replication (pgoutput) to
/// Kafka (or NATS JetStream, RabbitMQ, Redis Streams: --sink), confirming the
/// replication slot only after the destination acknowledged.
///
/// Without a command it streams. Every option can also be set in the TOML file given
/// with --config and as an environment variable; flags win over the environment,
/// which wins over the file. Logging is configured with OUTBOX_RELAY_LOG (e.g.
/// "info", "outbox_relay=debug"); traces are exported over OTLP/HTTP when
/// OTEL_EXPORTER_OTLP_ENDPOINT is set.
#[derive(Debug, Parser)]
#[command(name = "outbox-relay", version, args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    args: Args,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Stream outbox rows to the sink (the default).
    Run {
        #[command(flatten)]
        args: Args,
    },
    /// Create the publication and the slot, then exit. Run it before the service
    /// writes its first row: rows committed before the slot exists are not in its
    /// stream; with snapshot_mode=initial (the default) the first start publishes
    /// the rows already in the table instead.
    Init {
        #[command(flatten)]
        args: Args,
    },
    /// Check the configuration, PostgreSQL (connection, privileges, wal_level, outbox
    /// table, publication, slot) and the configured sink without changing anything;
    /// exit 1 if anything is wrong.
    Check {
        #[command(flatten)]
        args: Args,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Logs as set by OUTBOX_RELAY_LOG; spans exported over OTLP/HTTP when
    // OTEL_EXPORTER_OTLP_ENDPOINT is set (docs/tracing.md).
    telemetry::init("outbox-relay", "OUTBOX_RELAY_LOG");
    let code = relay(cli);
    // The last publish spans, still queued, go out before the process ends.
    telemetry::shutdown();
    code
}

fn relay(cli: Cli) -> ExitCode {
    if let Err(error) = failpoints::init() {
        eprintln!("outbox-relay: {error}");
        return ExitCode::from(2);
    }
    let (command, args) = match cli.command {
        None => ("run", cli.args),
        Some(Command::Run { args }) => ("run", args),
        Some(Command::Init { args }) => ("init", args),
        Some(Command::Check { args }) => ("check", args),
    };
    let config = match RelayConfig::from_args(&args) {
        Ok(config) => config,
        Err(error) => {
            eprintln!("outbox-relay: {}", error_chain(&error));
            return ExitCode::from(2);
        }
    };
    // One thread: the replication loop is one task that hands records to
    // librdkafka's own threads, and the HTTP endpoints and heartbeats are light.
    // Against a multi-threaded runtime this saved a fifth of the CPU per event
    // (fewer wake-ups across threads; BENCHMARKS.md).
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("outbox-relay: cannot start the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match command {
        "init" => match runtime.block_on(outbox_relay::admin::init(&config)) {
            Ok(summary) => {
                println!("{summary}");
                ExitCode::SUCCESS
            }
            Err(error) => {
                eprintln!("outbox-relay: {}", error_chain(&error));
                ExitCode::FAILURE
            }
        },
        "check" => {
            let report = runtime.block_on(outbox_relay::admin::check(&config));
            print!("{report}");
            if report.ok() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        _ => match runtime.block_on(run(config, shutdown_signal())) {
            Ok(()) => ExitCode::SUCCESS,
            Err(error) => {
                tracing::error!(error = %error_chain(&error), "stopped");
                eprintln!("outbox-relay: {}", error_chain(&error));
                ExitCode::FAILURE
            }
        },
    }
}

/// Resolves on SIGTERM or SIGINT.
async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(error) => {
            tracing::error!(%error, "cannot listen for SIGTERM");
            return std::future::pending().await;
        }
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: draining"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: draining"),
    }
}
