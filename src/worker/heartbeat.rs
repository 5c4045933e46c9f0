//! The heartbeat: while a handler runs, extend its messages' visibility and its lease every
//! third of the lease; stop the handler when the lease cannot be kept.

use std::future::Future;
use std::pin::Pin;
use std::sync::Mutex;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::handler::HandlerError;
use crate::sqs;
use crate::store::Lease;

use super::core::BatchTokens;
use super::pause::pause_at;
use super::run::Ended;
use super::running::Riders;
use super::shared::Shared;

/// What a heartbeat keeps alive: the running event (its lease and its messages), the
/// deliveries riding along with it, and a FIFO group's events waiting their turn under the
/// same claim (their leases and messages too, so none of them runs late or elsewhere).
pub(super) struct Watch<'a> {
    pub(super) lease: &'a Lease,
    pub(super) receipts: &'a [String],
    pub(super) riders: &'a Riders,
    pub(super) waiting: &'a Waiting,
}

/// A FIFO group's claimed events that have not started yet: `(key, receipts)`.
pub(super) type Waiting = Mutex<Vec<(String, Vec<String>)>>;

/// Wait for a handler task while keeping its message and lease alive.
///
/// Heartbeat: every third of the lease, extend the visibility of the event's messages (and
/// its riders' and waiting companions') and the checkpoint lease together, each to a whole
/// lease from when the renewal was sent. A renewal runs beside the handler: while it is out,
/// the deadline, the drain and the lease's end are still watched. If a renewal fails, or the
/// lease ends before it comes back, the handler is told (its [`Job::cancellation`](crate::Job::cancellation) token)
/// and stopped when its current lease ends; its checkpoint writes stay fenced by the lease
/// token either way. The run is bounded by `--max-handler-time` (by the lease itself without
/// heartbeats, as on Lambda).
pub(super) async fn supervise(
    shared: &Shared,
    mut task: tokio::task::JoinHandle<Result<(), HandlerError>>,
    cancel: &CancellationToken,
    watch: &Watch<'_>,
    lease: Duration,
    tokens: &BatchTokens,
) -> Ended {
    let mut beat = Beat::new(shared, lease);
    let mut renewal: Option<Renewal<'_>> = None;
    loop {
        let beat_at = beat.next_beat.filter(|_| renewal.is_none());
        tokio::select! {
            joined = &mut task => return Ended::Finished(handler_result(joined)),
            _ = tokens.abandon.cancelled() => {
                stop_handler(cancel, &mut task, tokens.stop_grace).await;
                return Ended::Abandoned;
            }
            _ = tokio::time::sleep_until(beat.hard_deadline) => {
                stop_handler(cancel, &mut task, tokens.stop_grace).await;
                return Ended::Finished(Err(beat.stopped_error(shared)));
            }
            _ = sleep_until_some(beat_at) => {
                beat.renewal_sent = tokio::time::Instant::now();
                renewal = Some(Box::pin(renew(shared, watch)));
            }
            renewed = async { renewal.as_mut().expect("guarded by the condition").await }, if renewal.is_some() => {
                renewal = None;
                match renewed {
                    Ok(()) => beat.renewed(shared),
                    Err(problem) => beat.failed(shared, cancel, &problem),
                }
            }
            _ = tokio::time::sleep_until(beat.lease_until), if renewal.is_some() => {
                // The lease ended with its renewal still out: the event may be another
                // holder's by now.
                renewal = None;
                beat.failed(shared, cancel, "the renewal did not come back before the lease ended");
            }
        }
    }
}

/// The handler task's result; a panic or an abnormal end is a retryable failure.
fn handler_result(
    joined: Result<Result<(), HandlerError>, tokio::task::JoinError>,
) -> Result<(), HandlerError> {
    match joined {
        Ok(result) => result,
        Err(join_error) if join_error.is_panic() => {
            Err(HandlerError::retryable("the handler panicked"))
        }
        Err(join_error) => Err(HandlerError::retryable(format!(
            "the handler task ended abnormally: {join_error}"
        ))),
    }
}

/// A heartbeat's clock: when the lease ends, when the run must end, and the next renewal.
struct Beat {
    lease_until: tokio::time::Instant,
    hard_deadline: tokio::time::Instant,
    /// `None` once renewals have stopped (off, or one failed).
    next_beat: Option<tokio::time::Instant>,
    renewal_sent: tokio::time::Instant,
    beat_every: Duration,
    limit: Duration,
    limit_reason: &'static str,
}

impl Beat {
    fn new(shared: &Shared, lease: Duration) -> Self {
        let now = tokio::time::Instant::now();
        let (limit, limit_reason) = shared.mode.run_limit(lease, shared.config.max_handler_time);
        Beat {
            lease_until: now + lease,
            hard_deadline: now + limit,
            next_beat: shared.config.heartbeat.then(|| now + (lease / 3)),
            renewal_sent: now,
            beat_every: (shared.lease / 3).max(Duration::from_millis(500)),
            limit,
            limit_reason,
        }
    }

    /// A renewal came back: the lease runs a whole lease from when it was sent.
    fn renewed(&mut self, shared: &Shared) {
        shared.counters.heartbeats.add(1);
        self.lease_until = self.renewal_sent + shared.lease;
        self.next_beat = Some(self.renewal_sent + self.beat_every);
        tracing::debug!(
            lease_secs = shared.lease.as_secs(),
            "heartbeat: visibility and lease extended"
        );
    }

    /// A renewal failed: no more renewals, and the handler ends with its lease at the latest.
    fn failed(&mut self, shared: &Shared, cancel: &CancellationToken, problem: &str) {
        heartbeat_failed(shared, cancel, problem);
        self.next_beat = None;
        self.hard_deadline = self.hard_deadline.min(self.lease_until);
    }

    /// Why a handler stopped at its hard deadline: its lease ended unrenewed, or its limit.
    fn stopped_error(&self, shared: &Shared) -> HandlerError {
        let expired = self.hard_deadline >= self.lease_until;
        HandlerError::retryable(
            if expired && self.next_beat.is_none() && shared.config.heartbeat {
                "the handler was stopped when its lease ended (the heartbeat could not renew it)"
                    .to_owned()
            } else {
                format!(
                    "the handler was stopped after {:.1} s ({})",
                    self.limit.as_secs_f64(),
                    self.limit_reason
                )
            },
        )
    }
}

/// A heartbeat's renewal, running beside the handler.
type Renewal<'a> = Pin<Box<dyn Future<Output = Result<(), String>> + Send + 'a>>;

async fn sleep_until_some(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

fn heartbeat_failed(shared: &Shared, cancel: &CancellationToken, problem: &str) {
    shared.counters.heartbeat_failures.add(1);
    tracing::warn!(
        %problem,
        "heartbeat failed; telling the handler to stop (its writes stay fenced) and giving it \
         until its lease ends"
    );
    cancel.cancel();
}

/// How long a handler told to stop may take to wind down before its task is aborted: the
/// exec handler uses it to stop its command's process tree (SIGTERM, then SIGKILL).
pub(crate) const HANDLER_STOP_GRACE: Duration = Duration::from_millis(1500);

/// Tell the handler to stop, give it `grace` to do so, then abort its task.
async fn stop_handler(
    cancel: &CancellationToken,
    task: &mut tokio::task::JoinHandle<Result<(), HandlerError>>,
    grace: Duration,
) {
    cancel.cancel();
    if tokio::time::timeout(grace, &mut *task).await.is_err() {
        task.abort();
    }
}

/// One heartbeat: visibility and leases, renewed concurrently. It fails when the event's
/// own lease or messages could not be extended; a rider or a waiting companion that could
/// not be is dropped from the watch (a waiting event whose lease was taken will not start).
async fn renew(shared: &Shared, watch: &Watch<'_>) -> Result<(), String> {
    // Race tests make a renewal hang here.
    pause_at("sqs_worker::renew").await;
    let riders: Vec<String> = watch
        .riders
        .lock()
        .expect("not poisoned")
        .clone()
        .unwrap_or_default();
    let waiting = watch.waiting.lock().expect("not poisoned").clone();
    let waiting_keys: Vec<String> = waiting.iter().map(|(key, _)| key.clone()).collect();
    let changes: Vec<(String, Duration)> = watch
        .receipts
        .iter()
        .chain(&riders)
        .chain(waiting.iter().flat_map(|(_, receipts)| receipts))
        .map(|r| (r.clone(), shared.lease))
        .collect();
    let (visibility, lease, companions) = tokio::join!(
        shared.sqs.change_visibility_batch(&changes),
        shared.store.renew_lease(watch.lease, shared.lease),
        shared.store.renew_leases(
            &shared.scope,
            &watch.lease.token,
            &waiting_keys,
            shared.lease
        ),
    );
    if let Ok(held) = companions {
        watch
            .waiting
            .lock()
            .expect("not poisoned")
            .retain(|(key, _)| held.contains(key));
    }
    let own_failures = |failures: &[sqs::BatchEntryFailure]| -> Vec<String> {
        failures
            .iter()
            .filter(|f| watch.receipts.contains(&f.receipt_handle))
            .map(|f| f.reason.clone())
            .collect()
    };
    match (visibility, lease) {
        (Ok(failures), Ok(true)) => {
            let own = own_failures(&failures);
            if own.is_empty() {
                Ok(())
            } else {
                Err(format!(
                    "SQS refused to extend the visibility: {}",
                    own.join("; ")
                ))
            }
        }
        (Err(error), _) => Err(format!("cannot extend the visibility: {error}")),
        (_, Ok(false)) => Err("the lease is no longer ours".into()),
        (_, Err(error)) => {
            shared.counters.database_errors.add(1);
            Err(format!("cannot renew the lease: {error}"))
        }
    }
}
