//! `SqsQueue`: every SQS call the crate makes, on one queue.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use aws_sdk_sqs::Client;
use aws_sdk_sqs::types::{
    ChangeMessageVisibilityBatchRequestEntry, DeleteMessageBatchRequestEntry,
    MessageSystemAttributeName, QueueAttributeName,
};

use super::error::SqsError;
use super::types::{
    BatchEntryFailure, DEFAULT_MAX_MESSAGE_BYTES, MessageCounts, OutgoingMessage, ReceivedMessage,
    RedrivePolicy, queue_name_from_url, visibility_seconds,
};

/// One queue and the client that reaches it.
#[derive(Debug, Clone)]
pub struct SqsQueue {
    pub(super) client: Client,
    pub(super) url: String,
    /// MaximumMessageSize, read on first use (the clones of a queue share it).
    pub(super) max_message_bytes: Arc<tokio::sync::OnceCell<usize>>,
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

    pub(super) async fn queue_attributes(
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
        // The output is ours: its strings move into the messages instead of being copied
        // (a body can be 1 MiB, and ten of them come per call).
        Ok(output
            .messages
            .unwrap_or_default()
            .into_iter()
            .map(|m| ReceivedMessage {
                message_id: m.message_id.unwrap_or_default(),
                receipt_handle: m.receipt_handle.unwrap_or_default(),
                body: m.body.unwrap_or_default(),
                system_attributes: m
                    .attributes
                    .map(|a| {
                        a.into_iter()
                            .map(|(k, v)| (k.as_str().to_owned(), v))
                            .collect()
                    })
                    .unwrap_or_default(),
                message_attributes: m.message_attributes.unwrap_or_default(),
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

pub(super) fn batch_failures(
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
