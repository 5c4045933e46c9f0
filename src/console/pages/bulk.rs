//! A bulk redrive's progress: rendered as it stands, then kept current by the page's script
//! from the run's event stream, up to the closing summary.

use std::sync::Arc;

use axum::Extension;
use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use maud::{Markup, html};

use super::super::Shared;
use super::super::auth::Session;
use super::super::bulk::{Progress, no_run, title};
use super::super::render::{self, Frame, shown};

pub(crate) async fn progress(
    State(console): State<Shared>,
    Extension(session): Extension<Arc<Session>>,
    Path(id): Path<u64>,
) -> Response {
    let frame = Frame::new(&console, &session);
    let Some(run) = console.bulk_run(id) else {
        return no_run(frame, id);
    };
    let progress = run.progress.borrow().clone();
    let body = html! {
        div #bulk data-events={ "/bulk/" (id) "/events" } {
            (figures(&progress))
            p.summary #summary hidden[progress.summary.is_none()] { (progress.summary.as_deref().map(shown).unwrap_or_default()) }
            p.error #error hidden[progress.error.is_none()] { (progress.error.as_deref().map(shown).unwrap_or_default()) }
            h2 { "Latest" }
            ul #recent {
                @for (id, key, action) in &progress.recent { li { code { (shown(id)) } " " code { (key) } " — " (action) } }
            }
            p { a href={ "/dlq/" (run.dlq) } { "Back to the DLQ" } }
        }
    };
    render::page(&title(&console, &run), Some(frame), body).into_response()
}

fn figures(progress: &Progress) -> Markup {
    let done = progress.examined;
    let max = progress.expected.unwrap_or(done).max(done).max(1);
    html! {
        progress #bar max=(max) value=(done) {}
        dl.figures {
            dt { "Examined" } dd #examined { (done) @if let Some(e) = progress.expected { " of about " (e) } }
            dt { "Redriven" } dd #redriven { (progress.counts.redriven) }
            dt { "Already complete (deleted)" } dd #skipped_complete { (progress.counts.skipped_complete) }
            dt { "Exhausted (dead_letters)" } dd #exhausted { (progress.counts.exhausted) }
            dt { "Failed (kept)" } dd #failed { (progress.counts.failed) }
            dt { "Left (not matching)" } dd #filtered_out { (progress.filtered_out) }
        }
    }
}
