//! The options of the operator commands: `redrive`, `dlq`, `dead-letters`, `checkpoints`,
//! `send`.

use std::time::Duration;

use clap::{Args, Subcommand};

use super::{DatabaseArgs, KeyArgs, OutputFormat, parse_duration};

/// Options of `sqs-worker redrive`.
#[derive(Debug, Clone, Args)]
pub struct RedriveArgs {
    /// The checkpoint store, as for `run`: postgres://…, dynamodb://TABLE, sqlite://PATH
    /// (not needed with --native).
    #[arg(
        long,
        env = "DATABASE_URL",
        hide_env_values = true,
        required_unless_present = "native"
    )]
    pub database_url: Option<String>,

    /// URL of the DLQ to drain.
    #[arg(long, env = "SQS_WORKER_DLQ_URL")]
    pub dlq_url: String,

    /// Queue to send to. [default: the queue whose RedrivePolicy names the DLQ; required
    /// when several do]
    #[arg(long, value_name = "URL", env = "SQS_WORKER_REDRIVE_TO")]
    pub to: Option<String>,

    /// Redrives allowed per message. The last carries dlq_final_pass=true (a failure then
    /// ends in dead_letters); a message already at the maximum is recorded there and not
    /// sent again.
    #[arg(long, env = "SQS_WORKER_MAX_REDRIVES", default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub max_redrives: u32,

    /// Most messages sent per second.
    #[arg(long, value_name = "PER_SEC", env = "SQS_WORKER_REDRIVE_RATE")]
    pub rate: Option<f64>,

    /// Stop after examining this many messages.
    #[arg(long, env = "SQS_WORKER_REDRIVE_LIMIT")]
    pub limit: Option<u64>,

    /// Show, per message, its key, redrive count, checkpoint status and what a real run
    /// would do; change nothing.
    #[arg(long)]
    pub dry_run: bool,

    /// Redrive messages whose event is already complete (by default they are deleted from
    /// the DLQ as already done).
    #[arg(long)]
    pub include_complete: bool,

    /// Only messages with this message attribute value (`NAME=VALUE`) or event field value
    /// (`/json/pointer=VALUE`); the others stay in the DLQ.
    #[arg(long, value_name = "FILTER")]
    pub filter: Option<String>,

    /// Checkpoint scope of the target worker. [default: the target queue's name]
    #[arg(long, env = "SQS_WORKER_SCOPE")]
    pub scope: Option<String>,

    #[command(flatten)]
    #[allow(missing_docs)]
    pub key: KeyArgs,

    /// Who runs this, for the `redrives` audit row (default: $USER@host).
    #[arg(long, env = "SQS_WORKER_OPERATOR")]
    pub operator: Option<String>,

    /// Use SQS's own StartMessageMoveTask instead (fast bulk move, but it cannot add
    /// redrive markers, so a failing message can loop again).
    #[arg(long, conflicts_with_all = ["dry_run", "filter", "limit", "include_complete"])]
    pub native: bool,

    /// With --native: show the DLQ's move tasks instead of starting one.
    #[arg(long, requires = "native")]
    pub status: bool,

    /// With --native: cancel the move task with this handle.
    #[arg(long, value_name = "TASK_HANDLE", requires = "native")]
    pub cancel: Option<String>,

    /// Output format of the per-message report and summary.
    #[arg(long, value_enum, default_value_t = OutputFormat::Table)]
    pub format: OutputFormat,
}

/// `sqs-worker dlq …`
#[derive(Debug, Subcommand)]
pub enum DlqCommand {
    /// Show messages in a DLQ without keeping them (each is made visible again at once).
    Peek(DlqPeekArgs),
}

/// Options of `sqs-worker dlq peek`.
#[derive(Debug, Clone, Args)]
pub struct DlqPeekArgs {
    /// URL of the DLQ.
    #[arg(long, env = "SQS_WORKER_DLQ_URL")]
    pub dlq_url: String,

    /// Most messages to show.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub limit: u32,

    #[command(flatten)]
    #[allow(missing_docs)]
    pub key: KeyArgs,

    /// Output format.
    #[arg(long, value_enum, default_value_t = OutputFormat::Table)]
    pub format: OutputFormat,
}

/// `sqs-worker dead-letters …`
#[derive(Debug, Subcommand)]
pub enum DeadLettersCommand {
    /// List dead letters, newest first.
    List(DeadLettersListArgs),
    /// Show one dead letter whole (body, attributes, error).
    Show(DeadLetterIdArgs),
    /// Write dead letters as JSON lines on stdout, one object per line.
    Export(DeadLettersListArgs),
    /// Send one dead letter back to its queue on purpose, with its redrive count reset to 0.
    Requeue(DeadLetterIdArgs),
}

/// Options of `dead-letters list` and `export`.
#[derive(Debug, Clone, Args)]
pub struct DeadLettersListArgs {
    #[command(flatten)]
    #[allow(missing_docs)]
    pub database: DatabaseArgs,

    /// Only this checkpoint scope.
    #[arg(long, env = "SQS_WORKER_SCOPE")]
    pub scope: Option<String>,

    /// Most rows.
    #[arg(long, default_value_t = 100)]
    pub limit: i64,

    /// Output format (list only; export always writes JSON lines).
    #[arg(long, value_enum, default_value_t = OutputFormat::Table)]
    pub format: OutputFormat,
}

/// Options naming one dead letter.
#[derive(Debug, Clone, Args)]
pub struct DeadLetterIdArgs {
    #[command(flatten)]
    #[allow(missing_docs)]
    pub database: DatabaseArgs,

    /// The dead letter's id (from `dead-letters list`).
    #[arg(long)]
    pub id: i64,

    /// Output format (show only).
    #[arg(long, value_enum, default_value_t = OutputFormat::Table)]
    pub format: OutputFormat,
}

/// Options of `sqs-worker send`.
#[derive(Debug, Clone, Args)]
pub struct SendArgs {
    /// URL of the queue.
    #[arg(long, env = "SQS_QUEUE_URL")]
    pub queue_url: String,

    /// FIFO message group id (required by FIFO queues).
    #[arg(long)]
    pub group_id: Option<String>,
}

/// `sqs-worker checkpoints …`
#[derive(Debug, Subcommand)]
pub enum CheckpointsCommand {
    /// Show one event's checkpoint: status, steps, lease, attempts, last error.
    Show(CheckpointsShowArgs),
    /// Delete complete checkpoints older than a retention period, in small batches (each a
    /// short transaction that skips rows in use), so the table stays bounded. A duplicate
    /// delivered after its event's row was pruned runs again: keep the retention above the
    /// longest time a message can come back (SQS keeps messages up to 14 days).
    Prune(CheckpointsPruneArgs),
    /// List events left in progress with no live lease for longer than --older-than: their
    /// holder stopped and nothing took them over — typically because SQS moved the message to
    /// the DLQ itself (maxReceiveCount), where no worker sees it. With --mark-failed, mark
    /// them failed so `checkpoints show` tells the truth; a redrive of the message still runs
    /// the event again.
    Stale(CheckpointsStaleArgs),
}

/// Options of `sqs-worker checkpoints stale`.
#[derive(Debug, Clone, Args)]
pub struct CheckpointsStaleArgs {
    #[command(flatten)]
    #[allow(missing_docs)]
    pub database: DatabaseArgs,

    /// How long an event must have been in progress without a live lease: a number and a
    /// unit, e.g. 1h, 30m. Keep it above the queue's visibility timeout times its
    /// maxReceiveCount, so an event still being retried is not listed.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub older_than: Duration,

    /// Only this scope. [default: every scope]
    #[arg(long, env = "SQS_WORKER_SCOPE")]
    pub scope: Option<String>,

    /// Mark the listed events failed (reason `abandoned`), each unless it was claimed again
    /// meanwhile.
    #[arg(long)]
    pub mark_failed: bool,

    /// Most events listed (and marked).
    #[arg(long, default_value_t = 1000)]
    pub limit: i64,

    /// Output format.
    #[arg(long, value_enum, default_value_t = OutputFormat::Table)]
    pub format: OutputFormat,
}

/// Options of `sqs-worker checkpoints prune`.
#[derive(Debug, Clone, Args)]
pub struct CheckpointsPruneArgs {
    #[command(flatten)]
    #[allow(missing_docs)]
    pub database: DatabaseArgs,

    /// Delete complete checkpoints completed longer ago than this: a number and a unit,
    /// e.g. 30d, 12h, 90m, 3600s.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub older_than: Duration,

    /// Only this scope. [default: every scope]
    #[arg(long)]
    pub scope: Option<String>,

    /// Rows deleted per statement (per short transaction).
    #[arg(long, default_value_t = 5000, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub batch_size: u32,

    /// Output format of the final report.
    #[arg(long, value_enum, default_value_t = OutputFormat::Table)]
    pub format: OutputFormat,
}

/// Options of `sqs-worker checkpoints show`.
#[derive(Debug, Clone, Args)]
pub struct CheckpointsShowArgs {
    #[command(flatten)]
    #[allow(missing_docs)]
    pub database: DatabaseArgs,

    /// Checkpoint scope (the worker's --scope, by default its queue's name).
    #[arg(long, env = "SQS_WORKER_SCOPE")]
    pub scope: String,

    /// The idempotency key.
    #[arg(long)]
    pub key: String,

    /// Output format.
    #[arg(long, value_enum, default_value_t = OutputFormat::Table)]
    pub format: OutputFormat,
}

/// Options of `sqs-worker console`.
#[derive(Debug, Clone, Args)]
pub struct ConsoleArgs {
    /// URL of a DLQ to show (repeat for several, in the order shown).
    #[arg(
        long = "dlq-url",
        value_name = "URL",
        env = "SQS_WORKER_DLQ_URL",
        value_delimiter = ',',
        required = true
    )]
    pub dlq_urls: Vec<String>,

    /// The checkpoint store, as for `run`: postgres://…, dynamodb://TABLE, sqlite://PATH.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: String,

    /// Where to serve the console. Any address other than loopback needs --auth-token.
    #[arg(
        long,
        value_name = "ADDR",
        env = "SQS_WORKER_CONSOLE_LISTEN",
        default_value = "127.0.0.1:8080"
    )]
    pub listen: std::net::SocketAddr,

    /// The token operators log in with (at least 16 characters); required off loopback.
    /// With it, every page needs a login; without it (loopback only), the console answers
    /// only to the names 127.0.0.1, localhost and [::1].
    #[arg(long, env = "SQS_WORKER_CONSOLE_TOKEN", hide_env_values = true)]
    pub auth_token: Option<String>,

    /// Show the DLQs, dead letters and checkpoints, but no action; refuse every change.
    #[arg(long, env = "SQS_WORKER_CONSOLE_READ_ONLY")]
    pub read_only: bool,

    /// Who acts, for the audit rows (default: $USER@host; with --auth-token, each operator
    /// may give their name at login).
    #[arg(long, env = "SQS_WORKER_OPERATOR")]
    pub operator: Option<String>,

    /// Where redrives send. [default: each DLQ's source queue, by its RedrivePolicy]
    #[arg(long, value_name = "URL", env = "SQS_WORKER_REDRIVE_TO")]
    pub to: Option<String>,

    /// Redrives allowed per message, as for `redrive`: the last carries dlq_final_pass=true.
    #[arg(long, env = "SQS_WORKER_MAX_REDRIVES", default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub max_redrives: u32,

    /// Checkpoint scope of the target worker. [default: the target queue's name]
    #[arg(long, env = "SQS_WORKER_SCOPE")]
    pub scope: Option<String>,

    #[command(flatten)]
    #[allow(missing_docs)]
    pub key: KeyArgs,

    /// The target worker's fingerprint fields (`--fingerprint` of `run`), so an edited body
    /// is fingerprinted as the worker will.
    #[arg(
        long = "fingerprint",
        value_name = "POINTER",
        env = "SQS_WORKER_FINGERPRINT",
        value_delimiter = ','
    )]
    pub fingerprint: Vec<String>,

    /// Most messages read per DLQ view (at most 500). Reading a DLQ is receiving: each
    /// message read is hidden for a moment (handed back at once) and its receive count goes up.
    #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u32).range(1..=500))]
    pub sample: u32,

    /// How long a DLQ's sample is reused before it is read again.
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = parse_duration)]
    pub sample_for: Duration,
}
