//! Where the service and Lambda differ, in one place: how settled messages leave the queue,
//! whether visibility changes reach SQS, how long a run may take, and how the queue is read
//! at start. The rest of the core asks [`Mode`]; `lambda.rs` only picks it.

use std::collections::HashSet;
use std::sync::Mutex;
use std::time::Duration;

use crate::sqs::{ReceivedMessage, RedrivePolicy, SqsQueue};

use super::config::{WorkerConfig, WorkerError};
use super::readiness::Readiness;
use super::setup::{lambda_queue_setup, service_queue_setup};

/// How settled messages leave the queue.
pub(crate) enum Mode {
    /// A long-running service: deletes and visibility changes go to SQS.
    Service,
    /// Lambda: SQS deletes what the invocation does not report as failed, so a "delete"
    /// records the receipt as settled instead. Visibility changes (a retry's backoff) go to
    /// SQS only when `change_visibility` (a real invocation, not a local `--event` run whose
    /// receipt handles are made up).
    Lambda {
        settled: Mutex<HashSet<String>>,
        change_visibility: bool,
    },
}

impl Mode {
    /// Lambda's mode; `change_visibility` is false for a local `--event` run.
    pub(crate) fn lambda(change_visibility: bool) -> Self {
        Mode::Lambda {
            settled: Mutex::new(HashSet::new()),
            change_visibility,
        }
    }

    fn is_lambda(&self) -> bool {
        matches!(self, Mode::Lambda { .. })
    }

    /// Lambda: count `receipts` as settled (SQS deletes them when the invocation answers)
    /// and return true; a service returns false and must delete them in SQS.
    pub(super) fn settle_locally(&self, receipts: &[String]) -> bool {
        let Mode::Lambda { settled, .. } = self else {
            return false;
        };
        settled
            .lock()
            .expect("not poisoned")
            .extend(receipts.iter().cloned());
        true
    }

    /// False for a local `--event` run: its receipt handles are not SQS's, and the batch
    /// response alone says what comes back.
    pub(super) fn changes_visibility(&self) -> bool {
        !matches!(
            self,
            Mode::Lambda {
                change_visibility: false,
                ..
            }
        )
    }

    /// The longest a run claimed with `lease` may take, and what sets it: on Lambda the
    /// lease when it is shorter (it ends before the invocation does, and the handler with
    /// it), otherwise `--max-handler-time`.
    pub(super) fn run_limit(
        &self,
        lease: Duration,
        max_handler_time: Duration,
    ) -> (Duration, &'static str) {
        match self {
            Mode::Lambda { .. } if lease < max_handler_time => (lease, "the invocation deadline"),
            _ => (max_handler_time, "--max-handler-time"),
        }
    }

    /// Lambda: forget what earlier invocations settled (a task that settled after its
    /// invocation answered); one invocation runs at a time.
    pub(crate) fn forget_settled(&self) {
        if let Mode::Lambda { settled, .. } = self {
            settled.lock().expect("not poisoned").clear();
        }
    }

    /// Lambda: the messages of this invocation not settled, to report as batch item
    /// failures (a service reports none: it deleted what it settled).
    pub(crate) fn unsettled<'m>(
        &self,
        messages: &'m [ReceivedMessage],
    ) -> Vec<&'m ReceivedMessage> {
        let Mode::Lambda { settled, .. } = self else {
            return Vec::new();
        };
        let mut settled = settled.lock().expect("not poisoned");
        messages
            .iter()
            .filter(|m| !settled.remove(&m.receipt_handle))
            .collect()
    }

    /// The lease (the visibility timeout) and the DLQ, read at start.
    pub(super) async fn queue_setup(
        &self,
        config: &WorkerConfig,
        sqs: &SqsQueue,
        readiness: Option<&Readiness>,
    ) -> Result<(Duration, Option<RedrivePolicy>), WorkerError> {
        if self.is_lambda() {
            Ok(lambda_queue_setup(config, sqs).await)
        } else {
            service_queue_setup(config, sqs, readiness).await
        }
    }
}
