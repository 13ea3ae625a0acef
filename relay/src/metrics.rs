//! The relay's metrics, rendered as Prometheus text exposition format 0.0.4.
//!
//! Every metric is declared once: a name constant below and a [`Family`] that carries
//! its type and help text. [`Metrics::render`] walks [`Family::ALL`] and matches on
//! each family exhaustively, so a family cannot be declared without being rendered.
//! Values are plain atomics, updated without locks from the replication loop and
//! read by the HTTP server; each value is read on its own, so one scrape is not a
//! snapshot across metrics. The labels are fixed enums (the dead-letter reason and
//! the role), every value of which is rendered even at 0 so that `rate()` and
//! alerts see the series from the first scrape, and the sink's name on
//! [`SINK_INFO`]. The histograms,
//! [`COMMIT_TO_ACK`] and [`COMMIT_TO_SEND`], keep a count per bucket and render
//! them cumulatively, as Prometheus expects.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::deadletter::Reason;
use crate::health::{Health, Role};
use crate::Lsn;

/// Counter: outbox events delivered to their topic and acknowledged by the broker.
pub const EVENTS_ROUTED: &str = "outbox_relay_events_routed_total";
/// Counter: outbox events sent to the dead-letter topic, by [`Reason`] (its code as the `reason` label).
pub const EVENTS_DEAD_LETTERED: &str = "outbox_relay_events_dead_lettered_total";
/// Counter: bytes of routed records (key + value + headers).
pub const BYTES_ROUTED: &str = "outbox_relay_bytes_routed_total";
/// Gauge: records handed to the producer and not yet acknowledged.
pub const RECORDS_IN_FLIGHT: &str = "outbox_relay_records_in_flight";
/// Gauge: bytes of WAL the slot holds back: the server's WAL end minus the confirmed
/// position.
pub const SLOT_LAG_BYTES: &str = "outbox_relay_slot_lag_bytes";
/// Gauge: milliseconds between now and the commit time of the last acknowledged
/// transaction; 0 when idle and caught up.
pub const BEHIND_SOURCE_MS: &str = "outbox_relay_milliseconds_behind_source";
/// Histogram: seconds from a transaction's commit (the commit timestamp in the
/// stream, the database server's clock) to the broker's acknowledgement of each of
/// its records. Across hosts it includes the clock difference, as Debezium's
/// `MilliSecondsBehindSource` does.
pub const COMMIT_TO_ACK: &str = "outbox_relay_commit_to_ack_seconds";
/// Histogram: seconds from a transaction's commit to each of its records being
/// handed to the sink: the server's part (writing the commit, decoding, sending)
/// and the relay's routing. [`COMMIT_TO_ACK`] minus this is the broker's part.
pub const COMMIT_TO_SEND: &str = "outbox_relay_commit_to_send_seconds";
/// Upper bounds (seconds) of the buckets of [`COMMIT_TO_ACK`] and [`COMMIT_TO_SEND`]: fine below 25 ms,
/// where a healthy relay lives, coarse up to a minute for outages.
pub const COMMIT_TO_ACK_BUCKETS: [f64; 20] = [
    0.000_5, 0.001, 0.002, 0.003, 0.004, 0.005, 0.007_5, 0.01, 0.015, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];
/// Gauge: the WAL position last confirmed to the server, as an integer.
pub const CONFIRMED_LSN: &str = "outbox_relay_confirmed_lsn";
/// Counter: heartbeats (`pg_logical_emit_message`) written to the source database.
pub const HEARTBEATS_SENT: &str = "outbox_relay_heartbeats_total";
/// Counter: replication sessions started again after a transient error.
pub const RECONNECTS: &str = "outbox_relay_reconnects_total";
/// Gauge: 1 when `/health` reports healthy, 0 when not.
pub const UP: &str = "outbox_relay_healthy";
/// Gauge, by `role` (`active`, `standby`): 1 for the part the relay plays now.
pub const ROLE: &str = "outbox_relay_role";
/// Counter: slot holders that sent no status update for the takeover bound, whose
/// server process this relay ended to take the slot.
pub const TAKEOVERS: &str = "outbox_relay_takeovers_total";
/// Gauge: transactions the server streams while in progress, not yet ended.
pub const STREAMED_OPEN: &str = "outbox_relay_streamed_transactions_open";
/// Counter: bytes of streamed transactions written to spill files.
pub const SPILLED_BYTES: &str = "outbox_relay_spilled_bytes_total";
/// Gauge, by `sink` (`kafka`, `nats`, `rabbitmq`, `redis`): 1 for the sink the relay
/// delivers to, to label the other series by in queries (`* on() group_left(sink)`).
pub const SINK_INFO: &str = "outbox_relay_sink_info";

/// The `Content-Type` of [`Metrics::render`]'s output.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// A Prometheus metric type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Only goes up; the name ends in `_total`.
    Counter,
    /// Goes up and down.
    Gauge,
    /// Observations counted in buckets, with their sum and count.
    Histogram,
}

impl Kind {
    /// The word on the `# TYPE` line.
    pub const fn as_str(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        }
    }
}

/// One metric family: its name, type and help text, declared once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    /// [`EVENTS_ROUTED`]
    EventsRouted,
    /// [`EVENTS_DEAD_LETTERED`]
    EventsDeadLettered,
    /// [`BYTES_ROUTED`]
    BytesRouted,
    /// [`RECORDS_IN_FLIGHT`]
    RecordsInFlight,
    /// [`SLOT_LAG_BYTES`]
    SlotLagBytes,
    /// [`BEHIND_SOURCE_MS`]
    BehindSourceMs,
    /// [`COMMIT_TO_ACK`]
    CommitToAck,
    /// [`COMMIT_TO_SEND`]
    CommitToSend,
    /// [`CONFIRMED_LSN`]
    ConfirmedLsn,
    /// [`HEARTBEATS_SENT`]
    HeartbeatsSent,
    /// [`RECONNECTS`]
    Reconnects,
    /// [`UP`]
    Up,
    /// [`ROLE`]
    Role,
    /// [`TAKEOVERS`]
    Takeovers,
    /// [`STREAMED_OPEN`]
    StreamedOpen,
    /// [`SPILLED_BYTES`]
    SpilledBytes,
    /// [`SINK_INFO`]
    SinkInfo,
}

impl Family {
    /// Every family, in the order they are rendered.
    pub const ALL: [Family; 17] = [
        Family::EventsRouted,
        Family::EventsDeadLettered,
        Family::BytesRouted,
        Family::RecordsInFlight,
        Family::SlotLagBytes,
        Family::BehindSourceMs,
        Family::CommitToAck,
        Family::CommitToSend,
        Family::ConfirmedLsn,
        Family::HeartbeatsSent,
        Family::Reconnects,
        Family::Up,
        Family::Role,
        Family::Takeovers,
        Family::StreamedOpen,
        Family::SpilledBytes,
        Family::SinkInfo,
    ];

    /// The metric name.
    pub const fn name(self) -> &'static str {
        match self {
            Family::EventsRouted => EVENTS_ROUTED,
            Family::EventsDeadLettered => EVENTS_DEAD_LETTERED,
            Family::BytesRouted => BYTES_ROUTED,
            Family::RecordsInFlight => RECORDS_IN_FLIGHT,
            Family::SlotLagBytes => SLOT_LAG_BYTES,
            Family::BehindSourceMs => BEHIND_SOURCE_MS,
            Family::CommitToAck => COMMIT_TO_ACK,
            Family::CommitToSend => COMMIT_TO_SEND,
            Family::ConfirmedLsn => CONFIRMED_LSN,
            Family::HeartbeatsSent => HEARTBEATS_SENT,
            Family::Reconnects => RECONNECTS,
            Family::Up => UP,
            Family::Role => ROLE,
            Family::Takeovers => TAKEOVERS,
            Family::StreamedOpen => STREAMED_OPEN,
            Family::SpilledBytes => SPILLED_BYTES,
            Family::SinkInfo => SINK_INFO,
        }
    }

    /// The metric type.
    pub const fn kind(self) -> Kind {
        match self {
            Family::EventsRouted
            | Family::EventsDeadLettered
            | Family::BytesRouted
            | Family::HeartbeatsSent
            | Family::Reconnects
            | Family::Takeovers
            | Family::SpilledBytes => Kind::Counter,
            Family::RecordsInFlight
            | Family::SlotLagBytes
            | Family::BehindSourceMs
            | Family::ConfirmedLsn
            | Family::Up
            | Family::Role
            | Family::StreamedOpen
            | Family::SinkInfo => Kind::Gauge,
            Family::CommitToAck | Family::CommitToSend => Kind::Histogram,
        }
    }

    /// The `# HELP` text: one line, no backslashes.
    pub const fn help(self) -> &'static str {
        match self {
            Family::EventsRouted => "Outbox events delivered and acknowledged by the broker.",
            Family::EventsDeadLettered => "Outbox events sent to the dead-letter topic, by reason.",
            Family::BytesRouted => "Bytes of routed records: key, value and headers.",
            Family::RecordsInFlight => "Records handed to the producer, not yet acknowledged.",
            Family::SlotLagBytes => {
                "Bytes of WAL between the slot's confirmed position and the server's end of WAL."
            }
            Family::BehindSourceMs => {
                "Milliseconds since the commit of the last acknowledged transaction; \
                 0 when idle and caught up."
            }
            Family::CommitToAck => {
                "Seconds from a transaction's commit to the broker's acknowledgement of each \
                 of its records."
            }
            Family::CommitToSend => {
                "Seconds from a transaction's commit to each of its records being handed \
                 to the sink."
            }
            Family::ConfirmedLsn => "WAL position last confirmed to the server, as an integer.",
            Family::HeartbeatsSent => "Heartbeats written with pg_logical_emit_message.",
            Family::Reconnects => "Replication sessions started again after a transient error.",
            Family::Up => "1 when /health reports healthy, 0 when not.",
            Family::Role => {
                "1 for the part the relay plays now: active (streams) or standby \
                 (another process holds the slot)."
            }
            Family::Takeovers => {
                "Slot holders ended by this relay after sending no status update for \
                 the takeover bound."
            }
            Family::StreamedOpen => {
                "Transactions the server streams while in progress, kept until they end."
            }
            Family::SpilledBytes => "Bytes of streamed transactions written to spill files.",
            Family::SinkInfo => "1 for the sink records are delivered to, by name.",
        }
    }
}

/// The relay's counters and gauges, shared through an `Arc`. Every update is one
/// relaxed atomic operation.
#[derive(Debug, Default)]
pub struct Metrics {
    events_routed: AtomicU64,
    dead_lettered: [AtomicU64; Reason::ALL.len()],
    bytes_routed: AtomicU64,
    in_flight: AtomicU64,
    slot_lag_bytes: AtomicU64,
    behind_source_ms: AtomicU64,
    commit_to_ack: Histogram,
    commit_to_send: Histogram,
    confirmed_lsn: AtomicU64,
    heartbeats: AtomicU64,
    reconnects: AtomicU64,
    takeovers: AtomicU64,
    streamed_open: AtomicU64,
    spilled_bytes: AtomicU64,
    sink: std::sync::OnceLock<&'static str>,
}

impl Metrics {
    /// All values at 0.
    pub fn new() -> Metrics {
        Metrics::default()
    }

    /// The relay delivers to the sink named `name` (set once).
    pub fn set_sink(&self, name: &'static str) {
        let _ = self.sink.set(name);
    }

    /// `n` more events were routed and acknowledged.
    pub fn events_routed(&self, n: u64) {
        self.events_routed.fetch_add(n, Ordering::Relaxed);
    }

    /// `n` more bytes (key + value + headers) were routed.
    pub fn bytes_routed(&self, n: u64) {
        self.bytes_routed.fetch_add(n, Ordering::Relaxed);
    }

    /// One event went to the dead-letter topic for `reason`.
    pub fn dead_lettered(&self, reason: Reason) {
        self.dead_lettered[reason as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// `n` records are in flight now.
    pub fn set_in_flight(&self, n: u64) {
        self.in_flight.store(n, Ordering::Relaxed);
    }

    /// The slot holds back `n` bytes of WAL now.
    pub fn set_slot_lag_bytes(&self, n: u64) {
        self.slot_lag_bytes.store(n, Ordering::Relaxed);
    }

    /// The relay is `ms` milliseconds behind the source now.
    pub fn set_behind_source_ms(&self, ms: u64) {
        self.behind_source_ms.store(ms, Ordering::Relaxed);
    }

    /// A record whose transaction committed `latency` ago was acknowledged.
    pub fn commit_to_ack(&self, latency: Duration) {
        self.commit_to_ack.observe(latency);
    }

    /// A record whose transaction committed `latency` ago was handed to the sink.
    pub fn commit_to_send(&self, latency: Duration) {
        self.commit_to_send.observe(latency);
    }

    /// `lsn` was confirmed to the server.
    pub fn set_confirmed_lsn(&self, lsn: Lsn) {
        self.confirmed_lsn.store(lsn.get(), Ordering::Relaxed);
    }

    /// One heartbeat was written.
    pub fn heartbeat_sent(&self) {
        self.heartbeats.fetch_add(1, Ordering::Relaxed);
    }

    /// A replication session started again after a transient error.
    pub fn reconnected(&self) {
        self.reconnects.fetch_add(1, Ordering::Relaxed);
    }

    /// This relay ended a silent slot holder's server process to take the slot.
    pub fn took_over(&self) {
        self.takeovers.fetch_add(1, Ordering::Relaxed);
    }

    /// `n` streamed transactions are open now.
    pub fn set_streamed_open(&self, n: u64) {
        self.streamed_open.store(n, Ordering::Relaxed);
    }

    /// `n` more bytes were written to spill files.
    pub fn spilled_bytes(&self, n: u64) {
        self.spilled_bytes.fetch_add(n, Ordering::Relaxed);
    }

    /// Every metric in Prometheus text format 0.0.4: `# HELP` and `# TYPE` for each
    /// family, then its samples, every dead-letter reason included even at 0.
    /// [`UP`] is taken from `health`'s report at this moment.
    pub fn render(&self, health: &Health) -> String {
        let load = |value: &AtomicU64| value.load(Ordering::Relaxed);
        let mut out = String::with_capacity(2048);
        for family in Family::ALL {
            let name = family.name();
            line(
                &mut out,
                format_args!("# HELP {name} {help}", help = family.help()),
            );
            line(
                &mut out,
                format_args!("# TYPE {name} {kind}", kind = family.kind().as_str()),
            );
            let value = match family {
                Family::EventsDeadLettered => {
                    for reason in Reason::ALL {
                        line(
                            &mut out,
                            format_args!(
                                "{name}{{reason=\"{label}\"}} {value}",
                                label = reason.code(),
                                value = load(&self.dead_lettered[reason as usize]),
                            ),
                        );
                    }
                    continue;
                }
                Family::CommitToAck => {
                    self.commit_to_ack.render(&mut out, name);
                    continue;
                }
                Family::CommitToSend => {
                    self.commit_to_send.render(&mut out, name);
                    continue;
                }
                Family::Role => {
                    let role = health.report().role;
                    for each in Role::ALL {
                        line(
                            &mut out,
                            format_args!(
                                "{name}{{role=\"{label}\"}} {value}",
                                label = each.as_str(),
                                value = u64::from(role == Some(each)),
                            ),
                        );
                    }
                    continue;
                }
                Family::SinkInfo => {
                    if let Some(sink) = self.sink.get() {
                        line(&mut out, format_args!("{name}{{sink=\"{sink}\"}} 1"));
                    }
                    continue;
                }
                Family::EventsRouted => load(&self.events_routed),
                Family::BytesRouted => load(&self.bytes_routed),
                Family::RecordsInFlight => load(&self.in_flight),
                Family::SlotLagBytes => load(&self.slot_lag_bytes),
                Family::BehindSourceMs => load(&self.behind_source_ms),
                Family::ConfirmedLsn => load(&self.confirmed_lsn),
                Family::HeartbeatsSent => load(&self.heartbeats),
                Family::Reconnects => load(&self.reconnects),
                Family::Takeovers => load(&self.takeovers),
                Family::Up => u64::from(health.report().healthy),
                Family::StreamedOpen => load(&self.streamed_open),
                Family::SpilledBytes => load(&self.spilled_bytes),
            };
            line(&mut out, format_args!("{name} {value}"));
        }
        out
    }
}

/// A histogram of durations with the fixed buckets of [`COMMIT_TO_ACK_BUCKETS`]:
/// a count per bucket (not cumulative) and the sum in microseconds, each a
/// relaxed atomic. The count is the `+Inf` bucket, so the two always agree.
#[derive(Debug, Default)]
struct Histogram {
    /// One per bound, and the last for everything above the largest bound.
    buckets: [AtomicU64; COMMIT_TO_ACK_BUCKETS.len() + 1],
    sum_micros: AtomicU64,
}

impl Histogram {
    fn observe(&self, value: Duration) {
        let seconds = value.as_secs_f64();
        let index = COMMIT_TO_ACK_BUCKETS
            .iter()
            .position(|&bound| seconds <= bound)
            .unwrap_or(COMMIT_TO_ACK_BUCKETS.len());
        self.buckets[index].fetch_add(1, Ordering::Relaxed);
        let micros = u64::try_from(value.as_micros()).unwrap_or(u64::MAX);
        self.sum_micros.fetch_add(micros, Ordering::Relaxed);
    }

    /// `name_bucket{le=...}` (cumulative, `+Inf` last), `name_sum`, `name_count`.
    fn render(&self, out: &mut String, name: &str) {
        let mut cumulative = 0;
        for (index, bucket) in self.buckets.iter().enumerate() {
            cumulative += bucket.load(Ordering::Relaxed);
            match COMMIT_TO_ACK_BUCKETS.get(index) {
                Some(bound) => line(
                    out,
                    format_args!("{name}_bucket{{le=\"{bound}\"}} {cumulative}"),
                ),
                None => line(
                    out,
                    format_args!("{name}_bucket{{le=\"+Inf\"}} {cumulative}"),
                ),
            }
        }
        let sum = self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
        line(out, format_args!("{name}_sum {sum}"));
        line(out, format_args!("{name}_count {cumulative}"));
    }
}

fn line(out: &mut String, args: std::fmt::Arguments<'_>) {
    // Writing to a String cannot fail.
    let _ = out.write_fmt(args);
    out.push('\n');
}

#[cfg(test)]
mod tests;
