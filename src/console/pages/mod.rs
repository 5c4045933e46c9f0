//! The pages: each module one view, each handler one page.

pub(crate) mod browse;
pub(crate) mod bulk;
pub(crate) mod checkpoints;
pub(crate) mod dead_letters;
pub(crate) mod overview;

use std::fmt::Display;

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use maud::{Markup, html};

use super::Console;
use super::render::{self, Frame, shown};

/// A page, or the page that says why not.
pub(crate) type Page = Result<Response, Response>;

/// Why a request was refused, as a page body.
pub(crate) fn refusal(why: &str) -> Markup {
    html! { p.error { (why) } p { a href="/" { "Back to the overview" } } }
}

/// The login form.
pub(crate) fn login(next: &str, operator: &str, error: Option<&str>) -> Markup {
    html! {
        @if let Some(error) = error { p.error { (error) } }
        form.login method="post" action="/login" {
            input type="hidden" name="next" value=(next);
            label { "Token " input type="password" name="token" autofocus required; }
            label { "Your name, for the audit " input type="text" name="operator" value=(operator); }
            button type="submit" { "Log in" }
        }
    }
}

/// A call to SQS or the store failed: say what, and what to check.
pub(crate) fn failure(frame: Frame<'_>, what: &str, error: impl Display) -> Response {
    let body = html! {
        p.error { (what) " failed: " (shown(&error.to_string())) }
        p { "Check AWS credentials, region and AWS_ENDPOINT_URL (SQS), and the store at --database-url; then reload." }
    };
    (
        StatusCode::BAD_GATEWAY,
        render::page("Something failed", Some(frame), body),
    )
        .into_response()
}

/// Nothing here by that name.
pub(crate) fn not_found(frame: Frame<'_>, what: &str) -> Response {
    let body = html! { p.error { (what) } p { a href="/" { "Back to the overview" } } };
    (
        StatusCode::NOT_FOUND,
        render::page("Not found", Some(frame), body),
    )
        .into_response()
}

/// A form that cannot be carried out as filled in.
pub(crate) fn unprocessable(frame: Frame<'_>, title: &str, body: Markup) -> Response {
    (
        StatusCode::UNPROCESSABLE_ENTITY,
        render::page(title, Some(frame), body),
    )
        .into_response()
}

/// DLQ number `dlq`, if the console serves one.
pub(crate) fn dlq_index(
    frame: Frame<'_>,
    console: &Console,
    dlq: usize,
) -> Result<usize, Response> {
    if dlq < console.config.dlq_urls.len() {
        Ok(dlq)
    } else {
        Err(not_found(
            frame,
            &format!("this console shows no DLQ number {dlq}"),
        ))
    }
}

/// Pretty-printed JSON when the text is JSON, else the text; cut at `most` bytes.
pub(crate) fn pretty_body(body: &str, most: usize) -> (String, bool) {
    let pretty = serde_json::from_str::<serde_json::Value>(body)
        .ok()
        .and_then(|v| serde_json::to_string_pretty(&v).ok())
        .unwrap_or_else(|| body.to_owned());
    if pretty.len() <= most {
        return (shown(&pretty), false);
    }
    let mut end = most;
    while !pretty.is_char_boundary(end) {
        end -= 1;
    }
    (shown(&pretty[..end]), true)
}

/// A time as operators read it.
pub(crate) fn when(time: &chrono::DateTime<chrono::Utc>) -> String {
    time.format("%Y-%m-%d %H:%M:%S UTC").to_string()
}
