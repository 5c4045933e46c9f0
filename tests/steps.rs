//! Durable steps against real LocalStack and each store: resume after a crash, step_tx
//! atomicity, fencing of a lost lease, plan and payload mismatches, envelopes.

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use common::*;
use serde_json::json;
use sqs_worker::message::{self, Envelope};
use sqs_worker::worker::PayloadMismatch;
use sqs_worker::{Handler, HandlerError, Job};

type Counts = Arc<Mutex<HashMap<String, usize>>>;

fn bump(counts: &Counts, what: &str) {
    *counts.lock().unwrap().entry(what.to_owned()).or_default() += 1;
}

fn count(counts: &Counts, what: &str) -> usize {
    counts.lock().unwrap().get(what).copied().unwrap_or(0)
}

store_tests!(
    a_crash_after_step_two_resumes_at_step_three,
    only_the_lease_holder_records_steps,
    a_changed_step_plan_is_a_permanent_plan_mismatch,
    a_key_reused_with_another_payload_is_dead_lettered,
    sns_and_eventbridge_envelopes_are_unwrapped,
    a_handler_declaring_another_stores_transactions_does_not_start,
);

sql_store_tests!(a_failing_step_tx_leaves_neither_rows_nor_record);

/// Four steps; each counts when its closure starts and when it finishes. With `stall_at`,
/// that step's closure never finishes (the process is then killed).
struct FourSteps {
    counts: Counts,
    stall_at: Option<usize>,
}

#[async_trait]
impl Handler for FourSteps {
    async fn handle(&self, job: &mut Job) -> Result<(), HandlerError> {
        let mut carried: u64 = 0;
        for (i, name) in ["fetch", "parse", "enrich", "store"].iter().enumerate() {
            let counts = self.counts.clone();
            let stall = self.stall_at == Some(i + 1);
            carried = job
                .step(name, || async move {
                    bump(&counts, &format!("{name}:started"));
                    if stall {
                        tokio::time::sleep(Duration::from_secs(3600)).await;
                    }
                    bump(&counts, &format!("{name}:finished"));
                    Ok::<_, HandlerError>(carried + 10u64.pow(i as u32))
                })
                .await?;
        }
        bump(&self.counts, &format!("result:{carried}"));
        Ok(())
    }
}

/// Killed after step 2 of 4, restarted: steps 1–2 are not run again, 3–4 run once, and the
/// outputs of the recorded steps flow into the resumed ones.
async fn a_crash_after_step_two_resumes_at_step_three(kind: StoreKind) {
    let env = TestEnv::on(kind).await;
    env.send(r#"{"doc":"d1"}"#).await;
    let counts: Counts = Arc::default();

    let mut config = env.config().key("/doc").scope("steps").visibility(3);
    config.max_handler_time = Duration::from_secs(3600);

    // The first worker lives in its own runtime, so that shutting the runtime down drops
    // every task of it mid-await: no drain, no lease release — what a kill leaves behind.
    let doomed = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    {
        let (config, address, counts) =
            (config.clone(), env.store_address().clone(), counts.clone());
        doomed.spawn(async move {
            let store = address.connect(4).await.unwrap();
            let client = sqs_client().await;
            let handler = FourSteps {
                counts,
                stall_at: Some(3),
            };
            worker_on(&store, config, client, Arc::new(handler))
                .run()
                .await
        });
    }
    env.wait_for_checkpoint(
        "steps 1 and 2 to be recorded",
        ("steps", "d1"),
        Duration::from_secs(30),
        |c| c.steps.as_array().unwrap().len() == 2,
    )
    .await;
    wait_until("step 3 to start", Duration::from_secs(10), || {
        let counts = counts.clone();
        async move { count(&counts, "enrich:started") == 1 }
    })
    .await;
    doomed.shutdown_background();

    let handler = FourSteps {
        counts: counts.clone(),
        stall_at: None,
    };
    let summary = env
        .drain(config, Arc::new(handler), Duration::from_secs(40))
        .await;
    assert_eq!(summary.processed, 1);
    for step in ["fetch", "parse"] {
        assert_eq!(
            count(&counts, &format!("{step}:started")),
            1,
            "{step} ran again"
        );
    }
    assert_eq!(
        count(&counts, "enrich:started"),
        2,
        "started once per attempt"
    );
    for step in ["enrich", "store"] {
        assert_eq!(count(&counts, &format!("{step}:finished")), 1, "{step}");
    }
    // 1 + 10 + 100 + 1000: recorded outputs of steps 1–2 fed the resumed steps 3–4.
    assert_eq!(count(&counts, "result:1111"), 1);
    let checkpoint = env.checkpoint("steps", "d1").await;
    assert_eq!(checkpoint.status, "complete");
    assert_eq!(checkpoint.attempts, 2);
    assert_eq!(
        step_names(&checkpoint.steps),
        ["fetch", "parse", "enrich", "store"]
    );
}

/// Run `sql` on the test's own store database (its own tables).
async fn execute(env: &TestEnv, sql: &str) {
    match env.store_kind() {
        StoreKind::Postgres => drop(sqlx::query(sql).execute(env.pool()).await.unwrap()),
        StoreKind::Sqlite => drop(sqlx::query(sql).execute(env.sqlite_pool()).await.unwrap()),
        StoreKind::Dynamodb => unreachable!("SQL stores only"),
    }
}

/// `select count(*) …` on the test's own store database.
async fn count_rows(env: &TestEnv, sql: &str) -> i64 {
    match env.store_kind() {
        StoreKind::Postgres => sqlx::query_scalar(sql).fetch_one(env.pool()).await.unwrap(),
        StoreKind::Sqlite => sqlx::query_scalar(sql)
            .fetch_one(env.sqlite_pool())
            .await
            .unwrap(),
        StoreKind::Dynamodb => unreachable!("SQL stores only"),
    }
}

/// (attempt, rows seen inside the step, steps recorded before it) per successful call.
type Observed = Arc<Mutex<Vec<(u32, i64, Vec<String>)>>>;

/// Writes a row in the step's transaction (the store's own: PostgreSQL's or SQLite's),
/// counts the rows it sees there, and fails its first attempt after writing.
struct StoreRows {
    kind: StoreKind,
    observed: Observed,
}

const INSERT_ROW: &str = "insert into test_rows (doc, note) values ($1, 'x')";
const COUNT_ROWS: &str = "select count(*) from test_rows";

#[async_trait]
impl Handler for StoreRows {
    async fn handle(&self, job: &mut Job) -> Result<(), HandlerError> {
        let attempt = job.attempt();
        let steps: Vec<String> = job
            .completed_steps()
            .iter()
            .map(|s| s.to_string())
            .collect();
        let doc = job.key().to_owned();
        // Borrowed, not moved: the step's future may hold references to the caller.
        let doc = &doc;
        let fail_first = move |rows: i64| {
            if attempt == 1 {
                return Err(HandlerError::retryable("disk full (simulated)"));
            }
            Ok(rows)
        };
        let rows = match self.kind {
            StoreKind::Postgres => {
                job.step_tx("store", |tx| {
                    Box::pin(async move {
                        sqlx::query(INSERT_ROW).bind(doc).execute(&mut **tx).await?;
                        let rows = sqlx::query_scalar(COUNT_ROWS).fetch_one(&mut **tx).await?;
                        fail_first(rows)
                    })
                })
                .await?
            }
            StoreKind::Sqlite => {
                job.step_tx_sqlite("store", |tx| {
                    Box::pin(async move {
                        sqlx::query(INSERT_ROW).bind(doc).execute(&mut **tx).await?;
                        let rows = sqlx::query_scalar(COUNT_ROWS).fetch_one(&mut **tx).await?;
                        fail_first(rows)
                    })
                })
                .await?
            }
            StoreKind::Dynamodb => unreachable!("SQL stores only"),
        };
        self.observed.lock().unwrap().push((attempt, rows, steps));
        Ok(())
    }

    fn step_transactions(&self) -> Option<StoreKind> {
        Some(self.kind)
    }
}

/// A step transaction whose closure fails after writing leaves neither its rows nor a step
/// record; the next attempt runs it again and both commit together, once.
async fn a_failing_step_tx_leaves_neither_rows_nor_record(kind: StoreKind) {
    let env = TestEnv::on(kind).await;
    execute(
        &env,
        "create table test_rows (doc text primary key, note text not null)",
    )
    .await;
    env.send(r#"{"doc":"tx1"}"#).await;
    let observed = Arc::new(Mutex::new(Vec::new()));
    let config = env.config().key("/doc").scope("tx");
    let handler = StoreRows {
        kind,
        observed: observed.clone(),
    };
    let summary = env
        .drain(config, Arc::new(handler), Duration::from_secs(30))
        .await;
    assert_eq!(summary.retried, 1);
    // Attempt 2 found no recorded step and saw exactly its own row (attempt 1's rolled back).
    assert_eq!(*observed.lock().unwrap(), [(2, 1, Vec::<String>::new())]);
    assert_eq!(count_rows(&env, COUNT_ROWS).await, 1);
    let checkpoint = env.checkpoint("tx", "tx1").await;
    assert_eq!(step_names(&checkpoint.steps), ["store"]);
    assert_eq!(checkpoint.steps[0]["output"], 1);
    assert_eq!(checkpoint.status, "complete");
}

/// A handler declaring PostgreSQL step transactions does not start on the SQLite store
/// (nor the other way round): refused when the worker is built, before any message.
async fn a_handler_declaring_another_stores_transactions_does_not_start(kind: StoreKind) {
    let env = TestEnv::on(kind).await;
    let other = match kind {
        StoreKind::Postgres => StoreKind::Sqlite,
        StoreKind::Sqlite | StoreKind::Dynamodb => StoreKind::Postgres,
    };
    let handler = StoreRows {
        kind: other,
        observed: Arc::default(),
    };
    let built = sqs_worker::Worker::builder()
        .config(env.config())
        .sqs_client(env.client().clone())
        .store(env.store().clone())
        .handler(handler)
        .build();
    let error = built.err().expect("refused at build");
    assert!(
        error.to_string().contains(&format!(
            "the handler's steps write in {other} transactions"
        )),
        "{error}"
    );
}

/// Worker A stalls inside step two past its lease; worker B takes the event over, resumes
/// after A's recorded step one and completes. A's late step two is not recorded, and A
/// leaves the message alone.
async fn only_the_lease_holder_records_steps(kind: StoreKind) {
    let env = TestEnv::on(kind).await;
    env.send(r#"{"doc":"l1"}"#).await;

    struct Named {
        name: &'static str,
        slow_step_two: Duration,
        counts: Counts,
    }
    #[async_trait]
    impl Handler for Named {
        async fn handle(&self, job: &mut Job) -> Result<(), HandlerError> {
            let me = self.name;
            job.step(
                "one",
                || async move { Ok::<_, HandlerError>(me.to_owned()) },
            )
            .await?;
            let (slow, counts) = (self.slow_step_two, self.counts.clone());
            job.step("two", || async move {
                tokio::time::sleep(slow).await;
                bump(&counts, &format!("two:{me}"));
                Ok::<_, HandlerError>(me.to_owned())
            })
            .await?;
            Ok(())
        }
    }
    let counts: Counts = Arc::default();
    let config = |id: &str, pollers: usize| {
        let mut config = env
            .config()
            .key("/doc")
            .scope("lease")
            .visibility(2)
            .worker_id(id);
        config.max_handler_time = Duration::from_secs(30);
        config.pollers = pollers;
        config.concurrency = pollers;
        config
    };
    // A stalls without renewing its lease (no heartbeat), so B may take the event over.
    let mut stalled = config("A", 1);
    stalled.heartbeat = false;
    let slow = env.start(
        stalled,
        Arc::new(Named {
            name: "A",
            // Past the lease's end as the store judges it, and B's takeover after it.
            slow_step_two: Duration::from_secs(5) + 2 * env.store().lease_grace(),
            counts: counts.clone(),
        }),
    );
    env.wait_for_checkpoint(
        "A to record step one",
        ("lease", "l1"),
        Duration::from_secs(20),
        |c| c.steps.as_array().unwrap().len() == 1,
    )
    .await;
    let fast = Arc::new(Named {
        name: "B",
        slow_step_two: Duration::ZERO,
        counts: counts.clone(),
    });
    let fast_summary = env
        .drain(config("B", 2), fast, Duration::from_secs(30))
        .await;
    wait_until(
        "A's slow step two to finish",
        Duration::from_secs(15),
        || {
            let counts = counts.clone();
            async move { count(&counts, "two:A") == 1 }
        },
    )
    .await;
    let slow_summary = slow.stop().await;

    let checkpoint = env.checkpoint("lease", "l1").await;
    assert_eq!(checkpoint.status, "complete");
    let outputs: Vec<(String, String)> = checkpoint
        .steps
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["name"].as_str().unwrap().to_owned(),
                s["output"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(
        outputs,
        [("one".into(), "A".into()), ("two".into(), "B".into())],
        "B resumed after A's step one; A's late step two was fenced out"
    );
    assert_eq!(fast_summary.processed, 1);
    assert_eq!(slow_summary.processed, 0);
    assert_eq!(slow_summary.lease_lost, 1, "{slow_summary:?}");
    assert_eq!(env.messages_in().await, 0);
}

/// Steps recorded as [a, b] by an older handler; the new handler runs [a, c]: a clear
/// permanent plan_mismatch, not silent corruption.
async fn a_changed_step_plan_is_a_permanent_plan_mismatch(kind: StoreKind) {
    let env = TestEnv::on(kind).await;
    env.send(r#"{"doc":"p1"}"#).await;

    struct Plan {
        steps: &'static [&'static str],
        fail_after: bool,
        counts: Counts,
    }
    #[async_trait]
    impl Handler for Plan {
        async fn handle(&self, job: &mut Job) -> Result<(), HandlerError> {
            for name in self.steps {
                let counts = self.counts.clone();
                job.step(name, || async move {
                    bump(&counts, name);
                    Ok::<_, HandlerError>(())
                })
                .await?;
            }
            if self.fail_after {
                return Err(HandlerError::retryable("downstream unavailable"));
            }
            Ok(())
        }
    }
    let counts: Counts = Arc::default();
    let config = env.config().key("/doc").scope("plan");
    // The old handler's retry must not come back before the new handler is running.
    let mut old_config = config.clone();
    old_config.backoff_base = Duration::from_secs(6);
    old_config.backoff_max = Duration::from_secs(6);
    let old = env.start(
        old_config,
        Arc::new(Plan {
            steps: &["a", "b"],
            fail_after: true,
            counts: counts.clone(),
        }),
    );
    env.wait_for_checkpoint(
        "the old handler to record a, b and fail",
        ("plan", "p1"),
        Duration::from_secs(20),
        |c| c.last_error.is_some() && c.lease_owner.is_none(),
    )
    .await;
    old.stop().await;

    let new = Arc::new(Plan {
        steps: &["a", "c"],
        fail_after: false,
        counts: counts.clone(),
    });
    let summary = env.drain(config, new, Duration::from_secs(30)).await;
    assert_eq!(summary.sent_to_dlq, 1);
    assert_eq!(
        (
            count(&counts, "a"),
            count(&counts, "b"),
            count(&counts, "c")
        ),
        (1, 1, 0)
    );
    let checkpoint = env.checkpoint("plan", "p1").await;
    assert_eq!(checkpoint.status, "failed");
    assert_eq!(step_names(&checkpoint.steps), ["a", "b"]);
    assert!(checkpoint.last_error.unwrap().contains("\"c\""));
    let dead = env.peek_dlq(1, Duration::from_secs(10)).await;
    assert_eq!(
        string_attribute(&dead[0], message::ATTR_FAILURE_REASON).as_deref(),
        Some("plan_mismatch")
    );
}

/// The same key with a different payload is not a duplicate: by default it goes to the DLQ
/// as payload_mismatch and the complete event stays complete; `accept` skips it instead.
async fn a_key_reused_with_another_payload_is_dead_lettered(kind: StoreKind) {
    let env = TestEnv::on(kind).await;
    let (handler, calls) = RecordingHandler::succeeding();
    let config = env.config().key("/id").scope("payload");

    env.send(r#"{"id":"k","amount":100}"#).await;
    let drain = |config| env.drain(config, handler.clone(), Duration::from_secs(30));
    drain(config.clone()).await;
    env.send(r#"{"id":"k","amount":999}"#).await;
    let summary = drain(config.clone()).await;
    assert_eq!(summary.sent_to_dlq, 1);
    assert_eq!(summary.duplicates_skipped, 0);
    assert_eq!(
        calls.lock().unwrap().len(),
        1,
        "the handler ran for the first payload only"
    );
    let checkpoint = env.checkpoint("payload", "k").await;
    assert_eq!(checkpoint.status, "complete");
    assert_eq!(
        checkpoint.payload_sha256,
        message::body_sha256(r#"{"id":"k","amount":100}"#)
    );
    let dead = env.peek_dlq(1, Duration::from_secs(10)).await;
    assert_eq!(dead[0].body(), Some(r#"{"id":"k","amount":999}"#));
    assert_eq!(
        string_attribute(&dead[0], message::ATTR_FAILURE_REASON).as_deref(),
        Some("payload_mismatch")
    );

    let mut accepting = config;
    accepting.on_payload_mismatch = PayloadMismatch::Accept;
    env.send(r#"{"id":"k","amount":7}"#).await;
    let summary = drain(accepting).await;
    assert_eq!((summary.duplicates_skipped, summary.sent_to_dlq), (1, 0));
    assert_eq!(calls.lock().unwrap().len(), 1);
}

/// SNS and EventBridge envelopes are unwrapped before keys are read; the handler sees the
/// event, and the raw body is still there.
async fn sns_and_eventbridge_envelopes_are_unwrapped(kind: StoreKind) {
    // A queue of its own per envelope, below.
    let env = TestEnv::builder().store(kind).no_queue().start().await;

    struct Seen(Arc<Mutex<Vec<(String, String, bool)>>>);
    #[async_trait]
    impl Handler for Seen {
        async fn handle(&self, job: &mut Job) -> Result<(), HandlerError> {
            let event = job
                .json()
                .ok_or_else(|| HandlerError::permanent("not JSON"))?;
            self.0.lock().unwrap().push((
                job.key().to_owned(),
                event["sku"].as_str().unwrap_or("-").to_owned(),
                job.raw_body() != job.body(),
            ));
            Ok(())
        }
    }

    let sns_event = json!({"order_id": "sns-1", "sku": "blue"}).to_string();
    let notification = |sns_id: &str| {
        json!({
            "Type": "Notification",
            "MessageId": sns_id,
            "TopicArn": "arn:aws:sns:us-east-1:000000000000:orders",
            "Message": sns_event,
            "Timestamp": "2026-11-22T12:00:00.000Z",
        })
        .to_string()
    };
    let eventbridge = |id: &str| {
        json!({
            "version": "0", "id": id, "detail-type": "OrderPlaced", "source": "shop",
            "account": "000000000000", "time": "2026-11-22T12:00:00Z", "region": "us-east-1",
            "resources": [], "detail": {"order_id": "eb-1", "sku": "red"}
        })
        .to_string()
    };

    for (envelope, bodies) in [
        (
            Envelope::Sns,
            vec![notification("n-1"), notification("n-2")],
        ),
        (
            Envelope::Eventbridge,
            vec![eventbridge("e-1"), eventbridge("e-2")],
        ),
    ] {
        let queue = env.add_queue(&QueueSpec::default()).await;
        for body in &bodies {
            env.send_to(&queue.url, body).await;
        }
        let seen = Arc::new(Mutex::new(Vec::new()));
        let mut config = worker_config(&queue.url).key("/order_id");
        config.envelope = envelope;
        let worker = env.worker(config, Arc::new(Seen(seen.clone())));
        let summaries = run_until_drained(
            env.client(),
            &queue.url,
            vec![worker],
            Duration::from_secs(30),
        )
        .await;
        // Two publications of one event (new SNS / EventBridge ids): one run, one skip, no
        // payload mismatch because the fingerprint is the unwrapped event's.
        assert_eq!(
            (
                summaries[0].processed,
                summaries[0].duplicates_skipped,
                summaries[0].sent_to_dlq
            ),
            (1, 1, 0),
            "{envelope:?}"
        );
        let seen = seen.lock().unwrap().clone();
        let expected = match envelope {
            Envelope::Sns => ("sns-1".to_owned(), "blue".to_owned(), true),
            _ => ("eb-1".to_owned(), "red".to_owned(), true),
        };
        assert_eq!(seen, [expected], "{envelope:?}");
    }
}
