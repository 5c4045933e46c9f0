//! A handler that records its calls, for tests that count runs and attempts.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use sqs_worker::{Handler, HandlerError, Job};

/// One handler call, as recorded.
#[derive(Debug, Clone)]
pub struct Call {
    /// The event's idempotency key.
    pub key: String,
    /// Which attempt this was (1 for the first).
    pub attempt: u32,
    /// When the call started.
    pub at: Instant,
}

/// Calls as a [`RecordingHandler`] records them.
pub type Calls = Arc<Mutex<Vec<Call>>>;

type Behaviour = dyn Fn(&Job) -> Result<(), HandlerError> + Send + Sync;

/// A handler that records every call, sleeps `delay`, then answers with `behaviour`: the
/// tests' stand-in for an application handler.
pub struct RecordingHandler {
    /// Every call so far, in order.
    pub calls: Calls,
    delay: Duration,
    behaviour: Box<Behaviour>,
}

impl RecordingHandler {
    /// The handler, and its record of calls to assert on.
    pub fn new(
        delay: Duration,
        behaviour: impl Fn(&Job) -> Result<(), HandlerError> + Send + Sync + 'static,
    ) -> (Arc<Self>, Calls) {
        let calls = Arc::new(Mutex::new(Vec::new()));
        let handler = Arc::new(Self {
            calls: calls.clone(),
            delay,
            behaviour: Box::new(behaviour),
        });
        (handler, calls)
    }

    /// One that succeeds at once.
    pub fn succeeding() -> (Arc<Self>, Calls) {
        Self::new(Duration::ZERO, |_| Ok(()))
    }

    /// One that fails every call at once with `error`: a poison message, a broken handler.
    pub fn failing(error: HandlerError) -> (Arc<Self>, Calls) {
        Self::new(Duration::ZERO, move |_| Err(error.clone()))
    }
}

#[async_trait]
impl Handler for RecordingHandler {
    async fn handle(&self, job: &mut Job) -> Result<(), HandlerError> {
        self.calls.lock().unwrap().push(Call {
            key: job.key().to_owned(),
            attempt: job.attempt(),
            at: Instant::now(),
        });
        if !self.delay.is_zero() {
            tokio::time::sleep(self.delay).await;
        }
        (self.behaviour)(job)
    }
}

/// How many times the handler ran for each key: the exactly-once assertions.
pub fn calls_per_key(calls: &Mutex<Vec<Call>>) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    for call in calls.lock().unwrap().iter() {
        *counts.entry(call.key.clone()).or_default() += 1;
    }
    counts
}
