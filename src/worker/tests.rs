use std::collections::HashMap;
use std::time::Duration;

use crate::sqs::{MAX_MESSAGE_ATTRIBUTES, MAX_VISIBILITY, ReceivedMessage};
use crate::{message, sqs};

use super::claim::busy_deferral;
use super::dlq::dlq_message;
use super::retry::retry_delay;
use super::summary::{Counters, RunSummary};

#[test]
fn busy_deliveries_wait_out_the_run_before_their_last_receive() {
    let (lease, run) = (Duration::from_secs(20), Duration::from_secs(800));
    // No DLQ, or receives to spare: back when the lease ends.
    assert_eq!(busy_deferral(lease, run, 1, None), lease);
    assert_eq!(busy_deferral(lease, run, 1, Some(5)), lease);
    assert_eq!(busy_deferral(lease, run, 3, Some(5)), lease);
    // The next receive is the last one allowed: park until the run must have ended.
    assert_eq!(busy_deferral(lease, run, 4, Some(5)), run);
    assert_eq!(busy_deferral(lease, run, 1, Some(2)), run);
    assert_eq!(busy_deferral(lease, Duration::ZERO, 9, Some(5)), lease);
}

#[test]
fn backoff_doubles_from_the_base_and_caps() {
    let base = Duration::from_secs(2);
    let max = Duration::from_secs(60);
    // jitter 1.0 gives the ceiling, 0.0 half of it.
    assert_eq!(retry_delay(1, base, max, 1.0), Duration::from_secs(2));
    assert_eq!(retry_delay(1, base, max, 0.0), Duration::from_secs(1));
    assert_eq!(retry_delay(2, base, max, 1.0), Duration::from_secs(4));
    assert_eq!(retry_delay(3, base, max, 1.0), Duration::from_secs(8));
    assert_eq!(retry_delay(10, base, max, 1.0), max);
    assert_eq!(retry_delay(10, base, max, 0.0), max / 2);
}

#[test]
fn backoff_never_reaches_the_sqs_limit() {
    let delay = retry_delay(
        1000,
        Duration::from_secs(3600),
        Duration::from_secs(1_000_000),
        1.0,
    );
    assert!(delay <= MAX_VISIBILITY);
    // Attempt 0 (never claimed) behaves like attempt 1 instead of underflowing.
    assert_eq!(
        retry_delay(0, Duration::from_secs(2), Duration::from_secs(60), 1.0),
        Duration::from_secs(2)
    );
}

#[test]
fn jitter_stays_in_the_upper_half() {
    for _ in 0..100 {
        let d = retry_delay(
            4,
            Duration::from_secs(1),
            Duration::from_secs(60),
            fastrand::f64(),
        );
        assert!(
            d >= Duration::from_secs(4) && d <= Duration::from_secs(8),
            "{d:?}"
        );
    }
}

fn received(attrs: &[(&str, &str)]) -> ReceivedMessage {
    ReceivedMessage {
        message_id: "m-1".into(),
        receipt_handle: "r-1".into(),
        body: "{}".into(),
        system_attributes: HashMap::new(),
        message_attributes: attrs
            .iter()
            .map(|(k, v)| (k.to_string(), sqs::string_attribute(*v)))
            .collect(),
    }
}

#[test]
fn dlq_copy_keeps_markers_and_reason_within_the_limit() {
    let mut attrs: Vec<(String, String)> =
        (0..12).map(|i| (format!("a{i:02}"), "x".into())).collect();
    attrs.push((message::ATTR_REDRIVE_COUNT.into(), "2".into()));
    let refs: Vec<(&str, &str)> = attrs
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let out = dlq_message(&received(&refs), "missing_key", "no key", false, usize::MAX);
    assert_eq!(out.attributes.len(), MAX_MESSAGE_ATTRIBUTES);
    assert!(out.attributes.contains_key(message::ATTR_FAILURE_REASON));
    assert!(out.attributes.contains_key(message::ATTR_FAILURE_DETAIL));
    assert!(out.attributes.contains_key(message::ATTR_REDRIVE_COUNT));
    assert_eq!(out.body, "{}");
    assert!(out.message_group_id.is_none());

    let fifo = dlq_message(&received(&[]), "r", "d", true, usize::MAX);
    assert_eq!(fifo.deduplication_id.as_deref(), Some("m-1"));
    assert!(fifo.message_group_id.is_some());
}

#[test]
fn dlq_copy_attributes_are_always_sendable() {
    let out = dlq_message(
        &received(&[]),
        "bad\u{0}reason",
        "stderr: \u{0}\u{1b}[31m\u{FFFF}",
        false,
        usize::MAX,
    );
    let text = |name: &str| out.attributes[name].string_value().unwrap().to_owned();
    assert_eq!(text(message::ATTR_FAILURE_REASON), "bad\u{FFFD}reason");
    assert_eq!(
        text(message::ATTR_FAILURE_DETAIL),
        "stderr: \u{FFFD}\u{FFFD}[31m\u{FFFD}"
    );
    // SQS refuses empty String attributes.
    let out = dlq_message(&received(&[]), "", "", false, usize::MAX);
    assert_eq!(
        out.attributes[message::ATTR_FAILURE_REASON].string_value(),
        Some("unspecified")
    );
    assert_eq!(
        out.attributes[message::ATTR_FAILURE_DETAIL].string_value(),
        Some("(no detail)")
    );
}

#[test]
fn dlq_copy_fits_the_maximum_message_size() {
    let limit = sqs::DEFAULT_MAX_MESSAGE_BYTES;
    let detail = "why ".repeat(200);
    let mut original = received(&[
        (message::ATTR_REDRIVE_COUNT, "1"),
        ("trace_id", "t-123456789"),
    ]);
    let original_attrs = sqs::message_bytes("", &original.message_attributes);
    // The original left `room` bytes free; the copy adds the reason (42 bytes) and the
    // detail (31 bytes + its text).
    let copy = |original: &mut ReceivedMessage, room: usize| {
        original.body = "x".repeat(limit - original_attrs - room);
        let out = dlq_message(original, "missing_key", &detail, false, limit);
        assert!(sqs::message_bytes(&out.body, &out.attributes) <= limit);
        assert_eq!(out.body, original.body, "the body is never changed");
        let mut names: Vec<String> = out.attributes.keys().cloned().collect();
        names.sort();
        (out, names)
    };
    // Some room: only the detail is shortened.
    let (out, names) = copy(&mut original, 300);
    assert_eq!(names.len(), 4);
    let shortened = out.attributes[message::ATTR_FAILURE_DETAIL]
        .string_value()
        .unwrap();
    assert!(shortened.starts_with("why why") && shortened.ends_with('…'));
    assert_eq!(sqs::message_bytes(&out.body, &out.attributes), limit);
    // Less: the detail is cut to the bone and the ordinary attribute goes.
    let (out, names) = copy(&mut original, 60);
    assert_eq!(
        names,
        [
            message::ATTR_REDRIVE_COUNT,
            message::ATTR_FAILURE_DETAIL,
            message::ATTR_FAILURE_REASON
        ]
    );
    assert_eq!(
        out.attributes[message::ATTR_FAILURE_DETAIL].string_value(),
        Some("…")
    );
    // Less: the detail goes; the reason and the redrive marker stay.
    let (_, names) = copy(&mut original, 20);
    assert_eq!(
        names,
        [message::ATTR_REDRIVE_COUNT, message::ATTR_FAILURE_REASON]
    );
    // None: the marker outlasts the reason.
    let (_, names) = copy(&mut original, 0);
    assert_eq!(names, [message::ATTR_REDRIVE_COUNT]);
    // A body at the limit goes bare.
    let bare = ReceivedMessage {
        body: "x".repeat(limit),
        ..received(&[])
    };
    let out = dlq_message(&bare, "missing_key", &detail, false, limit);
    assert!(out.attributes.is_empty());
}

/// Every count of the summary has the metric `sqs_worker_<field>_total`, and every such
/// metric is a count of the summary: counted through a run, each bump shows in both.
#[test]
fn every_summary_count_has_the_metric_of_its_name() {
    use super::summary::names;
    let metrics = [
        names::RECEIVED,
        names::PROCESSED,
        names::DUPLICATES_SKIPPED,
        names::BUSY_DEFERRED,
        names::RETRIED,
        names::SENT_TO_DLQ,
        names::DEAD_LETTERED,
        names::DELETE_FAILURES,
        names::LEASE_LOST,
        names::RECEIVE_CALLS,
        names::EMPTY_RECEIVES,
        names::RECEIVE_ERRORS,
        names::DATABASE_ERRORS,
        names::HEARTBEATS,
        names::HEARTBEAT_FAILURES,
        names::RELEASED_AT_SHUTDOWN,
    ];
    // Not counts: a gauge set at shutdown, a duration and a peak.
    let not_counted = ["abandoned_at_shutdown", "active_millis", "peak_pollers"];
    let summary = serde_json::to_value(RunSummary::default()).unwrap();
    let mut fields: Vec<String> = summary
        .as_object()
        .unwrap()
        .keys()
        .filter(|k| !not_counted.contains(&k.as_str()))
        .map(|k| format!("sqs_worker_{k}_total"))
        .collect();
    let mut metrics: Vec<String> = metrics.iter().map(|m| m.to_string()).collect();
    fields.sort();
    metrics.sort();
    assert_eq!(fields, metrics);
    // And the counters bump the field that names their metric.
    let counters = Counters::new("q");
    counters.sent_to_dlq.add(2);
    counters.dead_lettered.add(3);
    let snapshot = counters.snapshot();
    assert_eq!((snapshot.sent_to_dlq, snapshot.dead_lettered), (2, 3));
}

#[test]
fn a_dlq_copy_keeps_the_trace_attributes_before_the_others() {
    use message::trace::{TRACEPARENT, TRACESTATE};
    let parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let names: Vec<String> = (0..10).map(|i| format!("a{i}")).collect();
    let mut attrs: Vec<(&str, &str)> = names.iter().map(|n| (n.as_str(), "v")).collect();
    attrs.push((TRACEPARENT, parent));
    attrs.push((TRACESTATE, "vendor=1"));
    attrs.push((message::ATTR_REDRIVE_COUNT, "1"));
    let out = dlq_message(&received(&attrs), "r", "d", false, usize::MAX);
    assert_eq!(out.attributes.len(), MAX_MESSAGE_ATTRIBUTES);
    let value = |name: &str| out.attributes.get(name).and_then(|v| v.string_value());
    assert_eq!(value(TRACEPARENT), Some(parent));
    assert_eq!(value(TRACESTATE), Some("vendor=1"));
    assert_eq!(value(message::ATTR_REDRIVE_COUNT), Some("1"));

    // An X-Ray header alone does not travel with a send: it goes as a traceparent.
    let mut xray = received(&[]);
    xray.system_attributes.insert(
        "AWSTraceHeader".into(),
        "Root=1-5759e988-bd862e3fe1be46a994272793;Parent=53995c3f42cd8ad8;Sampled=1".into(),
    );
    let out = dlq_message(&xray, "r", "d", false, usize::MAX);
    assert_eq!(
        out.attributes[TRACEPARENT].string_value(),
        Some("00-5759e988bd862e3fe1be46a994272793-53995c3f42cd8ad8-01")
    );
}
