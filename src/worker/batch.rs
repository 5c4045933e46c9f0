//! One received batch: parse it, claim its events in one store call, and route each
//! delivery by its outcome (run, ride along, skip, defer, dead-letter).

use super::*;

/// A message whose event identity has been worked out.
pub(super) struct Parsed {
    pub(super) message: ReceivedMessage,
    pub(super) markers: RedriveMarkers,
    pub(super) identity: Result<EventIdentity, KeyError>,
    /// Place in the receive batch (FIFO: order within a message group).
    pub(super) position: usize,
}

impl Parsed {
    pub(super) fn key(&self) -> String {
        match &self.identity {
            Ok(identity) => identity.key.clone(),
            Err(_) => message::fallback_key(&self.message.body),
        }
    }

    pub(super) fn group(&self) -> &str {
        self.message.message_group_id().unwrap_or_default()
    }
}

/// A claimed event about to run: its first delivery, the claim, and later deliveries of the
/// same key in this batch (they share its fate).
pub(super) struct ClaimedEvent {
    pub(super) parsed: Parsed,
    pub(super) claim: Claim,
    pub(super) siblings: Vec<ReceivedMessage>,
    pub(super) permit: Option<OwnedSemaphorePermit>,
    /// Deliveries that arrive while it runs ride along (registered when claimed).
    pub(super) riders: Riders,
}

impl ClaimedEvent {
    pub(super) fn receipts(&self) -> Vec<String> {
        std::iter::once(&self.parsed.message)
            .chain(&self.siblings)
            .map(|m| m.receipt_handle.clone())
            .collect()
    }
}

/// Claim a receive batch in one statement and start what was claimed. Returns once every
/// message has a task or a fate; the tasks run on `tracker`.
pub(crate) async fn handle_batch(
    shared: &Arc<Shared>,
    tracker: &TaskTracker,
    messages: Vec<ReceivedMessage>,
    mut permits: Vec<OwnedSemaphorePermit>,
    context: &BatchContext,
) {
    // The lease starts now but the visibility timeout started at receive: shorten the lease
    // by the difference so both expire together (and, on Lambda, before the deadline).
    let mut lease = shared.lease.saturating_sub(context.received_at.elapsed());
    if let Some(cap) = context.lease_cap {
        lease = lease.min(cap.saturating_duration_since(Instant::now()));
    }
    let lease = lease.max(Duration::from_secs(1));

    let parsed: Vec<Parsed> = messages
        .into_iter()
        .enumerate()
        .map(|(position, message)| {
            let markers = message::parse_markers(message.attribute_strings());
            if !markers.problems.is_empty() {
                // One line per message, however many markers are bad.
                tracing::warn!(
                    message_id = %message.message_id,
                    problems = ?markers.problems,
                    "ignoring unreadable redrive markers (each counts as absent)"
                );
            }
            Parsed {
                identity: message::derive_identity(
                    &shared.config.key,
                    shared.config.envelope,
                    &message.body,
                ),
                markers,
                message,
                position,
            }
        })
        .collect();

    let lease_token = format!(
        "{}#{}",
        shared.owner,
        shared.claim_sequence.fetch_add(1, Ordering::Relaxed)
    );
    let requests: Vec<ClaimRequest> = parsed
        .iter()
        .filter_map(|p| {
            let identity = p.identity.as_ref().ok()?;
            Some(ClaimRequest {
                key: identity.key.clone(),
                payload_sha256: identity.fingerprint.clone(),
                message_id: p.message.message_id.clone(),
                reclaim_failed: p.markers.redriven,
                pass: p.markers.pass(),
                field_digests: identity.field_digests.clone(),
            })
        })
        .collect();
    let _claiming = Claiming::new(shared, &requests);
    // Retried while the batch's visibility timeout leaves room (half the lease): a short
    // database blip then costs a moment, not a redelivery, and the messages stay hidden
    // meanwhile, so retrying adds nothing to their receive counts.
    let terms = ClaimTerms {
        lease,
        run_limit: shared.run_limit(lease),
        accept_mismatch: shared.config.on_payload_mismatch == PayloadMismatch::Accept,
    };
    let claimed = retry_database(shared, "claim", lease / 2, || {
        shared
            .store
            .claim_batch(&shared.scope, &lease_token, &terms, &requests)
    })
    .await;
    let outcomes = match claimed {
        Ok(outcomes) => outcomes,
        Err(error) => {
            tracing::error!(
                %error,
                messages = parsed.len(),
                "cannot claim checkpoints; the batch returns to the queue after its visibility \
                 timeout (is PostgreSQL reachable?)"
            );
            // Leaving the messages alone is safe: nothing was claimed or deleted.
            return;
        }
    };
    // Chaos tests kill the process here: claimed, no handler started.
    #[cfg(feature = "failpoints")]
    fail::fail_point!("sqs_worker::claimed");

    let mut claimed: Vec<ClaimedEvent> = Vec::new();
    let mut busy: Vec<(String, Duration)> = Vec::new();
    // FIFO: the first position in each group that did not get its claim, and about when it
    // is visible again; later messages of that group must wait for it.
    let mut blocked_from: HashMap<String, (usize, Duration)> = HashMap::new();
    for planned in plan_batch(parsed, &outcomes, shared.config.on_payload_mismatch) {
        match planned {
            Planned::Run {
                parsed,
                claim,
                siblings,
            } => {
                let identity = parsed.identity.as_ref().expect("a running event has a key");
                let riders = shared.start_running(identity);
                claimed.push(ClaimedEvent {
                    parsed,
                    claim,
                    siblings: siblings.into_iter().map(|s| s.message).collect(),
                    permit: permits.pop(),
                    riders,
                });
            }
            Planned::Unkeyed(p) => {
                let permit = permits.pop();
                let shared = shared.clone();
                tracker.spawn(async move {
                    let _permit = permit;
                    dead_letter_unkeyed(&shared, p).await;
                });
            }
            Planned::Mismatch(p, first) => spawn_mismatch(shared, tracker, p, first, permits.pop()),
            Planned::Duplicate(p) => skip_duplicate(shared, p).await,
            Planned::Busy(p, lease_remaining, run_remaining) => {
                let retry_after = busy_deferral(
                    lease_remaining,
                    run_remaining,
                    receive_count(&p.message),
                    shared.max_receive_count,
                );
                let Some((p, retry_after)) =
                    busy_delivery(shared, tracker, p, retry_after, &mut permits)
                else {
                    continue;
                };
                blocked_from
                    .entry(p.group().to_owned())
                    .or_insert((p.position, retry_after));
                busy.push((
                    p.message.receipt_handle,
                    retry_after.max(Duration::from_secs(1)),
                ));
            }
            Planned::NoRow(p) => {
                tracing::error!(key = %p.key(), "claim returned no row for a key; leaving the message for redelivery");
                blocked_from
                    .entry(p.group().to_owned())
                    .or_insert((p.position, lease));
            }
        }
    }
    if !busy.is_empty() {
        shared.change_visibility(&busy).await;
    }

    if !shared.fifo {
        // One task drives the batch's events concurrently (each handler still runs in a
        // task of its own): a task per message cost measurably more CPU in scheduling.
        let shared = shared.clone();
        let tokens = context.tokens.clone();
        tracker.spawn(async move {
            let nothing_waits = Waiting::default();
            join_all(claimed.into_iter().map(|event| {
                run_event(&shared, event, &lease_token, lease, &tokens, &nothing_waits)
            }))
            .await;
        });
        return;
    }

    // FIFO: one task per message group runs its events one at a time, in receive order
    // (SQS returns a group's messages in order). After a failure the rest of the group is
    // handed back instead of running out of order; SQS keeps the group blocked until the
    // failed message is visible again and delivers it first.
    let mut groups: Vec<(String, Vec<ClaimedEvent>)> = Vec::new();
    for event in claimed {
        let group = event.parsed.group().to_owned();
        match groups.iter_mut().find(|(g, _)| *g == group) {
            Some((_, events)) => events.push(event),
            None => groups.push((group, vec![event])),
        }
    }
    for (group, events) in groups {
        let shared = shared.clone();
        let lease_token = lease_token.clone();
        let tokens = context.tokens.clone();
        let blocked = blocked_from.get(&group).copied();
        tracker.spawn(async move {
            run_group(&shared, events, &lease_token, lease, &tokens, blocked).await;
        });
    }
}

pub(super) fn spawn_mismatch(
    shared: &Arc<Shared>,
    tracker: &TaskTracker,
    parsed: Parsed,
    first: FirstPayload,
    permit: Option<OwnedSemaphorePermit>,
) {
    let shared = shared.clone();
    tracker.spawn(async move {
        let _permit = permit;
        dead_letter_mismatch(&shared, parsed, first).await;
    });
}

/// A delivery of an event already complete or failed: delete it, at info level
/// (duplicates are normal).
pub(super) async fn skip_duplicate(shared: &Shared, parsed: Parsed) {
    shared.counters.duplicates_skipped.add(1);
    tracing::info!(
        message_id = %parsed.message.message_id,
        key = %parsed.key(),
        "event already handled; deleting this duplicate delivery"
    );
    shared
        .enqueue_delete(vec![parsed.message.receipt_handle])
        .await;
}

/// A delivery of an event leased by a claim: it rides along when the event runs here (with
/// the same payload), comes back in a moment when this process is claiming or settling the
/// event, and otherwise when the holder's run must have ended. `None` when it needs no
/// visibility change (it rides along, or went the mismatch way).
pub(super) fn busy_delivery(
    shared: &Arc<Shared>,
    tracker: &TaskTracker,
    parsed: Parsed,
    retry_after: Duration,
    permits: &mut Vec<OwnedSemaphorePermit>,
) -> Option<(Parsed, Duration)> {
    let identity = parsed
        .identity
        .as_ref()
        .expect("busy deliveries have a key");
    let key = identity.key.clone();
    let retry_after = match shared.ride_along(identity, &parsed.message.receipt_handle) {
        RideAlong::Attached => {
            tracing::info!(
                message_id = %parsed.message.message_id,
                %key,
                "event is running in this worker; this delivery rides along with it"
            );
            return None;
        }
        RideAlong::Mismatch(first) => {
            spawn_mismatch(shared, tracker, parsed, first, permits.pop());
            return None;
        }
        // Completion is a statement away: look again in a second, not a lease.
        RideAlong::Settling => OWN_CLAIM_RETRY,
        // Another batch of ours claims it right now (its run is about to be registered):
        // likewise.
        RideAlong::NotHere
            if shared.claimed_elsewhere_here(&key) || shared.settled_here_recently(&key) =>
        {
            OWN_CLAIM_RETRY
        }
        RideAlong::NotHere => retry_after,
    };
    shared.counters.busy_deferred.add(1);
    tracing::info!(
        message_id = %parsed.message.message_id,
        %key,
        retry_in_secs = retry_after.as_secs_f64(),
        "event is leased by another worker; this delivery comes back when that lease (or, near maxReceiveCount, that run) ends"
    );
    Some((parsed, retry_after))
}

/// When a delivery of an event this worker is claiming or settling comes back.
pub(super) const OWN_CLAIM_RETRY: Duration = Duration::from_secs(1);
