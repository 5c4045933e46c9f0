//! DLQ redrive markers against real LocalStack and PostgreSQL: a failing final pass ends
//! silently — recorded in dead_letters, deleted, never looping.

mod common;

use std::time::Duration;

use common::*;
use sqs_worker::HandlerError;
use sqs_worker::message::{self, Envelope, KeySpec};
use sqs_worker::redrive::{Action, RedriveOptions, redrive};

store_tests!(
    a_failing_final_pass_is_recorded_and_deleted_without_looping,
    poison_messages_end_in_dead_letters_after_their_final_pass,
    a_redrive_after_a_fix_completes_the_events,
    complete_events_in_the_dlq_are_deleted_not_redriven,
    hostile_redrive_counts_are_recorded_not_redriven,
    dead_letters_can_be_listed_exported_and_requeued,
    duplicates_of_a_redrive_are_skipped_and_a_requeue_runs_once_more,
    tables_keep_their_columns_with_wide_characters,
);

/// Send `body` to the queue as a final pass with this redrive count.
async fn send_final_pass(env: &TestEnv, body: &str, count: &str) {
    let markers = final_pass_markers(count);
    env.send_with_attributes(env.queue_url(), body, &markers)
        .await;
}

async fn a_failing_final_pass_is_recorded_and_deleted_without_looping(kind: StoreKind) {
    let env = TestEnv::on(kind).await;
    send_final_pass(&env, r#"{"id":"fp1"}"#, "3").await;
    send_final_pass(&env, "still not json", "3").await;
    // Hostile marker value: a final pass is a final pass whatever the count says.
    send_final_pass(&env, r#"{"id":"fp2"}"#, "lots").await;

    let (handler, calls) = RecordingHandler::new(Duration::ZERO, |job| {
        assert!(job.is_final_pass());
        Err(HandlerError::retryable("the downstream is still broken"))
    });
    let config = env.config().key("/id").scope("final");
    let summary = env.drain(config, handler, Duration::from_secs(30)).await;

    // Each keyed event ran once: no retry, no backoff loop.
    let counts = calls_per_key(&calls);
    assert_eq!((counts["fp1"], counts["fp2"], counts.len()), (1, 1, 2));
    assert_eq!(summary.dead_lettered, 3);
    assert_eq!((summary.retried, summary.sent_to_dlq), (0, 0));
    assert_eq!(
        env.dlq_messages_in().await,
        0,
        "nothing went back to the DLQ"
    );
    assert_eq!(env.messages_in().await, 0);

    let letters = env.dead_letters(Some("final")).await;
    let mut seen: Vec<(String, String, i32)> = letters
        .iter()
        .map(|l| (l.idempotency_key.clone(), l.reason.clone(), l.redrive_count))
        .collect();
    seen.sort();
    assert_eq!(
        seen,
        [
            ("fp1".to_owned(), "retryable".to_owned(), 3),
            ("fp2".to_owned(), "retryable".to_owned(), 0),
            (
                message::fallback_key("still not json"),
                "invalid_json".to_owned(),
                3
            ),
        ]
    );
    let fp1 = letters.iter().find(|l| l.idempotency_key == "fp1").unwrap();
    assert_eq!(fp1.body, r#"{"id":"fp1"}"#);
    assert_eq!(
        fp1.attributes[message::ATTR_DLQ_FINAL_PASS]["value"],
        "true"
    );
    assert!(fp1.error.contains("still broken"));
    assert_eq!(fp1.queue_url, env.queue_url());
    assert_eq!(env.checkpoint("final", "fp1").await.status, "failed");
    let same = env.store().find_dead_letter(fp1.id).await.unwrap().unwrap();
    assert_eq!(same.message_id, fp1.message_id);
}

fn redrive_options(dlq_url: &str, max_redrives: u32) -> RedriveOptions {
    RedriveOptions {
        dlq_url: dlq_url.to_owned(),
        to: None,
        max_redrives,
        rate: None,
        limit: None,
        dry_run: false,
        include_complete: false,
        filter: None,
        scope: Some("orders".into()),
        key: KeySpec::new(vec!["/id".into()]).unwrap(),
        envelope: Envelope::Raw,
        operator: "test-operator".into(),
    }
}

/// The whole operator story: poison messages reach the DLQ through maxReceiveCount, a
/// redrive with --max-redrives 1 gives them their final pass, it fails, and they end in
/// dead_letters with both queues empty; the handler ran a bounded number of times.
async fn poison_messages_end_in_dead_letters_after_their_final_pass(kind: StoreKind) {
    let env = TestEnv::builder().store(kind).max_receive(2).start().await;
    let dlq_url = env.dlq_url();
    for id in ["p1", "p2"] {
        env.send(&format!(r#"{{"id":"{id}"}}"#)).await;
    }
    let (handler, calls) = RecordingHandler::failing(HandlerError::retryable("bug in the handler"));
    let mut config = env.config().key("/id").scope("orders");
    config.backoff_base = Duration::from_millis(500);
    config.backoff_max = Duration::from_secs(1);
    // Until SQS moves both to the DLQ (third receive > maxReceiveCount 2).
    env.drain(config.clone(), handler.clone(), Duration::from_secs(40))
        .await;
    wait_until(
        "both poison messages in the DLQ",
        Duration::from_secs(20),
        || async { env.dlq_messages_in().await == 2 },
    )
    .await;
    let runs_before_redrive = calls.lock().unwrap().len();
    assert_eq!(runs_before_redrive, 4, "two receives each before the DLQ");

    let report = redrive(
        env.client().clone(),
        env.store().as_ref(),
        &redrive_options(dlq_url, 1),
        |_| {},
    )
    .await
    .unwrap();
    assert_eq!(
        report.target_url,
        env.queue_url(),
        "found through ListDeadLetterSourceQueues"
    );
    assert_eq!(report.counts.redriven, 2);
    assert_eq!(env.dlq_messages_in().await, 0);

    let summary = env.drain(config, handler, Duration::from_secs(30)).await;
    assert_eq!(summary.dead_lettered, 2);
    assert_eq!(
        calls.lock().unwrap().len(),
        runs_before_redrive + 2,
        "one final run each"
    );
    assert_eq!(env.messages_in().await, 0);
    assert_eq!(env.dlq_messages_in().await, 0);
    let letters = env.dead_letters(Some("orders")).await;
    assert_eq!(letters.len(), 2);
    assert!(
        letters
            .iter()
            .all(|l| l.redrive_count == 1 && l.reason == "retryable")
    );
    // A further redrive finds nothing to do: nothing loops.
    let again = redrive(
        env.client().clone(),
        env.store().as_ref(),
        &redrive_options(dlq_url, 1),
        |_| {},
    )
    .await
    .unwrap();
    assert_eq!(again.examined, 0);
}

/// After the handler is fixed, a redrive completes the dead-lettered events — including
/// ones whose checkpoint was marked failed by a permanent error.
async fn a_redrive_after_a_fix_completes_the_events(kind: StoreKind) {
    let env = TestEnv::on(kind).await;
    env.send(r#"{"id":"f1","v":1}"#).await;
    let config = env.config().key("/id").scope("orders");
    let (broken, _) = RecordingHandler::failing(HandlerError::permanent("schema v1 not supported"));
    env.drain(config.clone(), broken, Duration::from_secs(30))
        .await;
    assert_eq!(env.checkpoint("orders", "f1").await.status, "failed");

    let report = redrive(
        env.client().clone(),
        env.store().as_ref(),
        &redrive_options(env.dlq_url(), 3),
        |_| {},
    )
    .await
    .unwrap();
    assert_eq!(report.counts.redriven, 1);
    let (fixed, calls) = RecordingHandler::new(Duration::ZERO, |job| {
        assert_eq!((job.redrive_count(), job.is_final_pass()), (1, false));
        Ok(())
    });
    let summary = env.drain(config, fixed, Duration::from_secs(30)).await;
    assert_eq!(summary.processed, 1);
    assert_eq!(calls.lock().unwrap().len(), 1);
    let checkpoint = env.checkpoint("orders", "f1").await;
    assert_eq!(
        (checkpoint.status.as_str(), checkpoint.attempts),
        ("complete", 2)
    );
    assert_eq!(env.dlq_messages_in().await, 0);
}

/// An event already complete when its copy is found in the DLQ is reported as done and
/// deleted, not redriven; a dry run reports and changes nothing.
async fn complete_events_in_the_dlq_are_deleted_not_redriven(kind: StoreKind) {
    let env = TestEnv::on(kind).await;
    let dlq_url = env.dlq_url();
    env.send(r#"{"id":"done1"}"#).await;
    let (handler, _) = RecordingHandler::succeeding();
    let config = env.config().key("/id").scope("orders");
    env.drain(config, handler, Duration::from_secs(30)).await;
    env.send_to(dlq_url, r#"{"id":"done1"}"#).await;
    env.send_to(dlq_url, r#"{"id":"other"}"#).await;

    let client = env.client().clone();
    let mut dry = redrive_options(dlq_url, 3);
    dry.dry_run = true;
    let mut lines = Vec::new();
    let report = redrive(client.clone(), env.store().as_ref(), &dry, |o| {
        lines.push(o.clone())
    })
    .await
    .unwrap();
    lines.sort_by(|a, b| a.key.cmp(&b.key));
    let seen: Vec<(String, Option<String>, Action)> = lines
        .iter()
        .map(|o| (o.key.clone(), o.checkpoint_status.clone(), o.action.clone()))
        .collect();
    assert_eq!(
        seen,
        [
            (
                "done1".to_owned(),
                Some("complete".to_owned()),
                Action::AlreadyComplete
            ),
            (
                "other".to_owned(),
                None,
                Action::Redriven {
                    redrive_count: 1,
                    final_pass: false
                }
            ),
        ]
    );
    assert_eq!(report.counts.skipped_complete, 1);
    assert_eq!(env.dlq_messages_in().await, 2, "a dry run changes nothing");
    assert_eq!(env.messages_in().await, 0);

    let report = redrive(
        client,
        env.store().as_ref(),
        &redrive_options(dlq_url, 3),
        |_| {},
    )
    .await
    .unwrap();
    assert_eq!(
        (report.counts.skipped_complete, report.counts.redriven),
        (1, 1)
    );
    assert_eq!(env.dlq_messages_in().await, 0);
    let moved = env.peek(1, Duration::from_secs(5)).await;
    assert_eq!(moved.len(), 1);
    assert_eq!(moved[0].body(), Some(r#"{"id":"other"}"#));
    assert_eq!(
        string_attribute(&moved[0], message::ATTR_REDRIVE_COUNT).as_deref(),
        Some("1")
    );
    assert_eq!(
        string_attribute(&moved[0], message::ATTR_DLQ_REDRIVEN).as_deref(),
        Some("true")
    );
}

/// Hostile marker values on DLQ messages get a definite outcome: unreadable counts and
/// counts at or past the maximum are recorded in dead_letters and never sent again.
async fn hostile_redrive_counts_are_recorded_not_redriven(kind: StoreKind) {
    let env = TestEnv::on(kind).await;
    let dlq_url = env.dlq_url();
    for (id, count) in [
        ("h1", "abc"),
        ("h2", "-1"),
        ("h3", "99999999999"),
        ("h4", "4294967295"),
        ("h5", "2"),
    ] {
        let markers = [
            (message::ATTR_REDRIVE_COUNT, count),
            (message::ATTR_DLQ_FINAL_PASS, "maybe"),
        ];
        env.send_with_attributes(dlq_url, &format!(r#"{{"id":"{id}"}}"#), &markers)
            .await;
    }
    let mut outcomes = Vec::new();
    let options = redrive_options(dlq_url, 3);
    let report = redrive(env.client().clone(), env.store().as_ref(), &options, |o| {
        outcomes.push((o.key.clone(), o.action.clone()))
    })
    .await
    .unwrap();
    outcomes.sort_by(|a, b| a.0.cmp(&b.0));
    let exhausted = |reason: &str| Action::Exhausted {
        reason: reason.to_owned(),
    };
    assert_eq!(
        outcomes,
        [
            ("h1".to_owned(), exhausted("invalid_redrive_count")),
            ("h2".to_owned(), exhausted("invalid_redrive_count")),
            ("h3".to_owned(), exhausted("invalid_redrive_count")),
            ("h4".to_owned(), exhausted("redrives_exhausted")),
            (
                "h5".to_owned(),
                Action::Redriven {
                    redrive_count: 3,
                    final_pass: true
                }
            ),
        ]
    );
    assert_eq!(report.counts.exhausted, 4);
    assert_eq!(env.dlq_messages_in().await, 0);
    assert_eq!(env.dead_letters(Some("orders")).await.len(), 4);
    let sent = env.peek(1, Duration::from_secs(5)).await;
    assert_eq!(
        string_attribute(&sent[0], message::ATTR_DLQ_FINAL_PASS).as_deref(),
        Some("true")
    );
}

/// A redrive process killed midway (SIGKILL) loses nothing: every message is in the DLQ,
/// the target, or both; a second run finishes the job.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redrive_killed_midway_loses_nothing() {
    let env = TestEnv::new().await;
    let dlq_url = env.dlq_url();
    let total = 12;
    for i in 0..total {
        env.send_to(dlq_url, &format!(r#"{{"id":"k{i}"}}"#)).await;
    }
    let redrive_process = |extra: &[&str]| {
        let mut command = env.command();
        command
            .args(["redrive", "--dlq-url", dlq_url])
            .args(["--key", "/id", "--scope", "orders"])
            .args(extra);
        command
    };
    let mut slow = redrive_process(&["--rate", "4"]).spawn().unwrap();
    wait_until(
        "a few messages to move",
        Duration::from_secs(20),
        || async { env.messages_in().await >= 3 },
    )
    .await;
    slow.kill().await.unwrap();
    // Sent-then-deleted: a message is in the target, the DLQ, or (killed between the two)
    // both — never in neither.
    let after_kill = env.messages_in().await + env.dlq_messages_in().await;
    assert!(
        after_kill >= total as u64,
        "{after_kill} of {total} messages left after the kill"
    );

    // The killed run held a batch invisible; once it is back, a second run finishes.
    wait_until(
        "the killed run's batch to be visible again",
        Duration::from_secs(60),
        || async { messages_not_visible(env.client(), dlq_url).await == 0 },
    )
    .await;
    let output = tokio::time::timeout(Duration::from_secs(60), redrive_process(&[]).output())
        .await
        .unwrap()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(env.dlq_messages_in().await, 0);
    let in_target = env.messages_in().await as usize;
    let bodies: std::collections::HashSet<String> = env
        .peek(in_target, Duration::from_secs(30))
        .await
        .iter()
        .map(|m| m.body().unwrap().to_owned())
        .collect();
    assert_eq!(
        bodies.len(),
        total,
        "every message reached the target at least once"
    );
    // Two audit rows: the killed run (never finished) and the second.
}

async fn json_output(command: &mut tokio::process::Command) -> serde_json::Value {
    let output = tokio::time::timeout(Duration::from_secs(30), command.output())
        .await
        .unwrap()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).unwrap()
}

/// `dlq peek` shows the worker's failure reasons and keeps nothing: every message is
/// visible again right after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dlq_peek_shows_reasons_and_keeps_nothing() {
    // The queue stands in for a DLQ.
    let env = TestEnv::builder().no_dlq().start().await;
    for (id, reason) in [("a", "handler_permanent"), ("b", "invalid_key")] {
        let attributes = [
            (message::ATTR_FAILURE_REASON, reason),
            (message::ATTR_REDRIVE_COUNT, "1"),
        ];
        env.send_with_attributes(env.queue_url(), &format!(r#"{{"id":"{id}"}}"#), &attributes)
            .await;
    }
    let peeked = json_output(
        env.command()
            .args(["dlq", "peek", "--dlq-url", env.queue_url(), "--key", "/id"])
            .args(["--format", "json"]),
    )
    .await;
    let mut rows: Vec<(String, String, u64)> = peeked
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["key"].as_str().unwrap().to_owned(),
                m["failure_reason"].as_str().unwrap().to_owned(),
                m["redrive_count"].as_u64().unwrap(),
            )
        })
        .collect();
    rows.sort();
    assert_eq!(
        rows,
        [
            ("a".to_owned(), "handler_permanent".to_owned(), 1),
            ("b".to_owned(), "invalid_key".to_owned(), 1)
        ]
    );
    assert_eq!(env.messages_not_visible().await, 0, "peek hid nothing");
    assert_eq!(env.messages_in().await, 2);
}

/// `dead-letters list|export|show|requeue` through the binary: a requeued dead letter goes
/// back to its queue with the redrive count reset, and is marked requeued.
async fn dead_letters_can_be_listed_exported_and_requeued(kind: StoreKind) {
    let env = TestEnv::on(kind).await;
    send_final_pass(&env, r#"{"id":"dl1"}"#, "3").await;
    let (handler, _) = RecordingHandler::failing(HandlerError::permanent("still broken"));
    let config = env.config().key("/id").scope("dl");
    env.drain(config, handler, Duration::from_secs(30)).await;

    let listed = json_output(env.command().args([
        "dead-letters",
        "list",
        "--scope",
        "dl",
        "--format",
        "json",
    ]))
    .await;
    let rows = listed.as_array().unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0]["reason"], "handler_permanent");
    let id = rows[0]["id"].as_i64().unwrap().to_string();

    let exported = env
        .command()
        .args(["dead-letters", "export", "--scope", "dl"])
        .output()
        .await
        .unwrap();
    let lines: Vec<serde_json::Value> = String::from_utf8(exported.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 1);
    assert_eq!(lines[0]["body"], r#"{"id":"dl1"}"#);

    let requeue = env
        .command()
        .args(["dead-letters", "requeue", "--id", &id])
        .output()
        .await
        .unwrap();
    assert!(
        requeue.status.success(),
        "{}",
        String::from_utf8_lossy(&requeue.stderr)
    );
    let back = env.peek(1, Duration::from_secs(10)).await;
    assert_eq!(back.len(), 1);
    assert_eq!(back[0].body(), Some(r#"{"id":"dl1"}"#));
    assert_eq!(
        string_attribute(&back[0], message::ATTR_REDRIVE_COUNT).as_deref(),
        Some("0")
    );
    assert_eq!(
        string_attribute(&back[0], message::ATTR_DLQ_REDRIVEN).as_deref(),
        Some("true")
    );
    assert_eq!(
        string_attribute(&back[0], message::ATTR_DLQ_FINAL_PASS),
        None
    );
    let shown =
        json_output(
            env.command()
                .args(["dead-letters", "show", "--id", &id, "--format", "json"]),
        )
        .await;
    assert!(shown["requeued_at"].is_string());
}

/// Duplicates of one redrive (here of a final pass) do not run a handler that already
/// failed on it, nor write a second dead letter; a deliberate requeue runs it once more.
async fn duplicates_of_a_redrive_are_skipped_and_a_requeue_runs_once_more(kind: StoreKind) {
    let env = TestEnv::on(kind).await;
    let (handler, calls) = RecordingHandler::failing(HandlerError::permanent("still broken"));
    let drain = || {
        let config = env.config().key("/id").scope("dup");
        env.drain(config, handler.clone(), Duration::from_secs(30))
    };

    // The final pass fails once: one dead letter.
    send_final_pass(&env, r#"{"id":"dup1"}"#, "3").await;
    drain().await;
    assert_eq!(calls_per_key(&calls)["dup1"], 1);
    // The same delivery again, in another receive batch: skipped as a duplicate.
    send_final_pass(&env, r#"{"id":"dup1"}"#, "3").await;
    let summary = drain().await;
    assert_eq!(
        calls_per_key(&calls)["dup1"],
        1,
        "the failed handler did not run again"
    );
    assert_eq!(summary.duplicates_skipped, 1);
    assert_eq!(summary.dead_lettered, 0);
    let letters = env.dead_letters(Some("dup")).await;
    assert_eq!(letters.len(), 1, "one dead letter: {letters:?}");
    assert_eq!(env.dlq_messages_in().await, 0);

    // An operator's requeue is a new pass: the handler runs once more (and, failing
    // permanently outside a final pass, sends the message to the DLQ).
    let requeue = env
        .command()
        .args([
            "dead-letters",
            "requeue",
            "--id",
            &letters[0].id.to_string(),
        ])
        .output()
        .await
        .unwrap();
    assert!(
        requeue.status.success(),
        "{}",
        String::from_utf8_lossy(&requeue.stderr)
    );
    let back = env.peek(1, Duration::from_secs(10)).await;
    assert_eq!(
        string_attribute(&back[0], message::ATTR_REQUEUE_GENERATION).as_deref(),
        Some("1")
    );
    drain().await;
    assert_eq!(
        calls_per_key(&calls)["dup1"],
        2,
        "the requeue ran the handler once more"
    );
    let checkpoint = env.checkpoint("dup", "dup1").await;
    assert_eq!(
        (checkpoint.status.as_str(), checkpoint.requeue_generation),
        ("failed", 1)
    );
    assert_eq!(env.peek_dlq(1, Duration::from_secs(10)).await.len(), 1);
}

/// Operator tables measure display width: keys with CJK characters or emoji keep the
/// columns after them straight.
async fn tables_keep_their_columns_with_wide_characters(kind: StoreKind) {
    use unicode_width::UnicodeWidthStr;
    let env = TestEnv::on(kind).await;
    for id in ["注文-一番", "🦀-order", "plain"] {
        send_final_pass(&env, &format!(r#"{{"id":"{id}"}}"#), "3").await;
    }
    let (handler, _) = RecordingHandler::failing(HandlerError::permanent("still broken"));
    let config = env.config().key("/id").scope("wide");
    env.drain(config, handler, Duration::from_secs(30)).await;

    let output = env
        .command()
        .args(["dead-letters", "list", "--scope", "wide"])
        .output()
        .await
        .unwrap();
    assert!(output.status.success());
    let text = String::from_utf8(output.stdout).unwrap();
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 4, "a header and three rows:\n{text}");
    let column_of = |line: &str, needle: &str| {
        let at = line
            .find(needle)
            .unwrap_or_else(|| panic!("{needle} in {line}"));
        line[..at].width()
    };
    let reason_column = column_of(lines[0], "REASON");
    for row in &lines[1..] {
        assert_eq!(
            column_of(row, "handler_permanent"),
            reason_column,
            "the reason column starts at the same display column:\n{text}"
        );
    }
}
