//! [`Job`]: one event as the handler sees it — its key, payload, attempt and pass.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use serde_json::Value;
use tokio_util::sync::CancellationToken;

use crate::message::trace::TraceContext;
use crate::spans::{self, TraceHeaders};
use crate::store::{CheckpointStore, Lease, NewStep, RecordedStep, StoreKind};

use super::recorder::StepRecorder;

/// The record of a job's latest step while it waits to be written: before the next step
/// starts, or with the event's completion. Shared with the worker, which writes it when the
/// handler ends (with the completion, or on its own after a failure or a stop).
pub(crate) type PendingStep = Arc<Mutex<Option<NewStep>>>;

/// One event to handle, and the record of its completed steps.
#[derive(Debug, Clone)]
pub struct Job {
    pub(crate) lease: Lease,
    pub(crate) message_id: String,
    /// The unwrapped event, when an envelope held it; `None`: the body is the event.
    pub(crate) body: Option<String>,
    pub(crate) raw_body: String,
    pub(crate) json: Option<Value>,
    pub(crate) attributes: HashMap<String, String>,
    pub(crate) attempt: u32,
    pub(crate) redrive_count: u32,
    pub(crate) final_pass: bool,
    pub(crate) store: Arc<dyn CheckpointStore>,
    /// Writes step records, a group of events' at a time.
    pub(crate) recorder: StepRecorder,
    /// The latest step's record, not written yet.
    pub(crate) pending: PendingStep,
    /// The store kind whose transactions the handler declared it uses, checked against the
    /// store at start ([`crate::Handler::step_transactions`]).
    pub(crate) transactions: Option<StoreKind>,
    pub(crate) recorded: Vec<RecordedStep>,
    pub(crate) next_step: usize,
    pub(crate) lease_lost: bool,
    pub(crate) cancel: CancellationToken,
    /// The name of a [`Job::step_effect`] that succeeded but could not be recorded: later
    /// steps of this attempt cannot be appended in order after it.
    pub(crate) unrecorded_effect: Option<String>,
    /// The producer's trace context, passed on when spans are not exported.
    pub(crate) trace: Option<TraceContext>,
}

impl Job {
    /// The checkpoint scope (by default the queue name).
    pub fn scope(&self) -> &str {
        &self.lease.scope
    }

    /// The idempotency key of the event.
    pub fn key(&self) -> &str {
        &self.lease.key
    }

    /// The W3C trace context to send with what this event causes downstream (as
    /// `traceparent`/`tracestate` headers, or `TRACEPARENT`/`TRACESTATE` in a command's
    /// environment): the current span's while spans are exported, else the producer's
    /// unchanged. `None` when there is neither.
    pub fn trace_headers(&self) -> Option<TraceHeaders> {
        spans::outgoing(self.trace.as_ref())
    }

    /// The SQS MessageId of this delivery.
    pub fn message_id(&self) -> &str {
        &self.message_id
    }

    /// The event as text: the message body, unwrapped from its SNS or EventBridge envelope
    /// when `--envelope` says so.
    pub fn body(&self) -> &str {
        self.body.as_deref().unwrap_or(&self.raw_body)
    }

    /// The SQS message body exactly as received, envelope included.
    pub fn raw_body(&self) -> &str {
        &self.raw_body
    }

    /// The event parsed as JSON, if it is JSON.
    pub fn json(&self) -> Option<&Value> {
        self.json.as_ref()
    }

    /// String and Number message attributes.
    pub fn attributes(&self) -> &HashMap<String, String> {
        &self.attributes
    }

    /// Which claim of this event this is: 1 the first time, more after retries or takeovers.
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// How many times an operator redrove this message from the DLQ.
    pub fn redrive_count(&self) -> u32 {
        self.redrive_count
    }

    /// True on the last redrive an operator allows: a failure now ends the message.
    pub fn is_final_pass(&self) -> bool {
        self.final_pass
    }

    /// Cancelled when the worker can no longer vouch for this event: a heartbeat could not
    /// renew the lease or the visibility, or the shutdown deadline passed. A long handler
    /// should stop at the next safe point (`tokio::select!` on `cancelled()`); steps refuse
    /// to start once it is cancelled, and the handler is stopped when the lease ends.
    pub fn cancellation(&self) -> &CancellationToken {
        &self.cancel
    }

    /// Names of the steps completed so far, earlier attempts included.
    pub fn completed_steps(&self) -> Vec<&str> {
        self.recorded.iter().map(|s| s.name.as_str()).collect()
    }
}
