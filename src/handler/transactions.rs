//! Steps in the checkpoint store's own transaction: [`Job::step_tx`] (PostgreSQL),
//! [`Job::step_tx_sqlite`] (SQLite) and [`Job::step_tx_dynamodb`] (DynamoDB's
//! `TransactWriteItems`). The handler's writes and the step's record commit
//! together or not at all, so writes to the checkpoint database happen once per event.

use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;
use sqlx::{Database, Postgres, Sqlite, Transaction};

use aws_sdk_dynamodb::types::TransactWriteItem;

use crate::spans;
use crate::store::dynamodb::StepCommit;
use crate::store::{CheckpointStore, Lease, PostgresStore, SqliteStore, StoreError, StoreKind};

use super::error::{HandlerError, StepFuture};
use super::job::Job;
use super::steps::{STEP_TX_UNSUPPORTED, record_failed, step_output_json};

/// A store whose transactions a step can write in.
trait StepTransactions {
    type Db: Database;
    const KIND: StoreKind;

    /// The store of this kind behind `store`, if it is one.
    fn of(store: &dyn CheckpointStore) -> Option<&Self>;

    /// Begin the step's transaction if `lease` holds and step `index` is next.
    async fn begin(
        &self,
        lease: &Lease,
        index: usize,
    ) -> Result<Option<Transaction<'static, Self::Db>>, StoreError>;

    /// Record the step inside the transaction.
    async fn record(
        transaction: &mut Transaction<'_, Self::Db>,
        lease: &Lease,
        index: usize,
        name: &str,
        output: &Value,
    ) -> Result<bool, StoreError>;
}

impl StepTransactions for PostgresStore {
    type Db = Postgres;
    const KIND: StoreKind = StoreKind::Postgres;

    fn of(store: &dyn CheckpointStore) -> Option<&Self> {
        store.postgres()
    }

    async fn begin(
        &self,
        lease: &Lease,
        index: usize,
    ) -> Result<Option<Transaction<'static, Postgres>>, StoreError> {
        self.begin_step(lease, index).await
    }

    async fn record(
        transaction: &mut Transaction<'_, Postgres>,
        lease: &Lease,
        index: usize,
        name: &str,
        output: &Value,
    ) -> Result<bool, StoreError> {
        PostgresStore::record_step_in(transaction, lease, index, name, output).await
    }
}

impl StepTransactions for SqliteStore {
    type Db = Sqlite;
    const KIND: StoreKind = StoreKind::Sqlite;

    fn of(store: &dyn CheckpointStore) -> Option<&Self> {
        store.sqlite()
    }

    async fn begin(
        &self,
        lease: &Lease,
        index: usize,
    ) -> Result<Option<Transaction<'static, Sqlite>>, StoreError> {
        self.begin_step(lease, index).await
    }

    async fn record(
        transaction: &mut Transaction<'_, Sqlite>,
        lease: &Lease,
        index: usize,
        name: &str,
        output: &Value,
    ) -> Result<bool, StoreError> {
        SqliteStore::record_step_in(transaction, lease, index, name, output).await
    }
}

/// Step transactions: writes in the checkpoint database, exactly once per event.
impl Job {
    /// Run a named step inside the checkpoint's own PostgreSQL transaction.
    ///
    /// `run` gets the transaction that also records the step: its writes and the step
    /// record commit together or not at all, so writes to this database happen exactly once
    /// per event. An error from `run` rolls everything back. The checkpoint row stays locked
    /// until the transaction ends, so keep the step short. An output PostgreSQL cannot store
    /// (NUL in a string) is a permanent [`UNSTORABLE_STEP_OUTPUT`](super::UNSTORABLE_STEP_OUTPUT)
    /// and rolls back.
    ///
    /// The handler declares it: [`Handler::step_transactions`](crate::Handler::step_transactions)
    /// answers `Some(StoreKind::Postgres)`, and a worker on another store refuses to start.
    /// Undeclared, the step fails before `run` with the permanent reason
    /// [`STEP_TX_UNSUPPORTED`].
    ///
    /// The closure returns a boxed future ([`StepFuture`]) because it borrows the
    /// transaction; it may also borrow from the handler (`&self`, local variables).
    ///
    /// ```no_run
    /// # async fn example(job: &mut sqs_worker::Job) -> Result<(), sqs_worker::HandlerError> {
    /// let document_id = job.key().to_owned();
    /// let document_id = &document_id; // borrowed by the step's future
    /// let rows: u64 = job
    ///     .step_tx("store_rows", |tx| {
    ///         Box::pin(async move {
    ///             let done = sqlx::query("insert into documents (id) values ($1) on conflict do nothing")
    ///                 .bind(document_id)
    ///                 .execute(&mut **tx)
    ///                 .await?;
    ///             Ok(done.rows_affected())
    ///         })
    ///     })
    ///     .await?;
    /// # Ok(())
    /// # }
    /// ```
    // `'a` bounds what the closure's future may borrow: `&'t mut Transaction<'a, _>` implies
    // `'a: 't`, so a future living for `'t` may hold `&'a` references.
    pub async fn step_tx<'a, T, F>(&mut self, name: &str, run: F) -> Result<T, HandlerError>
    where
        T: Serialize + DeserializeOwned,
        F: for<'t> FnOnce(&'t mut Transaction<'a, Postgres>) -> StepFuture<'t, T>,
    {
        self.step_in_transaction::<PostgresStore, T, F>(name, run)
            .await
    }

    /// Run a named step inside the checkpoint's own SQLite transaction: [`Job::step_tx`]
    /// for the SQLite store, declared with `Some(StoreKind::Sqlite)`.
    ///
    /// The transaction begins with `BEGIN IMMEDIATE`: it holds SQLite's write lock, so
    /// every other write to the file — other workers' claims included — waits until the
    /// step commits. Keep it shorter still than on PostgreSQL.
    pub async fn step_tx_sqlite<'a, T, F>(&mut self, name: &str, run: F) -> Result<T, HandlerError>
    where
        T: Serialize + DeserializeOwned,
        F: for<'t> FnOnce(&'t mut Transaction<'a, Sqlite>) -> StepFuture<'t, T>,
    {
        self.step_in_transaction::<SqliteStore, T, F>(name, run)
            .await
    }

    async fn step_in_transaction<'a, S, T, F>(
        &mut self,
        name: &str,
        run: F,
    ) -> Result<T, HandlerError>
    where
        S: StepTransactions,
        T: Serialize + DeserializeOwned,
        F: for<'t> FnOnce(&'t mut Transaction<'a, S::Db>) -> StepFuture<'t, T>,
    {
        if let Some(output) = self.replay(name)? {
            return Ok(output);
        }
        let store = self.store.clone();
        let store = match S::of(&*store) {
            Some(store) if self.transactions == Some(S::KIND) => store,
            _ => return Err(self.undeclared_transaction(name, S::KIND)),
        };
        if let Some(effect) = &self.unrecorded_effect {
            return Err(HandlerError::retryable(format!(
                "step {name:?} cannot run in the checkpoint's transaction: the earlier step \
                 {effect:?} could not be recorded in this attempt"
            )));
        }
        // The previous step's record first: the transaction opens only at the next index.
        self.write_pending_step().await?;
        let index = self.next_step;
        let transaction = store
            .begin(&self.lease, index)
            .await
            .map_err(|e| HandlerError::retryable(format!("could not start step {name:?}: {e}")))?;
        let Some(transaction) = transaction else {
            return Err(self.lose_lease(name));
        };
        let mut transaction: Transaction<'a, S::Db> = transaction;
        // On any error below the transaction is dropped, which rolls it back.
        let output = spans::in_step(name, index, run(&mut transaction)).await?;
        let value = step_output_json(name, &output)?;
        let recorded = S::record(&mut transaction, &self.lease, index, name, &value)
            .await
            .map_err(|e| HandlerError::retryable(format!("could not record step {name:?}: {e}")))?;
        if !recorded {
            return Err(self.lose_lease(name));
        }
        transaction
            .commit()
            .await
            .map_err(|e| HandlerError::retryable(format!("could not commit step {name:?}: {e}")))?;
        self.after_record(true, name, value)?;
        Ok(output)
    }

    /// A step transaction of `kind` that the handler did not declare, or on a store of
    /// another kind (only reachable when undeclared: a declared mismatch never starts).
    fn undeclared_transaction(&self, name: &str, kind: StoreKind) -> HandlerError {
        HandlerError::permanent_with_reason(
            STEP_TX_UNSUPPORTED,
            format!(
                "step {name:?} asks for a {kind} transaction, but the handler declares {} and \
                 the checkpoint store is {}; declare it with Handler::step_transactions \
                 (checked against the store at start)",
                match self.transactions {
                    Some(declared) => format!("{declared} transactions"),
                    None => "no step transactions".into(),
                },
                self.store.kind()
            ),
        )
    }
}

/// The DynamoDB form of a step transaction: the handler adds its own writes (put, update,
/// delete, condition check, on its own tables or this one) and they are written together
/// with the step's record in one `TransactWriteItems`, or not at all.
///
/// Its lifetime `'a` is what the step's future may borrow (the handler, earlier steps'
/// outputs), as with [`Job::step_tx`]'s transaction.
#[derive(Debug)]
pub struct DynamoTransaction<'a> {
    items: Vec<TransactWriteItem>,
    client: aws_sdk_dynamodb::Client,
    table: String,
    borrows: std::marker::PhantomData<&'a ()>,
}

impl DynamoTransaction<'_> {
    /// Add a write (at most [`MAX_STEP_ITEMS`](crate::store::dynamodb::MAX_STEP_ITEMS) per step).
    pub fn push(&mut self, item: TransactWriteItem) {
        self.items.push(item);
    }

    /// The checkpoint table's name: a handler may keep items of its own there, under
    /// partition keys that do not start with `C#`, `DL#` or `RD#` (the store's).
    pub fn table(&self) -> &str {
        &self.table
    }

    /// The store's client, for reads the step makes before deciding what to write (a read
    /// is not part of the transaction: guard what it saw with a condition check).
    pub fn client(&self) -> &aws_sdk_dynamodb::Client {
        &self.client
    }
}

impl Job {
    /// Run a named step whose writes to DynamoDB happen together with its record: the
    /// DynamoDB store's form of [`Job::step_tx`], declared with `Some(StoreKind::Dynamodb)`.
    ///
    /// `run` adds its writes to the [`DynamoTransaction`] and returns the step's output; the
    /// writes and the step's record then go in one `TransactWriteItems` (the record
    /// conditional on the lease and on the step being next), so they happen once per event.
    /// If one of the handler's own conditions fails, nothing is written and the step fails
    /// retryably (the next attempt reads again); more than [`MAX_STEP_ITEMS`](crate::store::dynamodb::MAX_STEP_ITEMS) writes is a
    /// permanent `unstorable_step_output`.
    pub async fn step_tx_dynamodb<'a, T, F>(
        &mut self,
        name: &str,
        run: F,
    ) -> Result<T, HandlerError>
    where
        T: Serialize + DeserializeOwned,
        F: for<'t> FnOnce(&'t mut DynamoTransaction<'a>) -> StepFuture<'t, T>,
    {
        if let Some(output) = self.replay(name)? {
            return Ok(output);
        }
        let store = self.store.clone();
        let store = match store.dynamodb() {
            Some(store) if self.transactions == Some(StoreKind::Dynamodb) => store,
            _ => return Err(self.undeclared_transaction(name, StoreKind::Dynamodb)),
        };
        if let Some(effect) = &self.unrecorded_effect {
            return Err(HandlerError::retryable(format!(
                "step {name:?} cannot run in a transaction with its record: the earlier step \
                 {effect:?} could not be recorded in this attempt"
            )));
        }
        self.write_pending_step().await?;
        let mut transaction = DynamoTransaction {
            items: Vec::new(),
            client: store.client().clone(),
            table: store.table().to_owned(),
            borrows: std::marker::PhantomData,
        };
        let output = spans::in_step(name, self.next_step, run(&mut transaction)).await?;
        let value = step_output_json(name, &output)?;
        let index = self.next_step;
        let commit = store
            .commit_step(&self.lease, index, name, &value, transaction.items)
            .await
            .map_err(|e| record_failed(name, e))?;
        match commit {
            StepCommit::Recorded => {
                self.after_record(true, name, value)?;
                Ok(output)
            }
            StepCommit::LeaseLost => Err(self.lose_lease(name)),
            StepCommit::ItemsRefused(items) => Err(HandlerError::retryable(format!(
                "step {name:?}: the condition of its own write(s) {items:?} failed, so nothing \
                 was written; the next attempt runs the step again"
            ))),
        }
    }
}
