//! Dead letters in DynamoDB (`DL#{id}` items, listed newest first through the `listing`
//! index), failed checkpoints of messages without a key, and redrive audit items
//! (`RD#{id}`, in the `listing` index too, under `redrives`: the operator log reads them).
//!
//! Ids are the contract's `i64`: the time of recording in microseconds, made unique by a
//! conditional put (a clash takes the next microsecond).

use async_trait::async_trait;
use aws_sdk_dynamodb::types::{AttributeValue, Put, TransactWriteItem, Update};

use super::claims::pass_rank;
use super::item::{
    DEAD_LETTERS, Item, LIST_PK, LIST_SK, LISTING, REDRIVES, Values, checkpoint_pk, dead_letter,
    dead_letter_pk, n, redrive_pk, s,
};
use super::{DynamoStore, SKEW_MARGIN, dynamo, millis};
use crate::message::Pass;
use crate::store::{
    DeadLetter, DeadLetters, NewDeadLetter, RedriveCounts, StoreError, storable_text,
};

/// The longest body kept whole: DynamoDB's items end at 400 KB, SQS's bodies at 1 MiB. A
/// longer body is kept cut, saying so (the message itself is in the DLQ or was deleted after
/// its final pass: the record is what remains, so it keeps as much as fits).
const BODY_LIMIT: usize = 300 * 1024;

fn kept_body(body: &str) -> String {
    if body.len() <= BODY_LIMIT {
        return body.to_owned();
    }
    let mut end = BODY_LIMIT;
    while !body.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…[cut: {} bytes in all]", &body[..end], body.len())
}

/// The update that marks a checkpoint failed for a dead letter (creating it if missing),
/// raising the stored pass to the letter's when `raise_pass`.
fn mark_failed_update(
    letter: &NewDeadLetter<'_>,
    error: &str,
    token: Option<&str>,
    raise_pass: bool,
    now: i64,
) -> (String, String, Values) {
    let pass = Pass {
        requeue_generation: letter.requeue_generation.max(0) as u32,
        redrive_count: letter.redrive_count.max(0) as u32,
    };
    let mut values = Values::default()
        .name("status")
        .name("steps")
        .name("scope")
        .name("key")
        .set("failed", s("failed"))
        .set("complete", s("complete"))
        .set("mid", s(letter.message_id))
        .set("error", s(error))
        .set("now", n(now))
        .set("sha", s(letter.payload_sha256))
        .set("empty", AttributeValue::L(Vec::new()))
        .set("scope", s(letter.scope))
        .set("key", s(letter.key))
        .set("one", n(1))
        .set("token", s(token.unwrap_or("")))
        .set("expired_before", n(now - millis(SKEW_MARGIN)));
    let mut update = String::from(
        "SET #status = :failed, last_message_id = :mid, last_error = :error, updated_at = :now, \
         payload_sha256 = if_not_exists(payload_sha256, :sha), \
         first_message_id = if_not_exists(first_message_id, :mid), \
         created_at = if_not_exists(created_at, :now), #steps = if_not_exists(#steps, :empty), \
         #scope = :scope, #key = :key, attempts = if_not_exists(attempts, :one)",
    );
    let free = "(attribute_not_exists(lease_owner) OR lease_owner = :token OR \
                lease_expires_at <= :expired_before)";
    // DynamoDB refuses values an expression does not use: bind each where it is used.
    let condition = if raise_pass {
        values = values
            .set("rank", n(pass_rank(pass)))
            .set("generation", n(pass.requeue_generation.into()))
            .set("redrives", n(pass.redrive_count.into()));
        update.push_str(
            ", pass_rank = :rank, requeue_generation = :generation, redrive_count = :redrives",
        );
        format!(
            "attribute_not_exists(pk) OR (#status <> :complete AND {free} AND \
             (attribute_not_exists(pass_rank) OR pass_rank < :rank))"
        )
    } else {
        values = values.set("zero", n(0));
        update.push_str(", pass_rank = if_not_exists(pass_rank, :zero)");
        format!("attribute_exists(pk) AND #status <> :complete AND {free}")
    };
    update.push_str(" REMOVE lease_owner, lease_expires_at, run_deadline_at");
    (update, condition, values)
}

impl DynamoStore {
    /// The dead letter's item.
    fn letter_item(
        &self,
        id: i64,
        letter: &NewDeadLetter<'_>,
        reason: &str,
        error: &str,
        now: i64,
    ) -> Item {
        Item::from([
            ("pk".to_owned(), s(dead_letter_pk(id))),
            (LIST_PK.to_owned(), s(DEAD_LETTERS)),
            (LIST_SK.to_owned(), n(id)),
            ("id".to_owned(), n(id)),
            ("scope".to_owned(), s(letter.scope)),
            ("key".to_owned(), s(letter.key)),
            ("queue_url".to_owned(), s(letter.queue_url)),
            ("message_id".to_owned(), s(letter.message_id)),
            ("body".to_owned(), s(kept_body(letter.body))),
            ("attributes".to_owned(), s(letter.attributes.to_string())),
            ("reason".to_owned(), s(reason)),
            ("error".to_owned(), s(error)),
            ("attempts".to_owned(), n(letter.attempts.into())),
            ("redrive_count".to_owned(), n(letter.redrive_count.into())),
            ("created_at".to_owned(), n(now)),
        ])
    }

    /// Mark the checkpoint failed outside a transaction: first raising its pass, else
    /// keeping a later one. Whether it was marked.
    async fn mark_dead_lettered(
        &self,
        letter: &NewDeadLetter<'_>,
        error: &str,
        token: Option<&str>,
        now: i64,
    ) -> Result<bool, StoreError> {
        for raise_pass in [true, false] {
            let (update, condition, values) =
                mark_failed_update(letter, error, token, raise_pass, now);
            if self
                .update_if(letter.scope, letter.key, &update, &condition, values)
                .await?
            {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// The items of one kind of the `listing` index (`list_pk = kind`), newest first, at
    /// most `limit`. A scope is a filter on the index, so pages are read until `limit` items
    /// of it are found.
    pub(super) async fn list_kind(
        &self,
        kind: &str,
        scope: Option<&str>,
        limit: i64,
    ) -> Result<Vec<Item>, StoreError> {
        let limit = limit.clamp(0, i64::from(i32::MAX)) as usize;
        let mut values = Values::default().name(LIST_PK).set("kind", s(kind));
        let mut filter = None;
        if let Some(scope) = scope {
            values = values.name("scope").set("scope", s(scope));
            filter = Some("#scope = :scope".to_owned());
        }
        let mut items = Vec::new();
        let mut start = None;
        while items.len() < limit {
            // Without a filter a page need hold no more than what is still wanted.
            let page_limit = filter.is_none().then(|| (limit - items.len()) as i32);
            let page = self
                .client
                .query()
                .table_name(&self.table)
                .index_name(LISTING)
                .key_condition_expression(format!("#{LIST_PK} = :kind"))
                .set_filter_expression(filter.clone())
                .set_expression_attribute_names(Some(values.names.clone()))
                .set_expression_attribute_values(Some(values.values.clone()))
                .scan_index_forward(false)
                .set_limit(page_limit)
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
        items.truncate(limit);
        Ok(items)
    }

    /// Put the item `make(id)` under a new id: the time of recording (`now`, ms) in
    /// microseconds, the next microsecond on a clash. Returns the id.
    pub(super) async fn put_with_new_id(
        &self,
        now: i64,
        make: impl Fn(i64) -> Item,
    ) -> Result<i64, StoreError> {
        let mut id = now * 1000;
        while !self.put_new(make(id)).await? {
            id += 1;
        }
        Ok(id)
    }

    /// Put `item` (a new id's) unless the id is taken; false when it is.
    pub(super) async fn put_new(&self, item: Item) -> Result<bool, StoreError> {
        let result = self
            .client
            .put_item()
            .table_name(&self.table)
            .set_item(Some(item))
            .condition_expression("attribute_not_exists(pk)")
            .send()
            .await;
        match result {
            Ok(_) => Ok(true),
            Err(error)
                if error
                    .as_service_error()
                    .is_some_and(|e| e.is_conditional_check_failed_exception()) =>
            {
                Ok(false)
            }
            Err(error) => Err(dynamo(error)),
        }
    }

    /// The letter and the checkpoint's mark in one transaction. None when the checkpoint
    /// could not be marked (the lease was taken over): then nothing is written.
    async fn record_with_mark(
        &self,
        item: Item,
        letter: &NewDeadLetter<'_>,
        error: &str,
        token: &str,
        now: i64,
    ) -> Result<Option<bool>, StoreError> {
        // The final pass's claim already stored the latest pass: keep it.
        let (update, condition, values) =
            mark_failed_update(letter, error, Some(token), false, now);
        let put = Put::builder()
            .table_name(&self.table)
            .set_item(Some(item))
            .condition_expression("attribute_not_exists(pk)")
            .build()
            .expect("put fields are set");
        let mark = Update::builder()
            .table_name(&self.table)
            .key("pk", s(checkpoint_pk(letter.scope, letter.key)))
            .update_expression(update)
            .condition_expression(condition)
            .set_expression_attribute_names(Some(values.names))
            .set_expression_attribute_values(Some(values.values))
            .build()
            .expect("update fields are set");
        let result = self
            .client
            .transact_write_items()
            .transact_items(TransactWriteItem::builder().put(put).build())
            .transact_items(TransactWriteItem::builder().update(mark).build())
            .send()
            .await;
        match result {
            Ok(_) => Ok(Some(true)),
            Err(error) => {
                let reasons: Vec<Option<String>> = match error.as_service_error() {
                    Some(aws_sdk_dynamodb::operation::transact_write_items::TransactWriteItemsError::TransactionCanceledException(e)) => e
                        .cancellation_reasons()
                        .iter()
                        .map(|r| r.code().map(str::to_owned))
                        .collect(),
                    _ => return Err(dynamo(error)),
                };
                let failed = |i: usize| {
                    reasons.get(i).cloned().flatten().as_deref() == Some("ConditionalCheckFailed")
                };
                if failed(0) {
                    Ok(Some(false)) // the id is taken: another id
                } else if failed(1) {
                    Ok(None)
                } else {
                    Err(StoreError::Dynamo(format!(
                        "recording a dead letter was cancelled: {reasons:?}"
                    )))
                }
            }
        }
    }
}

#[async_trait]
impl DeadLetters for DynamoStore {
    /// With a token, the letter and the mark are one `TransactWriteItems`: both or neither.
    async fn record_dead_letter(
        &self,
        letter: &NewDeadLetter<'_>,
        mark_checkpoint: bool,
        token: Option<&str>,
    ) -> Result<Option<i64>, StoreError> {
        let reason = storable_text(letter.reason);
        let error = storable_text(letter.error);
        let now = self.now();
        let mut id = now * 1000;
        loop {
            let item = self.letter_item(id, letter, &reason, &error, now);
            let written = match (mark_checkpoint, token) {
                (true, Some(token)) => match self
                    .record_with_mark(item, letter, &error, token, now)
                    .await?
                {
                    None => return Ok(None),
                    Some(written) => written,
                },
                _ => self.put_new(item).await?,
            };
            if written {
                break;
            }
            id += 1;
        }
        if mark_checkpoint && token.is_none() {
            self.mark_dead_lettered(letter, &error, None, now).await?;
        }
        Ok(Some(id))
    }

    async fn record_unkeyed_failure(
        &self,
        scope: &str,
        key: &str,
        payload_sha256: &str,
        message_id: &str,
        error: &str,
    ) -> Result<(), StoreError> {
        let now = self.now();
        let values = Values::default()
            .name("status")
            .name("steps")
            .name("scope")
            .name("key")
            .set("failed", s("failed"))
            .set("complete", s("complete"))
            .set("mid", s(message_id))
            .set("error", s(storable_text(error)))
            .set("now", n(now))
            .set("sha", s(payload_sha256))
            .set("empty", AttributeValue::L(Vec::new()))
            .set("scope", s(scope))
            .set("key", s(key))
            .set("one", n(1))
            .set("zero", n(0));
        self.update_if(
            scope,
            key,
            "SET #status = :failed, last_message_id = :mid, last_error = :error, updated_at = :now, \
             payload_sha256 = if_not_exists(payload_sha256, :sha), \
             first_message_id = if_not_exists(first_message_id, :mid), \
             created_at = if_not_exists(created_at, :now), #steps = if_not_exists(#steps, :empty), \
             #scope = :scope, #key = :key, pass_rank = if_not_exists(pass_rank, :zero) \
             ADD attempts :one REMOVE lease_owner, lease_expires_at, run_deadline_at",
            "attribute_not_exists(pk) OR #status <> :complete",
            values,
        )
        .await?;
        Ok(())
    }

    /// Newest first through the `listing` index (`list_kind`).
    async fn list_dead_letters(
        &self,
        scope: Option<&str>,
        limit: i64,
    ) -> Result<Vec<DeadLetter>, StoreError> {
        let items = self.list_kind(DEAD_LETTERS, scope, limit).await?;
        Ok(items.iter().map(dead_letter).collect())
    }

    async fn find_dead_letter(&self, id: i64) -> Result<Option<DeadLetter>, StoreError> {
        let output = self
            .client
            .get_item()
            .table_name(&self.table)
            .key("pk", s(dead_letter_pk(id)))
            .consistent_read(true)
            .send()
            .await
            .map_err(dynamo)?;
        Ok(output.item.as_ref().map(dead_letter))
    }

    async fn mark_dead_letter_requeued(&self, id: i64) -> Result<(), StoreError> {
        self.client
            .update_item()
            .table_name(&self.table)
            .key("pk", s(dead_letter_pk(id)))
            .update_expression("SET requeued_at = :now")
            .condition_expression("attribute_exists(pk)")
            .expression_attribute_values(":now", n(self.now()))
            .send()
            .await
            .map_err(dynamo)?;
        Ok(())
    }

    async fn start_redrive_audit(
        &self,
        operator: &str,
        dlq_url: &str,
        target_url: &str,
        max_redrives: i32,
        dry_run: bool,
    ) -> Result<i64, StoreError> {
        let now = self.now();
        self.put_with_new_id(now, |id| {
            Item::from([
                ("pk".to_owned(), s(redrive_pk(id))),
                (LIST_PK.to_owned(), s(REDRIVES)),
                (LIST_SK.to_owned(), n(id)),
                ("id".to_owned(), n(id)),
                ("operator".to_owned(), s(operator)),
                ("dlq_url".to_owned(), s(dlq_url)),
                ("target_url".to_owned(), s(target_url)),
                ("max_redrives".to_owned(), n(max_redrives.into())),
                ("dry_run".to_owned(), AttributeValue::Bool(dry_run)),
                ("started_at".to_owned(), n(now)),
            ])
        })
        .await
    }

    async fn finish_redrive_audit(
        &self,
        id: i64,
        counts: &RedriveCounts,
    ) -> Result<(), StoreError> {
        let count = |c: u64| n(c.min(i64::MAX as u64) as i64);
        self.client
            .update_item()
            .table_name(&self.table)
            .key("pk", s(redrive_pk(id)))
            .update_expression(
                "SET redriven = :redriven, skipped_complete = :skipped, exhausted = :exhausted, \
                 failed = :failed, finished_at = :now",
            )
            .expression_attribute_values(":redriven", count(counts.redriven))
            .expression_attribute_values(":skipped", count(counts.skipped_complete))
            .expression_attribute_values(":exhausted", count(counts.exhausted))
            .expression_attribute_values(":failed", count(counts.failed))
            .expression_attribute_values(":now", n(self.now()))
            .send()
            .await
            .map_err(dynamo)?;
        Ok(())
    }
}
