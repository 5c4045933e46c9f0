//! Command-line and environment configuration: one clap-derived struct per subcommand.
//!
//! Every option has a `--flag` and an environment variable (`SQS_WORKER_<OPTION>`, or the
//! conventional `SQS_QUEUE_URL`, `DATABASE_URL`, `AWS_ENDPOINT_URL`), and a doc comment that
//! becomes its `--help`.

mod operator;
mod worker;

use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use sqs_worker::message::Envelope;
use sqs_worker::telemetry::LogFormat;

// Every option struct, wherever it is declared, is `args::X`.
pub use operator::*;
pub use worker::*;

/// An SQS consumer with exactly-once effects per event: checkpoints in PostgreSQL, retries
/// with backoff, a DLQ for poison messages.
#[derive(Debug, Parser)]
#[command(name = "sqs-worker", version, propagate_version = true)]
pub struct Cli {
    /// Log format: `text` for people, `json` for CloudWatch and other collectors. The level
    /// comes from RUST_LOG (default: info).
    #[arg(
        long,
        env = "SQS_WORKER_LOG_FORMAT",
        value_enum,
        default_value_t = LogFormat::Text,
        global = true
    )]
    pub log_format: LogFormat,

    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Output formats for commands a person or a script reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    /// Aligned columns for people.
    Table,
    /// JSON for scripts.
    Json,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Apply the database migrations (creates the checkpoint table); safe to run again.
    Migrate(DatabaseArgs),
    /// Consume a queue: claim each event's checkpoint, run the handler, delete when done.
    ///
    /// The handler is a command after `--` (body on stdin; exit 0 done, 65 permanent, other
    /// retryable), an HTTP endpoint given with --http-url, or a built-in one chosen with
    /// --handler. On exit, prints what happened (counts, active time) as one JSON line on
    /// stdout; logs go to stderr.
    Run(RunArgs),
    /// Run as an AWS Lambda function on an SQS event source: the same claim/step/complete
    /// core and handler options as `run`; returns a partial batch response listing only the
    /// retryable failures (enable ReportBatchItemFailures on the event source mapping).
    /// With --event FILE, runs one invocation locally and prints the response.
    Lambda(LambdaArgs),
    /// Send sample orders (with duplicates and a poison message) to the local `orders` queue,
    /// process them with a built-in sample handler until idle, and print a summary.
    Demo(DemoArgs),
    /// Move messages from a DLQ back to their queue with redrive markers, so that a failing
    /// final pass ends recorded in dead_letters instead of looping.
    Redrive(RedriveArgs),
    /// Serve the operator console: DLQs at a glance (by failure reason, age, key), browse
    /// and filter without keeping messages, redrive one (edited or not) or all of a filter
    /// after a dry run, delete, dead letters and checkpoints; every action audited.
    Console(ConsoleArgs),
    /// Inspect a DLQ.
    Dlq {
        /// What to do.
        #[command(subcommand)]
        command: DlqCommand,
    },
    /// Messages that ended for good (failed final passes, exhausted redrives).
    DeadLetters {
        /// What to do.
        #[command(subcommand)]
        command: DeadLettersCommand,
    },
    /// Send messages to a queue, one per line of standard input (for trying things out and
    /// for scripts; lines are sent as they are, JSON or not).
    Send(SendArgs),
    /// Inspect checkpoints.
    Checkpoints {
        /// What to inspect.
        #[command(subcommand)]
        command: CheckpointsCommand,
    },
}

/// Where the checkpoint database is.
#[derive(Debug, Clone, Args)]
pub struct DatabaseArgs {
    /// The checkpoint store: postgres://user:password@host:5432/dbname (several hosts),
    /// dynamodb://TABLE (Lambda and serverless; `migrate` creates the table; endpoint from
    /// AWS_ENDPOINT_URL_DYNAMODB when local), sqlite://PATH (one host; `run` and `migrate`
    /// create the file) or sqlite::memory: (one process). See the README's "Choosing a store".
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: String,
}

/// How the target worker reads keys, so operator tools can find checkpoints.
#[derive(Debug, Clone, Args)]
pub struct KeyArgs {
    /// JSON pointer(s) to the idempotency key, as given to the worker (`--key`).
    #[arg(
        long = "key",
        value_name = "POINTER",
        env = "SQS_WORKER_KEY",
        value_delimiter = ','
    )]
    pub keys: Vec<String>,

    /// The worker's envelope (`raw`, `sns`, `eventbridge`).
    #[arg(long, env = "SQS_WORKER_ENVELOPE", value_enum, default_value_t = Envelope::Raw)]
    pub envelope: Envelope,
}

/// Parse a duration with a unit: `30d`, `12h`, `90m`, `3600s` (or humantime forms such as
/// `1day 2h`).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text.trim()).map_err(|e| {
        format!("{text:?} is not a duration ({e}); write a number and a unit, e.g. 30d, 12h, 90m")
    })
}

/// Parse a duration in seconds, fractions allowed (`2`, `0.5`).
pub fn parse_seconds(text: &str) -> Result<Duration, String> {
    let seconds: f64 = text
        .trim()
        .trim_end_matches('s')
        .parse()
        .map_err(|_| format!("{text:?} is not a number of seconds, e.g. 2 or 0.5"))?;
    if !seconds.is_finite() || !(0.0..=43_200.0).contains(&seconds) {
        return Err(format!("{text:?} must be between 0 and 43200 seconds"));
    }
    Ok(Duration::from_secs_f64(seconds))
}

#[cfg(test)]
mod tests;
