//! `Idempotency-Key` (issue 14): a retried POST returns the question it
//! already asked, with the same id and answer, and never queues a second.

use std::time::Duration;

use ebb_tests::{Stack, StackOptions};
use serde_json::{Value, json};

async fn post(stack: &Stack, path: &str, key: &str, body: &Value) -> (u16, Value) {
    let response = stack
        .http
        .post(format!("{}{path}", stack.gateway_url))
        .header("Idempotency-Key", key)
        .json(body)
        .send()
        .await
        .unwrap();
    (response.status().as_u16(), response.json().await.unwrap())
}

async fn published(stack: &Stack) -> u64 {
    stack
        .questions_stream()
        .await
        .get_info()
        .await
        .unwrap()
        .state
        .last_sequence
}

#[tokio::test]
async fn a_retried_question_is_the_same_question() {
    let stack = Stack::start(StackOptions::default()).await;
    let body = json!({"question": "Asked twice?", "max_tokens": 6, "wait_seconds": 0});
    // Concurrent retries, no worker yet: one question, one id.
    let (first, second) = tokio::join!(
        post(&stack, "/v1/questions", "retry-1", &body),
        post(&stack, "/v1/questions", "retry-1", &body)
    );
    assert_eq!((first.0, second.0), (202, 202), "{first:?} {second:?}");
    assert_eq!(first.1["id"], second.1["id"]);
    assert_eq!(published(&stack).await, 1);

    let worker = stack.worker(&[]);
    let id = first.1["id"].as_str().unwrap().to_owned();
    let record = stack.wait_terminal(&id, Duration::from_secs(60)).await;
    let waiting = json!({"question": "Asked twice, waiting?", "max_tokens": 6, "wait_seconds": 30});
    let (code, again) = post(&stack, "/v1/questions", "retry-2", &waiting).await;
    assert_eq!(code, 200, "{again}");
    let (code, retried) = post(&stack, "/v1/questions", "retry-2", &waiting).await;
    assert_eq!(code, 200, "{retried}");
    assert_eq!(retried["id"], again["id"]);
    assert_eq!(retried["answer"], again["answer"]);
    drop(worker);
    assert_eq!(record["status"], "done");
    assert_eq!(published(&stack).await, 2, "one question per key");

    // Another key is another question; the same key with another body is refused.
    let fresh = json!({"question": "Asked by another key?", "max_tokens": 6, "wait_seconds": 0});
    let (code, other) = post(&stack, "/v1/questions", "retry-3", &fresh).await;
    assert_eq!(code, 202, "{other}");
    assert_ne!(other["id"], first.1["id"]);
    let changed = json!({"question": "Something else?", "wait_seconds": 0});
    let (code, refused) = post(&stack, "/v1/questions", "retry-1", &changed).await;
    assert_eq!(code, 422, "{refused}");
    assert_eq!(refused["error"]["type"], "idempotency_key_reused");
    let (code, bad) = post(&stack, "/v1/questions", "has space", &body).await;
    assert_eq!(code, 422, "{bad}");
}

#[tokio::test]
async fn a_retried_chat_gets_the_same_completion() {
    let stack = Stack::start(StackOptions::default()).await;
    let worker = stack.worker(&[]);
    stack.wait_ready(&worker).await;
    let body = json!({"messages": [{"role": "user", "content": "Chat once?"}], "max_tokens": 6});
    let (code, first) = post(&stack, "/v1/chat/completions", "chat-1", &body).await;
    assert_eq!(code, 200, "{first}");
    let (code, again) = post(&stack, "/v1/chat/completions", "chat-1", &body).await;
    assert_eq!(code, 200, "{again}");
    assert_eq!(first["id"], again["id"]);
    assert_eq!(
        first["choices"][0]["message"]["content"],
        again["choices"][0]["message"]["content"]
    );
    assert_eq!(published(&stack).await, 1);
}
