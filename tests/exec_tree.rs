//! The exec handler's process tree never outlives its run: not a worker killed with SIGKILL,
//! not a handler stopped by --max-handler-time. Through the binary, on real LocalStack and
//! PostgreSQL, with a handler whose effect is done by a grandchild (`sh -c '(…) & wait'`),
//! which killing the direct child alone would leave running.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::*;

/// A handler whose effect comes from a background subshell 3 s later, recording the PIDs of
/// the shell, the subshell and its `sleep` (one line each) so the test can look for them.
fn grandchild_effect_script(dir: &Path) -> String {
    let pids = dir.join("pids");
    let effects = dir.join("effects");
    format!(
        "echo $$ >> {pids}; \
         (sleep 3 & echo $! >> {pids}; wait; echo effect >> {effects}) & \
         echo $! >> {pids}; wait",
        pids = pids.display(),
        effects = effects.display(),
    )
}

fn lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect()
}

/// True while `pid` is a live process (a zombie, dead but not yet reaped, counts as gone).
fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the command name in parentheses: "pid (comm) S ...".
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}

/// `sqs-worker run` on the test's queue, 4 s leases, `script` as the exec handler.
fn run_command(env: &TestEnv, extra: &[&str], script: &str) -> tokio::process::Command {
    let mut command = env.run_command();
    command
        .args(["--key", "/id", "--visibility-timeout", "4"])
        .args(extra)
        .args(["--", "sh", "-c", script])
        .stdout(std::process::Stdio::null());
    command
}

/// SIGKILL the worker mid-handler: within a second no process of the handler's tree is alive
/// and its effect never happens; a takeover worker then runs the handler once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_worker_takes_its_handler_tree_with_it() {
    let env = TestEnv::builder().no_dlq().start().await;
    let dir = tempdir("exec-tree-kill");
    let script = grandchild_effect_script(&dir);
    env.send(r#"{"id":"tree-1"}"#).await;

    // Short polls: a long poll of the killed worker still pending in SQS would take the
    // message once more when it becomes visible (and hide it from the takeover).
    let mut first = run_command(&env, &["--wait-time-seconds", "1"], &script)
        .spawn()
        .unwrap();
    let pid_file = dir.join("pids");
    wait_until(
        "the handler's tree to start",
        Duration::from_secs(30),
        || {
            let n = lines(&pid_file).len();
            async move { n >= 3 }
        },
    )
    .await;
    let started = Instant::now();
    let pids: Vec<i32> = lines(&pid_file)
        .iter()
        .map(|l| l.parse().unwrap())
        .collect();
    assert!(
        pids.iter().all(|&pid| alive(pid)),
        "the tree runs before the kill"
    );

    first.start_kill().unwrap();
    first.wait().await.unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let survivors: Vec<i32> = pids.iter().copied().filter(|&pid| alive(pid)).collect();
    assert!(
        survivors.is_empty(),
        "handler processes outlived the worker by 1 s: {survivors:?}"
    );

    // The subshell would have done its effect 3 s after it started.
    tokio::time::sleep(Duration::from_secs(4).saturating_sub(started.elapsed())).await;
    assert!(
        lines(&dir.join("effects")).is_empty(),
        "the orphaned effect happened"
    );

    // A takeover worker (after the 4 s lease) runs the event once.
    let status = tokio::time::timeout(
        Duration::from_secs(60),
        run_command(&env, &["--exit-when-idle", "2"], &script).status(),
    )
    .await
    .expect("the takeover worker exits")
    .unwrap();
    assert!(status.success(), "{status}");
    assert_eq!(
        lines(&dir.join("effects")),
        ["effect"],
        "exactly one effect, by the takeover"
    );
    let checkpoint = env.checkpoint(queue_name(env.queue_url()), "tree-1").await;
    assert_eq!(checkpoint.status, "complete");
    assert_eq!(checkpoint.attempts, 2);
}

/// --max-handler-time stops the whole tree, not only the direct child: the timed-out
/// attempt's background effect never happens; the retry (which exits at once) completes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_timeout_stops_the_whole_tree() {
    let env = TestEnv::builder().no_dlq().start().await;
    let dir = tempdir("exec-tree-timeout");
    let script = format!(
        "if [ \"$SQS_WORKER_ATTEMPT\" -ge 2 ]; then echo retry >> {retries}; exit 0; fi; {}",
        grandchild_effect_script(&dir),
        retries = dir.join("retries").display(),
    );
    env.send(r#"{"id":"tree-2"}"#).await;
    let started = Instant::now();
    let status = tokio::time::timeout(
        Duration::from_secs(60),
        run_command(
            &env,
            &[
                "--max-handler-time",
                "1",
                "--backoff-base",
                "1",
                "--exit-when-idle",
                "2",
            ],
            &script,
        )
        .status(),
    )
    .await
    .expect("the worker exits")
    .unwrap();
    assert!(status.success(), "{status}");
    assert_eq!(lines(&dir.join("retries")), ["retry"], "the retry ran once");
    let pids: Vec<i32> = lines(&dir.join("pids"))
        .iter()
        .map(|l| l.parse().unwrap())
        .collect();
    assert_eq!(pids.len(), 3, "the first attempt started its tree");
    assert!(
        pids.iter().all(|&pid| !alive(pid)),
        "a timed-out tree survived: {pids:?}"
    );
    tokio::time::sleep(Duration::from_secs(4).saturating_sub(started.elapsed())).await;
    assert!(
        lines(&dir.join("effects")).is_empty(),
        "the timed-out attempt's effect happened"
    );
}
