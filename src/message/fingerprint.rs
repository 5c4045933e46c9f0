//! Payload fingerprints: the hash that tells a duplicate from a key reused with other
//! content, and the per-field digests that say which fields differ.

use std::fmt::Write;

use serde_json::Value;
use sha2::{Digest, Sha256};

use super::keys::{KeySpec, body_sha256};

/// Most top-level fields listed in [`EventIdentity::field_digests`](super::EventIdentity::field_digests) for a whole-event
/// fingerprint; larger events are fingerprinted whole but not listed.
pub(super) const MAX_LISTED_FIELDS: usize = 64;

/// The payload fingerprint and the digests of its fields. With fingerprint pointers, only
/// those fields count (a missing one counts as null); an event that is not JSON then falls
/// back to the whole text, as there are no fields to choose from.
pub(super) fn fingerprint(
    spec: &KeySpec,
    body_hash: &str,
    json: Option<&Value>,
) -> (String, Option<String>) {
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
                    .map(|(name, value)| (escape_pointer_token(name), value));
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
        Some(field_digest_text(
            chosen
                .into_iter()
                .map(|(pointer, value)| (Pointer(pointer), value)),
        )),
    )
}

/// A JSON pointer to a field: given whole, or as a top-level field's escaped name (the
/// leading `/` is added when the pointer is written, which saves building it per field).
pub(super) enum PointerText {
    Whole(String),
    TopLevel(String),
}
use PointerText::Whole as Pointer;

impl PointerText {
    fn write_json(&self, out: &mut String) {
        match self {
            PointerText::Whole(pointer) => write_json_string(out, pointer),
            // JSON leaves `/` unescaped: the literal is `"/` and the escaped name.
            PointerText::TopLevel(name) => {
                out.push_str("\"/");
                let quoted = serde_json::to_string(name).expect("a string serializes");
                out.push_str(&quoted[1..]);
            }
        }
    }

    fn sort_key(&self) -> (&str, &str) {
        match self {
            PointerText::Whole(pointer) => (pointer.as_str(), ""),
            PointerText::TopLevel(name) => ("/", name.as_str()),
        }
    }
}

/// `{"/pointer": "<16 hex digits of SHA-256>"}`: enough to tell which fields changed. Written
/// straight into one string, in pointer order (as a `serde_json::Map` of them serializes):
/// this runs for every message, and built as JSON values it cost some 30 allocations each.
pub(super) fn field_digest_text<'a>(
    fields: impl Iterator<Item = (PointerText, &'a Value)>,
) -> String {
    let mut fields: Vec<(PointerText, &Value)> = fields.collect();
    fields.sort_by(|a, b| a.0.sort_key().cmp(&b.0.sort_key()));
    // A pointer named twice (`--fingerprint /a --fingerprint /a`) is one field.
    fields.dedup_by(|a, b| a.0.sort_key() == b.0.sort_key());
    let mut out = String::with_capacity(2 + fields.len() * 32);
    let mut canonical = String::new();
    out.push('{');
    for (i, (pointer, value)) in fields.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        pointer.write_json(&mut out);
        canonical.clear();
        write_canonical_json(&mut canonical, value);
        let digest = Sha256::digest(canonical.as_bytes());
        out.push_str(":\"");
        for byte in &digest[..8] {
            out.push(HEX[usize::from(byte >> 4)] as char);
            out.push(HEX[usize::from(byte & 0xf)] as char);
        }
        out.push('"');
    }
    out.push('}');
    out
}

/// The fields whose digests differ between two [`EventIdentity::field_digests`](super::EventIdentity::field_digests) texts (a
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

/// RFC 6901: `~` becomes `~0` and `/` becomes `~1` inside a pointer token (as a top-level
/// field's pointer).
pub(super) fn escape_pointer_token(name: &str) -> PointerText {
    if name.contains(['~', '/']) {
        PointerText::TopLevel(name.replace('~', "~0").replace('/', "~1"))
    } else {
        PointerText::TopLevel(name.to_owned())
    }
}

const HEX: &[u8; 16] = b"0123456789abcdef";

/// `text` as a JSON string literal, escaped as serde_json escapes it.
fn write_json_string(out: &mut String, text: &str) {
    out.push_str(&serde_json::to_string(text).expect("a string serializes"));
}

/// JSON text with object keys sorted at every level, whatever map type serde_json was built
/// with: equal values always give equal text, so fingerprints never depend on key order.
pub(super) fn write_canonical_json(out: &mut String, value: &Value) {
    match value {
        Value::Object(object) => {
            let mut entries: Vec<(&String, &Value)> = object.iter().collect();
            entries.sort_by(|a, b| a.0.cmp(b.0));
            out.push('{');
            for (i, (name, value)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_json_string(out, name);
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
        // Display writes the scalar's JSON straight into `out`.
        scalar => write!(out, "{scalar}").expect("writing to a String cannot fail"),
    }
}
