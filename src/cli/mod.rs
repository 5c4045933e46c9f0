//! The binary's side: options (`args`), the subcommands behind `main.rs`, the demo. Only the
//! binary uses them, so `anyhow` and printing live here and nowhere in the library.

pub mod args;
mod checkpoints;
mod database;
mod dead_letters;
pub mod demo;
mod dlq;
mod output;
mod run;

use std::collections::HashMap;
use std::io::IsTerminal;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, bail};
use comfy_table::{CellAlignment, ContentArrangement, Table};
use indicatif::{ProgressBar, ProgressStyle};
use tokio_util::sync::CancellationToken;

use crate::cli::args::{
    CheckpointsPruneArgs, CheckpointsShowArgs, CheckpointsStaleArgs, DeadLetterIdArgs,
    DeadLettersListArgs, DlqPeekArgs, KeyArgs, LambdaArgs, OutputFormat, RedriveArgs, RunArgs,
    SendArgs,
};
use sqs_worker::lambda::LambdaWorker;
use sqs_worker::message::{self, KeySpec};
use sqs_worker::redrive::{
    self, Action, Filter, Outcome, RedriveError, RedriveOptions, RedriveReport,
};
use sqs_worker::sqs::{self, OutgoingMessage, SqsError, SqsQueue};
use sqs_worker::startup::{self, StartupError, Verdict};
use sqs_worker::store::{
    Checkpoint, CheckpointStore, DeadLetter, DeadLetters, PostgresStore, Retention,
};
use sqs_worker::telemetry::{self, Readiness};
use sqs_worker::worker::{RunSummary, Worker, WorkerError};

use database::*;
use output::*;
use run::*;

pub use checkpoints::{prune_checkpoints, show_checkpoint, stale_checkpoints};
pub use database::{connect, migrate};
pub use dead_letters::{dead_letter_requeue, dead_letter_show, dead_letters_list};
pub use dlq::{dlq_peek, redrive};
pub use output::{exit_status, one_line, redact_url};
pub use run::{lambda, run, send};

#[cfg(test)]
mod tests;
