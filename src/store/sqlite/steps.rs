//! Steps in SQLite: appending a step at its index, and the step transaction that lets a
//! handler's writes commit together with the step's record ([`crate::Job::step_tx_sqlite`]).

use std::collections::HashSet;

use async_trait::async_trait;
use serde_json::{Value, json};
use sqlx::{Sqlite, SqliteConnection, Transaction};
use sqs_worker_sqlite_sql::steps::{self as sql, NewStep};

use super::{SqliteStore, now_ms};
use crate::store::{Lease, StepRecord, Steps, StoreError, Written};

#[async_trait]
impl Steps for SqliteStore {
    /// One statement for every record (SQLite runs one writer at a time: one write instead
    /// of one per step is what group commit buys here).
    async fn record_steps(
        &self,
        scope: &str,
        records: &[StepRecord],
    ) -> Result<Vec<Written>, StoreError> {
        if records.is_empty() {
            return Ok(Vec::new());
        }
        let rows: Vec<Value> = records
            .iter()
            .map(|r| json!([r.key, r.token, r.step.index, r.step.name, r.step.output]))
            .collect();
        let rows = Value::Array(rows).to_string();
        let recorded: HashSet<String> = sql::record_steps(&self.pool, scope, &rows, now_ms())
            .await?
            .into_iter()
            .collect();
        Ok(records
            .iter()
            .map(|r| Written::done_if(recorded.contains(&r.key)))
            .collect())
    }
}

impl SqliteStore {
    /// [`Steps::record_step`] on a given connection, e.g. inside a step's transaction.
    pub async fn record_step_in(
        connection: &mut SqliteConnection,
        lease: &Lease,
        index: usize,
        name: &str,
        output: &Value,
    ) -> Result<bool, StoreError> {
        let output = output.to_string();
        let step = NewStep {
            scope: &lease.scope,
            key: &lease.key,
            token: &lease.token,
            index: index as i64,
            name,
            output: &output,
            now: now_ms(),
        };
        Ok(sql::record_step(&mut *connection, step).await? == 1)
    }

    /// Begin the transaction of a step that writes in this database, if `lease` is still
    /// held and step `index` is next; None when the lease is lost. `BEGIN IMMEDIATE` takes
    /// SQLite's write lock at once: no other write — a takeover included — happens on this
    /// file until the step commits or rolls back, so keep such steps short.
    pub async fn begin_step(
        &self,
        lease: &Lease,
        index: usize,
    ) -> Result<Option<Transaction<'static, Sqlite>>, StoreError> {
        let mut transaction = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        let next = sql::step_is_next(
            &mut *transaction,
            &lease.scope,
            &lease.key,
            &lease.token,
            index as i64,
        )
        .await?;
        Ok(next.then_some(transaction))
    }
}
