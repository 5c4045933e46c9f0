//! Lookups and retention: one checkpoint, stale events, pruning complete ones.

use sqlx::SqliteExecutor;

use crate::Result;

/// A checkpoint as stored (times in epoch milliseconds, steps as JSON text).
#[derive(Debug)]
pub struct CheckpointRow {
    pub scope: String,
    pub idempotency_key: String,
    pub status: String,
    pub steps: String,
    pub lease_owner: Option<String>,
    pub lease_expires_at: Option<i64>,
    pub attempts: i64,
    pub payload_sha256: String,
    pub first_message_id: String,
    pub last_message_id: String,
    pub last_error: Option<String>,
    pub requeue_generation: i64,
    pub redrive_count: i64,
    pub payload_fields: Option<String>,
    pub created_at: i64,
    pub updated_at: i64,
    pub completed_at: Option<i64>,
}

/// One checkpoint.
pub async fn find<'e>(
    executor: impl SqliteExecutor<'e>,
    scope: &str,
    key: &str,
) -> Result<Option<CheckpointRow>> {
    sqlx::query_as!(
        CheckpointRow,
        r#"
        select scope, idempotency_key, status, steps, lease_owner, lease_expires_at, attempts,
               payload_sha256, first_message_id, last_message_id, last_error,
               requeue_generation, redrive_count, payload_fields, created_at, updated_at,
               completed_at
        from checkpoints
        where scope = ?1 and idempotency_key = ?2
        "#,
        scope,
        key,
    )
    .fetch_optional(executor)
    .await
}

/// Events in progress with no live lease at `now`, untouched since `idle_since`; oldest
/// first.
pub async fn list_stale<'e>(
    executor: impl SqliteExecutor<'e>,
    scope: Option<&str>,
    now: i64,
    idle_since: i64,
    limit: i64,
) -> Result<Vec<CheckpointRow>> {
    sqlx::query_as!(
        CheckpointRow,
        r#"
        select scope, idempotency_key, status, steps, lease_owner, lease_expires_at, attempts,
               payload_sha256, first_message_id, last_message_id, last_error,
               requeue_generation, redrive_count, payload_fields, created_at, updated_at,
               completed_at
        from checkpoints
        where status = 'in_progress'
          and (lease_expires_at is null or lease_expires_at <= ?2)
          and updated_at < ?3
          and (?1 is null or scope = ?1)
        order by updated_at
        limit ?4
        "#,
        scope,
        now,
        idle_since,
        limit,
    )
    .fetch_all(executor)
    .await
}

/// Mark a stale event failed unless it was claimed again meanwhile. Rows changed.
pub async fn mark_stale_failed<'e>(
    executor: impl SqliteExecutor<'e>,
    scope: &str,
    key: &str,
    now: i64,
    idle_since: i64,
    reason: &str,
) -> Result<u64> {
    let done = sqlx::query!(
        r#"
        update checkpoints
        set status = 'failed', lease_owner = null, lease_expires_at = null,
            run_deadline_at = null, last_error = ?5, updated_at = ?3
        where scope = ?1 and idempotency_key = ?2 and status = 'in_progress'
          and (lease_expires_at is null or lease_expires_at <= ?3)
          and updated_at < ?4
        "#,
        scope,
        key,
        now,
        idle_since,
        reason,
    )
    .execute(executor)
    .await?;
    Ok(done.rows_affected())
}

/// Delete up to `limit` complete checkpoints last changed before `before`. Rows deleted.
pub async fn prune_complete<'e>(
    executor: impl SqliteExecutor<'e>,
    scope: Option<&str>,
    before: i64,
    limit: i64,
) -> Result<u64> {
    let done = sqlx::query!(
        r#"
        delete from checkpoints
        where rowid in (
            select rowid from checkpoints
            where status = 'complete' and updated_at < ?2 and (?1 is null or scope = ?1)
            limit ?3
        )
        "#,
        scope,
        before,
        limit,
    )
    .execute(executor)
    .await?;
    Ok(done.rows_affected())
}

/// The cheapest statement, for the readiness probe.
pub async fn ping<'e>(executor: impl SqliteExecutor<'e>) -> Result<()> {
    sqlx::query_scalar!(r#"select 1 as "one!: i64""#)
        .fetch_one(executor)
        .await?;
    Ok(())
}
