//! What a worker is told: [`WorkerConfig`], the payload-mismatch rule, and what stops a
//! worker from starting.

use std::time::Duration;

use crate::message::{Envelope, KeySpec};
use crate::startup::StartupError;

/// How a worker runs. Built by the CLI from flags, or directly by library users.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// The queue to consume.
    pub queue_url: String,
    /// Checkpoint scope; `None` means the queue's name.
    pub scope: Option<String>,
    /// Where the idempotency key is in the event.
    pub key: KeySpec,
    /// How events are wrapped in message bodies.
    pub envelope: Envelope,
    /// What to do when a key arrives again with a different payload.
    pub on_payload_mismatch: PayloadMismatch,
    /// Long polls kept while the queue is quiet (at least 1); more are added while
    /// receives come back full and permits are free.
    pub pollers: usize,
    /// Most concurrent long polls (raised to `pollers` if below it).
    pub max_pollers: usize,
    /// Most messages in flight at once.
    pub concurrency: usize,
    /// Long-poll wait per ReceiveMessage (at most 20 s).
    pub wait_time: Duration,
    /// Visibility timeout requested on receive; `None` uses the queue's own. Leases last as
    /// long, so an abandoned message and its lease expire together.
    pub visibility_timeout: Option<Duration>,
    /// Longest a handler may run, heartbeats included, before it is stopped and retried.
    pub max_handler_time: Duration,
    /// Extend the visibility timeout and the lease while a handler runs (every third of the
    /// lease), so a handler may outlast the visibility timeout without a second delivery.
    /// Turn it off only when the visibility timeout covers every handler (or to simulate a
    /// stalled worker in tests): a handler past its lease then races the next delivery, and
    /// only the lease fencing keeps its late writes out.
    pub heartbeat: bool,
    /// First retry delay; doubles per attempt.
    pub backoff_base: Duration,
    /// Longest retry delay.
    pub backoff_max: Duration,
    /// Exit once nothing was received and nothing was in flight for this long.
    pub exit_when_idle: Option<Duration>,
    /// How long in-flight handlers may take to finish after a shutdown signal.
    pub shutdown_timeout: Duration,
    /// How long to keep trying to reach the queue at start while SQS is unreachable (a
    /// queue that cannot work, such as a wrong URL, fails at once).
    pub startup_timeout: Duration,
    /// This worker's name, the first part of its lease tokens (`worker_id#n`); `None` makes
    /// one from host, pid and a random suffix.
    pub worker_id: Option<String>,
}

impl WorkerConfig {
    /// A config for `queue_url` with the CLI's defaults.
    pub fn new(queue_url: impl Into<String>) -> Self {
        Self {
            queue_url: queue_url.into(),
            scope: None,
            key: KeySpec::default(),
            envelope: Envelope::Raw,
            on_payload_mismatch: PayloadMismatch::DeadLetter,
            pollers: 1,
            max_pollers: 10,
            concurrency: 20,
            wait_time: Duration::from_secs(20),
            visibility_timeout: None,
            max_handler_time: Duration::from_secs(900),
            heartbeat: true,
            backoff_base: Duration::from_secs(2),
            backoff_max: Duration::from_secs(900),
            exit_when_idle: None,
            shutdown_timeout: Duration::from_secs(25),
            startup_timeout: Duration::from_secs(300),
            worker_id: None,
        }
    }
}

/// What to do when an event's key arrives again with a different payload (the Stripe rule:
/// an idempotency key reused with other content is a client bug, not a duplicate).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum PayloadMismatch {
    /// Send the message to the DLQ with reason `payload_mismatch`; the event's checkpoint is
    /// left as it was.
    #[default]
    DeadLetter,
    /// Treat it as the same event: skip it when complete, resume it when in progress.
    Accept,
}

/// What stops a worker from starting.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// The queue could not be used at start: it cannot work as configured (no such queue,
    /// access denied, no credentials), or SQS stayed unreachable until the start-up deadline.
    #[error(transparent)]
    Startup(StartupError),
    /// The configuration cannot work.
    #[error("invalid configuration: {0}")]
    Config(String),
}

impl WorkerError {
    /// True for what only an operator can fix (exit 2), false for an outage that outlasted
    /// the start-up deadline (exit 1).
    pub fn is_fatal(&self) -> bool {
        match self {
            WorkerError::Startup(error) => error.is_fatal(),
            WorkerError::Config(_) => true,
        }
    }
}
