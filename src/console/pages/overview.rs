//! The overview: per DLQ its depth, oldest message and failure reasons (from a sample), the
//! last redrives; dead letters per day by reason; the latest operator actions. And the audit.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::Extension;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use chrono::{Duration as Days, Utc};
use maud::{Markup, html};

use crate::store::{DeadLetter, OperatorAction, RedriveRun};

use super::super::auth::Session;
use super::super::charts::{self, Day};
use super::super::render::{self, Frame, age, queue_name, shown};
use super::super::sample::{Sample, read_ago};
use super::super::{Console, Shared};
use super::{failure, when};

/// Dead letters read for the chart: the newest this many.
const DEAD_LETTERS_CHARTED: i64 = 2000;
/// Days in the dead-letter chart.
const DAYS_CHARTED: i64 = 7;

pub(crate) async fn page(
    State(console): State<Shared>,
    Extension(session): Extension<Arc<Session>>,
) -> Response {
    let frame = Frame::new(&console, &session);
    let runs = match console.store.list_redrive_runs(50).await {
        Ok(runs) => runs,
        Err(error) => return failure(frame, "reading the redrive audit", error),
    };
    let mut sections = Vec::new();
    for (number, url) in console.config.dlq_urls.iter().enumerate() {
        match console.sample(number, false).await {
            Ok(sample) => sections.push(dlq_section(&console, number, url, &sample, &runs)),
            Err(error) => return failure(frame, &format!("reading {}", queue_name(url)), error),
        }
    }
    let letters = match console
        .store
        .list_dead_letters(None, DEAD_LETTERS_CHARTED)
        .await
    {
        Ok(letters) => letters,
        Err(error) => return failure(frame, "reading dead_letters", error),
    };
    let actions = match console.store.list_operator_actions(8).await {
        Ok(actions) => actions,
        Err(error) => return failure(frame, "reading the operator log", error),
    };
    let body = html! {
        @for section in &sections { (section) }
        section {
            h2 { "Dead letters, last " (DAYS_CHARTED) " days" }
            p.note { "By day recorded and reason, from the newest " (DEAD_LETTERS_CHARTED) " dead letters. "
                a href="/dead-letters" { "Search them" } }
            (charts::stacked_days(&dead_letter_days(&letters)))
        }
        section {
            h2 { "Latest actions" }
            (actions_table(&actions))
            p { a href="/audit" { "The whole audit" } }
        }
    };
    render::page("Overview", Some(frame), body).into_response()
}

fn dlq_section(
    console: &Console,
    number: usize,
    url: &str,
    sample: &Sample,
    runs: &[RedriveRun],
) -> Markup {
    let reasons = sample.reasons();
    let runs: Vec<&RedriveRun> = runs.iter().filter(|r| r.dlq_url == url).take(5).collect();
    html! {
        section.dlq {
            h2 { a href={ "/dlq/" (number) } { (queue_name(url)) } }
            dl.figures {
                dt { "Depth" } dd.depth { (sample.depth.visible) " waiting" @if sample.depth.in_flight > 0 { ", " (sample.depth.in_flight) " in flight" } }
                dt { "Oldest" } dd { (sample.oldest_secs().map(age).unwrap_or_else(|| "–".into())) " (in the sample)" }
                dt { "Sample" } dd { (sample.messages.len()) " read of at most " (console.config.sample_size)
                    ", " (read_ago(sample).as_secs()) " s ago (each read is handed back at once, and counts as a receive)" }
            }
            @if reasons.is_empty() {
                p.note { "Nothing in the DLQ." }
            } @else {
                h3 { "By failure reason" }
                (charts::bars(&reasons))
                ul.reasons {
                    @for (reason, count) in &reasons {
                        li { a href={ "/dlq/" (number) "?" (reason_query(reason)) } { (shown(reason)) } " · " (count) }
                    }
                }
            }
            h3 { "Last redrives" }
            (runs_table(&runs))
        }
    }
}

fn reason_query(reason: &str) -> String {
    let reason = if reason == "(none)" { "" } else { reason };
    serde_urlencoded::to_string([("reason", reason)]).unwrap_or_default()
}

pub(crate) fn runs_table(runs: &[&RedriveRun]) -> Markup {
    html! {
        @if runs.is_empty() {
            p.note { "None recorded." }
        } @else {
            table {
                thead { tr { th { "#" } th { "Started" } th { "Operator" } th { "Kind" } th { "Redriven" } th { "Done already" } th { "Exhausted" } th { "Failed" } } }
                tbody {
                    @for run in runs {
                        tr {
                            td { (run.id) }
                            td { (when(&run.started_at)) }
                            td { (shown(&run.operator)) }
                            td { @if run.dry_run { "dry run" } @else if run.finished_at.is_none() { "running or stopped" } @else { "redrive" } }
                            td.n { (run.counts.redriven) }
                            td.n { (run.counts.skipped_complete) }
                            td.n { (run.counts.exhausted) }
                            td.n { (run.counts.failed) }
                        }
                    }
                }
            }
        }
    }
}

pub(crate) fn actions_table(actions: &[OperatorAction]) -> Markup {
    html! {
        @if actions.is_empty() {
            p.note { "No action recorded yet." }
        } @else {
            table.actions {
                thead { tr { th { "When" } th { "Operator" } th { "Action" } th { "Queue" } th { "Message" } th { "Key" } th { "Fingerprints" } th { "What came of it" } } }
                tbody {
                    @for action in actions {
                        tr {
                            td { (when(&action.recorded_at)) }
                            td { (shown(&action.operator)) }
                            td { (action.action) }
                            td { (queue_name(&action.queue_url)) }
                            td.mono { (shown(&action.message_id)) }
                            td.mono { (action.key.as_deref().map(shown).unwrap_or_default()) }
                            td.mono {
                                @if let Some(before) = &action.before_sha256 { "before " (short(before)) }
                                @if let Some(after) = &action.after_sha256 { br; "after " (short(after)) }
                            }
                            td { (shown(&action.detail)) }
                        }
                    }
                }
            }
        }
    }
}

fn short(fingerprint: &str) -> &str {
    let end = fingerprint
        .char_indices()
        .nth(16)
        .map_or(fingerprint.len(), |(i, _)| i);
    &fingerprint[..end]
}

/// The last days' dead letters, per day and reason.
fn dead_letter_days(letters: &[DeadLetter]) -> Vec<Day> {
    let today = Utc::now().date_naive();
    (0..DAYS_CHARTED)
        .rev()
        .map(|back| {
            let day = today - Days::days(back);
            let mut counts: BTreeMap<String, usize> = BTreeMap::new();
            for letter in letters.iter().filter(|l| l.created_at.date_naive() == day) {
                *counts.entry(letter.reason.clone()).or_default() += 1;
            }
            Day {
                label: day.format("%b %d").to_string(),
                counts: counts.into_iter().collect(),
            }
        })
        .collect()
}

/// The whole audit: operator actions and redrive runs.
pub(crate) async fn audit(
    State(console): State<Shared>,
    Extension(session): Extension<Arc<Session>>,
) -> Response {
    let frame = Frame::new(&console, &session);
    let actions = match console.store.list_operator_actions(500).await {
        Ok(actions) => actions,
        Err(error) => return failure(frame, "reading the operator log", error),
    };
    let runs = match console.store.list_redrive_runs(200).await {
        Ok(runs) => runs,
        Err(error) => return failure(frame, "reading the redrive audit", error),
    };
    let runs: Vec<&RedriveRun> = runs.iter().collect();
    let body = html! {
        h2 { "Operator actions" }
        p.note { "The newest 500, from this console and any other on this store." }
        (actions_table(&actions))
        h2 { "Redrive runs" }
        p.note { "The newest 200, from the console and from `sqs-worker redrive`." }
        (runs_table(&runs))
    };
    render::page("Audit", Some(frame), body).into_response()
}
