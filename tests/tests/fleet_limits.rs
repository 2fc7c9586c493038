//! The gateway sheds by the fleet maximum the scaler announces, not by a
//! hand-kept copy of it: `--max-workers` only applies while no scaler is
//! heard.

use std::time::Duration;

use ebb_nats::{FleetStatus, subjects};
use ebb_tests::{ScalerProcess, Stack, StackOptions, eventually};
use futures::StreamExt;
use serde_json::{Value, json};

async fn ask(stack: &Stack, text: &str) -> (u16, Value) {
    let response = stack
        .http
        .post(format!("{}/v1/questions", stack.gateway_url))
        .json(&json!({"question": text, "wait_seconds": 0}))
        .send()
        .await
        .expect("gateway reachable");
    let code = response.status().as_u16();
    (code, response.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_sheds_by_the_scalers_maximum_and_falls_back_to_its_flag() {
    // The flag says 100 workers: at 1 s a question and a 5 s goal, 500
    // waiting questions would fit. The scaler runs at most one: five fit.
    let options = StackOptions::with_gateway_args(&[
        "--insecure-dev",
        "--rate-limit-per-ip",
        "1000000",
        "--max-workers",
        "100",
        "--service-time-estimate",
        "1s",
        "--latency-goal",
        "5s",
    ]);
    let stack = Stack::start(options).await;
    let client = stack.nats_client().await;
    let mut announcements = client
        .subscribe(subjects::SCALER_STATUS)
        .await
        .expect("subscribe");
    let policy = "tick: 200ms\nresources: {min_instances: 0, max_instances: 1}\ntarget: {slots_per_worker: 4}\n";
    let mut scaler = ScalerProcess::start(&stack, policy, &[]);
    // Nothing drains the backlog: the queue depth alone decides.
    scaler.hold_at_zero().await;

    let message = tokio::time::timeout(Duration::from_secs(10), announcements.next())
        .await
        .expect("the scaler announces its fleet within 10 s")
        .expect("subscription open");
    let status: FleetStatus = serde_json::from_slice(&message.payload).expect("FleetStatus JSON");
    assert_eq!(status.max_workers, 1);
    assert_eq!(status.slots_per_worker, Some(4));
    assert!(status.published_at_ms > 0);
    // The gateway subscribed before the scaler started, so it got this
    // announcement too; give its watcher a moment to take it in.
    tokio::time::sleep(Duration::from_millis(300)).await;

    // A sixth waiting question cannot be served in 5 s by the scaler's one worker.
    let (accepted, _) = stack.fill_until_shed(5).await;
    assert!(accepted >= 4, "only {accepted} accepted");

    // With the scaler gone, its maximum no longer bounds anything: after
    // 10 s of silence the flag's 100 workers apply again.
    scaler.kill();
    let (code, body) = eventually(
        Duration::from_secs(30),
        "the gateway back on --max-workers",
        || async {
            let answer = ask(&stack, "After the scaler?").await;
            if answer.0 == 202 {
                Ok(answer)
            } else {
                Err(answer.1)
            }
        },
    )
    .await;
    assert_eq!(code, 202, "{body}");
}
