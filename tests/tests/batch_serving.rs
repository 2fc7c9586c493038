//! The batching worker against real NATS and Redis: questions back to back
//! with no idle gap, several in flight at once, failures that stay with
//! their question, drains and crashes with a full batch, and the KV budget.

use std::time::Duration;

use ebb_nats::{Heartbeat, subjects};
use ebb_tests::{Stack, StackOptions, WorkerProcess};
use futures::StreamExt;
use serde_json::{Value, json};

/// Slow enough generation (100 ms a step) to act mid-answer.
const SLOW: [&str; 2] = ["--debug-token-delay", "100ms"];

async fn accepted(stack: &Stack, body: Value) -> String {
    let (code, reply) = stack.ask(body).await;
    assert_eq!(code, 202, "{reply}");
    reply["id"].as_str().unwrap().to_owned()
}

async fn ask_many(stack: &Stack, count: usize, max_tokens: u32) -> Vec<String> {
    let mut ids = Vec::new();
    for i in 0..count {
        let body = json!({"question": format!("Question number {i}: why?"), "max_tokens": max_tokens, "wait_seconds": 0});
        ids.push(accepted(stack, body).await);
    }
    ids
}

async fn wait_all_running(stack: &Stack, ids: &[String]) {
    for id in ids {
        stack.wait_running(id).await;
    }
}

async fn all_terminal(stack: &Stack, ids: &[String]) -> Vec<Value> {
    let mut records = Vec::new();
    for id in ids {
        records.push(stack.wait_terminal(id, Duration::from_secs(90)).await);
    }
    records
}

/// When generation started and ended (ms since the epoch), from a record.
fn span_ms(record: &Value) -> (u64, u64) {
    let created = record["created_at_ms"].as_u64().unwrap();
    let timings = &record["timings"];
    let start = created + timings["queue_ms"].as_u64().unwrap();
    (start, start + timings["inference_ms"].as_u64().unwrap())
}

/// The most questions any of `worker`'s heartbeats reported in the engine.
fn watch_active(
    client: async_nats::Client,
    worker: &WorkerProcess,
) -> tokio::task::JoinHandle<u32> {
    let id = worker.id.clone();
    tokio::spawn(async move {
        let mut beats = client.subscribe(subjects::HEARTBEAT).await.unwrap();
        let mut most = 0;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
        while let Ok(Some(message)) = tokio::time::timeout_at(deadline, beats.next()).await {
            let beat: Heartbeat = serde_json::from_slice(&message.payload).unwrap();
            if beat.worker_id == id {
                most = most.max(beat.active);
                if beat.jobs_done >= 6 && beat.active == 0 {
                    break;
                }
            }
        }
        most
    })
}

#[tokio::test]
async fn back_to_back_questions_are_served_without_an_idle_gap() {
    // One slot, so the questions run one after another; nothing waits on an
    // empty high-priority consumer between them (it used to cost 2 s each).
    let stack = Stack::start(StackOptions::default()).await;
    let worker = stack.worker(&["--max-batch", "1"]);
    stack.wait_ready(&worker).await;
    let client = stack.nats_client().await;
    let mut beats = client.subscribe(subjects::HEARTBEAT).await.unwrap();
    let ids = ask_many(&stack, 6, 8).await;
    let mut spans: Vec<(u64, u64)> = all_terminal(&stack, &ids)
        .await
        .iter()
        .map(span_ms)
        .collect();
    spans.sort();
    for pair in spans.windows(2) {
        let gap = pair[1].0.saturating_sub(pair[0].1);
        assert!(
            gap < 1_000,
            "{gap} ms idle between two queued questions: {spans:?}"
        );
    }
    // The same system prompt six times: the prefix cache ran it once.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let message = tokio::time::timeout_at(deadline, beats.next())
            .await
            .expect("a heartbeat after the six answers")
            .unwrap();
        let beat: Heartbeat = serde_json::from_slice(&message.payload).unwrap();
        if beat.worker_id == worker.id && beat.jobs_done == 6 {
            assert!(beat.prefill_tokens > 0, "{beat:?}");
            assert!(
                beat.prefill_tokens_saved > 0,
                "five prefixes reused: {beat:?}"
            );
            break;
        }
    }
}

#[tokio::test]
async fn a_poison_question_in_a_batch_fails_alone() {
    let stack = Stack::start(StackOptions {
        max_deliver: 1,
        ..StackOptions::default()
    })
    .await;
    let worker = stack.worker(&[
        "--max-batch",
        "4",
        "--debug-fail-marker",
        "POISON",
        "--debug-token-delay",
        "30ms",
    ]);
    stack.wait_ready(&worker).await;
    let mut ids = ask_many(&stack, 3, 20).await;
    ids.push(
        accepted(
            &stack,
            json!({"question": "POISON pill", "wait_seconds": 0}),
        )
        .await,
    );
    let records = all_terminal(&stack, &ids).await;
    for record in &records[..3] {
        assert_eq!(record["status"], "done", "{record}");
    }
    assert_eq!(records[3]["status"], "failed", "{}", records[3]);
    // The three answers were generated side by side, in one batch.
    let spans: Vec<_> = records[..3].iter().map(span_ms).collect();
    let latest_start = spans.iter().map(|s| s.0).max().unwrap();
    let earliest_end = spans.iter().map(|s| s.1).min().unwrap();
    assert!(latest_start < earliest_end, "not batched: {spans:?}");
}

#[tokio::test]
async fn sigterm_with_a_full_batch_finishes_all_four_and_exits_0() {
    let stack = Stack::start(StackOptions::default()).await;
    let mut worker = stack.worker(&[&["--max-batch", "4"][..], &SLOW].concat());
    stack.wait_ready(&worker).await;
    let ids = ask_many(&stack, 4, 30).await;
    wait_all_running(&stack, &ids).await;
    let behind = ask_many(&stack, 1, 30).await;

    worker.signal("TERM");
    let status = worker.wait_exit(Duration::from_secs(60)).await;
    assert_eq!(status.code(), Some(0), "drained cleanly");
    for id in &ids {
        let (_, record) = stack.status_of(id).await;
        assert_eq!(
            record["status"], "done",
            "finished before exiting: {record}"
        );
        assert_eq!(record["attempts"], 1, "{record}");
    }
    let (_, record) = stack.status_of(&behind[0]).await;
    assert_eq!(
        record["status"], "queued",
        "no slot was free for it: {record}"
    );
}

#[tokio::test]
async fn sigkill_with_a_full_batch_loses_none() {
    let stack = Stack::start(StackOptions {
        ack_wait: "2s",
        ..StackOptions::default()
    })
    .await;
    let mut doomed = stack.worker(&[&["--max-batch", "4"][..], &SLOW].concat());
    stack.wait_ready(&doomed).await;
    let ids = ask_many(&stack, 4, 40).await;
    wait_all_running(&stack, &ids).await;
    doomed.signal("KILL");
    doomed.wait_exit(Duration::from_secs(5)).await;

    let rescuer = stack.worker(&["--max-batch", "4"]);
    for record in all_terminal(&stack, &ids).await {
        assert_eq!(record["status"], "done", "{record}");
        assert_eq!(record["attempts"], 2, "redelivered once: {record}");
    }
    drop(rescuer);
}

/// A question whose prompt (with the worker's default system prompt) plus
/// `max_tokens` needs about `positions` cache positions.
fn question_needing(positions: usize, index: usize) -> Value {
    // Distinct questions, so none is answered from the cache.
    let question = format!(
        "{index}: {}",
        "Why do rivers bend and wander across a flat valley floor? ".repeat(8)
    );
    let prompts = ebb_worker::generate::Prompts::new(
        &ebb_tests::tiny_model_dir().join("tokenizer.json"),
        ebb_worker::generate::DEFAULT_SYSTEM_PROMPT.into(),
    )
    .unwrap();
    let job = ebb_nats::Job {
        language: Some("en".into()),
        ..ebb_tests::tiny_job(question.trim(), 1, None)
    };
    let prompt_len = prompts.request(&job, 8_192).unwrap().prompt.ids.len();
    assert!(prompt_len + 20 < positions, "prompt of {prompt_len} tokens");
    json!({"question": question, "language": "en", "max_tokens": positions - prompt_len, "wait_seconds": 0})
}

#[tokio::test]
async fn a_kv_budget_for_two_runs_two_at_a_time_and_leaves_the_rest_queued() {
    let stack = Stack::start(StackOptions::default()).await;
    // Tiny model in f32: 512 bytes a position, so 1 MiB holds 2,048
    // positions: two questions of ~850, not three.
    let budget = [
        "--kv-cache-mib",
        "1",
        "--prefix-cache-tokens",
        "0",
        "--max-batch",
        "8",
        "--dtype",
        "f32",
    ];
    let worker = stack.worker(&[&budget[..], &["--debug-token-delay", "20ms"]].concat());
    stack.wait_ready(&worker).await;
    let most_active = watch_active(stack.nats_client().await, &worker);
    let mut ids = Vec::new();
    for index in 0..6 {
        ids.push(accepted(&stack, question_needing(850, index)).await);
    }
    // While the first two answer, the others stay in JetStream (one may
    // wait in the worker for memory).
    wait_all_running(&stack, &ids[..2]).await;
    let pending = stack
        .questions_stream()
        .await
        .consumer_info(subjects::consumer(ebb_nats::Priority::Normal))
        .await
        .unwrap();
    assert!(
        pending.num_pending >= 3,
        "{} left in JetStream",
        pending.num_pending
    );

    for record in all_terminal(&stack, &ids).await {
        assert_eq!(record["status"], "done", "{record}");
    }
    assert_eq!(most_active.await.unwrap(), 2, "two at once, never more");

    // A question that can never fit fails at once, naming the budget.
    let (code, reply) = stack
        .ask(json!({"question": "x ".repeat(1_900), "max_tokens": 1024, "wait_seconds": 30}))
        .await;
    assert_eq!(code, 200, "{reply}");
    assert_eq!(reply["status"], "failed", "{reply}");
    let (_, record) = stack.status_of(reply["id"].as_str().unwrap()).await;
    let error = record["error"].as_str().unwrap();
    assert!(error.contains("--kv-cache-mib budget of 1 MiB"), "{error}");
    assert_eq!(record["attempts"], 1, "failed on the first try: {record}");
}
