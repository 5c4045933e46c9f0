//! Lookups and retention in SQLite: `find` (`checkpoints show`), stale events
//! (`checkpoints stale`), pruning complete ones (`checkpoints prune`).

use std::time::Duration;

use async_trait::async_trait;
use serde_json::Value;
use sqs_worker_sqlite_sql::retention::{self as sql, CheckpointRow};

use super::{SqliteStore, millis, now_ms, time};
use crate::store::{Checkpoint, Retention, StoreError, storable_text};

fn checkpoint(row: CheckpointRow) -> Checkpoint {
    Checkpoint {
        scope: row.scope,
        idempotency_key: row.idempotency_key,
        status: row.status,
        steps: serde_json::from_str(&row.steps).unwrap_or(Value::Null),
        lease_owner: row.lease_owner,
        lease_expires_at: row.lease_expires_at.map(time),
        attempts: row.attempts as i32,
        payload_sha256: row.payload_sha256,
        first_message_id: row.first_message_id,
        last_message_id: row.last_message_id,
        last_error: row.last_error,
        requeue_generation: row.requeue_generation as i32,
        redrive_count: row.redrive_count as i32,
        payload_fields: row.payload_fields,
        created_at: time(row.created_at),
        updated_at: time(row.updated_at),
        completed_at: row.completed_at.map(time),
    }
}

#[async_trait]
impl Retention for SqliteStore {
    async fn find(&self, scope: &str, key: &str) -> Result<Option<Checkpoint>, StoreError> {
        Ok(sql::find(&self.pool, scope, key).await?.map(checkpoint))
    }

    async fn list_stale(
        &self,
        scope: Option<&str>,
        idle_for: Duration,
        limit: i64,
    ) -> Result<Vec<Checkpoint>, StoreError> {
        let now = now_ms();
        let rows = sql::list_stale(&self.pool, scope, now, now - millis(idle_for), limit).await?;
        Ok(rows.into_iter().map(checkpoint).collect())
    }

    async fn mark_stale_failed(
        &self,
        scope: &str,
        key: &str,
        idle_for: Duration,
        reason: &str,
    ) -> Result<bool, StoreError> {
        let reason = storable_text(reason);
        let now = now_ms();
        let changed =
            sql::mark_stale_failed(&self.pool, scope, key, now, now - millis(idle_for), &reason)
                .await?;
        Ok(changed == 1)
    }

    async fn prune_complete(
        &self,
        scope: Option<&str>,
        older_than: Duration,
        limit: i64,
    ) -> Result<u64, StoreError> {
        let before = now_ms() - millis(older_than);
        Ok(sql::prune_complete(&self.pool, scope, before, limit).await?)
    }
}
