//! The step API of [`Job`]: `step` and `step_effect` (the step transactions are in
//! `transactions.rs`), recorded in the checkpoint at
//! their index and replayed by position and name on a later attempt.

use std::future::Future;
use std::time::Duration;

use crate::spans;
use crate::store::{NewStep, RecordedStep, StepRecord, Written};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

use super::error::{HandlerError, plan_mismatch};
use super::job::Job;
use super::recorder::RecordError;

/// How long [`Job::step_effect`] waits before each further attempt to record a step after a
/// database error. Short on purpose: the whole wait runs inside the handler timeout, and a
/// handler stopped by its timeout is retried, which would repeat the effect.
pub(super) const EFFECT_RECORD_RETRY_DELAYS: [Duration; 3] = [
    Duration::from_millis(100),
    Duration::from_millis(300),
    Duration::from_secs(1),
];

/// The step API: each step's output recorded before the next starts, replayed on resume.
impl Job {
    /// Run a named step once per event.
    ///
    /// The first time, `run` is called and its output is recorded in the checkpoint before
    /// the next step starts: the record is written when the next step is called (before its
    /// closure runs), or, for the handler's last step, together with the event's completion
    /// (one write for both). Records of many events running at once share one statement
    /// (group commit). On a later attempt (a retry, or another worker taking over), the
    /// stored output is returned and `run` is not called. Steps must be called in the same
    /// order on every attempt: a different order is a permanent `plan_mismatch`.
    ///
    /// `run` itself may still execute twice if the process dies after it and before the
    /// record is written; make its effect idempotent (for example with [`Job::key`] as an
    /// idempotency key downstream), or use [`Job::step_tx`] for writes to this database.
    /// A record that cannot be written fails the *next* step (or the completion) instead of
    /// this one: `LeaseLost` when another worker took the event, retryable after a database
    /// error.
    ///
    /// An output PostgreSQL cannot store — a string or field name holding the NUL character
    /// — fails the step with the permanent reason [`UNSTORABLE_STEP_OUTPUT`] (the same code
    /// would produce it again), as does a step name holding NUL, before `run` is called.
    pub async fn step<T, F, Fut>(&mut self, name: &str, run: F) -> Result<T, HandlerError>
    where
        T: Serialize + DeserializeOwned,
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<T, HandlerError>>,
    {
        if let Some(output) = self.replay(name)? {
            return Ok(output);
        }
        if self.unrecorded_effect.is_some() {
            return self.run_unrecorded(name, run).await;
        }
        self.write_pending_step().await?;
        let output = spans::in_step(name, self.next_step, run()).await?;
        let value = step_output_json(name, &output)?;
        self.defer_record(name, value);
        Ok(output)
    }

    /// Run a named step whose effect lies outside this database and must not be repeated
    /// just because its record could not be written: an HTTP POST, an email, a payment.
    ///
    /// Like [`Job::step`], the stored output is returned on later attempts and `run` is not
    /// called again. The difference is what happens after `run` succeeded:
    ///
    /// - a database error while recording is retried a few times with a short backoff; if it
    ///   persists, it is logged at error level and the output is returned anyway, so the
    ///   worker goes on to complete the event instead of retrying it (which would repeat the
    ///   effect). Later steps of this attempt then cannot be recorded in order: [`Job::step`]
    ///   and `step_effect` run their closures without recording them, and [`Job::step_tx`]
    ///   fails retryably (as does any failing later step: the retry repeats the effect).
    ///   Keep an effect step last where you can.
    /// - a lost lease is still [`HandlerError::LeaseLost`]: the effect happened, and the
    ///   worker that holds the lease now will run it again. Effects must therefore carry an
    ///   idempotency key (e.g. [`Job::scope`] and [`Job::key`]) that the receiver dedupes on.
    ///
    /// If the event's completion fails too, the message comes back and `run` runs again,
    /// since nothing recorded that it ran: the idempotency key is the last line of defence.
    ///
    /// An output that can never be stored (not JSON, or NUL in a string) is treated like a
    /// record that keeps failing, without trying: logged, and the event completed. Failing
    /// the event instead would send it to the DLQ although its effect happened, and a
    /// redrive would repeat the effect.
    pub async fn step_effect<T, F, Fut>(&mut self, name: &str, run: F) -> Result<T, HandlerError>
    where
        T: Serialize + DeserializeOwned,
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<T, HandlerError>>,
    {
        if let Some(output) = self.replay(name)? {
            return Ok(output);
        }
        if self.unrecorded_effect.is_some() {
            return self.run_unrecorded(name, run).await;
        }
        self.write_pending_step().await?;
        let output = spans::in_step(name, self.next_step, run()).await?;
        // From here on the effect has happened: no error may make the worker retry it.
        let value = match step_output_json(name, &output) {
            Ok(value) => value,
            Err(error) => {
                tracing::error!(step = name, %error, "the effect happened but its output cannot be recorded; completing the event without the record");
                self.unrecorded_effect = Some(name.to_owned());
                return Ok(output);
            }
        };
        let index = self.next_step;
        let mut retry_delays = EFFECT_RECORD_RETRY_DELAYS.iter();
        let mut had_error = false;
        loop {
            match self.write_record(index, name, &value).await {
                Ok(Written::Done) => {
                    self.after_record(true, name, value)?;
                    return Ok(output);
                }
                // After an error the earlier write may have committed (the connection broke
                // after the commit): then the step is ours and already there.
                Ok(Written::NotHeld) if had_error && self.step_is_recorded(index, name).await => {
                    self.after_record(true, name, value)?;
                    return Ok(output);
                }
                Ok(Written::NotHeld) => return Err(self.lose_lease(name)),
                Ok(Written::TooLarge(detail)) => {
                    tracing::error!(step = name, %detail, "the effect happened but its output cannot be recorded; completing the event without the record");
                    self.unrecorded_effect = Some(name.to_owned());
                    return Ok(output);
                }
                Err(error) => {
                    had_error = true;
                    let Some(delay) = retry_delays.next() else {
                        tracing::error!(
                            step = name,
                            %error,
                            "the effect happened but could not be recorded; completing the event \
                             without the record (a redelivery would run the effect again)"
                        );
                        self.unrecorded_effect = Some(name.to_owned());
                        return Ok(output);
                    };
                    tracing::warn!(step = name, %error, retry_in_ms = delay.as_millis() as u64, "could not record the step; trying again");
                    tokio::time::sleep(*delay).await;
                }
            }
        }
    }

    /// Write one step's record now (with whatever other events' records are waiting).
    pub(super) async fn write_record(
        &self,
        index: usize,
        name: &str,
        output: &Value,
    ) -> Result<Written, RecordError> {
        let record = StepRecord {
            key: self.lease.key.clone(),
            token: self.lease.token.clone(),
            step: NewStep {
                index,
                name: name.to_owned(),
                output: output.clone(),
            },
        };
        self.recorder.record(record).await
    }

    /// Keep a completed step's record to be written before the next step starts, or with
    /// the event's completion.
    fn defer_record(&mut self, name: &str, output: Value) {
        let step = NewStep {
            index: self.next_step,
            name: name.to_owned(),
            output: output.clone(),
        };
        *self.pending.lock().expect("not poisoned") = Some(step);
        self.recorded.push(RecordedStep {
            name: name.to_owned(),
            output,
        });
        self.next_step += 1;
    }

    /// Write the previous step's record, if it is still waiting: it must be durable before
    /// another step starts. A record refused because the lease is gone ends the attempt as
    /// `LeaseLost`; one that can never be stored fails it permanently.
    pub(super) async fn write_pending_step(&mut self) -> Result<(), HandlerError> {
        let Some(step) = self.pending.lock().expect("not poisoned").take() else {
            return Ok(());
        };
        let name = step.name.clone();
        let record = StepRecord {
            key: self.lease.key.clone(),
            token: self.lease.token.clone(),
            step,
        };
        match self.recorder.record(record).await {
            Ok(Written::Done) => {
                tracing::debug!(step = %name, "step recorded");
                Ok(())
            }
            Ok(Written::NotHeld) => Err(self.lose_lease(&name)),
            Ok(Written::TooLarge(detail)) => Err(HandlerError::permanent_with_reason(
                UNSTORABLE_STEP_OUTPUT,
                detail,
            )),
            Err(error) => Err(HandlerError::retryable(format!(
                "could not record step {name:?}: {error}"
            ))),
        }
    }

    /// True when the checkpoint holds step `index` under `name` and our lease still holds.
    pub(super) async fn step_is_recorded(&self, index: usize, name: &str) -> bool {
        match self.store.find(&self.lease.scope, &self.lease.key).await {
            Ok(Some(checkpoint)) => {
                checkpoint.status == "in_progress"
                    && checkpoint.lease_owner.as_deref() == Some(self.lease.token.as_str())
                    && checkpoint.steps.get(index).and_then(|s| s["name"].as_str()) == Some(name)
            }
            Ok(None) => false,
            Err(error) => {
                tracing::warn!(step = name, %error, "could not check whether the step was recorded");
                false
            }
        }
    }

    /// A step after an unrecorded effect: run it, since stopping now would repeat that
    /// effect, but do not record it (the checkpoint's steps must stay in order).
    pub(super) async fn run_unrecorded<T, F, Fut>(
        &mut self,
        name: &str,
        run: F,
    ) -> Result<T, HandlerError>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<T, HandlerError>>,
    {
        let output = spans::in_step(name, self.next_step, run()).await?;
        tracing::warn!(
            step = name,
            effect = self.unrecorded_effect.as_deref(),
            "step ran without a record: an earlier effect step could not be recorded"
        );
        Ok(output)
    }

    /// The stored output of the next step, if an earlier attempt completed it.
    pub(super) fn replay<T: DeserializeOwned>(
        &mut self,
        name: &str,
    ) -> Result<Option<T>, HandlerError> {
        check_step_name(name)?;
        if self.lease_lost {
            return Err(HandlerError::LeaseLost);
        }
        if self.cancel.is_cancelled() {
            tracing::warn!(
                step = name,
                "not starting the step: the lease could not be renewed or the worker is stopping"
            );
            return Err(HandlerError::LeaseLost);
        }
        let Some(step) = self.recorded.get(self.next_step) else {
            return Ok(None);
        };
        if step.name != name {
            return Err(plan_mismatch(format!(
                "step {} is {name:?} in the handler but {:?} in the checkpoint; the handler's \
                 steps changed while this event was in progress",
                self.next_step + 1,
                step.name
            )));
        }
        let output = serde_json::from_value(step.output.clone()).map_err(|e| {
            plan_mismatch(format!(
                "the recorded output of step {name:?} does not fit the handler's type: {e}"
            ))
        })?;
        // A replayed step's span marks the place, with no duration: its work was done before.
        drop(spans::step(name, self.next_step, true));
        self.next_step += 1;
        tracing::debug!(step = name, "step already done; using its recorded output");
        Ok(Some(output))
    }

    pub(super) fn after_record(
        &mut self,
        recorded: bool,
        name: &str,
        output: Value,
    ) -> Result<(), HandlerError> {
        if !recorded {
            return Err(self.lose_lease(name));
        }
        self.recorded.push(RecordedStep {
            name: name.to_owned(),
            output,
        });
        self.next_step += 1;
        tracing::debug!(step = name, "step recorded");
        Ok(())
    }

    pub(super) fn lose_lease(&mut self, name: &str) -> HandlerError {
        self.lease_lost = true;
        tracing::warn!(
            step = name,
            "another worker holds this event's lease now; the step's result is not recorded"
        );
        HandlerError::LeaseLost
    }

    /// A plan mismatch when the handler finished without reaching every recorded step.
    pub(crate) fn check_plan_complete(&self) -> Result<(), HandlerError> {
        if self.next_step < self.recorded.len() {
            return Err(plan_mismatch(format!(
                "the handler finished after {} steps but the checkpoint records {} ({}); the \
                 handler's steps changed while this event was in progress",
                self.next_step,
                self.recorded.len(),
                self.completed_steps().join(", ")
            )));
        }
        Ok(())
    }
}

/// A step's record that failed: permanent when the store can never hold it (DynamoDB's item
/// limit, as `unstorable_step_output` with the sizes), retryable otherwise.
pub(super) fn record_failed(name: &str, error: crate::store::StoreError) -> HandlerError {
    match error {
        crate::store::StoreError::TooLarge(detail) => {
            HandlerError::permanent_with_reason(UNSTORABLE_STEP_OUTPUT, detail)
        }
        other => HandlerError::retryable(format!("could not record step {name:?}: {other}")),
    }
}

/// Reason code of a step whose name or output PostgreSQL cannot store.
pub const UNSTORABLE_STEP_OUTPUT: &str = "unstorable_step_output";

/// Reason code of a step transaction the handler did not declare
/// ([`crate::Handler::step_transactions`]), or one on a store of another kind.
pub const STEP_TX_UNSUPPORTED: &str = "step_tx_unsupported";

/// A step's output as the JSON the checkpoint stores, or a permanent error when it cannot be
/// stored. PostgreSQL's `jsonb` (like `text`) refuses the NUL character, so an output holding
/// one would fail its record on every attempt: that is refused here, before any statement,
/// as `unstorable_step_output` — the same handler code gives the same output next time.
pub(super) fn step_output_json<T: Serialize>(
    name: &str,
    output: &T,
) -> Result<Value, HandlerError> {
    let value = serde_json::to_value(output).map_err(|e| {
        HandlerError::permanent_with_reason(
            "step_output",
            format!("the output of step {name:?} cannot be stored as JSON: {e}"),
        )
    })?;
    if let Some(path) = nul_path(&value, &mut String::new()) {
        return Err(HandlerError::permanent_with_reason(
            UNSTORABLE_STEP_OUTPUT,
            format!(
                "the output of step {name:?} holds a NUL character (\\u0000) at JSON pointer \
                 {path:?}, which PostgreSQL jsonb cannot store; replace or drop it in the \
                 step's output"
            ),
        ));
    }
    Ok(value)
}

/// A step name is stored as text: one holding NUL could never be recorded, so the step is
/// refused before it runs (a handler bug, permanent).
pub(super) fn check_step_name(name: &str) -> Result<(), HandlerError> {
    if name.contains('\0') {
        return Err(HandlerError::permanent_with_reason(
            UNSTORABLE_STEP_OUTPUT,
            format!(
                "the step name {name:?} contains a NUL character, which PostgreSQL cannot store"
            ),
        ));
    }
    Ok(())
}

/// Where in `value` a string or an object key holds NUL, as a JSON pointer (`""` is the
/// root). Walks the value instead of searching its serialization for `\u0000`, which would
/// also match a string holding the six characters `\u0000` (escaped as `\\u0000`).
pub(super) fn nul_path(value: &Value, path: &mut String) -> Option<String> {
    match value {
        Value::String(s) if s.contains('\0') => Some(path.clone()),
        Value::Array(items) => items.iter().enumerate().find_map(|(i, item)| {
            let len = path.len();
            path.push_str(&format!("/{i}"));
            let found = nul_path(item, path);
            path.truncate(len);
            found
        }),
        Value::Object(map) => map.iter().find_map(|(key, item)| {
            let len = path.len();
            let escaped = key
                .replace('~', "~0")
                .replace('/', "~1")
                .replace('\0', "\\u0000");
            path.push('/');
            path.push_str(&escaped);
            let found = if key.contains('\0') {
                Some(path.clone())
            } else {
                nul_path(item, path)
            };
            path.truncate(len);
            found
        }),
        _ => None,
    }
}
