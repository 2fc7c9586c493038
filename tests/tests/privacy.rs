//! Students are minors: question text never reaches logs above debug level.

use std::time::Duration;

use ebb_tests::{Stack, StackOptions, TempDir};
use serde_json::json;

#[tokio::test]
async fn question_text_stays_out_of_info_logs() {
    // One delivery: the poison question below fails on its first attempt.
    let stack = Stack::start(StackOptions {
        max_deliver: 1,
        ..StackOptions::default()
    })
    .await;
    let dir = TempDir::new("privacy");
    let log = dir.path().join("worker.log");
    let worker = stack.worker_logging_to(&["--debug-fail-marker", "POISON"], &log);
    stack.wait_ready(&worker).await;
    let secret = "my-name-is-Alice-Zhang-and-I-live-at-12-Elm-Street";
    let (code, body) = stack
        .ask(json!({"question": format!("Help with homework? {secret}"), "max_tokens": 4}))
        .await;
    assert_eq!(
        (code, body["status"].as_str()),
        (200, Some("done")),
        "{body}"
    );
    // A poison question's error path logs too, and must not leak it either.
    let (code, body) = stack
        .ask(json!({"question": format!("POISON {secret}"), "wait_seconds": 0}))
        .await;
    assert_eq!(code, 202, "{body}");
    let id = body["id"].as_str().expect("an id");
    let record = stack.wait_terminal(id, Duration::from_secs(30)).await;
    assert_eq!(record["status"], "failed", "{record}");
    drop(worker);
    let logs = std::fs::read_to_string(&log).unwrap();
    assert!(
        logs.contains("answered"),
        "the worker logged at info: {logs}"
    );
    assert!(
        logs.contains("debug-fail-marker"),
        "the failure was logged: {logs}"
    );
    assert!(
        !logs.contains(secret),
        "question text leaked into the worker's info logs"
    );
}
