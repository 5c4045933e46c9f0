//! `dead-letters list|export|show|requeue`: what final passes left behind, and sending one
//! back as a new pass.

use anyhow::Context;
use sqs_worker::store::{CheckpointStore, DeadLetter};
use sqs_worker::{message, redrive, sqs};

use crate::cli::args::{DeadLetterIdArgs, DeadLettersListArgs, OutputFormat};

use super::database::open_store;
use super::output::{align_right, print_fields, scope_note, table};

/// `sqs-worker dead-letters list` (and `export`, as JSON lines).
pub async fn dead_letters_list(args: DeadLettersListArgs, export: bool) -> anyhow::Result<()> {
    let store = open_store(&args.database.database_url, 1).await?;
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
    let store = open_store(&args.database.database_url, 1).await?;
    let letter = find_dead_letter(&*store, args.id).await?;
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

pub(super) async fn find_dead_letter(
    store: &dyn CheckpointStore,
    id: i64,
) -> anyhow::Result<DeadLetter> {
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
    let store = open_store(&args.database.database_url, 1).await?;
    let letter = find_dead_letter(&*store, args.id).await?;
    let requeued =
        redrive::requeue_dead_letter(sqs::client_from_env().await, &*store, &letter).await?;
    println!(
        "requeued dead letter {} to {} as message {} (requeue {}: its event runs once more, \
         with the full number of redrives)",
        letter.id, letter.queue_url, requeued.message_id, requeued.generation
    );
    Ok(())
}
