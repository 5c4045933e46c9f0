//! `checkpoints show|prune|stale`: look at events, and clean up after them.

use std::io::IsTerminal;
use std::time::Instant;

use anyhow::{Context, bail};
use indicatif::ProgressBar;
use sqs_worker::store::Checkpoint;

use crate::cli::args::{
    CheckpointsPruneArgs, CheckpointsShowArgs, CheckpointsStaleArgs, OutputFormat,
};

use super::database::open_store;
use super::output::{align_right, print_fields, progress_bar, scope_note, table};

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
    let store = open_store(&args.database.database_url, 1).await?;
    if store.kind() == sqs_worker::StoreKind::Dynamodb {
        eprintln!(
            "nothing to prune on DynamoDB: completed checkpoints carry a TTL (expires_at, \
             30 days after completion) and DynamoDB deletes them itself"
        );
        return Ok(());
    }
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
    let store = open_store(&args.database.database_url, 1).await?;
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
    let store = open_store(&args.database.database_url, 1).await?;
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

pub(super) fn print_checkpoint(c: &Checkpoint) {
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
