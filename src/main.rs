//! The `sqs-worker` binary: parse options, start logging, wire the shutdown signal and
//! dispatch to `cli`. Everything a test needs lives in the library.

use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use cli::args::{CheckpointsCommand, Cli, Command, DeadLettersCommand, DlqCommand};
use cli::demo;
use sqs_worker::telemetry;
use tokio_util::sync::CancellationToken;

mod cli;

/// Exit 0 on success; on failure one line on stderr (no backtrace, even with
/// RUST_BACKTRACE set: these are operators' errors, not bugs) and exit 2 for what an operator
/// must fix, 1 for anything else.
fn main() -> ExitCode {
    let args = Cli::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    // The gRPC trace exporter is built on the runtime it will send from.
    let traces = {
        let _inside = runtime.enter();
        telemetry::init(args.log_format)
    };
    let result = runtime.block_on(dispatch(args));
    // The spans of the drain (SIGTERM, --exit-when-idle) are sent before the process ends.
    traces.shutdown();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {}", cli::one_line(&error));
            ExitCode::from(cli::exit_status(&error))
        }
    }
}

async fn dispatch(args: Cli) -> anyhow::Result<()> {
    let shutdown = CancellationToken::new();
    tokio::spawn(cancel_on_signal(shutdown.clone()));

    match args.command {
        Command::Migrate(db) => cli::migrate(&db.database_url).await,
        Command::Run(run) => cli::run(run, shutdown).await.map(|_| ()),
        Command::Lambda(lambda) => cli::lambda(lambda).await,
        Command::Demo(options) => demo::run(options, shutdown).await,
        Command::Redrive(redrive) => cli::redrive(redrive).await,
        Command::Send(send) => cli::send(send).await,
        Command::Console(console) => cli::console(console, shutdown).await,
        Command::Dlq {
            command: DlqCommand::Peek(peek),
        } => cli::dlq_peek(peek).await,
        Command::DeadLetters { command } => match command {
            DeadLettersCommand::List(list) => cli::dead_letters_list(list, false).await,
            DeadLettersCommand::Export(list) => cli::dead_letters_list(list, true).await,
            DeadLettersCommand::Show(one) => cli::dead_letter_show(one).await,
            DeadLettersCommand::Requeue(one) => cli::dead_letter_requeue(one).await,
        },
        Command::Checkpoints {
            command: CheckpointsCommand::Show(show),
        } => cli::show_checkpoint(show).await,
        Command::Checkpoints {
            command: CheckpointsCommand::Prune(prune),
        } => cli::prune_checkpoints(prune).await,
        Command::Checkpoints {
            command: CheckpointsCommand::Stale(stale),
        } => cli::stale_checkpoints(stale).await,
    }
}

/// Cancel `token` on SIGTERM (ECS, Kubernetes, systemd) or SIGINT (Ctrl-C); a second signal
/// exits at once for an operator who does not want to wait for the drain.
async fn cancel_on_signal(token: CancellationToken) -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received; draining"),
        _ = int.recv() => tracing::info!("SIGINT received; draining (press Ctrl-C again to exit now)"),
    }
    token.cancel();
    tokio::select! {
        _ = term.recv() => {},
        _ = int.recv() => {},
    }
    tracing::warn!("second signal received; exiting without waiting for handlers");
    std::process::exit(130);
}
