//! The operator log against each store: operator actions recorded and read back newest
//! first, redrive runs' audit rows read back, and an edited body's fingerprint adopted by a
//! failed event only (so its redrive claims it instead of ending as a payload mismatch).

mod common;

use std::time::Duration;

use chrono::Utc;
use common::*;
use sqs_worker::Lease;
use sqs_worker::message::Pass;
use sqs_worker::store::{ClaimOutcome, ClaimRequest, NewOperatorAction, RedriveCounts};

store_tests!(
    operator_actions_come_back_newest_first_with_every_field,
    redrive_runs_come_back_newest_first_with_their_counts,
    only_a_failed_event_adopts_an_edited_payload,
);

/// Every field of an action but its id and time, to compare.
type Fields = (
    String,
    String,
    String,
    String,
    Option<String>,
    Option<String>,
    Option<String>,
    String,
);

fn fields(action: &NewOperatorAction<'_>) -> Fields {
    let owned = |t: Option<&str>| t.map(str::to_owned);
    (
        action.operator.to_owned(),
        action.action.to_owned(),
        action.queue_url.to_owned(),
        action.message_id.to_owned(),
        owned(action.key),
        owned(action.before_sha256),
        owned(action.after_sha256),
        action.detail.to_owned(),
    )
}

/// Actions come back newest first, every field as recorded (absent keys and fingerprints as
/// `None`, an empty message id of a bulk action as it is), at most `limit` of them; a NUL in
/// the detail is stored as U+FFFD instead of failing.
async fn operator_actions_come_back_newest_first_with_every_field(kind: StoreKind) {
    let env = TestEnv::builder().store(kind).no_queue().start().await;
    let store = env.store();
    assert!(store.list_operator_actions(10).await.unwrap().is_empty());
    let before = Utc::now() - chrono::Duration::seconds(5);
    let bulk = NewOperatorAction {
        operator: "ops@host",
        action: "bulk_redrive",
        queue_url: "http://sqs/dlq",
        message_id: "",
        key: None,
        before_sha256: None,
        after_sha256: None,
        detail: "filter reason=handler_error: 3 redriven, 1 skipped",
    };
    let edit = NewOperatorAction {
        operator: "alice@laptop",
        action: "edit_redrive",
        queue_url: "http://sqs/dlq",
        message_id: "m-1",
        key: Some("order-7"),
        before_sha256: Some("aaaa"),
        after_sha256: Some("bbbb"),
        detail: "redriven (redrive 2, final pass)",
    };
    let nul = NewOperatorAction {
        operator: "bob@host",
        action: "delete",
        queue_url: "http://sqs/dlq",
        message_id: "m-2",
        key: Some("order-8"),
        before_sha256: Some("cccc"),
        after_sha256: None,
        detail: "deleted\0 for good",
    };
    let mut ids = Vec::new();
    for action in [&bulk, &edit, &nul] {
        ids.push(store.record_operator_action(action).await.unwrap());
    }
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "ids increase: {ids:?}");
    let after = Utc::now() + chrono::Duration::seconds(5);

    let listed = store.list_operator_actions(10).await.unwrap();
    let got: Vec<(i64, Fields)> = listed
        .iter()
        .map(|a| {
            let fields = (
                a.operator.clone(),
                a.action.clone(),
                a.queue_url.clone(),
                a.message_id.clone(),
                a.key.clone(),
                a.before_sha256.clone(),
                a.after_sha256.clone(),
                a.detail.clone(),
            );
            (a.id, fields)
        })
        .collect();
    let mut stored_nul = fields(&nul);
    stored_nul.7 = "deleted\u{FFFD} for good".to_owned();
    assert_eq!(
        got,
        [
            (ids[2], stored_nul),
            (ids[1], fields(&edit)),
            (ids[0], fields(&bulk)),
        ]
    );
    for action in &listed {
        assert!(
            before <= action.recorded_at && action.recorded_at <= after,
            "recorded at {} (test ran {before} to {after})",
            action.recorded_at
        );
    }
    assert!(
        listed
            .windows(2)
            .all(|w| w[0].recorded_at >= w[1].recorded_at)
    );

    let newest_two = store.list_operator_actions(2).await.unwrap();
    assert_eq!(newest_two, listed[..2]);
    assert!(store.list_operator_actions(0).await.unwrap().is_empty());
}

/// Redrive runs (their `redrives` audit rows, as `DeadLetters` writes them) come back newest
/// first: a finished run with its counts and finish time, a running one with zero counts and
/// no finish time; dry runs stay dry.
async fn redrive_runs_come_back_newest_first_with_their_counts(kind: StoreKind) {
    let env = TestEnv::builder().store(kind).no_queue().start().await;
    let store = env.store();
    assert!(store.list_redrive_runs(10).await.unwrap().is_empty());
    let dry = store
        .start_redrive_audit("alice@laptop", "http://sqs/dlq", "http://sqs/src", 3, true)
        .await
        .unwrap();
    let counts = RedriveCounts {
        redriven: 4,
        skipped_complete: 2,
        exhausted: 1,
        failed: 0,
    };
    store.finish_redrive_audit(dry, &counts).await.unwrap();
    let running = store
        .start_redrive_audit("bob@host", "http://sqs/dlq2", "http://sqs/src2", 5, false)
        .await
        .unwrap();

    let runs = store.list_redrive_runs(10).await.unwrap();
    assert_eq!(
        runs.iter().map(|r| r.id).collect::<Vec<_>>(),
        [running, dry],
        "newest first: {runs:?}"
    );
    let (newest, oldest) = (&runs[0], &runs[1]);
    assert_eq!(
        (
            newest.operator.as_str(),
            newest.dlq_url.as_str(),
            newest.target_url.as_str(),
            newest.max_redrives,
            newest.dry_run,
        ),
        ("bob@host", "http://sqs/dlq2", "http://sqs/src2", 5, false)
    );
    assert_eq!(newest.counts, RedriveCounts::default());
    assert_eq!(newest.finished_at, None);
    assert_eq!(
        (
            oldest.operator.as_str(),
            oldest.dlq_url.as_str(),
            oldest.target_url.as_str(),
            oldest.max_redrives,
            oldest.dry_run,
        ),
        ("alice@laptop", "http://sqs/dlq", "http://sqs/src", 3, true)
    );
    assert_eq!(oldest.counts, counts);
    let finished = oldest.finished_at.expect("the dry run finished");
    assert!(oldest.started_at <= finished);
    assert!(newest.started_at >= oldest.started_at);

    assert_eq!(store.list_redrive_runs(1).await.unwrap(), runs[..1]);
}

/// The checkpoint of `key` in scope `s`, every field, to compare before and after.
async fn snapshot(env: &TestEnv, key: &str) -> serde_json::Value {
    serde_json::to_value(env.checkpoint("s", key).await).unwrap()
}

/// A failed event takes the edited payload's fingerprint (and its field digests, or none),
/// so the redrive's delivery of the edited body claims it; a complete, in-progress or
/// missing event is left as it is.
async fn only_a_failed_event_adopts_an_edited_payload(kind: StoreKind) {
    let env = TestEnv::builder().store(kind).no_queue().start().await;
    let store = env.store();
    let terms = claim_terms(Duration::from_secs(30));
    let claim = |r: ClaimRequest| {
        let terms = &terms;
        async move {
            let key = r.key.clone();
            store.claim_batch("s", "w", terms, &[r]).await.unwrap()[&key].clone()
        }
    };
    // The edited body's redrive: its fingerprint, a later pass, allowed to reclaim.
    let redriven = |key: &str| ClaimRequest {
        payload_sha256: "h2".into(),
        field_digests: Some(r#"{"/amount":"00000000000000b2"}"#.into()),
        reclaim_failed: true,
        pass: Pass {
            requeue_generation: 0,
            redrive_count: 1,
        },
        ..claim_request(key)
    };

    // A failed event (payload "h", digests as its first claim stored them).
    let first = ClaimRequest {
        field_digests: Some(r#"{"/amount":"00000000000000a1"}"#.into()),
        ..claim_request("failed")
    };
    assert!(matches!(claim(first).await, ClaimOutcome::Claimed(_)));
    assert!(
        store
            .mark_failed(&Lease::new("s", "failed", "w"), "boom")
            .await
            .unwrap()
    );
    // Without adoption, the edited body's redrive is not claimed: its fingerprint differs.
    let refused = claim(redriven("failed")).await;
    assert!(
        !matches!(refused, ClaimOutcome::Claimed(_)),
        "claimed with another payload: {refused:?}"
    );
    assert_eq!(refused.stored_payload_sha256(), Some("h"));

    let digests = r#"{"/amount":"00000000000000b2"}"#;
    assert!(
        store
            .adopt_edited_payload("s", "failed", "h2", Some(digests))
            .await
            .unwrap()
    );
    let adopted = env.checkpoint("s", "failed").await;
    assert_eq!(adopted.status, "failed");
    assert_eq!(adopted.payload_sha256, "h2");
    assert_eq!(adopted.payload_fields.as_deref(), Some(digests));
    // Now the redrive claims it, with the edited payload's fingerprint stored.
    let ClaimOutcome::Claimed(claimed) = claim(redriven("failed")).await else {
        panic!("the edited body's redrive was not claimed")
    };
    assert_eq!(claimed.stored_payload_sha256, "h2");
    assert_eq!(env.checkpoint("s", "failed").await.status, "in_progress");

    // Without digests, a failed event keeps none (as a claim without them stores).
    assert!(matches!(
        claim(ClaimRequest {
            field_digests: Some(r#"{"/a":"1"}"#.into()),
            ..claim_request("failed-bare")
        })
        .await,
        ClaimOutcome::Claimed(_)
    ));
    assert!(
        store
            .mark_failed(&Lease::new("s", "failed-bare", "w"), "boom")
            .await
            .unwrap()
    );
    assert!(
        store
            .adopt_edited_payload("s", "failed-bare", "h3", None)
            .await
            .unwrap()
    );
    let bare = env.checkpoint("s", "failed-bare").await;
    assert_eq!(
        (bare.payload_sha256.as_str(), bare.payload_fields),
        ("h3", None)
    );

    // A complete event changes nothing.
    assert!(matches!(
        claim(claim_request("done")).await,
        ClaimOutcome::Claimed(_)
    ));
    assert_eq!(
        store
            .complete_batch("s", &[("done".into(), "w".into())])
            .await
            .unwrap(),
        [("done".to_owned(), "w".to_owned())]
    );
    let done = snapshot(&env, "done").await;
    assert!(
        !store
            .adopt_edited_payload("s", "done", "h2", Some(digests))
            .await
            .unwrap()
    );
    assert_eq!(snapshot(&env, "done").await, done);

    // Nor does an event in progress (the one the redrive above holds, and a new one).
    assert!(matches!(
        claim(claim_request("running")).await,
        ClaimOutcome::Claimed(_)
    ));
    for key in ["running", "failed"] {
        let held = snapshot(&env, key).await;
        assert_eq!(held["status"], "in_progress");
        assert!(
            !store
                .adopt_edited_payload("s", key, "h9", None)
                .await
                .unwrap(),
            "{key} adopted while in progress"
        );
        assert_eq!(snapshot(&env, key).await, held);
    }

    // Nor a missing one, which stays missing.
    assert!(
        !store
            .adopt_edited_payload("s", "missing", "h2", Some(digests))
            .await
            .unwrap()
    );
    assert!(env.find_checkpoint("s", "missing").await.is_none());
}
