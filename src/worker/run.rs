//! Running one claimed event: the handler under its heartbeat, then one settlement per
//! outcome.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::handler::{HandlerError, Job};
use crate::message::{EventIdentity, RedriveMarkers};
use crate::spans;
use crate::sqs::{MAX_VISIBILITY, ReceivedMessage};
use crate::store::{self, Claim, Lease, NewStep, StepRecord, Written};

use super::batch::ClaimedEvent;
use super::core::BatchTokens;
use super::heartbeat::{Waiting, Watch, supervise};
use super::settle::{
    Finished, settle_abandoned, settle_complete, settle_final_pass, settle_lease_lost,
    settle_permanent, settle_retryable,
};
use super::shared::Shared;

pub(super) const SHUTTING_DOWN: &str = "shutting down before it started";

/// Give a claimed event back untouched: release its lease and make its message(s) visible
/// again — at once at shutdown, or just after `back_in` behind a FIFO group's held message.
pub(super) async fn hand_back(
    shared: &Shared,
    event: &ClaimedEvent,
    reason: &str,
    back_in: Duration,
) {
    let key = event.parsed.key();
    // Deliveries that rode along go back with it.
    let mut receipts = event.receipts();
    receipts.extend(shared.stop_running(&event.riders));
    shared.finish_running(&key, &event.riders);
    tracing::info!(message_id = %event.parsed.message.message_id, %key, reason, "handing the message back unstarted");
    // The claim never ran: it does not count as an attempt. A lease taken over meanwhile
    // means the message is another holder's: leave it.
    match shared.store.release_unstarted(&event.lease).await {
        Ok(true) => {}
        Ok(false) => return,
        Err(error) => {
            shared.counters.database_errors.add(1);
            tracing::error!(%error, "could not release the lease; it expires on its own");
            return;
        }
    }
    if reason == SHUTTING_DOWN {
        shared.counters.released_at_shutdown.add(receipts.len());
    }
    let visibility = if back_in.is_zero() {
        Duration::ZERO
    } else {
        (back_in + Duration::from_secs(1)).min(MAX_VISIBILITY)
    };
    shared.show_after(&receipts, visibility).await;
}

/// Run one claimed event in its own span, counted in flight. `None` when it was settled
/// (complete, or ended in the DLQ or `dead_letters`): a FIFO group may go on. Otherwise
/// about when its message becomes visible again.
pub(super) async fn run_event(
    shared: &Arc<Shared>,
    event: ClaimedEvent,
    lease: Duration,
    tokens: &BatchTokens,
    waiting: &Waiting,
) -> Option<Duration> {
    let key = event.parsed.key();
    let span = if event.parsed.span.is_none() {
        tracing::info_span!(
            "message",
            message_id = %event.parsed.message.message_id,
            key = %key,
            attempt = event.claim.attempts,
        )
    } else {
        spans::record_attempt(&event.parsed.span, event.claim.attempts);
        event.parsed.span.clone()
    };
    shared.in_flight.fetch_add(1, Ordering::Relaxed);
    shared.counters.in_flight.increment(1.0);
    let riders = event.riders.clone();
    let settled = run_claimed(shared, event, lease, tokens, waiting)
        .instrument(span)
        .await;
    shared.finish_running(&key, &riders);
    shared.in_flight.fetch_sub(1, Ordering::Relaxed);
    shared.counters.in_flight.decrement(1.0);
    shared.touch();
    settled
}

/// How a handler run ended, before its outcome is settled.
pub(super) enum Ended {
    Finished(Result<(), HandlerError>),
    /// The drain deadline passed: the handler was stopped.
    Abandoned,
}

/// Run a claimed event's handler under its heartbeat, then settle it by how it ended.
async fn run_claimed(
    shared: &Arc<Shared>,
    event: ClaimedEvent,
    lease_time: Duration,
    tokens: &BatchTokens,
    waiting: &Waiting,
) -> Option<Duration> {
    let mut receipts = event.receipts();
    let ClaimedEvent {
        parsed,
        claim,
        siblings,
        permit,
        lease,
        riders,
    } = event;
    let mut identity = parsed.identity.expect("claimed messages have a key");
    let (message, markers) = (parsed.message, parsed.markers);
    if claim.resumed {
        tracing::info!(
            "resuming an event seen before (a retry, or a takeover of an expired lease)"
        );
    }
    let cancel = CancellationToken::new();
    let job = new_job(
        shared,
        &message,
        &mut identity,
        &markers,
        &claim,
        &lease,
        &cancel,
    );
    let pending = job.pending.clone();
    let ended = {
        let watch = Watch {
            lease: &lease,
            receipts: &receipts,
            riders: &riders,
            waiting,
        };
        run_handler(shared, job, &cancel, &watch, lease_time, tokens).await
    };
    // The handler is done: the slot may serve the next message while this one settles (the
    // acker's queue bounds what waits for settling).
    drop(permit);
    // Deliveries of this event received while it ran share its fate from here on.
    let riders = shared.stop_running(&riders);
    let duplicates = siblings.len() + riders.len();
    receipts.extend(riders);
    let last_step = pending.lock().expect("not poisoned").take();
    let last_step = match &ended {
        // The last step's record travels with the completion.
        Ended::Finished(Ok(())) => last_step,
        // The step belongs to the lease's new holder.
        Ended::Finished(Err(HandlerError::LeaseLost)) => None,
        // Written now, so the next attempt resumes after it.
        _ => {
            write_last_step(shared, &lease, last_step).await;
            None
        }
    };
    let done = Finished {
        message: &message,
        identity: &identity,
        lease: &lease,
        receipts,
        duplicates,
        attempts: claim.attempts,
        last_step,
    };
    settle(shared, done, ended, &markers)
        .instrument(spans::settle(&tracing::Span::current()))
        .await
}

/// Settle a run by how it ended, one function per outcome.
async fn settle(
    shared: &Arc<Shared>,
    done: Finished<'_>,
    ended: Ended,
    markers: &RedriveMarkers,
) -> Option<Duration> {
    match ended {
        Ended::Abandoned => settle_abandoned(shared, done).await,
        // The last redrive an operator allowed: any failure ends here, recorded, never looping.
        Ended::Finished(Err(error)) if markers.final_pass && ends_a_final_pass(&error) => {
            settle_final_pass(shared, done, &error, markers.pass()).await
        }
        Ended::Finished(Ok(())) => settle_complete(shared, done).await,
        Ended::Finished(Err(HandlerError::LeaseLost)) => settle_lease_lost(shared),
        Ended::Finished(Err(HandlerError::Retryable {
            message: error,
            retry_after,
        })) => settle_retryable(shared, done, &error, retry_after).await,
        Ended::Finished(Err(HandlerError::Permanent {
            message: error,
            reason,
        })) => settle_permanent(shared, done, &reason, &error).await,
    }
}

/// A handler that did not complete (it failed, or was stopped) may leave its last step's
/// record unwritten: write it before the event is settled, so the next attempt resumes after
/// that step. A failure here only costs that step a re-run: it is logged, not retried.
async fn write_last_step(shared: &Shared, lease: &Lease, step: Option<NewStep>) {
    let Some(step) = step else {
        return;
    };
    let name = step.name.clone();
    let record = StepRecord {
        key: lease.key.clone(),
        token: lease.token.clone(),
        step,
    };
    match shared.recorder.record(record).await {
        Ok(Written::Done) => {}
        Ok(Written::NotHeld) => {
            tracing::warn!(step = %name, "the lease was taken over; the step's record is left to its new holder");
        }
        Ok(Written::TooLarge(detail)) => {
            tracing::warn!(step = %name, %detail, "the step's output cannot be stored; the next attempt runs it again");
        }
        Err(error) => {
            shared.counters.database_errors.add(1);
            tracing::warn!(step = %name, %error, "could not record the step; the next attempt runs it again");
        }
    }
}

/// A failure that ends a final pass: anything but a lost lease (the new holder decides).
fn ends_a_final_pass(error: &HandlerError) -> bool {
    matches!(
        error,
        HandlerError::Retryable { .. } | HandlerError::Permanent { .. }
    )
}

/// The handler's view of a claimed event: its payload, its pass, and its recorded steps. The
/// event's text and JSON move into the job: settling needs only its key and fingerprint.
fn new_job(
    shared: &Shared,
    message: &ReceivedMessage,
    identity: &mut EventIdentity,
    markers: &RedriveMarkers,
    claim: &Claim,
    lease: &Lease,
    cancel: &CancellationToken,
) -> Job {
    Job {
        lease: lease.clone(),
        message_id: message.message_id.clone(),
        body: identity.unwrapped.take(),
        raw_body: message.body.clone(),
        json: identity.json.take(),
        attributes: message
            .attribute_strings()
            .filter_map(|(k, v)| Some((k.to_owned(), v?.to_owned())))
            .collect(),
        attempt: claim.attempts,
        redrive_count: markers.redrive_count,
        final_pass: markers.final_pass,
        store: shared.handler_store.clone(),
        recorder: shared.recorder.clone(),
        pending: Default::default(),
        transactions: shared.handler.step_transactions(),
        recorded: store::parse_steps(&claim.steps),
        next_step: 0,
        lease_lost: false,
        cancel: cancel.clone(),
        unrecorded_effect: None,
        trace: spans::producer_context(message),
    }
}

/// Run the handler in its own task (so a panic is caught as a JoinError instead of taking
/// the permit and the outcome with it), supervised by the heartbeat.
async fn run_handler(
    shared: &Arc<Shared>,
    mut job: Job,
    cancel: &CancellationToken,
    watch: &Watch<'_>,
    lease: Duration,
    tokens: &BatchTokens,
) -> Ended {
    let handler = shared.handler.clone();
    let started = Instant::now();
    let current = tracing::Span::current();
    let span = match spans::handle(&current) {
        none if none.is_none() => current,
        handle => handle,
    };
    let task = tokio::spawn(
        async move {
            // A handler that returns early without an error must still have reached every
            // recorded step, or its plan changed under this event.
            handler
                .handle(&mut job)
                .await
                .and_then(|()| job.check_plan_complete())
        }
        .instrument(span.clone()),
    );
    let ended = supervise(shared, task, cancel, watch, lease, tokens).await;
    match &ended {
        Ended::Finished(Err(error)) => spans::record_error(&span, error),
        Ended::Abandoned => spans::record_error(&span, &"stopped at the shutdown deadline"),
        Ended::Finished(Ok(())) => {}
    }
    shared
        .counters
        .handler_seconds
        .record(started.elapsed().as_secs_f64());
    ended
}
