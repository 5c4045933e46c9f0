//! Steps in DynamoDB: appended with `list_append`, only at their index and under the lease.

use async_trait::async_trait;
use serde_json::Value;

use super::item::{Values, step_value};
use super::{DynamoStore, now_ms, rfc3339};
use crate::store::{Lease, Steps, StoreError};

/// What DynamoDB says when an item would pass its 400 KB limit.
const ITEM_TOO_LARGE: &str = "Item size has exceeded the maximum allowed size";

#[async_trait]
impl Steps for DynamoStore {
    async fn record_step(
        &self,
        lease: &Lease,
        index: usize,
        name: &str,
        output: &Value,
    ) -> Result<bool, StoreError> {
        let now = now_ms();
        let values = Values::default()
            .name("status")
            .name("steps")
            .set(
                "token",
                aws_sdk_dynamodb::types::AttributeValue::S(lease.token.clone()),
            )
            .set("in_progress", super::item::s("in_progress"))
            .set("index", super::item::n(index as i64))
            .set(
                "step",
                aws_sdk_dynamodb::types::AttributeValue::L(vec![step_value(
                    name,
                    output,
                    &rfc3339(now),
                )]),
            )
            .set("now", super::item::n(now));
        let recorded = self
            .update_if(
                &lease.scope,
                &lease.key,
                "SET #steps = list_append(#steps, :step), updated_at = :now",
                "lease_owner = :token AND #status = :in_progress AND size(#steps) = :index",
                values,
            )
            .await;
        match recorded {
            Err(StoreError::Dynamo(message)) if message.contains(ITEM_TOO_LARGE) => {
                Err(StoreError::TooLarge(format!(
                    "step {name:?}'s output ({} bytes as JSON) would push the event's item \
                     past DynamoDB's 400 KB limit",
                    output.to_string().len()
                )))
            }
            other => other,
        }
    }
}
