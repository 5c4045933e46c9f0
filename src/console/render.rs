//! What every page shares: the frame (navigation, the logout form), the assets, the security
//! headers, and showing hostile text inertly.

use axum::extract::Request;
use axum::http::{HeaderValue, header};
use axum::middleware::Next;
use axum::response::{Html, IntoResponse, Response};
use maud::{DOCTYPE, Markup, html};

use super::Console;
use super::auth::Session;

/// The page's frame needs to know the console and the operator's session.
#[derive(Clone, Copy)]
pub(crate) struct Frame<'a> {
    pub(crate) console: &'a Console,
    pub(crate) session: &'a Session,
}

impl<'a> Frame<'a> {
    pub(crate) fn new(console: &'a Console, session: &'a Session) -> Self {
        Frame { console, session }
    }

    /// Whether actions are shown.
    pub(crate) fn writable(&self) -> bool {
        !self.console.config.read_only
    }

    /// The refusal of a form page on a read-only console, if it is one.
    pub(crate) fn refuse_if_read_only(&self) -> Option<Response> {
        (!self.writable()).then(|| {
            super::auth::refusal(axum::http::StatusCode::FORBIDDEN, super::auth::READ_ONLY)
        })
    }

    /// The hidden CSRF field of a form.
    pub(crate) fn csrf_field(&self) -> Markup {
        html! { input type="hidden" name="csrf" value=(self.session.csrf); }
    }
}

/// A whole page.
pub(crate) fn page(title: &str, frame: Option<Frame<'_>>, body: Markup) -> Html<String> {
    let markup = html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " · sqs-worker console" }
                link rel="stylesheet" href="/assets/console.css";
                script src="/assets/console.js" defer {}
            }
            body {
                header {
                    a.brand href="/" { "sqs-worker console" }
                    @if let Some(frame) = frame {
                        (navigation(frame))
                    }
                }
                main { h1 { (title) } (body) }
            }
        }
    };
    Html(markup.into_string())
}

fn navigation(frame: Frame<'_>) -> Markup {
    let config = &frame.console.config;
    html! {
        nav {
            @for (number, url) in config.dlq_urls.iter().enumerate() {
                a href={ "/dlq/" (number) } { (queue_name(url)) }
            }
            a href="/dead-letters" { "Dead letters" }
            a href="/checkpoints" { "Checkpoints" }
            a href="/audit" { "Audit" }
            span.operator {
                (shown(&frame.session.operator))
                @if config.read_only { " · read-only" }
            }
            @if config.auth_token.is_some() {
                form.inline method="post" action="/logout" {
                    (frame.csrf_field())
                    button type="submit" { "Log out" }
                }
            }
        }
    }
}

/// A queue's name, from its URL.
pub(crate) fn queue_name(url: &str) -> &str {
    url.rsplit('/').next().unwrap_or(url)
}

/// Text from a message, safe to show: HTML escaping is maud's; this makes control
/// characters (NUL among them) and the bidirectional overrides that could reorder what an
/// operator reads visible as `\u{…}` escapes. Newlines and tabs stay.
pub(crate) fn shown(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if (c.is_control() && c != '\n' && c != '\t') || is_bidi_control(c) {
            out.push_str(&format!("\\u{{{:04X}}}", c as u32));
        } else {
            out.push(c);
        }
    }
    out
}

fn is_bidi_control(c: char) -> bool {
    matches!(c, '\u{061C}' | '\u{200E}' | '\u{200F}' | '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}')
}

/// The start of a text, at most `chars` characters, shown (see [`shown`]) on one line.
pub(crate) fn preview(text: &str, chars: usize) -> String {
    let mut cut: String = text.chars().take(chars).collect();
    if cut.len() < text.len() {
        cut.push('…');
    }
    shown(&cut.replace(['\n', '\r', '\t'], " "))
}

/// Seconds as a short age: `42s`, `5m`, `3h`, `2d`.
pub(crate) fn age(seconds: u64) -> String {
    match seconds {
        s if s < 120 => format!("{s}s"),
        s if s < 7200 => format!("{}m", s / 60),
        s if s < 172_800 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86_400),
    }
}

/// No inline script, nothing from elsewhere, no framing, no sniffing, no referrer to other
/// sites.
pub(crate) async fn security_headers(request: Request, next: Next) -> Response {
    let mut response = next.run(request).await;
    let headers = response.headers_mut();
    let set = [
        (
            header::CONTENT_SECURITY_POLICY,
            "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; \
             connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
        ),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        (header::X_FRAME_OPTIONS, "DENY"),
        // `same-origin`, not `no-referrer`: under `no-referrer` a browser sends `Origin: null`
        // with its form posts, and the origin check could not tell them from a foreign page.
        (header::REFERRER_POLICY, "same-origin"),
        (header::CACHE_CONTROL, "no-store"),
    ];
    for (name, value) in set {
        headers.insert(name, HeaderValue::from_static(value));
    }
    response
}

pub(crate) async fn stylesheet() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/css; charset=utf-8")],
        include_str!("assets/console.css"),
    )
}

pub(crate) async fn script() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/javascript; charset=utf-8")],
        include_str!("assets/console.js"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shown_makes_controls_and_overrides_visible() {
        assert_eq!(shown("a\0b"), "a\\u{0000}b");
        assert_eq!(shown("abc\u{202E}fed"), "abc\\u{202E}fed");
        assert_eq!(shown("line\nnext\ttab"), "line\nnext\ttab");
        assert_eq!(shown("\u{2066}x\u{2069}"), "\\u{2066}x\\u{2069}");
    }

    #[test]
    fn preview_cuts_and_keeps_one_line() {
        assert_eq!(preview("abcdef", 3), "abc…");
        assert_eq!(preview("a\nb", 10), "a b");
        assert_eq!(preview("héllo", 5), "héllo");
    }

    #[test]
    fn ages_are_short() {
        assert_eq!(age(5), "5s");
        assert_eq!(age(600), "10m");
        assert_eq!(age(10_000), "2h");
        assert_eq!(age(200_000), "2d");
    }
}
