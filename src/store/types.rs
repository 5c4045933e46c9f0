//! The values that cross the store contract: claims and their outcomes, the lease that
//! fences every later write, recorded steps, checkpoints and dead letters as operators see
//! them, and the store's error.

use std::borrow::Cow;
use std::collections::HashMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value;

use crate::message::Pass;

/// Text as PostgreSQL can store it: `text` columns cannot hold NUL (`\0`), and a statement
/// binding one fails whole. Error texts come from handlers (an exec handler's stderr, say) and
/// may hold anything; replacing NUL with U+FFFD keeps such a failure recordable.
pub fn storable_text(text: &str) -> Cow<'_, str> {
    if text.contains('\0') {
        Cow::Owned(text.replace('\0', "\u{FFFD}"))
    } else {
        Cow::Borrowed(text)
    }
}

/// A failure of the checkpoint store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database could not be reached or rejected a statement.
    #[error(transparent)]
    Database(#[from] sqlx::Error),
    /// The schema could not be brought up to date.
    #[error("applying migrations failed: {0}")]
    Migrate(sqlx::migrate::MigrateError),
    /// The database holds a migration this build does not know: a newer version migrated it.
    #[error(
        "the database has migration {0}, which this sqs-worker does not know: a newer \
         version migrated it; run that version (or this one with --no-migrate, if the newer \
         schema is compatible)"
    )]
    NewerSchema(i64),
    /// A store URL of no known kind.
    #[error(
        "not a checkpoint store URL: use postgres://USER@HOST/DB, sqlite://PATH, \
         sqlite::memory: or dynamodb://TABLE"
    )]
    UnknownUrl,
    /// DynamoDB could not be reached or refused a request.
    #[error("DynamoDB: {0}")]
    Dynamo(String),
    /// A record would pass the store's item size limit (DynamoDB's 400 KB): it can never be
    /// stored, so retrying cannot help.
    #[error("{0}")]
    TooLarge(String),
    /// The store could not be set up (a lock file, say).
    #[error("{0}")]
    Config(String),
}

impl From<sqlx::migrate::MigrateError> for StoreError {
    fn from(error: sqlx::migrate::MigrateError) -> Self {
        match error {
            sqlx::migrate::MigrateError::VersionMissing(version) => Self::NewerSchema(version),
            other => Self::Migrate(other),
        }
    }
}

/// The lease one claim holds on one event: what every write after the claim is fenced by.
///
/// The token is per claim (`worker-id#n`), so a task whose lease was taken over — even by a
/// newer claim in the same worker — changes nothing. The running event carries its lease
/// (see [`crate::Job`]); per-event store methods take it instead of loose strings.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Lease {
    /// The checkpoint scope (by default the queue name).
    pub scope: String,
    /// The event's idempotency key.
    pub key: String,
    /// The claim's lease token, written as the checkpoint's lease owner.
    pub token: String,
}

impl Lease {
    /// The lease `token` holds on `key` in `scope`.
    pub fn new(scope: impl Into<String>, key: impl Into<String>, token: impl Into<String>) -> Self {
        Self {
            scope: scope.into(),
            key: key.into(),
            token: token.into(),
        }
    }
}
/// One message's request to claim its event.
#[derive(Debug, Clone)]
pub struct ClaimRequest {
    /// The idempotency key.
    pub key: String,
    /// SHA-256 of the body, stored on first sight to notice a key reused with another body.
    pub payload_sha256: String,
    /// The SQS message id, kept as first/last message id for operators.
    pub message_id: String,
    /// The delivery is an operator's redrive or requeue (`dlq_redriven=true`): it may claim
    /// a `failed` checkpoint again, if its `pass` is later than the one that failed.
    pub reclaim_failed: bool,
    /// The delivery's pass (requeue generation, redrive count). A failed event is reclaimed
    /// only by a later pass, so duplicates of one redrive do not run it again.
    pub pass: Pass,
    /// Digests of the fingerprinted fields, stored on first sight so that a later mismatch
    /// can name the fields that differ.
    pub field_digests: Option<String>,
}

/// Per key of a batch: the latest pass any of its deliveries carries (so that a redrive
/// sharing the batch with a plain duplicate still counts), and whether any of them may
/// reclaim a failed event.
pub(crate) fn passes_by_key(requests: &[ClaimRequest]) -> HashMap<&str, (Pass, bool)> {
    let mut per_key: HashMap<&str, (Pass, bool)> = HashMap::new();
    for r in requests {
        let (pass, reclaim) = per_key.entry(&r.key).or_default();
        *pass = (*pass).max(r.pass);
        *reclaim |= r.reclaim_failed;
    }
    per_key
}

/// What a claim found. Every outcome but a concurrent insert carries the payload fingerprint
/// the checkpoint holds, so each delivery can be checked against it.
#[derive(Debug, Clone, PartialEq)]
pub enum ClaimOutcome {
    /// This worker now holds the lease and should run the handler.
    Claimed(Claim),
    /// The event was already processed: the message is a duplicate.
    Complete {
        /// The payload fingerprint recorded when the event was first seen.
        stored_payload_sha256: String,
    },
    /// The event was already dead-lettered (and this is not a later pass).
    Failed {
        /// The payload fingerprint recorded when the event was first seen.
        stored_payload_sha256: String,
    },
    /// Another claim holds a live lease (or the stored payload differs from every
    /// delivery's, so none could take it); look again after `retry_after`.
    Busy {
        /// Time left on the holder's lease (renewed while its handler runs).
        retry_after: Duration,
        /// Time left until the holder's run must have ended (its run deadline), at least
        /// `retry_after`.
        run_remaining: Duration,
        /// The fingerprint stored, unless the row was inserted by a concurrent claim.
        stored_payload_sha256: Option<String>,
    },
}

impl ClaimOutcome {
    /// The fingerprint the checkpoint holds, when known.
    pub fn stored_payload_sha256(&self) -> Option<&str> {
        match self {
            ClaimOutcome::Claimed(claim) => Some(&claim.stored_payload_sha256),
            ClaimOutcome::Complete {
                stored_payload_sha256,
            }
            | ClaimOutcome::Failed {
                stored_payload_sha256,
            } => Some(stored_payload_sha256),
            ClaimOutcome::Busy {
                stored_payload_sha256,
                ..
            } => stored_payload_sha256.as_deref(),
        }
    }
}

/// The terms of one claim statement.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ClaimTerms {
    /// How long the lease lasts (as long as the messages stay hidden).
    pub lease: Duration,
    /// The longest the run may take (`--max-handler-time`, or up to a Lambda deadline):
    /// deliveries of the event arriving meanwhile are put back until then.
    pub run_limit: Duration,
    /// Take a row whatever payload it stored (`--on-payload-mismatch accept`). Otherwise a
    /// row is only taken for a delivery carrying the stored payload.
    pub accept_mismatch: bool,
}

/// A lease this worker holds on an event.
#[derive(Debug, Clone, PartialEq)]
pub struct Claim {
    /// How many times the event has been claimed, this claim included (1 on first sight).
    pub attempts: u32,
    /// True when the row existed before (a takeover or a retry), false on first sight.
    pub resumed: bool,
    /// Steps completed by earlier attempts: `[{"name":…,"output":…}]`.
    pub steps: Value,
    /// The payload fingerprint recorded when the event was first seen.
    pub stored_payload_sha256: String,
}

/// One completed step as stored in the checkpoint.
#[derive(Debug, Clone, PartialEq)]
pub struct RecordedStep {
    /// The step's name.
    pub name: String,
    /// Its output, as JSON.
    pub output: Value,
}

/// A step's record before it is stored: its place in the event's steps, its name and its
/// output.
#[derive(Debug, Clone, PartialEq)]
pub struct NewStep {
    /// The step's index: how many steps are recorded before it.
    pub index: usize,
    /// The step's name.
    pub name: String,
    /// Its output, as JSON.
    pub output: Value,
}

/// A step to record for the claim `token` holds on `key` (see [`crate::store::Steps::record_steps`]).
#[derive(Debug, Clone, PartialEq)]
pub struct StepRecord {
    /// The event's idempotency key.
    pub key: String,
    /// The lease token the record is fenced by.
    pub token: String,
    /// The step.
    pub step: NewStep,
}

/// An event to mark complete (see [`crate::store::Claims::complete_events`]): fenced by its
/// lease token, with the record of its last step when that travels with the completion.
#[derive(Debug, Clone, PartialEq)]
pub struct Completion {
    /// The event's idempotency key.
    pub key: String,
    /// The lease token the completion is fenced by.
    pub token: String,
    /// The handler's last step, recorded by the same write that completes the event (the
    /// handler returned right after it, so nothing could start in between).
    pub last_step: Option<NewStep>,
}

impl Completion {
    /// Complete `key` under `token`, with no step to record.
    pub fn new(key: impl Into<String>, token: impl Into<String>) -> Self {
        Self {
            key: key.into(),
            token: token.into(),
            last_step: None,
        }
    }
}

/// What became of one fenced write of a batch (a step's record, a completion).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Written {
    /// Written (a completion: or found complete under the same token, as a retry of its
    /// own statement finds it).
    Done,
    /// Not written: the lease is not the token's any more, or the step is not next.
    NotHeld,
    /// Not written, and it never can be: the record passes the store's item limit
    /// (DynamoDB's 400 KB). The text says by how much.
    TooLarge(String),
}

impl Written {
    /// The answer of a store without an item limit (PostgreSQL, SQLite): written or not held.
    pub(crate) fn done_if(done: bool) -> Self {
        if done {
            Written::Done
        } else {
            Written::NotHeld
        }
    }
}

/// Read the `steps` column; entries without a name become unnamed steps, which then fail the
/// plan check instead of being skipped silently.
pub fn parse_steps(steps: &Value) -> Vec<RecordedStep> {
    steps
        .as_array()
        .map(|steps| {
            steps
                .iter()
                .map(|step| RecordedStep {
                    name: step["name"].as_str().unwrap_or_default().to_owned(),
                    output: step.get("output").cloned().unwrap_or(Value::Null),
                })
                .collect()
        })
        .unwrap_or_default()
}

/// A checkpoint row as operators see it.
#[derive(Debug, Clone, Serialize)]
pub struct Checkpoint {
    /// The scope (by default the queue name).
    pub scope: String,
    /// The idempotency key.
    pub idempotency_key: String,
    /// `in_progress`, `complete` or `failed`.
    pub status: String,
    /// Completed steps.
    pub steps: Value,
    /// The lease token (`worker_id#n`) of the claim holding or completing the event, if any.
    pub lease_owner: Option<String>,
    /// When that lease ends.
    pub lease_expires_at: Option<DateTime<Utc>>,
    /// Claims so far.
    pub attempts: i32,
    /// SHA-256 of the first body seen.
    pub payload_sha256: String,
    /// SQS message id of the first delivery.
    pub first_message_id: String,
    /// SQS message id of the latest claimed delivery.
    pub last_message_id: String,
    /// The latest failure, if any.
    pub last_error: Option<String>,
    /// Deliberate requeues (`dead-letters requeue`) of the latest pass that claimed it.
    pub requeue_generation: i32,
    /// Redrives of the latest pass that claimed it: a failed event is claimed again only
    /// by a later pass.
    pub redrive_count: i32,
    /// Digests of the fingerprinted fields as first seen (`{"/pointer": "digest"}`).
    pub payload_fields: Option<String>,
    /// First seen.
    pub created_at: DateTime<Utc>,
    /// Last changed.
    pub updated_at: DateTime<Utc>,
    /// When it completed.
    pub completed_at: Option<DateTime<Utc>>,
}

/// A message that ended for good, as recorded in `dead_letters`.
#[derive(Debug, Clone, Serialize)]
pub struct DeadLetter {
    /// Row id (for `dead-letters show|requeue --id`).
    pub id: i64,
    /// Checkpoint scope.
    pub scope: String,
    /// The event's idempotency key.
    pub idempotency_key: String,
    /// The queue the message was consumed from.
    pub queue_url: String,
    /// SQS message id of the last delivery.
    pub message_id: String,
    /// The body, verbatim.
    pub body: String,
    /// Message attributes: `{"name": {"type": "String", "value": "…"}}`.
    pub attributes: Value,
    /// Reason code, e.g. `handler_permanent`, `retryable`, `redrives_exhausted`.
    pub reason: String,
    /// The error text.
    pub error: String,
    /// Claims of the event when it ended.
    pub attempts: i32,
    /// Redrives the message had been through.
    pub redrive_count: i32,
    /// When it was recorded.
    pub created_at: DateTime<Utc>,
    /// When `dead-letters requeue` sent it back, if it did.
    pub requeued_at: Option<DateTime<Utc>>,
}

/// What to record about a message that ends for good.
#[derive(Debug, Clone)]
pub struct NewDeadLetter<'a> {
    /// Checkpoint scope.
    pub scope: &'a str,
    /// The event's idempotency key.
    pub key: &'a str,
    /// The queue the message was consumed from.
    pub queue_url: &'a str,
    /// SQS message id.
    pub message_id: &'a str,
    /// The body, verbatim.
    pub body: &'a str,
    /// Message attributes as JSON.
    pub attributes: &'a Value,
    /// Reason code.
    pub reason: &'a str,
    /// Error text.
    pub error: &'a str,
    /// Claims of the event.
    pub attempts: i32,
    /// Redrives the message had been through.
    pub redrive_count: i32,
    /// Deliberate requeues the message had been through.
    pub requeue_generation: i32,
    /// Payload fingerprint, for a checkpoint created here.
    pub payload_sha256: &'a str,
}

/// Counts of a redrive run, as stored in its `redrives` audit row.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct RedriveCounts {
    /// Sent back to the source queue.
    pub redriven: u64,
    /// Deleted because their event was already complete.
    pub skipped_complete: u64,
    /// Recorded in dead_letters because their redrive count reached the maximum.
    pub exhausted: u64,
    /// Left in the DLQ because sending failed.
    pub failed: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn storable_text_replaces_nul_only() {
        assert!(matches!(storable_text("plain"), Cow::Borrowed("plain")));
        assert_eq!(storable_text("a\0b\0"), "a\u{FFFD}b\u{FFFD}");
        // Other control characters and invalid-looking escapes are storable as they are.
        assert_eq!(storable_text("\u{1}\\u0000\n"), "\u{1}\\u0000\n");
    }
}
