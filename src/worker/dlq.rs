//! Where failed messages end: the DLQ (permanent failures, unkeyed messages, payload
//! mismatches), or `dead_letters` when a final redrive pass fails.

use std::sync::Arc;

use tracing::Instrument;

use crate::message::EventIdentity;
use crate::sqs::{OutgoingMessage, ReceivedMessage};
use crate::store::NewDeadLetter;
use crate::{message, spans, sqs};

use super::acker::AckKind;
use super::batch::Parsed;
use super::claim::receive_count;
use super::shared::Shared;

/// A message with no usable key (not JSON, key field missing): it can never succeed, so it
/// goes to the DLQ with the reason, and a failed checkpoint is recorded under its body hash.
pub(super) async fn dead_letter_unkeyed(shared: &Arc<Shared>, parsed: Parsed) {
    let error = parsed
        .identity
        .as_ref()
        .expect_err("only unkeyed messages come here");
    let key = parsed.key();
    let span = log_span(&parsed, &key);
    spans::record_outcome(&parsed.span, "dlq");
    spans::record_error(&parsed.span, &error.reason_code());
    async {
        // One line per message: "sent to the DLQ" (or the final pass's, or the failed
        // send's) says the reason code and why; the span names the message.
        if parsed.markers.final_pass {
            let failure = FinalFailure {
                key: &key,
                fingerprint: &message::body_sha256(&parsed.message.body),
                lease_token: None,
                mark_checkpoint: true,
                reason: error.reason_code(),
                error: &error.to_string(),
                attempts: 1,
                pass: parsed.markers.pass(),
            };
            let receipts = vec![parsed.message.receipt_handle.clone()];
            end_final_pass(shared, &parsed.message, receipts, failure).await;
            return;
        }
        if !send_to_dlq(shared, &parsed.message, error.reason_code(), &error.to_string()).await {
            retry_unsent(shared, &parsed.message).await;
            return;
        }
        if let Err(db_error) = shared
            .store
            .record_unkeyed_failure(
                &shared.scope,
                &key,
                &message::body_sha256(&parsed.message.body),
                &parsed.message.message_id,
                &error.to_string(),
            )
            .await
        {
            shared.counters.database_errors.add(1);
            tracing::error!(error = %db_error, "could not record the failed checkpoint; the message is in the DLQ");
        }
        shared
            .ack(AckKind::Delete)
            .with_receipts(vec![parsed.message.receipt_handle.clone()])
            .await;
    }
    .instrument(span)
    .await
}

/// What a delivery with a mismatched payload is compared with.
pub(super) enum FirstPayload {
    /// An earlier delivery of the same key in this receive batch.
    InBatch {
        fingerprint: String,
        fields: Option<String>,
    },
    /// The checkpoint's fingerprint (its field digests are read when needed).
    Stored(String),
}

/// A message that should have gone to the DLQ but could not be sent there (no DLQ, a
/// failed send): it comes back after a backoff that grows with its receive count, so that
/// a DLQ outage does not spin it.
async fn retry_unsent(shared: &Shared, message: &ReceivedMessage) {
    shared.counters.retried.add(1);
    shared
        .change_visibility(&[(
            message.receipt_handle.clone(),
            shared.backoff(receive_count(message)),
        )])
        .await;
}

/// The same key with another payload: to the DLQ with reason `payload_mismatch`. The event's
/// checkpoint belongs to the first payload and is left alone: a mismatched delivery never
/// claims it (see `CheckpointStore::claim_batch`), so it has no lease to give back.
pub(super) async fn dead_letter_mismatch(
    shared: &Arc<Shared>,
    parsed: Parsed,
    first: FirstPayload,
) {
    let identity = parsed.identity.as_ref().expect("keyed messages only");
    let span = log_span(&parsed, &identity.key);
    spans::record_outcome(&parsed.span, "dlq");
    spans::record_error(&parsed.span, &"payload_mismatch");
    async {
        let (fingerprint, fields) = match first {
            FirstPayload::InBatch {
                fingerprint,
                fields,
            } => (fingerprint, fields),
            FirstPayload::Stored(fingerprint) => {
                // Rare path: one more read, for a detail that names the fields.
                let fields = match shared.store.find(&shared.scope, &identity.key).await {
                    Ok(found) => found.and_then(|c| c.payload_fields),
                    Err(_) => None,
                };
                (fingerprint, fields)
            }
        };
        let (detail, differing) =
            mismatch_detail(&identity.key, &fingerprint, fields.as_deref(), identity);
        tracing::warn!(
            differing = differing.as_deref().map(|d| d.join(", ")),
            "the key was first seen with another payload (payload_mismatch)"
        );
        if parsed.markers.final_pass {
            let failure = FinalFailure {
                key: &identity.key,
                fingerprint: &identity.fingerprint,
                lease_token: None,
                // The checkpoint belongs to the first payload: leave it alone.
                mark_checkpoint: false,
                reason: "payload_mismatch",
                error: &detail,
                attempts: 1,
                pass: parsed.markers.pass(),
            };
            let receipts = vec![parsed.message.receipt_handle.clone()];
            end_final_pass(shared, &parsed.message, receipts, failure).await;
            return;
        }
        let sent = send_to_dlq(shared, &parsed.message, "payload_mismatch", &detail).await;
        if sent {
            shared
                .ack(AckKind::Delete)
                .with_receipts(vec![parsed.message.receipt_handle.clone()])
                .await;
        } else {
            retry_unsent(shared, &parsed.message).await;
        }
    }
    .instrument(span)
    .await
}

/// The span a dead-lettered delivery's lines are logged in: its `process` span, or (tracing
/// off) a span naming the message.
fn log_span(parsed: &Parsed, key: &str) -> tracing::Span {
    if parsed.span.is_none() {
        tracing::info_span!("message", message_id = %parsed.message.message_id, key = %key)
    } else {
        parsed.span.clone()
    }
}

/// The DLQ detail of a payload mismatch, and the fields that differ when they are known.
fn mismatch_detail(
    key: &str,
    first_fingerprint: &str,
    first_fields: Option<&str>,
    arrived: &EventIdentity,
) -> (String, Option<Vec<String>>) {
    const ADVICE: &str = "an idempotency key reused with other content is not a duplicate; if \
                          only volatile fields differ (timestamps, delivery counters), \
                          fingerprint the stable ones with --fingerprint POINTER";
    let subset = |fingerprint: &str| fingerprint.starts_with("fields:");
    if subset(first_fingerprint) != subset(&arrived.fingerprint) {
        return (
            format!(
                "key {key:?} was first seen under another --fingerprint setting, so its \
                 payloads cannot be compared ({first_fingerprint} then, {} now); {ADVICE}",
                arrived.fingerprint
            ),
            None,
        );
    }
    let differing = message::differing_fields(first_fields, arrived.field_digests.as_deref());
    let detail = match &differing {
        Some(fields) if !fields.is_empty() => format!(
            "key {key:?} arrived with a payload that differs from the first one in {}; {ADVICE}",
            fields.join(", ")
        ),
        Some(_) => format!(
            "key {key:?} arrived with a payload whose fields equal the first one's but whose \
             text differs (whitespace, field order or duplicate fields); {ADVICE}"
        ),
        None => format!(
            "key {key:?} was first seen with payload fingerprint {first_fingerprint} and now \
             arrives with {}; {ADVICE}",
            arrived.fingerprint
        ),
    };
    (detail, differing)
}

/// Send a copy of `message` to the DLQ with the failure reason in its attributes. False when
/// there is no DLQ or the send failed (the caller then retries instead of deleting).
pub(super) async fn send_to_dlq(
    shared: &Shared,
    message: &ReceivedMessage,
    reason: &str,
    detail: &str,
) -> bool {
    let Some(dlq) = &shared.dlq else {
        tracing::error!(
            reason,
            "permanent failure, but the queue has no DLQ; retrying with backoff instead — \
             configure a RedrivePolicy"
        );
        return false;
    };
    let fifo = dlq.url().ends_with(".fifo");
    let outgoing = dlq_message(message, reason, detail, fifo, dlq.size_limit().await);
    match dlq.send(outgoing).await {
        Ok(_) => {
            shared.counters.sent_to_dlq.add(1);
            // Debug-quoted: a handler's text may hold newlines, NUL or terminal escapes, and
            // this stays one line.
            tracing::warn!(reason, error = ?detail, dlq = dlq.name(), "sent to the DLQ");
            true
        }
        Err(error) => {
            tracing::error!(%error, reason, "could not send to the DLQ; retrying later");
            false
        }
    }
}

/// The DLQ copy of a message: same body, its attributes plus the failure reason, trimmed to
/// SQS's attribute limit (redrive markers and the reason are kept first) and to the DLQ's
/// `max_bytes` for body and attributes: a copy SQS refuses would fail the same way on every
/// retry. To fit, the detail is shortened first, then the message's own attributes are
/// dropped, then the detail; a body that leaves no room goes without the reason too, and
/// then without the redrive markers (reason and detail are still in the log and the
/// checkpoint).
pub(super) fn dlq_message(
    message: &ReceivedMessage,
    reason: &str,
    detail: &str,
    fifo: bool,
    max_bytes: usize,
) -> OutgoingMessage {
    let rank = |name: &str| {
        if message::REDRIVE_MARKERS.contains(&name) {
            0
        } else if message::trace::TRACE_ATTRIBUTES.contains(&name) {
            1
        } else {
            2
        }
    };
    // SQS refuses characters outside XML 1.0 and empty String values: either would fail the
    // send, and with it every retry of this message.
    let attribute_text = |text: &str, empty: &str| {
        let text = if text.is_empty() { empty } else { text };
        sqs::string_attribute(sqs::xml_safe(text).into_owned())
    };
    let mut attributes = sqs::fit_attributes(
        vec![
            (
                message::ATTR_FAILURE_REASON,
                attribute_text(reason, "unspecified"),
            ),
            (
                message::ATTR_FAILURE_DETAIL,
                attribute_text(&message::truncate_for_log(detail, 1000), "(no detail)"),
            ),
        ],
        &spans::attributes_with_trace(message),
        &[],
        rank,
    );
    if sqs::message_bytes(&message.body, &attributes) > max_bytes {
        let dropped = sqs::fit_message_size(
            &message.body,
            &mut attributes,
            max_bytes,
            message::ATTR_FAILURE_DETAIL,
            &message::KEEP_LONGEST,
        );
        tracing::warn!(
            body_bytes = message.body.len(),
            max_bytes,
            ?dropped,
            "the DLQ copy would exceed the DLQ's maximum message size: failure detail \
             shortened, the attributes named dropped"
        );
    }
    OutgoingMessage {
        body: message.body.clone(),
        attributes,
        message_group_id: fifo.then(|| {
            message
                .message_group_id()
                .unwrap_or("sqs-worker-dlq")
                .to_owned()
        }),
        deduplication_id: fifo.then(|| message.message_id.clone()),
        delay: None,
    }
}

// ---- the acker: batched completion + DeleteMessageBatch ----

/// What a final-pass failure records.
pub(super) struct FinalFailure<'a> {
    pub(super) key: &'a str,
    pub(super) fingerprint: &'a str,
    pub(super) lease_token: Option<&'a str>,
    pub(super) mark_checkpoint: bool,
    pub(super) reason: &'a str,
    pub(super) error: &'a str,
    pub(super) attempts: u32,
    pub(super) pass: message::Pass,
}

/// A failure on a DLQ redrive's final pass: record the message in `dead_letters` (and the
/// event failed), delete it, and say so once. No retry, no return to the DLQ.
pub(super) async fn end_final_pass(
    shared: &Shared,
    message: &ReceivedMessage,
    receipts: Vec<String>,
    failure: FinalFailure<'_>,
) -> bool {
    let attributes = message.attributes_json();
    let letter = NewDeadLetter {
        scope: &shared.scope,
        key: failure.key,
        queue_url: shared.sqs.url(),
        message_id: &message.message_id,
        body: &message.body,
        attributes: &attributes,
        reason: failure.reason,
        error: failure.error,
        attempts: failure.attempts.min(i32::MAX as u32) as i32,
        redrive_count: failure.pass.redrive_count.min(i32::MAX as u32) as i32,
        requeue_generation: failure.pass.requeue_generation.min(i32::MAX as u32) as i32,
        payload_sha256: failure.fingerprint,
    };
    match shared
        .store
        .record_dead_letter(&letter, failure.mark_checkpoint, failure.lease_token)
        .await
    {
        Ok(None) => {
            shared.counters.lease_lost.add(1);
            tracing::warn!(
                "final redrive pass failed, but the lease was taken over meanwhile; leaving \
                 the message to its new holder (nothing recorded)"
            );
            false
        }
        Ok(Some(id)) => {
            shared.ack(AckKind::Delete).with_receipts(receipts).await;
            shared.counters.dead_lettered.add(1);
            tracing::warn!(
                dead_letter_id = id,
                reason = failure.reason,
                error = ?failure.error,
                redrive_count = failure.pass.redrive_count,
                "final redrive pass failed; recorded in dead_letters and deleted (no retry, no DLQ)"
            );
            true
        }
        Err(error) => {
            shared.counters.database_errors.add(1);
            tracing::error!(
                %error,
                "final redrive pass failed but could not be recorded in dead_letters; the \
                 message comes back after its visibility timeout"
            );
            false
        }
    }
}
