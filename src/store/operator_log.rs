//! The operator log: what the console's operators did (one row per action, with the
//! message's fingerprints before and after an edit), the redrive runs' audit rows read back,
//! and the one checkpoint write an edit needs.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::Serialize;

use super::{RedriveCounts, StoreError};

/// An operator's action, to record.
#[derive(Debug, Clone)]
pub struct NewOperatorAction<'a> {
    /// Who (`--operator`, by default `user@host`).
    pub operator: &'a str,
    /// What: `redrive`, `delete`, `edit_redrive`, `bulk_redrive`, `requeue`.
    pub action: &'a str,
    /// The queue acted on (a DLQ's URL).
    pub queue_url: &'a str,
    /// The SQS message id acted on (empty for a bulk action).
    pub message_id: &'a str,
    /// The event's idempotency key, when one message was acted on.
    pub key: Option<&'a str>,
    /// The body's SHA-256 before the action.
    pub before_sha256: Option<&'a str>,
    /// The body's SHA-256 after an edit.
    pub after_sha256: Option<&'a str>,
    /// What came of it, in words (`redriven (redrive 2, final pass)`, the filter of a bulk
    /// redrive and its counts); at most a few hundred bytes.
    pub detail: &'a str,
}

/// A recorded operator action.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct OperatorAction {
    /// Row id, increasing with time.
    pub id: i64,
    /// When it was recorded.
    pub recorded_at: DateTime<Utc>,
    /// See [`NewOperatorAction`].
    pub operator: String,
    /// See [`NewOperatorAction`].
    pub action: String,
    /// See [`NewOperatorAction`].
    pub queue_url: String,
    /// See [`NewOperatorAction`].
    pub message_id: String,
    /// See [`NewOperatorAction`].
    pub key: Option<String>,
    /// See [`NewOperatorAction`].
    pub before_sha256: Option<String>,
    /// See [`NewOperatorAction`].
    pub after_sha256: Option<String>,
    /// See [`NewOperatorAction`].
    pub detail: String,
}

/// A redrive run's audit row (`redrives`), read back.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RedriveRun {
    /// Row id (the report's `audit_id`).
    pub id: i64,
    /// Who ran it.
    pub operator: String,
    /// The DLQ drained.
    pub dlq_url: String,
    /// Where messages went.
    pub target_url: String,
    /// `--max-redrives` of the run.
    pub max_redrives: i32,
    /// A dry run changes nothing.
    pub dry_run: bool,
    /// Its counts (zero until it finished).
    pub counts: RedriveCounts,
    /// When it started.
    pub started_at: DateTime<Utc>,
    /// When it finished; `None` while it runs (or when it was killed).
    pub finished_at: Option<DateTime<Utc>>,
}

/// What the console asks of a store beyond the operator commands.
#[async_trait]
pub trait OperatorLog: Send + Sync {
    /// Record an operator's action; returns its id.
    async fn record_operator_action(
        &self,
        action: &NewOperatorAction<'_>,
    ) -> Result<i64, StoreError>;

    /// Operator actions, newest first, at most `limit`.
    async fn list_operator_actions(&self, limit: i64) -> Result<Vec<OperatorAction>, StoreError>;

    /// Redrive runs' audit rows, newest first, at most `limit`.
    async fn list_redrive_runs(&self, limit: i64) -> Result<Vec<RedriveRun>, StoreError>;

    /// Before an edited body is redriven: a `failed` event takes the edited payload's
    /// fingerprint (`payload_sha256`, and `field_digests` as a claim stores them), so the
    /// redriven delivery claims it instead of ending as `payload_mismatch`. Nothing changes
    /// when the event is not `failed` (complete, in progress, or missing); returns whether it
    /// changed.
    async fn adopt_edited_payload(
        &self,
        scope: &str,
        key: &str,
        payload_sha256: &str,
        field_digests: Option<&str>,
    ) -> Result<bool, StoreError>;
}
