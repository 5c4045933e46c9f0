//! Shared test fixtures, on the real LocalStack and PostgreSQL that `localstack/up` starts.
//!
//! - `browser.rs`: headless Chromium through chromedriver, for the console's browser tests.
//! - `console.rs`: the operator console served in the test process, and a client for it.
//! - `env.rs`: [`TestEnv`] — per test an SQS client, a fresh store (database) and a fresh
//!   queue pair, all removed at the end, and the helpers that act on them; the one place
//!   that names the store's type ([`Store`]) and builds workers on it; [`RunningWorker`],
//!   [`run_until_drained`], and the store tests' usual claims.
//! - `queues.rs`: queue pairs, sends, counts and peeks on any queue.
//! - `handlers.rs`: a handler that records its calls.
//! - `http_server.rs`: a scripted HTTP server, and a bare GET for /healthz and /metrics.
//! - `lambda.rs`: local Lambda invocations (`sqs-worker lambda --event`).
//! - `otlp.rs`: an OTLP/HTTP trace receiver that keeps the spans it is sent.
//! - `proxy.rs`: a TCP proxy that refuses and cuts connections (outages), and the addresses
//!   of PostgreSQL and LocalStack it forwards to.
//! - here: the environment's endpoints, names, waits, config shorthands, and [`store_tests!`].
//!
//! Every wait is bounded.
// Each test binary includes this module and uses only part of it.
#![allow(dead_code, unused_imports, unused_macros)]

mod browser;
mod console;
mod env;
mod handlers;
mod http_server;
mod lambda;
mod otlp;
mod proxy;
mod queues;

pub use browser::*;
pub use console::*;
pub use env::*;
pub use handlers::*;
pub use http_server::*;
pub use lambda::*;
pub use otlp::*;
pub use proxy::*;
pub use queues::*;

use std::future::Future;
use std::time::{Duration, Instant};

use aws_sdk_sqs::Client;
use sqs_worker::WorkerConfig;
use sqs_worker::message::KeySpec;

/// LocalStack's URL (AWS_ENDPOINT_URL, or its default port): where every test's SQS is.
pub fn endpoint() -> String {
    std::env::var("AWS_ENDPOINT_URL").unwrap_or_else(|_| "http://127.0.0.1:4566".into())
}

/// The local DynamoDB endpoint `localstack/up` starts (`AWS_ENDPOINT_URL_DYNAMODB`).
pub fn dynamodb_endpoint() -> String {
    std::env::var("AWS_ENDPOINT_URL_DYNAMODB").unwrap_or_else(|_| "http://127.0.0.1:8000".into())
}

/// A DynamoDB client for the local endpoint (test credentials, us-east-1).
pub async fn dynamodb_client(endpoint: &str) -> aws_sdk_dynamodb::Client {
    let config = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .endpoint_url(endpoint)
        .region(aws_config::Region::new("us-east-1"))
        .credentials_provider(aws_sdk_dynamodb::config::Credentials::new(
            "test", "test", None, None, "local",
        ))
        .load()
        .await;
    aws_sdk_dynamodb::Client::new(&config)
}

/// The server-level database URL; each test creates its own database next to it.
pub fn admin_database_url() -> String {
    std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

/// An SQS client for LocalStack; also installs the test log writer once per binary, so a
/// failing test shows the worker's logs (RUST_LOG adjusts the level).
pub async fn sqs_client() -> Client {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,aws=warn".into()),
        )
        .with_test_writer()
        .try_init();
    sqs_worker::sqs::local_client(&endpoint()).await
}

/// `prefix_` and ten random letters: names of databases, queues and files no other test
/// (or earlier run) uses.
pub fn unique(prefix: &str) -> String {
    let suffix: String = std::iter::repeat_with(fastrand::lowercase)
        .take(10)
        .collect();
    format!("{prefix}_{suffix}")
}

/// A fresh directory for one test's files (handler logs, PID files, event files).
pub fn tempdir(prefix: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(unique(prefix));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The name of a queue (its URL's last segment): the worker's default scope.
pub fn queue_name(url: &str) -> &str {
    sqs_worker::sqs::queue_name_from_url(url)
}

/// The names of a checkpoint's recorded steps, in order: what most step assertions compare.
pub fn step_names(steps: &serde_json::Value) -> Vec<String> {
    steps
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap().to_owned())
        .collect()
}

/// Poll `condition` every 100 ms until it holds; panic with `what` after `within`, so no
/// test waits forever.
pub async fn wait_until<F, Fut>(what: &str, within: Duration, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + within;
    while !condition().await {
        assert!(
            Instant::now() < deadline,
            "timed out after {within:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Test defaults for a worker on `queue_url`: short polls and backoffs so tests are quick.
/// [`TestEnv::config`] is this for the test's own queue.
pub fn worker_config(queue_url: &str) -> WorkerConfig {
    let mut config = WorkerConfig::new(queue_url);
    config.wait_time = Duration::from_secs(1);
    config.backoff_base = Duration::from_secs(1);
    config.backoff_max = Duration::from_secs(4);
    config.shutdown_timeout = Duration::from_secs(10);
    config
}

/// One-line settings for the [`WorkerConfig`] fields most tests set, so a test's config
/// reads as one expression: `env.config().key("/id").scope("orders")`.
pub trait ConfigExt: Sized {
    /// Key events by one JSON pointer.
    fn key(self, pointer: &str) -> Self;
    /// Key events by several JSON pointers together.
    fn keys(self, pointers: &[&str]) -> Self;
    /// Checkpoint in this scope (instead of the queue's name).
    fn scope(self, scope: &str) -> Self;
    /// Lease and visibility timeout of `seconds` (instead of the queue's).
    fn visibility(self, seconds: u64) -> Self;
    /// This worker id (lease owners start with it).
    fn worker_id(self, id: &str) -> Self;
}

impl ConfigExt for WorkerConfig {
    fn key(self, pointer: &str) -> Self {
        self.keys(&[pointer])
    }

    fn keys(mut self, pointers: &[&str]) -> Self {
        self.key = KeySpec::new(pointers.iter().map(|p| p.to_string()).collect()).unwrap();
        self
    }

    fn scope(mut self, scope: &str) -> Self {
        self.scope = Some(scope.into());
        self
    }

    fn visibility(mut self, seconds: u64) -> Self {
        self.visibility_timeout = Some(Duration::from_secs(seconds));
        self
    }

    fn worker_id(mut self, id: &str) -> Self {
        self.worker_id = Some(id.into());
        self
    }
}

/// Runs each listed test once per store: for every store a module (`postgres::…`) with one
/// `#[tokio::test]` per name, calling the test's `async fn name(kind: StoreKind)` with that
/// store. The test builds its environment from it (`TestEnv::on(kind)`, or the builder):
///
/// ```ignore
/// async fn claims_have_one_winner(kind: StoreKind) {
///     let env = TestEnv::builder().store(kind).no_queue().start().await;
///     // …
/// }
///
/// store_tests!(claims_have_one_winner, #[cfg(feature = "failpoints")] another_test);
/// ```
///
/// **Adding a store** (SQLite, DynamoDB, …): once [`StoreKind`] has its variant and
/// [`TestEnv`] can build it, add ONE line to the list in the last rule below, e.g.
/// `sqlite => StoreKind::Sqlite,` — every store test then also runs as `sqlite::…`.
///
/// A test function not listed is never run, and the compiler says so (dead code).
macro_rules! store_tests {
    (@stores $tests:tt $($module:ident => $kind:expr,)+) => {
        $($crate::common::store_tests!(@module $module $kind, $tests);)+
    };
    (@module $module:ident $kind:expr, [$($(#[$attr:meta])* $test:ident),+ $(,)?]) => {
        /// The store tests against this store.
        mod $module {
            $(
                $(#[$attr])*
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $test() {
                    super::$test($kind).await
                }
            )+
        }
    };
    ($($tests:tt)+) => {
        $crate::common::store_tests!(@stores [$($tests)+]
            postgres => $crate::common::StoreKind::Postgres,
            sqlite => $crate::common::StoreKind::Sqlite,
            dynamodb => $crate::common::StoreKind::Dynamodb,
        );
    };
}
pub(crate) use store_tests;

/// [`store_tests!`] for what only the SQL stores have: their own transactions
/// (`Job::step_tx`, `Job::step_tx_sqlite`) and tables a test writes itself.
/// They run as `sql::postgres::…` and `sql::sqlite::…`.
macro_rules! sql_store_tests {
    ($($tests:tt)+) => {
        /// The tests of what only the SQL stores have.
        mod sql {
            use super::*;

            $crate::common::store_tests!(@stores [$($tests)+]
                postgres => $crate::common::StoreKind::Postgres,
                sqlite => $crate::common::StoreKind::Sqlite,
            );
        }
    };
}
pub(crate) use sql_store_tests;
