//! The console in a real browser (headless Chromium through chromedriver) against real
//! LocalStack and PostgreSQL: an operator filters a DLQ by reason, dry-runs a bulk redrive,
//! confirms it and watches it drain; another edits a body, redrives it, and a worker
//! completes it. The README's screenshots come from here.

mod common;

use std::time::Duration;

use common::*;
use fantoccini::Locator;
use serde_json::Value;
use sqs_worker::HandlerError;
use sqs_worker::message::{self, ATTR_FAILURE_DETAIL, ATTR_FAILURE_REASON};

async fn dead_lettered(env: &TestEnv, body: &str, reason: &str, detail: &str) {
    env.send_with_attributes(
        env.dlq_url(),
        body,
        &[(ATTR_FAILURE_REASON, reason), (ATTR_FAILURE_DETAIL, detail)],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_filters_dry_runs_and_drains_one_reason() {
    let env = TestEnv::new().await;
    for n in 0..24 {
        let body = format!(
            r#"{{"id":"order-{n:03}","customer":"c{}","amount":{}}}"#,
            n % 5,
            10 + n
        );
        dead_lettered(
            &env,
            &body,
            "retryable",
            "POST https://payments.internal/charge: 503 Service Unavailable",
        )
        .await;
    }
    for n in 0..7 {
        let body = format!(r#"{{"id":"order-9{n:02}","amount":"n/a"}}"#);
        dead_lettered(&env, &body, "handler_permanent", "amount must be a number").await;
    }
    dead_lettered(
        &env,
        "<not json>",
        "invalid_json",
        "expected value at line 1 column 1",
    )
    .await;
    // Final passes that failed today, for the overview's dead-letter chart.
    let attributes = serde_json::json!({});
    let reasons = [
        "retryable",
        "retryable",
        "handler_permanent",
        "redrives_exhausted",
        "retryable",
    ];
    for (n, reason) in reasons.iter().enumerate() {
        let key = format!("order-8{n:02}");
        let letter = sqs_worker::store::NewDeadLetter {
            scope: "orders",
            key: &key,
            queue_url: env.queue_url(),
            message_id: "m",
            body: "{}",
            attributes: &attributes,
            reason,
            error: "failed on its final pass",
            attempts: 4,
            redrive_count: 3,
            requeue_generation: 0,
            payload_sha256: "h",
        };
        env.store()
            .record_dead_letter(&letter, false, None)
            .await
            .unwrap();
    }
    let console = RunningConsole::start(&env, console_config(&env)).await;
    let browser = Browser::start().await;
    let client = &browser.client;

    client.goto(&format!("{}/", console.base)).await.unwrap();
    assert!(browser.text("dd.depth").await.contains("32 waiting"));
    browser.screenshot("overview").await;

    client
        .find(Locator::LinkText("retryable"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    let rows = client.find_all(Locator::Css("tr.message")).await.unwrap();
    assert_eq!(rows.len(), 24, "only the retryable messages are listed");
    assert_eq!(browser.text("span.matching").await, "24");
    browser.screenshot("filtered").await;

    browser.click("#dry-run").await;
    assert_eq!(browser.text("#would").await, "24");
    assert_eq!(env.messages_in().await, 0, "the dry run sent nothing");
    browser.click("#confirm-bulk").await;

    let summary = browser.element("#summary").await;
    wait_until(
        "the progress page shows the summary",
        Duration::from_secs(60),
        || async { summary.is_displayed().await.unwrap_or(false) },
    )
    .await;
    assert!(summary.text().await.unwrap().contains("24 redriven"));
    assert_eq!(
        browser.text("#redriven").await,
        "24",
        "the script kept the figures current"
    );
    browser.screenshot("bulk-redrive").await;

    // That reason is drained; the others stay for another look.
    assert_eq!(env.dlq_messages_in().await, 8);
    let sent = env.peek(24, Duration::from_secs(15)).await;
    assert_eq!(sent.len(), 24);
    assert!(
        sent.iter()
            .all(|m| string_attribute(m, message::ATTR_DLQ_REDRIVEN).as_deref() == Some("true"))
    );
    client
        .goto(&format!(
            "{}/dlq/0?reason=retryable&refresh=1",
            console.base
        ))
        .await
        .unwrap();
    assert_eq!(browser.text("span.matching").await, "0");
    browser.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_edits_a_body_and_a_worker_completes_it() {
    let env = TestEnv::new().await;
    env.send(r#"{"id":"inv-7","amount":"twelve"}"#).await;
    let amount_is_a_number = |job: &sqs_worker::Job| {
        let event: Value = serde_json::from_str(job.body()).unwrap();
        if event["amount"].is_number() {
            Ok(())
        } else {
            Err(HandlerError::permanent("amount must be a number"))
        }
    };
    let (handler, _) = RecordingHandler::new(Duration::ZERO, amount_is_a_number);
    env.drain(env.config().key("/id"), handler, Duration::from_secs(30))
        .await;
    assert_eq!(env.dlq_messages_in().await, 1);

    let console = RunningConsole::start(&env, console_config(&env)).await;
    let browser = Browser::start().await;
    let client = &browser.client;
    client
        .goto(&format!("{}/dlq/0", console.base))
        .await
        .unwrap();
    browser.click("tr.message a").await;
    assert!(
        browser
            .text("dd.reason")
            .await
            .contains("handler_permanent")
    );
    browser.click("#edit").await;
    let body = browser.element("#body").await;
    body.clear().await.unwrap();
    body.send_keys(r#"{"id":"inv-7","amount":12}"#)
        .await
        .unwrap();
    browser.click("#send-edited").await;
    assert!(
        browser
            .text("p.outcome")
            .await
            .contains("redriven (redrive 1")
    );
    assert_eq!(env.dlq_messages_in().await, 0);

    let (handler, calls) = RecordingHandler::new(Duration::ZERO, amount_is_a_number);
    env.drain(env.config().key("/id"), handler, Duration::from_secs(30))
        .await;
    assert_eq!(calls_per_key(&calls).get("inv-7"), Some(&1));
    let scope = env.queue_url().rsplit('/').next().unwrap().to_owned();
    assert_eq!(env.checkpoint(&scope, "inv-7").await.status, "complete");

    // The audit shows it, with both fingerprints.
    client
        .goto(&format!("{}/audit", console.base))
        .await
        .unwrap();
    let audit = browser.text("table.actions").await;
    assert!(
        audit.contains("edit_redrive") && audit.contains("before") && audit.contains("after"),
        "{audit}"
    );
    browser.close().await;
}
