//! An event's identity: its idempotency key from JSON pointers (or the body's hash), the
//! envelope around it, and why a message has none.

use super::fingerprint::fingerprint;
use serde_json::Value;
use sha2::{Digest, Sha256};

/// Keys longer than this many bytes are stored as `sha256:<hex>` of the key.
pub const MAX_KEY_BYTES: usize = 255;

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
    pub(super) pointers: Vec<String>,
    pub(super) fingerprint: Vec<String>,
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

pub(super) fn check_pointers(what: &str, flag: &str, pointers: &[String]) -> Result<(), String> {
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
    /// The event as text when an envelope was unwrapped to get it; `None` when the body
    /// itself is the event (see [`EventIdentity::event`]), which saves a copy of every body.
    pub unwrapped: Option<String>,
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

impl EventIdentity {
    /// The event as text: the unwrapped event, or `raw` (the message body it came from).
    pub fn event<'a>(&'a self, raw: &'a str) -> &'a str {
        self.unwrapped.as_deref().unwrap_or(raw)
    }
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

/// Unwrap the event from a message body: its text (`None` when the body itself is the
/// event) and its JSON, when it is JSON.
pub fn unwrap_envelope(
    envelope: Envelope,
    raw: &str,
) -> Result<(Option<String>, Option<Value>), KeyError> {
    match envelope {
        Envelope::Raw => Ok((None, serde_json::from_str(raw).ok())),
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
                    Ok((Some(message), json))
                }
                // Raw message delivery: SNS passed the message through unwrapped.
                (None, outer) => Ok((None, outer)),
            }
        }
        Envelope::Eventbridge => {
            let outer = serde_json::from_str::<Value>(raw)
                .map_err(|e| KeyError::InvalidEnvelope(format!("EventBridge event: {e}")))?;
            match (outer.get("detail"), outer.get("detail-type")) {
                (Some(detail), Some(_)) => Ok((Some(detail.to_string()), Some(detail.clone()))),
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
    let (unwrapped, json) = unwrap_envelope(envelope, raw)?;
    let body = unwrapped.as_deref().unwrap_or(raw);
    let body_hash = body_sha256(body);
    let (fingerprint, field_digests) = fingerprint(spec, &body_hash, json.as_ref());
    if !spec.needs_json() {
        return Ok(EventIdentity {
            key: format!("sha256:{body_hash}"),
            unwrapped,
            json,
            fingerprint,
            field_digests,
        });
    }
    let Some(json) = json else {
        let error = serde_json::from_str::<Value>(body)
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
        unwrapped,
        json: Some(json),
        fingerprint,
        field_digests,
    })
}

/// The key text of a JSON number that serde_json holds exactly as an `i64` or `u64`: its
/// decimal digits, so `42` and `"42"` are the same key (as are `true` and `"true"`). Any
/// other number is an `f64`, which cannot tell 12345678901234567890123 from
/// 12345678901234567890124: it is refused rather than risk two events sharing a key.
pub(super) fn integer_key(n: &serde_json::Number) -> Option<String> {
    n.as_i64()
        .map(|i| i.to_string())
        .or_else(|| n.as_u64().map(|u| u.to_string()))
}

/// Why a number is not an exact integer, for the error text (the number itself is not
/// repeated: it is part of the body).
pub(super) fn inexact_number_kind(n: &serde_json::Number) -> &'static str {
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
pub(super) fn escape_key_part(part: &str) -> String {
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

pub(super) fn bound_key_length(key: String) -> String {
    if key.len() > MAX_KEY_BYTES {
        fallback_key(&key)
    } else {
        key
    }
}
