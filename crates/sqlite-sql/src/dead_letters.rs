//! Dead letters, failed checkpoints of messages without a key, and the redrive audit.

use sqlx::SqliteExecutor;

use crate::Result;

/// A dead letter as stored (times in epoch milliseconds, attributes as JSON text).
#[derive(Debug)]
pub struct DeadLetterRow {
    pub id: i64,
    pub scope: String,
    pub idempotency_key: String,
    pub queue_url: String,
    pub message_id: String,
    pub body: String,
    pub attributes: String,
    pub reason: String,
    pub error: String,
    pub attempts: i64,
    pub redrive_count: i64,
    pub created_at: i64,
    pub requeued_at: Option<i64>,
}

/// What to insert into `dead_letters`.
#[derive(Debug, Clone, Copy)]
pub struct NewDeadLetterRow<'a> {
    pub scope: &'a str,
    pub key: &'a str,
    pub queue_url: &'a str,
    pub message_id: &'a str,
    pub body: &'a str,
    pub attributes: &'a str,
    pub reason: &'a str,
    pub error: &'a str,
    pub attempts: i64,
    pub redrive_count: i64,
    pub now: i64,
}

/// Insert a dead letter; returns its id.
pub async fn insert_dead_letter<'e>(
    executor: impl SqliteExecutor<'e>,
    d: NewDeadLetterRow<'_>,
) -> Result<i64> {
    sqlx::query_scalar!(
        r#"
        insert into dead_letters
            (scope, idempotency_key, queue_url, message_id, body, attributes, reason, error,
             attempts, redrive_count, created_at)
        values (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)
        returning id as "id!: i64"
        "#,
        d.scope,
        d.key,
        d.queue_url,
        d.message_id,
        d.body,
        d.attributes,
        d.reason,
        d.error,
        d.attempts,
        d.redrive_count,
        d.now,
    )
    .fetch_one(executor)
    .await
}

/// The checkpoint side of a dead letter: mark the event failed (or create it failed).
#[derive(Debug, Clone, Copy)]
pub struct FailedMark<'a> {
    pub scope: &'a str,
    pub key: &'a str,
    pub payload_sha256: &'a str,
    pub message_id: &'a str,
    pub error: &'a str,
    /// The final pass's lease token, if a claim holds the event.
    pub token: Option<&'a str>,
    pub requeue_generation: i64,
    pub redrive_count: i64,
    pub now: i64,
}

/// Mark the event failed unless it is complete or leased by a claim other than `token`.
/// Rows changed (0 when it was left alone).
pub async fn mark_dead_lettered<'e>(
    executor: impl SqliteExecutor<'e>,
    m: FailedMark<'_>,
) -> Result<u64> {
    let done = sqlx::query!(
        r#"
        insert into checkpoints
            (scope, idempotency_key, status, payload_sha256, first_message_id,
             last_message_id, last_error, requeue_generation, redrive_count, created_at,
             updated_at)
        values (?1, ?2, 'failed', ?3, ?4, ?4, ?5, ?7, ?8, ?9, ?9)
        on conflict (scope, idempotency_key) do update
        set status = 'failed', lease_owner = null, lease_expires_at = null,
            run_deadline_at = null, last_message_id = excluded.last_message_id,
            last_error = excluded.last_error,
            requeue_generation = iif(
                (excluded.requeue_generation, excluded.redrive_count)
                > (requeue_generation, redrive_count),
                excluded.requeue_generation, requeue_generation),
            redrive_count = iif(
                (excluded.requeue_generation, excluded.redrive_count)
                > (requeue_generation, redrive_count),
                excluded.redrive_count, redrive_count),
            updated_at = excluded.updated_at
        where status <> 'complete'
          and (lease_owner is null or lease_owner = ?6 or lease_expires_at <= ?9)
        "#,
        m.scope,
        m.key,
        m.payload_sha256,
        m.message_id,
        m.error,
        m.token,
        m.requeue_generation,
        m.redrive_count,
        m.now,
    )
    .execute(executor)
    .await?;
    Ok(done.rows_affected())
}

/// Record a failed event for a message no key could be taken from.
#[allow(clippy::too_many_arguments)] // one per column; a struct would only rename them
pub async fn record_unkeyed_failure<'e>(
    executor: impl SqliteExecutor<'e>,
    scope: &str,
    key: &str,
    payload_sha256: &str,
    message_id: &str,
    error: &str,
    now: i64,
) -> Result<()> {
    sqlx::query!(
        r#"
        insert into checkpoints
            (scope, idempotency_key, status, payload_sha256, first_message_id,
             last_message_id, last_error, created_at, updated_at)
        values (?1, ?2, 'failed', ?3, ?4, ?4, ?5, ?6, ?6)
        on conflict (scope, idempotency_key) do update
        set status = 'failed', lease_owner = null, lease_expires_at = null,
            run_deadline_at = null, attempts = attempts + 1,
            last_message_id = excluded.last_message_id, last_error = excluded.last_error,
            updated_at = excluded.updated_at
        where status <> 'complete'
        "#,
        scope,
        key,
        payload_sha256,
        message_id,
        error,
        now,
    )
    .execute(executor)
    .await?;
    Ok(())
}

/// Dead letters, newest first, of one scope or all.
pub async fn list_dead_letters<'e>(
    executor: impl SqliteExecutor<'e>,
    scope: Option<&str>,
    limit: i64,
) -> Result<Vec<DeadLetterRow>> {
    sqlx::query_as!(
        DeadLetterRow,
        r#"
        select id as "id!: i64", scope, idempotency_key, queue_url, message_id, body,
               attributes, reason, error, attempts, redrive_count, created_at, requeued_at
        from dead_letters
        where ?1 is null or scope = ?1
        order by id desc
        limit ?2
        "#,
        scope,
        limit,
    )
    .fetch_all(executor)
    .await
}

/// One dead letter by id.
pub async fn find_dead_letter<'e>(
    executor: impl SqliteExecutor<'e>,
    id: i64,
) -> Result<Option<DeadLetterRow>> {
    sqlx::query_as!(
        DeadLetterRow,
        r#"
        select id as "id!: i64", scope, idempotency_key, queue_url, message_id, body,
               attributes, reason, error, attempts, redrive_count, created_at, requeued_at
        from dead_letters
        where id = ?1
        "#,
        id,
    )
    .fetch_optional(executor)
    .await
}

/// Note that a dead letter was sent back on purpose.
pub async fn mark_requeued<'e>(executor: impl SqliteExecutor<'e>, id: i64, now: i64) -> Result<()> {
    sqlx::query!(
        "update dead_letters set requeued_at = ?2 where id = ?1",
        id,
        now
    )
    .execute(executor)
    .await?;
    Ok(())
}

/// Open a redrive run's audit row; returns its id.
pub async fn start_redrive<'e>(
    executor: impl SqliteExecutor<'e>,
    operator: &str,
    dlq_url: &str,
    target_url: &str,
    max_redrives: i64,
    dry_run: bool,
    now: i64,
) -> Result<i64> {
    sqlx::query_scalar!(
        r#"
        insert into redrives (operator, dlq_url, target_url, max_redrives, dry_run, started_at)
        values (?1, ?2, ?3, ?4, ?5, ?6)
        returning id as "id!: i64"
        "#,
        operator,
        dlq_url,
        target_url,
        max_redrives,
        dry_run,
        now,
    )
    .fetch_one(executor)
    .await
}

/// A redrive run's counts, as its audit row keeps them.
#[derive(Debug, Clone, Copy)]
pub struct RedriveCountsRow {
    pub redriven: i64,
    pub skipped_complete: i64,
    pub exhausted: i64,
    pub failed: i64,
}

/// Close a redrive run's audit row with its counts.
pub async fn finish_redrive<'e>(
    executor: impl SqliteExecutor<'e>,
    id: i64,
    c: RedriveCountsRow,
    now: i64,
) -> Result<()> {
    sqlx::query!(
        r#"
        update redrives
        set redriven = ?2, skipped_complete = ?3, exhausted = ?4, failed = ?5, finished_at = ?6
        where id = ?1
        "#,
        id,
        c.redriven,
        c.skipped_complete,
        c.exhausted,
        c.failed,
        now,
    )
    .execute(executor)
    .await?;
    Ok(())
}
