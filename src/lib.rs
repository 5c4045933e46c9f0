//! sqs-worker: an SQS consumer with exactly-once effects per event.
//!
//! SQS delivers at least once. Each event is claimed in a PostgreSQL checkpoint row keyed by
//! an idempotency key taken from the payload; complete events are skipped, unfinished ones are
//! taken over when their lease expires, and two deliveries racing on two workers run once.
//!
//! Codemap:
//! - [`worker`]: the poll loop ([`Worker`], [`WorkerConfig`], [`RunSummary`]).
//! - [`checkpoint`]: the checkpoint store, the only SQL ([`CheckpointStore`]).
//! - [`sqs`]: the only code that talks to SQS.
//! - [`message`]: pure parsing — keys, redrive markers.
//! - [`handler`]: the [`Handler`] trait, [`Job`], [`HandlerError`].
//! - [`handlers`]: built-in handlers (exec, noop).
//! - [`config`], [`cli`], [`demo`], [`telemetry`]: the binary's glue.
#![warn(missing_docs)]

pub mod checkpoint;
pub mod cli;
pub mod config;
pub mod demo;
pub mod handler;
pub mod handlers;
pub mod message;
pub mod sqs;
pub mod telemetry;
pub mod worker;

pub use checkpoint::CheckpointStore;
pub use handler::{Handler, HandlerError, Job};
pub use worker::{RunSummary, Worker, WorkerConfig};

/// The embedded migrations in `migrations/`; `sqs-worker migrate` and tests apply them.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!();

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
