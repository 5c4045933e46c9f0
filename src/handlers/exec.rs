//! The exec handler: runs a command per event, body on stdin.
//!
//! Exit 0 means done, exit 65 (EX_DATAERR) means the event is bad and goes to the DLQ, any
//! other exit or a signal is retryable. The command runs under a supervisor
//! ([`super::supervisor`]): when the worker stops the handler (`--max-handler-time`, a failed
//! heartbeat, the shutdown deadline) or dies, the command and every process it started are
//! stopped (SIGTERM, then SIGKILL), and whatever the command leaves running when it exits is
//! stopped too.

use std::process::Stdio;
use std::time::Duration;

use async_trait::async_trait;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::process::Command;

use super::supervisor::{self, STOP_GRACE};

use crate::handler::{Handler, HandlerError, Job};
use crate::message::truncate_for_log;

/// Exit status that marks a permanent failure (sysexits.h EX_DATAERR).
pub const EXIT_PERMANENT: i32 = 65;

/// Runs `program args…` once per event.
#[derive(Debug, Clone)]
pub struct ExecHandler {
    program: String,
    args: Vec<String>,
}

impl ExecHandler {
    /// A handler for `command[0] command[1..]`; None when `command` is empty.
    pub fn from_command(command: &[String]) -> Option<Self> {
        let (program, args) = command.split_first()?;
        Some(Self {
            program: program.clone(),
            args: args.to_vec(),
        })
    }
}

#[async_trait]
impl Handler for ExecHandler {
    async fn handle(&self, job: &mut Job) -> Result<(), HandlerError> {
        let mut command = Command::new(&self.program);
        command
            .args(&self.args)
            .env("SQS_WORKER_KEY", job.key())
            .env("SQS_WORKER_SCOPE", job.scope())
            .env("SQS_WORKER_MESSAGE_ID", job.message_id())
            .env("SQS_WORKER_ATTEMPT", job.attempt().to_string())
            .env("SQS_WORKER_REDRIVE_COUNT", job.redrive_count().to_string())
            .env("SQS_WORKER_FINAL_PASS", job.is_final_pass().to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        pass_trace_context(&mut command, job);
        let supervision = supervisor::supervise(&mut command).map_err(|error| {
            HandlerError::retryable(format!("cannot prepare the handler command: {error}"))
        })?;
        let mut child = command
            .spawn()
            // Retryable: a missing or unexecutable command is a deployment problem, and the
            // events must survive until it is fixed.
            .map_err(|error| {
                HandlerError::retryable(format!(
                    "cannot start handler command {:?}: {error}; check the path and permissions",
                    self.program
                ))
            })?;
        // From here on, dropping `tree` (this future dropped by the worker) stops the
        // command and everything it started.
        let mut tree = supervision.spawned();

        // Write stdin and read the output in tasks of their own: a command that prints a lot
        // before reading its input would otherwise deadlock against a full pipe.
        let mut stdin = child.stdin.take().expect("stdin is piped");
        let body = job.body().to_owned();
        tokio::spawn(async move {
            // A command that exits without reading stdin is allowed: ignore a broken pipe.
            let _ = stdin.write_all(body.as_bytes()).await;
        });
        let stdout = tokio::spawn(read_all(child.stdout.take()));
        let stderr = tokio::spawn(read_all(child.stderr.take()));

        let cancel = job.cancellation().clone();
        let status = tokio::select! {
            status = child.wait() => status,
            _ = cancel.cancelled() => {
                tree.stop();
                // Wait for the tree to be gone (the supervisor exits last), so that no part of
                // this run overlaps the next holder of the event.
                let _ = tokio::time::timeout(STOP_GRACE * 2 + STOP_SLACK, child.wait()).await;
                return Err(HandlerError::retryable(
                    "handler command stopped: the lease could not be renewed, its time ran out \
                     or the worker is stopping",
                ));
            }
        };
        let status = status.map_err(|error| {
            HandlerError::retryable(format!("waiting for the handler command failed: {error}"))
        })?;
        let stdout = stdout.await.unwrap_or_default();
        let stderr = stderr.await.unwrap_or_default();

        if !stdout.is_empty() {
            tracing::debug!(stdout = %String::from_utf8_lossy(&stdout), "handler command output");
        }
        let stderr = String::from_utf8_lossy(&stderr);
        let stderr_tail = truncate_for_log(stderr.trim(), 500);
        match status.code() {
            Some(0) => Ok(()),
            Some(EXIT_PERMANENT) => Err(HandlerError::permanent(format!(
                "handler command exited with {EXIT_PERMANENT} (permanent): {stderr_tail}"
            ))),
            Some(code) => Err(HandlerError::retryable(format!(
                "handler command exited with {code}: {stderr_tail}"
            ))),
            None => Err(HandlerError::retryable(format!(
                "handler command was killed by a signal: {stderr_tail}"
            ))),
        }
    }
}

/// How long past its grace a stopped tree may take to be reaped before the handler gives up
/// waiting (the supervisor still finishes the job).
const STOP_SLACK: Duration = Duration::from_secs(1);

/// The environment-carrier convention: the trace context as `TRACEPARENT` and
/// `TRACESTATE`. One inherited from the worker's own environment is not the event's, so
/// it is removed when the event has none.
fn pass_trace_context(command: &mut Command, job: &Job) {
    command.env_remove("TRACEPARENT").env_remove("TRACESTATE");
    if let Some(headers) = job.trace_headers() {
        command.env("TRACEPARENT", headers.traceparent);
        if let Some(state) = headers.tracestate {
            command.env("TRACESTATE", state);
        }
    }
}

/// Everything a pipe yields until its last writer closes it.
async fn read_all(pipe: Option<impl AsyncRead + Unpin>) -> Vec<u8> {
    let mut bytes = Vec::new();
    if let Some(mut pipe) = pipe {
        let _ = pipe.read_to_end(&mut bytes).await;
    }
    bytes
}
