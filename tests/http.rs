//! The HTTP delivery handler against real LocalStack and PostgreSQL and a scripted HTTP
//! server on 127.0.0.1: one POST per event with its headers, the status classes, Retry-After,
//! connection errors, and no second POST once a delivery is recorded (or only its record
//! failed).

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use sqs_worker::handlers::HttpHandler;
use sqs_worker::message;
use sqs_worker::{RunSummary, WorkerConfig};
use tokio::net::TcpListener;

store_tests!(
    each_event_is_posted_once_with_its_headers,
    a_503_is_retried_with_the_same_idempotency_key,
    a_400_goes_to_the_dlq_after_one_post,
    a_429_retry_after_is_honoured,
    connection_refused_is_retryable,
    an_untrusted_https_certificate_is_retryable,
);

/// The HTTP handler posting to `url`, with a 5 s timeout and no extra headers.
fn http_handler(url: &str) -> Arc<HttpHandler> {
    Arc::new(HttpHandler::new(url, Duration::from_secs(5), &[]).unwrap())
}

async fn each_event_is_posted_once_with_its_headers(kind: StoreKind) {
    let env = TestEnv::on(kind).await;
    let server = TestServer::start(vec![Reply::status(200)]).await;
    let json_body = r#"{"order_id":"o-1","amount":12}"#;
    let text_body = "plain text, not JSON";
    let json_id = env.send(json_body).await;
    let text_id = env.send(text_body).await;

    // No --key: each event's key is the SHA-256 of its body.
    let config = env.config().scope("hooks");
    let summary = env
        .drain(config, http_handler(&server.url), Duration::from_secs(60))
        .await;
    assert_eq!((summary.processed, summary.retried), (2, 0), "{summary:?}");

    let requests = server.requests();
    assert_eq!(requests.len(), 2, "one POST per event: {requests:#?}");
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
        let checkpoint = env.checkpoint("hooks", &key).await;
        assert_eq!(checkpoint.status, "complete");
        assert_eq!(step_names(&checkpoint.steps), ["deliver"]);
        assert_eq!(checkpoint.steps[0]["output"]["status"], 200);
    }
    assert_eq!(env.messages_in().await, 0);
}

async fn a_503_is_retried_with_the_same_idempotency_key(kind: StoreKind) {
    let env = TestEnv::on(kind).await;
    let server = TestServer::start(vec![
        Reply::status(503).body("overloaded"),
        Reply::status(200),
    ])
    .await;
    env.send(r#"{"id":"r1"}"#).await;

    let config = env.config().scope("retry").key("/id");
    let summary = env
        .drain(config, http_handler(&server.url), Duration::from_secs(60))
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
    let checkpoint = env.checkpoint("retry", "r1").await;
    assert_eq!(checkpoint.status, "complete");
    assert_eq!(checkpoint.attempts, 2);
    let error = checkpoint.last_error.unwrap();
    assert!(
        error.contains("503") && error.contains("overloaded"),
        "{error}"
    );
    assert_eq!(step_names(&checkpoint.steps), ["deliver"]);
}

async fn a_400_goes_to_the_dlq_after_one_post(kind: StoreKind) {
    let env = TestEnv::on(kind).await;
    let server = TestServer::start(vec![Reply::status(400).body("amount must be positive")]).await;
    let body = r#"{"id":"bad-1","amount":-5}"#;
    env.send(body).await;

    let config = env.config().scope("perm").key("/id");
    let summary = env
        .drain(config, http_handler(&server.url), Duration::from_secs(60))
        .await;
    assert_eq!(
        (summary.sent_to_dlq, summary.retried, summary.processed),
        (1, 0, 0),
        "{summary:?}"
    );
    assert_eq!(server.requests().len(), 1, "a 4xx is not retried");

    let dead = env.peek_dlq(1, Duration::from_secs(10)).await;
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
    let checkpoint = env.checkpoint("perm", "bad-1").await;
    assert_eq!(checkpoint.status, "failed");
    assert!(step_names(&checkpoint.steps).is_empty());
}

/// Retry-After: 3 with a worker backoff of 0.1–0.2 s. SQS visibility is whole seconds, so
/// without Retry-After the retry would come after about 1 s (a Retry-After of 1 could not be
/// told apart from that); with it, no sooner than 3 s.
async fn a_429_retry_after_is_honoured(kind: StoreKind) {
    let env = TestEnv::on(kind).await;
    let server = TestServer::start(vec![
        Reply::status(429).header("Retry-After", "3"),
        Reply::status(200),
    ])
    .await;
    env.send(r#"{"id":"slow-down"}"#).await;

    let mut config = env.config().scope("limited").key("/id");
    config.backoff_base = Duration::from_millis(100);
    config.backoff_max = Duration::from_millis(200);
    let summary = env
        .drain(config, http_handler(&server.url), Duration::from_secs(60))
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
    env: &TestEnv,
    config: WorkerConfig,
    handler: Arc<HttpHandler>,
    key: &str,
    retries: i32,
) -> RunSummary {
    let scope = config.scope.clone().unwrap();
    let running = env.start(config, handler);
    env.wait_for_checkpoint(
        "the delivery to be retried",
        (&scope, key),
        Duration::from_secs(40),
        |c| c.attempts >= retries && c.last_error.is_some() && c.lease_owner.is_none(),
    )
    .await;
    running.stop().await
}

async fn connection_refused_is_retryable(kind: StoreKind) {
    let env = TestEnv::on(kind).await;
    // A port that was free a moment ago and has no listener now.
    let closed = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", closed.local_addr().unwrap());
    drop(closed);
    env.send(r#"{"id":"unreachable"}"#).await;

    let config = env.config().scope("down").key("/id");
    let summary = run_until_retried(&env, config, http_handler(&url), "unreachable", 2).await;
    assert!(summary.retried >= 2, "{summary:?}");
    assert_eq!((summary.sent_to_dlq, summary.processed), (0, 0));

    let checkpoint = env.checkpoint("down", "unreachable").await;
    assert_eq!(checkpoint.status, "in_progress");
    assert!(step_names(&checkpoint.steps).is_empty());
    let error = checkpoint.last_error.unwrap();
    assert!(error.contains("POST http://127.0.0.1:"), "{error}");
    assert_eq!(env.messages_in().await, 1, "still queued");
    assert_eq!(env.dlq_messages_in().await, 0, "not dead-lettered");
}

/// LocalStack's port also speaks TLS, with a certificate nobody trusts for 127.0.0.1: the
/// handshake fails as a retryable error (the TLS stack has a crypto provider, no panic).
async fn an_untrusted_https_certificate_is_retryable(kind: StoreKind) {
    let env = TestEnv::on(kind).await;
    let url = format!(
        "{}/not-a-hook",
        endpoint().replacen("http://", "https://", 1)
    );
    env.send(r#"{"id":"tls"}"#).await;

    let config = env.config().scope("tls").key("/id");
    let summary = run_until_retried(&env, config, http_handler(&url), "tls", 1).await;
    assert_eq!((summary.sent_to_dlq, summary.processed), (0, 0));

    let checkpoint = env.checkpoint("tls", "tls").await;
    assert_eq!(checkpoint.status, "in_progress");
    let error = checkpoint.last_error.unwrap();
    assert!(
        error.to_lowercase().contains("certificate") && !error.contains("panic"),
        "{error}"
    );
}

/// A redelivery after the delivery was recorded (the worker died before completing, say):
/// the recorded `deliver` step is replayed, not POSTed again. PostgreSQL only: the test
/// reopens the row in SQL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recorded_delivery_is_not_posted_again() {
    let env = TestEnv::new().await;
    let server = TestServer::start(vec![Reply::status(200)]).await;
    let body = r#"{"id":"d1"}"#;
    env.send(body).await;
    let config = env.config().scope("once").key("/id");
    let summary = env
        .drain(
            config.clone(),
            http_handler(&server.url),
            Duration::from_secs(60),
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
    .execute(env.pool())
    .await
    .unwrap();
    assert_eq!(reopened.rows_affected(), 1);
    env.send(body).await;
    let summary = env
        .drain(config, http_handler(&server.url), Duration::from_secs(60))
        .await;
    assert_eq!(summary.processed, 1, "{summary:?}");
    assert_eq!(server.requests().len(), 1, "no second POST");

    let checkpoint = env.checkpoint("once", "d1").await;
    assert_eq!(checkpoint.status, "complete");
    assert_eq!(checkpoint.attempts, 2);
    assert_eq!(step_names(&checkpoint.steps), ["deliver"]);
}

/// Make recording steps fail in this test's database: every time, or only the first
/// `failures` times.
async fn break_step_records(pool: &sqlx::PgPool, failures: Option<u32>) {
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
/// PostgreSQL only (a trigger refuses the record), like the next one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unrecordable_delivery_is_not_posted_again() {
    let env = TestEnv::new().await;
    let server = TestServer::start(vec![Reply::status(200)]).await;
    break_step_records(env.pool(), None).await;
    env.send(r#"{"id":"u1"}"#).await;

    let config = env.config().scope("unrecorded").key("/id");
    let summary = env
        .drain(config, http_handler(&server.url), Duration::from_secs(60))
        .await;
    assert_eq!((summary.processed, summary.retried), (1, 0), "{summary:?}");
    assert_eq!(server.requests().len(), 1, "no second POST");
    let checkpoint = env.checkpoint("unrecorded", "u1").await;
    assert_eq!(checkpoint.status, "complete");
    assert!(step_names(&checkpoint.steps).is_empty(), "nothing recorded");
}

/// A brief database failure while recording: the record is retried and lands.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_briefly_failing_record_is_retried() {
    let env = TestEnv::new().await;
    let server = TestServer::start(vec![Reply::status(200)]).await;
    break_step_records(env.pool(), Some(2)).await;
    env.send(r#"{"id":"b1"}"#).await;

    let config = env.config().scope("blip").key("/id");
    let summary = env
        .drain(config, http_handler(&server.url), Duration::from_secs(60))
        .await;
    assert_eq!((summary.processed, summary.retried), (1, 0), "{summary:?}");
    assert_eq!(server.requests().len(), 1);
    let checkpoint = env.checkpoint("blip", "b1").await;
    assert_eq!(checkpoint.status, "complete");
    assert_eq!(step_names(&checkpoint.steps), ["deliver"]);
}

/// Through the binary: --http-url, extra headers from the environment (never logged), and
/// a key that is not header-safe.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_delivers_with_http_url_and_extra_headers() {
    let env = TestEnv::new().await;
    let server = TestServer::start(vec![Reply::status(204)]).await;
    let body = r#"{"id":"naïve\u0007 key:1","n":1}"#;
    env.send(body).await;

    let output = tokio::time::timeout(
        Duration::from_secs(60),
        env.run_command()
            .args(["--key", "/id"])
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
    let checkpoint = env
        .find_checkpoint("bin", "naïve%07 key:1")
        .await
        .expect("the checkpoint under the escaped key");
    assert_eq!(checkpoint.status, "complete");
    assert_eq!(step_names(&checkpoint.steps), ["deliver"]);
}
