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
use sqs_worker::sqs::string_attribute as attribute;
use sqs_worker::{CheckpointStore, Handler, HandlerError, Job, Worker, WorkerConfig};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

fn keyed(queue_url: &str, scope: &str) -> WorkerConfig {
    let mut config = worker_config(queue_url);
    config.key = KeySpec::new(vec!["/id".into()]).unwrap();
    config.scope = Some(scope.into());
    config
}

fn start(
    worker: Worker,
    stop: &CancellationToken,
) -> tokio::task::JoinHandle<sqs_worker::RunSummary> {
    let worker = worker.with_shutdown(stop.clone());
    tokio::spawn(async move { worker.run().await.expect("the worker runs") })
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

/// Wait (at most `within`) until the queue holds nothing: visible, in flight or delayed.
async fn wait_for_empty(client: &aws_sdk_sqs::Client, queue_url: &str, within: Duration) {
    wait_until("the queue to drain", within, || async move {
        messages_in(client, queue_url).await == 0
    })
    .await;
}

/// Wait (at most 20 s) until a handler has started once.
async fn wait_for_start(started: impl Fn() -> usize) {
    wait_until("the handler to start", Duration::from_secs(20), || {
        let started = started();
        async move { started == 1 }
    })
    .await;
}

async fn dlq_bodies(client: &aws_sdk_sqs::Client, dlq_url: &str, expected: usize) -> Vec<String> {
    peek_all(client, dlq_url, expected, Duration::from_secs(5))
        .await
        .iter()
        .map(|m| m.body().unwrap_or_default().to_owned())
        .collect()
}

// ---- 1: a later delivery riding along must carry the running event's payload ---------------

/// A delivery with the same key and other content, arriving while the event runs here, used
/// to ride along and be deleted as a duplicate when the event completed: message loss.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mismatched_delivery_never_rides_along() {
    let client = sqs_client().await;
    let (pool, _) = fresh_database().await;
    let queue = fresh_queue(&client, true, 5).await;
    let effects = Effects::new(Duration::from_secs(3));
    let stop = CancellationToken::new();
    let worker = start(
        Worker::new(
            keyed(&queue.url, "ride"),
            client.clone(),
            pool,
            effects.clone(),
        ),
        &stop,
    );
    send(&client, &queue.url, r#"{"id":"r1","v":1}"#).await;
    wait_for_start(|| effects.started()).await;
    send(&client, &queue.url, r#"{"id":"r1","v":2}"#).await;
    wait_for_empty(&client, &queue.url, Duration::from_secs(30)).await;
    stop.cancel();
    worker.await.unwrap();
    assert_eq!(effects.finished(), 1);
    let dlq = dlq_bodies(&client, queue.dlq_url.as_ref().unwrap(), 1).await;
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
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mismatched_first_delivery_leaves_its_siblings_lease_alone() {
    let client = sqs_client().await;
    let (pool, database_url) = fresh_database().await;
    let queue = fresh_queue(&client, true, 5).await;
    let arn = queue_arn(&client, &queue.url).await;
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
    let response = invoke_lambda(
        sqs_worker_command(&database_url),
        &log,
        &first,
        "30",
        handler,
    )
    .await;
    assert_eq!(response["batchItemFailures"].as_array().unwrap().len(), 1);

    let second = serde_json::json!({"Records": [
        lambda_record(&arn, "m-1", r#"{"id":"s1","v":1}"#, none.clone()),
        lambda_record(&arn, "m-2", stored, none.clone()),
    ]});
    let response = invoke_lambda(
        sqs_worker_command(&database_url),
        &log,
        &second,
        "30",
        handler,
    )
    .await;
    assert_eq!(
        response,
        serde_json::json!({"batchItemFailures": []}),
        "m-1 went to the DLQ, m-2 completed"
    );
    let checkpoint = CheckpointStore::new(pool)
        .find("lam", "s1")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(checkpoint.status, "complete", "{checkpoint:?}");
    assert_eq!(std::fs::read_to_string(&log).unwrap().trim(), "m-2");
    let dlq = dlq_bodies(&client, queue.dlq_url.as_ref().unwrap(), 1).await;
    assert_eq!(dlq, [r#"{"id":"s1","v":1}"#]);
}

// ---- 3: FIFO: never start a waiting event whose lease has expired -------------------------

/// E1 runs past the visibility timeout while E2 waits in its group; E2's lease expires and
/// E2 is received and run again by a new claim. The group task then ran E2 a second time
/// with its old token.
#[cfg(feature = "failpoints")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fifo_event_whose_lease_expired_while_waiting_does_not_run() {
    let client = sqs_client().await;
    let (pool, _) = fresh_database().await;
    let queue_url = fresh_fifo(&client).await;
    for id in ["e1", "e2"] {
        client
            .send_message()
            .queue_url(&queue_url)
            .message_body(format!(r#"{{"id":"{id}"}}"#))
            .message_group_id("g")
            .message_deduplication_id(id)
            .send()
            .await
            .unwrap();
    }
    let runs = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let handler = Arc::new(SlowFirst { runs: runs.clone() });
    let mut config = keyed(&queue_url, "fifo-wait");
    config.visibility_timeout = Some(Duration::from_secs(2));
    // After E1, the group task pauses: E2 is visible again and can be received meanwhile.
    fail::cfg("sqs_worker::fifo_next", "1*return(3000)").unwrap();
    let summaries = run_until_drained(
        &client,
        &queue_url,
        vec![Worker::new(config, client.clone(), pool, handler)],
        Duration::from_secs(40),
    )
    .await;
    fail::remove("sqs_worker::fifo_next");
    let runs = runs.lock().unwrap().clone();
    assert_eq!(
        runs,
        ["e1", "e2"],
        "each event ran once, in order ({summaries:?})"
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

async fn fresh_fifo(client: &aws_sdk_sqs::Client) -> String {
    use aws_sdk_sqs::types::QueueAttributeName;
    client
        .create_queue()
        .queue_name(format!("{}.fifo", unique("f").replace('_', "-")))
        .attributes(QueueAttributeName::FifoQueue, "true")
        .attributes(QueueAttributeName::VisibilityTimeout, "30")
        .send()
        .await
        .unwrap()
        .queue_url()
        .unwrap()
        .to_owned()
}

// ---- 4: heartbeat holes ------------------------------------------------------------------

/// A renewal that hangs past the lease: the worker waited for it without watching the lease
/// end, so the handler ran on while the event was taken over and run again.
#[cfg(feature = "failpoints")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hanging_renewal_stops_the_handler_at_its_lease_end() {
    let client = sqs_client().await;
    let (pool, _) = fresh_database().await;
    let queue = fresh_queue(&client, false, 5).await;
    let effects = Effects::new(Duration::from_secs(6));
    let mut config = keyed(&queue.url, "hang");
    config.visibility_timeout = Some(Duration::from_secs(2));
    fail::cfg("sqs_worker::renew", "1*return(5000)").unwrap();
    send(&client, &queue.url, r#"{"id":"h1"}"#).await;
    run_until_drained(
        &client,
        &queue.url,
        vec![Worker::new(config, client.clone(), pool, effects.clone())],
        Duration::from_secs(40),
    )
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
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn riders_are_kept_hidden_while_their_event_runs() {
    let client = sqs_client().await;
    let (pool, _) = fresh_database().await;
    let queue = fresh_queue(&client, true, 2).await;
    let effects = Effects::new(Duration::from_secs(7));
    let mut config = keyed(&queue.url, "riders");
    config.visibility_timeout = Some(Duration::from_secs(2));
    let stop = CancellationToken::new();
    let worker = start(
        Worker::new(config, client.clone(), pool, effects.clone()),
        &stop,
    );
    send(&client, &queue.url, r#"{"id":"k1"}"#).await;
    wait_for_start(|| effects.started()).await;
    send(&client, &queue.url, r#"{"id":"k1"}"#).await;
    wait_for_empty(&client, &queue.url, Duration::from_secs(30)).await;
    stop.cancel();
    worker.await.unwrap();
    assert_eq!(effects.finished(), 1);
    assert_eq!(
        messages_in(&client, queue.dlq_url.as_ref().unwrap()).await,
        0,
        "the duplicate was not pushed into the DLQ"
    );
}

// ---- 5: receives burned into the DLQ -----------------------------------------------------

/// `Retry-After: 0` (or a date in the past) became a zero delay: a run of 503s sent a
/// healthy event through maxReceiveCount into the DLQ within a second or two.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_zero_retry_after_still_backs_off() {
    let client = sqs_client().await;
    let (pool, _) = fresh_database().await;
    let queue = fresh_queue(&client, true, 3).await;
    let (handler, calls) = RecordingHandler::new(Duration::ZERO, |_| {
        Err(HandlerError::retry_after(
            "503 Service Unavailable",
            Duration::ZERO,
        ))
    });
    let stop = CancellationToken::new();
    let worker = start(
        Worker::new(keyed(&queue.url, "ra"), client.clone(), pool, handler),
        &stop,
    );
    send(&client, &queue.url, r#"{"id":"z1"}"#).await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    stop.cancel();
    worker.await.unwrap();
    let attempts = calls.lock().unwrap().len();
    assert!(attempts <= 3, "{attempts} attempts in 4 s");
    assert_eq!(
        messages_in(&client, queue.dlq_url.as_ref().unwrap()).await,
        0
    );
}

/// A mismatched delivery whose DLQ send fails is retried; each retry claimed the real
/// event's row (attempts + 1) and released it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mismatch_that_cannot_reach_the_dlq_leaves_the_event_alone() {
    let client = sqs_client().await;
    let (pool, _) = fresh_database().await;
    let queue = fresh_queue(&client, true, 100).await;
    // The event fails once with a long Retry-After: in progress, lease released.
    let (handler, _) = RecordingHandler::new(Duration::ZERO, |_| {
        Err(HandlerError::retry_after("later", Duration::from_secs(120)))
    });
    let stop = CancellationToken::new();
    let worker = start(
        Worker::new(
            keyed(&queue.url, "mm"),
            client.clone(),
            pool.clone(),
            handler,
        ),
        &stop,
    );
    send(&client, &queue.url, r#"{"id":"m1","v":1}"#).await;
    let store = CheckpointStore::new(pool);
    wait_until("the first attempt", Duration::from_secs(20), || {
        let store = store.clone();
        async move {
            store
                .find("mm", "m1")
                .await
                .unwrap()
                .is_some_and(|c| c.lease_owner.is_none())
        }
    })
    .await;
    client
        .delete_queue()
        .queue_url(queue.dlq_url.as_ref().unwrap())
        .send()
        .await
        .unwrap();
    send(&client, &queue.url, r#"{"id":"m1","v":2}"#).await;
    tokio::time::sleep(Duration::from_secs(6)).await;
    stop.cancel();
    worker.await.unwrap();
    let checkpoint = store.find("mm", "m1").await.unwrap().unwrap();
    assert_eq!(checkpoint.attempts, 1, "{checkpoint:?}");
}

/// A duplicate of an event running on another worker was deferred one lease at a time, so
/// during a long handler it was received again and again and pushed into the DLQ.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_duplicate_of_an_event_running_elsewhere_is_not_pushed_into_the_dlq() {
    let client = sqs_client().await;
    let (pool, _) = fresh_database().await;
    let queue = fresh_queue(&client, true, 2).await;
    let effects = Effects::new(Duration::from_secs(6));
    let config = |id: &str| {
        let mut config = keyed(&queue.url, "busy");
        config.visibility_timeout = Some(Duration::from_secs(2));
        config.max_handler_time = Duration::from_secs(10);
        config.concurrency = 1;
        config.worker_id = Some(id.into());
        config
    };
    let stop = CancellationToken::new();
    let a = start(
        Worker::new(config("a"), client.clone(), pool.clone(), effects.clone()),
        &stop,
    );
    send(&client, &queue.url, r#"{"id":"b1"}"#).await;
    wait_for_start(|| effects.started()).await;
    // Worker A has no free slot: worker B receives the duplicate.
    let b = start(
        Worker::new(config("b"), client.clone(), pool, effects.clone()),
        &stop,
    );
    send(&client, &queue.url, r#"{"id":"b1"}"#).await;
    wait_for_empty(&client, &queue.url, Duration::from_secs(40)).await;
    stop.cancel();
    let (a, b) = (a.await.unwrap(), b.await.unwrap());
    assert_eq!(effects.finished(), 1);
    assert_eq!(
        b.duplicates_skipped + a.duplicates_skipped,
        1,
        "{a:?} {b:?}"
    );
    assert_eq!(
        messages_in(&client, queue.dlq_url.as_ref().unwrap()).await,
        0
    );
}

// ---- 6: redrive runs -----------------------------------------------------------------------

/// A redriven message that fails at once comes back to the DLQ with a new message id: the
/// same scan redrove it again, up to its final pass.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_redrive_run_redrives_each_event_once() {
    let client = sqs_client().await;
    let (pool, _) = fresh_database().await;
    let queue = fresh_queue(&client, true, 5).await;
    let dlq_url = queue.dlq_url.clone().unwrap();
    send(&client, &dlq_url, r#"{"id":"p1"}"#).await;
    let (handler, calls) = RecordingHandler::new(Duration::ZERO, |_| {
        Err(HandlerError::permanent("still broken"))
    });
    let mut config = keyed(&queue.url, queue_name(&queue.url));
    config.wait_time = Duration::from_millis(200);
    let stop = CancellationToken::new();
    let worker = start(
        Worker::new(config, client.clone(), pool.clone(), handler),
        &stop,
    );
    let store = CheckpointStore::new(pool.clone());
    let mut options = sqs_worker::redrive::RedriveOptions {
        dlq_url: dlq_url.clone(),
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
    let report = sqs_worker::redrive::redrive(client.clone(), &store, &options, |_| {})
        .await
        .unwrap();
    stop.cancel();
    worker.await.unwrap();
    assert_eq!(report.counts.redriven, 1, "{report:?}");
    assert_eq!(calls.lock().unwrap().len(), 1);
    assert!(store.list_dead_letters(None, 10).await.unwrap().is_empty());
}

/// A FIFO DLQ is refused with a line saying why, instead of a scan that holds groups
/// in flight and ends without the rest of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redriving_a_fifo_dlq_is_refused_clearly() {
    let client = sqs_client().await;
    let (_pool, database_url) = fresh_database().await;
    let dlq = fresh_fifo(&client).await;
    let target = fresh_fifo(&client).await;
    let output = sqs_worker_command(&database_url)
        .args(["redrive", "--dlq-url", &dlq, "--to", &target])
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
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_permanent_failure_leaves_the_message_to_its_new_holder() {
    stale_task_case(Ending::Permanent).await;
}

/// Nor make it visible after a backoff (a retryable failure).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_retry_leaves_the_message_to_its_new_holder() {
    stale_task_case(Ending::Retryable).await;
}

/// Nor record it in dead_letters and delete it (a failing final pass).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_final_pass_leaves_the_message_to_its_new_holder() {
    stale_task_case(Ending::FinalPass).await;
}

async fn stale_task_case(ending: Ending) {
    let client = sqs_client().await;
    let (pool, _) = fresh_database().await;
    let queue = fresh_queue(&client, true, 10).await;
    let dlq_url = queue.dlq_url.clone().unwrap();
    let held = Arc::new(Held {
        release: Arc::new(Notify::new()),
        started: AtomicUsize::new(0),
        ending,
    });
    let mut config = keyed(&queue.url, "stale");
    config.visibility_timeout = Some(Duration::from_secs(2));
    config.heartbeat = false;
    config.concurrency = 1;
    config.max_handler_time = Duration::from_secs(30);
    let stop = CancellationToken::new();
    let worker = start(
        Worker::new(config, client.clone(), pool.clone(), held.clone()),
        &stop,
    );
    let mut send = client
        .send_message()
        .queue_url(&queue.url)
        .message_body(r#"{"id":"t1"}"#);
    if matches!(ending, Ending::FinalPass) {
        send = send
            .message_attributes(message::ATTR_DLQ_REDRIVEN, attribute("true"))
            .message_attributes(message::ATTR_REDRIVE_COUNT, attribute("3"))
            .message_attributes(message::ATTR_DLQ_FINAL_PASS, attribute("true"));
    }
    send.send().await.unwrap();
    wait_for_start(|| held.started.load(Ordering::SeqCst)).await;
    // The lease and the visibility run out; another consumer receives the message (for
    // 60 s) and takes the event over.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let taken = client
        .receive_message()
        .queue_url(&queue.url)
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
    let store = CheckpointStore::new(pool);
    let request = sqs_worker::checkpoint::ClaimRequest {
        key: "t1".into(),
        payload_sha256: message::body_sha256(r#"{"id":"t1"}"#),
        message_id: "taken".into(),
        reclaim_failed: false,
        pass: Default::default(),
        field_digests: None,
    };
    let outcome = store
        .claim_batch(
            "stale",
            "new-holder",
            &terms(Duration::from_secs(60)),
            &[request],
        )
        .await
        .unwrap();
    assert!(
        matches!(
            outcome["t1"],
            sqs_worker::checkpoint::ClaimOutcome::Claimed(_)
        ),
        "{ending:?}: the takeover: {outcome:?}"
    );
    // The stale task ends; the worker stops receiving at once, so what happens to the
    // message is the stale task's doing only.
    held.release.notify_one();
    stop.cancel();
    worker.await.unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;

    assert_eq!(
        messages_not_visible(&client, &queue.url).await,
        1,
        "{ending:?}: the new holder's message is neither deleted nor shown again"
    );
    assert_eq!(
        messages_in(&client, &dlq_url).await,
        0,
        "{ending:?}: no DLQ copy"
    );
    assert!(
        store
            .list_dead_letters(Some("stale"), 10)
            .await
            .unwrap()
            .is_empty(),
        "{ending:?}: no dead letter"
    );
    let checkpoint = store.find("stale", "t1").await.unwrap().unwrap();
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
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_claim_recognises_its_own_lease() {
    let (pool, _) = fresh_database().await;
    let store = CheckpointStore::new(pool);
    let request = claim_request("c1");
    let lease = Duration::from_secs(30);
    let first = store
        .claim_batch("s", "w#1", &terms(lease), std::slice::from_ref(&request))
        .await
        .unwrap();
    let again = store
        .claim_batch("s", "w#1", &terms(lease), &[request])
        .await
        .unwrap();
    let (
        sqs_worker::checkpoint::ClaimOutcome::Claimed(a),
        sqs_worker::checkpoint::ClaimOutcome::Claimed(b),
    ) = (&first["c1"], &again["c1"])
    else {
        panic!("both claimed: {first:?} then {again:?}");
    };
    assert_eq!(a.attempts, b.attempts);
}

/// A completion retried after its commit's reply was lost must report the event complete,
/// not "lease lost" (which would skip the delete and leave the message to come back).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_completion_recognises_its_own_commit() {
    let (pool, _) = fresh_database().await;
    let store = CheckpointStore::new(pool);
    store
        .claim_batch(
            "s",
            "w#1",
            &terms(Duration::from_secs(30)),
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
/// the other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completions_and_claims_lock_rows_in_one_order() {
    let (pool, _) = fresh_database().await;
    let store = CheckpointStore::new(pool.clone());
    let lease = Duration::from_secs(30);
    store
        .claim_batch("s", "w#1", &terms(lease), &[claim_request("d2")])
        .await
        .unwrap();
    store
        .claim_batch("s", "w#1", &terms(lease), &[claim_request("d1")])
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
    .execute(&pool)
    .await
    .unwrap();
    let backwards = [
        ("d2".to_owned(), "w#1".to_owned()),
        ("d1".to_owned(), "w#1".to_owned()),
    ];
    let both = [claim_request("d1"), claim_request("d2")];
    let terms = terms(lease);
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

fn terms(lease: Duration) -> sqs_worker::checkpoint::ClaimTerms {
    sqs_worker::checkpoint::ClaimTerms {
        lease,
        run_limit: lease,
        accept_mismatch: false,
    }
}

fn claim_request(key: &str) -> sqs_worker::checkpoint::ClaimRequest {
    sqs_worker::checkpoint::ClaimRequest {
        key: key.into(),
        payload_sha256: "h".into(),
        message_id: format!("m-{key}"),
        reclaim_failed: false,
        pass: Default::default(),
        field_digests: None,
    }
}

// ---- 9: events SQS moved to the DLQ itself -----------------------------------------------------

/// An event whose holder stopped without a trace (its message moved to the DLQ by
/// maxReceiveCount, where no worker sees it) stays in progress; `checkpoints stale` lists it
/// and `--mark-failed` says so, while an event with a live lease is left alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_checkpoints_are_listed_and_can_be_marked_failed() {
    let (pool, database_url) = fresh_database().await;
    let store = CheckpointStore::new(pool);
    store
        .claim_batch(
            "s",
            "gone#1",
            &terms(Duration::from_secs(1)),
            &[claim_request("abandoned")],
        )
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    store
        .claim_batch(
            "s",
            "alive#1",
            &terms(Duration::from_secs(60)),
            &[claim_request("running")],
        )
        .await
        .unwrap();
    let stale = |mark: bool| {
        let mut command = sqs_worker_command(&database_url);
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
    let abandoned = store.find("s", "abandoned").await.unwrap().unwrap();
    assert_eq!(abandoned.status, "failed");
    assert!(abandoned.last_error.unwrap().starts_with("abandoned"));
    assert_eq!(
        store.find("s", "running").await.unwrap().unwrap().status,
        "in_progress"
    );
}
