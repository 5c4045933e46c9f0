//! Checkpoint lookup by scope and key: status, attempts, lease, the steps as a timeline with
//! their outputs, the last error.

use std::sync::Arc;

use axum::Extension;
use axum::extract::{Query, State};
use axum::response::{IntoResponse, Response};
use maud::{Markup, html};
use serde::Deserialize;

use crate::store::Checkpoint;

use super::super::Shared;
use super::super::auth::Session;
use super::super::render::{self, Frame, shown};
use super::{failure, pretty_body, when};

/// The lookup form.
#[derive(Debug, Default, Deserialize)]
pub(crate) struct Lookup {
    #[serde(default)]
    scope: String,
    #[serde(default)]
    key: String,
}

pub(crate) async fn lookup(
    State(console): State<Shared>,
    Extension(session): Extension<Arc<Session>>,
    Query(lookup): Query<Lookup>,
) -> Response {
    let frame = Frame::new(&console, &session);
    let found = if lookup.scope.trim().is_empty() || lookup.key.is_empty() {
        None
    } else {
        match console.store.find(lookup.scope.trim(), &lookup.key).await {
            Ok(found) => Some(found),
            Err(error) => return failure(frame, "reading the checkpoint", error),
        }
    };
    let body = html! {
        form.filters method="get" action="/checkpoints" {
            label { "Scope " input type="text" name="scope" value=(lookup.scope) placeholder="the queue's name"; }
            label { "Key " input type="text" name="key" value=(lookup.key) size="40"; }
            button type="submit" { "Look up" }
        }
        @match found {
            None => {}
            Some(None) => { p.note { "No checkpoint for this scope and key: the event was never claimed here (or its record was pruned)." } }
            Some(Some(checkpoint)) => { (checkpoint_markup(&checkpoint)) }
        }
    };
    render::page("Checkpoints", Some(frame), body).into_response()
}

fn checkpoint_markup(c: &Checkpoint) -> Markup {
    let steps = c.steps.as_array().cloned().unwrap_or_default();
    html! {
        dl.fields {
            dt { "Status" } dd.status { (c.status) }
            dt { "Attempts" } dd { (c.attempts) }
            dt { "Lease" } dd { (c.lease_owner.as_deref().map(shown).unwrap_or_else(|| "none".into()))
                @if let Some(until) = &c.lease_expires_at { " until " (when(until)) } }
            dt { "Pass" } dd { "redrive " (c.redrive_count) ", requeue " (c.requeue_generation) }
            dt { "Payload" } dd.mono { (c.payload_sha256) }
            dt { "Messages" } dd.mono { "first " (shown(&c.first_message_id)) ", latest " (shown(&c.last_message_id)) }
            dt { "First seen" } dd { (when(&c.created_at)) }
            dt { "Changed" } dd { (when(&c.updated_at)) }
            dt { "Completed" } dd { (c.completed_at.as_ref().map(when).unwrap_or_else(|| "–".into())) }
            dt { "Last error" } dd.error { (c.last_error.as_deref().map(shown).unwrap_or_default()) }
        }
        h2 { "Steps" }
        @if steps.is_empty() { p.note { "No step recorded." } }
        ol.timeline {
            @for step in &steps {
                li {
                    strong { (shown(step["name"].as_str().unwrap_or("?"))) }
                    @if let Some(at) = step["completed_at"].as_str() { " · " (shown(at)) }
                    pre.body { (pretty_body(&step.get("output").map(|o| o.to_string()).unwrap_or_default(), 16 * 1024).0) }
                }
            }
        }
    }
}
