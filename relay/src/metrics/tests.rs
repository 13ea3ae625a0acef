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
    let send_bucket = format!("{COMMIT_TO_SEND}_bucket");
    let send_sum = format!("{COMMIT_TO_SEND}_sum");
    let send_count = format!("{COMMIT_TO_SEND}_count");
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
        &send_bucket,
        &send_sum,
        &send_count,
        CONFIRMED_LSN,
        HEARTBEATS_SENT,
        RECONNECTS,
        UP,
        ROLE,
        TAKEOVERS,
        STREAMED_OPEN,
        SPILLED_BYTES,
    ]
    .into_iter()
    .collect();
    assert_eq!(names, expected);
    // One sample per family, but a reason per dead-letter sample, a role per
    // role sample, a bucket per bound (and +Inf), a sum and a count for each
    // histogram, and no sink before one is set.
    assert_eq!(
        samples.len(),
        Family::ALL.len() - 5
            + Reason::ALL.len()
            + Role::ALL.len()
            + 2 * (COMMIT_TO_ACK_BUCKETS.len() + 3)
    );
    for reason in ["too_large", "bad_row", "bad_route", "undeliverable"] {
        let labels = format!("reason=\"{reason}\"");
        assert_eq!(value(&samples, EVENTS_DEAD_LETTERED, &labels), "0");
    }
    assert!(samples.values().all(|v| v == "0"), "{samples:?}");
}

#[test]
fn the_sink_is_named_once_set() {
    let (health, _clock) = health();
    let metrics = Metrics::new();
    metrics.set_sink("nats");
    let samples = parse(&metrics.render(&health));
    assert_eq!(value(&samples, SINK_INFO, "sink=\"nats\""), "1");
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
