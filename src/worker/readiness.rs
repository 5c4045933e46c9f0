//! Readiness: what the worker reports about its dependencies, for `/readyz` to serve. It
//! lives with the worker, which feeds it; telemetry only reads it.

use std::sync::atomic::{AtomicBool, Ordering};

/// Whether the worker can do its job now: fed by the worker, read by `/readyz`.
///
/// Each dependency counts as reached when its latest call succeeded. Calls are frequent: a
/// long poll at least every `--wait-time-seconds` while there is room for work, deletes,
/// visibility changes and heartbeats while there is work, and a database ping every 5 s.
#[derive(Debug, Default)]
pub struct Readiness {
    sqs: AtomicBool,
    database: AtomicBool,
    stopping: AtomicBool,
}

/// What `/readyz` reports.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ReadinessReport {
    /// True when every part below is fine.
    pub ready: bool,
    /// The latest SQS call succeeded.
    pub sqs: bool,
    /// The latest database call succeeded.
    pub database: bool,
    /// A shutdown has begun.
    pub stopping: bool,
}

impl Readiness {
    /// Nothing reached yet: not ready.
    pub fn new() -> Self {
        Self::default()
    }

    /// Record the outcome of an SQS call.
    pub fn sqs(&self, ok: bool) {
        self.sqs.store(ok, Ordering::Relaxed);
    }

    /// Record the outcome of a database call.
    pub fn database(&self, ok: bool) {
        self.database.store(ok, Ordering::Relaxed);
    }

    /// A shutdown began: an orchestrator should send no more work here.
    pub fn stopping(&self) {
        self.stopping.store(true, Ordering::Relaxed);
    }

    /// The current state.
    pub fn report(&self) -> ReadinessReport {
        let sqs = self.sqs.load(Ordering::Relaxed);
        let database = self.database.load(Ordering::Relaxed);
        let stopping = self.stopping.load(Ordering::Relaxed);
        ReadinessReport {
            ready: sqs && database && !stopping,
            sqs,
            database,
            stopping,
        }
    }
}
