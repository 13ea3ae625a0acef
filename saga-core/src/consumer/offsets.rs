//! Which offset of each partition may be stored.
//!
//! Messages of one partition finish out of order (different keys run concurrently),
//! but a committed offset means "everything below is done". So each partition keeps
//! the offsets it has handed out and not yet finished; the offset that may be stored
//! is the lowest of them, or, when none is left, the one after the highest received.
//!
//! Every assignment of a partition gets a new *generation*. A revoked partition's
//! bookkeeping is dropped at once; work of the old generation that finishes later
//! finds its generation gone and moves nothing, even when the partition has been
//! assigned to this consumer again in the meantime.

use std::collections::{BTreeSet, HashMap};

/// Offsets in flight per partition, across all subscribed topics.
#[derive(Debug, Default)]
pub(crate) struct OffsetTracker {
    topics: HashMap<String, HashMap<i32, PartitionBook>>,
    last_generation: u64,
}

/// One partition of the current assignment.
#[derive(Debug)]
struct PartitionBook {
    generation: u64,
    /// Offsets received and not yet done (handled, skipped as duplicate or dead-lettered).
    in_flight: BTreeSet<i64>,
    /// One past the highest offset received.
    next: i64,
    /// The offset stored last (the next one to consume); at first the offset the
    /// assignment started at, which there is no point in storing again.
    stored: i64,
}

impl OffsetTracker {
    /// Records that `offset` was received; returns the partition's generation, which
    /// the caller hands back to [`OffsetTracker::done`].
    pub(crate) fn received(&mut self, topic: &str, partition: i32, offset: i64) -> u64 {
        let partitions = match self.topics.get_mut(topic) {
            Some(partitions) => partitions,
            None => self.topics.entry(topic.to_owned()).or_default(),
        };
        let book = partitions.entry(partition).or_insert_with(|| {
            self.last_generation += 1;
            PartitionBook {
                generation: self.last_generation,
                in_flight: BTreeSet::new(),
                next: offset,
                stored: offset,
            }
        });
        book.in_flight.insert(offset);
        book.next = book.next.max(offset + 1);
        book.generation
    }

    /// Records that `offset` is done. Returns the offset to store now (the next one to
    /// consume), if it moved forward; `None` when it did not or when `generation` is
    /// no longer the partition's current one (it was revoked meanwhile).
    pub(crate) fn done(
        &mut self,
        topic: &str,
        partition: i32,
        generation: u64,
        offset: i64,
    ) -> Option<i64> {
        let book = self.book_mut(topic, partition, generation)?;
        book.in_flight.remove(&offset);
        let storable = book.in_flight.first().copied().unwrap_or(book.next);
        if storable <= book.stored {
            return None;
        }
        book.stored = storable;
        Some(storable)
    }

    /// Whether `generation` is still the current assignment of the partition.
    pub(crate) fn is_current(&self, topic: &str, partition: i32, generation: u64) -> bool {
        self.topics
            .get(topic)
            .and_then(|partitions| partitions.get(&partition))
            .is_some_and(|book| book.generation == generation)
    }

    /// Forgets a revoked partition; returns how many of its messages were unfinished.
    pub(crate) fn revoke(&mut self, topic: &str, partition: i32) -> usize {
        let Some(partitions) = self.topics.get_mut(topic) else {
            return 0;
        };
        let unfinished = partitions
            .remove(&partition)
            .map_or(0, |book| book.in_flight.len());
        if partitions.is_empty() {
            self.topics.remove(topic);
        }
        unfinished
    }

    fn book_mut(
        &mut self,
        topic: &str,
        partition: i32,
        generation: u64,
    ) -> Option<&mut PartitionBook> {
        self.topics
            .get_mut(topic)?
            .get_mut(&partition)
            .filter(|book| book.generation == generation)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stores_only_below_the_lowest_unfinished_offset() {
        let mut tracker = OffsetTracker::default();
        let g = tracker.received("t", 0, 10);
        for offset in 11..=13 {
            assert_eq!(tracker.received("t", 0, offset), g);
        }
        // 11 and 13 finish first: 10 is still running, nothing may be stored.
        assert_eq!(tracker.done("t", 0, g, 11), None);
        assert_eq!(tracker.done("t", 0, g, 13), None);
        // 10 finishes: everything below 12 is done.
        assert_eq!(tracker.done("t", 0, g, 10), Some(12));
        // 12 finishes: everything received is done.
        assert_eq!(tracker.done("t", 0, g, 12), Some(14));
        // A message received later.
        tracker.received("t", 0, 14);
        assert_eq!(tracker.done("t", 0, g, 14), Some(15));
    }

    #[test]
    fn partitions_are_independent() {
        let mut tracker = OffsetTracker::default();
        let a = tracker.received("t", 0, 0);
        let b = tracker.received("t", 1, 5);
        let c = tracker.received("u", 0, 7);
        assert_ne!(a, b);
        assert_ne!(b, c);
        assert_eq!(tracker.done("t", 1, b, 5), Some(6));
        assert_eq!(tracker.done("u", 0, c, 7), Some(8));
        assert_eq!(tracker.done("t", 0, a, 0), Some(1));
    }

    #[test]
    fn a_revoked_partition_moves_nothing_even_when_assigned_again() {
        let mut tracker = OffsetTracker::default();
        let old = tracker.received("t", 0, 3);
        tracker.received("t", 0, 4);
        assert_eq!(tracker.revoke("t", 0), 2);
        assert!(!tracker.is_current("t", 0, old));
        // Finishing old work after the revocation stores nothing.
        assert_eq!(tracker.done("t", 0, old, 3), None);

        // Assigned again: the committed offset is 3, so 3 and 4 come again.
        let new = tracker.received("t", 0, 3);
        assert_ne!(new, old);
        tracker.received("t", 0, 4);
        // The old generation's 4 finishing must not store past the new 3.
        assert_eq!(tracker.done("t", 0, old, 4), None);
        assert_eq!(tracker.done("t", 0, new, 4), None);
        assert_eq!(tracker.done("t", 0, new, 3), Some(5));
        assert!(tracker.is_current("t", 0, new));
    }

    #[test]
    fn revoking_an_unknown_partition_is_harmless() {
        let mut tracker = OffsetTracker::default();
        assert_eq!(tracker.revoke("t", 9), 0);
        let g = tracker.received("t", 0, 0);
        assert_eq!(tracker.revoke("t", 9), 0);
        assert!(tracker.is_current("t", 0, g));
    }
}
