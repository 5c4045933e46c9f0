//! The operator log in this store: not yet written (the console's issue).

use async_trait::async_trait;

use super::PostgresStore;
use crate::store::{NewOperatorAction, OperatorAction, OperatorLog, RedriveRun, StoreError};

#[async_trait]
impl OperatorLog for PostgresStore {
    async fn record_operator_action(
        &self,
        _action: &NewOperatorAction<'_>,
    ) -> Result<i64, StoreError> {
        Ok(0)
    }

    async fn list_operator_actions(&self, _limit: i64) -> Result<Vec<OperatorAction>, StoreError> {
        Ok(Vec::new())
    }

    async fn list_redrive_runs(&self, _limit: i64) -> Result<Vec<RedriveRun>, StoreError> {
        Ok(Vec::new())
    }

    async fn adopt_edited_payload(
        &self,
        _scope: &str,
        _key: &str,
        _payload_sha256: &str,
        _field_digests: Option<&str>,
    ) -> Result<bool, StoreError> {
        Ok(false)
    }
}
