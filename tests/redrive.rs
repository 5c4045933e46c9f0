//! DLQ redrive markers against real LocalStack and PostgreSQL: a failing final pass ends
//! silently — recorded in dead_letters, deleted, never looping.

mod common;

use std::time::Duration;

use common::*;
use sqs_worker::message::{self, KeySpec};
use sqs_worker::sqs::string_attribute as attribute;
use sqs_worker::{CheckpointStore, HandlerError, Worker};

async fn send_with_markers(client: &aws_sdk_sqs::Client, url: &str, body: &str, count: &str) {
    client
        .send_message()
        .queue_url(url)
        .message_body(body)
        .message_attributes(message::ATTR_DLQ_REDRIVEN, attribute("true"))
        .message_attributes(message::ATTR_REDRIVE_COUNT, attribute(count))
        .message_attributes(message::ATTR_DLQ_FINAL_PASS, attribute("true"))
        .send()
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_final_pass_is_recorded_and_deleted_without_looping() {
    let client = sqs_client().await;
    let (pool, _) = fresh_database().await;
    let queue = fresh_queue(&client, true, 5).await;
    let dlq_url = queue.dlq_url.clone().unwrap();
    send_with_markers(&client, &queue.url, r#"{"id":"fp1"}"#, "3").await;
    send_with_markers(&client, &queue.url, "still not json", "3").await;
    // Hostile marker value: a final pass is a final pass whatever the count says.
    send_with_markers(&client, &queue.url, r#"{"id":"fp2"}"#, "lots").await;

    let (handler, calls) = RecordingHandler::new(Duration::ZERO, |job| {
        assert!(job.is_final_pass());
        Err(HandlerError::retryable("the downstream is still broken"))
    });
    let mut config = worker_config(&queue.url);
    config.key = KeySpec::new(vec!["/id".into()]).unwrap();
    config.scope = Some("final".into());
    let summaries = run_until_drained(
        &client,
        &queue.url,
        vec![Worker::new(config, client.clone(), pool.clone(), handler)],
        Duration::from_secs(30),
    )
    .await;

    // Each keyed event ran once: no retry, no backoff loop.
    let counts = calls_per_key(&calls);
    assert_eq!((counts["fp1"], counts["fp2"], counts.len()), (1, 1, 2));
    assert_eq!(summaries[0].final_pass_failures, 3);
    assert_eq!((summaries[0].retried, summaries[0].dead_lettered), (0, 0));
    assert_eq!(
        messages_in(&client, &dlq_url).await,
        0,
        "nothing went back to the DLQ"
    );
    assert_eq!(messages_in(&client, &queue.url).await, 0);

    let store = CheckpointStore::new(pool);
    let letters = store.list_dead_letters(Some("final"), 10).await.unwrap();
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
    assert_eq!(fp1.queue_url, queue.url);
    assert_eq!(
        store.find("final", "fp1").await.unwrap().unwrap().status,
        "failed"
    );
    let same = store.find_dead_letter(fp1.id).await.unwrap().unwrap();
    assert_eq!(same.message_id, fp1.message_id);
}
