//! The checkpoint store from the command line: open it by URL (PostgreSQL retried until
//! `--startup-timeout`), migrate.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use sqs_worker::startup;
use sqs_worker::startup::Verdict;
use sqs_worker::store::{self, CheckpointStore, DynamoStore, StoreError, StoreKind};

use super::output::{OperatorError, redact_url};

/// One direct connection attempt, judged: the pool's own connect would wait out its acquire
/// timeout and then report only that it timed out, hiding a refused connection or a wrong
/// password behind ten seconds of silence.
pub(super) async fn probe_database(database_url: &str) -> Result<(), Verdict> {
    use sqlx::Connection;
    match sqlx::PgConnection::connect(database_url).await {
        Ok(connection) => {
            let _ = connection.close().await;
            Ok(())
        }
        Err(error) => Err(startup::judge_database(&error, &redact_url(database_url))),
    }
}

/// The kind of store `url` names, or the one line that says what a store URL looks like.
pub(super) fn store_kind(url: &str) -> anyhow::Result<StoreKind> {
    StoreKind::of_url(url).ok_or_else(|| {
        OperatorError(format!(
            "{} is not a checkpoint store URL: use postgres://USER@HOST/DB, sqlite://PATH \
             (a file, created by `migrate` or `run`), sqlite::memory: or dynamodb://TABLE",
            redact_url(url)
        ))
        .into()
    })
}

/// The file a `sqlite://PATH` URL names (None in memory).
pub(super) fn sqlite_file(url: &str) -> Option<PathBuf> {
    let rest = url
        .strip_prefix("sqlite://")
        .or_else(|| url.strip_prefix("sqlite:"))?;
    let path = rest.split('?').next().unwrap_or_default();
    (!path.is_empty() && path != ":memory:" && !url.contains("mode=memory"))
        .then(|| PathBuf::from(path))
}

/// Open the store for an operator command: at once, or one line saying what to fix. An
/// operator command never creates a SQLite file: a missing one is a wrong path.
pub async fn open_store(url: &str, connections: u32) -> anyhow::Result<Arc<dyn CheckpointStore>> {
    if store_kind(url)? == StoreKind::Postgres {
        check_postgres(url).await?;
    } else if let Some(file) = sqlite_file(url)
        && !file.exists()
    {
        return Err(OperatorError(format!(
            "no SQLite checkpoint database at {}: check the path, or create it with \
             `sqs-worker migrate`",
            file.display()
        ))
        .into());
    }
    open(url, connections).await
}

async fn check_postgres(url: &str) -> anyhow::Result<()> {
    match probe_database(url).await {
        Ok(()) => Ok(()),
        Err(Verdict::Fatal(problem)) => Err(OperatorError(problem).into()),
        Err(Verdict::Transient(problem)) => {
            bail!("{problem}; start it, or fix --database-url / DATABASE_URL")
        }
    }
}

async fn open(url: &str, connections: u32) -> anyhow::Result<Arc<dyn CheckpointStore>> {
    store::open(url, connections)
        .await
        .with_context(|| format!("cannot open the checkpoint store at {}", redact_url(url)))
}

/// Open a store for a worker: DynamoDB's with its checkpoints' TTL (`--retention`).
async fn open_for_worker(
    url: &str,
    connections: u32,
    retention: Duration,
) -> anyhow::Result<Arc<dyn CheckpointStore>> {
    if store_kind(url)? != StoreKind::Dynamodb {
        return open(url, connections).await;
    }
    let store = DynamoStore::connect(url)
        .await
        .with_context(|| format!("cannot open the checkpoint store at {url}"))?;
    Ok(Arc::new(store.with_retention(retention)))
}

/// `sqs-worker migrate`: create the SQLite file if missing, bring the schema up to date.
pub async fn migrate(database_url: &str) -> anyhow::Result<()> {
    let store = open_migrated_store(database_url, 2).await?;
    tracing::info!(store = %store.kind(), "database schema is up to date");
    Ok(())
}

/// A store for the demo: created and migrated, at once or one line saying what to fix.
pub async fn open_migrated_store(
    url: &str,
    connections: u32,
) -> anyhow::Result<Arc<dyn CheckpointStore>> {
    if store_kind(url)? == StoreKind::Postgres {
        check_postgres(url).await?;
    }
    let store = open(url, connections).await?;
    migrate_store(store.as_ref(), "").await?;
    Ok(store)
}

/// Apply the migrations; a schema migrated by a newer version is the operator's to resolve
/// (exit 2: rerunning cannot help), anything else says `hint` after the cause.
pub(super) async fn migrate_store(store: &dyn CheckpointStore, hint: &str) -> anyhow::Result<()> {
    match store.migrate().await {
        Ok(()) => Ok(()),
        Err(newer @ StoreError::NewerSchema(_)) => Err(OperatorError(newer.to_string()).into()),
        Err(other) => {
            Err(anyhow::Error::new(other).context(format!("applying migrations failed{hint}")))
        }
    }
}

/// A store for a worker, with the migrations applied unless the schema is managed elsewhere.
/// A PostgreSQL server that cannot be reached yet is tried again until `deadline`; a SQLite
/// file is created if missing.
pub(super) async fn open_migrated(
    database_url: &str,
    connections: u32,
    retention: Duration,
    migrate: bool,
    deadline: std::time::Instant,
) -> anyhow::Result<Arc<dyn CheckpointStore>> {
    if store_kind(database_url)? == StoreKind::Postgres {
        startup::retry_until(
            "connecting to the database",
            deadline,
            || probe_database(database_url),
            Verdict::clone,
        )
        .await?;
    }
    let store = open_for_worker(database_url, connections, retention).await?;
    if migrate {
        migrate_store(
            store.as_ref(),
            " (use --no-migrate if the schema is managed elsewhere)",
        )
        .await?;
    }
    Ok(store)
}
