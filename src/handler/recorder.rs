//! Group commit of step records: the steps of many concurrent events written by one store
//! call, so a step costs a share of a statement instead of a statement of its own.
//!
//! Each job hands its step's record to the [`StepRecorder`] of its worker and waits for the
//! answer: the record is durable before the job's next step starts, as the step contract
//! says. One task writes them: while a write is out, the records arriving meanwhile wait and
//! go together in the next one, so the batches grow with the load and nothing lingers when
//! the worker is quiet (no timer: a lone record is written at once). The store fences each
//! record by its own lease token and index, so one event's lost lease refuses only its own
//! record.

use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};

use crate::store::{CheckpointStore, StepRecord, Written};

/// Most records in one store call: a statement's size, and DynamoDB's parallel requests.
const MAX_RECORDS: usize = 128;

/// Why a record could not be written: the store's error, as text (every record of the failed
/// call gets it).
pub(crate) type RecordError = String;

struct Request {
    record: StepRecord,
    reply: oneshot::Sender<Result<Written, RecordError>>,
}

/// Records steps for the jobs of one worker (one scope), a group of them per store call. The
/// writing task ends when the last handle is dropped.
#[derive(Clone, Debug)]
pub(crate) struct StepRecorder {
    requests: mpsc::UnboundedSender<Request>,
}

impl StepRecorder {
    /// Start the task that writes the steps of `scope` to `store`.
    pub(crate) fn start(store: Arc<dyn CheckpointStore>, scope: String) -> Self {
        let (requests, receiver) = mpsc::unbounded_channel();
        tokio::spawn(write_groups(store, scope, receiver));
        Self { requests }
    }

    /// Write one step's record with whatever other records are waiting.
    pub(crate) async fn record(&self, record: StepRecord) -> Result<Written, RecordError> {
        let (reply, answer) = oneshot::channel();
        self.requests
            .send(Request { record, reply })
            .map_err(|_| RecordError::from("the step recorder has stopped"))?;
        answer
            .await
            .unwrap_or_else(|_| Err("the step recorder dropped the record".into()))
    }
}

/// The recorder's task: take everything waiting (up to [`MAX_RECORDS`]), write it in one
/// call, answer each, repeat.
async fn write_groups(
    store: Arc<dyn CheckpointStore>,
    scope: String,
    mut receiver: mpsc::UnboundedReceiver<Request>,
) {
    let mut group = Vec::with_capacity(MAX_RECORDS);
    while receiver.recv_many(&mut group, MAX_RECORDS).await > 0 {
        let (records, replies): (Vec<StepRecord>, Vec<_>) =
            group.drain(..).map(|r| (r.record, r.reply)).unzip();
        match store.record_steps(&scope, &records).await {
            Ok(written) => {
                for (reply, written) in replies.into_iter().zip(written) {
                    let _ = reply.send(Ok(written));
                }
            }
            Err(error) => {
                let error = error.to_string();
                for reply in replies {
                    let _ = reply.send(Err(error.clone()));
                }
            }
        }
    }
}
