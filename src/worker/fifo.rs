//! FIFO queues: a message group's events run one at a time, in order, each started only on a
//! confirmed lease.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio_util::task::TaskTracker;

use super::batch::{ClaimedEvent, Routed};
use super::core::BatchTokens;
use super::heartbeat::Waiting;
use super::pause::pause_at;
use super::run::{SHUTTING_DOWN, hand_back, run_event};
use super::shared::Shared;

/// FIFO: one task per message group runs its events one at a time, in receive order (SQS
/// returns a group's messages in order). After a failure the rest of the group is handed
/// back instead of running out of order; SQS keeps the group blocked until the failed
/// message is visible again and delivers it first.
pub(super) fn start_groups(
    shared: &Arc<Shared>,
    tracker: &TaskTracker,
    routed: Routed,
    tokens: &BatchTokens,
) {
    let mut groups: Vec<(String, Vec<ClaimedEvent>)> = Vec::new();
    for event in routed.claimed {
        let group = event.parsed.group().to_owned();
        match groups.iter_mut().find(|(g, _)| *g == group) {
            Some((_, events)) => events.push(event),
            None => groups.push((group, vec![event])),
        }
    }
    let lease = routed.lease;
    for (group, events) in groups {
        let shared = shared.clone();
        let tokens = tokens.clone();
        let blocked = routed.blocked_from.get(&group).copied();
        tracker.spawn(async move {
            run_group(&shared, events, lease, &tokens, blocked).await;
        });
    }
}

/// A FIFO group's events, one at a time in receive order. The ones waiting their turn are
/// kept alive by the running one's heartbeat, and each starts only once its lease is
/// confirmed and renewed: an event whose lease was taken over while it waited (it became
/// visible and was claimed anew) is left to its new holder, and the rest of the group is
/// handed back behind it. Once one message is held, the rest of the group waits until
/// shortly after it is visible again: SQS itself blocks a group while a message is in
/// flight, and the extra second keeps the order even where a broker does not.
async fn run_group(
    shared: &Arc<Shared>,
    events: Vec<ClaimedEvent>,
    lease: Duration,
    tokens: &BatchTokens,
    blocked: Option<(usize, Duration)>,
) {
    let waiting: Waiting = Mutex::new(
        events
            .iter()
            .skip(1)
            .map(|event| (event.parsed.key(), event.receipts()))
            .collect(),
    );
    let mut hold: Option<(Duration, &str)> = None;
    for (turn, event) in events.into_iter().enumerate() {
        let key = event.parsed.key();
        waiting
            .lock()
            .expect("not poisoned")
            .retain(|(waiting_key, _)| *waiting_key != key);
        if tokens.stop.is_cancelled() {
            hold = Some((
                hold.map_or(Duration::ZERO, |(back_in, _)| back_in),
                SHUTTING_DOWN,
            ));
        }
        if hold.is_none()
            && let Some((position, back_in)) = blocked
            && position < event.parsed.position
        {
            hold = Some((
                back_in,
                "an earlier message of its group is leased elsewhere",
            ));
        }
        if hold.is_none() && turn > 0 {
            // Chaos and race tests widen the gap between a group's events here.
            pause_at("sqs_worker::fifo_next").await;
            if !start_waiting(shared, &event, lease).await {
                hold = Some((lease, "an earlier message of its group was taken over"));
                // Its lease is another holder's: nothing of it is handed back here.
                shared.finish_running(&key, &event.riders);
                continue;
            }
        }
        if let Some((back_in, reason)) = hold {
            hand_back(shared, &event, reason, back_in).await;
            continue;
        }
        if let Some(back_in) = run_event(shared, event, lease, tokens, &waiting).await {
            hold = Some((back_in, "an earlier message of its group did not complete"));
        }
    }
}

/// Confirm that a waiting FIFO event's lease is still this claim's, and renew it with its
/// messages' visibility for a run starting now. False when it was taken over.
async fn start_waiting(shared: &Shared, event: &ClaimedEvent, lease: Duration) -> bool {
    let key = event.parsed.key();
    match shared
        .store
        .start_run(&event.lease, lease, shared.run_limit(lease))
        .await
    {
        Ok(true) => {
            shared.show_after(&event.receipts(), lease).await;
            true
        }
        Ok(false) => {
            shared.counters.lease_lost.add(1);
            tracing::warn!(
                message_id = %event.parsed.message.message_id,
                %key,
                "the event's lease was taken over while it waited its turn in its group; \
                 leaving it to its new holder"
            );
            false
        }
        Err(error) => {
            shared.counters.database_errors.add(1);
            tracing::error!(%error, %key, "cannot confirm a waiting event's lease; not starting it");
            false
        }
    }
}
