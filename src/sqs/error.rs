//! `SqsError`: one line that says what failed (SQS's code and message, or the innermost
//! cause), and its kind: whether a retry can help.

use aws_sdk_sqs::config::http::HttpResponse;
use aws_sdk_sqs::error::{ProvideErrorMetadata, SdkError};

/// An SQS call that failed, in one line: what failed and why, without the SDK's response
/// dump (headers, extensions, the error repeated).
#[derive(Debug, thiserror::Error)]
#[error("sqs {operation} failed: {message}")]
pub struct SqsError {
    /// The API operation, e.g. `ReceiveMessage`.
    pub operation: &'static str,
    /// What kind of failure: whether retrying can help, and what to tell an operator.
    pub kind: SqsErrorKind,
    /// SQS's error code and message, or the innermost cause of a failure to reach it.
    pub message: String,
}

/// The kinds of SQS failure a caller branches on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SqsErrorKind {
    /// SQS could not be reached or answered with a server error or throttling: retrying
    /// may help (connection refused, DNS, timeouts, 5xx).
    Unreachable,
    /// The queue does not exist (wrong URL, region or endpoint).
    QueueNotFound,
    /// The credentials were refused or lack a permission.
    AccessDenied,
    /// No credentials were found in the environment, profile, web identity, ECS or EC2.
    NoCredentials,
    /// No AWS region is configured.
    NoRegion,
    /// SQS refused the request itself (a malformed URL or parameter).
    Rejected,
}

impl SqsErrorKind {
    /// True when trying again later may succeed.
    pub fn is_transient(self) -> bool {
        self == SqsErrorKind::Unreachable
    }
}

/// Error codes SQS (and STS behind it) uses for refused credentials or permissions.
pub(super) const ACCESS_CODES: [&str; 9] = [
    "AccessDenied",
    "AccessDeniedException",
    "InvalidClientTokenId",
    "UnrecognizedClientException",
    "SignatureDoesNotMatch",
    "InvalidSecurity",
    "ExpiredToken",
    "MissingAuthenticationToken",
    "IncompleteSignature",
];

impl SqsError {
    pub(super) fn new<E>(operation: &'static str, error: SdkError<E, HttpResponse>) -> Self
    where
        E: ProvideErrorMetadata + std::error::Error + 'static,
    {
        let (kind, message) = match &error {
            SdkError::ServiceError(service) => {
                let code = service.err().code().unwrap_or("unknown error").to_owned();
                let text = service.err().message().unwrap_or_default();
                let status = service.raw().status().as_u16();
                let kind = service_error_kind(&code, status);
                let message = if text.is_empty() {
                    format!("{code} (HTTP {status})")
                } else {
                    format!("{code}: {text}")
                };
                (kind, message)
            }
            SdkError::DispatchFailure(failure) if failure.is_other() => {
                let chain = cause_chain(&error);
                let kind = if chain.contains("credential provider was not enabled")
                    || chain.contains("no credentials")
                {
                    SqsErrorKind::NoCredentials
                } else if chain.contains("Missing Region") || chain.contains("signing region") {
                    SqsErrorKind::NoRegion
                } else {
                    SqsErrorKind::Unreachable
                };
                (kind, innermost_cause(&error))
            }
            SdkError::ConstructionFailure(_) => (SqsErrorKind::Rejected, cause_chain(&error)),
            _ => (SqsErrorKind::Unreachable, innermost_cause(&error)),
        };
        Self {
            operation,
            kind,
            message: one_line(&message),
        }
    }
}

/// What an error answer from SQS means, by its code and HTTP status.
pub(super) fn service_error_kind(code: &str, status: u16) -> SqsErrorKind {
    if code.contains("NonExistentQueue") || code == "QueueDoesNotExist" {
        SqsErrorKind::QueueNotFound
    } else if ACCESS_CODES.contains(&code) || status == 403 {
        SqsErrorKind::AccessDenied
    } else if status >= 500 || status == 429 || code.contains("Throttl") {
        SqsErrorKind::Unreachable
    } else {
        SqsErrorKind::Rejected
    }
}

/// Every cause's text, outermost first.
pub(super) fn cause_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut texts = vec![error.to_string()];
    let mut source = error.source();
    while let Some(cause) = source {
        texts.push(cause.to_string());
        source = cause.source();
    }
    texts.join(": ")
}

/// The innermost cause's text (e.g. `Connection refused (os error 111)`): the part that says
/// what actually happened, under the SDK's layers of "dispatch failure: io error: …".
pub(super) fn innermost_cause(error: &(dyn std::error::Error + 'static)) -> String {
    let mut innermost = error;
    while let Some(cause) = innermost.source() {
        innermost = cause;
    }
    innermost.to_string()
}

/// The first line of a text, at most 300 characters: error texts end up in one log line.
pub(super) fn one_line(text: &str) -> String {
    let first = text
        .lines()
        .next()
        .unwrap_or_default()
        .trim_end_matches(['.', ' ']);
    crate::message::truncate_for_log(first, 300)
}
