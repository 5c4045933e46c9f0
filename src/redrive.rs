//! Operator tooling: redrive a DLQ with markers, and peek at it.
//!
//! A redrive moves each message back to its source queue with `dlq_redriven=true`,
//! `redrive_count` + 1 and, on the last allowed redrive, `dlq_final_pass=true`, so the worker
//! ends a failing final pass silently instead of looping. Sending always comes before
//! deleting: a redrive killed midway leaves, at worst, a duplicate, which the checkpoint
//! makes harmless.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use aws_sdk_sqs::types::MessageAttributeValue;
use serde::Serialize;
use serde_json::Value;

use crate::message::{self, Envelope, KeySpec};
use crate::sqs::{self, OutgoingMessage, ReceivedMessage, SqsError, SqsQueue};
use crate::store::{CheckpointStore, NewDeadLetter, RedriveCounts, StoreError};

/// What can stop a redrive.
#[derive(Debug, thiserror::Error)]
pub enum RedriveError {
    /// An SQS call failed.
    #[error(transparent)]
    Sqs(#[from] SqsError),
    /// The checkpoint store failed.
    #[error(transparent)]
    Checkpoint(#[from] StoreError),
    /// The options cannot work.
    #[error("{0}")]
    Config(String),
}

/// Only redrive messages matching this.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Filter {
    /// A message attribute has this string value.
    Attribute {
        /// Attribute name.
        name: String,
        /// Expected value.
        value: String,
    },
    /// The JSON pointer into the event has this value (strings, numbers and booleans
    /// compared as text).
    Pointer {
        /// JSON pointer, e.g. `/customer/id`.
        pointer: String,
        /// Expected value.
        value: String,
    },
}

impl Filter {
    /// Parse `NAME=VALUE` (a message attribute) or `/pointer=VALUE` (a field of the event).
    pub fn parse(text: &str) -> Result<Self, String> {
        let (left, value) = text.split_once('=').ok_or_else(|| {
            format!("filter {text:?} needs the form NAME=VALUE or /json/pointer=VALUE")
        })?;
        if left.is_empty() {
            return Err(format!("filter {text:?} has no attribute name or pointer"));
        }
        Ok(if left.starts_with('/') {
            Filter::Pointer {
                pointer: left.to_owned(),
                value: value.to_owned(),
            }
        } else {
            Filter::Attribute {
                name: left.to_owned(),
                value: value.to_owned(),
            }
        })
    }

    fn matches(&self, message: &ReceivedMessage, event: Option<&Value>) -> bool {
        match self {
            Filter::Attribute { name, value } => {
                message
                    .message_attributes
                    .get(name)
                    .and_then(MessageAttributeValue::string_value)
                    == Some(value.as_str())
            }
            Filter::Pointer { pointer, value } => match event.and_then(|e| e.pointer(pointer)) {
                Some(Value::String(s)) => s == value,
                Some(Value::Number(n)) => n.to_string() == *value,
                Some(Value::Bool(b)) => b.to_string() == *value,
                _ => false,
            },
        }
    }
}

/// How to redrive.
#[derive(Debug, Clone)]
pub struct RedriveOptions {
    /// The DLQ to drain.
    pub dlq_url: String,
    /// Where to send; `None` means the queue whose RedrivePolicy points at the DLQ.
    pub to: Option<String>,
    /// Redrives allowed per message; the last one carries `dlq_final_pass=true`.
    pub max_redrives: u32,
    /// Most messages sent per second.
    pub rate: Option<f64>,
    /// Stop after this many messages examined.
    pub limit: Option<u64>,
    /// Report what would happen; change nothing.
    pub dry_run: bool,
    /// Redrive messages whose event is already complete instead of deleting them.
    pub include_complete: bool,
    /// Only these messages.
    pub filter: Option<Filter>,
    /// Checkpoint scope of the target worker; `None` means the target queue's name.
    pub scope: Option<String>,
    /// The target worker's key pointers, to look checkpoints up.
    pub key: KeySpec,
    /// The target worker's envelope.
    pub envelope: Envelope,
    /// Who runs this, for the audit row.
    pub operator: String,
}

/// What happened to one DLQ message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    /// Sent back with these markers (or would be, in a dry run).
    Redriven {
        /// The new redrive count.
        redrive_count: u32,
        /// True on the last allowed redrive.
        final_pass: bool,
    },
    /// The event is already complete: deleted from the DLQ (or would be).
    AlreadyComplete,
    /// The redrive count reached the maximum (or is unreadable): recorded in
    /// `dead_letters` and deleted (or would be).
    Exhausted {
        /// Why: `redrives_exhausted` or `invalid_redrive_count`.
        reason: String,
    },
    /// Did not match `--filter`; left in the DLQ.
    FilteredOut,
    /// Sending failed; left in the DLQ.
    Failed {
        /// The error.
        error: String,
    },
}

/// One message's line in the report.
#[derive(Debug, Clone, Serialize)]
pub struct Outcome {
    /// SQS message id in the DLQ.
    pub message_id: String,
    /// The event's idempotency key.
    pub key: String,
    /// The redrive count the message arrived with.
    pub previous_redrive_count: Option<u32>,
    /// The event's checkpoint status in the target scope, if any.
    pub checkpoint_status: Option<String>,
    /// What was (or would be) done.
    pub action: Action,
}

/// The whole run.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RedriveReport {
    /// The audit row id in `redrives`.
    pub audit_id: i64,
    /// Where messages went.
    pub target_url: String,
    /// True for `--dry-run`.
    pub dry_run: bool,
    /// Messages examined.
    pub examined: u64,
    /// Counts per action.
    pub counts: RedriveCounts,
    /// Left in the DLQ because they did not match the filter.
    pub filtered_out: u64,
    /// Seconds taken.
    pub elapsed_secs: f64,
}

/// Who runs a redrive, for its audit row when the operator names nobody: `user@host`.
pub fn default_operator() -> String {
    let user = std::env::var("USER").unwrap_or_else(|_| "unknown".into());
    let host = crate::worker::host_name().unwrap_or_else(|| "localhost".into());
    format!("{user}@{host}")
}

/// Redrive a DLQ. `on_outcome` hears about every message as it is settled (for progress).
pub async fn redrive(
    client: aws_sdk_sqs::Client,
    store: &dyn CheckpointStore,
    options: &RedriveOptions,
    mut on_outcome: impl FnMut(&Outcome),
) -> Result<RedriveReport, RedriveError> {
    let started = Instant::now();
    let mut scan = Scan::start(client, store, options).await?;
    let mut empty_receives = 0;
    'scan: while empty_receives < 2 {
        let want = options
            .limit
            .map(|l| l.saturating_sub(scan.report.examined).min(10) as usize)
            .unwrap_or(10);
        if want == 0 {
            break;
        }
        let batch = scan
            .dlq
            .receive(want, Duration::from_secs(1), Some(hold_for(options)))
            .await?;
        if batch.is_empty() {
            empty_receives += 1;
            continue;
        }
        empty_receives = 0;
        for message in batch {
            if let Some(outcome) = scan.examine(&message).await? {
                on_outcome(&outcome);
            }
            if options.limit.is_some_and(|l| scan.report.examined >= l) {
                break 'scan;
            }
        }
    }
    scan.finish(started).await
}

/// Refuse options that cannot work, before anything is touched.
fn check_options(options: &RedriveOptions, dlq: &SqsQueue) -> Result<(), RedriveError> {
    if options.max_redrives == 0 {
        return Err(RedriveError::Config(
            "--max-redrives must be at least 1".into(),
        ));
    }
    if dlq.url().ends_with(".fifo") {
        // A scan holds what it does not send (filtered, failed, already redriven) until it
        // ends; in a FIFO DLQ that keeps the message's group in flight, so the scan would end
        // without the rest of the group and could send a group out of order.
        return Err(RedriveError::Config(format!(
            "{} is a FIFO queue: redrive with markers handles standard DLQs only; move its \
             messages with `sqs-worker redrive --native` (SQS's own redrive, no markers) or \
             one by one with `sqs-worker send`",
            dlq.name()
        )));
    }
    Ok(())
}

/// How long received messages stay hidden. A dry run or a filter holds messages until the
/// scan ends, so each is seen once; a real run settles each batch at once (after its rate
/// pacing), so a short time means a killed run's messages soon come back.
fn hold_for(options: &RedriveOptions) -> Duration {
    if options.dry_run || options.filter.is_some() {
        Duration::from_secs(600)
    } else {
        let pacing = options.rate.map(|r| 10.0 / r).unwrap_or(0.0);
        Duration::from_secs(20 + pacing.ceil() as u64)
    }
}

/// One redrive run's state while it scans the DLQ.
struct Scan<'a> {
    store: &'a dyn CheckpointStore,
    options: &'a RedriveOptions,
    dlq: SqsQueue,
    target: SqsQueue,
    scope: String,
    /// A DLQ copy may already fill the size limit; the markers need room (see fit_redriven).
    target_max_bytes: usize,
    report: RedriveReport,
    /// Messages to hand back at the end (dry run, filtered out, failed sends): they stay
    /// invisible during the scan so that the scan sees each message once.
    hold: Vec<String>,
    seen: HashSet<String>,
    /// Events redriven by this run: a redriven message that fails at once comes back to the
    /// DLQ with a new message id while the scan still runs; it waits for the next run
    /// instead of using up its redrives in this one.
    redriven_events: HashSet<String>,
    next_send: Instant,
}

/// What a scan knows of one DLQ message.
struct Examined {
    markers: message::RedriveMarkers,
    /// The redrive count attribute is there but unreadable.
    count_unreadable: bool,
    identity: Result<message::EventIdentity, message::KeyError>,
    key: String,
}

impl<'a> Scan<'a> {
    /// Check the options, find the target queue and open the audit row.
    async fn start(
        client: aws_sdk_sqs::Client,
        store: &'a dyn CheckpointStore,
        options: &'a RedriveOptions,
    ) -> Result<Scan<'a>, RedriveError> {
        let dlq = SqsQueue::new(client, options.dlq_url.clone());
        check_options(options, &dlq)?;
        let target_url = match &options.to {
            Some(url) => url.clone(),
            None => resolve_source_queue(&dlq).await?,
        };
        let target = dlq.sibling(target_url.clone());
        let scope = options
            .scope
            .clone()
            .unwrap_or_else(|| target.name().to_owned());
        let audit_id = store
            .start_redrive_audit(
                &options.operator,
                dlq.url(),
                target.url(),
                options.max_redrives as i32,
                options.dry_run,
            )
            .await?;
        Ok(Scan {
            store,
            options,
            target_max_bytes: target.size_limit().await,
            report: RedriveReport {
                audit_id,
                target_url,
                dry_run: options.dry_run,
                ..RedriveReport::default()
            },
            dlq,
            target,
            scope,
            hold: Vec::new(),
            seen: HashSet::new(),
            redriven_events: HashSet::new(),
            next_send: Instant::now(),
        })
    }

    /// Decide and carry out one message's fate. `None` for a message this run has seen
    /// already (held until the end, not counted again).
    async fn examine(
        &mut self,
        message: &ReceivedMessage,
    ) -> Result<Option<Outcome>, RedriveError> {
        if !self.seen.insert(message.message_id.clone()) {
            self.hold.push(message.receipt_handle.clone());
            return Ok(None);
        }
        let examined = self.read(message);
        if self.redriven_events.contains(&examined.key) {
            self.hold.push(message.receipt_handle.clone());
            return Ok(None);
        }
        self.report.examined += 1;
        let checkpoint_status = self
            .store
            .find(&self.scope, &examined.key)
            .await?
            .map(|c| c.status);
        let mut outcome = Outcome {
            message_id: message.message_id.clone(),
            key: examined.key.clone(),
            previous_redrive_count: (!examined.count_unreadable)
                .then_some(examined.markers.redrive_count),
            checkpoint_status: checkpoint_status.clone(),
            action: Action::FilteredOut,
        };
        let event = examined
            .identity
            .as_ref()
            .ok()
            .and_then(|i| i.json.as_ref());
        if let Some(filter) = &self.options.filter
            && !filter.matches(message, event)
        {
            self.report.filtered_out += 1;
            self.hold.push(message.receipt_handle.clone());
            return Ok(Some(outcome));
        }
        outcome.action = decide(self.options, &examined, checkpoint_status.as_deref());
        if self.options.dry_run {
            self.hold.push(message.receipt_handle.clone());
        } else {
            self.apply(message, &examined, &mut outcome.action).await?;
        }
        if matches!(outcome.action, Action::Redriven { .. }) {
            self.redriven_events.insert(examined.key);
        }
        self.report.counts.add(&outcome.action);
        Ok(Some(outcome))
    }

    /// A DLQ message's markers and key.
    fn read(&self, message: &ReceivedMessage) -> Examined {
        let markers = message::parse_markers(message.attribute_strings());
        let count_unreadable = markers
            .problems
            .iter()
            .any(|p| p.starts_with(message::ATTR_REDRIVE_COUNT));
        let options = self.options;
        let identity = message::derive_identity(&options.key, options.envelope, &message.body);
        let key = match &identity {
            Ok(identity) => identity.key.clone(),
            Err(_) => message::fallback_key(&message.body),
        };
        Examined {
            markers,
            count_unreadable,
            identity,
            key,
        }
    }

    /// Carry out a decided action (not in a dry run). A failed send becomes `Failed`.
    async fn apply(
        &mut self,
        message: &ReceivedMessage,
        examined: &Examined,
        action: &mut Action,
    ) -> Result<(), RedriveError> {
        match action {
            Action::AlreadyComplete => delete_one(&self.dlq, message).await?,
            Action::Exhausted { reason } => {
                self.record_exhausted(message, examined, reason).await?;
                delete_one(&self.dlq, message).await?;
            }
            Action::Redriven {
                redrive_count,
                final_pass,
            } => {
                // Send first, delete after: killed in between, the message exists twice,
                // and the checkpoint makes the duplicate harmless.
                match self.send(message, *redrive_count, *final_pass).await {
                    Ok(()) => delete_one(&self.dlq, message).await?,
                    Err(error) => {
                        self.hold.push(message.receipt_handle.clone());
                        *action = Action::Failed { error };
                    }
                }
            }
            Action::FilteredOut | Action::Failed { .. } => {}
        }
        Ok(())
    }

    /// An event out of redrives: recorded in `dead_letters` (and its checkpoint failed).
    async fn record_exhausted(
        &self,
        message: &ReceivedMessage,
        examined: &Examined,
        reason: &str,
    ) -> Result<(), RedriveError> {
        let markers = &examined.markers;
        let attributes = message.attributes_json();
        let count = if examined.count_unreadable {
            "an unreadable number of".to_owned()
        } else {
            markers.redrive_count.to_string()
        };
        let error = format!(
            "redriven {count} time(s) already; --max-redrives is {}",
            self.options.max_redrives
        );
        let fingerprint = match &examined.identity {
            Ok(identity) => identity.fingerprint.clone(),
            Err(_) => message::body_sha256(&message.body),
        };
        let letter = NewDeadLetter {
            scope: &self.scope,
            key: &examined.key,
            queue_url: self.target.url(),
            message_id: &message.message_id,
            body: &message.body,
            attributes: &attributes,
            reason,
            error: &error,
            attempts: 0,
            redrive_count: markers.redrive_count.min(i32::MAX as u32) as i32,
            requeue_generation: markers.requeue_generation.min(i32::MAX as u32) as i32,
            payload_sha256: &fingerprint,
        };
        self.store.record_dead_letter(&letter, true, None).await?;
        Ok(())
    }

    /// Send the redriven copy to the target queue, paced by `--rate`.
    async fn send(
        &mut self,
        message: &ReceivedMessage,
        redrive_count: u32,
        final_pass: bool,
    ) -> Result<(), String> {
        if let Some(rate) = self.options.rate {
            let now = Instant::now();
            if self.next_send > now {
                tokio::time::sleep(self.next_send - now).await;
            }
            self.next_send = self.next_send.max(now) + Duration::from_secs_f64(1.0 / rate);
        }
        let target_is_fifo = self.target.url().ends_with(".fifo");
        let mut outgoing = redriven_message(message, redrive_count, final_pass, target_is_fifo);
        let dropped = fit_redriven(&mut outgoing, self.target_max_bytes)?;
        if !dropped.is_empty() {
            tracing::warn!(
                message_id = %message.message_id,
                ?dropped,
                "dropped attributes so the redriven message fits the target queue's \
                 MaximumMessageSize"
            );
        }
        self.target
            .send(outgoing)
            .await
            .map_err(|e| e.to_string())?;
        Ok(())
    }

    /// Hand back what was held, close the audit row, and report.
    async fn finish(mut self, started: Instant) -> Result<RedriveReport, RedriveError> {
        if !self.hold.is_empty() {
            self.dlq.make_visible_now(self.hold).await?;
        }
        self.report.elapsed_secs = started.elapsed().as_secs_f64();
        let audit_id = self.report.audit_id;
        self.store
            .finish_redrive_audit(audit_id, &self.report.counts)
            .await?;
        Ok(self.report)
    }
}

/// What to do with a DLQ message that passed the filter.
fn decide(
    options: &RedriveOptions,
    examined: &Examined,
    checkpoint_status: Option<&str>,
) -> Action {
    let redrive_count = examined.markers.redrive_count;
    if checkpoint_status == Some("complete") && !options.include_complete {
        Action::AlreadyComplete
    } else if examined.count_unreadable {
        Action::Exhausted {
            reason: "invalid_redrive_count".into(),
        }
    } else if redrive_count >= options.max_redrives {
        Action::Exhausted {
            reason: "redrives_exhausted".into(),
        }
    } else {
        Action::Redriven {
            redrive_count: redrive_count + 1,
            final_pass: redrive_count + 1 >= options.max_redrives,
        }
    }
}

impl RedriveCounts {
    fn add(&mut self, action: &Action) {
        match action {
            Action::Redriven { .. } => self.redriven += 1,
            Action::AlreadyComplete => self.skipped_complete += 1,
            Action::Exhausted { .. } => self.exhausted += 1,
            Action::Failed { .. } => self.failed += 1,
            Action::FilteredOut => {}
        }
    }
}

async fn delete_one(dlq: &SqsQueue, message: &ReceivedMessage) -> Result<(), RedriveError> {
    let failures = dlq
        .delete_batch(std::slice::from_ref(&message.receipt_handle))
        .await?;
    if let Some(failure) = failures.first() {
        tracing::warn!(
            message_id = %message.message_id,
            reason = %failure.reason,
            "could not delete from the DLQ; the next redrive sees it again (harmless)"
        );
    }
    Ok(())
}

/// The queue to send to: the only one whose RedrivePolicy names this DLQ.
async fn resolve_source_queue(dlq: &SqsQueue) -> Result<String, RedriveError> {
    let sources = dlq.dead_letter_source_queues().await?;
    match sources.as_slice() {
        [only] => Ok(only.clone()),
        [] => Err(RedriveError::Config(format!(
            "no queue names {} as its DLQ (RedrivePolicy); pass --to QUEUE_URL",
            dlq.name()
        ))),
        many => Err(RedriveError::Config(format!(
            "{} queues use {} as their DLQ ({}); pass --to QUEUE_URL to choose one",
            many.len(),
            dlq.name(),
            many.join(", ")
        ))),
    }
}

/// The message sent back: same body, same attributes, markers set.
pub fn redriven_message(
    message: &ReceivedMessage,
    redrive_count: u32,
    final_pass: bool,
    fifo: bool,
) -> OutgoingMessage {
    let mut markers = vec![
        (message::ATTR_DLQ_REDRIVEN, sqs::string_attribute("true")),
        (
            message::ATTR_REDRIVE_COUNT,
            sqs::number_attribute(redrive_count),
        ),
    ];
    if final_pass {
        markers.push((message::ATTR_DLQ_FINAL_PASS, sqs::string_attribute("true")));
    }
    // The markers must fit; the worker's failure notes are the first to give way.
    let attributes = sqs::fit_attributes(
        markers,
        &message.message_attributes,
        &[message::ATTR_DLQ_FINAL_PASS],
        |name| match name {
            message::ATTR_FAILURE_REASON => 2,
            message::ATTR_FAILURE_DETAIL => 3,
            _ => 1,
        },
    );
    OutgoingMessage {
        body: message.body.clone(),
        attributes,
        message_group_id: fifo.then(|| {
            message
                .message_group_id()
                .unwrap_or("sqs-worker-redrive")
                .to_owned()
        }),
        deduplication_id: fifo.then(|| format!("{}-redrive-{redrive_count}", message.message_id)),
        delay: None,
    }
}

/// Make a redriven message fit the target queue's `max_bytes` (body and attributes): the
/// worker's failure detail is shortened first, then the message's own attributes and the
/// failure reason go. The redrive markers never go: without them the message would start
/// its redrives afresh and could loop, so a body that leaves them no room is an error (the
/// message stays in the DLQ and the run reports it as failed).
fn fit_redriven(outgoing: &mut OutgoingMessage, max_bytes: usize) -> Result<Vec<String>, String> {
    let dropped = sqs::fit_message_size(
        &outgoing.body,
        &mut outgoing.attributes,
        max_bytes,
        message::ATTR_FAILURE_DETAIL,
        &message::KEEP_LONGEST,
    );
    if dropped
        .iter()
        .any(|name| message::REDRIVE_MARKERS.contains(&name.as_str()))
    {
        return Err(format!(
            "the body ({} bytes) leaves no room for the redrive markers within the target \
             queue's MaximumMessageSize ({max_bytes} bytes); raise it, or handle this message \
             by hand",
            outgoing.body.len()
        ));
    }
    Ok(dropped)
}

/// One message as `dlq peek` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct PeekedMessage {
    /// SQS message id.
    pub message_id: String,
    /// The idempotency key (with the given key pointers).
    pub key: String,
    /// Seconds since it was first sent to SQS.
    pub age_secs: Option<u64>,
    /// How often SQS delivered it (in the DLQ, plus this peek).
    pub receive_count: Option<u32>,
    /// Redrives so far.
    pub redrive_count: u32,
    /// The worker's failure reason code, if it sent the message here.
    pub failure_reason: Option<String>,
    /// The worker's failure text.
    pub failure_detail: Option<String>,
    /// The start of the body.
    pub body_preview: String,
}

/// Look at up to `limit` DLQ messages without keeping them: each is made visible again as
/// soon as it has been read.
pub async fn peek(
    client: aws_sdk_sqs::Client,
    dlq_url: &str,
    limit: usize,
    key: &KeySpec,
    envelope: Envelope,
) -> Result<Vec<PeekedMessage>, RedriveError> {
    let dlq = SqsQueue::new(client, dlq_url);
    let mut peeked = Vec::new();
    let mut seen = HashSet::new();
    let mut handles = Vec::new();
    let mut empty_receives = 0;
    while peeked.len() < limit && empty_receives < 2 {
        let want = (limit - peeked.len()).min(10);
        // A short visibility, handed back below anyway: a peek must never hide messages.
        let batch = dlq
            .receive(want, Duration::from_secs(1), Some(Duration::from_secs(30)))
            .await?;
        if batch.is_empty() {
            empty_receives += 1;
            continue;
        }
        for message in batch {
            handles.push(message.receipt_handle.clone());
            if !seen.insert(message.message_id.clone()) {
                continue;
            }
            peeked.push(describe(&message, key, envelope));
        }
    }
    if !handles.is_empty() {
        dlq.make_visible_now(handles).await?;
    }
    Ok(peeked)
}

fn describe(message: &ReceivedMessage, key: &KeySpec, envelope: Envelope) -> PeekedMessage {
    let markers = message::parse_markers(message.attribute_strings());
    let key = message::derive_identity(key, envelope, &message.body)
        .map(|i| i.key)
        .unwrap_or_else(|_| message::fallback_key(&message.body));
    let now_ms = chrono::Utc::now().timestamp_millis().max(0) as u64;
    let attribute = |name: &str| {
        message
            .message_attributes
            .get(name)
            .and_then(MessageAttributeValue::string_value)
            .map(str::to_owned)
    };
    PeekedMessage {
        message_id: message.message_id.clone(),
        key,
        age_secs: message
            .system_attributes
            .get("SentTimestamp")
            .and_then(|t| t.parse::<u64>().ok())
            .map(|sent| now_ms.saturating_sub(sent) / 1000),
        receive_count: message
            .system_attributes
            .get("ApproximateReceiveCount")
            .and_then(|c| c.parse().ok()),
        redrive_count: markers.redrive_count,
        failure_reason: attribute(message::ATTR_FAILURE_REASON),
        failure_detail: attribute(message::ATTR_FAILURE_DETAIL),
        body_preview: message::truncate_for_log(&message.body, 60),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sqs::MAX_MESSAGE_ATTRIBUTES;
    use std::collections::HashMap;

    fn received(attrs: &[(&str, &str)]) -> ReceivedMessage {
        ReceivedMessage {
            message_id: "m-1".into(),
            receipt_handle: "r-1".into(),
            body: r#"{"id":"x","customer":{"tier":"gold","n":3}}"#.into(),
            system_attributes: HashMap::new(),
            message_attributes: attrs
                .iter()
                .map(|(k, v)| (k.to_string(), sqs::string_attribute(*v)))
                .collect(),
        }
    }

    fn attr<'a>(m: &'a OutgoingMessage, name: &str) -> Option<&'a str> {
        m.attributes.get(name).and_then(|v| v.string_value())
    }

    #[test]
    fn markers_are_set_and_the_final_pass_flag_follows_the_count() {
        let out = redriven_message(&received(&[("tenant", "t1")]), 1, false, false);
        assert_eq!(attr(&out, message::ATTR_DLQ_REDRIVEN), Some("true"));
        assert_eq!(attr(&out, message::ATTR_REDRIVE_COUNT), Some("1"));
        assert_eq!(attr(&out, message::ATTR_DLQ_FINAL_PASS), None);
        assert_eq!(attr(&out, "tenant"), Some("t1"));
        assert_eq!(out.body, r#"{"id":"x","customer":{"tier":"gold","n":3}}"#);

        let stale = received(&[(message::ATTR_DLQ_FINAL_PASS, "true")]);
        assert_eq!(
            attr(
                &redriven_message(&stale, 2, false, false),
                message::ATTR_DLQ_FINAL_PASS
            ),
            None
        );
        let last = redriven_message(&stale, 3, true, true);
        assert_eq!(attr(&last, message::ATTR_DLQ_FINAL_PASS), Some("true"));
        assert_eq!(last.deduplication_id.as_deref(), Some("m-1-redrive-3"));
    }

    #[test]
    fn a_redriven_copy_at_the_size_limit_gives_up_notes_never_markers() {
        let mut dead = received(&[
            ("tenant", "t1"),
            (message::ATTR_FAILURE_REASON, "handler_permanent"),
        ]);
        dead.message_attributes.insert(
            message::ATTR_FAILURE_DETAIL.into(),
            sqs::string_attribute("d".repeat(900)),
        );
        dead.body = "b".repeat(1_000);
        let fits = |max: usize| {
            let mut out = redriven_message(&dead, 3, true, false);
            fit_redriven(&mut out, max).map(|dropped| (out, dropped))
        };

        let (roomy, dropped) = fits(262_144).unwrap();
        assert!(dropped.is_empty());
        assert_eq!(attr(&roomy, message::ATTR_DLQ_FINAL_PASS), Some("true"));

        // Room for the markers and a little more: the detail shrinks, the rest goes.
        let (tight, dropped) = fits(1_000 + 120).unwrap();
        assert!(sqs::message_bytes(&tight.body, &tight.attributes) <= 1_120);
        assert_eq!(attr(&tight, message::ATTR_DLQ_REDRIVEN), Some("true"));
        assert_eq!(attr(&tight, message::ATTR_REDRIVE_COUNT), Some("3"));
        assert_eq!(attr(&tight, message::ATTR_DLQ_FINAL_PASS), Some("true"));
        assert!(dropped.contains(&"tenant".to_owned()), "{dropped:?}");

        // No room for the markers: not sent at all.
        let error = fits(1_010).unwrap_err();
        assert!(error.contains("no room for the redrive markers"), "{error}");
    }

    #[test]
    fn markers_always_fit_in_ten_attributes() {
        let names: Vec<String> = (0..8).map(|i| format!("a{i}")).collect();
        let mut attrs: Vec<(&str, &str)> = names.iter().map(|n| (n.as_str(), "v")).collect();
        attrs.push((message::ATTR_FAILURE_REASON, "handler_permanent"));
        attrs.push((message::ATTR_FAILURE_DETAIL, "boom"));
        let out = redriven_message(&received(&attrs), 1, true, false);
        assert_eq!(out.attributes.len(), MAX_MESSAGE_ATTRIBUTES);
        for marker in [
            message::ATTR_DLQ_REDRIVEN,
            message::ATTR_REDRIVE_COUNT,
            message::ATTR_DLQ_FINAL_PASS,
        ] {
            assert!(out.attributes.contains_key(marker), "{marker}");
        }
    }

    #[test]
    fn filters_parse_and_match() {
        let message = received(&[("tenant", "t1")]);
        let event: Value = serde_json::from_str(&message.body).unwrap();
        let f = Filter::parse("tenant=t1").unwrap();
        assert!(f.matches(&message, Some(&event)));
        assert!(
            !Filter::parse("tenant=t2")
                .unwrap()
                .matches(&message, Some(&event))
        );
        assert!(
            Filter::parse("/customer/tier=gold")
                .unwrap()
                .matches(&message, Some(&event))
        );
        assert!(
            Filter::parse("/customer/n=3")
                .unwrap()
                .matches(&message, Some(&event))
        );
        assert!(
            !Filter::parse("/customer/n=4")
                .unwrap()
                .matches(&message, Some(&event))
        );
        assert!(!Filter::parse("/missing=x").unwrap().matches(&message, None));
        assert!(Filter::parse("no-equals-sign").is_err());
        assert!(Filter::parse("=x").is_err());
    }
}
