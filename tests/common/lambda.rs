//! Lambda: event records and local invocations of `sqs-worker lambda --event`
//! ([`super::TestEnv::invoke_lambda`] runs one against the test's store).

use std::time::Duration;

use super::unique;

/// One SQS record of a Lambda event, from the queue with ARN `arn`.
pub fn lambda_record(
    arn: &str,
    message_id: &str,
    body: &str,
    attributes: serde_json::Value,
) -> serde_json::Value {
    serde_json::json!({
        "messageId": message_id,
        "receiptHandle": format!("receipt-{message_id}"),
        "body": body,
        "attributes": {"ApproximateReceiveCount": "1"},
        "messageAttributes": attributes,
        "eventSourceARN": arn,
        "eventSource": "aws:sqs",
        "awsRegion": "us-east-1"
    })
}

/// A String message attribute as a Lambda record carries it.
pub fn string_attr(value: &str) -> serde_json::Value {
    serde_json::json!({"stringValue": value, "dataType": "String",
                       "stringListValues": [], "binaryListValues": []})
}

/// The message attributes of a final pass (redrive count 3) as a Lambda record carries
/// them: the record whose failure ends in dead_letters.
pub fn lambda_final_pass_attributes() -> serde_json::Value {
    serde_json::json!({
        "dlq_redriven": string_attr("true"),
        "redrive_count": {"stringValue": "3", "dataType": "Number",
                          "stringListValues": [], "binaryListValues": []},
        "dlq_final_pass": string_attr("true"),
    })
}

/// Run one local invocation with `command` (the binary set up for a store): `lambda
/// --event`, key `/id`, scope `lam`, `handler` as an `sh -c` script (env `LOG` = `log`);
/// returns the batch response.
pub async fn invoke_lambda(
    mut command: tokio::process::Command,
    log: &std::path::Path,
    event: &serde_json::Value,
    timeout_secs: &str,
    handler: &str,
) -> serde_json::Value {
    let path = std::env::temp_dir().join(format!("{}.json", unique("event")));
    std::fs::write(&path, serde_json::to_vec(event).unwrap()).unwrap();
    let output = tokio::time::timeout(
        Duration::from_secs(40),
        command
            .args(["lambda", "--key", "/id", "--scope", "lam"])
            .env("LOG", log)
            .stdout(std::process::Stdio::piped())
            .arg("--event")
            .arg(&path)
            .args(["--event-timeout", timeout_secs, "--", "sh", "-c", handler])
            .output(),
    )
    .await
    .expect("a local invocation ends within its timeout")
    .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).unwrap_or_else(|e| {
        panic!(
            "stdout is only the batch response ({e}): {:?}",
            String::from_utf8_lossy(&output.stdout)
        )
    })
}
