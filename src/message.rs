//! From an SQS message to an event: the idempotency key and the redrive markers.
//!
//! Pure functions, no I/O, so the worker, the Lambda adapter and the operator tools agree on
//! what a message *is*. The key comes from the payload and never from the SQS MessageId:
//! SQS gives a redriven or re-sent message a new MessageId, but it is the same event.

use serde_json::Value;
use sha2::{Digest, Sha256};

/// Keys longer than this many bytes are stored as `sha256:<hex>` of the key.
pub const MAX_KEY_BYTES: usize = 255;

/// Message attribute set by `redrive` on every message it sends back: `"true"`.
pub const ATTR_DLQ_REDRIVEN: &str = "dlq_redriven";
/// Message attribute: how many times the message has been redriven from its DLQ.
pub const ATTR_REDRIVE_COUNT: &str = "redrive_count";
/// Message attribute: `"true"` on the last redrive an operator allows; a failure then ends
/// the message (recorded, deleted) instead of sending it to the DLQ again.
pub const ATTR_DLQ_FINAL_PASS: &str = "dlq_final_pass";
/// Message attribute the worker adds when it sends a message to the DLQ: a reason code.
pub const ATTR_FAILURE_REASON: &str = "sqs_worker_failure_reason";
/// Message attribute the worker adds when it sends a message to the DLQ: the error text.
pub const ATTR_FAILURE_DETAIL: &str = "sqs_worker_failure_detail";

/// Where in the body the idempotency key lives.
///
/// No pointers means "the whole body is the event": the key is the SHA-256 of the body, which
/// still recognises byte-identical duplicates.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeySpec {
    pointers: Vec<String>,
}

impl KeySpec {
    /// Validate RFC 6901 JSON pointers such as `/order_id` or `/detail/id`.
    pub fn new(pointers: Vec<String>) -> Result<Self, String> {
        for pointer in &pointers {
            if !pointer.starts_with('/') {
                return Err(format!(
                    "key pointer {pointer:?} is not a JSON pointer: it must start with '/', e.g. /order_id"
                ));
            }
        }
        Ok(Self { pointers })
    }

    /// The pointers, in the order they make up a composite key.
    pub fn pointers(&self) -> &[String] {
        &self.pointers
    }

    /// True when the key is read from the JSON body (so the body must be JSON).
    pub fn needs_json(&self) -> bool {
        !self.pointers.is_empty()
    }
}

/// Why no key could be taken from a body. Always permanent: the same body fails the same way.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    /// `--envelope` names a wrapper (SNS, EventBridge) that this body is not.
    #[error("body is not a valid {0}")]
    InvalidEnvelope(String),
    /// `--key` needs a JSON body and this one is not JSON.
    #[error("body is not valid JSON ({0}); the key pointers need a JSON body")]
    InvalidJson(String),
    /// The pointer resolves to nothing, to null, or to an empty string.
    #[error("key field {0} is missing, null or empty in the body")]
    MissingField(String),
    /// The pointer resolves to an object or an array, which make poor keys.
    #[error("key field {pointer} holds {found}; a key must be a string, number or boolean")]
    InvalidFieldType {
        /// The pointer that was followed.
        pointer: String,
        /// What was found there.
        found: &'static str,
    },
}

impl KeyError {
    /// A short, stable reason code for DLQ attributes and the checkpoint's last error.
    pub fn reason_code(&self) -> &'static str {
        match self {
            KeyError::InvalidEnvelope(_) => "invalid_envelope",
            KeyError::InvalidJson(_) => "invalid_json",
            KeyError::MissingField(_) => "missing_key",
            KeyError::InvalidFieldType { .. } => "invalid_key",
        }
    }
}

/// How events are wrapped in SQS message bodies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Envelope {
    /// The body is the event.
    #[default]
    Raw,
    /// SNS → SQS: a body that is an SNS Notification (`Type`, `Message`, `TopicArn`) is
    /// unwrapped to its `Message`; any other body is taken as is (raw message delivery).
    Sns,
    /// EventBridge → SQS: the event is the `detail` of the EventBridge envelope.
    Eventbridge,
}

/// An event's identity, derived from the body.
#[derive(Debug, Clone, PartialEq)]
pub struct EventIdentity {
    /// The idempotency key (at most [`MAX_KEY_BYTES`] bytes, no control characters).
    pub key: String,
    /// The event (the unwrapped body) as text.
    pub body: String,
    /// The event parsed as JSON, when it is JSON.
    pub json: Option<Value>,
    /// SHA-256 of the event text: the payload fingerprint.
    pub fingerprint: String,
}

/// SHA-256 of a text, hex: the payload fingerprint, and the key when there are no pointers.
pub fn body_sha256(body: &str) -> String {
    hex::encode(Sha256::digest(body.as_bytes()))
}

/// The key used when a body cannot yield one: its hash. A failed checkpoint is recorded under
/// it so an operator can still find the event.
pub fn fallback_key(body: &str) -> String {
    format!("sha256:{}", body_sha256(body))
}

/// Unwrap the event from a message body.
pub fn unwrap_envelope(envelope: Envelope, raw: &str) -> Result<(String, Option<Value>), KeyError> {
    match envelope {
        Envelope::Raw => Ok((raw.to_owned(), serde_json::from_str(raw).ok())),
        Envelope::Sns => {
            let outer = serde_json::from_str::<Value>(raw).ok();
            let message = outer.as_ref().and_then(|o| {
                let is_notification = o["Type"] == "Notification" && o["TopicArn"].is_string();
                is_notification
                    .then(|| o["Message"].as_str().map(str::to_owned))
                    .flatten()
            });
            match (message, outer) {
                (Some(message), _) => {
                    let json = serde_json::from_str(&message).ok();
                    Ok((message, json))
                }
                // Raw message delivery: SNS passed the message through unwrapped.
                (None, outer) => Ok((raw.to_owned(), outer)),
            }
        }
        Envelope::Eventbridge => {
            let outer = serde_json::from_str::<Value>(raw)
                .map_err(|e| KeyError::InvalidEnvelope(format!("EventBridge event: {e}")))?;
            match (outer.get("detail"), outer.get("detail-type")) {
                (Some(detail), Some(_)) => Ok((detail.to_string(), Some(detail.clone()))),
                _ => Err(KeyError::InvalidEnvelope(
                    "EventBridge event: it needs \"detail\" and \"detail-type\" fields".into(),
                )),
            }
        }
    }
}

/// Derive the event and its idempotency key from a message body.
pub fn derive_identity(
    spec: &KeySpec,
    envelope: Envelope,
    raw: &str,
) -> Result<EventIdentity, KeyError> {
    let (body, json) = unwrap_envelope(envelope, raw)?;
    let fingerprint = body_sha256(&body);
    if !spec.needs_json() {
        return Ok(EventIdentity {
            key: format!("sha256:{fingerprint}"),
            body,
            json,
            fingerprint,
        });
    }
    let Some(json) = json else {
        let error = serde_json::from_str::<Value>(&body)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        return Err(KeyError::InvalidJson(error));
    };
    let mut parts = Vec::with_capacity(spec.pointers.len());
    for pointer in &spec.pointers {
        let part = match json.pointer(pointer) {
            None | Some(Value::Null) => return Err(KeyError::MissingField(pointer.clone())),
            Some(Value::String(s)) if s.is_empty() => {
                return Err(KeyError::MissingField(pointer.clone()));
            }
            Some(Value::String(s)) => s.clone(),
            Some(Value::Number(n)) => n.to_string(),
            Some(Value::Bool(b)) => b.to_string(),
            Some(Value::Object(_)) => {
                return Err(KeyError::InvalidFieldType {
                    pointer: pointer.clone(),
                    found: "an object",
                });
            }
            Some(Value::Array(_)) => {
                return Err(KeyError::InvalidFieldType {
                    pointer: pointer.clone(),
                    found: "an array",
                });
            }
        };
        parts.push(escape_key_part(&part));
    }
    Ok(EventIdentity {
        key: bound_key_length(parts.join("|")),
        body,
        json: Some(json),
        fingerprint,
    })
}

/// Percent-encode `%`, the separator `|` and control characters, so that a composite key is
/// unambiguous (`a|b` + `c` never equals `a` + `b|c`) and PostgreSQL text can store it (no NUL).
fn escape_key_part(part: &str) -> String {
    let mut escaped = String::with_capacity(part.len());
    for ch in part.chars() {
        match ch {
            '%' | '|' => escaped.push_str(&format!("%{:02X}", ch as u32)),
            c if c.is_control() && (c as u32) < 0x100 => {
                escaped.push_str(&format!("%{:02X}", c as u32))
            }
            c => escaped.push(c),
        }
    }
    escaped
}

fn bound_key_length(key: String) -> String {
    if key.len() > MAX_KEY_BYTES {
        fallback_key(&key)
    } else {
        key
    }
}

/// The operator's redrive markers, read from message attributes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RedriveMarkers {
    /// The message came back from the DLQ through `redrive`.
    pub redriven: bool,
    /// How many times it has been redriven.
    pub redrive_count: u32,
    /// A failure on this delivery ends the message for good.
    pub final_pass: bool,
    /// Marker values that could not be read, for the log (the marker then counts as absent).
    pub problems: Vec<String>,
}

/// Read the redrive markers from `(name, string value)` pairs of message attributes.
///
/// Hostile or malformed values never fail the message: an unreadable marker is treated as
/// absent and reported in `problems`, so the worker can log it once.
pub fn parse_markers<'a>(
    attributes: impl IntoIterator<Item = (&'a str, Option<&'a str>)>,
) -> RedriveMarkers {
    let mut markers = RedriveMarkers::default();
    for (name, value) in attributes {
        let value = value.map(str::trim);
        match name {
            ATTR_DLQ_REDRIVEN => markers.redriven = parse_flag(name, value, &mut markers.problems),
            ATTR_DLQ_FINAL_PASS => {
                markers.final_pass = parse_flag(name, value, &mut markers.problems)
            }
            ATTR_REDRIVE_COUNT => match value.map(str::parse::<u32>) {
                Some(Ok(count)) => markers.redrive_count = count,
                _ => markers.problems.push(format!(
                    "{ATTR_REDRIVE_COUNT} is not a count from 0 to {}: {:?}",
                    u32::MAX,
                    truncate_for_log(value.unwrap_or(""), 40)
                )),
            },
            _ => {}
        }
    }
    markers
}

fn parse_flag(name: &str, value: Option<&str>, problems: &mut Vec<String>) -> bool {
    match value {
        Some(v) if v.eq_ignore_ascii_case("true") => true,
        Some(v) if v.eq_ignore_ascii_case("false") => false,
        other => {
            problems.push(format!(
                "{name} is not \"true\" or \"false\": {:?}",
                truncate_for_log(other.unwrap_or(""), 40)
            ));
            false
        }
    }
}

/// Cut a string to at most `max_chars` characters for a log line or an attribute.
pub fn truncate_for_log(text: &str, max_chars: usize) -> String {
    match text.char_indices().nth(max_chars) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        assert_eq!(id.body, inner);
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
            let error =
                derive_identity(&spec(&["/order_id"]), Envelope::Eventbridge, bad).unwrap_err();
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
}
