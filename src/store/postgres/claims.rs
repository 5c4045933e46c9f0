//! Claims and leases in PostgreSQL: the batch claim, completion, release, renewals, the
//! start of a waiting event's run, and marking a claimed event failed.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use async_trait::async_trait;
use serde_json::Value;

use super::PostgresStore;
use super::steps::StepColumns;
use crate::store::{
    Claim, ClaimOutcome, ClaimRequest, ClaimTerms, Claims, Completion, Lease, StoreError, Written,
    passes_by_key, storable_text,
};

/// A remaining time as the database computed it: never negative, below SQS's 12-hour limit.
fn seconds(remaining: Option<f64>) -> Duration {
    Duration::from_secs_f64(remaining.unwrap_or(0.0).clamp(0.0, 43_199.0))
}

fn clamp_i32(n: u32) -> i32 {
    n.min(i32::MAX as u32) as i32
}

/// The claim statement's parameters, one array per column (`unnest` makes rows of them).
struct ClaimColumns {
    keys: Vec<String>,
    fingerprints: Vec<String>,
    message_ids: Vec<String>,
    /// Empty text stands for "no digests" (a bound text[] cannot be checked with nulls).
    field_digests: Vec<String>,
    generations: Vec<i32>,
    redrive_counts: Vec<i32>,
    /// The keys whose requests may claim a `failed` row (redrives).
    reclaimable: Vec<String>,
}

impl ClaimColumns {
    fn new(requests: &[ClaimRequest]) -> Self {
        // One pass per key: the latest any delivery of it in this batch carries.
        let latest = passes_by_key(requests);
        let pass = |r: &ClaimRequest| latest[r.key.as_str()].0;
        Self {
            keys: requests.iter().map(|r| r.key.clone()).collect(),
            fingerprints: requests.iter().map(|r| r.payload_sha256.clone()).collect(),
            message_ids: requests.iter().map(|r| r.message_id.clone()).collect(),
            field_digests: requests
                .iter()
                .map(|r| r.field_digests.clone().unwrap_or_default())
                .collect(),
            generations: requests
                .iter()
                .map(|r| clamp_i32(pass(r).requeue_generation))
                .collect(),
            redrive_counts: requests
                .iter()
                .map(|r| clamp_i32(pass(r).redrive_count))
                .collect(),
            reclaimable: requests
                .iter()
                .filter(|r| r.reclaim_failed)
                .map(|r| r.key.clone())
                .collect(),
        }
    }
}

/// One key's row of the claim statement: the claimed row, if it was claimed, and the row
/// as it was before the claim, if there was one.
struct ClaimRow {
    key: String,
    claimed_attempts: Option<i32>,
    claimed_steps: Option<Value>,
    claimed_payload_sha256: Option<String>,
    inserted: Option<bool>,
    existing_status: Option<String>,
    existing_payload_sha256: Option<String>,
    lease_remaining_secs: Option<f64>,
    run_remaining_secs: Option<f64>,
}

impl ClaimRow {
    /// What the claim found for this key.
    fn outcome(self, terms: &ClaimTerms) -> ClaimOutcome {
        let stored = self.existing_payload_sha256.unwrap_or_default();
        match (self.claimed_attempts, self.existing_status.as_deref()) {
            (Some(attempts), _) => ClaimOutcome::Claimed(Claim {
                attempts: attempts.max(1) as u32,
                resumed: !self.inserted.unwrap_or(false),
                steps: self.claimed_steps.unwrap_or_else(|| Value::Array(vec![])),
                stored_payload_sha256: self.claimed_payload_sha256.unwrap_or_default(),
            }),
            (None, Some("complete")) => ClaimOutcome::Complete {
                stored_payload_sha256: stored,
            },
            (None, Some("failed")) => ClaimOutcome::Failed {
                stored_payload_sha256: stored,
            },
            (None, Some(_)) => ClaimOutcome::Busy {
                retry_after: seconds(self.lease_remaining_secs),
                run_remaining: seconds(self.run_remaining_secs),
                stored_payload_sha256: Some(stored),
            },
            // Inserted by a concurrent claim after our snapshot: its lease is fresh.
            (None, None) => ClaimOutcome::Busy {
                retry_after: terms.lease,
                run_remaining: terms.run_limit.max(terms.lease),
                stored_payload_sha256: None,
            },
        }
    }
}

#[async_trait]
impl Claims for PostgresStore {
    /// One statement for the whole batch. New keys are inserted `in_progress` with a lease
    /// for `token`; `in_progress` rows whose lease has expired (or was released after a
    /// retryable failure) are taken over with `attempts + 1`; a `failed` row is taken by a
    /// redrive of a later pass. A row is only taken for a delivery carrying its stored
    /// payload (unless `terms.accept_mismatch`): of several deliveries of one key, the first
    /// with the stored payload is the one claimed, so a mismatched delivery never takes (and
    /// never has to give back) a lease its sibling runs on. A retry of the same statement
    /// (same `token`) recognises its own lease. Rows are locked in key order, as completions
    /// lock them.
    async fn claim_batch(
        &self,
        scope: &str,
        token: &str,
        terms: &ClaimTerms,
        requests: &[ClaimRequest],
    ) -> Result<HashMap<String, ClaimOutcome>, StoreError> {
        if requests.is_empty() {
            return Ok(HashMap::new());
        }
        let columns = ClaimColumns::new(requests);
        // `distinct on` because one statement may not update the same row twice. Each key's
        // row is looked up on its own (a lateral lookup, as `complete_events` explains). Every
        // sub-statement of a `with` sees the same snapshot, so the `existing_*` columns show
        // rows as they were before this claim (one index lookup per key serves both the
        // choice of delivery and the outcome): a key that is neither claimed nor visible
        // there was inserted by a concurrent claim a moment ago, i.e. it is busy. The pass
        // stored never goes back.
        let rows = sqlx::query_as!(
            ClaimRow,
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
                left join lateral (
                    -- One row at most (the primary key); `limit` keeps the planner from
                    -- flattening the lookup into a join (see `complete_events`).
                    select e.status, e.payload_sha256, e.lease_expires_at, e.run_deadline_at
                    from checkpoints e
                    where e.scope = $1 and e.idempotency_key = i.idempotency_key
                    limit 1
                ) e on true
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
            &columns.keys,
            &columns.fingerprints,
            &columns.message_ids,
            token,
            terms.lease.as_secs_f64(),
            &columns.reclaimable,
            &columns.field_digests,
            &columns.generations,
            &columns.redrive_counts,
            terms.accept_mismatch,
            terms.run_limit.max(terms.lease).as_secs_f64(),
        )
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|row| (row.key.clone(), row.outcome(terms)))
            .collect())
    }

    /// The completing token stays recorded as the lease owner, so a retry of this statement
    /// after a lost reply recognises its own commit. Rows are found one key at a time (a
    /// `lateral` lookup per entry, in key order — the entries are sorted —, as claims lock
    /// them, so the two cannot deadlock) and updated by the `ctid` their lock read. Joined
    /// as a set instead, the planner chose by the scope's statistics: for a scope it had not
    /// seen grow (a new queue beside a million completed rows of another) it estimated one
    /// row and read every row of the scope per statement, 18 ms at 5,000 rows. Events with
    /// a last step and those without are two updates of the statement, so `steps` is
    /// written only where a step is appended.
    async fn complete_events(
        &self,
        scope: &str,
        events: &[Completion],
    ) -> Result<Vec<Written>, StoreError> {
        if events.is_empty() {
            return Ok(Vec::new());
        }
        let columns = StepColumns::of_completions(events);
        let rows = sqlx::query!(
            r#"
            with ours as (
                select c.row_id, c.status, done.idempotency_key, done.lease_owner,
                       done.step_index, done.step_name, done.step_output
                from unnest($2::text[], $3::text[], $4::int4[], $5::text[], $6::text[])
                     as done(idempotency_key, lease_owner, step_index, step_name, step_output)
                cross join lateral (
                    select c.ctid as row_id, c.status, jsonb_array_length(c.steps) as recorded
                    from checkpoints c
                    where c.scope = $1 and c.idempotency_key = done.idempotency_key
                      and c.lease_owner = done.lease_owner
                    for update
                ) c
                where c.status = 'complete'
                   or (c.status = 'in_progress'
                       and (done.step_index < 0 or c.recorded = done.step_index))
            ),
            completed as (
                update checkpoints as c
                set status = 'complete', lease_expires_at = null, run_deadline_at = null,
                    completed_at = now(), updated_at = now()
                from ours
                where c.ctid = ours.row_id
                  and ours.status = 'in_progress' and ours.step_index < 0
                returning c.idempotency_key
            ),
            completed_with_step as (
                update checkpoints as c
                set status = 'complete', lease_expires_at = null, run_deadline_at = null,
                    completed_at = now(), updated_at = now(),
                    steps = c.steps || jsonb_build_array(jsonb_build_object(
                        'name', ours.step_name, 'output', ours.step_output::jsonb,
                        'completed_at', now()))
                from ours
                where c.ctid = ours.row_id
                  and ours.status = 'in_progress' and ours.step_index >= 0
                returning c.idempotency_key
            )
            select idempotency_key as "idempotency_key!", lease_owner as "lease_owner!"
            from ours
            "#,
            scope,
            &columns.keys,
            &columns.tokens,
            &columns.indexes,
            &columns.names,
            &columns.outputs,
        )
        .fetch_all(&self.pool)
        .await?;
        let done: HashSet<(String, String)> = rows
            .into_iter()
            .map(|row| (row.idempotency_key, row.lease_owner))
            .collect();
        Ok(events
            .iter()
            .map(|e| Written::done_if(done.contains(&(e.key.clone(), e.token.clone()))))
            .collect())
    }

    async fn release(&self, lease: &Lease, error: &str) -> Result<bool, StoreError> {
        let error = storable_text(error);
        let result = sqlx::query!(
            r#"
            update checkpoints
            set lease_owner = null, lease_expires_at = null, run_deadline_at = null, last_error = $4,
                updated_at = now()
            where scope = $1 and idempotency_key = $2 and lease_owner = $3
              and status = 'in_progress'
            "#,
            &lease.scope,
            &lease.key,
            &lease.token,
            &*error,
        )
        .execute(&self.pool)
        .await?;
        Ok(result.rows_affected() == 1)
    }

    async fn release_unstarted(&self, lease: &Lease) -> Result<bool, StoreError> {
        let result = sqlx::query!(
            r#"
            update checkpoints
            set lease_owner = null, lease_expires_at = null, run_deadline_at = null,
                attempts = greatest(attempts - 1, 0), updated_at = now()
            where scope = $1 and idempotency_key = $2 and lease_owner = $3
              and status = 'in_progress'
            "#,
            &lease.scope,
            &lease.key,
            &lease.token,
        )
        .execute(&self.pool)
        .await?;
        Ok(result.rows_affected() == 1)
    }

    async fn renew_lease(&self, lease: &Lease, duration: Duration) -> Result<bool, StoreError> {
        let result = sqlx::query!(
            r#"
            update checkpoints
            set lease_expires_at = now() + make_interval(secs => $4), updated_at = now()
            where scope = $1 and idempotency_key = $2 and lease_owner = $3
              and status = 'in_progress'
            "#,
            &lease.scope,
            &lease.key,
            &lease.token,
            duration.as_secs_f64(),
        )
        .execute(&self.pool)
        .await?;
        Ok(result.rows_affected() == 1)
    }

    async fn renew_leases(
        &self,
        scope: &str,
        token: &str,
        keys: &[String],
        duration: Duration,
    ) -> Result<Vec<String>, StoreError> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        // Locked in key order, one key at a time (see `complete_events`).
        let mut keys = keys.to_vec();
        keys.sort_unstable();
        let rows = sqlx::query_scalar!(
            r#"
            with locked as (
                select c.row_id
                from unnest($3::text[]) as k(idempotency_key)
                cross join lateral (
                    select c.ctid as row_id
                    from checkpoints c
                    where c.scope = $1 and c.idempotency_key = k.idempotency_key
                      and c.lease_owner = $2 and c.status = 'in_progress'
                    for update
                ) c
            )
            update checkpoints as c
            set lease_expires_at = now() + make_interval(secs => $4), updated_at = now()
            from locked
            where c.ctid = locked.row_id
            returning c.idempotency_key
            "#,
            scope,
            token,
            &keys,
            duration.as_secs_f64(),
        )
        .fetch_all(&self.pool)
        .await?;
        Ok(rows)
    }

    async fn start_run(
        &self,
        lease: &Lease,
        duration: Duration,
        run_limit: Duration,
    ) -> Result<bool, StoreError> {
        let result = sqlx::query!(
            r#"
            update checkpoints
            set lease_expires_at = now() + make_interval(secs => $4),
                run_deadline_at = now() + make_interval(secs => $5), updated_at = now()
            where scope = $1 and idempotency_key = $2 and lease_owner = $3
              and status = 'in_progress'
            "#,
            &lease.scope,
            &lease.key,
            &lease.token,
            duration.as_secs_f64(),
            run_limit.max(duration).as_secs_f64(),
        )
        .execute(&self.pool)
        .await?;
        Ok(result.rows_affected() == 1)
    }

    async fn mark_failed(&self, lease: &Lease, error: &str) -> Result<bool, StoreError> {
        let error = storable_text(error);
        let result = sqlx::query!(
            r#"
            update checkpoints
            set status = 'failed', lease_owner = null, lease_expires_at = null, run_deadline_at = null,
                last_error = $4, updated_at = now()
            where scope = $1 and idempotency_key = $2 and lease_owner = $3
              and status = 'in_progress'
            "#,
            &lease.scope,
            &lease.key,
            &lease.token,
            &*error,
        )
        .execute(&self.pool)
        .await?;
        Ok(result.rows_affected() == 1)
    }
}
