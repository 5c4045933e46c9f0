//! One DLQ message by its id: redrive it (its body as it is, or edited), or delete it. The
//! message is found by receiving (a DLQ cannot be read by id): what else is read on the way
//! is handed back at once, as a peek would.

use std::time::{Duration, Instant};

use serde::Serialize;

use crate::sqs::{ReceivedMessage, SqsQueue};
use crate::store::CheckpointStore;

use super::options::{Outcome, RedriveError, RedriveOptions};
use super::scan::{Scan, delete_one};

/// Most messages read while looking for one: the console's sample size at most, so a
/// message it showed is found unless it left the DLQ meanwhile.
pub const MOST_READ_WHILE_LOOKING: usize = 1000;

/// What became of a request about one message.
#[derive(Debug, Clone, Serialize)]
pub enum OneMessage<T> {
    /// Found and acted on.
    Done(T),
    /// Not in the DLQ any more (redriven, deleted, or moved meanwhile), or hidden by another
    /// reader.
    NotFound,
}

/// Redrive one DLQ message through the same scan as `redrive` (markers, final pass, send
/// first and delete after, the audit row), optionally with an edited body. The edited body
/// must give a key (when the worker takes keys from JSON it must be JSON): the caller checks
/// with [`crate::message::derive_identity`] first.
pub async fn redrive_one(
    client: aws_sdk_sqs::Client,
    store: &dyn CheckpointStore,
    options: &RedriveOptions,
    message_id: &str,
    edited_body: Option<&str>,
) -> Result<OneMessage<Outcome>, RedriveError> {
    let started = Instant::now();
    let mut scan = Scan::start(client, store, options).await?;
    let found = find(&scan.dlq, message_id, &mut scan.hold).await;
    let outcome = match found {
        Ok(Some(mut message)) => {
            if let Some(body) = edited_body {
                message.body = body.to_owned();
            }
            scan.examine(&message).await
        }
        Ok(None) => Ok(None),
        Err(error) => Err(error),
    };
    // Hand back what was read on the way and close the audit row, whatever happened.
    let finished = scan.finish(started).await;
    match (outcome?, finished) {
        (Some(outcome), Ok(_)) => Ok(OneMessage::Done(outcome)),
        (None, Ok(_)) => Ok(OneMessage::NotFound),
        (_, Err(error)) => Err(error),
    }
}

/// Delete one DLQ message for good (it is not recorded anywhere: the caller audits it).
/// Returns the message deleted, for the audit.
pub async fn delete_dlq_message(
    client: aws_sdk_sqs::Client,
    dlq_url: &str,
    message_id: &str,
) -> Result<OneMessage<ReceivedMessage>, RedriveError> {
    let dlq = SqsQueue::new(client, dlq_url);
    let mut others = Vec::new();
    let found = find(&dlq, message_id, &mut others).await;
    if !others.is_empty() {
        dlq.make_visible_now(others).await?;
    }
    match found? {
        Some(message) => {
            delete_one(&dlq, &message).await?;
            Ok(OneMessage::Done(message))
        }
        None => Ok(OneMessage::NotFound),
    }
}

/// Receive until `message_id` turns up, or the DLQ has nothing more to give, or
/// [`MOST_READ_WHILE_LOOKING`] were read. The other messages' handles go to `others`, for
/// the caller to hand back.
async fn find(
    dlq: &SqsQueue,
    message_id: &str,
    others: &mut Vec<String>,
) -> Result<Option<ReceivedMessage>, RedriveError> {
    let mut read = 0;
    let mut empty_receives = 0;
    while read < MOST_READ_WHILE_LOOKING && empty_receives < 2 {
        // Held long enough to act on the one found; the rest are handed back at once.
        let batch = dlq
            .receive(10, Duration::from_secs(1), Some(Duration::from_secs(60)))
            .await?;
        if batch.is_empty() {
            empty_receives += 1;
            continue;
        }
        read += batch.len();
        let mut found = None;
        for message in batch {
            if message.message_id == message_id && found.is_none() {
                found = Some(message);
            } else {
                others.push(message.receipt_handle);
            }
        }
        if found.is_some() {
            return Ok(found);
        }
    }
    Ok(None)
}
