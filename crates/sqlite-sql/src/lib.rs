//! The SQL of sqs-worker's SQLite checkpoint store: every statement, as a checked `query!`
//! with bound parameters, and the rows they answer. The store itself (the contract, leases,
//! outcomes) is `sqs_worker::store::sqlite`; this crate only runs statements.
//!
//! Times are integer milliseconds since the Unix epoch, bound by the caller (`now`): one
//! clock for every worker process on the host, and arithmetic in integers.

pub mod claims;
pub mod dead_letters;
pub mod operator_log;
pub mod retention;
pub mod steps;

/// What every statement returns on failure.
pub type Result<T> = std::result::Result<T, sqlx::Error>;
