//! Receiving: long polls that take permits first, and the database probe that stops them
//! while the checkpoint store is down.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::sqs::{ReceivedMessage, SqsError};

use super::batch::handle_batch;
use super::core::{BatchContext, BatchTokens};
use super::pollers::{Scale, after_receive};
use super::shared::Shared;
use super::shutdown::poll_wait;

/// Ping the database while the worker runs, so `/readyz` notices an outage even when no
/// messages arrive, and so receiving resumes soon after an outage ends (every second while
/// it is down, every few seconds otherwise).
pub(super) async fn probe_database(shared: Arc<Shared>, stop: CancellationToken) {
    loop {
        let ok = matches!(
            tokio::time::timeout(Duration::from_secs(2), shared.store.ping()).await,
            Ok(Ok(()))
        );
        shared.database_reached(ok);
        let next = if ok {
            PROBE_EVERY
        } else {
            PROBE_EVERY_WHILE_DOWN
        };
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(next) => {}
        }
    }
}

/// Hold a poller while the database is unreachable (see `Shared::database_up`). Returns
/// false if the worker is stopping.
async fn wait_for_database(shared: &Shared, stop: &CancellationToken) -> bool {
    while !shared.database_up() {
        tokio::select! {
            _ = stop.cancelled() => return false,
            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
        }
    }
    true
}

/// What every poller of a run shares: the permits, the tracker of batch tasks, the tokens,
/// and where to ask for one more poller.
#[derive(Clone)]
pub(super) struct Poller {
    pub(super) shared: Arc<Shared>,
    pub(super) semaphore: Arc<Semaphore>,
    pub(super) tracker: TaskTracker,
    pub(super) tokens: BatchTokens,
    /// Ask the service to start another poller (already counted in `Shared::pollers`).
    pub(super) add: mpsc::UnboundedSender<()>,
}

/// One poller: take permits, long-poll, hand the batch on, until `stop` is cancelled or the
/// poller is one too many (see `pollers.rs`).
pub(super) async fn poll(poller: Poller) {
    if !poll_until_retired(&poller).await {
        poller.shared.pollers.ended();
    }
}

/// The poll loop; true when this poller retired (its count already given back), false when
/// the worker stopped.
async fn poll_until_retired(poller: &Poller) -> bool {
    let Poller {
        shared, semaphore, ..
    } = poller;
    let stop = &poller.tokens.stop;
    let full = shared.config.concurrency.clamp(1, 10);
    let mut error_backoff = Duration::from_millis(500);
    loop {
        if !wait_for_database(shared, stop).await {
            return false;
        }
        let Some(permits) = take_permits(shared, semaphore, stop).await else {
            return false;
        };
        // Fewer than a batch's permits to be had: more pollers would only split them into
        // small receives.
        if permits.len() < full && shared.pollers.try_retire() {
            return true;
        }
        let asked = permits.len();
        let Some(received) = receive(shared, asked, stop).await else {
            return false;
        };
        let received_at = Instant::now();
        let messages = match received {
            Err(error) => {
                shared.sqs_reached(false);
                shared.counters.receive_errors.add(1);
                tracing::error!(%error, retry_in_ms = error_backoff.as_millis() as u64, "receive failed");
                drop(permits);
                tokio::select! {
                    _ = stop.cancelled() => return false,
                    _ = tokio::time::sleep(error_backoff) => {}
                }
                error_backoff = (error_backoff * 2).min(RECEIVE_BACKOFF_MAX);
                continue;
            }
            Ok(messages) => messages,
        };
        shared.sqs_reached(true);
        error_backoff = Duration::from_millis(500);
        shared.count_receive(messages.len());
        match after_receive(messages.len(), asked, full, semaphore.available_permits()) {
            Scale::Retire if shared.pollers.try_retire() => return true,
            Scale::Add if shared.pollers.try_add() => {
                let _ = poller.add.send(());
            }
            _ => {}
        }
        if !messages.is_empty() {
            let context = BatchContext {
                received_at,
                lease_cap: None,
                tokens: poller.tokens.clone(),
                rechecks: 0,
                parent: None,
            };
            start_batch(shared, &poller.tracker, messages, permits, context);
        }
    }
}

/// Wait for one free slot, then gather up to a full batch for a moment: a receive of 10
/// costs SQS (and the claim statement) what a receive of 1 does, and slots free up quickly
/// when handlers are fast. Never more than can start now. `None` when stopped.
async fn take_permits(
    shared: &Shared,
    semaphore: &Arc<Semaphore>,
    stop: &CancellationToken,
) -> Option<Vec<OwnedSemaphorePermit>> {
    let batch_size = shared.config.concurrency.clamp(1, 10);
    let first = tokio::select! {
        _ = stop.cancelled() => return None,
        permit = semaphore.clone().acquire_owned() => permit.expect("semaphore never closed"),
    };
    let mut permits = vec![first];
    let gather_until = tokio::time::Instant::now() + PERMIT_GATHER;
    while permits.len() < batch_size {
        match tokio::time::timeout_at(gather_until, semaphore.clone().acquire_owned()).await {
            Ok(permit) => permits.push(permit.expect("semaphore never closed")),
            Err(_) => break,
        }
    }
    Some(permits)
}

/// One long poll for up to `count` messages. `None` when stopped meanwhile: a long poll
/// cannot be withdrawn (dropped here, SQS would still hand it messages and hide them for a
/// whole visibility timeout), so it is let finish and whatever it brings is given back.
async fn receive(
    shared: &Shared,
    count: usize,
    stop: &CancellationToken,
) -> Option<Result<Vec<ReceivedMessage>, SqsError>> {
    let config = &shared.config;
    let receive = shared
        .sqs
        .receive(count, poll_wait(shared), config.visibility_timeout);
    tokio::pin!(receive);
    tokio::select! {
        result = &mut receive => Some(result),
        _ = stop.cancelled() => {
            let grace = (config.wait_time + Duration::from_secs(5)).min(config.shutdown_timeout);
            if let Ok(Ok(messages)) = tokio::time::timeout(grace, receive).await {
                hand_back_received(shared, &messages).await;
            }
            None
        }
    }
}

/// Claim a received batch in a task of its own, so the poller goes straight back to
/// receiving (as far as permits allow) while the claim statement runs.
fn start_batch(
    shared: &Arc<Shared>,
    tracker: &TaskTracker,
    messages: Vec<ReceivedMessage>,
    permits: Vec<OwnedSemaphorePermit>,
    context: BatchContext,
) {
    // Chaos tests kill the process here: received, nothing claimed yet.
    #[cfg(feature = "failpoints")]
    fail::fail_point!("sqs_worker::received");
    shared.touch();
    shared.count_received(messages.len());
    let (shared, tracker_inner) = (shared.clone(), tracker.clone());
    tracker.spawn(async move {
        handle_batch(&shared, &tracker_inner, messages, permits, &context).await;
    });
}

/// Make messages received during shutdown visible again at once, for another worker.
async fn hand_back_received(shared: &Shared, messages: &[ReceivedMessage]) {
    if messages.is_empty() {
        return;
    }
    tracing::info!(
        messages = messages.len(),
        "shutting down: returning messages received but not started"
    );
    shared.counters.released_at_shutdown.add(messages.len());
    let receipts: Vec<String> = messages.iter().map(|m| m.receipt_handle.clone()).collect();
    shared.show_after(&receipts, Duration::ZERO).await;
}

/// How long a poller waits for more free slots before receiving fewer than 10 messages.
const PERMIT_GATHER: Duration = Duration::from_millis(20);
/// The longest pause between receives while SQS answers with errors: short, so a worker is
/// back within seconds of an outage's end (the SDK retries each call too).
const RECEIVE_BACKOFF_MAX: Duration = Duration::from_secs(5);
/// How often the database is pinged while it answers, and while it does not.
const PROBE_EVERY: Duration = Duration::from_secs(2);
const PROBE_EVERY_WHILE_DOWN: Duration = Duration::from_secs(1);
