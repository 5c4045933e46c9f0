//! Redrive markers and failure attributes: the message attributes sqs-worker reads and
//! writes, and the pass (requeue generation, redrive count) they make.

use super::truncate_for_log;
/// Message attribute set by `redrive` on every message it sends back: `"true"`.
pub const ATTR_DLQ_REDRIVEN: &str = "dlq_redriven";
/// Message attribute: how many times the message has been redriven from its DLQ.
pub const ATTR_REDRIVE_COUNT: &str = "redrive_count";
/// Message attribute: `"true"` on the last redrive an operator allows; a failure then ends
/// the message (recorded, deleted) instead of sending it to the DLQ again.
pub const ATTR_DLQ_FINAL_PASS: &str = "dlq_final_pass";
/// Message attribute set by `dead-letters requeue`: which deliberate requeue of the event
/// this is (1, 2, …). A requeue is a new pass even though its redrive count starts at 0 again.
pub const ATTR_REQUEUE_GENERATION: &str = "requeue_generation";
/// The redrive markers, most important first.
pub const REDRIVE_MARKERS: [&str; 4] = [
    ATTR_REDRIVE_COUNT,
    ATTR_REQUEUE_GENERATION,
    ATTR_DLQ_FINAL_PASS,
    ATTR_DLQ_REDRIVEN,
];
/// What a message derived from another (a DLQ copy, a redriven message) keeps longest when
/// it must shrink to fit a size limit, most important first: the redrive markers (a lost
/// `redrive_count` would let `redrive` loop past `--max-redrives`), then the failure reason.
pub const KEEP_LONGEST: [&str; 5] = [
    ATTR_REDRIVE_COUNT,
    ATTR_REQUEUE_GENERATION,
    ATTR_DLQ_FINAL_PASS,
    ATTR_DLQ_REDRIVEN,
    ATTR_FAILURE_REASON,
];
/// Message attribute the worker adds when it sends a message to the DLQ: a reason code.
pub const ATTR_FAILURE_REASON: &str = "sqs_worker_failure_reason";
/// Message attribute the worker adds when it sends a message to the DLQ: the error text.
pub const ATTR_FAILURE_DETAIL: &str = "sqs_worker_failure_detail";

/// The operator's redrive markers, read from message attributes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RedriveMarkers {
    /// The message came back from the DLQ through `redrive`.
    pub redriven: bool,
    /// How many times it has been redriven.
    pub redrive_count: u32,
    /// A failure on this delivery ends the message for good.
    pub final_pass: bool,
    /// Which deliberate requeue (`dead-letters requeue`) this is; 0 if never requeued.
    pub requeue_generation: u32,
    /// Marker values that could not be read, for the log (the marker then counts as absent).
    pub problems: Vec<String>,
}

impl RedriveMarkers {
    /// The pass this delivery belongs to.
    pub fn pass(&self) -> Pass {
        Pass {
            requeue_generation: self.requeue_generation,
            redrive_count: self.redrive_count,
        }
    }
}

/// Which pass over an event a delivery belongs to: the first delivery and its duplicates
/// are pass (0, 0); each redrive raises the redrive count, each deliberate requeue the
/// generation (and starts its redrive count again at 0). Passes order by generation, then
/// redrive count. A failed event is tried again only by a later pass, so duplicates of one
/// redrive never run a handler that already failed on it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Pass {
    /// Deliberate requeues so far.
    pub requeue_generation: u32,
    /// Redrives since the latest requeue.
    pub redrive_count: u32,
}

/// Read the redrive markers from `(name, string value)` pairs of message attributes.
///
/// Hostile or malformed values never fail the message: an unreadable marker is treated as
/// absent and reported in `problems`, so the worker can log it once.
pub fn parse_markers<'a>(
    attributes: impl IntoIterator<Item = (&'a str, Option<&'a str>)>,
) -> RedriveMarkers {
    let mut markers = RedriveMarkers::default();
    for (name, value) in attributes {
        let value = value.map(str::trim);
        match name {
            ATTR_DLQ_REDRIVEN => markers.redriven = parse_flag(name, value, &mut markers.problems),
            ATTR_DLQ_FINAL_PASS => {
                markers.final_pass = parse_flag(name, value, &mut markers.problems)
            }
            ATTR_REDRIVE_COUNT => {
                if let Some(count) = parse_count(name, value, &mut markers.problems) {
                    markers.redrive_count = count;
                }
            }
            ATTR_REQUEUE_GENERATION => {
                if let Some(generation) = parse_count(name, value, &mut markers.problems) {
                    markers.requeue_generation = generation;
                }
            }
            _ => {}
        }
    }
    markers
}

pub(super) fn parse_count(
    name: &str,
    value: Option<&str>,
    problems: &mut Vec<String>,
) -> Option<u32> {
    match value.map(str::parse::<u32>) {
        Some(Ok(count)) => Some(count),
        None => {
            problems.push(format!("{name} is not a String or Number attribute"));
            None
        }
        Some(Err(_)) => {
            problems.push(format!(
                "{name} is not a count from 0 to {}: {:?}",
                u32::MAX,
                truncate_for_log(value.unwrap_or(""), 40)
            ));
            None
        }
    }
}

pub(super) fn parse_flag(name: &str, value: Option<&str>, problems: &mut Vec<String>) -> bool {
    match value {
        Some(v) if v.eq_ignore_ascii_case("true") => true,
        Some(v) if v.eq_ignore_ascii_case("false") => false,
        Some(other) => {
            problems.push(format!(
                "{name} is not \"true\" or \"false\": {:?}",
                truncate_for_log(other, 40)
            ));
            false
        }
        None => {
            problems.push(format!("{name} is not a String attribute"));
            false
        }
    }
}
