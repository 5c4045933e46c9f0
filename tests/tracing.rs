//! Traces from producer to handler, on real LocalStack and PostgreSQL, with an OTLP/HTTP
//! receiver in the test (`common::OtlpReceiver`). Workers are the binary, or this test
//! binary run again (`traced_worker_process`, for a multi-step Rust handler), configured by
//! the standard environment only: the export is what an operator would get.

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use aws_sdk_sqs::types::{MessageSystemAttributeNameForSends, MessageSystemAttributeValue};
use common::*;
use sqs_worker::{Handler, HandlerError, Job};
use tokio::process::Command;

/// The producer's span every test's message names as its parent.
const PRODUCER_SPAN: &str = "00f067aa0ba902b7";

/// A trace id of this test's own (tests run at once and share nothing).
fn new_trace_id() -> String {
    format!("{:032x}", fastrand::u128(1..))
}

fn traceparent(trace_id: &str) -> String {
    format!("00-{trace_id}-{PRODUCER_SPAN}-01")
}

/// No OpenTelemetry setting of the test's own environment reaches `command`.
fn untraced(mut command: Command) -> Command {
    for (name, _) in std::env::vars() {
        if name.starts_with("OTEL_") || name == "TRACEPARENT" || name == "TRACESTATE" {
            command.env_remove(name);
        }
    }
    command
}

/// `command` exporting to `receiver`, the way an operator turns tracing on.
fn traced(command: Command, receiver: &OtlpReceiver) -> Command {
    let mut command = untraced(command);
    command
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", &receiver.endpoint)
        .env("OTEL_SERVICE_NAME", "orders-worker")
        .env("OTEL_BSP_SCHEDULE_DELAY", "200");
    command
}

/// Run `command` to its end (it exits once idle); its stderr.
async fn run_to_end(mut command: Command) -> String {
    let output = tokio::time::timeout(Duration::from_secs(90), command.output())
        .await
        .expect("the worker exits once idle")
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(output.status.success(), "{stderr}");
    stderr
}

/// `sqs-worker run` on the test's queue, key `/id`, exiting once idle, then `handler`.
fn run_binary(env: &TestEnv, handler: &[&str]) -> Command {
    let mut command = env.run_command();
    command
        .args([
            "--key",
            "/id",
            "--wait-time-seconds",
            "1",
            "--exit-when-idle",
            "2",
        ])
        .args(["--backoff-base", "1"])
        .args(handler)
        .stdout(std::process::Stdio::null());
    command
}

fn named<'a>(spans: &'a [CollectedSpan], name: &str) -> Vec<&'a CollectedSpan> {
    spans.iter().filter(|s| s.name == name).collect()
}

fn children<'a>(spans: &'a [CollectedSpan], parent: &CollectedSpan) -> Vec<&'a CollectedSpan> {
    spans
        .iter()
        .filter(|s| s.parent_span_id == parent.span_id)
        .collect()
}

/// The one child of `parent` called `name`.
fn child<'a>(spans: &'a [CollectedSpan], parent: &CollectedSpan, name: &str) -> &'a CollectedSpan {
    let found: Vec<_> = children(spans, parent)
        .into_iter()
        .filter(|s| s.name == name)
        .collect();
    assert_eq!(found.len(), 1, "one {name} under {parent:#?}: {spans:#?}");
    found[0]
}

/// The `process` span of attempt `attempt`.
fn process_of(spans: &[CollectedSpan], attempt: u32) -> &CollectedSpan {
    named(spans, "process")
        .into_iter()
        .find(|s| s.attr("sqs_worker.attempt") == Some(attempt.to_string()))
        .unwrap_or_else(|| panic!("no process span of attempt {attempt}: {spans:#?}"))
}

fn queue_name(env: &TestEnv) -> String {
    env.queue_url().rsplit('/').next().unwrap().to_owned()
}

/// The multi-step handler of `traced_worker_process`: `charge` fails the first attempt.
struct ThreeSteps;

#[async_trait]
impl Handler for ThreeSteps {
    async fn handle(&self, job: &mut Job) -> Result<(), HandlerError> {
        let attempt = job.attempt();
        job.step("fetch", || async { Ok::<u32, HandlerError>(1) })
            .await?;
        job.step("charge", || async move {
            if attempt == 1 {
                return Err(HandlerError::retryable("the payment gateway timed out"));
            }
            Ok::<u32, HandlerError>(2)
        })
        .await?;
        job.step("notify", || async { Ok::<u32, HandlerError>(3) })
            .await?;
        Ok(())
    }
}

/// A worker process with [`ThreeSteps`], its telemetry installed from the environment as
/// the binary's is; exits once idle, after sending its spans.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a worker process for a_traced_message_continues_through_a_retry_and_its_replayed_steps"]
async fn traced_worker_process() {
    let env = |name: &str| std::env::var(name).unwrap_or_else(|_| panic!("{name} is not set"));
    let traces = sqs_worker::telemetry::init(sqs_worker::telemetry::LogFormat::Json);
    assert!(
        traces.is_on(),
        "OTEL_EXPORTER_OTLP_ENDPOINT turns tracing on"
    );
    let address = StoreAddress {
        kind: StoreKind::Postgres,
        url: env("TRACE_DATABASE_URL"),
    };
    let store = address.connect(4).await.unwrap();
    let client = sqs_worker::sqs::local_client(&endpoint()).await;
    let mut config = worker_config(&env("TRACE_QUEUE_URL")).key("/id");
    config.exit_when_idle = Some(Duration::from_secs(2));
    let summary = worker_on(&store, config, client, Arc::new(ThreeSteps))
        .run()
        .await
        .expect("the worker runs");
    assert_eq!((summary.processed, summary.retried), (1, 1), "{summary:?}");
    tokio::task::spawn_blocking(move || traces.shutdown())
        .await
        .unwrap();
}

/// A message sent with a `traceparent`: both attempts' `process` spans continue the
/// producer's span; after the retry, the first step is replayed and the failed one runs
/// again, each a child of the handler's span; JSON log lines carry the trace id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_traced_message_continues_through_a_retry_and_its_replayed_steps() {
    let env = TestEnv::new().await;
    let receiver = OtlpReceiver::start().await;
    let trace_id = new_trace_id();
    let parent = traceparent(&trace_id);
    env.send_with_attributes(
        env.queue_url(),
        r#"{"id":"order-1"}"#,
        &[("traceparent", &parent)],
    )
    .await;
    let mut command = Command::new(std::env::current_exe().unwrap());
    command
        .args([
            "traced_worker_process",
            "--exact",
            "--ignored",
            "--nocapture",
        ])
        .arg("--test-threads=1")
        .env("TRACE_QUEUE_URL", env.queue_url())
        .env("TRACE_DATABASE_URL", env.database_url())
        .env("AWS_ENDPOINT_URL", endpoint())
        .env("AWS_ACCESS_KEY_ID", "test")
        .env("AWS_SECRET_ACCESS_KEY", "test")
        .env("AWS_REGION", "us-east-1")
        .kill_on_drop(true);
    let stderr = run_to_end(traced(command, &receiver)).await;

    let spans = receiver
        .wait_for_trace(&trace_id, Duration::from_secs(20), |spans| {
            named(spans, "settle").len() == 2
        })
        .await;
    OtlpReceiver::dump("retry_and_steps", &spans);
    for attempt in [1, 2] {
        let process = process_of(&spans, attempt);
        assert_eq!(process.parent_span_id, PRODUCER_SPAN, "{process:#?}");
        assert_eq!(process.kind, 5, "a consumer span");
        assert_eq!(process.service, "orders-worker");
        assert_eq!(process.attr("messaging.system").as_deref(), Some("aws_sqs"));
        assert_eq!(
            process.attr("messaging.destination.name"),
            Some(queue_name(&env))
        );
        assert_eq!(process.attr("sqs_worker.key").as_deref(), Some("order-1"));
        assert!(process.attr("messaging.message.id").is_some());
        assert_eq!(
            process.attr("sqs_worker.final_pass").as_deref(),
            Some("false")
        );
        child(&spans, process, "claim");
    }

    // The first attempt: fetch ran, charge failed, the settlement says when it comes back.
    let first = process_of(&spans, 1);
    let handle = child(&spans, first, "handle");
    assert_eq!(
        handle.status_code, 2,
        "the failed handler's span is an error"
    );
    assert_eq!(
        child(&spans, handle, "step fetch")
            .attr("sqs_worker.step.replayed")
            .as_deref(),
        Some("false")
    );
    let charge = child(&spans, handle, "step charge");
    assert_eq!(charge.status_code, 2);
    assert!(
        charge.status_message.contains("gateway timed out"),
        "{charge:#?}"
    );
    let settle = child(&spans, first, "settle");
    assert_eq!(settle.attr("sqs_worker.outcome").as_deref(), Some("retry"));
    let delay: u64 = settle
        .attr("sqs_worker.retry_delay_ms")
        .unwrap()
        .parse()
        .unwrap();
    assert!(delay > 0 && delay <= 4000, "the backoff, jittered: {delay}");

    // The retry: fetch replayed from the checkpoint, charge and notify run.
    let second = process_of(&spans, 2);
    let handle = child(&spans, second, "handle");
    let mut steps = children(&spans, handle);
    steps.sort_by_key(|s| s.attr("sqs_worker.step.index"));
    let summary: Vec<(String, Option<String>)> = steps
        .iter()
        .map(|s| (s.name.clone(), s.attr("sqs_worker.step.replayed")))
        .collect();
    assert_eq!(
        summary,
        [
            ("step fetch".to_owned(), Some("true".to_owned())),
            ("step charge".to_owned(), Some("false".to_owned())),
            ("step notify".to_owned(), Some("false".to_owned())),
        ]
    );
    let settle = child(&spans, second, "settle");
    assert_eq!(
        settle.attr("sqs_worker.outcome").as_deref(),
        Some("complete")
    );

    // Log lines inside the spans carry their ids.
    let in_trace = format!("\"trace_id\":\"{trace_id}\"");
    assert!(
        stderr
            .lines()
            .any(|line| line.contains(&in_trace) && line.contains("\"span_id\":\"")),
        "no JSON log line names the trace: {stderr}"
    );
}

/// The exec handler gets `TRACEPARENT` (its handler span, in the producer's trace) and
/// `TRACESTATE`; a permanent failure settles in the DLQ with its reason, and the DLQ copy
/// keeps the producer's trace attributes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_exec_handler_sees_traceparent_and_the_dlq_settlement_says_why() {
    let env = TestEnv::new().await;
    let receiver = OtlpReceiver::start().await;
    let dir = tempdir("trace-exec");
    let seen = dir.join("seen");
    let (ok_trace, bad_trace) = (new_trace_id(), new_trace_id());
    env.send_with_attributes(
        env.queue_url(),
        r#"{"id":"ok"}"#,
        &[
            ("traceparent", &traceparent(&ok_trace)),
            ("tracestate", "vendor=1"),
        ],
    )
    .await;
    env.send_with_attributes(
        env.queue_url(),
        r#"{"id":"bad"}"#,
        &[("traceparent", &traceparent(&bad_trace))],
    )
    .await;
    let script = format!(
        r#"body=$(cat); case "$body" in *bad*) exit 65;; esac; printf '%s %s\n' "$TRACEPARENT" "$TRACESTATE" >> {}"#,
        seen.display()
    );
    run_to_end(traced(
        run_binary(&env, &["--", "sh", "-c", &script]),
        &receiver,
    ))
    .await;

    let spans = receiver
        .wait_for_trace(&ok_trace, Duration::from_secs(20), |s| {
            !named(s, "settle").is_empty()
        })
        .await;
    let handle = child(&spans, named(&spans, "process")[0], "handle");
    let line = std::fs::read_to_string(&seen).unwrap();
    assert_eq!(
        line.trim(),
        format!("00-{ok_trace}-{}-01 vendor=1", handle.span_id),
        "the command continues its handler's span"
    );

    let spans = receiver
        .wait_for_trace(&bad_trace, Duration::from_secs(20), |s| {
            !named(s, "settle").is_empty()
        })
        .await;
    OtlpReceiver::dump("dlq", &spans);
    let process = named(&spans, "process")[0];
    assert_eq!(process.parent_span_id, PRODUCER_SPAN);
    let settle = child(&spans, process, "settle");
    assert_eq!(settle.attr("sqs_worker.outcome").as_deref(), Some("dlq"));
    assert_eq!(
        settle.attr("sqs_worker.reason").as_deref(),
        Some("handler_permanent")
    );
    assert_eq!(settle.status_code, 2, "a DLQ settlement is an error");
    let copy = &env.peek_dlq(1, Duration::from_secs(10)).await[0];
    let attribute = |name: &str| {
        copy.message_attributes()
            .and_then(|a| a.get(name))
            .and_then(|v| v.string_value())
            .map(str::to_owned)
    };
    assert_eq!(attribute("traceparent"), Some(traceparent(&bad_trace)));
    assert_eq!(
        attribute("sqs_worker_failure_reason").as_deref(),
        Some("handler_permanent")
    );
}

/// An `AWSTraceHeader` (X-Ray's format, as SNS → SQS sets it) is converted and continued.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_aws_trace_header_is_honoured() {
    let env = TestEnv::new().await;
    let receiver = OtlpReceiver::start().await;
    let trace_id = new_trace_id();
    let header = format!(
        "Root=1-{}-{};Parent={PRODUCER_SPAN};Sampled=1",
        &trace_id[..8],
        &trace_id[8..]
    );
    let value = MessageSystemAttributeValue::builder()
        .data_type("String")
        .string_value(&header)
        .build()
        .unwrap();
    env.client()
        .send_message()
        .queue_url(env.queue_url())
        .message_body(r#"{"id":"from-sns"}"#)
        .message_system_attributes(MessageSystemAttributeNameForSends::AwsTraceHeader, value)
        .send()
        .await
        .unwrap();
    run_to_end(traced(
        run_binary(&env, &["--", "sh", "-c", "cat >/dev/null"]),
        &receiver,
    ))
    .await;
    let spans = receiver
        .wait_for_trace(&trace_id, Duration::from_secs(20), |s| {
            !named(s, "settle").is_empty()
        })
        .await;
    let process = named(&spans, "process")[0];
    assert_eq!(process.parent_span_id, PRODUCER_SPAN, "{spans:#?}");
    assert_eq!(process.attr("sqs_worker.key").as_deref(), Some("from-sns"));
}

/// The HTTP handler's request carries `traceparent`: the `deliver` step's span, in the
/// producer's trace; a 503 first is a retry, visible in the trace.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_http_handler_sends_traceparent() {
    let env = TestEnv::new().await;
    let receiver = OtlpReceiver::start().await;
    let server = TestServer::start(vec![Reply::status(503), Reply::status(204)]).await;
    let trace_id = new_trace_id();
    env.send_with_attributes(
        env.queue_url(),
        r#"{"id":"order-7","amount_cents":1250}"#,
        &[("traceparent", &traceparent(&trace_id))],
    )
    .await;
    run_to_end(traced(
        run_binary(&env, &["--http-url", &server.url]),
        &receiver,
    ))
    .await;
    let spans = receiver
        .wait_for_trace(&trace_id, Duration::from_secs(20), |s| {
            named(s, "settle").len() == 2
        })
        .await;
    OtlpReceiver::dump("http_retry", &spans);
    let requests = server.requests();
    assert_eq!(requests.len(), 2, "{requests:#?}");
    for (attempt, request) in [1, 2].into_iter().zip(&requests) {
        let deliver = child(
            &spans,
            child(&spans, process_of(&spans, attempt), "handle"),
            "step deliver",
        );
        assert_eq!(
            request.header("traceparent"),
            Some(format!("00-{trace_id}-{}-01", deliver.span_id).as_str()),
            "attempt {attempt}"
        );
    }
    let first = process_of(&spans, 1);
    assert_eq!(
        child(&spans, first, "settle")
            .attr("sqs_worker.outcome")
            .as_deref(),
        Some("retry")
    );
}

/// `OTEL_EXPORTER_OTLP_PROTOCOL=grpc`: the same spans over gRPC.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_go_over_grpc_when_the_protocol_says_so() {
    let env = TestEnv::new().await;
    let receiver = OtlpReceiver::start_grpc().await;
    let trace_id = new_trace_id();
    env.send_with_attributes(
        env.queue_url(),
        r#"{"id":"over-grpc"}"#,
        &[("traceparent", &traceparent(&trace_id))],
    )
    .await;
    let mut command = traced(
        run_binary(&env, &["--", "sh", "-c", "cat >/dev/null"]),
        &receiver,
    );
    command.env("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc");
    let stderr = run_to_end(command).await;
    assert!(stderr.contains("(grpc)"), "{stderr}");
    let spans = receiver
        .wait_for_trace(&trace_id, Duration::from_secs(20), |s| {
            !named(s, "settle").is_empty()
        })
        .await;
    assert_eq!(named(&spans, "process")[0].parent_span_id, PRODUCER_SPAN);
}

/// `sqs-worker send` starts a trace per message (tracing off: a new root context; on: its
/// `send` span, kind producer), which the worker's spans then continue.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_gives_each_message_a_trace() {
    use tokio::io::AsyncWriteExt;
    let env = TestEnv::new().await;
    let receiver = OtlpReceiver::start().await;
    for tracing_on in [false, true] {
        let mut command = if tracing_on {
            traced(env.command(), &receiver)
        } else {
            untraced(env.command())
        };
        let mut child = command
            .args(["send", "--queue-url", env.queue_url()])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(b"{\"id\":\"sent\"}\n").await.unwrap();
        drop(stdin);
        let status = tokio::time::timeout(Duration::from_secs(30), child.wait())
            .await
            .expect("send ends")
            .unwrap();
        assert!(status.success());
    }
    let messages = env.peek(2, Duration::from_secs(10)).await;
    let mut parents: Vec<String> = messages
        .iter()
        .map(|m| {
            let value = m.message_attributes().unwrap()["traceparent"].string_value();
            value.unwrap().to_owned()
        })
        .collect();
    parents.sort();
    parents.dedup();
    assert_eq!(parents.len(), 2, "a trace each: {parents:?}");
    for parent in &parents {
        let fields: Vec<&str> = parent.split('-').collect();
        assert_eq!(
            (fields.len(), fields[0], fields[3]),
            (4, "00", "01"),
            "{parent}"
        );
    }
    // Tracing on: the message names the exported `send` span.
    let sends = receiver
        .wait_for_spans_named("send", Duration::from_secs(20))
        .await;
    let send = &sends[0];
    assert_eq!(send.kind, 4, "a producer span");
    let expected = format!("00-{}-{}-01", send.trace_id, send.span_id);
    assert!(parents.contains(&expected), "{parents:?} vs {expected}");
}

/// On Lambda, the invocation's `_X_AMZN_TRACE_ID` is the parent of the batch: an
/// `invocation` span linked to each record's producer, the `process` spans its children,
/// each linked to its own producer; exported before the invocation answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lambda_batch_is_a_child_of_the_invocation_trace() {
    let env = TestEnv::new().await;
    let receiver = OtlpReceiver::start().await;
    let arn = env.queue_arn().await;
    let log = tempdir("trace-lambda").join("done.log");
    let invocation_trace = new_trace_id();
    let lambda_parent = "53995c3f42cd8ad8";
    let header = format!(
        "Root=1-{}-{};Parent={lambda_parent};Sampled=1",
        &invocation_trace[..8],
        &invocation_trace[8..]
    );
    let producers = [new_trace_id(), new_trace_id()];
    let records: Vec<_> = producers
        .iter()
        .enumerate()
        .map(|(i, trace_id)| {
            let attributes =
                serde_json::json!({"traceparent": string_attr(&traceparent(trace_id))});
            lambda_record(
                &arn,
                &format!("m-{i}"),
                &format!(r#"{{"id":"l{i}"}}"#),
                attributes,
            )
        })
        .collect();
    let event = serde_json::json!({ "Records": records });
    let mut command = traced(env.command(), &receiver);
    command.env("_X_AMZN_TRACE_ID", &header);
    let response = invoke_lambda(command, &log, &event, "30", "cat >/dev/null").await;
    assert_eq!(response, serde_json::json!({"batchItemFailures": []}));

    let spans = receiver
        .wait_for_trace(&invocation_trace, Duration::from_secs(20), |s| {
            named(s, "settle").len() == 2 && named(s, "invocation").len() == 1
        })
        .await;
    let invocation = named(&spans, "invocation")[0];
    assert_eq!(invocation.parent_span_id, lambda_parent);
    let mut linked: Vec<&str> = invocation.links.iter().map(|(t, _)| t.as_str()).collect();
    linked.sort();
    let mut expected: Vec<&str> = producers.iter().map(String::as_str).collect();
    expected.sort();
    assert_eq!(linked, expected, "the invocation links every producer");
    for process in named(&spans, "process") {
        assert_eq!(process.parent_span_id, invocation.span_id);
        assert_eq!(process.links.len(), 1);
        assert!(producers.contains(&process.links[0].0));
        assert_eq!(process.links[0].1, PRODUCER_SPAN);
    }
}

/// Without the environment nothing is exported, and no exporter starts: the receiver hears
/// nothing and the log says tracing is off. The producer's context still reaches the
/// handler unchanged, so downstream traces stay connected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_env_nothing_is_exported() {
    let env = TestEnv::new().await;
    let receiver = OtlpReceiver::start().await;
    let dir = tempdir("trace-off");
    let seen = dir.join("seen");
    let trace_id = new_trace_id();
    env.send_with_attributes(
        env.queue_url(),
        r#"{"id":"quiet"}"#,
        &[("traceparent", &traceparent(&trace_id))],
    )
    .await;
    let script = format!(
        r#"cat >/dev/null; printf '%s\n' "$TRACEPARENT" >> {}"#,
        seen.display()
    );
    let stderr = run_to_end(untraced(run_binary(&env, &["--", "sh", "-c", &script]))).await;
    assert!(stderr.contains("tracing off"), "{stderr}");
    assert_eq!(
        std::fs::read_to_string(&seen).unwrap().trim(),
        traceparent(&trace_id)
    );
    // The batch exporter would have sent within its 5 s delay, or at the exit.
    assert_eq!(receiver.requests(), 0, "{:#?}", receiver.spans());
}

/// A fresh directory for a test's files.
fn tempdir(name: &str) -> std::path::PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(unique(name));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}
