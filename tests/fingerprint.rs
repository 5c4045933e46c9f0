//! Payload fingerprints: a key reused with other content goes to the DLQ as
//! `payload_mismatch` naming the fields that differ; `--fingerprint` narrows the comparison
//! to the stable fields, so a re-sent event whose volatile fields changed is a duplicate.

mod common;

use std::time::Duration;

use common::*;
use sqs_worker::message::{self, KeySpec};

store_tests!(
    a_mismatch_names_the_fields_that_differ,
    fingerprinted_fields_ignore_volatile_ones,
);

/// Drain the queue with a fresh succeeding handler keyed by `key` in scope `fp`: its summary
/// and its runs per key.
async fn drain(
    env: &TestEnv,
    key: KeySpec,
) -> (
    sqs_worker::RunSummary,
    std::collections::HashMap<String, usize>,
) {
    let (handler, calls) = RecordingHandler::succeeding();
    let mut config = env.config().scope("fp");
    config.key = key;
    let summary = env.drain(config, handler, Duration::from_secs(30)).await;
    (summary, calls_per_key(&calls))
}

/// By default the whole event is fingerprinted: the same key with another `sent_at` goes to
/// the DLQ, and the detail names `/sent_at` and the flag that would accept it.
async fn a_mismatch_names_the_fields_that_differ(kind: StoreKind) {
    let env = TestEnv::on(kind).await;
    let key = KeySpec::new(vec!["/id".into()]).unwrap();
    env.send(r#"{"id":"w1","amount":5,"sent_at":"10:00"}"#)
        .await;
    drain(&env, key.clone()).await;
    env.send(r#"{"id":"w1","amount":5,"sent_at":"10:05"}"#)
        .await;
    let (summary, calls) = drain(&env, key).await;
    assert_eq!(summary.sent_to_dlq, 1);
    assert!(calls.is_empty(), "the handler did not run for the mismatch");
    let dlq = env.peek_dlq(1, Duration::from_secs(10)).await;
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
async fn fingerprinted_fields_ignore_volatile_ones(kind: StoreKind) {
    let env = TestEnv::on(kind).await;
    let key = KeySpec::new(vec!["/id".into()])
        .unwrap()
        .with_fingerprint(vec!["/id".into(), "/amount".into()])
        .unwrap();
    env.send(r#"{"id":"v1","amount":5,"sent_at":"10:00"}"#)
        .await;
    let (_, calls) = drain(&env, key.clone()).await;
    assert_eq!(calls["v1"], 1);
    env.send(r#"{"sent_at":"10:05","amount":5,"id":"v1"}"#)
        .await;
    let (summary, calls) = drain(&env, key.clone()).await;
    assert!(calls.is_empty());
    assert_eq!((summary.duplicates_skipped, summary.sent_to_dlq), (1, 0));

    env.send(r#"{"id":"v1","amount":6,"sent_at":"10:09"}"#)
        .await;
    let (summary, _) = drain(&env, key).await;
    assert_eq!(summary.sent_to_dlq, 1);
    let dlq = env.peek_dlq(1, Duration::from_secs(10)).await;
    let detail = string_attribute(&dlq[0], message::ATTR_FAILURE_DETAIL).unwrap();
    assert!(
        detail.contains("differs from the first one in /amount;"),
        "{detail}"
    );
}
