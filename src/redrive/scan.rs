//! The redrive itself: a scan of the DLQ that decides each message's fate (redrive with
//! markers, delete as done, record as exhausted, keep) and carries it out, send first.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use crate::message;
use crate::sqs::{ReceivedMessage, SqsQueue};
use crate::store::{CheckpointStore, NewDeadLetter, RedriveCounts};

use super::options::{Action, Outcome, RedriveError, RedriveOptions, RedriveReport};
use super::redriven::{fit_redriven, redriven_message};

/// Redrive a DLQ. `on_outcome` hears about every message as it is settled (for progress).
pub async fn redrive(
    client: aws_sdk_sqs::Client,
    store: &dyn CheckpointStore,
    options: &RedriveOptions,
    mut on_outcome: impl FnMut(&Outcome),
) -> Result<RedriveReport, RedriveError> {
    let started = Instant::now();
    let mut scan = Scan::start(client, store, options).await?;
    let hidden_for = hold_for(options);
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
            .receive(want, Duration::from_secs(1), Some(hidden_for))
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
pub(super) fn check_options(options: &RedriveOptions, dlq: &SqsQueue) -> Result<(), RedriveError> {
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
pub(super) fn hold_for(options: &RedriveOptions) -> Duration {
    if options.dry_run || options.filter.is_some() {
        Duration::from_secs(600)
    } else {
        let pacing = options.rate.map(|r| 10.0 / r).unwrap_or(0.0);
        Duration::from_secs(20 + pacing.ceil() as u64)
    }
}

/// One redrive run's state while it scans the DLQ.
pub(super) struct Scan<'a> {
    pub(super) store: &'a dyn CheckpointStore,
    pub(super) options: &'a RedriveOptions,
    pub(super) dlq: SqsQueue,
    pub(super) target: SqsQueue,
    pub(super) scope: String,
    /// A DLQ copy may already fill the size limit; the markers need room (see fit_redriven).
    pub(super) target_max_bytes: usize,
    /// A FIFO target needs a group id and a deduplication id on every send.
    pub(super) target_is_fifo: bool,
    pub(super) report: RedriveReport,
    /// Messages to hand back at the end (dry run, filtered out, failed sends): they stay
    /// invisible during the scan so that the scan sees each message once.
    pub(super) hold: Vec<String>,
    pub(super) seen: HashSet<String>,
    /// Events redriven by this run: a redriven message that fails at once comes back to the
    /// DLQ with a new message id while the scan still runs; it waits for the next run
    /// instead of using up its redrives in this one.
    pub(super) redriven_events: HashSet<String>,
    pub(super) next_send: Instant,
}

/// What a scan knows of one DLQ message.
pub(super) struct Examined {
    pub(super) markers: message::RedriveMarkers,
    /// The redrive count attribute is there but unreadable.
    pub(super) count_unreadable: bool,
    pub(super) identity: Result<message::EventIdentity, message::KeyError>,
    pub(super) key: String,
}

impl<'a> Scan<'a> {
    /// Check the options, find the target queue and open the audit row.
    pub(super) async fn start(
        client: aws_sdk_sqs::Client,
        store: &'a dyn CheckpointStore,
        options: &'a RedriveOptions,
    ) -> Result<Scan<'a>, RedriveError> {
        let dlq = SqsQueue::new(client, options.dlq_url.clone());
        check_options(options, &dlq)?;
        let (target, scope) = target_of(&dlq, options).await?;
        let target_url = target.url().to_owned();
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
            target_is_fifo: target.url().ends_with(".fifo"),
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
    pub(super) async fn examine(
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
    pub(super) fn read(&self, message: &ReceivedMessage) -> Examined {
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
    pub(super) async fn apply(
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
    pub(super) async fn record_exhausted(
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
    pub(super) async fn send(
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
        let mut outgoing =
            redriven_message(message, redrive_count, final_pass, self.target_is_fifo);
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
    pub(super) async fn finish(mut self, started: Instant) -> Result<RedriveReport, RedriveError> {
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
pub(super) fn decide(
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
    /// Count one message's action (a message left in the DLQ by the filter counts nowhere).
    pub fn add(&mut self, action: &Action) {
        match action {
            Action::Redriven { .. } => self.redriven += 1,
            Action::AlreadyComplete => self.skipped_complete += 1,
            Action::Exhausted { .. } => self.exhausted += 1,
            Action::Failed { .. } => self.failed += 1,
            Action::FilteredOut => {}
        }
    }
}

pub(super) async fn delete_one(
    dlq: &SqsQueue,
    message: &ReceivedMessage,
) -> Result<(), RedriveError> {
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
pub(super) async fn resolve_source_queue(dlq: &SqsQueue) -> Result<String, RedriveError> {
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

/// Where a redrive with `options` sends, and the checkpoint scope it looks events up in.
pub async fn target_and_scope(
    client: aws_sdk_sqs::Client,
    options: &RedriveOptions,
) -> Result<(String, String), RedriveError> {
    let dlq = SqsQueue::new(client, options.dlq_url.clone());
    let (target, scope) = target_of(&dlq, options).await?;
    Ok((target.url().to_owned(), scope))
}

/// The target queue of a redrive of `dlq` (`--to`, else its source queue) and the scope
/// (`--scope`, else the target queue's name).
async fn target_of(
    dlq: &SqsQueue,
    options: &RedriveOptions,
) -> Result<(SqsQueue, String), RedriveError> {
    let target = match &options.to {
        Some(url) => dlq.sibling(url.clone()),
        None => dlq.sibling(resolve_source_queue(dlq).await?),
    };
    let scope = options
        .scope
        .clone()
        .unwrap_or_else(|| target.name().to_owned());
    Ok((target, scope))
}
