//! Shared test fixtures: a fresh PostgreSQL database and fresh SQS queues per test, on the
//! real LocalStack and PostgreSQL that `localstack/up` starts. Every wait is bounded.
#![allow(dead_code)]

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use aws_sdk_sqs::Client;
use aws_sdk_sqs::types::{MessageAttributeValue, QueueAttributeName};
use sqlx::PgPool;
use sqs_worker::{Handler, HandlerError, Job, RunSummary, Worker, WorkerConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

pub fn endpoint() -> String {
    std::env::var("AWS_ENDPOINT_URL").unwrap_or_else(|_| "http://127.0.0.1:4566".into())
}

/// The server-level database URL; each test creates its own database next to it.
pub fn admin_database_url() -> String {
    std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

pub async fn sqs_client() -> Client {
    // Worker logs in test output (shown for failing tests); RUST_LOG adjusts the level.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,aws=warn".into()),
        )
        .with_test_writer()
        .try_init();
    sqs_worker::sqs::local_client(&endpoint()).await
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

/// A queue's ARN (for Lambda event records and redrive policies).
pub async fn queue_arn(client: &Client, queue_url: &str) -> String {
    client
        .get_queue_attributes()
        .queue_url(queue_url)
        .attribute_names(QueueAttributeName::QueueArn)
        .send()
        .await
        .unwrap()
        .attributes()
        .unwrap()[&QueueAttributeName::QueueArn]
        .clone()
}

pub fn unique(prefix: &str) -> String {
    let suffix: String = std::iter::repeat_with(fastrand::lowercase)
        .take(10)
        .collect();
    format!("{prefix}_{suffix}")
}

/// A fresh, migrated database. Returns its pool and URL (for worker processes).
pub async fn fresh_database() -> (PgPool, String) {
    let admin_url = admin_database_url();
    let admin = sqlx::PgPool::connect(&admin_url)
        .await
        .expect("PostgreSQL must be running (see README: localstack/up checks it)");
    let name = unique("sqsw_test");
    // Identifiers cannot be bound parameters; the name is generated from [a-z_] above.
    sqlx::query(&format!("create database {name}"))
        .execute(&admin)
        .await
        .expect("create test database");
    admin.close().await;
    let (base, _) = admin_url
        .split('?')
        .next()
        .unwrap()
        .rsplit_once('/')
        .expect("DATABASE_URL has a database path");
    let url = format!("{base}/{name}");
    let pool = sqs_worker::connect_database(&url, 10).await.unwrap();
    sqs_worker::MIGRATOR.run(&pool).await.unwrap();
    (pool, url)
}

pub struct TestQueue {
    pub url: String,
    pub dlq_url: Option<String>,
}

/// A fresh queue, optionally with a DLQ after `max_receive` receives.
pub async fn fresh_queue(client: &Client, with_dlq: bool, max_receive: u32) -> TestQueue {
    let name = unique("q").replace('_', "-");
    let mut dlq_url = None;
    let mut create = client
        .create_queue()
        .queue_name(&name)
        .attributes(QueueAttributeName::VisibilityTimeout, "30");
    if with_dlq {
        let dlq = client
            .create_queue()
            .queue_name(format!("{name}-dlq"))
            .send()
            .await
            .expect("LocalStack must be running: localstack/up");
        let url = dlq.queue_url().unwrap().to_owned();
        let arn = client
            .get_queue_attributes()
            .queue_url(&url)
            .attribute_names(QueueAttributeName::QueueArn)
            .send()
            .await
            .unwrap()
            .attributes()
            .unwrap()[&QueueAttributeName::QueueArn]
            .clone();
        create = create.attributes(
            QueueAttributeName::RedrivePolicy,
            serde_json::json!({"deadLetterTargetArn": arn, "maxReceiveCount": max_receive.to_string()})
                .to_string(),
        );
        dlq_url = Some(url);
    }
    let output = create
        .send()
        .await
        .expect("LocalStack must be running: localstack/up");
    TestQueue {
        url: output.queue_url().unwrap().to_owned(),
        dlq_url,
    }
}

pub async fn send(client: &Client, queue_url: &str, body: &str) -> String {
    client
        .send_message()
        .queue_url(queue_url)
        .message_body(body)
        .send()
        .await
        .unwrap()
        .message_id()
        .unwrap()
        .to_owned()
}

/// The sum of some of a queue's approximate message counts.
async fn count_messages(client: &Client, queue_url: &str, counts: &[QueueAttributeName]) -> u64 {
    let output = client
        .get_queue_attributes()
        .queue_url(queue_url)
        .set_attribute_names(Some(counts.to_vec()))
        .send()
        .await
        .unwrap();
    output
        .attributes()
        .unwrap()
        .values()
        .map(|v| v.parse::<u64>().unwrap())
        .sum()
}

/// Visible + in flight + delayed messages.
pub async fn messages_in(client: &Client, queue_url: &str) -> u64 {
    count_messages(
        client,
        queue_url,
        &[
            QueueAttributeName::ApproximateNumberOfMessages,
            QueueAttributeName::ApproximateNumberOfMessagesNotVisible,
            QueueAttributeName::ApproximateNumberOfMessagesDelayed,
        ],
    )
    .await
}

/// Messages received by someone and not yet deleted or visible again.
pub async fn messages_not_visible(client: &Client, queue_url: &str) -> u64 {
    count_messages(
        client,
        queue_url,
        &[QueueAttributeName::ApproximateNumberOfMessagesNotVisible],
    )
    .await
}

/// The `sqs-worker` binary, pointed at LocalStack and the given database.
pub fn sqs_worker_command(database_url: &str) -> tokio::process::Command {
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_sqs-worker"));
    command
        .env("DATABASE_URL", database_url)
        .env("AWS_ENDPOINT_URL", endpoint())
        .env("AWS_ACCESS_KEY_ID", "test")
        .env("AWS_SECRET_ACCESS_KEY", "test")
        .env("AWS_REGION", "us-east-1")
        .kill_on_drop(true);
    command
}

/// Receive everything currently visible (for asserting a DLQ's contents), then make it
/// visible again.
pub async fn peek_all(
    client: &Client,
    queue_url: &str,
    expected: usize,
    within: Duration,
) -> Vec<aws_sdk_sqs::types::Message> {
    let deadline = Instant::now() + within;
    let mut found = Vec::new();
    while found.len() < expected && Instant::now() < deadline {
        let output = client
            .receive_message()
            .queue_url(queue_url)
            .max_number_of_messages(10)
            .wait_time_seconds(1)
            .visibility_timeout(30)
            .message_attribute_names("All")
            .send()
            .await
            .unwrap();
        found.extend(output.messages().iter().cloned());
    }
    for message in &found {
        client
            .change_message_visibility()
            .queue_url(queue_url)
            .receipt_handle(message.receipt_handle().unwrap())
            .visibility_timeout(0)
            .send()
            .await
            .unwrap();
    }
    found
}

pub fn string_attribute(message: &aws_sdk_sqs::types::Message, name: &str) -> Option<String> {
    message
        .message_attributes()
        .and_then(|a| a.get(name))
        .and_then(MessageAttributeValue::string_value)
        .map(str::to_owned)
}

/// Poll `condition` until it holds; panic with `what` after `within`.
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

/// Test defaults: short polls and backoffs so tests are quick.
pub fn worker_config(queue_url: &str) -> WorkerConfig {
    let mut config = WorkerConfig::new(queue_url);
    config.wait_time = Duration::from_secs(1);
    config.backoff_base = Duration::from_secs(1);
    config.backoff_max = Duration::from_secs(4);
    config.shutdown_timeout = Duration::from_secs(10);
    config
}

/// Run workers until the queue has been empty for a moment, then stop them; panics if that
/// takes longer than `within`.
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
            messages_in(client, queue_url).await
        );
        tokio::time::sleep(Duration::from_millis(150)).await;
        empty_checks = if messages_in(client, queue_url).await == 0 {
            empty_checks + 1
        } else {
            0
        };
    }
    stop.cancel();
    let mut summaries = Vec::new();
    for handle in handles {
        let summary = tokio::time::timeout(Duration::from_secs(20), handle)
            .await
            .expect("worker stops within 20 s of the shutdown signal")
            .unwrap()
            .expect("worker run succeeds");
        summaries.push(summary);
    }
    summaries
}

/// One handler call, as recorded.
#[derive(Debug, Clone)]
pub struct Call {
    pub key: String,
    pub attempt: u32,
    pub at: Instant,
}

type Behaviour = dyn Fn(&Job) -> Result<(), HandlerError> + Send + Sync;

/// A handler that records every call, sleeps `delay`, then answers with `behaviour`.
pub struct RecordingHandler {
    pub calls: Arc<Mutex<Vec<Call>>>,
    delay: Duration,
    behaviour: Box<Behaviour>,
}

impl RecordingHandler {
    pub fn new(
        delay: Duration,
        behaviour: impl Fn(&Job) -> Result<(), HandlerError> + Send + Sync + 'static,
    ) -> (Arc<Self>, Arc<Mutex<Vec<Call>>>) {
        let calls = Arc::new(Mutex::new(Vec::new()));
        let handler = Arc::new(Self {
            calls: calls.clone(),
            delay,
            behaviour: Box::new(behaviour),
        });
        (handler, calls)
    }

    pub fn succeeding() -> (Arc<Self>, Arc<Mutex<Vec<Call>>>) {
        Self::new(Duration::ZERO, |_| Ok(()))
    }
}

#[async_trait]
impl Handler for RecordingHandler {
    async fn handle(&self, job: &mut Job) -> Result<(), HandlerError> {
        self.calls.lock().unwrap().push(Call {
            key: job.key().to_owned(),
            attempt: job.attempt(),
            at: Instant::now(),
        });
        if !self.delay.is_zero() {
            tokio::time::sleep(self.delay).await;
        }
        (self.behaviour)(job)
    }
}

pub fn calls_per_key(calls: &Mutex<Vec<Call>>) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    for call in calls.lock().unwrap().iter() {
        *counts.entry(call.key.clone()).or_default() += 1;
    }
    counts
}

// ---- a proxy that can refuse and cut connections ------------------------------------------

/// A TCP forwarder to `upstream`. While down it accepts and at once closes every connection
/// (the client sees its connection reset or closed), and going down cuts every live one.
pub struct Proxy {
    pub addr: SocketAddr,
    up: Arc<AtomicBool>,
    live: Arc<Mutex<CancellationToken>>,
}

impl Proxy {
    pub async fn start(upstream: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let up = Arc::new(AtomicBool::new(true));
        let live = Arc::new(Mutex::new(CancellationToken::new()));
        let (up_flag, live_tokens) = (up.clone(), live.clone());
        tokio::spawn(async move {
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else {
                    continue;
                };
                if !up_flag.load(Ordering::SeqCst) {
                    drop(inbound);
                    continue;
                }
                let cut = live_tokens.lock().unwrap().clone();
                tokio::spawn(async move {
                    let Ok(mut outbound) = TcpStream::connect(upstream).await else {
                        return;
                    };
                    tokio::select! {
                        _ = cut.cancelled() => {}
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                    }
                });
            }
        });
        Self { addr, up, live }
    }

    pub fn down(&self) {
        self.up.store(false, Ordering::SeqCst);
        let mut live = self.live.lock().unwrap();
        live.cancel();
        *live = CancellationToken::new();
    }

    pub fn up(&self) {
        self.up.store(true, Ordering::SeqCst);
    }
}

/// A plain HTTP/1.0 GET on localhost: (status, body). For /healthz, /readyz and /metrics.
pub async fn http_get(port: u16, path: &str) -> (u16, String) {
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    stream
        .write_all(format!("GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

// ---- Lambda: local invocations of `sqs-worker lambda --event` ---------------------------

/// One SQS record of a Lambda event, from the queue with ARN `arn`.
pub fn lambda_record(
    arn: &str,
    message_id: &str,
    body: &str,
    attributes: serde_json::Value,
) -> serde_json::Value {
    serde_json::json!({
        "messageId": message_id,
        "receiptHandle": format!("receipt-{message_id}"),
        "body": body,
        "attributes": {"ApproximateReceiveCount": "1"},
        "messageAttributes": attributes,
        "eventSourceARN": arn,
        "eventSource": "aws:sqs",
        "awsRegion": "us-east-1"
    })
}

/// A String message attribute as a Lambda record carries it.
pub fn string_attr(value: &str) -> serde_json::Value {
    serde_json::json!({"stringValue": value, "dataType": "String",
                       "stringListValues": [], "binaryListValues": []})
}

/// Run one local invocation (`lambda --event`, key `/id`, scope `lam`) with `handler` as
/// an `sh -c` script (env `LOG` = `log`); returns the batch response.
pub async fn invoke_lambda(
    database_url: &str,
    log: &std::path::Path,
    event: &serde_json::Value,
    timeout_secs: &str,
    handler: &str,
) -> serde_json::Value {
    let path = std::env::temp_dir().join(format!("{}.json", unique("event")));
    std::fs::write(&path, serde_json::to_vec(event).unwrap()).unwrap();
    let output = tokio::time::timeout(
        Duration::from_secs(40),
        sqs_worker_command(database_url)
            .args(["lambda", "--key", "/id", "--scope", "lam"])
            .env("LOG", log)
            .stdout(std::process::Stdio::piped())
            .arg("--event")
            .arg(&path)
            .args(["--event-timeout", timeout_secs, "--", "sh", "-c", handler])
            .output(),
    )
    .await
    .expect("a local invocation ends within its timeout")
    .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).unwrap_or_else(|e| {
        panic!(
            "stdout is only the batch response ({e}): {:?}",
            String::from_utf8_lossy(&output.stdout)
        )
    })
}

/// The checkpoint store on `pool`, as workers take it.
pub fn pg(pool: &PgPool) -> Arc<dyn sqs_worker::CheckpointStore> {
    sqs_worker::PostgresStore::shared(pool.clone())
}
