//! The subcommands behind `main.rs`: CLI glue, so `anyhow` and printing live here.

use std::sync::Arc;

use anyhow::{Context, bail};
use tokio_util::sync::CancellationToken;

use crate::checkpoint::{Checkpoint, CheckpointStore};
use crate::config::{BuiltinHandler, CheckpointsShowArgs, OutputFormat, RunArgs};
use crate::handler::Handler;
use crate::handlers::{ExecHandler, NoopHandler};
use crate::worker::{RunSummary, Worker};

/// Connect to PostgreSQL with an error that says what to do.
pub async fn connect(database_url: &str, max_connections: u32) -> anyhow::Result<sqlx::PgPool> {
    crate::connect_database(database_url, max_connections)
        .await
        .with_context(|| {
            format!(
                "cannot connect to PostgreSQL at {}; start it or set DATABASE_URL",
                redact_url(database_url)
            )
        })
}

/// `sqs-worker migrate`.
pub async fn migrate(database_url: &str) -> anyhow::Result<()> {
    let pool = connect(database_url, 2).await?;
    crate::MIGRATOR
        .run(&pool)
        .await
        .context("applying migrations failed")?;
    tracing::info!("database schema is up to date");
    Ok(())
}

/// `sqs-worker run`.
pub async fn run(args: RunArgs, shutdown: CancellationToken) -> anyhow::Result<RunSummary> {
    let config = args
        .worker_config()
        .map_err(anyhow::Error::msg)
        .context("invalid --key")?;
    let handler: Arc<dyn Handler> = match (ExecHandler::from_command(&args.command), args.handler) {
        (Some(exec), _) => Arc::new(exec),
        (None, Some(BuiltinHandler::Noop)) => Arc::new(NoopHandler),
        (None, None) => bail!(
            "no handler: give a command after `--` (e.g. `sqs-worker run --queue-url URL -- ./handle.sh`) or --handler noop"
        ),
    };
    // Enough connections for the claim, the acker and the handlers' own checkpoint writes.
    let pool = connect(
        &args.database.database_url,
        (config.concurrency as u32 / 2).clamp(4, 32),
    )
    .await?;
    if !args.no_migrate {
        crate::MIGRATOR.run(&pool).await.context(
            "applying migrations failed (use --no-migrate if the schema is managed elsewhere)",
        )?;
    }
    let client = crate::sqs::client_from_env().await;
    let summary = Worker::new(config, client, pool, handler)
        .with_shutdown(shutdown)
        .run()
        .await?;
    Ok(summary)
}

/// `sqs-worker checkpoints show`.
pub async fn show_checkpoint(args: CheckpointsShowArgs) -> anyhow::Result<()> {
    let pool = connect(&args.database.database_url, 1).await?;
    let store = CheckpointStore::new(pool);
    let Some(checkpoint) = store.find(&args.scope, &args.key).await? else {
        bail!(
            "no checkpoint for key {:?} in scope {:?}; the event was never claimed there (check --scope: it defaults to the queue name)",
            args.key,
            args.scope
        );
    };
    match args.format {
        OutputFormat::Json => println!("{}", serde_json::to_string_pretty(&checkpoint)?),
        OutputFormat::Table => print_checkpoint(&checkpoint),
    }
    Ok(())
}

fn print_checkpoint(c: &Checkpoint) {
    let opt_time = |t: Option<chrono::DateTime<chrono::Utc>>| {
        t.map(|t| t.to_rfc3339()).unwrap_or_else(|| "-".into())
    };
    let steps: Vec<String> = c
        .steps
        .as_array()
        .map(|steps| {
            steps
                .iter()
                .filter_map(|s| s["name"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    let rows = [
        ("scope", c.scope.clone()),
        ("key", c.idempotency_key.clone()),
        ("status", c.status.clone()),
        ("attempts", c.attempts.to_string()),
        (
            "steps",
            if steps.is_empty() {
                "-".into()
            } else {
                steps.join(" → ")
            },
        ),
        (
            "lease owner",
            c.lease_owner.clone().unwrap_or_else(|| "-".into()),
        ),
        ("lease expires", opt_time(c.lease_expires_at)),
        ("first message", c.first_message_id.clone()),
        ("last message", c.last_message_id.clone()),
        ("payload sha256", c.payload_sha256.clone()),
        (
            "last error",
            c.last_error.clone().unwrap_or_else(|| "-".into()),
        ),
        ("created", c.created_at.to_rfc3339()),
        ("updated", c.updated_at.to_rfc3339()),
        ("completed", opt_time(c.completed_at)),
    ];
    for (name, value) in rows {
        println!("{name:<15} {value}");
    }
}

/// Hide the password of a database URL for messages.
pub fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme_end), Some(at)) if at > scheme_end => {
            let credentials = &url[scheme_end + 3..at];
            match credentials.find(':') {
                Some(colon) => format!(
                    "{}{}:***{}",
                    &url[..scheme_end + 3],
                    &credentials[..colon],
                    &url[at..]
                ),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::redact_url;

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(
            redact_url("postgres://app:s3cret@db:5432/x"),
            "postgres://app:***@db:5432/x"
        );
        assert_eq!(
            redact_url("postgres://postgres@127.0.0.1/x"),
            "postgres://postgres@127.0.0.1/x"
        );
    }
}
