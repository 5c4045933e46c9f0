//! A DLQ as the console sees it: a bounded sample read with peek semantics (every message
//! made visible again at once), cached for a few seconds so that paging and filtering do
//! not read the DLQ again, and the filters over it.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use aws_sdk_sqs::types::MessageAttributeValue;
use serde::Deserialize;

use crate::message;
use crate::redrive::{self, Filter, RedriveError};
use crate::sqs::{MessageCounts, ReceivedMessage, SqsQueue};

use super::Console;

/// One DLQ message, read whole.
#[derive(Debug, Clone)]
pub(crate) struct DlqMessage {
    pub(crate) message: ReceivedMessage,
    pub(crate) key: String,
    pub(crate) reason: Option<String>,
    pub(crate) detail: Option<String>,
    pub(crate) receive_count: Option<u32>,
    pub(crate) redrive_count: u32,
    pub(crate) age_secs: Option<u64>,
    /// The event, when it is JSON (for pointer filters and pretty printing).
    pub(crate) event: Option<serde_json::Value>,
}

impl DlqMessage {
    fn read(message: ReceivedMessage, console: &Console) -> Self {
        let config = &console.config;
        let identity = message::derive_identity(&config.key, config.envelope, &message.body);
        let described = redrive::describe_identified(&message, identity.as_ref());
        let event = identity
            .ok()
            .and_then(|identity| identity.json)
            .or_else(|| serde_json::from_str(&message.body).ok());
        DlqMessage {
            key: described.key,
            reason: described.failure_reason,
            detail: described.failure_detail,
            receive_count: described.receive_count,
            redrive_count: described.redrive_count,
            age_secs: described.age_secs,
            event,
            message,
        }
    }

    /// The message attributes as text, by name (Binary ones by type only).
    pub(crate) fn attributes(&self) -> BTreeMap<&str, String> {
        self.message
            .message_attributes
            .iter()
            .map(|(name, value)| {
                let text = value
                    .string_value()
                    .map(str::to_owned)
                    .unwrap_or_else(|| format!("({})", MessageAttributeValue::data_type(value)));
                (name.as_str(), text)
            })
            .collect()
    }
}

/// One read of a DLQ.
#[derive(Debug)]
pub(crate) struct Sample {
    pub(crate) read_at: Instant,
    pub(crate) messages: Vec<DlqMessage>,
    /// The queue's own counts (attributes, no reading).
    pub(crate) depth: MessageCounts,
}

impl Sample {
    /// Messages per failure reason, most first (`(none)` for messages without one).
    pub(crate) fn reasons(&self) -> Vec<(String, usize)> {
        let mut counts: HashMap<String, usize> = HashMap::new();
        for message in &self.messages {
            let reason = message.reason.clone().unwrap_or_else(|| "(none)".into());
            *counts.entry(reason).or_default() += 1;
        }
        let mut counts: Vec<_> = counts.into_iter().collect();
        counts.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        counts
    }

    /// The oldest message's age in the sample.
    pub(crate) fn oldest_secs(&self) -> Option<u64> {
        self.messages.iter().filter_map(|m| m.age_secs).max()
    }

    pub(crate) fn find(&self, message_id: &str) -> Option<&DlqMessage> {
        self.messages
            .iter()
            .find(|m| m.message.message_id == message_id)
    }
}

/// The cached samples, per DLQ.
#[derive(Default)]
pub(crate) struct Samples {
    by_dlq: Mutex<HashMap<usize, Arc<Sample>>>,
    /// One read of a DLQ at a time: two pages opened at once share it.
    reading: tokio::sync::Mutex<()>,
}

impl Console {
    /// DLQ number `dlq`'s sample: the cached one unless older than `--sample-for` (or
    /// `fresh`), else read now.
    pub(crate) async fn sample(
        &self,
        dlq: usize,
        fresh: bool,
    ) -> Result<Arc<Sample>, RedriveError> {
        let _reading = self.samples.reading.lock().await;
        if !fresh && let Some(sample) = self.cached(dlq) {
            return Ok(sample);
        }
        let url = &self.config.dlq_urls[dlq];
        // The counts first: read after the sample, they would count it as in flight.
        let depth = SqsQueue::new(self.client.clone(), url.clone())
            .message_counts()
            .await?;
        let messages =
            redrive::peek_messages(self.client.clone(), url, self.config.sample_size).await?;
        let sample = Arc::new(Sample {
            read_at: Instant::now(),
            messages: messages
                .into_iter()
                .map(|m| DlqMessage::read(m, self))
                .collect(),
            depth,
        });
        self.samples
            .by_dlq
            .lock()
            .expect("not poisoned")
            .insert(dlq, sample.clone());
        Ok(sample)
    }

    fn cached(&self, dlq: usize) -> Option<Arc<Sample>> {
        let cached = self.samples.by_dlq.lock().expect("not poisoned");
        cached
            .get(&dlq)
            .filter(|s| s.read_at.elapsed() < self.config.sample_for)
            .cloned()
    }

    /// Forget DLQ number `dlq`'s sample: an action changed it.
    pub(crate) fn forget_sample(&self, dlq: usize) {
        self.samples
            .by_dlq
            .lock()
            .expect("not poisoned")
            .remove(&dlq);
    }
}

/// How long ago a sample was read, for the page.
pub(crate) fn read_ago(sample: &Sample) -> Duration {
    sample.read_at.elapsed()
}

/// The browse page's filters (query string), also carried by the bulk redrive's forms.
#[derive(Debug, Clone, Default, Deserialize)]
pub(crate) struct MessageFilter {
    /// `sqs_worker_failure_reason` equals this.
    #[serde(default)]
    pub(crate) reason: String,
    /// `NAME=VALUE` (a message attribute) or `/pointer=VALUE` (a field of the event).
    #[serde(default)]
    pub(crate) filter: String,
}

impl MessageFilter {
    /// The library's filter, `None` when nothing is filtered; an error for a malformed one.
    pub(crate) fn to_filter(&self) -> Result<Option<Filter>, String> {
        let mut all = Vec::new();
        if !self.reason.trim().is_empty() {
            all.push(Filter::reason(self.reason.trim()));
        }
        if !self.filter.trim().is_empty() {
            all.push(Filter::parse(self.filter.trim())?);
        }
        Ok(match all.len() {
            0 => None,
            1 => all.pop(),
            _ => Some(Filter::All(all)),
        })
    }

    /// The query string that gives this filter back.
    pub(crate) fn query(&self) -> String {
        serde_urlencoded::to_string([("reason", &self.reason), ("filter", &self.filter)])
            .unwrap_or_default()
    }

    /// In words, for the audit row.
    pub(crate) fn describe(&self) -> String {
        match (self.reason.trim(), self.filter.trim()) {
            ("", "") => "every message".into(),
            (reason, "") => format!("reason {reason}"),
            ("", filter) => format!("filter {filter}"),
            (reason, filter) => format!("reason {reason} and filter {filter}"),
        }
    }
}

/// The sample's messages that pass `filter`.
pub(crate) fn matching<'a>(sample: &'a Sample, filter: Option<&Filter>) -> Vec<&'a DlqMessage> {
    sample
        .messages
        .iter()
        .filter(|m| filter.is_none_or(|f| f.matches(&m.message, m.event.as_ref())))
        .collect()
}
