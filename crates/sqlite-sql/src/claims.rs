//! Claims and leases: the batch claim, completion, release, renewals, the start of a
//! waiting event's run, marking a claimed event failed.

use sqlx::SqliteExecutor;

use crate::Result;

/// One key's row after the claim statement: the row as the claim left it. A row this claim
/// did not take is returned unchanged, so it tells what holds the event.
#[derive(Debug)]
pub struct ClaimedRow {
    pub key: String,
    pub status: String,
    pub lease_owner: Option<String>,
    pub lease_expires_at: Option<i64>,
    pub run_deadline_at: Option<i64>,
    pub attempts: i64,
    pub steps: String,
    pub payload_sha256: String,
    pub created_at: i64,
}

/// The terms of one claim statement.
#[derive(Debug, Clone, Copy)]
pub struct ClaimParams<'a> {
    pub scope: &'a str,
    pub token: &'a str,
    pub now: i64,
    pub lease_ms: i64,
    pub run_limit_ms: i64,
    pub accept_mismatch: bool,
    /// The deliveries as a JSON array of objects: `key`, `sha` (payload fingerprint), `id`
    /// (message id), `fields` (digests or null), `generation` and `redrives` (the key's
    /// latest pass), `reclaim` (whether some delivery of the key may claim a failed row).
    pub deliveries: &'a str,
}

/// Claim a receive batch in one statement.
///
/// The inner select picks one delivery per key — the first carrying the stored payload —
/// and judges, against the row as it is, whether this claim may take it: new, in progress
/// with an expired, released or own lease, or failed and reclaimed by a later pass. The
/// judgement travels as the inserted `lease_owner` (the token, or null), so the upsert's
/// update changes only the rows judged claimable and rewrites the others as they are: every
/// key's row comes back, the untaken ones showing who holds them. SQLite runs one writer at
/// a time, so the row judged is the row updated.
pub async fn claim_batch<'e>(
    executor: impl SqliteExecutor<'e>,
    p: ClaimParams<'_>,
) -> Result<Vec<ClaimedRow>> {
    sqlx::query_as!(
        ClaimedRow,
        r#"
        insert into checkpoints
            (scope, idempotency_key, status, lease_owner, lease_expires_at, run_deadline_at,
             attempts, payload_sha256, first_message_id, last_message_id, payload_fields,
             requeue_generation, redrive_count, created_at, updated_at)
        select ?1, key, 'in_progress', iif(claimable, ?2, null), ?3 + ?4, ?3 + ?5, 1,
               sha, message_id, message_id, fields, generation, redrives, ?3, ?3
        from (
            select d.value ->> 'key' as key, d.value ->> 'sha' as sha,
                   d.value ->> 'id' as message_id, d.value ->> 'fields' as fields,
                   d.value ->> 'generation' as generation, d.value ->> 'redrives' as redrives,
                   row_number() over (
                       partition by d.value ->> 'key'
                       order by (d.value ->> 'sha') is not coalesce(e.payload_sha256,
                                                                    d.value ->> 'sha'),
                                d.key
                   ) as choice,
                   (e.idempotency_key is null
                    or ((?6 or e.payload_sha256 = d.value ->> 'sha')
                        and ((e.status = 'in_progress'
                              and (e.lease_expires_at is null or e.lease_expires_at <= ?3
                                   or e.lease_owner = ?2))
                             or (e.status = 'failed' and d.value ->> 'reclaim'
                                 and (e.requeue_generation, e.redrive_count)
                                     < (d.value ->> 'generation', d.value ->> 'redrives')))))
                       as claimable
            from json_each(?7) as d
            left join checkpoints e
                   on e.scope = ?1 and e.idempotency_key = d.value ->> 'key'
        )
        where choice = 1
        order by key
        on conflict (scope, idempotency_key) do update
        set status = iif(excluded.lease_owner is null, status, 'in_progress'),
            lease_owner = coalesce(excluded.lease_owner, lease_owner),
            lease_expires_at = iif(excluded.lease_owner is null, lease_expires_at,
                                   excluded.lease_expires_at),
            run_deadline_at = iif(excluded.lease_owner is null, run_deadline_at,
                                  excluded.run_deadline_at),
            attempts = iif(excluded.lease_owner is null or lease_owner = excluded.lease_owner,
                           attempts, attempts + 1),
            last_message_id = iif(excluded.lease_owner is null, last_message_id,
                                  excluded.last_message_id),
            requeue_generation = iif(
                excluded.lease_owner is not null
                and (excluded.requeue_generation, excluded.redrive_count)
                    > (requeue_generation, redrive_count),
                excluded.requeue_generation, requeue_generation),
            redrive_count = iif(
                excluded.lease_owner is not null
                and (excluded.requeue_generation, excluded.redrive_count)
                    > (requeue_generation, redrive_count),
                excluded.redrive_count, redrive_count),
            updated_at = iif(excluded.lease_owner is null, updated_at, excluded.updated_at)
        returning idempotency_key as "key!: String", status as "status!: String",
                  lease_owner as "lease_owner?: String",
                  lease_expires_at as "lease_expires_at?: i64",
                  run_deadline_at as "run_deadline_at?: i64", attempts as "attempts!: i64",
                  steps as "steps!: String", payload_sha256 as "payload_sha256!: String",
                  created_at as "created_at!: i64"
        "#,
        p.scope,
        p.token,
        p.now,
        p.lease_ms,
        p.run_limit_ms,
        p.accept_mismatch,
        p.deliveries,
    )
    .fetch_all(executor)
    .await
}

/// One completed event: key and lease token.
#[derive(Debug)]
pub struct CompletedRow {
    pub key: String,
    pub lease_owner: String,
}

/// Complete the events of `entries` — a JSON array of `[key, token, step]`, where `step` is
/// `null` or `{"index", "name", "output"}` (the event's last step, appended by the same
/// write) — whose lease the token holds and, with a step, whose next step it is. A row
/// already complete under the same token comes back too (a retry), rewritten as it is.
///
/// The rows are found through `(key, token) in (…)`, which SQLite answers from the primary
/// key; each row's step is then looked up among the entries. (`update … from json_each`
/// made the planner scan every row of the scope once per entry.)
pub async fn complete_events<'e>(
    executor: impl SqliteExecutor<'e>,
    scope: &str,
    entries: &str,
    now: i64,
) -> Result<Vec<CompletedRow>> {
    sqlx::query_as!(
        CompletedRow,
        r#"
        with entry as (
            select value ->> 0 as key, value -> 2 as step from json_each(?2)
        )
        update checkpoints
        set steps = iif(status = 'in_progress',
                        coalesce((select json_insert(steps, '$[#]', json_object(
                                      'name', step ->> 'name',
                                      'output', json(step -> 'output'),
                                      'completed_at',
                                      strftime('%Y-%m-%dT%H:%M:%fZ', ?3 / 1000.0, 'unixepoch')))
                                  from entry
                                  where entry.key = checkpoints.idempotency_key
                                    and step ->> 'index' is not null),
                                 steps),
                        steps),
            completed_at = iif(status = 'complete', completed_at, ?3),
            updated_at = iif(status = 'complete', updated_at, ?3),
            status = 'complete', lease_expires_at = null, run_deadline_at = null
        where scope = ?1 and status in ('in_progress', 'complete')
          and (idempotency_key, lease_owner) in
              (select value ->> 0, value ->> 1 from json_each(?2))
          and (status = 'complete'
               or coalesce((select json_array_length(checkpoints.steps) = step ->> 'index'
                            from entry
                            where entry.key = checkpoints.idempotency_key
                              and step ->> 'index' is not null),
                           true))
        returning idempotency_key as "key!: String", lease_owner as "lease_owner!: String"
        "#,
        scope,
        entries,
        now,
    )
    .fetch_all(executor)
    .await
}

/// Give a lease back after a retryable failure. Rows changed (0 or 1).
pub async fn release<'e>(
    executor: impl SqliteExecutor<'e>,
    scope: &str,
    key: &str,
    token: &str,
    error: &str,
    now: i64,
) -> Result<u64> {
    let done = sqlx::query!(
        r#"
        update checkpoints
        set lease_owner = null, lease_expires_at = null, run_deadline_at = null,
            last_error = ?4, updated_at = ?5
        where scope = ?1 and idempotency_key = ?2 and lease_owner = ?3
          and status = 'in_progress'
        "#,
        scope,
        key,
        token,
        error,
        now,
    )
    .execute(executor)
    .await?;
    Ok(done.rows_affected())
}

/// Give back a claim whose handler never started, and the attempt it counted.
pub async fn release_unstarted<'e>(
    executor: impl SqliteExecutor<'e>,
    scope: &str,
    key: &str,
    token: &str,
    now: i64,
) -> Result<u64> {
    let done = sqlx::query!(
        r#"
        update checkpoints
        set lease_owner = null, lease_expires_at = null, run_deadline_at = null,
            attempts = max(attempts - 1, 0), updated_at = ?4
        where scope = ?1 and idempotency_key = ?2 and lease_owner = ?3
          and status = 'in_progress'
        "#,
        scope,
        key,
        token,
        now,
    )
    .execute(executor)
    .await?;
    Ok(done.rows_affected())
}

/// Move a held lease's end to `expires_at` and, when given, its run deadline.
pub async fn renew<'e>(
    executor: impl SqliteExecutor<'e>,
    scope: &str,
    key: &str,
    token: &str,
    expires_at: i64,
    run_deadline_at: Option<i64>,
    now: i64,
) -> Result<u64> {
    let done = sqlx::query!(
        r#"
        update checkpoints
        set lease_expires_at = ?4, run_deadline_at = coalesce(?5, run_deadline_at),
            updated_at = ?6
        where scope = ?1 and idempotency_key = ?2 and lease_owner = ?3
          and status = 'in_progress'
        "#,
        scope,
        key,
        token,
        expires_at,
        run_deadline_at,
        now,
    )
    .execute(executor)
    .await?;
    Ok(done.rows_affected())
}

/// Renew the leases `token` holds on `keys` (a JSON array); returns the keys still held.
pub async fn renew_many<'e>(
    executor: impl SqliteExecutor<'e>,
    scope: &str,
    token: &str,
    keys: &str,
    expires_at: i64,
    now: i64,
) -> Result<Vec<String>> {
    sqlx::query_scalar!(
        r#"
        update checkpoints
        set lease_expires_at = ?4, updated_at = ?5
        where scope = ?1 and lease_owner = ?2 and status = 'in_progress'
          and idempotency_key in (select value from json_each(?3))
        returning idempotency_key as "key!: String"
        "#,
        scope,
        token,
        keys,
        expires_at,
        now,
    )
    .fetch_all(executor)
    .await
}

/// Mark a claimed event failed (it went to the DLQ).
pub async fn mark_failed<'e>(
    executor: impl SqliteExecutor<'e>,
    scope: &str,
    key: &str,
    token: &str,
    error: &str,
    now: i64,
) -> Result<u64> {
    let done = sqlx::query!(
        r#"
        update checkpoints
        set status = 'failed', lease_owner = null, lease_expires_at = null,
            run_deadline_at = null, last_error = ?4, updated_at = ?5
        where scope = ?1 and idempotency_key = ?2 and lease_owner = ?3
          and status = 'in_progress'
        "#,
        scope,
        key,
        token,
        error,
        now,
    )
    .execute(executor)
    .await?;
    Ok(done.rows_affected())
}
