//! The HTTP delivery handler against real LocalStack and PostgreSQL and a scripted HTTP
//! server on 127.0.0.1: one POST per event with its headers, the status classes, Retry-After,
//! connection errors, and no second POST once a delivery is recorded (or only its record
//! failed).

mod common;

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use sqlx::PgPool;
use sqs_worker::handlers::HttpHandler;
use sqs_worker::message::{self, KeySpec};
use sqs_worker::store::Retention;
use sqs_worker::{PostgresStore, RunSummary, Worker, WorkerConfig};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

/// One request as the server received it.
#[derive(Debug, Clone)]
struct Request {
    at: Instant,
    method: String,
    path: String,
    /// Names lowercased, in order.
    headers: Vec<(String, String)>,
    body: String,
}

impl Request {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// One scripted answer.
#[derive(Debug, Clone)]
struct Reply {
    status: u16,
    headers: Vec<(&'static str, String)>,
    body: &'static str,
}

impl Reply {
    fn status(status: u16) -> Self {
        Self {
            status,
            headers: Vec::new(),
            body: "",
        }
    }

    fn header(mut self, name: &'static str, value: &str) -> Self {
        self.headers.push((name, value.to_owned()));
        self
    }

    fn body(mut self, body: &'static str) -> Self {
        self.body = body;
        self
    }
}

/// A minimal HTTP/1.1 server: one request per connection, answered from a script (the last
/// reply repeats), every request recorded.
struct TestServer {
    url: String,
    requests: Arc<Mutex<Vec<Request>>>,
    task: tokio::task::JoinHandle<()>,
}

impl TestServer {
    async fn start(script: Vec<Reply>) -> Self {
        assert!(!script.is_empty());
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/hooks/events", listener.local_addr().unwrap());
        let requests: Arc<Mutex<Vec<Request>>> = Arc::default();
        let script = Arc::new(Mutex::new(VecDeque::from(script)));
        let task = tokio::spawn({
            let requests = requests.clone();
            async move {
                while let Ok((stream, _)) = listener.accept().await {
                    tokio::spawn(serve_one(stream, requests.clone(), script.clone()));
                }
            }
        });
        Self {
            url,
            requests,
            task,
        }
    }

    fn requests(&self) -> Vec<Request> {
        self.requests.lock().unwrap().clone()
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve_one(
    stream: TcpStream,
    requests: Arc<Mutex<Vec<Request>>>,
    script: Arc<Mutex<VecDeque<Reply>>>,
) {
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    if reader.read_line(&mut line).await.unwrap_or(0) == 0 {
        return;
    }
    let mut request_line = line.split_whitespace();
    let method = request_line.next().unwrap_or_default().to_owned();
    let path = request_line.next().unwrap_or_default().to_owned();
    let mut headers = Vec::new();
    loop {
        line.clear();
        if reader.read_line(&mut line).await.unwrap_or(0) == 0 {
            return;
        }
        let header = line.trim_end_matches(['\r', '\n']);
        if header.is_empty() {
            break;
        }
        let (name, value) = header.split_once(':').expect("a header line has a colon");
        headers.push((name.trim().to_ascii_lowercase(), value.trim().to_owned()));
    }
    let length: usize = headers
        .iter()
        .find(|(n, _)| n == "content-length")
        .map(|(_, v)| v.parse().unwrap())
        .unwrap_or(0);
    let mut body = vec![0; length];
    if reader.read_exact(&mut body).await.is_err() {
        return;
    }
    requests.lock().unwrap().push(Request {
        at: Instant::now(),
        method,
        path,
        headers,
        body: String::from_utf8(body).unwrap(),
    });
    let reply = {
        let mut script = script.lock().unwrap();
        if script.len() > 1 {
            script.pop_front().unwrap()
        } else {
            script[0].clone()
        }
    };
    let mut response = format!(
        "HTTP/1.1 {} Scripted\r\ncontent-length: {}\r\nconnection: close\r\n",
        reply.status,
        reply.body.len()
    );
    for (name, value) in &reply.headers {
        response.push_str(&format!("{name}: {value}\r\n"));
    }
    response.push_str("\r\n");
    response.push_str(reply.body);
    let mut stream = reader.into_inner();
    let _ = stream.write_all(response.as_bytes()).await;
    let _ = stream.shutdown().await;
}

fn http_handler(url: &str) -> HttpHandler {
    HttpHandler::new(url, Duration::from_secs(5), &[]).unwrap()
}

fn config_for(queue_url: &str, scope: &str, key: Option<&str>) -> WorkerConfig {
    let mut config = worker_config(queue_url);
    config.scope = Some(scope.into());
    if let Some(pointer) = key {
        config.key = KeySpec::new(vec![pointer.into()]).unwrap();
    }
    config
}

async fn drain(
    client: &aws_sdk_sqs::Client,
    pool: &PgPool,
    queue_url: &str,
    config: WorkerConfig,
    handler: HttpHandler,
) -> RunSummary {
    let worker = Worker::builder()
        .config(config)
        .sqs_client(client.clone())
        .pool(pool.clone())
        .handler(handler)
        .build()
        .unwrap();
    run_until_drained(client, queue_url, vec![worker], Duration::from_secs(60))
        .await
        .remove(0)
}

fn step_names(steps: &serde_json::Value) -> Vec<&str> {
    steps
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_event_is_posted_once_with_its_headers() {
    let client = sqs_client().await;
    let (pool, _) = fresh_database().await;
    let queue = fresh_queue(&client, true, 5).await;
    let server = TestServer::start(vec![Reply::status(200)]).await;
    let json_body = r#"{"order_id":"o-1","amount":12}"#;
    let text_body = "plain text, not JSON";
    let json_id = send(&client, &queue.url, json_body).await;
    let text_id = send(&client, &queue.url, text_body).await;

    // No --key: each event's key is the SHA-256 of its body.
    let config = config_for(&queue.url, "hooks", None);
    let summary = drain(
        &client,
        &pool,
        &queue.url,
        config,
        http_handler(&server.url),
    )
    .await;
    assert_eq!((summary.processed, summary.retried), (2, 0), "{summary:?}");

    let requests = server.requests();
    assert_eq!(requests.len(), 2, "one POST per event: {requests:#?}");
    let store = PostgresStore::new(pool);
    for (body, message_id, content_type) in [
        (json_body, &json_id, "application/json"),
        (text_body, &text_id, "text/plain; charset=utf-8"),
    ] {
        let request = requests.iter().find(|r| r.body == body).unwrap();
        let key = message::fallback_key(body);
        assert_eq!(
            (request.method.as_str(), request.path.as_str()),
            ("POST", "/hooks/events")
        );
        let expected_key = format!("hooks:{key}");
        let expected_user_agent = format!("sqs-worker/{}", env!("CARGO_PKG_VERSION"));
        for (name, expected) in [
            ("idempotency-key", expected_key.as_str()),
            ("x-sqs-worker-message-id", message_id.as_str()),
            ("x-sqs-worker-attempt", "1"),
            ("x-sqs-worker-final-pass", "false"),
            ("x-sqs-worker-redrive-count", "0"),
            ("content-type", content_type),
            ("user-agent", expected_user_agent.as_str()),
        ] {
            assert_eq!(request.header(name), Some(expected), "{name} of {body:?}");
        }
        let checkpoint = store.find("hooks", &key).await.unwrap().unwrap();
        assert_eq!(checkpoint.status, "complete");
        assert_eq!(step_names(&checkpoint.steps), ["deliver"]);
        assert_eq!(checkpoint.steps[0]["output"]["status"], 200);
    }
    assert_eq!(messages_in(&client, &queue.url).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_503_is_retried_with_the_same_idempotency_key() {
    let client = sqs_client().await;
    let (pool, _) = fresh_database().await;
    let queue = fresh_queue(&client, true, 5).await;
    let server = TestServer::start(vec![
        Reply::status(503).body("overloaded"),
        Reply::status(200),
    ])
    .await;
    send(&client, &queue.url, r#"{"id":"r1"}"#).await;

    let config = config_for(&queue.url, "retry", Some("/id"));
    let summary = drain(
        &client,
        &pool,
        &queue.url,
        config,
        http_handler(&server.url),
    )
    .await;
    assert_eq!((summary.retried, summary.processed), (1, 1), "{summary:?}");

    let requests = server.requests();
    assert_eq!(requests.len(), 2, "{requests:#?}");
    for request in &requests {
        assert_eq!(request.header("idempotency-key"), Some("retry:r1"));
    }
    let attempts: Vec<_> = requests
        .iter()
        .map(|r| r.header("x-sqs-worker-attempt").unwrap())
        .collect();
    assert_eq!(attempts, ["1", "2"]);
    let checkpoint = PostgresStore::new(pool)
        .find("retry", "r1")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(checkpoint.status, "complete");
    assert_eq!(checkpoint.attempts, 2);
    let error = checkpoint.last_error.unwrap();
    assert!(
        error.contains("503") && error.contains("overloaded"),
        "{error}"
    );
    assert_eq!(step_names(&checkpoint.steps), ["deliver"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_400_goes_to_the_dlq_after_one_post() {
    let client = sqs_client().await;
    let (pool, _) = fresh_database().await;
    let queue = fresh_queue(&client, true, 5).await;
    let server = TestServer::start(vec![Reply::status(400).body("amount must be positive")]).await;
    let body = r#"{"id":"bad-1","amount":-5}"#;
    send(&client, &queue.url, body).await;

    let config = config_for(&queue.url, "perm", Some("/id"));
    let summary = drain(
        &client,
        &pool,
        &queue.url,
        config,
        http_handler(&server.url),
    )
    .await;
    assert_eq!(
        (summary.sent_to_dlq, summary.retried, summary.processed),
        (1, 0, 0),
        "{summary:?}"
    );
    assert_eq!(server.requests().len(), 1, "a 4xx is not retried");

    let dead = peek_all(
        &client,
        queue.dlq_url.as_ref().unwrap(),
        1,
        Duration::from_secs(10),
    )
    .await;
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].body(), Some(body));
    assert_eq!(
        string_attribute(&dead[0], message::ATTR_FAILURE_REASON).as_deref(),
        Some("http_4xx")
    );
    let detail = string_attribute(&dead[0], message::ATTR_FAILURE_DETAIL).unwrap();
    assert!(
        detail.contains("400") && detail.contains("amount must be positive"),
        "{detail}"
    );
    let checkpoint = PostgresStore::new(pool)
        .find("perm", "bad-1")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(checkpoint.status, "failed");
    assert!(step_names(&checkpoint.steps).is_empty());
}

/// Retry-After: 3 with a worker backoff of 0.1–0.2 s. SQS visibility is whole seconds, so
/// without Retry-After the retry would come after about 1 s (a Retry-After of 1 could not be
/// told apart from that); with it, no sooner than 3 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_429_retry_after_is_honoured() {
    let client = sqs_client().await;
    let (pool, _) = fresh_database().await;
    let queue = fresh_queue(&client, true, 5).await;
    let server = TestServer::start(vec![
        Reply::status(429).header("Retry-After", "3"),
        Reply::status(200),
    ])
    .await;
    send(&client, &queue.url, r#"{"id":"slow-down"}"#).await;

    let mut config = config_for(&queue.url, "limited", Some("/id"));
    config.backoff_base = Duration::from_millis(100);
    config.backoff_max = Duration::from_millis(200);
    let summary = drain(
        &client,
        &pool,
        &queue.url,
        config,
        http_handler(&server.url),
    )
    .await;
    assert_eq!((summary.retried, summary.processed), (1, 1), "{summary:?}");

    let requests = server.requests();
    assert_eq!(requests.len(), 2, "{requests:#?}");
    let gap = requests[1].at - requests[0].at;
    assert!(
        gap >= Duration::from_millis(2500),
        "the retry came after {gap:?}, before the 3 s Retry-After"
    );
}

/// Run a worker until the event's checkpoint shows `retries` failed attempts, then stop it.
async fn run_until_retried(
    client: &aws_sdk_sqs::Client,
    pool: &PgPool,
    config: WorkerConfig,
    handler: HttpHandler,
    key: &str,
    retries: i32,
) -> RunSummary {
    let scope = config.scope.clone().unwrap();
    let stop = CancellationToken::new();
    let worker = Worker::builder()
        .config(config)
        .sqs_client(client.clone())
        .pool(pool.clone())
        .handler(handler)
        .shutdown(stop.clone())
        .build()
        .unwrap();
    let running = tokio::spawn(worker.run());
    let store = PostgresStore::new(pool.clone());
    wait_until(
        "the delivery to be retried",
        Duration::from_secs(40),
        || {
            let (store, scope) = (store.clone(), scope.clone());
            async move {
                store.find(&scope, key).await.unwrap().is_some_and(|c| {
                    c.attempts >= retries && c.last_error.is_some() && c.lease_owner.is_none()
                })
            }
        },
    )
    .await;
    stop.cancel();
    tokio::time::timeout(Duration::from_secs(20), running)
        .await
        .expect("the worker stops within 20 s")
        .unwrap()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_refused_is_retryable() {
    let client = sqs_client().await;
    let (pool, _) = fresh_database().await;
    let queue = fresh_queue(&client, true, 5).await;
    // A port that was free a moment ago and has no listener now.
    let closed = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", closed.local_addr().unwrap());
    drop(closed);
    send(&client, &queue.url, r#"{"id":"unreachable"}"#).await;

    let config = config_for(&queue.url, "down", Some("/id"));
    let summary =
        run_until_retried(&client, &pool, config, http_handler(&url), "unreachable", 2).await;
    assert!(summary.retried >= 2, "{summary:?}");
    assert_eq!((summary.sent_to_dlq, summary.processed), (0, 0));

    let checkpoint = PostgresStore::new(pool)
        .find("down", "unreachable")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(checkpoint.status, "in_progress");
    assert!(step_names(&checkpoint.steps).is_empty());
    let error = checkpoint.last_error.unwrap();
    assert!(error.contains("POST http://127.0.0.1:"), "{error}");
    assert_eq!(messages_in(&client, &queue.url).await, 1, "still queued");
    assert_eq!(
        messages_in(&client, queue.dlq_url.as_ref().unwrap()).await,
        0,
        "not dead-lettered"
    );
}

/// LocalStack's port also speaks TLS, with a certificate nobody trusts for 127.0.0.1: the
/// handshake fails as a retryable error (the TLS stack has a crypto provider, no panic).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_untrusted_https_certificate_is_retryable() {
    let client = sqs_client().await;
    let (pool, _) = fresh_database().await;
    let queue = fresh_queue(&client, true, 5).await;
    let url = format!(
        "{}/not-a-hook",
        endpoint().replacen("http://", "https://", 1)
    );
    send(&client, &queue.url, r#"{"id":"tls"}"#).await;

    let config = config_for(&queue.url, "tls", Some("/id"));
    let summary = run_until_retried(&client, &pool, config, http_handler(&url), "tls", 1).await;
    assert_eq!((summary.sent_to_dlq, summary.processed), (0, 0));

    let checkpoint = PostgresStore::new(pool)
        .find("tls", "tls")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(checkpoint.status, "in_progress");
    let error = checkpoint.last_error.unwrap();
    assert!(
        error.to_lowercase().contains("certificate") && !error.contains("panic"),
        "{error}"
    );
}

/// A redelivery after the delivery was recorded (the worker died before completing, say):
/// the recorded `deliver` step is replayed, not POSTed again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recorded_delivery_is_not_posted_again() {
    let client = sqs_client().await;
    let (pool, _) = fresh_database().await;
    let queue = fresh_queue(&client, true, 5).await;
    let server = TestServer::start(vec![Reply::status(200)]).await;
    let body = r#"{"id":"d1"}"#;
    send(&client, &queue.url, body).await;
    let config = config_for(&queue.url, "once", Some("/id"));
    let summary = drain(
        &client,
        &pool,
        &queue.url,
        config.clone(),
        http_handler(&server.url),
    )
    .await;
    assert_eq!(summary.processed, 1);
    assert_eq!(server.requests().len(), 1);

    // As if the worker died after recording the delivery and before completing: in
    // progress, its step kept, its lease expired.
    let reopened = sqlx::query(
        "update checkpoints set status = 'in_progress', completed_at = null, \
         lease_owner = 'crashed#1', lease_expires_at = now() - interval '1 second' \
         where scope = 'once' and idempotency_key = 'd1'",
    )
    .execute(&pool)
    .await
    .unwrap();
    assert_eq!(reopened.rows_affected(), 1);
    send(&client, &queue.url, body).await;
    let summary = drain(
        &client,
        &pool,
        &queue.url,
        config,
        http_handler(&server.url),
    )
    .await;
    assert_eq!(summary.processed, 1, "{summary:?}");
    assert_eq!(server.requests().len(), 1, "no second POST");

    let checkpoint = PostgresStore::new(pool)
        .find("once", "d1")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(checkpoint.status, "complete");
    assert_eq!(checkpoint.attempts, 2);
    assert_eq!(step_names(&checkpoint.steps), ["deliver"]);
}

/// Make recording steps fail in this test's database: every time, or only the first
/// `failures` times.
async fn break_step_records(pool: &PgPool, failures: Option<u32>) {
    let condition = match failures {
        Some(n) => format!("nextval('step_record_failures') <= {n}"),
        None => "true".into(),
    };
    for statement in [
        "create sequence step_record_failures".to_owned(),
        format!(
            "create function fail_step_record() returns trigger language plpgsql as $$ \
             begin if {condition} then raise exception 'injected: cannot record steps'; end if; \
             return new; end $$"
        ),
        "create trigger fail_step_record before update of steps on checkpoints \
         for each row execute function fail_step_record()"
            .to_owned(),
    ] {
        sqlx::query(&statement).execute(pool).await.unwrap();
    }
}

/// The database refuses the delivery's record for good: the POST happened, so the event
/// is completed without the record instead of being retried into a second POST.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unrecordable_delivery_is_not_posted_again() {
    let client = sqs_client().await;
    let (pool, _) = fresh_database().await;
    let queue = fresh_queue(&client, true, 5).await;
    let server = TestServer::start(vec![Reply::status(200)]).await;
    break_step_records(&pool, None).await;
    send(&client, &queue.url, r#"{"id":"u1"}"#).await;

    let config = config_for(&queue.url, "unrecorded", Some("/id"));
    let summary = drain(
        &client,
        &pool,
        &queue.url,
        config,
        http_handler(&server.url),
    )
    .await;
    assert_eq!((summary.processed, summary.retried), (1, 0), "{summary:?}");
    assert_eq!(server.requests().len(), 1, "no second POST");
    let checkpoint = PostgresStore::new(pool)
        .find("unrecorded", "u1")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(checkpoint.status, "complete");
    assert!(step_names(&checkpoint.steps).is_empty(), "nothing recorded");
}

/// A brief database failure while recording: the record is retried and lands.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_briefly_failing_record_is_retried() {
    let client = sqs_client().await;
    let (pool, _) = fresh_database().await;
    let queue = fresh_queue(&client, true, 5).await;
    let server = TestServer::start(vec![Reply::status(200)]).await;
    break_step_records(&pool, Some(2)).await;
    send(&client, &queue.url, r#"{"id":"b1"}"#).await;

    let config = config_for(&queue.url, "blip", Some("/id"));
    let summary = drain(
        &client,
        &pool,
        &queue.url,
        config,
        http_handler(&server.url),
    )
    .await;
    assert_eq!((summary.processed, summary.retried), (1, 0), "{summary:?}");
    assert_eq!(server.requests().len(), 1);
    let checkpoint = PostgresStore::new(pool)
        .find("blip", "b1")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(checkpoint.status, "complete");
    assert_eq!(step_names(&checkpoint.steps), ["deliver"]);
}

/// Through the binary: --http-url, extra headers from the environment (never logged), and
/// a key that is not header-safe.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_delivers_with_http_url_and_extra_headers() {
    let client = sqs_client().await;
    let (pool, database_url) = fresh_database().await;
    let queue = fresh_queue(&client, true, 5).await;
    let server = TestServer::start(vec![Reply::status(204)]).await;
    let body = r#"{"id":"naïve\u0007 key:1","n":1}"#;
    send(&client, &queue.url, body).await;

    let output = tokio::time::timeout(
        Duration::from_secs(60),
        sqs_worker_command(&database_url)
            .args(["run", "--queue-url", &queue.url, "--key", "/id"])
            .args(["--scope", "bin", "--wait-time-seconds", "1"])
            .args(["--exit-when-idle", "2", "--http-timeout", "5"])
            .args(["--http-url", &server.url])
            .env(
                "SQS_WORKER_HTTP_HEADERS",
                "Authorization: Bearer s3cret-token,X-Tenant: t1",
            )
            .env("RUST_LOG", "sqs_worker=debug,info")
            .output(),
    )
    .await
    .expect("the worker exits once idle")
    .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    assert!(
        !stderr.contains("s3cret-token"),
        "a header value was logged: {stderr}"
    );

    let requests = server.requests();
    assert_eq!(requests.len(), 1, "{requests:#?}");
    let request = &requests[0];
    assert_eq!(request.body, body);
    assert_eq!(request.header("authorization"), Some("Bearer s3cret-token"));
    assert_eq!(request.header("x-tenant"), Some("t1"));
    // The key holds a non-ASCII letter, an escaped BEL (%07) and a space: percent-encoded.
    assert_eq!(
        request.header("idempotency-key"),
        Some("bin:na%C3%AFve%2507%20key:1")
    );
    let checkpoint = PostgresStore::new(pool)
        .find("bin", "naïve%07 key:1")
        .await
        .unwrap()
        .expect("the checkpoint under the escaped key");
    assert_eq!(checkpoint.status, "complete");
    assert_eq!(step_names(&checkpoint.steps), ["deliver"]);
}
