//! The values that cross the SQS boundary: messages in and out, a queue's redrive policy and
//! counts, SQS's limits, attribute helpers.

use std::collections::HashMap;
use std::time::Duration;

use aws_sdk_sqs::types::MessageAttributeValue;

/// SQS refuses visibility timeouts of 12 hours or more.
pub const MAX_VISIBILITY: Duration = Duration::from_secs(43_199);
/// SQS refuses more than 10 message attributes on one message.
pub const MAX_MESSAGE_ATTRIBUTES: usize = 10;
/// A queue's MaximumMessageSize when it cannot be read: SQS's limit until 2025, and still
/// what many queues are set to.
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 262_144;

/// A received message, reduced to what the worker uses.
#[derive(Debug, Clone)]
pub struct ReceivedMessage {
    /// SQS MessageId (changes on every re-send, so never an idempotency key).
    pub message_id: String,
    /// The receipt handle of this delivery.
    pub receipt_handle: String,
    /// The body as sent.
    pub body: String,
    /// System attributes such as `ApproximateReceiveCount` and `MessageGroupId`.
    pub system_attributes: HashMap<String, String>,
    /// Message attributes, kept whole so they can be forwarded to the DLQ unchanged.
    pub message_attributes: HashMap<String, MessageAttributeValue>,
}

impl ReceivedMessage {
    /// String and Number message attributes as text (Binary ones are left out).
    pub fn attribute_strings(&self) -> impl Iterator<Item = (&str, Option<&str>)> {
        self.message_attributes
            .iter()
            .map(|(name, value)| (name.as_str(), value.string_value()))
    }

    /// Message attributes as JSON, `{"name": {"type": "String", "value": "…"}}`, for
    /// records (Binary values are noted by type only).
    pub fn attributes_json(&self) -> serde_json::Value {
        self.message_attributes
            .iter()
            .map(|(name, value)| {
                (
                    name.clone(),
                    serde_json::json!({"type": value.data_type(), "value": value.string_value()}),
                )
            })
            .collect::<serde_json::Map<_, _>>()
            .into()
    }

    /// The FIFO message group, if this came from a FIFO queue.
    pub fn message_group_id(&self) -> Option<&str> {
        self.system_attributes
            .get("MessageGroupId")
            .map(String::as_str)
    }
}

/// A message to send, e.g. to a DLQ.
#[derive(Debug, Clone)]
pub struct OutgoingMessage {
    /// Body, verbatim (the key may be its hash, so it is never rewritten).
    pub body: String,
    /// Message attributes, at most [`MAX_MESSAGE_ATTRIBUTES`].
    pub attributes: HashMap<String, MessageAttributeValue>,
    /// FIFO group id, for FIFO targets.
    pub message_group_id: Option<String>,
    /// FIFO deduplication id, for FIFO targets.
    pub deduplication_id: Option<String>,
    /// Hide the message for this long after sending (standard queues only, up to 15 min).
    pub delay: Option<Duration>,
}

/// Where a queue's messages go after too many receives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedrivePolicy {
    /// The DLQ.
    pub dlq_url: String,
    /// Receives after which SQS moves a message there itself.
    pub max_receive_count: Option<u32>,
}

/// A queue's approximate message counts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MessageCounts {
    /// Waiting to be received.
    pub visible: u64,
    /// Received by a consumer and neither deleted nor visible again yet (this includes
    /// messages waiting out a retry backoff).
    pub in_flight: u64,
    /// Sent with a delay that has not passed yet.
    pub delayed: u64,
}

impl MessageCounts {
    /// Every message the queue holds.
    pub fn total(&self) -> u64 {
        self.visible + self.in_flight + self.delayed
    }
}

/// A per-entry failure of a batch call.
#[derive(Debug, Clone)]
pub struct BatchEntryFailure {
    /// The receipt handle the entry was about.
    pub receipt_handle: String,
    /// SQS's code and message.
    pub reason: String,
}

/// Build a String message attribute.
pub fn string_attribute(value: impl Into<String>) -> MessageAttributeValue {
    MessageAttributeValue::builder()
        .data_type("String")
        .string_value(value)
        .build()
        .expect("data_type is set")
}

/// Build a Number message attribute.
pub fn number_attribute(value: impl std::fmt::Display) -> MessageAttributeValue {
    MessageAttributeValue::builder()
        .data_type("Number")
        .string_value(value.to_string())
        .build()
        .expect("data_type is set")
}

/// Whole seconds for a visibility change, rounded up and kept within SQS's limits.
pub fn visibility_seconds(delay: Duration) -> i32 {
    let secs = delay.as_secs() + u64::from(delay.subsec_nanos() > 0);
    secs.min(MAX_VISIBILITY.as_secs()) as i32
}

/// The last path segment of a queue URL (`…/000000000000/orders` → `orders`).
pub fn queue_name_from_url(url: &str) -> &str {
    url.trim_end_matches('/').rsplit('/').next().unwrap_or(url)
}
