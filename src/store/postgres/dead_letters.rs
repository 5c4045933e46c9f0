//! Dead letters in PostgreSQL (`dead_letters`), failed checkpoints of messages without a
//! key, and the audit rows of redrive runs (`redrives`).

use async_trait::async_trait;

use super::PostgresStore;
use crate::store::{
    DeadLetter, DeadLetters, NewDeadLetter, RedriveCounts, StoreError, storable_text,
};

#[async_trait]
impl DeadLetters for PostgresStore {
    /// Both statements in one transaction, so a crash leaves either both or neither.
    async fn record_dead_letter(
        &self,
        letter: &NewDeadLetter<'_>,
        mark_checkpoint: bool,
        token: Option<&str>,
    ) -> Result<Option<i64>, StoreError> {
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
                token,
                letter.requeue_generation,
                letter.redrive_count,
            )
            .execute(&mut *transaction)
            .await?;
            if token.is_some() && marked.rows_affected() == 0 {
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

    async fn list_dead_letters(
        &self,
        scope: Option<&str>,
        limit: i64,
    ) -> Result<Vec<DeadLetter>, StoreError> {
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

    async fn find_dead_letter(&self, id: i64) -> Result<Option<DeadLetter>, StoreError> {
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

    async fn mark_dead_letter_requeued(&self, id: i64) -> Result<(), StoreError> {
        sqlx::query!(
            "update dead_letters set requeued_at = now() where id = $1",
            id
        )
        .execute(&self.pool)
        .await?;
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

    async fn finish_redrive_audit(
        &self,
        id: i64,
        counts: &RedriveCounts,
    ) -> Result<(), StoreError> {
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
}
