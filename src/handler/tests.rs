use std::collections::HashMap;
use std::sync::Arc;

use serde_json::Value;
use tokio_util::sync::CancellationToken;

use crate::store::Lease;
use crate::store::unreachable::UnreachableStore;

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

#[tokio::test]
async fn step_tx_on_a_store_without_postgres_transactions_is_refused() {
    let mut job = Job {
        lease: Lease::new("s", "k", "w#1"),
        message_id: "m".into(),
        body: "{}".into(),
        raw_body: "{}".into(),
        json: None,
        attributes: HashMap::new(),
        attempt: 1,
        redrive_count: 0,
        final_pass: false,
        store: Arc::new(UnreachableStore),
        recorded: Vec::new(),
        next_step: 0,
        lease_lost: false,
        cancel: CancellationToken::new(),
        unrecorded_effect: None,
    };
    let error = job
        .step_tx("write", |_tx| Box::pin(async { Ok(1) }))
        .await
        .unwrap_err();
    assert!(
        error
            .to_string()
            .contains("checkpoint store is unreachable"),
        "{error}"
    );
    assert_eq!(reason_of(error), STEP_TX_UNSUPPORTED);
}

#[test]
fn step_names_with_nul_are_refused() {
    assert!(check_step_name("charge").is_ok());
    let error = check_step_name("char\0ge").unwrap_err();
    assert!(!error.to_string().contains('\0'));
    assert_eq!(reason_of(error), UNSTORABLE_STEP_OUTPUT);
}
