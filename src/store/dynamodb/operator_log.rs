//! The operator log in DynamoDB: operator action items (`OA#{id}`), and the redrive audit
//! items (`RD#{id}`) read back, both newest first through the `listing` index (`list_pk`
//! `operator_actions` and `redrives`); and an edited body's fingerprint adopted by its
//! `failed` checkpoint (a conditional `UpdateItem`).
//!
//! Action ids are those of dead letters: the time of recording in microseconds, made
//! unique by a conditional put (a clash takes the next microsecond). Redrive audit items
//! written before they carried `list_pk` are not listed.

use async_trait::async_trait;

use super::DynamoStore;
use super::item::{
    Item, LIST_PK, LIST_SK, OPERATOR_ACTIONS, REDRIVES, Values, n, operator_action,
    operator_action_pk, redrive_run, s,
};
use crate::store::{
    NewOperatorAction, OperatorAction, OperatorLog, RedriveRun, StoreError, storable_text,
};

#[async_trait]
impl OperatorLog for DynamoStore {
    async fn record_operator_action(
        &self,
        action: &NewOperatorAction<'_>,
    ) -> Result<i64, StoreError> {
        let detail = storable_text(action.detail);
        let now = self.now();
        let optional = [
            ("key", action.key),
            ("before_sha256", action.before_sha256),
            ("after_sha256", action.after_sha256),
        ];
        self.put_with_new_id(now, |id| {
            let mut item = Item::from([
                ("pk".to_owned(), s(operator_action_pk(id))),
                (LIST_PK.to_owned(), s(OPERATOR_ACTIONS)),
                (LIST_SK.to_owned(), n(id)),
                ("id".to_owned(), n(id)),
                ("recorded_at".to_owned(), n(now)),
                ("operator".to_owned(), s(action.operator)),
                ("action".to_owned(), s(action.action)),
                ("queue_url".to_owned(), s(action.queue_url)),
                ("message_id".to_owned(), s(action.message_id)),
                ("detail".to_owned(), s(&*detail)),
            ]);
            for (name, value) in optional {
                if let Some(value) = value {
                    item.insert(name.to_owned(), s(value));
                }
            }
            item
        })
        .await
    }

    async fn list_operator_actions(&self, limit: i64) -> Result<Vec<OperatorAction>, StoreError> {
        let items = self.list_kind(OPERATOR_ACTIONS, None, limit).await?;
        Ok(items.iter().map(operator_action).collect())
    }

    async fn list_redrive_runs(&self, limit: i64) -> Result<Vec<RedriveRun>, StoreError> {
        let items = self.list_kind(REDRIVES, None, limit).await?;
        Ok(items.iter().map(redrive_run).collect())
    }

    /// `payload_fields` as a claim stores it: the digests, or no attribute without them.
    /// The condition (`status = failed`) refuses a complete, in-progress or missing event.
    async fn adopt_edited_payload(
        &self,
        scope: &str,
        key: &str,
        payload_sha256: &str,
        field_digests: Option<&str>,
    ) -> Result<bool, StoreError> {
        let mut values = Values::default()
            .name("status")
            .set("failed", s("failed"))
            .set("sha", s(payload_sha256))
            .set("now", n(self.now()));
        let update = match field_digests {
            Some(fields) => {
                values = values.set("fields", s(fields));
                "SET payload_sha256 = :sha, payload_fields = :fields, updated_at = :now"
            }
            None => "SET payload_sha256 = :sha, updated_at = :now REMOVE payload_fields",
        };
        self.update_if(
            scope,
            key,
            update,
            "attribute_exists(pk) AND #status = :failed",
            values,
        )
        .await
    }
}
