//! Running as a service: heartbeats, shutdown hand-back, FIFO order, metrics — on real
//! LocalStack and PostgreSQL, every wait bounded.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::*;
use sqs_worker::HandlerError;

store_tests!(
    a_handler_running_three_visibility_timeouts_runs_once,
    lambda_event_reports_only_retryable_failures,
    a_delivery_of_an_event_running_here_rides_along,
    a_final_pass_delivered_twice_runs_its_handler_once,
);

/// A handler that runs three times the visibility timeout runs once: the heartbeat keeps
/// the message hidden and the lease held, though two workers poll the queue.
async fn a_handler_running_three_visibility_timeouts_runs_once(kind: StoreKind) {
    let env = TestEnv::builder().store(kind).no_dlq().start().await;
    env.send(r#"{"id":"long-1"}"#).await;
    let (handler, calls) = RecordingHandler::new(Duration::from_secs(6), |_| Ok(()));
    let workers = (0..2)
        .map(|i| {
            let config = env.config().key("/id").scope("beat").visibility(2);
            env.worker(config.worker_id(&format!("w{i}")), handler.clone())
        })
        .collect();
    let summaries = env.drain_workers(workers, Duration::from_secs(60)).await;

    assert_eq!(calls.lock().unwrap().len(), 1, "the handler ran once");
    let heartbeats: u64 = summaries.iter().map(|s| s.heartbeats).sum();
    // 6 s at one beat per 2/3 s is about 8; far fewer would have let the message reappear.
    assert!(heartbeats >= 4, "{summaries:?}");
    assert_eq!(summaries.iter().map(|s| s.processed).sum::<u64>(), 1);
    assert_eq!(summaries.iter().map(|s| s.received).sum::<u64>(), 1);
    let checkpoint = env.checkpoint("beat", "long-1").await;
    assert_eq!(checkpoint.status, "complete");
    assert_eq!(checkpoint.attempts, 1);
}

/// SIGTERM with handlers that outlast --shutdown-timeout: the process exits 0 in time, and
/// the unfinished messages are handed back at once (lease released, visibility 0), so a
/// second worker finishes them in seconds instead of after the 120 s visibility timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_past_the_deadline_hands_unfinished_messages_back_at_once() {
    let env = TestEnv::new().await;
    let log = tempdir("handback").join("handler.log");
    for i in 0..3 {
        env.send(&format!(r#"{{"id":"h{i}"}}"#)).await;
    }
    let mut worker = env
        .run_command()
        .args(["--key", "/id"])
        .args(["--scope", "handback", "--visibility-timeout", "120"])
        .args(["--wait-time-seconds", "1", "--shutdown-timeout", "2", "--"])
        .args(["sh", "-c", r#"echo started >> "$LOG"; sleep 60"#])
        .env("LOG", &log)
        .spawn()
        .unwrap();
    wait_until("three handlers to start", Duration::from_secs(30), || {
        let log = log.clone();
        async move { std::fs::read_to_string(&log).is_ok_and(|s| s.lines().count() == 3) }
    })
    .await;
    let pid = worker.id().unwrap().to_string();
    let sent_at = std::time::Instant::now();
    assert!(
        std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let status = tokio::time::timeout(Duration::from_secs(15), worker.wait())
        .await
        .expect("the worker exits soon after its shutdown timeout")
        .unwrap();
    assert!(status.success(), "exit status {status:?}");
    assert!(
        sent_at.elapsed() < Duration::from_secs(8),
        "{:?}",
        sent_at.elapsed()
    );

    for i in 0..3 {
        let checkpoint = env.checkpoint("handback", &format!("h{i}")).await;
        assert_eq!(checkpoint.status, "in_progress");
        assert!(
            checkpoint.lease_owner.is_none(),
            "lease released: {checkpoint:?}"
        );
    }
    let (handler, calls) = RecordingHandler::succeeding();
    let config = env.config().key("/id").scope("handback");
    let taken_over_at = std::time::Instant::now();
    env.drain(config, handler, Duration::from_secs(20)).await;
    assert!(
        taken_over_at.elapsed() < Duration::from_secs(15),
        "{:?}",
        taken_over_at.elapsed()
    );
    assert_eq!(calls_per_key(&calls).len(), 3);
    for i in 0..3 {
        let checkpoint = env.checkpoint("handback", &format!("h{i}")).await;
        assert_eq!(checkpoint.status, "complete");
        assert_eq!(checkpoint.attempts, 2);
    }
}

/// Send `{"id":"<group>-<seq>"}` to the FIFO queue, in `group`.
async fn send_fifo(env: &TestEnv, group: &str, seq: u32) {
    env.client()
        .send_message()
        .queue_url(env.queue_url())
        .message_group_id(group)
        .message_body(format!(r#"{{"id":"{group}-{seq}"}}"#))
        .send()
        .await
        .unwrap();
}

/// FIFO: a group's messages run one at a time in order, groups in parallel; a failure holds
/// the rest of its group (handed back, not run out of order) until it succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifo_groups_run_in_order_and_a_failure_holds_its_group() {
    let env = TestEnv::builder().fifo().no_dlq().start().await;
    for seq in 0..5 {
        for group in ["g1", "g2", "g3"] {
            send_fifo(&env, group, seq).await;
        }
    }
    // g2-1 fails on its first attempt.
    let (handler, calls) = RecordingHandler::new(Duration::from_millis(50), |job| {
        if job.key() == "g2-1" && job.attempt() == 1 {
            Err(HandlerError::retryable("first try of g2-1 fails"))
        } else {
            Ok(())
        }
    });
    let mut config = env.config().key("/id").scope("fifo");
    config.concurrency = 10;
    let summary = env.drain(config, handler, Duration::from_secs(60)).await;
    assert_eq!(summary.processed, 15, "{summary:?}");

    let calls = calls.lock().unwrap().clone();
    let mut per_group: HashMap<String, Vec<(u32, u32, std::time::Instant)>> = HashMap::new();
    for call in &calls {
        let (group, seq) = call.key.split_once('-').unwrap();
        per_group.entry(group.to_owned()).or_default().push((
            seq.parse().unwrap(),
            call.attempt,
            call.at,
        ));
    }
    for group in ["g1", "g3"] {
        let seqs: Vec<u32> = per_group[group].iter().map(|c| c.0).collect();
        assert_eq!(seqs, [0, 1, 2, 3, 4], "{group}: {calls:?}");
    }
    let g2: Vec<(u32, u32)> = per_group["g2"].iter().map(|c| (c.0, c.1)).collect();
    assert_eq!(
        g2,
        [(0, 1), (1, 1), (1, 2), (2, 1), (3, 1), (4, 1)],
        "g2-2.. waited for g2-1's retry: {calls:?}"
    );
    // One at a time within a group: each call starts after the previous one's handler ran.
    for (group, group_calls) in &per_group {
        for pair in group_calls.windows(2) {
            assert!(
                pair[1].2 >= pair[0].2 + Duration::from_millis(50),
                "{group}: overlapping calls {pair:?}"
            );
        }
    }
}

/// SIGTERM (the shutdown token) with FIFO messages received but not started: they are
/// handed back with the running one at the deadline, and a second worker finishes all of
/// them within seconds, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_hands_back_unstarted_fifo_messages_for_another_worker() {
    let env = TestEnv::builder().fifo().no_dlq().start().await;
    for seq in 0..3 {
        send_fifo(&env, "g", seq).await;
    }
    let config = || {
        let mut config = env.config().key("/id").scope("fifo-stop").visibility(120);
        config.shutdown_timeout = Duration::from_secs(1);
        config.pollers = 1;
        config
    };
    let (slow, slow_calls) = RecordingHandler::new(Duration::from_secs(60), |_| Ok(()));
    let first = env.start(config(), slow);
    wait_until(
        "the first message to start",
        Duration::from_secs(20),
        || {
            let calls = slow_calls.clone();
            async move { !calls.lock().unwrap().is_empty() }
        },
    )
    .await;
    // Give the poller time to have received the group's other messages with the first.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let summary = tokio::time::timeout(Duration::from_secs(10), first.stop())
        .await
        .expect("stops soon after its 1 s shutdown timeout");
    assert_eq!(slow_calls.lock().unwrap().len(), 1, "only g-0 started");
    assert_eq!(
        summary.released_at_shutdown, summary.received,
        "{summary:?}"
    );
    assert!(summary.received >= 1, "{summary:?}");

    let (handler, calls) = RecordingHandler::succeeding();
    let started = std::time::Instant::now();
    env.drain(config(), handler, Duration::from_secs(20)).await;
    assert!(started.elapsed() < Duration::from_secs(15));
    let keys: Vec<String> = calls
        .lock()
        .unwrap()
        .iter()
        .map(|c| c.key.clone())
        .collect();
    assert_eq!(keys, ["g-0", "g-1", "g-2"]);
}

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in:\n{text}"))
}

/// `--metrics-addr`: health, readiness and Prometheus counters that match a known run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_a_known_run() {
    let env = TestEnv::new().await;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut worker = env
        .run_command()
        .args(["--key", "/id"])
        .args(["--scope", "metrics", "--wait-time-seconds", "1"])
        .args(["--metrics-addr", &format!("127.0.0.1:{port}"), "--"])
        .args(["sh", "-c", r#"case "$(cat)" in *poison*) exit 65;; esac"#])
        .spawn()
        .unwrap();
    wait_until(
        "/readyz to say ready",
        Duration::from_secs(30),
        || async move {
            tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
                && http_get(port, "/readyz").await.0 == 200
        },
    )
    .await;
    assert_eq!(http_get(port, "/healthz").await, (200, "ok\n".to_owned()));

    for key in ["a", "b", "c"] {
        env.send(&format!(r#"{{"id":"{key}"}}"#)).await;
    }
    env.send(r#"{"id":"p","poison":true}"#).await;
    for key in ["a", "b", "c", "p"] {
        env.wait_for_checkpoint(key, ("metrics", key), Duration::from_secs(30), |c| {
            c.status == "complete" || c.status == "failed"
        })
        .await;
    }
    // A duplicate of a complete event, sent after it completed.
    env.send(r#"{"id":"a"}"#).await;
    wait_until(
        "queue empty, poison in the DLQ",
        Duration::from_secs(30),
        || async { env.messages_in().await == 0 && env.dlq_messages_in().await == 1 },
    )
    .await;

    let (status, text) = http_get(port, "/metrics").await;
    assert_eq!(status, 200);
    assert_eq!(metric(&text, "sqs_worker_received_total"), 5.0);
    assert_eq!(metric(&text, "sqs_worker_processed_total"), 3.0);
    assert_eq!(metric(&text, "sqs_worker_duplicates_skipped_total"), 1.0);
    assert_eq!(metric(&text, "sqs_worker_sent_to_dlq_total"), 1.0);
    assert_eq!(metric(&text, "sqs_worker_retried_total"), 0.0);
    assert_eq!(metric(&text, "sqs_worker_in_flight"), 0.0);
    assert_eq!(
        metric(&text, "sqs_worker_handler_duration_seconds_count"),
        4.0
    );
    assert!(text.contains(&format!(
        "queue=\"{}\"",
        env.queue_url().rsplit('/').next().unwrap()
    )));

    let pid = worker.id().unwrap().to_string();
    std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    let status = tokio::time::timeout(Duration::from_secs(30), worker.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success());
}

/// An exec handler that logs each key it runs (`$LOG.runs`) and each it completes (`$LOG`).
const LAMBDA_HANDLER: &str = r#"body=$(cat)
echo "$SQS_WORKER_KEY" >> "$LOG.runs"
case "$body" in
  *slow*) sleep 30 ;;
  *retry*) exit 1 ;;
  *fail*) exit 65 ;;
esac
echo "$SQS_WORKER_KEY" >> "$LOG""#;

/// One local invocation with [`LAMBDA_HANDLER`].
async fn invoke(
    env: &TestEnv,
    log: &std::path::Path,
    event: &serde_json::Value,
    timeout_secs: &str,
) -> serde_json::Value {
    env.invoke_lambda(log, event, timeout_secs, LAMBDA_HANDLER)
        .await
}

/// `lambda --event`: duplicates are skipped, only retryable failures are reported, a
/// final-pass failure ends in dead_letters, a permanent failure goes to the DLQ, and a
/// handler still running near the deadline is stopped, reported, and its lease released.
async fn lambda_event_reports_only_retryable_failures(kind: StoreKind) {
    let env = TestEnv::on(kind).await;
    let arn = env.queue_arn().await;
    let log = tempdir("lambda").join("done.log");
    let none = serde_json::json!({});

    let first = serde_json::json!({"Records": [lambda_record(&arn, "m-a1", r#"{"id":"a"}"#, none.clone())]});
    let response = invoke(&env, &log, &first, "30").await;
    assert_eq!(response, serde_json::json!({"batchItemFailures": []}));

    let final_pass = lambda_final_pass_attributes();
    let second = serde_json::json!({"Records": [
        lambda_record(&arn, "m-a2", r#"{"id":"a"}"#, none.clone()),
        lambda_record(&arn, "m-b", r#"{"id":"b","retry":1}"#, none.clone()),
        lambda_record(&arn, "m-c", r#"{"id":"c","fail":1}"#, final_pass),
        lambda_record(&arn, "m-d", r#"{"id":"d"}"#, none.clone()),
        lambda_record(&arn, "m-e", r#"{"id":"e","fail":1}"#, none.clone()),
        lambda_record(&arn, "m-s", r#"{"id":"s","slow":1}"#, none.clone()),
    ]});
    let started = std::time::Instant::now();
    let response = invoke(&env, &log, &second, "4").await;
    assert!(started.elapsed() < Duration::from_secs(15));
    let mut failed: Vec<String> = response["batchItemFailures"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["itemIdentifier"].as_str().unwrap().to_owned())
        .collect();
    failed.sort();
    assert_eq!(failed, ["m-b", "m-s"], "{response}");

    let done = std::fs::read_to_string(&log).unwrap();
    let mut done: Vec<&str> = done.lines().collect();
    done.sort();
    assert_eq!(done, ["a", "d"], "a ran once (its duplicate was skipped)");

    let status = |key| env.checkpoint("lam", key);
    assert_eq!(status("a").await.status, "complete");
    assert_eq!(status("d").await.status, "complete");
    assert_eq!(status("c").await.status, "failed");
    assert_eq!(status("e").await.status, "failed");
    let b = status("b").await;
    assert_eq!(
        (b.status.as_str(), b.lease_owner.as_deref()),
        ("in_progress", None)
    );
    let s = status("s").await;
    assert_eq!(s.status, "in_progress");
    assert!(
        s.lease_owner.is_none(),
        "the slow one's lease was released: {s:?}"
    );

    let letters = env.dead_letters(Some("lam")).await;
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0].idempotency_key, "c");
    let dlq = env.peek_dlq(1, Duration::from_secs(10)).await;
    assert_eq!(dlq.len(), 1);
    assert_eq!(dlq[0].body(), Some(r#"{"id":"e","fail":1}"#));
}

/// A second delivery of an event that is running in this worker rides along with it: the
/// handler runs once and both messages are deleted when it completes, instead of the second
/// waiting out the 30 s lease.
async fn a_delivery_of_an_event_running_here_rides_along(kind: StoreKind) {
    let env = TestEnv::builder().store(kind).no_dlq().start().await;
    let (handler, calls) = RecordingHandler::new(Duration::from_secs(3), |_| Ok(()));
    let worker = env.start(env.config().key("/id").scope("ride"), handler);
    env.send(r#"{"id":"r1"}"#).await;
    wait_until("the handler to start", Duration::from_secs(20), || {
        let calls = calls.clone();
        async move { !calls.lock().unwrap().is_empty() }
    })
    .await;
    env.send(r#"{"id":"r1"}"#).await;
    let sent = std::time::Instant::now();
    wait_until(
        "both deliveries deleted",
        Duration::from_secs(15),
        || async { env.messages_in().await == 0 },
    )
    .await;
    assert!(
        sent.elapsed() < Duration::from_secs(10),
        "{:?}",
        sent.elapsed()
    );
    let summary = worker.stop().await;
    assert_eq!(calls.lock().unwrap().len(), 1);
    assert_eq!(summary.processed, 1, "{summary:?}");
    assert_eq!(summary.duplicates_skipped, 1, "{summary:?}");
    assert_eq!(summary.busy_deferred, 0, "{summary:?}");
}

/// The same final-pass record delivered to two invocations (a Lambda retry of the batch, or
/// SQS's own duplicate delivery): the failing handler runs once, one dead letter is written,
/// and both invocations settle the record.
async fn a_final_pass_delivered_twice_runs_its_handler_once(kind: StoreKind) {
    let env = TestEnv::on(kind).await;
    let arn = env.queue_arn().await;
    let dir = tempdir("lambda-final-twice");
    let log = dir.join("done.log");
    let final_pass = lambda_final_pass_attributes();
    let event = serde_json::json!({"Records": [
        lambda_record(&arn, "m-f", r#"{"id":"f","fail":1}"#, final_pass),
    ]});
    for invocation in 1..=2 {
        let response = invoke(&env, &log, &event, "30").await;
        assert_eq!(
            response,
            serde_json::json!({"batchItemFailures": []}),
            "invocation {invocation} settles the record"
        );
    }
    let runs = std::fs::read_to_string(dir.join("done.log.runs")).unwrap();
    assert_eq!(
        runs.lines().collect::<Vec<_>>(),
        ["f"],
        "the handler ran once"
    );
    let letters = env.dead_letters(Some("lam")).await;
    assert_eq!(letters.len(), 1, "one dead letter: {letters:?}");
    assert_eq!(env.checkpoint("lam", "f").await.status, "failed");
}
