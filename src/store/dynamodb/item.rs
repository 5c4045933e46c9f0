//! Items as the DynamoDB store writes them: the keys, attribute names, and conversions
//! between attribute values and the contract's types.
//!
//! One table holds every kind of item, each under its own partition key: a checkpoint per
//! event (`C#{scope}#{key}`, the scope's `%` and `#` escaped so two scopes never share a
//! key), a dead letter per message (`DL#{id}`), an audit item per redrive run (`RD#{id}`)
//! and an item per operator action (`OA#{id}`). Dead letters, redrive audits and operator
//! actions also carry `list_pk`/`list_sk` (their kind, their id), the keys of the `listing`
//! index: newest first per kind, which is how operators read them.

use std::collections::HashMap;

use aws_sdk_dynamodb::types::AttributeValue;
use serde_json::Value;

use crate::store::epoch::time;
use crate::store::{Checkpoint, DeadLetter, OperatorAction, RedriveCounts, RedriveRun};

/// An item: attribute name → value.
pub(super) type Item = HashMap<String, AttributeValue>;

/// The table's partition key attribute.
pub(super) const PK: &str = "pk";
/// The `listing` index: partition and sort key.
pub(super) const LISTING: &str = "listing";
pub(super) const LIST_PK: &str = "list_pk";
pub(super) const LIST_SK: &str = "list_sk";
/// The TTL attribute (epoch seconds): completed checkpoints expire after the retention.
pub(super) const TTL: &str = "expires_at";
/// `list_pk` of every dead letter.
pub(super) const DEAD_LETTERS: &str = "dead_letters";
/// `list_pk` of every redrive audit item.
pub(super) const REDRIVES: &str = "redrives";
/// `list_pk` of every operator action.
pub(super) const OPERATOR_ACTIONS: &str = "operator_actions";

/// The partition key of the checkpoint of `key` in `scope`.
pub(super) fn checkpoint_pk(scope: &str, key: &str) -> String {
    format!("C#{}#{key}", scope.replace('%', "%25").replace('#', "%23"))
}

/// The partition key of dead letter `id`.
pub(super) fn dead_letter_pk(id: i64) -> String {
    format!("DL#{id}")
}

/// The partition key of redrive audit `id`.
pub(super) fn redrive_pk(id: i64) -> String {
    format!("RD#{id}")
}

/// The partition key of operator action `id`.
pub(super) fn operator_action_pk(id: i64) -> String {
    format!("OA#{id}")
}

pub(super) fn s(value: impl Into<String>) -> AttributeValue {
    AttributeValue::S(value.into())
}

pub(super) fn n(value: i64) -> AttributeValue {
    AttributeValue::N(value.to_string())
}

pub(super) fn get_s(item: &Item, name: &str) -> Option<String> {
    item.get(name)?.as_s().ok().cloned()
}

pub(super) fn get_n(item: &Item, name: &str) -> Option<i64> {
    item.get(name)?.as_n().ok()?.parse().ok()
}

/// A step as stored: `{name, output (JSON text), completed_at}`.
pub(super) fn step_value(name: &str, output: &Value, completed_at: &str) -> AttributeValue {
    AttributeValue::M(HashMap::from([
        ("name".to_owned(), s(name)),
        ("output".to_owned(), s(output.to_string())),
        ("completed_at".to_owned(), s(completed_at)),
    ]))
}

/// The stored steps as the contract's JSON: `[{"name", "output", "completed_at"}]`.
pub(super) fn steps_json(item: &Item) -> Value {
    let steps = item.get("steps").and_then(|v| v.as_l().ok());
    let steps = steps.map(|list| {
        list.iter()
            .filter_map(|step| step.as_m().ok())
            .map(|step| {
                let text = |name: &str| step.get(name).and_then(|v| v.as_s().ok()).cloned();
                let output = text("output")
                    .and_then(|o| serde_json::from_str(&o).ok())
                    .unwrap_or(Value::Null);
                serde_json::json!({
                    "name": text("name").unwrap_or_default(),
                    "output": output,
                    "completed_at": text("completed_at"),
                })
            })
            .collect()
    });
    Value::Array(steps.unwrap_or_default())
}

/// A checkpoint item as operators see it.
pub(super) fn checkpoint(item: &Item) -> Checkpoint {
    let text = |name: &str| get_s(item, name).unwrap_or_default();
    let number = |name: &str| get_n(item, name).unwrap_or_default();
    Checkpoint {
        scope: text("scope"),
        idempotency_key: text("key"),
        status: text("status"),
        steps: steps_json(item),
        lease_owner: get_s(item, "lease_owner"),
        lease_expires_at: get_n(item, "lease_expires_at").map(time),
        attempts: number("attempts") as i32,
        payload_sha256: text("payload_sha256"),
        first_message_id: text("first_message_id"),
        last_message_id: text("last_message_id"),
        last_error: get_s(item, "last_error"),
        requeue_generation: number("requeue_generation") as i32,
        redrive_count: number("redrive_count") as i32,
        payload_fields: get_s(item, "payload_fields"),
        created_at: time(number("created_at")),
        updated_at: time(number("updated_at")),
        completed_at: get_n(item, "completed_at").map(time),
    }
}

/// A dead letter item as operators see it.
pub(super) fn dead_letter(item: &Item) -> DeadLetter {
    let text = |name: &str| get_s(item, name).unwrap_or_default();
    let number = |name: &str| get_n(item, name).unwrap_or_default();
    DeadLetter {
        id: number("id"),
        scope: text("scope"),
        idempotency_key: text("key"),
        queue_url: text("queue_url"),
        message_id: text("message_id"),
        body: text("body"),
        attributes: serde_json::from_str(&text("attributes")).unwrap_or(Value::Null),
        reason: text("reason"),
        error: text("error"),
        attempts: number("attempts") as i32,
        redrive_count: number("redrive_count") as i32,
        created_at: time(number("created_at")),
        requeued_at: get_n(item, "requeued_at").map(time),
    }
}

/// A redrive audit item as operators see it (counts zero until the run finished).
pub(super) fn redrive_run(item: &Item) -> RedriveRun {
    let text = |name: &str| get_s(item, name).unwrap_or_default();
    let number = |name: &str| get_n(item, name).unwrap_or_default();
    let count = |name: &str| number(name).max(0) as u64;
    RedriveRun {
        id: number("id"),
        operator: text("operator"),
        dlq_url: text("dlq_url"),
        target_url: text("target_url"),
        max_redrives: number("max_redrives").clamp(i32::MIN.into(), i32::MAX.into()) as i32,
        dry_run: item
            .get("dry_run")
            .and_then(|v| v.as_bool().ok())
            .copied()
            .unwrap_or_default(),
        counts: RedriveCounts {
            redriven: count("redriven"),
            skipped_complete: count("skipped_complete"),
            exhausted: count("exhausted"),
            failed: count("failed"),
        },
        started_at: time(number("started_at")),
        finished_at: get_n(item, "finished_at").map(time),
    }
}

/// An operator action item as operators see it.
pub(super) fn operator_action(item: &Item) -> OperatorAction {
    let text = |name: &str| get_s(item, name).unwrap_or_default();
    OperatorAction {
        id: get_n(item, "id").unwrap_or_default(),
        recorded_at: time(get_n(item, "recorded_at").unwrap_or_default()),
        operator: text("operator"),
        action: text("action"),
        queue_url: text("queue_url"),
        message_id: text("message_id"),
        key: get_s(item, "key"),
        before_sha256: get_s(item, "before_sha256"),
        after_sha256: get_s(item, "after_sha256"),
        detail: text("detail"),
    }
}

/// Names and values of one expression, built as it is written. DynamoDB refuses a name or
/// value the expressions do not use, so each is bound only where it is used.
#[derive(Default)]
pub(super) struct Values {
    pub(super) names: HashMap<String, String>,
    pub(super) values: Item,
}

impl Values {
    /// Bind `value` as `:name`.
    pub(super) fn set(mut self, name: &str, value: AttributeValue) -> Self {
        self.values.insert(format!(":{name}"), value);
        self
    }

    /// Name attribute `name` `#name` (for reserved words: status, key, steps…).
    pub(super) fn name(mut self, name: &str) -> Self {
        self.names.insert(format!("#{name}"), name.to_owned());
        self
    }
}
