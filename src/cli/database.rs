//! The checkpoint database from the command line: connect (retried until
//! `--startup-timeout`), migrate.

use anyhow::{Context, bail};
use sqs_worker::startup;
use sqs_worker::startup::Verdict;

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

/// Connect to PostgreSQL for an operator command: at once, or one line saying what to fix.
pub async fn connect(database_url: &str, max_connections: u32) -> anyhow::Result<sqlx::PgPool> {
    match probe_database(database_url).await {
        Ok(()) => {}
        Err(Verdict::Fatal(problem)) => return Err(OperatorError(problem).into()),
        Err(Verdict::Transient(problem)) => {
            bail!("{problem}; start it, or fix --database-url / DATABASE_URL")
        }
    }
    sqs_worker::connect_database(database_url, max_connections)
        .await
        .with_context(|| {
            format!(
                "cannot connect to the database at {}",
                redact_url(database_url)
            )
        })
}

/// `sqs-worker migrate`.
pub async fn migrate(database_url: &str) -> anyhow::Result<()> {
    let pool = connect(database_url, 2).await?;
    sqs_worker::MIGRATOR
        .run(&pool)
        .await
        .context("applying migrations failed")?;
    tracing::info!("database schema is up to date");
    Ok(())
}

/// A pool for a worker, with the migrations applied unless the schema is managed elsewhere.
/// A database that cannot be reached yet is tried again until `deadline`.
pub(super) async fn connect_migrated(
    database_url: &str,
    connections: u32,
    migrate: bool,
    deadline: std::time::Instant,
) -> anyhow::Result<sqlx::PgPool> {
    startup::retry_until(
        "connecting to the database",
        deadline,
        || probe_database(database_url),
        Verdict::clone,
    )
    .await?;
    let pool = sqs_worker::connect_database(database_url, connections)
        .await
        .with_context(|| {
            format!(
                "cannot connect to the database at {}",
                redact_url(database_url)
            )
        })?;
    if migrate {
        sqs_worker::MIGRATOR.run(&pool).await.context(
            "applying migrations failed (use --no-migrate if the schema is managed elsewhere)",
        )?;
    }
    Ok(pool)
}
