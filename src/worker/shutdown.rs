//! Stopping: the drain after a stop signal (with its hand-back grace) and the idle monitor
//! of `--exit-when-idle`.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::shared::Shared;

/// After the drain deadline, how long stopped handlers get to hand their messages back
/// (release the lease, visibility 0). ECS's 30 s stopTimeout leaves 5 s over the default
/// 25 s drain.
const HAND_BACK_GRACE: Duration = Duration::from_secs(3);

/// The drain after a stop: in-flight long polls and handlers share one deadline that starts
/// now, so the whole drain stays within --shutdown-timeout (below the orchestrator's stop
/// timeout). Handlers still running then are stopped and their messages handed back.
/// Returns how many could not be handed back in time.
pub(super) async fn drain(
    shared: &Shared,
    mut pollers: JoinSet<()>,
    tracker: TaskTracker,
    abandon: CancellationToken,
) -> u64 {
    if let Some(readiness) = &shared.readiness {
        readiness.stopping();
    }
    let deadline = tokio::time::Instant::now() + shared.config.shutdown_timeout;
    tracker.close();
    let running = shared.in_flight.load(Ordering::Relaxed);
    if running > 0 {
        tracing::info!(
            in_flight = running,
            deadline_secs = shared.config.shutdown_timeout.as_secs(),
            "stopped receiving; waiting for in-flight handlers"
        );
    }
    let all_done = async |pollers: &mut JoinSet<()>| {
        while pollers.join_next().await.is_some() {}
        tracker.wait().await;
    };
    if tokio::time::timeout_at(deadline, all_done(&mut pollers))
        .await
        .is_ok()
    {
        return 0;
    }
    tracing::warn!(
        in_flight = shared.in_flight.load(Ordering::Relaxed),
        "shutdown deadline passed; stopping the handlers still running and handing their \
         messages back (lease released, visible again at once)"
    );
    abandon.cancel();
    if tokio::time::timeout(HAND_BACK_GRACE, all_done(&mut pollers))
        .await
        .is_ok()
    {
        return 0;
    }
    pollers.abort_all();
    let abandoned = shared.in_flight.load(Ordering::Relaxed) as u64;
    tracing::warn!(
        abandoned,
        "some messages could not be handed back in time; their leases expire and SQS \
         delivers them again after the visibility timeout"
    );
    abandoned
}

/// `--exit-when-idle`: stop once nothing was received or in flight here for `idle` *and* the
/// queue holds nothing visible, in flight or delayed, so that a batch job does not leave
/// behind work it could have done (a crashed worker's message still hidden, a retry waiting
/// out its backoff, a delayed send). Messages hidden elsewhere are waited for at most the
/// lease plus `idle` from the moment this worker went idle; then it exits and says what it
/// left.
pub(super) async fn exit_when_idle(shared: Arc<Shared>, idle: Duration, stop: CancellationToken) {
    let tick = (idle / 4).clamp(Duration::from_millis(20), Duration::from_millis(250));
    let bound = shared.lease + idle;
    // Since when this worker has been idle while the queue still held messages.
    let mut waiting_since: Option<Instant> = None;
    let mut next_look = Instant::now();
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(tick) => {}
        }
        let quiet_for = shared.last_activity.lock().expect("not poisoned").elapsed();
        if shared.in_flight.load(Ordering::Relaxed) > 0 || quiet_for < idle {
            waiting_since = None;
            continue;
        }
        if Instant::now() < next_look {
            continue;
        }
        next_look = Instant::now() + QUEUE_LOOK_EVERY;
        let counts = match shared.sqs.message_counts().await {
            Ok(counts) => counts,
            Err(error) => {
                tracing::warn!(%error, "nothing received or in flight for the idle period, and the queue's counts cannot be read; exiting (--exit-when-idle)");
                stop.cancel();
                return;
            }
        };
        if counts.total() == 0 {
            tracing::info!(
                idle_secs = idle.as_secs_f64(),
                "the queue is drained and nothing ran for the idle period; exiting (--exit-when-idle)"
            );
            stop.cancel();
            return;
        }
        let since = *waiting_since.get_or_insert_with(|| {
            tracing::info!(
                in_flight = counts.in_flight,
                delayed = counts.delayed,
                visible = counts.visible,
                wait_at_most_secs = bound.as_secs(),
                "idle, but the queue still holds messages that are in flight elsewhere or \
                 delayed; waiting for them (--exit-when-idle)"
            );
            Instant::now()
        });
        if since.elapsed() >= bound {
            tracing::warn!(
                in_flight = counts.in_flight,
                delayed = counts.delayed,
                visible = counts.visible,
                waited_secs = since.elapsed().as_secs(),
                "exiting with messages left in the queue: they did not become visible within \
                 the visibility timeout plus the idle period (--exit-when-idle)"
            );
            stop.cancel();
            return;
        }
    }
}

/// How often an idle worker with `--exit-when-idle` asks the queue what it still holds.
const QUEUE_LOOK_EVERY: Duration = Duration::from_secs(1);

/// The long-poll wait: the configured one, or with `--exit-when-idle` no longer than the idle
/// period has left (at least 1 s), so the polls in flight when the worker goes idle end
/// within about a second of it instead of holding up the exit for a whole long poll.
pub(super) fn poll_wait(shared: &Shared) -> Duration {
    let Some(idle) = shared.config.exit_when_idle else {
        return shared.config.wait_time;
    };
    let quiet_for = shared.last_activity.lock().expect("not poisoned").elapsed();
    let left = idle.saturating_sub(quiet_for).max(Duration::from_secs(1));
    shared.config.wait_time.min(left)
}
