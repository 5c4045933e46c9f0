//! Retry delays: exponential backoff with jitter, and retrying a store call for a while.

use std::time::{Duration, Instant};

use crate::sqs::MAX_VISIBILITY;
use crate::store::StoreError;

use super::shared::Shared;

/// Retry delay for the `attempt`-th claim: exponential from `base`, capped at `max` and
/// below SQS's 12 h visibility limit, with "equal jitter" (`jitter` in 0..1 picks a point in
/// the upper half) so retries of a burst spread out but never come back at once.
pub fn retry_delay(attempt: u32, base: Duration, max: Duration, jitter: f64) -> Duration {
    let exponent = attempt.saturating_sub(1).min(30);
    let ceiling = base
        .saturating_mul(1u32 << exponent)
        .min(max)
        .min(MAX_VISIBILITY);
    let half = ceiling / 2;
    half + half.mul_f64(jitter.clamp(0.0, 1.0))
}

/// A checkpoint statement, tried again with a doubling delay (100 ms up to 2 s) until
/// `budget` has passed. Each failure is counted and marks the database unreachable (which
/// stops receiving, see `Shared::database_up`); a success marks it reachable.
pub(super) async fn retry_database<T, F, Fut>(
    shared: &Shared,
    what: &str,
    budget: Duration,
    mut call: F,
) -> Result<T, StoreError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, StoreError>>,
{
    let give_up_at = Instant::now() + budget;
    let mut delay = Duration::from_millis(100);
    loop {
        match call().await {
            Ok(value) => {
                shared.database_reached(true);
                return Ok(value);
            }
            Err(error) => {
                shared.counters.database_errors.add(1);
                shared.database_reached(false);
                if Instant::now() + delay >= give_up_at {
                    return Err(error);
                }
                tracing::warn!(%error, retry_in_ms = delay.as_millis() as u64, "{what} failed; trying again");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(2));
            }
        }
    }
}
