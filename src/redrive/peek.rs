//! `dlq peek`: read a DLQ without changing it.

use std::collections::HashSet;
use std::time::Duration;

use aws_sdk_sqs::types::MessageAttributeValue;
use serde::Serialize;

use crate::message;
use crate::message::{Envelope, KeySpec};
use crate::sqs::{ReceivedMessage, SqsQueue};

use super::options::RedriveError;

/// One message as `dlq peek` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct PeekedMessage {
    /// SQS message id.
    pub message_id: String,
    /// The idempotency key (with the given key pointers).
    pub key: String,
    /// Seconds since it was first sent to SQS.
    pub age_secs: Option<u64>,
    /// How often SQS delivered it (in the DLQ, plus this peek).
    pub receive_count: Option<u32>,
    /// Redrives so far.
    pub redrive_count: u32,
    /// The worker's failure reason code, if it sent the message here.
    pub failure_reason: Option<String>,
    /// The worker's failure text.
    pub failure_detail: Option<String>,
    /// The start of the body.
    pub body_preview: String,
}

/// Look at up to `limit` DLQ messages without keeping them: each is made visible again as
/// soon as it has been read.
pub async fn peek(
    client: aws_sdk_sqs::Client,
    dlq_url: &str,
    limit: usize,
    key: &KeySpec,
    envelope: Envelope,
) -> Result<Vec<PeekedMessage>, RedriveError> {
    let messages = peek_messages(client, dlq_url, limit).await?;
    Ok(messages
        .iter()
        .map(|message| describe(message, key, envelope))
        .collect())
}

/// Read up to `limit` distinct DLQ messages, whole, and make them visible again at once. A
/// read still counts as a receive (`ApproximateReceiveCount` goes up), so callers read a
/// bounded sample rather than the whole queue.
pub async fn peek_messages(
    client: aws_sdk_sqs::Client,
    dlq_url: &str,
    limit: usize,
) -> Result<Vec<ReceivedMessage>, RedriveError> {
    let dlq = SqsQueue::new(client, dlq_url);
    let mut peeked = Vec::new();
    let mut seen = HashSet::new();
    let mut handles = Vec::new();
    let mut empty_receives = 0;
    while peeked.len() < limit && empty_receives < 2 {
        let want = (limit - peeked.len()).min(10);
        // A short visibility, handed back below anyway: a peek must never hide messages.
        let batch = dlq
            .receive(want, Duration::from_secs(1), Some(Duration::from_secs(30)))
            .await;
        let batch = match batch {
            Ok(batch) => batch,
            Err(error) => {
                hand_back(&dlq, handles).await;
                return Err(error.into());
            }
        };
        if batch.is_empty() {
            empty_receives += 1;
            continue;
        }
        for message in batch {
            handles.push(message.receipt_handle.clone());
            if seen.insert(message.message_id.clone()) {
                peeked.push(message);
            }
        }
    }
    if !handles.is_empty() {
        dlq.make_visible_now(handles).await?;
    }
    Ok(peeked)
}

/// Make what a failed peek read visible again, as far as SQS lets us (their visibility
/// ends within 30 s anyway).
async fn hand_back(dlq: &SqsQueue, handles: Vec<String>) {
    if handles.is_empty() {
        return;
    }
    if let Err(error) = dlq.make_visible_now(handles).await {
        tracing::warn!(%error, "could not hand peeked messages back; they reappear within 30 s");
    }
}

/// What `dlq peek` shows of a message.
pub fn describe(message: &ReceivedMessage, key: &KeySpec, envelope: Envelope) -> PeekedMessage {
    let identity = message::derive_identity(key, envelope, &message.body);
    describe_identified(message, identity.as_ref())
}

/// [`describe`] for a caller that has the message's identity already (or knows it has none:
/// its key is then derived from the body's hash).
pub fn describe_identified(
    message: &ReceivedMessage,
    identity: Result<&message::EventIdentity, &message::KeyError>,
) -> PeekedMessage {
    let markers = message::parse_markers(message.attribute_strings());
    let key = identity
        .map(|i| i.key.clone())
        .unwrap_or_else(|_| message::fallback_key(&message.body));
    let now_ms = chrono::Utc::now().timestamp_millis().max(0) as u64;
    let attribute = |name: &str| {
        message
            .message_attributes
            .get(name)
            .and_then(MessageAttributeValue::string_value)
            .map(str::to_owned)
    };
    PeekedMessage {
        message_id: message.message_id.clone(),
        key,
        age_secs: message
            .system_attributes
            .get("SentTimestamp")
            .and_then(|t| t.parse::<u64>().ok())
            .map(|sent| now_ms.saturating_sub(sent) / 1000),
        receive_count: message
            .system_attributes
            .get("ApproximateReceiveCount")
            .and_then(|c| c.parse().ok()),
        redrive_count: markers.redrive_count,
        failure_reason: attribute(message::ATTR_FAILURE_REASON),
        failure_detail: attribute(message::ATTR_FAILURE_DETAIL),
        body_preview: message::truncate_for_log(&message.body, 60),
    }
}
