//! From an SQS message to an event: the idempotency key, the redrive markers, and the
//! producer's trace context ([`trace`]).
//!
//! Pure functions, no I/O, so the worker, the Lambda adapter and the operator tools agree on
//! what a message *is*. The key comes from the payload and never from the SQS MessageId:
//! SQS gives a redriven or re-sent message a new MessageId, but it is the same event.

mod fingerprint;
mod keys;
mod markers;
pub mod trace;

pub use fingerprint::*;
pub use keys::*;
pub use markers::*;

/// Cut a string to at most `max_chars` characters for a log line or an attribute.
pub fn truncate_for_log(text: &str, max_chars: usize) -> String {
    match text.char_indices().nth(max_chars) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text.to_string(),
    }
}

#[cfg(test)]
mod tests;
