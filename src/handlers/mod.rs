//! Built-in handlers, usable from the CLI without writing Rust.

mod exec;
mod http;
mod supervisor;

pub use exec::ExecHandler;
pub use http::{DELIVER_STEP, HttpHandler, HttpHandlerError, HttpHeader, MAX_RETRY_AFTER};

use async_trait::async_trait;

use crate::handler::{Handler, HandlerError, Job};

/// Does nothing and succeeds: for measuring the worker itself and for draining a queue
/// whose events only need to be recorded.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoopHandler;

#[async_trait]
impl Handler for NoopHandler {
    async fn handle(&self, _job: &mut Job) -> Result<(), HandlerError> {
        Ok(())
    }
}
