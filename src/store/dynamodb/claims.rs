//! Claims and leases in DynamoDB: a conditional `UpdateItem` per event of a receive batch
//! (all at once), completion, release, renewals, the start of a waiting event's run, and
//! marking a claimed event failed — every write after the claim conditional on the token.

use std::collections::HashMap;
use std::time::Duration;

use async_trait::async_trait;
use aws_sdk_dynamodb::types::{AttributeValue, ReturnValue, ReturnValuesOnConditionCheckFailure};
use futures_util::future::join_all;

use super::item::{Item, Values, checkpoint_pk, get_n, get_s, n, s, steps_json};
use super::{DynamoStore, SKEW_MARGIN, dynamo, millis};
use crate::message::Pass;
use crate::store::{
    Claim, ClaimOutcome, ClaimRequest, ClaimTerms, Claims, Completion, Lease, StoreError, Written,
    storable_text,
};

/// A pass as one number that orders like `(requeue_generation, redrive_count)`: DynamoDB
/// compares one attribute at a time.
pub(super) fn pass_rank(pass: Pass) -> i64 {
    let clamp = |n: u32| i64::from(n.min(i32::MAX as u32));
    (clamp(pass.requeue_generation) << 31) | clamp(pass.redrive_count)
}

/// One key's claim: its deliveries in batch order, its latest pass, and whether some
/// delivery may reclaim a failed event.
struct KeyClaim<'a> {
    key: &'a str,
    deliveries: Vec<&'a ClaimRequest>,
    pass: Pass,
    reclaim: bool,
}

fn by_key(requests: &[ClaimRequest]) -> Vec<KeyClaim<'_>> {
    let mut claims: Vec<KeyClaim> = Vec::new();
    let mut index: HashMap<&str, usize> = HashMap::new();
    for r in requests {
        let at = *index.entry(&r.key).or_insert_with(|| {
            claims.push(KeyClaim {
                key: &r.key,
                deliveries: Vec::new(),
                pass: Pass::default(),
                reclaim: false,
            });
            claims.len() - 1
        });
        let claim = &mut claims[at];
        claim.deliveries.push(r);
        claim.pass = claim.pass.max(r.pass);
        claim.reclaim |= r.reclaim_failed;
    }
    claims
}

/// What one conditional claim came to.
enum Attempt {
    /// The item as the claim left it.
    Claimed(Item),
    /// The item as it is (the condition failed).
    Refused(Item),
}

/// Time left until `at` (epoch ms) plus the skew margin, below SQS's 12-hour limit.
fn remaining(at: Option<i64>, now: i64) -> Duration {
    let ms = at
        .map_or(0, |at| at + millis(SKEW_MARGIN) - now)
        .clamp(0, 43_199_000);
    Duration::from_millis(ms as u64)
}

fn claimed(item: &Item, now: i64) -> ClaimOutcome {
    ClaimOutcome::Claimed(Claim {
        attempts: get_n(item, "attempts")
            .unwrap_or(1)
            .clamp(1, u32::MAX as i64) as u32,
        resumed: get_n(item, "created_at") != Some(now),
        steps: steps_json(item),
        stored_payload_sha256: get_s(item, "payload_sha256").unwrap_or_default(),
    })
}

/// The outcome for an item this claim did not take.
fn refused(item: &Item, now: i64) -> ClaimOutcome {
    let stored_payload_sha256 = get_s(item, "payload_sha256").unwrap_or_default();
    match get_s(item, "status").as_deref() {
        Some("complete") => ClaimOutcome::Complete {
            stored_payload_sha256,
        },
        Some("failed") => ClaimOutcome::Failed {
            stored_payload_sha256,
        },
        _ => {
            let lease_end = get_n(item, "lease_expires_at");
            let retry_after = remaining(lease_end, now);
            let run_end = lease_end.max(get_n(item, "run_deadline_at"));
            ClaimOutcome::Busy {
                retry_after,
                run_remaining: remaining(run_end, now).max(retry_after),
                stored_payload_sha256: Some(stored_payload_sha256),
            }
        }
    }
}

/// Whether the lease on `item` has ended (or was released), margin included.
fn lease_free(item: &Item, now: i64) -> bool {
    get_n(item, "lease_expires_at").is_none_or(|end| end <= now - millis(SKEW_MARGIN))
}

impl DynamoStore {
    /// Claim one key: with its first delivery, then — if the stored payload is another
    /// delivery's of this batch — with that one; a retry of our own claim finds its lease.
    async fn claim_key(
        &self,
        scope: &str,
        token: &str,
        terms: &ClaimTerms,
        claim: &KeyClaim<'_>,
        now: i64,
    ) -> Result<ClaimOutcome, StoreError> {
        let mut delivery = claim.deliveries[0];
        let mut retried_payload = false;
        loop {
            let old = match self
                .try_claim(scope, token, terms, claim, delivery, now, None)
                .await?
            {
                Attempt::Claimed(item) => return Ok(claimed(&item, now)),
                Attempt::Refused(old) => old,
            };
            let in_progress = get_s(&old, "status").as_deref() == Some("in_progress");
            if in_progress && get_s(&old, "lease_owner").as_deref() == Some(token) {
                return Ok(claimed(&old, now));
            }
            let stored = get_s(&old, "payload_sha256").unwrap_or_default();
            if !terms.accept_mismatch && stored != delivery.payload_sha256 {
                match claim.deliveries.iter().find(|d| d.payload_sha256 == stored) {
                    Some(other) if !retried_payload => {
                        delivery = other;
                        retried_payload = true;
                        continue;
                    }
                    _ => return Ok(refused(&old, now)),
                }
            }
            // Free, but a later pass is stored than this batch carries: take it, keeping the
            // stored pass (it never goes back).
            let stored_rank = get_n(&old, "pass_rank").unwrap_or(0);
            if in_progress && lease_free(&old, now) && stored_rank > pass_rank(claim.pass) {
                return match self
                    .try_claim(scope, token, terms, claim, delivery, now, Some(stored_rank))
                    .await?
                {
                    Attempt::Claimed(item) => Ok(claimed(&item, now)),
                    Attempt::Refused(old) => Ok(refused(&old, now)),
                };
            }
            return Ok(refused(&old, now));
        }
    }

    /// One conditional `UpdateItem`. With `keep_rank`, the stored pass (that rank) is kept
    /// and must still be there.
    #[allow(clippy::too_many_arguments)] // the claim's parts, as the statement binds them
    async fn try_claim(
        &self,
        scope: &str,
        token: &str,
        terms: &ClaimTerms,
        claim: &KeyClaim<'_>,
        delivery: &ClaimRequest,
        now: i64,
        keep_rank: Option<i64>,
    ) -> Result<Attempt, StoreError> {
        let rank = pass_rank(claim.pass);
        let mut values = Values::default()
            .name("status")
            .name("steps")
            .name("scope")
            .name("key")
            .set("in_progress", s("in_progress"))
            .set("token", s(token))
            .set("lease_end", n(now + millis(terms.lease)))
            .set("run_end", n(now + millis(terms.run_limit.max(terms.lease))))
            .set("mid", s(&delivery.message_id))
            .set("now", n(now))
            .set("sha", s(&delivery.payload_sha256))
            .set("empty", AttributeValue::L(Vec::new()))
            .set("scope", s(scope))
            .set("key", s(claim.key))
            .set("one", n(1))
            .set("expired_before", n(now - millis(SKEW_MARGIN)))
            .set("accept", AttributeValue::Bool(terms.accept_mismatch))
            .set("yes", AttributeValue::Bool(true));
        let mut update = String::from(
            "SET #status = :in_progress, lease_owner = :token, lease_expires_at = :lease_end, \
             run_deadline_at = :run_end, last_message_id = :mid, updated_at = :now, \
             payload_sha256 = if_not_exists(payload_sha256, :sha), \
             first_message_id = if_not_exists(first_message_id, :mid), \
             created_at = if_not_exists(created_at, :now), #steps = if_not_exists(#steps, :empty), \
             #scope = :scope, #key = :key",
        );
        if let Some(fields) = &delivery.field_digests {
            update.push_str(", payload_fields = if_not_exists(payload_fields, :fields)");
            values = values.set("fields", s(fields));
        }
        let payload_ok = "(:accept = :yes OR payload_sha256 = :sha)";
        let lease_ok =
            "(attribute_not_exists(lease_expires_at) OR lease_expires_at <= :expired_before)";
        let condition = match keep_rank {
            None => {
                update.push_str(
                    ", pass_rank = :rank, requeue_generation = :generation, \
                     redrive_count = :redrives",
                );
                values = values
                    .set("rank", n(rank))
                    .set("generation", n(claim.pass.requeue_generation.into()))
                    .set("redrives", n(claim.pass.redrive_count.into()))
                    .set("reclaim", AttributeValue::Bool(claim.reclaim))
                    .set("failed", s("failed"));
                format!(
                    "attribute_not_exists(pk) OR ({payload_ok} AND ((#status = :in_progress AND \
                     {lease_ok} AND pass_rank <= :rank) OR (#status = :failed AND \
                     :reclaim = :yes AND pass_rank < :rank)))"
                )
            }
            Some(kept) => {
                values = values.set("kept", n(kept));
                format!(
                    "#status = :in_progress AND {payload_ok} AND {lease_ok} AND pass_rank = :kept"
                )
            }
        };
        update.push_str(" ADD attempts :one");
        let result = self
            .client
            .update_item()
            .table_name(&self.table)
            .key("pk", s(checkpoint_pk(scope, claim.key)))
            .update_expression(update)
            .condition_expression(condition)
            .set_expression_attribute_names(Some(values.names))
            .set_expression_attribute_values(Some(values.values))
            .return_values(ReturnValue::AllNew)
            .return_values_on_condition_check_failure(ReturnValuesOnConditionCheckFailure::AllOld)
            .send()
            .await;
        match result {
            Ok(output) => Ok(Attempt::Claimed(output.attributes.unwrap_or_default())),
            Err(error) => match error.as_service_error() {
                Some(e) if e.is_conditional_check_failed_exception() => {
                    let old = match e {
                        aws_sdk_dynamodb::operation::update_item::UpdateItemError::ConditionalCheckFailedException(c) => c.item().cloned(),
                        _ => None,
                    };
                    let old = match old {
                        Some(old) => old,
                        None => self.get(scope, claim.key).await?.unwrap_or_default(),
                    };
                    Ok(Attempt::Refused(old))
                }
                _ => Err(dynamo(error)),
            },
        }
    }

    /// The checkpoint item, read consistently.
    pub(super) async fn get(&self, scope: &str, key: &str) -> Result<Option<Item>, StoreError> {
        let output = self
            .client
            .get_item()
            .table_name(&self.table)
            .key("pk", s(checkpoint_pk(scope, key)))
            .consistent_read(true)
            .send()
            .await
            .map_err(dynamo)?;
        Ok(output.item)
    }

    /// An `UpdateItem` on a held lease: `update` if `lease` holds the event in progress
    /// (and `extra_condition`). False when the lease was not ours.
    /// Complete one event under its token (see [`Claims::complete_events`]). With a last
    /// step, the write appends it too, conditional on the step being next; if that condition
    /// fails, the item is read to tell a retry of this very write (complete under the same
    /// token) from a lost lease.
    async fn complete_one(&self, scope: &str, event: &Completion) -> Result<Written, StoreError> {
        let now = self.now();
        let expires = (now + millis(self.retention)) / 1000;
        let completion = Values::default()
            .set("complete", s("complete"))
            .set("expires", n(expires));
        const COMPLETE: &str = ", #status = :complete, completed_at = if_not_exists(completed_at, \
            :now), expires_at = :expires REMOVE lease_expires_at, run_deadline_at";
        let Some(step) = &event.last_step else {
            let completed = self
                .update_if(
                    scope,
                    &event.key,
                    &format!("SET updated_at = :now{COMPLETE}"),
                    "lease_owner = :token AND #status IN (:in_progress, :complete)",
                    completion
                        .name("status")
                        .set("in_progress", s("in_progress"))
                        .set("token", s(&event.token))
                        .set("now", n(now)),
                )
                .await?;
            return Ok(Written::done_if(completed));
        };
        let written = self
            .append_step(
                scope,
                &event.key,
                &event.token,
                step,
                Some((COMPLETE, completion)),
            )
            .await?;
        if written != Written::NotHeld {
            return Ok(written);
        }
        let item = self.get(scope, &event.key).await?;
        let complete_here = item.as_ref().is_some_and(|item| {
            get_s(item, "status").as_deref() == Some("complete")
                && get_s(item, "lease_owner").as_deref() == Some(event.token.as_str())
        });
        Ok(Written::done_if(complete_here))
    }

    pub(super) async fn update_held(
        &self,
        lease: &Lease,
        update: &str,
        values: Values,
    ) -> Result<bool, StoreError> {
        self.update_if(
            &lease.scope,
            &lease.key,
            update,
            "lease_owner = :token AND #status = :in_progress",
            values
                .name("status")
                .set("token", s(&lease.token))
                .set("in_progress", s("in_progress")),
        )
        .await
    }

    /// An `UpdateItem` of a checkpoint under `condition`; false when it did not hold.
    pub(super) async fn update_if(
        &self,
        scope: &str,
        key: &str,
        update: &str,
        condition: &str,
        values: Values,
    ) -> Result<bool, StoreError> {
        let names = (!values.names.is_empty()).then_some(values.names);
        let result = self
            .client
            .update_item()
            .table_name(&self.table)
            .key("pk", s(checkpoint_pk(scope, key)))
            .update_expression(update)
            .condition_expression(condition)
            .set_expression_attribute_names(names)
            .set_expression_attribute_values(Some(values.values))
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
}

#[async_trait]
impl Claims for DynamoStore {
    /// One conditional `UpdateItem` per key, all at once (see the module docs).
    async fn claim_batch(
        &self,
        scope: &str,
        token: &str,
        terms: &ClaimTerms,
        requests: &[ClaimRequest],
    ) -> Result<HashMap<String, ClaimOutcome>, StoreError> {
        let now = self.now();
        let claims = by_key(requests);
        let outcomes = join_all(
            claims
                .iter()
                .map(|claim| self.claim_key(scope, token, terms, claim, now)),
        )
        .await;
        claims
            .iter()
            .zip(outcomes)
            .map(|(claim, outcome)| Ok((claim.key.to_owned(), outcome?)))
            .collect()
    }

    /// A completed item keeps its token as lease owner (a retry recognises its own
    /// completion) and gets its TTL.
    /// One conditional `UpdateItem` per event, all at once; an event's last step is
    /// appended by its completion's own write.
    async fn complete_events(
        &self,
        scope: &str,
        events: &[Completion],
    ) -> Result<Vec<Written>, StoreError> {
        join_all(events.iter().map(|e| self.complete_one(scope, e)))
            .await
            .into_iter()
            .collect()
    }

    async fn release(&self, lease: &Lease, error: &str) -> Result<bool, StoreError> {
        let values = Values::default()
            .set("error", s(storable_text(error)))
            .set("now", n(self.now()));
        self.update_held(
            lease,
            "SET last_error = :error, updated_at = :now \
             REMOVE lease_owner, lease_expires_at, run_deadline_at",
            values,
        )
        .await
    }

    async fn release_unstarted(&self, lease: &Lease) -> Result<bool, StoreError> {
        let values = Values::default().set("one", n(1)).set("now", n(self.now()));
        self.update_held(
            lease,
            "SET attempts = attempts - :one, updated_at = :now \
             REMOVE lease_owner, lease_expires_at, run_deadline_at",
            values,
        )
        .await
    }

    async fn renew_lease(&self, lease: &Lease, duration: Duration) -> Result<bool, StoreError> {
        let now = self.now();
        let values = Values::default()
            .set("end", n(now + millis(duration)))
            .set("now", n(now));
        self.update_held(
            lease,
            "SET lease_expires_at = :end, updated_at = :now",
            values,
        )
        .await
    }

    async fn renew_leases(
        &self,
        scope: &str,
        token: &str,
        keys: &[String],
        duration: Duration,
    ) -> Result<Vec<String>, StoreError> {
        let leases: Vec<Lease> = keys.iter().map(|k| Lease::new(scope, k, token)).collect();
        let results = join_all(leases.iter().map(|l| self.renew_lease(l, duration))).await;
        let mut held = Vec::new();
        for (key, result) in keys.iter().zip(results) {
            if result? {
                held.push(key.clone());
            }
        }
        Ok(held)
    }

    async fn start_run(
        &self,
        lease: &Lease,
        duration: Duration,
        run_limit: Duration,
    ) -> Result<bool, StoreError> {
        let now = self.now();
        let values = Values::default()
            .set("end", n(now + millis(duration)))
            .set("run_end", n(now + millis(run_limit.max(duration))))
            .set("now", n(now));
        self.update_held(
            lease,
            "SET lease_expires_at = :end, run_deadline_at = :run_end, updated_at = :now",
            values,
        )
        .await
    }

    async fn mark_failed(&self, lease: &Lease, error: &str) -> Result<bool, StoreError> {
        let values = Values::default()
            .set("failed", s("failed"))
            .set("error", s(storable_text(error)))
            .set("now", n(self.now()));
        self.update_held(
            lease,
            "SET #status = :failed, last_error = :error, updated_at = :now \
             REMOVE lease_owner, lease_expires_at, run_deadline_at",
            values,
        )
        .await
    }
}
