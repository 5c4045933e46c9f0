//! Steps in PostgreSQL: appending a step at its index, and the step transaction that
//! lets a handler's writes commit together with the step's record ([`crate::Job::step_tx`]).

use std::collections::HashSet;

use async_trait::async_trait;
use serde_json::Value;
use sqlx::{PgConnection, Postgres, Transaction};

use super::PostgresStore;
use crate::store::{Completion, Lease, NewStep, StepRecord, Steps, StoreError, Written};

/// The steps of a statement, one array per column (`unnest` makes rows of them). An event
/// completing without a step has index -1 and empty texts: a bound array cannot be checked
/// for nulls by the query macros.
pub(super) struct StepColumns {
    pub(super) keys: Vec<String>,
    pub(super) tokens: Vec<String>,
    pub(super) indexes: Vec<i32>,
    pub(super) names: Vec<String>,
    /// JSON text, cast to `jsonb` in the statement.
    pub(super) outputs: Vec<String>,
}

impl StepColumns {
    fn with_capacity(n: usize) -> Self {
        Self {
            keys: Vec::with_capacity(n),
            tokens: Vec::with_capacity(n),
            indexes: Vec::with_capacity(n),
            names: Vec::with_capacity(n),
            outputs: Vec::with_capacity(n),
        }
    }

    fn push(&mut self, key: &str, token: &str, step: Option<&NewStep>) {
        self.keys.push(key.to_owned());
        self.tokens.push(token.to_owned());
        match step {
            Some(step) => {
                self.indexes.push(step.index.min(i32::MAX as usize) as i32);
                self.names.push(step.name.clone());
                self.outputs.push(step.output.to_string());
            }
            None => {
                self.indexes.push(-1);
                self.names.push(String::new());
                self.outputs.push(String::new());
            }
        }
    }

    /// The records in key order: the statement locks rows in the order of its arrays.
    pub(super) fn of_records(records: &[StepRecord]) -> Self {
        let mut sorted: Vec<&StepRecord> = records.iter().collect();
        sorted.sort_by(|a, b| a.key.cmp(&b.key));
        let mut columns = Self::with_capacity(records.len());
        for r in sorted {
            columns.push(&r.key, &r.token, Some(&r.step));
        }
        columns
    }

    /// The completions in key order (see `of_records`).
    pub(super) fn of_completions(events: &[Completion]) -> Self {
        let mut sorted: Vec<&Completion> = events.iter().collect();
        sorted.sort_by(|a, b| a.key.cmp(&b.key));
        let mut columns = Self::with_capacity(events.len());
        for e in sorted {
            columns.push(&e.key, &e.token, e.last_step.as_ref());
        }
        columns
    }
}

#[async_trait]
impl Steps for PostgresStore {
    /// One statement for every record: rows looked up one key at a time and locked in key
    /// order (as claims and completions lock them; see `complete_events`), each appended
    /// only under its token and at its index.
    async fn record_steps(
        &self,
        scope: &str,
        records: &[StepRecord],
    ) -> Result<Vec<Written>, StoreError> {
        if records.is_empty() {
            return Ok(Vec::new());
        }
        let columns = StepColumns::of_records(records);
        let recorded = sqlx::query_scalar!(
            r#"
            with ours as (
                select c.row_id, r.name, r.output
                from unnest($2::text[], $3::text[], $4::int4[], $5::text[], $6::text[])
                     as r(idempotency_key, lease_owner, step_index, name, output)
                cross join lateral (
                    select c.ctid as row_id
                    from checkpoints c
                    where c.scope = $1 and c.idempotency_key = r.idempotency_key
                      and c.lease_owner = r.lease_owner and c.status = 'in_progress'
                      and jsonb_array_length(c.steps) = r.step_index
                    for update
                ) c
            )
            update checkpoints as c
            set steps = c.steps || jsonb_build_array(jsonb_build_object(
                    'name', ours.name, 'output', ours.output::jsonb, 'completed_at', now())),
                updated_at = now()
            from ours
            where c.ctid = ours.row_id
            returning c.idempotency_key as "idempotency_key!"
            "#,
            scope,
            &columns.keys,
            &columns.tokens,
            &columns.indexes,
            &columns.names,
            &columns.outputs,
        )
        .fetch_all(&self.pool)
        .await?;
        let recorded: HashSet<String> = recorded.into_iter().collect();
        Ok(records
            .iter()
            .map(|r| Written::done_if(recorded.contains(&r.key)))
            .collect())
    }
}

impl PostgresStore {
    /// [`Steps::record_step`] on a given connection, e.g. inside a step's
    /// transaction. The length check makes a step impossible to record twice.
    pub async fn record_step_in(
        connection: &mut PgConnection,
        lease: &Lease,
        index: usize,
        name: &str,
        output: &Value,
    ) -> Result<bool, StoreError> {
        let result = sqlx::query!(
            r#"
            update checkpoints
            set steps = steps || jsonb_build_array(jsonb_build_object(
                    'name', $5::text, 'output', $6::jsonb, 'completed_at', now())),
                updated_at = now()
            where scope = $1 and idempotency_key = $2 and lease_owner = $3
              and status = 'in_progress' and jsonb_array_length(steps) = $4
            "#,
            &lease.scope,
            &lease.key,
            &lease.token,
            index as i32,
            name,
            output,
        )
        .execute(&mut *connection)
        .await?;
        Ok(result.rows_affected() == 1)
    }

    /// Begin the transaction of a step that writes in this database: lock the checkpoint row
    /// if `lease` is still held and step `index` is next. None when the lease is lost.
    /// Holding the row lock makes a takeover wait until the step commits or rolls back.
    pub async fn begin_step(
        &self,
        lease: &Lease,
        index: usize,
    ) -> Result<Option<Transaction<'static, Postgres>>, StoreError> {
        let mut transaction = self.pool.begin().await?;
        let held = sqlx::query_scalar!(
            r#"
            select true as "held!"
            from checkpoints
            where scope = $1 and idempotency_key = $2 and lease_owner = $3
              and status = 'in_progress' and jsonb_array_length(steps) = $4
            for update
            "#,
            &lease.scope,
            &lease.key,
            &lease.token,
            index as i32,
        )
        .fetch_optional(&mut *transaction)
        .await?;
        Ok(held.map(|_| transaction))
    }
}
