//! The subcommands behind `main.rs`: CLI glue, so `anyhow` and printing live here.

use std::collections::HashMap;
use std::io::IsTerminal;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, bail};
use comfy_table::{CellAlignment, ContentArrangement, Table};
use indicatif::{ProgressBar, ProgressStyle};
use tokio_util::sync::CancellationToken;

use crate::config::{
    CheckpointsPruneArgs, CheckpointsShowArgs, CheckpointsStaleArgs, DeadLetterIdArgs,
    DeadLettersListArgs, DlqPeekArgs, KeyArgs, LambdaArgs, OutputFormat, RedriveArgs, RunArgs,
    SendArgs,
};
use crate::lambda::LambdaWorker;
use crate::message::{self, KeySpec};
use crate::redrive::{self, Action, Filter, Outcome, RedriveError, RedriveOptions};
use crate::sqs::{self, OutgoingMessage, SqsError, SqsQueue};
use crate::startup::{self, StartupError, Verdict};
use crate::store::{
    Checkpoint, CheckpointStore, DeadLetter, DeadLetters, PostgresStore, Retention,
};
use crate::telemetry::{self, Readiness};
use crate::worker::{RunSummary, Worker, WorkerError};

/// A mistake only an operator can fix (a malformed URL, a queue that does not exist,
/// refused credentials, an invalid option): the binary exits 2 with this one line.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct OperatorError(pub String);

/// An error and its causes in one line, each cause once: sqlx and the AWS SDK repeat their
/// inner error's text in their own, which `{:#}` would print twice.
pub fn one_line(error: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in error.chain() {
        let text = cause.to_string();
        if line.contains(text.as_str()) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(text.lines().next().unwrap_or_default());
    }
    line
}

/// The exit status for an error that ended a command: 2 for an operator's mistake, 1 for
/// anything else (an outage that outlasted `--startup-timeout`, a failed redrive).
pub fn exit_status(error: &anyhow::Error) -> u8 {
    let sqs_fatal = |e: &SqsError| !e.kind.is_transient();
    let fatal = error.chain().any(|cause| {
        cause.is::<OperatorError>()
            || cause.downcast_ref::<StartupError>().is_some_and(StartupError::is_fatal)
            || cause.downcast_ref::<WorkerError>().is_some_and(WorkerError::is_fatal)
            || cause.downcast_ref::<SqsError>().is_some_and(sqs_fatal)
            || matches!(cause.downcast_ref::<RedriveError>(), Some(RedriveError::Sqs(e)) if sqs_fatal(e))
            || matches!(cause.downcast_ref::<RedriveError>(), Some(RedriveError::Config(_)))
    });
    if fatal { 2 } else { 1 }
}

/// One direct connection attempt, judged: the pool's own connect would wait out its acquire
/// timeout and then report only that it timed out, hiding a refused connection or a wrong
/// password behind ten seconds of silence.
async fn probe_database(database_url: &str) -> Result<(), Verdict> {
    use sqlx::Connection;
    match sqlx::PgConnection::connect(database_url).await {
        Ok(connection) => {
            let _ = connection.close().await;
            Ok(())
        }
        Err(error) => Err(startup::judge_database(&error, &redact_url(database_url))),
    }
}

/// Connect to PostgreSQL for an operator command: at once, or one line saying what to fix.
pub async fn connect(database_url: &str, max_connections: u32) -> anyhow::Result<sqlx::PgPool> {
    match probe_database(database_url).await {
        Ok(()) => {}
        Err(Verdict::Fatal(problem)) => return Err(OperatorError(problem).into()),
        Err(Verdict::Transient(problem)) => {
            bail!("{problem}; start it, or fix --database-url / DATABASE_URL")
        }
    }
    crate::connect_database(database_url, max_connections)
        .await
        .with_context(|| {
            format!(
                "cannot connect to the database at {}",
                redact_url(database_url)
            )
        })
}

/// `sqs-worker migrate`.
pub async fn migrate(database_url: &str) -> anyhow::Result<()> {
    let pool = connect(database_url, 2).await?;
    crate::MIGRATOR
        .run(&pool)
        .await
        .context("applying migrations failed")?;
    tracing::info!("database schema is up to date");
    Ok(())
}

/// A pool for a worker, with the migrations applied unless the schema is managed elsewhere.
/// A database that cannot be reached yet is tried again until `deadline`.
async fn connect_migrated(
    database_url: &str,
    connections: u32,
    migrate: bool,
    deadline: std::time::Instant,
) -> anyhow::Result<sqlx::PgPool> {
    startup::retry_until(
        "connecting to the database",
        deadline,
        || probe_database(database_url),
        Verdict::clone,
    )
    .await?;
    let pool = crate::connect_database(database_url, connections)
        .await
        .with_context(|| {
            format!(
                "cannot connect to the database at {}",
                redact_url(database_url)
            )
        })?;
    if migrate {
        crate::MIGRATOR.run(&pool).await.context(
            "applying migrations failed (use --no-migrate if the schema is managed elsewhere)",
        )?;
    }
    Ok(pool)
}

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
    // The handlers' steps: one connection per running handler at most, opened only when a
    // step asks (a `step_tx` holds one through its transaction). The worker's own statements
    // get a small pool of their own (`CheckpointStore::own_connections`).
    let pool = connect_migrated(
        &args.database.database_url,
        (config.concurrency as u32).clamp(2, 64),
        !args.processing.no_migrate,
        deadline,
    )
    .await?;
    let client = crate::sqs::client_from_env().await;
    config.startup_timeout = deadline.saturating_duration_since(std::time::Instant::now());
    let mut worker = Worker::new(config, client, PostgresStore::shared(pool), handler)
        .with_shutdown(shutdown.clone());
    if let Some(readiness) = readiness {
        worker = worker.with_readiness(readiness);
    }
    let summary = worker.run().await?;
    // One JSON line on stdout for scripts and benchmarks (logs are on stderr).
    println!("{}", serde_json::to_string(&summary)?);
    Ok(summary)
}

/// `sqs-worker lambda`: serve the Lambda runtime API, or run one local invocation on an
/// event file and print the batch response.
pub async fn lambda(args: LambdaArgs) -> anyhow::Result<()> {
    let deadline = std::time::Instant::now() + args.processing.startup_timeout;
    let mut config = args.processing.worker_config("").map_err(OperatorError)?;
    config.concurrency = args.concurrency as usize;
    let handler = args.handler.build_handler().map_err(OperatorError)?;
    let pool = connect_migrated(
        &args.database.database_url,
        (config.concurrency as u32).clamp(2, 64),
        !args.processing.no_migrate,
        deadline,
    )
    .await?;
    let client = crate::sqs::client_from_env().await;
    let worker = LambdaWorker::new(config, client, PostgresStore::shared(pool), handler);
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

/// `sqs-worker checkpoints prune`.
pub async fn prune_checkpoints(args: CheckpointsPruneArgs) -> anyhow::Result<()> {
    const SQS_MAX_RETENTION: std::time::Duration = std::time::Duration::from_secs(14 * 86_400);
    if args.older_than < SQS_MAX_RETENTION {
        tracing::warn!(
            older_than_secs = args.older_than.as_secs(),
            "the retention is shorter than SQS's longest message retention (14 days): a \
             duplicate delivered later than this runs its event again"
        );
    }
    let pool = connect(&args.database.database_url, 1).await?;
    let store = PostgresStore::new(pool);
    let started = Instant::now();
    // Progress on stderr: one updating line on a terminal, a line per 20 statements otherwise.
    let terminal = std::io::stderr().is_terminal();
    let bar = if terminal {
        progress_bar(None, "{spinner} {pos} deleted · {msg} · {per_sec}")
    } else {
        ProgressBar::hidden()
    };
    let mut deleted: u64 = 0;
    let mut batches: u64 = 0;
    loop {
        let n = store
            .prune_complete(
                args.scope.as_deref(),
                args.older_than,
                i64::from(args.batch_size),
            )
            .await
            .context(
                "pruning checkpoints failed; rows deleted so far stay deleted, run it again",
            )?;
        deleted += n;
        batches += 1;
        bar.inc(n);
        bar.set_message(format!("{batches} statements"));
        if !terminal && batches.is_multiple_of(20) {
            let rate = deleted as f64 / started.elapsed().as_secs_f64().max(0.001);
            eprintln!("{deleted} deleted · {batches} statements · {rate:.0}/s");
        }
        if n == 0 {
            break;
        }
    }
    bar.finish_and_clear();
    let seconds = started.elapsed().as_secs_f64();
    match args.format {
        OutputFormat::Json => println!(
            "{}",
            serde_json::json!({"deleted": deleted, "statements": batches, "seconds": seconds})
        ),
        OutputFormat::Table => println!(
            "deleted {deleted} complete checkpoints older than {} in {batches} statements ({seconds:.1} s)",
            humantime::format_duration(args.older_than)
        ),
    }
    Ok(())
}

/// `sqs-worker checkpoints stale`.
pub async fn stale_checkpoints(args: CheckpointsStaleArgs) -> anyhow::Result<()> {
    let store = PostgresStore::new(connect(&args.database.database_url, 1).await?);
    let stale = store
        .list_stale(args.scope.as_deref(), args.older_than, args.limit)
        .await?;
    let mut marked = Vec::new();
    if args.mark_failed {
        let reason = format!(
            "abandoned: in progress with no live lease for over {} (its message likely went \
             to the DLQ through maxReceiveCount); marked by `checkpoints stale --mark-failed`",
            humantime::format_duration(args.older_than)
        );
        for c in &stale {
            if store
                .mark_stale_failed(&c.scope, &c.idempotency_key, args.older_than, &reason)
                .await?
            {
                marked.push(c.idempotency_key.clone());
            }
        }
    }
    match args.format {
        OutputFormat::Json => println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "stale": stale,
                "marked_failed": marked,
            }))?
        ),
        OutputFormat::Table => {
            if stale.is_empty() {
                println!("no stale checkpoints{}", scope_note(args.scope.as_deref()));
                return Ok(());
            }
            let mut table = table(&[
                "SCOPE",
                "KEY",
                "ATTEMPTS",
                "LAST CHANGE",
                "LAST ERROR",
                "NOW",
            ]);
            align_right(&mut table, &[2]);
            for c in &stale {
                let now = if marked.contains(&c.idempotency_key) {
                    "failed"
                } else {
                    "in_progress"
                };
                table.add_row(vec![
                    c.scope.clone(),
                    c.idempotency_key.clone(),
                    c.attempts.to_string(),
                    c.updated_at.format("%Y-%m-%d %H:%M:%S").to_string(),
                    c.last_error.clone().unwrap_or_else(|| "-".into()),
                    now.to_owned(),
                ]);
            }
            println!("{}", table.trim_fmt());
        }
    }
    Ok(())
}

/// `sqs-worker checkpoints show`.
pub async fn show_checkpoint(args: CheckpointsShowArgs) -> anyhow::Result<()> {
    let pool = connect(&args.database.database_url, 1).await?;
    let store = PostgresStore::new(pool);
    let Some(checkpoint) = store.find(&args.scope, &args.key).await? else {
        bail!(
            "no checkpoint for key {:?} in scope {:?}; the event was never claimed there (check --scope: it defaults to the queue name)",
            args.key,
            args.scope
        );
    };
    match args.format {
        OutputFormat::Json => println!("{}", serde_json::to_string_pretty(&checkpoint)?),
        OutputFormat::Table => print_checkpoint(&checkpoint),
    }
    Ok(())
}

fn print_checkpoint(c: &Checkpoint) {
    let opt_time = |t: Option<chrono::DateTime<chrono::Utc>>| {
        t.map(|t| t.to_rfc3339()).unwrap_or_else(|| "-".into())
    };
    let steps: Vec<String> = c
        .steps
        .as_array()
        .map(|steps| {
            steps
                .iter()
                .filter_map(|s| s["name"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    let rows = [
        ("scope", c.scope.clone()),
        ("key", c.idempotency_key.clone()),
        ("status", c.status.clone()),
        ("attempts", c.attempts.to_string()),
        (
            "steps",
            if steps.is_empty() {
                "-".into()
            } else {
                steps.join(" → ")
            },
        ),
        (
            // A completion keeps its claim's token (so a retried completion recognises it).
            if c.status == "complete" {
                "completed by"
            } else {
                "lease owner"
            },
            c.lease_owner.clone().unwrap_or_else(|| "-".into()),
        ),
        ("lease expires", opt_time(c.lease_expires_at)),
        ("first message", c.first_message_id.clone()),
        ("last message", c.last_message_id.clone()),
        (
            "pass",
            format!(
                "requeue {}, redrive {}",
                c.requeue_generation, c.redrive_count
            ),
        ),
        ("fingerprint", c.payload_sha256.clone()),
        (
            "last error",
            c.last_error.clone().unwrap_or_else(|| "-".into()),
        ),
        ("created", c.created_at.to_rfc3339()),
        ("updated", c.updated_at.to_rfc3339()),
        ("completed", opt_time(c.completed_at)),
    ];
    print_fields(&rows);
}

fn key_spec(args: &KeyArgs) -> anyhow::Result<KeySpec> {
    Ok(KeySpec::new(args.keys.clone()).map_err(OperatorError)?)
}

fn default_operator() -> String {
    let user = std::env::var("USER").unwrap_or_else(|_| "unknown".into());
    let host = crate::worker::host_name().unwrap_or_else(|| "localhost".into());
    format!("{user}@{host}")
}

fn describe_action(action: &Action) -> String {
    match action {
        Action::Redriven {
            redrive_count,
            final_pass,
        } => format!(
            "redrive (count {redrive_count}{})",
            if *final_pass { ", final pass" } else { "" }
        ),
        Action::AlreadyComplete => "already done: delete".into(),
        Action::Exhausted { reason } => format!("{reason}: record in dead_letters, delete"),
        Action::FilteredOut => "filtered out: keep".into(),
        Action::Failed { error } => format!("send failed, kept: {error}"),
    }
}

/// `sqs-worker redrive`.
pub async fn redrive(args: RedriveArgs) -> anyhow::Result<()> {
    let client = sqs::client_from_env().await;
    if args.native {
        return redrive_native(client, &args).await;
    }
    let database_url = args
        .database_url
        .as_deref()
        .context("--database-url (or DATABASE_URL) is required")?;
    let pool = connect(database_url, 2).await?;
    crate::MIGRATOR
        .run(&pool)
        .await
        .context("applying migrations failed")?;
    let store = PostgresStore::new(pool);
    let options = RedriveOptions {
        dlq_url: args.dlq_url.clone(),
        to: args.to.clone(),
        max_redrives: args.max_redrives,
        rate: args.rate.filter(|r| *r > 0.0),
        limit: args.limit,
        dry_run: args.dry_run,
        include_complete: args.include_complete,
        filter: args
            .filter
            .as_deref()
            .map(Filter::parse)
            .transpose()
            .map_err(anyhow::Error::msg)?,
        scope: args.scope.clone(),
        key: key_spec(&args.key)?,
        envelope: args.key.envelope,
        operator: args.operator.clone().unwrap_or_else(default_operator),
    };

    // Progress on stderr: a bar with rate and ETA on a terminal (its length is the DLQ's
    // approximate depth), one line per message otherwise.
    let terminal = std::io::stderr().is_terminal();
    let bar = if terminal && !options.dry_run {
        let depth = SqsQueue::new(client.clone(), options.dlq_url.clone())
            .message_counts()
            .await
            .ok()
            .map(|counts| counts.visible);
        let length = match (depth, options.limit) {
            (Some(depth), Some(limit)) => Some(depth.min(limit)),
            (depth, limit) => depth.or(limit),
        };
        progress_bar(
            length,
            "{spinner} {pos}/{len} examined · {msg} · {per_sec} · ETA {eta}",
        )
    } else {
        ProgressBar::hidden()
    };
    let mut outcomes: Vec<Outcome> = Vec::new();
    let mut tally: HashMap<&'static str, u64> = HashMap::new();
    let report = redrive::redrive(client, &store, &options, |outcome| {
        let kind = match outcome.action {
            Action::Redriven { .. } => "redriven",
            Action::AlreadyComplete => "already done",
            Action::Exhausted { .. } => "exhausted",
            Action::FilteredOut => "filtered out",
            Action::Failed { .. } => "failed",
        };
        *tally.entry(kind).or_default() += 1;
        if options.dry_run {
            outcomes.push(outcome.clone());
        } else if terminal {
            bar.inc(1);
            bar.set_message(format!(
                "{} redriven · {} already done · {} exhausted · {} failed",
                tally.get("redriven").unwrap_or(&0),
                tally.get("already done").unwrap_or(&0),
                tally.get("exhausted").unwrap_or(&0),
                tally.get("failed").unwrap_or(&0),
            ));
        } else {
            eprintln!(
                "{} key={} {}",
                outcome.message_id,
                outcome.key,
                describe_action(&outcome.action)
            );
        }
    })
    .await;
    bar.finish_and_clear();
    let report = match report {
        Ok(report) => report,
        Err(RedriveError::Config(problem)) => return Err(OperatorError(problem).into()),
        Err(error) => {
            return Err(anyhow::Error::new(error).context(
                "redrive stopped; nothing was lost (a message leaves the DLQ only after it \
                 was sent). Check AWS credentials, region and AWS_ENDPOINT_URL, then run it \
                 again",
            ));
        }
    };

    match args.format {
        OutputFormat::Json => {
            let value = serde_json::json!({ "summary": report, "messages": outcomes });
            println!("{}", serde_json::to_string_pretty(&value)?);
        }
        OutputFormat::Table => {
            if options.dry_run {
                let mut table = table(&["MESSAGE ID", "KEY", "REDRIVES", "CHECKPOINT", "WOULD"]);
                align_right(&mut table, &[2]);
                for o in &outcomes {
                    table.add_row(vec![
                        o.message_id.clone(),
                        o.key.clone(),
                        o.previous_redrive_count
                            .map(|c| c.to_string())
                            .unwrap_or_else(|| "?".into()),
                        o.checkpoint_status.clone().unwrap_or_else(|| "-".into()),
                        describe_action(&o.action),
                    ]);
                }
                println!("{}\n", table.trim_fmt());
            }
            println!(
                "redrive #{} to {}{}",
                report.audit_id,
                report.target_url,
                if options.dry_run {
                    " (dry run: nothing changed)"
                } else {
                    ""
                }
            );
            let verb = if options.dry_run { "would be " } else { "" };
            let lines = [
                ("examined".to_owned(), report.examined),
                (format!("{verb}redriven"), report.counts.redriven),
                (
                    format!("already done ({verb}deleted)"),
                    report.counts.skipped_complete,
                ),
                (
                    format!("exhausted ({verb}recorded)"),
                    report.counts.exhausted,
                ),
                ("filtered out (kept)".to_owned(), report.filtered_out),
                ("send failures (kept)".to_owned(), report.counts.failed),
            ];
            let mut summary = table(&[]);
            align_right(&mut summary, &[1]);
            for (label, count) in lines {
                summary.add_row(vec![label, count.to_string()]);
            }
            summary.add_row(vec![
                "seconds".to_owned(),
                format!("{:.1}", report.elapsed_secs),
            ]);
            println!("{}", summary.trim_fmt());
        }
    }
    if report.counts.failed > 0 {
        bail!(
            "{} message(s) could not be sent and stay in the DLQ; run the redrive again",
            report.counts.failed
        );
    }
    Ok(())
}

async fn redrive_native(client: aws_sdk_sqs::Client, args: &RedriveArgs) -> anyhow::Result<()> {
    redrive_native_calls(client, args)
        .await
        .context("check --dlq-url, AWS credentials, region and AWS_ENDPOINT_URL")
}

async fn redrive_native_calls(
    client: aws_sdk_sqs::Client,
    args: &RedriveArgs,
) -> anyhow::Result<()> {
    let dlq = SqsQueue::new(client, args.dlq_url.clone());
    if args.status {
        let tasks = dlq.list_message_move_tasks().await?;
        match args.format {
            OutputFormat::Json => println!("{}", serde_json::to_string_pretty(&tasks)?),
            OutputFormat::Table => {
                if tasks.is_empty() {
                    println!("no move tasks for this DLQ");
                    return Ok(());
                }
                let mut table = table(&["STATUS", "MOVED", "TO MOVE", "TASK HANDLE", "FAILURE"]);
                align_right(&mut table, &[1, 2]);
                for task in &tasks {
                    let text = |field: &str| task[field].as_str().unwrap_or("-").to_owned();
                    table.add_row(vec![
                        text("status"),
                        task["moved"].to_string(),
                        task["to_move"].to_string(),
                        text("task_handle"),
                        text("failure_reason"),
                    ]);
                }
                println!("{}", table.trim_fmt());
            }
        }
        return Ok(());
    }
    if let Some(handle) = &args.cancel {
        let moved = dlq.cancel_message_move_task(handle).await?;
        println!("cancelled; {moved} message(s) had been moved");
        return Ok(());
    }
    tracing::warn!(
        "--native uses SQS's StartMessageMoveTask: it cannot add redrive markers, so a message \
         that fails again goes back to the DLQ and can loop; prefer the default redrive"
    );
    let destination = match &args.to {
        Some(url) => Some(dlq.sibling(url.clone()).arn().await?),
        None => None,
    };
    let rate = args.rate.map(|r| r.round().clamp(1.0, 500.0) as i32);
    let handle = dlq.start_message_move_task(destination, rate).await?;
    println!("started move task {handle}; follow it with --native --status");
    Ok(())
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
        let message_id = queue
            .send(OutgoingMessage {
                // FIFO queues need a deduplication id unless content-based deduplication is on.
                deduplication_id: fifo.then(|| message::body_sha256(&line)),
                body: line,
                attributes: HashMap::new(),
                message_group_id: args.group_id.clone(),
                delay: None,
            })
            .await?;
        println!("{message_id}");
        sent += 1;
    }
    eprintln!("sent {sent} message(s) to {}", queue.name());
    Ok(())
}

/// `sqs-worker dlq peek`.
pub async fn dlq_peek(args: DlqPeekArgs) -> anyhow::Result<()> {
    let client = sqs::client_from_env().await;
    let key = key_spec(&args.key)?;
    let peeked = redrive::peek(
        client,
        &args.dlq_url,
        args.limit as usize,
        &key,
        args.key.envelope,
    )
    .await
    .context(
        "cannot read the DLQ; check --dlq-url, AWS credentials, region and AWS_ENDPOINT_URL",
    )?;
    match args.format {
        OutputFormat::Json => println!("{}", serde_json::to_string_pretty(&peeked)?),
        OutputFormat::Table => {
            let mut table = table(&[
                "MESSAGE ID",
                "KEY",
                "AGE",
                "RECV",
                "REDRIVES",
                "REASON",
                "BODY",
            ]);
            align_right(&mut table, &[2, 3, 4]);
            for m in &peeked {
                table.add_row(vec![
                    m.message_id.clone(),
                    m.key.clone(),
                    m.age_secs.map(human_age).unwrap_or_else(|| "-".into()),
                    m.receive_count
                        .map(|c| c.to_string())
                        .unwrap_or_else(|| "-".into()),
                    m.redrive_count.to_string(),
                    m.failure_reason.clone().unwrap_or_else(|| "-".into()),
                    m.body_preview.replace('\n', " "),
                ]);
            }
            println!("{}", table.trim_fmt());
            eprintln!(
                "{} message(s) shown; all were made visible again",
                peeked.len()
            );
        }
    }
    Ok(())
}

fn human_age(secs: u64) -> String {
    match secs {
        s if s < 120 => format!("{s}s"),
        s if s < 7200 => format!("{}m", s / 60),
        s if s < 172_800 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86_400),
    }
}

/// `sqs-worker dead-letters list` (and `export`, as JSON lines).
pub async fn dead_letters_list(args: DeadLettersListArgs, export: bool) -> anyhow::Result<()> {
    let store = PostgresStore::new(connect(&args.database.database_url, 1).await?);
    let letters = store
        .list_dead_letters(args.scope.as_deref(), args.limit)
        .await?;
    if export {
        for letter in &letters {
            println!("{}", serde_json::to_string(letter)?);
        }
        return Ok(());
    }
    match args.format {
        OutputFormat::Json => println!("{}", serde_json::to_string_pretty(&letters)?),
        OutputFormat::Table => {
            if letters.is_empty() {
                println!("no dead letters{}", scope_note(args.scope.as_deref()));
                return Ok(());
            }
            let mut table = table(&["ID", "WHEN", "SCOPE", "KEY", "REASON", "REDRIVES", "ERROR"]);
            align_right(&mut table, &[0, 5]);
            for l in &letters {
                table.add_row(vec![
                    l.id.to_string(),
                    l.created_at.format("%Y-%m-%d %H:%M:%S").to_string(),
                    l.scope.clone(),
                    l.idempotency_key.clone(),
                    l.reason.clone(),
                    l.redrive_count.to_string(),
                    message::truncate_for_log(&l.error, 120),
                ]);
            }
            println!("{}", table.trim_fmt());
        }
    }
    Ok(())
}

/// `sqs-worker dead-letters show`.
pub async fn dead_letter_show(args: DeadLetterIdArgs) -> anyhow::Result<()> {
    let store = PostgresStore::new(connect(&args.database.database_url, 1).await?);
    let letter = find_dead_letter(&store, args.id).await?;
    match args.format {
        OutputFormat::Json => println!("{}", serde_json::to_string_pretty(&letter)?),
        OutputFormat::Table => {
            let rows = [
                ("id", letter.id.to_string()),
                ("scope", letter.scope.clone()),
                ("key", letter.idempotency_key.clone()),
                ("queue", letter.queue_url.clone()),
                ("message id", letter.message_id.clone()),
                ("reason", letter.reason.clone()),
                ("error", letter.error.clone()),
                ("attempts", letter.attempts.to_string()),
                ("redrives", letter.redrive_count.to_string()),
                ("recorded", letter.created_at.to_rfc3339()),
                (
                    "requeued",
                    letter
                        .requeued_at
                        .map(|t| t.to_rfc3339())
                        .unwrap_or_else(|| "-".into()),
                ),
                ("attributes", letter.attributes.to_string()),
                ("body", letter.body.clone()),
            ];
            print_fields(&rows);
        }
    }
    Ok(())
}

async fn find_dead_letter(store: &dyn CheckpointStore, id: i64) -> anyhow::Result<DeadLetter> {
    store
        .find_dead_letter(id)
        .await?
        .with_context(|| format!("no dead letter with id {id}; see `sqs-worker dead-letters list`"))
}

/// `sqs-worker dead-letters requeue`: send one back on purpose. It carries
/// `dlq_redriven=true`, a redrive count of 0 (the full number of redrives again) and the next
/// `requeue_generation`, a later pass than any seen, so its failed checkpoint is claimed once
/// more.
pub async fn dead_letter_requeue(args: DeadLetterIdArgs) -> anyhow::Result<()> {
    let store = PostgresStore::new(connect(&args.database.database_url, 1).await?);
    let letter = find_dead_letter(&store, args.id).await?;
    let mut attributes = HashMap::new();
    if let Some(recorded) = letter.attributes.as_object() {
        for (name, value) in recorded {
            let (Some(kind), Some(text)) = (value["type"].as_str(), value["value"].as_str()) else {
                continue;
            };
            let attribute = if kind.starts_with("Number") {
                sqs::number_attribute(text)
            } else {
                sqs::string_attribute(text)
            };
            attributes.insert(name.clone(), attribute);
        }
    }
    for marker in [
        message::ATTR_DLQ_FINAL_PASS,
        message::ATTR_FAILURE_REASON,
        message::ATTR_FAILURE_DETAIL,
    ] {
        attributes.remove(marker);
    }
    // A requeue is a new pass: the next generation after any seen, so its failed event runs
    // once more, while duplicates of this requeue (or a second requeue of the same letter
    // before it ran) count as one.
    let recorded_generation = letter.attributes[message::ATTR_REQUEUE_GENERATION]["value"]
        .as_str()
        .and_then(|g| g.trim().parse::<u32>().ok())
        .unwrap_or(0);
    let checkpoint_generation = store
        .find(&letter.scope, &letter.idempotency_key)
        .await?
        .map_or(0, |c| c.requeue_generation.max(0) as u32);
    let generation = recorded_generation.max(checkpoint_generation) + 1;
    attributes.insert(
        message::ATTR_DLQ_REDRIVEN.into(),
        sqs::string_attribute("true"),
    );
    attributes.insert(message::ATTR_REDRIVE_COUNT.into(), sqs::number_attribute(0));
    attributes.insert(
        message::ATTR_REQUEUE_GENERATION.into(),
        sqs::number_attribute(generation),
    );
    let fifo = letter.queue_url.ends_with(".fifo");
    let queue = SqsQueue::new(sqs::client_from_env().await, letter.queue_url.clone());
    let message_id = queue
        .send(OutgoingMessage {
            body: letter.body.clone(),
            attributes,
            message_group_id: fifo.then(|| "sqs-worker-requeue".to_owned()),
            deduplication_id: fifo.then(|| format!("requeue-{}", letter.id)),
            delay: None,
        })
        .await?;
    store.mark_dead_letter_requeued(letter.id).await?;
    println!(
        "requeued dead letter {} to {} as message {message_id} (requeue {generation}: its \
         event runs once more, with the full number of redrives)",
        letter.id, letter.queue_url
    );
    Ok(())
}

fn scope_note(scope: Option<&str>) -> String {
    scope
        .map(|s| format!(" in scope {s:?}"))
        .unwrap_or_default()
}

/// A table for people: a header row, no borders, columns measured by display width (CJK and
/// emoji keep them straight) and, on a terminal, wrapped to its width rather than cut.
fn table(header: &[&str]) -> Table {
    let mut table = Table::new();
    table.load_style(comfy_table::presets::NOTHING);
    if !header.is_empty() {
        table.set_header(header.to_vec());
    }
    if let Some((_, width)) = console::Term::stdout().size_checked() {
        table
            .set_width(width)
            .set_content_arrangement(ContentArrangement::Dynamic);
    }
    table
}

fn align_right(table: &mut Table, columns: &[usize]) {
    for &i in columns {
        if let Some(column) = table.column_mut(i) {
            column.set_cell_alignment(CellAlignment::Right);
        }
    }
}

/// A progress bar on stderr: with a length, a bar with ETA; without one, a spinner.
fn progress_bar(length: Option<u64>, template: &str) -> ProgressBar {
    let bar = match length {
        Some(length) => ProgressBar::new(length),
        None => ProgressBar::new_spinner(),
    };
    if let Ok(style) = ProgressStyle::with_template(template) {
        bar.set_style(style);
    }
    bar.enable_steady_tick(std::time::Duration::from_millis(200));
    bar
}

/// Name–value pairs as a two-column table.
fn print_fields(rows: &[(&str, String)]) {
    let mut fields = table(&[]);
    for (name, value) in rows {
        fields.add_row(vec![(*name).to_owned(), value.clone()]);
    }
    println!("{}", fields.trim_fmt());
}

/// Hide the password of a database URL for messages.
pub fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme_end), Some(at)) if at > scheme_end => {
            let credentials = &url[scheme_end + 3..at];
            match credentials.find(':') {
                Some(colon) => format!(
                    "{}{}:***{}",
                    &url[..scheme_end + 3],
                    &credentials[..colon],
                    &url[at..]
                ),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::redact_url;

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(
            redact_url("postgres://app:s3cret@db:5432/x"),
            "postgres://app:***@db:5432/x"
        );
        assert_eq!(
            redact_url("postgres://postgres@127.0.0.1/x"),
            "postgres://postgres@127.0.0.1/x"
        );
    }
}
