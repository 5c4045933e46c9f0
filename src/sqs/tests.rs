#[test]
fn service_errors_are_classified_by_code_and_status() {
    use super::{SqsErrorKind::*, service_error_kind};
    assert_eq!(
        service_error_kind("AWS.SimpleQueueService.NonExistentQueue", 400),
        QueueNotFound
    );
    assert_eq!(service_error_kind("QueueDoesNotExist", 400), QueueNotFound);
    assert_eq!(service_error_kind("AccessDenied", 403), AccessDenied);
    assert_eq!(
        service_error_kind("InvalidClientTokenId", 400),
        AccessDenied
    );
    assert_eq!(
        service_error_kind("KMS.AccessDeniedException", 403),
        AccessDenied
    );
    assert_eq!(service_error_kind("InternalError", 500), Unreachable);
    assert_eq!(service_error_kind("RequestThrottled", 400), Unreachable);
    assert_eq!(service_error_kind("InvalidAddress", 404), Rejected);
    assert!(Unreachable.is_transient() && !QueueNotFound.is_transient());
}

#[test]
fn error_texts_become_one_short_line() {
    assert_eq!(
        super::one_line("no credentials found in chain. Attempted:\n  Environment: x"),
        "no credentials found in chain. Attempted:"
    );
    assert_eq!(super::one_line(&"x".repeat(400)).chars().count(), 301);
}

use std::borrow::Cow;
use std::collections::HashMap;
use std::time::Duration;

use aws_sdk_sqs::types::MessageAttributeValue;

use super::fit::{attribute_bytes, fit_message_size, message_bytes, shorten_to_bytes, xml_safe};
use super::types::{queue_name_from_url, string_attribute, visibility_seconds};

#[test]
fn queue_names_come_from_urls() {
    assert_eq!(
        queue_name_from_url("http://127.0.0.1:4566/000000000000/orders"),
        "orders"
    );
    assert_eq!(
        queue_name_from_url("https://sqs.eu-west-1.amazonaws.com/123/jobs.fifo/"),
        "jobs.fifo"
    );
}

#[test]
fn xml_safe_replaces_what_sqs_refuses() {
    assert!(matches!(xml_safe("plain\ttext\r\n🦀"), Cow::Borrowed(_)));
    assert_eq!(
        xml_safe("a\0b\u{1}c\u{1b}d\u{FFFE}e\u{FFFF}f\u{D7FF}\u{E000}\u{10FFFF}"),
        "a\u{FFFD}b\u{FFFD}c\u{FFFD}d\u{FFFD}e\u{FFFD}f\u{D7FF}\u{E000}\u{10FFFF}"
    );
}

#[test]
fn sizes_count_name_type_and_value() {
    let mut attributes = HashMap::new();
    attributes.insert("a".to_owned(), string_attribute("v"));
    assert_eq!(message_bytes("xyz", &attributes), 3 + 1 + 6 + 1);
    let binary = MessageAttributeValue::builder()
        .data_type("Binary")
        .binary_value(aws_sdk_sqs::primitives::Blob::new(vec![0u8; 5]))
        .build()
        .unwrap();
    assert_eq!(attribute_bytes("bb", &binary), 2 + 6 + 5);
    assert_eq!(message_bytes("é", &HashMap::new()), 2);
}

#[test]
fn shortening_respects_char_boundaries_and_never_empties() {
    assert_eq!(shorten_to_bytes("short", 10), "short");
    assert_eq!(shorten_to_bytes("ééééé", 7), "éé…");
    assert_eq!(shorten_to_bytes("abcdef", 0), "…");
}

#[test]
fn fitting_shortens_then_drops_optional_then_required() {
    let attrs = |pairs: &[(&str, &str)]| -> HashMap<String, MessageAttributeValue> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), string_attribute(*v)))
            .collect()
    };
    let keep = ["marker", "reason"];
    let start = attrs(&[
        ("reason", "r"),
        ("detail", &"d".repeat(100)),
        ("marker", "1"),
        ("big", &"b".repeat(50)),
        ("small", "s"),
    ]);
    // Fits already: untouched.
    let mut a = start.clone();
    fit_message_size("body", &mut a, 10_000, "detail", &keep);
    assert_eq!(a, start);
    // 40 bytes over: the detail gives them up and nothing is dropped.
    let total = message_bytes("body", &start);
    let mut a = start.clone();
    fit_message_size("body", &mut a, total - 40, "detail", &keep);
    assert_eq!(message_bytes("body", &a), total - 40);
    assert_eq!(a.len(), 5);
    assert!(a["detail"].string_value().unwrap().ends_with('…'));
    // More than the detail can give: the largest ordinary attribute goes, the marker
    // stays.
    let mut a = start.clone();
    fit_message_size("body", &mut a, total - 150, "detail", &keep);
    assert!(message_bytes("body", &a) <= total - 150);
    assert_eq!(a["detail"].string_value(), Some("…"));
    assert!(a.contains_key("marker") && a.contains_key("small"));
    assert!(!a.contains_key("big"));
    // Less room: the detail goes, then `keep` from its end.
    let mut a = start.clone();
    fit_message_size("body", &mut a, 4 + 6 + 6 + 1 + 6 + 6 + 1, "detail", &keep);
    assert_eq!(a.len(), 2, "{a:?}");
    let mut a = start.clone();
    fit_message_size("body", &mut a, 4 + 6 + 6 + 1, "detail", &keep);
    assert_eq!(a.keys().collect::<Vec<_>>(), ["marker"]);
    let mut a = start.clone();
    fit_message_size("body", &mut a, 4, "detail", &keep);
    assert!(a.is_empty());
}

#[test]
fn visibility_rounds_up_and_caps() {
    assert_eq!(visibility_seconds(Duration::from_millis(1)), 1);
    assert_eq!(visibility_seconds(Duration::from_secs(5)), 5);
    assert_eq!(visibility_seconds(Duration::from_millis(5_001)), 6);
    assert_eq!(visibility_seconds(Duration::from_secs(100_000)), 43_199);
    assert_eq!(visibility_seconds(Duration::ZERO), 0);
}
