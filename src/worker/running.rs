//! The registry of events running in this process: deliveries that arrive while their event
//! runs here ride along with it instead of waiting out the lease.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::store::ClaimRequest;

use super::dlq::FirstPayload;
use super::shared::Shared;

/// Registers a claim statement's keys while it runs (see `Shared::claimed_elsewhere_here`).
pub(super) struct Claiming<'a> {
    shared: &'a Shared,
    keys: Vec<String>,
}

impl<'a> Claiming<'a> {
    pub(super) fn new(shared: &'a Shared, requests: &[ClaimRequest]) -> Self {
        let mut keys: Vec<String> = requests.iter().map(|r| r.key.clone()).collect();
        keys.sort_unstable();
        keys.dedup();
        let mut claiming = shared.claiming.lock().expect("not poisoned");
        for key in &keys {
            *claiming.entry(key.clone()).or_default() += 1;
        }
        drop(claiming);
        Self { shared, keys }
    }
}

impl Drop for Claiming<'_> {
    fn drop(&mut self) {
        let mut claiming = self.shared.claiming.lock().expect("not poisoned");
        for key in &self.keys {
            if let Some(n) = claiming.get_mut(key) {
                *n -= 1;
                if *n == 0 {
                    claiming.remove(key);
                }
            }
        }
    }
}

/// Keys settled in the last [`RECENTLY_SETTLED`], forgotten in the order they came: each
/// insert drops only what has expired, so the bookkeeping per event stays constant however
/// fast events settle (a full scan per insert would not).
#[derive(Default)]
pub(super) struct RecentlySettled {
    at: HashMap<String, Instant>,
    order: std::collections::VecDeque<(Instant, String)>,
}

impl RecentlySettled {
    pub(super) fn insert(&mut self, key: &str, now: Instant) {
        while let Some((at, oldest)) = self.order.front() {
            if now.duration_since(*at) < RECENTLY_SETTLED {
                break;
            }
            if self.at.get(oldest) == Some(at) {
                self.at.remove(oldest);
            }
            self.order.pop_front();
        }
        self.at.insert(key.to_owned(), now);
        self.order.push_back((now, key.to_owned()));
    }

    pub(super) fn contains(&self, key: &str, now: Instant) -> bool {
        self.at
            .get(key)
            .is_some_and(|at| now.duration_since(*at) < RECENTLY_SETTLED)
    }
}

/// Receipts of deliveries riding along with a running event; `None` once its handler ended.
pub(super) type Riders = Arc<Mutex<Option<Vec<String>>>>;

/// An event running in this process: the payload it runs with, and the deliveries riding
/// along with it.
pub(super) struct RunningHere {
    pub(super) fingerprint: String,
    pub(super) fields: Option<String>,
    pub(super) riders: Riders,
}

/// What became of a delivery whose event is leased (Busy).
pub(super) enum RideAlong {
    /// Its event runs here with another payload.
    Mismatch(FirstPayload),
    /// Its event runs here: it shares that run's fate.
    Attached,
    /// Its event just ran here and is being settled: it comes back in a moment.
    Settling,
    /// Another worker (or an earlier, stale claim) holds the lease.
    NotHere,
}

/// How long a settled event is remembered for `OWN_CLAIM_RETRY`: far longer than a claim
/// statement takes.
const RECENTLY_SETTLED: Duration = Duration::from_secs(5);
