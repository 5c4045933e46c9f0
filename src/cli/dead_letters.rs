//! `dead-letters list|export|show|requeue`: what final passes left behind, and sending one
//! back as a new pass.

use std::collections::HashMap;

use anyhow::Context;
use sqs_worker::sqs::{OutgoingMessage, SqsQueue};
use sqs_worker::store::{CheckpointStore, DeadLetter};
use sqs_worker::{message, sqs};

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
