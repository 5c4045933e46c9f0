//! Bad input against real LocalStack and PostgreSQL (issue 7): every kind of malformed
//! message gets its documented fate (README "What happens to each message"), and none of
//! them fails the good messages received or claimed in the same batch.

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use aws_sdk_sqs::Client;
use aws_sdk_sqs::primitives::Blob;
use aws_sdk_sqs::types::{MessageAttributeValue, QueueAttributeName, SendMessageBatchRequestEntry};
use common::*;
use sqs_worker::message;
use sqs_worker::{Handler, HandlerError, Job};

store_tests!(every_bad_input_gets_its_fate_and_spares_its_batch);

/// SQS's classic limit, set on the test queues so LocalStack enforces it (its default is
/// 1 MiB): body plus every attribute's name, data type and value.
const LIMIT: usize = 262_144;

/// Records (key, attempt) per call; a few keys misbehave on purpose.
struct Misbehaving {
    calls: Arc<Mutex<Vec<(String, u32)>>>,
}

#[async_trait]
impl Handler for Misbehaving {
    async fn handle(&self, job: &mut Job) -> Result<(), HandlerError> {
        self.calls
            .lock()
            .unwrap()
            .push((job.key().to_owned(), job.attempt()));
        match job.key() {
            // An error text PostgreSQL text and SQS attributes cannot hold as it is.
            "poison-nul" => Err(HandlerError::permanent("stderr: \0\u{1b}[31m\u{FFFF} end")),
            "retry-nul" if job.attempt() == 1 => Err(HandlerError::retryable("flaky\0")),
            // A step output jsonb cannot store.
            "step-nul" => {
                job.step("fetch", || async { Ok("a\0b".to_owned()) })
                    .await?;
                Ok(())
            }
            _ => Ok(()),
        }
    }
}

fn string(value: &str) -> MessageAttributeValue {
    sqs_worker::sqs::string_attribute(value)
}

fn number(value: &str) -> MessageAttributeValue {
    MessageAttributeValue::builder()
        .data_type("Number")
        .string_value(value)
        .build()
        .unwrap()
}

fn binary(value: &[u8]) -> MessageAttributeValue {
    MessageAttributeValue::builder()
        .data_type("Binary")
        .binary_value(Blob::new(value))
        .build()
        .unwrap()
}

/// One message to send, and what must become of it.
struct Case {
    body: String,
    attributes: Vec<(&'static str, MessageAttributeValue)>,
    fate: Fate,
}

impl Case {
    fn attributes_map(&self) -> Option<HashMap<String, MessageAttributeValue>> {
        (!self.attributes.is_empty()).then(|| {
            self.attributes
                .iter()
                .map(|(k, v)| (k.to_string(), v.clone()))
                .collect()
        })
    }
}

#[derive(Debug, Clone, PartialEq)]
enum Fate {
    /// Handled once: checkpoint `complete` under this key, attempts as given.
    Complete { key: String, attempts: i32 },
    /// In the DLQ with this `sqs_worker_failure_reason`; checkpoint `failed` under `key`.
    Dlq { reason: &'static str, key: String },
}

fn complete(key: impl Into<String>) -> Fate {
    Fate::Complete {
        key: key.into(),
        attempts: 1,
    }
}

fn case(body: impl Into<String>, fate: Fate) -> Case {
    Case {
        body: body.into(),
        attributes: Vec::new(),
        fate,
    }
}

/// Unkeyed: DLQ, failed checkpoint under the body's hash.
fn unkeyed(body: impl Into<String>, reason: &'static str) -> Case {
    let body = body.into();
    let key = message::fallback_key(&body);
    case(body, Fate::Dlq { reason, key })
}

/// A body of exactly `bytes` bytes: `{<fields>"pad":"xxx…"}`.
fn padded(fields: &str, bytes: usize) -> String {
    let skeleton = format!(r#"{{{fields}"pad":""}}"#);
    let body = format!(
        r#"{{{fields}"pad":"{}"}}"#,
        "x".repeat(bytes - skeleton.len())
    );
    assert_eq!(body.len(), bytes);
    body
}

/// Make LocalStack enforce SQS's classic size limit on the queue at `url`.
async fn limit_message_size(client: &Client, url: &str) {
    client
        .set_queue_attributes()
        .queue_url(url)
        .attributes(QueueAttributeName::MaximumMessageSize, LIMIT.to_string())
        .send()
        .await
        .unwrap();
}

async fn every_bad_input_gets_its_fate_and_spares_its_batch(kind: StoreKind) {
    let env = TestEnv::on(kind).await;
    let (client, queue_url, dlq_url) = (env.client(), env.queue_url(), env.dlq_url());
    limit_message_size(client, queue_url).await;
    limit_message_size(client, dlq_url).await;

    // LocalStack enforces the limit as SQS does: body + attribute names, types and values.
    let over = client
        .send_message()
        .queue_url(queue_url)
        .message_body("x".repeat(LIMIT - 8 + 1))
        .message_attributes("a", string("v"))
        .send()
        .await;
    assert!(
        over.is_err(),
        "LocalStack accepted a message over the limit"
    );

    let long_key = "k".repeat(10_000);
    let sql = "'; drop table checkpoints; --";
    let ansi = "\u{1b}[31mred\u{1b}[0m\nline2\u{202e}evil🦀";
    let big_note = "n".repeat(200);
    let mut cases = vec![
        case(r#"{"id":"good-0"}"#, complete("good-0")),
        unkeyed("not json at all", "invalid_json"),
        // SQS refuses an empty body; whitespace is the nearest thing.
        unkeyed(" \n\t ", "invalid_json"),
        case(r#"{"id":"good-1","n":1}"#, complete("good-1")),
        unkeyed("[".repeat(100_000), "invalid_json"),
        unkeyed(r#"{"id":"\ud800"}"#, "invalid_json"),
        unkeyed(r#"{"other":1}"#, "missing_key"),
        case(r#"{"id":"good-2"}"#, complete("good-2")),
        unkeyed(r#"{"id":null}"#, "missing_key"),
        unkeyed(r#"{"id":""}"#, "missing_key"),
        unkeyed(r#"{"id":{"a":1}}"#, "invalid_key"),
        unkeyed(r#"{"id":1.5}"#, "invalid_key"),
        case(r#"{"id":"good-3"}"#, complete("good-3")),
        unkeyed(r#"{"id":12345678901234567890123}"#, "invalid_key"),
        case(r#"{"id":42}"#, complete("42")),
        case(r#"{"id":true}"#, complete("true")),
        case(r#"{"id":"a\u0000b"}"#, complete("a%00b")),
        case(
            serde_json::json!({ "id": long_key }).to_string(),
            complete(message::fallback_key(&long_key)),
        ),
        case(r#"{"id":"good-4"}"#, complete("good-4")),
        case(serde_json::json!({ "id": sql }).to_string(), complete(sql)),
        case(
            serde_json::json!({ "id": ansi }).to_string(),
            complete("%1B[31mred%1B[0m%0Aline2\u{202e}evil🦀"),
        ),
        case(
            r#"{"id":"dup-first","n":1,"id":"dup-last"}"#,
            complete("dup-last"),
        ),
        Case {
            body: r#"{"id":"markers"}"#.into(),
            attributes: vec![
                (message::ATTR_DLQ_REDRIVEN, string("maybe")),
                (message::ATTR_REDRIVE_COUNT, number("99999999999999999999")),
                (message::ATTR_DLQ_FINAL_PASS, binary(&[0xff, 0])),
            ],
            fate: complete("markers"),
        },
        case(r#"{"id":"good-5"}"#, complete("good-5")),
        case(
            r#"{"id":"poison-nul"}"#,
            Fate::Dlq {
                reason: "handler_permanent",
                key: "poison-nul".into(),
            },
        ),
        case(
            r#"{"id":"step-nul"}"#,
            Fate::Dlq {
                reason: "unstorable_step_output",
                key: "step-nul".into(),
            },
        ),
        case(
            r#"{"id":"retry-nul"}"#,
            Fate::Complete {
                key: "retry-nul".into(),
                attempts: 2,
            },
        ),
        case(r#"{"id":"good-6"}"#, complete("good-6")),
    ];
    // At the limit: sent one by one (a batch's total is limited too).
    let big = vec![
        case(padded(r#""id":"big-good","#, LIMIT), complete("big-good")),
        Case {
            // Exactly at the limit with its attribute; its DLQ copy must make room for the
            // failure reason.
            attributes: vec![("note", string(&big_note))],
            ..unkeyed(padded("", LIMIT - (4 + 6 + big_note.len())), "missing_key")
        },
    ];

    // Everything is in the queue before the worker starts, so bad and good messages share
    // receive batches and claim statements.
    for chunk in cases.chunks(10) {
        let entries = chunk
            .iter()
            .enumerate()
            .map(|(i, c)| {
                SendMessageBatchRequestEntry::builder()
                    .id(i.to_string())
                    .message_body(&c.body)
                    .set_message_attributes(c.attributes_map())
                    .build()
                    .unwrap()
            })
            .collect();
        let sent = client
            .send_message_batch()
            .queue_url(queue_url)
            .set_entries(Some(entries))
            .send()
            .await
            .unwrap();
        assert!(sent.failed().is_empty(), "{:?}", sent.failed());
    }
    for c in &big {
        client
            .send_message()
            .queue_url(queue_url)
            .message_body(&c.body)
            .set_message_attributes(c.attributes_map())
            .send()
            .await
            .unwrap();
    }
    cases.extend(big);

    let calls = Arc::new(Mutex::new(Vec::new()));
    let handler = Arc::new(Misbehaving {
        calls: calls.clone(),
    });
    // A batch whose claim failed would come back only after 60 s, far past the drain bound.
    let config = env.config().key("/id").scope("bad").visibility(60);
    let summary = &env.drain(config, handler, Duration::from_secs(25)).await;
    assert_eq!(summary.database_errors, 0, "{summary:?}");
    assert_eq!(
        summary.received,
        cases.len() as u64 + 1,
        "one retry: {summary:?}"
    );
    assert_eq!(summary.retried, 1, "{summary:?}");
    assert_eq!(env.messages_in().await, 0);

    // Handled: once each (the retried one twice), checkpoint complete under the key.
    let calls = calls.lock().unwrap().clone();
    let mut runs: HashMap<String, Vec<u32>> = HashMap::new();
    for (key, attempt) in &calls {
        runs.entry(key.clone()).or_default().push(*attempt);
    }
    let mut dead_expected: Vec<(String, Option<String>)> = Vec::new();
    for c in &cases {
        match &c.fate {
            Fate::Complete { key, attempts } => {
                let expected: Vec<u32> = (1..=*attempts as u32).collect();
                assert_eq!(runs.get(key), Some(&expected), "runs of {key:?}");
                let checkpoint = env.find_checkpoint("bad", key).await;
                let checkpoint = checkpoint.unwrap_or_else(|| panic!("no checkpoint {key:?}"));
                assert_eq!(checkpoint.status, "complete", "{key:?}");
                assert_eq!(checkpoint.attempts, *attempts, "{key:?}");
            }
            Fate::Dlq { reason, key } => {
                let checkpoint = env.find_checkpoint("bad", key).await;
                let checkpoint = checkpoint.unwrap_or_else(|| panic!("no checkpoint {key:?}"));
                assert_eq!(checkpoint.status, "failed", "{key:?}");
                let error = checkpoint.last_error.unwrap_or_default();
                if key == "poison-nul" {
                    assert!(error.contains("stderr: \u{FFFD}"), "{error:?}");
                }
                dead_expected.push((c.body.clone(), Some(reason.to_string())));
            }
        }
    }
    let handled = cases
        .iter()
        .filter(|c| matches!(c.fate, Fate::Complete { .. }))
        .count();
    assert_eq!(summary.processed, handled as u64, "{summary:?}");
    assert_eq!(summary.sent_to_dlq, dead_expected.len() as u64);
    // Unkeyed messages never reach the handler.
    assert_eq!(runs.len(), handled + 2, "{runs:?}");
    let retried = env.checkpoint("bad", "retry-nul").await;
    assert_eq!(retried.last_error.as_deref(), Some("flaky\u{FFFD}"));

    // The DLQ holds each dead-lettered message once, body intact, with its reason.
    let dead = env
        .peek_dlq(dead_expected.len(), Duration::from_secs(10))
        .await;
    let mut found: Vec<(String, Option<String>)> = dead
        .iter()
        .map(|m| {
            (
                m.body().unwrap().to_owned(),
                string_attribute(m, message::ATTR_FAILURE_REASON),
            )
        })
        .collect();
    found.sort();
    dead_expected.sort();
    assert_eq!(found.len(), dead_expected.len());
    for (found, expected) in found.iter().zip(&dead_expected) {
        assert_eq!(found, expected, "body {:.60}", expected.0);
    }
    let detail = |predicate: &dyn Fn(&str) -> bool| {
        dead.iter()
            .find(|m| predicate(m.body().unwrap()))
            .and_then(|m| string_attribute(m, message::ATTR_FAILURE_DETAIL))
    };
    // The handler's NUL and escape became U+FFFD instead of failing the send.
    let poison = detail(&|b| b.contains("poison-nul")).unwrap();
    assert!(
        poison.contains("stderr: \u{FFFD}\u{FFFD}[31m\u{FFFD} end"),
        "{poison:?}"
    );
    let float = detail(&|b| b == r#"{"id":1.5}"#).unwrap();
    assert!(float.contains("fractional"), "{float:?}");
    // The copy at the limit kept its reason; the detail was cut and the note dropped.
    let big_copy = dead.iter().find(|m| m.body().unwrap().len() > 200_000);
    let big_copy = big_copy.expect("the big unkeyed message is in the DLQ");
    assert_eq!(
        string_attribute(big_copy, message::ATTR_FAILURE_DETAIL).as_deref(),
        Some("…")
    );
    assert!(string_attribute(big_copy, "note").is_none());
}
