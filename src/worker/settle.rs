//! Settling a run, one function per way it ended: complete, retry, permanent failure, a
//! final pass's failure, a lost lease, or a stop at the shutdown deadline. Each returns what
//! a FIFO group needs to know: `None` when the event is settled for good, otherwise about
//! when its message becomes visible again.

use std::time::Duration;

use crate::handler::{HandlerError, UNSTORABLE_STEP_OUTPUT};
use crate::message::EventIdentity;
use crate::sqs::ReceivedMessage;
use crate::store::{Lease, NewStep};
use crate::{message, spans, sqs};

use super::acker::{AckKind, AckResult};
use super::dlq::{FinalFailure, end_final_pass, send_to_dlq};
use super::shared::Shared;

/// An event whose handler has ended, as its settlement sees it.
pub(super) struct Finished<'a> {
    pub(super) message: &'a ReceivedMessage,
    pub(super) identity: &'a EventIdentity,
    pub(super) lease: &'a Lease,
    /// The event's message and every delivery that shares its fate.
    pub(super) receipts: Vec<String>,
    /// Deliveries beyond the event's own message (same batch, or rode along).
    pub(super) duplicates: usize,
    pub(super) attempts: u32,
    /// The handler's last step, when its record is still to be written: it goes with the
    /// completion.
    pub(super) last_step: Option<NewStep>,
}

/// The handler succeeded: complete the checkpoint (fenced by the lease), then delete.
pub(super) async fn settle_complete(shared: &Shared, done: Finished<'_>) -> Option<Duration> {
    // Chaos tests kill the process here: the handler is done, nothing recorded.
    #[cfg(feature = "failpoints")]
    fail::fail_point!("sqs_worker::handled");
    let complete = AckKind::Complete {
        lease: done.lease.clone(),
        last_step: done.last_step,
    };
    match shared.ack(complete).with_receipts(done.receipts).await {
        AckResult::Done => {
            shared.counters.processed.add(1);
            shared.counters.duplicates_skipped.add(done.duplicates);
            spans::note_settled("complete", None, None);
            tracing::info!("event complete");
            None
        }
        AckResult::LeaseLost => {
            shared.counters.lease_lost.add(1);
            spans::note_settled("lease_lost", None, None);
            tracing::warn!(
                "the lease was taken by another worker before completion; leaving the \
                 message to the lease holder"
            );
            Some(shared.lease)
        }
        AckResult::Failed(error) => {
            spans::note_settled("not_recorded", None, Some("could not record completion"));
            tracing::error!(%error, "could not record completion; the message will be delivered again");
            Some(shared.lease)
        }
        // The last step's output can never be stored (DynamoDB's item limit): the event
        // cannot complete, as if the step itself had failed so.
        AckResult::TooLarge { detail, receipts } => {
            let done = Finished {
                receipts,
                last_step: None,
                ..done
            };
            settle_permanent(shared, done, UNSTORABLE_STEP_OUTPUT, &detail).await
        }
    }
}

/// A step found the lease gone: the message is the next holder's.
pub(super) fn settle_lease_lost(shared: &Shared) -> Option<Duration> {
    shared.counters.lease_lost.add(1);
    spans::note_settled("lease_lost", None, None);
    tracing::warn!(
        "stopped at a step boundary: the lease was lost or could not be renewed; leaving the \
         message to SQS and the next lease holder"
    );
    Some(shared.lease)
}

/// A retryable failure: release the lease and show the message again after the backoff.
pub(super) async fn settle_retryable(
    shared: &Shared,
    done: Finished<'_>,
    error: &str,
    retry_after: Option<Duration>,
) -> Option<Duration> {
    // A handler's Retry-After is a minimum, never a way around the backoff: "0" or a date in
    // the past from a struggling endpoint would otherwise bring the message back at once,
    // again and again, through maxReceiveCount into the DLQ.
    let backoff = shared.backoff(done.attempts);
    let delay = retry_after.map_or(backoff, |after| after.max(backoff));
    spans::note_settled("retry", Some(delay.as_millis() as u64), None);
    hand_back_failed(shared, done.lease, error, &done.receipts, delay).await;
    Some(delay)
}

/// A permanent failure: to the DLQ, the checkpoint marked failed, the message deleted.
pub(super) async fn settle_permanent(
    shared: &Shared,
    done: Finished<'_>,
    reason: &str,
    error: &str,
) -> Option<Duration> {
    // Only the lease holder may send the event to the DLQ and delete its message: a task
    // whose lease was taken over meanwhile leaves both to the new holder.
    if !still_held(shared, done.lease).await {
        return Some(shared.lease);
    }
    if !send_to_dlq(shared, done.message, reason, error).await {
        let delay = shared.backoff(done.attempts);
        spans::note_settled("retry", Some(delay.as_millis() as u64), Some(reason));
        hand_back_failed(shared, done.lease, error, &done.receipts, delay).await;
        return Some(delay);
    }
    let marked = shared.store.mark_failed(done.lease, error).await;
    match marked {
        Ok(true) => {}
        Ok(false) => {
            shared.counters.lease_lost.add(1);
            tracing::warn!(
                "the lease was taken over just after the DLQ send; leaving the message to its \
                 new holder (the DLQ holds a copy)"
            );
            return Some(shared.lease);
        }
        Err(error) => {
            shared.counters.database_errors.add(1);
            tracing::error!(%error, "could not mark the checkpoint failed; the message is in the DLQ");
        }
    }
    // The message is safely in the DLQ: delete it.
    spans::note_settled("dlq", None, Some(reason));
    shared
        .ack(AckKind::Delete)
        .with_receipts(done.receipts)
        .await;
    shared.counters.duplicates_skipped.add(done.duplicates);
    None
}

/// Any failure of a final pass: recorded in `dead_letters`, deleted, never looping.
pub(super) async fn settle_final_pass(
    shared: &Shared,
    done: Finished<'_>,
    error: &HandlerError,
    pass: message::Pass,
) -> Option<Duration> {
    let reason = match error {
        HandlerError::Permanent { reason, .. } => reason.as_str(),
        _ => "retryable",
    };
    let failure = FinalFailure {
        key: &done.identity.key,
        fingerprint: &done.identity.fingerprint,
        lease_token: Some(&done.lease.token),
        mark_checkpoint: true,
        reason,
        error: &error.to_string(),
        attempts: done.attempts,
        pass,
    };
    spans::note_settled("dead_letter", None, Some(reason));
    let ended = end_final_pass(shared, done.message, done.receipts, failure).await;
    (!ended).then_some(shared.lease)
}

/// Stopped at the shutdown deadline: release the lease and show the message again at once.
pub(super) async fn settle_abandoned(shared: &Shared, done: Finished<'_>) -> Option<Duration> {
    spans::note_settled("abandoned", None, None);
    tracing::warn!("stopped at the shutdown deadline; handing the message back");
    let reason = "stopped at the shutdown deadline";
    if shared.release(done.lease, reason).await {
        shared
            .counters
            .released_at_shutdown
            .add(done.receipts.len());
        shared.show_after(&done.receipts, Duration::ZERO).await;
    }
    Some(Duration::ZERO)
}

/// Retryable outcome: give the lease back, then hide the message(s) for `delay` — unless
/// the lease was taken over meanwhile: the message is then the new holder's.
async fn hand_back_failed(
    shared: &Shared,
    lease: &Lease,
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
    if shared.release(lease, error).await {
        shared.show_after(receipts, delay).await;
    }
}

/// Whether `lease` is still held (renewing it for a moment): asked before
/// an outcome that cannot be taken back, such as a DLQ send.
async fn still_held(shared: &Shared, lease: &Lease) -> bool {
    match shared.store.renew_lease(lease, shared.lease).await {
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
