//! Steps in DynamoDB: appended with `list_append`, only at their index and under the lease;
//! and the step transaction — the handler's own items and the step's record in one
//! `TransactWriteItems` ([`crate::Job::step_tx_dynamodb`]).

use async_trait::async_trait;
use aws_sdk_dynamodb::operation::transact_write_items::TransactWriteItemsError;
use aws_sdk_dynamodb::types::{AttributeValue, TransactWriteItem, Update};
use futures_util::future::join_all;
use serde_json::Value;

use super::item::{Values, checkpoint_pk, n, s, step_value};
use super::{DynamoStore, rfc3339};
use crate::store::{Lease, NewStep, StepRecord, Steps, StoreError, Written};

/// What DynamoDB says when an item would pass its 400 KB limit ("Item size has exceeded…"
/// for a put, "Item size to update has exceeded…" for an update).
const ITEM_TOO_LARGE: &str = "exceeded the maximum allowed size";

#[async_trait]
impl Steps for DynamoStore {
    /// One conditional `UpdateItem` per record, all at once: DynamoDB has no batch form of
    /// a conditional update (a transaction would fail every record for one lost lease).
    async fn record_steps(
        &self,
        scope: &str,
        records: &[StepRecord],
    ) -> Result<Vec<Written>, StoreError> {
        join_all(
            records
                .iter()
                .map(|r| self.append_step(scope, &r.key, &r.token, &r.step, None)),
        )
        .await
        .into_iter()
        .collect()
    }
}

impl DynamoStore {
    /// Append `step` to the checkpoint of `key` if `token` holds its lease and the step is
    /// next — and, with `completion`, complete the event by the same write (the extra `SET`
    /// clauses and values). [`Written::TooLarge`] when the step would pass the item limit.
    pub(super) async fn append_step(
        &self,
        scope: &str,
        key: &str,
        token: &str,
        step: &NewStep,
        completion: Option<(&str, Values)>,
    ) -> Result<Written, StoreError> {
        let now = self.now();
        let (also_set, values) = completion.unwrap_or(("", Values::default()));
        let values = values
            .name("status")
            .name("steps")
            .set("token", s(token))
            .set("in_progress", s("in_progress"))
            .set("index", n(step.index as i64))
            .set(
                "step",
                AttributeValue::L(vec![step_value(&step.name, &step.output, &rfc3339(now))]),
            )
            .set("now", n(now));
        let recorded = self
            .update_if(
                scope,
                key,
                &format!("SET #steps = list_append(#steps, :step), updated_at = :now{also_set}"),
                "lease_owner = :token AND #status = :in_progress AND size(#steps) = :index",
                values,
            )
            .await;
        match recorded {
            Ok(true) => Ok(Written::Done),
            Ok(false) => Ok(Written::NotHeld),
            Err(StoreError::Dynamo(message)) if message.contains(ITEM_TOO_LARGE) => {
                Ok(Written::TooLarge(too_large(&step.name, &step.output)))
            }
            Err(other) => Err(other),
        }
    }
}

/// Why a step's output cannot be stored, with its size.
fn too_large(name: &str, output: &Value) -> String {
    format!(
        "step {name:?}'s output ({} bytes as JSON) would push the event's item past \
         DynamoDB's 400 KB limit",
        output.to_string().len()
    )
}

/// What a step's `TransactWriteItems` came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StepCommit {
    /// The handler's items and the step's record were written together.
    Recorded,
    /// The lease is no longer ours (or the step is already recorded): nothing was written.
    LeaseLost,
    /// A condition on one of the handler's own items failed: nothing was written. The
    /// positions of the refused items (0-based, in the order the handler added them).
    ItemsRefused(Vec<usize>),
}

/// The most items a handler may add to one step: DynamoDB's 100 per transaction, less the
/// step's own record.
pub const MAX_STEP_ITEMS: usize = 99;

impl DynamoStore {
    /// Write the handler's `items` and step `index`'s record in one `TransactWriteItems`:
    /// both or neither, the record conditional on the lease and on the step being next.
    pub async fn commit_step(
        &self,
        lease: &Lease,
        index: usize,
        name: &str,
        output: &Value,
        mut items: Vec<TransactWriteItem>,
    ) -> Result<StepCommit, StoreError> {
        if items.len() > MAX_STEP_ITEMS {
            return Err(StoreError::TooLarge(format!(
                "step {name:?} adds {} items to its transaction; DynamoDB allows {} besides \
                 the step's own record",
                items.len(),
                MAX_STEP_ITEMS
            )));
        }
        let now = self.now();
        let values = Values::default()
            .name("status")
            .name("steps")
            .set("token", s(&lease.token))
            .set("in_progress", s("in_progress"))
            .set("index", n(index as i64))
            .set(
                "step",
                AttributeValue::L(vec![step_value(name, output, &rfc3339(now))]),
            )
            .set("now", n(now));
        let record = Update::builder()
            .table_name(&self.table)
            .key("pk", s(checkpoint_pk(&lease.scope, &lease.key)))
            .update_expression("SET #steps = list_append(#steps, :step), updated_at = :now")
            .condition_expression(
                "lease_owner = :token AND #status = :in_progress AND size(#steps) = :index",
            )
            .set_expression_attribute_names(Some(values.names))
            .set_expression_attribute_values(Some(values.values))
            .build()
            .expect("update fields are set");
        let handler_items = items.len();
        items.push(TransactWriteItem::builder().update(record).build());
        let result = self
            .client
            .transact_write_items()
            .set_transact_items(Some(items))
            .send()
            .await;
        let error = match result {
            Ok(_) => return Ok(StepCommit::Recorded),
            Err(error) => error,
        };
        let reasons: Vec<Option<String>> = match error.as_service_error() {
            Some(TransactWriteItemsError::TransactionCanceledException(e)) => e
                .cancellation_reasons()
                .iter()
                .map(|r| r.code().map(str::to_owned))
                .collect(),
            _ => {
                let message = super::dynamo(error);
                return match message {
                    StoreError::Dynamo(m) if m.contains(ITEM_TOO_LARGE) => {
                        Err(StoreError::TooLarge(too_large(name, output)))
                    }
                    other => Err(other),
                };
            }
        };
        let failed = |i: usize| {
            reasons.get(i).cloned().flatten().as_deref() == Some("ConditionalCheckFailed")
        };
        if failed(handler_items) {
            return Ok(StepCommit::LeaseLost);
        }
        let refused: Vec<usize> = (0..handler_items).filter(|&i| failed(i)).collect();
        if refused.is_empty() {
            return Err(StoreError::Dynamo(format!(
                "the step's transaction was cancelled: {reasons:?}"
            )));
        }
        Ok(StepCommit::ItemsRefused(refused))
    }
}
