//! The long-running service: [`Worker`] and its builder. Starts the core, the pollers and
//! the probes, then drains on shutdown.

use std::sync::Arc;

use sqlx::PgPool;
use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::handler::Handler;
use crate::sqs::SqsQueue;
use crate::store::{CheckpointStore, PostgresStore};

use super::config::{WorkerConfig, WorkerError};
use super::core::{BatchTokens, Core, CoreParts};
use super::heartbeat::HANDLER_STOP_GRACE;
use super::poll::{Poller, poll, probe_database};
use super::readiness::Readiness;
use super::settlement::Mode;
use super::shared::Shared;
use super::shutdown::{drain, exit_when_idle};
use super::summary::RunSummary;

/// Builds a [`Worker`] from its parts.
#[derive(Default)]
pub struct WorkerBuilder {
    pub(super) config: Option<WorkerConfig>,
    client: Option<aws_sdk_sqs::Client>,
    pub(super) store: Option<Arc<dyn CheckpointStore>>,
    pub(super) handler: Option<Arc<dyn Handler>>,
    shutdown: Option<CancellationToken>,
    pub(super) readiness: Option<Arc<Readiness>>,
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
        let store = self.store.ok_or_else(|| missing("a checkpoint store"))?;
        let handler = self.handler.ok_or_else(|| missing("a handler"))?;
        crate::handler::check_step_transactions(&*handler, &*store).map_err(WorkerError::Config)?;
        let mut worker = Worker::new(
            self.config.ok_or_else(|| missing("a config"))?,
            self.client.ok_or_else(|| missing("an SQS client"))?,
            store,
            handler,
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
    pub(super) config: WorkerConfig,
    pub(super) sqs: SqsQueue,
    pub(super) store: Arc<dyn CheckpointStore>,
    pub(super) handler: Arc<dyn Handler>,
    shutdown: CancellationToken,
    pub(super) readiness: Option<Arc<Readiness>>,
}

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
        tokio::spawn(probe_database(shared.clone(), stop.clone()));
        let tokens = BatchTokens {
            stop: stop.clone(),
            abandon: abandon.clone(),
            stop_grace: HANDLER_STOP_GRACE,
        };
        let (mut pollers, mut add_requests) = start_pollers(&shared, &tracker, tokens);
        if let Some(idle) = shared.config.exit_when_idle {
            tokio::spawn(exit_when_idle(shared.clone(), idle, stop.clone()));
        }
        // Run until told to stop (or every poller ended), then drain.
        tokio::select! {
            _ = stop.cancelled() => {}
            _ = pollers.run(&mut add_requests) => {}
        }
        stop.cancel();
        let pollers = pollers.set;
        let abandoned = drain(&shared, pollers, tracker, abandon).await;
        let mut summary = core.stop().await;
        summary.abandoned_at_shutdown = abandoned;
        tracing::info!(?summary, "worker stopped");
        Ok(summary)
    }
}

/// The running pollers, and how to start another like them.
struct Pollers {
    set: JoinSet<()>,
    template: Poller,
}

impl Pollers {
    /// Start pollers as they are asked for (each already counted by the poller that asked),
    /// until every poller has ended.
    async fn run(&mut self, add_requests: &mut mpsc::UnboundedReceiver<()>) {
        loop {
            tokio::select! {
                Some(()) = add_requests.recv() => {
                    self.set.spawn(poll(self.template.clone()));
                }
                joined = self.set.join_next() => {
                    if joined.is_none() {
                        return;
                    }
                }
            }
        }
    }
}

/// The first `--pollers` pollers, sharing one semaphore that bounds the messages in flight.
fn start_pollers(
    shared: &Arc<Shared>,
    tracker: &TaskTracker,
    tokens: BatchTokens,
) -> (Pollers, mpsc::UnboundedReceiver<()>) {
    let (add, add_requests) = mpsc::unbounded_channel();
    let template = Poller {
        shared: shared.clone(),
        semaphore: Arc::new(Semaphore::new(shared.config.concurrency)),
        tracker: tracker.clone(),
        tokens,
        add,
    };
    let mut set = JoinSet::new();
    for _ in 0..shared.pollers.min() {
        if shared.pollers.try_add() {
            set.spawn(poll(template.clone()));
        }
    }
    (Pollers { set, template }, add_requests)
}
