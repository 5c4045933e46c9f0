//! Command-line and environment configuration: one clap-derived struct per subcommand.
//!
//! Every option has a `--flag` and an environment variable (`SQS_WORKER_<OPTION>`, or the
//! conventional `SQS_QUEUE_URL`, `DATABASE_URL`, `AWS_ENDPOINT_URL`), and a doc comment that
//! becomes its `--help`.

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use sqs_worker::telemetry::LogFormat;

use sqs_worker::handler::Handler;
use sqs_worker::handlers::{ExecHandler, HttpHandler, HttpHeader, NoopHandler};
use sqs_worker::message::{Envelope, KeySpec};
use sqs_worker::worker::{PayloadMismatch, WorkerConfig};

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
    /// PostgreSQL URL of the checkpoint database, e.g.
    /// postgres://user:password@host:5432/dbname.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: String,
}

/// Built-in handlers selectable without a command.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BuiltinHandler {
    /// Succeed at once without doing anything (benchmarks, recording-only consumers).
    Noop,
}

/// Options of `sqs-worker run`.
#[derive(Debug, Clone, Args)]
pub struct RunArgs {
    #[command(flatten)]
    #[allow(missing_docs)]
    pub database: DatabaseArgs,

    /// URL of the queue to consume.
    #[arg(long, env = "SQS_QUEUE_URL")]
    pub queue_url: String,

    #[command(flatten)]
    #[allow(missing_docs)]
    pub processing: ProcessingArgs,

    /// Most messages in flight at once (handlers running plus messages waiting to be
    /// settled).
    #[arg(long, env = "SQS_WORKER_CONCURRENCY", default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub concurrency: u32,

    /// Concurrent long polls (each receives up to 10 messages).
    #[arg(long, env = "SQS_WORKER_POLLERS", default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub pollers: u32,

    /// Long-poll wait per ReceiveMessage, in seconds (0–20).
    #[arg(long, env = "SQS_WORKER_WAIT_TIME_SECONDS", default_value_t = 20, value_parser = clap::value_parser!(u64).range(0..=20))]
    pub wait_time_seconds: u64,

    /// Visibility timeout to request on receive, in seconds; checkpoint leases last as
    /// long. [default: the queue's VisibilityTimeout]
    #[arg(long, env = "SQS_WORKER_VISIBILITY_TIMEOUT", value_parser = clap::value_parser!(u64).range(1..=43_199))]
    pub visibility_timeout: Option<u64>,

    /// Serve /healthz (alive), /readyz (SQS and the database answered recently; 503 while
    /// not, and from the start of a shutdown) and /metrics (Prometheus text) on this
    /// address, e.g. 0.0.0.0:9090. Off by default.
    #[arg(long, value_name = "ADDR", env = "SQS_WORKER_METRICS_ADDR")]
    pub metrics_addr: Option<std::net::SocketAddr>,

    /// Exit 0 once nothing was received or running here for this many seconds and the queue
    /// holds nothing visible, in flight or delayed (drain mode for batch jobs and tests):
    /// messages hidden by a crashed worker, waiting out a retry backoff or sent with a delay
    /// are waited for, at most the visibility timeout plus this period, then the worker exits
    /// and logs what it left. Long polls shorten as the idle period runs out, so the exit
    /// comes within about a second of it.
    #[arg(long, value_name = "SECS", env = "SQS_WORKER_EXIT_WHEN_IDLE", value_parser = parse_seconds)]
    pub exit_when_idle: Option<Duration>,

    /// After SIGTERM/SIGINT, how long the drain may take, in seconds: running handlers finish
    /// and long polls already in flight complete (their messages are handed back at once, as
    /// a dropped poll would hide them for a visibility timeout). Keep it below the
    /// orchestrator's stop timeout (ECS: 30 s) and above --wait-time-seconds.
    #[arg(long, value_name = "SECS", env = "SQS_WORKER_SHUTDOWN_TIMEOUT", default_value = "25", value_parser = parse_seconds)]
    pub shutdown_timeout: Duration,

    #[command(flatten)]
    #[allow(missing_docs)]
    pub handler: HandlerArgs,
}

impl RunArgs {
    /// The worker configuration these options describe.
    pub fn worker_config(&self) -> Result<WorkerConfig, String> {
        let mut config = self.processing.worker_config(&self.queue_url)?;
        config.pollers = self.pollers as usize;
        config.concurrency = self.concurrency as usize;
        config.wait_time = Duration::from_secs(self.wait_time_seconds);
        config.visibility_timeout = self.visibility_timeout.map(Duration::from_secs);
        config.exit_when_idle = self.exit_when_idle;
        config.shutdown_timeout = self.shutdown_timeout;
        Ok(config)
    }
}

/// How events are identified, retried and bounded: the same for `run` and `lambda`.
#[derive(Debug, Clone, Args)]
pub struct ProcessingArgs {
    /// JSON pointer to the idempotency key in the body, e.g. /order_id. Repeat it (or give
    /// a comma-separated list in the env variable) for a composite key. Without it the key
    /// is the SHA-256 of the body. Never the SQS MessageId, which changes on every re-send.
    #[arg(
        long = "key",
        value_name = "POINTER",
        env = "SQS_WORKER_KEY",
        value_delimiter = ','
    )]
    pub keys: Vec<String>,

    /// How events are wrapped: `raw` (the body is the event), `sns` (SNS Notifications are
    /// unwrapped to their Message; other bodies are taken as raw message delivery) or
    /// `eventbridge` (the event is the envelope's `detail`). Keys resolve inside the event.
    #[arg(long, env = "SQS_WORKER_ENVELOPE", value_enum, default_value_t = Envelope::Raw)]
    pub envelope: Envelope,

    /// Fingerprint only this field of the event (a JSON pointer, e.g. /order/amount) to tell
    /// a true duplicate from a reused key; repeat it for more fields (the env variable takes
    /// a comma-separated list). By default the whole event is fingerprinted, so a re-sent
    /// event that differs only in a volatile field (`sent_at`, a delivery counter) counts as
    /// a payload mismatch. Changing it makes events seen before look mismatched.
    #[arg(
        long = "fingerprint",
        value_name = "POINTER",
        env = "SQS_WORKER_FINGERPRINT",
        value_delimiter = ','
    )]
    pub fingerprint: Vec<String>,

    /// When a key arrives again with a different payload: `dead-letter` sends that message
    /// to the DLQ with reason payload_mismatch (the detail names the fields that differ);
    /// `accept` treats it as the same event.
    #[arg(long, env = "SQS_WORKER_ON_PAYLOAD_MISMATCH", value_enum, default_value_t = PayloadMismatch::DeadLetter)]
    pub on_payload_mismatch: PayloadMismatch,

    /// Checkpoint scope: keeps the keys of different consumers apart in one table.
    /// [default: the queue's name]
    #[arg(long, env = "SQS_WORKER_SCOPE")]
    pub scope: Option<String>,

    /// Longest a handler may run, in seconds; then it is stopped (the exec handler's process
    /// is killed) and the event retried. While it runs, a heartbeat extends the message's
    /// visibility and the checkpoint lease every third of the visibility timeout, so a
    /// handler may run longer than the visibility timeout without a second delivery.
    #[arg(
        long,
        visible_alias = "handler-timeout",
        value_name = "SECS",
        env = "SQS_WORKER_MAX_HANDLER_TIME",
        default_value = "900",
        value_parser = parse_seconds
    )]
    pub max_handler_time: Duration,

    /// First retry delay in seconds; it doubles with each attempt, with jitter.
    #[arg(long, env = "SQS_WORKER_BACKOFF_BASE", default_value = "2", value_parser = parse_seconds)]
    pub backoff_base: Duration,

    /// Longest retry delay in seconds (kept below SQS's 12-hour limit).
    #[arg(long, env = "SQS_WORKER_BACKOFF_MAX", default_value = "900", value_parser = parse_seconds)]
    pub backoff_max: Duration,

    /// This worker's name, the first part of its lease tokens (`<worker-id>#<n>`, shown as
    /// a checkpoint's lease owner). [default: host-pid-random]
    #[arg(long, env = "SQS_WORKER_WORKER_ID")]
    pub worker_id: Option<String>,

    /// How long to keep trying at start while SQS or the database cannot be reached
    /// (connection refused, DNS, timeouts, 5xx), in seconds; one log line per attempt and
    /// /readyz 503 meanwhile, then exit 1. What retrying cannot mend (a malformed URL, a
    /// queue that does not exist, refused credentials) exits 2 at once.
    #[arg(long, value_name = "SECS", env = "SQS_WORKER_STARTUP_TIMEOUT", default_value = "300", value_parser = parse_seconds)]
    pub startup_timeout: Duration,

    /// Do not apply database migrations at start (on Lambda, recommended: run `sqs-worker
    /// migrate` once per deploy instead of on every cold start).
    #[arg(long, env = "SQS_WORKER_NO_MIGRATE")]
    pub no_migrate: bool,
}

impl ProcessingArgs {
    /// A worker configuration for `queue_url` with these options (the rest default).
    pub fn worker_config(&self, queue_url: &str) -> Result<WorkerConfig, String> {
        let mut config = WorkerConfig::new(queue_url);
        config.scope = self.scope.clone();
        config.key = KeySpec::new(self.keys.clone())?.with_fingerprint(self.fingerprint.clone())?;
        config.envelope = self.envelope;
        config.on_payload_mismatch = self.on_payload_mismatch;
        config.max_handler_time = self.max_handler_time;
        config.backoff_base = self.backoff_base;
        config.backoff_max = self.backoff_max;
        config.worker_id = self.worker_id.clone();
        config.startup_timeout = self.startup_timeout;
        Ok(config)
    }
}

/// Options of `sqs-worker lambda`.
#[derive(Debug, Clone, Args)]
pub struct LambdaArgs {
    #[command(flatten)]
    #[allow(missing_docs)]
    pub database: DatabaseArgs,

    #[command(flatten)]
    #[allow(missing_docs)]
    pub processing: ProcessingArgs,

    /// Most messages of one invocation running at once.
    #[arg(long, env = "SQS_WORKER_CONCURRENCY", default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub concurrency: u32,

    /// Run one invocation locally on this SQS event JSON file (`-` for stdin) and print only
    /// the batch response JSON on stdout, instead of serving the Lambda runtime API. Receipt
    /// handles in the file are not used: nothing is deleted or hidden in SQS.
    #[arg(long, value_name = "FILE")]
    pub event: Option<std::path::PathBuf>,

    /// With --event: the time the local invocation has, in seconds (Lambda's timeout).
    #[arg(long, value_name = "SECS", default_value = "30", value_parser = parse_seconds)]
    pub event_timeout: Duration,

    #[command(flatten)]
    #[allow(missing_docs)]
    pub handler: HandlerArgs,
}

/// How events are handled: a command after `--`, `--http-url`, or a built-in `--handler`
/// (exactly one). Shared by the subcommands that run a handler.
#[derive(Debug, Clone, Args)]
pub struct HandlerArgs {
    /// A built-in handler instead of a command or --http-url.
    #[arg(
        long,
        env = "SQS_WORKER_HANDLER",
        value_enum,
        conflicts_with_all = ["command", "http_url"]
    )]
    pub handler: Option<BuiltinHandler>,

    /// POST each event to this URL instead of running a command. Headers: Idempotency-Key
    /// (`<scope>:<key>`; receivers must dedupe on it), X-Sqs-Worker-Message-Id,
    /// X-Sqs-Worker-Attempt, X-Sqs-Worker-Redrive-Count, X-Sqs-Worker-Final-Pass. 2xx: done;
    /// 408, 429, 5xx, timeouts and connection errors: retried (Retry-After honoured); other
    /// 3xx and 4xx: to the DLQ. Once a delivery is recorded, it is never POSTed again.
    #[arg(
        long,
        value_name = "URL",
        env = "SQS_WORKER_HTTP_URL",
        hide_env_values = true,
        conflicts_with = "command"
    )]
    pub http_url: Option<String>,

    /// Longest an HTTP delivery may take, in seconds; then it is retried. Keep it below
    /// --handler-timeout.
    // `conflicts_with_all` as well as `requires`: clap drops a requirement that conflicts
    // with an argument given, so `requires` alone would let `--http-timeout 5 -- cmd` pass.
    #[arg(
        long,
        value_name = "SECS",
        env = "SQS_WORKER_HTTP_TIMEOUT",
        default_value = "30",
        value_parser = parse_seconds,
        requires = "http_url",
        conflicts_with_all = ["command", "handler"]
    )]
    pub http_timeout: Duration,

    /// An extra header for every HTTP delivery, e.g. 'Authorization: Bearer TOKEN'. Repeat
    /// it for more (the env variable takes a comma-separated list, so values cannot contain
    /// commas; repeat a header instead). Values are never logged.
    #[arg(
        long = "http-header",
        value_name = "'NAME: VALUE'",
        env = "SQS_WORKER_HTTP_HEADERS",
        hide_env_values = true,
        value_delimiter = ',',
        value_parser = HttpHeader::from_str,
        requires = "http_url",
        conflicts_with_all = ["command", "handler"]
    )]
    pub http_headers: Vec<HttpHeader>,

    /// The command to run for each event, after `--`. It gets the body on stdin and
    /// SQS_WORKER_KEY, SQS_WORKER_SCOPE, SQS_WORKER_MESSAGE_ID, SQS_WORKER_ATTEMPT,
    /// SQS_WORKER_REDRIVE_COUNT, SQS_WORKER_FINAL_PASS in its environment. Exit 0: done;
    /// 65: permanent failure (to the DLQ); anything else or a timeout: retried.
    #[arg(last = true, value_name = "CMD")]
    pub command: Vec<String>,
}

impl HandlerArgs {
    /// The handler these options choose.
    pub fn build_handler(&self) -> Result<Arc<dyn Handler>, String> {
        if let Some(exec) = ExecHandler::from_command(&self.command) {
            return Ok(Arc::new(exec));
        }
        if let Some(url) = &self.http_url {
            let http = HttpHandler::new(url, self.http_timeout, &self.http_headers)
                .map_err(|e| format!("--http-url: {e}"))?;
            return Ok(Arc::new(http));
        }
        match self.handler {
            Some(BuiltinHandler::Noop) => Ok(Arc::new(NoopHandler)),
            None => Err(
                "no handler: give a command after `--` (e.g. `sqs-worker run --queue-url \
                 URL -- ./handle.sh`), --http-url URL, or --handler noop"
                    .into(),
            ),
        }
    }
}

/// Options of `sqs-worker demo`.
#[derive(Debug, Clone, Args)]
pub struct DemoArgs {
    /// PostgreSQL URL for the demo's checkpoints.
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/postgres",
        hide_env_values = true
    )]
    pub database_url: String,

    /// SQS endpoint; the demo only runs against a local one (LocalStack).
    #[arg(
        long,
        env = "AWS_ENDPOINT_URL",
        default_value = "http://127.0.0.1:4566"
    )]
    pub endpoint_url: String,

    /// Name of the demo queue (created by `localstack/up`, with its DLQ `orders-dlq`).
    #[arg(long, env = "SQS_WORKER_DEMO_QUEUE", default_value = "orders")]
    pub queue_name: String,

    /// How many distinct orders to send.
    #[arg(long, env = "SQS_WORKER_DEMO_ORDERS", default_value_t = 12, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub orders: u32,
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

/// Options of `sqs-worker redrive`.
#[derive(Debug, Clone, Args)]
pub struct RedriveArgs {
    /// PostgreSQL URL of the checkpoint database (not needed with --native).
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

/// Parse a duration with a unit: `30d`, `12h`, `90m`, `3600s` (or humantime forms such as
/// `1day 2h`).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text.trim()).map_err(|e| {
        format!("{text:?} is not a duration ({e}); write a number and a unit, e.g. 30d, 12h, 90m")
    })
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
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn seconds_parse() {
        assert_eq!(parse_seconds("2").unwrap(), Duration::from_secs(2));
        assert_eq!(parse_seconds("0.5").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_seconds("3s").unwrap(), Duration::from_secs(3));
        assert!(parse_seconds("-1").is_err());
        assert!(parse_seconds("soon").is_err());
        assert!(parse_seconds("1e9").is_err());
    }

    #[test]
    fn run_args_become_a_worker_config() {
        let cli = Cli::try_parse_from([
            "sqs-worker",
            "run",
            "--database-url",
            "postgres://x",
            "--queue-url",
            "http://q/000/orders",
            "--key",
            "/a",
            "--key",
            "/b",
            "--exit-when-idle",
            "1.5",
            "--",
            "handle.sh",
            "--flag",
        ])
        .unwrap();
        let Command::Run(args) = cli.command else {
            panic!("expected run")
        };
        assert_eq!(args.handler.command, ["handle.sh", "--flag"]);
        let config = args.worker_config().unwrap();
        assert_eq!(config.key.pointers(), ["/a", "/b"]);
        assert_eq!(config.exit_when_idle, Some(Duration::from_millis(1500)));
        assert_eq!(config.pollers, 2);
    }

    fn parse_run(extra: &[&str]) -> Result<RunArgs, clap::Error> {
        let mut argv = vec![
            "sqs-worker",
            "run",
            "--database-url",
            "postgres://x",
            "--queue-url",
            "q",
        ];
        argv.extend_from_slice(extra);
        match Cli::try_parse_from(argv)?.command {
            Command::Run(args) => Ok(args),
            other => panic!("expected run, got {other:?}"),
        }
    }

    #[test]
    fn http_options_choose_the_http_handler() {
        let args = parse_run(&[
            "--http-url",
            "https://hooks.example.com/in",
            "--http-timeout",
            "2.5",
            "--http-header",
            "Authorization: Bearer s3cret",
            "--http-header",
            "X-Tenant: t1",
        ])
        .unwrap();
        let handler = &args.handler;
        assert_eq!(handler.http_timeout, Duration::from_millis(2500));
        assert_eq!(handler.http_headers.len(), 2);
        assert!(handler.build_handler().is_ok());
        let debug = format!("{args:?}");
        assert!(
            !debug.contains("s3cret"),
            "header values stay out of Debug: {debug}"
        );
    }

    #[test]
    fn exactly_one_handler_may_be_chosen() {
        let url = ["--http-url", "http://127.0.0.1:9/hook"];
        for extra in [
            &[&url[..], &["--", "handle.sh"]].concat()[..],
            &[&url[..], &["--handler", "noop"]].concat()[..],
            &["--handler", "noop", "--", "handle.sh"][..],
            &["--http-timeout", "5", "--", "handle.sh"][..],
            &["--http-timeout", "5"][..],
            &["--http-header", "X-A: b", "--handler", "noop"][..],
        ] {
            let error = parse_run(extra).unwrap_err();
            assert!(
                matches!(
                    error.kind(),
                    clap::error::ErrorKind::ArgumentConflict
                        | clap::error::ErrorKind::MissingRequiredArgument
                ),
                "{extra:?}: {error}"
            );
        }
        let error = parse_run(&[])
            .unwrap()
            .handler
            .build_handler()
            .err()
            .unwrap();
        assert!(error.contains("--http-url"), "{error}");
        let error = parse_run(&["--http-url", "ftp://x/y"])
            .unwrap()
            .handler
            .build_handler()
            .err()
            .unwrap();
        assert!(error.contains("http or https"), "{error}");
        let error =
            parse_run(&[&url[..], &["--http-header", "Idempotency-Key: x"]].concat()).unwrap_err();
        assert!(error.to_string().contains("set by sqs-worker"), "{error}");
    }

    #[test]
    fn bad_pointers_are_rejected_with_advice() {
        let cli = Cli::try_parse_from([
            "sqs-worker",
            "run",
            "--database-url",
            "postgres://x",
            "--queue-url",
            "q",
            "--key",
            "order_id",
            "--handler",
            "noop",
        ])
        .unwrap();
        let Command::Run(args) = cli.command else {
            panic!("expected run")
        };
        let error = args.worker_config().unwrap_err();
        assert!(error.contains("must start with '/'"), "{error}");
    }
}
