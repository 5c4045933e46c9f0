//! A test store that must never be called (see [`UnreachableStore`]).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde_json::Value;

use super::{
    Checkpoint, CheckpointStore, ClaimOutcome, ClaimRequest, ClaimTerms, Claims, DeadLetter,
    DeadLetters, Lease, NewDeadLetter, RedriveCounts, Retention, Steps, StoreError,
};

/// A store of no kind: every call but [`CheckpointStore::kind`] panics, and it has no
/// capability. For tests of code that must refuse before it reaches the store.
#[derive(Debug)]
pub(crate) struct UnreachableStore;

#[async_trait]
impl CheckpointStore for UnreachableStore {
    fn kind(&self) -> &'static str {
        "unreachable"
    }
    async fn ping(&self) -> Result<(), StoreError> {
        unreachable!()
    }
    fn own_connections(&self, _: u32) -> Arc<dyn CheckpointStore> {
        unreachable!()
    }
}

#[async_trait]
impl Claims for UnreachableStore {
    async fn claim_batch(
        &self,
        _: &str,
        _: &str,
        _: &ClaimTerms,
        _: &[ClaimRequest],
    ) -> Result<HashMap<String, ClaimOutcome>, StoreError> {
        unreachable!()
    }
    async fn complete_batch(
        &self,
        _: &str,
        _: &[(String, String)],
    ) -> Result<Vec<(String, String)>, StoreError> {
        unreachable!()
    }
    async fn release(&self, _: &Lease, _: &str) -> Result<bool, StoreError> {
        unreachable!()
    }
    async fn release_unstarted(&self, _: &Lease) -> Result<bool, StoreError> {
        unreachable!()
    }
    async fn renew_lease(&self, _: &Lease, _: Duration) -> Result<bool, StoreError> {
        unreachable!()
    }
    async fn renew_leases(
        &self,
        _: &str,
        _: &str,
        _: &[String],
        _: Duration,
    ) -> Result<Vec<String>, StoreError> {
        unreachable!()
    }
    async fn start_run(&self, _: &Lease, _: Duration, _: Duration) -> Result<bool, StoreError> {
        unreachable!()
    }
    async fn mark_failed(&self, _: &Lease, _: &str) -> Result<bool, StoreError> {
        unreachable!()
    }
}

#[async_trait]
impl Steps for UnreachableStore {
    async fn record_step(
        &self,
        _: &Lease,
        _: usize,
        _: &str,
        _: &Value,
    ) -> Result<bool, StoreError> {
        unreachable!()
    }
}

#[async_trait]
impl DeadLetters for UnreachableStore {
    async fn record_dead_letter(
        &self,
        _: &NewDeadLetter<'_>,
        _: bool,
        _: Option<&str>,
    ) -> Result<Option<i64>, StoreError> {
        unreachable!()
    }
    async fn record_unkeyed_failure(
        &self,
        _: &str,
        _: &str,
        _: &str,
        _: &str,
        _: &str,
    ) -> Result<(), StoreError> {
        unreachable!()
    }
    async fn list_dead_letters(
        &self,
        _: Option<&str>,
        _: i64,
    ) -> Result<Vec<DeadLetter>, StoreError> {
        unreachable!()
    }
    async fn find_dead_letter(&self, _: i64) -> Result<Option<DeadLetter>, StoreError> {
        unreachable!()
    }
    async fn mark_dead_letter_requeued(&self, _: i64) -> Result<(), StoreError> {
        unreachable!()
    }
    async fn start_redrive_audit(
        &self,
        _: &str,
        _: &str,
        _: &str,
        _: i32,
        _: bool,
    ) -> Result<i64, StoreError> {
        unreachable!()
    }
    async fn finish_redrive_audit(&self, _: i64, _: &RedriveCounts) -> Result<(), StoreError> {
        unreachable!()
    }
}

#[async_trait]
impl Retention for UnreachableStore {
    async fn find(&self, _: &str, _: &str) -> Result<Option<Checkpoint>, StoreError> {
        unreachable!()
    }
    async fn list_stale(
        &self,
        _: Option<&str>,
        _: Duration,
        _: i64,
    ) -> Result<Vec<Checkpoint>, StoreError> {
        unreachable!()
    }
    async fn mark_stale_failed(
        &self,
        _: &str,
        _: &str,
        _: Duration,
        _: &str,
    ) -> Result<bool, StoreError> {
        unreachable!()
    }
    async fn prune_complete(
        &self,
        _: Option<&str>,
        _: Duration,
        _: i64,
    ) -> Result<u64, StoreError> {
        unreachable!()
    }
}
