//! The actions on one message or one dead letter: redrive, edit then redrive, delete,
//! requeue. Each goes through the library call the CLI uses and writes an operator-log row.

use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use maud::html;
use serde::Deserialize;

use crate::message;
use crate::redrive::{self, Action, OneMessage, Outcome};
use crate::store::NewOperatorAction;

use super::auth::{CsrfForm, CsrfOnly, Mutation, Session};
use super::pages::browse::edit_markup;
use super::pages::{Page, dlq_index, failure, not_found, unprocessable};
use super::render::{self, Frame, queue_name, shown};
use super::{Console, Shared};

/// Redrive one message with markers.
pub(crate) async fn redrive(
    State(console): State<Shared>,
    Path((dlq, id)): Path<(usize, String)>,
    Mutation(_form, session): Mutation<CsrfOnly>,
) -> Response {
    let frame = Frame::new(&console, &session);
    redrive_page(frame, &console, &session, dlq, &id, None)
        .await
        .unwrap_or_else(|r| r)
}

/// The edit form's fields.
#[derive(Debug, Deserialize)]
pub(crate) struct EditForm {
    csrf: String,
    body: String,
}

impl CsrfForm for EditForm {
    fn csrf(&self) -> &str {
        &self.csrf
    }
}

/// Redrive one message with an edited body.
pub(crate) async fn edit_and_redrive(
    State(console): State<Shared>,
    Path((dlq, id)): Path<(usize, String)>,
    Mutation(form, session): Mutation<EditForm>,
) -> Response {
    let frame = Frame::new(&console, &session);
    // Browsers send a textarea's line ends as CRLF; the body was sent with LF.
    let body = form.body.replace("\r\n", "\n");
    redrive_page(frame, &console, &session, dlq, &id, Some(&body))
        .await
        .unwrap_or_else(|r| r)
}

async fn redrive_page(
    frame: Frame<'_>,
    console: &Console,
    session: &Session,
    dlq: usize,
    id: &str,
    edited: Option<&str>,
) -> Page {
    let dlq = dlq_index(frame, console, dlq)?;
    let options = console.redrive_options(dlq, &session.operator);
    let original = console
        .sample(dlq, false)
        .await
        .ok()
        .and_then(|s| s.find(id).cloned());
    let mut fingerprints = (
        original
            .as_ref()
            .map(|m| fingerprint(console, &m.message.body)),
        None,
    );
    if let Some(body) = edited {
        fingerprints.1 =
            Some(prepare_edit(frame, console, dlq, id, body, original.as_ref()).await?);
    }
    let outcome = redrive::redrive_one(
        console.client.clone(),
        &*console.store,
        &options,
        id,
        edited,
    )
    .await
    .map_err(|e| failure(frame, "the redrive", e))?;
    console.forget_sample(dlq);
    let OneMessage::Done(outcome) = outcome else {
        return Err(gone(frame, console, dlq, id));
    };
    let detail = describe(&outcome.action);
    let action = NewOperatorAction {
        operator: &session.operator,
        action: if edited.is_some() {
            "edit_redrive"
        } else {
            "redrive"
        },
        queue_url: &console.config.dlq_urls[dlq],
        message_id: id,
        key: Some(&outcome.key),
        before_sha256: fingerprints.0.as_deref(),
        after_sha256: fingerprints.1.as_deref(),
        detail: &detail,
    };
    audit(console, &action).await;
    Ok(result_page(frame, dlq, "Redrive", &outcome, &detail))
}

/// Check an edited body before anything is sent: it must give the worker a key, and its
/// event must not be running; a failed event takes the edited payload's fingerprint (so the
/// redriven copy is claimed, not refused as `payload_mismatch`). Returns the fingerprint.
async fn prepare_edit(
    frame: Frame<'_>,
    console: &Console,
    dlq: usize,
    id: &str,
    body: &str,
    original: Option<&super::sample::DlqMessage>,
) -> Result<String, Response> {
    let options = console.redrive_options(dlq, "");
    let refuse = |problem: String| {
        let markup = match original {
            Some(m) => edit_markup(frame, dlq, m, body, Some(&problem)),
            None => html! { p.error { (problem) } },
        };
        unprocessable(frame, "Edit, then redrive", markup)
    };
    let identity = message::derive_identity(&options.key, options.envelope, body).map_err(|e| {
        refuse(format!(
            "the edited body gives the worker no key ({}); {}",
            e,
            if options.key.needs_json() { "the worker takes keys from JSON, so the body must be valid JSON with the key fields" } else { "fix it and send again" }
        ))
    })?;
    let (_, scope) = redrive::target_and_scope(console.client.clone(), &options)
        .await
        .map_err(|e| failure(frame, "finding the target queue", e))?;
    let checkpoint = console
        .store
        .find(&scope, &identity.key)
        .await
        .map_err(|e| failure(frame, "reading the checkpoint", e))?;
    match checkpoint.as_ref().map(|c| c.status.as_str()) {
        Some("in_progress") => {
            return Err(refuse(format!(
                "event {} is being processed right now; wait until it ends, then try again",
                shown(&identity.key)
            )));
        }
        Some("failed")
            if checkpoint
                .as_ref()
                .is_some_and(|c| c.payload_sha256 != identity.fingerprint) =>
        {
            console
                .store
                .adopt_edited_payload(
                    &scope,
                    &identity.key,
                    &identity.fingerprint,
                    identity.field_digests.as_deref(),
                )
                .await
                .map_err(|e| failure(frame, "recording the edited payload's fingerprint", e))?;
        }
        _ => {}
    }
    tracing::info!(message_id = %id, key = %identity.key, "operator edited a DLQ message's body");
    Ok(identity.fingerprint)
}

/// The worker's fingerprint of a body (its SHA-256 when it gives no key).
fn fingerprint(console: &Console, body: &str) -> String {
    message::derive_identity(&console.config.key, console.config.envelope, body)
        .map(|i| i.fingerprint)
        .unwrap_or_else(|_| message::body_sha256(body))
}

/// The delete form: its CSRF token and the id it names.
#[derive(Debug, Deserialize)]
pub(crate) struct DeleteForm {
    csrf: String,
    #[serde(default)]
    confirm: String,
}

impl CsrfForm for DeleteForm {
    fn csrf(&self) -> &str {
        &self.csrf
    }
}

/// Delete one message, once its id is confirmed.
pub(crate) async fn delete(
    State(console): State<Shared>,
    Path((dlq, id)): Path<(usize, String)>,
    Mutation(form, session): Mutation<DeleteForm>,
) -> Response {
    let frame = Frame::new(&console, &session);
    delete_page(frame, &console, &session, dlq, &id, &form)
        .await
        .unwrap_or_else(|r| r)
}

async fn delete_page(
    frame: Frame<'_>,
    console: &Console,
    session: &Session,
    dlq: usize,
    id: &str,
    form: &DeleteForm,
) -> Page {
    let dlq = dlq_index(frame, console, dlq)?;
    if form.confirm != id {
        return Err(unprocessable(
            frame,
            "Delete a message",
            html! { p.error { "the confirmation does not name this message; open its delete page and confirm there" } },
        ));
    }
    let url = &console.config.dlq_urls[dlq];
    let deleted = redrive::delete_dlq_message(console.client.clone(), url, id)
        .await
        .map_err(|e| failure(frame, "the delete", e))?;
    console.forget_sample(dlq);
    let OneMessage::Done(message) = deleted else {
        return Err(gone(frame, console, dlq, id));
    };
    let key = redrive::describe(&message, &console.config.key, console.config.envelope).key;
    let before = fingerprint(console, &message.body);
    let action = NewOperatorAction {
        operator: &session.operator,
        action: "delete",
        queue_url: url,
        message_id: id,
        key: Some(&key),
        before_sha256: Some(&before),
        after_sha256: None,
        detail: "deleted from the DLQ for good",
    };
    audit(console, &action).await;
    let body = html! {
        p.done { "Deleted message " code { (shown(id)) } " (key " code { (shown(&key)) } ") from " (queue_name(url)) "." }
        p { a href={ "/dlq/" (dlq) } { "Back to " (queue_name(url)) } }
    };
    Ok(render::page("Deleted", Some(frame), body).into_response())
}

/// Requeue one dead letter, as `dead-letters requeue`.
pub(crate) async fn requeue(
    State(console): State<Shared>,
    Path(id): Path<i64>,
    Mutation(_form, session): Mutation<CsrfOnly>,
) -> Response {
    let frame = Frame::new(&console, &session);
    requeue_page(frame, &console, &session, id)
        .await
        .unwrap_or_else(|r| r)
}

async fn requeue_page(frame: Frame<'_>, console: &Console, session: &Session, id: i64) -> Page {
    let letter = console
        .store
        .find_dead_letter(id)
        .await
        .map_err(|e| failure(frame, "reading the dead letter", e))?
        .ok_or_else(|| not_found(frame, &format!("no dead letter with id {id}")))?;
    let requeued = redrive::requeue_dead_letter(console.client.clone(), &*console.store, &letter)
        .await
        .map_err(|e| failure(frame, "the requeue", e))?;
    let detail = format!(
        "requeued as message {} (requeue {})",
        requeued.message_id, requeued.generation
    );
    let before = message::body_sha256(&letter.body);
    let action = NewOperatorAction {
        operator: &session.operator,
        action: "requeue",
        queue_url: &letter.queue_url,
        message_id: &letter.message_id,
        key: Some(&letter.idempotency_key),
        before_sha256: Some(&before),
        after_sha256: None,
        detail: &detail,
    };
    audit(console, &action).await;
    let body = html! {
        p.done { "Dead letter " (id) " " (detail) " to " (queue_name(&letter.queue_url)) ": its event runs once more, with the full number of redrives." }
        p { a href={ "/dead-letters/" (id) } { "Back to the dead letter" } }
    };
    Ok(render::page("Requeued", Some(frame), body).into_response())
}

/// Write the operator-log row. The action happened either way: a failed write is logged,
/// never retried into a second action.
pub(crate) async fn audit(console: &Console, action: &NewOperatorAction<'_>) {
    if let Err(error) = console.store.record_operator_action(action).await {
        tracing::error!(%error, action = action.action, message_id = action.message_id,
            "could not write the operator log row; the action itself was carried out");
    }
}

fn gone(frame: Frame<'_>, console: &Console, dlq: usize, id: &str) -> Response {
    not_found(
        frame,
        &format!(
            "message {} is no longer in {} (another operator or a redrive took it); nothing was done",
            shown(id),
            queue_name(&console.config.dlq_urls[dlq])
        ),
    )
}

/// What an action did, in words.
pub(crate) fn describe(action: &Action) -> String {
    match action {
        Action::Redriven {
            redrive_count,
            final_pass,
        } => format!(
            "redriven (redrive {redrive_count}{})",
            if *final_pass { ", final pass" } else { "" }
        ),
        Action::AlreadyComplete => "its event is already complete: deleted from the DLQ".into(),
        Action::Exhausted { reason } => format!("{reason}: recorded in dead_letters and deleted"),
        Action::FilteredOut => "left in the DLQ".into(),
        Action::Failed { error } => format!("sending failed, left in the DLQ: {error}"),
    }
}

fn result_page(
    frame: Frame<'_>,
    dlq: usize,
    title: &str,
    outcome: &Outcome,
    detail: &str,
) -> Response {
    let url = &frame.console.config.dlq_urls[dlq];
    let body = html! {
        p.done.outcome { "Message " code { (shown(&outcome.message_id)) } " (key " code { (shown(&outcome.key)) } "): " (shown(detail)) "." }
        @if let Some(status) = &outcome.checkpoint_status { p { "Its checkpoint was " (status) "." } }
        p { a href={ "/dlq/" (dlq) } { "Back to " (queue_name(url)) } }
    };
    render::page(title, Some(frame), body).into_response()
}
