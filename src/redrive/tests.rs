use std::collections::HashMap;

use serde_json::Value;

use crate::sqs::{MAX_MESSAGE_ATTRIBUTES, OutgoingMessage, ReceivedMessage};
use crate::{message, sqs};

use super::options::Filter;
use super::redriven::{fit_redriven, redriven_message};

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

#[test]
fn a_redriven_message_keeps_its_trace_within_ten_attributes() {
    use crate::message::trace::{TRACEPARENT, TRACESTATE};
    let parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let names: Vec<String> = (0..8).map(|i| format!("a{i}")).collect();
    let mut attrs: Vec<(&str, &str)> = names.iter().map(|n| (n.as_str(), "v")).collect();
    attrs.push((TRACEPARENT, parent));
    attrs.push((TRACESTATE, "vendor=1"));
    let out = redriven_message(&received(&attrs), 1, false, false);
    assert_eq!(out.attributes.len(), MAX_MESSAGE_ATTRIBUTES);
    assert_eq!(attr(&out, TRACEPARENT), Some(parent));
    assert_eq!(attr(&out, TRACESTATE), Some("vendor=1"));
    assert_eq!(attr(&out, message::ATTR_REDRIVE_COUNT), Some("1"));
}
