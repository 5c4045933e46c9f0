//! A thin wrapper over aws-sdk-sqs: the only module that talks to SQS.
//!
//! It turns SDK types into the few plain ones the worker needs and SDK errors into one
//! error type that names the operation, so the rest of the crate never sees the SDK.

mod client;
mod error;
mod fit;
mod queue;
mod types;

pub use client::*;
pub use error::*;
pub use fit::*;
pub use queue::*;
pub use types::*;

#[cfg(test)]
mod tests;
