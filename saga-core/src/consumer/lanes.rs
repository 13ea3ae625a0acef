//! Messages accepted and not yet done, by lane: a lane's messages run one after the
//! other, and the first waiting message of every idle lane is *ready*. The run
//! loop takes in what the stream has at hand, then launches the ready messages.
//!
//! Different lanes run at once, in as many transactions as the database pool has
//! connections (more would only wait for one). Ready messages beyond that share
//! transactions, up to `batch_max` each (the `batch` module); those beyond even
//! that wait for a transaction to end. So a light load runs every message in a
//! transaction of its own, as soon as it comes, and a heavy one runs in batches:
//! slow handlers keep their parallelism, and cheap ones stop paying a commit each.

use std::collections::hash_map::Entry;
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use tokio::task::JoinSet;
use tracing::Instrument;

use super::handling::{Job, Lane, Outcome, Shared};
use super::message::RawMessage;
use super::{batch, lock, MessageHandler};

/// Messages accepted and not yet done.
pub(super) struct Work<H> {
    pub(super) shared: Arc<Shared<H>>,
    /// A lane is present while one of its messages is ready or runs; the deque
    /// holds those waiting behind it.
    lanes: HashMap<Lane, VecDeque<Job>>,
    /// The first message of lanes with none running, to launch.
    ready: Vec<Job>,
    pub(super) tasks: JoinSet<Vec<Finished>>,
    /// Messages ready, running or waiting in a lane.
    pub(super) pending: usize,
    batch_max: usize,
    /// Tasks (transactions) running at once, at most.
    concurrency: usize,
}

/// What became of one message of a task.
pub(super) struct Finished {
    pub(super) lane: Lane,
    pub(super) topic: String,
    pub(super) partition: i32,
    pub(super) offset: i64,
    pub(super) generation: u64,
    pub(super) outcome: Outcome,
}

impl<H: MessageHandler> Work<H> {
    pub(super) fn new(shared: Arc<Shared<H>>, batch_max: usize, concurrency: usize) -> Work<H> {
        Work {
            concurrency: concurrency.max(1),
            shared,
            lanes: HashMap::new(),
            ready: Vec::new(),
            tasks: JoinSet::new(),
            pending: 0,
            batch_max: batch_max.max(1),
        }
    }

    /// Takes a message from the stream: ready when its lane is idle, queued behind
    /// its lane otherwise.
    pub(super) fn accept(&mut self, raw: RawMessage) {
        if tracing::enabled!(tracing::Level::TRACE) {
            let id = raw.headers.iter().rev().find(|(name, _)| name == "id");
            let id = id
                .and_then(|(_, v)| v.as_deref())
                .map(String::from_utf8_lossy);
            tracing::trace!(topic = %raw.topic, partition = raw.partition, offset = raw.offset, id = ?id, "received");
        }
        let generation = lock(&self.shared.tracker).received(&raw.topic, raw.partition, raw.offset);
        let lane = match &raw.key {
            Some(key) => Lane::Key(key.clone()),
            None => Lane::Keyless {
                topic: raw.topic.clone(),
                partition: raw.partition,
            },
        };
        let job = Job {
            raw,
            generation,
            lane,
        };
        self.pending += 1;
        match self.lanes.entry(job.lane.clone()) {
            Entry::Occupied(mut waiting) => waiting.get_mut().push_back(job),
            Entry::Vacant(idle) => {
                idle.insert(VecDeque::new());
                self.ready.push(job);
            }
        }
    }

    /// Makes the next message of `lane` whose partition is still assigned ready;
    /// drops the others (their next owner handles them).
    pub(super) fn start_next(&mut self, lane: Lane) {
        let Entry::Occupied(mut waiting) = self.lanes.entry(lane) else {
            return;
        };
        while let Some(job) = waiting.get_mut().pop_front() {
            let current = lock(&self.shared.tracker).is_current(
                &job.raw.topic,
                job.raw.partition,
                job.generation,
            );
            if current {
                self.ready.push(job);
                return;
            }
            self.pending -= 1;
            left_to_next_owner(&job);
        }
        waiting.remove();
    }

    /// Starts the ready messages in the free transactions: spread evenly over as
    /// many as there are (one each while there are enough), `batch_max` to one at
    /// most; the rest stay ready for the next free one.
    pub(super) fn launch(&mut self) {
        let free = self.concurrency.saturating_sub(self.tasks.len());
        if free == 0 || self.ready.is_empty() {
            return;
        }
        self.drop_revoked();
        let tasks = free.min(self.ready.len());
        let each = self.ready.len().div_ceil(tasks).min(self.batch_max);
        for _ in 0..tasks {
            let take = each.min(self.ready.len());
            if take == 0 {
                break;
            }
            let jobs: Vec<Job> = self.ready.drain(..take).collect();
            self.spawn(jobs);
        }
    }

    /// Drops the ready messages whose partition was revoked while they waited for
    /// a transaction (their next owner handles them), and makes the next message of
    /// each such lane ready instead.
    fn drop_revoked(&mut self) {
        loop {
            let tracker = lock(&self.shared.tracker);
            let (current, revoked): (Vec<Job>, Vec<Job>) = std::mem::take(&mut self.ready)
                .into_iter()
                .partition(|job| {
                    tracker.is_current(&job.raw.topic, job.raw.partition, job.generation)
                });
            drop(tracker);
            self.ready = current;
            if revoked.is_empty() {
                return;
            }
            for job in revoked {
                self.pending -= 1;
                left_to_next_owner(&job);
                self.start_next(job.lane);
            }
        }
    }

    fn spawn(&mut self, jobs: Vec<Job>) {
        let span = match jobs.as_slice() {
            [job] => tracing::info_span!(
                "message",
                topic = %job.raw.topic,
                partition = job.raw.partition,
                offset = job.raw.offset,
            ),
            _ => tracing::info_span!("batch", messages = jobs.len()),
        };
        let shared = Arc::clone(&self.shared);
        self.tasks.spawn(
            async move {
                batch::process_all(&shared, jobs)
                    .await
                    .into_iter()
                    .map(|(job, outcome)| Finished {
                        topic: job.raw.topic,
                        partition: job.raw.partition,
                        offset: job.raw.offset,
                        generation: job.generation,
                        lane: job.lane,
                        outcome,
                    })
                    .collect()
            }
            .instrument(span),
        );
    }
}

fn left_to_next_owner(job: &Job) {
    tracing::debug!(
        topic = %job.raw.topic,
        partition = job.raw.partition,
        offset = job.raw.offset,
        "partition revoked, message left to its next owner"
    );
}
