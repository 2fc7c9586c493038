//! Zero to first token: a question streamed while no worker runs, through
//! the whole path, with real NATS and Redis, the gateway, and `ebb-scaler`
//! starting tiny-model `ebb-worker` processes (the process backend), over
//! repeated trials (p50 and p99 of each phase):
//!
//! - `activation`: the question seen at zero workers -> the worker start
//!   issued (the scaler's own measure, `/status` `activation_delays_ms`);
//! - `spawn`: the rest of the way to the worker process running (the
//!   question's trip to the scaler, the process start): the worker's
//!   heartbeat `started_at_ms` minus the ask, minus `activation`;
//! - `worker_start`: the worker's `ready_at_ms - started_at_ms`, and within
//!   it the `start_phases` its heartbeats report (download, weights,
//!   tokenizer, warm_up), when they do;
//! - `first_token_after_ready`: ready -> the first `token` event read from
//!   `/v1/questions/<id>/events`;
//! - `total`: the ask -> that first token.
//!
//! Between trials the scaler goes back to zero (1 s idle window).
//!
//! `cargo build --release --bins && cargo bench -p ebb-tests --bench zero_to_first_token`
//! (EBB_BENCH_TRIALS, default 20). Writes `target/bench/zero_to_first_token.json`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ebb_nats::subjects;
use ebb_tests::{ScalerProcess, SseReader, Stack, StackOptions};
use futures::StreamExt;
use serde_json::{Value, json};

const POLICY: &str = r#"
tick: 1s
resources: {min_instances: 0, max_instances: 1}
target: {stable_window: 3s, panic_window: 2s, default_service_time: 1s}
cooldowns: {scale_down_stabilization: 1s, scale_to_zero_idle: 1s}
"#;

/// Workers' latest heartbeats that carry `ready_at_ms`, by worker id (ids
/// start with the start time, so the first are the oldest).
type Ready = Arc<Mutex<BTreeMap<String, Value>>>;
const HEARTBEATS_KEPT: usize = 256;

/// One trial, in milliseconds.
#[derive(Debug, Default)]
struct Trial {
    total: f64,
    activation: f64,
    spawn: f64,
    worker_start: f64,
    /// `worker_start` less the reported phases: connecting, opening the
    /// queue, anything no phase covers.
    outside_phases: f64,
    first_token_after_ready: f64,
    phases: Vec<(String, f64)>,
}

fn bench_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"))
        .join("bench")
}

async fn collect_ready_heartbeats(stack: &Stack) -> Ready {
    let ready: Ready = Arc::default();
    let mut beats = stack
        .nats_client()
        .await
        .subscribe(subjects::HEARTBEAT)
        .await
        .expect("subscribe to heartbeats");
    let into = ready.clone();
    tokio::spawn(async move {
        while let Some(message) = beats.next().await {
            let Ok(beat) = serde_json::from_slice::<Value>(&message.payload) else {
                continue;
            };
            let Some(id) = beat["worker_id"].as_str().map(str::to_owned) else {
                continue;
            };
            if beat["ready_at_ms"].is_u64() {
                let mut ready = into.lock().expect("heartbeat lock");
                ready.insert(id, beat);
                if ready.len() > HEARTBEATS_KEPT {
                    ready.pop_first();
                }
            }
        }
    });
    ready
}

/// The ready heartbeat of the first worker started at or after `since_ms`.
async fn ready_worker_since(ready: &Ready, since_ms: u64) -> Value {
    ebb_tests::eventually(Duration::from_secs(30), "the trial's worker ready", || {
        let found = ready
            .lock()
            .expect("heartbeat lock")
            .values()
            .filter(|beat| {
                beat["started_at_ms"]
                    .as_u64()
                    .is_some_and(|at| at >= since_ms)
            })
            .min_by_key(|beat| beat["started_at_ms"].as_u64())
            .cloned();
        async move { found.ok_or("no ready heartbeat yet") }
    })
    .await
}

/// Asks at zero workers and follows the question to its first token.
async fn trial(stack: &Stack, scaler: &ScalerProcess, ready: &Ready, number: usize) -> Trial {
    scaler
        .wait_status(Duration::from_secs(120), "asleep at zero", |s| {
            s["desired"] == 0 && s["workers"].as_array().is_some_and(|w| w.is_empty())
        })
        .await;
    // Let the scaler settle into its long sleep, so the arrival must wake it.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let activations_before = scaler.status().await["activation_delays_ms"]
        .as_array()
        .map_or(0, Vec::len);
    let asked_ms = ebb_nats::now_ms();
    let (code, body) = stack
        .ask(json!({"question": format!("Zero to first token, trial {number}"), "max_tokens": 4, "wait_seconds": 0}))
        .await;
    assert_eq!(code, 202, "{body}");
    let id = body["id"].as_str().expect("an id");
    let response = stack
        .http
        .get(format!("{}/v1/questions/{id}/events", stack.gateway_url))
        .send()
        .await
        .expect("the events stream");
    let mut events = SseReader::new(response);
    let first_token_ms = loop {
        let event = events
            .next(Duration::from_secs(120))
            .await
            .expect("a token within 120 s");
        match event.event.as_str() {
            "token" => break ebb_nats::now_ms(),
            "done" | "failed" => panic!("{} before any token: {}", event.event, event.data),
            _ => {}
        }
    };
    let beat = ready_worker_since(ready, asked_ms).await;
    let status = scaler
        .wait_status(Duration::from_secs(10), "the activation recorded", |s| {
            s["activation_delays_ms"]
                .as_array()
                .is_some_and(|d| d.len() > activations_before)
        })
        .await;
    let activation = status["activation_delays_ms"]
        .as_array()
        .and_then(|delays| delays.last())
        .and_then(Value::as_f64)
        .expect("an activation delay");
    let started = beat["started_at_ms"].as_u64().expect("started_at_ms") as f64;
    let ready_at = beat["ready_at_ms"].as_u64().expect("ready_at_ms") as f64;
    let phases: Vec<(String, f64)> = beat["start_phases"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|phase| Some((phase["phase"].as_str()?.to_owned(), phase["ms"].as_f64()?)))
        .collect();
    let in_phases: f64 = phases.iter().map(|(_, ms)| ms).sum();
    Trial {
        total: (first_token_ms - asked_ms) as f64,
        activation,
        spawn: started - asked_ms as f64 - activation,
        worker_start: ready_at - started,
        outside_phases: ready_at - started - in_phases,
        first_token_after_ready: first_token_ms as f64 - ready_at,
        phases,
    }
}

/// `{"p50_s", "p99_s"}` of millisecond samples.
fn percentiles(mut samples: Vec<f64>) -> Value {
    samples.sort_by(f64::total_cmp);
    let at = |quantile| {
        ebb_runtime::quantile::nearest_rank(&samples, quantile)
            .map(|ms| (ms / 1000.0 * 1e4).round() / 1e4)
    };
    json!({"p50_s": at(0.5), "p99_s": at(0.99), "samples": samples.len()})
}

fn summarize(trials: &[Trial]) -> Value {
    let of = |pick: fn(&Trial) -> f64| percentiles(trials.iter().map(pick).collect());
    let mut phases: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    for trial in trials {
        for (phase, ms) in &trial.phases {
            phases.entry(phase.clone()).or_default().push(*ms);
        }
    }
    json!({
        "trials": trials.len(),
        "model": "tiny random-weight Qwen2 (ebb-worker tiny-model), CPU",
        "backend": "process",
        "total": of(|t| t.total),
        "activation": of(|t| t.activation),
        "spawn": of(|t| t.spawn),
        "worker_start": of(|t| t.worker_start),
        "worker_start_outside_phases": of(|t| t.outside_phases),
        "first_token_after_ready": of(|t| t.first_token_after_ready),
        "phases": phases
            .into_iter()
            .map(|(phase, samples)| (phase, percentiles(samples)))
            .collect::<serde_json::Map<_, _>>(),
    })
}

fn print_table(summary: &Value) {
    println!(
        "zero to first token over {} trials (process backend, tiny model)",
        summary["trials"]
    );
    println!("{:<28} {:>9} {:>9}", "phase", "p50 s", "p99 s");
    let row = |label: &str, figures: &Value| {
        let seconds = |key: &str| {
            figures[key]
                .as_f64()
                .map_or("-".to_owned(), |s| format!("{s:.3}"))
        };
        println!(
            "{label:<28} {:>9} {:>9}",
            seconds("p50_s"),
            seconds("p99_s")
        );
    };
    row("activation (scaler)", &summary["activation"]);
    row("spawn", &summary["spawn"]);
    row("worker start -> ready", &summary["worker_start"]);
    if let Some(phases) = summary["phases"].as_object() {
        for (phase, figures) in phases {
            row(&format!("  {phase}"), figures);
        }
    }
    row(
        "  outside the phases",
        &summary["worker_start_outside_phases"],
    );
    row("ready -> first token", &summary["first_token_after_ready"]);
    row("total: ask -> first token", &summary["total"]);
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let trials: usize = std::env::var("EBB_BENCH_TRIALS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let stack = Stack::start(StackOptions::default()).await;
    let ready = collect_ready_heartbeats(&stack).await;
    let scaler = ScalerProcess::start(&stack, POLICY, &[]);
    let mut results = Vec::with_capacity(trials);
    for number in 0..trials {
        let result = trial(&stack, &scaler, &ready, number).await;
        eprintln!(
            "trial {number}: total {:.0} ms (activation {:.0}, spawn {:.0}, worker start {:.0}, first token {:.0})",
            result.total,
            result.activation,
            result.spawn,
            result.worker_start,
            result.first_token_after_ready
        );
        results.push(result);
    }
    let summary = summarize(&results);
    print_table(&summary);
    let dir = bench_dir();
    std::fs::create_dir_all(&dir).expect("create target/bench");
    let path = dir.join("zero_to_first_token.json");
    std::fs::write(
        &path,
        serde_json::to_vec_pretty(&summary).expect("summary JSON"),
    )
    .expect("write the summary");
    println!("written to {}", path.display());
}
