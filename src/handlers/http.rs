//! The HTTP delivery handler: POSTs each event to a URL, once.
//!
//! 2xx means delivered. 408, 429, 5xx, timeouts and connection errors are retryable (a
//! Retry-After header is honoured, capped at [`MAX_RETRY_AFTER`]); redirects and any other
//! 4xx are permanent (the message goes to the DLQ with reason `http_3xx` / `http_4xx`).
//!
//! The POST is the job's `deliver` step ([`Job::step_effect`]): once a 2xx is recorded in the
//! checkpoint, no later attempt POSTs again, and a failure to record it after the POST
//! succeeded is logged rather than retried into a second POST. A POST can still be repeated
//! (a crash before the record, a lost lease, a handler timeout), always with the same
//! `Idempotency-Key`, so receivers must dedupe on that header.

use std::fmt;
use std::str::FromStr;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use reqwest::header::{self, HeaderMap, HeaderName, HeaderValue};
use reqwest::{StatusCode, Url};
use serde::{Deserialize, Serialize};

use crate::handler::{Handler, HandlerError, Job};
use crate::message::trace::TraceContext;
use crate::message::truncate_for_log;
use crate::spans;

/// The name of the step that records a successful delivery in the checkpoint.
pub const DELIVER_STEP: &str = "deliver";

/// The longest Retry-After honoured; a longer one is cut to this. It keeps a receiver from
/// parking events for days (SQS allows at most 12 hours anyway).
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);

/// The most of a response body kept in an error message (the DLQ's failure detail).
const RESPONSE_SNIPPET_BYTES: usize = 2048;

/// Headers the handler sets per event; `--http-header` may not replace them.
const RESERVED_HEADERS: [&str; 8] = [
    "idempotency-key",
    "traceparent",
    "tracestate",
    "content-type",
    "content-length",
    "transfer-encoding",
    "host",
    "connection",
];
const RESERVED_PREFIX: &str = "x-sqs-worker-";

/// POSTs each event to a URL.
#[derive(Clone)]
pub struct HttpHandler {
    client: reqwest::Client,
    url: Url,
    /// The URL without credentials or query, for error messages and logs.
    display_url: String,
}

/// Shows the URL without user info or query, which may hold credentials.
impl fmt::Debug for HttpHandler {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HttpHandler")
            .field("url", &self.display_url)
            .finish_non_exhaustive()
    }
}

/// The output of the `deliver` step, stored in the checkpoint.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Delivered {
    /// The receiver's 2xx status.
    status: u16,
}

/// Why an [`HttpHandler`] could not be built.
#[derive(Debug, thiserror::Error)]
pub enum HttpHandlerError {
    /// The URL does not parse.
    #[error("invalid HTTP delivery URL {url:?}: {reason}")]
    InvalidUrl {
        /// The URL as given, with any password removed.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The HTTP client could not be created (TLS setup).
    #[error("cannot create the HTTP client: {0}")]
    Client(#[source] reqwest::Error),
}

impl HttpHandler {
    /// A handler that POSTs to `url` (http or https), giving up on a request after
    /// `timeout`, with `headers` added to every request (e.g. an Authorization token).
    pub fn new(
        url: &str,
        timeout: Duration,
        headers: &[HttpHeader],
    ) -> Result<Self, HttpHandlerError> {
        let invalid = |reason: String| HttpHandlerError::InvalidUrl {
            url: redact_unparsed_url(url),
            reason,
        };
        let url = Url::parse(url).map_err(|e| invalid(e.to_string()))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(invalid("the scheme must be http or https".into()));
        }
        if url.host_str().is_none() {
            return Err(invalid("it has no host".into()));
        }
        let mut defaults = HeaderMap::new();
        defaults.insert(
            header::USER_AGENT,
            HeaderValue::from_static(concat!("sqs-worker/", env!("CARGO_PKG_VERSION"))),
        );
        // A repeated name adds a line rather than replacing: HTTP reads repeated headers as
        // one comma-separated list, which --http-header values cannot contain.
        let mut replaced_user_agent = false;
        for h in headers {
            if h.name == header::USER_AGENT && !replaced_user_agent {
                defaults.remove(header::USER_AGENT);
                replaced_user_agent = true;
            }
            defaults.append(h.name.clone(), h.value.clone());
        }
        let client = reqwest::Client::builder()
            .default_headers(defaults)
            .timeout(timeout)
            .connect_timeout(timeout.min(Duration::from_secs(10)))
            // A 301/302/303 would turn the POST into a GET without the event; a redirect is
            // a wrong URL, reported as a permanent failure instead.
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(HttpHandlerError::Client)?;
        let display_url = display_url(&url);
        Ok(Self {
            client,
            url,
            display_url,
        })
    }

    /// POST the event once; Ok with the status on a 2xx.
    async fn post(&self, event: Outgoing) -> Result<Delivered, HandlerError> {
        let request = self
            .client
            .post(self.url.clone())
            .header(header::CONTENT_TYPE, event.content_type)
            .header("idempotency-key", event.idempotency_key)
            .header("x-sqs-worker-message-id", event.message_id)
            .header("x-sqs-worker-attempt", event.attempt)
            .header("x-sqs-worker-redrive-count", event.redrive_count)
            .header("x-sqs-worker-final-pass", event.final_pass);
        // Computed here, in the `deliver` step's span: the request continues that step.
        let request = match spans::outgoing(event.trace.as_ref()) {
            Some(trace) => {
                let request = request.header("traceparent", trace.traceparent);
                match trace.tracestate {
                    Some(state) => request.header("tracestate", state),
                    None => request,
                }
            }
            None => request,
        };
        let request = request.body(event.body);
        let mut response = request.send().await.map_err(|error| {
            HandlerError::retryable(format!(
                "POST {} failed: {}",
                self.display_url,
                error_chain(&error.without_url())
            ))
        })?;
        let status = response.status();
        let class = classify(status);
        if class == StatusClass::Delivered {
            return Ok(Delivered {
                status: status.as_u16(),
            });
        }
        let retry_after = response
            .headers()
            .get(header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| parse_retry_after(v, SystemTime::now()));
        let snippet = response_snippet(&mut response).await;
        let message = format!(
            "POST {} answered {status}{}",
            self.display_url,
            if snippet.is_empty() {
                String::new()
            } else {
                format!(": {snippet}")
            }
        );
        Err(match class {
            StatusClass::Delivered => unreachable!("handled above"),
            StatusClass::Retryable => match retry_after {
                Some(after) => HandlerError::retry_after(message, after),
                None => HandlerError::retryable(message),
            },
            StatusClass::Permanent(reason) => HandlerError::permanent_with_reason(reason, message),
        })
    }
}

#[async_trait]
impl Handler for HttpHandler {
    async fn handle(&self, job: &mut Job) -> Result<(), HandlerError> {
        let event = Outgoing::from_job(job);
        let delivered: Delivered = job.step_effect(DELIVER_STEP, || self.post(event)).await?;
        tracing::debug!(status = delivered.status, url = %self.display_url, "event delivered");
        Ok(())
    }
}

/// What one POST sends, taken from the job before its step borrows it.
struct Outgoing {
    content_type: &'static str,
    idempotency_key: HeaderValue,
    message_id: HeaderValue,
    attempt: u32,
    redrive_count: u32,
    final_pass: &'static str,
    body: String,
    /// The producer's trace context (sent on unchanged when spans are not exported).
    trace: Option<TraceContext>,
}

impl Outgoing {
    fn from_job(job: &Job) -> Self {
        Self {
            content_type: if job.json().is_some() {
                "application/json"
            } else {
                "text/plain; charset=utf-8"
            },
            idempotency_key: idempotency_key(job.scope(), job.key()),
            message_id: header_value(job.message_id()),
            attempt: job.attempt(),
            redrive_count: job.redrive_count(),
            final_pass: if job.is_final_pass() { "true" } else { "false" },
            body: job.body().to_owned(),
            trace: job.trace.clone(),
        }
    }
}

/// One `--http-header 'Name: value'`. Its value never appears in `Debug` output or logs.
#[derive(Clone, PartialEq, Eq)]
pub struct HttpHeader {
    name: HeaderName,
    value: HeaderValue,
}

impl HttpHeader {
    /// A header to add to every request. Fails for invalid names or values, and for the
    /// headers the handler sets itself (Idempotency-Key, Content-Type, X-Sqs-Worker-*, …).
    pub fn new(name: &str, value: &str) -> Result<Self, String> {
        let name = HeaderName::from_str(name.trim())
            .map_err(|_| format!("{:?} is not a valid HTTP header name", name.trim()))?;
        if RESERVED_HEADERS.contains(&name.as_str()) || name.as_str().starts_with(RESERVED_PREFIX) {
            return Err(format!(
                "header {name} is set by sqs-worker itself and cannot be given with --http-header"
            ));
        }
        let mut value = HeaderValue::from_str(value.trim()).map_err(|_| {
            format!("the value of header {name} contains characters HTTP does not allow")
        })?;
        value.set_sensitive(true);
        Ok(Self { name, value })
    }
}

impl FromStr for HttpHeader {
    type Err = String;

    /// Parse `Name: value`.
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let (name, value) = text
            .split_once(':')
            .ok_or_else(|| "expected 'Name: value', e.g. 'Authorization: Bearer …'".to_owned())?;
        Self::new(name, value)
    }
}

impl fmt::Debug for HttpHeader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: <redacted>", self.name)
    }
}

/// How a final response status is treated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StatusClass {
    Delivered,
    Retryable,
    /// With the DLQ reason code.
    Permanent(&'static str),
}

fn classify(status: StatusCode) -> StatusClass {
    match status.as_u16() {
        200..=299 => StatusClass::Delivered,
        408 | 429 => StatusClass::Retryable,
        300..=399 => StatusClass::Permanent("http_3xx"),
        400..=499 => StatusClass::Permanent("http_4xx"),
        // 5xx, and anything a server should not send (1xx as final, 6xx+): try again.
        _ => StatusClass::Retryable,
    }
}

/// A Retry-After value (delta-seconds or an HTTP-date) as a delay from `now`, capped at
/// [`MAX_RETRY_AFTER`]; None for a value that is neither.
fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    let delay = if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) {
        // All digits: a huge number fails u64 parsing but still means "a long time".
        Duration::from_secs(value.parse::<u64>().unwrap_or(u64::MAX))
    } else {
        let at = httpdate::parse_http_date(value).ok()?;
        // A date in the past means "now".
        at.duration_since(now).unwrap_or(Duration::ZERO)
    };
    Some(delay.min(MAX_RETRY_AFTER))
}

/// `Idempotency-Key: <scope>:<key>`, made header-safe. The scope's own colons are escaped so
/// the first colon always separates the two.
fn idempotency_key(scope: &str, key: &str) -> HeaderValue {
    let text = format!(
        "{}:{}",
        percent_encode_for_header(scope, b":"),
        percent_encode_for_header(key, b"")
    );
    checked_header_value(text)
}

/// A header value for arbitrary text.
fn header_value(text: &str) -> HeaderValue {
    checked_header_value(percent_encode_for_header(text, b""))
}

fn checked_header_value(encoded: String) -> HeaderValue {
    // Percent-encoding leaves only visible ASCII, which is always a valid header value; the
    // fallback keeps a bug here from panicking a worker.
    HeaderValue::from_str(&encoded).unwrap_or_else(|_| HeaderValue::from_static("invalid"))
}

/// Percent-encode every byte that is not visible ASCII (controls, space, DEL, every byte of
/// a non-ASCII character), `%` itself and the bytes in `also`. Plain keys pass unchanged,
/// and distinct inputs stay distinct, so receivers can dedupe on the result.
fn percent_encode_for_header(text: &str, also: &[u8]) -> String {
    use std::fmt::Write;
    let mut out = String::with_capacity(text.len());
    for &byte in text.as_bytes() {
        if (0x21..=0x7e).contains(&byte) && byte != b'%' && !also.contains(&byte) {
            out.push(char::from(byte));
        } else {
            let _ = write!(out, "%{byte:02X}");
        }
    }
    out
}

/// The start of a response body, for the error message; never more than a few KiB read.
async fn response_snippet(response: &mut reqwest::Response) -> String {
    let mut bytes = Vec::new();
    while bytes.len() < RESPONSE_SNIPPET_BYTES {
        match response.chunk().await {
            Ok(Some(chunk)) => bytes.extend_from_slice(&chunk),
            Ok(None) | Err(_) => break,
        }
    }
    bytes.truncate(RESPONSE_SNIPPET_BYTES);
    let text = String::from_utf8_lossy(&bytes);
    let text: String = text
        .trim()
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    truncate_for_log(&text, 300)
}

/// An error and its causes on one line ("error sending request: …: connection refused").
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

/// scheme://host\[:port\]/path, without user info or query (which may hold credentials).
fn display_url(url: &Url) -> String {
    format!("{}{}", url.origin().ascii_serialization(), url.path())
}

/// A URL that failed to parse, with any user info (up to the last `@`) hidden.
fn redact_unparsed_url(url: &str) -> String {
    let Some(at) = url.rfind('@') else {
        return url.to_owned();
    };
    let scheme = match url.find("://") {
        Some(end) if end < at => &url[..end + 3],
        _ => "",
    };
    format!("{scheme}…@{}", &url[at + 1..])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(code: u16) -> StatusClass {
        classify(StatusCode::from_u16(code).unwrap())
    }

    #[test]
    fn statuses_are_classified() {
        for code in [200, 201, 202, 204, 299] {
            assert_eq!(status(code), StatusClass::Delivered, "{code}");
        }
        for code in [408, 429, 500, 502, 503, 504, 599, 600, 999, 100] {
            assert_eq!(status(code), StatusClass::Retryable, "{code}");
        }
        for code in [400, 401, 403, 404, 409, 410, 422, 499] {
            assert_eq!(status(code), StatusClass::Permanent("http_4xx"), "{code}");
        }
        for code in [301, 302, 307, 308] {
            assert_eq!(status(code), StatusClass::Permanent("http_3xx"), "{code}");
        }
    }

    #[test]
    fn retry_after_in_seconds() {
        let now = SystemTime::now();
        assert_eq!(parse_retry_after("1", now), Some(Duration::from_secs(1)));
        assert_eq!(
            parse_retry_after(" 120 ", now),
            Some(Duration::from_secs(120))
        );
        assert_eq!(parse_retry_after("0", now), Some(Duration::ZERO));
        assert_eq!(parse_retry_after("86400", now), Some(MAX_RETRY_AFTER));
        assert_eq!(
            parse_retry_after("99999999999999999999999", now),
            Some(MAX_RETRY_AFTER)
        );
    }

    #[test]
    fn retry_after_as_an_http_date() {
        let now = httpdate::parse_http_date("Sun, 06 Nov 1994 08:49:37 GMT").unwrap();
        // The three forms RFC 9110 requires recipients to accept.
        for later in [
            "Sun, 06 Nov 1994 08:50:07 GMT",
            "Sunday, 06-Nov-94 08:50:07 GMT",
            "Sun Nov  6 08:50:07 1994",
        ] {
            assert_eq!(
                parse_retry_after(later, now),
                Some(Duration::from_secs(30)),
                "{later}"
            );
        }
        assert_eq!(
            parse_retry_after("Sun, 06 Nov 1994 08:00:00 GMT", now),
            Some(Duration::ZERO),
            "a date in the past means now"
        );
        assert_eq!(
            parse_retry_after("Mon, 07 Nov 1994 08:49:37 GMT", now),
            Some(MAX_RETRY_AFTER)
        );
    }

    #[test]
    fn retry_after_garbage_is_ignored() {
        let now = SystemTime::now();
        for garbage in [
            "",
            "  ",
            "-1",
            "1.5",
            "soon",
            "1e3",
            "+5",
            "Sun, 99 Nov 1994",
        ] {
            assert_eq!(parse_retry_after(garbage, now), None, "{garbage:?}");
        }
    }

    #[test]
    fn plain_keys_pass_unchanged() {
        assert_eq!(
            idempotency_key("orders", "order-123|eu"),
            "orders:order-123|eu"
        );
        assert_eq!(
            idempotency_key("q", "sha256:ab12"),
            "q:sha256:ab12",
            "colons in the key stay"
        );
    }

    #[test]
    fn hostile_keys_become_valid_distinct_header_values() {
        let cases = [
            ("café", "q:caf%C3%A9"),
            ("a b", "q:a%20b"),
            ("line\r\nInjected: 1", "q:line%0D%0AInjected:%201"),
            ("nul\0del\x7f", "q:nul%00del%7F"),
            ("100%", "q:100%25"),
            ("%25", "q:%2525"),
            (" padded ", "q:%20padded%20"),
            ("", "q:"),
        ];
        for (key, expected) in cases {
            let value = idempotency_key("q", key);
            assert_eq!(value, expected, "{key:?}");
            assert!(value.to_str().is_ok(), "visible ASCII only: {key:?}");
        }
        // The scope's colons are escaped, so "a:b" + "c" and "a" + "b:c" differ.
        assert_ne!(idempotency_key("a:b", "c"), idempotency_key("a", "b:c"));
        assert_eq!(idempotency_key("a:b", "c"), "a%3Ab:c");
        assert_eq!(header_value("ünï\tcode"), "%C3%BCn%C3%AF%09code");
    }

    #[test]
    fn extra_headers_parse_and_hide_their_values() {
        let h: HttpHeader = "Authorization: Bearer s3cret".parse().unwrap();
        assert_eq!(h.name, header::AUTHORIZATION);
        assert_eq!(h.value, "Bearer s3cret");
        assert!(h.value.is_sensitive());
        let debug = format!("{h:?}");
        assert!(!debug.contains("s3cret"), "{debug}");
        assert_eq!(debug, "authorization: <redacted>");
        let h: HttpHeader = "X-Api-Key:abc:def".parse().unwrap();
        assert_eq!(h.value, "abc:def", "only the first colon separates");

        assert!("no colon".parse::<HttpHeader>().is_err());
        assert!("Bad Name: x".parse::<HttpHeader>().is_err());
        assert!("X-Ok: line\nbreak".parse::<HttpHeader>().is_err());
        for reserved in [
            "Idempotency-Key: mine",
            "content-type: text/xml",
            "X-Sqs-Worker-Attempt: 9",
            "Host: elsewhere",
        ] {
            let error = reserved.parse::<HttpHeader>().unwrap_err();
            assert!(error.contains("set by sqs-worker"), "{reserved}: {error}");
        }
    }

    #[test]
    fn urls_are_checked_and_shown_without_credentials() {
        let ok = HttpHandler::new(
            "https://user:pw@hooks.example.com:8443/in?token=t",
            Duration::from_secs(5),
            &[],
        )
        .unwrap();
        assert_eq!(ok.display_url, "https://hooks.example.com:8443/in");
        let debug = format!("{ok:?}");
        assert!(!debug.contains("pw") && !debug.contains("token"), "{debug}");
        for bad in ["ftp://example.com/x", "not a url", "http://"] {
            assert!(
                HttpHandler::new(bad, Duration::from_secs(5), &[]).is_err(),
                "{bad}"
            );
        }
        let error = HttpHandler::new("htp//user:pw@x", Duration::from_secs(5), &[]).unwrap_err();
        assert!(!error.to_string().contains("pw"), "{error}");
        assert_eq!(
            redact_unparsed_url("http://user:pw@exa mple.com/x"),
            "http://…@exa mple.com/x"
        );
        assert_eq!(redact_unparsed_url("user:pw@host"), "…@host");
        assert_eq!(redact_unparsed_url("http://host/x"), "http://host/x");
    }

    /// Building the client must not depend on a process-wide rustls CryptoProvider (the
    /// binary links both ring and aws-lc-rs, so rustls cannot pick one by itself).
    #[test]
    fn an_https_client_builds_without_a_process_crypto_provider() {
        HttpHandler::new("https://example.com/hook", Duration::from_secs(5), &[]).unwrap();
    }
}
