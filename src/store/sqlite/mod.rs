//! [`SqliteStore`]: the checkpoint store in one SQLite file, for the workers of one host,
//! demos and handler tests. Same contract and tables as [`PostgresStore`](super::PostgresStore);
//! its statements live in the `sqs-worker-sqlite-sql` crate (sqlx checks one crate's queries
//! against one database), one file per concern here as there.
//!
//! # Several processes, one file
//!
//! The file is opened in WAL mode (readers never block the writer) with a busy timeout, so
//! the workers of a host queue for SQLite's one write lock instead of failing with
//! `database is locked`. Every write that reads first runs in a `BEGIN IMMEDIATE`
//! transaction, which takes the write lock at its start: a deferred transaction that reads
//! and then writes can fail at once when another process wrote in between, whatever the
//! busy timeout.
//!
//! # Durability
//!
//! `synchronous = FULL`: a commit is on disk before it returns, so a power loss costs no
//! committed write — not a dead letter whose message was already deleted, not a step's
//! record. A process crash costs at most the run in progress (its lease ends, another claim
//! takes over, a step transaction rolls back whole).
//!
//! # Time
//!
//! Leases are compared in integer milliseconds of this host's clock, bound by the caller:
//! every process sharing the file shares the clock.

use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::SqlitePool;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};

// Every statement is bound with `now` in epoch milliseconds (see "Time").
pub(super) use super::epoch::{millis, now_ms, time};
use super::{CheckpointStore, StoreError, StoreKind};

mod claims;
mod dead_letters;
mod operator_log;
mod retention;
mod steps;

/// How long a statement waits for another process's write to finish before failing.
const BUSY_TIMEOUT: Duration = Duration::from_secs(30);

/// The embedded migrations in `migrations/sqlite`.
pub static SQLITE_MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("migrations/sqlite");

/// The checkpoint tables in a SQLite file (or in memory, for one process).
#[derive(Debug, Clone)]
pub struct SqliteStore {
    pool: SqlitePool,
    /// The database file, for the migration lock; None in memory.
    path: Option<PathBuf>,
}

impl SqliteStore {
    /// Open `url` — `sqlite://PATH` (created if missing) or `sqlite::memory:` — with a pool
    /// of at most `max_connections`. In memory the store is one connection, kept open for
    /// the life of the pool: the database lives exactly as long as it.
    pub async fn connect(url: &str, max_connections: u32) -> Result<Self, StoreError> {
        let options = SqliteConnectOptions::from_str(url)?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(BUSY_TIMEOUT);
        let path = database_file(&options);
        let pool = if path.is_none() {
            SqlitePoolOptions::new()
                .max_connections(1)
                .min_connections(1)
                .idle_timeout(None)
                .max_lifetime(None)
                .connect_with(options)
                .await?
        } else {
            pool_options(max_connections).connect_with(options).await?
        };
        Ok(Self { pool, path })
    }

    /// A store on `pool` whose database is migrated with [`SQLITE_MIGRATOR`], as workers
    /// take one.
    pub fn shared(pool: SqlitePool) -> Arc<dyn CheckpointStore> {
        let path = database_file(pool.connect_options().as_ref());
        Arc::new(Self { pool, path })
    }

    /// The pool, for handlers that read what their steps wrote.
    pub fn pool(&self) -> &SqlitePool {
        &self.pool
    }

    /// The database file, or None in memory.
    pub fn path(&self) -> Option<&std::path::Path> {
        self.path.as_deref()
    }
}

fn pool_options(max_connections: u32) -> SqlitePoolOptions {
    SqlitePoolOptions::new()
        .max_connections(max_connections.max(1))
        .acquire_timeout(Duration::from_secs(10) + BUSY_TIMEOUT)
}

/// The database's file, or None for one that lives in memory (`sqlite::memory:`, which sqlx
/// names `file:sqlx-in-memory-N`, or a URL with `mode=memory`).
fn database_file(options: &SqliteConnectOptions) -> Option<PathBuf> {
    let name = options.get_filename().to_string_lossy();
    let in_memory = name.starts_with("file:") || name == ":memory:" || name.contains("mode=memory");
    (!in_memory).then(|| options.get_filename().to_path_buf())
}

#[async_trait]
impl CheckpointStore for SqliteStore {
    fn kind(&self) -> StoreKind {
        StoreKind::Sqlite
    }

    async fn ping(&self) -> Result<(), StoreError> {
        sqs_worker_sqlite_sql::retention::ping(&self.pool).await?;
        Ok(())
    }

    /// In memory the store has one connection: the handle is this store. A file gets a pool
    /// of its own on the same options.
    fn own_connections(&self, connections: u32) -> Arc<dyn CheckpointStore> {
        if self.path.is_none() {
            return Arc::new(self.clone());
        }
        let options = self.pool.connect_options().as_ref().clone();
        Arc::new(Self {
            pool: pool_options(connections).connect_lazy_with(options),
            path: self.path.clone(),
        })
    }

    /// Several processes may start on one file at once, and sqlx's SQLite migrator takes no
    /// lock (two would both create the tables): an advisory lock on `PATH.migrate-lock`
    /// makes them take turns.
    async fn migrate(&self) -> Result<(), StoreError> {
        let _lock = match &self.path {
            Some(path) => {
                let mut lock = path.clone().into_os_string();
                lock.push(".migrate-lock");
                Some(lock_file(lock.into()).await?)
            }
            None => None,
        };
        SQLITE_MIGRATOR.run(&self.pool).await?;
        Ok(())
    }

    fn sqlite(&self) -> Option<&SqliteStore> {
        Some(self)
    }
}

/// Take an exclusive advisory lock on `path` (created if missing), waiting for it; released
/// when the file is dropped.
async fn lock_file(path: PathBuf) -> Result<std::fs::File, StoreError> {
    let locked = tokio::task::spawn_blocking(move || {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)?;
        file.lock()?;
        Ok::<_, std::io::Error>(file)
    })
    .await
    .map_err(|e| StoreError::Config(format!("migration lock task failed: {e}")))?;
    Ok(locked.map_err(sqlx::Error::Io)?)
}
