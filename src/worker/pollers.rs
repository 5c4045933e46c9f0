//! How many long polls run: `--pollers` while the queue is quiet, more while receives come
//! back full and permits are free, up to `--max-pollers` — the way Lambda's event source
//! mapping scales its pollers with the backlog. A fixed count is always wrong somewhere:
//! too few leave the semaphore's permits idle behind receive round trips when the queue is
//! deep, too many split the permits into small receives (each costs SQS a call and the store
//! a claim statement) and keep idle long polls open for nothing.
//!
//! The rules, each checked by the poller itself (`poll.rs`):
//! - a receive that filled its batch, with another full batch of permits free: add a poller;
//! - an empty receive, or no permit free when a poller wants to receive: that poller stops,
//!   unless only `--pollers` are left.

use std::sync::atomic::{AtomicUsize, Ordering};

use super::summary::names;

/// The running pollers' count and its bounds; the `sqs_worker_pollers` gauge follows it.
pub(super) struct PollerCount {
    running: AtomicUsize,
    peak: AtomicUsize,
    min: usize,
    max: usize,
    gauge: metrics::Gauge,
}

/// What a poller does after a receive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Scale {
    /// Start one more poller: the queue fills whole batches and permits wait for them.
    Add,
    /// Go on receiving.
    Stay,
    /// Stop this poller: the queue is empty (or permits are scarce) and enough pollers are left.
    Retire,
}

/// The rule after a receive of `received` messages out of `asked` (`full` is a whole batch:
/// 10, or the concurrency when smaller), with `free` permits left over.
pub(super) fn after_receive(received: usize, asked: usize, full: usize, free: usize) -> Scale {
    if received == 0 {
        Scale::Retire
    } else if received == asked && asked >= full && free >= full {
        Scale::Add
    } else {
        Scale::Stay
    }
}

impl PollerCount {
    pub(super) fn new(min: usize, max: usize, queue: &str) -> Self {
        let max = max.max(min);
        Self {
            running: AtomicUsize::new(0),
            peak: AtomicUsize::new(0),
            min,
            max,
            gauge: metrics::gauge!(names::POLLERS, "queue" => queue.to_owned()),
        }
    }

    /// The floor: how many pollers start, and how many are never retired.
    pub(super) fn min(&self) -> usize {
        self.min
    }

    /// Count one more poller if that stays within the ceiling; true if it was counted.
    pub(super) fn try_add(&self) -> bool {
        self.change(|running| (running < self.max).then_some(running + 1))
    }

    /// Count one poller fewer if that stays at or above the floor; true if it was.
    pub(super) fn try_retire(&self) -> bool {
        self.change(|running| (running > self.min).then_some(running - 1))
    }

    /// A poller that ended without retiring (the worker stopped).
    pub(super) fn ended(&self) {
        let now = self.running.fetch_sub(1, Ordering::Relaxed) - 1;
        self.gauge.set(now as f64);
    }

    /// The most pollers that ran at once.
    pub(super) fn peak(&self) -> usize {
        self.peak.load(Ordering::Relaxed)
    }

    fn change(&self, next: impl Fn(usize) -> Option<usize>) -> bool {
        match self
            .running
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, &next)
        {
            Ok(before) => {
                let now = next(before).expect("the update succeeded");
                self.peak.fetch_max(now, Ordering::Relaxed);
                self.gauge.set(now as f64);
                true
            }
            Err(_) => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_receive_with_a_full_batch_of_permits_free_adds_a_poller() {
        assert_eq!(after_receive(10, 10, 10, 10), Scale::Add);
        assert_eq!(after_receive(10, 10, 10, 35), Scale::Add);
        // The queue had fewer than asked: no backlog to poll faster for.
        assert_eq!(after_receive(7, 10, 10, 30), Scale::Stay);
        // Permits, not receives, are the limit: another poller would only split them.
        assert_eq!(after_receive(10, 10, 10, 9), Scale::Stay);
        assert_eq!(after_receive(10, 10, 10, 0), Scale::Stay);
        // A receive asked for less than a batch (permits were short): not a sign of backlog.
        assert_eq!(after_receive(4, 4, 10, 20), Scale::Stay);
        // With a concurrency below 10 a full batch is the concurrency.
        assert_eq!(after_receive(4, 4, 4, 4), Scale::Add);
    }

    #[test]
    fn an_empty_receive_retires_the_poller() {
        assert_eq!(after_receive(0, 10, 10, 100), Scale::Retire);
        assert_eq!(after_receive(0, 3, 10, 0), Scale::Retire);
    }

    #[test]
    fn the_count_stays_within_its_bounds() {
        let count = PollerCount::new(1, 3, "q");
        assert!(count.try_add());
        assert!(!count.try_retire(), "the floor is never retired");
        assert!(count.try_add() && count.try_add());
        assert!(!count.try_add(), "the ceiling is never passed");
        assert_eq!(count.peak(), 3);
        assert!(count.try_retire() && count.try_retire());
        assert!(!count.try_retire());
        count.ended();
        assert_eq!(count.peak(), 3);
        // A ceiling below the floor is raised to it.
        let count = PollerCount::new(4, 2, "q");
        assert!((0..4).all(|_| count.try_add()));
        assert!(!count.try_add());
    }
}
