//! [`PostgresStore`]: the checkpoint store in PostgreSQL, for a fleet of workers.
//!
//! One row per event in `checkpoints`, keyed by `(scope, idempotency_key)`; `dead_letters`,
//! the `redrives` audit and the console's `operator_actions` beside it (see
//! `migrations/postgres`). One file per concern of the contract: `claims.rs`
//! ([`Claims`](super::Claims)), `steps.rs` ([`Steps`](super::Steps) and the step
//! transaction), `dead_letters.rs` ([`DeadLetters`](super::DeadLetters)), `retention.rs`
//! ([`Retention`](super::Retention)), `operator_log.rs` ([`OperatorLog`](super::OperatorLog)).
//!
//! Every write that follows a claim is *fenced* by the lease token (`where lease_owner =
//! $owner`): a worker that lost its lease can no longer change the row, so a slow worker and
//! the one that took over never both record an outcome. A receive batch is claimed in one
//! statement, because a round trip per message would make the database the bottleneck.
//! Queries are checked `query!` macros with bound parameters only; their offline data is in
//! `.sqlx/` (regenerate with `scripts/sqlx-prepare`).

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::PgPool;

use super::{CheckpointStore, StoreError, StoreKind};

mod claims;
mod dead_letters;
mod operator_log;
mod retention;
mod steps;

/// The checkpoint tables behind a connection pool.
#[derive(Debug, Clone)]
pub struct PostgresStore {
    pool: PgPool,
}

impl PostgresStore {
    /// Wrap a pool whose database has been migrated with [`MIGRATOR`].
    pub fn new(pool: PgPool) -> Self {
        Self { pool }
    }

    /// Connect to the database at `url` with a pool of at most `max_connections` (see
    /// [`connect_database`]). The database must be migrated with [`MIGRATOR`].
    pub async fn connect(url: &str, max_connections: u32) -> Result<Self, StoreError> {
        Ok(Self::new(connect_database(url, max_connections).await?))
    }

    /// A store on `pool`, as workers take one (`Arc<dyn CheckpointStore>`).
    pub fn shared(pool: PgPool) -> Arc<dyn CheckpointStore> {
        Arc::new(Self::new(pool))
    }

    /// The pool, for handlers that write in the same database.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }
}

#[async_trait]
impl CheckpointStore for PostgresStore {
    fn kind(&self) -> StoreKind {
        StoreKind::Postgres
    }

    /// sqlx's PostgreSQL migrator takes an advisory lock: several workers starting at once
    /// take turns.
    async fn migrate(&self) -> Result<(), StoreError> {
        MIGRATOR.run(&self.pool).await?;
        Ok(())
    }

    async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query!("select 1 as one")
            .fetch_one(&self.pool)
            .await?;
        Ok(())
    }

    /// A pool of its own on the same database: same connect options, at most `connections`
    /// (at least 1), opened on demand.
    fn own_connections(&self, connections: u32) -> Arc<dyn CheckpointStore> {
        let options = self.pool.connect_options().as_ref().clone();
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(connections.max(1))
            .acquire_timeout(Duration::from_secs(10))
            .connect_lazy_with(options);
        Arc::new(Self { pool })
    }

    fn postgres(&self) -> Option<&PostgresStore> {
        Some(self)
    }
}

/// The embedded migrations in `migrations/postgres`; `sqs-worker migrate` and tests apply them.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("migrations/postgres");

/// Connect to the checkpoint database.
pub async fn connect_database(
    url: &str,
    max_connections: u32,
) -> Result<sqlx::PgPool, sqlx::Error> {
    sqlx::postgres::PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(std::time::Duration::from_secs(10))
        .connect(url)
        .await
}
