//! The operator console over HTTP, against real LocalStack and PostgreSQL: filters, peeks
//! that keep nothing, single and bulk redrives with markers, edit then redrive, delete, dead
//! letters, checkpoints, the audit, the token, CSRF and read-only refusals, hostile bodies.

mod common;

use std::time::Duration;

use common::*;
use reqwest::StatusCode;
use serde_json::{Value, json};
use sqs_worker::HandlerError;
use sqs_worker::console::{ConsoleConfig, check_listen};
use sqs_worker::message::{self, ATTR_FAILURE_REASON};
use sqs_worker::store::{Lease, NewDeadLetter};

// What writes to the store (the operator log, an edited payload's fingerprint) runs on every
// store; the rest of the console only reads through the contract, on PostgreSQL.
store_tests!(
    one_message_is_redriven_with_markers_and_audited,
    an_edited_body_is_checked_redriven_audited_and_completed,
);

/// Send `body` to the DLQ as the worker would have, with this failure reason.
async fn dead_lettered(env: &TestEnv, body: &str, reason: &str) -> String {
    env.send_with_attributes(env.dlq_url(), body, &[(ATTR_FAILURE_REASON, reason)])
        .await
}

async fn console_on(env: &TestEnv, change: impl FnOnce(&mut ConsoleConfig)) -> RunningConsole {
    let mut config = console_config(env);
    change(&mut config);
    RunningConsole::start(env, config).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn browsing_filters_the_sample_and_keeps_nothing() {
    let env = TestEnv::new().await;
    for id in ["a1", "a2", "a3"] {
        dead_lettered(
            &env,
            &format!(r#"{{"id":"{id}","customer":{{"tier":"gold"}}}}"#),
            "handler_permanent",
        )
        .await;
    }
    env.send_with_attributes(
        env.dlq_url(),
        r#"{"id":"b1"}"#,
        &[(ATTR_FAILURE_REASON, "invalid_json"), ("tenant", "acme")],
    )
    .await;
    dead_lettered(&env, "not json at all", "invalid_json").await;
    let console = console_on(&env, |_| {}).await;

    let overview = console.page("/").await;
    assert!(overview.contains("handler_permanent"), "{overview}");
    assert!(
        overview.contains("5 waiting"),
        "the depth from the queue's attributes: {overview}"
    );
    assert!(
        overview.contains("5 read of at most 100"),
        "the sample says how many it read"
    );

    let all = console.page("/dlq/0").await;
    assert_eq!(listed_message_ids(&all, 0).len(), 5);
    let permanent = console.page("/dlq/0?reason=handler_permanent").await;
    assert_eq!(listed_message_ids(&permanent, 0).len(), 3);
    let by_pointer = console.page("/dlq/0?filter=%2Fid%3Da2").await;
    assert_eq!(listed_message_ids(&by_pointer, 0).len(), 1);
    assert!(by_pointer.contains("a2"));
    let by_attribute = console.page("/dlq/0?filter=tenant%3Dacme").await;
    assert_eq!(listed_message_ids(&by_attribute, 0).len(), 1);
    let nested = console
        .page("/dlq/0?reason=handler_permanent&filter=%2Fcustomer%2Ftier%3Dgold")
        .await;
    assert_eq!(listed_message_ids(&nested, 0).len(), 3);
    let (status, body) = console.get("/dlq/0?filter=nonsense").await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert!(body.contains("NAME=VALUE"));

    let id = listed_message_ids(&by_pointer, 0).remove(0);
    let one = console.page(&format!("/dlq/0/message/{id}")).await;
    assert!(
        one.contains("&quot;id&quot;: &quot;a2&quot;"),
        "the body pretty-printed: {one}"
    );
    let (status, raw) = console.get(&format!("/dlq/0/message/{id}/raw")).await;
    assert_eq!(
        (status, raw.contains(r#""id":"a2""#)),
        (StatusCode::OK, true)
    );

    // Every message read was handed back at once: nothing hidden, nothing gone.
    let fresh = console.page("/dlq/0?refresh=1").await;
    assert_eq!(listed_message_ids(&fresh, 0).len(), 5);
    assert_eq!(env.dlq_messages_in().await, 5);
    assert_eq!(queue_not_visible(&env).await, 0);
}

async fn queue_not_visible(env: &TestEnv) -> u64 {
    messages_not_visible(env.client(), env.dlq_url()).await
}

async fn one_message_is_redriven_with_markers_and_audited(kind: StoreKind) {
    let env = TestEnv::on(kind).await;
    let id = dead_lettered(&env, r#"{"id":"r1"}"#, "retryable").await;
    dead_lettered(&env, r#"{"id":"r2"}"#, "retryable").await;
    let console = console_on(&env, |_| {}).await;

    let (status, _, page) = console
        .post_from(
            &format!("/dlq/0/message/{id}"),
            &format!("/dlq/0/message/{id}/redrive"),
            &[],
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{page}");
    assert!(
        page.contains("redriven (redrive 1, final pass)") || page.contains("redriven (redrive 1)"),
        "{page}"
    );

    let sent = env.peek(1, Duration::from_secs(10)).await;
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].body(), Some(r#"{"id":"r1"}"#));
    assert_eq!(
        string_attribute(&sent[0], message::ATTR_DLQ_REDRIVEN).as_deref(),
        Some("true")
    );
    assert_eq!(
        string_attribute(&sent[0], message::ATTR_REDRIVE_COUNT).as_deref(),
        Some("1")
    );
    assert_eq!(
        string_attribute(&sent[0], message::ATTR_DLQ_FINAL_PASS),
        None
    );
    assert_eq!(env.dlq_messages_in().await, 1, "the other message stays");

    let actions = env.store().list_operator_actions(10).await.unwrap();
    assert_eq!(actions.len(), 1);
    assert_eq!(
        (actions[0].action.as_str(), actions[0].operator.as_str()),
        ("redrive", "tester@ci")
    );
    assert_eq!(actions[0].message_id, id);
    assert_eq!(actions[0].key.as_deref(), Some("r1"));
    assert_eq!(
        actions[0].before_sha256.as_deref(),
        Some(message::body_sha256(r#"{"id":"r1"}"#).as_str())
    );
    let runs = env.store().list_redrive_runs(10).await.unwrap();
    assert_eq!(
        (
            runs.len(),
            runs[0].counts.redriven,
            runs[0].operator.as_str()
        ),
        (1, 1, "tester@ci")
    );
    let audit = console.page("/audit").await;
    assert!(audit.contains("redriven (redrive 1"), "{audit}");

    // Gone from the DLQ: a second redrive of it says so and does nothing.
    let (status, _, page) = console
        .post_from("/dlq/0", &format!("/dlq/0/message/{id}/redrive"), &[])
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{page}");
    assert_eq!(env.messages_in().await, 1);
}

async fn an_edited_body_is_checked_redriven_audited_and_completed(kind: StoreKind) {
    let env = TestEnv::on(kind).await;
    env.send(r#"{"id":"e1","amount":"twelve"}"#).await;
    let amount_is_a_number = |job: &sqs_worker::Job| {
        let event: Value = serde_json::from_str(job.body()).unwrap();
        if event["amount"].is_number() {
            Ok(())
        } else {
            Err(HandlerError::permanent("amount is not a number"))
        }
    };
    let (handler, _) = RecordingHandler::new(Duration::ZERO, amount_is_a_number);
    env.drain(env.config().key("/id"), handler, Duration::from_secs(30))
        .await;
    assert_eq!(env.dlq_messages_in().await, 1);
    let scope = queue_name(env.queue_url());
    assert_eq!(env.checkpoint(&scope, "e1").await.status, "failed");

    let console = console_on(&env, |_| {}).await;
    let list = console.page("/dlq/0").await;
    let id = listed_message_ids(&list, 0).remove(0);
    let edit_page = format!("/dlq/0/message/{id}/edit");
    let (status, _, page) = console
        .post_from(&edit_page, &edit_page, &[("body", "{not json")])
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{page}");
    assert!(page.contains("must be valid JSON"), "{page}");
    assert_eq!(env.dlq_messages_in().await, 1, "nothing sent");

    let edited = "{\r\n  \"id\": \"e1\",\r\n  \"amount\": 12\r\n}";
    let (status, _, page) = console
        .post_from(&edit_page, &edit_page, &[("body", edited)])
        .await;
    assert_eq!(status, StatusCode::OK, "{page}");
    assert_eq!(env.dlq_messages_in().await, 0);
    let actions = env.store().list_operator_actions(10).await.unwrap();
    assert_eq!(actions[0].action, "edit_redrive");
    let (before, after) = (
        actions[0].before_sha256.clone().unwrap(),
        actions[0].after_sha256.clone().unwrap(),
    );
    assert_eq!(
        before,
        message::body_sha256(r#"{"id":"e1","amount":"twelve"}"#)
    );
    assert_eq!(
        after,
        message::body_sha256("{\n  \"id\": \"e1\",\n  \"amount\": 12\n}")
    );

    // The worker claims the edited event (its checkpoint took the new fingerprint) and
    // completes it.
    let (handler, calls) = RecordingHandler::new(Duration::ZERO, amount_is_a_number);
    env.drain(env.config().key("/id"), handler, Duration::from_secs(30))
        .await;
    assert_eq!(calls_per_key(&calls).get("e1"), Some(&1));
    assert_eq!(env.checkpoint(&scope, "e1").await.status, "complete");
    assert_eq!(env.dlq_messages_in().await, 0);
}

fn queue_name(url: &str) -> String {
    url.rsplit('/').next().unwrap().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delete_needs_the_confirmation_naming_the_message() {
    let env = TestEnv::new().await;
    let id = dead_lettered(&env, r#"{"id":"d1"}"#, "handler_permanent").await;
    let console = console_on(&env, |_| {}).await;
    let confirm_page = console.page(&format!("/dlq/0/message/{id}/delete")).await;
    assert!(
        confirm_page.contains(&id) && confirm_page.contains("d1"),
        "the confirmation names it"
    );

    let path = format!("/dlq/0/message/{id}/delete");
    let (status, _, _) = console
        .post_from(&path, &path, &[("confirm", "another-id")])
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(env.dlq_messages_in().await, 1);

    let (status, _, page) = console.post_from(&path, &path, &[("confirm", &id)]).await;
    assert_eq!(status, StatusCode::OK, "{page}");
    assert_eq!(env.dlq_messages_in().await, 0);
    assert_eq!(env.messages_in().await, 0, "deleted, not sent anywhere");
    let actions = env.store().list_operator_actions(10).await.unwrap();
    assert_eq!(
        (actions[0].action.as_str(), actions[0].key.as_deref()),
        ("delete", Some("d1"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bulk_redrive_by_reason_dry_runs_then_streams_to_its_summary() {
    let env = TestEnv::new().await;
    for n in 0..4 {
        dead_lettered(&env, &format!(r#"{{"id":"t{n}"}}"#), "retryable").await;
    }
    for n in 0..2 {
        dead_lettered(&env, &format!(r#"{{"id":"p{n}"}}"#), "handler_permanent").await;
    }
    let console = console_on(&env, |_| {}).await;

    let from = "/dlq/0?reason=retryable";
    let (status, _, dry) = console
        .post_from(
            from,
            "/dlq/0/bulk/dry-run",
            &[("reason", "retryable"), ("filter", "")],
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{dry}");
    assert!(dry.contains(r#"<span id="would">4</span>"#), "{dry}");
    assert!(dry.contains("2 others stay"), "{dry}");
    assert_eq!(
        dry.matches("redrive (count").count() + dry.matches("redriven (redrive 1").count(),
        4,
        "one line per message: {dry}"
    );
    assert_eq!(env.messages_in().await, 0, "a dry run sends nothing");
    assert_eq!(env.dlq_messages_in().await, 6);
    assert_eq!(
        queue_not_visible(&env).await,
        0,
        "and hands everything back"
    );

    let csrf = csrf_token(&dry);
    let (status, location, _) = console
        .post(
            "/dlq/0/bulk",
            &[
                ("csrf", &csrf),
                ("reason", "retryable"),
                ("filter", ""),
                ("expected", "4"),
            ],
        )
        .await;
    assert_eq!(status, StatusCode::SEE_OTHER);
    let location = location.unwrap();
    assert!(
        console
            .page(&location)
            .await
            .contains("Redrive of reason retryable")
    );

    let done = read_events_until_done(&console, &format!("{location}/events")).await;
    assert_eq!(
        (done["redriven"].as_u64(), done["expected"].as_u64()),
        (Some(4), Some(4)),
        "{done}"
    );
    assert!(
        done["summary"].as_str().unwrap().contains("4 redriven"),
        "{done}"
    );
    assert_eq!(env.dlq_messages_in().await, 2, "the other reason stays");
    let sent = env.peek(4, Duration::from_secs(10)).await;
    assert_eq!(sent.len(), 4);
    assert!(
        sent.iter()
            .all(|m| string_attribute(m, message::ATTR_REDRIVE_COUNT).as_deref() == Some("1"))
    );
    let actions = env.store().list_operator_actions(10).await.unwrap();
    assert_eq!(actions[0].action, "bulk_redrive");
    assert!(
        actions[0].detail.contains("reason retryable: 4 redriven"),
        "{}",
        actions[0].detail
    );
}

/// Read a bulk run's server-sent events until `done`; its data.
async fn read_events_until_done(console: &RunningConsole, path: &str) -> Value {
    let url = format!("{}{path}", console.base);
    let read = async {
        let mut response = reqwest::get(&url).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        let mut text = String::new();
        while let Some(chunk) = response.chunk().await.unwrap() {
            text.push_str(&String::from_utf8_lossy(&chunk));
            if let Some(at) = text.find("event: done") {
                let data = text[at..]
                    .lines()
                    .find_map(|l| l.strip_prefix("data: "))
                    .map(str::to_owned);
                if let Some(data) = data {
                    return serde_json::from_str::<Value>(&data).unwrap();
                }
            }
        }
        panic!("the event stream ended without `done`: {text}");
    };
    tokio::time::timeout(Duration::from_secs(60), read)
        .await
        .expect("the bulk run ends within a minute")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_csrf_origins_hosts_and_read_only_are_enforced() {
    assert!(
        check_listen("0.0.0.0:8080".parse().unwrap(), None)
            .unwrap_err()
            .contains("--auth-token")
    );
    assert!(check_listen("0.0.0.0:8080".parse().unwrap(), Some("short")).is_err());
    assert!(
        check_listen(
            "0.0.0.0:8080".parse().unwrap(),
            Some("0123456789abcdef0123")
        )
        .is_ok()
    );
    assert!(check_listen("127.0.0.1:8080".parse().unwrap(), None).is_ok());

    let env = TestEnv::new().await;
    let id = dead_lettered(&env, r#"{"id":"s1"}"#, "retryable").await;
    let token = "0123456789abcdef0123456789abcdef";
    let console = console_on(&env, |c| c.auth_token = Some(token.into())).await;
    let (status, _) = console.get("/").await;
    assert_eq!(status, StatusCode::SEE_OTHER, "to the login");
    let redrive = format!("/dlq/0/message/{id}/redrive");
    let (status, _, _) = console.post(&redrive, &[("csrf", "x")]).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(
        console.log_in("wrong-token-wrong-token", "mallory").await,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(console.log_in(token, "alice").await, StatusCode::SEE_OTHER);
    let overview = console.page("/").await;
    assert!(
        overview.contains("alice"),
        "the session's operator is shown"
    );
    assert!(!overview.contains(token), "no credential in any page");

    let (status, _, _) = console.post(&redrive, &[]).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "no CSRF token");
    let (status, _, _) = console.post(&redrive, &[("csrf", "forged")]).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "a wrong CSRF token");
    let csrf = csrf_token(&overview);
    let cross_site = reqwest::Client::new()
        .post(format!("{}{redrive}", console.base))
        .header("origin", "https://evil.example")
        .header("content-type", "application/x-www-form-urlencoded")
        .body(format!("csrf={csrf}"))
        .send()
        .await
        .unwrap();
    assert_eq!(
        cross_site.status(),
        StatusCode::UNAUTHORIZED,
        "no session cookie from elsewhere"
    );
    assert_eq!(env.dlq_messages_in().await, 1, "nothing was redriven");
    let (status, _, page) = console.post(&redrive, &[("csrf", &csrf)]).await;
    assert_eq!(status, StatusCode::OK, "{page}");
    assert_eq!(
        env.store().list_operator_actions(1).await.unwrap()[0].operator,
        "alice"
    );

    // Without a token: only loopback names, and a form from another origin is refused.
    let open = console_on(&env, |_| {}).await;
    let port = open.base.rsplit(':').next().unwrap();
    let rebound = reqwest::Client::new()
        .get(format!("{}/", open.base))
        .header("host", format!("evil.example:{port}"))
        .send()
        .await
        .unwrap();
    assert_eq!(rebound.status(), StatusCode::MISDIRECTED_REQUEST);
    let page = open.page("/dlq/0").await;
    let foreign = reqwest::Client::new()
        .post(format!("{}/dlq/0/bulk", open.base))
        .header("origin", "https://evil.example")
        .header("content-type", "application/x-www-form-urlencoded")
        .body(format!("csrf={}&reason=retryable", csrf_token(&page)))
        .send()
        .await
        .unwrap();
    assert_eq!(foreign.status(), StatusCode::FORBIDDEN);

    // Read-only: no action in any page, every mutation refused.
    let id = dead_lettered(&env, r#"{"id":"s2"}"#, "retryable").await;
    let read_only = console_on(&env, |c| c.read_only = true).await;
    for path in [
        "/".to_owned(),
        "/dlq/0".into(),
        format!("/dlq/0/message/{id}"),
        "/dead-letters".into(),
    ] {
        let page = read_only.page(&path).await;
        assert!(
            !page.contains(r#"method="post""#),
            "{path} shows an action: {page}"
        );
    }
    let (status, _) = read_only.get(&format!("/dlq/0/message/{id}/edit")).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let page = read_only.page("/").await;
    let (status, _, _) = read_only
        .post(
            &format!("/dlq/0/message/{id}/redrive"),
            &[("csrf", &csrf_token_or_open(&page))],
        )
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_eq!(env.dlq_messages_in().await, 1);
}

/// A read-only page has no form; the token does not matter, the refusal comes first.
fn csrf_token_or_open(page: &str) -> String {
    if page.contains(r#"name="csrf""#) {
        csrf_token(page)
    } else {
        "none".into()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_bodies_are_rendered_inert() {
    let env = TestEnv::new().await;
    let script = dead_lettered(
        &env,
        r#"{"id":"h1","x":"<script>alert(1)</script><img src=x onerror=alert(2)>"}"#,
        "<b>reason</b>",
    )
    .await;
    let rtl = dead_lettered(
        &env,
        "{\"id\":\"h2\",\"file\":\"invoice\u{202E}fdp.exe\"}",
        "retryable",
    )
    .await;
    let nul = dead_lettered(&env, r#"{"id":"h3","x":"a\u0000b"}"#, "retryable").await;
    let big = format!(r#"{{"id":"h4","x":"{}"}}"#, "y".repeat(250 * 1024));
    let big = dead_lettered(&env, &big, "retryable").await;
    let console = console_on(&env, |_| {}).await;

    let (status, list) = console.get("/dlq/0").await;
    assert_eq!(status, StatusCode::OK);
    for page in [
        list.clone(),
        console.page(&format!("/dlq/0/message/{script}")).await,
        console.page("/").await,
    ] {
        assert!(
            !page.contains("<script>alert")
                && !page.contains("<img src=x")
                && !page.contains("<b>reason"),
            "{page}"
        );
    }
    let one = console.page(&format!("/dlq/0/message/{script}")).await;
    assert!(
        one.contains("&lt;script&gt;alert(1)&lt;/script&gt;"),
        "{one}"
    );
    let one = console.page(&format!("/dlq/0/message/{rtl}")).await;
    assert!(
        !one.contains('\u{202E}') && one.contains(r"invoice\u{202E}fdp.exe"),
        "{one}"
    );
    let one = console.page(&format!("/dlq/0/message/{nul}")).await;
    assert!(!one.contains('\0') && one.contains(r"a\u0000b"), "{one}");
    let one = console.page(&format!("/dlq/0/message/{big}")).await;
    assert!(
        one.len() < 100 * 1024,
        "a 250 KB body is cut: {} bytes",
        one.len()
    );
    assert!(one.contains("Showing the first 64 KiB"));
    assert!(list.len() < 100 * 1024, "the list shows previews only");

    let response = reqwest::get(format!("{}/", console.base)).await.unwrap();
    let policy = response.headers()["content-security-policy"]
        .to_str()
        .unwrap();
    assert!(policy.contains("script-src 'self'") && policy.contains("frame-ancestors 'none'"));

    // A dead letter's markup, and the NUL of its error (stored as U+FFFD), are shown inertly
    // too (SQS bodies cannot hold a NUL).
    let attributes = json!({});
    let letter = NewDeadLetter {
        scope: "s",
        key: "k<script>",
        queue_url: env.queue_url(),
        message_id: "m",
        body: "a<script>x</script>",
        attributes: &attributes,
        reason: "handler_permanent",
        error: "<script>bad</script>\u{202E}",
        attempts: 1,
        redrive_count: 0,
        requeue_generation: 0,
        payload_sha256: "h",
    };
    let id = env
        .store()
        .record_dead_letter(&letter, false, None)
        .await
        .unwrap()
        .unwrap();
    for page in [
        console.page("/dead-letters").await,
        console.page(&format!("/dead-letters/{id}")).await,
    ] {
        assert!(
            !page.contains("<script>") && !page.contains('\u{202E}') && !page.contains('\0'),
            "{page}"
        );
        assert!(page.contains("&lt;script&gt;"), "{page}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_are_searched_exported_and_requeued_and_checkpoints_looked_up() {
    let env = TestEnv::new().await;
    let attributes = json!({});
    let mut ids = Vec::new();
    for (scope, key, reason) in [
        ("orders", "o1", "retryable"),
        ("orders", "o2", "handler_permanent"),
        ("refunds", "o1", "retryable"),
    ] {
        let body = format!(r#"{{"id":"{key}"}}"#);
        let letter = NewDeadLetter {
            scope,
            key,
            queue_url: env.queue_url(),
            message_id: "m",
            body: &body,
            attributes: &attributes,
            reason,
            error: "it failed",
            attempts: 2,
            redrive_count: 3,
            requeue_generation: 0,
            payload_sha256: "h",
        };
        ids.push(
            env.store()
                .record_dead_letter(&letter, false, None)
                .await
                .unwrap()
                .unwrap(),
        );
    }
    let console = console_on(&env, |_| {}).await;
    let overview = console.page("/").await;
    assert!(
        overview.contains("<title>retryable: 2</title>"),
        "today's bar, by reason: {overview}"
    );
    let count = |page: &str| page.matches(r#"<td><a href="/dead-letters/"#).count();
    assert_eq!(count(&console.page("/dead-letters").await), 3);
    assert_eq!(count(&console.page("/dead-letters?scope=orders").await), 2);
    assert_eq!(count(&console.page("/dead-letters?key=o1").await), 2);
    assert_eq!(
        count(
            &console
                .page("/dead-letters?scope=orders&reason=retryable&since=1h")
                .await
        ),
        1
    );
    let (status, _) = console.get("/dead-letters?since=soon").await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    let (status, lines) = console.get("/dead-letters/export?key=o1").await;
    assert_eq!(status, StatusCode::OK);
    let exported: Vec<Value> = lines
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(exported.len(), 2);
    assert!(
        exported
            .iter()
            .all(|l| l["idempotency_key"] == "o1" && l["body"] == r#"{"id":"o1"}"#)
    );

    let show = format!("/dead-letters/{}", ids[0]);
    let (status, _, page) = console
        .post_from(&show, &format!("{show}/requeue"), &[])
        .await;
    assert_eq!(status, StatusCode::OK, "{page}");
    let sent = env.peek(1, Duration::from_secs(10)).await;
    assert_eq!(sent[0].body(), Some(r#"{"id":"o1"}"#));
    assert_eq!(
        string_attribute(&sent[0], message::ATTR_REQUEUE_GENERATION).as_deref(),
        Some("1")
    );
    assert!(
        env.store()
            .find_dead_letter(ids[0])
            .await
            .unwrap()
            .unwrap()
            .requeued_at
            .is_some()
    );
    assert_eq!(
        env.store().list_operator_actions(1).await.unwrap()[0].action,
        "requeue"
    );

    // A checkpoint with two steps, one still running.
    let store = env.store();
    store
        .claim_batch(
            "orders",
            "tok",
            &claim_terms(Duration::from_secs(60)),
            &[claim_request("c1")],
        )
        .await
        .unwrap();
    let lease = Lease::new("orders", "c1", "tok");
    assert!(
        store
            .record_step(&lease, 0, "reserve", &json!({"stock": 3}))
            .await
            .unwrap()
    );
    assert!(
        store
            .record_step(&lease, 1, "charge", &json!("ch_<b>1</b>"))
            .await
            .unwrap()
    );
    let page = console.page("/checkpoints?scope=orders&key=c1").await;
    assert!(
        page.contains("in_progress") && page.contains("tok"),
        "{page}"
    );
    let (reserve, charge) = (page.find("reserve").unwrap(), page.find("charge").unwrap());
    assert!(reserve < charge, "the steps in order");
    assert!(
        page.contains("&quot;stock&quot;: 3") && page.contains("ch_&lt;b&gt;1&lt;/b&gt;"),
        "{page}"
    );
    let missing = console.page("/checkpoints?scope=orders&key=nope").await;
    assert!(missing.contains("No checkpoint"));
}
