//! Payload fingerprints: a key reused with other content goes to the DLQ as
//! `payload_mismatch` naming the fields that differ; `--fingerprint` narrows the comparison
//! to the stable fields, so a re-sent event whose volatile fields changed is a duplicate.

mod common;

use std::time::Duration;

use common::*;
use sqs_worker::Worker;
use sqs_worker::message::{self, KeySpec};

async fn drain(
    queue: &TestQueue,
    pool: &sqlx::PgPool,
    key: KeySpec,
) -> (
    sqs_worker::RunSummary,
    std::collections::HashMap<String, usize>,
) {
    let client = sqs_client().await;
    let (handler, calls) = RecordingHandler::succeeding();
    let mut config = worker_config(&queue.url);
    config.key = key;
    config.scope = Some("fp".into());
    let worker = Worker::new(config, client.clone(), pg(pool), handler);
    let summaries =
        run_until_drained(&client, &queue.url, vec![worker], Duration::from_secs(30)).await;
    (summaries[0].clone(), calls_per_key(&calls))
}

/// By default the whole event is fingerprinted: the same key with another `sent_at` goes to
/// the DLQ, and the detail names `/sent_at` and the flag that would accept it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mismatch_names_the_fields_that_differ() {
    let client = sqs_client().await;
    let (pool, _) = fresh_database().await;
    let queue = fresh_queue(&client, true, 5).await;
    let key = KeySpec::new(vec!["/id".into()]).unwrap();
    send(
        &client,
        &queue.url,
        r#"{"id":"w1","amount":5,"sent_at":"10:00"}"#,
    )
    .await;
    drain(&queue, &pool, key.clone()).await;
    send(
        &client,
        &queue.url,
        r#"{"id":"w1","amount":5,"sent_at":"10:05"}"#,
    )
    .await;
    let (summary, calls) = drain(&queue, &pool, key).await;
    assert_eq!(summary.sent_to_dlq, 1);
    assert!(calls.is_empty(), "the handler did not run for the mismatch");
    let dlq = peek_all(
        &client,
        queue.dlq_url.as_ref().unwrap(),
        1,
        Duration::from_secs(10),
    )
    .await;
    assert_eq!(dlq.len(), 1);
    assert_eq!(
        string_attribute(&dlq[0], message::ATTR_FAILURE_REASON).as_deref(),
        Some("payload_mismatch")
    );
    let detail = string_attribute(&dlq[0], message::ATTR_FAILURE_DETAIL).unwrap();
    assert!(
        detail.contains("differs from the first one in /sent_at;"),
        "{detail}"
    );
    assert!(detail.contains("--fingerprint"), "{detail}");
}

/// With `--fingerprint /id --fingerprint /amount`, a re-sent event differing only in
/// `sent_at` is a duplicate (skipped), while another amount still goes to the DLQ.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fingerprinted_fields_ignore_volatile_ones() {
    let client = sqs_client().await;
    let (pool, _) = fresh_database().await;
    let queue = fresh_queue(&client, true, 5).await;
    let key = KeySpec::new(vec!["/id".into()])
        .unwrap()
        .with_fingerprint(vec!["/id".into(), "/amount".into()])
        .unwrap();
    send(
        &client,
        &queue.url,
        r#"{"id":"v1","amount":5,"sent_at":"10:00"}"#,
    )
    .await;
    let (_, calls) = drain(&queue, &pool, key.clone()).await;
    assert_eq!(calls["v1"], 1);
    send(
        &client,
        &queue.url,
        r#"{"sent_at":"10:05","amount":5,"id":"v1"}"#,
    )
    .await;
    let (summary, calls) = drain(&queue, &pool, key.clone()).await;
    assert!(calls.is_empty());
    assert_eq!((summary.duplicates_skipped, summary.sent_to_dlq), (1, 0));

    send(
        &client,
        &queue.url,
        r#"{"id":"v1","amount":6,"sent_at":"10:09"}"#,
    )
    .await;
    let (summary, _) = drain(&queue, &pool, key).await;
    assert_eq!(summary.sent_to_dlq, 1);
    let dlq = peek_all(
        &client,
        queue.dlq_url.as_ref().unwrap(),
        1,
        Duration::from_secs(10),
    )
    .await;
    let detail = string_attribute(&dlq[0], message::ATTR_FAILURE_DETAIL).unwrap();
    assert!(
        detail.contains("differs from the first one in /amount;"),
        "{detail}"
    );
}
