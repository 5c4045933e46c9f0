//! The pure part of claiming: which delivery of a batch claims each event, and how long a
//! busy delivery waits.

use std::collections::HashMap;
use std::time::Duration;

use crate::sqs::ReceivedMessage;
use crate::store::{Claim, ClaimOutcome};

use super::batch::Parsed;
use super::config::PayloadMismatch;
use super::dlq::FirstPayload;

/// What becomes of one delivery of a claimed receive batch (see [`plan_batch`]).
pub(super) enum Planned {
    /// The delivery that runs its event, with the later deliveries of the same event in
    /// this batch (they share its fate).
    Run {
        parsed: Parsed,
        claim: Claim,
        siblings: Vec<Parsed>,
    },
    /// No key could be taken from it: to the DLQ.
    Unkeyed(Parsed),
    /// Its key is stored, or runs in this batch, with another payload: to the DLQ.
    Mismatch(Parsed, FirstPayload),
    /// Its event is complete, or failed on this pass or a later one: a duplicate.
    Duplicate(Parsed),
    /// Its event is leased by another claim: time left on the lease, and until the run
    /// must have ended.
    Busy(Parsed, Duration, Duration),
    /// The claim statement returned nothing for its key.
    NoRow(Parsed),
}

/// Decide each delivery's fate from the claim's outcomes. Pure, so the rules can be read
/// (and checked) in one place: a delivery whose payload differs from the stored one (or from
/// the one claimed in this batch) is a mismatch and touches nothing; of the deliveries of a
/// claimed event, the first runs — or the one of the latest redrive pass, so its markers
/// decide — and the others share its fate.
pub(super) fn plan_batch(
    parsed: Vec<Parsed>,
    outcomes: &HashMap<String, ClaimOutcome>,
    policy: PayloadMismatch,
) -> Vec<Planned> {
    let mut plan: Vec<Planned> = Vec::with_capacity(parsed.len());
    let mut runs: HashMap<String, usize> = HashMap::new();
    for p in parsed {
        let Ok(identity) = &p.identity else {
            plan.push(Planned::Unkeyed(p));
            continue;
        };
        let key = identity.key.clone();
        let Some(outcome) = outcomes.get(&key) else {
            plan.push(Planned::NoRow(p));
            continue;
        };
        let stored = outcome.stored_payload_sha256();
        if policy == PayloadMismatch::DeadLetter
            && stored.is_some_and(|s| s != identity.fingerprint)
        {
            let first = match runs.get(&key).map(|&i| &plan[i]) {
                Some(Planned::Run { parsed: runner, .. }) => {
                    let runner = runner.identity.as_ref().expect("a running event has a key");
                    FirstPayload::InBatch {
                        fingerprint: runner.fingerprint.clone(),
                        fields: runner.field_digests.clone(),
                    }
                }
                _ => FirstPayload::Stored(stored.unwrap_or_default().to_owned()),
            };
            plan.push(Planned::Mismatch(p, first));
            continue;
        }
        match outcome {
            ClaimOutcome::Claimed(claim) => match runs.get(&key) {
                Some(&i) => {
                    let Planned::Run {
                        parsed: runner,
                        siblings,
                        ..
                    } = &mut plan[i]
                    else {
                        unreachable!("runs index Run entries");
                    };
                    if p.markers.pass() > runner.markers.pass() {
                        // The claim was made for the latest pass in the batch (a redrive
                        // beside a plain duplicate): that delivery runs, with its markers.
                        siblings.push(std::mem::replace(runner, p));
                    } else {
                        siblings.push(p);
                    }
                }
                None => {
                    runs.insert(key, plan.len());
                    plan.push(Planned::Run {
                        parsed: p,
                        claim: claim.clone(),
                        siblings: Vec::new(),
                    });
                }
            },
            ClaimOutcome::Complete { .. } | ClaimOutcome::Failed { .. } => {
                plan.push(Planned::Duplicate(p))
            }
            ClaimOutcome::Busy {
                retry_after,
                run_remaining,
                ..
            } => plan.push(Planned::Busy(p, *retry_after, *run_remaining)),
        }
    }
    plan
}

/// How long a delivery of an event leased elsewhere is put back: until the lease ends (an
/// event that completes within its first lease is then skipped as soon as possible) — but
/// when its next receive would be the last the queue's maxReceiveCount allows before moving
/// it to the DLQ, until the holder's run must have ended: a long handler's duplicate must
/// not reach the DLQ while the event runs.
pub(super) fn busy_deferral(
    lease_remaining: Duration,
    run_remaining: Duration,
    receive_count: u32,
    max_receive_count: Option<u32>,
) -> Duration {
    match max_receive_count {
        Some(max) if receive_count + 1 >= max => run_remaining.max(lease_remaining),
        _ => lease_remaining,
    }
}

/// SQS's ApproximateReceiveCount of this delivery (1 when not reported).
pub(super) fn receive_count(message: &ReceivedMessage) -> u32 {
    message
        .system_attributes
        .get("ApproximateReceiveCount")
        .and_then(|c| c.parse().ok())
        .unwrap_or(1)
}
