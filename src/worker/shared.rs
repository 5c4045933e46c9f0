//! The state every task of one run shares, and its small helpers.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use crate::handler::{Handler, StepRecorder};
use crate::message::EventIdentity;
use crate::sqs::SqsQueue;
use crate::store::{CheckpointStore, Lease};

use super::acker::AckRequest;
use super::config::{PayloadMismatch, WorkerConfig};
use super::dlq::FirstPayload;
use super::pollers::PollerCount;
use super::readiness::Readiness;
use super::retry::retry_delay;
use super::running::{RecentlySettled, RideAlong, Riders, RunningHere};
use super::settlement::Mode;
use super::summary::Counters;

/// What every task of one run shares.
pub(crate) struct Shared {
    pub(super) config: WorkerConfig,
    pub(super) sqs: SqsQueue,
    pub(super) dlq: Option<SqsQueue>,
    /// The queue's maxReceiveCount, when it has a DLQ: a message received that often goes
    /// to the DLQ at its next receive.
    pub(super) max_receive_count: Option<u32>,
    /// The worker's own statements, on a pool of their own (see
    /// [`CheckpointStore::own_connections`]).
    pub(super) store: Arc<dyn CheckpointStore>,
    /// The store handlers' step transactions write through: the pool the worker was given.
    pub(super) handler_store: Arc<dyn CheckpointStore>,
    /// Writes the handlers' step records, many events' in one statement (on the worker's
    /// own connections).
    pub(super) recorder: StepRecorder,
    pub(super) handler: Arc<dyn Handler>,
    pub(super) scope: String,
    /// This worker's name (`--worker-id`): the first part of its lease tokens.
    pub(super) worker_id: String,
    /// Numbers each claim statement: the lease token written to a checkpoint is
    /// `worker_id#n`, so even this worker's own stale task (whose lease expired and was taken
    /// over by a newer claim here) is fenced out.
    pub(super) claim_sequence: AtomicU64,
    pub(super) lease: Duration,
    /// A FIFO queue: a message group's messages run one at a time, in order.
    pub(super) fifo: bool,
    pub(super) counters: Counters,
    /// The long polls running, within `--pollers` and `--max-pollers`.
    pub(super) pollers: PollerCount,
    pub(super) in_flight: AtomicUsize,
    /// Events running in this process, with deliveries of them that arrived meanwhile
    /// (claimed Busy by our own lease): they ride along instead of waiting out the lease.
    pub(super) running: Mutex<HashMap<String, RunningHere>>,
    /// Keys in claim statements of this process right now, with how many statements.
    pub(super) claiming: Mutex<HashMap<String, usize>>,
    /// Keys settled here in the last few seconds (see `finish_running`).
    pub(super) settled_recently: Mutex<RecentlySettled>,
    /// When the first message arrived (for `RunSummary::active_millis`).
    pub(super) first_received: std::sync::OnceLock<Instant>,
    pub(super) last_activity: Mutex<Instant>,
    pub(super) acks: mpsc::Sender<AckRequest>,
    pub(super) readiness: Option<Arc<Readiness>>,
    /// The latest database call succeeded. While it is false, pollers stop receiving: a
    /// message received now could not be claimed, and each such receive would count
    /// towards the queue's maxReceiveCount and push healthy events into the DLQ.
    pub(super) database_up: AtomicBool,
    pub(super) mode: Mode,
}

impl Shared {
    pub(super) fn touch(&self) {
        *self.last_activity.lock().expect("not poisoned") = Instant::now();
    }

    pub(super) fn backoff(&self, attempt: u32) -> Duration {
        retry_delay(
            attempt,
            self.config.backoff_base,
            self.config.backoff_max,
            fastrand::f64(),
        )
    }

    /// The longest a run claimed with `lease` may take (see [`Mode::run_limit`]).
    pub(super) fn run_limit(&self, lease: Duration) -> Duration {
        self.mode.run_limit(lease, self.config.max_handler_time).0
    }

    pub(super) fn sqs_reached(&self, ok: bool) {
        if let Some(readiness) = &self.readiness {
            readiness.sqs(ok);
        }
    }

    pub(super) fn database_reached(&self, ok: bool) {
        let was_up = self.database_up.swap(ok, Ordering::Relaxed);
        if was_up && !ok {
            tracing::warn!(
                "PostgreSQL is unreachable; receiving stops until it answers again (work in \
                 hand is retried, nothing is deleted unsettled)"
            );
        } else if !was_up && ok {
            tracing::info!("PostgreSQL answers again; receiving resumes");
        }
        if let Some(readiness) = &self.readiness {
            readiness.database(ok);
        }
    }

    pub(super) fn database_up(&self) -> bool {
        self.database_up.load(Ordering::Relaxed)
    }

    /// Register an event as running here; returns its riders' slot.
    pub(super) fn start_running(&self, identity: &EventIdentity) -> Riders {
        let riders: Riders = Arc::new(Mutex::new(Some(Vec::new())));
        self.running.lock().expect("not poisoned").insert(
            identity.key.clone(),
            RunningHere {
                fingerprint: identity.fingerprint.clone(),
                fields: identity.field_digests.clone(),
                riders: riders.clone(),
            },
        );
        riders
    }

    /// The handler ended: take the receipts that rode along (they share its fate). The event
    /// is *settling* until `finish_running`: deliveries arriving meanwhile come back shortly.
    pub(super) fn stop_running(&self, riders: &Riders) -> Vec<String> {
        riders
            .lock()
            .expect("not poisoned")
            .take()
            .unwrap_or_default()
    }

    /// The event is settled: forget it, but remember for a moment that it ran here (a claim
    /// that started before the completion committed still sees it leased).
    pub(super) fn finish_running(&self, key: &str, riders: &Riders) {
        let mut running = self.running.lock().expect("not poisoned");
        if running
            .get(key)
            .is_some_and(|r| Arc::ptr_eq(&r.riders, riders))
        {
            running.remove(key);
        }
        drop(running);
        self.settled_recently
            .lock()
            .expect("not poisoned")
            .insert(key, Instant::now());
    }

    /// True when this process settled `key` a moment ago.
    pub(super) fn settled_here_recently(&self, key: &str) -> bool {
        self.settled_recently
            .lock()
            .expect("not poisoned")
            .contains(key, Instant::now())
    }

    /// Give a lease back (fenced by its token), with `reason` as the event's last error.
    /// True only when the lease was ours and is now released: otherwise the message belongs
    /// to the event's new holder (or its ownership cannot be told, the database failing), and
    /// the caller must leave it alone. A failure is logged; the lease then expires on its own.
    pub(super) async fn release(&self, lease: &Lease, reason: &str) -> bool {
        match self.store.release(lease, reason).await {
            Ok(true) => true,
            Ok(false) => {
                self.counters.lease_lost.add(1);
                tracing::warn!(
                    "the lease was taken over meanwhile; leaving the message to its new holder"
                );
                false
            }
            Err(error) => {
                self.counters.database_errors.add(1);
                tracing::error!(%error, "could not release the lease; it expires on its own, and the message returns after its visibility timeout");
                false
            }
        }
    }

    /// True when another claim statement of this process includes `key` right now.
    pub(super) fn claimed_elsewhere_here(&self, key: &str) -> bool {
        self.claiming
            .lock()
            .expect("not poisoned")
            .get(key)
            .is_some_and(|&n| n > 1)
    }

    /// Attach a delivery to the run of its event in this process, if there is one and it
    /// carries the same payload (a delivery with another payload is a mismatch, never a
    /// rider: riders are deleted as duplicates when the event completes).
    pub(super) fn ride_along(&self, identity: &EventIdentity, receipt: &str) -> RideAlong {
        let running = self.running.lock().expect("not poisoned");
        let Some(run) = running.get(&identity.key) else {
            return RideAlong::NotHere;
        };
        if self.config.on_payload_mismatch == PayloadMismatch::DeadLetter
            && run.fingerprint != identity.fingerprint
        {
            return RideAlong::Mismatch(FirstPayload::InBatch {
                fingerprint: run.fingerprint.clone(),
                fields: run.fields.clone(),
            });
        }
        match run.riders.lock().expect("not poisoned").as_mut() {
            Some(receipts) => {
                receipts.push(receipt.to_owned());
                RideAlong::Attached
            }
            None => RideAlong::Settling,
        }
    }

    pub(crate) fn mode(&self) -> &Mode {
        &self.mode
    }

    /// One ReceiveMessage call answered with `n` messages.
    pub(super) fn count_receive(&self, n: usize) {
        self.counters.receive_calls.add(1);
        if n == 0 {
            self.counters.empty_receives.add(1);
        }
    }

    pub(crate) fn count_received(&self, n: usize) {
        self.first_received.get_or_init(Instant::now);
        self.counters.received.add(n);
    }
}
