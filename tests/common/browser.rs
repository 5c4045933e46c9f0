//! A real browser for the console's tests: headless Chromium driven through chromedriver
//! (Debian's `chromium` and `chromium-driver`, which `.ci/run` installs), one of each per
//! test, stopped when dropped.

use std::process::Stdio;
use std::time::Duration;

use fantoccini::{Client, ClientBuilder, Locator};
use hyper_util::client::legacy::connect::HttpConnector;
use serde_json::json;

use super::wait_until;

/// Where Debian puts them (override with CHROMEDRIVER and CHROMIUM).
fn chromedriver_path() -> String {
    std::env::var("CHROMEDRIVER").unwrap_or_else(|_| "/usr/bin/chromedriver".into())
}

fn chromium_path() -> String {
    std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into())
}

/// A chromedriver and the headless Chromium session it drives.
pub struct Browser {
    pub client: Client,
    _driver: tokio::process::Child,
}

impl Browser {
    pub async fn start() -> Browser {
        let port = {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            listener.local_addr().unwrap().port()
        };
        let driver = tokio::process::Command::new(chromedriver_path())
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot start {} ({e}): install Debian's chromium and chromium-driver \
                     (`.ci/run` does), or point CHROMEDRIVER at one",
                    chromedriver_path()
                )
            });
        let status = format!("http://127.0.0.1:{port}/status");
        wait_until("chromedriver answers", Duration::from_secs(20), || async {
            reqwest::get(&status)
                .await
                .is_ok_and(|r| r.status().is_success())
        })
        .await;
        let mut capabilities = serde_json::Map::new();
        capabilities.insert(
            "goog:chromeOptions".into(),
            json!({
                "binary": chromium_path(),
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu",
                         "--disable-dev-shm-usage", "--window-size=1280,1000"],
            }),
        );
        let client = ClientBuilder::new(HttpConnector::new())
            .capabilities(capabilities)
            .connect(&format!("http://127.0.0.1:{port}"))
            .await
            .expect("chromedriver starts a headless Chromium session");
        Browser {
            client,
            _driver: driver,
        }
    }

    /// End the browser session (chromedriver stops when dropped).
    pub async fn close(self) {
        self.client.close().await.unwrap();
    }

    /// The element `css` names, waiting up to 20 s for it (a click that submits a form
    /// returns before the next page is there); the page's text when it never comes.
    pub async fn element(&self, css: &str) -> fantoccini::elements::Element {
        let found = self
            .client
            .wait()
            .at_most(Duration::from_secs(20))
            .for_element(Locator::Css(css))
            .await;
        match found {
            Ok(element) => element,
            Err(error) => {
                let page = self.client.source().await.unwrap_or_default();
                panic!("no {css} on the page ({error}): {page}")
            }
        }
    }

    /// Click the element `css` names.
    pub async fn click(&self, css: &str) {
        self.element(css).await.click().await.unwrap();
    }

    /// The text of the element `css` names.
    pub async fn text(&self, css: &str) -> String {
        self.element(css).await.text().await.unwrap()
    }

    /// Save a screenshot as `name`.png in $SQS_WORKER_SCREENSHOTS (the README's pictures:
    /// `SQS_WORKER_SCREENSHOTS=docs/console cargo test --test console_browser`), else in
    /// the build's scratch directory. Returns the PNG.
    pub async fn screenshot(&self, name: &str) -> Vec<u8> {
        let png = self.client.screenshot().await.unwrap();
        let dir = std::env::var("SQS_WORKER_SCREENSHOTS")
            .unwrap_or_else(|_| env!("CARGO_TARGET_TMPDIR").to_owned());
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(format!("{dir}/{name}.png"), &png).unwrap();
        png
    }
}
