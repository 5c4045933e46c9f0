//! `redrive` and `dlq peek`: the DLQ through the library's redrive, with progress and a
//! report; or SQS's own move task with `--native`.

use std::collections::HashMap;
use std::io::IsTerminal;

use anyhow::{Context, bail};
use indicatif::ProgressBar;
use sqs_worker::redrive::{Action, Filter, Outcome, RedriveError, RedriveOptions, RedriveReport};
use sqs_worker::sqs::SqsQueue;
use sqs_worker::{redrive, sqs};

use crate::cli::args::{DlqPeekArgs, OutputFormat, RedriveArgs};

use super::database::{migrate_store, open_store};
use super::output::{OperatorError, align_right, human_age, progress_bar, table};
use super::run::key_spec;

pub(super) fn describe_action(action: &Action) -> String {
    match action {
        Action::Redriven {
            redrive_count,
            final_pass,
        } => format!(
            "redrive (count {redrive_count}{})",
            if *final_pass { ", final pass" } else { "" }
        ),
        Action::AlreadyComplete => "already done: delete".into(),
        Action::Exhausted { reason } => format!("{reason}: record in dead_letters, delete"),
        Action::FilteredOut => "filtered out: keep".into(),
        Action::Failed { error } => format!("send failed, kept: {error}"),
    }
}

/// `sqs-worker redrive`.
pub async fn redrive(args: RedriveArgs) -> anyhow::Result<()> {
    let client = sqs::client_from_env().await;
    if args.native {
        return redrive_native(client, &args).await;
    }
    let database_url = args
        .database_url
        .as_deref()
        .context("--database-url (or DATABASE_URL) is required")?;
    let store = open_store(database_url, 2).await?;
    migrate_store(store.as_ref(), "").await?;
    let options = redrive_options(&args)?;
    let mut progress = RedriveProgress::start(&client, &options).await;
    let report =
        redrive::redrive(client, &*store, &options, |outcome| progress.heard(outcome)).await;
    progress.bar.finish_and_clear();
    let report = match report {
        Ok(report) => report,
        Err(RedriveError::Config(problem)) => return Err(OperatorError(problem).into()),
        Err(error) => {
            return Err(anyhow::Error::new(error).context(
                "redrive stopped; nothing was lost (a message leaves the DLQ only after it \
                 was sent). Check AWS credentials, region and AWS_ENDPOINT_URL, then run it \
                 again",
            ));
        }
    };
    match args.format {
        OutputFormat::Json => {
            let messages = progress.outcomes;
            let value = serde_json::json!({ "summary": report, "messages": messages });
            println!("{}", serde_json::to_string_pretty(&value)?);
        }
        OutputFormat::Table => print_redrive(&report, &progress.outcomes),
    }
    if report.counts.failed > 0 {
        bail!(
            "{} message(s) could not be sent and stay in the DLQ; run the redrive again",
            report.counts.failed
        );
    }
    Ok(())
}

/// The library's redrive options from the command line.
fn redrive_options(args: &RedriveArgs) -> anyhow::Result<RedriveOptions> {
    Ok(RedriveOptions {
        dlq_url: args.dlq_url.clone(),
        to: args.to.clone(),
        max_redrives: args.max_redrives,
        rate: args.rate.filter(|r| *r > 0.0),
        limit: args.limit,
        dry_run: args.dry_run,
        include_complete: args.include_complete,
        filter: args
            .filter
            .as_deref()
            .map(Filter::parse)
            .transpose()
            .map_err(anyhow::Error::msg)?,
        scope: args.scope.clone(),
        key: key_spec(&args.key)?,
        envelope: args.key.envelope,
        operator: args
            .operator
            .clone()
            .unwrap_or_else(redrive::default_operator),
    })
}

/// Progress on stderr while a redrive runs: a bar with rate and ETA on a terminal (its
/// length is the DLQ's approximate depth), one line per message otherwise; a dry run keeps
/// every outcome for its table instead.
struct RedriveProgress {
    bar: ProgressBar,
    terminal: bool,
    dry_run: bool,
    outcomes: Vec<Outcome>,
    tally: HashMap<&'static str, u64>,
}

impl RedriveProgress {
    async fn start(client: &aws_sdk_sqs::Client, options: &RedriveOptions) -> Self {
        let terminal = std::io::stderr().is_terminal();
        let bar = if terminal && !options.dry_run {
            let depth = SqsQueue::new(client.clone(), options.dlq_url.clone())
                .message_counts()
                .await
                .ok()
                .map(|counts| counts.visible);
            let length = match (depth, options.limit) {
                (Some(depth), Some(limit)) => Some(depth.min(limit)),
                (depth, limit) => depth.or(limit),
            };
            progress_bar(
                length,
                "{spinner} {pos}/{len} examined · {msg} · {per_sec} · ETA {eta}",
            )
        } else {
            ProgressBar::hidden()
        };
        RedriveProgress {
            bar,
            terminal,
            dry_run: options.dry_run,
            outcomes: Vec::new(),
            tally: HashMap::new(),
        }
    }

    /// One message settled.
    fn heard(&mut self, outcome: &Outcome) {
        let kind = match outcome.action {
            Action::Redriven { .. } => "redriven",
            Action::AlreadyComplete => "already done",
            Action::Exhausted { .. } => "exhausted",
            Action::FilteredOut => "filtered out",
            Action::Failed { .. } => "failed",
        };
        *self.tally.entry(kind).or_default() += 1;
        if self.dry_run {
            self.outcomes.push(outcome.clone());
        } else if self.terminal {
            let count = |kind: &str| self.tally.get(kind).copied().unwrap_or(0);
            let message = format!(
                "{} redriven · {} already done · {} exhausted · {} failed",
                count("redriven"),
                count("already done"),
                count("exhausted"),
                count("failed"),
            );
            self.bar.inc(1);
            self.bar.set_message(message);
        } else {
            eprintln!(
                "{} key={} {}",
                outcome.message_id,
                outcome.key,
                describe_action(&outcome.action)
            );
        }
    }
}

/// The redrive's report as tables: a dry run's per-message plan, then the counts.
fn print_redrive(report: &RedriveReport, outcomes: &[Outcome]) {
    if report.dry_run {
        let mut table = table(&["MESSAGE ID", "KEY", "REDRIVES", "CHECKPOINT", "WOULD"]);
        align_right(&mut table, &[2]);
        for o in outcomes {
            table.add_row(vec![
                o.message_id.clone(),
                o.key.clone(),
                o.previous_redrive_count
                    .map(|c| c.to_string())
                    .unwrap_or_else(|| "?".into()),
                o.checkpoint_status.clone().unwrap_or_else(|| "-".into()),
                describe_action(&o.action),
            ]);
        }
        println!("{}\n", table.trim_fmt());
    }
    let dry_run_note = if report.dry_run {
        " (dry run: nothing changed)"
    } else {
        ""
    };
    println!(
        "redrive #{} to {}{dry_run_note}",
        report.audit_id, report.target_url
    );
    let verb = if report.dry_run { "would be " } else { "" };
    let lines = [
        ("examined".to_owned(), report.examined),
        (format!("{verb}redriven"), report.counts.redriven),
        (
            format!("already done ({verb}deleted)"),
            report.counts.skipped_complete,
        ),
        (
            format!("exhausted ({verb}recorded)"),
            report.counts.exhausted,
        ),
        ("filtered out (kept)".to_owned(), report.filtered_out),
        ("send failures (kept)".to_owned(), report.counts.failed),
    ];
    let mut summary = table(&[]);
    align_right(&mut summary, &[1]);
    for (label, count) in lines {
        summary.add_row(vec![label, count.to_string()]);
    }
    summary.add_row(vec![
        "seconds".to_owned(),
        format!("{:.1}", report.elapsed_secs),
    ]);
    println!("{}", summary.trim_fmt());
}

pub(super) async fn redrive_native(
    client: aws_sdk_sqs::Client,
    args: &RedriveArgs,
) -> anyhow::Result<()> {
    redrive_native_calls(client, args)
        .await
        .context("check --dlq-url, AWS credentials, region and AWS_ENDPOINT_URL")
}

pub(super) async fn redrive_native_calls(
    client: aws_sdk_sqs::Client,
    args: &RedriveArgs,
) -> anyhow::Result<()> {
    let dlq = SqsQueue::new(client, args.dlq_url.clone());
    if args.status {
        let tasks = dlq.list_message_move_tasks().await?;
        match args.format {
            OutputFormat::Json => println!("{}", serde_json::to_string_pretty(&tasks)?),
            OutputFormat::Table => {
                if tasks.is_empty() {
                    println!("no move tasks for this DLQ");
                    return Ok(());
                }
                let mut table = table(&["STATUS", "MOVED", "TO MOVE", "TASK HANDLE", "FAILURE"]);
                align_right(&mut table, &[1, 2]);
                for task in &tasks {
                    let text = |field: &str| task[field].as_str().unwrap_or("-").to_owned();
                    table.add_row(vec![
                        text("status"),
                        task["moved"].to_string(),
                        task["to_move"].to_string(),
                        text("task_handle"),
                        text("failure_reason"),
                    ]);
                }
                println!("{}", table.trim_fmt());
            }
        }
        return Ok(());
    }
    if let Some(handle) = &args.cancel {
        let moved = dlq.cancel_message_move_task(handle).await?;
        println!("cancelled; {moved} message(s) had been moved");
        return Ok(());
    }
    tracing::warn!(
        "--native uses SQS's StartMessageMoveTask: it cannot add redrive markers, so a message \
         that fails again goes back to the DLQ and can loop; prefer the default redrive"
    );
    let destination = match &args.to {
        Some(url) => Some(dlq.sibling(url.clone()).arn().await?),
        None => None,
    };
    let rate = args.rate.map(|r| r.round().clamp(1.0, 500.0) as i32);
    let handle = dlq.start_message_move_task(destination, rate).await?;
    println!("started move task {handle}; follow it with --native --status");
    Ok(())
}

/// `sqs-worker dlq peek`.
pub async fn dlq_peek(args: DlqPeekArgs) -> anyhow::Result<()> {
    let client = sqs::client_from_env().await;
    let key = key_spec(&args.key)?;
    let peeked = redrive::peek(
        client,
        &args.dlq_url,
        args.limit as usize,
        &key,
        args.key.envelope,
    )
    .await
    .context(
        "cannot read the DLQ; check --dlq-url, AWS credentials, region and AWS_ENDPOINT_URL",
    )?;
    match args.format {
        OutputFormat::Json => println!("{}", serde_json::to_string_pretty(&peeked)?),
        OutputFormat::Table => {
            let mut table = table(&[
                "MESSAGE ID",
                "KEY",
                "AGE",
                "RECV",
                "REDRIVES",
                "REASON",
                "BODY",
            ]);
            align_right(&mut table, &[2, 3, 4]);
            for m in &peeked {
                table.add_row(vec![
                    m.message_id.clone(),
                    m.key.clone(),
                    m.age_secs.map(human_age).unwrap_or_else(|| "-".into()),
                    m.receive_count
                        .map(|c| c.to_string())
                        .unwrap_or_else(|| "-".into()),
                    m.redrive_count.to_string(),
                    m.failure_reason.clone().unwrap_or_else(|| "-".into()),
                    m.body_preview.replace('\n', " "),
                ]);
            }
            println!("{}", table.trim_fmt());
            eprintln!(
                "{} message(s) shown; all were made visible again",
                peeked.len()
            );
        }
    }
    Ok(())
}
