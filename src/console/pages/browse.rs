//! Browsing a DLQ (its sample, filtered), one message whole, and the forms that act on it.

use std::sync::Arc;

use axum::Extension;
use axum::extract::{Path, Query, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use maud::{Markup, html};
use serde::Deserialize;

use super::super::auth::Session;
use super::super::render::{self, Frame, age, preview, queue_name, shown};
use super::super::sample::{DlqMessage, MessageFilter, Sample, matching};
use super::super::{Console, Shared};
use super::{Page, dlq_index, failure, not_found, pretty_body, unprocessable};

/// The most of a body a page shows; the rest is in the raw download.
const BODY_SHOWN: usize = 64 * 1024;

/// The browse page's query.
#[derive(Debug, Default, Deserialize)]
pub(crate) struct BrowseQuery {
    #[serde(flatten)]
    filter: MessageFilter,
    /// Read the DLQ again instead of the cached sample.
    #[serde(default)]
    refresh: Option<String>,
}

pub(crate) async fn list(
    State(console): State<Shared>,
    Extension(session): Extension<Arc<Session>>,
    Path(dlq): Path<usize>,
    Query(query): Query<BrowseQuery>,
) -> Response {
    let frame = Frame::new(&console, &session);
    list_page(frame, &console, dlq, query)
        .await
        .unwrap_or_else(|r| r)
}

async fn list_page(frame: Frame<'_>, console: &Console, dlq: usize, query: BrowseQuery) -> Page {
    let dlq = dlq_index(frame, console, dlq)?;
    let url = &console.config.dlq_urls[dlq];
    let filter = match query.filter.to_filter() {
        Ok(filter) => filter,
        Err(problem) => {
            return Err(unprocessable(
                frame,
                "Filter not understood",
                html! { p.error { (problem) } },
            ));
        }
    };
    let sample = console
        .sample(dlq, query.refresh.is_some())
        .await
        .map_err(|e| failure(frame, &format!("reading {}", queue_name(url)), e))?;
    let shown_messages = matching(&sample, filter.as_ref());
    let body = html! {
        (filter_form(dlq, &sample, &query.filter))
        p.note.summary {
            span.matching { (shown_messages.len()) } " of " (sample.messages.len()) " sampled messages match ("
            (sample.depth.visible) " waiting in the DLQ; the sample reads at most " (console.config.sample_size) "). "
            a href={ "/dlq/" (dlq) "?" (query.filter.query()) "&refresh=1" } { "Read again" }
        }
        @if frame.writable() { (bulk_form(frame, dlq, &query.filter)) }
        (messages_table(dlq, &shown_messages))
    };
    Ok(render::page(queue_name(url), Some(frame), body).into_response())
}

fn filter_form(dlq: usize, sample: &Sample, filter: &MessageFilter) -> Markup {
    html! {
        form.filters method="get" action={ "/dlq/" (dlq) } {
            label { "Reason "
                select name="reason" {
                    option value="" { "any" }
                    @for (reason, count) in sample.reasons() {
                        @if reason != "(none)" {
                            option value=(reason) selected[reason == filter.reason] { (shown(&reason)) " (" (count) ")" }
                        }
                    }
                }
            }
            label { "Attribute or field "
                input type="text" name="filter" value=(filter.filter) placeholder="NAME=VALUE or /json/pointer=VALUE" size="36";
            }
            button type="submit" { "Filter" }
        }
    }
}

fn bulk_form(frame: Frame<'_>, dlq: usize, filter: &MessageFilter) -> Markup {
    html! {
        form.bulk method="post" action={ "/dlq/" (dlq) "/bulk/dry-run" } {
            (frame.csrf_field())
            input type="hidden" name="reason" value=(filter.reason);
            input type="hidden" name="filter" value=(filter.filter);
            button type="submit" id="dry-run" { "Dry run: redrive " (filter.describe()) }
            " — shows what would happen to each message (the whole DLQ, not only the sample); nothing changes until you confirm."
        }
    }
}

fn messages_table(dlq: usize, messages: &[&DlqMessage]) -> Markup {
    html! {
        table.messages {
            thead { tr { th { "Message" } th { "Key" } th { "Reason" } th { "Detail" } th { "Receives" } th { "Redrives" } th { "Age" } th { "Body" } } }
            tbody {
                @for m in messages {
                    tr.message {
                        td.mono { a href={ "/dlq/" (dlq) "/message/" (m.message.message_id) } { (preview(&m.message.message_id, 13)) } }
                        td.mono.key { (preview(&m.key, 40)) }
                        td.reason { (m.reason.as_deref().map(|r| preview(r, 40)).unwrap_or_default()) }
                        td { (m.detail.as_deref().map(|d| preview(d, 80)).unwrap_or_default()) }
                        td.n { (m.receive_count.map(|c| c.to_string()).unwrap_or_default()) }
                        td.n { (m.redrive_count) }
                        td.n { (m.age_secs.map(age).unwrap_or_default()) }
                        td.mono.preview { (preview(&m.message.body, 60)) }
                    }
                }
            }
        }
    }
}

/// Find a message in the sample, reading the DLQ again once if it is not there.
async fn find_message(
    frame: Frame<'_>,
    console: &Console,
    dlq: usize,
    id: &str,
) -> Result<DlqMessage, Response> {
    let dlq = dlq_index(frame, console, dlq)?;
    let url = &console.config.dlq_urls[dlq];
    for fresh in [false, true] {
        let sample = console
            .sample(dlq, fresh)
            .await
            .map_err(|e| failure(frame, &format!("reading {}", queue_name(url)), e))?;
        if let Some(message) = sample.find(id) {
            return Ok(message.clone());
        }
    }
    Err(not_found(
        frame,
        &format!(
            "message {} is not in the sample of {}: it left the DLQ, or lies beyond the \
             first {} read",
            shown(id),
            queue_name(url),
            console.config.sample_size
        ),
    ))
}

pub(crate) async fn message(
    State(console): State<Shared>,
    Extension(session): Extension<Arc<Session>>,
    Path((dlq, id)): Path<(usize, String)>,
) -> Response {
    let frame = Frame::new(&console, &session);
    let m = match find_message(frame, &console, dlq, &id).await {
        Ok(m) => m,
        Err(page) => return page,
    };
    let (body, cut) = pretty_body(&m.message.body, BODY_SHOWN);
    let page = html! {
        (message_fields(&m))
        @if frame.writable() { (message_actions(frame, dlq, &m)) }
        h2 { "Attributes" }
        table.attributes {
            @for (name, value) in m.attributes() {
                tr { th { (shown(name)) } td.mono { (preview(&value, 300)) } }
            }
        }
        h2 { "Body" }
        p.note { (m.message.body.len()) " bytes. "
            @if cut { "Showing the first " (BODY_SHOWN / 1024) " KiB. " }
            a href={ "/dlq/" (dlq) "/message/" (id) "/raw" } { "Download it as sent" } }
        pre.body { (body) }
    };
    render::page(&format!("Message {}", preview(&id, 40)), Some(frame), page).into_response()
}

fn message_fields(m: &DlqMessage) -> Markup {
    html! {
        dl.fields {
            dt { "Message id" } dd.mono { (shown(&m.message.message_id)) }
            dt { "Key" } dd.mono.key { (shown(&m.key)) }
            dt { "Reason" } dd.reason { (m.reason.as_deref().map(shown).unwrap_or_else(|| "–".into())) }
            dt { "Detail" } dd { (m.detail.as_deref().map(shown).unwrap_or_else(|| "–".into())) }
            dt { "Receives" } dd { (m.receive_count.map(|c| c.to_string()).unwrap_or_default()) }
            dt { "Redrives" } dd { (m.redrive_count) }
            dt { "Age" } dd { (m.age_secs.map(age).unwrap_or_default()) }
        }
    }
}

fn message_actions(frame: Frame<'_>, dlq: usize, m: &DlqMessage) -> Markup {
    let id = &m.message.message_id;
    html! {
        div.actions {
            form.inline method="post" action={ "/dlq/" (dlq) "/message/" (id) "/redrive" } {
                (frame.csrf_field())
                button type="submit" id="redrive" { "Redrive with markers" }
            }
            a.button href={ "/dlq/" (dlq) "/message/" (id) "/edit" } id="edit" { "Edit, then redrive" }
            a.button.danger href={ "/dlq/" (dlq) "/message/" (id) "/delete" } id="delete" { "Delete…" }
        }
    }
}

pub(crate) async fn raw_body(
    State(console): State<Shared>,
    Extension(session): Extension<Arc<Session>>,
    Path((dlq, id)): Path<(usize, String)>,
) -> Response {
    let frame = Frame::new(&console, &session);
    match find_message(frame, &console, dlq, &id).await {
        // An attachment in plain text: a browser neither renders nor sniffs it.
        Ok(m) => (
            [
                (header::CONTENT_TYPE, "text/plain; charset=utf-8".to_owned()),
                (
                    header::CONTENT_DISPOSITION,
                    "attachment; filename=\"message-body.txt\"".to_owned(),
                ),
            ],
            m.message.body,
        )
            .into_response(),
        Err(page) => page,
    }
}

pub(crate) async fn edit_form(
    State(console): State<Shared>,
    Extension(session): Extension<Arc<Session>>,
    Path((dlq, id)): Path<(usize, String)>,
) -> Response {
    let frame = Frame::new(&console, &session);
    if let Some(refusal) = frame.refuse_if_read_only() {
        return refusal;
    }
    match find_message(frame, &console, dlq, &id).await {
        Ok(m) => {
            let body = edit_markup(frame, dlq, &m, &m.message.body, None);
            render::page("Edit, then redrive", Some(frame), body).into_response()
        }
        Err(page) => page,
    }
}

/// The edit form, with `text` in it (the body, or what the operator typed).
pub(crate) fn edit_markup(
    frame: Frame<'_>,
    dlq: usize,
    m: &DlqMessage,
    text: &str,
    problem: Option<&str>,
) -> Markup {
    let invisible = text != shown(text);
    html! {
        (message_fields(m))
        @if let Some(problem) = problem { p.error { (problem) } }
        @if invisible { p.warning { "The body holds control or bidirectional characters (shown as \\u{…} in the message page); they are kept as they are unless you remove them." } }
        p.note { "The edited body is sent with the redrive markers (one more redrive); the original is deleted once the copy is sent. The audit keeps both fingerprints." }
        form.edit method="post" action={ "/dlq/" (dlq) "/message/" (m.message.message_id) "/edit" } {
            (frame.csrf_field())
            textarea name="body" rows="24" cols="100" spellcheck="false" id="body" { (text) }
            button type="submit" id="send-edited" { "Redrive the edited body" }
            " " a href={ "/dlq/" (dlq) "/message/" (m.message.message_id) } { "Cancel" }
        }
    }
}

pub(crate) async fn delete_form(
    State(console): State<Shared>,
    Extension(session): Extension<Arc<Session>>,
    Path((dlq, id)): Path<(usize, String)>,
) -> Response {
    let frame = Frame::new(&console, &session);
    if let Some(refusal) = frame.refuse_if_read_only() {
        return refusal;
    }
    let m = match find_message(frame, &console, dlq, &id).await {
        Ok(m) => m,
        Err(page) => return page,
    };
    let body = html! {
        p.warning { "Delete message " code { (shown(&id)) } " (key " code { (shown(&m.key)) } ") from "
            (queue_name(&console.config.dlq_urls[dlq])) " for good? It is not recorded in dead_letters; the audit keeps its fingerprint." }
        form method="post" action={ "/dlq/" (dlq) "/message/" (id) "/delete" } {
            (frame.csrf_field())
            input type="hidden" name="confirm" value=(id);
            button.danger type="submit" id="confirm-delete" { "Delete " (preview(&id, 13)) }
            " " a href={ "/dlq/" (dlq) "/message/" (id) } { "Cancel" }
        }
    };
    render::page("Delete a message", Some(frame), body).into_response()
}
