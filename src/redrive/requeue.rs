//! `dead-letters requeue`: send a dead letter back on purpose, as a new pass of its event.

use std::collections::HashMap;

use serde::Serialize;

use crate::message;
use crate::sqs::{self, OutgoingMessage, SqsQueue};
use crate::store::{CheckpointStore, DeadLetter};

use super::options::RedriveError;

/// A requeued dead letter.
#[derive(Debug, Clone, Serialize)]
pub struct Requeued {
    /// The new message's SQS id.
    pub message_id: String,
    /// Its `requeue_generation`.
    pub generation: u32,
}

/// Send a dead letter back to its queue. It carries `dlq_redriven=true`, a redrive count of
/// 0 (the full number of redrives again) and the next `requeue_generation`, a later pass
/// than any seen, so its failed checkpoint is claimed once more; the letter is marked
/// requeued.
pub async fn requeue_dead_letter(
    client: aws_sdk_sqs::Client,
    store: &dyn CheckpointStore,
    letter: &DeadLetter,
) -> Result<Requeued, RedriveError> {
    let mut attributes = recorded_attributes(letter);
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
    let queue = SqsQueue::new(client, letter.queue_url.clone());
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
    Ok(Requeued {
        message_id,
        generation,
    })
}

/// The letter's recorded attributes, less the final-pass marker and the failure notes.
fn recorded_attributes(
    letter: &DeadLetter,
) -> HashMap<String, aws_sdk_sqs::types::MessageAttributeValue> {
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
    attributes
}
