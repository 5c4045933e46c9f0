//! Queues on LocalStack: fresh queue pairs, sends, message counts and peeks, on any queue
//! URL ([`super::TestEnv`] has the same for its own queue pair).

use std::time::{Duration, Instant};

use aws_sdk_sqs::Client;
use aws_sdk_sqs::types::{Message, MessageAttributeValue, QueueAttributeName};
use sqs_worker::message;

use super::unique;

/// What queue pair a test needs; [`super::TestEnvBuilder`] sets it, [`super::TestEnv::add_queue`]
/// takes one for a second pair.
#[derive(Clone, Debug)]
pub struct QueueSpec {
    /// A DLQ behind the queue (a FIFO one for a FIFO queue).
    pub dlq: bool,
    /// SQS's maxReceiveCount: receives before SQS moves a message to the DLQ.
    pub max_receive: u32,
    /// A FIFO queue (content-based deduplication on).
    pub fifo: bool,
    /// The queue's default visibility timeout, in seconds.
    pub visibility: u32,
}

impl Default for QueueSpec {
    /// What most tests use: a standard queue with a DLQ after 5 receives, visibility 30 s.
    fn default() -> Self {
        Self {
            dlq: true,
            max_receive: 5,
            fifo: false,
            visibility: 30,
        }
    }
}

/// A queue and its DLQ, if it has one.
#[derive(Clone, Debug)]
pub struct QueuePair {
    /// The queue the workers read.
    pub url: String,
    /// Its DLQ.
    pub dlq_url: Option<String>,
}

impl QueuePair {
    /// Every URL of the pair, for deleting them.
    pub fn urls(&self) -> impl Iterator<Item = &String> {
        std::iter::once(&self.url).chain(&self.dlq_url)
    }
}

/// Create a fresh queue pair as `spec` says, under a name no other test uses.
pub async fn create_queue_pair(client: &Client, spec: &QueueSpec) -> QueuePair {
    let base = unique("q").replace('_', "-");
    let name = |suffix: &str| {
        let fifo = if spec.fifo { ".fifo" } else { "" };
        format!("{base}{suffix}{fifo}")
    };
    let mut dlq_url = None;
    let mut create = client.create_queue().queue_name(name("")).attributes(
        QueueAttributeName::VisibilityTimeout,
        spec.visibility.to_string(),
    );
    if spec.fifo {
        create = create
            .attributes(QueueAttributeName::FifoQueue, "true")
            .attributes(QueueAttributeName::ContentBasedDeduplication, "true");
    }
    if spec.dlq {
        let mut dlq = client.create_queue().queue_name(name("-dlq"));
        if spec.fifo {
            dlq = dlq.attributes(QueueAttributeName::FifoQueue, "true");
        }
        let dlq = dlq
            .send()
            .await
            .expect("LocalStack must be running: localstack/up");
        let url = dlq.queue_url().unwrap().to_owned();
        let arn = queue_arn(client, &url).await;
        create = create.attributes(
            QueueAttributeName::RedrivePolicy,
            serde_json::json!({"deadLetterTargetArn": arn, "maxReceiveCount": spec.max_receive.to_string()})
                .to_string(),
        );
        dlq_url = Some(url);
    }
    let output = create
        .send()
        .await
        .expect("LocalStack must be running: localstack/up");
    QueuePair {
        url: output.queue_url().unwrap().to_owned(),
        dlq_url,
    }
}

/// A queue's ARN (for Lambda event records and redrive policies).
pub async fn queue_arn(client: &Client, queue_url: &str) -> String {
    client
        .get_queue_attributes()
        .queue_url(queue_url)
        .attribute_names(QueueAttributeName::QueueArn)
        .send()
        .await
        .unwrap()
        .attributes()
        .unwrap()[&QueueAttributeName::QueueArn]
        .clone()
}

/// Send `body` to any queue with String attributes `(name, value)`; returns the message id.
pub async fn send_with_attributes(
    client: &Client,
    queue_url: &str,
    body: &str,
    attributes: &[(&str, &str)],
) -> String {
    let mut send = client
        .send_message()
        .queue_url(queue_url)
        .message_body(body);
    for (name, value) in attributes {
        send = send.message_attributes(*name, sqs_worker::sqs::string_attribute(*value));
    }
    send.send().await.unwrap().message_id().unwrap().to_owned()
}

/// The markers of a redrive's final pass with `redrive_count` (which a hostile sender may
/// make anything): what `redrive` puts on a message's last chance.
pub fn final_pass_markers(redrive_count: &str) -> [(&'static str, &str); 3] {
    [
        (message::ATTR_DLQ_REDRIVEN, "true"),
        (message::ATTR_REDRIVE_COUNT, redrive_count),
        (message::ATTR_DLQ_FINAL_PASS, "true"),
    ]
}

/// The sum of some of a queue's approximate message counts.
async fn count_messages(client: &Client, queue_url: &str, counts: &[QueueAttributeName]) -> u64 {
    let output = client
        .get_queue_attributes()
        .queue_url(queue_url)
        .set_attribute_names(Some(counts.to_vec()))
        .send()
        .await
        .unwrap();
    output
        .attributes()
        .unwrap()
        .values()
        .map(|v| v.parse::<u64>().unwrap())
        .sum()
}

/// Visible + in flight + delayed messages: zero means nothing is left to do.
pub async fn messages_in(client: &Client, queue_url: &str) -> u64 {
    count_messages(
        client,
        queue_url,
        &[
            QueueAttributeName::ApproximateNumberOfMessages,
            QueueAttributeName::ApproximateNumberOfMessagesNotVisible,
            QueueAttributeName::ApproximateNumberOfMessagesDelayed,
        ],
    )
    .await
}

/// Messages received by someone and not yet deleted or visible again.
pub async fn messages_not_visible(client: &Client, queue_url: &str) -> u64 {
    count_messages(
        client,
        queue_url,
        &[QueueAttributeName::ApproximateNumberOfMessagesNotVisible],
    )
    .await
}

/// Receive up to `expected` messages (for asserting a queue's contents, attributes
/// included), trying for at most `within`, then make them visible again.
pub async fn peek_all(
    client: &Client,
    queue_url: &str,
    expected: usize,
    within: Duration,
) -> Vec<Message> {
    let deadline = Instant::now() + within;
    let mut found = Vec::new();
    while found.len() < expected && Instant::now() < deadline {
        let output = client
            .receive_message()
            .queue_url(queue_url)
            .max_number_of_messages(10)
            .wait_time_seconds(1)
            .visibility_timeout(30)
            .message_attribute_names("All")
            .send()
            .await
            .unwrap();
        found.extend(output.messages().iter().cloned());
    }
    for message in &found {
        client
            .change_message_visibility()
            .queue_url(queue_url)
            .receipt_handle(message.receipt_handle().unwrap())
            .visibility_timeout(0)
            .send()
            .await
            .unwrap();
    }
    found
}

/// A received message's String attribute `name`, if it has one.
pub fn string_attribute(message: &Message, name: &str) -> Option<String> {
    message
        .message_attributes()
        .and_then(|a| a.get(name))
        .and_then(MessageAttributeValue::string_value)
        .map(str::to_owned)
}
