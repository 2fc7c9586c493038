//! Activation delay: the first question at zero workers -> the scaler
//! issuing a worker start, as the scaler measures it, over repeated trials
//! (p50 and p99). The scaler runs with the production 1 s tick: arrivals at
//! zero must wake it at once, not at the next tick.
//!
//! `cargo build --release --bins && cargo bench -p ebb-tests --bench activation`
//! (EBB_BENCH_TRIALS, default 25)

use std::time::Duration;

use ebb_tests::{ScalerProcess, Stack, StackOptions};
use serde_json::json;

const POLICY: &str = r#"
tick: 1s
resources: {min_instances: 0, max_instances: 1}
target: {stable_window: 3s, panic_window: 2s, default_service_time: 1s}
cooldowns: {scale_down_stabilization: 1s, scale_to_zero_idle: 1s}
"#;

fn percentile(sorted: &[f64], quantile: f64) -> f64 {
    ebb_runtime::quantile::nearest_rank(sorted, quantile).expect("at least one trial")
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let trials: usize = std::env::var("EBB_BENCH_TRIALS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(25);
    let stack = Stack::start(StackOptions::default()).await;
    let scaler = ScalerProcess::start(&stack, POLICY, &[]);
    for trial in 0..trials {
        scaler
            .wait_status(Duration::from_secs(60), "asleep at zero", |s| {
                s["desired"] == 0 && s["workers"].as_array().is_some_and(|w| w.is_empty())
            })
            .await;
        // Let the scaler settle into its long sleep, so the arrival must wake it.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let (code, body) = stack
            .ask(json!({"question": format!("Activation trial {trial}"), "max_tokens": 2, "wait_seconds": 0}))
            .await;
        assert_eq!(code, 202, "{body}");
        scaler
            .wait_status(Duration::from_secs(10), "a worker start", |s| {
                s["activation_delays_ms"]
                    .as_array()
                    .is_some_and(|d| d.len() > trial)
            })
            .await;
    }
    let status = scaler.status().await;
    let mut delays: Vec<f64> = status["activation_delays_ms"]
        .as_array()
        .expect("delays")
        .iter()
        .filter_map(|d| d.as_f64())
        .collect();
    delays.sort_by(f64::total_cmp);
    println!(
        "activation delay over {} trials (question seen at zero workers -> worker start issued): p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms (tick 1 s)",
        delays.len(),
        percentile(&delays, 0.5),
        percentile(&delays, 0.99),
        delays.last().copied().unwrap_or_default()
    );
}
