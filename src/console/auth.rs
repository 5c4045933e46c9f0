//! Who may use the console: the listen address rule, sessions (a login with the
//! `--auth-token`), the CSRF token every mutation carries, `--read-only`, and the Host check
//! that keeps a tokenless loopback console out of reach of DNS rebinding.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Form;
use axum::extract::{FromRequest, Request, State};
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Redirect, Response};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use sha2::{Digest, Sha256};

use super::{Shared, pages, render};

const COOKIE: &str = "sqsw_console";

/// How long a login lasts.
const SESSION_LASTS: Duration = Duration::from_secs(12 * 3600);

/// What a read-only console answers to a change.
pub(crate) const READ_ONLY: &str = "this console is read-only (--read-only): it changes nothing";

/// Refuse to serve where nobody should reach a console without a token.
pub fn check_listen(address: SocketAddr, token: Option<&str>) -> Result<(), String> {
    match token {
        None if !address.ip().is_loopback() => Err(format!(
            "--listen {address} is not a loopback address: give --auth-token (or \
             SQS_WORKER_CONSOLE_TOKEN), or listen on 127.0.0.1"
        )),
        Some(token) if token.len() < 16 => Err(
            "--auth-token is too short: use at least 16 random characters (e.g. `openssl \
             rand -hex 16`)"
                .into(),
        ),
        _ => Ok(()),
    }
}

/// One operator's session: the CSRF token its pages carry, and the name its audit rows give.
#[derive(Debug)]
pub(crate) struct Session {
    pub(crate) csrf: String,
    pub(crate) operator: String,
    started: Instant,
}

/// The open sessions. Without a token there is one, the console's own (its CSRF token is
/// made at start and known only to pages it served).
pub(crate) struct Sessions {
    open: Option<Arc<Session>>,
    by_id: Mutex<HashMap<String, Arc<Session>>>,
}

impl Sessions {
    pub(crate) fn new(open: bool, operator: &str) -> Self {
        Sessions {
            open: open.then(|| {
                Arc::new(Session {
                    csrf: random_token(),
                    operator: operator.to_owned(),
                    started: Instant::now(),
                })
            }),
            by_id: Mutex::new(HashMap::new()),
        }
    }

    fn find(&self, headers: &HeaderMap) -> Option<Arc<Session>> {
        if let Some(open) = &self.open {
            return Some(open.clone());
        }
        let id = cookie(headers, COOKIE)?;
        let sessions = self.by_id.lock().expect("not poisoned");
        sessions
            .get(id)
            .filter(|s| s.started.elapsed() < SESSION_LASTS)
            .cloned()
    }

    fn start(&self, operator: String) -> String {
        let id = random_token();
        let session = Arc::new(Session {
            csrf: random_token(),
            operator,
            started: Instant::now(),
        });
        let mut sessions = self.by_id.lock().expect("not poisoned");
        // Logins end after SESSION_LASTS; the ended ones are forgotten at the next login.
        sessions.retain(|_, s| s.started.elapsed() < SESSION_LASTS);
        sessions.insert(id.clone(), session);
        id
    }

    fn end(&self, headers: &HeaderMap) {
        if let Some(id) = cookie(headers, COOKIE) {
            self.by_id.lock().expect("not poisoned").remove(id);
        }
    }
}

/// 32 random bytes from the operating system, as hex.
fn random_token() -> String {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).expect("the operating system gives random bytes");
    hex::encode(bytes)
}

/// Compare secrets through their digests: the time taken says nothing about the secret.
fn same_secret(given: &str, expected: &str) -> bool {
    Sha256::digest(given.as_bytes()) == Sha256::digest(expected.as_bytes())
}

fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(key, _)| *key == name)
        .map(|(_, value)| value)
}

/// Without a token, only a Host naming loopback: a page of another site whose name was made
/// to resolve to 127.0.0.1 (DNS rebinding) sends its own name.
pub(crate) async fn guard_host(
    State(console): State<Shared>,
    request: Request,
    next: Next,
) -> Response {
    if console.config.auth_token.is_some() {
        return next.run(request).await;
    }
    let port = console.port;
    let host = request
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or_default();
    let allowed = [
        format!("127.0.0.1:{port}"),
        format!("localhost:{port}"),
        format!("[::1]:{port}"),
    ];
    if allowed.iter().any(|a| a == host) {
        next.run(request).await
    } else {
        refusal(
            StatusCode::MISDIRECTED_REQUEST,
            "this console answers only to 127.0.0.1, localhost or [::1]; open it by one of \
             those names (or give it an --auth-token to serve other names)",
        )
    }
}

/// Every page but the login needs a session; every mutation also needs a writable console
/// and, when the browser says where the form came from, this console as the origin.
pub(crate) async fn require_session(
    State(console): State<Shared>,
    mut request: Request,
    next: Next,
) -> Response {
    let Some(session) = console.sessions.find(request.headers()) else {
        if request.method() == Method::GET {
            let next_path = request
                .uri()
                .path_and_query()
                .map(|p| p.as_str())
                .unwrap_or("/");
            let target = format!("/login?next={}", urlencode(next_path));
            return Redirect::to(&target).into_response();
        }
        return refusal(StatusCode::UNAUTHORIZED, "log in first (at /login)");
    };
    if request.method() != Method::GET {
        if console.config.read_only && request.uri().path() != "/logout" {
            return refusal(StatusCode::FORBIDDEN, READ_ONLY);
        }
        if !same_origin(request.headers()) {
            return refusal(
                StatusCode::FORBIDDEN,
                "the form came from another site; use the console's own pages",
            );
        }
    }
    request.extensions_mut().insert(session);
    next.run(request).await
}

fn same_origin(headers: &HeaderMap) -> bool {
    let Some(origin) = headers.get(header::ORIGIN).and_then(|o| o.to_str().ok()) else {
        return true;
    };
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or_default();
    origin
        .split_once("://")
        .is_some_and(|(_, rest)| rest == host)
}

pub(crate) fn refusal(status: StatusCode, why: &str) -> Response {
    (status, render::page("Refused", None, pages::refusal(why))).into_response()
}

/// A form that changes something: it carries the session's CSRF token.
pub(crate) trait CsrfForm {
    fn csrf(&self) -> &str;
}

/// A mutation's form, its CSRF token checked against the session's.
pub(crate) struct Mutation<T>(pub T, pub Arc<Session>);

impl<S, T> FromRequest<S> for Mutation<T>
where
    S: Send + Sync,
    T: DeserializeOwned + CsrfForm + Send,
{
    type Rejection = Response;

    async fn from_request(request: Request, state: &S) -> Result<Self, Self::Rejection> {
        let session = request
            .extensions()
            .get::<Arc<Session>>()
            .cloned()
            .ok_or_else(|| refusal(StatusCode::UNAUTHORIZED, "log in first (at /login)"))?;
        let Form(form) = Form::<T>::from_request(request, state).await.map_err(|e| {
            refusal(
                StatusCode::BAD_REQUEST,
                &format!("the form is incomplete: {e}"),
            )
        })?;
        if !same_secret(form.csrf(), &session.csrf) {
            return Err(refusal(
                StatusCode::FORBIDDEN,
                "the form's CSRF token is missing or stale; reload the page and try again",
            ));
        }
        Ok(Mutation(form, session))
    }
}

/// The login form's fields.
#[derive(Debug, Deserialize)]
pub(crate) struct Login {
    token: String,
    #[serde(default)]
    operator: String,
    #[serde(default)]
    next: String,
}

/// Where to go after logging in.
#[derive(Debug, Deserialize)]
pub(crate) struct Next_ {
    #[serde(default)]
    next: String,
}

pub(crate) async fn login_form(
    State(console): State<Shared>,
    axum::extract::Query(next): axum::extract::Query<Next_>,
) -> Response {
    if console.config.auth_token.is_none() {
        return Redirect::to("/").into_response();
    }
    render::page(
        "Log in",
        None,
        pages::login(&next.next, &console.config.operator, None),
    )
    .into_response()
}

pub(crate) async fn login(State(console): State<Shared>, Form(login): Form<Login>) -> Response {
    let Some(token) = &console.config.auth_token else {
        return Redirect::to("/").into_response();
    };
    if !same_secret(&login.token, token) {
        // Slow guessing down; the token itself is long enough not to be guessed.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let page = render::page(
            "Log in",
            None,
            pages::login(&login.next, &login.operator, Some("wrong token")),
        );
        return (StatusCode::UNAUTHORIZED, page).into_response();
    }
    let operator = login.operator.trim();
    let operator = if operator.is_empty() {
        console.config.operator.clone()
    } else {
        operator.chars().take(100).collect()
    };
    let id = console.sessions.start(operator);
    let target = if login.next.starts_with('/') && !login.next.starts_with("//") {
        login.next
    } else {
        "/".to_owned()
    };
    let cookie = format!("{COOKIE}={id}; HttpOnly; SameSite=Strict; Path=/");
    ([(header::SET_COOKIE, cookie)], Redirect::to(&target)).into_response()
}

/// The logout form: only its CSRF token.
#[derive(Debug, Deserialize)]
pub(crate) struct CsrfOnly {
    pub(crate) csrf: String,
}

impl CsrfForm for CsrfOnly {
    fn csrf(&self) -> &str {
        &self.csrf
    }
}

pub(crate) async fn logout(
    State(console): State<Shared>,
    headers: HeaderMap,
    Mutation(_form, _): Mutation<CsrfOnly>,
) -> Response {
    console.sessions.end(&headers);
    let cookie = format!("{COOKIE}=; HttpOnly; SameSite=Strict; Path=/; Max-Age=0");
    ([(header::SET_COOKIE, cookie)], Redirect::to("/login")).into_response()
}

/// Percent-encode a path for a query value.
pub(crate) fn urlencode(text: &str) -> String {
    serde_urlencoded::to_string([("", text)])
        .map(|s| s.trim_start_matches('=').to_owned())
        .unwrap_or_default()
}
