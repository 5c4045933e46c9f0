use std::collections::HashMap;
use std::sync::Arc;

use serde_json::Value;
use tokio_util::sync::CancellationToken;

use crate::store::{CheckpointStore, Lease, SqliteStore, StoreKind};

use super::{Handler, StepRecorder, check_step_transactions};

use super::error::HandlerError;
use super::job::Job;
use super::steps::{
    STEP_TX_UNSUPPORTED, UNSTORABLE_STEP_OUTPUT, check_step_name, step_output_json,
};

fn reason_of(error: HandlerError) -> String {
    match error {
        HandlerError::Permanent { reason, .. } => reason,
        other => panic!("expected a permanent error, got {other:?}"),
    }
}

#[test]
fn outputs_with_nul_are_refused_before_any_statement() {
    let error = step_output_json("s", &"a\0b").unwrap_err();
    assert!(error.to_string().contains(r#"JSON pointer """#), "{error}");
    assert_eq!(reason_of(error), UNSTORABLE_STEP_OUTPUT);

    let nested = serde_json::json!({"ok": [1, {"deep~/x": ["fine", "bad\u{0}"]}]});
    let error = step_output_json("fetch", &nested).unwrap_err();
    assert!(
        error.to_string().contains(r#""/ok/1/deep~0~1x/1""#),
        "{error}"
    );
    let key = serde_json::json!({"k\u{0}": 1});
    let error = step_output_json("s", &key).unwrap_err();
    assert!(error.to_string().contains(r#""/k\\u0000""#), "{error}");
    assert!(!error.to_string().contains('\0'));
}

#[test]
fn outputs_that_merely_look_like_nul_are_stored() {
    // The six characters \u0000 are ordinary text; so are other control characters.
    for output in [r"\u0000", "\u{1}\u{1b}[0m", "🦀 \u{202e}", ""] {
        let value = step_output_json("s", &output).unwrap();
        assert_eq!(value, Value::String(output.to_owned()));
    }
    let value = step_output_json("s", &serde_json::json!({"n": null, "x": [1.5]})).unwrap();
    assert_eq!(value["x"][0], 1.5);
}

/// A job on a fresh in-memory SQLite store (a real one: the step transaction must be
/// refused before it reaches the store, whatever the store).
async fn job_on_sqlite(transactions: Option<StoreKind>) -> Job {
    let store = SqliteStore::connect("sqlite::memory:", 1).await.unwrap();
    store.migrate().await.unwrap();
    let store: Arc<dyn CheckpointStore> = Arc::new(store);
    Job {
        lease: Lease::new("s", "k", "w#1"),
        message_id: "m".into(),
        body: None,
        raw_body: "{}".into(),
        json: None,
        attributes: HashMap::new(),
        attempt: 1,
        redrive_count: 0,
        final_pass: false,
        recorder: StepRecorder::start(store.clone(), "s".into()),
        pending: Default::default(),
        store,
        transactions,
        recorded: Vec::new(),
        next_step: 0,
        lease_lost: false,
        cancel: CancellationToken::new(),
        unrecorded_effect: None,
        trace: None,
    }
}

#[tokio::test]
async fn an_undeclared_step_transaction_is_refused_before_it_runs() {
    let mut job = job_on_sqlite(None).await;
    let error = job
        .step_tx_sqlite("write", |_tx| Box::pin(async { Ok(1) }))
        .await
        .unwrap_err();
    assert!(
        error.to_string().contains("declares no step transactions"),
        "{error}"
    );
    assert_eq!(reason_of(error), STEP_TX_UNSUPPORTED);
    // A PostgreSQL step on the SQLite store: refused the same way, naming both.
    let mut job = job_on_sqlite(Some(StoreKind::Sqlite)).await;
    let error = job
        .step_tx("write", |_tx| Box::pin(async { Ok(1) }))
        .await
        .unwrap_err();
    assert!(
        error
            .to_string()
            .contains("asks for a postgresql transaction")
            && error.to_string().contains("store is sqlite"),
        "{error}"
    );
    assert_eq!(reason_of(error), STEP_TX_UNSUPPORTED);
}

struct Declares(Option<StoreKind>);

#[async_trait::async_trait]
impl Handler for Declares {
    async fn handle(&self, _: &mut Job) -> Result<(), HandlerError> {
        Ok(())
    }
    fn step_transactions(&self) -> Option<StoreKind> {
        self.0
    }
}

#[tokio::test]
async fn a_handler_declaring_another_stores_transactions_is_refused_at_start() {
    let store = SqliteStore::connect("sqlite::memory:", 1).await.unwrap();
    let refused = check_step_transactions(&Declares(Some(StoreKind::Postgres)), &store);
    assert_eq!(
        refused.unwrap_err(),
        "the handler's steps write in postgresql transactions (Handler::step_transactions), \
         but the checkpoint store is sqlite: run it on a postgresql store"
    );
    assert!(check_step_transactions(&Declares(Some(StoreKind::Sqlite)), &store).is_ok());
    assert!(check_step_transactions(&Declares(None), &store).is_ok());
}

#[test]
fn step_names_with_nul_are_refused() {
    assert!(check_step_name("charge").is_ok());
    let error = check_step_name("char\0ge").unwrap_err();
    assert!(!error.to_string().contains('\0'));
    assert_eq!(reason_of(error), UNSTORABLE_STEP_OUTPUT);
}
