//! Lookups and retention in DynamoDB: `find` (a consistent read), stale events (a scan: an
//! operator's occasional question, not a hot path), pruning (the table's TTL does it).

use std::time::Duration;

use async_trait::async_trait;

use super::item::{Item, Values, checkpoint, get_n, n, s};
use super::{DynamoStore, SKEW_MARGIN, dynamo, millis};
use crate::store::{Checkpoint, Retention, StoreError, storable_text};

#[async_trait]
impl Retention for DynamoStore {
    async fn find(&self, scope: &str, key: &str) -> Result<Option<Checkpoint>, StoreError> {
        Ok(self.get(scope, key).await?.as_ref().map(checkpoint))
    }

    async fn list_stale(
        &self,
        scope: Option<&str>,
        idle_for: Duration,
        limit: i64,
    ) -> Result<Vec<Checkpoint>, StoreError> {
        let now = self.now();
        let mut values = Values::default()
            .name("status")
            .set("in_progress", s("in_progress"))
            .set("checkpoint", s("C#"))
            .set("expired_before", n(now - millis(SKEW_MARGIN)))
            .set("idle_since", n(now - millis(idle_for)));
        let mut filter = String::from(
            "begins_with(pk, :checkpoint) AND #status = :in_progress AND \
             (attribute_not_exists(lease_expires_at) OR lease_expires_at <= :expired_before) \
             AND updated_at < :idle_since",
        );
        if let Some(scope) = scope {
            filter.push_str(" AND #scope = :scope");
            values = values.name("scope").set("scope", s(scope));
        }
        let mut items: Vec<Item> = Vec::new();
        let mut start = None;
        loop {
            let page = self
                .client
                .scan()
                .table_name(&self.table)
                .filter_expression(&filter)
                .set_expression_attribute_names(Some(values.names.clone()))
                .set_expression_attribute_values(Some(values.values.clone()))
                .consistent_read(true)
                .set_exclusive_start_key(start)
                .send()
                .await
                .map_err(dynamo)?;
            items.extend(page.items.unwrap_or_default());
            start = page.last_evaluated_key;
            if start.is_none() {
                break;
            }
        }
        items.sort_by_key(|item| get_n(item, "updated_at"));
        items.truncate(limit.max(0) as usize);
        Ok(items.iter().map(checkpoint).collect())
    }

    async fn mark_stale_failed(
        &self,
        scope: &str,
        key: &str,
        idle_for: Duration,
        reason: &str,
    ) -> Result<bool, StoreError> {
        let now = self.now();
        let values = Values::default()
            .name("status")
            .set("in_progress", s("in_progress"))
            .set("failed", s("failed"))
            .set("error", s(storable_text(reason)))
            .set("now", n(now))
            .set("idle_since", n(now - millis(idle_for)))
            .set("expired_before", n(now - millis(SKEW_MARGIN)));
        self.update_if(
            scope,
            key,
            "SET #status = :failed, last_error = :error, updated_at = :now \
             REMOVE lease_owner, lease_expires_at, run_deadline_at",
            "#status = :in_progress AND updated_at < :idle_since AND \
             (attribute_not_exists(lease_expires_at) OR lease_expires_at <= :expired_before)",
            values,
        )
        .await
    }

    /// Nothing to do: completed items carry `expires_at`, and the table's TTL deletes them.
    async fn prune_complete(
        &self,
        _scope: Option<&str>,
        _older_than: Duration,
        _limit: i64,
    ) -> Result<u64, StoreError> {
        Ok(0)
    }
}
