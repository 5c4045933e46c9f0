//! One received batch: parse it, claim its events in one store call, and route each
//! delivery by its outcome (run, ride along, skip, defer, dead-letter).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use futures_util::future::join_all;
use tokio::sync::OwnedSemaphorePermit;
use tokio_util::task::TaskTracker;

use crate::message::{self, EventIdentity, KeyError, RedriveMarkers};
use crate::spans;
use crate::sqs::ReceivedMessage;
use crate::store::{Claim, ClaimOutcome, ClaimRequest, ClaimTerms, Lease};

use super::claim::{Planned, busy_deferral, plan_batch, receive_count};
use super::config::PayloadMismatch;
use super::core::{BatchContext, BatchTokens};
use super::dlq::{FirstPayload, dead_letter_mismatch, dead_letter_unkeyed};
use super::fifo::start_groups;
use super::heartbeat::Waiting;
use super::retry::retry_database;
use super::run::run_event;
use super::running::{Claiming, RideAlong, Riders};
use super::shared::Shared;

/// A message whose event identity has been worked out.
pub(super) struct Parsed {
    pub(super) message: ReceivedMessage,
    pub(super) markers: RedriveMarkers,
    pub(super) identity: Result<EventIdentity, KeyError>,
    /// Place in the receive batch (FIFO: order within a message group).
    pub(super) position: usize,
    /// Its `process` span (none while tracing is off).
    pub(super) span: tracing::Span,
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
    /// The lease this batch's claim took on the event.
    pub(super) lease: Lease,
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
    permits: Vec<OwnedSemaphorePermit>,
    context: &BatchContext,
) {
    let deliveries = messages.into_iter().map(|m| (m, None)).collect();
    handle_deliveries(shared, tracker, deliveries, permits, context).await;
}

/// [`handle_batch`] for deliveries that may already have their `process` span (looked at
/// again here: see [`recheck_here`]).
async fn handle_deliveries(
    shared: &Arc<Shared>,
    tracker: &TaskTracker,
    deliveries: Vec<Delivery>,
    permits: Vec<OwnedSemaphorePermit>,
    context: &BatchContext,
) {
    let lease = batch_lease(shared, context);
    let parsed = parse_batch(shared, deliveries, context.parent.as_ref());
    let lease_token = format!(
        "{}#{}",
        shared.worker_id,
        shared.claim_sequence.fetch_add(1, Ordering::Relaxed)
    );
    let requests = claim_requests(&parsed);
    let _claiming = Claiming::new(shared, &requests);
    let claim_spans: Vec<_> = parsed.iter().map(|p| spans::claim(&p.span)).collect();
    let outcomes = claim(shared, &lease_token, lease, &requests).await;
    drop(claim_spans);
    let Some(outcomes) = outcomes else {
        // Leaving the messages alone is safe: nothing was claimed or deleted.
        return;
    };
    // Chaos tests kill the process here: claimed, no handler started.
    #[cfg(feature = "failpoints")]
    fail::fail_point!("sqs_worker::claimed");
    let mut routed = Routed {
        lease_token,
        lease,
        permits,
        rechecks: context.rechecks,
        ..Routed::default()
    };
    for planned in plan_batch(parsed, &outcomes, shared.config.on_payload_mismatch) {
        routed.route(shared, tracker, planned).await;
    }
    if !routed.busy.is_empty() {
        shared.change_visibility(&routed.busy).await;
    }
    recheck_here(
        shared,
        tracker,
        std::mem::take(&mut routed.recheck),
        context,
    );
    let tokens = &context.tokens;
    if shared.fifo {
        start_groups(shared, tracker, routed, tokens);
    } else {
        start_events(shared, tracker, routed.claimed, lease, tokens);
    }
}

/// The lease of a batch's claims. It starts now but the visibility timeout started at
/// receive: shorten it by the difference so both expire together (and, on Lambda, before
/// the deadline).
fn batch_lease(shared: &Shared, context: &BatchContext) -> Duration {
    let mut lease = shared.lease.saturating_sub(context.received_at.elapsed());
    if let Some(cap) = context.lease_cap {
        lease = lease.min(cap.saturating_duration_since(Instant::now()));
    }
    lease.max(Duration::from_secs(1))
}

/// A delivery, with its `process` span when it has one already.
type Delivery = (ReceivedMessage, Option<tracing::Span>);

/// Work out each message's event identity and redrive markers, and give it its `process`
/// span (a child of `parent` when there is one).
fn parse_batch(
    shared: &Shared,
    deliveries: Vec<Delivery>,
    parent: Option<&opentelemetry::Context>,
) -> Vec<Parsed> {
    deliveries
        .into_iter()
        .enumerate()
        .map(|(position, (message, span))| {
            let markers = message::parse_markers(message.attribute_strings());
            if !markers.problems.is_empty() {
                // One line per message, however many markers are bad.
                tracing::warn!(
                    message_id = %message.message_id,
                    problems = ?markers.problems,
                    "ignoring unreadable redrive markers (each counts as absent)"
                );
            }
            let config = &shared.config;
            let identity = message::derive_identity(&config.key, config.envelope, &message.body);
            let span = span.unwrap_or_else(|| {
                let delivery = spans::Delivery {
                    message: &message,
                    queue: shared.sqs.name(),
                    key: identity.as_ref().ok().map(|i| i.key.as_str()),
                    redrive_count: markers.redrive_count,
                    final_pass: markers.final_pass,
                };
                spans::process(&delivery, parent)
            });
            Parsed {
                identity,
                markers,
                message,
                position,
                span,
            }
        })
        .collect()
}

/// One claim request per keyed message (unkeyed ones claim nothing).
fn claim_requests(parsed: &[Parsed]) -> Vec<ClaimRequest> {
    parsed
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
        .collect()
}

/// The batch's claim, retried while its visibility timeout leaves room (half the lease): a
/// short database blip then costs a moment, not a redelivery, and the messages stay hidden
/// meanwhile, so retrying adds nothing to their receive counts. `None` when it failed.
async fn claim(
    shared: &Shared,
    lease_token: &str,
    lease: Duration,
    requests: &[ClaimRequest],
) -> Option<HashMap<String, ClaimOutcome>> {
    let terms = ClaimTerms {
        lease,
        run_limit: shared.run_limit(lease),
        accept_mismatch: shared.config.on_payload_mismatch == PayloadMismatch::Accept,
    };
    let claimed = retry_database(shared, "claim", lease / 2, || {
        shared
            .store
            .claim_batch(&shared.scope, lease_token, &terms, requests)
    })
    .await;
    claimed
        .inspect_err(|error| {
            tracing::error!(
                %error,
                messages = requests.len(),
                "cannot claim checkpoints; the batch returns to the queue after its visibility \
                 timeout (is PostgreSQL reachable?)"
            );
        })
        .ok()
}

/// Where a batch's deliveries went, once each has a fate.
#[derive(Default)]
pub(super) struct Routed {
    pub(super) lease_token: String,
    pub(super) lease: Duration,
    /// The batch's permits not yet given to a task.
    permits: Vec<OwnedSemaphorePermit>,
    /// Events to run.
    pub(super) claimed: Vec<ClaimedEvent>,
    /// Busy deliveries and when they come back.
    busy: Vec<(String, Duration)>,
    /// Deliveries of events this process is claiming or settling right now, with their
    /// permits: claimed again here in a moment (see [`recheck_here`]).
    recheck: Vec<Recheck>,
    /// FIFO: the first position in each group that did not get its claim, and about when it
    /// is visible again; later messages of that group must wait for it.
    pub(super) blocked_from: HashMap<String, (usize, Duration)>,
    /// How many times this batch's deliveries were looked at again here (see
    /// [`recheck_here`]).
    rechecks: u32,
}

impl Routed {
    /// Give one planned delivery its fate: run it, dead-letter it, skip it or defer it.
    async fn route(&mut self, shared: &Arc<Shared>, tracker: &TaskTracker, planned: Planned) {
        match planned {
            Planned::Run {
                parsed,
                claim,
                siblings,
            } => self.run(shared, parsed, claim, siblings),
            Planned::Unkeyed(p) => {
                let permit = self.permits.pop();
                let shared = shared.clone();
                tracker.spawn(async move {
                    let _permit = permit;
                    dead_letter_unkeyed(&shared, p).await;
                });
            }
            Planned::Mismatch(p, first) => {
                spawn_mismatch(shared, tracker, p, first, self.permits.pop())
            }
            Planned::Duplicate(p) => {
                spans::record_outcome(&p.span, "duplicate");
                skip_duplicate(shared, p).await
            }
            Planned::Busy(p, lease_remaining, run_remaining) => {
                let retry_after = busy_deferral(
                    lease_remaining,
                    run_remaining,
                    receive_count(&p.message),
                    shared.max_receive_count,
                );
                self.defer(shared, tracker, p, retry_after);
            }
            Planned::NoRow(p) => {
                spans::record_outcome(&p.span, "unclaimed");
                tracing::error!(key = %p.key(), "claim returned no row for a key; leaving the message for redelivery");
                self.block(&p, self.lease);
            }
        }
    }

    /// A claimed event: registered as running here, to be started with a permit.
    fn run(&mut self, shared: &Shared, parsed: Parsed, claim: Claim, siblings: Vec<Parsed>) {
        let identity = parsed.identity.as_ref().expect("a running event has a key");
        let riders = shared.start_running(identity);
        let lease = Lease::new(&shared.scope, &identity.key, &self.lease_token);
        self.claimed.push(ClaimedEvent {
            lease,
            parsed,
            claim,
            siblings: siblings.into_iter().map(|s| s.message).collect(),
            permit: self.permits.pop(),
            riders,
        });
    }

    /// A busy delivery: rides along, or comes back after `retry_after`.
    fn defer(
        &mut self,
        shared: &Arc<Shared>,
        tracker: &TaskTracker,
        parsed: Parsed,
        retry_after: Duration,
    ) {
        let Some((p, deferral)) =
            busy_delivery(shared, tracker, parsed, retry_after, &mut self.permits)
        else {
            return;
        };
        let retry_after = match deferral {
            Deferral::Here if !shared.fifo && self.rechecks < MAX_RECHECKS => {
                self.recheck.push((p.message, self.permits.pop(), p.span));
                return;
            }
            Deferral::Here => OWN_CLAIM_RETRY,
            Deferral::Elsewhere(retry_after) => retry_after,
        };
        shared.counters.busy_deferred.add(1);
        spans::record_outcome(&p.span, "busy");
        tracing::info!(
            message_id = %p.message.message_id,
            key = %p.key(),
            retry_in_secs = retry_after.as_secs_f64(),
            "event is leased by another worker; this delivery comes back when that lease (or, near maxReceiveCount, that run) ends"
        );
        self.block(&p, retry_after);
        let receipt = p.message.receipt_handle;
        self.busy
            .push((receipt, retry_after.max(Duration::from_secs(1))));
    }

    /// FIFO: later messages of `parsed`'s group wait for it.
    fn block(&mut self, parsed: &Parsed, until: Duration) {
        self.blocked_from
            .entry(parsed.group().to_owned())
            .or_insert((parsed.position, until));
    }
}

/// Standard queue: one task drives the batch's events concurrently (each handler still runs
/// in a task of its own): a task per message cost measurably more CPU in scheduling.
fn start_events(
    shared: &Arc<Shared>,
    tracker: &TaskTracker,
    claimed: Vec<ClaimedEvent>,
    lease: Duration,
    tokens: &BatchTokens,
) {
    let shared = shared.clone();
    let tokens = tokens.clone();
    tracker.spawn(async move {
        let nothing_waits = Waiting::default();
        join_all(
            claimed
                .into_iter()
                .map(|event| run_event(&shared, event, lease, &tokens, &nothing_waits)),
        )
        .await;
    });
}

fn spawn_mismatch(
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
async fn skip_duplicate(shared: &Shared, parsed: Parsed) {
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

/// Where a busy delivery's event is held.
enum Deferral {
    /// By this process: claimed by another of its batches, or settling here.
    Here,
    /// By another claim: it comes back after this long.
    Elsewhere(Duration),
}

/// A delivery of an event leased by a claim: it rides along when the event runs here (with
/// the same payload), is looked at again in a moment when this process is claiming or
/// settling the event, and otherwise comes back when the holder's run must have ended.
/// `None` when it needs nothing more (it rides along, or went the mismatch way).
fn busy_delivery(
    shared: &Arc<Shared>,
    tracker: &TaskTracker,
    parsed: Parsed,
    retry_after: Duration,
    permits: &mut Vec<OwnedSemaphorePermit>,
) -> Option<(Parsed, Deferral)> {
    let identity = parsed
        .identity
        .as_ref()
        .expect("busy deliveries have a key");
    let key = identity.key.clone();
    let deferral = match shared.ride_along(identity, &parsed.message.receipt_handle) {
        RideAlong::Attached => {
            spans::record_outcome(&parsed.span, "ride_along");
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
        // Completion is a statement away: look again in a moment, not a lease.
        RideAlong::Settling => Deferral::Here,
        // Another batch of ours claims it right now (its run is about to be registered):
        // likewise.
        RideAlong::NotHere
            if shared.claimed_elsewhere_here(&key) || shared.settled_here_recently(&key) =>
        {
            Deferral::Here
        }
        RideAlong::NotHere => Deferral::Elsewhere(retry_after),
    };
    Some((parsed, deferral))
}

/// Claim again, in a moment and in a task of their own, deliveries whose event this process
/// was claiming or settling: by then the event runs here (they ride along) or is complete
/// (they are deleted as duplicates). Handing them to SQS for a second instead kept them
/// out of sight for a whole second each, and the last of a run's duplicates set its end.
/// They keep their permits, their receive time (their lease is what is left of their
/// visibility) and their `process` span (so their trace parent); after [`MAX_RECHECKS`]
/// looks they go back to SQS like any busy delivery.
fn recheck_here(
    shared: &Arc<Shared>,
    tracker: &TaskTracker,
    recheck: Vec<Recheck>,
    context: &BatchContext,
) {
    if recheck.is_empty() {
        return;
    }
    let mut deliveries = Vec::with_capacity(recheck.len());
    let mut permits = Vec::with_capacity(recheck.len());
    for (message, permit, span) in recheck {
        deliveries.push((message, Some(span)));
        permits.extend(permit);
    }
    let context = BatchContext {
        received_at: context.received_at,
        lease_cap: context.lease_cap,
        tokens: context.tokens.clone(),
        rechecks: context.rechecks + 1,
        parent: context.parent.clone(),
    };
    let (shared, tracker_inner) = (shared.clone(), tracker.clone());
    tracker.spawn(async move {
        tokio::time::sleep(RECHECK_AFTER * (1 << context.rechecks.min(4))).await;
        handle_deliveries(&shared, &tracker_inner, deliveries, permits, &context).await;
    });
}

/// A delivery to claim again here, with its permit and its `process` span.
type Recheck = (ReceivedMessage, Option<OwnedSemaphorePermit>, tracing::Span);

/// When a delivery of an event this worker is claiming or settling comes back, once it has
/// been looked at again here [`MAX_RECHECKS`] times.
const OWN_CLAIM_RETRY: Duration = Duration::from_secs(1);
/// The first wait before such a delivery is claimed again here; it doubles per look.
const RECHECK_AFTER: Duration = Duration::from_millis(25);
/// Looks in this process before such a delivery goes back to SQS for a second.
const MAX_RECHECKS: u32 = 3;
