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
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;
use sqlx::PgPool;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::checkpoint::{
    self, CheckpointError, CheckpointStore, Claim, ClaimOutcome, ClaimRequest, NewDeadLetter,
};
use crate::handler::{Handler, HandlerError, Job};
use crate::message::{self, Envelope, EventIdentity, KeyError, KeySpec, RedriveMarkers};
use crate::sqs::{self, MAX_VISIBILITY, OutgoingMessage, ReceivedMessage, SqsError, SqsQueue};

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
    /// Longest a handler may run before it is stopped and retried; `None` means the lease.
    pub handler_timeout: Option<Duration>,
    /// First retry delay; doubles per attempt.
    pub backoff_base: Duration,
    /// Longest retry delay.
    pub backoff_max: Duration,
    /// Exit once nothing was received and nothing was in flight for this long.
    pub exit_when_idle: Option<Duration>,
    /// How long in-flight handlers may take to finish after a shutdown signal.
    pub shutdown_timeout: Duration,
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
            handler_timeout: None,
            backoff_base: Duration::from_secs(2),
            backoff_max: Duration::from_secs(900),
            exit_when_idle: None,
            shutdown_timeout: Duration::from_secs(25),
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
    /// The queue could not be inspected at start (wrong URL, no credentials, no endpoint).
    #[error(
        "cannot read the queue's attributes; check --queue-url, credentials and AWS_ENDPOINT_URL: {0}"
    )]
    Queue(#[source] SqsError),
    /// The configuration cannot work.
    #[error("invalid configuration: {0}")]
    Config(String),
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
    /// Handlers still running when the shutdown deadline passed.
    pub abandoned_at_shutdown: u64,
}

#[derive(Default)]
struct Counters {
    received: AtomicU64,
    processed: AtomicU64,
    duplicates_skipped: AtomicU64,
    busy_deferred: AtomicU64,
    retried: AtomicU64,
    dead_lettered: AtomicU64,
    final_pass_failures: AtomicU64,
    delete_failures: AtomicU64,
    lease_lost: AtomicU64,
    receive_errors: AtomicU64,
    database_errors: AtomicU64,
}

impl Counters {
    fn add(counter: &AtomicU64, n: usize) {
        counter.fetch_add(n as u64, Ordering::Relaxed);
    }

    fn snapshot(&self) -> RunSummary {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        RunSummary {
            received: get(&self.received),
            processed: get(&self.processed),
            duplicates_skipped: get(&self.duplicates_skipped),
            busy_deferred: get(&self.busy_deferred),
            retried: get(&self.retried),
            dead_lettered: get(&self.dead_lettered),
            final_pass_failures: get(&self.final_pass_failures),
            delete_failures: get(&self.delete_failures),
            lease_lost: get(&self.lease_lost),
            receive_errors: get(&self.receive_errors),
            database_errors: get(&self.database_errors),
            abandoned_at_shutdown: 0,
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
    pool: Option<PgPool>,
    handler: Option<Arc<dyn Handler>>,
    shutdown: Option<CancellationToken>,
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

    /// The pool of the checkpoint database, already migrated (required).
    pub fn pool(mut self, pool: PgPool) -> Self {
        self.pool = Some(pool);
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

    /// The worker, or which part is missing.
    pub fn build(self) -> Result<Worker, WorkerError> {
        let missing = |what: &str| WorkerError::Config(format!("the worker builder needs {what}"));
        let worker = Worker::new(
            self.config.ok_or_else(|| missing("a config"))?,
            self.client.ok_or_else(|| missing("an SQS client"))?,
            self.pool.ok_or_else(|| missing("a database pool"))?,
            self.handler.ok_or_else(|| missing("a handler"))?,
        );
        Ok(match self.shutdown {
            Some(token) => worker.with_shutdown(token),
            None => worker,
        })
    }
}

/// A worker: one queue, one checkpoint scope, one handler.
pub struct Worker {
    config: WorkerConfig,
    sqs: SqsQueue,
    store: CheckpointStore,
    handler: Arc<dyn Handler>,
    shutdown: CancellationToken,
}

impl Worker {
    /// Start building a worker.
    pub fn builder() -> WorkerBuilder {
        WorkerBuilder::default()
    }

    /// A worker for `config.queue_url`, checkpointing in `pool` (already migrated).
    pub fn new(
        config: WorkerConfig,
        client: aws_sdk_sqs::Client,
        pool: PgPool,
        handler: Arc<dyn Handler>,
    ) -> Self {
        let sqs = SqsQueue::new(client, config.queue_url.clone());
        Self {
            config,
            sqs,
            store: CheckpointStore::new(pool),
            handler,
            shutdown: CancellationToken::new(),
        }
    }

    /// Stop when `token` is cancelled (e.g. on SIGTERM): no new receives, in-flight handlers
    /// get `shutdown_timeout` to finish.
    pub fn with_shutdown(mut self, token: CancellationToken) -> Self {
        self.shutdown = token;
        self
    }

    /// Run until shut down (or idle, with `exit_when_idle`). Returns what happened.
    pub async fn run(self) -> Result<RunSummary, WorkerError> {
        let config = self.config;
        if config.concurrency == 0 || config.pollers == 0 {
            return Err(WorkerError::Config(
                "--concurrency and --pollers must be at least 1".into(),
            ));
        }
        let lease = match config.visibility_timeout {
            Some(v) => v,
            None => self
                .sqs
                .visibility_timeout()
                .await
                .map_err(WorkerError::Queue)?,
        };
        if lease.is_zero() {
            return Err(WorkerError::Config(
                "the visibility timeout is 0 s, so no lease could hold; set --visibility-timeout"
                    .into(),
            ));
        }
        let dlq = self
            .sqs
            .dead_letter_queue_url()
            .await
            .map_err(WorkerError::Queue)?
            .map(|url| self.sqs.sibling(url));
        if dlq.is_none() {
            tracing::warn!(
                queue = self.sqs.name(),
                "the queue has no RedrivePolicy, so permanent failures cannot go to a DLQ and \
                 will be retried with backoff; give the queue a DLQ"
            );
        }
        let scope = config
            .scope
            .clone()
            .unwrap_or_else(|| self.sqs.name().to_owned());
        let owner = config.worker_id.clone().unwrap_or_else(default_worker_id);
        tracing::info!(
            queue = self.sqs.name(),
            %scope,
            worker_id = %owner,
            lease_secs = lease.as_secs(),
            pollers = config.pollers,
            concurrency = config.concurrency,
            "worker starting"
        );

        let (ack_sender, ack_receiver) = mpsc::channel(config.concurrency * 2 + 16);
        let shared = Arc::new(Shared {
            sqs: self.sqs,
            dlq,
            store: self.store,
            handler: self.handler,
            scope,
            owner,
            claim_sequence: AtomicU64::new(1),
            lease,
            counters: Counters::default(),
            in_flight: AtomicUsize::new(0),
            last_activity: Mutex::new(Instant::now()),
            acks: ack_sender,
            config,
        });

        let acker_stop = CancellationToken::new();
        let acker = tokio::spawn(run_acker(shared.clone(), ack_receiver, acker_stop.clone()));
        let stop = self.shutdown.child_token();
        let tracker = TaskTracker::new();
        let semaphore = Arc::new(Semaphore::new(shared.config.concurrency));
        let mut pollers = JoinSet::new();
        for _ in 0..shared.config.pollers {
            pollers.spawn(poll(
                shared.clone(),
                semaphore.clone(),
                tracker.clone(),
                stop.clone(),
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
            pollers.abort_all();
            abandoned = shared.in_flight.load(Ordering::Relaxed) as u64;
            tracing::warn!(
                abandoned,
                "shutdown deadline passed with handlers still running; their leases expire \
                 and SQS delivers those messages again"
            );
        }
        acker_stop.cancel();
        if let Err(error) = acker.await {
            tracing::error!(%error, "the delete task failed");
        }
        let mut summary = shared.counters.snapshot();
        summary.abandoned_at_shutdown = abandoned;
        tracing::info!(?summary, "worker stopped");
        Ok(summary)
    }
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
struct Shared {
    config: WorkerConfig,
    sqs: SqsQueue,
    dlq: Option<SqsQueue>,
    store: CheckpointStore,
    handler: Arc<dyn Handler>,
    scope: String,
    owner: String,
    /// Numbers each claim statement: the lease owner written to a checkpoint is
    /// `owner#n`, so even this worker's own stale task (whose lease expired and was taken
    /// over by a newer claim here) is fenced out.
    claim_sequence: AtomicU64,
    lease: Duration,
    counters: Counters,
    in_flight: AtomicUsize,
    last_activity: Mutex<Instant>,
    acks: mpsc::Sender<AckRequest>,
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
}

async fn exit_when_idle(shared: Arc<Shared>, idle: Duration, stop: CancellationToken) {
    let tick = (idle / 4).clamp(Duration::from_millis(20), Duration::from_millis(250));
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(tick) => {}
        }
        let quiet_for = shared.last_activity.lock().expect("not poisoned").elapsed();
        if shared.in_flight.load(Ordering::Relaxed) == 0 && quiet_for >= idle {
            tracing::info!(
                idle_secs = idle.as_secs_f64(),
                "nothing received or in flight for the idle period; exiting (--exit-when-idle)"
            );
            stop.cancel();
            return;
        }
    }
}

/// One poller: take permits, long-poll, hand the batch on. Ends when `stop` is cancelled.
async fn poll(
    shared: Arc<Shared>,
    semaphore: Arc<Semaphore>,
    tracker: TaskTracker,
    stop: CancellationToken,
) {
    let mut error_backoff = Duration::from_millis(500);
    loop {
        // Wait for one free slot, then take up to 9 more without waiting: receive only as
        // many messages as can start now.
        let first = tokio::select! {
            _ = stop.cancelled() => return,
            permit = semaphore.clone().acquire_owned() => permit.expect("semaphore never closed"),
        };
        let mut permits = vec![first];
        while permits.len() < 10 {
            match semaphore.clone().try_acquire_owned() {
                Ok(permit) => permits.push(permit),
                Err(_) => break,
            }
        }
        let receive = shared.sqs.receive(
            permits.len(),
            shared.config.wait_time,
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
                Counters::add(&shared.counters.receive_errors, 1);
                tracing::error!(%error, retry_in_ms = error_backoff.as_millis() as u64, "receive failed");
                drop(permits);
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(error_backoff) => {}
                }
                error_backoff = (error_backoff * 2).min(Duration::from_secs(30));
            }
            Ok(messages) if messages.is_empty() => {
                error_backoff = Duration::from_millis(500);
            }
            Ok(messages) => {
                error_backoff = Duration::from_millis(500);
                shared.touch();
                Counters::add(&shared.counters.received, messages.len());
                handle_batch(&shared, &tracker, messages, permits, received_at).await;
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
    let changes: Vec<(String, Duration)> = messages
        .iter()
        .map(|m| (m.receipt_handle.clone(), Duration::ZERO))
        .collect();
    shared.change_visibility(&changes).await;
}

/// A message whose event identity has been worked out.
struct Parsed {
    message: ReceivedMessage,
    markers: RedriveMarkers,
    identity: Result<EventIdentity, KeyError>,
}

impl Parsed {
    fn key(&self) -> String {
        match &self.identity {
            Ok(identity) => identity.key.clone(),
            Err(_) => message::fallback_key(&self.message.body),
        }
    }
}

async fn handle_batch(
    shared: &Arc<Shared>,
    tracker: &TaskTracker,
    messages: Vec<ReceivedMessage>,
    mut permits: Vec<OwnedSemaphorePermit>,
    received_at: Instant,
) {
    // The lease starts now but the visibility timeout started at receive: shorten the lease
    // by the difference so both expire together.
    let lease = shared
        .lease
        .saturating_sub(received_at.elapsed())
        .max(Duration::from_secs(1));

    let parsed: Vec<Parsed> = messages
        .into_iter()
        .map(|message| {
            let markers = message::parse_markers(message.attribute_strings());
            for problem in &markers.problems {
                tracing::warn!(message_id = %message.message_id, %problem, "ignoring an unreadable redrive marker");
            }
            Parsed {
                identity: message::derive_identity(
                    &shared.config.key,
                    shared.config.envelope,
                    &message.body,
                ),
                markers,
                message,
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
            })
        })
        .collect();
    let outcomes = match shared
        .store
        .claim_batch(&shared.scope, &lease_token, lease, &requests)
        .await
    {
        Ok(outcomes) => outcomes,
        Err(error) => {
            Counters::add(&shared.counters.database_errors, 1);
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

    // Group deliveries by key: the first delivery of a claimed key runs; later deliveries of
    // the same key in this batch ride along and share its fate (deleted once it completes).
    let mut claimed: Vec<(Parsed, Claim, Vec<ReceivedMessage>)> = Vec::new();
    let mut claimed_index: HashMap<String, usize> = HashMap::new();
    let mut busy: Vec<(String, Duration)> = Vec::new();
    for p in parsed {
        let Ok(identity) = &p.identity else {
            let permit = permits.pop();
            let shared = shared.clone();
            tracker.spawn(async move {
                let _permit = permit;
                dead_letter_unkeyed(&shared, p).await;
            });
            continue;
        };
        let key = identity.key.clone();
        if let Some(&i) = claimed_index.get(&key) {
            let first = claimed[i]
                .0
                .identity
                .as_ref()
                .expect("claimed messages have a key");
            if shared.config.on_payload_mismatch == PayloadMismatch::DeadLetter
                && first.fingerprint != identity.fingerprint
            {
                let stored = first.fingerprint.clone();
                let permit = permits.pop();
                let shared = shared.clone();
                tracker.spawn(async move {
                    let _permit = permit;
                    dead_letter_mismatch(&shared, p, None, stored).await;
                });
            } else {
                claimed[i].2.push(p.message);
            }
            continue;
        }
        let fingerprint = identity.fingerprint.clone();
        let mismatch = |stored: &str| {
            shared.config.on_payload_mismatch == PayloadMismatch::DeadLetter
                && stored != fingerprint
        };
        match outcomes.get(&key) {
            Some(ClaimOutcome::Claimed(claim)) if mismatch(&claim.stored_payload_sha256) => {
                let stored = claim.stored_payload_sha256.clone();
                let lease_token = lease_token.clone();
                let permit = permits.pop();
                let shared = shared.clone();
                tracker.spawn(async move {
                    let _permit = permit;
                    dead_letter_mismatch(&shared, p, Some(lease_token), stored).await;
                });
            }
            Some(ClaimOutcome::Complete {
                stored_payload_sha256,
            }) if mismatch(stored_payload_sha256) => {
                let stored = stored_payload_sha256.clone();
                let permit = permits.pop();
                let shared = shared.clone();
                tracker.spawn(async move {
                    let _permit = permit;
                    dead_letter_mismatch(&shared, p, None, stored).await;
                });
            }
            Some(ClaimOutcome::Claimed(claim)) => {
                claimed_index.insert(key, claimed.len());
                claimed.push((p, claim.clone(), Vec::new()));
            }
            Some(ClaimOutcome::Complete { .. }) | Some(ClaimOutcome::Failed) => {
                Counters::add(&shared.counters.duplicates_skipped, 1);
                tracing::info!(
                    message_id = %p.message.message_id,
                    %key,
                    "event already handled; deleting this duplicate delivery"
                );
                shared.enqueue_delete(vec![p.message.receipt_handle]).await;
            }
            Some(ClaimOutcome::Busy { retry_after }) => {
                Counters::add(&shared.counters.busy_deferred, 1);
                tracing::info!(
                    message_id = %p.message.message_id,
                    %key,
                    retry_in_secs = retry_after.as_secs_f64(),
                    "event is leased by another worker; this delivery comes back when the lease ends"
                );
                busy.push((
                    p.message.receipt_handle,
                    (*retry_after).max(Duration::from_secs(1)),
                ));
            }
            None => {
                tracing::error!(%key, "claim returned no row for a key; leaving the message for redelivery");
            }
        }
    }
    if !busy.is_empty() {
        shared.change_visibility(&busy).await;
    }

    for (p, claim, siblings) in claimed {
        let lease_token = lease_token.clone();
        let permit = permits.pop();
        let shared = shared.clone();
        let handler_timeout = shared.config.handler_timeout.unwrap_or(lease);
        let span = tracing::info_span!(
            "message",
            message_id = %p.message.message_id,
            key = %p.key(),
            attempt = claim.attempts,
        );
        tracker.spawn(
            async move {
                let _permit = permit;
                shared.in_flight.fetch_add(1, Ordering::Relaxed);
                run_claimed(&shared, p, claim, &lease_token, siblings, handler_timeout).await;
                shared.in_flight.fetch_sub(1, Ordering::Relaxed);
                shared.touch();
            }
            .instrument(span),
        );
    }
}

async fn run_claimed(
    shared: &Arc<Shared>,
    parsed: Parsed,
    claim: Claim,
    lease_token: &str,
    siblings: Vec<ReceivedMessage>,
    handler_timeout: Duration,
) {
    let identity = parsed.identity.expect("claimed messages have a key");
    let message = parsed.message;
    let markers = parsed.markers;
    let mut job = Job {
        scope: shared.scope.clone(),
        key: identity.key.clone(),
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
        store: shared.store.clone(),
        owner: lease_token.to_owned(),
        recorded: checkpoint::parse_steps(&claim.steps),
        next_step: 0,
        lease_lost: false,
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
    let mut task = tokio::spawn(
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
    let result = match tokio::time::timeout(handler_timeout, &mut task).await {
        Ok(Ok(result)) => result,
        Ok(Err(join_error)) if join_error.is_panic() => {
            Err(HandlerError::retryable("the handler panicked"))
        }
        Ok(Err(join_error)) => Err(HandlerError::retryable(format!(
            "the handler task ended abnormally: {join_error}"
        ))),
        Err(_) => {
            task.abort();
            Err(HandlerError::retryable(format!(
                "the handler timed out after {:.1} s (--handler-timeout)",
                handler_timeout.as_secs_f64()
            )))
        }
    };

    let mut receipts = vec![message.receipt_handle.clone()];
    receipts.extend(siblings.iter().map(|s| s.receipt_handle.clone()));
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
            redrive_count: markers.redrive_count,
        };
        end_final_pass(shared, &message, receipts, failure).await;
        return;
    }
    match result {
        Ok(()) => {
            match shared
                .ack(AckKind::Complete {
                    key: identity.key.clone(),
                    lease_token: lease_token.to_owned(),
                })
                .with_receipts(receipts)
                .await
            {
                AckResult::Done => {
                    Counters::add(&shared.counters.processed, 1);
                    Counters::add(&shared.counters.duplicates_skipped, siblings.len());
                    tracing::info!("event complete");
                }
                AckResult::LeaseLost => {
                    Counters::add(&shared.counters.lease_lost, 1);
                    tracing::warn!(
                        "the lease was taken by another worker before completion; leaving the \
                         message to the lease holder"
                    );
                }
                AckResult::Failed(error) => {
                    tracing::error!(%error, "could not record completion; the message will be delivered again");
                }
            }
        }
        Err(HandlerError::LeaseLost) => {
            Counters::add(&shared.counters.lease_lost, 1);
            tracing::warn!(
                "stopped at a step boundary: another worker took the lease; leaving the message \
                 to it"
            );
        }
        Err(HandlerError::Retryable {
            message: error,
            retry_after,
        }) => {
            let delay = retry_after.unwrap_or_else(|| shared.backoff(claim.attempts));
            retry_later(shared, lease_token, &identity.key, &error, &receipts, delay).await;
        }
        Err(HandlerError::Permanent {
            message: error,
            reason,
        }) => {
            let sent = send_to_dlq(shared, &message, &reason, &error).await;
            if !sent {
                let delay = shared.backoff(claim.attempts);
                retry_later(shared, lease_token, &identity.key, &error, &receipts, delay).await;
                return;
            }
            match shared
                .store
                .mark_failed(&shared.scope, lease_token, &identity.key, &error)
                .await
            {
                Ok(true) => {}
                Ok(false) => {
                    tracing::warn!("lease lost before the checkpoint could be marked failed")
                }
                Err(error) => {
                    Counters::add(&shared.counters.database_errors, 1);
                    tracing::error!(%error, "could not mark the checkpoint failed; the message is in the DLQ");
                }
            }
            // The message is safely in the DLQ: delete it whatever the checkpoint said.
            shared.ack(AckKind::Delete).with_receipts(receipts).await;
            Counters::add(&shared.counters.duplicates_skipped, siblings.len());
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
    redrive_count: u32,
}

/// A failure on a DLQ redrive's final pass: record the message in `dead_letters` (and the
/// event failed), delete it, and say so once. No retry, no return to the DLQ.
async fn end_final_pass(
    shared: &Shared,
    message: &ReceivedMessage,
    receipts: Vec<String>,
    failure: FinalFailure<'_>,
) {
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
        redrive_count: failure.redrive_count.min(i32::MAX as u32) as i32,
        payload_sha256: failure.fingerprint,
    };
    match shared
        .store
        .record_dead_letter(&letter, failure.mark_checkpoint, failure.lease_token)
        .await
    {
        Ok(id) => {
            shared.ack(AckKind::Delete).with_receipts(receipts).await;
            Counters::add(&shared.counters.final_pass_failures, 1);
            tracing::warn!(
                dead_letter_id = id,
                reason = failure.reason,
                error = %failure.error,
                redrive_count = failure.redrive_count,
                "final redrive pass failed; recorded in dead_letters and deleted (no retry, no DLQ)"
            );
        }
        Err(error) => {
            Counters::add(&shared.counters.database_errors, 1);
            tracing::error!(
                %error,
                "final redrive pass failed but could not be recorded in dead_letters; the \
                 message comes back after its visibility timeout"
            );
        }
    }
}

/// Retryable outcome: give the lease back, then hide the message(s) for `delay`.
async fn retry_later(
    shared: &Shared,
    lease_token: &str,
    key: &str,
    error: &str,
    receipts: &[String],
    delay: Duration,
) {
    Counters::add(&shared.counters.retried, 1);
    tracing::warn!(
        %error,
        retry_in_secs = sqs::visibility_seconds(delay),
        "handler failed; retrying after a backoff"
    );
    if let Err(error) = shared
        .store
        .release(&shared.scope, lease_token, key, error)
        .await
    {
        // Not fatal: the lease expires on its own, only later than the backoff.
        Counters::add(&shared.counters.database_errors, 1);
        tracing::error!(%error, "could not release the lease; the retry waits for it to expire");
    }
    let changes: Vec<(String, Duration)> = receipts.iter().map(|r| (r.clone(), delay)).collect();
    shared.change_visibility(&changes).await;
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
        tracing::warn!(reason = error.reason_code(), %error, "message has no usable idempotency key");
        if parsed.markers.final_pass {
            let failure = FinalFailure {
                key: &key,
                fingerprint: &message::body_sha256(&parsed.message.body),
                lease_token: None,
                mark_checkpoint: true,
                reason: error.reason_code(),
                error: &error.to_string(),
                attempts: 1,
                redrive_count: parsed.markers.redrive_count,
            };
            let receipts = vec![parsed.message.receipt_handle.clone()];
            end_final_pass(shared, &parsed.message, receipts, failure).await;
            return;
        }
        if !send_to_dlq(shared, &parsed.message, error.reason_code(), &error.to_string()).await {
            let receive_count = parsed
                .message
                .system_attributes
                .get("ApproximateReceiveCount")
                .and_then(|c| c.parse().ok())
                .unwrap_or(1);
            Counters::add(&shared.counters.retried, 1);
            shared
                .change_visibility(&[(
                    parsed.message.receipt_handle.clone(),
                    shared.backoff(receive_count),
                )])
                .await;
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
            Counters::add(&shared.counters.database_errors, 1);
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

/// The same key with another payload: to the DLQ with reason `payload_mismatch`. The event's
/// checkpoint belongs to the first payload and is left alone (a claim taken just now is
/// released for that payload's own deliveries).
async fn dead_letter_mismatch(
    shared: &Arc<Shared>,
    parsed: Parsed,
    lease_token: Option<String>,
    stored: String,
) {
    let identity = parsed.identity.as_ref().expect("keyed messages only");
    let span = tracing::info_span!("message", message_id = %parsed.message.message_id, key = %identity.key);
    async {
        let detail = format!(
            "key {:?} was first seen with payload sha256 {} and now arrives with {}; an \
             idempotency key must not be reused for different content",
            identity.key, stored, identity.fingerprint
        );
        // The claim (if any) was taken for the first payload's event: give it straight back.
        if let Some(lease_token) = &lease_token
            && let Err(error) = shared
                .store
                .release(
                    &shared.scope,
                    lease_token,
                    &identity.key,
                    "payload_mismatch",
                )
                .await
        {
            Counters::add(&shared.counters.database_errors, 1);
            tracing::error!(%error, "could not release the lease; it expires on its own");
        }
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
                redrive_count: parsed.markers.redrive_count,
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
            let delay = shared.backoff(1);
            shared
                .change_visibility(&[(parsed.message.receipt_handle.clone(), delay)])
                .await;
        }
    }
    .instrument(span)
    .await
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
    let outgoing = dlq_message(message, reason, detail, dlq.url().ends_with(".fifo"));
    match dlq.send(outgoing).await {
        Ok(_) => {
            Counters::add(&shared.counters.dead_lettered, 1);
            tracing::warn!(reason, error = %detail, dlq = dlq.name(), "sent to the DLQ");
            true
        }
        Err(error) => {
            tracing::error!(%error, "could not send to the DLQ; retrying later");
            false
        }
    }
}

/// The DLQ copy of a message: same body, its attributes plus the failure reason, trimmed to
/// SQS's attribute limit (redrive markers and the reason are kept first).
fn dlq_message(
    message: &ReceivedMessage,
    reason: &str,
    detail: &str,
    fifo: bool,
) -> OutgoingMessage {
    let is_marker = |n: &str| {
        matches!(
            n,
            message::ATTR_DLQ_REDRIVEN | message::ATTR_REDRIVE_COUNT | message::ATTR_DLQ_FINAL_PASS
        )
    };
    let attributes = sqs::fit_attributes(
        vec![
            (message::ATTR_FAILURE_REASON, sqs::string_attribute(reason)),
            (
                message::ATTR_FAILURE_DETAIL,
                sqs::string_attribute(message::truncate_for_log(detail, 1000)),
            ),
        ],
        &message.message_attributes,
        &[],
        |name| u8::from(!is_marker(name)),
    );
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

    async fn change_visibility(&self, changes: &[(String, Duration)]) {
        match self.sqs.change_visibility_batch(changes).await {
            Ok(failures) => {
                for failure in failures {
                    tracing::warn!(reason = %failure.reason, "could not change a message's visibility; it returns after its current timeout");
                }
            }
            Err(error) => {
                tracing::warn!(%error, "could not change visibility; the messages return after their current timeout");
            }
        }
    }
}

const ACK_BATCH: usize = 10;
const ACK_LINGER: Duration = Duration::from_millis(5);

async fn run_acker(
    shared: Arc<Shared>,
    mut requests: mpsc::Receiver<AckRequest>,
    stop: CancellationToken,
) {
    loop {
        let first = tokio::select! {
            biased;
            request = requests.recv() => match request {
                Some(request) => request,
                None => return,
            },
            _ = stop.cancelled() => {
                // Drain what is already queued, then stop.
                let mut rest = Vec::new();
                while let Ok(request) = requests.try_recv() {
                    rest.push(request);
                }
                if !rest.is_empty() {
                    settle_acks(&shared, rest).await;
                }
                return;
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
        settle_acks(&shared, batch).await;
    }
}

async fn settle_acks(shared: &Shared, batch: Vec<AckRequest>) {
    let keys: Vec<(String, String)> = batch
        .iter()
        .filter_map(|r| match &r.kind {
            AckKind::Complete { key, lease_token } => Some((key.clone(), lease_token.clone())),
            AckKind::Delete => None,
        })
        .collect();
    let completed: Result<HashSet<(String, String)>, String> = complete_with_retries(shared, &keys)
        .await
        .map(|done| done.into_iter().collect())
        .map_err(|error| format!("cannot mark events complete: {error}"));
    if let Err(error) = &completed {
        tracing::error!(%error, events = keys.len(), "not deleting them; they will be delivered again");
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
    for (reply, result) in replies {
        if let Some(reply) = reply {
            let _ = reply.send(result);
        }
    }
}

async fn complete_with_retries(
    shared: &Shared,
    keys: &[(String, String)],
) -> Result<Vec<(String, String)>, CheckpointError> {
    let mut delay = Duration::from_millis(100);
    let mut tries = 0;
    loop {
        match shared.store.complete_batch(&shared.scope, keys).await {
            Ok(done) => return Ok(done),
            Err(error) if tries < 3 => {
                Counters::add(&shared.counters.database_errors, 1);
                tracing::warn!(%error, "marking events complete failed; trying again");
                tokio::time::sleep(delay).await;
                delay *= 4;
                tries += 1;
            }
            Err(error) => {
                Counters::add(&shared.counters.database_errors, 1);
                return Err(error);
            }
        }
    }
}

/// DeleteMessageBatch in chunks of 10. Returns the receipts that were not deleted; each
/// failure is logged and counted, never dropped silently.
async fn delete_receipts(shared: &Shared, receipts: &[String]) -> Vec<String> {
    if receipts.is_empty() {
        return Vec::new();
    }
    match shared.sqs.delete_batch(receipts).await {
        Ok(failures) => {
            Counters::add(&shared.counters.delete_failures, failures.len());
            for failure in &failures {
                tracing::warn!(reason = %failure.reason, "SQS refused a delete; the message returns and is skipped as a duplicate");
            }
            failures.into_iter().map(|f| f.receipt_handle).collect()
        }
        Err(error) => {
            Counters::add(&shared.counters.delete_failures, receipts.len());
            tracing::warn!(%error, messages = receipts.len(), "delete failed; the messages return and are skipped as duplicates");
            receipts.to_vec()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sqs::MAX_MESSAGE_ATTRIBUTES;

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
        let out = dlq_message(&received(&refs), "missing_key", "no key", false);
        assert_eq!(out.attributes.len(), MAX_MESSAGE_ATTRIBUTES);
        assert!(out.attributes.contains_key(message::ATTR_FAILURE_REASON));
        assert!(out.attributes.contains_key(message::ATTR_FAILURE_DETAIL));
        assert!(out.attributes.contains_key(message::ATTR_REDRIVE_COUNT));
        assert_eq!(out.body, "{}");
        assert!(out.message_group_id.is_none());

        let fifo = dlq_message(&received(&[]), "r", "d", true);
        assert_eq!(fifo.deduplication_id.as_deref(), Some("m-1"));
        assert!(fifo.message_group_id.is_some());
    }
}
