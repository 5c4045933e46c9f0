//! The exec handler: runs a command per event, body on stdin.
//!
//! Exit 0 means done, exit 65 (EX_DATAERR) means the event is bad and goes to the DLQ, any
//! other exit or a signal is retryable. When the worker stops the handler (`--max-handler-time`,
//! a failed heartbeat, the shutdown deadline) the future is dropped and `kill_on_drop` kills
//! the child.

use std::process::Stdio;

use async_trait::async_trait;
use tokio::io::AsyncWriteExt;
use tokio::process::Command;

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
        let mut child = Command::new(&self.program)
            .args(&self.args)
            .env("SQS_WORKER_KEY", job.key())
            .env("SQS_WORKER_SCOPE", job.scope())
            .env("SQS_WORKER_MESSAGE_ID", job.message_id())
            .env("SQS_WORKER_ATTEMPT", job.attempt().to_string())
            .env("SQS_WORKER_REDRIVE_COUNT", job.redrive_count().to_string())
            .env("SQS_WORKER_FINAL_PASS", job.is_final_pass().to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            // Retryable: a missing or unexecutable command is a deployment problem, and the
            // events must survive until it is fixed.
            .map_err(|error| {
                HandlerError::retryable(format!(
                    "cannot start handler command {:?}: {error}; check the path and permissions",
                    self.program
                ))
            })?;

        let mut stdin = child.stdin.take().expect("stdin is piped");
        let body = job.body().to_owned();
        // Write stdin concurrently with reading the output: a command that prints a lot
        // before reading its input would otherwise deadlock against a full pipe.
        let writer = async move {
            // A command that exits without reading stdin is allowed: ignore a broken pipe.
            let _ = stdin.write_all(body.as_bytes()).await;
            drop(stdin);
        };
        let cancel = job.cancellation().clone();
        let (_, output) = tokio::select! {
            done = async { tokio::join!(writer, child.wait_with_output()) } => done,
            // Dropping the child's future kills it.
            _ = cancel.cancelled() => {
                return Err(HandlerError::retryable(
                    "handler command stopped: the lease could not be renewed or the worker is stopping",
                ));
            }
        };
        let output = output.map_err(|error| {
            HandlerError::retryable(format!("waiting for the handler command failed: {error}"))
        })?;

        if !output.stdout.is_empty() {
            tracing::debug!(stdout = %String::from_utf8_lossy(&output.stdout), "handler command output");
        }
        let stderr = String::from_utf8_lossy(&output.stderr);
        let stderr_tail = truncate_for_log(stderr.trim(), 500);
        match output.status.code() {
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
