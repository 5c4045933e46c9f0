//! The counts of a run: [`RunSummary`] for scripts and tests, each count mirrored to the
//! metric of the same name, `sqs_worker_<field>_total` ([`names`]).

use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;

/// Counts of what happened during a run, for the demo, tests and logs.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct RunSummary {
    /// Messages received.
    pub received: u64,
    /// Events whose handler succeeded and were marked complete.
    pub processed: u64,
    /// Deliveries of events already complete or failed, deleted without running anything.
    pub duplicates_skipped: u64,
    /// Deliveries of events leased by another worker, made visible again later.
    pub busy_deferred: u64,
    /// Retryable failures, put back with a backoff.
    pub retried: u64,
    /// Messages sent to the DLQ.
    pub sent_to_dlq: u64,
    /// Messages recorded in `dead_letters` and deleted: failures of a final redrive pass.
    pub dead_lettered: u64,
    /// Messages SQS refused to delete (they come back and are skipped cheaply).
    pub delete_failures: u64,
    /// Completions refused because another worker had taken the lease.
    pub lease_lost: u64,
    /// ReceiveMessage calls that answered (empty ones included).
    pub receive_calls: u64,
    /// ReceiveMessage calls that brought no message (long polls of a quiet queue).
    pub empty_receives: u64,
    /// Failed ReceiveMessage calls.
    pub receive_errors: u64,
    /// Failed checkpoint statements.
    pub database_errors: u64,
    /// Visibility and lease renewals of long-running handlers.
    pub heartbeats: u64,
    /// Renewals that failed (the handler was told to stop; its writes stay fenced).
    pub heartbeat_failures: u64,
    /// Messages handed back at shutdown (lease released, visible again at once): handlers
    /// stopped at the deadline, and messages received but not started.
    pub released_at_shutdown: u64,
    /// Handlers still running when the shutdown deadline passed.
    pub abandoned_at_shutdown: u64,
    /// Milliseconds from the first message received to the last one settled (throughput
    /// is `received` over this; startup and idle time are not in it).
    pub active_millis: u64,
    /// The most long polls that ran at once (see `--max-pollers`).
    pub peak_pollers: u64,
}

/// One count: kept for the run summary and mirrored to the `metrics` facade.
pub(super) struct Count {
    value: AtomicU64,
    metric: metrics::Counter,
}

impl Count {
    pub(super) fn new(name: &'static str, queue: &str) -> Self {
        Self {
            value: AtomicU64::new(0),
            metric: metrics::counter!(name, "queue" => queue.to_owned()),
        }
    }

    pub(super) fn add(&self, n: usize) {
        self.value.fetch_add(n as u64, Ordering::Relaxed);
        self.metric.increment(n as u64);
    }

    fn get(&self) -> u64 {
        self.value.load(Ordering::Relaxed)
    }
}

pub(super) struct Counters {
    pub(super) received: Count,
    pub(super) processed: Count,
    pub(super) duplicates_skipped: Count,
    pub(super) busy_deferred: Count,
    pub(super) retried: Count,
    pub(super) sent_to_dlq: Count,
    pub(super) dead_lettered: Count,
    pub(super) delete_failures: Count,
    pub(super) lease_lost: Count,
    pub(super) receive_calls: Count,
    pub(super) empty_receives: Count,
    pub(super) receive_errors: Count,
    pub(super) database_errors: Count,
    pub(super) heartbeats: Count,
    pub(super) heartbeat_failures: Count,
    pub(super) released_at_shutdown: Count,
    pub(super) in_flight: metrics::Gauge,
    pub(super) handler_seconds: metrics::Histogram,
}

impl Counters {
    pub(super) fn new(queue: &str) -> Self {
        Self {
            received: Count::new(names::RECEIVED, queue),
            processed: Count::new(names::PROCESSED, queue),
            duplicates_skipped: Count::new(names::DUPLICATES_SKIPPED, queue),
            busy_deferred: Count::new(names::BUSY_DEFERRED, queue),
            retried: Count::new(names::RETRIED, queue),
            sent_to_dlq: Count::new(names::SENT_TO_DLQ, queue),
            dead_lettered: Count::new(names::DEAD_LETTERED, queue),
            delete_failures: Count::new(names::DELETE_FAILURES, queue),
            lease_lost: Count::new(names::LEASE_LOST, queue),
            receive_calls: Count::new(names::RECEIVE_CALLS, queue),
            empty_receives: Count::new(names::EMPTY_RECEIVES, queue),
            receive_errors: Count::new(names::RECEIVE_ERRORS, queue),
            database_errors: Count::new(names::DATABASE_ERRORS, queue),
            heartbeats: Count::new(names::HEARTBEATS, queue),
            heartbeat_failures: Count::new(names::HEARTBEAT_FAILURES, queue),
            released_at_shutdown: Count::new(names::RELEASED_AT_SHUTDOWN, queue),
            in_flight: metrics::gauge!(names::IN_FLIGHT, "queue" => queue.to_owned()),
            handler_seconds: metrics::histogram!(names::HANDLER_DURATION, "queue" => queue.to_owned()),
        }
    }

    pub(super) fn snapshot(&self) -> RunSummary {
        RunSummary {
            received: self.received.get(),
            processed: self.processed.get(),
            duplicates_skipped: self.duplicates_skipped.get(),
            busy_deferred: self.busy_deferred.get(),
            retried: self.retried.get(),
            sent_to_dlq: self.sent_to_dlq.get(),
            dead_lettered: self.dead_lettered.get(),
            delete_failures: self.delete_failures.get(),
            lease_lost: self.lease_lost.get(),
            receive_calls: self.receive_calls.get(),
            empty_receives: self.empty_receives.get(),
            receive_errors: self.receive_errors.get(),
            database_errors: self.database_errors.get(),
            heartbeats: self.heartbeats.get(),
            heartbeat_failures: self.heartbeat_failures.get(),
            released_at_shutdown: self.released_at_shutdown.get(),
            abandoned_at_shutdown: 0,
            active_millis: 0,
            peak_pollers: 0,
        }
    }
}

/// Metric names: each count of [`RunSummary`] is `sqs_worker_<field>_total`, so a script
/// reading `run`'s closing line and a dashboard reading `/metrics` use the same words.
pub mod names {
    /// [`RunSummary::received`](super::RunSummary::received).
    pub const RECEIVED: &str = "sqs_worker_received_total";
    /// [`RunSummary::processed`](super::RunSummary::processed).
    pub const PROCESSED: &str = "sqs_worker_processed_total";
    /// [`RunSummary::duplicates_skipped`](super::RunSummary::duplicates_skipped).
    pub const DUPLICATES_SKIPPED: &str = "sqs_worker_duplicates_skipped_total";
    /// [`RunSummary::busy_deferred`](super::RunSummary::busy_deferred).
    pub const BUSY_DEFERRED: &str = "sqs_worker_busy_deferred_total";
    /// [`RunSummary::retried`](super::RunSummary::retried).
    pub const RETRIED: &str = "sqs_worker_retried_total";
    /// [`RunSummary::sent_to_dlq`](super::RunSummary::sent_to_dlq).
    pub const SENT_TO_DLQ: &str = "sqs_worker_sent_to_dlq_total";
    /// [`RunSummary::dead_lettered`](super::RunSummary::dead_lettered).
    pub const DEAD_LETTERED: &str = "sqs_worker_dead_lettered_total";
    /// [`RunSummary::delete_failures`](super::RunSummary::delete_failures).
    pub const DELETE_FAILURES: &str = "sqs_worker_delete_failures_total";
    /// [`RunSummary::lease_lost`](super::RunSummary::lease_lost).
    pub const LEASE_LOST: &str = "sqs_worker_lease_lost_total";
    /// [`RunSummary::receive_calls`](super::RunSummary::receive_calls).
    pub const RECEIVE_CALLS: &str = "sqs_worker_receive_calls_total";
    /// [`RunSummary::empty_receives`](super::RunSummary::empty_receives).
    pub const EMPTY_RECEIVES: &str = "sqs_worker_empty_receives_total";
    /// [`RunSummary::receive_errors`](super::RunSummary::receive_errors).
    pub const RECEIVE_ERRORS: &str = "sqs_worker_receive_errors_total";
    /// [`RunSummary::database_errors`](super::RunSummary::database_errors).
    pub const DATABASE_ERRORS: &str = "sqs_worker_database_errors_total";
    /// [`RunSummary::heartbeats`](super::RunSummary::heartbeats).
    pub const HEARTBEATS: &str = "sqs_worker_heartbeats_total";
    /// [`RunSummary::heartbeat_failures`](super::RunSummary::heartbeat_failures).
    pub const HEARTBEAT_FAILURES: &str = "sqs_worker_heartbeat_failures_total";
    /// [`RunSummary::released_at_shutdown`](super::RunSummary::released_at_shutdown).
    pub const RELEASED_AT_SHUTDOWN: &str = "sqs_worker_released_at_shutdown_total";
    /// Handlers running now (a gauge, not a count of the summary).
    pub const IN_FLIGHT: &str = "sqs_worker_in_flight";
    /// Long polls running now (a gauge; the summary has its peak).
    pub const POLLERS: &str = "sqs_worker_pollers";
    /// Handler run time in seconds (a histogram, not a count of the summary).
    pub const HANDLER_DURATION: &str = "sqs_worker_handler_duration_seconds";
}
