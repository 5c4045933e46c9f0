//! The operator log in SQLite: operator actions (`operator_actions`, newest first), the
//! redrive runs' audit rows read back (`redrives`, newest first), and an edited body's
//! fingerprint adopted by its `failed` checkpoint.

use async_trait::async_trait;
use sqs_worker_sqlite_sql::operator_log::{
    self as sql, NewOperatorActionRow, OperatorActionRow, RedriveRunRow,
};

use super::{SqliteStore, now_ms, time};
use crate::store::{
    NewOperatorAction, OperatorAction, OperatorLog, RedriveCounts, RedriveRun, StoreError,
    storable_text,
};

fn operator_action(row: OperatorActionRow) -> OperatorAction {
    OperatorAction {
        id: row.id,
        recorded_at: time(row.recorded_at),
        operator: row.operator,
        action: row.action,
        queue_url: row.queue_url,
        message_id: row.message_id,
        key: row.key,
        before_sha256: row.before_sha256,
        after_sha256: row.after_sha256,
        detail: row.detail,
    }
}

fn redrive_run(row: RedriveRunRow) -> RedriveRun {
    let count = |n: i64| n.max(0) as u64;
    RedriveRun {
        id: row.id,
        operator: row.operator,
        dlq_url: row.dlq_url,
        target_url: row.target_url,
        max_redrives: row.max_redrives.clamp(i32::MIN.into(), i32::MAX.into()) as i32,
        dry_run: row.dry_run,
        counts: RedriveCounts {
            redriven: count(row.redriven),
            skipped_complete: count(row.skipped_complete),
            exhausted: count(row.exhausted),
            failed: count(row.failed),
        },
        started_at: time(row.started_at),
        finished_at: row.finished_at.map(time),
    }
}

#[async_trait]
impl OperatorLog for SqliteStore {
    async fn record_operator_action(
        &self,
        action: &NewOperatorAction<'_>,
    ) -> Result<i64, StoreError> {
        let detail = storable_text(action.detail);
        let row = NewOperatorActionRow {
            operator: action.operator,
            action: action.action,
            queue_url: action.queue_url,
            message_id: action.message_id,
            key: action.key,
            before_sha256: action.before_sha256,
            after_sha256: action.after_sha256,
            detail: &detail,
            now: now_ms(),
        };
        Ok(sql::insert_operator_action(&self.pool, row).await?)
    }

    async fn list_operator_actions(&self, limit: i64) -> Result<Vec<OperatorAction>, StoreError> {
        let rows = sql::list_operator_actions(&self.pool, limit.max(0)).await?;
        Ok(rows.into_iter().map(operator_action).collect())
    }

    async fn list_redrive_runs(&self, limit: i64) -> Result<Vec<RedriveRun>, StoreError> {
        let rows = sql::list_redrive_runs(&self.pool, limit.max(0)).await?;
        Ok(rows.into_iter().map(redrive_run).collect())
    }

    async fn adopt_edited_payload(
        &self,
        scope: &str,
        key: &str,
        payload_sha256: &str,
        field_digests: Option<&str>,
    ) -> Result<bool, StoreError> {
        let adopted = sql::adopt_edited_payload(
            &self.pool,
            scope,
            key,
            payload_sha256,
            field_digests,
            now_ms(),
        )
        .await?;
        Ok(adopted > 0)
    }
}
