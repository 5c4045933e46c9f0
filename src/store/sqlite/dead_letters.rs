//! Dead letters in SQLite (`dead_letters`), failed checkpoints of messages without a key,
//! and the audit rows of redrive runs (`redrives`).

use async_trait::async_trait;
use serde_json::Value;
use sqs_worker_sqlite_sql::dead_letters::{
    self as sql, DeadLetterRow, FailedMark, NewDeadLetterRow, RedriveCountsRow,
};

use super::{SqliteStore, now_ms, time};
use crate::store::{
    DeadLetter, DeadLetters, NewDeadLetter, RedriveCounts, StoreError, storable_text,
};

fn dead_letter(row: DeadLetterRow) -> DeadLetter {
    DeadLetter {
        id: row.id,
        scope: row.scope,
        idempotency_key: row.idempotency_key,
        queue_url: row.queue_url,
        message_id: row.message_id,
        body: row.body,
        attributes: serde_json::from_str(&row.attributes).unwrap_or(Value::Null),
        reason: row.reason,
        error: row.error,
        attempts: row.attempts as i32,
        redrive_count: row.redrive_count as i32,
        created_at: time(row.created_at),
        requeued_at: row.requeued_at.map(time),
    }
}

#[async_trait]
impl DeadLetters for SqliteStore {
    /// Both statements in one `BEGIN IMMEDIATE` transaction: both or neither.
    async fn record_dead_letter(
        &self,
        letter: &NewDeadLetter<'_>,
        mark_checkpoint: bool,
        token: Option<&str>,
    ) -> Result<Option<i64>, StoreError> {
        let reason = storable_text(letter.reason);
        let error = storable_text(letter.error);
        let attributes = letter.attributes.to_string();
        let now = now_ms();
        let mut transaction = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        let row = NewDeadLetterRow {
            scope: letter.scope,
            key: letter.key,
            queue_url: letter.queue_url,
            message_id: letter.message_id,
            body: letter.body,
            attributes: &attributes,
            reason: &reason,
            error: &error,
            attempts: letter.attempts.into(),
            redrive_count: letter.redrive_count.into(),
            now,
        };
        let id = sql::insert_dead_letter(&mut *transaction, row).await?;
        if mark_checkpoint {
            let mark = FailedMark {
                scope: letter.scope,
                key: letter.key,
                payload_sha256: letter.payload_sha256,
                message_id: letter.message_id,
                error: &error,
                token,
                requeue_generation: letter.requeue_generation.into(),
                redrive_count: letter.redrive_count.into(),
                now,
            };
            let marked = sql::mark_dead_lettered(&mut *transaction, mark).await?;
            if token.is_some() && marked == 0 {
                transaction.rollback().await?;
                return Ok(None);
            }
        }
        transaction.commit().await?;
        Ok(Some(id))
    }

    async fn record_unkeyed_failure(
        &self,
        scope: &str,
        key: &str,
        payload_sha256: &str,
        message_id: &str,
        error: &str,
    ) -> Result<(), StoreError> {
        let error = storable_text(error);
        sql::record_unkeyed_failure(
            &self.pool,
            scope,
            key,
            payload_sha256,
            message_id,
            &error,
            now_ms(),
        )
        .await?;
        Ok(())
    }

    async fn list_dead_letters(
        &self,
        scope: Option<&str>,
        limit: i64,
    ) -> Result<Vec<DeadLetter>, StoreError> {
        let rows = sql::list_dead_letters(&self.pool, scope, limit).await?;
        Ok(rows.into_iter().map(dead_letter).collect())
    }

    async fn find_dead_letter(&self, id: i64) -> Result<Option<DeadLetter>, StoreError> {
        Ok(sql::find_dead_letter(&self.pool, id)
            .await?
            .map(dead_letter))
    }

    async fn mark_dead_letter_requeued(&self, id: i64) -> Result<(), StoreError> {
        sql::mark_requeued(&self.pool, id, now_ms()).await?;
        Ok(())
    }

    async fn start_redrive_audit(
        &self,
        operator: &str,
        dlq_url: &str,
        target_url: &str,
        max_redrives: i32,
        dry_run: bool,
    ) -> Result<i64, StoreError> {
        let id = sql::start_redrive(
            &self.pool,
            operator,
            dlq_url,
            target_url,
            max_redrives.into(),
            dry_run,
            now_ms(),
        )
        .await?;
        Ok(id)
    }

    async fn finish_redrive_audit(
        &self,
        id: i64,
        counts: &RedriveCounts,
    ) -> Result<(), StoreError> {
        let count = |n: u64| n.min(i64::MAX as u64) as i64;
        let counts = RedriveCountsRow {
            redriven: count(counts.redriven),
            skipped_complete: count(counts.skipped_complete),
            exhausted: count(counts.exhausted),
            failed: count(counts.failed),
        };
        sql::finish_redrive(&self.pool, id, counts, now_ms()).await?;
        Ok(())
    }
}
