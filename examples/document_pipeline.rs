//! The checkpoint as the idempotency key of a document pipeline.
//!
//! Each SQS event names one document of a case:
//! `{"case_id": 7, "batch_id": "b1-…", "document_id": "d-001", "text": "…"}`, keyed by the
//! composite key `/case_id` + `/batch_id` + `/document_id`. The handler runs three steps:
//!
//! 1. `fetch` ([`Job::step`]): "fetches" the document;
//! 2. `transform` ([`Job::step`]): counts words and hashes the text with SHA-256;
//! 3. `store` ([`Job::step_tx`]): inserts the document into `pipeline_documents` and its
//!    content hash into `pipeline_doc_dedupe` (unique per case), in the transaction that also
//!    records the step, so both writes happen exactly once per event.
//!
//! The example sends six documents (one a copy of another's text, to show the dedupe table),
//! two duplicate deliveries, and makes one document fail `transform` on its first attempt.
//! The retry resumes after `fetch`: the summary shows `fetch` ran once per document, not
//! once per attempt. Every run uses a fresh batch id, so running it again tells the same story.
//!
//! Run it (from the repository root):
//!
//! ```sh
//! localstack/up && cargo run --example document_pipeline
//! ```
//!
//! `DATABASE_URL` (default `postgres://postgres@127.0.0.1:5432/postgres`) and
//! `AWS_ENDPOINT_URL` (default `http://127.0.0.1:4566`) point it elsewhere; `RUST_LOG` sets
//! the log filter (default `info`). Logs go to stderr, the summary to stdout.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::Context;
use aws_sdk_sqs::types::QueueAttributeName;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use sqs_worker::message::KeySpec;
use sqs_worker::{Handler, HandlerError, Job, StoreKind, Worker, WorkerConfig};

const QUEUE: &str = "documents";
const DLQ: &str = "documents-dlq";
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
#[derive(Debug, Default)]
struct DocumentPipeline {
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
            .step_tx("store", |tx| {
                Box::pin(async move {
                    self.store_runs.fetch_add(1, Ordering::Relaxed);
                    sqlx::query(
                        "insert into pipeline_documents \
                             (case_id, batch_id, document_id, sha256, words) \
                         values ($1, $2, $3, $4, $5) on conflict do nothing",
                    )
                    .bind(doc.case_id)
                    .bind(&doc.batch_id)
                    .bind(&doc.document_id)
                    .bind(&facts.sha256)
                    .bind(facts.words)
                    .execute(&mut **tx)
                    .await?;
                    let first = sqlx::query(
                        "insert into pipeline_doc_dedupe \
                             (case_id, sha256, first_batch_id, first_document_id) \
                         values ($1, $2, $3, $4) on conflict do nothing",
                    )
                    .bind(doc.case_id)
                    .bind(&facts.sha256)
                    .bind(&doc.batch_id)
                    .bind(&doc.document_id)
                    .execute(&mut **tx)
                    .await?;
                    Ok(Stored {
                        first_copy_in_case: first.rows_affected() == 1,
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

    /// The `store` step writes in PostgreSQL's transaction: a worker on another store
    /// refuses to start.
    fn step_transactions(&self) -> Option<StoreKind> {
        Some(StoreKind::Postgres)
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
                tracing_subscriber::EnvFilter::new("info,sqlx::postgres::notice=warn")
            }),
        )
        .with_writer(std::io::stderr)
        .init();

    let database_url = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
    let endpoint =
        std::env::var("AWS_ENDPOINT_URL").unwrap_or_else(|_| "http://127.0.0.1:4566".into());

    let pool = sqs_worker::connect_database(&database_url, 8)
        .await
        .with_context(|| format!("cannot connect to {database_url}; run localstack/up"))?;
    sqs_worker::MIGRATOR.run(&pool).await?;
    sqlx::query(
        "create table if not exists pipeline_documents (
             case_id bigint not null,
             batch_id text not null,
             document_id text not null,
             sha256 text not null,
             words int not null,
             primary key (case_id, batch_id, document_id))",
    )
    .execute(&pool)
    .await?;
    sqlx::query(
        "create table if not exists pipeline_doc_dedupe (
             case_id bigint not null,
             sha256 text not null,
             first_batch_id text not null,
             first_document_id text not null,
             primary key (case_id, sha256))",
    )
    .execute(&pool)
    .await?;

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
    let pipeline = Arc::new(DocumentPipeline::default());
    let summary = Worker::builder()
        .config(config)
        .sqs_client(client)
        .pool(pool.clone())
        .shared_handler(pipeline.clone())
        .build()?
        .run()
        .await?;

    let rows: i64 =
        sqlx::query_scalar("select count(*) from pipeline_documents where batch_id = $1")
            .bind(&batch_id)
            .fetch_one(&pool)
            .await?;
    let contents: i64 =
        sqlx::query_scalar("select count(*) from pipeline_doc_dedupe where first_batch_id = $1")
            .bind(&batch_id)
            .fetch_one(&pool)
            .await?;
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
    line("step runs: store", &runs(&pipeline.store_runs));
    line("rows in pipeline_documents (this batch)", &rows);
    line("distinct contents in pipeline_doc_dedupe", &contents);
    println!();
    println!(
        "look one up: DATABASE_URL={database_url} cargo run -- checkpoints show \
         --scope documents --key '7|{batch_id}|{FLAKY_DOCUMENT}'"
    );

    let documents = events.len();
    anyhow::ensure!(
        rows as usize == documents && summary.processed as usize == documents,
        "expected {documents} documents stored and processed, got {rows} rows and {} processed",
        summary.processed
    );
    anyhow::ensure!(
        runs(&pipeline.fetch_runs) == documents && runs(&pipeline.store_runs) == documents,
        "fetch and store should run once per document"
    );
    anyhow::ensure!(
        runs(&pipeline.transform_runs) == documents + 1,
        "transform should run once per document, plus the one failed attempt"
    );
    Ok(())
}
