//! `sqs-worker console`: the options checked, the store opened and migrated, the console
//! served until SIGTERM or Ctrl-C.

use sqs_worker::console::{self, ConsoleConfig};
use sqs_worker::message::KeySpec;
use sqs_worker::{redrive, sqs};
use tokio_util::sync::CancellationToken;

use crate::cli::args::ConsoleArgs;

use super::database::{migrate_store, open_store};
use super::output::OperatorError;

/// `sqs-worker console`.
pub async fn console(args: ConsoleArgs, shutdown: CancellationToken) -> anyhow::Result<()> {
    console::check_listen(args.listen, args.auth_token.as_deref()).map_err(OperatorError)?;
    let config = console_config(&args)?;
    let store = open_store(&args.database_url, 4).await?;
    migrate_store(store.as_ref(), "").await?;
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .map_err(|e| {
            OperatorError(format!(
                "cannot listen on {}: {e}; choose another --listen address",
                args.listen
            ))
        })?;
    tracing::info!(
        address = %args.listen,
        dlqs = config.dlq_urls.len(),
        read_only = config.read_only,
        login = config.auth_token.is_some(),
        "console listening on http://{}/",
        args.listen
    );
    let client = sqs::client_from_env().await;
    console::serve(config, client, store, listener, shutdown).await?;
    Ok(())
}

fn console_config(args: &ConsoleArgs) -> anyhow::Result<ConsoleConfig> {
    let key = KeySpec::new(args.key.keys.clone())
        .and_then(|k| k.with_fingerprint(args.fingerprint.clone()))
        .map_err(OperatorError)?;
    if args.to.is_some() && args.dlq_urls.len() > 1 {
        return Err(OperatorError(
            "--to names one target for several DLQs; give one --dlq-url per console, or leave \
             --to out so that each DLQ's source queue is used"
                .into(),
        )
        .into());
    }
    Ok(ConsoleConfig {
        dlq_urls: args.dlq_urls.clone(),
        to: args.to.clone(),
        scope: args.scope.clone(),
        key,
        envelope: args.key.envelope,
        max_redrives: args.max_redrives,
        operator: args
            .operator
            .clone()
            .unwrap_or_else(redrive::default_operator),
        auth_token: args.auth_token.clone(),
        read_only: args.read_only,
        sample_size: (args.sample as usize).min(console::MOST_SAMPLED),
        sample_for: args.sample_for,
    })
}
