//! Payload fingerprints: the hash that tells a duplicate from a key reused with other
//! content, and the per-field digests that say which fields differ.

use serde_json::Value;

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
pub(super) fn field_digest_text<'a>(fields: impl Iterator<Item = (String, &'a Value)>) -> String {
    let map: serde_json::Map<String, Value> = fields
        .map(|(pointer, value)| {
            let mut text = String::new();
            write_canonical_json(&mut text, value);
            (pointer, Value::String(body_sha256(&text)[..16].to_owned()))
        })
        .collect();
    Value::Object(map).to_string()
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

/// RFC 6901: `~` becomes `~0` and `/` becomes `~1` inside a pointer token.
pub(super) fn escape_pointer_token(name: &str) -> String {
    name.replace('~', "~0").replace('/', "~1")
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
