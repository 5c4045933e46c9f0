//! What a redrive is asked to do and what it reports: options, the `--filter` language,
//! each message's `Action`, the run's `RedriveReport`.

use aws_sdk_sqs::types::MessageAttributeValue;
use serde::Serialize;
use serde_json::Value;

use crate::message::{Envelope, KeySpec};
use crate::sqs::{ReceivedMessage, SqsError};
use crate::store::{RedriveCounts, StoreError};

/// What can stop a redrive.
#[derive(Debug, thiserror::Error)]
pub enum RedriveError {
    /// An SQS call failed.
    #[error(transparent)]
    Sqs(#[from] SqsError),
    /// The checkpoint store failed.
    #[error(transparent)]
    Checkpoint(#[from] StoreError),
    /// The options cannot work.
    #[error("{0}")]
    Config(String),
}

/// Only redrive messages matching this.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Filter {
    /// A message attribute has this string value.
    Attribute {
        /// Attribute name.
        name: String,
        /// Expected value.
        value: String,
    },
    /// The JSON pointer into the event has this value (strings, numbers and booleans
    /// compared as text).
    Pointer {
        /// JSON pointer, e.g. `/customer/id`.
        pointer: String,
        /// Expected value.
        value: String,
    },
    /// Every one of these matches (the console's reason and field filters together).
    All(Vec<Filter>),
}

impl Filter {
    /// Parse `NAME=VALUE` (a message attribute) or `/pointer=VALUE` (a field of the event).
    pub fn parse(text: &str) -> Result<Self, String> {
        let (left, value) = text.split_once('=').ok_or_else(|| {
            format!("filter {text:?} needs the form NAME=VALUE or /json/pointer=VALUE")
        })?;
        if left.is_empty() {
            return Err(format!("filter {text:?} has no attribute name or pointer"));
        }
        Ok(if left.starts_with('/') {
            Filter::Pointer {
                pointer: left.to_owned(),
                value: value.to_owned(),
            }
        } else {
            Filter::Attribute {
                name: left.to_owned(),
                value: value.to_owned(),
            }
        })
    }

    /// A filter on the worker's failure reason (`sqs_worker_failure_reason`).
    pub fn reason(reason: &str) -> Self {
        Filter::Attribute {
            name: crate::message::ATTR_FAILURE_REASON.to_owned(),
            value: reason.to_owned(),
        }
    }

    /// Whether a message (and its event, parsed, if it is JSON) matches.
    pub fn matches(&self, message: &ReceivedMessage, event: Option<&Value>) -> bool {
        match self {
            Filter::Attribute { name, value } => {
                message
                    .message_attributes
                    .get(name)
                    .and_then(MessageAttributeValue::string_value)
                    == Some(value.as_str())
            }
            Filter::Pointer { pointer, value } => match event.and_then(|e| e.pointer(pointer)) {
                Some(Value::String(s)) => s == value,
                Some(Value::Number(n)) => n.to_string() == *value,
                Some(Value::Bool(b)) => b.to_string() == *value,
                _ => false,
            },
            Filter::All(filters) => filters.iter().all(|f| f.matches(message, event)),
        }
    }
}

/// How to redrive.
#[derive(Debug, Clone)]
pub struct RedriveOptions {
    /// The DLQ to drain.
    pub dlq_url: String,
    /// Where to send; `None` means the queue whose RedrivePolicy points at the DLQ.
    pub to: Option<String>,
    /// Redrives allowed per message; the last one carries `dlq_final_pass=true`.
    pub max_redrives: u32,
    /// Most messages sent per second.
    pub rate: Option<f64>,
    /// Stop after this many messages examined.
    pub limit: Option<u64>,
    /// Report what would happen; change nothing.
    pub dry_run: bool,
    /// Redrive messages whose event is already complete instead of deleting them.
    pub include_complete: bool,
    /// Only these messages.
    pub filter: Option<Filter>,
    /// Checkpoint scope of the target worker; `None` means the target queue's name.
    pub scope: Option<String>,
    /// The target worker's key pointers, to look checkpoints up.
    pub key: KeySpec,
    /// The target worker's envelope.
    pub envelope: Envelope,
    /// Who runs this, for the audit row.
    pub operator: String,
}

/// What happened to one DLQ message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    /// Sent back with these markers (or would be, in a dry run).
    Redriven {
        /// The new redrive count.
        redrive_count: u32,
        /// True on the last allowed redrive.
        final_pass: bool,
    },
    /// The event is already complete: deleted from the DLQ (or would be).
    AlreadyComplete,
    /// The redrive count reached the maximum (or is unreadable): recorded in
    /// `dead_letters` and deleted (or would be).
    Exhausted {
        /// Why: `redrives_exhausted` or `invalid_redrive_count`.
        reason: String,
    },
    /// Did not match `--filter`; left in the DLQ.
    FilteredOut,
    /// Sending failed; left in the DLQ.
    Failed {
        /// The error.
        error: String,
    },
}

/// One message's line in the report.
#[derive(Debug, Clone, Serialize)]
pub struct Outcome {
    /// SQS message id in the DLQ.
    pub message_id: String,
    /// The event's idempotency key.
    pub key: String,
    /// The redrive count the message arrived with.
    pub previous_redrive_count: Option<u32>,
    /// The event's checkpoint status in the target scope, if any.
    pub checkpoint_status: Option<String>,
    /// What was (or would be) done.
    pub action: Action,
}

/// The whole run.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RedriveReport {
    /// The audit row id in `redrives`.
    pub audit_id: i64,
    /// Where messages went.
    pub target_url: String,
    /// True for `--dry-run`.
    pub dry_run: bool,
    /// Messages examined.
    pub examined: u64,
    /// Counts per action.
    pub counts: RedriveCounts,
    /// Left in the DLQ because they did not match the filter.
    pub filtered_out: u64,
    /// Seconds taken.
    pub elapsed_secs: f64,
}

/// Who runs a redrive, for its audit row when the operator names nobody: `user@host`.
pub fn default_operator() -> String {
    let user = std::env::var("USER").unwrap_or_else(|_| "unknown".into());
    let host = crate::worker::host_name().unwrap_or_else(|| "localhost".into());
    format!("{user}@{host}")
}
