//! The handler interface: what user code implements, what it is given, how it fails.
//!
//! A handler never sees SQS. It gets a [`Job`] describing one event and answers `Ok(())`
//! (done), [`HandlerError::Retryable`] (try again later) or [`HandlerError::Permanent`]
//! (this event can never succeed: send it to the DLQ). Every handler will run more than
//! once for some events; design each effect as if it will.

use std::collections::HashMap;
use std::time::Duration;

use async_trait::async_trait;
use serde_json::Value;

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

/// One event to handle.
#[derive(Debug, Clone)]
pub struct Job {
    pub(crate) scope: String,
    pub(crate) key: String,
    pub(crate) message_id: String,
    pub(crate) body: String,
    pub(crate) json: Option<Value>,
    pub(crate) attributes: HashMap<String, String>,
    pub(crate) attempt: u32,
    pub(crate) redrive_count: u32,
    pub(crate) final_pass: bool,
}

impl Job {
    /// The checkpoint scope (by default the queue name).
    pub fn scope(&self) -> &str {
        &self.scope
    }

    /// The idempotency key of the event.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// The SQS MessageId of this delivery.
    pub fn message_id(&self) -> &str {
        &self.message_id
    }

    /// The body as received.
    pub fn body(&self) -> &str {
        &self.body
    }

    /// The body parsed as JSON, if it is JSON.
    pub fn json(&self) -> Option<&Value> {
        self.json.as_ref()
    }

    /// String and Number message attributes.
    pub fn attributes(&self) -> &HashMap<String, String> {
        &self.attributes
    }

    /// Which claim of this event this is: 1 the first time, more after retries or takeovers.
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// How many times an operator redrove this message from the DLQ.
    pub fn redrive_count(&self) -> u32 {
        self.redrive_count
    }

    /// True on the last redrive an operator allows: a failure now ends the message.
    pub fn is_final_pass(&self) -> bool {
        self.final_pass
    }
}

/// User code that handles one event.
#[async_trait]
pub trait Handler: Send + Sync + 'static {
    /// Handle one event. Called at least once per event, sometimes more: make it idempotent.
    async fn handle(&self, job: &mut Job) -> Result<(), HandlerError>;
}
