//! What only the DynamoDB store has to show: leases judged by the workers' own clocks. A
//! clock ahead by less than the store's grace never takes over a live lease; one further
//! off takes over early, and the lease token still keeps every write single. Real DynamoDB
//! API (the local endpoint `localstack/up` starts), a fresh table per test.

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::json;
use sqs_worker::store::{ClaimOutcome, Lease};

const LEASE: Duration = Duration::from_secs(3);

/// The test's table as a worker whose clock is `skew_ms` ahead sees it.
fn skewed(env: &TestEnv, skew_ms: i64) -> sqs_worker::store::DynamoStore {
    let store = env.store().dynamodb().expect("a DynamoDB store").clone();
    store.with_clock_skew(skew_ms)
}

async fn claim(store: &sqs_worker::store::DynamoStore, token: &str) -> ClaimOutcome {
    use sqs_worker::store::Claims;
    let mut outcomes = store
        .claim_batch("s", token, &claim_terms(LEASE), &[claim_request("k")])
        .await
        .unwrap();
    outcomes.remove("k").unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clock_ahead_within_the_grace_never_takes_over_a_live_lease() {
    let env = TestEnv::builder()
        .store(StoreKind::Dynamodb)
        .no_queue()
        .start()
        .await;
    let (honest, ahead) = (skewed(&env, 0), skewed(&env, 1_500));
    assert!(matches!(
        claim(&honest, "a#1").await,
        ClaimOutcome::Claimed(_)
    ));
    let lease_end = Instant::now() + LEASE;
    // By its own clock the lease has ended (1.5 s ahead), but not by the grace's reckoning.
    tokio::time::sleep_until((lease_end - Duration::from_millis(200)).into()).await;
    let early = claim(&ahead, "b#1").await;
    assert!(
        matches!(early, ClaimOutcome::Busy { .. }),
        "a clock 1.5 s ahead took a live lease: {early:?}"
    );
    // Once the lease has ended for real (and the rest of the grace by the skewed clock).
    tokio::time::sleep_until((lease_end + Duration::from_millis(700)).into()).await;
    assert!(matches!(
        claim(&ahead, "b#1").await,
        ClaimOutcome::Claimed(_)
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clock_beyond_the_grace_takes_over_early_but_writes_stay_single() {
    use sqs_worker::store::{Claims, Steps};
    let env = TestEnv::builder()
        .store(StoreKind::Dynamodb)
        .no_queue()
        .start()
        .await;
    let (honest, far_ahead) = (skewed(&env, 0), skewed(&env, 6_000));
    assert!(matches!(
        claim(&honest, "a#1").await,
        ClaimOutcome::Claimed(_)
    ));
    // 6 s ahead: the 3 s lease plus the 2 s grace are over by that clock at once.
    assert!(matches!(
        claim(&far_ahead, "b#1").await,
        ClaimOutcome::Claimed(_)
    ));
    let (a, b) = (Lease::new("s", "k", "a#1"), Lease::new("s", "k", "b#1"));
    // The first holder, still running by its own clock, changes nothing any more.
    assert!(!honest.record_step(&a, 0, "one", &json!("A")).await.unwrap());
    assert!(!honest.renew_lease(&a, LEASE).await.unwrap());
    let done_by_a = honest
        .complete_batch("s", &[("k".into(), "a#1".into())])
        .await
        .unwrap();
    assert!(done_by_a.is_empty(), "{done_by_a:?}");
    // The new holder's writes go through, once each.
    assert!(
        far_ahead
            .record_step(&b, 0, "one", &json!("B"))
            .await
            .unwrap()
    );
    assert!(
        !far_ahead
            .record_step(&b, 0, "one", &json!("B"))
            .await
            .unwrap()
    );
    let done_by_b = far_ahead
        .complete_batch("s", &[("k".into(), "b#1".into())])
        .await
        .unwrap();
    assert_eq!(done_by_b, [("k".to_owned(), "b#1".to_owned())]);
    let checkpoint = env.checkpoint("s", "k").await;
    assert_eq!(checkpoint.status, "complete");
    assert_eq!(checkpoint.steps.as_array().unwrap().len(), 1);
    assert_eq!(checkpoint.steps[0]["output"], "B");
    assert_eq!(checkpoint.lease_owner.as_deref(), Some("b#1"));
}

/// A step output that would push the item past DynamoDB's 400 KB is refused as such (the
/// worker makes it a permanent `unstorable_step_output`), and nothing is recorded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_step_past_the_item_limit_is_refused_as_too_large() {
    use sqs_worker::store::{Steps, StoreError};
    let env = TestEnv::builder()
        .store(StoreKind::Dynamodb)
        .no_queue()
        .start()
        .await;
    let store = skewed(&env, 0);
    assert!(matches!(
        claim(&store, "a#1").await,
        ClaimOutcome::Claimed(_)
    ));
    let lease = Lease::new("s", "k", "a#1");
    let big = json!("x".repeat(450 * 1024));
    match store.record_step(&lease, 0, "big", &big).await {
        Err(StoreError::TooLarge(detail)) => {
            assert!(
                detail.contains("400 KB") && detail.contains("460802 bytes"),
                "{detail}"
            )
        }
        other => panic!("expected TooLarge, got {other:?}"),
    }
    assert!(
        env.checkpoint("s", "k")
            .await
            .steps
            .as_array()
            .unwrap()
            .is_empty()
    );
}

/// A last step too large for the item, travelling with its completion: that event is
/// answered `TooLarge` (the worker sends it to the DLQ as `unstorable_step_output`) and
/// stays unfinished, while the other completion of the same call lands.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_completion_whose_last_step_is_too_large_fails_alone() {
    use sqs_worker::store::{Completion, NewStep, Written};
    let env = TestEnv::builder()
        .store(StoreKind::Dynamodb)
        .no_queue()
        .start()
        .await;
    let store = env.store();
    store
        .claim_batch(
            "s",
            "a#1",
            &claim_terms(Duration::from_secs(60)),
            &[claim_request("big"), claim_request("small")],
        )
        .await
        .unwrap();
    let events = [
        Completion {
            last_step: Some(NewStep {
                index: 0,
                name: "huge".into(),
                output: json!("x".repeat(450 * 1024)),
            }),
            ..Completion::new("big", "a#1")
        },
        Completion::new("small", "a#1"),
    ];
    let written = store.complete_events("s", &events).await.unwrap();
    assert!(
        matches!(&written[0], Written::TooLarge(detail) if detail.contains("400 KB")),
        "{written:?}"
    );
    assert_eq!(written[1], Written::Done);
    let big = env.checkpoint("s", "big").await;
    assert_eq!(big.status, "in_progress");
    assert!(big.steps.as_array().unwrap().is_empty());
    assert_eq!(env.checkpoint("s", "small").await.status, "complete");
}

/// Puts `ROW#{key}` (only if absent) in the step's `TransactWriteItems`, and fails its first
/// attempt after adding it.
struct PutRow {
    attempts: std::sync::Arc<std::sync::Mutex<Vec<u32>>>,
}

#[async_trait::async_trait]
impl sqs_worker::Handler for PutRow {
    async fn handle(&self, job: &mut sqs_worker::Job) -> Result<(), sqs_worker::HandlerError> {
        use aws_sdk_dynamodb::types::{AttributeValue, Put, TransactWriteItem};
        let attempt = job.attempt();
        // Moved in: the step's future may borrow only the transaction.
        let row = format!("ROW#{}", job.key());
        let written: u32 = job
            .step_tx_dynamodb("store", move |tx| {
                Box::pin(async move {
                    let put = Put::builder()
                        .table_name(tx.table())
                        .item("pk", AttributeValue::S(row))
                        .condition_expression("attribute_not_exists(pk)")
                        .build()
                        .unwrap();
                    tx.push(TransactWriteItem::builder().put(put).build());
                    if attempt == 1 {
                        return Err(sqs_worker::HandlerError::retryable("disk full (simulated)"));
                    }
                    Ok(1)
                })
            })
            .await?;
        assert_eq!(written, 1);
        self.attempts.lock().unwrap().push(attempt);
        Ok(())
    }

    fn step_transactions(&self) -> Option<StoreKind> {
        Some(StoreKind::Dynamodb)
    }
}

/// A step whose closure fails after adding its write leaves neither the item nor a step
/// record; the next attempt writes both together, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_step_transaction_writes_neither_item_nor_record() {
    let env = TestEnv::on(StoreKind::Dynamodb).await;
    env.send(r#"{"doc":"tx1"}"#).await;
    let attempts = std::sync::Arc::default();
    let handler = PutRow {
        attempts: std::sync::Arc::clone(&attempts),
    };
    let config = env.config().key("/doc").scope("tx");
    let summary = env
        .drain(
            config,
            std::sync::Arc::new(handler),
            Duration::from_secs(30),
        )
        .await;
    assert_eq!(summary.retried, 1);
    assert_eq!(*attempts.lock().unwrap(), [2]);
    let store = env.store().dynamodb().unwrap();
    let rows = store
        .client()
        .scan()
        .table_name(store.table())
        .filter_expression("begins_with(pk, :row)")
        .expression_attribute_values(
            ":row",
            aws_sdk_dynamodb::types::AttributeValue::S("ROW#".into()),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(rows.count(), 1);
    let checkpoint = env.checkpoint("tx", "tx1").await;
    assert_eq!(checkpoint.status, "complete");
    assert_eq!(checkpoint.steps.as_array().unwrap().len(), 1);
    assert_eq!(checkpoint.steps[0]["name"], "store");
    assert_eq!(checkpoint.steps[0]["output"], 1);
}

/// A completed checkpoint carries its TTL: `expires_at`, the retention after completion, in
/// epoch seconds (what DynamoDB's TTL deletes by); a running one carries none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_completed_checkpoint_expires_after_the_retention() {
    use sqs_worker::store::Claims;
    let env = TestEnv::builder()
        .store(StoreKind::Dynamodb)
        .no_queue()
        .start()
        .await;
    let week = Duration::from_secs(7 * 86_400);
    let store = skewed(&env, 0).with_retention(week);
    assert!(matches!(
        claim(&store, "a#1").await,
        ClaimOutcome::Claimed(_)
    ));
    let expires_at = || async {
        let item = store
            .client()
            .get_item()
            .table_name(store.table())
            .key(
                "pk",
                aws_sdk_dynamodb::types::AttributeValue::S("C#s#k".into()),
            )
            .consistent_read(true)
            .send()
            .await
            .unwrap()
            .item
            .expect("the checkpoint item");
        item.get("expires_at")
            .map(|v| v.as_n().unwrap().parse::<u64>().unwrap())
    };
    assert_eq!(expires_at().await, None, "no TTL while in progress");
    store
        .complete_batch("s", &[("k".into(), "a#1".into())])
        .await
        .unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let ttl = expires_at().await.expect("a TTL once complete");
    assert!(
        ttl.abs_diff(now + week.as_secs()) <= 5,
        "expires_at {ttl}, expected about {}",
        now + week.as_secs()
    );
}
