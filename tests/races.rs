//! Holes in the exactly-once promise, each pinned by a test that failed on the code before
//! its fix: deliveries riding along with a running event, mismatched payloads in one batch,
//! FIFO groups outliving their leases, heartbeats, receives burned into the DLQ, redrive
//! runs, settling without the lease, and the claim and completion statements under
//! concurrency and retries. Real LocalStack and PostgreSQL; fail points (with the
//! `failpoints` feature) only where a window must be widened to be hit every time.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use common::*;
use sqs_worker::message::{self, KeySpec};
use sqs_worker::{Handler, HandlerError, Job, WorkerConfig};
use tokio::sync::Notify;

store_tests!(
    a_mismatched_delivery_never_rides_along,
    a_mismatched_first_delivery_leaves_its_siblings_lease_alone,
    riders_are_kept_hidden_while_their_event_runs,
    a_zero_retry_after_still_backs_off,
    a_mismatch_that_cannot_reach_the_dlq_leaves_the_event_alone,
    a_duplicate_of_an_event_running_elsewhere_is_not_pushed_into_the_dlq,
    one_redrive_run_redrives_each_event_once,
    a_stale_permanent_failure_leaves_the_message_to_its_new_holder,
    a_stale_retry_leaves_the_message_to_its_new_holder,
    a_stale_final_pass_leaves_the_message_to_its_new_holder,
    a_retried_claim_recognises_its_own_lease,
    a_retried_completion_recognises_its_own_commit,
    stale_checkpoints_are_listed_and_can_be_marked_failed,
);

/// Keyed by `/id`, in `scope`: every test's config.
fn keyed(env: &TestEnv, scope: &str) -> WorkerConfig {
    env.config().key("/id").scope(scope)
}

/// A handler that counts the runs it started and the ones that ran to the end (the
/// "effect"), sleeping `for_` first.
struct Effects {
    started: AtomicUsize,
    finished: AtomicUsize,
    sleep: Duration,
}

impl Effects {
    fn new(sleep: Duration) -> Arc<Self> {
        Arc::new(Self {
            started: AtomicUsize::new(0),
            finished: AtomicUsize::new(0),
            sleep,
        })
    }
    fn started(&self) -> usize {
        self.started.load(Ordering::SeqCst)
    }
    fn finished(&self) -> usize {
        self.finished.load(Ordering::SeqCst)
    }
}

#[async_trait]
impl Handler for Effects {
    async fn handle(&self, _job: &mut Job) -> Result<(), HandlerError> {
        self.started.fetch_add(1, Ordering::SeqCst);
        tokio::time::sleep(self.sleep).await;
        self.finished.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

/// Wait (at most 20 s) until a handler has started once.
async fn wait_for_start(started: impl Fn() -> usize) {
    wait_until("the handler to start", Duration::from_secs(20), || {
        let started = started();
        async move { started == 1 }
    })
    .await;
}

/// The bodies of the DLQ's messages (up to `expected`, trying for 5 s).
async fn dlq_bodies(env: &TestEnv, expected: usize) -> Vec<String> {
    env.peek_dlq(expected, Duration::from_secs(5))
        .await
        .iter()
        .map(|m| m.body().unwrap_or_default().to_owned())
        .collect()
}

// ---- 1: a later delivery riding along must carry the running event's payload ---------------

/// A delivery with the same key and other content, arriving while the event runs here, used
/// to ride along and be deleted as a duplicate when the event completed: message loss.
async fn a_mismatched_delivery_never_rides_along(kind: StoreKind) {
    let env = TestEnv::on(kind).await;
    let effects = Effects::new(Duration::from_secs(3));
    let worker = env.start(keyed(&env, "ride"), effects.clone());
    env.send(r#"{"id":"r1","v":1}"#).await;
    wait_for_start(|| effects.started()).await;
    env.send(r#"{"id":"r1","v":2}"#).await;
    env.wait_for_empty_queue(Duration::from_secs(30)).await;
    worker.stop().await;
    assert_eq!(effects.finished(), 1);
    let dlq = dlq_bodies(&env, 1).await;
    assert_eq!(
        dlq,
        [r#"{"id":"r1","v":2}"#],
        "the other payload went to the DLQ"
    );
}

// ---- 2: a mismatched first delivery must not release its sibling's lease -------------------

/// In one batch, M1 (another payload) before M2 (the stored payload) of a claimable event:
/// the mismatch path released the lease M2 ran under, M2's completion failed as lease lost
/// and the event was left to run again.
async fn a_mismatched_first_delivery_leaves_its_siblings_lease_alone(kind: StoreKind) {
    let env = TestEnv::on(kind).await;
    let arn = env.queue_arn().await;
    let dir = tempdir("mismatch-sibling");
    let log = dir.join("done.log");
    // The first attempt fails (retryable): the event stays in progress, its lease released.
    let handler = r#"cat > /dev/null
if [ "$SQS_WORKER_ATTEMPT" = 1 ]; then exit 1; fi
sleep 2
echo "$SQS_WORKER_MESSAGE_ID" >> "$LOG""#;
    let none = serde_json::json!({});
    let stored = r#"{"id":"s1","v":2}"#;
    let first = serde_json::json!({"Records": [lambda_record(&arn, "m-0", stored, none.clone())]});
    let response = env.invoke_lambda(&log, &first, "30", handler).await;
    assert_eq!(response["batchItemFailures"].as_array().unwrap().len(), 1);

    let second = serde_json::json!({"Records": [
        lambda_record(&arn, "m-1", r#"{"id":"s1","v":1}"#, none.clone()),
        lambda_record(&arn, "m-2", stored, none.clone()),
    ]});
    let response = env.invoke_lambda(&log, &second, "30", handler).await;
    assert_eq!(
        response,
        serde_json::json!({"batchItemFailures": []}),
        "m-1 went to the DLQ, m-2 completed"
    );
    let checkpoint = env.checkpoint("lam", "s1").await;
    assert_eq!(checkpoint.status, "complete", "{checkpoint:?}");
    assert_eq!(std::fs::read_to_string(&log).unwrap().trim(), "m-2");
    let dlq = dlq_bodies(&env, 1).await;
    assert_eq!(dlq, [r#"{"id":"s1","v":1}"#]);
}

// ---- 3: FIFO: never start a waiting event whose lease has expired -------------------------

/// E1 runs past the visibility timeout while E2 waits in its group; E2's lease expires and
/// E2 is received and run again by a new claim. The group task then ran E2 a second time
/// with its old token. One store only, as the other fail point test: fail points are global
/// to the process, and the same test on two stores at once would take each other's.
#[cfg(feature = "failpoints")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fifo_event_whose_lease_expired_while_waiting_does_not_run() {
    let env = TestEnv::builder().fifo().no_dlq().start().await;
    for id in ["e1", "e2"] {
        env.client()
            .send_message()
            .queue_url(env.queue_url())
            .message_body(format!(r#"{{"id":"{id}"}}"#))
            .message_group_id("g")
            .message_deduplication_id(id)
            .send()
            .await
            .unwrap();
    }
    let runs = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let handler = Arc::new(SlowFirst { runs: runs.clone() });
    let config = keyed(&env, "fifo-wait").visibility(2);
    // After E1, the group task pauses: E2 is visible again and can be received meanwhile.
    fail::cfg("sqs_worker::fifo_next", "1*return(3000)").unwrap();
    let summary = env.drain(config, handler, Duration::from_secs(40)).await;
    fail::remove("sqs_worker::fifo_next");
    let runs = runs.lock().unwrap().clone();
    assert_eq!(
        runs,
        ["e1", "e2"],
        "each event ran once, in order ({summary:?})"
    );
}

/// E1 takes 4 s; anything else is quick.
#[cfg(feature = "failpoints")]
struct SlowFirst {
    runs: Arc<std::sync::Mutex<Vec<String>>>,
}

#[cfg(feature = "failpoints")]
#[async_trait]
impl Handler for SlowFirst {
    async fn handle(&self, job: &mut Job) -> Result<(), HandlerError> {
        if job.key() == "e1" {
            tokio::time::sleep(Duration::from_secs(4)).await;
        }
        self.runs.lock().unwrap().push(job.key().to_owned());
        Ok(())
    }
}

// ---- 4: heartbeat holes ------------------------------------------------------------------

/// A renewal that hangs past the lease: the worker waited for it without watching the lease
/// end, so the handler ran on while the event was taken over and run again.
#[cfg(feature = "failpoints")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hanging_renewal_stops_the_handler_at_its_lease_end() {
    let env = TestEnv::builder().no_dlq().start().await;
    let effects = Effects::new(Duration::from_secs(6));
    let config = keyed(&env, "hang").visibility(2);
    fail::cfg("sqs_worker::renew", "1*return(5000)").unwrap();
    env.send(r#"{"id":"h1"}"#).await;
    env.drain(config, effects.clone(), Duration::from_secs(40))
        .await;
    fail::remove("sqs_worker::renew");
    assert_eq!(
        effects.finished(),
        1,
        "the effect ran once ({} runs)",
        effects.started()
    );
}

/// Deliveries riding along with a long handler: their receipts were never renewed, so each
/// came back every visibility timeout and SQS moved it to the DLQ (maxReceiveCount 2).
async fn riders_are_kept_hidden_while_their_event_runs(kind: StoreKind) {
    let env = TestEnv::builder().store(kind).max_receive(2).start().await;
    let effects = Effects::new(Duration::from_secs(7));
    let config = keyed(&env, "riders").visibility(2);
    let worker = env.start(config, effects.clone());
    env.send(r#"{"id":"k1"}"#).await;
    wait_for_start(|| effects.started()).await;
    env.send(r#"{"id":"k1"}"#).await;
    env.wait_for_empty_queue(Duration::from_secs(30)).await;
    worker.stop().await;
    assert_eq!(effects.finished(), 1);
    assert_eq!(
        env.dlq_messages_in().await,
        0,
        "the duplicate was not pushed into the DLQ"
    );
}

// ---- 5: receives burned into the DLQ -----------------------------------------------------

/// `Retry-After: 0` (or a date in the past) became a zero delay: a run of 503s sent a
/// healthy event through maxReceiveCount into the DLQ within a second or two.
async fn a_zero_retry_after_still_backs_off(kind: StoreKind) {
    let env = TestEnv::builder().store(kind).max_receive(3).start().await;
    let (handler, calls) = RecordingHandler::failing(HandlerError::retry_after(
        "503 Service Unavailable",
        Duration::ZERO,
    ));
    let worker = env.start(keyed(&env, "ra"), handler);
    env.send(r#"{"id":"z1"}"#).await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    worker.stop().await;
    let attempts = calls.lock().unwrap().len();
    assert!(attempts <= 3, "{attempts} attempts in 4 s");
    assert_eq!(env.dlq_messages_in().await, 0);
}

/// A mismatched delivery whose DLQ send fails is retried; each retry claimed the real
/// event's row (attempts + 1) and released it.
async fn a_mismatch_that_cannot_reach_the_dlq_leaves_the_event_alone(kind: StoreKind) {
    let env = TestEnv::builder()
        .store(kind)
        .max_receive(100)
        .start()
        .await;
    // The event fails once with a long Retry-After: in progress, lease released.
    let (handler, _) =
        RecordingHandler::failing(HandlerError::retry_after("later", Duration::from_secs(120)));
    let worker = env.start(keyed(&env, "mm"), handler);
    env.send(r#"{"id":"m1","v":1}"#).await;
    env.wait_for_checkpoint(
        "the first attempt",
        ("mm", "m1"),
        Duration::from_secs(20),
        |c| c.lease_owner.is_none(),
    )
    .await;
    env.client()
        .delete_queue()
        .queue_url(env.dlq_url())
        .send()
        .await
        .unwrap();
    env.send(r#"{"id":"m1","v":2}"#).await;
    tokio::time::sleep(Duration::from_secs(6)).await;
    worker.stop().await;
    let checkpoint = env.checkpoint("mm", "m1").await;
    assert_eq!(checkpoint.attempts, 1, "{checkpoint:?}");
}

/// A duplicate of an event running on another worker was deferred one lease at a time, so
/// during a long handler it was received again and again and pushed into the DLQ.
async fn a_duplicate_of_an_event_running_elsewhere_is_not_pushed_into_the_dlq(kind: StoreKind) {
    let env = TestEnv::builder().store(kind).max_receive(2).start().await;
    let effects = Effects::new(Duration::from_secs(6));
    let config = |id: &str| {
        let mut config = keyed(&env, "busy").visibility(2).worker_id(id);
        config.max_handler_time = Duration::from_secs(10);
        config.concurrency = 1;
        config
    };
    let a = env.start(config("a"), effects.clone());
    env.send(r#"{"id":"b1"}"#).await;
    wait_for_start(|| effects.started()).await;
    // Worker A has no free slot: worker B receives the duplicate.
    let b = env.start(config("b"), effects.clone());
    env.send(r#"{"id":"b1"}"#).await;
    env.wait_for_empty_queue(Duration::from_secs(40)).await;
    let (a, b) = tokio::join!(a.stop(), b.stop());
    assert_eq!(effects.finished(), 1);
    assert_eq!(
        b.duplicates_skipped + a.duplicates_skipped,
        1,
        "{a:?} {b:?}"
    );
    assert_eq!(env.dlq_messages_in().await, 0);
}

// ---- 6: redrive runs -----------------------------------------------------------------------

/// A redriven message that fails at once comes back to the DLQ with a new message id: the
/// same scan redrove it again, up to its final pass.
async fn one_redrive_run_redrives_each_event_once(kind: StoreKind) {
    let env = TestEnv::on(kind).await;
    env.send_to(env.dlq_url(), r#"{"id":"p1"}"#).await;
    let (handler, calls) = RecordingHandler::failing(HandlerError::permanent("still broken"));
    let mut config = keyed(&env, queue_name(env.queue_url()));
    config.wait_time = Duration::from_millis(200);
    let worker = env.start(config, handler);
    let mut options = sqs_worker::redrive::RedriveOptions {
        dlq_url: env.dlq_url().to_owned(),
        to: None,
        max_redrives: 3,
        rate: Some(2.0),
        limit: None,
        dry_run: false,
        include_complete: false,
        filter: None,
        scope: None,
        key: KeySpec::new(vec!["/id".into()]).unwrap(),
        envelope: message::Envelope::Raw,
        operator: "test".into(),
    };
    options.rate = Some(2.0);
    let report =
        sqs_worker::redrive::redrive(env.client().clone(), env.store().as_ref(), &options, |_| {})
            .await
            .unwrap();
    worker.stop().await;
    assert_eq!(report.counts.redriven, 1, "{report:?}");
    assert_eq!(calls.lock().unwrap().len(), 1);
    assert!(env.dead_letters(None).await.is_empty());
}

/// A FIFO DLQ is refused with a line saying why, instead of a scan that holds groups
/// in flight and ends without the rest of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redriving_a_fifo_dlq_is_refused_clearly() {
    let env = TestEnv::builder().fifo().start().await;
    let (dlq, target) = (env.dlq_url(), env.queue_url());
    let output = env
        .command()
        .args(["redrive", "--dlq-url", dlq, "--to", target])
        .output()
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("FIFO"), "{stderr}");
}

// ---- 7: settling without the lease -----------------------------------------------------------

/// How the stale task's handler ends.
#[derive(Clone, Copy, Debug)]
enum Ending {
    Permanent,
    Retryable,
    FinalPass,
}

/// A handler that waits to be released, then ends as told.
struct Held {
    release: Arc<Notify>,
    started: AtomicUsize,
    ending: Ending,
}

#[async_trait]
impl Handler for Held {
    async fn handle(&self, _job: &mut Job) -> Result<(), HandlerError> {
        self.started.fetch_add(1, Ordering::SeqCst);
        self.release.notified().await;
        match self.ending {
            Ending::Permanent => Err(HandlerError::permanent("bad")),
            Ending::Retryable | Ending::FinalPass => Err(HandlerError::retryable("flaky")),
        }
    }
}

/// A task whose lease was taken over — the message received again by another consumer,
/// which claimed the event — must not send it to the DLQ and delete it (a permanent
/// failure): it belongs to the new holder.
async fn a_stale_permanent_failure_leaves_the_message_to_its_new_holder(kind: StoreKind) {
    stale_task_case(kind, Ending::Permanent).await;
}

/// Nor make it visible after a backoff (a retryable failure).
async fn a_stale_retry_leaves_the_message_to_its_new_holder(kind: StoreKind) {
    stale_task_case(kind, Ending::Retryable).await;
}

/// Nor record it in dead_letters and delete it (a failing final pass).
async fn a_stale_final_pass_leaves_the_message_to_its_new_holder(kind: StoreKind) {
    stale_task_case(kind, Ending::FinalPass).await;
}

async fn stale_task_case(kind: StoreKind, ending: Ending) {
    let env = TestEnv::builder().store(kind).max_receive(10).start().await;
    let held = Arc::new(Held {
        release: Arc::new(Notify::new()),
        started: AtomicUsize::new(0),
        ending,
    });
    let mut config = keyed(&env, "stale").visibility(2);
    config.heartbeat = false;
    config.concurrency = 1;
    config.max_handler_time = Duration::from_secs(30);
    let worker = env.start(config, held.clone());
    let markers: &[(&str, &str)] = match ending {
        Ending::FinalPass => &final_pass_markers("3"),
        _ => &[],
    };
    env.send_with_attributes(env.queue_url(), r#"{"id":"t1"}"#, markers)
        .await;
    wait_for_start(|| held.started.load(Ordering::SeqCst)).await;
    // The lease and the visibility run out; another consumer receives the message (for
    // 60 s) and takes the event over (once the store counts the lease as ended).
    tokio::time::sleep(Duration::from_millis(2500) + env.store().lease_grace()).await;
    let taken = env
        .client()
        .receive_message()
        .queue_url(env.queue_url())
        .visibility_timeout(60)
        .wait_time_seconds(5)
        .send()
        .await
        .unwrap();
    assert_eq!(
        taken.messages().len(),
        1,
        "{ending:?}: the new holder has the message"
    );
    let request = sqs_worker::store::ClaimRequest {
        payload_sha256: message::body_sha256(r#"{"id":"t1"}"#),
        message_id: "taken".into(),
        ..claim_request("t1")
    };
    let outcome = env
        .store()
        .claim_batch(
            "stale",
            "new-holder",
            &claim_terms(Duration::from_secs(60)),
            &[request],
        )
        .await
        .unwrap();
    assert!(
        matches!(outcome["t1"], sqs_worker::store::ClaimOutcome::Claimed(_)),
        "{ending:?}: the takeover: {outcome:?}"
    );
    // The stale task ends; the worker stops receiving at once, so what happens to the
    // message is the stale task's doing only.
    held.release.notify_one();
    worker.stop().await;
    tokio::time::sleep(Duration::from_secs(2)).await;

    assert_eq!(
        env.messages_not_visible().await,
        1,
        "{ending:?}: the new holder's message is neither deleted nor shown again"
    );
    assert_eq!(env.dlq_messages_in().await, 0, "{ending:?}: no DLQ copy");
    assert!(
        env.dead_letters(Some("stale")).await.is_empty(),
        "{ending:?}: no dead letter"
    );
    let checkpoint = env.checkpoint("stale", "t1").await;
    assert_eq!(
        (
            checkpoint.status.as_str(),
            checkpoint.lease_owner.as_deref()
        ),
        ("in_progress", Some("new-holder")),
        "{ending:?}"
    );
}

// ---- 8: the claim and completion statements ----------------------------------------------------

/// A claim retried after its commit's reply was lost finds its own lease: it must answer
/// Claimed again (same attempt), not Busy for a whole lease.
async fn a_retried_claim_recognises_its_own_lease(kind: StoreKind) {
    let env = TestEnv::builder().store(kind).no_queue().start().await;
    let store = env.store();
    let request = claim_request("c1");
    let terms = claim_terms(Duration::from_secs(30));
    let first = store
        .claim_batch("s", "w#1", &terms, std::slice::from_ref(&request))
        .await
        .unwrap();
    let again = store
        .claim_batch("s", "w#1", &terms, &[request])
        .await
        .unwrap();
    let (sqs_worker::store::ClaimOutcome::Claimed(a), sqs_worker::store::ClaimOutcome::Claimed(b)) =
        (&first["c1"], &again["c1"])
    else {
        panic!("both claimed: {first:?} then {again:?}");
    };
    assert_eq!(a.attempts, b.attempts);
}

/// A completion retried after its commit's reply was lost must report the event complete,
/// not "lease lost" (which would skip the delete and leave the message to come back).
async fn a_retried_completion_recognises_its_own_commit(kind: StoreKind) {
    let env = TestEnv::builder().store(kind).no_queue().start().await;
    let store = env.store();
    store
        .claim_batch(
            "s",
            "w#1",
            &claim_terms(Duration::from_secs(30)),
            &[claim_request("c2")],
        )
        .await
        .unwrap();
    let entry = [("c2".to_owned(), "w#1".to_owned())];
    assert_eq!(store.complete_batch("s", &entry).await.unwrap(), entry);
    assert_eq!(
        store.complete_batch("s", &entry).await.unwrap(),
        entry,
        "the retry"
    );
    assert!(
        store
            .complete_batch("s", &[("c2".into(), "w#2".into())])
            .await
            .unwrap()
            .is_empty()
    );
}

/// A completion and a claim sharing two keys, in opposite orders, must not deadlock (a
/// deadlock fails one of them, and every failure pauses receiving as "database down"). A
/// trigger slows each row's update so that both statements hold one row while asking for
/// the other. PostgreSQL only: row locks, the planner and a trigger.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completions_and_claims_lock_rows_in_one_order() {
    let env = TestEnv::builder().no_queue().start().await;
    let store = env.store();
    let terms = claim_terms(Duration::from_secs(30));
    store
        .claim_batch("s", "w#1", &terms, &[claim_request("d2")])
        .await
        .unwrap();
    store
        .claim_batch("s", "w#1", &terms, &[claim_request("d1")])
        .await
        .unwrap();
    // A scope with history (2,000 complete events): the planner then walks the completion's
    // keys in the order given, as it would in production, rather than the table's order.
    sqlx::raw_sql(
        "insert into checkpoints (scope, idempotency_key, status, payload_sha256,
                                  first_message_id, last_message_id)
         select 's', 'done-' || i, 'complete', 'h', 'm', 'm' from generate_series(1, 2000) i;
         analyze checkpoints;
         create function slow_update() returns trigger language plpgsql as
           $$ begin perform pg_sleep(0.5); return new; end $$;
         create trigger slow_update before update on checkpoints
           for each row execute function slow_update();",
    )
    .execute(env.pool())
    .await
    .unwrap();
    let backwards = [
        ("d2".to_owned(), "w#1".to_owned()),
        ("d1".to_owned(), "w#1".to_owned()),
    ];
    let both = [claim_request("d1"), claim_request("d2")];
    let complete = store.complete_batch("s", &backwards);
    // The claim starts while the completion holds d2 and sleeps in its trigger.
    let claim = async {
        tokio::time::sleep(Duration::from_millis(100)).await;
        store.claim_batch("s", "w#2", &terms, &both).await
    };
    let started = Instant::now();
    let (completed, claimed) = tokio::join!(complete, claim);
    assert!(
        completed.is_ok() && claimed.is_ok(),
        "no deadlock: {completed:?} / {claimed:?} after {:?}",
        started.elapsed()
    );
}

// ---- 9: events SQS moved to the DLQ itself -----------------------------------------------------

/// An event whose holder stopped without a trace (its message moved to the DLQ by
/// maxReceiveCount, where no worker sees it) stays in progress; `checkpoints stale` lists it
/// and `--mark-failed` says so, while an event with a live lease is left alone.
async fn stale_checkpoints_are_listed_and_can_be_marked_failed(kind: StoreKind) {
    let env = TestEnv::builder().store(kind).no_queue().start().await;
    let store = env.store();
    store
        .claim_batch(
            "s",
            "gone#1",
            &claim_terms(Duration::from_secs(1)),
            &[claim_request("abandoned")],
        )
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(2500) + store.lease_grace()).await;
    store
        .claim_batch(
            "s",
            "alive#1",
            &claim_terms(Duration::from_secs(60)),
            &[claim_request("running")],
        )
        .await
        .unwrap();
    let stale = |mark: bool| {
        let mut command = env.command();
        command.args([
            "checkpoints",
            "stale",
            "--older-than",
            "2s",
            "--format",
            "json",
        ]);
        if mark {
            command.arg("--mark-failed");
        }
        command
    };
    let listed = stale(false).output().await.unwrap();
    assert!(
        listed.status.success(),
        "{}",
        String::from_utf8_lossy(&listed.stderr)
    );
    let listed: serde_json::Value = serde_json::from_slice(&listed.stdout).unwrap();
    let keys: Vec<&str> = listed["stale"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["idempotency_key"].as_str().unwrap())
        .collect();
    assert_eq!(keys, ["abandoned"]);
    assert_eq!(listed["marked_failed"], serde_json::json!([]));

    let marked = stale(true).output().await.unwrap();
    let marked: serde_json::Value = serde_json::from_slice(&marked.stdout).unwrap();
    assert_eq!(marked["marked_failed"], serde_json::json!(["abandoned"]));
    let abandoned = env.checkpoint("s", "abandoned").await;
    assert_eq!(abandoned.status, "failed");
    assert!(abandoned.last_error.unwrap().starts_with("abandoned"));
    assert_eq!(env.checkpoint("s", "running").await.status, "in_progress");
}
