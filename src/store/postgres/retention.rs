//! Lookups and retention in PostgreSQL: `find` (`checkpoints show`), stale events
//! (`checkpoints stale`), pruning complete ones (`checkpoints prune`).

use std::time::Duration;

use async_trait::async_trait;

use super::PostgresStore;
use crate::store::{Checkpoint, Retention, StoreError, storable_text};

#[async_trait]
impl Retention for PostgresStore {
    async fn find(&self, scope: &str, key: &str) -> Result<Option<Checkpoint>, StoreError> {
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

    async fn list_stale(
        &self,
        scope: Option<&str>,
        idle_for: Duration,
        limit: i64,
    ) -> Result<Vec<Checkpoint>, StoreError> {
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

    async fn mark_stale_failed(
        &self,
        scope: &str,
        key: &str,
        idle_for: Duration,
        reason: &str,
    ) -> Result<bool, StoreError> {
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

    async fn prune_complete(
        &self,
        scope: Option<&str>,
        older_than: Duration,
        limit: i64,
    ) -> Result<u64, StoreError> {
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
}
