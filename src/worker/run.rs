//! Running one claimed event: the handler under its heartbeat, then one settlement per
//! outcome.

use super::*;

pub(super) const SHUTTING_DOWN: &str = "shutting down before it started";

/// Give a claimed event back untouched: release its lease and make its message(s) visible
/// again — at once at shutdown, or just after `back_in` behind a FIFO group's held message.
pub(super) async fn hand_back(
    shared: &Shared,
    event: &ClaimedEvent,
    lease_token: &str,
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
    match shared.store.unclaim(&shared.scope, lease_token, &key).await {
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
    lease_token: &str,
    lease: Duration,
    tokens: &BatchTokens,
    waiting: &Waiting,
) -> Option<Duration> {
    let key = event.parsed.key();
    let span = tracing::info_span!(
        "message",
        message_id = %event.parsed.message.message_id,
        key = %key,
        attempt = event.claim.attempts,
    );
    shared.in_flight.fetch_add(1, Ordering::Relaxed);
    shared.counters.in_flight.increment(1.0);
    let riders = event.riders.clone();
    let settled = run_claimed(shared, event, lease_token, lease, tokens, waiting)
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

pub(super) async fn run_claimed(
    shared: &Arc<Shared>,
    event: ClaimedEvent,
    lease_token: &str,
    lease: Duration,
    tokens: &BatchTokens,
    waiting: &Waiting,
) -> Option<Duration> {
    let mut receipts = event.receipts();
    let ClaimedEvent {
        parsed,
        claim,
        siblings,
        permit,
        riders,
    } = event;
    let mut duplicates = siblings.len();
    let identity = parsed.identity.expect("claimed messages have a key");
    let message = parsed.message;
    let markers = parsed.markers;
    let cancel = CancellationToken::new();
    let mut job = Job {
        scope: shared.scope.clone(),
        key: identity.key.clone(),
        message_id: message.message_id.clone(),
        body: identity.body,
        raw_body: message.body.clone(),
        json: identity.json,
        attributes: message
            .attribute_strings()
            .filter_map(|(k, v)| Some((k.to_owned(), v?.to_owned())))
            .collect(),
        attempt: claim.attempts,
        redrive_count: markers.redrive_count,
        final_pass: markers.final_pass,
        store: shared.handler_store.clone(),
        owner: lease_token.to_owned(),
        recorded: checkpoint::parse_steps(&claim.steps),
        next_step: 0,
        lease_lost: false,
        cancel: cancel.clone(),
        unrecorded_effect: None,
    };
    if claim.resumed {
        tracing::info!(
            "resuming an event seen before (a retry, or a takeover of an expired lease)"
        );
    }

    // The handler runs in its own task so a panic is caught as a JoinError instead of taking
    // the permit and the outcome with it.
    let handler = shared.handler.clone();
    let started = Instant::now();
    let task = tokio::spawn(
        async move {
            // A handler that returns early without an error must still have reached every
            // recorded step, or its plan changed under this event.
            handler
                .handle(&mut job)
                .await
                .and_then(|()| job.check_plan_complete())
        }
        .instrument(tracing::Span::current()),
    );
    let watch = Watch {
        lease_token,
        key: &identity.key,
        receipts: &receipts,
        riders: &riders,
        waiting,
    };
    let ended = supervise(shared, task, &cancel, &watch, lease, tokens).await;
    shared
        .counters
        .handler_seconds
        .record(started.elapsed().as_secs_f64());
    // The handler is done: the slot may serve the next message while this one settles (the
    // acker's queue bounds what waits for settling).
    drop(permit);
    // Deliveries of this event received while it ran share its fate from here on.
    let riders = shared.stop_running(&riders);
    duplicates += riders.len();
    receipts.extend(riders);
    let result = match ended {
        Ended::Finished(result) => result,
        Ended::Abandoned => {
            tracing::warn!("stopped at the shutdown deadline; handing the message back");
            if shared
                .release_lease(
                    lease_token,
                    &identity.key,
                    "stopped at the shutdown deadline",
                )
                .await
            {
                shared.counters.released_at_shutdown.add(receipts.len());
                shared.show_after(&receipts, Duration::ZERO).await;
            }
            return Some(Duration::ZERO);
        }
    };

    // The last redrive an operator allowed: any failure ends here, recorded, never looping.
    if markers.final_pass
        && let Err(error @ (HandlerError::Retryable { .. } | HandlerError::Permanent { .. })) =
            &result
    {
        let reason = match error {
            HandlerError::Permanent { reason, .. } => reason.as_str(),
            _ => "retryable",
        };
        let failure = FinalFailure {
            key: &identity.key,
            fingerprint: &identity.fingerprint,
            lease_token: Some(lease_token),
            mark_checkpoint: true,
            reason,
            error: &error.to_string(),
            attempts: claim.attempts,
            pass: markers.pass(),
        };
        return (!end_final_pass(shared, &message, receipts, failure).await)
            .then_some(shared.lease);
    }
    match result {
        Ok(()) => {
            // Chaos tests kill the process here: the handler is done, nothing recorded.
            #[cfg(feature = "failpoints")]
            fail::fail_point!("sqs_worker::handled");
            match shared
                .ack(AckKind::Complete {
                    key: identity.key.clone(),
                    lease_token: lease_token.to_owned(),
                })
                .with_receipts(receipts)
                .await
            {
                AckResult::Done => {
                    shared.counters.processed.add(1);
                    shared.counters.duplicates_skipped.add(duplicates);
                    tracing::info!("event complete");
                    None
                }
                AckResult::LeaseLost => {
                    shared.counters.lease_lost.add(1);
                    tracing::warn!(
                        "the lease was taken by another worker before completion; leaving the \
                         message to the lease holder"
                    );
                    Some(shared.lease)
                }
                AckResult::Failed(error) => {
                    tracing::error!(%error, "could not record completion; the message will be delivered again");
                    Some(shared.lease)
                }
            }
        }
        Err(HandlerError::LeaseLost) => {
            shared.counters.lease_lost.add(1);
            tracing::warn!(
                "stopped at a step boundary: the lease was lost or could not be renewed; \
                 leaving the message to SQS and the next lease holder"
            );
            Some(shared.lease)
        }
        Err(HandlerError::Retryable {
            message: error,
            retry_after,
        }) => {
            // A handler's Retry-After is a minimum, never a way around the backoff: "0" or a
            // date in the past from a struggling endpoint would otherwise bring the message
            // back at once, again and again, through maxReceiveCount into the DLQ.
            let backoff = shared.backoff(claim.attempts);
            let delay = retry_after.map_or(backoff, |after| after.max(backoff));
            retry_later(shared, lease_token, &identity.key, &error, &receipts, delay).await;
            Some(delay)
        }
        Err(HandlerError::Permanent {
            message: error,
            reason,
        }) => {
            // Only the lease holder may send the event to the DLQ and delete its message: a
            // task whose lease was taken over meanwhile leaves both to the new holder.
            if !still_held(shared, lease_token, &identity.key).await {
                return Some(shared.lease);
            }
            let sent = send_to_dlq(shared, &message, &reason, &error).await;
            if !sent {
                let delay = shared.backoff(claim.attempts);
                retry_later(shared, lease_token, &identity.key, &error, &receipts, delay).await;
                return Some(delay);
            }
            match shared
                .store
                .mark_failed(&shared.scope, lease_token, &identity.key, &error)
                .await
            {
                Ok(true) => {}
                Ok(false) => {
                    shared.counters.lease_lost.add(1);
                    tracing::warn!(
                        "the lease was taken over just after the DLQ send; leaving the message \
                         to its new holder (the DLQ holds a copy)"
                    );
                    return Some(shared.lease);
                }
                Err(error) => {
                    shared.counters.database_errors.add(1);
                    tracing::error!(%error, "could not mark the checkpoint failed; the message is in the DLQ");
                }
            }
            // The message is safely in the DLQ: delete it.
            shared.ack(AckKind::Delete).with_receipts(receipts).await;
            shared.counters.duplicates_skipped.add(duplicates);
            None
        }
    }
}
