//! Operator tooling: redrive a DLQ with markers, and peek at it.
//!
//! A redrive moves each message back to its source queue with `dlq_redriven=true`,
//! `redrive_count` + 1 and, on the last allowed redrive, `dlq_final_pass=true`, so the worker
//! ends a failing final pass silently instead of looping. Sending always comes before
//! deleting: a redrive killed midway leaves, at worst, a duplicate, which the checkpoint
//! makes harmless.

mod options;
mod peek;
mod redriven;
mod scan;

// The files share these imports (`use super::*;`); everything public is re-exported here, so
// callers keep writing `redrive::redrive`.
use std::collections::HashSet;
use std::time::{Duration, Instant};

use aws_sdk_sqs::types::MessageAttributeValue;
use serde::Serialize;
use serde_json::Value;

use crate::message::{self, Envelope, KeySpec};
use crate::sqs::{self, OutgoingMessage, ReceivedMessage, SqsError, SqsQueue};
use crate::store::{CheckpointStore, NewDeadLetter, RedriveCounts, StoreError};

pub use options::*;
pub use peek::*;
pub use redriven::*;
pub use scan::*;

#[cfg(test)]
mod tests;
