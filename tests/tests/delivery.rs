//! No accepted question is lost: crashes, drains, poison and outages all end
//! with every question `done` or `failed`.

use std::time::Duration;

use ebb_tests::{Stack, StackOptions, eventually};
use serde_json::json;

/// Slow enough generation (40 pieces x 100 ms) to act mid-answer.
const SLOW: [&str; 2] = ["--debug-token-delay", "100ms"];

async fn accepted_id(stack: &Stack, question: &str, max_tokens: u32) -> String {
    let (code, body) = stack
        .ask(json!({"question": question, "max_tokens": max_tokens, "wait_seconds": 0}))
        .await;
    assert_eq!(code, 202, "{body}");
    body["id"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn a_worker_killed_mid_answer_loses_nothing() {
    let stack = Stack::start(StackOptions {
        ack_wait: "2s",
        ..StackOptions::default()
    })
    .await;
    let mut doomed = stack.worker(&SLOW);
    stack.wait_ready(&doomed).await;
    let id = accepted_id(&stack, "Explain fractions.", 40).await;
    stack.wait_running(&id).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    doomed.signal("KILL");
    doomed.wait_exit(Duration::from_secs(5)).await;

    let rescuer = stack.worker(&[]);
    let record = stack.wait_terminal(&id, Duration::from_secs(60)).await;
    assert_eq!(record["status"], "done", "{record}");
    assert_eq!(
        record["attempts"], 2,
        "redelivered once after the ack wait: {record}"
    );
    drop(rescuer);
}

#[tokio::test]
async fn progress_acks_keep_a_long_answer_from_being_redelivered() {
    // Generation (~4 s) outlasts the ack wait (1.5 s) twice over.
    let stack = Stack::start(StackOptions {
        ack_wait: "1500ms",
        ..StackOptions::default()
    })
    .await;
    // Both slow, so whichever takes the question holds it past the ack wait
    // while the other stands by to steal a redelivery.
    let first = stack.worker(&SLOW);
    let second = stack.worker(&SLOW);
    stack.wait_ready(&first).await;
    stack.wait_ready(&second).await;
    let (code, body) = stack
        .ask(json!({"question": "Tell me about volcanoes.", "max_tokens": 40, "wait_seconds": 60}))
        .await;
    let id = body["id"].as_str().unwrap();
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["status"], "done");
    let inference_ms = body["timings"]["inference_ms"].as_u64().unwrap();
    assert!(
        inference_ms > 2 * 1500,
        "the answer outlasted two ack waits: {body}"
    );
    let (_, record) = stack.status_of(id).await;
    assert_eq!(record["attempts"], 1, "never redelivered: {record}");
}

#[tokio::test]
async fn sigterm_drains_the_question_in_hand_then_exits_0() {
    let stack = Stack::start(StackOptions::default()).await;
    // One slot: the second question waits in the queue (with more slots it
    // would join the batch; see batch_serving.rs for a full batch).
    let mut worker = stack.worker(&[&SLOW[..], &["--max-batch", "1"]].concat());
    stack.wait_ready(&worker).await;
    let in_hand = accepted_id(&stack, "What is a noun?", 30).await;
    stack.wait_running(&in_hand).await;
    let queued_behind = accepted_id(&stack, "What is a verb?", 30).await;

    worker.signal("TERM");
    let status = worker.wait_exit(Duration::from_secs(30)).await;
    assert_eq!(status.code(), Some(0), "drained cleanly");
    let (_, record) = stack.status_of(&in_hand).await;
    assert_eq!(
        record["status"], "done",
        "finished before exiting: {record}"
    );
    let (_, record) = stack.status_of(&queued_behind).await;
    assert_eq!(
        record["status"], "queued",
        "not taken while draining: {record}"
    );
    let pending = stack
        .questions_stream()
        .await
        .consumer_info(ebb_nats::subjects::consumer(ebb_nats::Priority::Normal))
        .await
        .unwrap();
    assert_eq!(
        (pending.num_pending, pending.num_ack_pending),
        (1, 0),
        "still in the queue, untouched"
    );
    let next = stack.worker(&[]);
    let record = stack
        .wait_terminal(&queued_behind, Duration::from_secs(60))
        .await;
    assert_eq!(record["status"], "done", "{record}");
    drop(next);
}

#[tokio::test]
async fn a_poison_question_fails_after_max_deliver_and_is_dead_lettered() {
    let stack = Stack::start(StackOptions {
        max_deliver: 3,
        ..StackOptions::default()
    })
    .await;
    let worker = stack.worker(&["--debug-fail-marker", "POISON", "--retry-backoff", "100ms"]);
    stack.wait_ready(&worker).await;
    let (code, body) = stack
        .ask(json!({"question": "POISON pill", "wait_seconds": 30}))
        .await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["status"], "failed");
    let id = body["id"].as_str().unwrap();
    let (_, record) = stack.status_of(id).await;
    assert_eq!(record["status"], "failed");
    assert_eq!(record["attempts"], 3, "{record}");
    assert!(
        record["error"].as_str().unwrap().contains("injected"),
        "{record}"
    );

    let letter = stack.dead_letter(id).await.expect("a dead letter is kept");
    assert_eq!((letter.id.as_str(), letter.deliveries), (id, 3));
    assert_eq!(stack.queued_messages().await, 0);

    // The worker survives poison and answers the next question.
    let (code, body) = stack
        .ask(json!({"question": "healthy question", "max_tokens": 4}))
        .await;
    assert_eq!(
        (code, body["status"].as_str()),
        (200, Some("done")),
        "{body}"
    );
}

#[tokio::test]
async fn a_worker_lost_on_the_last_delivery_still_gives_a_failed_status() {
    let stack = Stack::start(StackOptions {
        ack_wait: "1s",
        max_deliver: 1,
        ..StackOptions::default()
    })
    .await;
    let mut worker = stack.worker(&SLOW);
    stack.wait_ready(&worker).await;
    let id = accepted_id(&stack, "Why do leaves change colour?", 40).await;
    stack.wait_running(&id).await;
    worker.signal("KILL");
    worker.wait_exit(Duration::from_secs(5)).await;

    // The server notices the exhausted question when a worker next asks for
    // work (as the scaler's replacement would), and advises the gateway.
    let survivor = stack.worker(&[]);
    let record = stack.wait_terminal(&id, Duration::from_secs(30)).await;
    drop(survivor);
    assert_eq!(record["status"], "failed", "{record}");
    assert!(
        record["error"]
            .as_str()
            .unwrap()
            .contains("stopped responding"),
        "{record}"
    );
    let letter = stack.dead_letter(&id).await.expect("a dead letter is kept");
    assert!(letter.reason.contains("stopped responding"), "{letter:?}");
    assert_eq!(stack.queued_messages().await, 0);
}

#[tokio::test]
async fn nats_down_means_503_and_nothing_accepted_until_it_is_back() {
    let mut stack = Stack::start(StackOptions::default()).await;
    stack.nats.stop();
    for _ in 0..3 {
        let (code, body) = stack
            .ask(json!({"question": "anyone there?", "wait_seconds": 0}))
            .await;
        assert_eq!(code, 503, "{body}");
        assert_eq!(body["error"]["type"], "queue_unavailable");
    }
    stack.nats.resume();
    let accepting = &stack;
    let id = eventually(
        Duration::from_secs(15),
        "the gateway accepting again",
        || async move {
            let (code, body) = accepting
                .ask(json!({"question": "back?", "wait_seconds": 0}))
                .await;
            match code {
                202 => Ok(body["id"].as_str().unwrap().to_owned()),
                503 => Err(body),
                other => panic!("unexpected {other}: {body}"),
            }
        },
    )
    .await;
    // Only the question accepted after recovery is in the queue.
    let stream = stack.questions_stream().await;
    assert_eq!(stream.get_info().await.unwrap().state.messages, 1);
    let worker = stack.worker(&[]);
    let record = stack.wait_terminal(&id, Duration::from_secs(60)).await;
    assert_eq!(record["status"], "done");
    drop(worker);
}

/// What this proves: the gateway's accept path does not need Redis (no
/// cache lookup, no `queued` record), and the question waits in JetStream
/// until it can be answered. Answering while Redis is still down is not
/// claimed: a worker's `finish` needs the store (issue 14).
#[tokio::test]
async fn redis_down_at_accept_still_queues_the_question_and_it_is_answered_once_redis_is_back() {
    let mut stack = Stack::start(StackOptions::default()).await;
    stack.redis.stop();
    let (code, body) = stack
        .ask(json!({"question": "Is the cache needed?", "wait_seconds": 0}))
        .await;
    assert_eq!(code, 202, "accepted without Redis: {body}");
    let id = body["id"].as_str().unwrap().to_owned();
    stack.redis.resume();
    let worker = stack.worker(&[]);
    let record = stack.wait_terminal(&id, Duration::from_secs(60)).await;
    assert_eq!(record["status"], "done", "{record}");
    drop(worker);
}
