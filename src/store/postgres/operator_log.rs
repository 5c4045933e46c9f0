//! The operator log in PostgreSQL: operator actions (`operator_actions`, newest first by
//! `recorded_at`), the redrive runs' audit rows read back (`redrives`, newest first by id),
//! and an edited body's fingerprint adopted by its `failed` checkpoint.

use async_trait::async_trait;

use super::PostgresStore;
use crate::store::{
    NewOperatorAction, OperatorAction, OperatorLog, RedriveCounts, RedriveRun, StoreError,
    storable_text,
};

/// A `redrives` row as selected.
struct RedriveRow {
    id: i64,
    operator: String,
    dlq_url: String,
    target_url: String,
    max_redrives: i32,
    dry_run: bool,
    redriven: i32,
    skipped_complete: i32,
    exhausted: i32,
    failed: i32,
    started_at: chrono::DateTime<chrono::Utc>,
    finished_at: Option<chrono::DateTime<chrono::Utc>>,
}

impl From<RedriveRow> for RedriveRun {
    fn from(row: RedriveRow) -> Self {
        let count = |n: i32| n.max(0) as u64;
        RedriveRun {
            id: row.id,
            operator: row.operator,
            dlq_url: row.dlq_url,
            target_url: row.target_url,
            max_redrives: row.max_redrives,
            dry_run: row.dry_run,
            counts: RedriveCounts {
                redriven: count(row.redriven),
                skipped_complete: count(row.skipped_complete),
                exhausted: count(row.exhausted),
                failed: count(row.failed),
            },
            started_at: row.started_at,
            finished_at: row.finished_at,
        }
    }
}

#[async_trait]
impl OperatorLog for PostgresStore {
    async fn record_operator_action(
        &self,
        action: &NewOperatorAction<'_>,
    ) -> Result<i64, StoreError> {
        let detail = storable_text(action.detail);
        let id = sqlx::query_scalar!(
            r#"
            insert into operator_actions
                (operator, action, queue_url, message_id, idempotency_key, before_sha256,
                 after_sha256, detail)
            values ($1, $2, $3, $4, $5, $6, $7, $8)
            returning id
            "#,
            action.operator,
            action.action,
            action.queue_url,
            action.message_id,
            action.key,
            action.before_sha256,
            action.after_sha256,
            &*detail,
        )
        .fetch_one(&self.pool)
        .await?;
        Ok(id)
    }

    async fn list_operator_actions(&self, limit: i64) -> Result<Vec<OperatorAction>, StoreError> {
        let rows = sqlx::query_as!(
            OperatorAction,
            r#"
            select id, recorded_at, operator, action, queue_url, message_id,
                   idempotency_key as key, before_sha256, after_sha256, detail
            from operator_actions
            order by recorded_at desc, id desc
            limit $1
            "#,
            limit.max(0),
        )
        .fetch_all(&self.pool)
        .await?;
        Ok(rows)
    }

    async fn list_redrive_runs(&self, limit: i64) -> Result<Vec<RedriveRun>, StoreError> {
        let rows = sqlx::query_as!(
            RedriveRow,
            r#"
            select id, operator, dlq_url, target_url, max_redrives, dry_run, redriven,
                   skipped_complete, exhausted, failed, started_at, finished_at
            from redrives
            order by id desc
            limit $1
            "#,
            limit.max(0),
        )
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.into_iter().map(RedriveRun::from).collect())
    }

    /// `payload_fields` as a claim stores it: the digests, or null without them.
    async fn adopt_edited_payload(
        &self,
        scope: &str,
        key: &str,
        payload_sha256: &str,
        field_digests: Option<&str>,
    ) -> Result<bool, StoreError> {
        let adopted = sqlx::query!(
            r#"
            update checkpoints
            set payload_sha256 = $3, payload_fields = nullif($4::text, ''), updated_at = now()
            where scope = $1 and idempotency_key = $2 and status = 'failed'
            "#,
            scope,
            key,
            payload_sha256,
            field_digests,
        )
        .execute(&self.pool)
        .await?;
        Ok(adopted.rows_affected() > 0)
    }
}
