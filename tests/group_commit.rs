//! The store calls behind group commit: the steps of several events recorded in one call,
//! and an event's last step recorded by its completion — each record still fenced by its
//! own lease token and index, whatever the others in the call. Then the worker: a step
//! path whose records share statements, and receiving that adapts its pollers. Real
//! LocalStack and every store.

mod common;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use common::*;
use serde_json::json;
use sqs_worker::store::{Completion, NewStep, StepRecord, Written};
use sqs_worker::{Handler, HandlerError, Job};

store_tests!(
    records_of_several_events_are_fenced_one_by_one,
    a_completion_appends_the_last_step_once,
    a_three_step_handler_completes_every_event_with_its_steps,
    pollers_grow_with_a_backlog_and_retire_when_the_queue_is_empty,
);

fn step(index: usize, name: &str) -> NewStep {
    NewStep {
        index,
        name: name.into(),
        output: json!({ "step": name }),
    }
}

fn record(key: &str, token: &str, step: NewStep) -> StepRecord {
    StepRecord {
        key: key.into(),
        token: token.into(),
        step,
    }
}

/// Claim `keys` in scope `s` under `token`.
async fn claim(env: &TestEnv, token: &str, keys: &[&str]) {
    let requests: Vec<_> = keys.iter().map(|k| claim_request(k)).collect();
    env.store()
        .claim_batch("s", token, &claim_terms(Duration::from_secs(60)), &requests)
        .await
        .unwrap();
}

async fn step_names_of(env: &TestEnv, key: &str) -> Vec<String> {
    step_names(&env.checkpoint("s", key).await.steps)
}

/// Send `n` events `{prefix}{i}`, several at a time.
async fn send_events(env: &TestEnv, prefix: &str, n: usize) {
    let bodies: Vec<String> = (0..n)
        .map(|i| format!(r#"{{"id":"{prefix}{i}"}}"#))
        .collect();
    for chunk in bodies.chunks(20) {
        futures_util::future::join_all(chunk.iter().map(|body| env.send(body))).await;
    }
}

async fn records_of_several_events_are_fenced_one_by_one(kind: StoreKind) {
    let env = TestEnv::builder().store(kind).no_queue().start().await;
    claim(&env, "w#1", &["a", "b", "c"]).await;
    claim(&env, "w#2", &["d"]).await;
    let written = env
        .store()
        .record_steps(
            "s",
            &[
                record("a", "w#1", step(0, "fetch")),
                record("b", "w#1", step(0, "fetch")),
                // Not next: nothing is recorded at index 0 yet.
                record("c", "w#1", step(1, "store")),
                // Another claim's lease.
                record("d", "w#1", step(0, "fetch")),
            ],
        )
        .await
        .unwrap();
    assert_eq!(
        written,
        [
            Written::Done,
            Written::Done,
            Written::NotHeld,
            Written::NotHeld
        ]
    );
    assert_eq!(step_names_of(&env, "a").await, ["fetch"]);
    assert_eq!(step_names_of(&env, "b").await, ["fetch"]);
    assert!(step_names_of(&env, "c").await.is_empty());
    assert!(step_names_of(&env, "d").await.is_empty());

    // A step is appended once: again at index 0 it is refused, at 1 it lands.
    let written = env
        .store()
        .record_steps(
            "s",
            &[
                record("a", "w#1", step(0, "fetch")),
                record("b", "w#1", step(1, "store")),
            ],
        )
        .await
        .unwrap();
    assert_eq!(written, [Written::NotHeld, Written::Done]);
    assert_eq!(step_names_of(&env, "a").await, ["fetch"]);
    assert_eq!(step_names_of(&env, "b").await, ["fetch", "store"]);
    let b = env.checkpoint("s", "b").await;
    assert_eq!(b.steps[1]["output"], json!({"step": "store"}));
}

async fn a_completion_appends_the_last_step_once(kind: StoreKind) {
    let env = TestEnv::builder().store(kind).no_queue().start().await;
    claim(&env, "w#1", &["e", "f", "g"]).await;
    let store = env.store();
    assert!(
        store
            .record_step(&lease("e", "w#1"), 0, "fetch", &json!(1))
            .await
            .unwrap()
    );
    let events = [
        Completion {
            last_step: Some(step(1, "store")),
            ..Completion::new("e", "w#1")
        },
        Completion::new("f", "w#1"),
        // Not next (no step 2 before it): the event is not completed either.
        Completion {
            last_step: Some(step(3, "late")),
            ..Completion::new("g", "w#1")
        },
        // Never claimed by this token.
        Completion::new("h", "w#1"),
    ];
    assert_eq!(
        store.complete_events("s", &events).await.unwrap(),
        [
            Written::Done,
            Written::Done,
            Written::NotHeld,
            Written::NotHeld
        ]
    );
    let e = env.checkpoint("s", "e").await;
    assert_eq!(e.status, "complete");
    assert_eq!(step_names(&e.steps), ["fetch", "store"]);
    assert_eq!(env.checkpoint("s", "f").await.status, "complete");
    let g = env.checkpoint("s", "g").await;
    assert_eq!(g.status, "in_progress");
    assert!(step_names(&g.steps).is_empty());

    // A retry of the same completion (its reply was lost) finds it done, and appends nothing.
    assert_eq!(
        store.complete_events("s", &events[..1]).await.unwrap(),
        [Written::Done]
    );
    assert_eq!(
        step_names(&env.checkpoint("s", "e").await.steps),
        ["fetch", "store"]
    );
}

fn lease(key: &str, token: &str) -> sqs_worker::Lease {
    sqs_worker::Lease::new("s", key, token)
}

/// Three steps, the last returning the event's id: every step's output must be stored.
struct ThreeSteps;

#[async_trait]
impl Handler for ThreeSteps {
    async fn handle(&self, job: &mut Job) -> Result<(), HandlerError> {
        let key = job.key().to_owned();
        let a: u32 = job.step("one", || async { Ok(1) }).await?;
        let b: u32 = job.step("two", || async move { Ok(a + 1) }).await?;
        job.step("three", || async move { Ok(format!("{key}:{b}")) })
            .await?;
        Ok(())
    }
}

/// Many events at once through the recorder and the completion that carries each event's
/// last step: every event complete, with its three steps in order and their outputs.
async fn a_three_step_handler_completes_every_event_with_its_steps(kind: StoreKind) {
    let env = TestEnv::builder().store(kind).start().await;
    send_events(&env, "t", 40).await;
    let mut config = env.config().scope("s").key("/id");
    config.concurrency = 20;
    let summary = env
        .drain(config, Arc::new(ThreeSteps), Duration::from_secs(90))
        .await;
    assert_eq!(summary.processed, 40, "{summary:?}");
    for i in 0..40 {
        let checkpoint = env.checkpoint("s", &format!("t{i}")).await;
        assert_eq!(checkpoint.status, "complete");
        assert_eq!(step_names(&checkpoint.steps), ["one", "two", "three"]);
        assert_eq!(checkpoint.steps[2]["output"], json!(format!("t{i}:2")));
    }
}

/// A backlog of full batches with permits to spare starts more pollers (up to the
/// ceiling); once the queue is empty each extra poller stops at its first empty receive,
/// so the idle worker long-polls with one.
async fn pollers_grow_with_a_backlog_and_retire_when_the_queue_is_empty(kind: StoreKind) {
    let env = TestEnv::builder().store(kind).start().await;
    send_events(&env, "p", 400).await;
    let mut config = env.config().scope("s").key("/id");
    config.concurrency = 40;
    config.pollers = 1;
    config.max_pollers = 4;
    config.wait_time = Duration::from_secs(1);
    config.exit_when_idle = Some(Duration::from_secs(4));
    let worker = env.worker(config, Arc::new(sqs_worker::handlers::NoopHandler));
    let summary = tokio::time::timeout(Duration::from_secs(90), worker.run())
        .await
        .expect("the worker exits once the queue is drained")
        .unwrap();
    assert_eq!(summary.processed, 400, "{summary:?}");
    assert!(summary.peak_pollers >= 2, "{summary:?}");
    assert!(summary.peak_pollers <= 4, "{summary:?}");
    // Four idle seconds of one-second polls: about four by the last poller, and one each
    // by the pollers that retired. Four pollers that never retired would make about 16.
    assert!(summary.empty_receives <= 9, "{summary:?}");
}
