//! [`DynamoStore`]: the checkpoint store in one DynamoDB table, for Lambda functions and
//! serverless fleets. Same contract as [`PostgresStore`](super::PostgresStore); items in
//! `item.rs`, one file per concern of the contract as there.
//!
//! # Claims without a statement
//!
//! A receive batch is claimed with one conditional `UpdateItem` per event, all at once. The
//! condition says when a claim may take the item (new, an expired or released lease, a failed
//! event reclaimed by a later pass); a refused claim gets the item as it is
//! (`ReturnValuesOnConditionCheckFailure = ALL_OLD`), so it learns who holds the event and
//! for how long without a second read. Every later write is conditional on the lease token.
//!
//! # Time
//!
//! DynamoDB has no clock of its own: leases are stamped and compared with the workers'
//! clocks, which must agree within about a second (NTP, Amazon Time Sync). A lease counts as
//! expired only [`SKEW_MARGIN`] after its end, so a clock that runs ahead by less than that
//! never takes over a live lease; one further off takes over early, and the lease-token
//! condition on every write still keeps each write single.
//!
//! # Retention
//!
//! A completed checkpoint carries `expires_at` (epoch seconds, the table's TTL attribute):
//! DynamoDB deletes it after the retention (default 30 days) without any statement of ours.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use aws_sdk_dynamodb::Client;
use aws_sdk_dynamodb::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_dynamodb::types::{
    AttributeDefinition, BillingMode, GlobalSecondaryIndex, KeySchemaElement, KeyType, Projection,
    ProjectionType, ScalarAttributeType, TableStatus, TimeToLiveSpecification,
};

pub(super) use super::epoch::millis;
use super::epoch::now_ms;
use super::{CheckpointStore, StoreError, StoreKind};
use item::{LIST_PK, LIST_SK, LISTING, PK, TTL};

mod claims;
mod dead_letters;
mod item;
mod operator_log;
mod retention;
mod steps;

pub use steps::{MAX_STEP_ITEMS, StepCommit};

/// How long after its end a lease still counts as held, for clocks that disagree.
pub const SKEW_MARGIN: Duration = Duration::from_secs(2);

/// How long a completed checkpoint is kept by default (its TTL).
pub const DEFAULT_RETENTION: Duration = Duration::from_secs(30 * 86_400);

/// The checkpoint store in a DynamoDB table.
#[derive(Debug, Clone)]
pub struct DynamoStore {
    client: Client,
    table: String,
    retention: Duration,
    /// Added to this process's clock (tests of workers whose clocks disagree).
    skew_ms: i64,
}

impl DynamoStore {
    /// The store in `table`, through `client`.
    pub fn new(client: Client, table: impl Into<String>) -> Self {
        Self {
            client,
            table: table.into(),
            retention: DEFAULT_RETENTION,
            skew_ms: 0,
        }
    }

    /// Open `dynamodb://TABLE` with a client from the environment: the same credentials and
    /// region as SQS, and `AWS_ENDPOINT_URL_DYNAMODB` for a local endpoint.
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        let table = url
            .strip_prefix("dynamodb://")
            .filter(|t| !t.is_empty() && !t.contains('/'))
            .ok_or(StoreError::UnknownUrl)?;
        let config = aws_config::defaults(aws_config::BehaviorVersion::latest())
            .timeout_config(
                aws_config::timeout::TimeoutConfig::builder()
                    .connect_timeout(Duration::from_secs(5))
                    .operation_attempt_timeout(Duration::from_secs(10))
                    .build(),
            )
            .load()
            .await;
        Ok(Self::new(Client::new(&config), table))
    }

    /// Keep completed checkpoints this long (their TTL) instead of 30 days.
    pub fn with_retention(mut self, retention: Duration) -> Self {
        self.retention = retention;
        self
    }

    /// Judge leases by a clock `skew_ms` milliseconds ahead of this process's (behind, when
    /// negative): how the tests play a worker whose clock is off.
    pub fn with_clock_skew(mut self, skew_ms: i64) -> Self {
        self.skew_ms = skew_ms;
        self
    }

    /// Now by this store's clock, in epoch milliseconds (see "Time").
    pub(super) fn now(&self) -> i64 {
        now_ms() + self.skew_ms
    }

    /// The table's name.
    pub fn table(&self) -> &str {
        &self.table
    }

    /// The client, for handlers' own items in `TransactWriteItems`.
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// Create the table if missing (on-demand capacity, the `listing` index, TTL on
    /// `expires_at`) and wait until it is active. Returns whether it created it.
    async fn create_table(&self) -> Result<bool, StoreError> {
        let attribute = |name: &str, kind: ScalarAttributeType| {
            AttributeDefinition::builder()
                .attribute_name(name)
                .attribute_type(kind)
                .build()
                .expect("name and type are set")
        };
        let key = |name: &str, kind: KeyType| {
            KeySchemaElement::builder()
                .attribute_name(name)
                .key_type(kind)
                .build()
                .expect("name and type are set")
        };
        let listing = GlobalSecondaryIndex::builder()
            .index_name(LISTING)
            .key_schema(key(LIST_PK, KeyType::Hash))
            .key_schema(key(LIST_SK, KeyType::Range))
            .projection(
                Projection::builder()
                    .projection_type(ProjectionType::All)
                    .build(),
            )
            .build()
            .expect("index fields are set");
        let created = self
            .client
            .create_table()
            .table_name(&self.table)
            .billing_mode(BillingMode::PayPerRequest)
            .attribute_definitions(attribute(PK, ScalarAttributeType::S))
            .attribute_definitions(attribute(LIST_PK, ScalarAttributeType::S))
            .attribute_definitions(attribute(LIST_SK, ScalarAttributeType::N))
            .key_schema(key(PK, KeyType::Hash))
            .global_secondary_indexes(listing)
            .send()
            .await;
        let created = match created {
            Ok(_) => true,
            Err(error)
                if error
                    .as_service_error()
                    .is_some_and(|e| e.is_resource_in_use_exception()) =>
            {
                false
            }
            Err(error) => return Err(dynamo(error)),
        };
        self.wait_active().await?;
        if created {
            self.client
                .update_time_to_live()
                .table_name(&self.table)
                .time_to_live_specification(
                    TimeToLiveSpecification::builder()
                        .enabled(true)
                        .attribute_name(TTL)
                        .build()
                        .expect("ttl fields are set"),
                )
                .send()
                .await
                .map_err(dynamo)?;
        }
        Ok(created)
    }

    async fn wait_active(&self) -> Result<(), StoreError> {
        for _ in 0..120 {
            let table = self
                .client
                .describe_table()
                .table_name(&self.table)
                .send()
                .await
                .map_err(dynamo)?;
            if table.table().and_then(|t| t.table_status()) == Some(&TableStatus::Active) {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        Err(StoreError::Config(format!(
            "DynamoDB table {} did not become active within 60 s",
            self.table
        )))
    }

    /// Delete the table (tests).
    pub async fn delete_table(&self) -> Result<(), StoreError> {
        self.client
            .delete_table()
            .table_name(&self.table)
            .send()
            .await
            .map_err(dynamo)?;
        Ok(())
    }
}

#[async_trait]
impl CheckpointStore for DynamoStore {
    fn kind(&self) -> StoreKind {
        StoreKind::Dynamodb
    }

    fn lease_grace(&self) -> Duration {
        SKEW_MARGIN
    }

    /// A read of a key no item has: a data-plane request, like the worker's own (the
    /// readiness probe runs every few seconds in every worker, and `DescribeTable` is a
    /// control-plane call with far lower rate limits).
    async fn ping(&self) -> Result<(), StoreError> {
        self.client
            .get_item()
            .table_name(&self.table)
            .key(PK, item::s("PING"))
            .send()
            .await
            .map_err(dynamo)?;
        Ok(())
    }

    /// No connections to share: the SDK's client pools its HTTP connections itself.
    fn own_connections(&self, _connections: u32) -> Arc<dyn CheckpointStore> {
        Arc::new(self.clone())
    }

    async fn migrate(&self) -> Result<(), StoreError> {
        if self.create_table().await? {
            tracing::info!(
                table = %self.table,
                "created the DynamoDB table (on-demand capacity, index `listing`, TTL on `expires_at`)"
            );
        }
        Ok(())
    }

    fn dynamodb(&self) -> Option<&DynamoStore> {
        Some(self)
    }
}

/// A DynamoDB call's failure, as one line: the service's code and message, or the chain of
/// causes of a failure to reach it (no SDK dump).
pub(super) fn dynamo<E>(error: SdkError<E>) -> StoreError
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    if let Some(service) = error.as_service_error() {
        return StoreError::Dynamo(format!(
            "{}: {}",
            service.code().unwrap_or("error"),
            service.message().unwrap_or("no message")
        ));
    }
    let mut text = error.to_string();
    let mut source = std::error::Error::source(&error);
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text = format!("{text}: {cause_text}");
        }
        source = cause.source();
    }
    StoreError::Dynamo(text)
}

/// `ms` as RFC 3339, for steps' `completed_at` (as the SQL stores write it).
pub(super) fn rfc3339(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .unwrap_or_default()
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}
