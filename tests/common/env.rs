//! [`TestEnv`]: what every integration test needs — an SQS client, a fresh store and a fresh
//! queue pair, removed again when the test ends (even by a panic) — and the helpers that
//! act on them. The store's type is named here and nowhere else in the tests: [`Store`],
//! [`StoreAddress::connect`] and [`worker_on`] are the only places that build one or hand
//! one to a worker.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use aws_sdk_sqs::Client;
use aws_sdk_sqs::types::Message;
use sqlx::{Connection, PgPool};
use sqs_worker::store::{Checkpoint, ClaimRequest, ClaimTerms, DeadLetter};
use sqs_worker::worker::WorkerError;
use sqs_worker::{Handler, RunSummary, Worker, WorkerConfig};
use tokio_util::sync::CancellationToken;

use super::queues::{self, QueuePair, QueueSpec};
use super::{admin_database_url, endpoint, sqs_client, unique, wait_until, worker_config};

// ---- the store -------------------------------------------------------------------------------

/// The checkpoint stores the tests run against (the library's own kinds);
/// [`super::store_tests!`] runs each store test once per store listed there. PostgreSQL: a
/// fresh database per test on `DATABASE_URL`'s server; SQLite: a fresh file per test in the
/// target's temp dir (`CARGO_TARGET_TMPDIR`).
pub use sqs_worker::StoreKind;

/// The file of the SQLite store called `name`.
fn sqlite_file(name: &str) -> std::path::PathBuf {
    std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("{name}.sqlite"))
}

/// The checkpoint store the tests talk to, behind the contract every store implements: the
/// one place in the tests that names its type (its methods need no trait import).
pub type Store = Arc<dyn sqs_worker::CheckpointStore>;

/// Where a test's store lives, as plain data: for a worker in another runtime or another
/// process, which must open connections of its own.
#[derive(Clone, Debug)]
pub struct StoreAddress {
    /// Which store.
    pub kind: StoreKind,
    /// Its URL (for PostgreSQL, the database's; the binary's DATABASE_URL).
    pub url: String,
}

impl StoreAddress {
    /// A store on connections of its own (at most `connections`): they live and die with
    /// the runtime that opened them.
    pub async fn connect(&self, connections: u32) -> Result<Store, sqlx::Error> {
        match self.kind {
            StoreKind::Postgres => Ok(sqs_worker::PostgresStore::shared(
                sqs_worker::connect_database(&self.url, connections).await?,
            )),
            StoreKind::Sqlite => {
                match sqs_worker::SqliteStore::connect(&self.url, connections).await {
                    Ok(store) => Ok(Arc::new(store)),
                    Err(sqs_worker::store::StoreError::Database(error)) => Err(error),
                    Err(other) => panic!("cannot open the SQLite store: {other}"),
                }
            }
            StoreKind::Dynamodb => {
                let table = self
                    .url
                    .strip_prefix("dynamodb://")
                    .expect("a DynamoDB URL");
                let client = super::dynamodb_client(&super::dynamodb_endpoint()).await;
                Ok(Arc::new(sqs_worker::store::DynamoStore::new(client, table)))
            }
        }
    }

    /// The `sqs-worker` binary pointed at LocalStack and this store.
    pub fn command(&self) -> tokio::process::Command {
        sqs_worker_command(&self.url)
    }
}

/// A worker on `store`: the one place in the tests that says how a worker gets its store.
pub fn worker_on(
    store: &Store,
    config: WorkerConfig,
    client: Client,
    handler: Arc<dyn Handler>,
) -> Worker {
    Worker::builder()
        .config(config)
        .sqs_client(client)
        .store(store.clone())
        .shared_handler(handler)
        .build()
        .expect("a worker from all its parts")
}

/// A claim of `key` with payload hash `h` and message id `m-<key>`, first pass: the store
/// tests' usual request (`..claim_request(key)` for the rest).
pub fn claim_request(key: &str) -> ClaimRequest {
    ClaimRequest {
        key: key.into(),
        payload_sha256: "h".into(),
        message_id: format!("m-{key}"),
        reclaim_failed: false,
        pass: Default::default(),
        field_digests: None,
    }
}

/// Claim terms with a lease (and run limit) of `lease`, mismatches not accepted.
pub fn claim_terms(lease: Duration) -> ClaimTerms {
    ClaimTerms {
        lease,
        run_limit: lease,
        accept_mismatch: false,
    }
}

/// The `sqs-worker` binary, pointed at LocalStack and the given database (startup tests
/// also give it URLs of databases that do not exist or cannot be reached).
pub fn sqs_worker_command(database_url: &str) -> tokio::process::Command {
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_sqs-worker"));
    command
        .env("DATABASE_URL", database_url)
        .env("AWS_ENDPOINT_URL", endpoint())
        .env("AWS_ENDPOINT_URL_DYNAMODB", super::dynamodb_endpoint())
        .env("AWS_ACCESS_KEY_ID", "test")
        .env("AWS_SECRET_ACCESS_KEY", "test")
        .env("AWS_REGION", "us-east-1")
        .kill_on_drop(true);
    command
}

/// Create a fresh, migrated store of `kind` called `name` (made by [`unique`]): the store
/// on 10 connections, and its address.
async fn create_store(kind: StoreKind, name: &str) -> (Store, StoreAddress) {
    match kind {
        StoreKind::Postgres => {
            let admin_url = admin_database_url();
            let mut admin = sqlx::PgConnection::connect(&admin_url)
                .await
                .expect("PostgreSQL must be running (see README: localstack/up checks it)");
            // Identifiers cannot be bound parameters; the name is generated from [a-z_].
            sqlx::query(&format!("create database {name}"))
                .execute(&mut admin)
                .await
                .expect("create test database");
            admin.close().await.unwrap();
            let (base, _) = admin_url
                .split('?')
                .next()
                .unwrap()
                .rsplit_once('/')
                .expect("DATABASE_URL has a database path");
            let address = StoreAddress {
                kind,
                url: format!("{base}/{name}"),
            };
            let store = address.connect(10).await.unwrap();
            store.migrate().await.unwrap();
            (store, address)
        }
        StoreKind::Sqlite => {
            let address = StoreAddress {
                kind,
                url: format!("sqlite://{}", sqlite_file(name).display()),
            };
            let store = address.connect(10).await.unwrap();
            store.migrate().await.unwrap();
            (store, address)
        }
        StoreKind::Dynamodb => {
            let address = StoreAddress {
                kind,
                url: format!("dynamodb://{name}"),
            };
            let store = address.connect(10).await.unwrap();
            store.migrate().await.expect(
                "the local DynamoDB endpoint must answer (localstack/up starts it: \
                 AWS_ENDPOINT_URL_DYNAMODB)",
            );
            (store, address)
        }
    }
}

/// Remove a store made by [`create_store`], whoever is still connected to it (and nothing
/// if it was never made).
async fn drop_store(kind: StoreKind, name: &str) -> Result<(), sqlx::Error> {
    match kind {
        StoreKind::Postgres => {
            let mut admin = sqlx::PgConnection::connect(&admin_database_url()).await?;
            sqlx::query(&format!("drop database if exists {name} with (force)"))
                .execute(&mut admin)
                .await?;
            admin.close().await
        }
        StoreKind::Sqlite => {
            let file = sqlite_file(name);
            let mut name = file.clone().into_os_string();
            for suffix in ["", "-wal", "-shm", ".migrate-lock"] {
                name.push(suffix);
                let _ = std::fs::remove_file(&name);
                name = file.clone().into_os_string();
            }
            Ok(())
        }
        StoreKind::Dynamodb => {
            let client = super::dynamodb_client(&super::dynamodb_endpoint()).await;
            match client.delete_table().table_name(name).send().await {
                Ok(_) => Ok(()),
                Err(error)
                    if error
                        .as_service_error()
                        .is_some_and(|e| e.is_resource_not_found_exception()) =>
                {
                    Ok(())
                }
                Err(error) => Err(sqlx::Error::Protocol(format!(
                    "DynamoDB: {}",
                    aws_sdk_dynamodb::error::DisplayErrorContext(&error)
                ))),
            }
        }
    }
}

/// What a [`TestEnv`] made outside this process, removed on drop: the store and the queues.
/// The store is noted before it is made, so a setup that panics halfway (a failed
/// migration, LocalStack down) leaves no database behind either.
#[derive(Default)]
struct Leftovers {
    store: Option<(StoreKind, String)>,
    queues: Mutex<Vec<String>>,
}

impl Drop for Leftovers {
    /// Runs on a thread of its own with its own small runtime (the test's runtime may be
    /// unwinding from a panic, and blocking inside it cannot run its tasks), and waits for it.
    /// Never panics: a failed clean-up is reported, and the test's own outcome stands.
    fn drop(&mut self) {
        let store = self.store.take();
        let queues = std::mem::take(self.queues.get_mut().unwrap_or_else(|e| e.into_inner()));
        let cleanup = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime for the clean-up");
            runtime.block_on(async {
                if !queues.is_empty() {
                    let client = sqs_worker::sqs::local_client(&endpoint()).await;
                    for url in queues {
                        // A test may have deleted one itself (a DLQ outage).
                        let _ = client.delete_queue().queue_url(url).send().await;
                    }
                }
                if let Some((kind, name)) = store
                    && let Err(error) = drop_store(kind, &name).await
                {
                    eprintln!("test clean-up: cannot drop the test store {name}: {error}");
                }
            });
        });
        if cleanup.join().is_err() {
            eprintln!("test clean-up: the clean-up thread panicked");
        }
    }
}

// ---- the environment ----------------------------------------------------------------------

/// How to build a [`TestEnv`]: which store, and which queue pair (by default a standard
/// queue with a DLQ after 5 receives).
#[derive(Clone, Debug)]
pub struct TestEnvBuilder {
    store: StoreKind,
    queue: Option<QueueSpec>,
}

impl TestEnvBuilder {
    /// Checkpoint in this store (default: PostgreSQL).
    pub fn store(mut self, store: StoreKind) -> Self {
        self.store = store;
        self
    }

    /// No queue at all: tests of the store alone.
    pub fn no_queue(mut self) -> Self {
        self.queue = None;
        self
    }

    /// A queue without a DLQ.
    pub fn no_dlq(self) -> Self {
        self.with_queue(|q| q.dlq = false)
    }

    /// SQS's maxReceiveCount before it moves a message to the DLQ (default 5).
    pub fn max_receive(self, count: u32) -> Self {
        self.with_queue(|q| q.max_receive = count)
    }

    /// A FIFO queue (content-based deduplication), with a FIFO DLQ unless [`Self::no_dlq`].
    pub fn fifo(self) -> Self {
        self.with_queue(|q| q.fifo = true)
    }

    /// The queue's default visibility timeout in seconds (default 30).
    pub fn visibility(self, seconds: u32) -> Self {
        self.with_queue(|q| q.visibility = seconds)
    }

    fn with_queue(mut self, change: impl FnOnce(&mut QueueSpec)) -> Self {
        change(self.queue.get_or_insert_with(QueueSpec::default));
        self
    }

    /// Make the store and the queue pair.
    pub async fn start(self) -> TestEnv {
        let client = sqs_client().await;
        let mut leftovers = Leftovers::default();
        let name = unique("sqsw_test");
        leftovers.store = Some((self.store, name.clone()));
        let (store, address) = create_store(self.store, &name).await;
        let mut env = TestEnv {
            client,
            store,
            address,
            queue: None,
            leftovers,
        };
        if let Some(spec) = self.queue {
            env.queue = Some(env.add_queue(&spec).await);
        }
        env
    }
}

/// One test's world: an SQS client, a fresh store, and (unless built without) a fresh queue
/// pair. Dropping it deletes the queues and drops the store, also when the test panics.
pub struct TestEnv {
    client: Client,
    store: Store,
    address: StoreAddress,
    queue: Option<QueuePair>,
    leftovers: Leftovers,
}

impl TestEnv {
    /// PostgreSQL and a standard queue with a DLQ after 5 receives: what most tests need.
    pub async fn new() -> Self {
        Self::builder().start().await
    }

    /// This store and a standard queue with a DLQ after 5 receives: a store test's usual
    /// start.
    pub async fn on(store: StoreKind) -> Self {
        Self::builder().store(store).start().await
    }

    /// Choose the store and the queue pair, then [`TestEnvBuilder::start`].
    pub fn builder() -> TestEnvBuilder {
        TestEnvBuilder {
            store: StoreKind::Postgres,
            queue: Some(QueueSpec::default()),
        }
    }

    // -- parts

    /// The SQS client (LocalStack), for calls no helper makes.
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// The store, for claims, completions and lookups a test makes itself.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Which store this is.
    pub fn store_kind(&self) -> StoreKind {
        self.address.kind
    }

    /// Where the store is, for a worker in another runtime or process.
    pub fn store_address(&self) -> &StoreAddress {
        &self.address
    }

    /// The database's URL (what the binary gets as DATABASE_URL).
    pub fn database_url(&self) -> &str {
        &self.address.url
    }

    /// The database's URL with its host and port replaced by `addr`: the same database
    /// through a [`super::Proxy`].
    pub fn database_url_via(&self, addr: std::net::SocketAddr) -> String {
        let (scheme, rest) = self.address.url.split_once("://").expect("a URL");
        let split = rest.find(['/', '?']).unwrap_or(rest.len());
        let (authority, path) = rest.split_at(split);
        let user = authority.rsplit_once('@').map_or("", |(user, _)| user);
        let at = if user.is_empty() { "" } else { "@" };
        format!("{scheme}://{user}{at}{addr}{path}")
    }

    /// The PostgreSQL pool, for tests of PostgreSQL itself (their own tables, triggers,
    /// edited rows). Panics for another store.
    pub fn pool(&self) -> &PgPool {
        assert_eq!(
            self.store_kind(),
            StoreKind::Postgres,
            "a PostgreSQL-only test"
        );
        self.store.postgres().expect("a PostgreSQL store").pool()
    }

    /// The SQLite pool, for tests of SQLite itself (their own tables). Panics for another
    /// store.
    pub fn sqlite_pool(&self) -> &sqlx::SqlitePool {
        self.store.sqlite().expect("a SQLite store").pool()
    }

    /// The queue the workers read.
    pub fn queue_url(&self) -> &str {
        &self.queue.as_ref().expect("built with no_queue").url
    }

    /// Its DLQ.
    pub fn dlq_url(&self) -> &str {
        self.queue
            .as_ref()
            .and_then(|q| q.dlq_url.as_deref())
            .expect("built with no_dlq")
    }

    /// Another fresh queue pair, deleted with the rest.
    pub async fn add_queue(&self, spec: &QueueSpec) -> QueuePair {
        let pair = queues::create_queue_pair(&self.client, spec).await;
        self.leftovers
            .queues
            .lock()
            .unwrap()
            .extend(pair.urls().cloned());
        pair
    }

    /// The queue's ARN (for Lambda event records).
    pub async fn queue_arn(&self) -> String {
        queues::queue_arn(&self.client, self.queue_url()).await
    }

    // -- workers

    /// Test defaults for a worker on the queue: short polls and backoffs.
    pub fn config(&self) -> WorkerConfig {
        worker_config(self.queue_url())
    }

    /// A worker with `config` and `handler` on this store.
    pub fn worker(&self, config: WorkerConfig, handler: Arc<dyn Handler>) -> Worker {
        worker_on(&self.store, config, self.client.clone(), handler)
    }

    /// Such a worker, started in the background.
    pub fn start(&self, config: WorkerConfig, handler: Arc<dyn Handler>) -> RunningWorker {
        RunningWorker::start(self.worker(config, handler))
    }

    /// Run one worker until the queue is drained (bounded by `within`); its summary.
    pub async fn drain(
        &self,
        config: WorkerConfig,
        handler: Arc<dyn Handler>,
        within: Duration,
    ) -> RunSummary {
        let worker = self.worker(config, handler);
        self.drain_workers(vec![worker], within).await.remove(0)
    }

    /// Run these workers until the queue is drained (bounded by `within`); their summaries.
    pub async fn drain_workers(&self, workers: Vec<Worker>, within: Duration) -> Vec<RunSummary> {
        run_until_drained(&self.client, self.queue_url(), workers, within).await
    }

    // -- messages

    /// Send `body` to the queue; its message id.
    pub async fn send(&self, body: &str) -> String {
        self.send_to(self.queue_url(), body).await
    }

    /// Send `body` to another queue (the DLQ, say); its message id.
    pub async fn send_to(&self, queue_url: &str, body: &str) -> String {
        self.send_with_attributes(queue_url, body, &[]).await
    }

    /// Send `body` with String attributes `(name, value)`; its message id.
    pub async fn send_with_attributes(
        &self,
        queue_url: &str,
        body: &str,
        attributes: &[(&str, &str)],
    ) -> String {
        queues::send_with_attributes(&self.client, queue_url, body, attributes).await
    }

    /// Messages in the queue: visible, in flight or delayed.
    pub async fn messages_in(&self) -> u64 {
        queues::messages_in(&self.client, self.queue_url()).await
    }

    /// Messages in the DLQ: visible, in flight or delayed.
    pub async fn dlq_messages_in(&self) -> u64 {
        queues::messages_in(&self.client, self.dlq_url()).await
    }

    /// Messages of the queue received by someone and not yet deleted or visible again.
    pub async fn messages_not_visible(&self) -> u64 {
        queues::messages_not_visible(&self.client, self.queue_url()).await
    }

    /// Up to `expected` of the queue's messages (trying for `within`), left visible.
    pub async fn peek(&self, expected: usize, within: Duration) -> Vec<Message> {
        queues::peek_all(&self.client, self.queue_url(), expected, within).await
    }

    /// Up to `expected` of the DLQ's messages (trying for `within`), left visible.
    pub async fn peek_dlq(&self, expected: usize, within: Duration) -> Vec<Message> {
        queues::peek_all(&self.client, self.dlq_url(), expected, within).await
    }

    /// Wait (at most `within`) until the queue holds nothing.
    pub async fn wait_for_empty_queue(&self, within: Duration) {
        wait_until("the queue to drain", within, || async move {
            self.messages_in().await == 0
        })
        .await;
    }

    // -- the store's records

    /// The checkpoint of `key` in `scope`; panics if there is none.
    pub async fn checkpoint(&self, scope: &str, key: &str) -> Checkpoint {
        self.find_checkpoint(scope, key)
            .await
            .unwrap_or_else(|| panic!("no checkpoint for {scope}/{key}"))
    }

    /// The checkpoint of `key` in `scope`, if any.
    pub async fn find_checkpoint(&self, scope: &str, key: &str) -> Option<Checkpoint> {
        self.store.find(scope, key).await.unwrap()
    }

    /// Wait (at most `within`) until the checkpoint of `key` in `scope` exists and is `ready`.
    pub async fn wait_for_checkpoint(
        &self,
        what: &str,
        (scope, key): (&str, &str),
        within: Duration,
        ready: impl Fn(&Checkpoint) -> bool,
    ) {
        let ready = &ready;
        wait_until(what, within, || async move {
            self.find_checkpoint(scope, key)
                .await
                .is_some_and(|c| ready(&c))
        })
        .await;
    }

    /// The newest ten dead letters, of one scope or all.
    pub async fn dead_letters(&self, scope: Option<&str>) -> Vec<DeadLetter> {
        self.store.list_dead_letters(scope, 10).await.unwrap()
    }

    // -- the binary

    /// The `sqs-worker` binary pointed at LocalStack and this store.
    pub fn command(&self) -> tokio::process::Command {
        self.address.command()
    }

    /// `sqs-worker run --queue-url <the queue>`; add the rest.
    pub fn run_command(&self) -> tokio::process::Command {
        let mut command = self.command();
        command.args(["run", "--queue-url", self.queue_url()]);
        command
    }

    /// One local Lambda invocation on this store (see [`super::invoke_lambda`]).
    pub async fn invoke_lambda(
        &self,
        log: &std::path::Path,
        event: &serde_json::Value,
        timeout_secs: &str,
        handler: &str,
    ) -> serde_json::Value {
        super::invoke_lambda(self.command(), log, event, timeout_secs, handler).await
    }
}

// ---- running workers ----------------------------------------------------------------------

/// Run workers until the queue has been empty for a moment, then stop them; panics if that
/// takes longer than `within`, or a worker takes more than 20 s to stop.
pub async fn run_until_drained(
    client: &Client,
    queue_url: &str,
    workers: Vec<Worker>,
    within: Duration,
) -> Vec<RunSummary> {
    let stop = CancellationToken::new();
    let handles: Vec<_> = workers
        .into_iter()
        .map(|w| tokio::spawn(w.with_shutdown(stop.clone()).run()))
        .collect();
    // Three empty looks in a row: a message between receive and delete, or one deferred by a
    // visibility change, shows up in one of the counts in between.
    let deadline = Instant::now() + within;
    let mut empty_checks = 0;
    while empty_checks < 3 {
        assert!(
            Instant::now() < deadline,
            "timed out after {within:?} waiting for the queue to drain ({} messages left)",
            queues::messages_in(client, queue_url).await
        );
        tokio::time::sleep(Duration::from_millis(150)).await;
        empty_checks = if queues::messages_in(client, queue_url).await == 0 {
            empty_checks + 1
        } else {
            0
        };
    }
    stop.cancel();
    let mut summaries = Vec::new();
    for handle in handles {
        summaries.push(stopped(handle).await);
    }
    summaries
}

type RunTask = tokio::task::JoinHandle<Result<RunSummary, WorkerError>>;

/// A worker's summary once it stops, bounded: 20 s after its shutdown signal.
async fn stopped(task: RunTask) -> RunSummary {
    tokio::time::timeout(Duration::from_secs(20), task)
        .await
        .expect("worker stops within 20 s of the shutdown signal")
        .unwrap()
        .expect("worker run succeeds")
}

/// A worker running in the background until [`RunningWorker::stop`]: for tests that act
/// while it runs.
pub struct RunningWorker {
    stop: CancellationToken,
    task: RunTask,
}

impl RunningWorker {
    /// Start `worker` with a shutdown token of its own.
    pub fn start(worker: Worker) -> Self {
        let stop = CancellationToken::new();
        let task = tokio::spawn(worker.with_shutdown(stop.clone()).run());
        Self { stop, task }
    }

    /// Send the shutdown signal and wait (at most 20 s) for the worker's summary.
    pub async fn stop(self) -> RunSummary {
        self.stop.cancel();
        stopped(self.task).await
    }
}
