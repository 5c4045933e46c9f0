//! `run`, `lambda` and `send`: the worker as a service, as a Lambda handler, and a message
//! sent by hand.

use std::collections::HashMap;
use std::sync::Arc;

use anyhow::Context;
use aws_sdk_sqs::types::MessageAttributeValue;
use sqs_worker::StoreKind;
use sqs_worker::lambda::LambdaWorker;
use sqs_worker::message::KeySpec;
use sqs_worker::message::trace::{TRACEPARENT, TRACESTATE};
use sqs_worker::spans::{self, TraceHeaders};
use sqs_worker::sqs::{OutgoingMessage, SqsQueue};
use sqs_worker::telemetry::Readiness;
use sqs_worker::worker::{RunSummary, Worker};
use sqs_worker::{message, sqs, telemetry};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::cli::args::{KeyArgs, LambdaArgs, RunArgs, SendArgs};

use super::database::{open_migrated, store_kind};
use super::output::OperatorError;

/// `sqs-worker run`.
pub async fn run(args: RunArgs, shutdown: CancellationToken) -> anyhow::Result<RunSummary> {
    let deadline = std::time::Instant::now() + args.processing.startup_timeout;
    let mut config = args.worker_config().map_err(OperatorError)?;
    let handler = args.handler.build_handler().map_err(OperatorError)?;
    // The endpoints come first, so that /readyz answers 503 while the start waits out an
    // outage; they outlive the worker's drain by a little and stop when this returns.
    let endpoints = CancellationToken::new();
    let _stop_endpoints = endpoints.clone().drop_guard();
    let readiness = match args.metrics_addr {
        Some(addr) => {
            let prometheus = telemetry::install_recorder()?;
            let readiness = Arc::new(Readiness::new());
            telemetry::serve(addr, prometheus, readiness.clone(), endpoints).await?;
            Some(readiness)
        }
        None => None,
    };
    if !spans::enabled() {
        tracing::info!(
            "tracing off: spans are not exported (set OTEL_EXPORTER_OTLP_ENDPOINT to export them)"
        );
    }
    // The handlers' steps: one connection per running handler at most, opened only when a
    // step asks (a `step_tx` holds one through its transaction). The worker's own statements
    // get a small pool of their own (`CheckpointStore::own_connections`).
    let store = open_migrated(
        &args.database.database_url,
        (config.concurrency as u32).clamp(2, 64),
        args.processing.retention,
        !args.processing.no_migrate,
        deadline,
    )
    .await?;
    if store.kind() == StoreKind::Sqlite {
        tracing::info!(
            "checkpoints are in a SQLite file: local to this host, so every worker of this \
             queue must run here (for several hosts use PostgreSQL)"
        );
    }
    let client = sqs_worker::sqs::client_from_env().await;
    config.startup_timeout = deadline.saturating_duration_since(std::time::Instant::now());
    let mut worker = Worker::new(config, client, store, handler).with_shutdown(shutdown.clone());
    if let Some(readiness) = readiness {
        worker = worker.with_readiness(readiness);
    }
    let summary = worker.run().await?;
    // One JSON line on stdout for scripts and benchmarks (logs are on stderr).
    println!("{}", serde_json::to_string(&summary)?);
    Ok(summary)
}

/// Why `lambda` (serving the runtime API) refuses a SQLite store.
const LAMBDA_REFUSES_SQLITE: &str = "lambda cannot checkpoint in SQLite: Lambda instances share \
    no disk, so each would keep checkpoints of its own; use PostgreSQL (through RDS Proxy)";

/// `sqs-worker lambda`: serve the Lambda runtime API, or run one local invocation on an
/// event file and print the batch response.
pub async fn lambda(args: LambdaArgs) -> anyhow::Result<()> {
    let deadline = std::time::Instant::now() + args.processing.startup_timeout;
    let mut config = args.processing.worker_config("").map_err(OperatorError)?;
    config.concurrency = args.concurrency as usize;
    let handler = args.handler.build_handler().map_err(OperatorError)?;
    // A local invocation on an event file is one process: SQLite serves it (handler tests).
    if args.event.is_none() && store_kind(&args.database.database_url)? == StoreKind::Sqlite {
        return Err(OperatorError(LAMBDA_REFUSES_SQLITE.into()).into());
    }
    let store = open_migrated(
        &args.database.database_url,
        (config.concurrency as u32).clamp(2, 64),
        args.processing.retention,
        !args.processing.no_migrate,
        deadline,
    )
    .await?;
    let client = sqs_worker::sqs::client_from_env().await;
    let worker = LambdaWorker::new(config, client, store, handler);
    let Some(path) = args.event else {
        // Boxed: the runtime's service stack makes a future too deep to lay out inline.
        return Box::pin(worker.run())
            .await
            .map_err(|e| anyhow::anyhow!("the Lambda runtime stopped: {e}"));
    };
    let text = if path.as_os_str() == "-" {
        std::io::read_to_string(std::io::stdin()).context("cannot read the event from stdin")?
    } else {
        std::fs::read_to_string(&path)
            .with_context(|| format!("cannot read the event file {}", path.display()))?
    };
    let event: aws_lambda_events::event::sqs::SqsEvent =
        serde_json::from_str(&text).with_context(|| {
            format!(
                "{} is not an SQS event (a JSON object with a Records array)",
                path.display()
            )
        })?;
    let deadline = std::time::SystemTime::now() + args.event_timeout;
    let response = worker.local().handle(event, deadline).await;
    println!("{}", serde_json::to_string(&response)?);
    Ok(())
}

pub(super) fn key_spec(args: &KeyArgs) -> anyhow::Result<KeySpec> {
    Ok(KeySpec::new(args.keys.clone()).map_err(OperatorError)?)
}

/// A trace context as the message attributes OpenTelemetry's SQS instrumentations use.
fn trace_attributes(trace: TraceHeaders) -> HashMap<String, MessageAttributeValue> {
    let mut attributes = HashMap::new();
    attributes.insert(
        TRACEPARENT.to_owned(),
        sqs::string_attribute(trace.traceparent),
    );
    if let Some(state) = trace.tracestate {
        attributes.insert(TRACESTATE.to_owned(), sqs::string_attribute(state));
    }
    attributes
}

/// `sqs-worker send`: one message per line of standard input.
pub async fn send(args: SendArgs) -> anyhow::Result<()> {
    use std::io::BufRead;
    let queue = SqsQueue::new(sqs::client_from_env().await, args.queue_url.clone());
    let fifo = queue.url().ends_with(".fifo");
    let mut sent = 0;
    for line in std::io::stdin().lock().lines() {
        let line = line.context("reading standard input")?;
        if line.trim().is_empty() {
            continue;
        }
        // Each message starts a trace (or continues the `send` span's, when exported) that
        // the worker's spans join.
        let span = spans::send(queue.name());
        let trace = span
            .in_scope(|| spans::outgoing(None))
            .unwrap_or_else(spans::new_trace);
        let message_id = queue
            .send(OutgoingMessage {
                // FIFO queues need a deduplication id unless content-based deduplication is on.
                deduplication_id: fifo.then(|| message::body_sha256(&line)),
                body: line,
                attributes: trace_attributes(trace),
                message_group_id: args.group_id.clone(),
                delay: None,
            })
            .instrument(span)
            .await?;
        println!("{message_id}");
        sent += 1;
    }
    eprintln!("sent {sent} message(s) to {}", queue.name());
    Ok(())
}
