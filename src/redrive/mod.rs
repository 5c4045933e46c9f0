//! Operator tooling: redrive a DLQ with markers (all of it, by filter, or one message,
//! edited or not), peek at it, delete one message, requeue a dead letter.
//!
//! A redrive moves each message back to its source queue with `dlq_redriven=true`,
//! `redrive_count` + 1 and, on the last allowed redrive, `dlq_final_pass=true`, so the worker
//! ends a failing final pass silently instead of looping. Sending always comes before
//! deleting: a redrive killed midway leaves, at worst, a duplicate, which the checkpoint
//! makes harmless.

mod options;
mod peek;
mod redriven;
mod requeue;
mod scan;
mod single;

pub use options::*;
pub use peek::*;
pub use redriven::*;
pub use requeue::*;
pub use scan::*;
pub use single::*;

#[cfg(test)]
mod tests;
