//! `sqs-worker demo`: the whole story in one command on LocalStack.
//!
//! Sends orders to the local `orders` queue — some twice, one that fails once, one that is
//! not JSON — runs the worker with a sample handler until idle and prints what happened.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::Context;
use async_trait::async_trait;
use tokio_util::sync::CancellationToken;

use super::args::DemoArgs;
use sqs_worker::handler::{Handler, HandlerError, Job};
use sqs_worker::message::KeySpec;
use sqs_worker::sqs::{OutgoingMessage, SqsQueue};
use sqs_worker::worker::{RunSummary, Worker, WorkerConfig};

/// The demo's handler: "charges" an order. An order with `"flaky": true` fails its first
/// attempt, as a payment gateway timing out would.
#[derive(Debug, Default)]
pub struct SampleHandler {
    charges: AtomicU64,
}

#[async_trait]
impl Handler for SampleHandler {
    async fn handle(&self, job: &mut Job) -> Result<(), HandlerError> {
        let order = job
            .json()
            .ok_or_else(|| HandlerError::permanent("order is not JSON"))?;
        let amount = order["amount_cents"].as_u64().unwrap_or(0);
        if order["flaky"].as_bool() == Some(true) && job.attempt() == 1 {
            return Err(HandlerError::retryable(
                "payment gateway timed out (simulated)",
            ));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        self.charges.fetch_add(1, Ordering::Relaxed);
        tracing::info!(
            order = job.key(),
            amount_cents = amount,
            attempt = job.attempt(),
            "charged order"
        );
        Ok(())
    }
}

/// Where the demo checkpoints without a `DATABASE_URL`: a SQLite file in the temp dir, kept
/// between runs (each run uses fresh order ids), so that it can be looked at afterwards.
fn default_store_url() -> String {
    let file = std::env::temp_dir().join("sqs-worker-demo.sqlite");
    format!("sqlite://{}", file.display())
}

/// The store as the summary names it: a SQLite file's path, or the URL without password.
fn store_location(database_url: &str) -> String {
    match super::database::sqlite_file(database_url) {
        Some(file) => format!("SQLite file {}", file.display()),
        None => crate::cli::redact_url(database_url),
    }
}

/// The command that shows one of the demo's checkpoints: this very binary (a path relative
/// to the current directory when it is below it, as `target/release/sqs-worker` is), with
/// the database URL in front unless it holds a password.
fn lookup_hint(database_url: &str, key: &str) -> String {
    let binary = std::env::current_exe()
        .ok()
        .map(|exe| {
            let relative = std::env::current_dir()
                .ok()
                .and_then(|dir| exe.strip_prefix(dir).ok().map(|p| p.to_path_buf()));
            match relative {
                Some(path) => format!("./{}", path.display()),
                None => exe.display().to_string(),
            }
        })
        .unwrap_or_else(|| "sqs-worker".into());
    let environment = if crate::cli::redact_url(database_url) == database_url {
        format!("DATABASE_URL={database_url} ")
    } else {
        String::new()
    };
    format!("{environment}{binary} checkpoints show --scope demo --key {key}")
}

/// Run the demo and print its summary on stdout.
pub async fn run(args: DemoArgs, shutdown: CancellationToken) -> anyhow::Result<()> {
    let client = sqs_worker::sqs::local_client(&args.endpoint_url).await;
    let queue = SqsQueue::lookup(client.clone(), &args.queue_name)
        .await
        .with_context(|| {
            format!(
                "queue {:?} not found at {}; start LocalStack and create it with `localstack/up`",
                args.queue_name, args.endpoint_url
            )
        })?;
    let database_url = args.database_url.clone().unwrap_or_else(default_store_url);
    let store = crate::cli::open_migrated_store(&database_url, 8).await?;
    // Fresh order ids per run, so a second demo shows the same story instead of all skips.
    let run_id = chrono::Utc::now().format("%Y%m%d%H%M%S").to_string();
    let orders = args.orders as usize;
    let (bodies, duplicates) = demo_messages(&run_id, orders);
    for (body, delay) in &bodies {
        queue
            .send(OutgoingMessage {
                body: body.clone(),
                attributes: HashMap::new(),
                message_group_id: None,
                deduplication_id: None,
                delay: *delay,
            })
            .await
            .context("sending demo messages failed")?;
    }
    eprintln!(
        "sent {} messages to {}: {orders} orders, {duplicates} duplicate deliveries, 1 poison message",
        bodies.len(),
        queue.url()
    );
    let handler = Arc::new(SampleHandler::default());
    let summary = Worker::new(demo_config(queue.url())?, client, store, handler.clone())
        .with_shutdown(shutdown)
        .run()
        .await?;
    let charges = handler.charges.load(Ordering::Relaxed);
    print_summary(&args, bodies.len(), &summary, charges);
    println!(
        "  {:<34} {}",
        "checkpoints in",
        store_location(&database_url)
    );
    println!();
    println!("look one up with the binary just built (no second build):");
    println!(
        "  {}",
        lookup_hint(&database_url, &format!("demo-{run_id}-001"))
    );
    Ok(())
}

/// The demo's messages: `orders` orders (the second one flaky), a duplicate delivery of
/// every third (same key, new MessageId, arriving a little later as redeliveries do), and
/// one that is not JSON. Returns them with the number of duplicates.
fn demo_messages(run_id: &str, orders: usize) -> (Vec<(String, Option<Duration>)>, usize) {
    let mut bodies: Vec<(String, Option<Duration>)> = (1..=orders)
        .map(|i| {
            let order = serde_json::json!({
                "order_id": format!("demo-{run_id}-{i:03}"),
                "amount_cents": 1000 + i * 25,
                "flaky": i == 2,
            });
            (order.to_string(), None)
        })
        .collect();
    let duplicates = (orders / 3).max(1);
    for i in 0..duplicates {
        let (body, _) = bodies[i * 3 % orders].clone();
        bodies.push((body, Some(Duration::from_secs(3))));
    }
    bodies.push(("this is not JSON {".to_owned(), None));
    (bodies, duplicates)
}

/// The worker's config for the demo: keyed by order id, quick retries, exit when idle.
fn demo_config(queue_url: &str) -> anyhow::Result<WorkerConfig> {
    let mut config = WorkerConfig::new(queue_url);
    config.scope = Some("demo".into());
    config.key = KeySpec::new(vec!["/order_id".into()]).map_err(anyhow::Error::msg)?;
    config.backoff_base = Duration::from_secs(1);
    // Short polls: after the idle period the worker lets in-flight polls finish before exit.
    config.wait_time = Duration::from_secs(2);
    config.exit_when_idle = Some(Duration::from_secs(5));
    Ok(config)
}

fn print_summary(args: &DemoArgs, sent: usize, summary: &RunSummary, charges: u64) {
    let line = |label: &str, count: u64| println!("  {label:<34} {count:>5}");
    println!();
    println!("demo summary (scope \"demo\", queue {})", args.queue_name);
    line("messages sent", sent as u64);
    line("messages received", summary.received);
    line("orders processed (charged once)", summary.processed);
    line("duplicate deliveries skipped", summary.duplicates_skipped);
    line("retried after a failure", summary.retried);
    line(
        &format!("sent to {}-dlq", args.queue_name),
        summary.sent_to_dlq,
    );
    line("charges made by the handler", charges);
}

#[cfg(test)]
mod tests {
    use super::lookup_hint;

    #[test]
    fn the_hint_names_the_built_binary_and_keeps_passwords_out() {
        let hint = lookup_hint("postgres://postgres@127.0.0.1:5432/postgres", "demo-1-001");
        assert!(!hint.contains("cargo"), "no second build: {hint}");
        assert!(
            hint.starts_with("DATABASE_URL=postgres://postgres@127.0.0.1:5432/postgres "),
            "{hint}"
        );
        assert!(
            hint.ends_with(" checkpoints show --scope demo --key demo-1-001"),
            "{hint}"
        );
        let exe = std::env::current_exe().unwrap();
        let name = exe.file_name().unwrap().to_string_lossy();
        assert!(hint.contains(name.as_ref()), "{hint}");
        let secret = lookup_hint("postgres://app:s3cret@db/x", "k");
        assert!(
            !secret.contains("s3cret") && !secret.contains("DATABASE_URL="),
            "{secret}"
        );
    }
}
