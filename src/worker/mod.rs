//! The poll loop: receive, claim, run, settle, delete — with bounded concurrency, backoff,
//! batched deletes and a graceful shutdown.
//!
//! Shape of a run: `pollers` tasks long-poll SQS (`poll.rs`), each first taking semaphore
//! permits so that at most `concurrency` messages are in flight (no unbounded buffering). A
//! receive batch is claimed in one store call and each delivery routed by its outcome
//! (`batch.rs`, with the pure choice in `claim.rs`); each claimed event runs in its own task
//! holding one permit (`run.rs`, under the `heartbeat.rs`; FIFO groups in `fifo.rs`) and is
//! settled by one function per outcome (`settle.rs`, `dlq.rs`). Outcomes that end in a delete
//! go through one *acker* task (`acker.rs`) that batches checkpoint completion and
//! DeleteMessageBatch. Shutdown (`shutdown.rs`): tell (cancel the long polls), then wait for
//! handlers under a deadline; a handler is never cancelled mid-step by a shutdown. The
//! service and Lambda share all of it (`core.rs`) and differ only in `settlement.rs`.
//!
//! Words, one per transition:
//! - *claim*: take an event's lease in the store; *renew*: extend it (with the messages'
//!   visibility, by the heartbeat); *release*: give a lease back (the run counts as an
//!   attempt), *release unstarted*: give back a claim that never ran (it does not count).
//! - *show after*: make messages visible again after a delay (0: at once).
//! - *hand back*: release and show after, for work this worker will not finish: a claimed
//!   event not started (`run::hand_back`), messages received but not claimed
//!   (`poll::hand_back_received`), a retryable failure (`settle::hand_back_failed`).
//! - *settle*: end a delivery's stay (complete and delete, DLQ, `dead_letters`, hand back).
//! - *worker id*: this process's name (`--worker-id`); *lease token*: `worker_id#n`, one per
//!   claim statement, written to the rows it claimed. Nothing is called "owner".

mod acker;
mod batch;
mod claim;
mod config;
mod core;
mod dlq;
mod fifo;
mod heartbeat;
mod pause;
mod poll;
mod pollers;
mod readiness;
mod retry;
mod run;
mod running;
mod service;
mod settle;
mod settlement;
mod setup;
mod shared;
mod shutdown;
mod summary;

pub use config::{PayloadMismatch, WorkerConfig, WorkerError};
pub use readiness::{Readiness, ReadinessReport};
pub use retry::retry_delay;
pub use service::{Worker, WorkerBuilder};
pub use summary::{RunSummary, names};

// The core's surface for the Lambda adapter (src/lambda.rs).
pub(crate) use batch::handle_batch;
pub(crate) use core::{BatchContext, BatchTokens, Core, CoreParts, host_name};
pub(crate) use heartbeat::HANDLER_STOP_GRACE;
pub(crate) use settlement::Mode;
pub(crate) use shared::Shared;

#[cfg(test)]
mod protocol_model;

#[cfg(test)]
mod tests;
