//! The operator log: operator actions, the redrive runs' audit rows read back, and an
//! edited body's fingerprint adopted by its failed checkpoint.

use sqlx::SqliteExecutor;

use crate::Result;

/// What to insert into `operator_actions`.
#[derive(Debug, Clone, Copy)]
pub struct NewOperatorActionRow<'a> {
    pub operator: &'a str,
    pub action: &'a str,
    pub queue_url: &'a str,
    pub message_id: &'a str,
    pub key: Option<&'a str>,
    pub before_sha256: Option<&'a str>,
    pub after_sha256: Option<&'a str>,
    pub detail: &'a str,
    pub now: i64,
}

/// An operator action as stored (`recorded_at` in epoch milliseconds).
#[derive(Debug)]
pub struct OperatorActionRow {
    pub id: i64,
    pub recorded_at: i64,
    pub operator: String,
    pub action: String,
    pub queue_url: String,
    pub message_id: String,
    pub key: Option<String>,
    pub before_sha256: Option<String>,
    pub after_sha256: Option<String>,
    pub detail: String,
}

/// A redrive run's audit row as stored (times in epoch milliseconds).
#[derive(Debug)]
pub struct RedriveRunRow {
    pub id: i64,
    pub operator: String,
    pub dlq_url: String,
    pub target_url: String,
    pub max_redrives: i64,
    pub dry_run: bool,
    pub redriven: i64,
    pub skipped_complete: i64,
    pub exhausted: i64,
    pub failed: i64,
    pub started_at: i64,
    pub finished_at: Option<i64>,
}

/// Record an operator action; returns its id.
pub async fn insert_operator_action<'e>(
    executor: impl SqliteExecutor<'e>,
    a: NewOperatorActionRow<'_>,
) -> Result<i64> {
    sqlx::query_scalar!(
        r#"
        insert into operator_actions
            (recorded_at, operator, action, queue_url, message_id, idempotency_key,
             before_sha256, after_sha256, detail)
        values (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)
        returning id as "id!: i64"
        "#,
        a.now,
        a.operator,
        a.action,
        a.queue_url,
        a.message_id,
        a.key,
        a.before_sha256,
        a.after_sha256,
        a.detail,
    )
    .fetch_one(executor)
    .await
}

/// Operator actions, newest first.
pub async fn list_operator_actions<'e>(
    executor: impl SqliteExecutor<'e>,
    limit: i64,
) -> Result<Vec<OperatorActionRow>> {
    sqlx::query_as!(
        OperatorActionRow,
        r#"
        select id as "id!: i64", recorded_at, operator, action, queue_url, message_id,
               idempotency_key as key, before_sha256, after_sha256, detail
        from operator_actions
        order by recorded_at desc, id desc
        limit ?1
        "#,
        limit,
    )
    .fetch_all(executor)
    .await
}

/// Redrive runs' audit rows, newest first.
pub async fn list_redrive_runs<'e>(
    executor: impl SqliteExecutor<'e>,
    limit: i64,
) -> Result<Vec<RedriveRunRow>> {
    sqlx::query_as!(
        RedriveRunRow,
        r#"
        select id as "id!: i64", operator, dlq_url, target_url, max_redrives,
               dry_run as "dry_run: bool", redriven, skipped_complete, exhausted, failed,
               started_at, finished_at
        from redrives
        order by id desc
        limit ?1
        "#,
        limit,
    )
    .fetch_all(executor)
    .await
}

/// Give a failed event the edited payload's fingerprint (and field digests, null without
/// them). Rows changed: 0 when the event is missing or not failed.
pub async fn adopt_edited_payload<'e>(
    executor: impl SqliteExecutor<'e>,
    scope: &str,
    key: &str,
    payload_sha256: &str,
    field_digests: Option<&str>,
    now: i64,
) -> Result<u64> {
    let done = sqlx::query!(
        r#"
        update checkpoints
        set payload_sha256 = ?3, payload_fields = ?4, updated_at = ?5
        where scope = ?1 and idempotency_key = ?2 and status = 'failed'
        "#,
        scope,
        key,
        payload_sha256,
        field_digests,
        now,
    )
    .execute(executor)
    .await?;
    Ok(done.rows_affected())
}
