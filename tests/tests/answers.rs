//! Question -> answer through the real gateway, NATS, worker and Redis.

use std::time::Duration;

use ebb_tests::{Stack, StackOptions};
use serde_json::json;

#[tokio::test]
async fn a_question_is_answered_and_then_served_from_the_cache() {
    let stack = Stack::start(StackOptions::default()).await;
    let worker = stack.worker(&[]);
    stack.wait_ready(&worker).await;

    let (code, first) = stack
        .ask(json!({"question": "Why is the sky blue?", "grade": 7, "max_tokens": 24}))
        .await;
    assert_eq!(code, 200, "{first}");
    assert_eq!(first["status"], "done");
    assert_eq!(first["cached"], false);
    assert_eq!(first["model"], "ebb/tiny-qwen2@test");
    assert!(first["answer"].is_string());
    let timings = &first["timings"];
    assert!(
        timings["inference_ms"].is_u64() && timings["queue_ms"].is_u64(),
        "{first}"
    );
    assert!(timings["completion_tokens"].as_u64().unwrap() <= 24);

    let stream = stack.questions_stream().await;
    let published = stream.get_info().await.unwrap().state.last_sequence;

    // The same question, spelled differently, is a cache hit.
    let (code, second) = stack
        .ask(json!({"question": "  why is the SKY   blue? ", "grade": 7, "max_tokens": 24}))
        .await;
    assert_eq!(code, 200, "{second}");
    assert_eq!(second["cached"], true);
    assert_eq!(second["answer"], first["answer"]);
    assert_ne!(second["id"], first["id"]);
    let (code, hit_record) = stack.status_of(second["id"].as_str().unwrap()).await;
    assert_eq!(code, 200, "a cached answer's id resolves: {hit_record}");
    assert_eq!(
        (
            hit_record["status"].as_str(),
            hit_record["cached"].as_bool()
        ),
        (Some("done"), Some(true))
    );
    assert_eq!(hit_record["answer"], first["answer"]);
    assert_eq!(
        stream.get_info().await.unwrap().state.last_sequence,
        published,
        "a cache hit must not touch the queue"
    );

    // A different grade shapes the prompt: not the same cache entry.
    let (code, other) = stack
        .ask(json!({"question": "Why is the sky blue?", "grade": 3, "max_tokens": 24}))
        .await;
    assert_eq!(code, 200, "{other}");
    assert_eq!(other["cached"], false);

    let (code, record) = stack.status_of(first["id"].as_str().unwrap()).await;
    assert_eq!(code, 200);
    assert_eq!(record["status"], "done");
    assert_eq!(record["answer"], first["answer"]);
    assert_eq!(record["attempts"], 1);
}

#[tokio::test]
async fn wait_zero_returns_202_and_the_status_url_reaches_done() {
    let stack = Stack::start(StackOptions::default()).await;
    let (code, accepted) = stack
        .ask(json!({"question": "What is 7 x 8?", "wait_seconds": 0, "max_tokens": 8}))
        .await;
    assert_eq!(code, 202, "{accepted}");
    assert_eq!(accepted["status"], "queued");
    let id = accepted["id"].as_str().unwrap();
    assert_eq!(accepted["status_url"], format!("/v1/questions/{id}"));
    let (code, record) = stack.status_of(id).await;
    assert_eq!((code, record["status"].as_str()), (200, Some("queued")));

    // No worker yet: the question waits in the queue until one starts.
    let worker = stack.worker(&[]);
    let record = stack.wait_terminal(id, Duration::from_secs(60)).await;
    assert_eq!(record["status"], "done", "{record}");
    assert!(record["timings"]["queue_ms"].as_u64().is_some());
    drop(worker);
}

#[tokio::test]
async fn a_short_wait_returns_202_with_the_current_status() {
    let stack = Stack::start(StackOptions::default()).await;
    let (code, body) = stack
        .ask(json!({"question": "Name a prime number.", "wait_seconds": 0.3}))
        .await;
    assert_eq!(code, 202, "{body}");
    assert_eq!(body["status"], "queued");
}
