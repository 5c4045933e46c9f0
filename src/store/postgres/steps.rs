//! Steps in PostgreSQL: appending a step at its index, and the step transaction that
//! lets a handler's writes commit together with the step's record ([`crate::Job::step_tx`]).

use async_trait::async_trait;
use serde_json::Value;
use sqlx::{PgConnection, Postgres, Transaction};

use super::PostgresStore;
use crate::store::{Lease, Steps, StoreError};

#[async_trait]
impl Steps for PostgresStore {
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
