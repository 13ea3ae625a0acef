use super::*;

const STREAM: Duration = Duration::from_secs(60);
const BROKER: Duration = Duration::from_secs(30);
const JUST_UNDER: Duration = Duration::from_millis(999);

fn health() -> (Health, ManualClock) {
    let clock = ManualClock::new();
    let thresholds = HealthThresholds {
        stream_stall: STREAM,
        broker_stall: BROKER,
    };
    (
        Health::with_clock(thresholds, Arc::new(clock.clone())),
        clock,
    )
}

fn streaming() -> (Health, ManualClock) {
    let (health, clock) = health();
    health.starting();
    health.streaming();
    (health, clock)
}

fn assert_status(health: &Health, healthy: bool, status: Status) -> HealthReport {
    let report = health.report();
    assert_eq!(
        (report.healthy, report.status),
        (healthy, status),
        "{report:?}"
    );
    report
}

#[test]
fn default_thresholds_are_sixty_seconds() {
    let thresholds = HealthThresholds::default();
    assert_eq!(thresholds.stream_stall, Duration::from_secs(60));
    assert_eq!(thresholds.broker_stall, Duration::from_secs(60));
}

#[test]
fn starting_is_unhealthy_until_streaming() {
    let (health, clock) = health();
    assert_status(&health, false, Status::Starting);
    health.starting();
    clock.advance(STREAM * 10);
    let report = assert_status(&health, false, Status::Starting);
    assert_eq!(report.reason, None);
    health.streaming();
    let report = assert_status(&health, true, Status::Streaming);
    assert_eq!(report.reason, None);
    assert_eq!(report.seconds_since_stream_progress, 0);
}

#[test]
fn reconnecting_before_the_first_session_stays_starting() {
    let (health, clock) = health();
    health.starting();
    health.reconnecting("connection refused".to_owned());
    let report = assert_status(&health, false, Status::Starting);
    assert_eq!(report.reason.as_deref(), Some("connection refused"));
    clock.advance(STREAM * 2);
    assert_status(&health, false, Status::Starting);
    health.streaming();
    let report = assert_status(&health, true, Status::Streaming);
    assert_eq!(report.reason, None);
}

#[test]
fn stream_stalls_after_the_threshold_and_recovers_on_progress() {
    let (health, clock) = streaming();
    clock.advance(STREAM - JUST_UNDER);
    assert_status(&health, true, Status::Streaming);
    clock.advance(JUST_UNDER);
    let report = assert_status(&health, false, Status::Stalled);
    assert_eq!(report.seconds_since_stream_progress, 60);
    assert!(report.reason.expect("a reason").contains("60 s"));
    health.stream_progress();
    let report = assert_status(&health, true, Status::Streaming);
    assert_eq!(report.seconds_since_stream_progress, 0);
}

#[test]
fn regular_progress_keeps_the_stream_healthy() {
    let (health, clock) = streaming();
    for _ in 0..10 {
        clock.advance(STREAM / 2);
        health.stream_progress();
        assert_status(&health, true, Status::Streaming);
    }
}

#[test]
fn paused_reading_does_not_count_as_stalled() {
    let (health, clock) = streaming();
    clock.advance(STREAM / 2);
    health.reading_paused(true);
    clock.advance(STREAM * 5);
    let report = assert_status(&health, true, Status::Streaming);
    assert!(report.reading_paused);
    assert_eq!(report.seconds_since_stream_progress, 0);
    // The wait starts anew on resume, not from the last message before the pause.
    health.reading_paused(false);
    clock.advance(STREAM - JUST_UNDER);
    assert_status(&health, true, Status::Streaming);
    clock.advance(JUST_UNDER);
    assert_status(&health, false, Status::Stalled);
}

#[test]
fn records_in_flight_without_acks_make_the_broker_unreachable() {
    let (health, clock) = streaming();
    health.records_in_flight(3);
    clock.advance(BROKER - JUST_UNDER);
    health.stream_progress();
    assert_status(&health, true, Status::Streaming);
    clock.advance(JUST_UNDER);
    health.stream_progress();
    let report = assert_status(&health, false, Status::BrokerUnreachable);
    assert_eq!(report.in_flight, 3);
    assert_eq!(report.seconds_since_broker_progress, 30);
    assert!(report.reason.expect("a reason").contains("3 records"));
    health.broker_progress();
    let report = assert_status(&health, true, Status::Streaming);
    assert_eq!(report.seconds_since_broker_progress, 0);
}

#[test]
fn acks_keep_the_broker_healthy_while_records_stay_in_flight() {
    let (health, clock) = streaming();
    health.records_in_flight(100);
    for _ in 0..10 {
        clock.advance(BROKER / 2);
        health.stream_progress();
        health.broker_progress();
        health.records_in_flight(100);
        assert_status(&health, true, Status::Streaming);
    }
}

#[test]
fn nothing_in_flight_is_broker_progress() {
    let (health, clock) = streaming();
    health.broker_progress();
    // A long idle time without acks, then records go in flight: the wait starts
    // when they do, not at the last ack.
    clock.advance(BROKER * 10);
    health.stream_progress();
    let report = assert_status(&health, true, Status::Streaming);
    assert_eq!(report.seconds_since_broker_progress, 0);
    health.records_in_flight(1);
    assert_status(&health, true, Status::Streaming);
    clock.advance(BROKER - JUST_UNDER);
    health.stream_progress();
    health.records_in_flight(2);
    assert_status(&health, true, Status::Streaming);
    clock.advance(JUST_UNDER);
    health.stream_progress();
    assert_status(&health, false, Status::BrokerUnreachable);
    health.records_in_flight(0);
    assert_status(&health, true, Status::Streaming);
}

#[test]
fn a_stuck_pause_is_caught_by_the_broker_rule() {
    let (health, clock) = streaming();
    health.records_in_flight(1000);
    health.reading_paused(true);
    clock.advance(BROKER);
    let report = assert_status(&health, false, Status::BrokerUnreachable);
    assert!(report.reading_paused);
}

#[test]
fn failed_sticks_until_streaming() {
    let (health, clock) = streaming();
    health.failed("the outbox table lacks column aggregateid".to_owned());
    let report = assert_status(&health, false, Status::Failed);
    assert_eq!(
        report.reason.as_deref(),
        Some("the outbox table lacks column aggregateid")
    );
    health.stream_progress();
    health.broker_progress();
    health.records_in_flight(0);
    health.reading_paused(true);
    health.reading_paused(false);
    health.starting();
    health.reconnecting("connection refused".to_owned());
    clock.advance(STREAM * 10);
    let report = assert_status(&health, false, Status::Failed);
    assert_eq!(
        report.reason.as_deref(),
        Some("the outbox table lacks column aggregateid")
    );
    health.streaming();
    let report = assert_status(&health, true, Status::Streaming);
    assert_eq!(report.reason, None);
}

#[test]
fn reconnecting_is_healthy_within_the_threshold_since_last_progress() {
    let (health, clock) = streaming();
    clock.advance(STREAM / 2);
    health.reconnecting("connection reset".to_owned());
    let report = assert_status(&health, true, Status::Reconnecting);
    assert_eq!(report.reason.as_deref(), Some("connection reset"));
    // Retrying does not extend the grace: it counts from the last progress.
    clock.advance(STREAM / 2 - JUST_UNDER);
    health.reconnecting("connection refused".to_owned());
    assert_status(&health, true, Status::Reconnecting);
    clock.advance(JUST_UNDER);
    let report = assert_status(&health, false, Status::Reconnecting);
    assert_eq!(report.reason.as_deref(), Some("connection refused"));
    health.streaming();
    let report = assert_status(&health, true, Status::Streaming);
    assert_eq!(report.reason, None);
}

#[test]
fn reconnecting_ends_a_pause() {
    let (health, clock) = streaming();
    health.reading_paused(true);
    clock.advance(STREAM * 3);
    health.reconnecting("connection reset".to_owned());
    let report = assert_status(&health, true, Status::Reconnecting);
    assert!(!report.reading_paused);
    clock.advance(STREAM);
    assert_status(&health, false, Status::Reconnecting);
}

#[test]
fn report_serializes_with_snake_case_status() {
    let (health, _clock) = streaming();
    health.failed("slot dropped".to_owned());
    let json = serde_json::to_value(health.report()).expect("serializable");
    assert_eq!(
        json,
        serde_json::json!({
            "healthy": false,
            "ready": false,
            "role": null,
            "status": "failed",
            "reason": "slot dropped",
            "seconds_since_stream_progress": 0,
            "seconds_since_broker_progress": 0,
            "in_flight": 0,
            "reading_paused": false,
        })
    );
    for status in [
        Status::Starting,
        Status::Streaming,
        Status::Stalled,
        Status::BrokerUnreachable,
        Status::Reconnecting,
        Status::Failed,
        Status::DestinationFailed,
        Status::Standby,
    ] {
        assert_eq!(
            serde_json::to_value(status).expect("serializable"),
            status.as_str()
        );
    }
}

#[test]
fn a_destination_fault_lasts_until_the_destination_acknowledges() {
    let (health, _clock) = streaming();
    health.destination_failed("topic missing".to_owned());
    let report = health.report();
    assert_eq!(
        (report.healthy, report.status),
        (false, Status::DestinationFailed)
    );
    assert_eq!(report.reason.as_deref(), Some("topic missing"));
    // A new session starts: still the same fault.
    health.streaming();
    assert_eq!(health.report().status, Status::DestinationFailed);
    health.records_in_flight(3);
    assert_eq!(health.report().status, Status::DestinationFailed);
    // A definite failure comes first.
    health.failed("column missing".to_owned());
    assert_eq!(health.report().status, Status::Failed);
    health.streaming();
    health.broker_progress();
    let report = health.report();
    assert_eq!((report.healthy, report.status), (true, Status::Streaming));
    assert_eq!(health.destination_fault(), None);
}

#[test]
fn a_standby_is_healthy_and_ready_however_long_it_waits() {
    let (health, clock) = health();
    assert!(!health.report().ready);
    health.standby("held by server process 7".to_owned());
    clock.advance(STREAM * 10);
    let report = assert_status(&health, true, Status::Standby);
    assert!(report.ready);
    assert_eq!(report.role, Some(Role::Standby));
    assert_eq!(report.reason.as_deref(), Some("held by server process 7"));
    // Taking over makes it active.
    health.streaming();
    let report = assert_status(&health, true, Status::Streaming);
    assert_eq!(report.role, Some(Role::Active));
}

#[test]
fn standing_by_ends_a_failure_and_a_destination_fault() {
    let (health, _clock) = streaming();
    health.destination_failed("denied".to_owned());
    health.standby("held by server process 7".to_owned());
    assert_status(&health, true, Status::Standby);
    health.failed("column missing".to_owned());
    assert_status(&health, false, Status::Failed);
    health.standby("held by server process 8".to_owned());
    assert_status(&health, true, Status::Standby);
}

#[test]
fn readiness_is_lost_only_before_a_role_and_on_a_definite_failure() {
    let (health, clock) = health();
    health.reconnecting("refused".to_owned());
    assert!(!health.report().ready, "starting");
    health.streaming();
    assert!(health.report().ready);
    // Transient trouble keeps the pod in service, unhealthy or not.
    health.records_in_flight(5);
    clock.advance(BROKER);
    let report = assert_status(&health, false, Status::BrokerUnreachable);
    assert!(report.ready);
    health.destination_failed("denied".to_owned());
    assert!(health.report().ready);
    health.reconnecting("connection reset".to_owned());
    clock.advance(STREAM);
    let report = health.report();
    assert!(
        report.ready && !report.healthy && report.role.is_none(),
        "{report:?}"
    );
    health.failed("column missing".to_owned());
    assert!(!health.report().ready);
}
