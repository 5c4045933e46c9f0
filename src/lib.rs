//! sqs-worker: an SQS consumer with exactly-once effects per event.
//!
//! SQS delivers at least once. Each event is claimed in a checkpoint store (PostgreSQL for a
//! fleet, a SQLite file for one host) under
//! an idempotency key taken from the payload; complete events are skipped, unfinished ones are
//! taken over when their lease expires, and two deliveries racing on two workers run once.
//!
//! Codemap:
//! - [`worker`]: the poll loop ([`Worker`], [`WorkerConfig`], [`RunSummary`]).
//! - [`store`]: the checkpoint store's contract ([`CheckpointStore`], [`Lease`]), opened by
//!   URL ([`store::open`]): [`PostgresStore`] and [`SqliteStore`], the only SQL.
//! - [`sqs`]: the only code that talks to SQS.
//! - [`message`]: pure parsing — keys, redrive markers, the producer's trace context.
//! - [`handler`]: the [`Handler`] trait, [`Job`], [`HandlerError`].
//! - [`handlers`]: built-in handlers (exec, http, noop).
//! - [`lambda`]: the Lambda adapter ([`LambdaWorker`]) over the worker's core.
//! - [`redrive`]: operator tooling as library calls — redrive a DLQ with markers, peek at it.
//! - [`spans`]: the spans of a delivery (OpenTelemetry's messaging conventions) and the
//!   trace context it passes on; off, at the cost of an atomic load, until exported.
//! - [`telemetry`]: logs, metrics, `/readyz` over what the worker reports, and the export of
//!   the spans (OTLP, from the standard `OTEL_*` environment).
//! - [`startup`]: start-up retries and what a failure at start means.
//!
//! Dependencies run one way: `message`, `sqs`, `store` → `spans` → `handler` → `worker` →
//! `lambda`, `redrive` → `telemetry`. The binary's options, subcommands and demo (`src/cli/`) are not
//! part of the library.
//!
//! A handler in Rust, run by a worker:
//!
//! ```no_run
//! use std::sync::Arc;
//! use sqs_worker::{Handler, HandlerError, Job, Worker, WorkerConfig};
//! use sqs_worker::message::KeySpec;
//!
//! struct ChargeOrder;
//!
//! #[async_trait::async_trait]
//! impl Handler for ChargeOrder {
//!     async fn handle(&self, job: &mut Job) -> Result<(), HandlerError> {
//!         let order = job.json().ok_or_else(|| HandlerError::permanent("not JSON"))?;
//!         // Runs at least once per event: pass job.key() on as an idempotency key.
//!         println!("charging {} (attempt {})", order["order_id"], job.attempt());
//!         Ok(())
//!     }
//! }
//!
//! # async fn example() -> anyhow::Result<()> {
//! // Or "sqlite:///var/lib/app/checkpoints.sqlite" for the workers of one host.
//! let store = sqs_worker::store::open("postgres://localhost/app", 8).await?;
//! store.migrate().await?;
//! let mut config = WorkerConfig::new("https://sqs.eu-west-1.amazonaws.com/123/orders");
//! config.key = KeySpec::new(vec!["/order_id".into()]).map_err(anyhow::Error::msg)?;
//! let client = sqs_worker::sqs::client_from_env().await;
//! let summary = Worker::new(config, client, store, Arc::new(ChargeOrder))
//!     .run()
//!     .await?;
//! println!("{summary:?}");
//! # Ok(())
//! # }
//! ```
#![warn(missing_docs)]

pub mod console;
pub mod handler;
pub mod handlers;
pub mod lambda;
pub mod message;
pub mod redrive;
pub mod spans;
pub mod sqs;
pub mod startup;
pub mod store;
pub mod telemetry;
pub mod worker;

pub use handler::{Handler, HandlerError, Job};
pub use lambda::LambdaWorker;
pub use store::{CheckpointStore, Lease, StoreKind, postgres::PostgresStore, sqlite::SqliteStore};
pub use worker::{RunSummary, Worker, WorkerConfig};

pub use store::postgres::{MIGRATOR, connect_database};
pub use store::sqlite::SQLITE_MIGRATOR;
