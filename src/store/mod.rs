//! The checkpoint store: one record per event, keyed by `(scope, idempotency_key)`, behind
//! one contract every store keeps. [`PostgresStore`] serves fleets, [`SqliteStore`] the
//! workers of one host (and demos, and handler tests), [`DynamoStore`] Lambda and
//! serverless teams; [`open`] picks one by URL.
//!
//! No other module holds a query: the worker, the Lambda adapter, handlers' steps and the
//! operator commands all go through [`CheckpointStore`].
//!
//! # The contract
//!
//! - **Claims** ([`Claims`]): a receive batch is claimed in one round trip where the store
//!   allows it (SQL: one statement; DynamoDB: parallel conditional writes), with an outcome
//!   per key. A failed event is claimed again only by a later redrive pass.
//! - **Fencing**: every write after a claim names the claim's [`Lease`] and changes nothing
//!   once another claim holds the event; the method says so (`false`, `None`, or a key left
//!   out of its answer) and the caller leaves the message to the new holder.
//! - **Steps** ([`Steps`]): a step is appended only at its index, so it is never recorded
//!   twice or out of order.
//! - **Dead letters and the redrive audit** ([`DeadLetters`]), **lookups and retention**
//!   ([`Retention`]): every operator command works on every store.
//! - **The operator log** ([`OperatorLog`]): the console's audit of what operators did, the
//!   redrive runs read back, and the one checkpoint write an edited body needs.
//! - **Local writes atomic with a step** are a store's own capability, not part of the
//!   contract: the store's transaction (PostgreSQL, SQLite) or `TransactWriteItems`
//!   (DynamoDB). A handler reaches PostgreSQL's through [`CheckpointStore::postgres`] and
//!   SQLite's through [`CheckpointStore::sqlite`]; a handler declares which it uses
//!   ([`crate::Handler::step_transactions`]) and a worker refuses to start on another.
//!
//! # Why a trait object
//!
//! Workers hold their store as `Arc<dyn CheckpointStore>`: the store is picked at run time
//! (from a URL), and one `Worker`, `Job`, Lambda adapter and set of operator commands serve
//! every store. A type parameter instead would spread through all of them and compile each
//! once per store, for nothing: a virtual call (and the boxed future `async-trait` makes per
//! call) costs nanoseconds, while every store call is a network or disk round trip of a
//! millisecond or more.

use std::collections::HashMap;
use std::fmt::Debug;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde_json::Value;

pub mod dynamodb;
mod epoch;
mod operator_log;
pub mod postgres;
pub mod sqlite;
mod types;

pub use dynamodb::DynamoStore;
pub use operator_log::{NewOperatorAction, OperatorAction, OperatorLog, RedriveRun};
pub use postgres::PostgresStore;
pub use sqlite::SqliteStore;
pub(crate) use types::passes_by_key;
pub use types::{
    Checkpoint, Claim, ClaimOutcome, ClaimRequest, ClaimTerms, Completion, DeadLetter, Lease,
    NewDeadLetter, NewStep, RecordedStep, RedriveCounts, StepRecord, StoreError, Written,
    parse_steps, storable_text,
};

/// The whole contract: everything a worker, the Lambda adapter and the operator commands
/// ask of a store, by concern in the supertraits ([`Claims`], [`Steps`], [`DeadLetters`],
/// [`Retention`], [`OperatorLog`]).
#[async_trait]
pub trait CheckpointStore:
    Claims + Steps + DeadLetters + Retention + OperatorLog + Debug + Send + Sync
{
    /// Which store this is (its `Display` is the name operators use: `postgresql`).
    fn kind(&self) -> StoreKind;

    /// How long after its end a lease still counts as held: zero where the store's own clock
    /// judges leases (PostgreSQL's, SQLite's host's), a margin for workers' clocks that
    /// disagree where the workers judge them (DynamoDB).
    fn lease_grace(&self) -> Duration {
        Duration::ZERO
    }

    /// Bring the store's schema up to date (`sqs-worker migrate`, and `run` at its start).
    /// Safe to run from several processes at once.
    async fn migrate(&self) -> Result<(), StoreError>;

    /// The cheapest round trip, for the readiness probe.
    async fn ping(&self) -> Result<(), StoreError>;

    /// The same store on connections of its own, at most `connections` (opened on demand).
    /// The worker's own statements — claims, renewals, completions, the readiness probe —
    /// run there, so handlers holding connections through their steps' transactions cannot
    /// starve them (a starved renewal stops a handler; a starved probe stops receiving, the
    /// store taken for down). A store without a pool answers a handle on itself.
    fn own_connections(&self, connections: u32) -> Arc<dyn CheckpointStore>;

    /// The PostgreSQL store behind this one, if it is one: the capability behind
    /// [`crate::Job::step_tx`] (a handler's writes in the checkpoint's own transaction).
    ///
    /// A typed accessor rather than an `as_any` downcast: it says in the contract which
    /// capabilities exist, and a store that wraps another (one adding metrics, say) can
    /// forward it, where a downcast would see only the wrapper's type. Other stores answer
    /// `None` (the default); a store with a transaction of its own adds its own accessor.
    fn postgres(&self) -> Option<&PostgresStore> {
        None
    }

    /// The SQLite store behind this one, if it is one: the capability behind
    /// [`crate::Job::step_tx_sqlite`]. Other stores answer `None`.
    fn sqlite(&self) -> Option<&SqliteStore> {
        None
    }

    /// The DynamoDB store behind this one, if it is one. Other stores answer `None`.
    fn dynamodb(&self) -> Option<&DynamoStore> {
        None
    }
}

/// The kinds of checkpoint store.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StoreKind {
    /// [`PostgresStore`]: `postgres://…` or `postgresql://…`.
    Postgres,
    /// [`SqliteStore`]: `sqlite://PATH` or `sqlite::memory:`.
    Sqlite,
    /// [`DynamoStore`]: `dynamodb://TABLE`.
    Dynamodb,
}

impl StoreKind {
    /// The store a URL names, by its scheme; None for any other URL.
    pub fn of_url(url: &str) -> Option<StoreKind> {
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Some(StoreKind::Postgres)
        } else if url.starts_with("sqlite:") {
            Some(StoreKind::Sqlite)
        } else if url.starts_with("dynamodb://") {
            Some(StoreKind::Dynamodb)
        } else {
            None
        }
    }

    /// The name operators use.
    pub fn name(self) -> &'static str {
        match self {
            StoreKind::Postgres => "postgresql",
            StoreKind::Sqlite => "sqlite",
            StoreKind::Dynamodb => "dynamodb",
        }
    }
}

impl std::fmt::Display for StoreKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Open the store a URL names — `postgres://…`, `sqlite://PATH` (created if missing),
/// `sqlite::memory:` or `dynamodb://TABLE` — with at most `max_connections` (SQL stores). It is not migrated: see
/// [`CheckpointStore::migrate`].
pub async fn open(url: &str, max_connections: u32) -> Result<Arc<dyn CheckpointStore>, StoreError> {
    match StoreKind::of_url(url) {
        Some(StoreKind::Postgres) => Ok(Arc::new(
            PostgresStore::connect(url, max_connections).await?,
        )),
        Some(StoreKind::Sqlite) => Ok(Arc::new(SqliteStore::connect(url, max_connections).await?)),
        Some(StoreKind::Dynamodb) => Ok(Arc::new(DynamoStore::connect(url).await?)),
        None => Err(StoreError::UnknownUrl),
    }
}

/// Claims and leases: which claim runs an event, and until when.
#[async_trait]
pub trait Claims: Send + Sync {
    /// Claim the events of one receive batch for the lease `token`, in one round trip
    /// where the store allows it. Returns an outcome per distinct key.
    ///
    /// A new key is claimed with `attempts` 1; an `in_progress` event whose lease expired
    /// (or was released) is taken over with `attempts + 1`; a `failed` event is claimed by a
    /// request with `reclaim_failed` whose pass is later than the one stored. An event is
    /// only claimed for a delivery carrying its stored payload (unless
    /// `terms.accept_mismatch`): of several requests for one key, the first with the
    /// stored payload. A retry with the same `token` finds its own lease (same attempt).
    async fn claim_batch(
        &self,
        scope: &str,
        token: &str,
        terms: &ClaimTerms,
        requests: &[ClaimRequest],
    ) -> Result<HashMap<String, ClaimOutcome>, StoreError>;

    /// Mark events complete and end their leases, each fenced by its lease token; an event's
    /// last step, when given, is appended (at its index) by the same write, so the step and
    /// the completion are durable together or not at all. One answer per event, in order:
    /// [`Written::Done`] when it is complete under its token (a retry recognises its own
    /// commit), [`Written::NotHeld`] when another claim took its lease (or the step is not
    /// next), [`Written::TooLarge`] when its last step can never be stored.
    async fn complete_events(
        &self,
        scope: &str,
        events: &[Completion],
    ) -> Result<Vec<Written>, StoreError>;

    /// [`Claims::complete_events`] without steps: each entry is `(key, lease token)`.
    /// Returns the entries that are complete under their token.
    async fn complete_batch(
        &self,
        scope: &str,
        entries: &[(String, String)],
    ) -> Result<Vec<(String, String)>, StoreError> {
        let events: Vec<Completion> = entries
            .iter()
            .map(|(key, token)| Completion::new(key, token))
            .collect();
        let written = self.complete_events(scope, &events).await?;
        Ok(entries
            .iter()
            .zip(written)
            .filter(|(_, written)| *written == Written::Done)
            .map(|(entry, _)| entry.clone())
            .collect())
    }

    /// Give the lease back after a retryable failure, with `error` as the event's last
    /// error, so the next delivery can claim at once. False when the lease was not ours.
    async fn release(&self, lease: &Lease, error: &str) -> Result<bool, StoreError>;

    /// Give back a claim whose handler never started, taking back the attempt it counted.
    /// False when the lease was not ours.
    async fn release_unstarted(&self, lease: &Lease) -> Result<bool, StoreError>;

    /// Heartbeat: the lease ends `duration` from now. False when it is no longer ours.
    async fn renew_lease(&self, lease: &Lease, duration: Duration) -> Result<bool, StoreError>;

    /// Renew the leases `token` holds on several events (a FIFO group's events waiting
    /// behind the one that runs). Returns the keys still held.
    async fn renew_leases(
        &self,
        scope: &str,
        token: &str,
        keys: &[String],
        duration: Duration,
    ) -> Result<Vec<String>, StoreError>;

    /// Start the run of an event claimed a while ago (a FIFO event whose turn came): a
    /// fresh lease of `duration` and a run deadline `run_limit` (at least the lease) from
    /// now. False when another claim took the event meanwhile: it must not run here.
    async fn start_run(
        &self,
        lease: &Lease,
        duration: Duration,
        run_limit: Duration,
    ) -> Result<bool, StoreError>;

    /// Mark a claimed event failed (it went to the DLQ), with `error` as its last error.
    /// False when the lease was not ours.
    async fn mark_failed(&self, lease: &Lease, error: &str) -> Result<bool, StoreError>;
}

/// Steps: a handler's completed steps, recorded before the next one starts.
#[async_trait]
pub trait Steps: Send + Sync {
    /// Append the steps of several events of `scope` in one round trip where the store
    /// allows it (SQL: one statement; DynamoDB: parallel conditional writes): each only if
    /// its token still holds the event's lease and exactly `index` steps are recorded. One
    /// answer per record, in order ([`Written::NotHeld`]: the lease was lost, or the step is
    /// already there).
    async fn record_steps(
        &self,
        scope: &str,
        records: &[StepRecord],
    ) -> Result<Vec<Written>, StoreError>;

    /// Append step number `index` (0-based) named `name` with its `output`, only if the
    /// lease is still ours and exactly `index` steps are recorded. False otherwise (the
    /// lease was lost, or the step is already there); [`StoreError::TooLarge`] when it can
    /// never be stored.
    async fn record_step(
        &self,
        lease: &Lease,
        index: usize,
        name: &str,
        output: &Value,
    ) -> Result<bool, StoreError> {
        let record = StepRecord {
            key: lease.key.clone(),
            token: lease.token.clone(),
            step: NewStep {
                index,
                name: name.to_owned(),
                output: output.clone(),
            },
        };
        let written = self.record_steps(&lease.scope, &[record]).await?;
        match written.into_iter().next() {
            Some(Written::Done) => Ok(true),
            Some(Written::TooLarge(detail)) => Err(StoreError::TooLarge(detail)),
            Some(Written::NotHeld) | None => Ok(false),
        }
    }
}

/// Dead letters (messages that ended for good), failures without a key, and the audit of
/// redrive runs.
#[async_trait]
pub trait DeadLetters: Send + Sync {
    /// Record a message that ends for good and (with `mark_checkpoint`) mark its event
    /// failed, atomically: both or neither. The event is left alone when it is complete or
    /// leased by a claim other than `token`. With a `token` (a claimed event's final pass),
    /// an event that could not be marked means the lease was taken over: nothing is
    /// recorded and `None` is returned. Otherwise the letter's id.
    async fn record_dead_letter(
        &self,
        letter: &NewDeadLetter<'_>,
        mark_checkpoint: bool,
        token: Option<&str>,
    ) -> Result<Option<i64>, StoreError>;

    /// Record a failed event for a message that never got a claim because no key could be
    /// taken from it; `key` is derived from the body's hash. A complete event is left alone.
    async fn record_unkeyed_failure(
        &self,
        scope: &str,
        key: &str,
        payload_sha256: &str,
        message_id: &str,
        error: &str,
    ) -> Result<(), StoreError>;

    /// Dead letters, newest first, optionally of one scope; at most `limit`.
    async fn list_dead_letters(
        &self,
        scope: Option<&str>,
        limit: i64,
    ) -> Result<Vec<DeadLetter>, StoreError>;

    /// One dead letter by id.
    async fn find_dead_letter(&self, id: i64) -> Result<Option<DeadLetter>, StoreError>;

    /// Note that a dead letter was sent back on purpose (`dead-letters requeue`).
    async fn mark_dead_letter_requeued(&self, id: i64) -> Result<(), StoreError>;

    /// Open the audit record of a redrive run; returns its id.
    async fn start_redrive_audit(
        &self,
        operator: &str,
        dlq_url: &str,
        target_url: &str,
        max_redrives: i32,
        dry_run: bool,
    ) -> Result<i64, StoreError>;

    /// Close the audit record of a redrive run with its counts.
    async fn finish_redrive_audit(&self, id: i64, counts: &RedriveCounts)
    -> Result<(), StoreError>;
}

/// Lookups and retention: what operators ask of the checkpoints themselves.
#[async_trait]
pub trait Retention: Send + Sync {
    /// Look one checkpoint up.
    async fn find(&self, scope: &str, key: &str) -> Result<Option<Checkpoint>, StoreError>;

    /// Events left `in_progress` with no live lease for longer than `idle_for` (their holder
    /// stopped and nothing took them over), in `scope` or all; oldest first, at most `limit`.
    async fn list_stale(
        &self,
        scope: Option<&str>,
        idle_for: Duration,
        limit: i64,
    ) -> Result<Vec<Checkpoint>, StoreError>;

    /// Mark a stale event (see [`Retention::list_stale`]) failed with `reason` as its last
    /// error, unless it was claimed again meanwhile. Returns whether it was marked.
    async fn mark_stale_failed(
        &self,
        scope: &str,
        key: &str,
        idle_for: Duration,
        reason: &str,
    ) -> Result<bool, StoreError>;

    /// Delete up to `limit` complete checkpoints completed more than `older_than` ago (in
    /// `scope`, or all), skipping any in use. Returns how many were deleted.
    async fn prune_complete(
        &self,
        scope: Option<&str>,
        older_than: Duration,
        limit: i64,
    ) -> Result<u64, StoreError>;
}
