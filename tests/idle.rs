//! `--exit-when-idle` for batch jobs: exit soon after the queue drains (not a long poll
//! later), and never while the queue still holds work this worker could do — a message
//! hidden by a crashed worker, or one sent with a delay. Through the binary, on LocalStack.

mod common;

use std::time::{Duration, Instant};

use common::*;

/// `sqs-worker run` on the test's queue with the noop handler and `--exit-when-idle`.
fn noop_run(env: &TestEnv, idle: &str) -> tokio::process::Command {
    let mut command = env.run_command();
    command
        .args(["--key", "/id", "--handler", "noop"])
        .args(["--exit-when-idle", idle])
        .stdout(std::process::Stdio::null());
    command
}

/// With the default 20 s long polls, a drained worker exits within the idle period and a
/// couple of seconds, not after the polls in flight end (it took 20 s more before).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drained_worker_exits_within_the_idle_period_and_two_seconds() {
    let env = TestEnv::builder().no_dlq().start().await;
    for i in 0..3 {
        env.send(&format!(r#"{{"id":"idle-{i}"}}"#)).await;
    }
    let scope = queue_name(env.queue_url());
    let mut worker = noop_run(&env, "3").spawn().unwrap();
    // The moment the last event is complete (polled every 100 ms).
    env.wait_for_checkpoint(
        "the events to complete",
        (scope, "idle-2"),
        Duration::from_secs(30),
        |c| c.status == "complete",
    )
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
    let env = TestEnv::builder().no_dlq().start().await;
    // A "crashed worker": received with a 6 s visibility timeout, never deleted.
    env.send(r#"{"id":"hidden"}"#).await;
    let held = env
        .client()
        .receive_message()
        .queue_url(env.queue_url())
        .visibility_timeout(6)
        .wait_time_seconds(5)
        .send()
        .await
        .unwrap();
    assert_eq!(held.messages().len(), 1);
    env.client()
        .send_message()
        .queue_url(env.queue_url())
        .message_body(r#"{"id":"delayed"}"#)
        .delay_seconds(4)
        .send()
        .await
        .unwrap();

    let status = tokio::time::timeout(Duration::from_secs(60), noop_run(&env, "2").status())
        .await
        .expect("the worker exits")
        .unwrap();
    assert!(status.success(), "{status}");
    let scope = queue_name(env.queue_url());
    for key in ["hidden", "delayed"] {
        let checkpoint = env.find_checkpoint(scope, key).await;
        assert_eq!(
            checkpoint.map(|c| c.status).as_deref(),
            Some("complete"),
            "{key} was handled before the exit"
        );
    }
    assert_eq!(env.messages_in().await, 0);
}
