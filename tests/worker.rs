//! The worker core against real LocalStack and PostgreSQL: once-only processing, the
//! webhook race, retries with backoff, dead-lettering, and takeover after a crash.

mod common;

use std::time::Duration;

use common::*;
use sqs_worker::HandlerError;
use sqs_worker::Lease;
use sqs_worker::message::{self, Pass};
use sqs_worker::store::{ClaimOutcome, ClaimRequest};

store_tests!(
    processed_once_and_a_later_duplicate_is_skipped,
    webhook_race_runs_each_event_once,
    concurrent_claims_of_one_key_have_one_winner,
    retryable_failures_back_off_then_succeed,
    permanent_failures_and_bad_bodies_go_to_the_dlq,
    only_a_later_redrive_or_requeue_reclaims_a_failed_event,
);

async fn processed_once_and_a_later_duplicate_is_skipped(kind: StoreKind) {
    let env = TestEnv::on(kind).await;
    let (handler, calls) = RecordingHandler::succeeding();
    let config = env.config().key("/event_id").scope("orders");

    let first_id = env.send(r#"{"event_id":"evt_1","n":1}"#).await;
    let summary = env
        .drain(config.clone(), handler.clone(), Duration::from_secs(30))
        .await;
    assert_eq!(summary.processed, 1);
    assert_eq!(calls_per_key(&calls)["evt_1"], 1);

    let checkpoint = env.checkpoint("orders", "evt_1").await;
    assert_eq!(checkpoint.status, "complete");
    assert_eq!(checkpoint.attempts, 1);
    assert_eq!(checkpoint.first_message_id, first_id);
    assert!(checkpoint.completed_at.is_some() && checkpoint.lease_expires_at.is_none());

    // The same event again, later, as a new SQS message (new MessageId): skipped.
    let second_id = env.send(r#"{"event_id":"evt_1","n":1}"#).await;
    assert_ne!(first_id, second_id);
    let summary = env.drain(config, handler, Duration::from_secs(30)).await;
    assert_eq!(summary.processed, 0);
    assert_eq!(summary.duplicates_skipped, 1);
    assert_eq!(
        calls_per_key(&calls)["evt_1"],
        1,
        "the handler must not run again"
    );
    assert_eq!(env.messages_in().await, 0);
}

/// Seed 002: one webhook delivered three times at once, consumed by 4 pollers in each of two
/// worker instances. Several events make the race happen more than once per run.
async fn webhook_race_runs_each_event_once(kind: StoreKind) {
    let env = TestEnv::on(kind).await;
    let (handler, calls) = RecordingHandler::new(Duration::from_millis(300), |_| Ok(()));

    let events = 5;
    let bodies: Vec<String> = (0..events)
        .flat_map(|event| {
            let body = format!(r#"{{"object_id":"obj-{event}","action":"changed"}}"#);
            [body.clone(), body.clone(), body]
        })
        .collect();
    futures_util::future::join_all(bodies.iter().map(|body| env.send(body))).await;

    let workers = (0..2)
        .map(|i| {
            let mut config = env
                .config()
                .keys(&["/object_id", "/action"])
                // Short leases so deliveries deferred behind a busy lease come back quickly.
                .visibility(3)
                .worker_id(&format!("racer-{i}"));
            config.pollers = 4;
            config.concurrency = 4;
            env.worker(config, handler.clone())
        })
        .collect();
    let summaries = env.drain_workers(workers, Duration::from_secs(60)).await;

    let counts = calls_per_key(&calls);
    assert_eq!(counts.len(), events);
    for (key, count) in &counts {
        assert_eq!(*count, 1, "event {key} ran {count} times");
    }
    let processed: u64 = summaries.iter().map(|s| s.processed).sum();
    let skipped: u64 = summaries.iter().map(|s| s.duplicates_skipped).sum();
    assert_eq!(processed, events as u64);
    assert_eq!(skipped, 2 * events as u64, "{summaries:?}");
    assert_eq!(env.messages_in().await, 0, "all 15 messages are gone");
}

/// The race at its sharpest: two claims for the same new key from two owners in the same
/// instant. Exactly one may win, every time.
async fn concurrent_claims_of_one_key_have_one_winner(kind: StoreKind) {
    let env = TestEnv::builder().store(kind).no_queue().start().await;
    let store = env.store();
    for round in 0..25 {
        let key = format!("race-{round}");
        let request = |message_id: &str| ClaimRequest {
            message_id: message_id.into(),
            ..claim_request(&key)
        };
        let (first, second) = ([request("m1")], [request("m2")]);
        let terms = claim_terms(Duration::from_secs(30));
        let (a, b) = tokio::join!(
            store.claim_batch("s", "worker-a", &terms, &first),
            store.claim_batch("s", "worker-b", &terms, &second),
        );
        let outcomes = [a.unwrap()[&key].clone(), b.unwrap()[&key].clone()];
        let winners = outcomes
            .iter()
            .filter(|o| matches!(o, ClaimOutcome::Claimed(_)))
            .count();
        let busy = outcomes
            .iter()
            .filter(|o| matches!(o, ClaimOutcome::Busy { .. }))
            .count();
        assert_eq!((winners, busy), (1, 1), "round {round}: {outcomes:?}");
    }
}

async fn retryable_failures_back_off_then_succeed(kind: StoreKind) {
    let env = TestEnv::builder().store(kind).max_receive(10).start().await;
    let (handler, calls) = RecordingHandler::new(Duration::ZERO, |job| {
        if job.attempt() < 3 {
            Err(HandlerError::retryable(format!(
                "flaky dependency (attempt {})",
                job.attempt()
            )))
        } else {
            Ok(())
        }
    });
    env.send(r#"{"id":"r1"}"#).await;

    let config = env.config().key("/id").scope("retry");
    let summary = env.drain(config, handler, Duration::from_secs(40)).await;

    let calls = calls.lock().unwrap().clone();
    let attempts: Vec<u32> = calls.iter().map(|c| c.attempt).collect();
    assert_eq!(attempts, [1, 2, 3]);
    // Backoff with base 1 s: attempt 1 waits 0.5–1 s, attempt 2 1–2 s, rounded up to whole
    // seconds by SQS; without the visibility change the message would return after 30 s, and
    // without backoff at once.
    for pair in calls.windows(2) {
        let gap = pair[1].at - pair[0].at;
        assert!(
            gap >= Duration::from_millis(900),
            "retry came back after {gap:?}"
        );
        assert!(
            gap < Duration::from_secs(10),
            "retry waited {gap:?}: the backoff was not applied"
        );
    }
    assert_eq!(summary.retried, 2);
    assert_eq!(summary.processed, 1);
    let checkpoint = env.checkpoint("retry", "r1").await;
    assert_eq!(checkpoint.status, "complete");
    assert_eq!(checkpoint.attempts, 3);
    assert!(checkpoint.last_error.unwrap().contains("attempt 2"));
}

async fn permanent_failures_and_bad_bodies_go_to_the_dlq(kind: StoreKind) {
    let env = TestEnv::on(kind).await;
    let (handler, calls) = RecordingHandler::new(Duration::ZERO, |job| {
        if job.json().unwrap()["bad"] == true {
            Err(HandlerError::permanent("amount must be positive"))
        } else {
            Ok(())
        }
    });
    env.send(r#"{"id":"p1","bad":true}"#).await;
    env.send("definitely not json").await;
    env.send(r#"{"no_id":true}"#).await;
    env.send(r#"{"id":"ok1"}"#).await;

    let config = env.config().key("/id").scope("perm");
    let summary = env.drain(config, handler, Duration::from_secs(30)).await;
    assert_eq!(summary.processed, 1);
    assert_eq!(summary.sent_to_dlq, 3);
    assert_eq!(summary.retried, 0);
    // The handler ran for the two keyed events only, once each.
    let counts = calls_per_key(&calls);
    assert_eq!((counts["p1"], counts["ok1"], counts.len()), (1, 1, 2));

    let dead = env.peek_dlq(3, Duration::from_secs(10)).await;
    let mut reasons: Vec<(String, String)> = dead
        .iter()
        .map(|m| {
            (
                m.body().unwrap().to_owned(),
                string_attribute(m, message::ATTR_FAILURE_REASON).unwrap(),
            )
        })
        .collect();
    reasons.sort();
    assert_eq!(
        reasons,
        [
            ("definitely not json".to_owned(), "invalid_json".to_owned()),
            (
                r#"{"id":"p1","bad":true}"#.to_owned(),
                "handler_permanent".to_owned()
            ),
            (r#"{"no_id":true}"#.to_owned(), "missing_key".to_owned()),
        ]
    );
    let detail = dead.iter().find_map(|m| {
        string_attribute(m, message::ATTR_FAILURE_DETAIL).filter(|d| d.contains("positive"))
    });
    assert!(
        detail.is_some(),
        "the handler's error travels with the message"
    );

    assert_eq!(env.checkpoint("perm", "p1").await.status, "failed");
    let unkeyed = env
        .find_checkpoint("perm", &message::fallback_key("definitely not json"))
        .await
        .expect("a failed checkpoint is recorded under the body hash");
    assert_eq!(unkeyed.status, "failed");
    assert!(unkeyed.last_error.unwrap().contains("not valid JSON"));
    assert_eq!(env.messages_in().await, 0);
}

/// The exec handler through the real binary: body on stdin, the SQS_WORKER_* environment,
/// exit 0 done and exit 65 permanent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_handler_gets_body_and_environment() {
    let env = TestEnv::new().await;
    let log = tempdir("exec").join("calls.log");
    env.send(r#"{"id":"x1","note":"fine"}"#).await;
    env.send(r#"{"id":"x2","note":"poison"}"#).await;

    let script = r#"body=$(cat); echo "$SQS_WORKER_KEY attempt=$SQS_WORKER_ATTEMPT final=$SQS_WORKER_FINAL_PASS body=$body" >> "$CALL_LOG"; case "$body" in *poison*) echo "cannot parse note" >&2; exit 65;; esac"#;
    let output = tokio::time::timeout(
        Duration::from_secs(60),
        env.run_command()
            .args(["--key", "/id", "--scope", "exec"])
            .args(["--wait-time-seconds", "1", "--exit-when-idle", "2"])
            .args(["--", "sh", "-c", script])
            .env("CALL_LOG", &log)
            .output(),
    )
    .await
    .expect("the worker exits once idle")
    .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );

    let mut lines: Vec<String> = std::fs::read_to_string(&log)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect();
    lines.sort();
    assert_eq!(
        lines,
        [
            r#"x1 attempt=1 final=false body={"id":"x1","note":"fine"}"#,
            r#"x2 attempt=1 final=false body={"id":"x2","note":"poison"}"#,
        ]
    );
    assert_eq!(env.checkpoint("exec", "x1").await.status, "complete");
    let failed = env.checkpoint("exec", "x2").await;
    assert_eq!(failed.status, "failed");
    assert!(failed.last_error.unwrap().contains("cannot parse note"));
    let dead = env.peek_dlq(1, Duration::from_secs(10)).await;
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].body(), Some(r#"{"id":"x2","note":"poison"}"#));
    assert_eq!(env.messages_in().await, 0);
}

/// A worker process SIGKILLed mid-handler: its lease and the message's visibility expire
/// together, and another worker takes the event over and completes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_worker_is_taken_over_after_the_lease_expires() {
    let env = TestEnv::new().await;
    let marker = tempdir("kill").join("started");
    env.send(r#"{"id":"k1"}"#).await;

    let mut victim = env
        .run_command()
        .args(["--key", "/id", "--scope", "kill"])
        .args(["--wait-time-seconds", "1", "--visibility-timeout", "4"])
        .args(["--worker-id", "victim", "--"])
        .args(["sh", "-c", r#"echo $$ > "$MARKER"; exec sleep 60"#])
        .env("MARKER", &marker)
        .spawn()
        .unwrap();
    wait_until(
        "the victim's handler to start",
        Duration::from_secs(30),
        || {
            let marker = marker.clone();
            async move { std::fs::read_to_string(&marker).is_ok_and(|s| !s.trim().is_empty()) }
        },
    )
    .await;
    victim.kill().await.unwrap(); // SIGKILL: no drain, no cleanup
    // The orphaned handler process would sleep on; end it so it cannot interfere.
    let handler_pid = std::fs::read_to_string(&marker).unwrap().trim().to_owned();
    let _ = std::process::Command::new("kill")
        .args(["-9", &handler_pid])
        .status();

    let held = env.checkpoint("kill", "k1").await;
    assert_eq!(held.status, "in_progress");
    // The lease owner is the worker id plus the number of its claim statement.
    assert!(held.lease_owner.unwrap().starts_with("victim#"));

    let (handler, calls) = RecordingHandler::succeeding();
    let config = env.config().key("/id").scope("kill").worker_id("rescuer");
    let summary = env.drain(config, handler, Duration::from_secs(40)).await;
    let calls = calls.lock().unwrap().clone();
    assert_eq!(calls.len(), 1, "the rescuer ran the event once");
    assert_eq!(
        calls[0].attempt, 2,
        "a takeover counts as the second attempt"
    );
    assert_eq!(summary.processed, 1);
    let done = env.checkpoint("kill", "k1").await;
    assert_eq!(done.status, "complete");
    assert_eq!(done.attempts, 2);
}

/// A failed event is claimed again only by a later pass: a redrive, then a deliberate
/// requeue. Plain duplicates, and duplicates of a redrive that already failed, are not.
async fn only_a_later_redrive_or_requeue_reclaims_a_failed_event(kind: StoreKind) {
    let env = TestEnv::builder().store(kind).no_queue().start().await;
    let store = env.store();
    let request = |reclaim_failed, requeue_generation, redrive_count| ClaimRequest {
        message_id: "m".into(),
        reclaim_failed,
        pass: Pass {
            requeue_generation,
            redrive_count,
        },
        ..claim_request("f1")
    };
    let terms = claim_terms(Duration::from_secs(30));
    let claim = |r: ClaimRequest| {
        let terms = &terms;
        async move { store.claim_batch("s", "w", terms, &[r]).await.unwrap()["f1"].clone() }
    };
    assert!(matches!(
        claim(request(false, 0, 0)).await,
        ClaimOutcome::Claimed(_)
    ));
    assert!(
        store
            .mark_failed(&Lease::new("s", "f1", "w"), "boom")
            .await
            .unwrap()
    );
    assert_eq!(
        claim(request(false, 0, 0)).await,
        ClaimOutcome::Failed {
            stored_payload_sha256: "h".into()
        }
    );
    // The first redrive gets another chance...
    let ClaimOutcome::Claimed(again) = claim(request(true, 0, 1)).await else {
        panic!("a redrive gets another chance")
    };
    assert_eq!(again.attempts, 2);
    assert!(again.resumed);
    assert!(
        store
            .mark_failed(&Lease::new("s", "f1", "w"), "boom again")
            .await
            .unwrap()
    );
    // ...but a duplicate of that redrive (or an older one) does not run it a third time.
    assert_eq!(
        claim(request(true, 0, 1)).await,
        ClaimOutcome::Failed {
            stored_payload_sha256: "h".into()
        }
    );
    assert_eq!(
        claim(request(true, 0, 0)).await,
        ClaimOutcome::Failed {
            stored_payload_sha256: "h".into()
        }
    );
    // A deliberate requeue starts its redrive count again, and is still a later pass.
    let ClaimOutcome::Claimed(requeued) = claim(request(true, 1, 0)).await else {
        panic!("a requeue gets another chance")
    };
    assert_eq!(requeued.attempts, 3);
    let row = env.checkpoint("s", "f1").await;
    assert_eq!((row.requeue_generation, row.redrive_count), (1, 0));
    // Fencing: another owner cannot complete or fail a lease it does not hold.
    assert!(
        store
            .complete_batch("s", &[("f1".into(), "intruder".into())])
            .await
            .unwrap()
            .is_empty()
    );
    assert!(
        !store
            .mark_failed(&Lease::new("s", "f1", "intruder"), "x")
            .await
            .unwrap()
    );
    assert_eq!(
        store
            .complete_batch("s", &[("f1".into(), "w".into())])
            .await
            .unwrap(),
        [("f1".to_owned(), "w".to_owned())]
    );
}

/// SIGTERM while a handler runs: no new receives, the handler finishes, its event completes
/// and is deleted, and the process exits 0 well within --shutdown-timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_the_running_handler_finish_then_exits_zero() {
    let env = TestEnv::new().await;
    let log = tempdir("term").join("handler.log");
    env.send(r#"{"id":"t1"}"#).await;

    let mut worker = env
        .run_command()
        .args(["--key", "/id", "--scope", "term"])
        .args(["--wait-time-seconds", "3", "--shutdown-timeout", "15", "--"])
        .args([
            "sh",
            "-c",
            r#"echo started >> "$LOG"; sleep 2; echo finished >> "$LOG""#,
        ])
        .env("LOG", &log)
        .spawn()
        .unwrap();
    wait_until("the handler to start", Duration::from_secs(30), || {
        let log = log.clone();
        async move { std::fs::read_to_string(&log).is_ok_and(|s| s.contains("started")) }
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
    let status = tokio::time::timeout(Duration::from_secs(20), worker.wait())
        .await
        .expect("the worker exits within the shutdown timeout")
        .unwrap();
    assert!(status.success(), "exit status {status:?}");
    // The drain waits for the 2 s handler and the ≤3 s long poll in flight, not the deadline.
    assert!(
        sent_at.elapsed() < Duration::from_secs(10),
        "drain took {:?}",
        sent_at.elapsed()
    );
    assert_eq!(
        std::fs::read_to_string(&log).unwrap(),
        "started\nfinished\n"
    );
    assert_eq!(env.checkpoint("term", "t1").await.status, "complete");
    assert_eq!(env.messages_in().await, 0);
}
