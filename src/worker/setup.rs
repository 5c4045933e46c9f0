//! Reading the queue at start: its visibility timeout (the lease) and its DLQ, retried while
//! SQS is unreachable, and what a failure there means.

use std::time::{Duration, Instant};

use crate::sqs::{RedrivePolicy, SqsError, SqsErrorKind, SqsQueue};
use crate::startup::{self, Verdict};

use super::config::{WorkerConfig, WorkerError};
use super::readiness::Readiness;

/// The lease (the visibility timeout) and the DLQ of a service's queue, read at start. A
/// queue that cannot be reached is tried again until `--startup-timeout`; one that cannot
/// work (no such queue, access denied, no credentials) ends the start at once.
pub(super) async fn service_queue_setup(
    config: &WorkerConfig,
    sqs: &SqsQueue,
    readiness: Option<&Readiness>,
) -> Result<(Duration, Option<RedrivePolicy>), WorkerError> {
    let deadline = Instant::now() + config.startup_timeout;
    let judge = |error: &SqsError| judge_queue_error(error, sqs.url());
    let (visibility, policy) = startup::retry_until(
        "reading the queue's attributes",
        deadline,
        || async {
            let visibility = match config.visibility_timeout {
                Some(v) => v,
                None => sqs.visibility_timeout().await?,
            };
            Ok((visibility, sqs.redrive_policy().await?))
        },
        judge,
    )
    .await
    .map_err(WorkerError::Startup)?;
    if let Some(readiness) = readiness {
        readiness.sqs(true);
    }
    Ok((visibility, policy))
}

/// The same for Lambda, which has no start phase to fail in: a queue that cannot be inspected
/// still gets its messages claimed and run, with Lambda's default visibility and no DLQ.
pub(super) async fn lambda_queue_setup(
    config: &WorkerConfig,
    sqs: &SqsQueue,
) -> (Duration, Option<RedrivePolicy>) {
    let lease = match config.visibility_timeout {
        Some(v) => v,
        None => sqs.visibility_timeout().await.unwrap_or_else(|error| {
            tracing::warn!(%error, "cannot read the queue's visibility timeout; assuming 30 s");
            Duration::from_secs(30)
        }),
    };
    let policy = match sqs.redrive_policy().await {
        Ok(policy) => policy,
        Err(error) => {
            tracing::warn!(%error, "cannot read the queue's RedrivePolicy; permanent failures will be reported as batch item failures");
            None
        }
    };
    (lease, policy)
}

/// What a failed SQS call at start means, in a line that says what to fix.
fn judge_queue_error(error: &SqsError, queue_url: &str) -> Verdict {
    let why = &error.message;
    match error.kind {
        SqsErrorKind::Unreachable => {
            Verdict::Transient(format!("cannot reach SQS for queue {queue_url}: {why}"))
        }
        SqsErrorKind::QueueNotFound => Verdict::Fatal(format!(
            "queue {queue_url} does not exist: check --queue-url, AWS_REGION and AWS_ENDPOINT_URL"
        )),
        SqsErrorKind::AccessDenied => Verdict::Fatal(format!(
            "access to queue {queue_url} was denied ({why}): check the AWS credentials and that \
             their policy allows the worker's SQS actions on it (deploy/iam-service-policy.json)"
        )),
        SqsErrorKind::NoCredentials => Verdict::Fatal(
            "no AWS credentials found: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY or \
             AWS_PROFILE, or run with a task or instance role"
                .into(),
        ),
        SqsErrorKind::NoRegion => Verdict::Fatal(
            "no AWS region configured: set AWS_REGION (or a profile's region)".into(),
        ),
        SqsErrorKind::Rejected => Verdict::Fatal(format!(
            "SQS refused the request for queue {queue_url} ({why}): check --queue-url"
        )),
    }
}
