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
/// Message attribute set by `dead-letters requeue`: which deliberate requeue of the event
/// this is (1, 2, …). A requeue is a new pass even though its redrive count starts at 0 again.
pub const ATTR_REQUEUE_GENERATION: &str = "requeue_generation";
/// The redrive markers, most important first.
pub const REDRIVE_MARKERS: [&str; 4] = [
    ATTR_REDRIVE_COUNT,
    ATTR_REQUEUE_GENERATION,
    ATTR_DLQ_FINAL_PASS,
    ATTR_DLQ_REDRIVEN,
];
/// What a message derived from another (a DLQ copy, a redriven message) keeps longest when
/// it must shrink to fit a size limit, most important first: the redrive markers (a lost
/// `redrive_count` would let `redrive` loop past `--max-redrives`), then the failure reason.
pub const KEEP_LONGEST: [&str; 5] = [
    ATTR_REDRIVE_COUNT,
    ATTR_REQUEUE_GENERATION,
    ATTR_DLQ_FINAL_PASS,
    ATTR_DLQ_REDRIVEN,
    ATTR_FAILURE_REASON,
];
/// Message attribute the worker adds when it sends a message to the DLQ: a reason code.
pub const ATTR_FAILURE_REASON: &str = "sqs_worker_failure_reason";
/// Message attribute the worker adds when it sends a message to the DLQ: the error text.
pub const ATTR_FAILURE_DETAIL: &str = "sqs_worker_failure_detail";

/// Where in the body the idempotency key lives.
///
/// No pointers means "the whole body is the event": the key is the SHA-256 of the body, which
/// still recognises byte-identical duplicates.
///
/// It also says what the payload fingerprint covers: the whole event by default, or only
/// the fields named with [`KeySpec::with_fingerprint`] (so that a re-sent event whose
/// envelope differs only in a volatile field such as `sent_at` is still a duplicate).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeySpec {
    pointers: Vec<String>,
    fingerprint: Vec<String>,
}

impl KeySpec {
    /// Validate RFC 6901 JSON pointers such as `/order_id` or `/detail/id`.
    pub fn new(pointers: Vec<String>) -> Result<Self, String> {
        check_pointers("key", "--key", &pointers)?;
        Ok(Self {
            pointers,
            fingerprint: Vec::new(),
        })
    }

    /// Fingerprint only these fields (JSON pointers into the event) instead of the whole
    /// event. An empty list means the whole event.
    pub fn with_fingerprint(mut self, pointers: Vec<String>) -> Result<Self, String> {
        check_pointers("fingerprint", "--fingerprint", &pointers)?;
        self.fingerprint = pointers;
        Ok(self)
    }

    /// The pointers, in the order they make up a composite key.
    pub fn pointers(&self) -> &[String] {
        &self.pointers
    }

    /// The fingerprinted fields; empty when the whole event is fingerprinted.
    pub fn fingerprint_pointers(&self) -> &[String] {
        &self.fingerprint
    }

    /// True when the key is read from the JSON body (so the body must be JSON).
    pub fn needs_json(&self) -> bool {
        !self.pointers.is_empty()
    }
}

fn check_pointers(what: &str, flag: &str, pointers: &[String]) -> Result<(), String> {
    for pointer in pointers {
        if !pointer.starts_with('/') {
            return Err(format!(
                "{what} pointer {pointer:?} is not a JSON pointer: it must start with '/', e.g. \
                 {flag} /order_id"
            ));
        }
    }
    Ok(())
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
    #[error("key field {pointer} holds {found}; a key must be a string, integer or boolean")]
    InvalidFieldType {
        /// The pointer that was followed.
        pointer: String,
        /// What was found there.
        found: &'static str,
    },
    /// The pointer resolves to a number that is not an exact 64-bit integer. Such numbers
    /// are read as floating point, so two different ids could round to the same key and one
    /// event would be skipped as a duplicate of the other.
    #[error(
        "key field {pointer} holds {found}; a numeric key must be an integer from -2^63 to \
         2^64-1 written without fraction or exponent (send larger or fractional ids as strings)"
    )]
    InexactNumber {
        /// The pointer that was followed.
        pointer: String,
        /// What kind of number was found there.
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
            KeyError::InvalidFieldType { .. } | KeyError::InexactNumber { .. } => "invalid_key",
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
    /// The payload fingerprint: SHA-256 of the event text, or with fingerprint pointers
    /// `fields:` and the SHA-256 of the chosen fields' values.
    pub fingerprint: String,
    /// Short digests of the fingerprinted fields (`{"/pointer": "digest"}` as JSON text), so
    /// that a mismatch can name the fields that differ; `None` when the event is not a JSON
    /// object (or has too many fields to list).
    pub field_digests: Option<String>,
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
    let body_hash = body_sha256(&body);
    let (fingerprint, field_digests) = fingerprint(spec, &body_hash, json.as_ref());
    if !spec.needs_json() {
        return Ok(EventIdentity {
            key: format!("sha256:{body_hash}"),
            body,
            json,
            fingerprint,
            field_digests,
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
            Some(Value::Number(n)) => integer_key(n).ok_or_else(|| KeyError::InexactNumber {
                pointer: pointer.clone(),
                found: inexact_number_kind(n),
            })?,
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
        field_digests,
    })
}

/// Most top-level fields listed in [`EventIdentity::field_digests`] for a whole-event
/// fingerprint; larger events are fingerprinted whole but not listed.
const MAX_LISTED_FIELDS: usize = 64;

/// The payload fingerprint and the digests of its fields. With fingerprint pointers, only
/// those fields count (a missing one counts as null); an event that is not JSON then falls
/// back to the whole text, as there are no fields to choose from.
fn fingerprint(spec: &KeySpec, body_hash: &str, json: Option<&Value>) -> (String, Option<String>) {
    let Some(json) = json else {
        return (body_hash.to_owned(), None);
    };
    if spec.fingerprint.is_empty() {
        let digests = json
            .as_object()
            .filter(|o| o.len() <= MAX_LISTED_FIELDS)
            .map(|object| {
                let fields = object
                    .iter()
                    .map(|(name, value)| (format!("/{}", escape_pointer_token(name)), value));
                field_digest_text(fields)
            });
        return (body_hash.to_owned(), digests);
    }
    let chosen: Vec<(String, &Value)> = spec
        .fingerprint
        .iter()
        .map(|pointer| {
            (
                pointer.clone(),
                json.pointer(pointer).unwrap_or(&Value::Null),
            )
        })
        .collect();
    let mut text = String::from("[");
    for (i, (_, value)) in chosen.iter().enumerate() {
        if i > 0 {
            text.push(',');
        }
        write_canonical_json(&mut text, value);
    }
    text.push(']');
    (
        format!("fields:{}", body_sha256(&text)),
        Some(field_digest_text(chosen.into_iter())),
    )
}

/// `{"/pointer": "<16 hex digits of SHA-256>"}`: enough to tell which fields changed.
fn field_digest_text<'a>(fields: impl Iterator<Item = (String, &'a Value)>) -> String {
    let map: serde_json::Map<String, Value> = fields
        .map(|(pointer, value)| {
            let mut text = String::new();
            write_canonical_json(&mut text, value);
            (pointer, Value::String(body_sha256(&text)[..16].to_owned()))
        })
        .collect();
    Value::Object(map).to_string()
}

/// The fields whose digests differ between two [`EventIdentity::field_digests`] texts (a
/// field present in only one of them differs too), in pointer order. `None` when either
/// side has no digests to compare.
pub fn differing_fields(stored: Option<&str>, arrived: Option<&str>) -> Option<Vec<String>> {
    let parse = |text: Option<&str>| -> Option<serde_json::Map<String, Value>> {
        serde_json::from_str::<Value>(text?)
            .ok()?
            .as_object()
            .cloned()
    };
    let (stored, arrived) = (parse(stored)?, parse(arrived)?);
    let mut names: Vec<&String> = stored.keys().chain(arrived.keys()).collect();
    names.sort();
    names.dedup();
    Some(
        names
            .into_iter()
            .filter(|name| stored.get(*name) != arrived.get(*name))
            .cloned()
            .collect(),
    )
}

/// RFC 6901: `~` becomes `~0` and `/` becomes `~1` inside a pointer token.
fn escape_pointer_token(name: &str) -> String {
    name.replace('~', "~0").replace('/', "~1")
}

/// JSON text with object keys sorted at every level, whatever map type serde_json was built
/// with: equal values always give equal text, so fingerprints never depend on key order.
fn write_canonical_json(out: &mut String, value: &Value) {
    match value {
        Value::Object(object) => {
            let mut entries: Vec<(&String, &Value)> = object.iter().collect();
            entries.sort_by(|a, b| a.0.cmp(b.0));
            out.push('{');
            for (i, (name, value)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&Value::String(name.clone()).to_string());
                out.push(':');
                write_canonical_json(out, value);
            }
            out.push('}');
        }
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_canonical_json(out, item);
            }
            out.push(']');
        }
        scalar => out.push_str(&scalar.to_string()),
    }
}

/// The key text of a JSON number that serde_json holds exactly as an `i64` or `u64`: its
/// decimal digits, so `42` and `"42"` are the same key (as are `true` and `"true"`). Any
/// other number is an `f64`, which cannot tell 12345678901234567890123 from
/// 12345678901234567890124: it is refused rather than risk two events sharing a key.
fn integer_key(n: &serde_json::Number) -> Option<String> {
    n.as_i64()
        .map(|i| i.to_string())
        .or_else(|| n.as_u64().map(|u| u.to_string()))
}

/// Why a number is not an exact integer, for the error text (the number itself is not
/// repeated: it is part of the body).
fn inexact_number_kind(n: &serde_json::Number) -> &'static str {
    let value = n.as_f64().unwrap_or(f64::NAN);
    if value.fract() != 0.0 {
        "a fractional number"
    } else if value <= -(2f64.powi(63)) || value >= 2f64.powi(64) {
        // -2^63 itself is an i64, so an f64 there was rounded from beyond it.
        "an integer outside the 64-bit range, which can only be read rounded"
    } else {
        "a number written with a fraction, an exponent or as -0"
    }
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
    /// Which deliberate requeue (`dead-letters requeue`) this is; 0 if never requeued.
    pub requeue_generation: u32,
    /// Marker values that could not be read, for the log (the marker then counts as absent).
    pub problems: Vec<String>,
}

impl RedriveMarkers {
    /// The pass this delivery belongs to.
    pub fn pass(&self) -> Pass {
        Pass {
            requeue_generation: self.requeue_generation,
            redrive_count: self.redrive_count,
        }
    }
}

/// Which pass over an event a delivery belongs to: the first delivery and its duplicates
/// are pass (0, 0); each redrive raises the redrive count, each deliberate requeue the
/// generation (and starts its redrive count again at 0). Passes order by generation, then
/// redrive count. A failed event is tried again only by a later pass, so duplicates of one
/// redrive never run a handler that already failed on it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Pass {
    /// Deliberate requeues so far.
    pub requeue_generation: u32,
    /// Redrives since the latest requeue.
    pub redrive_count: u32,
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
            ATTR_REDRIVE_COUNT => {
                if let Some(count) = parse_count(name, value, &mut markers.problems) {
                    markers.redrive_count = count;
                }
            }
            ATTR_REQUEUE_GENERATION => {
                if let Some(generation) = parse_count(name, value, &mut markers.problems) {
                    markers.requeue_generation = generation;
                }
            }
            _ => {}
        }
    }
    markers
}

fn parse_count(name: &str, value: Option<&str>, problems: &mut Vec<String>) -> Option<u32> {
    match value.map(str::parse::<u32>) {
        Some(Ok(count)) => Some(count),
        None => {
            problems.push(format!("{name} is not a String or Number attribute"));
            None
        }
        Some(Err(_)) => {
            problems.push(format!(
                "{name} is not a count from 0 to {}: {:?}",
                u32::MAX,
                truncate_for_log(value.unwrap_or(""), 40)
            ));
            None
        }
    }
}

fn parse_flag(name: &str, value: Option<&str>, problems: &mut Vec<String>) -> bool {
    match value {
        Some(v) if v.eq_ignore_ascii_case("true") => true,
        Some(v) if v.eq_ignore_ascii_case("false") => false,
        Some(other) => {
            problems.push(format!(
                "{name} is not \"true\" or \"false\": {:?}",
                truncate_for_log(other, 40)
            ));
            false
        }
        None => {
            problems.push(format!("{name} is not a String attribute"));
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
        let first = derive_identity_raw(&s, r#"{"id":"a","amount":5,"sent_at":"10:00"}"#).unwrap();
        let again = derive_identity_raw(&s, r#"{"id":"a","amount":5,"sent_at":"10:05"}"#).unwrap();
        assert_ne!(first.fingerprint, again.fingerprint);
        assert_eq!(first.fingerprint, body_sha256(&first.body));
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
}
