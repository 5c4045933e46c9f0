use serde_json::Value;

use super::fingerprint::{differing_fields, write_canonical_json};
use super::keys::{
    Envelope, EventIdentity, KeyError, KeySpec, MAX_KEY_BYTES, body_sha256, derive_identity,
    fallback_key,
};
use super::markers::{
    ATTR_DLQ_FINAL_PASS, ATTR_DLQ_REDRIVEN, ATTR_REDRIVE_COUNT, ATTR_REQUEUE_GENERATION, Pass,
    parse_markers,
};
use super::truncate_for_log;

fn derive_identity_raw(spec: &KeySpec, body: &str) -> Result<EventIdentity, KeyError> {
    derive_identity(spec, Envelope::Raw, body)
}

fn spec(pointers: &[&str]) -> KeySpec {
    KeySpec::new(pointers.iter().map(|p| p.to_string()).collect()).unwrap()
}

#[test]
fn single_pointer_takes_the_value() {
    let id = derive_identity_raw(&spec(&["/order_id"]), r#"{"order_id":"o-1"}"#).unwrap();
    assert_eq!(id.key, "o-1");
    let id = derive_identity_raw(&spec(&["/n"]), r#"{"n":42}"#).unwrap();
    assert_eq!(id.key, "42");
}

#[test]
fn nested_pointer_and_composite_key() {
    let body = r#"{"detail":{"id":"x"},"action":"scheduled"}"#;
    let id = derive_identity_raw(&spec(&["/detail/id", "/action"]), body).unwrap();
    assert_eq!(id.key, "x|scheduled");
}

#[test]
fn composite_key_is_unambiguous() {
    let a = derive_identity_raw(&spec(&["/a", "/b"]), r#"{"a":"x|y","b":"z"}"#).unwrap();
    let b = derive_identity_raw(&spec(&["/a", "/b"]), r#"{"a":"x","b":"y|z"}"#).unwrap();
    assert_ne!(a.key, b.key);
    assert_eq!(a.key, "x%7Cy|z");
}

#[test]
fn nul_and_control_characters_are_escaped() {
    let id = derive_identity_raw(&spec(&["/k"]), r#"{"k":"a\u0000b\nc%"}"#).unwrap();
    assert_eq!(id.key, "a%00b%0Ac%25");
}

#[test]
fn long_keys_are_hashed() {
    let long = "k".repeat(300);
    let id = derive_identity_raw(&spec(&["/k"]), &format!(r#"{{"k":"{long}"}}"#)).unwrap();
    assert!(id.key.starts_with("sha256:"));
    assert_eq!(id.key.len(), "sha256:".len() + 64);
    let exactly = "k".repeat(MAX_KEY_BYTES);
    let id = derive_identity_raw(&spec(&["/k"]), &format!(r#"{{"k":"{exactly}"}}"#)).unwrap();
    assert_eq!(id.key, exactly);
}

#[test]
fn no_pointers_means_hash_of_body_even_for_non_json() {
    let id = derive_identity_raw(&KeySpec::default(), "not json").unwrap();
    assert_eq!(id.key, fallback_key("not json"));
    assert!(id.json.is_none());
    let other = derive_identity_raw(&KeySpec::default(), "not json!").unwrap();
    assert_ne!(id.key, other.key);
}

#[test]
fn bad_bodies_get_reason_codes() {
    let s = spec(&["/id"]);
    let err = derive_identity_raw(&s, "not json").unwrap_err();
    assert_eq!(err.reason_code(), "invalid_json");
    for body in [r#"{}"#, r#"{"id":null}"#, r#"{"id":""}"#] {
        assert_eq!(
            derive_identity_raw(&s, body).unwrap_err().reason_code(),
            "missing_key",
            "{body}"
        );
    }
    for body in [r#"{"id":{}}"#, r#"{"id":[1]}"#] {
        assert_eq!(
            derive_identity_raw(&s, body).unwrap_err().reason_code(),
            "invalid_key",
            "{body}"
        );
    }
    // A JSON scalar body has no fields at all.
    assert_eq!(
        derive_identity_raw(&s, "17").unwrap_err().reason_code(),
        "missing_key"
    );
}

#[test]
fn sns_notifications_are_unwrapped_and_raw_delivery_passes_through() {
    let inner = r#"{"order_id":"o-9","total":5}"#;
    let notification = serde_json::json!({
        "Type": "Notification",
        "MessageId": "sns-1",
        "TopicArn": "arn:aws:sns:us-east-1:000000000000:orders",
        "Message": inner,
        "Timestamp": "2026-11-22T00:00:00.000Z",
    })
    .to_string();
    let id = derive_identity(&spec(&["/order_id"]), Envelope::Sns, &notification).unwrap();
    assert_eq!(id.key, "o-9");
    assert_eq!(id.unwrapped.as_deref(), Some(inner));
    assert_eq!(id.fingerprint, body_sha256(inner));
    // The same event re-published (new SNS MessageId) has the same fingerprint.
    let republished = notification.replace("sns-1", "sns-2");
    let again = derive_identity(&spec(&["/order_id"]), Envelope::Sns, &republished).unwrap();
    assert_eq!(again.fingerprint, id.fingerprint);
    // Raw message delivery: the body is the event.
    let raw = derive_identity(&spec(&["/order_id"]), Envelope::Sns, inner).unwrap();
    assert_eq!(raw.key, "o-9");
    // A notification whose Message is not JSON cannot yield a key.
    let bad = notification.replace(&inner.replace('"', "\\\""), "plain text");
    let error = derive_identity(&spec(&["/order_id"]), Envelope::Sns, &bad).unwrap_err();
    assert_eq!(error.reason_code(), "invalid_json", "{bad}");
}

#[test]
fn eventbridge_detail_is_the_event() {
    let event = r#"{"version":"0","id":"eb-1","detail-type":"OrderPlaced","source":"shop","time":"2026-11-22T00:00:00Z","detail":{"order_id":"e-1"}}"#;
    let id = derive_identity(&spec(&["/order_id"]), Envelope::Eventbridge, event).unwrap();
    assert_eq!(id.key, "e-1");
    assert_eq!(id.json.unwrap()["order_id"], "e-1");
    for bad in [r#"{"order_id":"e-1"}"#, "not json", r#"{"detail":{}}"#] {
        let error = derive_identity(&spec(&["/order_id"]), Envelope::Eventbridge, bad).unwrap_err();
        assert_eq!(error.reason_code(), "invalid_envelope", "{bad}");
    }
}

#[test]
fn pointers_must_be_json_pointers() {
    assert!(KeySpec::new(vec!["order_id".into()]).is_err());
    assert!(KeySpec::new(vec!["/order_id".into()]).is_ok());
}

#[test]
fn markers_parse_and_tolerate_garbage() {
    let m = parse_markers([
        (ATTR_DLQ_REDRIVEN, Some("true")),
        (ATTR_REDRIVE_COUNT, Some("2")),
        (ATTR_DLQ_FINAL_PASS, Some("TRUE")),
        ("other", Some("x")),
    ]);
    assert!(m.redriven && m.final_pass);
    assert_eq!(m.redrive_count, 2);
    assert!(m.problems.is_empty());

    let m = parse_markers([
        (ATTR_REDRIVE_COUNT, Some("99999999999999999999")),
        (ATTR_DLQ_FINAL_PASS, Some("yes please")),
        (ATTR_DLQ_REDRIVEN, None),
    ]);
    assert_eq!(m.redrive_count, 0);
    assert!(!m.final_pass && !m.redriven);
    assert_eq!(m.problems.len(), 3);
}

#[test]
fn truncation_respects_char_boundaries() {
    assert_eq!(truncate_for_log("héllo", 2), "hé…");
    assert_eq!(truncate_for_log("hi", 5), "hi");
}

fn reason(s: &KeySpec, body: &str) -> &'static str {
    match derive_identity_raw(s, body) {
        Ok(id) => panic!("{body:?} gave the key {:?}", id.key),
        Err(error) => error.reason_code(),
    }
}

#[test]
fn integer_keys_are_exact_and_equal_to_their_string_form() {
    let s = spec(&["/id"]);
    for (body, key) in [
        (r#"{"id":42}"#, "42"),
        (r#"{"id":-7}"#, "-7"),
        (r#"{"id":0}"#, "0"),
        (r#"{"id":9223372036854775807}"#, "9223372036854775807"),
        (r#"{"id":-9223372036854775808}"#, "-9223372036854775808"),
        (r#"{"id":18446744073709551615}"#, "18446744073709551615"),
        (r#"{"id":true}"#, "true"),
    ] {
        assert_eq!(derive_identity_raw(&s, body).unwrap().key, key, "{body}");
    }
    // Documented: a number and its decimal string are the same key.
    assert_eq!(
        derive_identity_raw(&s, r#"{"id":42}"#).unwrap().key,
        derive_identity_raw(&s, r#"{"id":"42"}"#).unwrap().key
    );
}

#[test]
fn inexact_numbers_are_refused_as_invalid_key() {
    let s = spec(&["/id"]);
    for (body, why) in [
        (r#"{"id":1.5}"#, "a fractional number"),
        (r#"{"id":1.0}"#, "fraction, an exponent"),
        (r#"{"id":1e3}"#, "fraction, an exponent"),
        (r#"{"id":-0}"#, "as -0"),
        (
            r#"{"id":12345678901234567890123}"#,
            "outside the 64-bit range",
        ),
        (r#"{"id":18446744073709551616}"#, "outside the 64-bit range"),
        (r#"{"id":-9223372036854775809}"#, "outside the 64-bit range"),
    ] {
        let error = derive_identity_raw(&s, body).unwrap_err();
        assert_eq!(error.reason_code(), "invalid_key", "{body}");
        let text = error.to_string();
        assert!(text.contains(why), "{body}: {text}");
        assert!(
            text.contains("send larger or fractional ids as strings"),
            "{text}"
        );
    }
    // The rounding this prevents: two ids that differ only past f64's precision.
    let a: Value = serde_json::from_str("12345678901234567890123").unwrap();
    let b: Value = serde_json::from_str("12345678901234567890124").unwrap();
    assert_eq!(a, b, "serde_json reads both as the same f64");
}

#[test]
fn unparseable_bodies_are_invalid_json_without_overflowing_the_stack() {
    let s = spec(&["/id"]);
    let deep = "[".repeat(100_000);
    let deep_object = r#"{"id":"x","a":"#.to_owned() + &"[".repeat(100_000);
    let closed = format!(
        r#"{{"id":"x","a":{}1{}}}"#,
        "[".repeat(200),
        "]".repeat(200)
    );
    for body in [
        "",
        "   \n\t\r ",
        "not json",
        deep.as_str(),
        deep_object.as_str(),
        // Deeper than serde_json's recursion limit (128), even though well-formed.
        closed.as_str(),
        // A lone UTF-16 surrogate cannot become a Rust (or PostgreSQL) string.
        r#"{"id":"\ud800"}"#,
        r#"{"id":"x\udc00"}"#,
        r#"{"id":"x"} trailing"#,
        "\u{feff}{\"id\":\"bom\"}",
    ] {
        assert_eq!(reason(&s, body), "invalid_json", "{:.40}", body);
    }
    // A paired surrogate is an ordinary character.
    let crab = derive_identity_raw(&s, r#"{"id":"\ud83e\udd80"}"#).unwrap();
    assert_eq!(crab.key, "🦀");
    // Without key pointers the body is not parsed for a key: deep nesting is just text.
    let hashed = derive_identity_raw(&KeySpec::default(), &deep).unwrap();
    assert_eq!(hashed.key, fallback_key(&deep));
    assert!(hashed.json.is_none());
}

#[test]
fn duplicate_fields_last_one_wins_for_the_key_and_the_handler() {
    let s = spec(&["/id"]);
    let id = derive_identity_raw(&s, r#"{"id":"first","n":1,"id":"last"}"#).unwrap();
    assert_eq!(id.key, "last");
    // Job::json is this same value: the handler sees what the key was taken from.
    assert_eq!(id.json.unwrap()["id"], "last");
    // A later null hides an earlier value.
    assert_eq!(reason(&s, r#"{"id":"x","id":null}"#), "missing_key");
}

#[test]
fn key_fields_of_every_shape() {
    let s = spec(&["/id"]);
    for body in [
        r#"{"other":1}"#,
        r#"{"id":null}"#,
        r#"{"id":""}"#,
        "[]",
        "null",
    ] {
        assert_eq!(reason(&s, body), "missing_key", "{body}");
    }
    for body in [r#"{"id":{"a":1}}"#, r#"{"id":[]}"#, r#"{"id":1.5}"#] {
        assert_eq!(reason(&s, body), "invalid_key", "{body}");
    }
    // Hostile text is data: bound as a parameter, stored verbatim.
    let sql = "'; drop table checkpoints; --";
    let id = derive_identity_raw(&s, &serde_json::json!({ "id": sql }).to_string()).unwrap();
    assert_eq!(id.key, sql);
    // Terminal escapes and newlines are percent-encoded (no log or header injection);
    // right-to-left marks and emoji are ordinary characters and kept.
    let body = serde_json::json!({"id": "\u{1b}[31mred\u{1b}[0m\nx\u{202e}evil🦀\u{85}"});
    let id = derive_identity_raw(&s, &body.to_string()).unwrap();
    assert_eq!(id.key, "%1B[31mred%1B[0m%0Ax\u{202e}evil🦀%85");
    // A 10,000-character key is stored as the hash of its escaped form.
    let long = "é".repeat(10_000);
    let id = derive_identity_raw(&s, &serde_json::json!({ "id": long }).to_string()).unwrap();
    assert_eq!(id.key, fallback_key(&long));
    assert!(id.key.len() <= MAX_KEY_BYTES);
    // NUL, the one character PostgreSQL text cannot hold, is encoded too.
    let id = derive_identity_raw(&s, r#"{"id":"\u0000"}"#).unwrap();
    assert_eq!(id.key, "%00");
}

#[test]
fn malformed_sns_envelopes_fall_back_to_raw_delivery() {
    let s = spec(&["/order_id"]);
    let sns = |message: Value| {
        let mut envelope = serde_json::json!({
            "Type": "Notification",
            "TopicArn": "arn:aws:sns:us-east-1:000000000000:orders",
        });
        if !message.is_null() {
            envelope["Message"] = message;
        }
        envelope.to_string()
    };
    // No Message, or a Message that is not a string: not a notification we can unwrap,
    // so the body is taken as raw delivery, and it has no order_id.
    for body in [sns(Value::Null), sns(serde_json::json!(17))] {
        let error = derive_identity(&s, Envelope::Sns, &body).unwrap_err();
        assert_eq!(error.reason_code(), "missing_key", "{body}");
    }
    // ... unless the envelope itself carries the key: then it is the event.
    let mut odd: Value = serde_json::from_str(&sns(Value::Null)).unwrap();
    odd["order_id"] = "o-1".into();
    let id = derive_identity(&s, Envelope::Sns, &odd.to_string()).unwrap();
    assert_eq!(id.key, "o-1");
    // A Message that is a string but not JSON: the event has no fields.
    let error =
        derive_identity(&s, Envelope::Sns, &sns(serde_json::json!("{not json"))).unwrap_err();
    assert_eq!(error.reason_code(), "invalid_json");
    // A body that is not JSON at all is raw delivery of a non-JSON event.
    let error = derive_identity(&s, Envelope::Sns, "plain").unwrap_err();
    assert_eq!(error.reason_code(), "invalid_json");
    // A JSON-encoded object (not a string) in Message is not how SNS wraps: raw delivery.
    let error = derive_identity(
        &s,
        Envelope::Sns,
        &sns(serde_json::json!({"order_id": "o-2"})),
    )
    .unwrap_err();
    assert_eq!(error.reason_code(), "missing_key");
}

#[test]
fn malformed_eventbridge_envelopes() {
    let s = spec(&["/order_id"]);
    let eb = |detail: Option<Value>| {
        let mut event = serde_json::json!({"detail-type": "OrderPlaced", "source": "shop"});
        if let Some(detail) = detail {
            event["detail"] = detail;
        }
        event.to_string()
    };
    for body in [
        eb(None),
        "not json".into(),
        "  ".into(),
        r#"{"detail":{}}"#.into(),
    ] {
        let error = derive_identity(&s, Envelope::Eventbridge, &body).unwrap_err();
        assert_eq!(error.reason_code(), "invalid_envelope", "{body}");
    }
    // `detail` present but not an object: the event is that value, and has no key field.
    for detail in [
        serde_json::json!(r#"{"order_id":"e-1"}"#),
        Value::Null,
        serde_json::json!(5),
        serde_json::json!([]),
    ] {
        let body = eb(Some(detail));
        let error = derive_identity(&s, Envelope::Eventbridge, &body).unwrap_err();
        assert_eq!(error.reason_code(), "missing_key", "{body}");
    }
}

#[test]
fn absurd_marker_values_count_as_absent() {
    let m = parse_markers([
        (ATTR_REDRIVE_COUNT, Some("-1")),
        (ATTR_DLQ_REDRIVEN, Some("1")),
        (ATTR_DLQ_FINAL_PASS, Some("\u{0}true")),
    ]);
    assert_eq!(
        (m.redrive_count, m.redriven, m.final_pass, m.problems.len()),
        (0, false, false, 3)
    );
    for count in ["4294967296", "1e3", "2.0", "", "🦀"] {
        let m = parse_markers([(ATTR_REDRIVE_COUNT, Some(count))]);
        assert_eq!((m.redrive_count, m.problems.len()), (0, 1), "{count:?}");
    }
    // Surrounding whitespace is forgiven; the problem text is cut short for the log.
    let m = parse_markers([(ATTR_REDRIVE_COUNT, Some(" 7 "))]);
    assert_eq!((m.redrive_count, m.problems.len()), (7, 0));
    let long = "x".repeat(10_000);
    let m = parse_markers([(ATTR_DLQ_REDRIVEN, Some(long.as_str()))]);
    assert!(m.problems[0].len() < 200, "{}", m.problems[0]);
}

#[test]
fn whole_event_fingerprints_list_the_top_level_fields() {
    let s = spec(&["/id"]);
    let body = r#"{"id":"a","amount":5,"sent_at":"10:00"}"#;
    let first = derive_identity_raw(&s, body).unwrap();
    let again = derive_identity_raw(&s, r#"{"id":"a","amount":5,"sent_at":"10:05"}"#).unwrap();
    assert_ne!(first.fingerprint, again.fingerprint);
    assert_eq!(first.fingerprint, body_sha256(first.event(body)));
    assert_eq!(first.unwrapped, None, "a raw body is not copied");
    assert_eq!(
        differing_fields(
            first.field_digests.as_deref(),
            again.field_digests.as_deref()
        ),
        Some(vec!["/sent_at".to_owned()])
    );
    // A field present on one side only differs too; pointer tokens are escaped.
    let other = derive_identity_raw(&s, r#"{"id":"a","a/b":1}"#).unwrap();
    assert_eq!(
        differing_fields(
            first.field_digests.as_deref(),
            other.field_digests.as_deref()
        ),
        Some(vec![
            "/amount".to_owned(),
            "/a~1b".to_owned(),
            "/sent_at".to_owned()
        ])
    );
    assert_eq!(differing_fields(None, first.field_digests.as_deref()), None);
    let text = derive_identity_raw(&KeySpec::default(), "not json").unwrap();
    assert_eq!(text.field_digests, None);
}

#[test]
fn fingerprint_pointers_ignore_other_fields_and_key_order() {
    let s = spec(&["/id"])
        .with_fingerprint(vec!["/id".into(), "/order/amount".into()])
        .unwrap();
    let first = derive_identity_raw(
        &s,
        r#"{"id":"a","order":{"amount":5,"c":[1,{"y":1,"x":2}]},"at":1}"#,
    )
    .unwrap();
    let resent = derive_identity_raw(&s, r#"{"at":2,"order":{"amount":5},"id":"a"}"#).unwrap();
    assert_eq!(first.fingerprint, resent.fingerprint);
    assert!(first.fingerprint.starts_with("fields:"));
    let changed = derive_identity_raw(&s, r#"{"id":"a","order":{"amount":6}}"#).unwrap();
    assert_ne!(first.fingerprint, changed.fingerprint);
    assert_eq!(
        differing_fields(
            first.field_digests.as_deref(),
            changed.field_digests.as_deref()
        ),
        Some(vec!["/order/amount".to_owned()])
    );
    // A missing field counts as null, not as an error.
    let missing = derive_identity_raw(&s, r#"{"id":"a"}"#).unwrap();
    let null = derive_identity_raw(&s, r#"{"id":"a","order":{"amount":null}}"#).unwrap();
    assert_eq!(missing.fingerprint, null.fingerprint);
    // Nested key order never changes a fingerprint.
    let mut text = String::new();
    write_canonical_json(&mut text, &serde_json::json!({"b":[{"z":1,"a":2}],"a":"é"}));
    assert_eq!(text, r#"{"a":"é","b":[{"a":2,"z":1}]}"#);
    assert!(
        spec(&[])
            .with_fingerprint(vec!["amount".into()])
            .unwrap_err()
            .contains("--fingerprint")
    );
}

#[test]
fn passes_order_by_requeue_then_redrive() {
    let m = parse_markers([
        (ATTR_REDRIVE_COUNT, Some("2")),
        (ATTR_REQUEUE_GENERATION, Some("1")),
    ]);
    assert_eq!(
        m.pass(),
        Pass {
            requeue_generation: 1,
            redrive_count: 2
        }
    );
    let first_redrive = Pass {
        requeue_generation: 0,
        redrive_count: 1,
    };
    let requeued = Pass {
        requeue_generation: 1,
        redrive_count: 0,
    };
    assert!(Pass::default() < first_redrive && first_redrive < requeued);
    let m = parse_markers([(ATTR_REQUEUE_GENERATION, Some("soon"))]);
    assert_eq!(m.requeue_generation, 0);
    assert_eq!(m.problems.len(), 1);
}

/// The digests' text as it was built before (a `serde_json::Map` of pointer → the first 16
/// hex digits of the value's canonical JSON): digests stored by earlier versions must still
/// compare equal.
fn digests_as_stored_before(fields: &[(String, &serde_json::Value)]) -> String {
    let map: serde_json::Map<String, serde_json::Value> = fields
        .iter()
        .map(|(pointer, value)| {
            let mut text = String::new();
            write_canonical_json(&mut text, value);
            (
                pointer.clone(),
                serde_json::Value::String(body_sha256(&text)[..16].to_owned()),
            )
        })
        .collect();
    serde_json::Value::Object(map).to_string()
}

#[test]
fn field_digests_keep_the_form_stored_before() {
    let body =
        r#"{"zeta":1,"a/b":{"y":[1,2.5,null],"x":"é\"q"},"m~n":true,"":"empty","é":"\u202e"}"#;
    let event: serde_json::Value = serde_json::from_str(body).unwrap();
    let whole = derive_identity_raw(&spec(&["/zeta"]), body).unwrap();
    let fields: Vec<(String, &serde_json::Value)> = event
        .as_object()
        .unwrap()
        .iter()
        .map(|(name, value)| {
            (
                format!("/{}", name.replace('~', "~0").replace('/', "~1")),
                value,
            )
        })
        .collect();
    assert_eq!(
        whole.field_digests.unwrap(),
        digests_as_stored_before(&fields)
    );

    let chosen = KeySpec::new(vec!["/zeta".into()])
        .unwrap()
        .with_fingerprint(vec![
            "/a~1b/x".into(),
            "/zeta".into(),
            "/missing".into(),
            "/zeta".into(),
        ])
        .unwrap();
    let picked = derive_identity(&chosen, Envelope::Raw, body).unwrap();
    let null = serde_json::Value::Null;
    let fields = [
        ("/a~1b/x".to_owned(), &event["a/b"]["x"]),
        ("/zeta".to_owned(), &event["zeta"]),
        ("/missing".to_owned(), &null),
    ];
    assert_eq!(
        picked.field_digests.unwrap(),
        digests_as_stored_before(&fields)
    );
}
