//! Fitting a message SQS must accept: at most 10 attributes, XML-safe text, the queue's
//! `MaximumMessageSize`.

use std::borrow::Cow;
use std::collections::HashMap;

use aws_sdk_sqs::types::MessageAttributeValue;

use super::types::{MAX_MESSAGE_ATTRIBUTES, string_attribute};

/// Attributes for a message made from another: every `required` one, then as many of
/// `original`'s others as SQS's limit of 10 allows — lowest `rank` first, then by name.
/// Names that are required or in `omit` are not copied; each one that does not fit is logged.
pub fn fit_attributes(
    required: Vec<(&str, MessageAttributeValue)>,
    original: &HashMap<String, MessageAttributeValue>,
    omit: &[&str],
    rank: impl Fn(&str) -> u8,
) -> HashMap<String, MessageAttributeValue> {
    let mut attributes: HashMap<String, MessageAttributeValue> = required
        .into_iter()
        .map(|(name, value)| (name.to_owned(), value))
        .collect();
    let mut rest: Vec<&String> = original
        .keys()
        .filter(|n| !attributes.contains_key(n.as_str()) && !omit.contains(&n.as_str()))
        .collect();
    rest.sort_by(|a, b| (rank(a), a).cmp(&(rank(b), b)));
    for name in rest {
        if attributes.len() >= MAX_MESSAGE_ATTRIBUTES {
            tracing::warn!(attribute = %name, "dropping a message attribute: SQS allows 10 per message");
            continue;
        }
        attributes.insert(name.clone(), original[name].clone());
    }
    attributes
}

/// Text as a message attribute value may hold it: SQS accepts only XML 1.0 characters
/// (#x9, #xA, #xD, #x20–#xD7FF, #xE000–#xFFFD, #x10000–#x10FFFF) and refuses the whole
/// message otherwise. Every other character becomes U+FFFD.
pub fn xml_safe(text: &str) -> Cow<'_, str> {
    fn allowed(c: char) -> bool {
        matches!(c, '\u{9}' | '\u{A}' | '\u{D}' | '\u{20}'..='\u{D7FF}' | '\u{E000}'..='\u{FFFD}')
            || c >= '\u{10000}'
    }
    if text.chars().all(allowed) {
        Cow::Borrowed(text)
    } else {
        Cow::Owned(
            text.chars()
                .map(|c| if allowed(c) { c } else { '\u{FFFD}' })
                .collect(),
        )
    }
}

/// The bytes one attribute counts towards a message's size: SQS (and LocalStack) add up the
/// name, the data type and the value.
pub fn attribute_bytes(name: &str, value: &MessageAttributeValue) -> usize {
    name.len()
        + value.data_type().len()
        + value.string_value().map_or(0, str::len)
        + value.binary_value().map_or(0, |b| b.as_ref().len())
}

/// A message's size as SQS measures it against MaximumMessageSize: body plus attributes.
pub fn message_bytes(body: &str, attributes: &HashMap<String, MessageAttributeValue>) -> usize {
    body.len()
        + attributes
            .iter()
            .map(|(name, value)| attribute_bytes(name, value))
            .sum::<usize>()
}

/// Make a message derived from another (a DLQ copy) fit `max_bytes`, body and attributes
/// together; the body is never changed. Until it fits: shorten the String value of
/// `shrinkable` (to no less than `…`), drop the attributes not in `keep` (the largest
/// first), drop `shrinkable`, then drop `keep` from its end (most important first in it).
/// Returns the names of the attributes dropped, for the caller's one log line.
pub fn fit_message_size(
    body: &str,
    attributes: &mut HashMap<String, MessageAttributeValue>,
    max_bytes: usize,
    shrinkable: &str,
    keep: &[&str],
) -> Vec<String> {
    let excess = |attributes: &HashMap<String, MessageAttributeValue>| {
        message_bytes(body, attributes).saturating_sub(max_bytes)
    };
    let mut dropped = Vec::new();
    if excess(attributes) == 0 {
        return dropped;
    }
    if let Some(text) = attributes.get(shrinkable).and_then(|v| v.string_value()) {
        let target = text.len().saturating_sub(excess(attributes));
        let shortened = shorten_to_bytes(text, target);
        attributes.insert(shrinkable.to_owned(), string_attribute(shortened));
    }
    let mut optional: Vec<(usize, String)> = attributes
        .iter()
        .filter(|(name, _)| name.as_str() != shrinkable && !keep.contains(&name.as_str()))
        .map(|(name, value)| (attribute_bytes(name, value), name.clone()))
        .collect();
    // Largest first (fewest attributes lost); the name makes the order stable.
    optional.sort_by(|a, b| b.cmp(a));
    let last_resort = std::iter::once(shrinkable).chain(keep.iter().rev().copied());
    let order = optional
        .into_iter()
        .map(|(_, name)| name)
        .chain(last_resort.map(str::to_owned));
    for name in order {
        if excess(attributes) == 0 {
            break;
        }
        if attributes.remove(&name).is_some() {
            dropped.push(name);
        }
    }
    dropped
}

/// `text` cut at a character boundary to at most `max_bytes` bytes, `…` included; never
/// shorter than `…` itself (SQS refuses an empty String attribute).
pub(super) fn shorten_to_bytes(text: &str, max_bytes: usize) -> String {
    const ELLIPSIS: &str = "…";
    if text.len() <= max_bytes {
        return text.to_owned();
    }
    let mut cut = max_bytes.saturating_sub(ELLIPSIS.len()).min(text.len());
    while !text.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{}{ELLIPSIS}", &text[..cut])
}
