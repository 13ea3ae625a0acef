//! The relay's metrics, rendered as Prometheus text exposition format 0.0.4.
//!
//! Every metric is declared once: a name constant below and a [`Family`] that carries
//! its type and help text. [`Metrics::render`] walks [`Family::ALL`] and matches on
//! each family exhaustively, so a family cannot be declared without being rendered.
//! Values are plain atomics, updated without locks from the replication loop and
//! read by the HTTP server; each value is read on its own, so one scrape is not a
//! snapshot across metrics. The only label is the dead-letter reason, a fixed enum of
//! three values, every one of which is rendered even at 0 so that `rate()` and
//! alerts see the series from the first scrape. The one histogram,
//! [`COMMIT_TO_ACK`], keeps a count per bucket and renders them cumulatively, as
//! Prometheus expects.

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
/// Upper bounds (seconds) of the buckets of [`COMMIT_TO_ACK`]: fine below 25 ms,
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
}

impl Family {
    /// Every family, in the order they are rendered.
    pub const ALL: [Family; 13] = [
        Family::EventsRouted,
        Family::EventsDeadLettered,
        Family::BytesRouted,
        Family::RecordsInFlight,
        Family::SlotLagBytes,
        Family::BehindSourceMs,
        Family::CommitToAck,
        Family::ConfirmedLsn,
        Family::HeartbeatsSent,
        Family::Reconnects,
        Family::Up,
        Family::Role,
        Family::Takeovers,
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
            Family::ConfirmedLsn => CONFIRMED_LSN,
            Family::HeartbeatsSent => HEARTBEATS_SENT,
            Family::Reconnects => RECONNECTS,
            Family::Up => UP,
            Family::Role => ROLE,
            Family::Takeovers => TAKEOVERS,
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
            | Family::Takeovers => Kind::Counter,
            Family::RecordsInFlight
            | Family::SlotLagBytes
            | Family::BehindSourceMs
            | Family::ConfirmedLsn
            | Family::Up
            | Family::Role => Kind::Gauge,
            Family::CommitToAck => Kind::Histogram,
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
    confirmed_lsn: AtomicU64,
    heartbeats: AtomicU64,
    reconnects: AtomicU64,
    takeovers: AtomicU64,
}

impl Metrics {
    /// All values at 0.
    pub fn new() -> Metrics {
        Metrics::default()
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
mod tests {
    use std::collections::{BTreeMap, BTreeSet, HashMap};
    use std::sync::Arc;

    use super::*;
    use crate::health::{HealthThresholds, ManualClock};

    /// One parsed sample: name, labels in text form (empty without labels), value.
    type Samples = BTreeMap<(String, String), String>;

    fn is_name(s: &str) -> bool {
        let mut chars = s.chars();
        matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_' || c == ':')
            && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
    }

    fn is_labels(s: &str) -> bool {
        s.split(',').all(|pair| {
            pair.split_once('=').is_some_and(|(key, value)| {
                is_name(key)
                    && value.len() >= 2
                    && value.starts_with('"')
                    && value.ends_with('"')
                    && !value[1..value.len() - 1].contains(['"', '\\', '\n'])
            })
        })
    }

    /// A small checker of the text format: every line is `# HELP`, `# TYPE` or a
    /// sample `name{labels} value`; every sample's family has HELP and TYPE before
    /// it, once each; counters end in `_total`; the output ends with a newline.
    fn parse(text: &str) -> Samples {
        assert!(text.ends_with('\n'), "no final newline");
        let mut help = BTreeSet::new();
        let mut types: HashMap<String, String> = HashMap::new();
        let mut samples = Samples::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# HELP ") {
                let (name, doc) = rest.split_once(' ').expect("HELP has a name and text");
                assert!(is_name(name), "bad name in {line:?}");
                assert!(!doc.is_empty() && !doc.contains('\\'), "bad help {line:?}");
                assert!(help.insert(name.to_owned()), "second HELP for {name}");
                continue;
            }
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').expect("TYPE has a name and type");
                assert!(is_name(name), "bad name in {line:?}");
                assert!(
                    ["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind),
                    "bad type {line:?}"
                );
                if kind == "counter" {
                    assert!(name.ends_with("_total"), "counter {name} lacks _total");
                }
                assert!(help.contains(name), "TYPE before HELP for {name}");
                assert!(
                    types.insert(name.to_owned(), kind.to_owned()).is_none(),
                    "second TYPE for {name}"
                );
                continue;
            }
            assert!(!line.starts_with('#'), "unexpected comment {line:?}");
            let (series, value) = line.rsplit_once(' ').expect("sample has a value");
            let (name, labels) = match series.split_once('{') {
                Some((name, rest)) => {
                    let labels = rest.strip_suffix('}').expect("labels close");
                    assert!(is_labels(labels), "bad labels in {line:?}");
                    (name, labels)
                }
                None => (series, ""),
            };
            assert!(is_name(name), "bad name in {line:?}");
            let family = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|suffix| {
                    name.strip_suffix(suffix)
                        .filter(|base| types.get(*base).is_some_and(|k| k == "histogram"))
                })
                .unwrap_or(name);
            assert!(types.contains_key(family), "sample before TYPE: {line:?}");
            if types[family] == "histogram" {
                assert_ne!(family, name, "histogram sample without suffix: {line:?}");
                assert_eq!(
                    name.ends_with("_bucket"),
                    labels.starts_with("le=\""),
                    "{line:?}"
                );
            }
            assert!(value.parse::<f64>().is_ok(), "bad value in {line:?}");
            let key = (name.to_owned(), labels.to_owned());
            assert!(
                samples.insert(key, value.to_owned()).is_none(),
                "{line:?} twice"
            );
        }
        for name in &help {
            assert!(types.contains_key(name), "HELP without TYPE for {name}");
        }
        samples
    }

    fn value(samples: &Samples, name: &str, labels: &str) -> String {
        samples
            .get(&(name.to_owned(), labels.to_owned()))
            .unwrap_or_else(|| panic!("no sample {name}{{{labels}}}"))
            .clone()
    }

    fn health() -> (Health, ManualClock) {
        let clock = ManualClock::new();
        let health = Health::with_clock(HealthThresholds::default(), Arc::new(clock.clone()));
        (health, clock)
    }

    #[test]
    fn every_family_is_rendered_with_zero_values() {
        let (health, _clock) = health();
        let samples = parse(&Metrics::new().render(&health));
        let names: BTreeSet<&str> = samples.keys().map(|(name, _)| name.as_str()).collect();
        let bucket = format!("{COMMIT_TO_ACK}_bucket");
        let sum = format!("{COMMIT_TO_ACK}_sum");
        let count = format!("{COMMIT_TO_ACK}_count");
        let expected: BTreeSet<&str> = [
            EVENTS_ROUTED,
            EVENTS_DEAD_LETTERED,
            BYTES_ROUTED,
            RECORDS_IN_FLIGHT,
            SLOT_LAG_BYTES,
            BEHIND_SOURCE_MS,
            &bucket,
            &sum,
            &count,
            CONFIRMED_LSN,
            HEARTBEATS_SENT,
            RECONNECTS,
            UP,
            ROLE,
            TAKEOVERS,
        ]
        .into_iter()
        .collect();
        assert_eq!(names, expected);
        // One sample per family, but a reason per dead-letter sample, a role per
        // role sample, and a bucket per bound (and +Inf), a sum and a count for the
        // histogram.
        assert_eq!(
            samples.len(),
            Family::ALL.len() - 3
                + Reason::ALL.len()
                + Role::ALL.len()
                + COMMIT_TO_ACK_BUCKETS.len()
                + 3
        );
        for reason in ["too_large", "bad_row", "bad_route", "undeliverable"] {
            let labels = format!("reason=\"{reason}\"");
            assert_eq!(value(&samples, EVENTS_DEAD_LETTERED, &labels), "0");
        }
        assert!(samples.values().all(|v| v == "0"), "{samples:?}");
    }

    #[test]
    fn families_are_consistent() {
        let names: BTreeSet<&str> = Family::ALL.iter().map(|f| f.name()).collect();
        assert_eq!(names.len(), Family::ALL.len(), "duplicate names");
        for family in Family::ALL {
            let name = family.name();
            assert!(name.starts_with("outbox_relay_"), "{name}");
            assert_eq!(
                family.kind() == Kind::Counter,
                name.ends_with("_total"),
                "{name}"
            );
            assert!(
                ["_bucket", "_sum", "_count"]
                    .iter()
                    .all(|suffix| !name.ends_with(suffix)),
                "{name}"
            );
            assert!(!family.help().contains(['\n', '\\']), "{name}");
        }
    }

    #[test]
    fn values_reflect_calls() {
        let (health, _clock) = health();
        let metrics = Metrics::new();
        metrics.events_routed(3);
        metrics.events_routed(4);
        metrics.bytes_routed(1000);
        metrics.bytes_routed(24);
        metrics.dead_lettered(Reason::TooLarge);
        metrics.dead_lettered(Reason::BadRow);
        metrics.dead_lettered(Reason::BadRow);
        metrics.set_in_flight(9);
        metrics.set_in_flight(5);
        metrics.set_slot_lag_bytes(4096);
        metrics.set_behind_source_ms(250);
        metrics.heartbeat_sent();
        metrics.heartbeat_sent();
        metrics.reconnected();
        let samples = parse(&metrics.render(&health));
        assert_eq!(value(&samples, EVENTS_ROUTED, ""), "7");
        assert_eq!(value(&samples, BYTES_ROUTED, ""), "1024");
        let dead = |reason: &str| {
            value(
                &samples,
                EVENTS_DEAD_LETTERED,
                &format!("reason=\"{reason}\""),
            )
        };
        assert_eq!(dead("too_large"), "1");
        assert_eq!(dead("bad_row"), "2");
        assert_eq!(dead("undeliverable"), "0");
        assert_eq!(value(&samples, RECORDS_IN_FLIGHT, ""), "5");
        assert_eq!(value(&samples, SLOT_LAG_BYTES, ""), "4096");
        assert_eq!(value(&samples, BEHIND_SOURCE_MS, ""), "250");
        assert_eq!(value(&samples, HEARTBEATS_SENT, ""), "2");
        assert_eq!(value(&samples, RECONNECTS, ""), "1");
        metrics.set_behind_source_ms(0);
        let samples = parse(&metrics.render(&health));
        assert_eq!(value(&samples, BEHIND_SOURCE_MS, ""), "0");
    }

    #[test]
    fn commit_to_ack_is_a_cumulative_histogram() {
        let (health, _clock) = health();
        let metrics = Metrics::new();
        for micros in [100, 500, 501, 4_000, 9_999, 10_000, 10_001, 61_000_000] {
            metrics.commit_to_ack(Duration::from_micros(micros));
        }
        let samples = parse(&metrics.render(&health));
        let bucket = |le: &str| {
            value(
                &samples,
                &format!("{COMMIT_TO_ACK}_bucket"),
                &format!("le=\"{le}\""),
            )
        };
        // A bound includes the observations equal to it.
        assert_eq!(bucket("0.0005"), "2");
        assert_eq!(bucket("0.001"), "3");
        assert_eq!(bucket("0.004"), "4");
        assert_eq!(bucket("0.01"), "6");
        assert_eq!(bucket("0.015"), "7");
        assert_eq!(bucket("60"), "7");
        assert_eq!(bucket("+Inf"), "8");
        assert_eq!(value(&samples, &format!("{COMMIT_TO_ACK}_count"), ""), "8");
        let sum: f64 = value(&samples, &format!("{COMMIT_TO_ACK}_sum"), "")
            .parse()
            .expect("a number");
        assert!((sum - 61.035_101).abs() < 1e-9, "{sum}");
        // Cumulative: never decreasing along the bounds.
        let mut last = 0u64;
        for bound in COMMIT_TO_ACK_BUCKETS {
            let n: u64 = bucket(&bound.to_string()).parse().expect("a number");
            assert!(n >= last, "{bound}: {n} < {last}");
            last = n;
        }
    }

    #[test]
    fn lsn_is_rendered_as_an_exact_integer() {
        let (health, _clock) = health();
        let metrics = Metrics::new();
        // Above 2^53, where a float would round.
        let lsn: Lsn = "FFFFFFFF/FFFFFFFF".parse().expect("valid LSN");
        metrics.set_confirmed_lsn(lsn);
        let text = metrics.render(&health);
        assert!(
            text.contains(&format!("\n{CONFIRMED_LSN} 18446744073709551615\n")),
            "{text}"
        );
        let raw = (1u64 << 53) + 1;
        metrics.set_confirmed_lsn(Lsn::new(raw));
        let samples = parse(&metrics.render(&health));
        assert_eq!(value(&samples, CONFIRMED_LSN, ""), raw.to_string());
    }

    #[test]
    fn up_follows_health() {
        let (health, clock) = health();
        let metrics = Metrics::new();
        assert_eq!(value(&parse(&metrics.render(&health)), UP, ""), "0");
        health.streaming();
        assert_eq!(value(&parse(&metrics.render(&health)), UP, ""), "1");
        clock.advance(HealthThresholds::default().stream_stall);
        assert_eq!(value(&parse(&metrics.render(&health)), UP, ""), "0");
        health.stream_progress();
        assert_eq!(value(&parse(&metrics.render(&health)), UP, ""), "1");
        health.failed("the outbox table lacks column payload".to_owned());
        assert_eq!(value(&parse(&metrics.render(&health)), UP, ""), "0");
    }

    #[test]
    fn role_follows_health() {
        let (health, _clock) = health();
        let metrics = Metrics::new();
        let roles = |health: &Health| {
            let samples = parse(&metrics.render(health));
            (
                value(&samples, ROLE, "role=\"active\"").to_owned(),
                value(&samples, ROLE, "role=\"standby\"").to_owned(),
            )
        };
        assert_eq!(roles(&health), ("0".to_owned(), "0".to_owned()));
        health.standby("held by server process 7".to_owned());
        assert_eq!(roles(&health), ("0".to_owned(), "1".to_owned()));
        health.streaming();
        assert_eq!(roles(&health), ("1".to_owned(), "0".to_owned()));
        health.reconnecting("reset".to_owned());
        assert_eq!(roles(&health), ("0".to_owned(), "0".to_owned()));
    }

    #[test]
    fn checker_rejects_malformed_text() {
        let bad = [
            "no_help 1\n",
            "# HELP a_total x\n# TYPE a_total counter\na_total\n",
            "# HELP a x\n# TYPE a counter\na 1\n",
            "# HELP a x\n# TYPE a gauge\na{b=c} 1\n",
            "# HELP a x\n# TYPE a gauge\na one\n",
            "# HELP a x\n# TYPE a gauge\na 1",
            "# HELP h x\n# TYPE h histogram\nh 1\n",
            "# HELP h x\n# TYPE h histogram\nh_bucket 1\n",
            "# HELP h x\n# TYPE h histogram\nh_sum{le=\"1\"} 1\n",
        ];
        for text in bad {
            let result = std::panic::catch_unwind(|| parse(text));
            assert!(result.is_err(), "accepted {text:?}");
        }
    }
}
