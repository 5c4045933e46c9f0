//! The acker: one task that batches checkpoint completions and DeleteMessageBatch calls.

use std::sync::Arc;
use std::time::Duration;

use futures_util::future::join_all;
use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::store::{Completion, Lease, NewStep, Written};

use super::retry::retry_database;
use super::shared::Shared;

pub(super) enum AckKind {
    /// Mark the checkpoint complete (fenced by the lease token) — appending the handler's
    /// last step, when its record is still to be written —, then delete the receipts.
    Complete {
        lease: Lease,
        last_step: Option<NewStep>,
    },
    /// Just delete the receipts.
    Delete,
}

#[derive(Debug)]
pub(super) enum AckResult {
    Done,
    LeaseLost,
    Failed(String),
    /// The last step's record can never be stored: nothing was written or deleted, and the
    /// receipts come back to be settled otherwise.
    TooLarge {
        detail: String,
        receipts: Vec<String>,
    },
}

pub(super) struct AckRequest {
    kind: AckKind,
    pub(super) receipts: Vec<String>,
    reply: Option<oneshot::Sender<AckResult>>,
}

pub(super) struct PendingAck<'a> {
    shared: &'a Shared,
    kind: AckKind,
}

impl PendingAck<'_> {
    /// Queue the request and wait for the acker's answer.
    pub(super) async fn with_receipts(self, receipts: Vec<String>) -> AckResult {
        let (reply, answer) = oneshot::channel();
        let request = AckRequest {
            kind: self.kind,
            receipts,
            reply: Some(reply),
        };
        if self.shared.acks.send(request).await.is_err() {
            return AckResult::Failed("the delete task has stopped".into());
        }
        answer
            .await
            .unwrap_or_else(|_| AckResult::Failed("the delete task dropped the request".into()))
    }
}

impl Shared {
    pub(super) fn ack(&self, kind: AckKind) -> PendingAck<'_> {
        PendingAck { shared: self, kind }
    }

    /// Queue a delete without waiting for it (skipped duplicates: a failed delete only costs
    /// another cheap skip).
    pub(super) async fn enqueue_delete(&self, receipts: Vec<String>) {
        // Lambda: the invocation's answer must already count the duplicate as settled.
        if self.mode.settle_locally(&receipts) {
            return;
        }
        let request = AckRequest {
            kind: AckKind::Delete,
            receipts,
            reply: None,
        };
        if self.acks.send(request).await.is_err() {
            tracing::warn!(
                "the delete task has stopped; the duplicate will be skipped again later"
            );
        }
    }

    /// Make all of `receipts` visible again after the same `delay`.
    pub(super) async fn show_after(&self, receipts: &[String], delay: Duration) {
        let changes: Vec<(String, Duration)> =
            receipts.iter().map(|r| (r.clone(), delay)).collect();
        self.change_visibility(&changes).await;
    }

    pub(super) async fn change_visibility(&self, changes: &[(String, Duration)]) {
        if !self.mode.changes_visibility() {
            return;
        }
        match self.sqs.change_visibility_batch(changes).await {
            Ok(failures) => {
                self.sqs_reached(true);
                for failure in failures {
                    tracing::warn!(reason = %failure.reason, "could not change a message's visibility; it returns after its current timeout");
                }
            }
            Err(error) => {
                self.sqs_reached(false);
                tracing::warn!(%error, "could not change visibility; the messages return after their current timeout");
            }
        }
    }
}

/// Most receipts settled together: one completion statement for all their events, then
/// DeleteMessageBatch calls of 10 in parallel.
const ACK_BATCH: usize = 50;
/// How long the acker waits for more requests before settling what it has.
const ACK_LINGER: Duration = Duration::from_millis(5);
/// Settlements in flight at once, so deletes overlap receives as in a bare loop.
pub(super) const ACK_PARALLEL: usize = 4;

pub(super) async fn run_acker(
    shared: Arc<Shared>,
    mut requests: mpsc::Receiver<AckRequest>,
    stop: CancellationToken,
) {
    let slots = Arc::new(Semaphore::new(ACK_PARALLEL));
    let mut settling = JoinSet::new();
    loop {
        while settling.try_join_next().is_some() {}
        let first = tokio::select! {
            biased;
            request = requests.recv() => match request {
                Some(request) => request,
                None => break,
            },
            _ = stop.cancelled() => {
                // Settle what is already queued, then stop.
                let mut rest = Vec::new();
                while let Ok(request) = requests.try_recv() {
                    rest.push(request);
                }
                if !rest.is_empty() {
                    settle_acks(&shared, rest).await;
                }
                break;
            }
        };
        let mut batch = vec![first];
        let mut receipts: usize = batch[0].receipts.len();
        let deadline = tokio::time::Instant::now() + ACK_LINGER;
        while receipts < ACK_BATCH {
            match tokio::time::timeout_at(deadline, requests.recv()).await {
                Ok(Some(request)) => {
                    receipts += request.receipts.len();
                    batch.push(request);
                }
                _ => break,
            }
        }
        let slot = slots
            .clone()
            .acquire_owned()
            .await
            .expect("semaphore never closed");
        let shared = shared.clone();
        settling.spawn(async move {
            settle_acks(&shared, batch).await;
            drop(slot);
        });
    }
    while settling.join_next().await.is_some() {}
}

async fn settle_acks(shared: &Shared, mut batch: Vec<AckRequest>) {
    let events: Vec<Completion> = batch
        .iter_mut()
        .filter_map(|r| match &mut r.kind {
            AckKind::Complete { lease, last_step } => Some(Completion {
                key: lease.key.clone(),
                token: lease.token.clone(),
                last_step: last_step.take(),
            }),
            AckKind::Delete => None,
        })
        .collect();
    // The handlers' work is done: keep trying for half a lease (their messages stay hidden
    // and their leases held meanwhile) rather than have them run again after an outage.
    let completed: Result<Vec<Written>, String> =
        retry_database(shared, "marking events complete", shared.lease / 2, || {
            shared.store.complete_events(&shared.scope, &events)
        })
        .await
        .map_err(|error| format!("cannot mark events complete: {error}"));
    if let Err(error) = &completed {
        tracing::error!(%error, events = events.len(), "not deleting them; they will be delivered again");
    }
    // Chaos tests kill the process here: checkpoints complete, messages not deleted.
    #[cfg(feature = "failpoints")]
    if !events.is_empty() && completed.is_ok() {
        fail::fail_point!("sqs_worker::completed");
    }

    let mut outcomes = completed.as_ref().map(|written| written.iter());
    let mut to_delete: Vec<String> = Vec::new();
    let mut replies = Vec::with_capacity(batch.len());
    for request in batch {
        // Only a completed (or plain delete) request may delete: no message is deleted
        // before its checkpoint says complete or failed.
        let written = match (&request.kind, &mut outcomes) {
            (AckKind::Delete, _) => Ok(Written::Done),
            (AckKind::Complete { .. }, Ok(written)) => {
                Ok(written.next().cloned().unwrap_or(Written::NotHeld))
            }
            (AckKind::Complete { .. }, Err(error)) => Err(error.clone()),
        };
        let result = match written {
            Ok(Written::Done) => {
                to_delete.extend(request.receipts);
                AckResult::Done
            }
            Ok(Written::NotHeld) => AckResult::LeaseLost,
            Ok(Written::TooLarge(detail)) => AckResult::TooLarge {
                detail,
                receipts: request.receipts,
            },
            Err(error) => AckResult::Failed(error),
        };
        replies.push((request.reply, result));
    }
    // A failed delete does not change the answer: the event is settled, and the message
    // that comes back is skipped as a duplicate.
    delete_receipts(shared, &to_delete).await;
    shared.touch();
    for (reply, result) in replies {
        if let Some(reply) = reply {
            let _ = reply.send(result);
        }
    }
}

/// DeleteMessageBatch in chunks of 10, all at once: one round trip's wait, not several.
/// Returns the receipts that were not deleted; each failure is logged and counted, never
/// dropped silently.
async fn delete_receipts(shared: &Shared, receipts: &[String]) -> Vec<String> {
    join_all(receipts.chunks(10).map(|chunk| delete_chunk(shared, chunk)))
        .await
        .into_iter()
        .flatten()
        .collect()
}

/// One DeleteMessageBatch (at most 10 receipts).
async fn delete_chunk(shared: &Shared, receipts: &[String]) -> Vec<String> {
    if receipts.is_empty() {
        return Vec::new();
    }
    // Lambda deletes every message the invocation does not report as failed.
    if shared.mode.settle_locally(receipts) {
        return Vec::new();
    }
    match shared.sqs.delete_batch(receipts).await {
        Ok(failures) => {
            shared.sqs_reached(true);
            shared.counters.delete_failures.add(failures.len());
            for failure in &failures {
                tracing::warn!(reason = %failure.reason, "SQS refused a delete; the message returns and is skipped as a duplicate");
            }
            failures.into_iter().map(|f| f.receipt_handle).collect()
        }
        Err(error) => {
            shared.sqs_reached(false);
            shared.counters.delete_failures.add(receipts.len());
            tracing::warn!(%error, messages = receipts.len(), "delete failed; the messages return and are skipped as duplicates");
            receipts.to_vec()
        }
    }
}
