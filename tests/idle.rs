//! `--exit-when-idle` for batch jobs: exit soon after the queue drains (not a long poll
//! later), and never while the queue still holds work this worker could do — a message
//! hidden by a crashed worker, or one sent with a delay. Through the binary, on LocalStack.

mod common;

use std::time::{Duration, Instant};

use common::*;
use sqs_worker::PostgresStore;
use sqs_worker::store::Retention;

fn noop_run(database_url: &str, queue_url: &str, idle: &str) -> tokio::process::Command {
    let mut command = sqs_worker_command(database_url);
    command
        .args([
            "run",
            "--queue-url",
            queue_url,
            "--key",
            "/id",
            "--handler",
            "noop",
        ])
        .args(["--exit-when-idle", idle])
        .stdout(std::process::Stdio::null());
    command
}

/// With the default 20 s long polls, a drained worker exits within the idle period and a
/// couple of seconds, not after the polls in flight end (it took 20 s more before).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drained_worker_exits_within_the_idle_period_and_two_seconds() {
    let client = sqs_client().await;
    let (pool, database_url) = fresh_database().await;
    let queue = fresh_queue(&client, false, 5).await;
    for i in 0..3 {
        send(&client, &queue.url, &format!(r#"{{"id":"idle-{i}"}}"#)).await;
    }
    let store = PostgresStore::new(pool);
    let scope = queue_name(&queue.url).to_owned();
    let mut worker = noop_run(&database_url, &queue.url, "3").spawn().unwrap();
    // The moment the last event is complete (polled every 100 ms).
    wait_until("the events to complete", Duration::from_secs(30), || {
        let (store, scope) = (store.clone(), scope.clone());
        async move {
            match store.find(&scope, "idle-2").await.unwrap() {
                Some(c) => c.status == "complete",
                None => false,
            }
        }
    })
    .await;
    let drained_at = Instant::now();
    let status = tokio::time::timeout(Duration::from_secs(40), worker.wait())
        .await
        .expect("the worker exits")
        .unwrap();
    assert!(status.success(), "{status}");
    let after = drained_at.elapsed();
    assert!(
        after <= Duration::from_secs(3 + 2),
        "exited {after:?} after the queue drained (idle 3 s)"
    );
}

/// A message hidden by a crashed consumer and a delayed one are work left: the worker waits
/// for them, handles both, and only then exits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_flight_and_delayed_messages_are_waited_for() {
    let client = sqs_client().await;
    let (pool, database_url) = fresh_database().await;
    let queue = fresh_queue(&client, false, 5).await;
    // A "crashed worker": received with a 6 s visibility timeout, never deleted.
    send(&client, &queue.url, r#"{"id":"hidden"}"#).await;
    let held = client
        .receive_message()
        .queue_url(&queue.url)
        .visibility_timeout(6)
        .wait_time_seconds(5)
        .send()
        .await
        .unwrap();
    assert_eq!(held.messages().len(), 1);
    client
        .send_message()
        .queue_url(&queue.url)
        .message_body(r#"{"id":"delayed"}"#)
        .delay_seconds(4)
        .send()
        .await
        .unwrap();

    let status = tokio::time::timeout(
        Duration::from_secs(60),
        noop_run(&database_url, &queue.url, "2").status(),
    )
    .await
    .expect("the worker exits")
    .unwrap();
    assert!(status.success(), "{status}");
    let store = PostgresStore::new(pool);
    let scope = queue_name(&queue.url);
    for key in ["hidden", "delayed"] {
        let checkpoint = store.find(scope, key).await.unwrap();
        assert_eq!(
            checkpoint.map(|c| c.status).as_deref(),
            Some("complete"),
            "{key} was handled before the exit"
        );
    }
    assert_eq!(messages_in(&client, &queue.url).await, 0);
}
