//! Starting up: mistakes fail at once with one line saying what to fix (exit 2), outages are
//! waited out with one line per attempt and /readyz 503 (exit 1 at --startup-timeout), and
//! a worker started during an outage runs once it ends. Through the binary, with
//! RUST_BACKTRACE=1 set as on many developer machines: an operator's error prints no
//! backtrace.

mod common;

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use common::*;

struct Ended {
    code: Option<i32>,
    stderr: String,
}

async fn run_briefly(mut command: tokio::process::Command) -> Ended {
    command.env("RUST_BACKTRACE", "1").stdout(Stdio::null());
    let output = tokio::time::timeout(Duration::from_secs(60), command.output())
        .await
        .expect("the worker ends on its own")
        .unwrap();
    Ended {
        code: output.status.code(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

/// The last stderr line, checked to be a short `error:` line with no backtrace anywhere.
fn error_line(ended: &Ended) -> String {
    assert!(
        !ended.stderr.to_lowercase().contains("backtrace"),
        "no backtrace for an operator's error:\n{}",
        ended.stderr
    );
    let last = ended.stderr.lines().last().unwrap_or_default().to_owned();
    assert!(last.starts_with("error: "), "{}", ended.stderr);
    assert!(last.chars().count() <= 300, "one short line: {last}");
    last
}

fn run_args(queue_url: &str) -> Vec<String> {
    ["run", "--queue-url", queue_url, "--handler", "noop"]
        .map(str::to_owned)
        .to_vec()
}

/// What retrying cannot mend ends the start at once, in one line, with exit 2.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_up_mistakes_fail_at_once_in_one_line() {
    let env = TestEnv::builder().no_dlq().start().await;
    let missing_queue = format!("{}-missing", env.queue_url());
    let home = tempdir("no-credentials");
    let missing_database = format!(
        "{}/{}",
        env.database_url().rsplit_once('/').unwrap().0,
        unique("sqsw_missing")
    );

    let mut cases: Vec<(&str, tokio::process::Command, &str)> = Vec::new();
    let mut command = env.command();
    command.args(run_args(&missing_queue));
    cases.push((
        "no such queue",
        command,
        "does not exist: check --queue-url, AWS_REGION and AWS_ENDPOINT_URL",
    ));

    let mut command = env.command();
    command
        .args(run_args(env.queue_url()))
        .env_remove("AWS_ACCESS_KEY_ID")
        .env_remove("AWS_SECRET_ACCESS_KEY")
        .env_remove("AWS_PROFILE")
        .env("HOME", &home)
        .env("AWS_EC2_METADATA_DISABLED", "true");
    cases.push(("no credentials", command, "no AWS credentials found"));

    let mut command = sqs_worker_command("postgres//no-scheme");
    command.args(run_args(env.queue_url()));
    cases.push((
        "malformed database URL",
        command,
        "is not a checkpoint store URL",
    ));

    let mut command = sqs_worker_command(&missing_database);
    command.args(run_args(env.queue_url()));
    cases.push(("no such database", command, "does not exist"));

    let mut command = env.command();
    command
        .args(run_args(env.queue_url()))
        .args(["--key", "order_id"]);
    cases.push(("key pointer without /", command, "must start with '/'"));

    // A newer version migrated this database (a rollback, or an old task in a rolling
    // deploy): starting cannot fix it, and the line says what to run.
    let newer = unique("sqsw_newer");
    let admin = env.database_url().rsplit_once('/').unwrap().0.to_owned();
    let newer_url = format!("{admin}/{newer}");
    create_newer_schema(&admin, &newer).await;
    let mut command = sqs_worker_command(&newer_url);
    command.args(run_args(env.queue_url()));
    cases.push((
        "schema migrated by a newer version",
        command,
        "has migration 99990101000000, which this sqs-worker does not know",
    ));
    let mut command = sqs_worker_command(&newer_url);
    command.arg("migrate");
    cases.push((
        "migrate on a newer schema",
        command,
        "a newer version migrated it",
    ));

    for (case, command, expected) in cases {
        let ended = run_briefly(command).await;
        assert_eq!(ended.code, Some(2), "{case}: {}", ended.stderr);
        let line = error_line(&ended);
        assert!(line.contains(expected), "{case}: {line}");
        assert!(
            ended.stderr.lines().count() <= 2,
            "{case}: one or two lines, got:\n{}",
            ended.stderr
        );
    }
    on_server(
        &admin,
        &format!("drop database if exists {newer} with (force)"),
    )
    .await;
}

/// One statement on the server at `admin` (through its `postgres` database).
async fn on_server(admin: &str, statement: &str) {
    let server = sqlx::PgPool::connect(&format!("{admin}/postgres"))
        .await
        .unwrap();
    sqlx::query(statement).execute(&server).await.unwrap();
    server.close().await;
}

/// Database `name` on the server at `admin`, migrated, plus a migration from a later version.
async fn create_newer_schema(admin: &str, name: &str) {
    on_server(admin, &format!("create database {name}")).await;
    let pool = sqlx::PgPool::connect(&format!("{admin}/{name}"))
        .await
        .unwrap();
    sqs_worker::MIGRATOR.run(&pool).await.unwrap();
    sqlx::query(
        "insert into _sqlx_migrations (version, description, success, checksum, execution_time)
         values (99990101000000, 'from the future', true, '\\x00', 1)",
    )
    .execute(&pool)
    .await
    .unwrap();
    pool.close().await;
}

/// An endpoint or a database that refuses connections is retried, one line per attempt,
/// until --startup-timeout; then one line and exit 1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outages_at_start_are_retried_until_the_deadline() {
    let env = TestEnv::builder().no_dlq().start().await;
    let closed = closed_port().await;

    let mut sqs_down = env.command();
    sqs_down
        .args(run_args(env.queue_url()))
        .args(["--startup-timeout", "8"])
        .env("AWS_ENDPOINT_URL", format!("http://127.0.0.1:{closed}"));
    let mut database_down =
        sqs_worker_command(&format!("postgres://postgres@127.0.0.1:{closed}/x"));
    database_down
        .args(run_args(env.queue_url()))
        .args(["--startup-timeout", "8"]);

    for (case, command, expected) in [
        (
            "SQS endpoint refused",
            sqs_down,
            "cannot reach SQS for queue",
        ),
        (
            "database refused",
            database_down,
            "cannot reach the database at postgres://postgres@127.0.0.1",
        ),
    ] {
        let ended = run_briefly(command).await;
        assert_eq!(ended.code, Some(1), "{case}: {}", ended.stderr);
        let line = error_line(&ended);
        assert!(
            line.contains(expected) && line.contains("gave up after"),
            "{case}: {line}"
        );
        // One line per failed attempt that is tried again, then the last one.
        let attempts: usize = line
            .split("gave up after ")
            .nth(1)
            .and_then(|rest| rest.split(' ').next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("{case}: the attempts in {line}"));
        let retries = ended
            .stderr
            .lines()
            .filter(|l| l.contains("trying again"))
            .count();
        assert!(attempts >= 2, "{case}: retried at all:\n{}", ended.stderr);
        assert_eq!(
            retries,
            attempts - 1,
            "{case}: one line per attempt:\n{}",
            ended.stderr
        );
    }
}

/// A worker started while PostgreSQL and SQS are unreachable says so, answers /readyz with
/// 503, and once both are back it runs the queue as usual.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_started_during_an_outage_runs_once_it_ends() {
    let env = TestEnv::builder().no_dlq().start().await;
    env.send(r#"{"id":"late"}"#).await;
    let database_proxy = Proxy::start(database_server()).await;
    let sqs_proxy = Proxy::start(sqs_server()).await;
    database_proxy.down();
    sqs_proxy.down();
    let proxied_database = env.database_url_via(database_proxy.addr);
    let metrics_port = closed_port().await;
    let dir = tempdir("startup-outage");
    let log = dir.join("stderr.log");

    let mut worker = sqs_worker_command(&proxied_database)
        .args(run_args(env.queue_url()))
        .args(["--key", "/id", "--exit-when-idle", "2"])
        .args(["--metrics-addr", &format!("127.0.0.1:{metrics_port}")])
        .env("AWS_ENDPOINT_URL", format!("http://{}", sqs_proxy.addr))
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();

    wait_until(
        "/readyz to answer 503",
        Duration::from_secs(20),
        || async move {
            http_get_opt(metrics_port, "/readyz")
                .await
                .is_some_and(|(status, _)| status == 503)
        },
    )
    .await;
    wait_until(
        "a retry line for the database",
        Duration::from_secs(20),
        || {
            let seen = count_lines(&log, "connecting to the database");
            async move { seen >= 2 }
        },
    )
    .await;
    database_proxy.up();
    wait_until("a retry line for SQS", Duration::from_secs(30), || {
        let seen = count_lines(&log, "reading the queue's attributes");
        async move { seen >= 1 }
    })
    .await;
    assert_eq!(
        http_get(metrics_port, "/readyz").await.0,
        503,
        "not ready while SQS is down"
    );
    sqs_proxy.up();

    let status = tokio::time::timeout(Duration::from_secs(60), worker.wait())
        .await
        .expect("the worker drains the queue and exits")
        .unwrap();
    assert!(
        status.success(),
        "{}",
        std::fs::read_to_string(&log).unwrap()
    );
    let checkpoint = env
        .find_checkpoint(queue_name(env.queue_url()), "late")
        .await;
    assert_eq!(checkpoint.map(|c| c.status).as_deref(), Some("complete"));
}

fn count_lines(path: &Path, needle: &str) -> usize {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains(needle) && l.contains("trying again"))
        .count()
}

/// A local port nothing listens on (bound, then released).
async fn closed_port() -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    listener.local_addr().unwrap().port()
}

/// `http_get`, or None while nothing listens yet.
async fn http_get_opt(port: u16, path: &str) -> Option<(u16, String)> {
    tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .ok()?;
    Some(http_get(port, path).await)
}

/// `demo` with no `DATABASE_URL` and PostgreSQL unreachable (libpq's `PGHOST`/`PGPORT`
/// pointed at a closed port) needs no database server: it checkpoints in a SQLite file in
/// the temp dir, prints its summary and says where the file is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_needs_no_database_server() {
    let env = TestEnv::on(StoreKind::Sqlite).await;
    let temp = tempdir("demo");
    let mut command = env.store_address().command();
    command
        .env_remove("DATABASE_URL")
        .env("PGHOST", "127.0.0.1")
        .env("PGPORT", closed_port().await.to_string())
        .env("TMPDIR", &temp)
        .args([
            "demo",
            "--orders",
            "6",
            "--queue-name",
            queue_name(env.queue_url()),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let output = tokio::time::timeout(Duration::from_secs(120), command.output())
        .await
        .expect("the demo ends on its own")
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stdout}\n{stderr}");
    let file = temp.join("sqs-worker-demo.sqlite");
    let count = |label: &str| -> u64 {
        let line = stdout
            .lines()
            .find(|line| line.trim_start().starts_with(label))
            .unwrap_or_else(|| panic!("no {label:?} line in:\n{stdout}"));
        line.split_whitespace().last().unwrap().parse().unwrap()
    };
    assert_eq!(count("orders processed (charged once)"), 6, "{stdout}");
    assert_eq!(count("charges made by the handler"), 6, "{stdout}");
    assert!(
        stdout.contains(&format!("SQLite file {}", file.display())),
        "{stdout}"
    );
    assert!(file.exists(), "the demo's SQLite file");
    let _ = std::fs::remove_dir_all(&temp);
}

/// `lambda` serving the runtime API refuses a SQLite store in one line (instances share no
/// disk), before it reaches any runtime; `run` on the same store says once that checkpoints
/// are local to this host.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lambda_refuses_sqlite_and_run_says_it_is_local() {
    let env = TestEnv::on(StoreKind::Sqlite).await;
    let mut command = env.store_address().command();
    command.args(["lambda", "--handler", "noop"]);
    let ended = run_briefly(command).await;
    assert_eq!(ended.code, Some(2), "{}", ended.stderr);
    assert!(
        error_line(&ended).contains("lambda cannot checkpoint in SQLite"),
        "{}",
        ended.stderr
    );

    let mut command = env.store_address().command();
    command
        .args(run_args(env.queue_url()))
        .args(["--exit-when-idle", "0.5"]);
    let ended = run_briefly(command).await;
    assert_eq!(ended.code, Some(0), "{}", ended.stderr);
    assert_eq!(
        ended
            .stderr
            .matches("checkpoints are in a SQLite file")
            .count(),
        1,
        "{}",
        ended.stderr
    );
}
