//! The claim/run/settle core that the service and Lambda share: starting it (queue setup,
//! the acker) and stopping it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::handler::{Handler, StepRecorder};
use crate::sqs::{RedrivePolicy, SqsQueue};
use crate::store::CheckpointStore;

use super::acker::{ACK_PARALLEL, AckRequest, run_acker};
use super::config::{WorkerConfig, WorkerError};
use super::pollers::PollerCount;
use super::readiness::Readiness;
use super::running::RecentlySettled;
use super::settlement::Mode;
use super::shared::Shared;
use super::summary::{Counters, RunSummary};

/// The parts a [`Core`] is made of.
pub(crate) struct CoreParts {
    pub(crate) config: WorkerConfig,
    pub(crate) sqs: SqsQueue,
    pub(crate) store: Arc<dyn CheckpointStore>,
    pub(crate) handler: Arc<dyn Handler>,
    pub(crate) readiness: Option<Arc<Readiness>>,
}

/// The claim/run/settle core shared by the poll loop and the Lambda adapter: the state of
/// one queue and the task that batches completions and deletes.
pub(crate) struct Core {
    pub(crate) shared: Arc<Shared>,
    acker: tokio::task::JoinHandle<()>,
    acker_stop: CancellationToken,
}

impl Core {
    /// Check the configuration, read the queue's visibility timeout and DLQ, start the acker.
    pub(crate) async fn start(parts: CoreParts, mode: Mode) -> Result<Core, WorkerError> {
        let config = &parts.config;
        if config.concurrency == 0 || config.pollers == 0 {
            return Err(WorkerError::Config(
                "--concurrency and --pollers must be at least 1".into(),
            ));
        }
        crate::handler::check_step_transactions(&*parts.handler, &*parts.store)
            .map_err(WorkerError::Config)?;
        let (lease, policy) = mode
            .queue_setup(config, &parts.sqs, parts.readiness.as_deref())
            .await?;
        if lease.is_zero() {
            return Err(WorkerError::Config(
                "the visibility timeout is 0 s, so no lease could hold; set --visibility-timeout"
                    .into(),
            ));
        }
        let (ack_sender, ack_receiver) = mpsc::channel(config.concurrency * 2 + 16);
        let shared = Arc::new(new_shared(parts, mode, lease, policy, ack_sender));
        log_start(&shared);
        let acker_stop = CancellationToken::new();
        let acker = tokio::spawn(run_acker(shared.clone(), ack_receiver, acker_stop.clone()));
        Ok(Core {
            shared,
            acker,
            acker_stop,
        })
    }

    /// Settle what the acker still holds and stop it. Returns the run's counts.
    pub(crate) async fn stop(self) -> RunSummary {
        self.acker_stop.cancel();
        if let Err(error) = self.acker.await {
            tracing::error!(%error, "the delete task failed");
        }
        let mut summary = self.shared.counters.snapshot();
        summary.peak_pollers = self.shared.pollers.peak() as u64;
        if let Some(first) = self.shared.first_received.get() {
            let last = *self.shared.last_activity.lock().expect("not poisoned");
            summary.active_millis = last.saturating_duration_since(*first).as_millis() as u64;
        }
        summary
    }
}

/// Connections for the worker's own statements: claims (a batch's claim runs in a task of
/// its own, so several may be out at once), the acker's settlements, renewals, releases and
/// the probe — as many as the shared pool used to give them (half the concurrency), and at
/// least a claim per poller plus the acker's.
fn bookkeeping_connections(config: &WorkerConfig) -> u32 {
    (config.concurrency / 2)
        .max(config.pollers + ACK_PARALLEL + 2)
        .min(32) as u32
}

/// This machine's name, from HOSTNAME or /etc/hostname (containers set one or the other).
pub(crate) fn host_name() -> Option<String> {
    std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
}

fn default_worker_id() -> String {
    let host = host_name().unwrap_or_else(|| "worker".into());
    format!("{host}-{}-{:04x}", std::process::id(), fastrand::u16(..))
}

/// Tokens every batch of a run watches: `stop` (no new work: a FIFO group's messages not
/// started yet are handed back) and `abandon` (the drain deadline passed: running handlers
/// are stopped and their messages handed back).
#[derive(Clone)]
pub(crate) struct BatchTokens {
    pub(crate) stop: CancellationToken,
    pub(crate) abandon: CancellationToken,
    /// How long a handler told to stop gets before its task is aborted
    /// ([`HANDLER_STOP_GRACE`](super::heartbeat::HANDLER_STOP_GRACE) for a service; less on Lambda, within its deadline's margin).
    pub(crate) stop_grace: Duration,
}

/// What one received batch runs under.
pub(crate) struct BatchContext {
    pub(crate) received_at: Instant,
    /// No lease may outlive this (a Lambda invocation's deadline).
    pub(crate) lease_cap: Option<Instant>,
    pub(crate) tokens: BatchTokens,
    /// 0 for a received batch; more for deliveries claimed again here (`batch.rs`).
    pub(crate) rechecks: u32,
    /// The trace context the batch's `process` spans are children of: a Lambda
    /// invocation's, or none (each delivery then continues its producer's trace).
    pub(crate) parent: Option<opentelemetry::Context>,
}

/// The state of one run, before any task shares it.
fn new_shared(
    parts: CoreParts,
    mode: Mode,
    lease: Duration,
    policy: Option<RedrivePolicy>,
    acks: mpsc::Sender<AckRequest>,
) -> Shared {
    let CoreParts {
        config,
        sqs,
        store,
        handler,
        readiness,
    } = parts;
    let scope = config
        .scope
        .clone()
        .unwrap_or_else(|| sqs.name().to_owned());
    let own_store = store.own_connections(bookkeeping_connections(&config));
    Shared {
        recorder: StepRecorder::start(own_store.clone(), scope.clone()),
        counters: Counters::new(sqs.name()),
        pollers: PollerCount::new(config.pollers, config.max_pollers, sqs.name()),
        max_receive_count: policy.as_ref().and_then(|p| p.max_receive_count),
        dlq: policy.map(|p| sqs.sibling(p.dlq_url)),
        fifo: sqs.url().ends_with(".fifo"),
        sqs,
        store: own_store,
        handler_store: store,
        handler,
        scope,
        worker_id: config.worker_id.clone().unwrap_or_else(default_worker_id),
        claim_sequence: AtomicU64::new(1),
        lease,
        in_flight: AtomicUsize::new(0),
        running: Mutex::new(HashMap::new()),
        claiming: Mutex::new(HashMap::new()),
        settled_recently: Mutex::new(RecentlySettled::default()),
        first_received: std::sync::OnceLock::new(),
        last_activity: Mutex::new(Instant::now()),
        acks,
        readiness,
        database_up: AtomicBool::new(true),
        mode,
        config,
    }
}

/// One line saying what this worker runs with, and a warning when the queue has no DLQ.
fn log_start(shared: &Shared) {
    let queue = shared.sqs.name();
    if shared.dlq.is_none() {
        tracing::warn!(
            queue,
            "the queue has no RedrivePolicy, so permanent failures cannot go to a DLQ and will \
             be retried with backoff; give the queue a DLQ"
        );
    }
    tracing::info!(
        queue,
        scope = %shared.scope,
        worker_id = %shared.worker_id,
        lease_secs = shared.lease.as_secs(),
        pollers = shared.config.pollers,
        max_pollers = shared.config.max_pollers.max(shared.config.pollers),
        concurrency = shared.config.concurrency,
        fifo = shared.fifo,
        "worker starting"
    );
}
