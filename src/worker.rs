//! The poll loop: receive, claim, run, settle, delete — with bounded concurrency, backoff,
//! batched deletes and a graceful shutdown.
//!
//! Shape of a run: `pollers` tasks long-poll SQS, each first taking semaphore permits so that
//! at most `concurrency` messages are in flight (no unbounded buffering). A receive batch is
//! claimed in one statement; each claimed event runs in its own task holding one permit.
//! Outcomes that end in a delete go through one *acker* task that batches checkpoint
//! completion and DeleteMessageBatch. Shutdown: tell (cancel the long polls), then wait for
//! handlers under a deadline; a handler is never cancelled mid-step by a shutdown.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::future::join_all;
use serde::Serialize;
use sqlx::PgPool;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::handler::{Handler, HandlerError, Job};
use crate::message::{self, Envelope, EventIdentity, KeyError, KeySpec, RedriveMarkers};
use crate::sqs::{
    self, MAX_VISIBILITY, OutgoingMessage, ReceivedMessage, RedrivePolicy, SqsError, SqsErrorKind,
    SqsQueue,
};
use crate::startup::{self, StartupError, Verdict};
use crate::store::{
    self, CheckpointStore, Claim, ClaimOutcome, ClaimRequest, ClaimTerms, Lease, NewDeadLetter,
    PostgresStore, StoreError,
};
use crate::telemetry::{self, Readiness};

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
    /// Concurrent long polls.
    pub pollers: usize,
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
    /// This worker's lease-owner name; `None` makes one from host, pid and a random suffix.
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
            pollers: 2,
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
    pub dead_lettered: u64,
    /// Final-pass failures recorded in `dead_letters` and deleted.
    pub final_pass_failures: u64,
    /// Messages SQS refused to delete (they come back and are skipped cheaply).
    pub delete_failures: u64,
    /// Completions refused because another worker had taken the lease.
    pub lease_lost: u64,
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
}

/// One count: kept for the run summary and mirrored to the `metrics` facade.
struct Count {
    value: AtomicU64,
    metric: metrics::Counter,
}

impl Count {
    fn new(name: &'static str, queue: &str) -> Self {
        Self {
            value: AtomicU64::new(0),
            metric: metrics::counter!(name, "queue" => queue.to_owned()),
        }
    }

    fn add(&self, n: usize) {
        self.value.fetch_add(n as u64, Ordering::Relaxed);
        self.metric.increment(n as u64);
    }

    fn get(&self) -> u64 {
        self.value.load(Ordering::Relaxed)
    }
}

struct Counters {
    received: Count,
    processed: Count,
    duplicates_skipped: Count,
    busy_deferred: Count,
    retried: Count,
    dead_lettered: Count,
    final_pass_failures: Count,
    delete_failures: Count,
    lease_lost: Count,
    receive_errors: Count,
    database_errors: Count,
    heartbeats: Count,
    heartbeat_failures: Count,
    released_at_shutdown: Count,
    in_flight: metrics::Gauge,
    handler_seconds: metrics::Histogram,
}

impl Counters {
    fn new(queue: &str) -> Self {
        use telemetry::names;
        Self {
            received: Count::new(names::RECEIVED, queue),
            processed: Count::new(names::PROCESSED, queue),
            duplicates_skipped: Count::new(names::DUPLICATES, queue),
            busy_deferred: Count::new(names::CLAIM_CONFLICTS, queue),
            retried: Count::new(names::RETRIED, queue),
            dead_lettered: Count::new(names::SENT_TO_DLQ, queue),
            final_pass_failures: Count::new(names::DEAD_LETTERED, queue),
            delete_failures: Count::new(names::DELETE_ERRORS, queue),
            lease_lost: Count::new(names::LEASE_LOST, queue),
            receive_errors: Count::new(names::RECEIVE_ERRORS, queue),
            database_errors: Count::new(names::DATABASE_ERRORS, queue),
            heartbeats: Count::new(names::HEARTBEATS, queue),
            heartbeat_failures: Count::new(names::HEARTBEAT_FAILURES, queue),
            released_at_shutdown: Count::new(names::RELEASED_AT_SHUTDOWN, queue),
            in_flight: metrics::gauge!(names::IN_FLIGHT, "queue" => queue.to_owned()),
            handler_seconds: metrics::histogram!(names::HANDLER_DURATION, "queue" => queue.to_owned()),
        }
    }

    fn snapshot(&self) -> RunSummary {
        RunSummary {
            received: self.received.get(),
            processed: self.processed.get(),
            duplicates_skipped: self.duplicates_skipped.get(),
            busy_deferred: self.busy_deferred.get(),
            retried: self.retried.get(),
            dead_lettered: self.dead_lettered.get(),
            final_pass_failures: self.final_pass_failures.get(),
            delete_failures: self.delete_failures.get(),
            lease_lost: self.lease_lost.get(),
            receive_errors: self.receive_errors.get(),
            database_errors: self.database_errors.get(),
            heartbeats: self.heartbeats.get(),
            heartbeat_failures: self.heartbeat_failures.get(),
            released_at_shutdown: self.released_at_shutdown.get(),
            abandoned_at_shutdown: 0,
            active_millis: 0,
        }
    }
}

/// Retry delay for the `attempt`-th claim: exponential from `base`, capped at `max` and
/// below SQS's 12 h visibility limit, with "equal jitter" (`jitter` in 0..1 picks a point in
/// the upper half) so retries of a burst spread out but never come back at once.
pub fn retry_delay(attempt: u32, base: Duration, max: Duration, jitter: f64) -> Duration {
    let exponent = attempt.saturating_sub(1).min(30);
    let ceiling = base
        .saturating_mul(1u32 << exponent)
        .min(max)
        .min(MAX_VISIBILITY);
    let half = ceiling / 2;
    half + half.mul_f64(jitter.clamp(0.0, 1.0))
}

/// Builds a [`Worker`] from its parts.
#[derive(Default)]
pub struct WorkerBuilder {
    config: Option<WorkerConfig>,
    client: Option<aws_sdk_sqs::Client>,
    store: Option<Arc<dyn CheckpointStore>>,
    handler: Option<Arc<dyn Handler>>,
    shutdown: Option<CancellationToken>,
    readiness: Option<Arc<Readiness>>,
}

impl WorkerBuilder {
    /// The worker's configuration (required).
    pub fn config(mut self, config: WorkerConfig) -> Self {
        self.config = Some(config);
        self
    }

    /// The SQS client (required).
    pub fn sqs_client(mut self, client: aws_sdk_sqs::Client) -> Self {
        self.client = Some(client);
        self
    }

    /// The pool of the checkpoint database, already migrated: a shortcut for
    /// [`WorkerBuilder::store`] with a [`PostgresStore`].
    pub fn pool(mut self, pool: PgPool) -> Self {
        self.store = Some(PostgresStore::shared(pool));
        self
    }

    /// The checkpoint store (required, or [`WorkerBuilder::pool`]).
    pub fn store(mut self, store: Arc<dyn CheckpointStore>) -> Self {
        self.store = Some(store);
        self
    }

    /// The handler (required).
    pub fn handler(mut self, handler: impl Handler) -> Self {
        self.handler = Some(Arc::new(handler));
        self
    }

    /// A handler already shared elsewhere.
    pub fn shared_handler(mut self, handler: Arc<dyn Handler>) -> Self {
        self.handler = Some(handler);
        self
    }

    /// The token whose cancellation stops the worker (optional; default: never).
    pub fn shutdown(mut self, token: CancellationToken) -> Self {
        self.shutdown = Some(token);
        self
    }

    /// Where to report whether SQS and the database answer (optional; `/readyz` reads it).
    pub fn readiness(mut self, readiness: Arc<Readiness>) -> Self {
        self.readiness = Some(readiness);
        self
    }

    /// The worker, or which part is missing.
    pub fn build(self) -> Result<Worker, WorkerError> {
        let missing = |what: &str| WorkerError::Config(format!("the worker builder needs {what}"));
        let mut worker = Worker::new(
            self.config.ok_or_else(|| missing("a config"))?,
            self.client.ok_or_else(|| missing("an SQS client"))?,
            self.store.ok_or_else(|| missing("a checkpoint store"))?,
            self.handler.ok_or_else(|| missing("a handler"))?,
        );
        if let Some(token) = self.shutdown {
            worker = worker.with_shutdown(token);
        }
        if let Some(readiness) = self.readiness {
            worker = worker.with_readiness(readiness);
        }
        Ok(worker)
    }
}

/// A worker: one queue, one checkpoint scope, one handler.
pub struct Worker {
    config: WorkerConfig,
    sqs: SqsQueue,
    store: Arc<dyn CheckpointStore>,
    handler: Arc<dyn Handler>,
    shutdown: CancellationToken,
    readiness: Option<Arc<Readiness>>,
}

/// After the drain deadline, how long stopped handlers get to hand their messages back
/// (release the lease, visibility 0). ECS's 30 s stopTimeout leaves 5 s over the default
/// 25 s drain.
const HAND_BACK_GRACE: Duration = Duration::from_secs(3);

impl Worker {
    /// Start building a worker.
    pub fn builder() -> WorkerBuilder {
        WorkerBuilder::default()
    }

    /// A worker for `config.queue_url`, checkpointing in `store` (already migrated).
    pub fn new(
        config: WorkerConfig,
        client: aws_sdk_sqs::Client,
        store: Arc<dyn CheckpointStore>,
        handler: Arc<dyn Handler>,
    ) -> Self {
        let sqs = SqsQueue::new(client, config.queue_url.clone());
        Self {
            config,
            sqs,
            store,
            handler,
            shutdown: CancellationToken::new(),
            readiness: None,
        }
    }

    /// Stop when `token` is cancelled (e.g. on SIGTERM): no new receives, in-flight handlers
    /// get `shutdown_timeout` to finish, then are stopped and their messages handed back.
    pub fn with_shutdown(mut self, token: CancellationToken) -> Self {
        self.shutdown = token;
        self
    }

    /// Report whether SQS and the database answer to `readiness` (`/readyz` reads it).
    pub fn with_readiness(mut self, readiness: Arc<Readiness>) -> Self {
        self.readiness = Some(readiness);
        self
    }

    /// Run until shut down (or idle, with `exit_when_idle`). Returns what happened.
    pub async fn run(self) -> Result<RunSummary, WorkerError> {
        let core = Core::start(
            CoreParts {
                config: self.config,
                sqs: self.sqs,
                store: self.store,
                handler: self.handler,
                readiness: self.readiness,
            },
            Mode::Service,
        )
        .await?;
        let shared = core.shared.clone();
        let stop = self.shutdown.child_token();
        let abandon = CancellationToken::new();
        let tracker = TaskTracker::new();
        let semaphore = Arc::new(Semaphore::new(shared.config.concurrency));
        tokio::spawn(probe_database(shared.clone(), stop.clone()));
        let mut pollers = JoinSet::new();
        for _ in 0..shared.config.pollers {
            pollers.spawn(poll(
                shared.clone(),
                semaphore.clone(),
                tracker.clone(),
                BatchTokens {
                    stop: stop.clone(),
                    abandon: abandon.clone(),
                    stop_grace: HANDLER_STOP_GRACE,
                },
            ));
        }
        if let Some(idle) = shared.config.exit_when_idle {
            tokio::spawn(exit_when_idle(shared.clone(), idle, stop.clone()));
        }
        // Run until told to stop (or every poller ended), then drain: in-flight long polls
        // and handlers share one deadline that starts now, so the whole drain stays within
        // --shutdown-timeout (below the orchestrator's stop timeout).
        tokio::select! {
            _ = stop.cancelled() => {}
            _ = async { while pollers.join_next().await.is_some() {} } => {}
        }
        stop.cancel();
        if let Some(readiness) = &shared.readiness {
            readiness.stopping();
        }
        let deadline = tokio::time::Instant::now() + shared.config.shutdown_timeout;
        tracker.close();
        let running = shared.in_flight.load(Ordering::Relaxed);
        if running > 0 {
            tracing::info!(
                in_flight = running,
                deadline_secs = shared.config.shutdown_timeout.as_secs(),
                "stopped receiving; waiting for in-flight handlers"
            );
        }
        let drained = tokio::time::timeout_at(deadline, async {
            while pollers.join_next().await.is_some() {}
            tracker.wait().await;
        })
        .await
        .is_ok();
        let mut abandoned = 0;
        if !drained {
            let running = shared.in_flight.load(Ordering::Relaxed);
            tracing::warn!(
                in_flight = running,
                "shutdown deadline passed; stopping the handlers still running and handing \
                 their messages back (lease released, visible again at once)"
            );
            abandon.cancel();
            let handed_back = tokio::time::timeout(HAND_BACK_GRACE, async {
                while pollers.join_next().await.is_some() {}
                tracker.wait().await;
            })
            .await
            .is_ok();
            if !handed_back {
                pollers.abort_all();
                abandoned = shared.in_flight.load(Ordering::Relaxed) as u64;
                tracing::warn!(
                    abandoned,
                    "some messages could not be handed back in time; their leases expire and \
                     SQS delivers them again after the visibility timeout"
                );
            }
        }
        let mut summary = core.stop().await;
        summary.abandoned_at_shutdown = abandoned;
        tracing::info!(?summary, "worker stopped");
        Ok(summary)
    }
}

/// The parts a [`Core`] is made of.
pub(crate) struct CoreParts {
    pub(crate) config: WorkerConfig,
    pub(crate) sqs: SqsQueue,
    pub(crate) store: Arc<dyn CheckpointStore>,
    pub(crate) handler: Arc<dyn Handler>,
    pub(crate) readiness: Option<Arc<Readiness>>,
}

/// How settled messages leave the queue.
pub(crate) enum Mode {
    /// A long-running service: deletes and visibility changes go to SQS.
    Service,
    /// Lambda: SQS deletes what the invocation does not report as failed, so a "delete"
    /// records the receipt as settled instead. Visibility changes (a retry's backoff) go to
    /// SQS only when `change_visibility` (a real invocation, not a local `--event` run whose
    /// receipt handles are made up).
    Lambda {
        settled: Mutex<HashSet<String>>,
        change_visibility: bool,
    },
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
        let CoreParts {
            config,
            sqs,
            store,
            handler,
            readiness,
        } = parts;
        if config.concurrency == 0 || config.pollers == 0 {
            return Err(WorkerError::Config(
                "--concurrency and --pollers must be at least 1".into(),
            ));
        }
        let lambda = matches!(mode, Mode::Lambda { .. });
        let (lease, policy) = if lambda {
            lambda_queue_setup(&config, &sqs).await
        } else {
            service_queue_setup(&config, &sqs, readiness.as_deref()).await?
        };
        let max_receive_count = policy.as_ref().and_then(|p| p.max_receive_count);
        let dlq = policy.map(|p| sqs.sibling(p.dlq_url));
        if lease.is_zero() {
            return Err(WorkerError::Config(
                "the visibility timeout is 0 s, so no lease could hold; set --visibility-timeout"
                    .into(),
            ));
        }
        if dlq.is_none() {
            tracing::warn!(
                queue = sqs.name(),
                "the queue has no RedrivePolicy, so permanent failures cannot go to a DLQ and \
                 will be retried with backoff; give the queue a DLQ"
            );
        }
        let scope = config
            .scope
            .clone()
            .unwrap_or_else(|| sqs.name().to_owned());
        let owner = config.worker_id.clone().unwrap_or_else(default_worker_id);
        let fifo = sqs.url().ends_with(".fifo");
        tracing::info!(
            queue = sqs.name(),
            %scope,
            worker_id = %owner,
            lease_secs = lease.as_secs(),
            pollers = config.pollers,
            concurrency = config.concurrency,
            fifo,
            "worker starting"
        );

        let (ack_sender, ack_receiver) = mpsc::channel(config.concurrency * 2 + 16);
        let shared = Arc::new(Shared {
            counters: Counters::new(sqs.name()),
            sqs,
            dlq,
            max_receive_count,
            store: store.own_connections(bookkeeping_connections(&config)),
            handler_store: store,
            handler,
            scope,
            owner,
            claim_sequence: AtomicU64::new(1),
            lease,
            fifo,
            in_flight: AtomicUsize::new(0),
            running: Mutex::new(HashMap::new()),
            claiming: Mutex::new(HashMap::new()),
            settled_recently: Mutex::new(RecentlySettled::default()),
            first_received: std::sync::OnceLock::new(),
            last_activity: Mutex::new(Instant::now()),
            acks: ack_sender,
            readiness,
            database_up: AtomicBool::new(true),
            mode,
            config,
        });
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
        if let Some(first) = self.shared.first_received.get() {
            let last = *self.shared.last_activity.lock().expect("not poisoned");
            summary.active_millis = last.saturating_duration_since(*first).as_millis() as u64;
        }
        summary
    }
}

/// The lease (the visibility timeout) and the DLQ of a service's queue, read at start. A
/// queue that cannot be reached is tried again until `--startup-timeout`; one that cannot
/// work (no such queue, access denied, no credentials) ends the start at once.
async fn service_queue_setup(
    config: &WorkerConfig,
    sqs: &SqsQueue,
    readiness: Option<&Readiness>,
) -> Result<(Duration, Option<RedrivePolicy>), WorkerError> {
    let deadline = Instant::now() + config.startup_timeout;
    let judge = |error: &SqsError| judge_queue_error(error, sqs.url());
    let (visibility, policy) = startup::retry_until(
        "reading the queue's attributes",
        deadline,
        || async {
            let visibility = match config.visibility_timeout {
                Some(v) => v,
                None => sqs.visibility_timeout().await?,
            };
            Ok((visibility, sqs.redrive_policy().await?))
        },
        judge,
    )
    .await
    .map_err(WorkerError::Startup)?;
    if let Some(readiness) = readiness {
        readiness.sqs(true);
    }
    Ok((visibility, policy))
}

/// The same for Lambda, which has no start phase to fail in: a queue that cannot be inspected
/// still gets its messages claimed and run, with Lambda's default visibility and no DLQ.
async fn lambda_queue_setup(
    config: &WorkerConfig,
    sqs: &SqsQueue,
) -> (Duration, Option<RedrivePolicy>) {
    let lease = match config.visibility_timeout {
        Some(v) => v,
        None => sqs.visibility_timeout().await.unwrap_or_else(|error| {
            tracing::warn!(%error, "cannot read the queue's visibility timeout; assuming 30 s");
            Duration::from_secs(30)
        }),
    };
    let policy = match sqs.redrive_policy().await {
        Ok(policy) => policy,
        Err(error) => {
            tracing::warn!(%error, "cannot read the queue's RedrivePolicy; permanent failures will be reported as batch item failures");
            None
        }
    };
    (lease, policy)
}

/// What a failed SQS call at start means, in a line that says what to fix.
fn judge_queue_error(error: &SqsError, queue_url: &str) -> Verdict {
    let why = &error.message;
    match error.kind {
        SqsErrorKind::Unreachable => {
            Verdict::Transient(format!("cannot reach SQS for queue {queue_url}: {why}"))
        }
        SqsErrorKind::QueueNotFound => Verdict::Fatal(format!(
            "queue {queue_url} does not exist: check --queue-url, AWS_REGION and AWS_ENDPOINT_URL"
        )),
        SqsErrorKind::AccessDenied => Verdict::Fatal(format!(
            "access to queue {queue_url} was denied ({why}): check the AWS credentials and that \
             their policy allows the worker's SQS actions on it (deploy/iam-service-policy.json)"
        )),
        SqsErrorKind::NoCredentials => Verdict::Fatal(
            "no AWS credentials found: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY or \
             AWS_PROFILE, or run with a task or instance role"
                .into(),
        ),
        SqsErrorKind::NoRegion => Verdict::Fatal(
            "no AWS region configured: set AWS_REGION (or a profile's region)".into(),
        ),
        SqsErrorKind::Rejected => Verdict::Fatal(format!(
            "SQS refused the request for queue {queue_url} ({why}): check --queue-url"
        )),
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

/// What every task of one run shares.
pub(crate) struct Shared {
    config: WorkerConfig,
    sqs: SqsQueue,
    dlq: Option<SqsQueue>,
    /// The queue's maxReceiveCount, when it has a DLQ: a message received that often goes
    /// to the DLQ at its next receive.
    max_receive_count: Option<u32>,
    /// The worker's own statements, on a pool of their own (see
    /// [`CheckpointStore::own_connections`]).
    store: Arc<dyn CheckpointStore>,
    /// The store handlers' steps write through: the pool the worker was given.
    handler_store: Arc<dyn CheckpointStore>,
    handler: Arc<dyn Handler>,
    scope: String,
    owner: String,
    /// Numbers each claim statement: the lease owner written to a checkpoint is
    /// `owner#n`, so even this worker's own stale task (whose lease expired and was taken
    /// over by a newer claim here) is fenced out.
    claim_sequence: AtomicU64,
    lease: Duration,
    /// A FIFO queue: a message group's messages run one at a time, in order.
    fifo: bool,
    counters: Counters,
    in_flight: AtomicUsize,
    /// Events running in this process, with deliveries of them that arrived meanwhile
    /// (claimed Busy by our own lease): they ride along instead of waiting out the lease.
    running: Mutex<HashMap<String, RunningHere>>,
    /// Keys in claim statements of this process right now, with how many statements.
    claiming: Mutex<HashMap<String, usize>>,
    /// Keys settled here in the last few seconds (see `finish_running`).
    settled_recently: Mutex<RecentlySettled>,
    /// When the first message arrived (for `RunSummary::active_millis`).
    first_received: std::sync::OnceLock<Instant>,
    last_activity: Mutex<Instant>,
    acks: mpsc::Sender<AckRequest>,
    readiness: Option<Arc<Readiness>>,
    /// The latest database call succeeded. While it is false, pollers stop receiving: a
    /// message received now could not be claimed, and each such receive would count
    /// towards the queue's maxReceiveCount and push healthy events into the DLQ.
    database_up: AtomicBool,
    mode: Mode,
}

impl Shared {
    fn touch(&self) {
        *self.last_activity.lock().expect("not poisoned") = Instant::now();
    }

    fn backoff(&self, attempt: u32) -> Duration {
        retry_delay(
            attempt,
            self.config.backoff_base,
            self.config.backoff_max,
            fastrand::f64(),
        )
    }

    /// The longest a run claimed with `lease` may take: `--max-handler-time`, or on Lambda
    /// the lease itself (it ends before the invocation does, and the handler with it).
    fn run_limit(&self, lease: Duration) -> Duration {
        match self.mode {
            Mode::Lambda { .. } => lease,
            Mode::Service => self.config.max_handler_time,
        }
    }

    fn sqs_reached(&self, ok: bool) {
        if let Some(readiness) = &self.readiness {
            readiness.sqs(ok);
        }
    }

    fn database_reached(&self, ok: bool) {
        let was_up = self.database_up.swap(ok, Ordering::Relaxed);
        if was_up && !ok {
            tracing::warn!(
                "PostgreSQL is unreachable; receiving stops until it answers again (work in \
                 hand is retried, nothing is deleted unsettled)"
            );
        } else if !was_up && ok {
            tracing::info!("PostgreSQL answers again; receiving resumes");
        }
        if let Some(readiness) = &self.readiness {
            readiness.database(ok);
        }
    }

    fn database_up(&self) -> bool {
        self.database_up.load(Ordering::Relaxed)
    }

    /// Register an event as running here; returns its riders' slot.
    fn start_running(&self, identity: &EventIdentity) -> Riders {
        let riders: Riders = Arc::new(Mutex::new(Some(Vec::new())));
        self.running.lock().expect("not poisoned").insert(
            identity.key.clone(),
            RunningHere {
                fingerprint: identity.fingerprint.clone(),
                fields: identity.field_digests.clone(),
                riders: riders.clone(),
            },
        );
        riders
    }

    /// The handler ended: take the receipts that rode along (they share its fate). The event
    /// is *settling* until `finish_running`: deliveries arriving meanwhile come back shortly.
    fn stop_running(&self, riders: &Riders) -> Vec<String> {
        riders
            .lock()
            .expect("not poisoned")
            .take()
            .unwrap_or_default()
    }

    /// The event is settled: forget it, but remember for a moment that it ran here (a claim
    /// that started before the completion committed still sees it leased).
    fn finish_running(&self, key: &str, riders: &Riders) {
        let mut running = self.running.lock().expect("not poisoned");
        if running
            .get(key)
            .is_some_and(|r| Arc::ptr_eq(&r.riders, riders))
        {
            running.remove(key);
        }
        drop(running);
        self.settled_recently
            .lock()
            .expect("not poisoned")
            .insert(key, Instant::now());
    }

    /// True when this process settled `key` a moment ago.
    fn settled_here_recently(&self, key: &str) -> bool {
        self.settled_recently
            .lock()
            .expect("not poisoned")
            .contains(key, Instant::now())
    }

    /// Give a lease back (fenced by its token), with `reason` as the event's last error.
    /// True only when the lease was ours and is now released: otherwise the message belongs
    /// to the event's new holder (or its ownership cannot be told, the database failing), and
    /// the caller must leave it alone. A failure is logged; the lease then expires on its own.
    async fn release_lease(&self, lease_token: &str, key: &str, reason: &str) -> bool {
        match self
            .store
            .release(&Lease::new(&self.scope, key, lease_token), reason)
            .await
        {
            Ok(true) => true,
            Ok(false) => {
                self.counters.lease_lost.add(1);
                tracing::warn!(
                    "the lease was taken over meanwhile; leaving the message to its new holder"
                );
                false
            }
            Err(error) => {
                self.counters.database_errors.add(1);
                tracing::error!(%error, "could not release the lease; it expires on its own, and the message returns after its visibility timeout");
                false
            }
        }
    }

    /// True when another claim statement of this process includes `key` right now.
    fn claimed_elsewhere_here(&self, key: &str) -> bool {
        self.claiming
            .lock()
            .expect("not poisoned")
            .get(key)
            .is_some_and(|&n| n > 1)
    }

    /// Attach a delivery to the run of its event in this process, if there is one and it
    /// carries the same payload (a delivery with another payload is a mismatch, never a
    /// rider: riders are deleted as duplicates when the event completes).
    fn ride_along(&self, identity: &EventIdentity, receipt: &str) -> RideAlong {
        let running = self.running.lock().expect("not poisoned");
        let Some(run) = running.get(&identity.key) else {
            return RideAlong::NotHere;
        };
        if self.config.on_payload_mismatch == PayloadMismatch::DeadLetter
            && run.fingerprint != identity.fingerprint
        {
            return RideAlong::Mismatch(FirstPayload::InBatch {
                fingerprint: run.fingerprint.clone(),
                fields: run.fields.clone(),
            });
        }
        match run.riders.lock().expect("not poisoned").as_mut() {
            Some(receipts) => {
                receipts.push(receipt.to_owned());
                RideAlong::Attached
            }
            None => RideAlong::Settling,
        }
    }

    pub(crate) fn mode(&self) -> &Mode {
        &self.mode
    }

    pub(crate) fn count_received(&self, n: usize) {
        self.first_received.get_or_init(Instant::now);
        self.counters.received.add(n);
    }
}

/// Registers a claim statement's keys while it runs (see `Shared::claimed_elsewhere_here`).
struct Claiming<'a> {
    shared: &'a Shared,
    keys: Vec<String>,
}

impl<'a> Claiming<'a> {
    fn new(shared: &'a Shared, requests: &[ClaimRequest]) -> Self {
        let mut keys: Vec<String> = requests.iter().map(|r| r.key.clone()).collect();
        keys.sort_unstable();
        keys.dedup();
        let mut claiming = shared.claiming.lock().expect("not poisoned");
        for key in &keys {
            *claiming.entry(key.clone()).or_default() += 1;
        }
        drop(claiming);
        Self { shared, keys }
    }
}

impl Drop for Claiming<'_> {
    fn drop(&mut self) {
        let mut claiming = self.shared.claiming.lock().expect("not poisoned");
        for key in &self.keys {
            if let Some(n) = claiming.get_mut(key) {
                *n -= 1;
                if *n == 0 {
                    claiming.remove(key);
                }
            }
        }
    }
}

/// Keys settled in the last [`RECENTLY_SETTLED`], forgotten in the order they came: each
/// insert drops only what has expired, so the bookkeeping per event stays constant however
/// fast events settle (a full scan per insert would not).
#[derive(Default)]
struct RecentlySettled {
    at: HashMap<String, Instant>,
    order: std::collections::VecDeque<(Instant, String)>,
}

impl RecentlySettled {
    fn insert(&mut self, key: &str, now: Instant) {
        while let Some((at, oldest)) = self.order.front() {
            if now.duration_since(*at) < RECENTLY_SETTLED {
                break;
            }
            if self.at.get(oldest) == Some(at) {
                self.at.remove(oldest);
            }
            self.order.pop_front();
        }
        self.at.insert(key.to_owned(), now);
        self.order.push_back((now, key.to_owned()));
    }

    fn contains(&self, key: &str, now: Instant) -> bool {
        self.at
            .get(key)
            .is_some_and(|at| now.duration_since(*at) < RECENTLY_SETTLED)
    }
}

/// Receipts of deliveries riding along with a running event; `None` once its handler ended.
type Riders = Arc<Mutex<Option<Vec<String>>>>;

/// An event running in this process: the payload it runs with, and the deliveries riding
/// along with it.
struct RunningHere {
    fingerprint: String,
    fields: Option<String>,
    riders: Riders,
}

/// What became of a delivery whose event is leased (Busy).
enum RideAlong {
    /// Its event runs here with another payload.
    Mismatch(FirstPayload),
    /// Its event runs here: it shares that run's fate.
    Attached,
    /// Its event just ran here and is being settled: it comes back in a moment.
    Settling,
    /// Another worker (or an earlier, stale claim) holds the lease.
    NotHere,
}

/// Tokens every batch of a run watches: `stop` (no new work: a FIFO group's messages not
/// started yet are handed back) and `abandon` (the drain deadline passed: running handlers
/// are stopped and their messages handed back).
#[derive(Clone)]
pub(crate) struct BatchTokens {
    pub(crate) stop: CancellationToken,
    pub(crate) abandon: CancellationToken,
    /// How long a handler told to stop gets before its task is aborted
    /// ([`HANDLER_STOP_GRACE`] for a service; less on Lambda, within its deadline's margin).
    pub(crate) stop_grace: Duration,
}

/// What one received batch runs under.
pub(crate) struct BatchContext {
    pub(crate) received_at: Instant,
    /// No lease may outlive this (a Lambda invocation's deadline).
    pub(crate) lease_cap: Option<Instant>,
    pub(crate) tokens: BatchTokens,
}

/// Ping the database while the worker runs, so `/readyz` notices an outage even when no
/// messages arrive, and so receiving resumes soon after an outage ends (every second while
/// it is down, every few seconds otherwise).
async fn probe_database(shared: Arc<Shared>, stop: CancellationToken) {
    loop {
        let ok = matches!(
            tokio::time::timeout(Duration::from_secs(2), shared.store.ping()).await,
            Ok(Ok(()))
        );
        shared.database_reached(ok);
        let next = if ok {
            PROBE_EVERY
        } else {
            PROBE_EVERY_WHILE_DOWN
        };
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(next) => {}
        }
    }
}

/// Hold a poller while the database is unreachable (see `Shared::database_up`). Returns
/// false if the worker is stopping.
async fn wait_for_database(shared: &Shared, stop: &CancellationToken) -> bool {
    while !shared.database_up() {
        tokio::select! {
            _ = stop.cancelled() => return false,
            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
        }
    }
    true
}

/// `--exit-when-idle`: stop once nothing was received or in flight here for `idle` *and* the
/// queue holds nothing visible, in flight or delayed, so that a batch job does not leave
/// behind work it could have done (a crashed worker's message still hidden, a retry waiting
/// out its backoff, a delayed send). Messages hidden elsewhere are waited for at most the
/// lease plus `idle` from the moment this worker went idle; then it exits and says what it
/// left.
async fn exit_when_idle(shared: Arc<Shared>, idle: Duration, stop: CancellationToken) {
    let tick = (idle / 4).clamp(Duration::from_millis(20), Duration::from_millis(250));
    let bound = shared.lease + idle;
    // Since when this worker has been idle while the queue still held messages.
    let mut waiting_since: Option<Instant> = None;
    let mut next_look = Instant::now();
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(tick) => {}
        }
        let quiet_for = shared.last_activity.lock().expect("not poisoned").elapsed();
        if shared.in_flight.load(Ordering::Relaxed) > 0 || quiet_for < idle {
            waiting_since = None;
            continue;
        }
        if Instant::now() < next_look {
            continue;
        }
        next_look = Instant::now() + QUEUE_LOOK_EVERY;
        let counts = match shared.sqs.message_counts().await {
            Ok(counts) => counts,
            Err(error) => {
                tracing::warn!(%error, "nothing received or in flight for the idle period, and the queue's counts cannot be read; exiting (--exit-when-idle)");
                stop.cancel();
                return;
            }
        };
        if counts.total() == 0 {
            tracing::info!(
                idle_secs = idle.as_secs_f64(),
                "the queue is drained and nothing ran for the idle period; exiting (--exit-when-idle)"
            );
            stop.cancel();
            return;
        }
        let since = *waiting_since.get_or_insert_with(|| {
            tracing::info!(
                in_flight = counts.in_flight,
                delayed = counts.delayed,
                visible = counts.visible,
                wait_at_most_secs = bound.as_secs(),
                "idle, but the queue still holds messages that are in flight elsewhere or \
                 delayed; waiting for them (--exit-when-idle)"
            );
            Instant::now()
        });
        if since.elapsed() >= bound {
            tracing::warn!(
                in_flight = counts.in_flight,
                delayed = counts.delayed,
                visible = counts.visible,
                waited_secs = since.elapsed().as_secs(),
                "exiting with messages left in the queue: they did not become visible within \
                 the visibility timeout plus the idle period (--exit-when-idle)"
            );
            stop.cancel();
            return;
        }
    }
}

/// How often an idle worker with `--exit-when-idle` asks the queue what it still holds.
const QUEUE_LOOK_EVERY: Duration = Duration::from_secs(1);

/// The long-poll wait: the configured one, or with `--exit-when-idle` no longer than the idle
/// period has left (at least 1 s), so the polls in flight when the worker goes idle end
/// within about a second of it instead of holding up the exit for a whole long poll.
fn poll_wait(shared: &Shared) -> Duration {
    let Some(idle) = shared.config.exit_when_idle else {
        return shared.config.wait_time;
    };
    let quiet_for = shared.last_activity.lock().expect("not poisoned").elapsed();
    let left = idle.saturating_sub(quiet_for).max(Duration::from_secs(1));
    shared.config.wait_time.min(left)
}

/// One poller: take permits, long-poll, hand the batch on. Ends when `stop` is cancelled.
async fn poll(
    shared: Arc<Shared>,
    semaphore: Arc<Semaphore>,
    tracker: TaskTracker,
    tokens: BatchTokens,
) {
    let stop = tokens.stop.clone();
    let batch_size = shared.config.concurrency.clamp(1, 10);
    let mut error_backoff = Duration::from_millis(500);
    loop {
        if !wait_for_database(&shared, &stop).await {
            return;
        }
        // Wait for one free slot, then gather up to a full batch for a moment: a receive of
        // 10 costs SQS (and the claim statement) what a receive of 1 does, and slots free
        // up quickly when handlers are fast. Never more than can start now.
        let first = tokio::select! {
            _ = stop.cancelled() => return,
            permit = semaphore.clone().acquire_owned() => permit.expect("semaphore never closed"),
        };
        let mut permits = vec![first];
        let gather_until = tokio::time::Instant::now() + PERMIT_GATHER;
        while permits.len() < batch_size {
            match tokio::time::timeout_at(gather_until, semaphore.clone().acquire_owned()).await {
                Ok(permit) => permits.push(permit.expect("semaphore never closed")),
                Err(_) => break,
            }
        }
        let receive = shared.sqs.receive(
            permits.len(),
            poll_wait(&shared),
            shared.config.visibility_timeout,
        );
        tokio::pin!(receive);
        let received = tokio::select! {
            result = &mut receive => result,
            _ = stop.cancelled() => {
                // A long poll cannot be withdrawn: dropped here, SQS would still hand it
                // messages and hide them for a whole visibility timeout. Let it finish and
                // give back at once whatever it brings.
                let grace = (shared.config.wait_time + Duration::from_secs(5))
                    .min(shared.config.shutdown_timeout);
                if let Ok(Ok(messages)) = tokio::time::timeout(grace, receive).await {
                    release_unstarted(&shared, &messages).await;
                }
                return;
            }
        };
        let received_at = Instant::now();
        match received {
            Err(error) => {
                shared.sqs_reached(false);
                shared.counters.receive_errors.add(1);
                tracing::error!(%error, retry_in_ms = error_backoff.as_millis() as u64, "receive failed");
                drop(permits);
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(error_backoff) => {}
                }
                error_backoff = (error_backoff * 2).min(RECEIVE_BACKOFF_MAX);
            }
            Ok(messages) if messages.is_empty() => {
                shared.sqs_reached(true);
                error_backoff = Duration::from_millis(500);
            }
            Ok(messages) => {
                // Chaos tests kill the process here: received, nothing claimed yet.
                #[cfg(feature = "failpoints")]
                fail::fail_point!("sqs_worker::received");
                shared.sqs_reached(true);
                error_backoff = Duration::from_millis(500);
                shared.touch();
                shared.count_received(messages.len());
                let context = BatchContext {
                    received_at,
                    lease_cap: None,
                    tokens: tokens.clone(),
                };
                // Claim in a task of its own, so this poller goes straight back to
                // receiving (as far as permits allow) while the claim statement runs.
                let (shared, tracker_inner) = (shared.clone(), tracker.clone());
                tracker.spawn(async move {
                    handle_batch(&shared, &tracker_inner, messages, permits, &context).await;
                });
            }
        }
    }
}

/// Make messages received during shutdown visible again at once, for another worker.
async fn release_unstarted(shared: &Shared, messages: &[ReceivedMessage]) {
    if messages.is_empty() {
        return;
    }
    tracing::info!(
        messages = messages.len(),
        "shutting down: returning messages received but not started"
    );
    shared.counters.released_at_shutdown.add(messages.len());
    let receipts: Vec<String> = messages.iter().map(|m| m.receipt_handle.clone()).collect();
    shared.show_after(&receipts, Duration::ZERO).await;
}

/// A message whose event identity has been worked out.
struct Parsed {
    message: ReceivedMessage,
    markers: RedriveMarkers,
    identity: Result<EventIdentity, KeyError>,
    /// Place in the receive batch (FIFO: order within a message group).
    position: usize,
}

impl Parsed {
    fn key(&self) -> String {
        match &self.identity {
            Ok(identity) => identity.key.clone(),
            Err(_) => message::fallback_key(&self.message.body),
        }
    }

    fn group(&self) -> &str {
        self.message.message_group_id().unwrap_or_default()
    }
}

/// A claimed event about to run: its first delivery, the claim, and later deliveries of the
/// same key in this batch (they share its fate).
struct ClaimedEvent {
    parsed: Parsed,
    claim: Claim,
    siblings: Vec<ReceivedMessage>,
    permit: Option<OwnedSemaphorePermit>,
    /// Deliveries that arrive while it runs ride along (registered when claimed).
    riders: Riders,
}

impl ClaimedEvent {
    fn receipts(&self) -> Vec<String> {
        std::iter::once(&self.parsed.message)
            .chain(&self.siblings)
            .map(|m| m.receipt_handle.clone())
            .collect()
    }
}

/// Claim a receive batch in one statement and start what was claimed. Returns once every
/// message has a task or a fate; the tasks run on `tracker`.
pub(crate) async fn handle_batch(
    shared: &Arc<Shared>,
    tracker: &TaskTracker,
    messages: Vec<ReceivedMessage>,
    mut permits: Vec<OwnedSemaphorePermit>,
    context: &BatchContext,
) {
    // The lease starts now but the visibility timeout started at receive: shorten the lease
    // by the difference so both expire together (and, on Lambda, before the deadline).
    let mut lease = shared.lease.saturating_sub(context.received_at.elapsed());
    if let Some(cap) = context.lease_cap {
        lease = lease.min(cap.saturating_duration_since(Instant::now()));
    }
    let lease = lease.max(Duration::from_secs(1));

    let parsed: Vec<Parsed> = messages
        .into_iter()
        .enumerate()
        .map(|(position, message)| {
            let markers = message::parse_markers(message.attribute_strings());
            if !markers.problems.is_empty() {
                // One line per message, however many markers are bad.
                tracing::warn!(
                    message_id = %message.message_id,
                    problems = ?markers.problems,
                    "ignoring unreadable redrive markers (each counts as absent)"
                );
            }
            Parsed {
                identity: message::derive_identity(
                    &shared.config.key,
                    shared.config.envelope,
                    &message.body,
                ),
                markers,
                message,
                position,
            }
        })
        .collect();

    let lease_token = format!(
        "{}#{}",
        shared.owner,
        shared.claim_sequence.fetch_add(1, Ordering::Relaxed)
    );
    let requests: Vec<ClaimRequest> = parsed
        .iter()
        .filter_map(|p| {
            let identity = p.identity.as_ref().ok()?;
            Some(ClaimRequest {
                key: identity.key.clone(),
                payload_sha256: identity.fingerprint.clone(),
                message_id: p.message.message_id.clone(),
                reclaim_failed: p.markers.redriven,
                pass: p.markers.pass(),
                field_digests: identity.field_digests.clone(),
            })
        })
        .collect();
    let _claiming = Claiming::new(shared, &requests);
    // Retried while the batch's visibility timeout leaves room (half the lease): a short
    // database blip then costs a moment, not a redelivery, and the messages stay hidden
    // meanwhile, so retrying adds nothing to their receive counts.
    let terms = ClaimTerms {
        lease,
        run_limit: shared.run_limit(lease),
        accept_mismatch: shared.config.on_payload_mismatch == PayloadMismatch::Accept,
    };
    let claimed = retry_database(shared, "claim", lease / 2, || {
        shared
            .store
            .claim_batch(&shared.scope, &lease_token, &terms, &requests)
    })
    .await;
    let outcomes = match claimed {
        Ok(outcomes) => outcomes,
        Err(error) => {
            tracing::error!(
                %error,
                messages = parsed.len(),
                "cannot claim checkpoints; the batch returns to the queue after its visibility \
                 timeout (is PostgreSQL reachable?)"
            );
            // Leaving the messages alone is safe: nothing was claimed or deleted.
            return;
        }
    };
    // Chaos tests kill the process here: claimed, no handler started.
    #[cfg(feature = "failpoints")]
    fail::fail_point!("sqs_worker::claimed");

    let mut claimed: Vec<ClaimedEvent> = Vec::new();
    let mut busy: Vec<(String, Duration)> = Vec::new();
    // FIFO: the first position in each group that did not get its claim, and about when it
    // is visible again; later messages of that group must wait for it.
    let mut blocked_from: HashMap<String, (usize, Duration)> = HashMap::new();
    for planned in plan_batch(parsed, &outcomes, shared.config.on_payload_mismatch) {
        match planned {
            Planned::Run {
                parsed,
                claim,
                siblings,
            } => {
                let identity = parsed.identity.as_ref().expect("a running event has a key");
                let riders = shared.start_running(identity);
                claimed.push(ClaimedEvent {
                    parsed,
                    claim,
                    siblings: siblings.into_iter().map(|s| s.message).collect(),
                    permit: permits.pop(),
                    riders,
                });
            }
            Planned::Unkeyed(p) => {
                let permit = permits.pop();
                let shared = shared.clone();
                tracker.spawn(async move {
                    let _permit = permit;
                    dead_letter_unkeyed(&shared, p).await;
                });
            }
            Planned::Mismatch(p, first) => spawn_mismatch(shared, tracker, p, first, permits.pop()),
            Planned::Duplicate(p) => skip_duplicate(shared, p).await,
            Planned::Busy(p, lease_remaining, run_remaining) => {
                let retry_after = busy_deferral(
                    lease_remaining,
                    run_remaining,
                    receive_count(&p.message),
                    shared.max_receive_count,
                );
                let Some((p, retry_after)) =
                    busy_delivery(shared, tracker, p, retry_after, &mut permits)
                else {
                    continue;
                };
                blocked_from
                    .entry(p.group().to_owned())
                    .or_insert((p.position, retry_after));
                busy.push((
                    p.message.receipt_handle,
                    retry_after.max(Duration::from_secs(1)),
                ));
            }
            Planned::NoRow(p) => {
                tracing::error!(key = %p.key(), "claim returned no row for a key; leaving the message for redelivery");
                blocked_from
                    .entry(p.group().to_owned())
                    .or_insert((p.position, lease));
            }
        }
    }
    if !busy.is_empty() {
        shared.change_visibility(&busy).await;
    }

    if !shared.fifo {
        // One task drives the batch's events concurrently (each handler still runs in a
        // task of its own): a task per message cost measurably more CPU in scheduling.
        let shared = shared.clone();
        let tokens = context.tokens.clone();
        tracker.spawn(async move {
            let nothing_waits = Waiting::default();
            join_all(claimed.into_iter().map(|event| {
                run_event(&shared, event, &lease_token, lease, &tokens, &nothing_waits)
            }))
            .await;
        });
        return;
    }

    // FIFO: one task per message group runs its events one at a time, in receive order
    // (SQS returns a group's messages in order). After a failure the rest of the group is
    // handed back instead of running out of order; SQS keeps the group blocked until the
    // failed message is visible again and delivers it first.
    let mut groups: Vec<(String, Vec<ClaimedEvent>)> = Vec::new();
    for event in claimed {
        let group = event.parsed.group().to_owned();
        match groups.iter_mut().find(|(g, _)| *g == group) {
            Some((_, events)) => events.push(event),
            None => groups.push((group, vec![event])),
        }
    }
    for (group, events) in groups {
        let shared = shared.clone();
        let lease_token = lease_token.clone();
        let tokens = context.tokens.clone();
        let blocked = blocked_from.get(&group).copied();
        tracker.spawn(async move {
            run_group(&shared, events, &lease_token, lease, &tokens, blocked).await;
        });
    }
}

/// A FIFO group's events, one at a time in receive order. The ones waiting their turn are
/// kept alive by the running one's heartbeat, and each starts only once its lease is
/// confirmed and renewed: an event whose lease was taken over while it waited (it became
/// visible and was claimed anew) is left to its new holder, and the rest of the group is
/// handed back behind it. Once one message is held, the rest of the group waits until
/// shortly after it is visible again: SQS itself blocks a group while a message is in
/// flight, and the extra second keeps the order even where a broker does not.
async fn run_group(
    shared: &Arc<Shared>,
    events: Vec<ClaimedEvent>,
    lease_token: &str,
    lease: Duration,
    tokens: &BatchTokens,
    blocked: Option<(usize, Duration)>,
) {
    let waiting: Waiting = Mutex::new(
        events
            .iter()
            .skip(1)
            .map(|event| (event.parsed.key(), event.receipts()))
            .collect(),
    );
    let mut hold: Option<(Duration, &str)> = None;
    for (turn, event) in events.into_iter().enumerate() {
        let key = event.parsed.key();
        waiting
            .lock()
            .expect("not poisoned")
            .retain(|(waiting_key, _)| *waiting_key != key);
        if tokens.stop.is_cancelled() {
            hold = Some((
                hold.map_or(Duration::ZERO, |(back_in, _)| back_in),
                SHUTTING_DOWN,
            ));
        }
        if hold.is_none()
            && let Some((position, back_in)) = blocked
            && position < event.parsed.position
        {
            hold = Some((
                back_in,
                "an earlier message of its group is leased elsewhere",
            ));
        }
        if hold.is_none() && turn > 0 {
            // Chaos and race tests widen the gap between a group's events here.
            pause_at("sqs_worker::fifo_next").await;
            if !start_waiting(shared, &event, lease_token, lease).await {
                hold = Some((lease, "an earlier message of its group was taken over"));
                // Its lease is another holder's: nothing of it is handed back here.
                shared.finish_running(&key, &event.riders);
                continue;
            }
        }
        if let Some((back_in, reason)) = hold {
            hand_back(shared, &event, lease_token, reason, back_in).await;
            continue;
        }
        if let Some(back_in) = run_event(shared, event, lease_token, lease, tokens, &waiting).await
        {
            hold = Some((back_in, "an earlier message of its group did not complete"));
        }
    }
}

/// Confirm that a waiting FIFO event's lease is still this claim's, and renew it with its
/// messages' visibility for a run starting now. False when it was taken over.
async fn start_waiting(
    shared: &Shared,
    event: &ClaimedEvent,
    lease_token: &str,
    lease: Duration,
) -> bool {
    let key = event.parsed.key();
    match shared
        .store
        .start_run(
            &Lease::new(&shared.scope, &key, lease_token),
            lease,
            shared.run_limit(lease),
        )
        .await
    {
        Ok(true) => {
            shared.show_after(&event.receipts(), lease).await;
            true
        }
        Ok(false) => {
            shared.counters.lease_lost.add(1);
            tracing::warn!(
                message_id = %event.parsed.message.message_id,
                %key,
                "the event's lease was taken over while it waited its turn in its group; \
                 leaving it to its new holder"
            );
            false
        }
        Err(error) => {
            shared.counters.database_errors.add(1);
            tracing::error!(%error, %key, "cannot confirm a waiting event's lease; not starting it");
            false
        }
    }
}

/// What becomes of one delivery of a claimed receive batch (see [`plan_batch`]).
enum Planned {
    /// The delivery that runs its event, with the later deliveries of the same event in
    /// this batch (they share its fate).
    Run {
        parsed: Parsed,
        claim: Claim,
        siblings: Vec<Parsed>,
    },
    /// No key could be taken from it: to the DLQ.
    Unkeyed(Parsed),
    /// Its key is stored, or runs in this batch, with another payload: to the DLQ.
    Mismatch(Parsed, FirstPayload),
    /// Its event is complete, or failed on this pass or a later one: a duplicate.
    Duplicate(Parsed),
    /// Its event is leased by another claim: time left on the lease, and until the run
    /// must have ended.
    Busy(Parsed, Duration, Duration),
    /// The claim statement returned nothing for its key.
    NoRow(Parsed),
}

/// Decide each delivery's fate from the claim's outcomes. Pure, so the rules can be read
/// (and checked) in one place: a delivery whose payload differs from the stored one (or from
/// the one claimed in this batch) is a mismatch and touches nothing; of the deliveries of a
/// claimed event, the first runs — or the one of the latest redrive pass, so its markers
/// decide — and the others share its fate.
fn plan_batch(
    parsed: Vec<Parsed>,
    outcomes: &HashMap<String, ClaimOutcome>,
    policy: PayloadMismatch,
) -> Vec<Planned> {
    let mut plan: Vec<Planned> = Vec::with_capacity(parsed.len());
    let mut runs: HashMap<String, usize> = HashMap::new();
    for p in parsed {
        let Ok(identity) = &p.identity else {
            plan.push(Planned::Unkeyed(p));
            continue;
        };
        let key = identity.key.clone();
        let Some(outcome) = outcomes.get(&key) else {
            plan.push(Planned::NoRow(p));
            continue;
        };
        let stored = outcome.stored_payload_sha256();
        if policy == PayloadMismatch::DeadLetter
            && stored.is_some_and(|s| s != identity.fingerprint)
        {
            let first = match runs.get(&key).map(|&i| &plan[i]) {
                Some(Planned::Run { parsed: runner, .. }) => {
                    let runner = runner.identity.as_ref().expect("a running event has a key");
                    FirstPayload::InBatch {
                        fingerprint: runner.fingerprint.clone(),
                        fields: runner.field_digests.clone(),
                    }
                }
                _ => FirstPayload::Stored(stored.unwrap_or_default().to_owned()),
            };
            plan.push(Planned::Mismatch(p, first));
            continue;
        }
        match outcome {
            ClaimOutcome::Claimed(claim) => match runs.get(&key) {
                Some(&i) => {
                    let Planned::Run {
                        parsed: runner,
                        siblings,
                        ..
                    } = &mut plan[i]
                    else {
                        unreachable!("runs index Run entries");
                    };
                    if p.markers.pass() > runner.markers.pass() {
                        // The claim was made for the latest pass in the batch (a redrive
                        // beside a plain duplicate): that delivery runs, with its markers.
                        siblings.push(std::mem::replace(runner, p));
                    } else {
                        siblings.push(p);
                    }
                }
                None => {
                    runs.insert(key, plan.len());
                    plan.push(Planned::Run {
                        parsed: p,
                        claim: claim.clone(),
                        siblings: Vec::new(),
                    });
                }
            },
            ClaimOutcome::Complete { .. } | ClaimOutcome::Failed { .. } => {
                plan.push(Planned::Duplicate(p))
            }
            ClaimOutcome::Busy {
                retry_after,
                run_remaining,
                ..
            } => plan.push(Planned::Busy(p, *retry_after, *run_remaining)),
        }
    }
    plan
}

/// How long a delivery of an event leased elsewhere is put back: until the lease ends (an
/// event that completes within its first lease is then skipped as soon as possible) — but
/// when its next receive would be the last the queue's maxReceiveCount allows before moving
/// it to the DLQ, until the holder's run must have ended: a long handler's duplicate must
/// not reach the DLQ while the event runs.
fn busy_deferral(
    lease_remaining: Duration,
    run_remaining: Duration,
    receive_count: u32,
    max_receive_count: Option<u32>,
) -> Duration {
    match max_receive_count {
        Some(max) if receive_count + 1 >= max => run_remaining.max(lease_remaining),
        _ => lease_remaining,
    }
}

/// SQS's ApproximateReceiveCount of this delivery (1 when not reported).
fn receive_count(message: &ReceivedMessage) -> u32 {
    message
        .system_attributes
        .get("ApproximateReceiveCount")
        .and_then(|c| c.parse().ok())
        .unwrap_or(1)
}

fn spawn_mismatch(
    shared: &Arc<Shared>,
    tracker: &TaskTracker,
    parsed: Parsed,
    first: FirstPayload,
    permit: Option<OwnedSemaphorePermit>,
) {
    let shared = shared.clone();
    tracker.spawn(async move {
        let _permit = permit;
        dead_letter_mismatch(&shared, parsed, first).await;
    });
}

/// A delivery of an event already complete or failed: delete it, at info level
/// (duplicates are normal).
async fn skip_duplicate(shared: &Shared, parsed: Parsed) {
    shared.counters.duplicates_skipped.add(1);
    tracing::info!(
        message_id = %parsed.message.message_id,
        key = %parsed.key(),
        "event already handled; deleting this duplicate delivery"
    );
    shared
        .enqueue_delete(vec![parsed.message.receipt_handle])
        .await;
}

/// A delivery of an event leased by a claim: it rides along when the event runs here (with
/// the same payload), comes back in a moment when this process is claiming or settling the
/// event, and otherwise when the holder's run must have ended. `None` when it needs no
/// visibility change (it rides along, or went the mismatch way).
fn busy_delivery(
    shared: &Arc<Shared>,
    tracker: &TaskTracker,
    parsed: Parsed,
    retry_after: Duration,
    permits: &mut Vec<OwnedSemaphorePermit>,
) -> Option<(Parsed, Duration)> {
    let identity = parsed
        .identity
        .as_ref()
        .expect("busy deliveries have a key");
    let key = identity.key.clone();
    let retry_after = match shared.ride_along(identity, &parsed.message.receipt_handle) {
        RideAlong::Attached => {
            tracing::info!(
                message_id = %parsed.message.message_id,
                %key,
                "event is running in this worker; this delivery rides along with it"
            );
            return None;
        }
        RideAlong::Mismatch(first) => {
            spawn_mismatch(shared, tracker, parsed, first, permits.pop());
            return None;
        }
        // Completion is a statement away: look again in a second, not a lease.
        RideAlong::Settling => OWN_CLAIM_RETRY,
        // Another batch of ours claims it right now (its run is about to be registered):
        // likewise.
        RideAlong::NotHere
            if shared.claimed_elsewhere_here(&key) || shared.settled_here_recently(&key) =>
        {
            OWN_CLAIM_RETRY
        }
        RideAlong::NotHere => retry_after,
    };
    shared.counters.busy_deferred.add(1);
    tracing::info!(
        message_id = %parsed.message.message_id,
        %key,
        retry_in_secs = retry_after.as_secs_f64(),
        "event is leased by another worker; this delivery comes back when that lease (or, near maxReceiveCount, that run) ends"
    );
    Some((parsed, retry_after))
}

const SHUTTING_DOWN: &str = "shutting down before it started";

/// How long a poller waits for more free slots before receiving fewer than 10 messages.
const PERMIT_GATHER: Duration = Duration::from_millis(20);
/// The longest pause between receives while SQS answers with errors: short, so a worker is
/// back within seconds of an outage's end (the SDK retries each call too).
const RECEIVE_BACKOFF_MAX: Duration = Duration::from_secs(5);
/// How often the database is pinged while it answers, and while it does not.
const PROBE_EVERY: Duration = Duration::from_secs(2);
const PROBE_EVERY_WHILE_DOWN: Duration = Duration::from_secs(1);

/// When a delivery of an event this worker is claiming or settling comes back.
const OWN_CLAIM_RETRY: Duration = Duration::from_secs(1);

/// How long a settled event is remembered for `OWN_CLAIM_RETRY`: far longer than a claim
/// statement takes.
const RECENTLY_SETTLED: Duration = Duration::from_secs(5);

/// Give a claimed event back untouched: release its lease and make its message(s) visible
/// again — at once at shutdown, or just after `back_in` behind a FIFO group's held message.
async fn hand_back(
    shared: &Shared,
    event: &ClaimedEvent,
    lease_token: &str,
    reason: &str,
    back_in: Duration,
) {
    let key = event.parsed.key();
    // Deliveries that rode along go back with it.
    let mut receipts = event.receipts();
    receipts.extend(shared.stop_running(&event.riders));
    shared.finish_running(&key, &event.riders);
    tracing::info!(message_id = %event.parsed.message.message_id, %key, reason, "handing the message back unstarted");
    // The claim never ran: it does not count as an attempt. A lease taken over meanwhile
    // means the message is another holder's: leave it.
    match shared
        .store
        .unclaim(&Lease::new(&shared.scope, &key, lease_token))
        .await
    {
        Ok(true) => {}
        Ok(false) => return,
        Err(error) => {
            shared.counters.database_errors.add(1);
            tracing::error!(%error, "could not release the lease; it expires on its own");
            return;
        }
    }
    if reason == SHUTTING_DOWN {
        shared.counters.released_at_shutdown.add(receipts.len());
    }
    let visibility = if back_in.is_zero() {
        Duration::ZERO
    } else {
        (back_in + Duration::from_secs(1)).min(MAX_VISIBILITY)
    };
    shared.show_after(&receipts, visibility).await;
}

/// Run one claimed event in its own span, counted in flight. `None` when it was settled
/// (complete, or ended in the DLQ or `dead_letters`): a FIFO group may go on. Otherwise
/// about when its message becomes visible again.
async fn run_event(
    shared: &Arc<Shared>,
    event: ClaimedEvent,
    lease_token: &str,
    lease: Duration,
    tokens: &BatchTokens,
    waiting: &Waiting,
) -> Option<Duration> {
    let key = event.parsed.key();
    let span = tracing::info_span!(
        "message",
        message_id = %event.parsed.message.message_id,
        key = %key,
        attempt = event.claim.attempts,
    );
    shared.in_flight.fetch_add(1, Ordering::Relaxed);
    shared.counters.in_flight.increment(1.0);
    let riders = event.riders.clone();
    let settled = run_claimed(shared, event, lease_token, lease, tokens, waiting)
        .instrument(span)
        .await;
    shared.finish_running(&key, &riders);
    shared.in_flight.fetch_sub(1, Ordering::Relaxed);
    shared.counters.in_flight.decrement(1.0);
    shared.touch();
    settled
}

/// How a handler run ended, before its outcome is settled.
enum Ended {
    Finished(Result<(), HandlerError>),
    /// The drain deadline passed: the handler was stopped.
    Abandoned,
}

async fn run_claimed(
    shared: &Arc<Shared>,
    event: ClaimedEvent,
    lease_token: &str,
    lease: Duration,
    tokens: &BatchTokens,
    waiting: &Waiting,
) -> Option<Duration> {
    let mut receipts = event.receipts();
    let ClaimedEvent {
        parsed,
        claim,
        siblings,
        permit,
        riders,
    } = event;
    let mut duplicates = siblings.len();
    let identity = parsed.identity.expect("claimed messages have a key");
    let message = parsed.message;
    let markers = parsed.markers;
    let cancel = CancellationToken::new();
    let mut job = Job {
        lease: Lease::new(&shared.scope, &identity.key, lease_token),
        message_id: message.message_id.clone(),
        body: identity.body,
        raw_body: message.body.clone(),
        json: identity.json,
        attributes: message
            .attribute_strings()
            .filter_map(|(k, v)| Some((k.to_owned(), v?.to_owned())))
            .collect(),
        attempt: claim.attempts,
        redrive_count: markers.redrive_count,
        final_pass: markers.final_pass,
        store: shared.handler_store.clone(),
        recorded: store::parse_steps(&claim.steps),
        next_step: 0,
        lease_lost: false,
        cancel: cancel.clone(),
        unrecorded_effect: None,
    };
    if claim.resumed {
        tracing::info!(
            "resuming an event seen before (a retry, or a takeover of an expired lease)"
        );
    }

    // The handler runs in its own task so a panic is caught as a JoinError instead of taking
    // the permit and the outcome with it.
    let handler = shared.handler.clone();
    let started = Instant::now();
    let task = tokio::spawn(
        async move {
            // A handler that returns early without an error must still have reached every
            // recorded step, or its plan changed under this event.
            handler
                .handle(&mut job)
                .await
                .and_then(|()| job.check_plan_complete())
        }
        .instrument(tracing::Span::current()),
    );
    let watch = Watch {
        lease_token,
        key: &identity.key,
        receipts: &receipts,
        riders: &riders,
        waiting,
    };
    let ended = supervise(shared, task, &cancel, &watch, lease, tokens).await;
    shared
        .counters
        .handler_seconds
        .record(started.elapsed().as_secs_f64());
    // The handler is done: the slot may serve the next message while this one settles (the
    // acker's queue bounds what waits for settling).
    drop(permit);
    // Deliveries of this event received while it ran share its fate from here on.
    let riders = shared.stop_running(&riders);
    duplicates += riders.len();
    receipts.extend(riders);
    let result = match ended {
        Ended::Finished(result) => result,
        Ended::Abandoned => {
            tracing::warn!("stopped at the shutdown deadline; handing the message back");
            if shared
                .release_lease(
                    lease_token,
                    &identity.key,
                    "stopped at the shutdown deadline",
                )
                .await
            {
                shared.counters.released_at_shutdown.add(receipts.len());
                shared.show_after(&receipts, Duration::ZERO).await;
            }
            return Some(Duration::ZERO);
        }
    };

    // The last redrive an operator allowed: any failure ends here, recorded, never looping.
    if markers.final_pass
        && let Err(error @ (HandlerError::Retryable { .. } | HandlerError::Permanent { .. })) =
            &result
    {
        let reason = match error {
            HandlerError::Permanent { reason, .. } => reason.as_str(),
            _ => "retryable",
        };
        let failure = FinalFailure {
            key: &identity.key,
            fingerprint: &identity.fingerprint,
            lease_token: Some(lease_token),
            mark_checkpoint: true,
            reason,
            error: &error.to_string(),
            attempts: claim.attempts,
            pass: markers.pass(),
        };
        return (!end_final_pass(shared, &message, receipts, failure).await)
            .then_some(shared.lease);
    }
    match result {
        Ok(()) => {
            // Chaos tests kill the process here: the handler is done, nothing recorded.
            #[cfg(feature = "failpoints")]
            fail::fail_point!("sqs_worker::handled");
            match shared
                .ack(AckKind::Complete {
                    key: identity.key.clone(),
                    lease_token: lease_token.to_owned(),
                })
                .with_receipts(receipts)
                .await
            {
                AckResult::Done => {
                    shared.counters.processed.add(1);
                    shared.counters.duplicates_skipped.add(duplicates);
                    tracing::info!("event complete");
                    None
                }
                AckResult::LeaseLost => {
                    shared.counters.lease_lost.add(1);
                    tracing::warn!(
                        "the lease was taken by another worker before completion; leaving the \
                         message to the lease holder"
                    );
                    Some(shared.lease)
                }
                AckResult::Failed(error) => {
                    tracing::error!(%error, "could not record completion; the message will be delivered again");
                    Some(shared.lease)
                }
            }
        }
        Err(HandlerError::LeaseLost) => {
            shared.counters.lease_lost.add(1);
            tracing::warn!(
                "stopped at a step boundary: the lease was lost or could not be renewed; \
                 leaving the message to SQS and the next lease holder"
            );
            Some(shared.lease)
        }
        Err(HandlerError::Retryable {
            message: error,
            retry_after,
        }) => {
            // A handler's Retry-After is a minimum, never a way around the backoff: "0" or a
            // date in the past from a struggling endpoint would otherwise bring the message
            // back at once, again and again, through maxReceiveCount into the DLQ.
            let backoff = shared.backoff(claim.attempts);
            let delay = retry_after.map_or(backoff, |after| after.max(backoff));
            retry_later(shared, lease_token, &identity.key, &error, &receipts, delay).await;
            Some(delay)
        }
        Err(HandlerError::Permanent {
            message: error,
            reason,
        }) => {
            // Only the lease holder may send the event to the DLQ and delete its message: a
            // task whose lease was taken over meanwhile leaves both to the new holder.
            if !still_held(shared, lease_token, &identity.key).await {
                return Some(shared.lease);
            }
            let sent = send_to_dlq(shared, &message, &reason, &error).await;
            if !sent {
                let delay = shared.backoff(claim.attempts);
                retry_later(shared, lease_token, &identity.key, &error, &receipts, delay).await;
                return Some(delay);
            }
            match shared
                .store
                .mark_failed(
                    &Lease::new(&shared.scope, &identity.key, lease_token),
                    &error,
                )
                .await
            {
                Ok(true) => {}
                Ok(false) => {
                    shared.counters.lease_lost.add(1);
                    tracing::warn!(
                        "the lease was taken over just after the DLQ send; leaving the message \
                         to its new holder (the DLQ holds a copy)"
                    );
                    return Some(shared.lease);
                }
                Err(error) => {
                    shared.counters.database_errors.add(1);
                    tracing::error!(%error, "could not mark the checkpoint failed; the message is in the DLQ");
                }
            }
            // The message is safely in the DLQ: delete it.
            shared.ack(AckKind::Delete).with_receipts(receipts).await;
            shared.counters.duplicates_skipped.add(duplicates);
            None
        }
    }
}

/// What a heartbeat keeps alive: the running event (its lease and its messages), the
/// deliveries riding along with it, and a FIFO group's events waiting their turn under the
/// same claim (their leases and messages too, so none of them runs late or elsewhere).
struct Watch<'a> {
    lease_token: &'a str,
    key: &'a str,
    receipts: &'a [String],
    riders: &'a Riders,
    waiting: &'a Waiting,
}

/// A FIFO group's claimed events that have not started yet: `(key, receipts)`.
type Waiting = Mutex<Vec<(String, Vec<String>)>>;

/// Wait for a handler task while keeping its message and lease alive.
///
/// Heartbeat: every third of the lease, extend the visibility of the event's messages (and
/// its riders' and waiting companions') and the checkpoint lease together, each to a whole
/// lease from when the renewal was sent. A renewal runs beside the handler: while it is out,
/// the deadline, the drain and the lease's end are still watched. If a renewal fails, or the
/// lease ends before it comes back, the handler is told (its [`Job::cancellation`] token)
/// and stopped when its current lease ends; its checkpoint writes stay fenced by the lease
/// token either way. The run is bounded by `--max-handler-time` (by the lease itself without
/// heartbeats, as on Lambda).
async fn supervise(
    shared: &Shared,
    mut task: tokio::task::JoinHandle<Result<(), HandlerError>>,
    cancel: &CancellationToken,
    watch: &Watch<'_>,
    lease: Duration,
    tokens: &BatchTokens,
) -> Ended {
    let now = tokio::time::Instant::now();
    let mut lease_until = now + lease;
    // On Lambda the lease ends before the invocation does: the handler must too.
    let (limit, limit_reason) = match shared.mode {
        Mode::Lambda { .. } if lease < shared.config.max_handler_time => {
            (lease, "the invocation deadline")
        }
        _ => (shared.config.max_handler_time, "--max-handler-time"),
    };
    let mut hard_deadline = now + limit;
    let beat_every = (shared.lease / 3).max(Duration::from_millis(500));
    let mut next_beat = shared.config.heartbeat.then(|| now + (lease / 3));
    let mut renewal: Option<Renewal<'_>> = None;
    let mut renewal_sent = now;
    loop {
        let beat_at = next_beat.filter(|_| renewal.is_none());
        tokio::select! {
            joined = &mut task => {
                return Ended::Finished(match joined {
                    Ok(result) => result,
                    Err(join_error) if join_error.is_panic() => {
                        Err(HandlerError::retryable("the handler panicked"))
                    }
                    Err(join_error) => Err(HandlerError::retryable(format!(
                        "the handler task ended abnormally: {join_error}"
                    ))),
                });
            }
            _ = tokens.abandon.cancelled() => {
                stop_handler(cancel, &mut task, tokens.stop_grace).await;
                return Ended::Abandoned;
            }
            _ = tokio::time::sleep_until(hard_deadline) => {
                stop_handler(cancel, &mut task, tokens.stop_grace).await;
                let expired = hard_deadline >= lease_until;
                return Ended::Finished(Err(HandlerError::retryable(if expired && next_beat.is_none() && shared.config.heartbeat {
                    "the handler was stopped when its lease ended (the heartbeat could not renew it)".to_owned()
                } else {
                    format!(
                        "the handler was stopped after {:.1} s ({limit_reason})",
                        limit.as_secs_f64()
                    )
                })));
            }
            _ = sleep_until_some(beat_at) => {
                renewal_sent = tokio::time::Instant::now();
                renewal = Some(Box::pin(renew(shared, watch)));
            }
            renewed = async { renewal.as_mut().expect("guarded by the condition").await }, if renewal.is_some() => {
                renewal = None;
                match renewed {
                    Ok(()) => {
                        shared.counters.heartbeats.add(1);
                        lease_until = renewal_sent + shared.lease;
                        next_beat = Some(renewal_sent + beat_every);
                        tracing::debug!(lease_secs = shared.lease.as_secs(), "heartbeat: visibility and lease extended");
                    }
                    Err(problem) => {
                        heartbeat_failed(shared, cancel, &problem);
                        next_beat = None;
                        hard_deadline = hard_deadline.min(lease_until);
                    }
                }
            }
            _ = tokio::time::sleep_until(lease_until), if renewal.is_some() => {
                // The lease ended with its renewal still out: the event may be another
                // holder's by now.
                renewal = None;
                heartbeat_failed(shared, cancel, "the renewal did not come back before the lease ended");
                next_beat = None;
                hard_deadline = hard_deadline.min(lease_until);
            }
        }
    }
}

/// A heartbeat's renewal, running beside the handler.
type Renewal<'a> = Pin<Box<dyn Future<Output = Result<(), String>> + Send + 'a>>;

async fn sleep_until_some(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

fn heartbeat_failed(shared: &Shared, cancel: &CancellationToken, problem: &str) {
    shared.counters.heartbeat_failures.add(1);
    tracing::warn!(
        %problem,
        "heartbeat failed; telling the handler to stop (its writes stay fenced) and giving it \
         until its lease ends"
    );
    cancel.cancel();
}

/// How long a handler told to stop may take to wind down before its task is aborted: the
/// exec handler uses it to stop its command's process tree (SIGTERM, then SIGKILL).
pub(crate) const HANDLER_STOP_GRACE: Duration = Duration::from_millis(1500);

/// Tell the handler to stop, give it `grace` to do so, then abort its task.
async fn stop_handler(
    cancel: &CancellationToken,
    task: &mut tokio::task::JoinHandle<Result<(), HandlerError>>,
    grace: Duration,
) {
    cancel.cancel();
    if tokio::time::timeout(grace, &mut *task).await.is_err() {
        task.abort();
    }
}

/// One heartbeat: visibility and leases, renewed concurrently. It fails when the event's
/// own lease or messages could not be extended; a rider or a waiting companion that could
/// not be is dropped from the watch (a waiting event whose lease was taken will not start).
async fn renew(shared: &Shared, watch: &Watch<'_>) -> Result<(), String> {
    // Race tests make a renewal hang here.
    pause_at("sqs_worker::renew").await;
    let riders: Vec<String> = watch
        .riders
        .lock()
        .expect("not poisoned")
        .clone()
        .unwrap_or_default();
    let waiting = watch.waiting.lock().expect("not poisoned").clone();
    let waiting_keys: Vec<String> = waiting.iter().map(|(key, _)| key.clone()).collect();
    let changes: Vec<(String, Duration)> = watch
        .receipts
        .iter()
        .chain(&riders)
        .chain(waiting.iter().flat_map(|(_, receipts)| receipts))
        .map(|r| (r.clone(), shared.lease))
        .collect();
    let watched = Lease::new(&shared.scope, watch.key, watch.lease_token);
    let (visibility, lease, companions) = tokio::join!(
        shared.sqs.change_visibility_batch(&changes),
        shared.store.renew_lease(&watched, shared.lease),
        shared.store.renew_leases(
            &shared.scope,
            watch.lease_token,
            &waiting_keys,
            shared.lease
        ),
    );
    if let Ok(held) = companions {
        watch
            .waiting
            .lock()
            .expect("not poisoned")
            .retain(|(key, _)| held.contains(key));
    }
    let own_failures = |failures: &[sqs::BatchEntryFailure]| -> Vec<String> {
        failures
            .iter()
            .filter(|f| watch.receipts.contains(&f.receipt_handle))
            .map(|f| f.reason.clone())
            .collect()
    };
    match (visibility, lease) {
        (Ok(failures), Ok(true)) => {
            let own = own_failures(&failures);
            if own.is_empty() {
                Ok(())
            } else {
                Err(format!(
                    "SQS refused to extend the visibility: {}",
                    own.join("; ")
                ))
            }
        }
        (Err(error), _) => Err(format!("cannot extend the visibility: {error}")),
        (_, Ok(false)) => Err("the lease is no longer ours".into()),
        (_, Err(error)) => {
            shared.counters.database_errors.add(1);
            Err(format!("cannot renew the lease: {error}"))
        }
    }
}

/// What a final-pass failure records.
struct FinalFailure<'a> {
    key: &'a str,
    fingerprint: &'a str,
    lease_token: Option<&'a str>,
    mark_checkpoint: bool,
    reason: &'a str,
    error: &'a str,
    attempts: u32,
    pass: message::Pass,
}

/// A failure on a DLQ redrive's final pass: record the message in `dead_letters` (and the
/// event failed), delete it, and say so once. No retry, no return to the DLQ.
async fn end_final_pass(
    shared: &Shared,
    message: &ReceivedMessage,
    receipts: Vec<String>,
    failure: FinalFailure<'_>,
) -> bool {
    let attributes = message.attributes_json();
    let letter = NewDeadLetter {
        scope: &shared.scope,
        key: failure.key,
        queue_url: shared.sqs.url(),
        message_id: &message.message_id,
        body: &message.body,
        attributes: &attributes,
        reason: failure.reason,
        error: failure.error,
        attempts: failure.attempts.min(i32::MAX as u32) as i32,
        redrive_count: failure.pass.redrive_count.min(i32::MAX as u32) as i32,
        requeue_generation: failure.pass.requeue_generation.min(i32::MAX as u32) as i32,
        payload_sha256: failure.fingerprint,
    };
    match shared
        .store
        .record_dead_letter(&letter, failure.mark_checkpoint, failure.lease_token)
        .await
    {
        Ok(None) => {
            shared.counters.lease_lost.add(1);
            tracing::warn!(
                "final redrive pass failed, but the lease was taken over meanwhile; leaving \
                 the message to its new holder (nothing recorded)"
            );
            false
        }
        Ok(Some(id)) => {
            shared.ack(AckKind::Delete).with_receipts(receipts).await;
            shared.counters.final_pass_failures.add(1);
            tracing::warn!(
                dead_letter_id = id,
                reason = failure.reason,
                error = ?failure.error,
                redrive_count = failure.pass.redrive_count,
                "final redrive pass failed; recorded in dead_letters and deleted (no retry, no DLQ)"
            );
            true
        }
        Err(error) => {
            shared.counters.database_errors.add(1);
            tracing::error!(
                %error,
                "final redrive pass failed but could not be recorded in dead_letters; the \
                 message comes back after its visibility timeout"
            );
            false
        }
    }
}

/// Retryable outcome: give the lease back, then hide the message(s) for `delay` — unless
/// the lease was taken over meanwhile: the message is then the new holder's.
async fn retry_later(
    shared: &Shared,
    lease_token: &str,
    key: &str,
    error: &str,
    receipts: &[String],
    delay: Duration,
) {
    shared.counters.retried.add(1);
    // Debug-quoted: a handler's text may hold newlines, NUL or terminal escapes.
    tracing::warn!(
        ?error,
        retry_in_secs = sqs::visibility_seconds(delay),
        "handler failed; retrying after a backoff"
    );
    if shared.release_lease(lease_token, key, error).await {
        shared.show_after(receipts, delay).await;
    }
}

/// Whether `lease_token` still holds `key`'s lease (renewing it for a moment): asked before
/// an outcome that cannot be taken back, such as a DLQ send.
async fn still_held(shared: &Shared, lease_token: &str, key: &str) -> bool {
    match shared
        .store
        .renew_lease(&Lease::new(&shared.scope, key, lease_token), shared.lease)
        .await
    {
        Ok(true) => true,
        Ok(false) => {
            shared.counters.lease_lost.add(1);
            tracing::warn!(
                "the lease was taken over while the handler ran; leaving the message to its \
                 new holder"
            );
            false
        }
        Err(error) => {
            shared.counters.database_errors.add(1);
            tracing::error!(%error, "cannot confirm the lease; the message returns after its visibility timeout");
            false
        }
    }
}

/// A message with no usable key (not JSON, key field missing): it can never succeed, so it
/// goes to the DLQ with the reason, and a failed checkpoint is recorded under its body hash.
async fn dead_letter_unkeyed(shared: &Arc<Shared>, parsed: Parsed) {
    let error = parsed
        .identity
        .as_ref()
        .expect_err("only unkeyed messages come here");
    let key = parsed.key();
    let span = tracing::info_span!("message", message_id = %parsed.message.message_id, key = %key);
    async {
        // One line per message: "sent to the DLQ" (or the final pass's, or the failed
        // send's) says the reason code and why; the span names the message.
        if parsed.markers.final_pass {
            let failure = FinalFailure {
                key: &key,
                fingerprint: &message::body_sha256(&parsed.message.body),
                lease_token: None,
                mark_checkpoint: true,
                reason: error.reason_code(),
                error: &error.to_string(),
                attempts: 1,
                pass: parsed.markers.pass(),
            };
            let receipts = vec![parsed.message.receipt_handle.clone()];
            end_final_pass(shared, &parsed.message, receipts, failure).await;
            return;
        }
        if !send_to_dlq(shared, &parsed.message, error.reason_code(), &error.to_string()).await {
            retry_unsent(shared, &parsed.message).await;
            return;
        }
        if let Err(db_error) = shared
            .store
            .record_unkeyed_failure(
                &shared.scope,
                &key,
                &message::body_sha256(&parsed.message.body),
                &parsed.message.message_id,
                &error.to_string(),
            )
            .await
        {
            shared.counters.database_errors.add(1);
            tracing::error!(error = %db_error, "could not record the failed checkpoint; the message is in the DLQ");
        }
        shared
            .ack(AckKind::Delete)
            .with_receipts(vec![parsed.message.receipt_handle.clone()])
            .await;
    }
    .instrument(span)
    .await
}

/// What a delivery with a mismatched payload is compared with.
enum FirstPayload {
    /// An earlier delivery of the same key in this receive batch.
    InBatch {
        fingerprint: String,
        fields: Option<String>,
    },
    /// The checkpoint's fingerprint (its field digests are read when needed).
    Stored(String),
}

/// A message that should have gone to the DLQ but could not be sent there (no DLQ, a
/// failed send): it comes back after a backoff that grows with its receive count, so that
/// a DLQ outage does not spin it.
async fn retry_unsent(shared: &Shared, message: &ReceivedMessage) {
    shared.counters.retried.add(1);
    shared
        .change_visibility(&[(
            message.receipt_handle.clone(),
            shared.backoff(receive_count(message)),
        )])
        .await;
}

/// The same key with another payload: to the DLQ with reason `payload_mismatch`. The event's
/// checkpoint belongs to the first payload and is left alone: a mismatched delivery never
/// claims it (see `CheckpointStore::claim_batch`), so it has no lease to give back.
async fn dead_letter_mismatch(shared: &Arc<Shared>, parsed: Parsed, first: FirstPayload) {
    let identity = parsed.identity.as_ref().expect("keyed messages only");
    let span = tracing::info_span!("message", message_id = %parsed.message.message_id, key = %identity.key);
    async {
        let (fingerprint, fields) = match first {
            FirstPayload::InBatch {
                fingerprint,
                fields,
            } => (fingerprint, fields),
            FirstPayload::Stored(fingerprint) => {
                // Rare path: one more read, for a detail that names the fields.
                let fields = match shared.store.find(&shared.scope, &identity.key).await {
                    Ok(found) => found.and_then(|c| c.payload_fields),
                    Err(_) => None,
                };
                (fingerprint, fields)
            }
        };
        let (detail, differing) =
            mismatch_detail(&identity.key, &fingerprint, fields.as_deref(), identity);
        tracing::warn!(
            differing = differing.as_deref().map(|d| d.join(", ")),
            "the key was first seen with another payload (payload_mismatch)"
        );
        if parsed.markers.final_pass {
            let failure = FinalFailure {
                key: &identity.key,
                fingerprint: &identity.fingerprint,
                lease_token: None,
                // The checkpoint belongs to the first payload: leave it alone.
                mark_checkpoint: false,
                reason: "payload_mismatch",
                error: &detail,
                attempts: 1,
                pass: parsed.markers.pass(),
            };
            let receipts = vec![parsed.message.receipt_handle.clone()];
            end_final_pass(shared, &parsed.message, receipts, failure).await;
            return;
        }
        let sent = send_to_dlq(shared, &parsed.message, "payload_mismatch", &detail).await;
        if sent {
            shared
                .ack(AckKind::Delete)
                .with_receipts(vec![parsed.message.receipt_handle.clone()])
                .await;
        } else {
            retry_unsent(shared, &parsed.message).await;
        }
    }
    .instrument(span)
    .await
}

/// The DLQ detail of a payload mismatch, and the fields that differ when they are known.
fn mismatch_detail(
    key: &str,
    first_fingerprint: &str,
    first_fields: Option<&str>,
    arrived: &EventIdentity,
) -> (String, Option<Vec<String>>) {
    const ADVICE: &str = "an idempotency key reused with other content is not a duplicate; if \
                          only volatile fields differ (timestamps, delivery counters), \
                          fingerprint the stable ones with --fingerprint POINTER";
    let subset = |fingerprint: &str| fingerprint.starts_with("fields:");
    if subset(first_fingerprint) != subset(&arrived.fingerprint) {
        return (
            format!(
                "key {key:?} was first seen under another --fingerprint setting, so its \
                 payloads cannot be compared ({first_fingerprint} then, {} now); {ADVICE}",
                arrived.fingerprint
            ),
            None,
        );
    }
    let differing = message::differing_fields(first_fields, arrived.field_digests.as_deref());
    let detail = match &differing {
        Some(fields) if !fields.is_empty() => format!(
            "key {key:?} arrived with a payload that differs from the first one in {}; {ADVICE}",
            fields.join(", ")
        ),
        Some(_) => format!(
            "key {key:?} arrived with a payload whose fields equal the first one's but whose \
             text differs (whitespace, field order or duplicate fields); {ADVICE}"
        ),
        None => format!(
            "key {key:?} was first seen with payload fingerprint {first_fingerprint} and now \
             arrives with {}; {ADVICE}",
            arrived.fingerprint
        ),
    };
    (detail, differing)
}

/// Send a copy of `message` to the DLQ with the failure reason in its attributes. False when
/// there is no DLQ or the send failed (the caller then retries instead of deleting).
async fn send_to_dlq(
    shared: &Shared,
    message: &ReceivedMessage,
    reason: &str,
    detail: &str,
) -> bool {
    let Some(dlq) = &shared.dlq else {
        tracing::error!(
            reason,
            "permanent failure, but the queue has no DLQ; retrying with backoff instead — \
             configure a RedrivePolicy"
        );
        return false;
    };
    let fifo = dlq.url().ends_with(".fifo");
    let outgoing = dlq_message(message, reason, detail, fifo, dlq.size_limit().await);
    match dlq.send(outgoing).await {
        Ok(_) => {
            shared.counters.dead_lettered.add(1);
            // Debug-quoted: a handler's text may hold newlines, NUL or terminal escapes, and
            // this stays one line.
            tracing::warn!(reason, error = ?detail, dlq = dlq.name(), "sent to the DLQ");
            true
        }
        Err(error) => {
            tracing::error!(%error, reason, "could not send to the DLQ; retrying later");
            false
        }
    }
}

/// The DLQ copy of a message: same body, its attributes plus the failure reason, trimmed to
/// SQS's attribute limit (redrive markers and the reason are kept first) and to the DLQ's
/// `max_bytes` for body and attributes: a copy SQS refuses would fail the same way on every
/// retry. To fit, the detail is shortened first, then the message's own attributes are
/// dropped, then the detail; a body that leaves no room goes without the reason too, and
/// then without the redrive markers (reason and detail are still in the log and the
/// checkpoint).
fn dlq_message(
    message: &ReceivedMessage,
    reason: &str,
    detail: &str,
    fifo: bool,
    max_bytes: usize,
) -> OutgoingMessage {
    let rank = |name: &str| u8::from(!message::REDRIVE_MARKERS.contains(&name));
    // SQS refuses characters outside XML 1.0 and empty String values: either would fail the
    // send, and with it every retry of this message.
    let attribute_text = |text: &str, empty: &str| {
        let text = if text.is_empty() { empty } else { text };
        sqs::string_attribute(sqs::xml_safe(text).into_owned())
    };
    let mut attributes = sqs::fit_attributes(
        vec![
            (
                message::ATTR_FAILURE_REASON,
                attribute_text(reason, "unspecified"),
            ),
            (
                message::ATTR_FAILURE_DETAIL,
                attribute_text(&message::truncate_for_log(detail, 1000), "(no detail)"),
            ),
        ],
        &message.message_attributes,
        &[],
        rank,
    );
    if sqs::message_bytes(&message.body, &attributes) > max_bytes {
        let dropped = sqs::fit_message_size(
            &message.body,
            &mut attributes,
            max_bytes,
            message::ATTR_FAILURE_DETAIL,
            &message::KEEP_LONGEST,
        );
        tracing::warn!(
            body_bytes = message.body.len(),
            max_bytes,
            ?dropped,
            "the DLQ copy would exceed the DLQ's maximum message size: failure detail \
             shortened, the attributes named dropped"
        );
    }
    OutgoingMessage {
        body: message.body.clone(),
        attributes,
        message_group_id: fifo.then(|| {
            message
                .message_group_id()
                .unwrap_or("sqs-worker-dlq")
                .to_owned()
        }),
        deduplication_id: fifo.then(|| message.message_id.clone()),
        delay: None,
    }
}

// ---- the acker: batched completion + DeleteMessageBatch ----

enum AckKind {
    /// Mark the checkpoint complete (fenced by the lease token), then delete the receipts.
    Complete { key: String, lease_token: String },
    /// Just delete the receipts.
    Delete,
}

#[derive(Debug)]
enum AckResult {
    Done,
    LeaseLost,
    Failed(String),
}

struct AckRequest {
    kind: AckKind,
    receipts: Vec<String>,
    reply: Option<oneshot::Sender<AckResult>>,
}

struct PendingAck<'a> {
    shared: &'a Shared,
    kind: AckKind,
}

impl PendingAck<'_> {
    /// Queue the request and wait for the acker's answer.
    async fn with_receipts(self, receipts: Vec<String>) -> AckResult {
        let (reply, answer) = oneshot::channel();
        let request = AckRequest {
            kind: self.kind,
            receipts,
            reply: Some(reply),
        };
        if self.shared.acks.send(request).await.is_err() {
            return AckResult::Failed("the delete task has stopped".into());
        }
        answer
            .await
            .unwrap_or_else(|_| AckResult::Failed("the delete task dropped the request".into()))
    }
}

impl Shared {
    fn ack(&self, kind: AckKind) -> PendingAck<'_> {
        PendingAck { shared: self, kind }
    }

    /// Queue a delete without waiting for it (skipped duplicates: a failed delete only costs
    /// another cheap skip).
    async fn enqueue_delete(&self, receipts: Vec<String>) {
        // Lambda: the invocation's answer must already count the duplicate as settled.
        if let Mode::Lambda { settled, .. } = &self.mode {
            settled.lock().expect("not poisoned").extend(receipts);
            return;
        }
        let request = AckRequest {
            kind: AckKind::Delete,
            receipts,
            reply: None,
        };
        if self.acks.send(request).await.is_err() {
            tracing::warn!(
                "the delete task has stopped; the duplicate will be skipped again later"
            );
        }
    }

    /// Make all of `receipts` visible again after the same `delay`.
    async fn show_after(&self, receipts: &[String], delay: Duration) {
        let changes: Vec<(String, Duration)> =
            receipts.iter().map(|r| (r.clone(), delay)).collect();
        self.change_visibility(&changes).await;
    }

    async fn change_visibility(&self, changes: &[(String, Duration)]) {
        if let Mode::Lambda {
            change_visibility: false,
            ..
        } = &self.mode
        {
            // A local `--event` run: the receipt handles are not SQS's; the batch response
            // alone says what comes back.
            return;
        }
        match self.sqs.change_visibility_batch(changes).await {
            Ok(failures) => {
                self.sqs_reached(true);
                for failure in failures {
                    tracing::warn!(reason = %failure.reason, "could not change a message's visibility; it returns after its current timeout");
                }
            }
            Err(error) => {
                self.sqs_reached(false);
                tracing::warn!(%error, "could not change visibility; the messages return after their current timeout");
            }
        }
    }
}

/// Most receipts settled together: one completion statement for all their events, then
/// DeleteMessageBatch calls of 10 in parallel.
const ACK_BATCH: usize = 50;
/// How long the acker waits for more requests before settling what it has.
const ACK_LINGER: Duration = Duration::from_millis(5);
/// Settlements in flight at once, so deletes overlap receives as in a bare loop.
const ACK_PARALLEL: usize = 4;

async fn run_acker(
    shared: Arc<Shared>,
    mut requests: mpsc::Receiver<AckRequest>,
    stop: CancellationToken,
) {
    let slots = Arc::new(Semaphore::new(ACK_PARALLEL));
    let mut settling = JoinSet::new();
    loop {
        while settling.try_join_next().is_some() {}
        let first = tokio::select! {
            biased;
            request = requests.recv() => match request {
                Some(request) => request,
                None => break,
            },
            _ = stop.cancelled() => {
                // Settle what is already queued, then stop.
                let mut rest = Vec::new();
                while let Ok(request) = requests.try_recv() {
                    rest.push(request);
                }
                if !rest.is_empty() {
                    settle_acks(&shared, rest).await;
                }
                break;
            }
        };
        let mut batch = vec![first];
        let mut receipts: usize = batch[0].receipts.len();
        let deadline = tokio::time::Instant::now() + ACK_LINGER;
        while receipts < ACK_BATCH {
            match tokio::time::timeout_at(deadline, requests.recv()).await {
                Ok(Some(request)) => {
                    receipts += request.receipts.len();
                    batch.push(request);
                }
                _ => break,
            }
        }
        let slot = slots
            .clone()
            .acquire_owned()
            .await
            .expect("semaphore never closed");
        let shared = shared.clone();
        settling.spawn(async move {
            settle_acks(&shared, batch).await;
            drop(slot);
        });
    }
    while settling.join_next().await.is_some() {}
}

async fn settle_acks(shared: &Shared, batch: Vec<AckRequest>) {
    let keys: Vec<(String, String)> = batch
        .iter()
        .filter_map(|r| match &r.kind {
            AckKind::Complete { key, lease_token } => Some((key.clone(), lease_token.clone())),
            AckKind::Delete => None,
        })
        .collect();
    // The handlers' work is done: keep trying for half a lease (their messages stay hidden
    // and their leases held meanwhile) rather than have them run again after an outage.
    let completed: Result<HashSet<(String, String)>, String> =
        retry_database(shared, "marking events complete", shared.lease / 2, || {
            shared.store.complete_batch(&shared.scope, &keys)
        })
        .await
        .map(|done| done.into_iter().collect())
        .map_err(|error| format!("cannot mark events complete: {error}"));
    if let Err(error) = &completed {
        tracing::error!(%error, events = keys.len(), "not deleting them; they will be delivered again");
    }
    // Chaos tests kill the process here: checkpoints complete, messages not deleted.
    #[cfg(feature = "failpoints")]
    if !keys.is_empty() && completed.is_ok() {
        fail::fail_point!("sqs_worker::completed");
    }

    let mut to_delete: Vec<String> = Vec::new();
    let mut replies = Vec::with_capacity(batch.len());
    for request in batch {
        // Only a completed (or plain delete) request may delete: no message is deleted
        // before its checkpoint says complete or failed.
        let result = match (&request.kind, &completed) {
            (AckKind::Delete, _) => AckResult::Done,
            (AckKind::Complete { key, lease_token }, Ok(done))
                if done.contains(&(key.clone(), lease_token.clone())) =>
            {
                AckResult::Done
            }
            (AckKind::Complete { .. }, Ok(_)) => AckResult::LeaseLost,
            (AckKind::Complete { .. }, Err(error)) => AckResult::Failed(error.clone()),
        };
        if matches!(result, AckResult::Done) {
            to_delete.extend(request.receipts);
        }
        replies.push((request.reply, result));
    }
    // A failed delete does not change the answer: the event is settled, and the message
    // that comes back is skipped as a duplicate.
    delete_receipts(shared, &to_delete).await;
    shared.touch();
    for (reply, result) in replies {
        if let Some(reply) = reply {
            let _ = reply.send(result);
        }
    }
}

/// With the `failpoints` feature, a test can make the task reaching this point wait
/// (`fail::cfg(name, "return(MILLIS)")`). The wait is asynchronous: fail's own `sleep` action
/// would block the runtime thread, which is not what a slow call looks like.
#[cfg(feature = "failpoints")]
async fn pause_at(name: &'static str) {
    let millis = (|| {
        fail::fail_point!(name, |arg| arg.and_then(|a| a.parse::<u64>().ok()));
        None
    })();
    if let Some(millis) = millis {
        tokio::time::sleep(Duration::from_millis(millis)).await;
    }
}

#[cfg(not(feature = "failpoints"))]
async fn pause_at(_name: &'static str) {}

/// A checkpoint statement, tried again with a doubling delay (100 ms up to 2 s) until
/// `budget` has passed. Each failure is counted and marks the database unreachable (which
/// stops receiving, see `Shared::database_up`); a success marks it reachable.
async fn retry_database<T, F, Fut>(
    shared: &Shared,
    what: &str,
    budget: Duration,
    mut call: F,
) -> Result<T, StoreError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, StoreError>>,
{
    let give_up_at = Instant::now() + budget;
    let mut delay = Duration::from_millis(100);
    loop {
        match call().await {
            Ok(value) => {
                shared.database_reached(true);
                return Ok(value);
            }
            Err(error) => {
                shared.counters.database_errors.add(1);
                shared.database_reached(false);
                if Instant::now() + delay >= give_up_at {
                    return Err(error);
                }
                tracing::warn!(%error, retry_in_ms = delay.as_millis() as u64, "{what} failed; trying again");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(2));
            }
        }
    }
}

/// DeleteMessageBatch in chunks of 10, all at once: one round trip's wait, not several.
/// Returns the receipts that were not deleted; each failure is logged and counted, never
/// dropped silently.
async fn delete_receipts(shared: &Shared, receipts: &[String]) -> Vec<String> {
    join_all(receipts.chunks(10).map(|chunk| delete_chunk(shared, chunk)))
        .await
        .into_iter()
        .flatten()
        .collect()
}

/// One DeleteMessageBatch (at most 10 receipts).
async fn delete_chunk(shared: &Shared, receipts: &[String]) -> Vec<String> {
    if receipts.is_empty() {
        return Vec::new();
    }
    // Lambda deletes every message the invocation does not report as failed.
    if let Mode::Lambda { settled, .. } = &shared.mode {
        settled
            .lock()
            .expect("not poisoned")
            .extend(receipts.iter().cloned());
        return Vec::new();
    }
    match shared.sqs.delete_batch(receipts).await {
        Ok(failures) => {
            shared.sqs_reached(true);
            shared.counters.delete_failures.add(failures.len());
            for failure in &failures {
                tracing::warn!(reason = %failure.reason, "SQS refused a delete; the message returns and is skipped as a duplicate");
            }
            failures.into_iter().map(|f| f.receipt_handle).collect()
        }
        Err(error) => {
            shared.sqs_reached(false);
            shared.counters.delete_failures.add(receipts.len());
            tracing::warn!(%error, messages = receipts.len(), "delete failed; the messages return and are skipped as duplicates");
            receipts.to_vec()
        }
    }
}

#[cfg(test)]
mod protocol_model;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sqs::MAX_MESSAGE_ATTRIBUTES;

    #[test]
    fn busy_deliveries_wait_out_the_run_before_their_last_receive() {
        let (lease, run) = (Duration::from_secs(20), Duration::from_secs(800));
        // No DLQ, or receives to spare: back when the lease ends.
        assert_eq!(busy_deferral(lease, run, 1, None), lease);
        assert_eq!(busy_deferral(lease, run, 1, Some(5)), lease);
        assert_eq!(busy_deferral(lease, run, 3, Some(5)), lease);
        // The next receive is the last one allowed: park until the run must have ended.
        assert_eq!(busy_deferral(lease, run, 4, Some(5)), run);
        assert_eq!(busy_deferral(lease, run, 1, Some(2)), run);
        assert_eq!(busy_deferral(lease, Duration::ZERO, 9, Some(5)), lease);
    }

    #[test]
    fn backoff_doubles_from_the_base_and_caps() {
        let base = Duration::from_secs(2);
        let max = Duration::from_secs(60);
        // jitter 1.0 gives the ceiling, 0.0 half of it.
        assert_eq!(retry_delay(1, base, max, 1.0), Duration::from_secs(2));
        assert_eq!(retry_delay(1, base, max, 0.0), Duration::from_secs(1));
        assert_eq!(retry_delay(2, base, max, 1.0), Duration::from_secs(4));
        assert_eq!(retry_delay(3, base, max, 1.0), Duration::from_secs(8));
        assert_eq!(retry_delay(10, base, max, 1.0), max);
        assert_eq!(retry_delay(10, base, max, 0.0), max / 2);
    }

    #[test]
    fn backoff_never_reaches_the_sqs_limit() {
        let delay = retry_delay(
            1000,
            Duration::from_secs(3600),
            Duration::from_secs(1_000_000),
            1.0,
        );
        assert!(delay <= MAX_VISIBILITY);
        // Attempt 0 (never claimed) behaves like attempt 1 instead of underflowing.
        assert_eq!(
            retry_delay(0, Duration::from_secs(2), Duration::from_secs(60), 1.0),
            Duration::from_secs(2)
        );
    }

    #[test]
    fn jitter_stays_in_the_upper_half() {
        for _ in 0..100 {
            let d = retry_delay(
                4,
                Duration::from_secs(1),
                Duration::from_secs(60),
                fastrand::f64(),
            );
            assert!(
                d >= Duration::from_secs(4) && d <= Duration::from_secs(8),
                "{d:?}"
            );
        }
    }

    fn received(attrs: &[(&str, &str)]) -> ReceivedMessage {
        ReceivedMessage {
            message_id: "m-1".into(),
            receipt_handle: "r-1".into(),
            body: "{}".into(),
            system_attributes: HashMap::new(),
            message_attributes: attrs
                .iter()
                .map(|(k, v)| (k.to_string(), sqs::string_attribute(*v)))
                .collect(),
        }
    }

    #[test]
    fn dlq_copy_keeps_markers_and_reason_within_the_limit() {
        let mut attrs: Vec<(String, String)> =
            (0..12).map(|i| (format!("a{i:02}"), "x".into())).collect();
        attrs.push((message::ATTR_REDRIVE_COUNT.into(), "2".into()));
        let refs: Vec<(&str, &str)> = attrs
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let out = dlq_message(&received(&refs), "missing_key", "no key", false, usize::MAX);
        assert_eq!(out.attributes.len(), MAX_MESSAGE_ATTRIBUTES);
        assert!(out.attributes.contains_key(message::ATTR_FAILURE_REASON));
        assert!(out.attributes.contains_key(message::ATTR_FAILURE_DETAIL));
        assert!(out.attributes.contains_key(message::ATTR_REDRIVE_COUNT));
        assert_eq!(out.body, "{}");
        assert!(out.message_group_id.is_none());

        let fifo = dlq_message(&received(&[]), "r", "d", true, usize::MAX);
        assert_eq!(fifo.deduplication_id.as_deref(), Some("m-1"));
        assert!(fifo.message_group_id.is_some());
    }

    #[test]
    fn dlq_copy_attributes_are_always_sendable() {
        let out = dlq_message(
            &received(&[]),
            "bad\u{0}reason",
            "stderr: \u{0}\u{1b}[31m\u{FFFF}",
            false,
            usize::MAX,
        );
        let text = |name: &str| out.attributes[name].string_value().unwrap().to_owned();
        assert_eq!(text(message::ATTR_FAILURE_REASON), "bad\u{FFFD}reason");
        assert_eq!(
            text(message::ATTR_FAILURE_DETAIL),
            "stderr: \u{FFFD}\u{FFFD}[31m\u{FFFD}"
        );
        // SQS refuses empty String attributes.
        let out = dlq_message(&received(&[]), "", "", false, usize::MAX);
        assert_eq!(
            out.attributes[message::ATTR_FAILURE_REASON].string_value(),
            Some("unspecified")
        );
        assert_eq!(
            out.attributes[message::ATTR_FAILURE_DETAIL].string_value(),
            Some("(no detail)")
        );
    }

    #[test]
    fn dlq_copy_fits_the_maximum_message_size() {
        let limit = sqs::DEFAULT_MAX_MESSAGE_BYTES;
        let detail = "why ".repeat(200);
        let mut original = received(&[
            (message::ATTR_REDRIVE_COUNT, "1"),
            ("trace_id", "t-123456789"),
        ]);
        let original_attrs = sqs::message_bytes("", &original.message_attributes);
        // The original left `room` bytes free; the copy adds the reason (42 bytes) and the
        // detail (31 bytes + its text).
        let copy = |original: &mut ReceivedMessage, room: usize| {
            original.body = "x".repeat(limit - original_attrs - room);
            let out = dlq_message(original, "missing_key", &detail, false, limit);
            assert!(sqs::message_bytes(&out.body, &out.attributes) <= limit);
            assert_eq!(out.body, original.body, "the body is never changed");
            let mut names: Vec<String> = out.attributes.keys().cloned().collect();
            names.sort();
            (out, names)
        };
        // Some room: only the detail is shortened.
        let (out, names) = copy(&mut original, 300);
        assert_eq!(names.len(), 4);
        let shortened = out.attributes[message::ATTR_FAILURE_DETAIL]
            .string_value()
            .unwrap();
        assert!(shortened.starts_with("why why") && shortened.ends_with('…'));
        assert_eq!(sqs::message_bytes(&out.body, &out.attributes), limit);
        // Less: the detail is cut to the bone and the ordinary attribute goes.
        let (out, names) = copy(&mut original, 60);
        assert_eq!(
            names,
            [
                message::ATTR_REDRIVE_COUNT,
                message::ATTR_FAILURE_DETAIL,
                message::ATTR_FAILURE_REASON
            ]
        );
        assert_eq!(
            out.attributes[message::ATTR_FAILURE_DETAIL].string_value(),
            Some("…")
        );
        // Less: the detail goes; the reason and the redrive marker stay.
        let (_, names) = copy(&mut original, 20);
        assert_eq!(
            names,
            [message::ATTR_REDRIVE_COUNT, message::ATTR_FAILURE_REASON]
        );
        // None: the marker outlasts the reason.
        let (_, names) = copy(&mut original, 0);
        assert_eq!(names, [message::ATTR_REDRIVE_COUNT]);
        // A body at the limit goes bare.
        let bare = ReceivedMessage {
            body: "x".repeat(limit),
            ..received(&[])
        };
        let out = dlq_message(&bare, "missing_key", &detail, false, limit);
        assert!(out.attributes.is_empty());
    }
}
