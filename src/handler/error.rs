//! How a handler fails: [`HandlerError`], a type, not a string.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

/// How a handler failed. Retry is a type, not a string.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HandlerError {
    /// A transient failure: the message comes back after a backoff.
    #[error("retryable: {message}")]
    Retryable {
        /// What went wrong.
        message: String,
        /// A delay the handler asks for (e.g. from an HTTP Retry-After), instead of the
        /// worker's backoff.
        retry_after: Option<Duration>,
    },
    /// The event can never succeed as it is: it goes to the DLQ at once.
    #[error("permanent: {message}")]
    Permanent {
        /// What went wrong.
        message: String,
        /// A short reason code for the DLQ attributes (default `handler_permanent`).
        reason: String,
    },
    /// Another worker took this event's lease (ours expired), or it could not be renewed:
    /// nothing more may be recorded, and the message is left to SQS and the next holder.
    /// Steps return it; propagate it with `?`.
    #[error("the lease was lost or could not be renewed; stopping at this step")]
    LeaseLost,
}

/// Database errors inside a step are retryable: the step's transaction rolled back, so the
/// next attempt starts that step again from a clean state.
impl From<sqlx::Error> for HandlerError {
    fn from(error: sqlx::Error) -> Self {
        HandlerError::retryable(format!("database error: {error}"))
    }
}

/// The future a [`Job::step_tx`](super::Job::step_tx) closure returns: boxed, because it borrows the transaction.
pub type StepFuture<'t, T> = Pin<Box<dyn Future<Output = Result<T, HandlerError>> + Send + 't>>;

pub(super) fn plan_mismatch(message: String) -> HandlerError {
    HandlerError::permanent_with_reason("plan_mismatch", message)
}

impl HandlerError {
    /// A transient failure, retried after the worker's backoff.
    pub fn retryable(message: impl std::fmt::Display) -> Self {
        HandlerError::Retryable {
            message: message.to_string(),
            retry_after: None,
        }
    }

    /// A transient failure, retried no sooner than `after`.
    pub fn retry_after(message: impl std::fmt::Display, after: Duration) -> Self {
        HandlerError::Retryable {
            message: message.to_string(),
            retry_after: Some(after),
        }
    }

    /// A failure that retrying cannot fix: the message goes to the DLQ.
    pub fn permanent(message: impl std::fmt::Display) -> Self {
        Self::permanent_with_reason("handler_permanent", message)
    }

    /// A permanent failure with a specific reason code.
    pub fn permanent_with_reason(
        reason: impl Into<String>,
        message: impl std::fmt::Display,
    ) -> Self {
        HandlerError::Permanent {
            message: message.to_string(),
            reason: reason.into(),
        }
    }

    /// True for [`HandlerError::Retryable`].
    pub fn is_retryable(&self) -> bool {
        matches!(self, HandlerError::Retryable { .. })
    }
}
