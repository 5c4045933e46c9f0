//! The Lambda adapter: the worker's claim/step/complete core behind an SQS event source.
//!
//! Lambda's poller receives the messages and deletes the ones an invocation does not report
//! as failed (`ReportBatchItemFailures`). So here a "delete" only marks a message settled,
//! and the answer lists every record that was not settled: retryable failures, deliveries
//! of events leased elsewhere, records that could not be claimed, FIFO messages held behind
//! a failure, and anything unfinished at the deadline. Nothing is lost by an error here: an
//! unsettled record is redelivered. Duplicates of complete events are settled (skipped);
//! permanent failures go to the DLQ as in the worker and are settled; a failing final pass
//! is recorded in `dead_letters` and settled.
//!
//! A lease never outlives the invocation: it is capped at the deadline minus a margin, and
//! handlers still running then are stopped and their leases released.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use aws_lambda_events::event::sqs::{BatchItemFailure, SqsBatchResponse, SqsEvent, SqsMessage};
use aws_sdk_sqs::primitives::Blob;
use aws_sdk_sqs::types::MessageAttributeValue;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::handler::Handler;
use crate::spans;
use crate::sqs::{ReceivedMessage, SqsQueue};
use crate::store::CheckpointStore;
use crate::worker::{
    BatchContext, BatchTokens, Core, CoreParts, HANDLER_STOP_GRACE, Mode, Shared, WorkerConfig,
    handle_batch,
};

/// Runs a handler for SQS events delivered by Lambda.
pub struct LambdaWorker {
    config: WorkerConfig,
    client: aws_sdk_sqs::Client,
    store: Arc<dyn CheckpointStore>,
    handler: Arc<dyn Handler>,
    change_visibility: bool,
    /// One core per event source queue (normally one), started at its first record.
    cores: tokio::sync::Mutex<HashMap<String, Core>>,
}

impl LambdaWorker {
    /// A Lambda worker. `config.queue_url` is ignored: each record names its queue by ARN.
    pub fn new(
        config: WorkerConfig,
        client: aws_sdk_sqs::Client,
        store: Arc<dyn CheckpointStore>,
        handler: Arc<dyn Handler>,
    ) -> Self {
        Self {
            config,
            client,
            store,
            handler,
            change_visibility: true,
            cores: tokio::sync::Mutex::new(HashMap::new()),
        }
    }

    /// For local runs on an event file: receipt handles are made up, so leave SQS
    /// visibility alone (retries then come back after the queue's visibility timeout).
    pub fn local(mut self) -> Self {
        self.change_visibility = false;
        self
    }

    /// Serve the Lambda runtime API until the environment shuts down.
    pub async fn run(self) -> Result<(), lambda_runtime::Error> {
        crate::handler::check_step_transactions(&*self.handler, &*self.store)?;
        if self.store.kind() == crate::store::StoreKind::Sqlite {
            return Err(
                "a Lambda worker cannot checkpoint in SQLite: instances share no disk".into(),
            );
        }
        let worker = Arc::new(self);
        lambda_runtime::run(lambda_runtime::service_fn(
            move |event: lambda_runtime::LambdaEvent<SqsEvent>| {
                let worker = worker.clone();
                async move {
                    let deadline = event.context.deadline();
                    let invocation = Invocation {
                        trace_header: event.context.xray_trace_id.as_deref(),
                        request_id: &event.context.request_id,
                    };
                    // Boxed: the runtime's service stack makes a future too deep to lay out
                    // inline.
                    let response =
                        Box::pin(worker.handle_invocation(event.payload, deadline, invocation));
                    Ok::<_, lambda_runtime::Error>(response.await)
                }
            },
        ))
        .await
    }

    /// One invocation: process `event`, finishing before `deadline`. Returns the records to
    /// retry. Its trace continues `_X_AMZN_TRACE_ID` when that is set.
    pub async fn handle(&self, event: SqsEvent, deadline: SystemTime) -> SqsBatchResponse {
        let trace_header = std::env::var("_X_AMZN_TRACE_ID").ok();
        let invocation = Invocation {
            trace_header: trace_header.as_deref(),
            request_id: "",
        };
        self.handle_invocation(event, deadline, invocation).await
    }

    /// [`LambdaWorker::handle`] in an `invocation` span, whose spans are exported before the
    /// answer: Lambda may freeze the process once it has answered.
    pub async fn handle_invocation(
        &self,
        event: SqsEvent,
        deadline: SystemTime,
        invocation: Invocation<'_>,
    ) -> SqsBatchResponse {
        let records: Vec<(String, ReceivedMessage)> = event
            .records
            .into_iter()
            .map(|record| {
                (
                    record.event_source_arn.clone().unwrap_or_default(),
                    received(record),
                )
            })
            .collect();
        let messages: Vec<ReceivedMessage> = records.iter().map(|(_, m)| m.clone()).collect();
        let span = spans::invocation(invocation.trace_header, invocation.request_id, &messages);
        drop(messages);
        let response = self.handle_records(records, deadline, &span).await;
        drop(span);
        spans::flush().await;
        response
    }

    async fn handle_records(
        &self,
        records: Vec<(String, ReceivedMessage)>,
        deadline: SystemTime,
        span: &spans::InvocationSpan,
    ) -> SqsBatchResponse {
        let remaining = deadline
            .duration_since(SystemTime::now())
            .unwrap_or_default();
        // Stop short of the deadline: the answer must reach Lambda while the invocation lives.
        let margin = margin_for(remaining);
        let finish_by = Instant::now() + remaining.saturating_sub(margin);

        let mut by_source: Vec<(String, Vec<ReceivedMessage>)> = Vec::new();
        for (source, message) in records {
            match by_source.iter_mut().find(|(s, _)| *s == source) {
                Some((_, messages)) => messages.push(message),
                None => by_source.push((source, vec![message])),
            }
        }
        let mut response = SqsBatchResponse::default();
        let limits = Limits { finish_by, margin };
        for (source, messages) in by_source {
            let failed = self.process(&source, &messages, limits, span).await;
            for message in failed {
                let mut failure = BatchItemFailure::default();
                failure.item_identifier = message.message_id.clone();
                response.batch_item_failures.push(failure);
            }
        }
        tracing::info!(
            failures = response.batch_item_failures.len(),
            "invocation done"
        );
        response
    }

    /// Process one source queue's records; returns the ones not settled.
    async fn process<'m>(
        &self,
        source: &str,
        messages: &'m [ReceivedMessage],
        Limits { finish_by, margin }: Limits,
        span: &spans::InvocationSpan,
    ) -> Vec<&'m ReceivedMessage> {
        let shared = match self.core_for(source).await {
            Ok(shared) => shared,
            Err(error) => {
                tracing::error!(%error, source, "cannot start processing this queue's records; reporting them all as failed");
                return messages.iter().collect();
            }
        };
        shared.count_received(messages.len());
        // Settled receipts of earlier invocations (a task that settled after its invocation
        // answered) are of no use any more: one invocation runs at a time.
        shared.mode().forget_settled();
        let tracker = TaskTracker::new();
        // What is left after `finish_by` must fit in the margin before the deadline: stopped
        // handlers get a quarter of it, handing back the rest.
        let tokens = BatchTokens {
            stop: CancellationToken::new(),
            abandon: CancellationToken::new(),
            stop_grace: (margin / 4).min(HANDLER_STOP_GRACE),
        };
        let semaphore = Arc::new(Semaphore::new(self.config.concurrency));
        let deadline = tokio::time::Instant::from_std(finish_by);
        'chunks: for chunk in messages.chunks(10) {
            let mut permits = Vec::with_capacity(chunk.len());
            for _ in chunk {
                match tokio::time::timeout_at(deadline, semaphore.clone().acquire_owned()).await {
                    Ok(permit) => permits.push(permit.expect("semaphore never closed")),
                    // Out of time: the rest stays unsettled and is reported failed.
                    Err(_) => break 'chunks,
                }
            }
            let context = BatchContext {
                received_at: Instant::now(),
                lease_cap: Some(finish_by),
                tokens: tokens.clone(),
                rechecks: 0,
                parent: span.context().cloned(),
            };
            // Claim retries and visibility changes must not outlast the invocation either:
            // what is not started by then is reported failed and redelivered.
            let handled = tokio::time::timeout_at(
                deadline,
                handle_batch(&shared, &tracker, chunk.to_vec(), permits, &context),
            )
            .await;
            if handled.is_err() {
                tracing::warn!(
                    "the invocation deadline is near; not claiming the rest of the records"
                );
                break;
            }
        }
        tracker.close();
        if tokio::time::timeout_at(deadline, tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                "the invocation deadline is near; stopping the handlers still running and \
                 reporting their records as failed"
            );
            tokens.abandon.cancel();
            let _ = tokio::time::timeout(margin / 2, tracker.wait()).await;
        }
        shared.mode().unsettled(messages)
    }

    /// The core for a source queue, started on first use.
    async fn core_for(&self, source: &str) -> Result<Arc<Shared>, crate::worker::WorkerError> {
        let mut cores = self.cores.lock().await;
        if let Some(core) = cores.get(source) {
            return Ok(core.shared.clone());
        }
        let url = self.queue_url(source).await;
        let mut config = self.config.clone();
        config.queue_url = url.clone();
        // Leases are capped at the invocation deadline instead.
        config.heartbeat = false;
        let core = Core::start(
            CoreParts {
                config,
                sqs: SqsQueue::new(self.client.clone(), url),
                store: self.store.clone(),
                handler: self.handler.clone(),
                readiness: None,
            },
            Mode::lambda(self.change_visibility),
        )
        .await?;
        let shared = core.shared.clone();
        cores.insert(source.to_owned(), core);
        Ok(shared)
    }

    /// The queue URL for an event source ARN (`arn:aws:sqs:REGION:ACCOUNT:NAME`): asked of
    /// SQS (which also works with custom endpoints), else built from the ARN.
    async fn queue_url(&self, source: &str) -> String {
        let parts: Vec<&str> = source.split(':').collect();
        let (region, account, name) = match parts.as_slice() {
            [_, _, _, region, account, name] => (*region, *account, *name),
            _ => {
                tracing::warn!(
                    source,
                    "the record has no usable eventSourceARN; the queue name is unknown"
                );
                ("unknown", "unknown", "unknown")
            }
        };
        match SqsQueue::lookup(self.client.clone(), name).await {
            Ok(queue) => queue.url().to_owned(),
            Err(error) => {
                tracing::warn!(%error, queue = name, "cannot look the queue up; building its URL from the ARN (no DLQ will be found)");
                format!("https://sqs.{region}.amazonaws.com/{account}/{name}")
            }
        }
    }
}

/// What the runtime says about an invocation, for its span.
#[derive(Debug, Clone, Copy, Default)]
pub struct Invocation<'a> {
    /// The X-Ray trace header of the invocation (`_X_AMZN_TRACE_ID`), the batch's parent.
    pub trace_header: Option<&'a str>,
    /// Lambda's request id.
    pub request_id: &'a str,
}

/// When an invocation's work must end, and the margin kept before its deadline.
#[derive(Clone, Copy)]
struct Limits {
    finish_by: Instant,
    margin: Duration,
}

/// How long before the deadline an invocation stops working: a tenth of its time, between
/// 0.2 s and 2 s, for stopping handlers, handing back and answering.
fn margin_for(remaining: Duration) -> Duration {
    (remaining / 10).clamp(Duration::from_millis(200), Duration::from_secs(2))
}

/// A Lambda record as the core's received message.
fn received(record: SqsMessage) -> ReceivedMessage {
    let message_id = record.message_id.unwrap_or_default();
    let message_attributes = record
        .message_attributes
        .into_iter()
        .filter_map(|(name, attribute)| {
            let mut value =
                MessageAttributeValue::builder().data_type(attribute.data_type.unwrap_or_default());
            if let Some(text) = attribute.string_value {
                value = value.string_value(text);
            }
            if let Some(binary) = attribute.binary_value {
                value = value.binary_value(Blob::new(binary.0));
            }
            Some((name, value.build().ok()?))
        })
        .collect();
    ReceivedMessage {
        // Without a receipt handle (hand-written events) the message id tells records apart.
        receipt_handle: record
            .receipt_handle
            .filter(|r| !r.is_empty())
            .unwrap_or_else(|| format!("local:{message_id}")),
        message_id,
        body: record.body.unwrap_or_default(),
        system_attributes: record.attributes,
        message_attributes,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_become_received_messages() {
        let event: SqsEvent = serde_json::from_value(serde_json::json!({
            "Records": [{
                "messageId": "m-1",
                "receiptHandle": "r-1",
                "body": "{\"order_id\":\"o-1\"}",
                "attributes": {"ApproximateReceiveCount": "2", "MessageGroupId": "g"},
                "messageAttributes": {
                    "dlq_final_pass": {"stringValue": "true", "dataType": "String",
                                       "stringListValues": [], "binaryListValues": []}
                },
                "eventSourceARN": "arn:aws:sqs:us-east-1:000000000000:orders"
            }, {
                "messageId": "m-2",
                "body": "x"
            }]
        }))
        .unwrap();
        let mut records = event.records.into_iter().map(received);
        let first = records.next().unwrap();
        assert_eq!(first.receipt_handle, "r-1");
        assert_eq!(first.message_group_id(), Some("g"));
        let markers = crate::message::parse_markers(first.attribute_strings());
        assert!(markers.final_pass);
        let second = records.next().unwrap();
        assert_eq!(second.receipt_handle, "local:m-2");
        assert_eq!(second.body, "x");
    }
}
