//! What the benchmarks share: `wrk` against the gateway, raw JetStream
//! publishes, medians, and one printed line (and JSON figure) per
//! side-by-side comparison.

use std::future::Future;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use async_nats::jetstream::message::PublishMessage;
use ebb_nats::Job;

use serde_json::json;

/// A benchmark knob from the environment, else `default`.
pub fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The median of a benchmark's rounds.
pub fn median(values: Vec<f64>) -> f64 {
    ebb_runtime::quantile::of(values, 0.5)
}

/// Prints one comparison; returns its medians and ratio for the JSON.
pub fn report(
    name: &str,
    ours: &[f64],
    baseline_name: &str,
    baseline: &[f64],
    goal: Option<f64>,
) -> serde_json::Value {
    let (ours, baseline) = (median(ours.to_vec()), median(baseline.to_vec()));
    let ratio = ours / baseline;
    let goal_text = goal.map_or(String::new(), |goal| format!(" (goal >= {goal})"));
    println!(
        "{name}: {ours:.0}/s vs {baseline_name}: {baseline:.0}/s -> ratio {ratio:.2}{goal_text}"
    );
    json!({"per_second": ours, "baseline_per_second": baseline, "ratio": ratio})
}

/// Runs `wrk` against the gateway; returns requests/s (all must succeed).
pub fn wrk(url: &str, script: &str, connections: usize, seconds: f64) -> f64 {
    let script_path = std::env::temp_dir().join(format!("ebb-wrk-{}.lua", std::process::id()));
    std::fs::write(&script_path, script).expect("write wrk script");
    let output = Command::new("wrk")
        .args([
            "-t1",
            &format!("-c{connections}"),
            &format!("-d{seconds}s"),
            "-s",
        ])
        .arg(&script_path)
        .arg(url)
        .output()
        .expect("wrk runs (apt-get install wrk)");
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(!text.contains("Non-2xx"), "some requests failed:\n{text}");
    text.lines()
        .find_map(|line| line.strip_prefix("Requests/sec:"))
        .and_then(|rate| rate.trim().parse().ok())
        .unwrap_or_else(|| panic!("no rate in wrk output:\n{text}"))
}

/// Runs `concurrency` loops of `call` for `seconds`; returns calls/s.
pub async fn throughput<F, Fut>(concurrency: usize, seconds: f64, call: F) -> f64
where
    F: Fn(u64) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send,
{
    let call = Arc::new(call);
    let done = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs_f64(seconds);
    let started = Instant::now();
    let tasks: Vec<_> = (0..concurrency)
        .map(|task| {
            let (call, done) = (call.clone(), done.clone());
            tokio::spawn(async move {
                let mut n = 0u64;
                while Instant::now() < deadline {
                    call((task as u64) << 32 | n).await;
                    n += 1;
                }
                done.fetch_add(n, Ordering::Relaxed);
            })
        })
        .collect();
    for task in tasks {
        task.await.expect("load task");
    }
    done.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64()
}

/// The job the gateway would publish for question `n`.
pub fn raw_job(n: u64) -> Job {
    Job {
        id: format!("raw-{n}"),
        question: format!("Question number {n}?"),
        grade: None,
        course: None,
        language: None,
        max_tokens: 512,
        sampling: Default::default(),
        priority: Default::default(),
        model: "ebb/tiny-qwen2@test".into(),
        cache_key: Some("0".repeat(64)),
        enqueued_at_ms: 0,
        owner: None,
        history: Vec::new(),
        callback_url: None,
    }
}

/// Raw publish-with-ack/s of question jobs on `subject` at `concurrency`.
pub async fn publishes(
    jetstream: &async_nats::jetstream::Context,
    subject: String,
    concurrency: usize,
    seconds: f64,
) -> f64 {
    let jetstream = jetstream.clone();
    throughput(concurrency, seconds, move |n| {
        let (jetstream, subject) = (jetstream.clone(), subject.clone());
        async move { publish_with_ack(&jetstream, subject, &raw_job(n)).await }
    })
    .await
}

/// Publishes `job` as the gateway does (its id as `Nats-Msg-Id`) and
/// waits for JetStream's ack.
pub async fn publish_with_ack(
    jetstream: &async_nats::jetstream::Context,
    subject: String,
    job: &Job,
) {
    let message = PublishMessage::build()
        .payload(serde_json::to_vec(job).expect("json").into())
        .message_id(job.id.clone());
    let ack = jetstream
        .send_publish(subject, message)
        .await
        .expect("publish");
    ack.await.expect("ack");
}
