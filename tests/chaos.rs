//! The chaos suite: several worker processes on one queue, killed at random moments and at
//! chosen points, a cut of their database connections, a database outage and an SQS outage —
//! then every event must have had its effect exactly once, nothing may be left in the queue
//! or the DLQ, and a resend of every event must run no handler at all.
//!
//! Real parts only: LocalStack and PostgreSQL, reached by the workers through two small TCP
//! proxies in this test (`Proxy`) that can refuse connections and cut the live ones, which
//! is what a restart or a network outage looks like from the worker's side.
//!
//! The same suite, reduced, runs on SQLite: the worker processes share one file on this
//! host (no database proxy, so no database outage; the kills and the SQS outage stay).
//!
//! The worker processes are this test binary run again (`chaos_worker_process`, ignored
//! unless asked for), so the handler is a real multi-step Rust handler: its effect is a row
//! written by `step_tx` (or `step_tx_sqlite`) in the checkpoint's transaction, and every run appends a line to a
//! file, which counts re-runs. Built with `--features failpoints`, workers are also armed to
//! abort at points inside the worker (received, claimed, handled, completed); without the
//! feature only the handler's own points and outside kills are used.

mod common;

use std::collections::HashMap;
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use aws_sdk_sqs::types::SendMessageBatchRequestEntry;
use common::*;
use serde::Serialize;
use sqs_worker::{Handler, HandlerError, Job};
use tokio::process::{Child, Command};
use tokio_util::sync::CancellationToken;

/// Share of events sent a second time (identical body) at a random later moment.
const DUPLICATE_SHARE: f64 = 0.3;
const WORKERS: usize = 3;
const CONCURRENCY: usize = 4;
const VISIBILITY: Duration = Duration::from_secs(4);

/// How much chaos a run makes: the full suite on PostgreSQL, a reduced one on other stores.
#[derive(Clone, Copy, Debug)]
struct Plan {
    kind: StoreKind,
    events: usize,
    /// Sending is spread over this long, so kills and outages land while work flows.
    send_over: Duration,
    /// Take the database away through its proxy (PostgreSQL: also cut the workers'
    /// connections first; DynamoDB: its endpoint; a SQLite file has nothing to cut).
    database_faults: bool,
}

const FULL: Plan = Plan {
    kind: StoreKind::Postgres,
    events: 300,
    send_over: Duration::from_secs(30),
    database_faults: true,
};

const REDUCED_DYNAMODB: Plan = Plan {
    kind: StoreKind::Dynamodb,
    events: 150,
    send_over: Duration::from_secs(20),
    database_faults: true,
};

const REDUCED_SQLITE: Plan = Plan {
    kind: StoreKind::Sqlite,
    events: 150,
    send_over: Duration::from_secs(20),
    database_faults: false,
};
/// Longer than the pool's acquire timeout (10 s), so database calls fail rather than wait.
const DATABASE_OUTAGE: Duration = Duration::from_secs(14);
const SQS_OUTAGE: Duration = Duration::from_secs(8);
const APP_NAME: &str = "sqsw-chaos";

/// Points where an armed worker process aborts. The handler's own points are always
/// available; the worker's need the `failpoints` feature.
const HANDLER_POINTS: &[&str] = &["mid_handler", "after_effect", "handler_end"];
#[cfg(feature = "failpoints")]
const WORKER_POINTS: &[&str] = &[
    "sqs_worker::received",
    "sqs_worker::claimed",
    "sqs_worker::handled",
    "sqs_worker::completed",
];
#[cfg(not(feature = "failpoints"))]
const WORKER_POINTS: &[&str] = &[];

// ---- the worker process -------------------------------------------------------------------

/// Not a test: the body of one chaos worker process, started by the test below with
/// `CHAOS_DIR` set. Ignored so a plain `cargo test` never runs it on its own. It reaches
/// PostgreSQL through a TCP proxy, or opens the SQLite file (`CHAOS_STORE=sqlite`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a worker process for chaos_kills_and_outages_lose_nothing_and_repeat_no_effect"]
async fn chaos_worker_process() {
    let env = |name: &str| std::env::var(name).unwrap_or_else(|_| panic!("{name} is not set"));
    let dir = PathBuf::from(env("CHAOS_DIR"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter("info,aws=warn,sqlx=warn")
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .try_init();
    let point = std::env::var("CHAOS_POINT").ok().filter(|p| !p.is_empty());
    let after: usize = std::env::var("CHAOS_AFTER")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(1);
    let crash = point.map(|point| Crash::arm(&dir, point, after));

    let client = sqs_worker::sqs::local_client(&env("CHAOS_SQS_ENDPOINT")).await;
    // A worker restarted during the database outage waits for it, as a service manager
    // restarting a failed task would.
    let deadline = Instant::now() + Duration::from_secs(60);
    let kind = match env("CHAOS_STORE").as_str() {
        "sqlite" => StoreKind::Sqlite,
        "dynamodb" => StoreKind::Dynamodb,
        _ => StoreKind::Postgres,
    };
    let address = StoreAddress {
        kind,
        url: env("CHAOS_DATABASE_URL"),
    };
    let store = loop {
        match address.connect(8).await {
            Ok(store) => break store,
            Err(error) if Instant::now() < deadline => {
                eprintln!("cannot connect yet ({error}); trying again");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(error) => panic!("cannot connect through the database proxy: {error}"),
        }
    };
    let mut config = worker_config(&env("CHAOS_QUEUE_URL")).key("/id");
    config.pollers = 2;
    config.concurrency = CONCURRENCY;
    config.wait_time = Duration::from_secs(2);
    config.visibility_timeout = Some(VISIBILITY);
    config.backoff_base = Duration::from_millis(300);
    config.backoff_max = Duration::from_secs(3);
    config.shutdown_timeout = Duration::from_secs(5);

    let shutdown = CancellationToken::new();
    let mut worker = worker_on(
        &store,
        config,
        client,
        Arc::new(ChaosHandler {
            kind,
            runs: dir.join("runs.log"),
            crash,
        }),
    )
    .with_shutdown(shutdown.clone());
    if let Ok(addr) = std::env::var("CHAOS_METRICS_ADDR") {
        let readiness = Arc::new(sqs_worker::telemetry::Readiness::new());
        let prometheus = sqs_worker::telemetry::install_recorder().unwrap();
        sqs_worker::telemetry::serve(
            addr.parse().unwrap(),
            prometheus,
            readiness.clone(),
            shutdown.clone(),
        )
        .await
        .unwrap();
        worker = worker.with_readiness(readiness);
    }
    let mut term =
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).unwrap();
    let stop = shutdown.clone();
    tokio::spawn(async move {
        term.recv().await;
        stop.cancel();
    });
    let summary = worker.run().await.expect("the worker starts");
    eprintln!("chaos worker summary: {summary:?}");
}

/// Abort this process at the `after`-th pass through `point`, noting it first.
struct Crash {
    point: String,
    after: usize,
    passes: AtomicUsize,
    log: PathBuf,
}

impl Crash {
    fn arm(dir: &Path, point: String, after: usize) -> Arc<Self> {
        let crash = Arc::new(Self {
            point,
            after,
            passes: AtomicUsize::new(0),
            log: dir.join("crashes.log"),
        });
        #[cfg(feature = "failpoints")]
        if crash.point.starts_with("sqs_worker::") {
            let armed = crash.clone();
            fail::cfg_callback(crash.point.clone(), move || armed.pass(&armed.point)).unwrap();
        }
        crash
    }

    fn pass(&self, point: &str) {
        if point == self.point && self.passes.fetch_add(1, Ordering::SeqCst) + 1 == self.after {
            append_line(&self.log, &self.point);
            // Like SIGKILL: no destructor, no flush, no goodbye to SQS or PostgreSQL.
            std::process::abort();
        }
    }
}

fn append_line(path: &Path, line: &str) {
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .unwrap();
    // One write of a short line with O_APPEND: lines from processes never interleave.
    file.write_all(format!("{line}\n").as_bytes()).unwrap();
}

/// Three steps; the effect is the middle one, committed with its step record.
struct ChaosHandler {
    kind: StoreKind,
    runs: PathBuf,
    crash: Option<Arc<Crash>>,
}

impl ChaosHandler {
    fn point(&self, name: &str) {
        if let Some(crash) = &self.crash {
            crash.pass(name);
        }
    }
}

#[async_trait]
impl Handler for ChaosHandler {
    async fn handle(&self, job: &mut Job) -> Result<(), HandlerError> {
        let key = job.key().to_owned();
        append_line(&self.runs, &key);
        self.point("mid_handler");
        job.step("validate", || async { Ok(true) }).await?;
        let key_ref = &key;
        let pid = std::process::id() as i32;
        match self.kind {
            StoreKind::Postgres => {
                job.step_tx("effect", |tx| {
                    Box::pin(async move {
                        sqlx::query(INSERT_EFFECT)
                            .bind(key_ref)
                            .bind(pid)
                            .execute(&mut **tx)
                            .await?;
                        Ok(())
                    })
                })
                .await?
            }
            StoreKind::Sqlite => {
                job.step_tx_sqlite("effect", |tx| {
                    Box::pin(async move {
                        sqlx::query(INSERT_EFFECT)
                            .bind(key_ref)
                            .bind(pid)
                            .execute(&mut **tx)
                            .await?;
                        Ok(())
                    })
                })
                .await?
            }
            StoreKind::Dynamodb => {
                // Moved in (the future may borrow only the transaction); a fresh item per
                // run, so a second effect of one event would show as a second item.
                let effect = format!("E#{key}#{pid}#{}", fastrand::u64(..));
                job.step_tx_dynamodb("effect", move |tx| {
                    Box::pin(async move {
                        let put = aws_sdk_dynamodb::types::Put::builder()
                            .table_name(tx.table())
                            .item("pk", aws_sdk_dynamodb::types::AttributeValue::S(effect))
                            .build()
                            .expect("table and item are set");
                        tx.push(
                            aws_sdk_dynamodb::types::TransactWriteItem::builder()
                                .put(put)
                                .build(),
                        );
                        Ok(())
                    })
                })
                .await?
            }
        }
        self.point("after_effect");
        job.step("notify", || async { Ok(()) }).await?;
        // Work after the last step (a log line, a metric): it widens the window in which an
        // outage lands between the handler's end and the completion of its checkpoint.
        tokio::time::sleep(Duration::from_millis(fastrand::u64(20..150))).await;
        self.point("handler_end");
        Ok(())
    }

    fn step_transactions(&self) -> Option<StoreKind> {
        Some(self.kind)
    }
}

const INSERT_EFFECT: &str = "insert into chaos_effects (key, pid) values ($1, $2)";

/// The suite's own queries, on whichever store's database the workers share.
struct Database<'a>(&'a TestEnv);

impl Database<'_> {
    /// Create the effects table (the SQL stores; DynamoDB's effects are items of the
    /// checkpoint table).
    async fn create_effects(&self) {
        const SQL: &str = "create table chaos_effects (key text not null, pid integer not null)";
        match self.0.store_kind() {
            StoreKind::Postgres => drop(sqlx::query(SQL).execute(self.0.pool()).await.unwrap()),
            StoreKind::Sqlite => drop(
                sqlx::query(SQL)
                    .execute(self.0.sqlite_pool())
                    .await
                    .unwrap(),
            ),
            StoreKind::Dynamodb => {}
        }
    }

    async fn count_complete(&self) -> i64 {
        const SQL: &str = "select count(*) from checkpoints where status = 'complete'";
        match self.0.store_kind() {
            StoreKind::Postgres => sqlx::query_scalar(SQL)
                .fetch_one(self.0.pool())
                .await
                .unwrap(),
            StoreKind::Sqlite => sqlx::query_scalar(SQL)
                .fetch_one(self.0.sqlite_pool())
                .await
                .unwrap(),
            StoreKind::Dynamodb => self
                .scan("C#")
                .await
                .iter()
                .filter(|item| {
                    item.get("status")
                        .and_then(|v| v.as_s().ok())
                        .map(String::as_str)
                        == Some("complete")
                })
                .count() as i64,
        }
    }

    async fn effect_counts(&self) -> HashMap<String, i64> {
        const SQL: &str = "select key, count(*) from chaos_effects group by key";
        let rows: Vec<(String, i64)> = match self.0.store_kind() {
            StoreKind::Postgres => sqlx::query_as(SQL).fetch_all(self.0.pool()).await.unwrap(),
            StoreKind::Sqlite => sqlx::query_as(SQL)
                .fetch_all(self.0.sqlite_pool())
                .await
                .unwrap(),
            StoreKind::Dynamodb => {
                let mut counts: HashMap<String, i64> = HashMap::new();
                for item in self.scan("E#").await {
                    let pk = item["pk"].as_s().unwrap();
                    let key = pk.split('#').nth(1).unwrap().to_owned();
                    *counts.entry(key).or_default() += 1;
                }
                return counts;
            }
        };
        rows.into_iter().collect()
    }

    /// Every item of the DynamoDB table whose key starts with `prefix` (consistent reads).
    async fn scan(
        &self,
        prefix: &str,
    ) -> Vec<HashMap<String, aws_sdk_dynamodb::types::AttributeValue>> {
        let store = self.0.store().dynamodb().expect("a DynamoDB store");
        let mut items = Vec::new();
        let mut start = None;
        loop {
            let page = store
                .client()
                .scan()
                .table_name(store.table())
                .filter_expression("begins_with(pk, :prefix)")
                .expression_attribute_values(
                    ":prefix",
                    aws_sdk_dynamodb::types::AttributeValue::S(prefix.into()),
                )
                .consistent_read(true)
                .set_exclusive_start_key(start)
                .send()
                .await
                .unwrap();
            items.extend(page.items.unwrap_or_default());
            start = page.last_evaluated_key;
            if start.is_none() {
                return items;
            }
        }
    }
}

// ---- the test -------------------------------------------------------------------------------

/// What the last run saw; written to target/chaos-report.json for the README's figures.
#[derive(Debug, Default, Serialize)]
struct Report {
    events: usize,
    duplicates_sent: usize,
    resent_after_completion: usize,
    workers: usize,
    kills_from_outside: usize,
    kills_at_points: HashMap<String, usize>,
    connections_terminated: i64,
    database_outage_secs: u64,
    sqs_outage_secs: u64,
    readyz_down_during_database_outage: bool,
    readyz_down_during_sqs_outage: bool,
    lost: usize,
    effects_applied_twice: usize,
    handler_runs: usize,
    handler_reruns: usize,
    rerun_bound: usize,
    handler_runs_on_resend: usize,
    left_in_queue: u64,
    left_in_dlq: u64,
    /// Worker log lines saying `database is locked` (SQLite's writers must queue, not fail).
    database_locked_errors: usize,
    seconds: u64,
}

struct Fleet {
    dir: PathBuf,
    queue_url: String,
    database_url: String,
    /// Where the workers reach DynamoDB (through the proxy, on DynamoDB).
    dynamodb_endpoint: String,
    store: StoreKind,
    sqs_endpoint: String,
    metrics_addr: SocketAddr,
    children: Vec<Option<Child>>,
    lifetimes: usize,
    arm: bool,
}

impl Fleet {
    /// Start (or restart) worker `slot`. Slot 0 is never armed and never killed: it must
    /// ride out every outage, and serves /readyz.
    fn spawn(&mut self, slot: usize) {
        let mut command = Command::new(std::env::current_exe().unwrap());
        command
            .args([
                "chaos_worker_process",
                "--exact",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env("CHAOS_DIR", &self.dir)
            .env("CHAOS_QUEUE_URL", &self.queue_url)
            .env("CHAOS_DATABASE_URL", &self.database_url)
            .env("AWS_ENDPOINT_URL_DYNAMODB", &self.dynamodb_endpoint)
            .env("CHAOS_STORE", self.store.name())
            .env("CHAOS_SQS_ENDPOINT", &self.sqs_endpoint)
            .env("AWS_ACCESS_KEY_ID", "test")
            .env("AWS_SECRET_ACCESS_KEY", "test")
            .env("AWS_REGION", "us-east-1")
            .env_remove("CHAOS_POINT")
            .env_remove("CHAOS_METRICS_ADDR")
            .kill_on_drop(true);
        if slot == 0 {
            command.env("CHAOS_METRICS_ADDR", self.metrics_addr.to_string());
        } else if self.arm {
            // Round robin over the points, so every point is armed several times a run.
            let points: Vec<&str> = HANDLER_POINTS
                .iter()
                .chain(WORKER_POINTS)
                .copied()
                .collect();
            let point = points[self.lifetimes % points.len()];
            command
                .env("CHAOS_POINT", point)
                .env("CHAOS_AFTER", fastrand::usize(1..=4).to_string());
        }
        let log = std::fs::File::create(
            self.dir
                .join(format!("worker-{slot}-{}.log", self.lifetimes)),
        )
        .unwrap();
        command.stdout(log.try_clone().unwrap()).stderr(log);
        self.lifetimes += 1;
        self.children[slot] = Some(command.spawn().expect("start a chaos worker"));
    }

    /// Restart every worker that has died; returns how many had.
    fn restart_the_dead(&mut self) -> usize {
        let mut dead = 0;
        for slot in 0..self.children.len() {
            let exited = match self.children[slot].as_mut() {
                Some(child) => child.try_wait().unwrap().is_some(),
                None => true,
            };
            if exited {
                assert_ne!(
                    slot, 0,
                    "the unarmed worker exited during the chaos (see {:?})",
                    self.dir
                );
                dead += 1;
                self.spawn(slot);
            }
        }
        dead
    }
}

async fn readyz(addr: SocketAddr) -> Option<(u16, serde_json::Value)> {
    let response = reqwest::Client::new()
        .get(format!("http://{addr}/readyz"))
        .timeout(Duration::from_secs(2))
        .send()
        .await
        .ok()?;
    let status = response.status().as_u16();
    let body = response.text().await.ok()?;
    Some((status, serde_json::from_str(&body).ok()?))
}

/// Whether /readyz answers 503 with `field` false within `within`.
async fn readyz_goes_down(addr: SocketAddr, field: &str, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if let Some((503, body)) = readyz(addr).await
            && body[field] == false
        {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    false
}

/// Take `proxy` down for `length`, then up; whether /readyz reported `field` false meanwhile.
/// Returns once /readyz is ready again (bounded).
async fn outage(proxy: &Proxy, metrics_addr: SocketAddr, field: &str, length: Duration) -> bool {
    let down_at = Instant::now();
    proxy.down();
    let seen = readyz_goes_down(metrics_addr, field, length).await;
    tokio::time::sleep_until((down_at + length).into()).await;
    proxy.up();
    wait_until(
        &format!("/readyz ready after the {field} outage"),
        Duration::from_secs(20),
        || async { matches!(readyz(metrics_addr).await, Some((200, _))) },
    )
    .await;
    seen
}

async fn send_batch(client: &aws_sdk_sqs::Client, queue_url: &str, bodies: &[String]) {
    let entries = bodies
        .iter()
        .enumerate()
        .map(|(i, body)| {
            SendMessageBatchRequestEntry::builder()
                .id(i.to_string())
                .message_body(body)
                .build()
                .unwrap()
        })
        .collect();
    let sent = client
        .send_message_batch()
        .queue_url(queue_url)
        .set_entries(Some(entries))
        .send()
        .await
        .unwrap();
    assert!(sent.failed().is_empty(), "send failed: {:?}", sent.failed());
}

fn read_lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_kills_and_outages_lose_nothing_and_repeat_no_effect() {
    chaos(FULL).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_on_dynamodb_loses_nothing_and_repeats_no_effect() {
    chaos(REDUCED_DYNAMODB).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_on_sqlite_loses_nothing_and_repeats_no_effect() {
    chaos(REDUCED_SQLITE).await;
}

async fn chaos(plan: Plan) {
    let events = plan.events;
    let started = Instant::now();
    let env = TestEnv::builder()
        .store(plan.kind)
        .max_receive(20)
        .start()
        .await;
    let client = env.client();
    let db = Database(&env);
    db.create_effects().await;
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(unique("chaos"));
    std::fs::create_dir_all(&dir).unwrap();

    // The workers reach both services only through the proxies (a SQLite file directly).
    let sqs_proxy = Proxy::start(sqs_server()).await;
    let db_proxy = match (plan.database_faults, plan.kind) {
        (true, StoreKind::Dynamodb) => Some(Proxy::start(dynamodb_server()).await),
        (true, _) => Some(Proxy::start(database_server()).await),
        (false, _) => None,
    };
    let database_name = env.database_url().rsplit('/').next().unwrap().to_owned();
    let metrics_addr = {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        probe.local_addr().unwrap()
    };
    let mut fleet = Fleet {
        dir: dir.clone(),
        queue_url: env.queue_url().to_owned(),
        database_url: match (&db_proxy, plan.kind) {
            (Some(proxy), StoreKind::Postgres) => format!(
                "{}?application_name={APP_NAME}",
                env.database_url_via(proxy.addr)
            ),
            _ => env.database_url().to_owned(),
        },
        dynamodb_endpoint: match &db_proxy {
            Some(proxy) => format!("http://{}", proxy.addr),
            None => dynamodb_endpoint(),
        },
        store: plan.kind,
        sqs_endpoint: format!("http://{}", sqs_proxy.addr),
        metrics_addr,
        children: (0..WORKERS).map(|_| None).collect(),
        lifetimes: 0,
        arm: true,
    };
    for slot in 0..WORKERS {
        fleet.spawn(slot);
    }

    // Every event once, some twice (the duplicate later, at a random moment), in batches
    // of 10 spread over SEND_OVER.
    let mut bodies: Vec<String> = (0..events)
        .map(|i| format!(r#"{{"id":"ev-{i:04}","n":{i}}}"#))
        .collect();
    let duplicates: Vec<String> = bodies
        .iter()
        .filter(|_| fastrand::f64() < DUPLICATE_SHARE)
        .cloned()
        .collect();
    for duplicate in &duplicates {
        let from = bodies.iter().position(|b| b == duplicate).unwrap() + 1;
        let at = fastrand::usize(from..=bodies.len());
        bodies.insert(at, duplicate.clone());
    }
    let mut report = Report {
        events,
        duplicates_sent: duplicates.len(),
        workers: WORKERS,
        database_outage_secs: if plan.database_faults {
            DATABASE_OUTAGE.as_secs()
        } else {
            0
        },
        sqs_outage_secs: SQS_OUTAGE.as_secs(),
        ..Report::default()
    };
    let chunks: Vec<Vec<String>> = bodies.chunks(10).map(<[String]>::to_vec).collect();
    let pause = plan.send_over / chunks.len() as u32;
    let sender = {
        let (client, url) = (client.clone(), env.queue_url().to_owned());
        tokio::spawn(async move {
            for chunk in chunks {
                send_batch(&client, &url, &chunk).await;
                tokio::time::sleep(pause).await;
            }
        })
    };

    // The faults, in order, while the sender runs: cut the workers' database connections,
    // a database outage, an SQS outage. /readyz of the unarmed worker must say so.
    let faults = {
        let pool = (plan.kind == StoreKind::Postgres).then(|| env.pool().clone());
        let database_name = database_name.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(5)).await;
            let (mut terminated, mut database_seen) = (0, false);
            if let Some(pool) = &pool {
                terminated = sqlx::query_scalar(
                    "select count(pg_terminate_backend(pid)) from pg_stat_activity \
                     where datname = $1 and application_name = $2",
                )
                .bind(&database_name)
                .bind(APP_NAME)
                .fetch_one(pool)
                .await
                .unwrap();
                tokio::time::sleep(Duration::from_secs(3)).await;
            }
            if let Some(db_proxy) = &db_proxy {
                database_seen = outage(db_proxy, metrics_addr, "database", DATABASE_OUTAGE).await;
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
            let sqs_seen = outage(&sqs_proxy, metrics_addr, "sqs", SQS_OUTAGE).await;
            (terminated, database_seen, sqs_seen, sqs_proxy, db_proxy)
        })
    };

    // Kill an armed worker from outside every few seconds (whatever it is doing: most often
    // a long poll), and restart every worker that died, until the sender and faults are done.
    let mut next_kill = Instant::now() + Duration::from_secs(3);
    while !(sender.is_finished() && faults.is_finished()) {
        assert!(
            started.elapsed() < Duration::from_secs(150),
            "the chaos phase overran"
        );
        if Instant::now() >= next_kill {
            let slot = fastrand::usize(1..WORKERS);
            if let Some(child) = fleet.children[slot].as_mut()
                && child.try_wait().unwrap().is_none()
            {
                child.start_kill().unwrap();
                child.wait().await.unwrap();
                report.kills_from_outside += 1;
            }
            next_kill = Instant::now() + Duration::from_millis(fastrand::u64(2_000..4_000));
        }
        fleet.restart_the_dead();
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    sender.await.unwrap();
    let (terminated, database_seen, sqs_seen, _sqs_proxy, _db_proxy) = faults.await.unwrap();
    report.connections_terminated = terminated;
    report.readyz_down_during_database_outage = database_seen;
    report.readyz_down_during_sqs_outage = sqs_seen;

    // Calm: whoever dies from an armed point now comes back unarmed; wait for the work to end.
    fleet.arm = false;
    let done = || async {
        let complete = db.count_complete().await;
        complete as usize == events
            && env.messages_in().await == 0
            && env.dlq_messages_in().await == 0
    };
    let drain_deadline = Instant::now() + Duration::from_secs(90);
    loop {
        fleet.restart_the_dead();
        if done().await {
            break;
        }
        assert!(
            Instant::now() < drain_deadline,
            "not every event completed within 90 s of the chaos (logs in {dir:?})"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }

    for line in read_lines(&dir.join("crashes.log")) {
        *report.kills_at_points.entry(line).or_default() += 1;
    }
    let runs_before_resend = read_lines(&dir.join("runs.log")).len();

    // A resend of every event: all recognised complete, no handler runs.
    let all: Vec<String> = (0..events)
        .map(|i| format!(r#"{{"id":"ev-{i:04}","n":{i}}}"#))
        .collect();
    for chunk in all.chunks(10) {
        send_batch(client, env.queue_url(), chunk).await;
    }
    report.resent_after_completion = events;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let resend_deadline = Instant::now() + Duration::from_secs(60);
    loop {
        fleet.restart_the_dead();
        if env.messages_in().await == 0 && done().await {
            break;
        }
        assert!(
            Instant::now() < resend_deadline,
            "the resent events were not all skipped within 60 s (logs in {dir:?})"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }

    // Stop the fleet: the unarmed worker, alive through everything, must exit cleanly.
    for child in fleet.children.iter_mut().flatten() {
        if let Some(pid) = child.id() {
            let _ = std::process::Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status();
        }
    }
    let mut exits = Vec::new();
    for child in fleet.children.iter_mut().flatten() {
        exits.push(
            tokio::time::timeout(Duration::from_secs(20), child.wait())
                .await
                .expect("workers exit within 20 s of SIGTERM")
                .unwrap(),
        );
    }

    let runs = read_lines(&dir.join("runs.log"));
    let effect_counts = db.effect_counts().await;
    report.lost = (0..events)
        .filter(|i| !effect_counts.contains_key(&format!("ev-{i:04}")))
        .count();
    report.effects_applied_twice = effect_counts.values().filter(|&&n| n > 1).count();
    report.handler_runs = runs_before_resend;
    report.handler_reruns = runs_before_resend.saturating_sub(events);
    report.handler_runs_on_resend = runs.len() - runs_before_resend;
    report.left_in_queue = env.messages_in().await;
    report.left_in_dlq = env.dlq_messages_in().await;
    let kills = report.kills_from_outside + report.kills_at_points.values().sum::<usize>();
    // Each kill can interrupt at most the events its worker had in hand; each fault at most
    // those every worker had in hand. Nothing else may run a handler twice.
    let faults = match (plan.database_faults, plan.kind) {
        (true, StoreKind::Postgres) => 3,
        (true, _) => 2,
        (false, _) => 1,
    };
    report.rerun_bound = (kills + faults * WORKERS) * CONCURRENCY;
    report.database_locked_errors = std::fs::read_dir(&dir)
        .unwrap()
        .filter_map(|entry| std::fs::read_to_string(entry.ok()?.path()).ok())
        .map(|log| log.matches("database is locked").count())
        .sum();
    report.seconds = started.elapsed().as_secs();
    let json = serde_json::to_string_pretty(&report).unwrap();
    println!("chaos report:\n{json}");
    let report_file = match plan.kind {
        StoreKind::Postgres => "chaos-report.json".to_owned(),
        other => format!("chaos-report-{}.json", other.name()),
    };
    std::fs::write(
        PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(report_file),
        &json,
    )
    .unwrap();

    assert_eq!(
        report.lost, 0,
        "events without their effect (logs in {dir:?})"
    );
    assert_eq!(report.effects_applied_twice, 0, "effects applied twice");
    assert_eq!(
        report.database_locked_errors, 0,
        "writers failed on the lock instead of waiting (logs in {dir:?})"
    );
    assert_eq!(
        effect_counts.len(),
        events,
        "unexpected keys: {effect_counts:?}"
    );
    assert_eq!(report.left_in_queue, 0);
    assert_eq!(
        report.left_in_dlq, 0,
        "healthy events must not reach the DLQ"
    );
    assert_eq!(
        report.handler_runs_on_resend, 0,
        "a resend of complete events ran handlers"
    );
    assert!(
        report.handler_reruns <= report.rerun_bound,
        "{} re-runs for {kills} kills and {faults} faults",
        report.handler_reruns
    );
    assert!(
        report.kills_from_outside >= 3,
        "too few kills to prove anything"
    );
    for point in HANDLER_POINTS.iter().chain(WORKER_POINTS) {
        assert!(
            report.kills_at_points.contains_key(*point),
            "no worker died at {point}: {:?}",
            report.kills_at_points
        );
    }
    assert!(
        report.readyz_down_during_database_outage || !plan.database_faults,
        "/readyz stayed ready while the database was down"
    );
    assert!(
        report.readyz_down_during_sqs_outage,
        "/readyz stayed ready while SQS was down"
    );
    assert!(
        exits[0].success(),
        "the unarmed worker did not exit cleanly: {:?}",
        exits[0]
    );
}
