//! Steps: appending a step at its index, and the lock check that opens a step transaction.

use sqlx::SqliteExecutor;

use crate::Result;

/// A step to append: its index (the number of steps recorded before it), name and output
/// (JSON text).
#[derive(Debug, Clone, Copy)]
pub struct NewStep<'a> {
    pub scope: &'a str,
    pub key: &'a str,
    pub token: &'a str,
    pub index: i64,
    pub name: &'a str,
    pub output: &'a str,
    pub now: i64,
}

/// Append a step if the lease is held and exactly `index` steps are recorded. Rows changed.
/// `completed_at` is written as PostgreSQL's store writes it (RFC 3339, UTC).
pub async fn record_step<'e>(executor: impl SqliteExecutor<'e>, s: NewStep<'_>) -> Result<u64> {
    let done = sqlx::query!(
        r#"
        update checkpoints
        set steps = json_insert(steps, '$[#]', json_object(
                'name', ?5, 'output', json(?6),
                'completed_at', strftime('%Y-%m-%dT%H:%M:%fZ', ?7 / 1000.0, 'unixepoch'))),
            updated_at = ?7
        where scope = ?1 and idempotency_key = ?2 and lease_owner = ?3
          and status = 'in_progress' and json_array_length(steps) = ?4
        "#,
        s.scope,
        s.key,
        s.token,
        s.index,
        s.name,
        s.output,
        s.now,
    )
    .execute(executor)
    .await?;
    Ok(done.rows_affected())
}

/// Whether `token` holds the lease and step `index` is next (inside a step transaction,
/// which already holds SQLite's write lock).
pub async fn step_is_next<'e>(
    executor: impl SqliteExecutor<'e>,
    scope: &str,
    key: &str,
    token: &str,
    index: i64,
) -> Result<bool> {
    let held = sqlx::query_scalar!(
        r#"
        select 1 as "held!: i64"
        from checkpoints
        where scope = ?1 and idempotency_key = ?2 and lease_owner = ?3
          and status = 'in_progress' and json_array_length(steps) = ?4
        "#,
        scope,
        key,
        token,
        index,
    )
    .fetch_optional(executor)
    .await?;
    Ok(held.is_some())
}
