//! The document pipeline of `document_pipeline.rs` on the DynamoDB store: the same three
//! steps, the `store` step's writes going to a DynamoDB table of the pipeline's own in the
//! step's `TransactWriteItems`, guarded by conditions instead of unique constraints.
//!
//! Each SQS event names one document of a case:
//! `{"case_id": 7, "batch_id": "b1-…", "document_id": "d-001", "text": "…"}`, keyed by the
//! composite key `/case_id` + `/batch_id` + `/document_id`. The handler runs three steps:
//!
//! 1. `fetch` ([`Job::step`]): "fetches" the document;
//! 2. `transform` ([`Job::step`]): counts words and hashes the text with SHA-256;
//! 3. `store` ([`Job::step_tx_dynamodb`]): puts the document's item (`DOC#case#batch#doc`)
//!    into the `pipeline` table and, for the first copy of a content in its case, a dedupe
//!    item (`DEDUPE#case#sha256`, put only if absent); a later copy instead checks that the
//!    dedupe item is there. Those writes and the step's record are one `TransactWriteItems`,
//!    so they happen exactly once per event; if another document of the case claimed the
//!    content between the read and the write, the condition fails, nothing is written, and
//!    the step runs again (seed 001's unique-constraint dedupe, the DynamoDB way).
//!
//! The example sends six documents (one a copy of another's text, to show the dedupe table),
//! two duplicate deliveries, and makes one document fail `transform` on its first attempt.
//! The retry resumes after `fetch`: the summary shows `fetch` ran once per document, not
//! once per attempt. Every run uses a fresh batch id, so running it again tells the same story.
//!
//! Run it (from the repository root):
//!
//! ```sh
//! localstack/up && cargo run --example document_pipeline_dynamodb
//! ```
//!
//! `AWS_ENDPOINT_URL` (default `http://127.0.0.1:4566`, SQS) and `AWS_ENDPOINT_URL_DYNAMODB`
//! (default `http://127.0.0.1:8000`, the local DynamoDB server `localstack/up` starts) point
//! it elsewhere; `RUST_LOG` sets the log filter. Logs go to stderr, the summary to stdout.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::Context;
use aws_sdk_dynamodb::types::{
    AttributeDefinition, AttributeValue, BillingMode, ConditionCheck, KeySchemaElement, KeyType,
    Put, ScalarAttributeType, TransactWriteItem,
};
use aws_sdk_sqs::types::QueueAttributeName;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use sqs_worker::message::KeySpec;
use sqs_worker::store::DynamoStore;
use sqs_worker::{CheckpointStore, Handler, HandlerError, Job, StoreKind, Worker, WorkerConfig};

const QUEUE: &str = "documents-ddb";
const DLQ: &str = "documents-ddb-dlq";
/// The checkpoint table and the pipeline's own table.
const CHECKPOINTS: &str = "sqs-worker-example-checkpoints";
const PIPELINE: &str = "sqs-worker-example-pipeline";
/// This document's `transform` fails on attempt 1, as a flaky OCR service would.
const FLAKY_DOCUMENT: &str = "d-003";

/// The output of `fetch`: what the pipeline would download from a document store.
#[derive(Debug, Serialize, Deserialize)]
struct Fetched {
    case_id: i64,
    batch_id: String,
    document_id: String,
    text: String,
}

/// The output of `transform`.
#[derive(Debug, Serialize, Deserialize)]
struct Transformed {
    sha256: String,
    words: i32,
}

/// The output of `store`.
#[derive(Debug, Serialize, Deserialize)]
struct Stored {
    /// False when the case already had a document with the same content.
    first_copy_in_case: bool,
}

/// Counts how often each step's closure actually ran, across all attempts.
#[derive(Debug)]
struct DocumentPipeline {
    /// The pipeline table's client (reads before the step's writes).
    dynamodb: aws_sdk_dynamodb::Client,
    fetch_runs: AtomicUsize,
    transform_runs: AtomicUsize,
    store_runs: AtomicUsize,
}

#[async_trait::async_trait]
impl Handler for DocumentPipeline {
    async fn handle(&self, job: &mut Job) -> Result<(), HandlerError> {
        let event = job
            .json()
            .ok_or_else(|| HandlerError::permanent("the event is not JSON"))?
            .clone();
        let attempt = job.attempt();
        tracing::info!(
            key = job.key(),
            attempt,
            already_done = ?job.completed_steps(),
            "document pipeline starting"
        );

        let doc: Fetched = job
            .step("fetch", || async {
                self.fetch_runs.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(10)).await;
                serde_json::from_value::<Fetched>(event)
                    .map_err(|e| HandlerError::permanent(format!("not a document event: {e}")))
            })
            .await?;

        let facts: Transformed = job
            .step("transform", || async {
                self.transform_runs.fetch_add(1, Ordering::Relaxed);
                if doc.document_id == FLAKY_DOCUMENT && attempt == 1 {
                    return Err(HandlerError::retryable("OCR service timed out (simulated)"));
                }
                Ok(Transformed {
                    sha256: hex::encode(Sha256::digest(doc.text.as_bytes())),
                    words: doc.text.split_whitespace().count() as i32,
                })
            })
            .await?;

        // The step's future may borrow from the handler and from earlier steps' outputs.
        let (doc, facts) = (&doc, &facts);
        let stored: Stored = job
            .step_tx_dynamodb("store", |tx| {
                Box::pin(async move {
                    self.store_runs.fetch_add(1, Ordering::Relaxed);
                    let s = |v: &str| AttributeValue::S(v.to_owned());
                    let dedupe = format!("DEDUPE#{}#{}", doc.case_id, facts.sha256);
                    // A read is not part of the transaction: the condition below guards it.
                    let seen = self
                        .dynamodb
                        .get_item()
                        .table_name(PIPELINE)
                        .key("pk", s(&dedupe))
                        .consistent_read(true)
                        .send()
                        .await
                        .map_err(|e| HandlerError::retryable(format!("reading {dedupe}: {e}")))?
                        .item
                        .is_some();
                    let document = Put::builder()
                        .table_name(PIPELINE)
                        .item(
                            "pk",
                            s(&format!(
                                "DOC#{}#{}#{}",
                                doc.case_id, doc.batch_id, doc.document_id
                            )),
                        )
                        .item("sha256", s(&facts.sha256))
                        .item("words", AttributeValue::N(facts.words.to_string()))
                        .build()
                        .expect("table and item are set");
                    tx.push(TransactWriteItem::builder().put(document).build());
                    let guard = if seen {
                        let check = ConditionCheck::builder()
                            .table_name(PIPELINE)
                            .key("pk", s(&dedupe))
                            .condition_expression("attribute_exists(pk)")
                            .build()
                            .expect("table, key and condition are set");
                        TransactWriteItem::builder().condition_check(check).build()
                    } else {
                        let first = Put::builder()
                            .table_name(PIPELINE)
                            .item("pk", s(&dedupe))
                            .item("first_batch_id", s(&doc.batch_id))
                            .item("first_document_id", s(&doc.document_id))
                            .condition_expression("attribute_not_exists(pk)")
                            .build()
                            .expect("table and item are set");
                        TransactWriteItem::builder().put(first).build()
                    };
                    tx.push(guard);
                    Ok(Stored {
                        first_copy_in_case: !seen,
                    })
                })
            })
            .await?;

        tracing::info!(
            key = job.key(),
            attempt,
            words = facts.words,
            sha256 = &facts.sha256[..12],
            first_copy_in_case = stored.first_copy_in_case,
            "document stored"
        );
        Ok(())
    }

    /// The `store` step writes in DynamoDB's `TransactWriteItems`: a worker on another
    /// store refuses to start.
    fn step_transactions(&self) -> Option<StoreKind> {
        Some(StoreKind::Dynamodb)
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();

    let endpoint =
        std::env::var("AWS_ENDPOINT_URL").unwrap_or_else(|_| "http://127.0.0.1:4566".into());
    let dynamodb_endpoint = std::env::var("AWS_ENDPOINT_URL_DYNAMODB")
        .unwrap_or_else(|_| "http://127.0.0.1:8000".into());
    let dynamodb = local_dynamodb(&dynamodb_endpoint).await;
    let store = DynamoStore::new(dynamodb.clone(), CHECKPOINTS);
    store.migrate().await.with_context(|| {
        format!("cannot create {CHECKPOINTS} at {dynamodb_endpoint}; run localstack/up")
    })?;
    create_pipeline_table(&dynamodb).await?;

    // The queue and its DLQ. CreateQueue without attributes is idempotent; the redrive
    // policy is then (re)applied, as localstack/up does for `orders`.
    let client = sqs_worker::sqs::local_client(&endpoint).await;
    let dlq_url = client
        .create_queue()
        .queue_name(DLQ)
        .send()
        .await
        .with_context(|| format!("cannot create queue {DLQ} at {endpoint}; run localstack/up"))?
        .queue_url
        .context("CreateQueue returned no URL")?;
    let dlq_arn = client
        .get_queue_attributes()
        .queue_url(&dlq_url)
        .attribute_names(QueueAttributeName::QueueArn)
        .send()
        .await?
        .attributes
        .and_then(|mut a| a.remove(&QueueAttributeName::QueueArn))
        .context("the DLQ has no ARN")?;
    let queue_url = client
        .create_queue()
        .queue_name(QUEUE)
        .send()
        .await?
        .queue_url
        .context("CreateQueue returned no URL")?;
    client
        .set_queue_attributes()
        .queue_url(&queue_url)
        .attributes(QueueAttributeName::VisibilityTimeout, "30")
        .attributes(
            QueueAttributeName::RedrivePolicy,
            serde_json::json!({"deadLetterTargetArn": dlq_arn, "maxReceiveCount": "5"}).to_string(),
        )
        .send()
        .await?;

    // A fresh batch per run. d-005 has the same text as d-002: two documents, one content.
    let run_id = format!(
        "{}-{:04x}",
        chrono::Utc::now().format("%Y%m%d%H%M%S"),
        fastrand::u16(..)
    );
    let batch_id = format!("b1-{run_id}");
    let texts = [
        "Deposition transcript of the first witness, pages one to twelve.",
        "Invoice 4411 for expert review services rendered in March.",
        "Scanned letter from opposing counsel regarding the discovery schedule.",
        "Email thread about the settlement conference date and the agenda.",
        "Invoice 4411 for expert review services rendered in March.",
        "Photograph log for exhibits A through F with capture dates.",
    ];
    let events: Vec<String> = texts
        .iter()
        .enumerate()
        .map(|(i, text)| {
            serde_json::json!({
                "case_id": 7,
                "batch_id": batch_id,
                "document_id": format!("d-{:03}", i + 1),
                // The run id makes each run's contents new to the dedupe table.
                "text": format!("{text} (run {run_id})"),
            })
            .to_string()
        })
        .collect();
    for body in &events {
        client
            .send_message()
            .queue_url(&queue_url)
            .message_body(body)
            .send()
            .await?;
    }
    // Two redeliveries of earlier events: same body, new MessageId, arriving a bit later.
    let duplicates = [&events[0], &events[1]];
    for body in duplicates {
        client
            .send_message()
            .queue_url(&queue_url)
            .message_body(body.as_str())
            .delay_seconds(3)
            .send()
            .await?;
    }
    eprintln!(
        "sent {} messages to {QUEUE}: {} documents of batch {batch_id}, {} duplicate deliveries",
        events.len() + duplicates.len(),
        events.len(),
        duplicates.len()
    );

    let mut config = WorkerConfig::new(&queue_url);
    config.scope = Some("documents".into());
    config.key = KeySpec::new(vec![
        "/case_id".into(),
        "/batch_id".into(),
        "/document_id".into(),
    ])
    .map_err(anyhow::Error::msg)?;
    config.wait_time = Duration::from_secs(2);
    config.backoff_base = Duration::from_secs(1);
    config.exit_when_idle = Some(Duration::from_secs(4));
    let pipeline = Arc::new(DocumentPipeline {
        dynamodb: dynamodb.clone(),
        fetch_runs: AtomicUsize::new(0),
        transform_runs: AtomicUsize::new(0),
        store_runs: AtomicUsize::new(0),
    });
    let summary = Worker::builder()
        .config(config)
        .sqs_client(client)
        .store(Arc::new(store))
        .shared_handler(pipeline.clone())
        .build()?
        .run()
        .await?;

    let rows = count_items(&dynamodb, &format!("DOC#7#{batch_id}#")).await?;
    let contents = first_copies(&dynamodb, &batch_id).await?;
    let runs = |c: &AtomicUsize| c.load(Ordering::Relaxed);
    let line = |label: &str, value: &dyn std::fmt::Display| println!("  {label:<40} {value:>5}");

    println!();
    println!("document pipeline summary (scope \"documents\", batch {batch_id})");
    line("messages sent", &(events.len() + duplicates.len()));
    line("messages received", &summary.received);
    line("documents processed", &summary.processed);
    line("duplicate deliveries skipped", &summary.duplicates_skipped);
    line("retried after a failure", &summary.retried);
    line("sent to the DLQ", &summary.sent_to_dlq);
    line("step runs: fetch", &runs(&pipeline.fetch_runs));
    line(
        "step runs: transform (one failed once)",
        &runs(&pipeline.transform_runs),
    );
    line(
        "step runs: store (+1 per dedupe race)",
        &runs(&pipeline.store_runs),
    );
    line("document items in the pipeline table", &rows);
    line("distinct contents (dedupe items)", &contents);
    println!();
    println!(
        "look one up: AWS_ENDPOINT_URL_DYNAMODB={dynamodb_endpoint} \
         DATABASE_URL=dynamodb://{CHECKPOINTS} cargo run -- checkpoints show \
         --scope documents --key '7|{batch_id}|{FLAKY_DOCUMENT}'"
    );

    let documents = events.len();
    anyhow::ensure!(
        rows == documents && summary.processed as usize == documents,
        "expected {documents} documents stored and processed, got {rows} rows and {} processed",
        summary.processed
    );
    // Two documents share one content: when both read "no dedupe item yet" at once, one
    // transaction is cancelled by its condition and that event is retried, running `store`
    // again (and writing nothing the first time). So `store` runs once per document plus
    // once per retry other than the flaky `transform`'s.
    let race_retries = (summary.retried as usize).saturating_sub(1);
    anyhow::ensure!(
        runs(&pipeline.fetch_runs) == documents,
        "fetch should run once per document"
    );
    anyhow::ensure!(
        runs(&pipeline.store_runs) == documents + race_retries,
        "store should run once per document, plus once per dedupe race ({race_retries})"
    );
    anyhow::ensure!(
        runs(&pipeline.transform_runs) == documents + 1,
        "transform should run once per document, plus the one failed attempt"
    );
    anyhow::ensure!(
        contents == documents - 1,
        "two documents share one content: expected {} dedupe items, got {contents}",
        documents - 1
    );
    Ok(())
}

/// A DynamoDB client for the local endpoint (test credentials unless the environment has
/// some, us-east-1 unless it says otherwise).
async fn local_dynamodb(endpoint: &str) -> aws_sdk_dynamodb::Client {
    let mut loader =
        aws_config::defaults(aws_config::BehaviorVersion::latest()).endpoint_url(endpoint);
    if std::env::var_os("AWS_REGION").is_none() {
        loader = loader.region(aws_config::Region::new("us-east-1"));
    }
    if std::env::var_os("AWS_ACCESS_KEY_ID").is_none() {
        loader = loader.credentials_provider(aws_sdk_dynamodb::config::Credentials::new(
            "test", "test", None, None, "example",
        ));
    }
    aws_sdk_dynamodb::Client::new(&loader.load().await)
}

/// The pipeline's own table (key `pk`), if missing.
async fn create_pipeline_table(dynamodb: &aws_sdk_dynamodb::Client) -> anyhow::Result<()> {
    let created = dynamodb
        .create_table()
        .table_name(PIPELINE)
        .billing_mode(BillingMode::PayPerRequest)
        .attribute_definitions(
            AttributeDefinition::builder()
                .attribute_name("pk")
                .attribute_type(ScalarAttributeType::S)
                .build()?,
        )
        .key_schema(
            KeySchemaElement::builder()
                .attribute_name("pk")
                .key_type(KeyType::Hash)
                .build()?,
        )
        .send()
        .await;
    match created {
        Ok(_) => Ok(()),
        Err(e)
            if e.as_service_error()
                .is_some_and(|e| e.is_resource_in_use_exception()) =>
        {
            Ok(())
        }
        Err(e) => Err(anyhow::anyhow!(
            "cannot create {PIPELINE}: {}",
            aws_sdk_dynamodb::error::DisplayErrorContext(e)
        )),
    }
}

/// Items of the pipeline table whose key starts with `prefix`.
async fn count_items(dynamodb: &aws_sdk_dynamodb::Client, prefix: &str) -> anyhow::Result<usize> {
    let mut count = 0;
    let mut start = None;
    loop {
        let page = dynamodb
            .scan()
            .table_name(PIPELINE)
            .filter_expression("begins_with(pk, :prefix)")
            .expression_attribute_values(":prefix", AttributeValue::S(prefix.into()))
            .consistent_read(true)
            .set_exclusive_start_key(start)
            .send()
            .await?;
        count += page.count() as usize;
        start = page.last_evaluated_key;
        if start.is_none() {
            return Ok(count);
        }
    }
}

/// Dedupe items whose first copy came from this batch.
async fn first_copies(
    dynamodb: &aws_sdk_dynamodb::Client,
    batch_id: &str,
) -> anyhow::Result<usize> {
    let page = dynamodb
        .scan()
        .table_name(PIPELINE)
        .filter_expression("begins_with(pk, :prefix) AND first_batch_id = :batch")
        .expression_attribute_values(":prefix", AttributeValue::S("DEDUPE#7#".into()))
        .expression_attribute_values(":batch", AttributeValue::S(batch_id.into()))
        .consistent_read(true)
        .send()
        .await?;
    Ok(page.count() as usize)
}
