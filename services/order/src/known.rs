//! Customers and goods the owning service said exist, remembered for a while, so
//! that placing an order does not ask over HTTP each time.
//!
//! Only "exists" is remembered, for [`KNOWN_FOR`]: the check before an order is
//! accepted is a courtesy (a clear 422 for a typo), not the rule. A customer or
//! goods removed within that time still has its order accepted, and the saga's own
//! reply (`CustomerNotFound`, `GoodsNotFound`) rejects it, as when the owning
//! service does not answer. "Does not exist" is never remembered: the customer
//! may be created a moment later.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use uuid::Uuid;

/// How long an "exists" answer is used.
pub const KNOWN_FOR: Duration = Duration::from_secs(60);
/// At most this many answers are kept; past it, the expired ones are dropped,
/// and if none had expired, all of them.
pub const KNOWN_AT_MOST: usize = 10_000;

/// The answers, by what was asked (`customers`, `goods`) and id.
#[derive(Debug, Default)]
pub struct Known {
    until: Mutex<HashMap<(&'static str, Uuid), Instant>>,
}

impl Known {
    pub fn new() -> Known {
        Known::default()
    }

    /// Whether `kind` `id` was said to exist within [`KNOWN_FOR`] before `now`.
    pub fn exists(&self, kind: &'static str, id: Uuid, now: Instant) -> bool {
        let until = self.until.lock().unwrap_or_else(|e| e.into_inner());
        until.get(&(kind, id)).is_some_and(|&t| now < t)
    }

    /// Remembers that `kind` `id` exists, as said at `now`.
    pub fn remember(&self, kind: &'static str, id: Uuid, now: Instant) {
        let mut until = self.until.lock().unwrap_or_else(|e| e.into_inner());
        if until.len() >= KNOWN_AT_MOST {
            until.retain(|_, t| now < *t);
            if until.len() >= KNOWN_AT_MOST {
                until.clear();
            }
        }
        until.insert((kind, id), now + KNOWN_FOR);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_answer_is_used_for_a_minute_and_only_for_what_was_asked() {
        let known = Known::new();
        let (id, start) = (Uuid::now_v7(), Instant::now());
        assert!(!known.exists("customers", id, start));
        known.remember("customers", id, start);
        assert!(known.exists(
            "customers",
            id,
            start + KNOWN_FOR - Duration::from_millis(1)
        ));
        assert!(!known.exists("customers", id, start + KNOWN_FOR));
        assert!(!known.exists("goods", id, start));
        assert!(!known.exists("customers", Uuid::now_v7(), start));
    }

    #[test]
    fn it_holds_a_bounded_number_of_answers() {
        let known = Known::new();
        let start = Instant::now();
        for _ in 0..KNOWN_AT_MOST {
            known.remember("goods", Uuid::now_v7(), start);
        }
        // Full and nothing expired: everything goes, the new answer stays.
        let last = Uuid::now_v7();
        known.remember("goods", last, start);
        assert_eq!(known.until.lock().unwrap().len(), 1);
        assert!(known.exists("goods", last, start));
    }
}
