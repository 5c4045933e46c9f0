//! Running as a service: heartbeats, shutdown hand-back, FIFO order, metrics — on real
//! LocalStack and PostgreSQL, every wait bounded.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use aws_sdk_sqs::types::QueueAttributeName;
use common::*;
use sqs_worker::checkpoint::CheckpointStore;
use sqs_worker::message::KeySpec;
use sqs_worker::{HandlerError, Worker};
use tokio_util::sync::CancellationToken;

/// A handler that runs three times the visibility timeout runs once: the heartbeat keeps
/// the message hidden and the lease held, though two workers poll the queue.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_running_three_visibility_timeouts_runs_once() {
    let client = sqs_client().await;
    let (pool, _) = fresh_database().await;
    let queue = fresh_queue(&client, false, 0).await;
    send(&client, &queue.url, r#"{"id":"long-1"}"#).await;
    let (handler, calls) = RecordingHandler::new(Duration::from_secs(6), |_| Ok(()));
    let workers: Vec<Worker> = (0..2)
        .map(|i| {
            let mut config = worker_config(&queue.url);
            config.key = KeySpec::new(vec!["/id".into()]).unwrap();
            config.scope = Some("beat".into());
            config.visibility_timeout = Some(Duration::from_secs(2));
            config.worker_id = Some(format!("w{i}"));
            Worker::new(config, client.clone(), pool.clone(), handler.clone())
        })
        .collect();
    let summaries = run_until_drained(&client, &queue.url, workers, Duration::from_secs(60)).await;

    assert_eq!(calls.lock().unwrap().len(), 1, "the handler ran once");
    let heartbeats: u64 = summaries.iter().map(|s| s.heartbeats).sum();
    // 6 s at one beat per 2/3 s is about 8; far fewer would have let the message reappear.
    assert!(heartbeats >= 4, "{summaries:?}");
    assert_eq!(summaries.iter().map(|s| s.processed).sum::<u64>(), 1);
    assert_eq!(summaries.iter().map(|s| s.received).sum::<u64>(), 1);
    let checkpoint = CheckpointStore::new(pool)
        .find("beat", "long-1")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(checkpoint.status, "complete");
    assert_eq!(checkpoint.attempts, 1);
}

/// SIGTERM with handlers that outlast --shutdown-timeout: the process exits 0 in time, and
/// the unfinished messages are handed back at once (lease released, visibility 0), so a
/// second worker finishes them in seconds instead of after the 120 s visibility timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_past_the_deadline_hands_unfinished_messages_back_at_once() {
    let client = sqs_client().await;
    let (pool, database_url) = fresh_database().await;
    let queue = fresh_queue(&client, true, 5).await;
    let dir = std::env::temp_dir().join(unique("handback"));
    std::fs::create_dir_all(&dir).unwrap();
    let log = dir.join("handler.log");
    for i in 0..3 {
        send(&client, &queue.url, &format!(r#"{{"id":"h{i}"}}"#)).await;
    }
    let mut worker = sqs_worker_command(&database_url)
        .args(["run", "--queue-url", &queue.url, "--key", "/id"])
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

    let store = CheckpointStore::new(pool.clone());
    for i in 0..3 {
        let checkpoint = store
            .find("handback", &format!("h{i}"))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(checkpoint.status, "in_progress");
        assert!(
            checkpoint.lease_owner.is_none(),
            "lease released: {checkpoint:?}"
        );
    }
    let (handler, calls) = RecordingHandler::succeeding();
    let mut config = worker_config(&queue.url);
    config.key = KeySpec::new(vec!["/id".into()]).unwrap();
    config.scope = Some("handback".into());
    let taken_over_at = std::time::Instant::now();
    run_until_drained(
        &client,
        &queue.url,
        vec![Worker::new(config, client.clone(), pool, handler)],
        Duration::from_secs(20),
    )
    .await;
    assert!(
        taken_over_at.elapsed() < Duration::from_secs(15),
        "{:?}",
        taken_over_at.elapsed()
    );
    assert_eq!(calls_per_key(&calls).len(), 3);
    for i in 0..3 {
        let checkpoint = store
            .find("handback", &format!("h{i}"))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(checkpoint.status, "complete");
        assert_eq!(checkpoint.attempts, 2);
    }
}

async fn fresh_fifo_queue(client: &aws_sdk_sqs::Client) -> String {
    let name = format!("{}.fifo", unique("f").replace('_', "-"));
    client
        .create_queue()
        .queue_name(name)
        .attributes(QueueAttributeName::FifoQueue, "true")
        .attributes(QueueAttributeName::ContentBasedDeduplication, "true")
        .attributes(QueueAttributeName::VisibilityTimeout, "30")
        .send()
        .await
        .expect("LocalStack must be running: localstack/up")
        .queue_url()
        .unwrap()
        .to_owned()
}

async fn send_fifo(client: &aws_sdk_sqs::Client, queue_url: &str, group: &str, seq: u32) {
    client
        .send_message()
        .queue_url(queue_url)
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
    let client = sqs_client().await;
    let (pool, _) = fresh_database().await;
    let queue_url = fresh_fifo_queue(&client).await;
    for seq in 0..5 {
        for group in ["g1", "g2", "g3"] {
            send_fifo(&client, &queue_url, group, seq).await;
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
    let mut config = worker_config(&queue_url);
    config.key = KeySpec::new(vec!["/id".into()]).unwrap();
    config.scope = Some("fifo".into());
    config.concurrency = 10;
    let summaries = run_until_drained(
        &client,
        &queue_url,
        vec![Worker::new(config, client.clone(), pool, handler)],
        Duration::from_secs(60),
    )
    .await;
    assert_eq!(summaries[0].processed, 15, "{summaries:?}");

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
    let client = sqs_client().await;
    let (pool, _) = fresh_database().await;
    let queue_url = fresh_fifo_queue(&client).await;
    for seq in 0..3 {
        send_fifo(&client, &queue_url, "g", seq).await;
    }
    let config = || {
        let mut config = worker_config(&queue_url);
        config.key = KeySpec::new(vec!["/id".into()]).unwrap();
        config.scope = Some("fifo-stop".into());
        config.visibility_timeout = Some(Duration::from_secs(120));
        config.shutdown_timeout = Duration::from_secs(1);
        config.pollers = 1;
        config
    };
    let (slow, slow_calls) = RecordingHandler::new(Duration::from_secs(60), |_| Ok(()));
    let stop = CancellationToken::new();
    let first = tokio::spawn(
        Worker::new(config(), client.clone(), pool.clone(), slow)
            .with_shutdown(stop.clone())
            .run(),
    );
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
    stop.cancel();
    let summary = tokio::time::timeout(Duration::from_secs(10), first)
        .await
        .expect("stops soon after its 1 s shutdown timeout")
        .unwrap()
        .unwrap();
    assert_eq!(slow_calls.lock().unwrap().len(), 1, "only g-0 started");
    assert_eq!(
        summary.released_at_shutdown, summary.received,
        "{summary:?}"
    );
    assert!(summary.received >= 1, "{summary:?}");

    let (handler, calls) = RecordingHandler::succeeding();
    let started = std::time::Instant::now();
    run_until_drained(
        &client,
        &queue_url,
        vec![Worker::new(config(), client.clone(), pool, handler)],
        Duration::from_secs(20),
    )
    .await;
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
    let client = sqs_client().await;
    let (pool, database_url) = fresh_database().await;
    let queue = fresh_queue(&client, true, 5).await;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut worker = sqs_worker_command(&database_url)
        .args(["run", "--queue-url", &queue.url, "--key", "/id"])
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

    let store = CheckpointStore::new(pool);
    let complete = |key: &'static str| {
        let store = store.clone();
        async move {
            store
                .find("metrics", key)
                .await
                .unwrap()
                .is_some_and(|c| c.status == "complete" || c.status == "failed")
        }
    };
    for key in ["a", "b", "c"] {
        send(&client, &queue.url, &format!(r#"{{"id":"{key}"}}"#)).await;
    }
    send(&client, &queue.url, r#"{"id":"p","poison":true}"#).await;
    for key in ["a", "b", "c", "p"] {
        wait_until(key, Duration::from_secs(30), || complete(key)).await;
    }
    // A duplicate of a complete event, sent after it completed.
    send(&client, &queue.url, r#"{"id":"a"}"#).await;
    let dlq = queue.dlq_url.clone().unwrap();
    wait_until(
        "queue empty, poison in the DLQ",
        Duration::from_secs(30),
        || {
            let client = client.clone();
            let (queue_url, dlq) = (queue.url.clone(), dlq.clone());
            async move {
                messages_in(&client, &queue_url).await == 0 && messages_in(&client, &dlq).await == 1
            }
        },
    )
    .await;

    let (status, text) = http_get(port, "/metrics").await;
    assert_eq!(status, 200);
    assert_eq!(metric(&text, "sqs_worker_messages_received_total"), 5.0);
    assert_eq!(metric(&text, "sqs_worker_events_processed_total"), 3.0);
    assert_eq!(metric(&text, "sqs_worker_duplicates_skipped_total"), 1.0);
    assert_eq!(metric(&text, "sqs_worker_sent_to_dlq_total"), 1.0);
    assert_eq!(metric(&text, "sqs_worker_retries_total"), 0.0);
    assert_eq!(metric(&text, "sqs_worker_in_flight"), 0.0);
    assert_eq!(
        metric(&text, "sqs_worker_handler_duration_seconds_count"),
        4.0
    );
    assert!(text.contains(&format!(
        "queue=\"{}\"",
        queue.url.rsplit('/').next().unwrap()
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

async fn invoke(
    database_url: &str,
    log: &std::path::Path,
    event: &serde_json::Value,
    timeout_secs: &str,
) -> serde_json::Value {
    invoke_lambda(
        sqs_worker_command(database_url),
        log,
        event,
        timeout_secs,
        LAMBDA_HANDLER,
    )
    .await
}

/// `lambda --event`: duplicates are skipped, only retryable failures are reported, a
/// final-pass failure ends in dead_letters, a permanent failure goes to the DLQ, and a
/// handler still running near the deadline is stopped, reported, and its lease released.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lambda_event_reports_only_retryable_failures() {
    let client = sqs_client().await;
    let (pool, database_url) = fresh_database().await;
    let queue = fresh_queue(&client, true, 5).await;
    let arn = client
        .get_queue_attributes()
        .queue_url(&queue.url)
        .attribute_names(QueueAttributeName::QueueArn)
        .send()
        .await
        .unwrap()
        .attributes()
        .unwrap()[&QueueAttributeName::QueueArn]
        .clone();
    let dir = std::env::temp_dir().join(unique("lambda"));
    std::fs::create_dir_all(&dir).unwrap();
    let log = dir.join("done.log");
    let none = serde_json::json!({});

    let first = serde_json::json!({"Records": [lambda_record(&arn, "m-a1", r#"{"id":"a"}"#, none.clone())]});
    let response = invoke(&database_url, &log, &first, "30").await;
    assert_eq!(response, serde_json::json!({"batchItemFailures": []}));

    let final_pass = serde_json::json!({
        "dlq_redriven": string_attr("true"),
        "redrive_count": {"stringValue": "3", "dataType": "Number",
                          "stringListValues": [], "binaryListValues": []},
        "dlq_final_pass": string_attr("true"),
    });
    let second = serde_json::json!({"Records": [
        lambda_record(&arn, "m-a2", r#"{"id":"a"}"#, none.clone()),
        lambda_record(&arn, "m-b", r#"{"id":"b","retry":1}"#, none.clone()),
        lambda_record(&arn, "m-c", r#"{"id":"c","fail":1}"#, final_pass),
        lambda_record(&arn, "m-d", r#"{"id":"d"}"#, none.clone()),
        lambda_record(&arn, "m-e", r#"{"id":"e","fail":1}"#, none.clone()),
        lambda_record(&arn, "m-s", r#"{"id":"s","slow":1}"#, none.clone()),
    ]});
    let started = std::time::Instant::now();
    let response = invoke(&database_url, &log, &second, "4").await;
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

    let store = CheckpointStore::new(pool.clone());
    let status = |key: &'static str| {
        let store = store.clone();
        async move { store.find("lam", key).await.unwrap().unwrap() }
    };
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

    let letters = store.list_dead_letters(Some("lam"), 10).await.unwrap();
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0].idempotency_key, "c");
    let dlq = peek_all(
        &client,
        queue.dlq_url.as_ref().unwrap(),
        1,
        Duration::from_secs(10),
    )
    .await;
    assert_eq!(dlq.len(), 1);
    assert_eq!(dlq[0].body(), Some(r#"{"id":"e","fail":1}"#));
}

/// A second delivery of an event that is running in this worker rides along with it: the
/// handler runs once and both messages are deleted when it completes, instead of the second
/// waiting out the 30 s lease.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delivery_of_an_event_running_here_rides_along() {
    let client = sqs_client().await;
    let (pool, _) = fresh_database().await;
    let queue = fresh_queue(&client, false, 0).await;
    let (handler, calls) = RecordingHandler::new(Duration::from_secs(3), |_| Ok(()));
    let mut config = worker_config(&queue.url);
    config.key = KeySpec::new(vec!["/id".into()]).unwrap();
    config.scope = Some("ride".into());
    let stop = CancellationToken::new();
    let worker = tokio::spawn(
        Worker::new(config, client.clone(), pool, handler)
            .with_shutdown(stop.clone())
            .run(),
    );
    send(&client, &queue.url, r#"{"id":"r1"}"#).await;
    wait_until("the handler to start", Duration::from_secs(20), || {
        let calls = calls.clone();
        async move { !calls.lock().unwrap().is_empty() }
    })
    .await;
    send(&client, &queue.url, r#"{"id":"r1"}"#).await;
    let sent = std::time::Instant::now();
    wait_until("both deliveries deleted", Duration::from_secs(15), || {
        let client = client.clone();
        let url = queue.url.clone();
        async move { messages_in(&client, &url).await == 0 }
    })
    .await;
    assert!(
        sent.elapsed() < Duration::from_secs(10),
        "{:?}",
        sent.elapsed()
    );
    stop.cancel();
    let summary = worker.await.unwrap().unwrap();
    assert_eq!(calls.lock().unwrap().len(), 1);
    assert_eq!(summary.processed, 1, "{summary:?}");
    assert_eq!(summary.duplicates_skipped, 1, "{summary:?}");
    assert_eq!(summary.busy_deferred, 0, "{summary:?}");
}

/// The same final-pass record delivered to two invocations (a Lambda retry of the batch, or
/// SQS's own duplicate delivery): the failing handler runs once, one dead letter is written,
/// and both invocations settle the record.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_final_pass_delivered_twice_runs_its_handler_once() {
    let client = sqs_client().await;
    let (pool, database_url) = fresh_database().await;
    let queue = fresh_queue(&client, true, 5).await;
    let arn = queue_arn(&client, &queue.url).await;
    let dir = tempdir("lambda-final-twice");
    let log = dir.join("done.log");
    let final_pass = serde_json::json!({
        "dlq_redriven": string_attr("true"),
        "redrive_count": {"stringValue": "3", "dataType": "Number",
                          "stringListValues": [], "binaryListValues": []},
        "dlq_final_pass": string_attr("true"),
    });
    let event = serde_json::json!({"Records": [
        lambda_record(&arn, "m-f", r#"{"id":"f","fail":1}"#, final_pass),
    ]});
    for invocation in 1..=2 {
        let response = invoke(&database_url, &log, &event, "30").await;
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
    let store = CheckpointStore::new(pool);
    let letters = store.list_dead_letters(Some("lam"), 10).await.unwrap();
    assert_eq!(letters.len(), 1, "one dead letter: {letters:?}");
    assert_eq!(
        store.find("lam", "f").await.unwrap().unwrap().status,
        "failed"
    );
}
