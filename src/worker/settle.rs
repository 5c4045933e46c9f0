//! Settling an event that did not complete: retry later, or end a final pass for good.

use super::*;

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
            shared.counters.final_pass_failures.add(1);
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

/// Retryable outcome: give the lease back, then hide the message(s) for `delay` — unless
/// the lease was taken over meanwhile: the message is then the new holder's.
pub(super) async fn retry_later(
    shared: &Shared,
    lease_token: &str,
    key: &str,
    error: &str,
    receipts: &[String],
    delay: Duration,
) {
    shared.counters.retried.add(1);
    // Debug-quoted: a handler's text may hold newlines, NUL or terminal escapes.
    tracing::warn!(
        ?error,
        retry_in_secs = sqs::visibility_seconds(delay),
        "handler failed; retrying after a backoff"
    );
    if shared.release_lease(lease_token, key, error).await {
        shared.show_after(receipts, delay).await;
    }
}

/// Whether `lease_token` still holds `key`'s lease (renewing it for a moment): asked before
/// an outcome that cannot be taken back, such as a DLQ send.
pub(super) async fn still_held(shared: &Shared, lease_token: &str, key: &str) -> bool {
    match shared
        .store
        .renew_lease(&shared.scope, lease_token, key, shared.lease)
        .await
    {
        Ok(true) => true,
        Ok(false) => {
            shared.counters.lease_lost.add(1);
            tracing::warn!(
                "the lease was taken over while the handler ran; leaving the message to its \
                 new holder"
            );
            false
        }
        Err(error) => {
            shared.counters.database_errors.add(1);
            tracing::error!(%error, "cannot confirm the lease; the message returns after its visibility timeout");
            false
        }
    }
}
