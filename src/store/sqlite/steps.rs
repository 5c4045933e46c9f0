//! Steps in SQLite: appending a step at its index, and the step transaction that lets a
//! handler's writes commit together with the step's record ([`crate::Job::step_tx_sqlite`]).

use async_trait::async_trait;
use serde_json::Value;
use sqlx::{Sqlite, SqliteConnection, Transaction};
use sqs_worker_sqlite_sql::steps::{self as sql, NewStep};

use super::{SqliteStore, now_ms};
use crate::store::{Lease, Steps, StoreError};

#[async_trait]
impl Steps for SqliteStore {
    async fn record_step(
        &self,
        lease: &Lease,
        index: usize,
        name: &str,
        output: &Value,
    ) -> Result<bool, StoreError> {
        let mut connection = self.pool.acquire().await?;
        Self::record_step_in(&mut connection, lease, index, name, output).await
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
