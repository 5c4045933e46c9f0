//! The handler interface: what user code implements, what it is given, how it fails.
//!
//! A handler never sees SQS. It gets a [`Job`] describing one event and answers `Ok(())`
//! (done), [`HandlerError::Retryable`] (try again later) or [`HandlerError::Permanent`]
//! (this event can never succeed: send it to the DLQ). Every handler will run more than
//! once for some events; design each effect as if it will.
//!
//! Multi-step handlers use [`Job::step`] and [`Job::step_tx`]: each completed step's output
//! is written to the checkpoint before the next step starts, so a crash, a lost lease or a
//! redelivery resumes after the last completed step instead of starting over.
//! [`Job::step_effect`] is the variant for an outside effect (an HTTP POST, an email) that
//! must not be repeated just because its record could not be written.

mod error;
mod job;
mod steps;

use async_trait::async_trait;

pub use error::*;
pub use job::*;
pub use steps::*;

/// User code that handles one event.
#[async_trait]
pub trait Handler: Send + Sync + 'static {
    /// Handle one event. Called at least once per event, sometimes more: make it idempotent.
    async fn handle(&self, job: &mut Job) -> Result<(), HandlerError>;
}

#[cfg(test)]
mod tests;
