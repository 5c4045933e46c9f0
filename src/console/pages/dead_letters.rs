//! Dead letters: search by scope, key, reason and time; one whole; export as JSON lines.

use std::sync::Arc;
use std::time::Duration;

use axum::Extension;
use axum::extract::{Path, Query, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use maud::html;
use serde::Deserialize;

use crate::store::DeadLetter;

use super::super::auth::Session;
use super::super::render::{self, Frame, preview, queue_name, shown};
use super::super::{Console, Shared};
use super::{Page, failure, not_found, pretty_body, unprocessable, when};

/// Dead letters read per search (newest first), then filtered.
const SEARCHED: i64 = 5000;

/// The search form.
#[derive(Debug, Default, Deserialize)]
pub(crate) struct Search {
    #[serde(default)]
    scope: String,
    #[serde(default)]
    key: String,
    #[serde(default)]
    reason: String,
    /// Only the last … (`24h`, `7d`).
    #[serde(default)]
    since: String,
}

impl Search {
    fn since(&self) -> Result<Option<Duration>, String> {
        let since = self.since.trim();
        if since.is_empty() {
            return Ok(None);
        }
        humantime::parse_duration(since)
            .map(Some)
            .map_err(|e| format!("{since:?} is not a duration ({e}); write e.g. 24h or 7d"))
    }

    /// The dead letters this search finds, or the page that says why not.
    async fn run(&self, frame: Frame<'_>, console: &Console) -> Result<Vec<DeadLetter>, Response> {
        let since = self.since().map_err(|problem| {
            unprocessable(frame, "Dead letters", html! { p.error { (problem) } })
        })?;
        let scope = Some(self.scope.trim()).filter(|s| !s.is_empty());
        let letters = console
            .store
            .list_dead_letters(scope, SEARCHED)
            .await
            .map_err(|e| failure(frame, "reading dead_letters", e))?;
        let cutoff =
            since.map(|d| chrono::Utc::now() - chrono::Duration::from_std(d).unwrap_or_default());
        Ok(letters
            .into_iter()
            .filter(|l| self.key.trim().is_empty() || l.idempotency_key == self.key.trim())
            .filter(|l| self.reason.trim().is_empty() || l.reason == self.reason.trim())
            .filter(|l| cutoff.is_none_or(|c| l.created_at >= c))
            .collect())
    }

    fn query(&self) -> String {
        serde_urlencoded::to_string([
            ("scope", &self.scope),
            ("key", &self.key),
            ("reason", &self.reason),
            ("since", &self.since),
        ])
        .unwrap_or_default()
    }
}

pub(crate) async fn list(
    State(console): State<Shared>,
    Extension(session): Extension<Arc<Session>>,
    Query(search): Query<Search>,
) -> Response {
    let frame = Frame::new(&console, &session);
    list_page(frame, &console, &search)
        .await
        .unwrap_or_else(|r| r)
}

async fn list_page(frame: Frame<'_>, console: &Console, search: &Search) -> Page {
    let letters = search.run(frame, console).await?;
    let body = html! {
        form.filters method="get" action="/dead-letters" {
            label { "Scope " input type="text" name="scope" value=(search.scope); }
            label { "Key " input type="text" name="key" value=(search.key); }
            label { "Reason " input type="text" name="reason" value=(search.reason); }
            label { "Since " input type="text" name="since" value=(search.since) placeholder="24h, 7d" size="6"; }
            button type="submit" { "Search" }
            a href={ "/dead-letters/export?" (search.query()) } { "Export as JSON lines" }
        }
        p.note { span.matching { (letters.len()) } " found among the newest " (SEARCHED) "." }
        table.letters {
            thead { tr { th { "#" } th { "Recorded" } th { "Scope" } th { "Key" } th { "Reason" } th { "Error" } th { "Redrives" } th { "Requeued" } } }
            tbody {
                @for l in &letters {
                    tr {
                        td { a href={ "/dead-letters/" (l.id) } { (l.id) } }
                        td { (when(&l.created_at)) }
                        td { (shown(&l.scope)) }
                        td.mono.key { (preview(&l.idempotency_key, 40)) }
                        td { (shown(&l.reason)) }
                        td { (preview(&l.error, 80)) }
                        td.n { (l.redrive_count) }
                        td { (l.requeued_at.as_ref().map(when).unwrap_or_default()) }
                    }
                }
            }
        }
    };
    Ok(render::page("Dead letters", Some(frame), body).into_response())
}

pub(crate) async fn export(
    State(console): State<Shared>,
    Extension(session): Extension<Arc<Session>>,
    Query(search): Query<Search>,
) -> Response {
    let frame = Frame::new(&console, &session);
    let letters = match search.run(frame, &console).await {
        Ok(letters) => letters,
        Err(page) => return page,
    };
    let mut lines = String::new();
    for letter in &letters {
        lines.push_str(&serde_json::to_string(letter).unwrap_or_default());
        lines.push('\n');
    }
    (
        [
            (header::CONTENT_TYPE, "application/x-ndjson"),
            (
                header::CONTENT_DISPOSITION,
                "attachment; filename=\"dead-letters.jsonl\"",
            ),
        ],
        lines,
    )
        .into_response()
}

pub(crate) async fn show(
    State(console): State<Shared>,
    Extension(session): Extension<Arc<Session>>,
    Path(id): Path<i64>,
) -> Response {
    let frame = Frame::new(&console, &session);
    let letter = match console.store.find_dead_letter(id).await {
        Ok(Some(letter)) => letter,
        Ok(None) => return not_found(frame, &format!("no dead letter with id {id}")),
        Err(error) => return failure(frame, "reading the dead letter", error),
    };
    let (body, cut) = pretty_body(&letter.body, 64 * 1024);
    let page = html! {
        dl.fields {
            dt { "Scope" } dd { (shown(&letter.scope)) }
            dt { "Key" } dd.mono { (shown(&letter.idempotency_key)) " · " a href={ "/checkpoints?" (serde_urlencoded::to_string([("scope", &letter.scope), ("key", &letter.idempotency_key)]).unwrap_or_default()) } { "its checkpoint" } }
            dt { "Queue" } dd { (queue_name(&letter.queue_url)) }
            dt { "Message id" } dd.mono { (shown(&letter.message_id)) }
            dt { "Reason" } dd { (shown(&letter.reason)) }
            dt { "Error" } dd { (shown(&letter.error)) }
            dt { "Attempts" } dd { (letter.attempts) }
            dt { "Redrives" } dd { (letter.redrive_count) }
            dt { "Recorded" } dd { (when(&letter.created_at)) }
            dt { "Requeued" } dd { (letter.requeued_at.as_ref().map(when).unwrap_or_else(|| "no".into())) }
        }
        @if frame.writable() {
            form method="post" action={ "/dead-letters/" (id) "/requeue" } {
                (frame.csrf_field())
                button type="submit" id="requeue" { "Requeue (a new pass, the full number of redrives)" }
            }
        }
        h2 { "Body" }
        @if cut { p.note { "Showing the first 64 KiB of " (letter.body.len()) " bytes." } }
        pre.body { (body) }
    };
    render::page(&format!("Dead letter {id}"), Some(frame), page).into_response()
}
