//! The checkpoint store: one PostgreSQL row per event, keyed by `(scope, idempotency_key)`.
//!
//! This is the only module with SQL. Every write that follows a claim is *fenced* by the
//! lease owner (`where lease_owner = $owner`): a worker that lost its lease can no longer
//! change the row, so a slow worker and the one that took over never both record an outcome.
//! Claims are made for a whole receive batch in one statement, because a round trip per
//! message would make the database the bottleneck.

use std::borrow::Cow;
use std::collections::HashMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value;
use sqlx::{PgConnection, PgPool, Postgres, Transaction};

use crate::message::Pass;

/// A remaining time as the database computed it: never negative, below SQS's 12-hour limit.
fn seconds(remaining: Option<f64>) -> Duration {
    Duration::from_secs_f64(remaining.unwrap_or(0.0).clamp(0.0, 43_199.0))
}

fn clamp_i32(n: u32) -> i32 {
    n.min(i32::MAX as u32) as i32
}

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

/// A database failure in the checkpoint store.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// PostgreSQL could not be reached or rejected a statement.
    #[error(transparent)]
    Database(#[from] sqlx::Error),
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
    /// The worker holding the lease, if any.
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

/// The checkpoint table behind a connection pool.
#[derive(Debug, Clone)]
pub struct CheckpointStore {
    pool: PgPool,
}

impl CheckpointStore {
    /// Wrap a pool whose database has been migrated with [`crate::MIGRATOR`].
    pub fn new(pool: PgPool) -> Self {
        Self { pool }
    }

    /// The pool, for handlers that write in the same database.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// The same database on a pool of its own (same connect options, at most `connections`,
    /// opened on demand). The worker's own statements — claims, renewals, completions, the
    /// readiness probe — run there, so handlers holding connections through their steps'
    /// transactions cannot starve them (a starved renewal stops a handler; a starved probe
    /// stops receiving, the database taken for down).
    pub fn with_own_pool(&self, connections: u32) -> Self {
        let options = self.pool.connect_options().as_ref().clone();
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(connections.max(1))
            .acquire_timeout(Duration::from_secs(10))
            .connect_lazy_with(options);
        Self { pool }
    }

    /// Claim the events of one receive batch in a single statement.
    ///
    /// New keys are inserted `in_progress` with a lease for `owner`; `in_progress` rows whose
    /// lease has expired (or was released after a retryable failure) are taken over with
    /// `attempts + 1`; a `failed` row is taken by a redrive of a later pass. A row is only
    /// taken for a delivery carrying its stored payload (unless `terms.accept_mismatch`): of
    /// several deliveries of one key, the first with the stored payload is the one claimed,
    /// so a mismatched delivery never takes (and never has to give back) a lease its
    /// sibling runs on. A retry of the same statement (same `owner`) recognises its own
    /// lease. Rows are locked in key order, as completions lock them.
    pub async fn claim_batch(
        &self,
        scope: &str,
        owner: &str,
        terms: &ClaimTerms,
        requests: &[ClaimRequest],
    ) -> Result<HashMap<String, ClaimOutcome>, CheckpointError> {
        if requests.is_empty() {
            return Ok(HashMap::new());
        }
        let keys: Vec<String> = requests.iter().map(|r| r.key.clone()).collect();
        let fingerprints: Vec<String> = requests.iter().map(|r| r.payload_sha256.clone()).collect();
        let message_ids: Vec<String> = requests.iter().map(|r| r.message_id.clone()).collect();
        // Empty text stands for "no digests" (a bound text[] cannot be checked with nulls).
        let field_digests: Vec<String> = requests
            .iter()
            .map(|r| r.field_digests.clone().unwrap_or_default())
            .collect();
        // One pass per key: the latest any delivery of it in this batch carries, so that a
        // redrive sharing the batch with a plain duplicate still counts.
        let mut latest: HashMap<&str, Pass> = HashMap::new();
        for r in requests {
            let pass = latest.entry(&r.key).or_default();
            *pass = (*pass).max(r.pass);
        }
        let generations: Vec<i32> = requests
            .iter()
            .map(|r| clamp_i32(latest[r.key.as_str()].requeue_generation))
            .collect();
        let redrive_counts: Vec<i32> = requests
            .iter()
            .map(|r| clamp_i32(latest[r.key.as_str()].redrive_count))
            .collect();
        let reclaimable: Vec<String> = requests
            .iter()
            .filter(|r| r.reclaim_failed)
            .map(|r| r.key.clone())
            .collect();

        // `distinct on` because one statement may not update the same row twice. Every
        // sub-statement of a `with` sees the same snapshot, so the `existing_*` columns show
        // rows as they were before this claim (one index lookup per key serves both the
        // choice of delivery and the outcome): a key that is neither claimed nor visible
        // there was inserted by a concurrent claim a moment ago, i.e. it is busy. The pass
        // stored never goes back.
        let rows = sqlx::query!(
            r#"
            with input as (
                select distinct on (i.idempotency_key)
                       i.idempotency_key, i.payload_sha256, i.message_id,
                       nullif(i.payload_fields, '') as payload_fields,
                       i.requeue_generation, i.redrive_count,
                       e.status as existing_status, e.payload_sha256 as existing_sha256,
                       e.lease_expires_at as existing_lease,
                       e.run_deadline_at as existing_deadline
                from unnest($2::text[], $3::text[], $4::text[], $8::text[], $9::int4[],
                            $10::int4[])
                     with ordinality as i(idempotency_key, payload_sha256, message_id,
                                          payload_fields, requeue_generation, redrive_count,
                                          position)
                left join checkpoints e
                       on e.scope = $1 and e.idempotency_key = i.idempotency_key
                order by i.idempotency_key, (i.payload_sha256 is distinct from e.payload_sha256),
                         i.position
            ),
            claimed as (
                insert into checkpoints as c
                    (scope, idempotency_key, status, lease_owner, lease_expires_at,
                     run_deadline_at, attempts, payload_sha256, first_message_id,
                     last_message_id, payload_fields, requeue_generation, redrive_count)
                select $1, idempotency_key, 'in_progress', $5,
                       now() + make_interval(secs => $6), now() + make_interval(secs => $12), 1,
                       payload_sha256, message_id, message_id, payload_fields,
                       requeue_generation, redrive_count
                from input
                order by idempotency_key
                on conflict (scope, idempotency_key) do update
                set status = 'in_progress',
                    lease_owner = excluded.lease_owner,
                    lease_expires_at = excluded.lease_expires_at,
                    run_deadline_at = excluded.run_deadline_at,
                    attempts = case when c.lease_owner = excluded.lease_owner
                                    then c.attempts else c.attempts + 1 end,
                    last_message_id = excluded.last_message_id,
                    requeue_generation = case
                        when (excluded.requeue_generation, excluded.redrive_count)
                             > (c.requeue_generation, c.redrive_count)
                        then excluded.requeue_generation else c.requeue_generation end,
                    redrive_count = case
                        when (excluded.requeue_generation, excluded.redrive_count)
                             > (c.requeue_generation, c.redrive_count)
                        then excluded.redrive_count else c.redrive_count end,
                    updated_at = now()
                where ($11 or c.payload_sha256 = excluded.payload_sha256)
                  and ((c.status = 'in_progress'
                        and (c.lease_expires_at is null or c.lease_expires_at <= now()
                             or c.lease_owner = excluded.lease_owner))
                       or (c.status = 'failed' and c.idempotency_key = any($7::text[])
                           and (c.requeue_generation, c.redrive_count)
                               < (excluded.requeue_generation, excluded.redrive_count)))
                returning c.idempotency_key, c.attempts, c.steps, c.payload_sha256,
                          (c.xmax = 0) as inserted
            )
            select input.idempotency_key as "key!",
                   claimed.attempts as "claimed_attempts?",
                   claimed.steps as "claimed_steps?",
                   claimed.payload_sha256 as "claimed_payload_sha256?",
                   claimed.inserted as "inserted?",
                   input.existing_status as "existing_status?",
                   input.existing_sha256 as "existing_payload_sha256?",
                   extract(epoch from input.existing_lease - now())::float8
                       as "lease_remaining_secs?",
                   extract(epoch from greatest(input.existing_lease,
                                               input.existing_deadline) - now())::float8
                       as "run_remaining_secs?"
            from input
            left join claimed on claimed.idempotency_key = input.idempotency_key
            "#,
            scope,
            &keys,
            &fingerprints,
            &message_ids,
            owner,
            terms.lease.as_secs_f64(),
            &reclaimable,
            &field_digests,
            &generations,
            &redrive_counts,
            terms.accept_mismatch,
            terms.run_limit.max(terms.lease).as_secs_f64(),
        )
        .fetch_all(&self.pool)
        .await?;

        let mut outcomes = HashMap::with_capacity(rows.len());
        for row in rows {
            let stored = row.existing_payload_sha256.unwrap_or_default();
            let outcome = match (row.claimed_attempts, row.existing_status.as_deref()) {
                (Some(attempts), _) => ClaimOutcome::Claimed(Claim {
                    attempts: attempts.max(1) as u32,
                    resumed: !row.inserted.unwrap_or(false),
                    steps: row.claimed_steps.unwrap_or_else(|| Value::Array(vec![])),
                    stored_payload_sha256: row.claimed_payload_sha256.unwrap_or_default(),
                }),
                (None, Some("complete")) => ClaimOutcome::Complete {
                    stored_payload_sha256: stored,
                },
                (None, Some("failed")) => ClaimOutcome::Failed {
                    stored_payload_sha256: stored,
                },
                (None, Some(_)) => ClaimOutcome::Busy {
                    retry_after: seconds(row.lease_remaining_secs),
                    run_remaining: seconds(row.run_remaining_secs),
                    stored_payload_sha256: Some(stored),
                },
                // Inserted by a concurrent claim after our snapshot: its lease is fresh.
                (None, None) => ClaimOutcome::Busy {
                    retry_after: terms.lease,
                    run_remaining: terms.run_limit.max(terms.lease),
                    stored_payload_sha256: None,
                },
            };
            outcomes.insert(row.key, outcome);
        }
        Ok(outcomes)
    }

    /// Mark events complete and clear their leases. Each entry is `(key, lease owner)` and is
    /// fenced by that owner. Returns the entries that were completed; one missing from the
    /// result had its lease taken by another claim. The completing owner stays recorded, so
    /// a retry of this statement after a lost reply recognises its own commit; rows are
    /// locked in key order, as claims lock them, so the two cannot deadlock.
    pub async fn complete_batch(
        &self,
        scope: &str,
        entries: &[(String, String)],
    ) -> Result<Vec<(String, String)>, CheckpointError> {
        if entries.is_empty() {
            return Ok(Vec::new());
        }
        let keys: Vec<String> = entries.iter().map(|(k, _)| k.clone()).collect();
        let owners: Vec<String> = entries.iter().map(|(_, o)| o.clone()).collect();
        let rows = sqlx::query!(
            r#"
            with locked as (
                select c.idempotency_key, c.status, done.lease_owner
                from checkpoints c
                join unnest($2::text[], $3::text[]) as done(idempotency_key, lease_owner)
                  on c.idempotency_key = done.idempotency_key
                 and c.lease_owner = done.lease_owner
                where c.scope = $1 and c.status in ('in_progress', 'complete')
                order by c.idempotency_key
                for update of c
            ),
            completed as (
                update checkpoints as c
                set status = 'complete', lease_expires_at = null, run_deadline_at = null,
                    completed_at = now(), updated_at = now()
                from locked
                where c.scope = $1 and c.idempotency_key = locked.idempotency_key
                  and locked.status = 'in_progress'
                returning c.idempotency_key
            )
            select idempotency_key as "idempotency_key!", lease_owner as "lease_owner!"
            from locked
            "#,
            scope,
            &keys,
            &owners,
        )
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|row| (row.idempotency_key, row.lease_owner))
            .collect())
    }

    /// Give the lease back after a retryable failure so the next delivery (after the backoff)
    /// can claim at once. Returns false when the lease was no longer ours.
    pub async fn release(
        &self,
        scope: &str,
        owner: &str,
        key: &str,
        error: &str,
    ) -> Result<bool, CheckpointError> {
        let error = storable_text(error);
        let result = sqlx::query!(
            r#"
            update checkpoints
            set lease_owner = null, lease_expires_at = null, run_deadline_at = null, last_error = $4,
                updated_at = now()
            where scope = $1 and idempotency_key = $2 and lease_owner = $3
              and status = 'in_progress'
            "#,
            scope,
            key,
            owner,
            &*error,
        )
        .execute(&self.pool)
        .await?;
        Ok(result.rows_affected() == 1)
    }

    /// Give back a claim whose handler never started (a FIFO message held behind its group,
    /// or one received as a shutdown began): release the lease and take back the attempt
    /// the claim counted. Returns false when the lease was no longer ours.
    pub async fn unclaim(
        &self,
        scope: &str,
        owner: &str,
        key: &str,
    ) -> Result<bool, CheckpointError> {
        let result = sqlx::query!(
            r#"
            update checkpoints
            set lease_owner = null, lease_expires_at = null, run_deadline_at = null,
                attempts = greatest(attempts - 1, 0), updated_at = now()
            where scope = $1 and idempotency_key = $2 and lease_owner = $3
              and status = 'in_progress'
            "#,
            scope,
            key,
            owner,
        )
        .execute(&self.pool)
        .await?;
        Ok(result.rows_affected() == 1)
    }

    /// Heartbeat: push the lease's expiry to `lease` from now while the handler still runs.
    /// Returns false when the lease is no longer ours (another worker took the event over).
    pub async fn renew_lease(
        &self,
        scope: &str,
        owner: &str,
        key: &str,
        lease: Duration,
    ) -> Result<bool, CheckpointError> {
        let result = sqlx::query!(
            r#"
            update checkpoints
            set lease_expires_at = now() + make_interval(secs => $4), updated_at = now()
            where scope = $1 and idempotency_key = $2 and lease_owner = $3
              and status = 'in_progress'
            "#,
            scope,
            key,
            owner,
            lease.as_secs_f64(),
        )
        .execute(&self.pool)
        .await?;
        Ok(result.rows_affected() == 1)
    }

    /// Renew the leases of several events claimed together (a FIFO group's events waiting
    /// behind the one that runs). Returns the keys still held; the others were taken.
    pub async fn renew_leases(
        &self,
        scope: &str,
        owner: &str,
        keys: &[String],
        lease: Duration,
    ) -> Result<Vec<String>, CheckpointError> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let rows = sqlx::query_scalar!(
            r#"
            with locked as (
                select idempotency_key
                from checkpoints
                where scope = $1 and lease_owner = $2 and status = 'in_progress'
                  and idempotency_key = any($3::text[])
                order by idempotency_key
                for update
            )
            update checkpoints as c
            set lease_expires_at = now() + make_interval(secs => $4), updated_at = now()
            from locked
            where c.scope = $1 and c.idempotency_key = locked.idempotency_key
            returning c.idempotency_key
            "#,
            scope,
            owner,
            keys,
            lease.as_secs_f64(),
        )
        .fetch_all(&self.pool)
        .await?;
        Ok(rows)
    }

    /// Start the run of an event claimed a while ago (a FIFO group's event whose turn came):
    /// a fresh lease and run deadline, if the lease is still `owner`'s. False when another
    /// claim took the event meanwhile: it must not run here.
    pub async fn start_run(
        &self,
        scope: &str,
        owner: &str,
        key: &str,
        lease: Duration,
        run_limit: Duration,
    ) -> Result<bool, CheckpointError> {
        let result = sqlx::query!(
            r#"
            update checkpoints
            set lease_expires_at = now() + make_interval(secs => $4),
                run_deadline_at = now() + make_interval(secs => $5), updated_at = now()
            where scope = $1 and idempotency_key = $2 and lease_owner = $3
              and status = 'in_progress'
            "#,
            scope,
            key,
            owner,
            lease.as_secs_f64(),
            run_limit.max(lease).as_secs_f64(),
        )
        .execute(&self.pool)
        .await?;
        Ok(result.rows_affected() == 1)
    }

    /// Delete up to `limit` complete checkpoints last updated (completed) more than
    /// `older_than` ago (in
    /// `scope`, or all). One short statement: rows in use by a running claim are skipped.
    /// Returns how many were deleted.
    pub async fn prune_complete(
        &self,
        scope: Option<&str>,
        older_than: Duration,
        limit: i64,
    ) -> Result<u64, CheckpointError> {
        let result = sqlx::query!(
            r#"
            with doomed as (
                select scope, idempotency_key
                from checkpoints
                where status = 'complete'
                  and updated_at < now() - make_interval(secs => $1)
                  and ($2::text is null or scope = $2)
                limit $3
                for update skip locked
            )
            delete from checkpoints c
            using doomed d
            where c.scope = d.scope and c.idempotency_key = d.idempotency_key
            "#,
            older_than.as_secs_f64(),
            scope,
            limit,
        )
        .execute(&self.pool)
        .await?;
        Ok(result.rows_affected())
    }

    /// Cheapest possible round trip, for the readiness probe.
    pub async fn ping(&self) -> Result<(), CheckpointError> {
        sqlx::query!("select 1 as one")
            .fetch_one(&self.pool)
            .await?;
        Ok(())
    }

    /// Mark a claimed event failed (it went to the DLQ). Returns false when the lease was no
    /// longer ours.
    pub async fn mark_failed(
        &self,
        scope: &str,
        owner: &str,
        key: &str,
        error: &str,
    ) -> Result<bool, CheckpointError> {
        let error = storable_text(error);
        let result = sqlx::query!(
            r#"
            update checkpoints
            set status = 'failed', lease_owner = null, lease_expires_at = null, run_deadline_at = null,
                last_error = $4, updated_at = now()
            where scope = $1 and idempotency_key = $2 and lease_owner = $3
              and status = 'in_progress'
            "#,
            scope,
            key,
            owner,
            &*error,
        )
        .execute(&self.pool)
        .await?;
        Ok(result.rows_affected() == 1)
    }

    /// Record a failed checkpoint for a message that never got a claim because no key could be
    /// taken from it (not JSON, missing key field). It is keyed by the body's hash so an
    /// operator can find it; a row that is already complete is left alone.
    pub async fn record_unkeyed_failure(
        &self,
        scope: &str,
        key: &str,
        payload_sha256: &str,
        message_id: &str,
        error: &str,
    ) -> Result<(), CheckpointError> {
        let error = storable_text(error);
        sqlx::query!(
            r#"
            insert into checkpoints as c
                (scope, idempotency_key, status, payload_sha256, first_message_id,
                 last_message_id, last_error)
            values ($1, $2, 'failed', $3, $4, $4, $5)
            on conflict (scope, idempotency_key) do update
            set status = 'failed', lease_owner = null, lease_expires_at = null, run_deadline_at = null,
                attempts = c.attempts + 1, last_message_id = excluded.last_message_id,
                last_error = excluded.last_error, updated_at = now()
            where c.status <> 'complete'
            "#,
            scope,
            key,
            payload_sha256,
            message_id,
            &*error,
        )
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Append step number `index` (0-based) to the checkpoint, fenced by `owner`. Returns
    /// false when the lease is no longer ours (or the step was already recorded).
    pub async fn record_step(
        &self,
        scope: &str,
        key: &str,
        owner: &str,
        index: usize,
        name: &str,
        output: &Value,
    ) -> Result<bool, CheckpointError> {
        let mut connection = self.pool.acquire().await?;
        Self::record_step_in(&mut connection, scope, key, owner, index, name, output).await
    }

    /// [`CheckpointStore::record_step`] on a given connection, e.g. inside a step's
    /// transaction. The length check makes a step impossible to record twice.
    pub async fn record_step_in(
        connection: &mut PgConnection,
        scope: &str,
        key: &str,
        owner: &str,
        index: usize,
        name: &str,
        output: &Value,
    ) -> Result<bool, CheckpointError> {
        let result = sqlx::query!(
            r#"
            update checkpoints
            set steps = steps || jsonb_build_array(jsonb_build_object(
                    'name', $5::text, 'output', $6::jsonb, 'completed_at', now())),
                updated_at = now()
            where scope = $1 and idempotency_key = $2 and lease_owner = $3
              and status = 'in_progress' and jsonb_array_length(steps) = $4
            "#,
            scope,
            key,
            owner,
            index as i32,
            name,
            output,
        )
        .execute(&mut *connection)
        .await?;
        Ok(result.rows_affected() == 1)
    }

    /// Begin the transaction of a step that writes in this database: lock the checkpoint row
    /// if `owner` still holds the lease and step `index` is next. None when the lease is lost.
    /// Holding the row lock makes a takeover wait until the step commits or rolls back.
    pub async fn begin_step(
        &self,
        scope: &str,
        key: &str,
        owner: &str,
        index: usize,
    ) -> Result<Option<Transaction<'static, Postgres>>, CheckpointError> {
        let mut transaction = self.pool.begin().await?;
        let held = sqlx::query_scalar!(
            r#"
            select true as "held!"
            from checkpoints
            where scope = $1 and idempotency_key = $2 and lease_owner = $3
              and status = 'in_progress' and jsonb_array_length(steps) = $4
            for update
            "#,
            scope,
            key,
            owner,
            index as i32,
        )
        .fetch_optional(&mut *transaction)
        .await?;
        Ok(held.map(|_| transaction))
    }

    /// Record a message that ends for good, and (with `mark_checkpoint`) mark its event
    /// failed — both in one transaction, so a crash leaves either both or neither. The
    /// checkpoint is left alone when it is complete or leased by a claim other than
    /// `lease_owner`. With a `lease_owner` (a claimed event's final pass), a checkpoint that
    /// could not be marked means the lease was taken over: nothing is recorded and `None`
    /// is returned, so the caller leaves the message to the new holder.
    pub async fn record_dead_letter(
        &self,
        letter: &NewDeadLetter<'_>,
        mark_checkpoint: bool,
        lease_owner: Option<&str>,
    ) -> Result<Option<i64>, CheckpointError> {
        let reason = storable_text(letter.reason);
        let error = storable_text(letter.error);
        let mut transaction = self.pool.begin().await?;
        let id = sqlx::query_scalar!(
            r#"
            insert into dead_letters
                (scope, idempotency_key, queue_url, message_id, body, attributes, reason, error,
                 attempts, redrive_count)
            values ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
            returning id
            "#,
            letter.scope,
            letter.key,
            letter.queue_url,
            letter.message_id,
            letter.body,
            letter.attributes,
            &*reason,
            &*error,
            letter.attempts,
            letter.redrive_count,
        )
        .fetch_one(&mut *transaction)
        .await?;
        if mark_checkpoint {
            let marked = sqlx::query!(
                r#"
                insert into checkpoints as c
                    (scope, idempotency_key, status, payload_sha256, first_message_id,
                     last_message_id, last_error, requeue_generation, redrive_count)
                values ($1, $2, 'failed', $3, $4, $4, $5, $7, $8)
                on conflict (scope, idempotency_key) do update
                set status = 'failed', lease_owner = null, lease_expires_at = null, run_deadline_at = null,
                    last_message_id = excluded.last_message_id,
                    last_error = excluded.last_error,
                    requeue_generation = case
                        when (excluded.requeue_generation, excluded.redrive_count)
                             > (c.requeue_generation, c.redrive_count)
                        then excluded.requeue_generation else c.requeue_generation end,
                    redrive_count = case
                        when (excluded.requeue_generation, excluded.redrive_count)
                             > (c.requeue_generation, c.redrive_count)
                        then excluded.redrive_count else c.redrive_count end,
                    updated_at = now()
                where c.status <> 'complete'
                  and (c.lease_owner is null or c.lease_owner = $6
                       or c.lease_expires_at <= now())
                "#,
                letter.scope,
                letter.key,
                letter.payload_sha256,
                letter.message_id,
                &*error,
                lease_owner,
                letter.requeue_generation,
                letter.redrive_count,
            )
            .execute(&mut *transaction)
            .await?;
            if lease_owner.is_some() && marked.rows_affected() == 0 {
                transaction.rollback().await?;
                return Ok(None);
            }
        }
        transaction.commit().await?;
        Ok(Some(id))
    }

    /// Open the audit row of a redrive run; returns its id.
    pub async fn start_redrive_audit(
        &self,
        operator: &str,
        dlq_url: &str,
        target_url: &str,
        max_redrives: i32,
        dry_run: bool,
    ) -> Result<i64, CheckpointError> {
        let id = sqlx::query_scalar!(
            r#"
            insert into redrives (operator, dlq_url, target_url, max_redrives, dry_run)
            values ($1, $2, $3, $4, $5)
            returning id
            "#,
            operator,
            dlq_url,
            target_url,
            max_redrives,
            dry_run,
        )
        .fetch_one(&self.pool)
        .await?;
        Ok(id)
    }

    /// Close the audit row of a redrive run with its counts.
    pub async fn finish_redrive_audit(
        &self,
        id: i64,
        counts: &RedriveCounts,
    ) -> Result<(), CheckpointError> {
        let clamp = |n: u64| n.min(i32::MAX as u64) as i32;
        sqlx::query!(
            r#"
            update redrives
            set redriven = $2, skipped_complete = $3, exhausted = $4, failed = $5,
                finished_at = now()
            where id = $1
            "#,
            id,
            clamp(counts.redriven),
            clamp(counts.skipped_complete),
            clamp(counts.exhausted),
            clamp(counts.failed),
        )
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Note that a dead letter was sent back on purpose.
    pub async fn mark_dead_letter_requeued(&self, id: i64) -> Result<(), CheckpointError> {
        sqlx::query!(
            "update dead_letters set requeued_at = now() where id = $1",
            id
        )
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Dead letters, newest first, optionally of one scope.
    pub async fn list_dead_letters(
        &self,
        scope: Option<&str>,
        limit: i64,
    ) -> Result<Vec<DeadLetter>, CheckpointError> {
        let rows = sqlx::query_as!(
            DeadLetter,
            r#"
            select id, scope, idempotency_key, queue_url, message_id, body, attributes, reason,
                   error, attempts, redrive_count, created_at, requeued_at
            from dead_letters
            where $1::text is null or scope = $1
            order by id desc
            limit $2
            "#,
            scope,
            limit,
        )
        .fetch_all(&self.pool)
        .await?;
        Ok(rows)
    }

    /// One dead letter by id.
    pub async fn find_dead_letter(&self, id: i64) -> Result<Option<DeadLetter>, CheckpointError> {
        let row = sqlx::query_as!(
            DeadLetter,
            r#"
            select id, scope, idempotency_key, queue_url, message_id, body, attributes, reason,
                   error, attempts, redrive_count, created_at, requeued_at
            from dead_letters
            where id = $1
            "#,
            id,
        )
        .fetch_optional(&self.pool)
        .await?;
        Ok(row)
    }

    /// Events left `in_progress` with no live lease for longer than `idle_for`: the holder
    /// stopped (its message went to the DLQ through the queue's maxReceiveCount, or was never
    /// redelivered) and nothing took the event over. Oldest first, at most `limit`.
    pub async fn list_stale(
        &self,
        scope: Option<&str>,
        idle_for: Duration,
        limit: i64,
    ) -> Result<Vec<Checkpoint>, CheckpointError> {
        let rows = sqlx::query_as!(
            Checkpoint,
            r#"
            select scope, idempotency_key, status, steps, lease_owner, lease_expires_at,
                   attempts, payload_sha256, first_message_id, last_message_id, last_error,
                   requeue_generation, redrive_count, payload_fields,
                   created_at, updated_at, completed_at
            from checkpoints
            where status = 'in_progress'
              and (lease_expires_at is null or lease_expires_at <= now())
              and updated_at < now() - make_interval(secs => $2)
              and ($1::text is null or scope = $1)
            order by updated_at
            limit $3
            "#,
            scope,
            idle_for.as_secs_f64(),
            limit,
        )
        .fetch_all(&self.pool)
        .await?;
        Ok(rows)
    }

    /// Mark a stale event (see [`CheckpointStore::list_stale`]) failed, with `reason` as its
    /// last error, unless it was claimed again meanwhile. A later redrive of its message
    /// claims it again as usual. Returns whether it was marked.
    pub async fn mark_stale_failed(
        &self,
        scope: &str,
        key: &str,
        idle_for: Duration,
        reason: &str,
    ) -> Result<bool, CheckpointError> {
        let reason = storable_text(reason);
        let result = sqlx::query!(
            r#"
            update checkpoints
            set status = 'failed', lease_owner = null, lease_expires_at = null,
                run_deadline_at = null, last_error = $4, updated_at = now()
            where scope = $1 and idempotency_key = $2 and status = 'in_progress'
              and (lease_expires_at is null or lease_expires_at <= now())
              and updated_at < now() - make_interval(secs => $3)
            "#,
            scope,
            key,
            idle_for.as_secs_f64(),
            &*reason,
        )
        .execute(&self.pool)
        .await?;
        Ok(result.rows_affected() == 1)
    }

    /// Look one checkpoint up.
    pub async fn find(
        &self,
        scope: &str,
        key: &str,
    ) -> Result<Option<Checkpoint>, CheckpointError> {
        let row = sqlx::query_as!(
            Checkpoint,
            r#"
            select scope, idempotency_key, status, steps, lease_owner, lease_expires_at,
                   attempts, payload_sha256, first_message_id, last_message_id, last_error,
                   requeue_generation, redrive_count, payload_fields,
                   created_at, updated_at, completed_at
            from checkpoints
            where scope = $1 and idempotency_key = $2
            "#,
            scope,
            key,
        )
        .fetch_optional(&self.pool)
        .await?;
        Ok(row)
    }
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
