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

/// Append the steps of `records` — a JSON array of `[key, token, index, name, output]` —
/// each where its token holds the event's lease and exactly `index` steps are recorded, in
/// one statement. Returns the keys whose step was appended. The rows are found through
/// `(key, token, steps recorded) in (…)`, from the primary key (see `complete_events`);
/// the unary `+` keeps the planner off the status index, whose in-progress rows it would
/// otherwise read one by one.
pub async fn record_steps<'e>(
    executor: impl SqliteExecutor<'e>,
    scope: &str,
    records: &str,
    now: i64,
) -> Result<Vec<String>> {
    sqlx::query_scalar!(
        r#"
        update checkpoints
        set steps = json_insert(steps, '$[#]', (
                select json_object(
                    'name', r.value ->> 3, 'output', json(r.value -> 4),
                    'completed_at', strftime('%Y-%m-%dT%H:%M:%fZ', ?3 / 1000.0, 'unixepoch'))
                from json_each(?2) as r
                where r.value ->> 0 = checkpoints.idempotency_key)),
            updated_at = ?3
        where scope = ?1 and +status = 'in_progress'
          and (idempotency_key, lease_owner, json_array_length(steps)) in
              (select value ->> 0, value ->> 1, value ->> 2 from json_each(?2))
        returning idempotency_key as "key!: String"
        "#,
        scope,
        records,
        now,
    )
    .fetch_all(executor)
    .await
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
