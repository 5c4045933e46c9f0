//! The options of the commands that run the worker: `run`, `lambda`, `demo`, and the
//! handler and processing options they share.

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, ValueEnum};
use sqs_worker::handler::Handler;
use sqs_worker::handlers::{ExecHandler, HttpHandler, HttpHeader, NoopHandler};
use sqs_worker::message::{Envelope, KeySpec};
use sqs_worker::worker::{PayloadMismatch, WorkerConfig};

use super::{DatabaseArgs, parse_duration, parse_seconds};

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

    /// Long polls kept while the queue is quiet (each receives up to 10 messages). More are
    /// started while receives come back full and permits are free, up to --max-pollers, and
    /// stopped again when a receive comes back empty.
    #[arg(long, env = "SQS_WORKER_POLLERS", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub pollers: u32,

    /// Most concurrent long polls (at least --pollers): the ceiling of the adaptive receiving.
    /// The sqs_worker_pollers gauge shows how many run.
    #[arg(long, env = "SQS_WORKER_MAX_POLLERS", default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub max_pollers: u32,

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
        config.max_pollers = self.max_pollers as usize;
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

    /// DynamoDB store only: how long a completed checkpoint is kept (its TTL), a number and
    /// a unit (30d, 12h). Keep it above SQS's longest retention (14 days): a duplicate
    /// arriving after its checkpoint expired runs its event again. The SQL stores keep
    /// checkpoints until `checkpoints prune`.
    #[arg(long, value_name = "DURATION", env = "SQS_WORKER_RETENTION", default_value = "30d", value_parser = parse_duration)]
    pub retention: Duration,
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
    /// Checkpoint store for the demo: postgres://…, sqlite://PATH or sqlite::memory:.
    /// Without it the demo needs no database server: it checkpoints in a SQLite file in
    /// the system's temp dir (sqs-worker-demo.sqlite), whose path the summary prints.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,

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
