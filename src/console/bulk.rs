//! Bulk redrive by filter: a dry run first (what would happen to each message, by checkpoint
//! status), then the run itself in the background, its progress streamed to the page as
//! server-sent events until the closing summary.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, State};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Redirect, Response};
use futures_util::Stream;
use maud::html;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::redrive::{self, Action, Outcome, RedriveOptions, RedriveReport};
use crate::store::{NewOperatorAction, RedriveCounts};

use super::actions::{audit, describe};
use super::auth::{CsrfForm, Mutation, Session};
use super::pages::{Page, dlq_index, failure, not_found, unprocessable};
use super::render::{self, Frame, preview, queue_name};
use super::sample::MessageFilter;
use super::{Console, Shared};

/// The bulk forms' fields: the filter, and (confirming) how many the dry run matched.
#[derive(Debug, Deserialize)]
pub(crate) struct BulkForm {
    csrf: String,
    #[serde(flatten)]
    filter: MessageFilter,
    #[serde(default)]
    expected: Option<u64>,
}

impl CsrfForm for BulkForm {
    fn csrf(&self) -> &str {
        &self.csrf
    }
}

/// The most recent outcomes a progress update carries.
const RECENT: usize = 12;

/// A bulk run's progress, as the page and its event stream show it.
#[derive(Debug, Clone, Default, Serialize)]
pub(crate) struct Progress {
    /// Messages that matched the filter and were acted on.
    pub(crate) examined: u64,
    /// What was done with them, as the run's audit row counts it.
    #[serde(flatten)]
    pub(crate) counts: RedriveCounts,
    pub(crate) filtered_out: u64,
    /// How many the dry run matched, when confirmed from one.
    pub(crate) expected: Option<u64>,
    /// The latest outcomes: message id, key, what was done.
    pub(crate) recent: Vec<(String, String, String)>,
    /// Set when the run ended.
    pub(crate) summary: Option<String>,
    /// Set when the run stopped on an error.
    pub(crate) error: Option<String>,
}

impl Progress {
    fn heard(&mut self, outcome: &Outcome) {
        if outcome.action == Action::FilteredOut {
            self.filtered_out += 1;
            return;
        }
        self.counts.add(&outcome.action);
        self.examined += 1;
        self.recent.insert(
            0,
            (
                outcome.message_id.clone(),
                preview(&outcome.key, 40),
                describe(&outcome.action),
            ),
        );
        self.recent.truncate(RECENT);
    }

    pub(crate) fn finished(&self) -> bool {
        self.summary.is_some() || self.error.is_some()
    }
}

/// One bulk run.
pub(crate) struct BulkRun {
    pub(crate) dlq: usize,
    pub(crate) filter: MessageFilter,
    pub(crate) progress: watch::Receiver<Progress>,
}

/// The dry run: every matching message and what a real run would do with it.
pub(crate) async fn dry_run(
    State(console): State<Shared>,
    Path(dlq): Path<usize>,
    Mutation(form, session): Mutation<BulkForm>,
) -> Response {
    let frame = Frame::new(&console, &session);
    dry_run_page(frame, &console, &session, dlq, &form)
        .await
        .unwrap_or_else(|r| r)
}

fn bulk_options(
    frame: Frame<'_>,
    console: &Console,
    session: &Session,
    dlq: usize,
    filter: &MessageFilter,
    dry_run: bool,
) -> Result<RedriveOptions, Response> {
    let mut options = console.redrive_options(dlq, &session.operator);
    options.dry_run = dry_run;
    options.filter = filter.to_filter().map_err(|problem| {
        unprocessable(
            frame,
            "Filter not understood",
            html! { p.error { (problem) } },
        )
    })?;
    Ok(options)
}

async fn dry_run_page(
    frame: Frame<'_>,
    console: &Console,
    session: &Session,
    dlq: usize,
    form: &BulkForm,
) -> Page {
    let dlq = dlq_index(frame, console, dlq)?;
    let options = bulk_options(frame, console, session, dlq, &form.filter, true)?;
    let mut outcomes = Vec::new();
    let report = redrive::redrive(console.client.clone(), &*console.store, &options, |o| {
        if o.action != Action::FilteredOut {
            outcomes.push(o.clone());
        }
    })
    .await
    .map_err(|e| failure(frame, "the dry run", e))?;
    let by_status = by_checkpoint_status(&outcomes);
    let url = &console.config.dlq_urls[dlq];
    let body = html! {
        p.summary { "A redrive of " (form.filter.describe()) " in " (queue_name(url)) " would act on "
            span #would { (outcomes.len()) } " message(s) (" (report.filtered_out) " others stay):" }
        table.summary {
            thead { tr { th { "Checkpoint status" } th { "Would" } th { "Messages" } } }
            tbody { @for ((status, action), count) in &by_status { tr { td { (status) } td { (action) } td.n { (count) } } } }
        }
        @if !outcomes.is_empty() {
            form.confirm method="post" action={ "/dlq/" (dlq) "/bulk" } {
                (frame.csrf_field())
                input type="hidden" name="reason" value=(form.filter.reason);
                input type="hidden" name="filter" value=(form.filter.filter);
                input type="hidden" name="expected" value=(outcomes.len());
                button type="submit" id="confirm-bulk" { "Confirm: redrive " (outcomes.len()) " message(s)" }
                " " a href={ "/dlq/" (dlq) "?" (form.filter.query()) } { "Cancel" }
            }
        }
        h2 { "Each message" }
        table.messages {
            thead { tr { th { "Message" } th { "Key" } th { "Redrives so far" } th { "Checkpoint" } th { "Would" } } }
            tbody {
                @for o in &outcomes {
                    tr { td.mono { (preview(&o.message_id, 13)) } td.mono { (preview(&o.key, 40)) }
                        td.n { (o.previous_redrive_count.map(|c| c.to_string()).unwrap_or_else(|| "unreadable".into())) }
                        td { (o.checkpoint_status.as_deref().unwrap_or("none")) } td { (describe(&o.action)) } }
                }
            }
        }
    };
    Ok(render::page("Dry run", Some(frame), body).into_response())
}

/// Counts by (checkpoint status, action kind).
fn by_checkpoint_status(outcomes: &[Outcome]) -> BTreeMap<(String, &'static str), usize> {
    let mut counts = BTreeMap::new();
    for o in outcomes {
        let status = o.checkpoint_status.clone().unwrap_or_else(|| "none".into());
        let action = match o.action {
            Action::Redriven {
                final_pass: true, ..
            } => "redrive (final pass)",
            Action::Redriven { .. } => "redrive",
            Action::AlreadyComplete => "delete (already complete)",
            Action::Exhausted { .. } => "record in dead_letters, delete",
            Action::Failed { .. } => "fail",
            Action::FilteredOut => "stay",
        };
        *counts.entry((status, action)).or_default() += 1;
    }
    counts
}

/// Start a confirmed bulk redrive in the background and go to its progress page.
pub(crate) async fn start(
    State(console): State<Shared>,
    Path(dlq): Path<usize>,
    Mutation(form, session): Mutation<BulkForm>,
) -> Response {
    let frame = Frame::new(&console, &session);
    start_run(frame, &console, &session, dlq, form).unwrap_or_else(|r| r)
}

fn start_run(
    frame: Frame<'_>,
    console: &Shared,
    session: &Session,
    dlq: usize,
    form: BulkForm,
) -> Result<Response, Response> {
    let dlq = dlq_index(frame, console, dlq)?;
    let options = bulk_options(frame, console, session, dlq, &form.filter, false)?;
    let (sender, receiver) = watch::channel(Progress {
        expected: form.expected,
        ..Progress::default()
    });
    let id = {
        let mut runs = console.bulk_runs.lock().expect("not poisoned");
        let id = runs.len() as u64 + 1;
        runs.insert(
            id,
            Arc::new(BulkRun {
                dlq,
                filter: form.filter.clone(),
                progress: receiver,
            }),
        );
        id
    };
    let console = console.clone();
    let operator = session.operator.clone();
    tokio::spawn(async move {
        let report = redrive::redrive(console.client.clone(), &*console.store, &options, |o| {
            sender.send_modify(|p| p.heard(o))
        })
        .await;
        console.forget_sample(dlq);
        finish(&console, &operator, dlq, &form.filter, &sender, report).await;
    });
    Ok(Redirect::to(&format!("/bulk/{id}")).into_response())
}

async fn finish(
    console: &Console,
    operator: &str,
    dlq: usize,
    filter: &MessageFilter,
    sender: &watch::Sender<Progress>,
    report: Result<RedriveReport, redrive::RedriveError>,
) {
    let detail = match &report {
        Ok(report) => format!(
            "{}: {} redriven, {} already complete (deleted), {} exhausted (dead_letters), {} failed (kept); redrive run #{} in {:.1} s",
            filter.describe(),
            report.counts.redriven,
            report.counts.skipped_complete,
            report.counts.exhausted,
            report.counts.failed,
            report.audit_id,
            report.elapsed_secs
        ),
        Err(error) => format!(
            "{}: stopped: {error} (nothing was lost: a message leaves the DLQ only after it was sent)",
            filter.describe()
        ),
    };
    let action = NewOperatorAction {
        operator,
        action: "bulk_redrive",
        queue_url: &console.config.dlq_urls[dlq],
        message_id: "",
        key: None,
        before_sha256: None,
        after_sha256: None,
        detail: &detail,
    };
    audit(console, &action).await;
    sender.send_modify(|p| match report {
        Ok(_) => p.summary = Some(detail),
        Err(_) => p.error = Some(detail),
    });
}

/// The run's progress as server-sent events: one `progress` event per change (at most a
/// few per second), then `done`.
pub(crate) async fn events(State(console): State<Shared>, Path(run): Path<u64>) -> Response {
    let Some(run) = console.bulk_run(run) else {
        return (axum::http::StatusCode::NOT_FOUND, "no such bulk run").into_response();
    };
    Sse::new(progress_events(run.progress.clone()))
        .keep_alive(KeepAlive::default())
        .into_response()
}

fn progress_events(
    receiver: watch::Receiver<Progress>,
) -> impl Stream<Item = Result<Event, Infallible>> {
    futures_util::stream::unfold(Some(receiver), |state| async move {
        let mut receiver = state?;
        let progress = receiver.borrow_and_update().clone();
        let event = Event::default()
            .event(if progress.finished() {
                "done"
            } else {
                "progress"
            })
            .data(serde_json::to_string(&progress).unwrap_or_default());
        if progress.finished() {
            return Some((Ok(event), None));
        }
        // Coalesce a burst of outcomes into one event.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let next = match receiver.changed().await {
            Ok(()) => Some(receiver),
            Err(_) => None,
        };
        Some((Ok(event), next))
    })
}

impl Console {
    pub(crate) fn bulk_run(&self, id: u64) -> Option<Arc<BulkRun>> {
        self.bulk_runs
            .lock()
            .expect("not poisoned")
            .get(&id)
            .cloned()
    }
}

/// The progress page's missing run.
pub(crate) fn no_run(frame: Frame<'_>, id: u64) -> Response {
    not_found(
        frame,
        &format!("no bulk run {id} in this console (runs are kept until it stops)"),
    )
}

/// For the progress page: the run's description.
pub(crate) fn title(console: &Console, run: &BulkRun) -> String {
    format!(
        "Redrive of {} in {}",
        run.filter.describe(),
        queue_name(&console.config.dlq_urls[run.dlq])
    )
}
