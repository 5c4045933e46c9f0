//! Where the service and Lambda differ: how settled messages leave the queue.

use super::*;

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
