//! A thin wrapper over aws-sdk-sqs: the only module that talks to SQS.
//!
//! It turns SDK types into the few plain ones the worker needs and SDK errors into one
//! error type that names the operation, so the rest of the crate never sees the SDK.

mod client;
mod error;
mod fit;
mod queue;
mod types;

// The files share these imports (`use super::*;`); everything public is re-exported here, so
// callers keep writing `sqs::SqsQueue`.
use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use aws_sdk_sqs::Client;
use aws_sdk_sqs::config::http::HttpResponse;
use aws_sdk_sqs::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_sqs::types::{
    ChangeMessageVisibilityBatchRequestEntry, DeleteMessageBatchRequestEntry,
    MessageAttributeValue, MessageSystemAttributeName, QueueAttributeName,
};

pub use client::*;
pub use error::*;
pub use fit::*;
pub use queue::*;
pub use types::*;

#[cfg(test)]
mod tests;
