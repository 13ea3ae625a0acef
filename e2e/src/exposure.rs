//! Where a card number could be kept: every row of every table of the shop's
//! databases and every record of its topics, searched for the cards' digits.
//!
//! The search looks for each number as digits, in groups of four, and as the hex
//! of those digits (how `bytea` prints), so a number kept in a text, JSON or
//! binary column, a record's key, value or headers is found. A search that finds
//! nothing proves little by itself: the callers also search for something that
//! must be there (the cards' tokens) with the same functions.

use std::time::{Duration, Instant};

use anyhow::Context;
use rdkafka::consumer::{BaseConsumer, Consumer as _};
use rdkafka::message::{Headers as _, Message as _};
use rdkafka::{Offset, TopicPartitionList};
use sqlx::PgPool;

/// The forms a card number may take where it is kept.
pub fn card_forms(card: &str) -> Vec<String> {
    let digits: String = card.chars().filter(char::is_ascii_digit).collect();
    let grouped = digits
        .as_bytes()
        .chunks(4)
        .map(|c| String::from_utf8_lossy(c).into_owned())
        .collect::<Vec<_>>()
        .join(" ");
    let hex: String = digits.bytes().map(|b| format!("{b:02x}")).collect();
    vec![digits, grouped, hex]
}

/// `table: text` for each table of `pool`'s database (all schemas but the
/// system's) with a row whose text holds one of `needles`.
pub async fn tables_holding(pool: &PgPool, needles: &[String]) -> anyhow::Result<Vec<String>> {
    let tables: Vec<(String, String)> = sqlx::query_as(
        "SELECT table_schema, table_name FROM information_schema.tables \
         WHERE table_type = 'BASE TABLE' \
           AND table_schema NOT IN ('pg_catalog', 'information_schema') ORDER BY 1, 2",
    )
    .fetch_all(pool)
    .await
    .context("listing the tables")?;
    anyhow::ensure!(!tables.is_empty(), "the database has no tables");
    let mut found = Vec::new();
    for (schema, table) in tables {
        let name = format!("{}.{}", quote(&schema), quote(&table));
        let hits: Vec<String> = sqlx::query_scalar(&format!(
            "SELECT DISTINCT n FROM {name} t, unnest($1::text[]) n WHERE strpos(t::text, n) > 0"
        ))
        .bind(needles)
        .fetch_all(pool)
        .await
        .with_context(|| format!("searching {name}"))?;
        found.extend(hits.into_iter().map(|n| format!("{schema}.{table}: {n}")));
    }
    Ok(found)
}

fn quote(identifier: &str) -> String {
    format!("\"{}\"", identifier.replace('"', "\"\""))
}

/// What reading the topics found.
#[derive(Debug, Default)]
pub struct TopicSearch {
    pub topics: Vec<String>,
    pub records: usize,
    /// `topic: needle` for each record holding one of the needles.
    pub found: Vec<String>,
}

/// Reads every record of the topics whose name starts with `prefix` (or is one
/// of `also`), from the first to the end as it was when the search started, and
/// looks for `needles` in their keys, values and headers.
pub fn topics_holding(
    brokers: &str,
    prefix: &str,
    also: &[&str],
    needles: &[String],
    timeout: Duration,
) -> anyhow::Result<TopicSearch> {
    let group = format!("exposure-{}", uuid::Uuid::new_v4().simple());
    let consumer: BaseConsumer = testkit::consumer_config_on(Some(brokers), &group)
        .create()
        .context("creating the reader")?;
    let metadata = consumer
        .fetch_metadata(None, Duration::from_secs(10))
        .context("reading the broker's metadata")?;
    let mut search = TopicSearch::default();
    let mut assignment = TopicPartitionList::new();
    let mut ends = std::collections::BTreeMap::new();
    for topic in metadata.topics() {
        let name = topic.name();
        if !(name.starts_with(prefix) || also.contains(&name)) {
            continue;
        }
        search.topics.push(name.to_owned());
        for partition in topic.partitions() {
            let (low, high) = consumer
                .fetch_watermarks(name, partition.id(), Duration::from_secs(10))
                .with_context(|| format!("the offsets of {name}/{}", partition.id()))?;
            if high > low {
                ends.insert((name.to_owned(), partition.id()), high);
                assignment.add_partition_offset(name, partition.id(), Offset::Beginning)?;
            }
        }
    }
    if ends.is_empty() {
        return Ok(search);
    }
    consumer.assign(&assignment)?;
    let deadline = Instant::now() + timeout;
    while !ends.is_empty() {
        anyhow::ensure!(
            Instant::now() < deadline,
            "the topics were not read to their end within {timeout:?}: {ends:?} left"
        );
        let Some(message) = consumer.poll(Duration::from_millis(200)) else {
            continue;
        };
        let message = message.context("reading a record")?;
        search.records += 1;
        let mut bytes = Vec::new();
        bytes.extend_from_slice(message.key().unwrap_or_default());
        bytes.push(b'\n');
        bytes.extend_from_slice(message.payload().unwrap_or_default());
        if let Some(headers) = message.headers() {
            for header in headers.iter() {
                bytes.push(b'\n');
                bytes.extend_from_slice(header.key.as_bytes());
                bytes.push(b'=');
                bytes.extend_from_slice(header.value.unwrap_or_default());
            }
        }
        let text = String::from_utf8_lossy(&bytes);
        for needle in needles {
            if text.contains(needle.as_str()) {
                search.found.push(format!("{}: {needle}", message.topic()));
            }
        }
        let key = (message.topic().to_owned(), message.partition());
        if ends
            .get(&key)
            .is_some_and(|end| message.offset() + 1 >= *end)
        {
            ends.remove(&key);
        }
    }
    Ok(search)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_card_is_looked_for_as_digits_groups_and_hex() {
        assert_eq!(
            card_forms("4111-1111 1111 1234"),
            [
                "4111111111111234",
                "4111 1111 1111 1234",
                "34313131313131313131313131323334"
            ]
        );
    }
}
