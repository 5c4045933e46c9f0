//! Claims and leases in SQLite: the batch claim, completion, release, renewals, the start of
//! a waiting event's run, and marking a claimed event failed.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use async_trait::async_trait;
use serde_json::{Value, json};
use sqs_worker_sqlite_sql::claims::{self as sql, ClaimParams, ClaimedRow};

use super::{SqliteStore, millis, now_ms};
use crate::store::{
    Claim, ClaimOutcome, ClaimRequest, ClaimTerms, Claims, Completion, Lease, StoreError, Written,
    passes_by_key, storable_text,
};

/// The deliveries of a batch as the claim statement reads them: a JSON array with, for each
/// delivery, its key's latest pass and whether any delivery of the key may reclaim a failed
/// row (as PostgreSQL's store computes them).
fn deliveries(requests: &[ClaimRequest]) -> String {
    let per_key = passes_by_key(requests);
    let rows: Vec<Value> = requests
        .iter()
        .map(|r| {
            let (pass, reclaim) = per_key[r.key.as_str()];
            json!({
                "key": r.key,
                "sha": r.payload_sha256,
                "id": r.message_id,
                "fields": r.field_digests,
                "generation": pass.requeue_generation,
                "redrives": pass.redrive_count,
                "reclaim": reclaim,
            })
        })
        .collect();
    Value::Array(rows).to_string()
}

/// Time left until `at` (epoch ms), never negative, below SQS's 12-hour limit.
fn remaining(at: Option<i64>, now: i64) -> Duration {
    let ms = at.map_or(0, |at| at - now).clamp(0, 43_199_000);
    Duration::from_millis(ms as u64)
}

/// What the claim found for one key, from its row as the statement left it.
fn outcome(row: ClaimedRow, token: &str, now: i64) -> ClaimOutcome {
    let stored_payload_sha256 = row.payload_sha256;
    match row.status.as_str() {
        "in_progress" if row.lease_owner.as_deref() == Some(token) => {
            ClaimOutcome::Claimed(Claim {
                attempts: row.attempts.clamp(1, u32::MAX as i64) as u32,
                // A row this statement inserted carries its `now` as creation time.
                resumed: row.created_at != now,
                steps: serde_json::from_str(&row.steps).unwrap_or_else(|_| json!([])),
                stored_payload_sha256,
            })
        }
        "complete" => ClaimOutcome::Complete {
            stored_payload_sha256,
        },
        "failed" => ClaimOutcome::Failed {
            stored_payload_sha256,
        },
        _ => {
            let retry_after = remaining(row.lease_expires_at, now);
            let run_end = row.lease_expires_at.max(row.run_deadline_at);
            ClaimOutcome::Busy {
                retry_after,
                run_remaining: remaining(run_end, now).max(retry_after),
                stored_payload_sha256: Some(stored_payload_sha256),
            }
        }
    }
}

#[async_trait]
impl Claims for SqliteStore {
    /// One statement for the whole batch (see `sqs_worker_sqlite_sql::claims::claim_batch`).
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
        let deliveries = deliveries(requests);
        let now = now_ms();
        let params = ClaimParams {
            scope,
            token,
            now,
            lease_ms: millis(terms.lease),
            run_limit_ms: millis(terms.run_limit.max(terms.lease)),
            accept_mismatch: terms.accept_mismatch,
            deliveries: &deliveries,
        };
        let rows = sql::claim_batch(&self.pool, params).await?;
        Ok(rows
            .into_iter()
            .map(|row| (row.key.clone(), outcome(row, token, now)))
            .collect())
    }

    async fn complete_events(
        &self,
        scope: &str,
        events: &[Completion],
    ) -> Result<Vec<Written>, StoreError> {
        if events.is_empty() {
            return Ok(Vec::new());
        }
        let entries: Vec<Value> = events
            .iter()
            .map(|e| {
                let step = e.last_step.as_ref().map(
                    |step| json!({"index": step.index, "name": step.name, "output": step.output}),
                );
                json!([e.key, e.token, step])
            })
            .collect();
        let entries = Value::Array(entries).to_string();
        let rows = sql::complete_events(&self.pool, scope, &entries, now_ms()).await?;
        let done: HashSet<(String, String)> =
            rows.into_iter().map(|r| (r.key, r.lease_owner)).collect();
        Ok(events
            .iter()
            .map(|e| Written::done_if(done.contains(&(e.key.clone(), e.token.clone()))))
            .collect())
    }

    async fn release(&self, lease: &Lease, error: &str) -> Result<bool, StoreError> {
        let error = storable_text(error);
        let changed = sql::release(
            &self.pool,
            &lease.scope,
            &lease.key,
            &lease.token,
            &error,
            now_ms(),
        )
        .await?;
        Ok(changed == 1)
    }

    async fn release_unstarted(&self, lease: &Lease) -> Result<bool, StoreError> {
        let changed =
            sql::release_unstarted(&self.pool, &lease.scope, &lease.key, &lease.token, now_ms())
                .await?;
        Ok(changed == 1)
    }

    async fn renew_lease(&self, lease: &Lease, duration: Duration) -> Result<bool, StoreError> {
        let now = now_ms();
        let changed = sql::renew(
            &self.pool,
            &lease.scope,
            &lease.key,
            &lease.token,
            now + millis(duration),
            None,
            now,
        )
        .await?;
        Ok(changed == 1)
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
        let now = now_ms();
        let keys = serde_json::to_string(keys).expect("strings serialize");
        let held =
            sql::renew_many(&self.pool, scope, token, &keys, now + millis(duration), now).await?;
        Ok(held)
    }

    async fn start_run(
        &self,
        lease: &Lease,
        duration: Duration,
        run_limit: Duration,
    ) -> Result<bool, StoreError> {
        let now = now_ms();
        let changed = sql::renew(
            &self.pool,
            &lease.scope,
            &lease.key,
            &lease.token,
            now + millis(duration),
            Some(now + millis(run_limit.max(duration))),
            now,
        )
        .await?;
        Ok(changed == 1)
    }

    async fn mark_failed(&self, lease: &Lease, error: &str) -> Result<bool, StoreError> {
        let error = storable_text(error);
        let changed = sql::mark_failed(
            &self.pool,
            &lease.scope,
            &lease.key,
            &lease.token,
            &error,
            now_ms(),
        )
        .await?;
        Ok(changed == 1)
    }
}
