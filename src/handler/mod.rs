//! The handler interface: what user code implements, what it is given, how it fails.
//!
//! A handler never sees SQS. It gets a [`Job`] describing one event and answers `Ok(())`
//! (done), [`HandlerError::Retryable`] (try again later) or [`HandlerError::Permanent`]
//! (this event can never succeed: send it to the DLQ). Every handler will run more than
//! once for some events; design each effect as if it will.
//!
//! Multi-step handlers use [`Job::step`] and [`Job::step_tx`] (or [`Job::step_tx_sqlite`]): each completed step's output
//! is written to the checkpoint before the next step starts, so a crash, a lost lease or a
//! redelivery resumes after the last completed step instead of starting over.
//! [`Job::step_effect`] is the variant for an outside effect (an HTTP POST, an email) that
//! must not be repeated just because its record could not be written.

mod error;
mod job;
mod recorder;
mod steps;
mod transactions;

use async_trait::async_trait;

use crate::store::{CheckpointStore, StoreKind};

pub use error::*;
pub use job::*;
pub(crate) use recorder::StepRecorder;
pub use steps::*;
pub use transactions::DynamoTransaction;

/// User code that handles one event.
#[async_trait]
pub trait Handler: Send + Sync + 'static {
    /// Handle one event. Called at least once per event, sometimes more: make it idempotent.
    async fn handle(&self, job: &mut Job) -> Result<(), HandlerError>;

    /// The store whose transactions this handler's steps write in: `Some(StoreKind::Postgres)`
    /// for a handler calling [`Job::step_tx`], `Some(StoreKind::Sqlite)` for
    /// [`Job::step_tx_sqlite`]. A worker (and a Lambda worker) refuses to start on any other
    /// store, so a PostgreSQL step never meets a SQLite store at message time; a step
    /// transaction the handler did not declare fails permanently ([`STEP_TX_UNSUPPORTED`]).
    /// `None` (the default): no step transactions, any store.
    fn step_transactions(&self) -> Option<StoreKind> {
        None
    }
}

/// Refuse, at start, a handler whose step transactions are another store's.
pub(crate) fn check_step_transactions(
    handler: &dyn Handler,
    store: &dyn CheckpointStore,
) -> Result<(), String> {
    match handler.step_transactions() {
        Some(kind) if kind != store.kind() => Err(format!(
            "the handler's steps write in {kind} transactions (Handler::step_transactions), \
             but the checkpoint store is {}: run it on a {kind} store",
            store.kind()
        )),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests;
