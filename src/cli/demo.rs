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
use sqs_worker::store::PostgresStore;
use sqs_worker::worker::{Worker, WorkerConfig};

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
    let pool = crate::cli::connect(&args.database_url, 8).await?;
    sqs_worker::MIGRATOR
        .run(&pool)
        .await
        .context("applying migrations failed")?;

    // Fresh order ids per run, so a second demo shows the same story instead of all skips.
    let run_id = chrono::Utc::now().format("%Y%m%d%H%M%S").to_string();
    let orders = args.orders as usize;
    let mut bodies: Vec<(String, Option<Duration>)> = Vec::new();
    for i in 1..=orders {
        let order = serde_json::json!({
            "order_id": format!("demo-{run_id}-{i:03}"),
            "amount_cents": 1000 + i * 25,
            "flaky": i == 2,
        });
        bodies.push((order.to_string(), None));
    }
    // Duplicate deliveries of some orders (same key, new MessageId), arriving a little later
    // as redeliveries do.
    let duplicates = (orders / 3).max(1);
    for i in 0..duplicates {
        let (body, _) = bodies[i * 3 % orders].clone();
        bodies.push((body, Some(Duration::from_secs(3))));
    }
    bodies.push(("this is not JSON {".to_owned(), None));
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

    let mut config = WorkerConfig::new(queue.url());
    config.scope = Some("demo".into());
    config.key = KeySpec::new(vec!["/order_id".into()]).map_err(anyhow::Error::msg)?;
    config.backoff_base = Duration::from_secs(1);
    // Short polls: after the idle period the worker lets in-flight polls finish before exit.
    config.wait_time = Duration::from_secs(2);
    config.exit_when_idle = Some(Duration::from_secs(5));
    let handler = Arc::new(SampleHandler::default());
    let summary = Worker::new(config, client, PostgresStore::shared(pool), handler.clone())
        .with_shutdown(shutdown)
        .run()
        .await?;

    println!();
    println!("demo summary (scope \"demo\", queue {})", args.queue_name);
    println!("  {:<34} {:>5}", "messages sent", bodies.len());
    println!("  {:<34} {:>5}", "messages received", summary.received);
    println!(
        "  {:<34} {:>5}",
        "orders processed (charged once)", summary.processed
    );
    println!(
        "  {:<34} {:>5}",
        "duplicate deliveries skipped", summary.duplicates_skipped
    );
    println!("  {:<34} {:>5}", "retried after a failure", summary.retried);
    println!(
        "  {:<34} {:>5}",
        format!("sent to {}-dlq", args.queue_name),
        summary.sent_to_dlq
    );
    println!(
        "  {:<34} {:>5}",
        "charges made by the handler",
        handler.charges.load(Ordering::Relaxed)
    );
    println!();
    println!("look one up with the binary just built (no second build):");
    println!(
        "  {}",
        lookup_hint(&args.database_url, &format!("demo-{run_id}-001"))
    );
    Ok(())
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
