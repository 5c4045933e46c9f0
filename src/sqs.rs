//! A thin wrapper over aws-sdk-sqs: the only module that talks to SQS.
//!
//! It turns SDK types into the few plain ones the worker needs and SDK errors into one
//! error type that names the operation, so the rest of the crate never sees the SDK.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use aws_sdk_sqs::Client;
use aws_sdk_sqs::config::http::HttpResponse;
use aws_sdk_sqs::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_sqs::types::{
    ChangeMessageVisibilityBatchRequestEntry, DeleteMessageBatchRequestEntry,
    MessageAttributeValue, MessageSystemAttributeName, QueueAttributeName,
};

/// SQS refuses visibility timeouts of 12 hours or more.
pub const MAX_VISIBILITY: Duration = Duration::from_secs(43_199);
/// SQS refuses more than 10 message attributes on one message.
pub const MAX_MESSAGE_ATTRIBUTES: usize = 10;
/// A queue's MaximumMessageSize when it cannot be read: SQS's limit until 2025, and still
/// what many queues are set to.
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 262_144;

/// An SQS call that failed, in one line: what failed and why, without the SDK's response
/// dump (headers, extensions, the error repeated).
#[derive(Debug, thiserror::Error)]
#[error("sqs {operation} failed: {message}")]
pub struct SqsError {
    /// The API operation, e.g. `ReceiveMessage`.
    pub operation: &'static str,
    /// What kind of failure: whether retrying can help, and what to tell an operator.
    pub kind: SqsErrorKind,
    /// SQS's error code and message, or the innermost cause of a failure to reach it.
    pub message: String,
}

/// The kinds of SQS failure a caller branches on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SqsErrorKind {
    /// SQS could not be reached or answered with a server error or throttling: retrying
    /// may help (connection refused, DNS, timeouts, 5xx).
    Unreachable,
    /// The queue does not exist (wrong URL, region or endpoint).
    QueueNotFound,
    /// The credentials were refused or lack a permission.
    AccessDenied,
    /// No credentials were found in the environment, profile, web identity, ECS or EC2.
    NoCredentials,
    /// No AWS region is configured.
    NoRegion,
    /// SQS refused the request itself (a malformed URL or parameter).
    Rejected,
}

impl SqsErrorKind {
    /// True when trying again later may succeed.
    pub fn is_transient(self) -> bool {
        self == SqsErrorKind::Unreachable
    }
}

/// Error codes SQS (and STS behind it) uses for refused credentials or permissions.
const ACCESS_CODES: [&str; 9] = [
    "AccessDenied",
    "AccessDeniedException",
    "InvalidClientTokenId",
    "UnrecognizedClientException",
    "SignatureDoesNotMatch",
    "InvalidSecurity",
    "ExpiredToken",
    "MissingAuthenticationToken",
    "IncompleteSignature",
];

impl SqsError {
    fn new<E>(operation: &'static str, error: SdkError<E, HttpResponse>) -> Self
    where
        E: ProvideErrorMetadata + std::error::Error + 'static,
    {
        let (kind, message) = match &error {
            SdkError::ServiceError(service) => {
                let code = service.err().code().unwrap_or("unknown error").to_owned();
                let text = service.err().message().unwrap_or_default();
                let status = service.raw().status().as_u16();
                let kind = service_error_kind(&code, status);
                let message = if text.is_empty() {
                    format!("{code} (HTTP {status})")
                } else {
                    format!("{code}: {text}")
                };
                (kind, message)
            }
            SdkError::DispatchFailure(failure) if failure.is_other() => {
                let chain = cause_chain(&error);
                let kind = if chain.contains("credential provider was not enabled")
                    || chain.contains("no credentials")
                {
                    SqsErrorKind::NoCredentials
                } else if chain.contains("Missing Region") || chain.contains("signing region") {
                    SqsErrorKind::NoRegion
                } else {
                    SqsErrorKind::Unreachable
                };
                (kind, innermost_cause(&error))
            }
            SdkError::ConstructionFailure(_) => (SqsErrorKind::Rejected, cause_chain(&error)),
            _ => (SqsErrorKind::Unreachable, innermost_cause(&error)),
        };
        Self {
            operation,
            kind,
            message: one_line(&message),
        }
    }
}

/// What an error answer from SQS means, by its code and HTTP status.
fn service_error_kind(code: &str, status: u16) -> SqsErrorKind {
    if code.contains("NonExistentQueue") || code == "QueueDoesNotExist" {
        SqsErrorKind::QueueNotFound
    } else if ACCESS_CODES.contains(&code) || status == 403 {
        SqsErrorKind::AccessDenied
    } else if status >= 500 || status == 429 || code.contains("Throttl") {
        SqsErrorKind::Unreachable
    } else {
        SqsErrorKind::Rejected
    }
}

/// Every cause's text, outermost first.
fn cause_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut texts = vec![error.to_string()];
    let mut source = error.source();
    while let Some(cause) = source {
        texts.push(cause.to_string());
        source = cause.source();
    }
    texts.join(": ")
}

/// The innermost cause's text (e.g. `Connection refused (os error 111)`): the part that says
/// what actually happened, under the SDK's layers of "dispatch failure: io error: …".
fn innermost_cause(error: &(dyn std::error::Error + 'static)) -> String {
    let mut innermost = error;
    while let Some(cause) = innermost.source() {
        innermost = cause;
    }
    innermost.to_string()
}

/// The first line of a text, at most 300 characters: error texts end up in one log line.
fn one_line(text: &str) -> String {
    let first = text
        .lines()
        .next()
        .unwrap_or_default()
        .trim_end_matches(['.', ' ']);
    crate::message::truncate_for_log(first, 300)
}

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

/// A client configured from the environment: the SDK's credential chain, region and
/// `AWS_ENDPOINT_URL` (set it to LocalStack's URL to work locally).
pub async fn client_from_env() -> Client {
    let config = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .timeout_config(timeouts())
        .load()
        .await;
    Client::new(&config)
}

/// Bounds on every SQS call, so an endpoint that accepts a connection and then says nothing
/// (a black-holed network) fails a call instead of hanging a poller for good. An attempt may
/// take a whole long poll (at most 20 s) plus the reply.
fn timeouts() -> aws_config::timeout::TimeoutConfig {
    aws_config::timeout::TimeoutConfig::builder()
        .connect_timeout(std::time::Duration::from_secs(5))
        .operation_attempt_timeout(std::time::Duration::from_secs(30))
        .build()
}

/// A client for a local endpoint such as LocalStack: the given URL, region us-east-1 unless
/// AWS_REGION says otherwise, and static test credentials unless the environment has some.
pub async fn local_client(endpoint_url: &str) -> Client {
    let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .endpoint_url(endpoint_url)
        .timeout_config(timeouts());
    if std::env::var_os("AWS_REGION").is_none() && std::env::var_os("AWS_DEFAULT_REGION").is_none()
    {
        loader = loader.region(aws_config::Region::new("us-east-1"));
    }
    if std::env::var_os("AWS_ACCESS_KEY_ID").is_none() {
        loader = loader.credentials_provider(aws_sdk_sqs::config::Credentials::new(
            "test", "test", None, None, "local",
        ));
    }
    Client::new(&loader.load().await)
}

/// Attributes for a message made from another: every `required` one, then as many of
/// `original`'s others as SQS's limit of 10 allows — lowest `rank` first, then by name.
/// Names that are required or in `omit` are not copied; each one that does not fit is logged.
pub fn fit_attributes(
    required: Vec<(&str, MessageAttributeValue)>,
    original: &HashMap<String, MessageAttributeValue>,
    omit: &[&str],
    rank: impl Fn(&str) -> u8,
) -> HashMap<String, MessageAttributeValue> {
    let mut attributes: HashMap<String, MessageAttributeValue> = required
        .into_iter()
        .map(|(name, value)| (name.to_owned(), value))
        .collect();
    let mut rest: Vec<&String> = original
        .keys()
        .filter(|n| !attributes.contains_key(n.as_str()) && !omit.contains(&n.as_str()))
        .collect();
    rest.sort_by(|a, b| (rank(a), a).cmp(&(rank(b), b)));
    for name in rest {
        if attributes.len() >= MAX_MESSAGE_ATTRIBUTES {
            tracing::warn!(attribute = %name, "dropping a message attribute: SQS allows 10 per message");
            continue;
        }
        attributes.insert(name.clone(), original[name].clone());
    }
    attributes
}

/// Text as a message attribute value may hold it: SQS accepts only XML 1.0 characters
/// (#x9, #xA, #xD, #x20–#xD7FF, #xE000–#xFFFD, #x10000–#x10FFFF) and refuses the whole
/// message otherwise. Every other character becomes U+FFFD.
pub fn xml_safe(text: &str) -> Cow<'_, str> {
    fn allowed(c: char) -> bool {
        matches!(c, '\u{9}' | '\u{A}' | '\u{D}' | '\u{20}'..='\u{D7FF}' | '\u{E000}'..='\u{FFFD}')
            || c >= '\u{10000}'
    }
    if text.chars().all(allowed) {
        Cow::Borrowed(text)
    } else {
        Cow::Owned(
            text.chars()
                .map(|c| if allowed(c) { c } else { '\u{FFFD}' })
                .collect(),
        )
    }
}

/// The bytes one attribute counts towards a message's size: SQS (and LocalStack) add up the
/// name, the data type and the value.
pub fn attribute_bytes(name: &str, value: &MessageAttributeValue) -> usize {
    name.len()
        + value.data_type().len()
        + value.string_value().map_or(0, str::len)
        + value.binary_value().map_or(0, |b| b.as_ref().len())
}

/// A message's size as SQS measures it against MaximumMessageSize: body plus attributes.
pub fn message_bytes(body: &str, attributes: &HashMap<String, MessageAttributeValue>) -> usize {
    body.len()
        + attributes
            .iter()
            .map(|(name, value)| attribute_bytes(name, value))
            .sum::<usize>()
}

/// Make a message derived from another (a DLQ copy) fit `max_bytes`, body and attributes
/// together; the body is never changed. Until it fits: shorten the String value of
/// `shrinkable` (to no less than `…`), drop the attributes not in `keep` (the largest
/// first), drop `shrinkable`, then drop `keep` from its end (most important first in it).
/// Returns the names of the attributes dropped, for the caller's one log line.
pub fn fit_message_size(
    body: &str,
    attributes: &mut HashMap<String, MessageAttributeValue>,
    max_bytes: usize,
    shrinkable: &str,
    keep: &[&str],
) -> Vec<String> {
    let excess = |attributes: &HashMap<String, MessageAttributeValue>| {
        message_bytes(body, attributes).saturating_sub(max_bytes)
    };
    let mut dropped = Vec::new();
    if excess(attributes) == 0 {
        return dropped;
    }
    if let Some(text) = attributes.get(shrinkable).and_then(|v| v.string_value()) {
        let target = text.len().saturating_sub(excess(attributes));
        let shortened = shorten_to_bytes(text, target);
        attributes.insert(shrinkable.to_owned(), string_attribute(shortened));
    }
    let mut optional: Vec<(usize, String)> = attributes
        .iter()
        .filter(|(name, _)| name.as_str() != shrinkable && !keep.contains(&name.as_str()))
        .map(|(name, value)| (attribute_bytes(name, value), name.clone()))
        .collect();
    // Largest first (fewest attributes lost); the name makes the order stable.
    optional.sort_by(|a, b| b.cmp(a));
    let last_resort = std::iter::once(shrinkable).chain(keep.iter().rev().copied());
    let order = optional
        .into_iter()
        .map(|(_, name)| name)
        .chain(last_resort.map(str::to_owned));
    for name in order {
        if excess(attributes) == 0 {
            break;
        }
        if attributes.remove(&name).is_some() {
            dropped.push(name);
        }
    }
    dropped
}

/// `text` cut at a character boundary to at most `max_bytes` bytes, `…` included; never
/// shorter than `…` itself (SQS refuses an empty String attribute).
fn shorten_to_bytes(text: &str, max_bytes: usize) -> String {
    const ELLIPSIS: &str = "…";
    if text.len() <= max_bytes {
        return text.to_owned();
    }
    let mut cut = max_bytes.saturating_sub(ELLIPSIS.len()).min(text.len());
    while !text.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{}{ELLIPSIS}", &text[..cut])
}

/// One queue and the client that reaches it.
#[derive(Debug, Clone)]
pub struct SqsQueue {
    client: Client,
    url: String,
    /// MaximumMessageSize, read on first use (the clones of a queue share it).
    max_message_bytes: Arc<tokio::sync::OnceCell<usize>>,
}

impl SqsQueue {
    /// A queue by URL.
    pub fn new(client: Client, url: impl Into<String>) -> Self {
        Self {
            client,
            url: url.into(),
            max_message_bytes: Arc::default(),
        }
    }

    /// The queue's MaximumMessageSize: the most bytes of body and attributes one message
    /// may have. Read once per queue; a failed read is tried again next time.
    pub async fn max_message_bytes(&self) -> Result<usize, SqsError> {
        self.max_message_bytes
            .get_or_try_init(|| async {
                let attributes = self
                    .queue_attributes(&[QueueAttributeName::MaximumMessageSize])
                    .await?;
                Ok(attributes
                    .get(&QueueAttributeName::MaximumMessageSize)
                    .and_then(|v| v.parse::<usize>().ok())
                    .unwrap_or(DEFAULT_MAX_MESSAGE_BYTES))
            })
            .await
            .copied()
    }

    /// The queue's MaximumMessageSize for trimming a message to fit, or no limit when it
    /// cannot be read (logged): an untrimmed message may still fit, and not sending at all
    /// would be worse.
    pub async fn size_limit(&self) -> usize {
        match self.max_message_bytes().await {
            Ok(max_bytes) => max_bytes,
            Err(error) => {
                tracing::warn!(%error, queue = self.name(), "cannot read the queue's MaximumMessageSize; sending untrimmed");
                usize::MAX
            }
        }
    }

    /// Find a queue by name.
    pub async fn lookup(client: Client, name: &str) -> Result<Self, SqsError> {
        let output = client
            .get_queue_url()
            .queue_name(name)
            .send()
            .await
            .map_err(|e| SqsError::new("GetQueueUrl", e))?;
        let url = output.queue_url().unwrap_or_default().to_owned();
        Ok(Self::new(client, url))
    }

    /// The queue URL.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The queue's name: the last path segment of its URL.
    pub fn name(&self) -> &str {
        queue_name_from_url(&self.url)
    }

    /// The same client, pointed at another queue.
    pub fn sibling(&self, url: impl Into<String>) -> SqsQueue {
        SqsQueue::new(self.client.clone(), url)
    }

    /// The queue's default VisibilityTimeout.
    pub async fn visibility_timeout(&self) -> Result<Duration, SqsError> {
        let attributes = self
            .queue_attributes(&[QueueAttributeName::VisibilityTimeout])
            .await?;
        let seconds = attributes
            .get(&QueueAttributeName::VisibilityTimeout)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(30);
        Ok(Duration::from_secs(seconds))
    }

    /// The queue's RedrivePolicy: its DLQ's URL and maxReceiveCount, if it has one.
    pub async fn redrive_policy(&self) -> Result<Option<RedrivePolicy>, SqsError> {
        let attributes = self
            .queue_attributes(&[QueueAttributeName::RedrivePolicy])
            .await?;
        let Some(policy) = attributes
            .get(&QueueAttributeName::RedrivePolicy)
            .and_then(|p| serde_json::from_str::<serde_json::Value>(p).ok())
        else {
            return Ok(None);
        };
        let Some(arn) = policy["deadLetterTargetArn"].as_str() else {
            return Ok(None);
        };
        // SQS writes the count as a string; accept a number too.
        let max_receive_count = match &policy["maxReceiveCount"] {
            serde_json::Value::String(count) => count.parse().ok(),
            count => count.as_u64().and_then(|c| u32::try_from(c).ok()),
        };
        // arn:aws:sqs:<region>:<account>:<name>
        let mut parts = arn.rsplitn(3, ':');
        let (Some(name), Some(account)) = (parts.next(), parts.next()) else {
            return Ok(None);
        };
        let output = self
            .client
            .get_queue_url()
            .queue_name(name)
            .queue_owner_aws_account_id(account)
            .send()
            .await
            .map_err(|e| SqsError::new("GetQueueUrl", e))?;
        Ok(output.queue_url().map(|url| RedrivePolicy {
            dlq_url: url.to_owned(),
            max_receive_count,
        }))
    }

    /// The queue's approximate message counts: visible, in flight (received, not deleted) and
    /// delayed. SQS's figures may lag a little behind; LocalStack's are exact.
    pub async fn message_counts(&self) -> Result<MessageCounts, SqsError> {
        let attributes = self
            .queue_attributes(&[
                QueueAttributeName::ApproximateNumberOfMessages,
                QueueAttributeName::ApproximateNumberOfMessagesNotVisible,
                QueueAttributeName::ApproximateNumberOfMessagesDelayed,
            ])
            .await?;
        let count = |name: QueueAttributeName| {
            attributes
                .get(&name)
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0)
        };
        Ok(MessageCounts {
            visible: count(QueueAttributeName::ApproximateNumberOfMessages),
            in_flight: count(QueueAttributeName::ApproximateNumberOfMessagesNotVisible),
            delayed: count(QueueAttributeName::ApproximateNumberOfMessagesDelayed),
        })
    }

    async fn queue_attributes(
        &self,
        names: &[QueueAttributeName],
    ) -> Result<HashMap<QueueAttributeName, String>, SqsError> {
        let output = self
            .client
            .get_queue_attributes()
            .queue_url(&self.url)
            .set_attribute_names(Some(names.to_vec()))
            .send()
            .await
            .map_err(|e| SqsError::new("GetQueueAttributes", e))?;
        Ok(output.attributes().cloned().unwrap_or_default())
    }

    /// Long-poll for up to `max` (1–10) messages with all their attributes.
    pub async fn receive(
        &self,
        max: usize,
        wait: Duration,
        visibility: Option<Duration>,
    ) -> Result<Vec<ReceivedMessage>, SqsError> {
        let output = self
            .client
            .receive_message()
            .queue_url(&self.url)
            .max_number_of_messages(max.clamp(1, 10) as i32)
            .wait_time_seconds(wait.as_secs().min(20) as i32)
            .set_visibility_timeout(visibility.map(|v| v.as_secs() as i32))
            .message_system_attribute_names(MessageSystemAttributeName::All)
            .message_attribute_names("All")
            .send()
            .await
            .map_err(|e| SqsError::new("ReceiveMessage", e))?;
        Ok(output
            .messages()
            .iter()
            .map(|m| ReceivedMessage {
                message_id: m.message_id().unwrap_or_default().to_owned(),
                receipt_handle: m.receipt_handle().unwrap_or_default().to_owned(),
                body: m.body().unwrap_or_default().to_owned(),
                system_attributes: m
                    .attributes()
                    .map(|a| {
                        a.iter()
                            .map(|(k, v)| (k.as_str().to_owned(), v.clone()))
                            .collect()
                    })
                    .unwrap_or_default(),
                message_attributes: m.message_attributes().cloned().unwrap_or_default(),
            })
            .collect())
    }

    /// Delete up to 10 messages; returns the entries SQS refused.
    pub async fn delete_batch(
        &self,
        receipt_handles: &[String],
    ) -> Result<Vec<BatchEntryFailure>, SqsError> {
        let mut failures = Vec::new();
        for chunk in receipt_handles.chunks(10) {
            let entries = chunk
                .iter()
                .enumerate()
                .map(|(i, handle)| {
                    DeleteMessageBatchRequestEntry::builder()
                        .id(i.to_string())
                        .receipt_handle(handle)
                        .build()
                        .expect("id and receipt handle are set")
                })
                .collect();
            let output = self
                .client
                .delete_message_batch()
                .queue_url(&self.url)
                .set_entries(Some(entries))
                .send()
                .await
                .map_err(|e| SqsError::new("DeleteMessageBatch", e))?;
            failures.extend(batch_failures(chunk, output.failed()));
        }
        Ok(failures)
    }

    /// Make messages visible again after `delay` each; returns the entries SQS refused.
    pub async fn change_visibility_batch(
        &self,
        changes: &[(String, Duration)],
    ) -> Result<Vec<BatchEntryFailure>, SqsError> {
        let mut failures = Vec::new();
        for chunk in changes.chunks(10) {
            let entries = chunk
                .iter()
                .enumerate()
                .map(|(i, (handle, delay))| {
                    ChangeMessageVisibilityBatchRequestEntry::builder()
                        .id(i.to_string())
                        .receipt_handle(handle)
                        .visibility_timeout(visibility_seconds(*delay))
                        .build()
                        .expect("id and receipt handle are set")
                })
                .collect();
            let output = self
                .client
                .change_message_visibility_batch()
                .queue_url(&self.url)
                .set_entries(Some(entries))
                .send()
                .await
                .map_err(|e| SqsError::new("ChangeMessageVisibilityBatch", e))?;
            let handles: Vec<String> = chunk.iter().map(|(h, _)| h.clone()).collect();
            failures.extend(batch_failures(&handles, output.failed()));
        }
        Ok(failures)
    }

    /// The queue's ARN.
    pub async fn arn(&self) -> Result<String, SqsError> {
        let attributes = self
            .queue_attributes(&[QueueAttributeName::QueueArn])
            .await?;
        Ok(attributes
            .get(&QueueAttributeName::QueueArn)
            .cloned()
            .unwrap_or_default())
    }

    /// URLs of the queues whose RedrivePolicy names this queue as their DLQ.
    pub async fn dead_letter_source_queues(&self) -> Result<Vec<String>, SqsError> {
        let output = self
            .client
            .list_dead_letter_source_queues()
            .queue_url(&self.url)
            .send()
            .await
            .map_err(|e| SqsError::new("ListDeadLetterSourceQueues", e))?;
        Ok(output.queue_urls().to_vec())
    }

    /// Start SQS's own move of this DLQ's messages back to their source (or `destination`),
    /// at most `rate` per second. Returns the task handle.
    pub async fn start_message_move_task(
        &self,
        destination_arn: Option<String>,
        rate: Option<i32>,
    ) -> Result<String, SqsError> {
        let source_arn = self.arn().await?;
        let output = self
            .client
            .start_message_move_task()
            .source_arn(source_arn)
            .set_destination_arn(destination_arn)
            .set_max_number_of_messages_per_second(rate)
            .send()
            .await
            .map_err(|e| SqsError::new("StartMessageMoveTask", e))?;
        Ok(output.task_handle().unwrap_or_default().to_owned())
    }

    /// SQS's move tasks from this DLQ, newest first, as JSON objects.
    pub async fn list_message_move_tasks(&self) -> Result<Vec<serde_json::Value>, SqsError> {
        let source_arn = self.arn().await?;
        let output = self
            .client
            .list_message_move_tasks()
            .source_arn(source_arn)
            .send()
            .await
            .map_err(|e| SqsError::new("ListMessageMoveTasks", e))?;
        Ok(output
            .results()
            .iter()
            .map(|task| {
                serde_json::json!({
                    "task_handle": task.task_handle(),
                    "status": task.status(),
                    "moved": task.approximate_number_of_messages_moved(),
                    "to_move": task.approximate_number_of_messages_to_move(),
                    "rate": task.max_number_of_messages_per_second(),
                    "destination_arn": task.destination_arn(),
                    "failure_reason": task.failure_reason(),
                    "started_at_ms": task.started_timestamp(),
                })
            })
            .collect())
    }

    /// Cancel a running move task; returns how many messages it had moved.
    pub async fn cancel_message_move_task(&self, task_handle: &str) -> Result<i64, SqsError> {
        let output = self
            .client
            .cancel_message_move_task()
            .task_handle(task_handle)
            .send()
            .await
            .map_err(|e| SqsError::new("CancelMessageMoveTask", e))?;
        Ok(output.approximate_number_of_messages_moved())
    }

    /// Make received messages visible again at once; returns the entries SQS refused.
    pub async fn make_visible_now(
        &self,
        receipt_handles: Vec<String>,
    ) -> Result<Vec<BatchEntryFailure>, SqsError> {
        let changes: Vec<(String, Duration)> = receipt_handles
            .into_iter()
            .map(|handle| (handle, Duration::ZERO))
            .collect();
        self.change_visibility_batch(&changes).await
    }

    /// Send one message to this queue.
    pub async fn send(&self, message: OutgoingMessage) -> Result<String, SqsError> {
        let output = self
            .client
            .send_message()
            .queue_url(&self.url)
            .message_body(message.body)
            .set_message_attributes(if message.attributes.is_empty() {
                None
            } else {
                Some(message.attributes)
            })
            .set_message_group_id(message.message_group_id)
            .set_message_deduplication_id(message.deduplication_id)
            .set_delay_seconds(message.delay.map(|d| d.as_secs().min(900) as i32))
            .send()
            .await
            .map_err(|e| SqsError::new("SendMessage", e))?;
        Ok(output.message_id().unwrap_or_default().to_owned())
    }
}

fn batch_failures(
    handles: &[String],
    failed: &[aws_sdk_sqs::types::BatchResultErrorEntry],
) -> Vec<BatchEntryFailure> {
    failed
        .iter()
        .map(|f| BatchEntryFailure {
            receipt_handle: f
                .id()
                .parse::<usize>()
                .ok()
                .and_then(|i| handles.get(i))
                .cloned()
                .unwrap_or_default(),
            reason: format!("{}: {}", f.code(), f.message().unwrap_or("no message")),
        })
        .collect()
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

#[cfg(test)]
mod tests {
    #[test]
    fn service_errors_are_classified_by_code_and_status() {
        use super::{SqsErrorKind::*, service_error_kind};
        assert_eq!(
            service_error_kind("AWS.SimpleQueueService.NonExistentQueue", 400),
            QueueNotFound
        );
        assert_eq!(service_error_kind("QueueDoesNotExist", 400), QueueNotFound);
        assert_eq!(service_error_kind("AccessDenied", 403), AccessDenied);
        assert_eq!(
            service_error_kind("InvalidClientTokenId", 400),
            AccessDenied
        );
        assert_eq!(
            service_error_kind("KMS.AccessDeniedException", 403),
            AccessDenied
        );
        assert_eq!(service_error_kind("InternalError", 500), Unreachable);
        assert_eq!(service_error_kind("RequestThrottled", 400), Unreachable);
        assert_eq!(service_error_kind("InvalidAddress", 404), Rejected);
        assert!(Unreachable.is_transient() && !QueueNotFound.is_transient());
    }

    #[test]
    fn error_texts_become_one_short_line() {
        assert_eq!(
            super::one_line("no credentials found in chain. Attempted:\n  Environment: x"),
            "no credentials found in chain. Attempted:"
        );
        assert_eq!(super::one_line(&"x".repeat(400)).chars().count(), 301);
    }

    use super::*;

    #[test]
    fn queue_names_come_from_urls() {
        assert_eq!(
            queue_name_from_url("http://127.0.0.1:4566/000000000000/orders"),
            "orders"
        );
        assert_eq!(
            queue_name_from_url("https://sqs.eu-west-1.amazonaws.com/123/jobs.fifo/"),
            "jobs.fifo"
        );
    }

    #[test]
    fn xml_safe_replaces_what_sqs_refuses() {
        assert!(matches!(xml_safe("plain\ttext\r\n🦀"), Cow::Borrowed(_)));
        assert_eq!(
            xml_safe("a\0b\u{1}c\u{1b}d\u{FFFE}e\u{FFFF}f\u{D7FF}\u{E000}\u{10FFFF}"),
            "a\u{FFFD}b\u{FFFD}c\u{FFFD}d\u{FFFD}e\u{FFFD}f\u{D7FF}\u{E000}\u{10FFFF}"
        );
    }

    #[test]
    fn sizes_count_name_type_and_value() {
        let mut attributes = HashMap::new();
        attributes.insert("a".to_owned(), string_attribute("v"));
        assert_eq!(message_bytes("xyz", &attributes), 3 + 1 + 6 + 1);
        let binary = MessageAttributeValue::builder()
            .data_type("Binary")
            .binary_value(aws_sdk_sqs::primitives::Blob::new(vec![0u8; 5]))
            .build()
            .unwrap();
        assert_eq!(attribute_bytes("bb", &binary), 2 + 6 + 5);
        assert_eq!(message_bytes("é", &HashMap::new()), 2);
    }

    #[test]
    fn shortening_respects_char_boundaries_and_never_empties() {
        assert_eq!(shorten_to_bytes("short", 10), "short");
        assert_eq!(shorten_to_bytes("ééééé", 7), "éé…");
        assert_eq!(shorten_to_bytes("abcdef", 0), "…");
    }

    #[test]
    fn fitting_shortens_then_drops_optional_then_required() {
        let attrs = |pairs: &[(&str, &str)]| -> HashMap<String, MessageAttributeValue> {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), string_attribute(*v)))
                .collect()
        };
        let keep = ["marker", "reason"];
        let start = attrs(&[
            ("reason", "r"),
            ("detail", &"d".repeat(100)),
            ("marker", "1"),
            ("big", &"b".repeat(50)),
            ("small", "s"),
        ]);
        // Fits already: untouched.
        let mut a = start.clone();
        fit_message_size("body", &mut a, 10_000, "detail", &keep);
        assert_eq!(a, start);
        // 40 bytes over: the detail gives them up and nothing is dropped.
        let total = message_bytes("body", &start);
        let mut a = start.clone();
        fit_message_size("body", &mut a, total - 40, "detail", &keep);
        assert_eq!(message_bytes("body", &a), total - 40);
        assert_eq!(a.len(), 5);
        assert!(a["detail"].string_value().unwrap().ends_with('…'));
        // More than the detail can give: the largest ordinary attribute goes, the marker
        // stays.
        let mut a = start.clone();
        fit_message_size("body", &mut a, total - 150, "detail", &keep);
        assert!(message_bytes("body", &a) <= total - 150);
        assert_eq!(a["detail"].string_value(), Some("…"));
        assert!(a.contains_key("marker") && a.contains_key("small"));
        assert!(!a.contains_key("big"));
        // Less room: the detail goes, then `keep` from its end.
        let mut a = start.clone();
        fit_message_size("body", &mut a, 4 + 6 + 6 + 1 + 6 + 6 + 1, "detail", &keep);
        assert_eq!(a.len(), 2, "{a:?}");
        let mut a = start.clone();
        fit_message_size("body", &mut a, 4 + 6 + 6 + 1, "detail", &keep);
        assert_eq!(a.keys().collect::<Vec<_>>(), ["marker"]);
        let mut a = start.clone();
        fit_message_size("body", &mut a, 4, "detail", &keep);
        assert!(a.is_empty());
    }

    #[test]
    fn visibility_rounds_up_and_caps() {
        assert_eq!(visibility_seconds(Duration::from_millis(1)), 1);
        assert_eq!(visibility_seconds(Duration::from_secs(5)), 5);
        assert_eq!(visibility_seconds(Duration::from_millis(5_001)), 6);
        assert_eq!(visibility_seconds(Duration::from_secs(100_000)), 43_199);
        assert_eq!(visibility_seconds(Duration::ZERO), 0);
    }
}
