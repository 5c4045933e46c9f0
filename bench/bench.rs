//! Benchmark helpers, run by `bench/run` (see the README's "Performance" section):
//!
//! - `seed`: fill a queue with N messages, a share of them duplicate deliveries of earlier
//!   events (same key, new MessageId), with parallel SendMessageBatch calls;
//! - `bare`: the ceiling — a receive + DeleteMessageBatch loop with the worker's pollers and
//!   no database, deletes pipelined like the worker's acker;
//! - `handwritten`: the peer a team would write in an afternoon — aws-sdk-sqs and sqlx, the
//!   same pollers, one `insert … on conflict do nothing` per message, a DeleteMessageBatch
//!   per receive — to show what the worker's guarantees cost against it;
//! - `steps`: the step path — a 3-step handler through the library API, on the store its
//!   `--database-url` names (PostgreSQL, SQLite or DynamoDB), with the worker's defaults;
//! - `slow`: a handler that sleeps 100 ms, with the worker's defaults: receiving must not
//!   outrun the handlers (receive calls per message, pollers).
//!
//! Each prints one JSON object on stdout; `bench/run` turns them into the table.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use aws_sdk_sqs::types::{
    DeleteMessageBatchRequestEntry, MessageSystemAttributeName, QueueAttributeName,
    SendMessageBatchRequestEntry,
};
use clap::{Parser, Subcommand};
use sqs_worker::message::KeySpec;
use sqs_worker::{Handler, HandlerError, Job, Worker, WorkerConfig};
use tokio::sync::{Mutex, Semaphore};

#[derive(Parser)]
struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create a queue (visibility timeout 30 s); prints its URL.
    CreateQueue {
        #[arg(long)]
        name: String,
    },
    /// Delete a queue (keeps LocalStack from slowing down as a run goes on).
    DeleteQueue {
        #[arg(long)]
        queue_url: String,
    },
    /// Messages visible, in flight or delayed.
    Count {
        #[arg(long)]
        queue_url: String,
    },
    /// Send `count` messages, `duplicates` of them (a fraction) repeats of earlier keys.
    Seed {
        #[arg(long)]
        queue_url: String,
        #[arg(long, default_value_t = 20_000)]
        count: usize,
        #[arg(long, default_value_t = 0.2)]
        duplicates: f64,
        /// Prefix of the keys, so runs never share events.
        #[arg(long)]
        run_id: String,
    },
    /// Send `count` distinct events of `body_bytes` each while a consumer drains the queue,
    /// never letting more than `max_backlog` wait (LocalStack keeps a queue in memory).
    Produce {
        #[arg(long)]
        queue_url: String,
        #[arg(long)]
        count: usize,
        #[arg(long)]
        body_bytes: usize,
        #[arg(long, default_value_t = 400)]
        max_backlog: u64,
        #[arg(long)]
        run_id: String,
    },
    /// Receive and delete until `expect` messages were deleted.
    Bare {
        #[arg(long)]
        queue_url: String,
        #[arg(long, default_value_t = 2)]
        pollers: usize,
        #[arg(long)]
        expect: u64,
        /// Ask for every system and message attribute, as the worker does (it needs the
        /// receive count, the FIFO group and the redrive markers).
        #[arg(long)]
        attributes: bool,
    },
    /// The hand-written consumer: receive, one insert per message, batch delete, until
    /// `expect` messages were deleted.
    Handwritten {
        #[arg(long)]
        queue_url: String,
        /// PostgreSQL; the table `handwritten_events` is created if missing.
        #[arg(long)]
        database_url: String,
        #[arg(long, default_value_t = 8)]
        pollers: usize,
        #[arg(long)]
        expect: u64,
    },
    /// Run a 3-step handler on the queue until idle, with the worker's defaults.
    Steps {
        #[arg(long)]
        queue_url: String,
        /// The checkpoint store: `postgres://…`, `sqlite://PATH` or `dynamodb://TABLE`.
        #[arg(long)]
        database_url: String,
    },
    /// Run a handler that sleeps 100 ms per event on the queue until idle, with the
    /// worker's defaults.
    Slow {
        #[arg(long)]
        queue_url: String,
        #[arg(long)]
        database_url: String,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let client = sqs_worker::sqs::client_from_env().await;
    match args.command {
        Command::CreateQueue { name } => {
            let output = client
                .create_queue()
                .queue_name(name)
                .attributes(QueueAttributeName::VisibilityTimeout, "30")
                .send()
                .await?;
            println!(
                "{}",
                serde_json::json!({"queue_url": output.queue_url().unwrap_or_default()})
            );
            Ok(())
        }
        Command::DeleteQueue { queue_url } => {
            client.delete_queue().queue_url(queue_url).send().await?;
            println!("{{}}");
            Ok(())
        }
        Command::Count { queue_url } => {
            let output = client
                .get_queue_attributes()
                .queue_url(queue_url)
                .attribute_names(QueueAttributeName::ApproximateNumberOfMessages)
                .attribute_names(QueueAttributeName::ApproximateNumberOfMessagesNotVisible)
                .attribute_names(QueueAttributeName::ApproximateNumberOfMessagesDelayed)
                .send()
                .await?;
            let messages: u64 = output
                .attributes()
                .map(|a| a.values().filter_map(|v| v.parse::<u64>().ok()).sum())
                .unwrap_or(0);
            println!("{}", serde_json::json!({ "messages": messages }));
            Ok(())
        }
        Command::Seed {
            queue_url,
            count,
            duplicates,
            run_id,
        } => seed(client, queue_url, count, duplicates, run_id).await,
        Command::Produce {
            queue_url,
            count,
            body_bytes,
            max_backlog,
            run_id,
        } => produce(client, queue_url, count, body_bytes, max_backlog, run_id).await,
        Command::Bare {
            queue_url,
            pollers,
            expect,
            attributes,
        } => bare(client, queue_url, pollers, expect, attributes).await,
        Command::Handwritten {
            queue_url,
            database_url,
            pollers,
            expect,
        } => handwritten(client, queue_url, database_url, pollers, expect).await,
        Command::Steps {
            queue_url,
            database_url,
        } => until_idle(client, queue_url, database_url, ThreeSteps).await,
        Command::Slow {
            queue_url,
            database_url,
        } => until_idle(client, queue_url, database_url, Sleeps100Ms).await,
    }
}

async fn seed(
    client: aws_sdk_sqs::Client,
    queue_url: String,
    count: usize,
    duplicates: f64,
    run_id: String,
) -> anyhow::Result<()> {
    let unique = ((count as f64) * (1.0 - duplicates)).round().max(1.0) as usize;
    let mut rng = fastrand::Rng::with_seed(7);
    // Event i for the first `unique` messages, then repeats of random earlier events, all
    // shuffled so duplicates arrive at any distance from their original.
    let mut keys: Vec<usize> = (0..unique)
        .chain((unique..count).map(|_| rng.usize(..unique)))
        .collect();
    rng.shuffle(&mut keys);
    let padding = "x".repeat(200);
    let bodies: Vec<String> = keys
        .iter()
        .map(|k| format!(r#"{{"id":"{run_id}-{k}","pad":"{padding}"}}"#))
        .collect();
    let started = Instant::now();
    let limit = Arc::new(Semaphore::new(16));
    let mut tasks = tokio::task::JoinSet::new();
    for chunk in bodies.chunks(10) {
        let permit = limit.clone().acquire_owned().await?;
        let (client, queue_url) = (client.clone(), queue_url.clone());
        let entries: Vec<SendMessageBatchRequestEntry> = chunk
            .iter()
            .enumerate()
            .map(|(i, body)| {
                SendMessageBatchRequestEntry::builder()
                    .id(i.to_string())
                    .message_body(body)
                    .build()
                    .expect("id and body set")
            })
            .collect();
        tasks.spawn(async move {
            let _permit = permit;
            let output = client
                .send_message_batch()
                .queue_url(queue_url)
                .set_entries(Some(entries))
                .send()
                .await?;
            anyhow::ensure!(output.failed().is_empty(), "some sends failed");
            Ok(())
        });
    }
    while let Some(result) = tasks.join_next().await {
        result??;
    }
    println!(
        "{}",
        serde_json::json!({"sent": count, "unique": unique,
                           "seconds": started.elapsed().as_secs_f64()})
    );
    Ok(())
}

async fn produce(
    client: aws_sdk_sqs::Client,
    queue_url: String,
    count: usize,
    body_bytes: usize,
    max_backlog: u64,
    run_id: String,
) -> anyhow::Result<()> {
    let started = Instant::now();
    let padding = "x".repeat(body_bytes.saturating_sub(64));
    let senders = Arc::new(Semaphore::new(8));
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..count {
        if i % 50 == 0 {
            // Wait for the consumer before sending more than the backlog allows.
            while waiting(&client, &queue_url).await? > max_backlog {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        let permit = senders.clone().acquire_owned().await?;
        let (client, queue_url) = (client.clone(), queue_url.clone());
        let body = format!(r#"{{"id":"{run_id}-{i}","pad":"{padding}"}}"#);
        tasks.spawn(async move {
            let _permit = permit;
            client
                .send_message()
                .queue_url(queue_url)
                .message_body(body)
                .send()
                .await?;
            anyhow::Ok(())
        });
        while let Some(done) = tasks.try_join_next() {
            done??;
        }
    }
    while let Some(result) = tasks.join_next().await {
        result??;
    }
    println!(
        "{}",
        serde_json::json!({"sent": count, "seconds": started.elapsed().as_secs_f64()})
    );
    Ok(())
}

/// Messages waiting to be received.
async fn waiting(client: &aws_sdk_sqs::Client, queue_url: &str) -> anyhow::Result<u64> {
    let output = client
        .get_queue_attributes()
        .queue_url(queue_url)
        .attribute_names(QueueAttributeName::ApproximateNumberOfMessages)
        .send()
        .await?;
    Ok(output
        .attributes()
        .and_then(|a| a.get(&QueueAttributeName::ApproximateNumberOfMessages))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0))
}

async fn bare(
    client: aws_sdk_sqs::Client,
    queue_url: String,
    pollers: usize,
    expect: u64,
    attributes: bool,
) -> anyhow::Result<()> {
    let deleted = Arc::new(AtomicU64::new(0));
    let window: Arc<Mutex<(Option<Instant>, Option<Instant>)>> = Arc::default();
    let deletes = Arc::new(Semaphore::new(pollers * 2));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..pollers {
        let (client, queue_url) = (client.clone(), queue_url.clone());
        let (deleted, window, deletes) = (deleted.clone(), window.clone(), deletes.clone());
        tasks.spawn(async move {
            let mut in_flight = tokio::task::JoinSet::new();
            while deleted.load(Ordering::Relaxed) < expect {
                let mut receive = client
                    .receive_message()
                    .queue_url(&queue_url)
                    .max_number_of_messages(10)
                    .wait_time_seconds(1);
                if attributes {
                    receive = receive
                        .message_system_attribute_names(MessageSystemAttributeName::All)
                        .message_attribute_names("All");
                }
                let output = receive.send().await?;
                let messages = output.messages();
                if messages.is_empty() {
                    continue;
                }
                window.lock().await.0.get_or_insert_with(Instant::now);
                let entries = delete_entries(messages);
                let permit = deletes.clone().acquire_owned().await?;
                let (client, queue_url) = (client.clone(), queue_url.clone());
                let (deleted, window) = (deleted.clone(), window.clone());
                in_flight.spawn(async move {
                    let _permit = permit;
                    let n = entries.len() as u64;
                    client
                        .delete_message_batch()
                        .queue_url(queue_url)
                        .set_entries(Some(entries))
                        .send()
                        .await?;
                    deleted.fetch_add(n, Ordering::Relaxed);
                    window.lock().await.1 = Some(Instant::now());
                    anyhow::Ok(())
                });
            }
            while let Some(result) = in_flight.join_next().await {
                result??;
            }
            anyhow::Ok(())
        });
    }
    while let Some(result) = tasks.join_next().await {
        result??;
    }
    let (first, last) = *window.lock().await;
    let active = match (first, last) {
        (Some(first), Some(last)) => last.duration_since(first).as_secs_f64(),
        _ => 0.0,
    };
    println!(
        "{}",
        serde_json::json!({"received": deleted.load(Ordering::Relaxed), "active_secs": active})
    );
    Ok(())
}

/// The DeleteMessageBatch entries for a receive's messages (ids are their positions).
fn delete_entries(messages: &[aws_sdk_sqs::types::Message]) -> Vec<DeleteMessageBatchRequestEntry> {
    messages
        .iter()
        .enumerate()
        .map(|(i, m)| {
            DeleteMessageBatchRequestEntry::builder()
                .id(i.to_string())
                .receipt_handle(m.receipt_handle().unwrap_or_default())
                .build()
                .expect("id and handle set")
        })
        .collect()
}

/// The straightforward consumer: each poller receives 10, inserts each message's id with
/// its own statement (`on conflict do nothing` makes a duplicate harmless), then deletes the
/// batch and receives again. No leases, no retries, no DLQ: the floor of what any consumer
/// with a database does per message.
async fn handwritten(
    client: aws_sdk_sqs::Client,
    queue_url: String,
    database_url: String,
    pollers: usize,
    expect: u64,
) -> anyhow::Result<()> {
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(pollers as u32)
        .connect(&database_url)
        .await?;
    sqlx::query("create table if not exists handwritten_events (id text primary key)")
        .execute(&pool)
        .await?;
    let deleted = Arc::new(AtomicU64::new(0));
    let window: Arc<Mutex<(Option<Instant>, Option<Instant>)>> = Arc::default();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..pollers {
        let (client, queue_url, pool) = (client.clone(), queue_url.clone(), pool.clone());
        let (deleted, window) = (deleted.clone(), window.clone());
        tasks.spawn(async move {
            while deleted.load(Ordering::Relaxed) < expect {
                let output = client
                    .receive_message()
                    .queue_url(&queue_url)
                    .max_number_of_messages(10)
                    .wait_time_seconds(1)
                    .send()
                    .await?;
                let messages = output.messages();
                if messages.is_empty() {
                    continue;
                }
                window.lock().await.0.get_or_insert_with(Instant::now);
                for message in messages {
                    let body: serde_json::Value =
                        serde_json::from_str(message.body().unwrap_or_default())?;
                    sqlx::query(
                        "insert into handwritten_events (id) values ($1) on conflict do nothing",
                    )
                    .bind(body["id"].as_str().unwrap_or_default())
                    .execute(&pool)
                    .await?;
                }
                let entries = delete_entries(messages);
                let n = entries.len() as u64;
                client
                    .delete_message_batch()
                    .queue_url(&queue_url)
                    .set_entries(Some(entries))
                    .send()
                    .await?;
                deleted.fetch_add(n, Ordering::Relaxed);
                window.lock().await.1 = Some(Instant::now());
            }
            anyhow::Ok(())
        });
    }
    while let Some(result) = tasks.join_next().await {
        result??;
    }
    let (first, last) = *window.lock().await;
    let active = match (first, last) {
        (Some(first), Some(last)) => last.duration_since(first).as_secs_f64(),
        _ => 0.0,
    };
    let unique: i64 = sqlx::query_scalar("select count(*) from handwritten_events")
        .fetch_one(&pool)
        .await?;
    println!(
        "{}",
        serde_json::json!({"received": deleted.load(Ordering::Relaxed), "active_secs": active,
                           "unique_events": unique})
    );
    Ok(())
}

/// Three steps, each recorded in the checkpoint: the step path's cost per event. No step
/// transactions (`Handler::step_transactions` stays `None`), so it runs on any store.
struct ThreeSteps;

#[async_trait]
impl Handler for ThreeSteps {
    async fn handle(&self, job: &mut Job) -> Result<(), HandlerError> {
        let parsed: u64 = job.step("parse", || async { Ok(1u64) }).await?;
        let stored: u64 = job.step("store", || async move { Ok(parsed + 1) }).await?;
        job.step("notify", || async move { Ok(stored + 1) }).await?;
        Ok(())
    }
}

/// A handler whose work takes 100 ms (an HTTP call, say): the handlers, not SQS, set the pace.
struct Sleeps100Ms;

#[async_trait]
impl Handler for Sleeps100Ms {
    async fn handle(&self, _job: &mut Job) -> Result<(), HandlerError> {
        tokio::time::sleep(Duration::from_millis(100)).await;
        Ok(())
    }
}

/// Run `handler` through the library API with the worker's defaults (only the key, a short
/// long poll and the idle exit are set) until the queue is idle; print the run's summary.
async fn until_idle(
    client: aws_sdk_sqs::Client,
    queue_url: String,
    database_url: String,
    handler: impl Handler,
) -> anyhow::Result<()> {
    // Whichever store the URL names (`postgres://…`, `sqlite://PATH`, `dynamodb://TABLE`), migrated.
    let store = sqs_worker::store::open(&database_url, 16).await?;
    store.migrate().await?;
    let mut config = WorkerConfig::new(queue_url);
    config.key = KeySpec::new(vec!["/id".into()]).map_err(anyhow::Error::msg)?;
    config.wait_time = Duration::from_secs(1);
    config.exit_when_idle = Some(Duration::from_secs(3));
    let summary = Worker::builder()
        .config(config)
        .sqs_client(client)
        .store(store)
        .handler(handler)
        .build()?
        .run()
        .await?;
    println!("{}", serde_json::to_string(&summary)?);
    Ok(())
}
