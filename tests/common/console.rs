//! The console under test: served in this process on a free loopback port over the test's
//! store and LocalStack, and a small HTTP client that keeps its session cookie and reads the
//! CSRF token from the pages it gets.

use std::sync::Mutex;
use std::time::Duration;

use reqwest::StatusCode;
use reqwest::header::{CONTENT_TYPE, COOKIE, LOCATION, SET_COOKIE};
use sqs_worker::console::{self, ConsoleConfig};
use sqs_worker::message::{Envelope, KeySpec};
use tokio_util::sync::CancellationToken;

use super::TestEnv;

/// The console's options for `env`'s DLQ: key `/id`, a sample of 100 reused for 10 s.
pub fn console_config(env: &TestEnv) -> ConsoleConfig {
    ConsoleConfig {
        dlq_urls: vec![env.dlq_url().to_owned()],
        to: None,
        scope: None,
        key: KeySpec::new(vec!["/id".into()]).unwrap(),
        envelope: Envelope::Raw,
        max_redrives: 3,
        operator: "tester@ci".into(),
        auth_token: None,
        read_only: false,
        sample_size: 100,
        sample_for: Duration::from_secs(10),
    }
}

/// A served console; stopped when dropped.
pub struct RunningConsole {
    /// `http://127.0.0.1:PORT`.
    pub base: String,
    http: reqwest::Client,
    cookie: Mutex<Option<String>>,
    shutdown: CancellationToken,
}

impl RunningConsole {
    /// Serve `config` over `env`'s store and SQS.
    pub async fn start(env: &TestEnv, config: ConsoleConfig) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let shutdown = CancellationToken::new();
        let (store, client, stop) = (env.store().clone(), env.client().clone(), shutdown.clone());
        tokio::spawn(async move {
            console::serve(config, client, store, listener, stop)
                .await
                .expect("the console serves");
        });
        let http = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(Duration::from_secs(60))
            .build()
            .unwrap();
        RunningConsole {
            base,
            http,
            cookie: Mutex::new(None),
            shutdown,
        }
    }

    fn with_cookie(&self, request: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match self.cookie.lock().unwrap().clone() {
            Some(cookie) => request.header(COOKIE, cookie),
            None => request,
        }
    }

    /// GET `path`: status, and the body as text.
    pub async fn get(&self, path: &str) -> (StatusCode, String) {
        let request = self.with_cookie(self.http.get(format!("{}{path}", self.base)));
        let response = request.send().await.unwrap();
        let status = response.status();
        (status, response.text().await.unwrap())
    }

    /// GET `path` and expect 200: the page.
    pub async fn page(&self, path: &str) -> String {
        let (status, body) = self.get(path).await;
        assert_eq!(status, StatusCode::OK, "GET {path}: {body}");
        body
    }

    /// POST a form to `path`: status, where it redirects (if it does), and the body.
    pub async fn post(
        &self,
        path: &str,
        form: &[(&str, &str)],
    ) -> (StatusCode, Option<String>, String) {
        let body = serde_urlencoded::to_string(form).unwrap();
        let request = self
            .with_cookie(self.http.post(format!("{}{path}", self.base)))
            .header(CONTENT_TYPE, "application/x-www-form-urlencoded")
            .body(body);
        let response = request.send().await.unwrap();
        let status = response.status();
        if let Some(cookie) = response.headers().get(SET_COOKIE) {
            let pair = cookie
                .to_str()
                .unwrap()
                .split(';')
                .next()
                .unwrap()
                .to_owned();
            *self.cookie.lock().unwrap() = Some(pair);
        }
        let location = response
            .headers()
            .get(LOCATION)
            .map(|l| l.to_str().unwrap().to_owned());
        (status, location, response.text().await.unwrap())
    }

    /// POST a form with the CSRF token of the page at `from`.
    pub async fn post_from(
        &self,
        from: &str,
        path: &str,
        form: &[(&str, &str)],
    ) -> (StatusCode, Option<String>, String) {
        let page = self.page(from).await;
        let csrf = csrf_token(&page);
        let mut fields = vec![("csrf", csrf.as_str())];
        fields.extend_from_slice(form);
        self.post(path, &fields).await
    }

    /// Log in with `token` (the session cookie is kept).
    pub async fn log_in(&self, token: &str, operator: &str) -> StatusCode {
        let (status, _, _) = self
            .post(
                "/login",
                &[("token", token), ("operator", operator), ("next", "/")],
            )
            .await;
        status
    }
}

impl Drop for RunningConsole {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// The CSRF token in a page's forms.
pub fn csrf_token(page: &str) -> String {
    let start = page
        .find(r#"name="csrf" value=""#)
        .unwrap_or_else(|| panic!("no CSRF field in the page: {page}"))
        + r#"name="csrf" value=""#.len();
    page[start..].split('"').next().unwrap().to_owned()
}

/// The message ids linked from a DLQ page, in order.
pub fn listed_message_ids(page: &str, dlq: usize) -> Vec<String> {
    let prefix = format!(r#"href="/dlq/{dlq}/message/"#);
    page.match_indices(&prefix)
        .map(|(at, _)| {
            page[at + prefix.len()..]
                .split('"')
                .next()
                .unwrap()
                .to_owned()
        })
        .collect()
}
