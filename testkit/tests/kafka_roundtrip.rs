//! The environment's broker takes idempotent keyed produce and serves it back through
//! a consumer group with committed offsets.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use futures::StreamExt;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Message, Offset, TopicPartitionList};
use testkit::{consumer_config, create_topic, producer_config, unique_name};

const RECORDS: usize = 1_000;
const KEYS: usize = 20;
const PARTITIONS: i32 = 3;
const TIMEOUT: Duration = Duration::from_secs(60);

/// Kafka's Java client hash (murmur2, seed 0x9747b28c), which `murmur2_random` in
/// librdkafka reproduces so that a key lands on the same partition as under Java
/// producers such as Debezium.
fn murmur2(data: &[u8]) -> u32 {
    const M: u32 = 0x5bd1_e995;
    let mut h: u32 = 0x9747_b28c ^ (data.len() as u32);
    let mut chunks = data.chunks_exact(4);
    for chunk in &mut chunks {
        let mut k = u32::from_le_bytes(chunk.try_into().unwrap());
        k = k.wrapping_mul(M);
        k ^= k >> 24;
        k = k.wrapping_mul(M);
        h = h.wrapping_mul(M);
        h ^= k;
    }
    let tail = chunks.remainder();
    if tail.len() >= 3 {
        h ^= u32::from(tail[2]) << 16;
    }
    if tail.len() >= 2 {
        h ^= u32::from(tail[1]) << 8;
    }
    if !tail.is_empty() {
        h ^= u32::from(tail[0]);
        h = h.wrapping_mul(M);
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^= h >> 15;
    h
}

fn java_partition(key: &str, partitions: i32) -> i32 {
    ((murmur2(key.as_bytes()) & 0x7fff_ffff) % partitions as u32) as i32
}

#[test]
fn murmur2_matches_the_java_client() {
    // Values from Kafka's own Utils.murmur2 test vectors.
    assert_eq!(murmur2(b"21") as i32, -973932308);
    assert_eq!(murmur2(b"foobar") as i32, -790332482);
    assert_eq!(murmur2(b"a-little-bit-long-string") as i32, -985981536);
    assert_eq!(murmur2(b"a-little-bit-longer-string") as i32, -1486304829);
    assert_eq!(
        murmur2(b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8") as i32,
        -58897971
    );
    assert_eq!(murmur2(b"abc") as i32, 479470107);
}

#[tokio::test]
async fn keyed_records_round_trip_in_order_per_key_with_committed_offsets() {
    let topic = unique_name("smoke");
    create_topic(&topic, PARTITIONS).await;

    let producer: FutureProducer = producer_config().create().unwrap();
    let mut sequence: HashMap<String, usize> = HashMap::new();
    let mut deliveries = Vec::with_capacity(RECORDS);
    for i in 0..RECORDS {
        let key = format!("key-{}", i % KEYS);
        let seq = sequence.entry(key.clone()).or_default();
        let payload = format!("{key}:{seq}");
        *seq += 1;
        // Enqueue everything before awaiting: the idempotent producer must keep
        // per-partition order with many requests in flight.
        let record = FutureRecord::to(&topic).key(&key).payload(&payload);
        let delivery = producer
            .send_result(record)
            .map_err(|(e, _)| e)
            .expect("the producer queue holds 1,000 records");
        deliveries.push((key, delivery));
    }
    let mut produced_to: HashMap<String, i32> = HashMap::new();
    let mut end_of: BTreeMap<i32, i64> = BTreeMap::new();
    for (key, delivery) in deliveries {
        let delivery = delivery
            .await
            .expect("delivery future not cancelled")
            .unwrap_or_else(|(e, _)| panic!("delivery of a {key} record failed: {e}"));
        let partition = delivery.partition;
        let end = end_of.entry(partition).or_default();
        *end = (*end).max(delivery.offset + 1);
        let first = *produced_to.entry(key.clone()).or_insert(partition);
        assert_eq!(first, partition, "{key} went to two partitions");
        assert_eq!(
            partition,
            java_partition(&key, PARTITIONS),
            "{key} is not where a Java producer would put it"
        );
    }

    let group = unique_name("smoke_group");
    let consumer: StreamConsumer = consumer_config(&group).create().unwrap();
    consumer.subscribe(&[&topic]).unwrap();
    let mut next: HashMap<String, usize> = HashMap::new();
    let mut received = 0;
    let mut stream = consumer.stream();
    while received < RECORDS {
        let message = tokio::time::timeout(TIMEOUT, stream.next())
            .await
            .unwrap_or_else(|_| panic!("only {received} of {RECORDS} records arrived"))
            .expect("the stream does not end")
            .expect("no consumer error");
        let key = std::str::from_utf8(message.key().unwrap())
            .unwrap()
            .to_owned();
        let payload = std::str::from_utf8(message.payload().unwrap()).unwrap();
        let expected = next.entry(key.clone()).or_default();
        assert_eq!(
            payload,
            format!("{key}:{expected}"),
            "order of {key} broken"
        );
        assert_eq!(message.partition(), produced_to[&key]);
        *expected += 1;
        consumer.store_offset_from_message(&message).unwrap();
        received += 1;
    }
    drop(stream);
    assert_eq!(next.len(), KEYS);
    assert!(next.values().all(|&n| n == RECORDS / KEYS));
    consumer.commit_consumer_state(CommitMode::Sync).unwrap();

    // The group's committed offsets equal the end of every partition, as the
    // producer's delivery reports saw it. (Not the broker's ListOffsets answer:
    // tansu 0.6 answered it with 1 for a partition holding 300 records.)
    let mut partitions = TopicPartitionList::new();
    for p in 0..PARTITIONS {
        partitions.add_partition(&topic, p);
    }
    let committed = consumer.committed_offsets(partitions, TIMEOUT).unwrap();
    let committed: BTreeMap<i32, Offset> = committed
        .elements()
        .iter()
        .map(|e| (e.partition(), e.offset()))
        .collect();
    let expected: BTreeMap<i32, Offset> = (0..PARTITIONS)
        .map(|p| {
            let end = end_of.get(&p).copied();
            (p, end.map_or(Offset::Invalid, Offset::Offset))
        })
        .collect();
    assert_eq!(committed, expected);
    assert_eq!(end_of.values().sum::<i64>(), RECORDS as i64);
    assert!(
        end_of.len() > 1,
        "20 keys spread over more than one partition: {end_of:?}"
    );

    // A new member of the group resumes at the committed offsets: with one more
    // record in every partition, that record is the first it sees of each.
    drop(consumer);
    for p in 0..PARTITIONS {
        let record = FutureRecord::to(&topic)
            .partition(p)
            .key("marker")
            .payload("marker");
        producer
            .send(record, TIMEOUT)
            .await
            .unwrap_or_else(|(e, _)| panic!("marker for partition {p} not delivered: {e}"));
    }
    let rejoined: StreamConsumer = consumer_config(&group).create().unwrap();
    rejoined.subscribe(&[&topic]).unwrap();
    let mut first_seen: BTreeMap<i32, (i64, String)> = BTreeMap::new();
    while first_seen.len() < PARTITIONS as usize {
        let message = tokio::time::timeout(TIMEOUT, rejoined.recv())
            .await
            .expect("the markers arrive")
            .expect("no consumer error");
        let payload = String::from_utf8_lossy(message.payload().unwrap_or_default()).into_owned();
        first_seen
            .entry(message.partition())
            .or_insert((message.offset(), payload));
    }
    for (p, (offset, payload)) in first_seen {
        assert_eq!(
            (Offset::Offset(offset), payload.as_str()),
            (expected[&p], "marker"),
            "partition {p} did not resume at its committed offset"
        );
    }
}
