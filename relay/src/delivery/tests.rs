//! The delivery loop over the memory sink: settlement, dead letters, pushback.

use std::sync::Arc;

use bytes::Bytes;
use serde_json::Value;

use super::*;
use crate::health::{Health, HealthThresholds};
use crate::routing::HEADER_ID;
use crate::sink::memory::{MemoryHandle, MemorySink};
use crate::sink::SinkErrorKind;
use crate::Lsn;

const DLQ: &str = "dlq";

fn record(n: u32, topic: &str, payload_bytes: usize) -> OutboxRecord {
    OutboxRecord {
        topic: topic.to_owned(),
        key: Bytes::from(format!("key-{}", n % 3)),
        payload: Some(Bytes::from(vec![b'p'; payload_bytes])),
        headers: vec![(HEADER_ID.to_owned(), Bytes::from(format!("e{n}")))],
        id: format!("e{n}"),
        position: Position {
            commit_lsn: Lsn::new(100),
            index: n,
        },
    }
}

fn delivery(
    capacity: usize,
    max_bytes: usize,
    max_in_flight: usize,
    dlq: Option<&str>,
) -> (Delivery<MemorySink, u32>, MemoryHandle, Arc<Metrics>) {
    let handle = MemoryHandle::new(capacity, max_bytes);
    let metrics = Arc::new(Metrics::new());
    let delivery = Delivery::new(
        handle.new_sink(),
        max_in_flight,
        dlq.map(str::to_owned),
        metrics.clone(),
        Arc::new(Health::new(HealthThresholds::default())),
    );
    (delivery, handle, metrics)
}

fn letter_body(entry: &crate::sink::memory::Entry) -> Value {
    serde_json::from_slice(entry.record.payload.as_deref().unwrap()).unwrap()
}

#[tokio::test]
async fn a_tag_settles_only_when_its_record_is_acked() {
    let (mut delivery, handle, _) = delivery(10, 10_000, 3, Some(DLQ));
    for n in 0..3 {
        delivery.push(n, record(n, "t", 10), None, None).unwrap();
    }
    assert!(!delivery.can_accept(), "the bound is the number pushed");
    let pending = handle.pending();
    assert_eq!(pending.len(), 3);
    handle.ack(pending[2].ticket);
    let settled = delivery.next().await.unwrap();
    assert_eq!(
        settled,
        Settled {
            tag: 2,
            letter: None
        }
    );
    assert!(delivery.can_accept());
    assert_eq!(delivery.len(), 2);
}

#[tokio::test]
async fn pushback_keeps_records_waiting_in_order() {
    let (mut delivery, handle, _) = delivery(2, 10_000, 10, Some(DLQ));
    for n in 0..5 {
        delivery.push(n, record(n, "t", 10), None, None).unwrap();
    }
    assert_eq!(handle.pending().len(), 2, "the sink holds two");
    assert_eq!(delivery.len(), 5, "three wait");
    let mut settled = Vec::new();
    while settled.len() < 5 {
        let first = handle.pending()[0].ticket;
        handle.ack(first);
        settled.push(delivery.next().await.unwrap().tag);
    }
    assert_eq!(settled, [0, 1, 2, 3, 4]);
    let stored: Vec<String> = handle
        .stored()
        .iter()
        .map(|e| e.record.id.clone())
        .collect();
    assert_eq!(stored, ["e0", "e1", "e2", "e3", "e4"]);
}

#[tokio::test]
async fn a_record_refused_as_too_large_is_replaced_by_a_letter_that_fits() {
    let (mut delivery, handle, metrics) = delivery(10, 5_000, 10, Some(DLQ));
    delivery
        .push(7, record(7, "t", 20_000), None, None)
        .unwrap();
    let pending = handle.pending();
    assert_eq!(pending.len(), 1, "the letter went out instead");
    handle.ack(pending[0].ticket);
    let settled = delivery.next().await.unwrap();
    assert_eq!(
        settled,
        Settled {
            tag: 7,
            letter: Some(Reason::TooLarge)
        }
    );
    let stored = handle.stored();
    assert_eq!(stored[0].record.topic, DLQ);
    let body = letter_body(&stored[0]);
    assert_eq!(body["reason_code"], "too_large");
    assert_eq!(body["payload"]["bytes"], 20_000);
    assert!(metrics
        .render(&Health::new(HealthThresholds::default()))
        .contains("outbox_relay_events_dead_lettered_total{reason=\"too_large\"} 1"));
}

#[tokio::test]
async fn a_record_refused_later_keeps_its_payload_in_its_letter() {
    let (mut delivery, handle, _) = delivery(10, 10_000, 10, Some(DLQ));
    delivery.push(1, record(1, "t", 40), None, None).unwrap();
    handle.refuse(handle.pending()[0].ticket, RefusalKind::Invalid);
    // The refusal is not a settlement: the letter is sent and awaited.
    let letter = loop {
        let pending = handle.pending();
        if let Some(ticket) = pending.first().map(|e| e.ticket) {
            break ticket;
        }
        tokio::select! {
            biased;
            _ = delivery.next() => panic!("settled before the letter was acked"),
            () = tokio::task::yield_now() => {}
        }
    };
    handle.ack(letter);
    let settled = delivery.next().await.unwrap();
    assert_eq!(settled.letter, Some(Reason::Undeliverable));
    let body = letter_body(&handle.stored()[0]);
    assert_eq!(body["payload"], "p".repeat(40));
    assert_eq!(body["original_topic"], "t");
}

#[tokio::test]
async fn a_name_the_sink_refuses_is_a_bad_route_letter() {
    let (mut delivery, handle, _) = delivery(10, 10_000, 10, Some(DLQ));
    delivery
        .push(3, record(3, "order placed", 5), None, None)
        .unwrap();
    handle.ack(handle.pending()[0].ticket);
    assert_eq!(
        delivery.next().await.unwrap().letter,
        Some(Reason::BadRoute)
    );
    let body = letter_body(&handle.stored()[0]);
    assert_eq!(body["reason_code"], "bad_route");
    assert_eq!(body["original_topic"], "order placed");
    assert_eq!(body["payload"], "ppppp");
}

#[tokio::test]
async fn without_a_dead_letter_topic_a_refusal_stops_the_loop() {
    let (mut delivery, _, _) = delivery(10, 100, 10, None);
    let error = delivery
        .push(9, record(9, "t", 1_000), None, None)
        .unwrap_err();
    assert!(
        matches!(&error, DeliveryError::Undeliverable { id, .. } if id == "e9"),
        "{error}"
    );
}

#[tokio::test]
async fn a_refused_letter_shrinks_once_then_stops_the_loop() {
    let (mut delivery, handle, _) = delivery(10, 10_000, 10, Some(DLQ));
    delivery.push(1, record(1, "t", 10), None, None).unwrap();
    handle.refuse(handle.pending()[0].ticket, RefusalKind::Invalid);
    let mut refused = 0;
    let error = loop {
        tokio::select! {
            biased;
            result = delivery.next() => break result.unwrap_err(),
            () = tokio::task::yield_now() => {
                if let Some(ticket) = handle.pending().first().map(|e| e.ticket) {
                    handle.refuse(ticket, RefusalKind::TooLarge);
                    refused += 1;
                }
            }
        }
    };
    assert_eq!(refused, 2, "the letter, then its shrunk form");
    assert!(
        matches!(error, DeliveryError::Undeliverable { .. }),
        "{error}"
    );
}

#[tokio::test]
async fn a_failed_sink_ends_the_loop_with_its_error() {
    let (mut delivery, handle, _) = delivery(10, 10_000, 10, Some(DLQ));
    delivery.push(1, record(1, "t", 10), None, None).unwrap();
    handle.fail(SinkErrorKind::Unavailable);
    let error = delivery.next().await.unwrap_err();
    assert!(error.is_transient(), "{error}");
    assert!(matches!(error, DeliveryError::Sink(_)));
}
